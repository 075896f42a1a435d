"""RESERVE/RELEASE(6) and persistent reservations: the conflict matrix, keys, preemption, resets."""

from __future__ import annotations

import struct

import pytest

from .helpers import (data, key_asc, mode_sense6, nexus, pr_in, pr_out, pr_params, read10, ready_target, tur,
                      write10)

A, B, C = nexus(1), nexus(2), nexus(3)


def target():
    t = ready_target()
    for nx in (A, B, C):
        t.execute(nx, 0, tur(), None)
    return t


def reserve6(t, nx):
    return t.execute(nx, 0, bytes([0x16, 0, 0, 0, 0, 0]), None).status


def release6(t, nx):
    return t.execute(nx, 0, bytes([0x17, 0, 0, 0, 0, 0]), None).status


def can_read(t, nx):
    return t.execute(nx, 0, read10(0, 1), None).status == 0


def can_write(t, nx):
    return t.execute(nx, 0, write10(0, 1), bytes(512)).status == 0


def register(t, nx, key):
    return t.execute(nx, 0, pr_out(0), pr_params(0, key)).status


def test_reserve6_conflicts_for_others_until_released():
    t = target()
    assert reserve6(t, A) == 0 and reserve6(t, A) == 0
    assert reserve6(t, B) == 0x18
    assert t.execute(B, 0, mode_sense6(), None).status == 0x18
    assert not can_read(t, B) and can_read(t, A) and can_write(t, A)
    assert t.execute(B, 0, bytes([0x12, 0, 0, 0, 36, 0]), None).status == 0  # INQUIRY is always allowed
    assert release6(t, B) == 0 and reserve6(t, B) == 0x18  # RELEASE by another nexus: no effect
    assert release6(t, A) == 0 and reserve6(t, B) == 0


def test_reserve6_ends_with_the_nexus():
    t = target()
    reserve6(t, A)
    t.nexus_lost(A)
    assert reserve6(t, B) == 0


@pytest.mark.parametrize("function,code", [(5, (6, 0x29, 0x03)), (6, (6, 0x29, 0x02))])
def test_resets_end_reserve6_and_tell_every_nexus(function, code):
    t = target()
    reserve6(t, A)
    assert t.task_management(A, function, 0) == 0
    for nx in (A, B):
        assert key_asc(t.execute(nx, 0, tur(), None)) == code
    assert reserve6(t, B) == 0


def test_register_read_keys_and_unregister():
    t = target()
    assert register(t, A, 0xAAAA) == 0 and register(t, B, 0xBBBB) == 0
    d = data(t.execute(A, 0, pr_in(0), None))
    generation, length = struct.unpack_from(">II", d)
    assert length == 16 and sorted(struct.unpack_from(">QQ", d, 8)) == [0xAAAA, 0xBBBB] and generation == 2
    assert register(t, A, 0x1234) == 0x18  # wrong current key (REGISTER, not IGNORE)
    assert t.execute(A, 0, pr_out(0), pr_params(0xAAAA, 0)).status == 0  # unregister
    assert struct.unpack_from(">I", data(t.execute(A, 0, pr_in(0), None)), 4)[0] == 8
    assert t.execute(A, 0, pr_out(6), pr_params(0, 0x5555)).status == 0  # REGISTER AND IGNORE
    assert t.execute(A, 0, pr_out(6), pr_params(0x99, 0x6666)).status == 0


def test_read_keys_truncates_to_the_allocation_length():
    t = target()
    register(t, A, 1)
    register(t, B, 2)
    d = data(t.execute(A, 0, pr_in(0, alloc=16), None))
    assert len(d) == 16 and struct.unpack_from(">I", d, 4)[0] == 16


def test_report_capabilities():
    d = data(target().execute(A, 0, pr_in(2), None))
    assert struct.unpack_from(">H", d)[0] == 8 and d[3] & 0x80 and struct.unpack_from(">H", d, 4)[0] == 0xEA01


def test_pr_in_bad_service_action():
    assert key_asc(target().execute(A, 0, pr_in(7), None)) == (5, 0x24, 0)


def test_aptpl_is_refused_without_a_state_file():
    t = target()
    assert key_asc(t.execute(A, 0, pr_out(0), pr_params(0, 1, flags=0x01))) == (5, 0x26, 0)
    d = data(t.execute(A, 0, pr_in(2), None))
    assert d[2] & 0x01 == 0 and d[3] & 0x01 == 0  # PTPL_C, PTPL_A clear


