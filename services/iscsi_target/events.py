"""The event names the connection core reports, mapped to the bus names in shared/events.py.

ERROR and SESSION_END are local: the service logs it (a fault in the SCSI layer) rather than sending it to the controller.
"""

from shared import events as bus

LOGIN = bus.ISCSI_LOGIN
LOGOUT = bus.ISCSI_LOGOUT
LOGIN_FAILED = bus.ISCSI_LOGIN_FAILED
FIRST_READ = bus.ISCSI_FIRST_READ
IO_STATS = bus.ISCSI_IO_STATS
ERROR = "iscsi.error"
SESSION_END = "iscsi.session_end"  # local: the service flushes the session's last I/O stats
