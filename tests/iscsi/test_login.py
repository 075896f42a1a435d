"""Login state machine: stages, AuthMethod None, CHAP MD5, mutual CHAP, access modes, error statuses."""

import hashlib

import pytest

from services.iscsi_target import events as ev
from services.iscsi_target import login as L
from services.iscsi_target import pdu as P
from services.iscsi_target.access import AccessPolicy
from shared.config.iscsi import AuthConfig
from tests.iscsi.initiator import INITIATOR, TARGET, Initiator

SECRET = "abcdefghijkl"
MUTUAL = "mutualsecret9"


def status(rsp):
    return rsp.login_status


def keys(rsp):
    return dict(P.decode_text(rsp.data))


def chap_policy(**kw):
    return AccessPolicy(AuthConfig(mode="chap", users=[{"username": "alice", "secret": SECRET}], **kw))


def test_chap_md5_vector():
    # R = MD5(identifier || secret || challenge), RFC 1994 section 4.1
    assert L.chap_response(0x2A, b"abcdefghijkl", bytes(range(16))).hex() == "cec6cff406e03600ec3585732fc9de13"
    assert L.decode_binary("0x0a0b") == b"\x0a\x0b"
    assert L.decode_binary("0bAAE=") == b"\x00\x01"
    with pytest.raises(ValueError):
        L.decode_binary("zz")


def test_anonymous_login_straight_to_operational():
    ini = Initiator(AccessPolicy(AuthConfig()))
    rsp = ini.login([("HeaderDigest", "None"), ("MaxRecvDataSegmentLength", "65536")])
    assert rsp.opcode == P.OP_LOGIN_RSP and status(rsp) == 0
    assert rsp.flags & 0x80 and rsp.flags & 3 == 3
    k = keys(rsp)
    assert k["TargetPortalGroupTag"] == "1" and k["HeaderDigest"] == "None"
    assert "MaxRecvDataSegmentLength" in k
    assert ini.tsih != 0 and ini.conn.state == "full"
    assert ini.conn.send_max == 65536
    assert isinstance(ini.events[-1], ev.Login)


def test_security_stage_auth_none_then_operational():
    ini = Initiator(AccessPolicy(AuthConfig()))
    rsp = ini.login(security=[("AuthMethod", "CHAP,None")])
    assert status(rsp) == 0


def run_chap(ini, name="alice", secret=SECRET, mutual=None, reflect=False):
    first = [("InitiatorName", INITIATOR), ("SessionType", "Normal"), ("TargetName", TARGET),
             ("AuthMethod", "CHAP,None")]
    (rsp,) = ini.send(ini.login_pdu(first, 0, 1))
    assert status(rsp) == 0 and keys(rsp)["AuthMethod"] == "CHAP" and not rsp.flags & 0x80
    (rsp,) = ini.send(ini.login_pdu([("CHAP_A", "7,5")], 0, 1, transit=False))
    k = keys(rsp)
    assert k["CHAP_A"] == "5"
    ident, challenge = int(k["CHAP_I"]), L.decode_binary(k["CHAP_C"])
    assert len(challenge) == 16
    answer = [("CHAP_N", name), ("CHAP_R", "0x" + hashlib.md5(bytes([ident]) + secret.encode() + challenge).hexdigest())]
    my_challenge = challenge if reflect else b"\x01\x02\x03\x04\x05\x06\x07\x08"
    if mutual:
        answer += [("CHAP_I", "9"), ("CHAP_C", "0x" + my_challenge.hex())]
    (rsp,) = ini.send(ini.login_pdu(answer, 0, 1))
    return rsp, my_challenge


def test_chap_right_secret():
    ini = Initiator(chap_policy())
    rsp, _ = run_chap(ini)
    assert status(rsp) == 0 and rsp.flags & 0x80
    rsp = ini.login()
    assert status(rsp) == 0 and ini.conn.state == "full"
    assert ini.events[-1].user == "alice" and ini.events[-1].auth == "CHAP"


def test_chap_wrong_secret_fails_with_auth_failure():
    ini = Initiator(chap_policy())
    rsp, _ = run_chap(ini, secret="wrongwrongwrong")
    assert status(rsp) == L.AUTH_FAILURE and ini.conn.closing
    (failed,) = ini.events_of(ev.LoginFailed)
    assert "wrong CHAP secret" in failed.reason and failed.status == "0x0201"


def test_chap_unknown_user():
    ini = Initiator(chap_policy())
    rsp, _ = run_chap(ini, name="mallory")
    assert status(rsp) == L.AUTH_FAILURE


def test_chap_required_but_initiator_offers_none():
    ini = Initiator(chap_policy())
    (rsp,) = ini.send(ini.login_pdu([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "None")], 0, 1))
    assert status(rsp) == L.AUTH_FAILURE
    ini = Initiator(chap_policy())
    rsp = ini.login()  # skipping the security stage
    assert status(rsp) == L.AUTH_FAILURE