def persistent_target(path, store=None):
    from services.iscsi_target.scsi import Nexus, RamBackstore

    store = store or RamBackstore(4 << 20)
    t = ready_target(store)
    t.luns[0].res.persist_to(path, Nexus)
    for nx in (A, B, C):
        t.execute(nx, 0, tur(), None)
    return t, store


def keys_and_reservation(t, nx):
    keys = data(t.execute(nx, 0, pr_in(0), None))
    n = struct.unpack_from(">I", keys, 4)[0] // 8
    rsv = data(t.execute(nx, 0, pr_in(1), None))
    held = struct.unpack_from(">Q", rsv, 8)[0] if len(rsv) >= 16 else None
    return sorted(struct.unpack_from(f">{n}Q", keys, 8)), held, rsv[21] & 0x0F if len(rsv) >= 22 else 0


def test_aptpl_state_survives_a_restart(tmp_path):
    path = tmp_path / "pr" / "lu0.json"
    t, store = persistent_target(path)
    d = data(t.execute(A, 0, pr_in(2), None))
    assert d[2] & 0x01 and not d[3] & 0x01  # PTPL_C: capable; PTPL_A: not yet
    assert register(t, B, 2) == 0 and not path.exists()  # APTPL 0: nothing kept
    assert t.execute(A, 0, pr_out(0), pr_params(0, 1, flags=0x01)).status == 0  # APTPL 1
    assert path.exists()
    assert t.execute(A, 0, pr_out(1, rtype=1), pr_params(1)).status == 0  # Write Exclusive
    generation = struct.unpack_from(">I", data(t.execute(A, 0, pr_in(0), None)))[0]

    t2, _ = persistent_target(path, store)  # the LU opened again: a restart, or a new owner process
    assert keys_and_reservation(t2, A) == ([1, 2], 1, 1)
    assert struct.unpack_from(">I", data(t2.execute(A, 0, pr_in(0), None)))[0] == generation
    assert data(t2.execute(A, 0, pr_in(2), None))[3] & 0x01  # PTPL_A
    assert not can_write(t2, B) and can_write(t2, A) and can_read(t2, B)
    # The last REGISTER's APTPL bit decides: 0 removes the file; the state is then lost at the next restart.
    assert t2.execute(B, 0, pr_out(0), pr_params(2, 3)).status == 0
    assert not path.exists()
    t3, _ = persistent_target(path, store)
    assert keys_and_reservation(t3, A) == ([], None, 0)


def test_aptpl_follows_every_change(tmp_path):
    path = tmp_path / "lu.json"
    t, store = persistent_target(path)
    t.execute(A, 0, pr_out(0), pr_params(0, 1, flags=0x01))
    t.execute(B, 0, pr_out(0), pr_params(0, 2, flags=0x01))
    t.execute(A, 0, pr_out(1, rtype=3), pr_params(1))
    t.execute(B, 0, pr_out(4, rtype=3), pr_params(2, 1))  # B preempts A: A's key goes, B holds
    assert keys_and_reservation(persistent_target(path, store)[0], B) == ([2], 2, 3)
    t.execute(B, 0, pr_out(2, rtype=3), pr_params(2))  # release
    assert keys_and_reservation(persistent_target(path, store)[0], B) == ([2], None, 0)
    t.execute(B, 0, pr_out(3), pr_params(2))  # clear
    assert keys_and_reservation(persistent_target(path, store)[0], B) == ([], None, 0)


def test_bad_parameter_length():
    t = target()
    cdb = bytes([0x5F, 0, 0, 0, 0, 0, 0, 0, 20, 0])
    assert key_asc(t.execute(A, 0, cdb, bytes(20))) == (5, 0x1A, 0)


# (type, non-registrant read, non-registrant write, registrant read, registrant write)
MATRIX = [
    (1, True, False, True, False),   # Write Exclusive
    (3, False, False, False, False),  # Exclusive Access
    (5, True, False, True, True),    # Write Exclusive, Registrants Only
    (6, False, False, True, True),   # Exclusive Access, Registrants Only
    (7, True, False, True, True),    # Write Exclusive, All Registrants
    (8, False, False, True, True),   # Exclusive Access, All Registrants
]


