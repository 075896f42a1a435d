"""Names of the events services push to the controller, and the fields each carries.

An event on the bus is a msgpack map {"type", "v", "ts", "service", "instance", "fields"}; see
docs/architecture.md. Fields named `mac` and `ip` let the controller put an event on a client's timeline.
"""

# DHCP
LEASE_OFFERED = "dhcp.lease.offered"  # mac, ip, scope, client_class
LEASE_GRANTED = "dhcp.lease.granted"  # mac, ip, scope, expires, client_class, bootfile, root_path
LEASE_RENEWED = "dhcp.lease.renewed"  # mac, ip, expires
LEASE_RELEASED = "dhcp.lease.released"  # mac, ip
LEASE_DECLINED = "dhcp.lease.declined"  # mac, ip
LEASE_EXPIRED = "dhcp.lease.expired"  # mac, ip
DHCP_DISCOVER = "dhcp.discover"  # mac, client_class, arch
DHCP_NAK = "dhcp.nak"  # mac, ip, reason
DHCP_UNKNOWN_CLIENT = "dhcp.unknown_client"  # mac, scope
DHCP_POOL_EXHAUSTED = "dhcp.pool_exhausted"  # mac, scope

# TFTP
TFTP_STARTED = "tftp.transfer.started"  # ip, port, file, mac?, blksize, windowsize, tsize
TFTP_FINISHED = "tftp.transfer.finished"  # ip, file, mac?, bytes, duration, blksize, windowsize
TFTP_FAILED = "tftp.transfer.failed"  # ip, file, mac?, reason

# iSCSI
ISCSI_LOGIN = "iscsi.login"  # ip, initiator, target, isid, tsih, session_type
ISCSI_LOGOUT = "iscsi.logout"  # ip, initiator, target, tsih, reason
ISCSI_LOGIN_FAILED = "iscsi.login.failed"  # ip, initiator, target, reason
ISCSI_FIRST_READ = "iscsi.first_read"  # ip, initiator, target, tsih, lun
ISCSI_IO_STATS = "iscsi.io_stats"  # ip, initiator, target, tsih, lun, reads, writes, read_bytes, write_bytes, latency_us_avg

# Service lifecycle (sent by shared/service.py)
SERVICE_STARTED = "service.started"  # pid
SERVICE_APPLIED = "service.applied"  # revision
SERVICE_APPLY_FAILED = "service.apply_failed"  # revision, reason
SERVICE_STOPPING = "service.stopping"  # pid