def test_guest_lets_initiators_without_credentials_in():
    ini = Initiator(chap_policy(guest=True))
    rsp = ini.login(security=[("AuthMethod", "None")])
    assert status(rsp) == 0


def test_mutual_chap():
    policy = chap_policy(mutual={"username": "target", "secret": MUTUAL})
    ini = Initiator(policy)
    rsp, mine = run_chap(ini, mutual=True)
    assert status(rsp) == 0
    k = keys(rsp)
    assert k["CHAP_N"] == "target"
    assert L.decode_binary(k["CHAP_R"]) == hashlib.md5(bytes([9]) + MUTUAL.encode() + mine).digest()


def test_mutual_chap_without_target_secret_fails():
    ini = Initiator(chap_policy())
    rsp, _ = run_chap(ini, mutual=True)
    assert status(rsp) == L.AUTH_FAILURE


def test_mutual_chap_reflection_is_refused():
    ini = Initiator(chap_policy(mutual={"username": "target", "secret": MUTUAL}))
    rsp, _ = run_chap(ini, mutual=True, reflect=True)
    assert status(rsp) == L.AUTH_FAILURE


def test_ip_filters_and_mixed():
    ip_auth = AuthConfig(mode="ip", ip_filters=[{"network": "10.0.0.0/8", "action": "deny"},
                                                {"network": "127.0.0.0/8", "action": "allow"}])
    assert status(Initiator(AccessPolicy(ip_auth)).login()) == 0
    assert status(Initiator(AccessPolicy(ip_auth), ip="10.1.2.3").login()) == L.AUTHZ_FAILURE
    assert status(Initiator(AccessPolicy(ip_auth), ip="192.168.1.1").login()) == L.AUTHZ_FAILURE
    mixed = AuthConfig(mode="mixed", users=[{"username": "alice", "secret": SECRET}],
                       ip_filters=[{"network": "127.0.0.0/8"}])
    assert status(Initiator(AccessPolicy(mixed)).login()) == L.AUTH_FAILURE  # right address, no CHAP
    rsp, _ = run_chap(Initiator(AccessPolicy(mixed)))
    assert status(rsp) == 0
    assert status(Initiator(AccessPolicy(mixed), ip="10.0.0.1").login()) == L.AUTHZ_FAILURE


def test_initiator_acl():
    policy = AccessPolicy(AuthConfig(), acls=["iqn.2026-11.org.test:other"])
    assert status(Initiator(policy).login()) == L.AUTHZ_FAILURE
    policy = AccessPolicy(AuthConfig(), acls=[INITIATOR])
    assert status(Initiator(policy).login()) == 0


def test_missing_and_unknown_names():
    ini = Initiator(AccessPolicy(AuthConfig()))
    (rsp,) = ini.send(ini.login_pdu([("TargetName", TARGET)], 1, 3))
    assert status(rsp) == L.MISSING_PARAMETER
    ini = Initiator(AccessPolicy(AuthConfig()))
    (rsp,) = ini.send(ini.login_pdu([("InitiatorName", INITIATOR)], 1, 3))
    assert status(rsp) == L.MISSING_PARAMETER
    rsp = Initiator(AccessPolicy(AuthConfig())).login(target="iqn.2026-11.org.test:nope")
    assert status(rsp) == L.NOT_FOUND
    rsp = Initiator(AccessPolicy(AuthConfig())).login(session_type="Bogus")
    assert status(rsp) == L.SESSION_TYPE_UNSUPPORTED


def test_version_and_stage_errors():
    ini = Initiator(AccessPolicy(AuthConfig()))
    (rsp,) = ini.send(ini.login_pdu([("InitiatorName", INITIATOR), ("TargetName", TARGET)], 1, 3, version_min=1))
    assert status(rsp) == L.UNSUPPORTED_VERSION
    ini = Initiator(AccessPolicy(AuthConfig()))
    (rsp,) = ini.send(ini.login_pdu([("InitiatorName", INITIATOR), ("TargetName", TARGET)], 1, 1))
    assert status(rsp) == L.INITIATOR_ERROR  # NSG must move forward


def test_continued_login_text():
    ini = Initiator(AccessPolicy(AuthConfig()))
    text = P.encode_text([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal")])
    a, b = text[:10], text[10:]
    raw = P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x40 | (1 << 2), lun=ini.isid << 16, itt=9,
                           words=(0, 1, 0, 0, 0, 0, 0), data=a)
    (rsp,) = ini.send(raw)
    assert status(rsp) == 0 and not rsp.data
    raw = P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x80 | (1 << 2) | 3, lun=ini.isid << 16, itt=9,
                           words=(0, 1, 0, 0, 0, 0, 0), data=b)
    (rsp,) = ini.send(raw)
    assert status(rsp) == 0 and rsp.flags & 0x80


