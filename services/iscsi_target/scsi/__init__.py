"""SCSI emulation for the iSCSI target: SPC-4 primary and SBC-3 block commands over file or RAM
backing stores. Sans-IO: no sockets; the transport calls in.

Interface (used by the connection core: responses.py, task_management.py, connection.py; and service.py):
    ScsiTarget(name, luns: dict[int, LogicalUnit])
        .luns                                   current {lun_id: LogicalUnit} (replaced whole on change)
        .data_out_length(lun, cdb) -> int       Data-Out bytes this CDB transfers (0 for non-writes)
        .execute(nexus, lun, cdb, data_out) -> ScsiResponse
        .task_management(nexus, function, lun, referenced_task=None) -> iSCSI TMF response code
        .nexus_lost(nexus)                      session gone: its RESERVE(6) and unit attentions go
        .add_lun(lu) or .add_lun(lun_id, lu) / .remove_lun(lun_id)
    LogicalUnit(backstore, lun_id, naa=None, serial=None, readonly=False, vendor="BOOTFLT",
                product="VIRTUAL DISK", target_name="")
    Nexus(initiator_port, target_port, session)
    RamBackstore(size, block_size=512)
    FileBackstore(path, size, block_size=512, readonly=False, sparse=False, create=True, write_through=False)
    ScsiResponse(status, sense, data)

Differences from the brief: add_lun also takes (lun_id, lu), as service.py calls it; a LOGICAL UNIT
RESET gives its unit attention to every nexus including the one that asked (SAM-5; libiscsi's
multipath reset test checks it); a TARGET COLD RESET reports POWER ON OCCURRED (0x29/0x01).
"""

from services.iscsi_target.scsi.backstore import BackstoreError, FileBackstore, RamBackstore
from services.iscsi_target.scsi.lun import LogicalUnit, Nexus
from services.iscsi_target.scsi.response import ScsiResponse
from services.iscsi_target.scsi.sense import ScsiError
from services.iscsi_target.scsi.target import ScsiTarget

__all__ = ["BackstoreError", "FileBackstore", "LogicalUnit", "Nexus", "RamBackstore", "ScsiError",
           "ScsiResponse", "ScsiTarget"]
