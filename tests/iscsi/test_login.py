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