def test_non_login_pdu_during_login_closes():
    ini = Initiator(AccessPolicy(AuthConfig()))
    ini.send(P.encode_request(P.OP_NOP_OUT, immediate=True, flags=0x80, itt=1))
    assert ini.conn.closing


def test_session_reinstatement_on_same_isid():
    from services.iscsi_target.session import SessionTable

    table = SessionTable()

    class Handle:
        reason = None

        def abort(self, reason):
            Handle.reason = reason

    first = Initiator(AccessPolicy(AuthConfig()), sessions=table, handle=Handle())
    assert status(first.login()) == 0
    second = Initiator(AccessPolicy(AuthConfig()), sessions=table, scsi=first.registry.entries[TARGET].scsi)
    rsp = second.login()
    assert status(rsp) == 0 and Handle.reason and "reinstated" in Handle.reason
    assert len(table) == 1 and table.all()[0] is second.conn.session
    assert second.events[-1].reinstated is True
    assert first.registry.entries[TARGET].scsi.lost  # the old nexus was released
    # the old connection's cleanup must not remove its successor
    first.conn.connection_lost("reinstated")
    assert len(table) == 1


def test_nonzero_tsih_for_unknown_session_fails():
    ini = Initiator(AccessPolicy(AuthConfig()))
    ini.tsih = 77
    rsp = ini.login()
    assert status(rsp) == L.SESSION_DOES_NOT_EXIST


# ---------------------------------------------------------------- strict where RFC 7143 is strict (issue 12)
def raw_login(ini, data: bytes, csg=1, nsg=3, transit=True, cont=False, vmax=0, vmin=0, cid=0, isid=None):
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
    isid = ini.isid if isid is None else isid
    return P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=flags, b2=vmax, b3=vmin,
                            lun=(isid << 16) | ini.tsih, itt=ini.next_itt(),
                            words=(cid << 16, ini.cmdsn, ini.statsn, 0, 0, 0, 0), data=data)


def first_keys(initiator=INITIATOR.encode(), target=TARGET.encode()) -> bytes:
    return b"InitiatorName=" + initiator + b"\0TargetName=" + target + b"\0"


def one(ini, raw):
    (rsp,) = ini.send(raw)
    return status(rsp)


def fresh():
    return Initiator(AccessPolicy(AuthConfig()))


@pytest.mark.parametrize("name", [
    b"iqn.2026-11.org.test:\xff\xfe",          # not UTF-8
    b"iqn.2026-11.org.test:a b",                # space
    b"iqn.2026-11.org.test:a_b",                # '_' is not in RFC 3722's ASCII set
    b"iqn.2026-11.org.test:a\x01",              # control
    "iqn.2026-11.org.test:\ue000".encode(),     # private use (C.3)
    b"iqn.2026-11.org.test:" + b"a" * 210,      # 231 bytes > 223
    b"iqn.26-11.org.test:a",                    # not iqn.yyyy-mm.
    b"eui.0123",                                # eui. needs 16 hex digits
    b"naa.0123456789abcdefg",                   # naa. 16 or 32 hex digits
    b"host1",                                   # no type prefix
])
def test_invalid_initiator_or_target_name_is_refused_0207(name):
    assert one(fresh(), raw_login(fresh(), first_keys(initiator=name))) == L.MISSING_PARAMETER
    assert one(fresh(), raw_login(fresh(), first_keys(target=name))) == L.MISSING_PARAMETER


def test_names_are_prepared_before_they_are_compared():
    # RFC 3722 maps upper case (and NFKC-normalizes): the same initiator and target, still admitted by the ACL
    policy = AccessPolicy(AuthConfig(), acls=[INITIATOR])
    ini = Initiator(policy)
    assert one(ini, raw_login(ini, first_keys(INITIATOR.upper().encode(), TARGET.upper().encode()))) == 0
    assert ini.conn.session.initiator == INITIATOR


def test_empty_names_are_missing():
    assert one(fresh(), raw_login(fresh(), b"InitiatorName=\0TargetName=" + TARGET.encode() + b"\0")) == 0x0207
    assert one(fresh(), raw_login(fresh(), b"InitiatorName=" + INITIATOR.encode() + b"\0TargetName=\0")) == 0x0207


def test_versions():
    assert one(fresh(), raw_login(fresh(), first_keys(), vmin=1, vmax=1)) == L.UNSUPPORTED_VERSION
    assert one(fresh(), raw_login(fresh(), first_keys(), vmax=3)) == 0  # max above ours: version 0 it is
    ini = fresh()
    assert one(ini, raw_login(ini, first_keys() + b"AuthMethod=None\0", csg=0, nsg=1, vmax=2)) == 0
    assert one(ini, raw_login(ini, b"", csg=1, nsg=3, vmax=1)) == L.INITIATOR_ERROR  # changed mid-login


