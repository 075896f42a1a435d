"""Any CDB and any Data-Out: execute answers with a well-formed response and never raises."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.iscsi_target.scsi import RamBackstore
from services.iscsi_target.scsi.target import COMMANDS

from .helpers import MiB, nexus, ready_target

TARGET = ready_target(RamBackstore(MiB), RamBackstore(MiB, block_size=4096))
OPCODES = sorted(COMMANDS) + [0x00, 0xFF, 0x48, 0x83]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(OPCODES), rest=st.binary(min_size=0, max_size=15), lun=st.integers(0, 2),
       data=st.one_of(st.none(), st.binary(max_size=2048)), who=st.integers(1, 3))
def test_execute_never_raises(op, rest, lun, data, who):
    cdb = memoryview(bytes([op]) + rest)
    length = TARGET.data_out_length(lun, cdb)
    assert length >= 0
    if length > 256 * 1024:
        data = None  # more than a test should allocate: the command must fail on its fields alone
    elif data is not None and length and len(data) != length:
        data = (data * (length // max(1, len(data)) + 1))[:length] if data else bytes(length)
    r = TARGET.execute(nexus(who), lun, cdb, memoryview(data) if data is not None else None)
    assert r.status in (0x00, 0x02, 0x18)
    if r.status == 0x02:
        assert r.sense is not None and len(r.sense) == 18 and r.sense[0] & 0x7F == 0x70
    else:
        assert r.sense is None
    for part in r.data:
        assert isinstance(part, (bytes, memoryview))
