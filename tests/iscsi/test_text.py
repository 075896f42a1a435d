"""Text requests: SendTargets, long answers continued with the C bit."""

from services.iscsi_target import pdu as P
from services.iscsi_target.access import AccessPolicy
from shared.config.iscsi import AuthConfig
from tests.iscsi.initiator import TARGET, Initiator


def test_sendtargets_in_discovery_session():
    ini = Initiator(AccessPolicy(AuthConfig()))
    rsp = ini.login(session_type="Discovery")
    assert rsp.login_status == 0
    _, raw = ini.simple(P.OP_TEXT_REQ, w0=0xFFFFFFFF, data=P.encode_text([("SendTargets", "All")]))
    (txt,) = ini.send(raw)
    assert txt.opcode == P.OP_TEXT_RSP and txt.final
    assert P.decode_text(txt.data) == [("TargetName", TARGET), ("TargetAddress", "127.0.0.1:3260,1")]
    # SCSI commands have no place in a discovery session
    _, raw = ini.cmd(b"\x00" * 6)
    (rej,) = ini.send(raw)
    assert rej.opcode == P.OP_REJECT


def test_long_text_answer_is_continued():
    ini = Initiator(AccessPolicy(AuthConfig()))
    for i in range(300):
        name = f"iqn.2026-11.org.test:t{i:04d}"
        ini.registry.entries[name] = ini.registry.entries[TARGET]
    ini.login([("MaxRecvDataSegmentLength", "512")], session_type="Discovery")
    itt, raw = ini.simple(P.OP_TEXT_REQ, w0=0xFFFFFFFF, data=P.encode_text([("SendTargets", "All")]))
    chunks = []
    (txt,) = ini.send(raw)
    while True:
        chunks.append(txt.data)
        assert len(txt.data) <= 512
        if txt.final:
            break
        _, raw = ini.simple(P.OP_TEXT_REQ, w0=txt.ttt, itt=itt)
        (txt,) = ini.send(raw)
    names = [v for k, v in P.decode_text(b"".join(chunks)) if k == "TargetName"]
    assert len(names) == 301