def test_stage_rules():
    assert one(fresh(), raw_login(fresh(), first_keys(), csg=3, transit=False)) == L.INITIATOR_ERROR  # CSG 3
    assert one(fresh(), raw_login(fresh(), first_keys(), csg=2, transit=False)) == L.INITIATOR_ERROR  # CSG 2
    assert one(fresh(), raw_login(fresh(), first_keys(), csg=0, nsg=2)) == L.INITIATOR_ERROR  # NSG 2
    assert one(fresh(), raw_login(fresh(), first_keys(), csg=0, nsg=0)) == L.INITIATOR_ERROR  # not forward
    assert one(fresh(), raw_login(fresh(), first_keys(), transit=True, cont=True)) == L.INITIATOR_ERROR  # T+C
    # Leaving the security stage needs the target's T=1 for it: here it answered T=0 (no transit asked).
    ini = fresh()
    assert one(ini, raw_login(ini, first_keys() + b"AuthMethod=None\0", csg=0, transit=False)) == 0
    assert one(ini, raw_login(ini, b"", csg=1, nsg=3)) == L.INITIATOR_ERROR
    # ... and with it, the operational stage follows.
    ini = fresh()
    assert one(ini, raw_login(ini, first_keys() + b"AuthMethod=None\0", csg=0, nsg=1)) == 0
    assert one(ini, raw_login(ini, b"", csg=1, nsg=3)) == 0 and ini.conn.state == "full"


def test_identity_may_not_change_during_the_login():
    ini = fresh()
    assert one(ini, raw_login(ini, first_keys() + b"AuthMethod=None\0", csg=0, nsg=1)) == 0
    assert one(ini, raw_login(ini, b"InitiatorName=iqn.2026-11.org.test:someone-else\0", csg=1)) == 0x0200
    ini = fresh()
    assert one(ini, raw_login(ini, first_keys() + b"AuthMethod=None\0", csg=0, nsg=1)) == 0
    assert one(ini, raw_login(ini, first_keys(), csg=1)) == 0  # repeated unchanged: fine
    ini = fresh()
    assert one(ini, raw_login(ini, first_keys() + b"AuthMethod=None\0", csg=0, nsg=1)) == 0
    assert one(ini, raw_login(ini, b"", csg=1, cid=5)) == L.INITIATOR_ERROR  # CID changed


def test_reserved_isid_type_is_refused():
    assert one(fresh(), raw_login(fresh(), first_keys(), isid=0xC00000000001)) == L.INITIATOR_ERROR
    for isid in (0x000000000001, 0x400000000001, 0x800000000001):  # OUI, EN, random
        assert one(fresh(), raw_login(fresh(), first_keys(), isid=isid)) == 0


def test_tsih_rules():
    from services.iscsi_target.session import SessionTable

    table = SessionTable()
    first = Initiator(AccessPolicy(AuthConfig()), sessions=table)
    assert one(first, raw_login(first, first_keys(), cid=1)) == 0
    tsih = first.conn.session.tsih

    def attempt(isid=first.isid, cid=1, tsih=tsih, initiator=INITIATOR.encode()):
        ini = Initiator(AccessPolicy(AuthConfig()), sessions=table, scsi=first.registry.entries[TARGET].scsi)
        ini.tsih = tsih
        return one(ini, raw_login(ini, first_keys(initiator=initiator), cid=cid, isid=isid)), ini

    assert attempt(tsih=tsih + 1)[0] == L.SESSION_DOES_NOT_EXIST  # no such session
    assert attempt(isid=first.isid + 1)[0] == L.SESSION_DOES_NOT_EXIST  # a TSIH of another ISID
    assert attempt(initiator=b"iqn.2026-11.org.test:other")[0] == L.SESSION_DOES_NOT_EXIST
    assert attempt(cid=2)[0] == L.TOO_MANY_CONNECTIONS  # a second connection: MaxConnections 1
    code, again = attempt()  # the same CID: connection reinstatement, the session goes on
    assert code == 0 and again.conn.session.tsih == tsih and len(table) == 1


def test_non_login_pdu_after_the_login_started_gets_invalid_during_login():
    ini = fresh()
    assert one(ini, raw_login(ini, first_keys() + b"AuthMethod=None\0", csg=0, transit=False)) == 0
    (rsp,) = ini.send(P.encode_request(P.OP_NOP_OUT, immediate=True, flags=0x80, itt=7))
    assert rsp.opcode == P.OP_LOGIN_RSP and status(rsp) == L.INVALID_DURING_LOGIN and rsp.itt == 7
    assert ini.conn.closing