@pytest.mark.parametrize("rtype,nr_read,nr_write,r_read,r_write", MATRIX)
def test_persistent_reservation_conflict_matrix(rtype, nr_read, nr_write, r_read, r_write):
    t = target()
    register(t, A, 0xA)
    register(t, B, 0xB)
    assert t.execute(A, 0, pr_out(1, rtype), pr_params(0xA)).status == 0
    assert can_read(t, A) and can_write(t, A)
    assert (can_read(t, B), can_write(t, B)) == (r_read, r_write)
    assert (can_read(t, C), can_write(t, C)) == (nr_read, nr_write)
    assert t.execute(C, 0, tur(), None).status == 0  # TEST UNIT READY is allowed under every type
    d = data(t.execute(A, 0, pr_in(1), None))
    assert struct.unpack_from(">I", d, 4)[0] == 16 and d[21] == rtype
    assert struct.unpack_from(">Q", d, 8)[0] == (0 if rtype in (7, 8) else 0xA)
    assert reserve6(t, C) == 0x18
    # release with the wrong type is an error; with the right one, everyone may write again
    assert key_asc(t.execute(A, 0, pr_out(2, 3 if rtype != 3 else 1), pr_params(0xA))) == (5, 0x26, 0x04)
    assert t.execute(A, 0, pr_out(2, rtype), pr_params(0xA)).status == 0
    assert can_write(t, C)


def test_reserve_needs_registration_and_the_right_key():
    t = target()
    assert t.execute(A, 0, pr_out(1, 1), pr_params(0xA)).status == 0x18
    register(t, A, 0xA)
    assert t.execute(A, 0, pr_out(1, 1), pr_params(0xB)).status == 0x18
    assert key_asc(t.execute(A, 0, pr_out(1, 2), pr_params(0xA))) == (5, 0x24, 0)  # type 2 is obsolete
    assert t.execute(A, 0, pr_out(1, 1), pr_params(0xA)).status == 0
    register(t, B, 0xB)
    assert t.execute(B, 0, pr_out(1, 1), pr_params(0xB)).status == 0x18


def test_preempt_takes_the_reservation_and_removes_the_holder():
    t = target()
    register(t, A, 0xA)
    register(t, B, 0xB)
    t.execute(A, 0, pr_out(1, 3), pr_params(0xA))
    assert t.execute(B, 0, pr_out(4, 1), pr_params(0xB, 0xA)).status == 0
    keys = data(t.execute(B, 0, pr_in(0), None))
    assert struct.unpack_from(">I", keys, 4)[0] == 8 and struct.unpack_from(">Q", keys, 8)[0] == 0xB
    assert key_asc(t.execute(A, 0, tur(), None)) == (6, 0x2A, 0x05)  # REGISTRATIONS PREEMPTED
    assert not can_write(t, A) and can_read(t, A)  # now Write Exclusive held by B
    assert t.execute(B, 0, pr_out(4, 1), pr_params(0xB, 0x77)).status == 0x18  # no such key


def test_clear_drops_everything_and_tells_registrants():
    t = target()
    register(t, A, 0xA)
    register(t, B, 0xB)
    t.execute(A, 0, pr_out(1, 3), pr_params(0xA))
    assert t.execute(B, 0, pr_out(3), pr_params(0xB)).status == 0
    assert struct.unpack_from(">I", data(t.execute(B, 0, pr_in(0), None)), 4)[0] == 0
    assert key_asc(t.execute(A, 0, tur(), None)) == (6, 0x2A, 0x03)
    assert can_write(t, C)


def test_registration_survives_a_new_session_of_the_same_initiator_port():
    from services.iscsi_target.scsi import Nexus

    t = target()
    register(t, A, 0xA)
    again = Nexus(A.initiator_port, A.target_port, session=99)
    assert t.execute(again, 0, pr_out(1, 1), pr_params(0xA)).status == 0


def test_late_loss_of_an_old_session_leaves_the_new_sessions_reservation():
    from services.iscsi_target.scsi import Nexus

    t = target()
    old = A
    new = Nexus(A.initiator_port, A.target_port, session=77)  # same initiator port logged in again
    t.execute(new, 0, tur(), None)
    assert reserve6(t, new) == 0
    t.nexus_lost(old)  # the old connection reports its end only now
    assert reserve6(t, B) == 0x18
    t.nexus_lost(new)
    assert reserve6(t, B) == 0


def test_reinstatement_reported_with_the_new_nexus_releases_the_old_reservation():
    from services.iscsi_target.scsi import Nexus

    t = target()
    assert reserve6(t, A) == 0  # session 1
    t.nexus_lost(Nexus(A.initiator_port, A.target_port, session=5))  # reinstated by session 5
    assert reserve6(t, B) == 0


def test_session_numbers_wrap():
    from services.iscsi_target.scsi.lun import session_newer

    assert session_newer(2, 1) and not session_newer(1, 2) and session_newer(1, 0xFFFF) and not session_newer(3, 3)
