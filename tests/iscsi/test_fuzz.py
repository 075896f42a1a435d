"""Fuzz the PDU framing and the connection with hypothesis: no input may raise out of `receive`."""

from hypothesis import HealthCheck, given, settings, strategies as st

from services.iscsi_target import pdu as P
from services.iscsi_target.access import AccessPolicy
from shared.config.iscsi import AuthConfig
from tests.iscsi.initiator import Initiator

OPCODES = st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x1C, 0x3F])


@st.composite
def pdus(draw):
    op = draw(OPCODES)
    data = draw(st.binary(max_size=300))
    words = tuple(draw(st.integers(0, 0xFFFFFFFF)) for _ in range(7))
    raw = P.encode_request(op, immediate=draw(st.booleans()), flags=draw(st.integers(0, 255)),
                           b2=draw(st.integers(0, 255)), b3=draw(st.integers(0, 255)),
                           lun=draw(st.integers(0, 2**64 - 1)), itt=draw(st.integers(0, 0xFFFFFFFF)),
                           words=words, data=data)
    if draw(st.booleans()):  # corrupt a few bytes, lengths included
        raw = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        raw = bytes(raw)
    return raw


def drive(ini, stream):
    view = memoryview(stream)
    pos = 0
    while pos < len(view) and not ini.conn.closing:
        used = ini.conn.receive(view[pos:], 0.0)
        if used == 0:
            break
        pos += used
    ini.take() if not ini.conn.closing else None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pdus(), max_size=6))
def test_random_pdus_before_login(stream):
    ini = Initiator(AccessPolicy(AuthConfig()))
    drive(ini, b"".join(stream))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pdus(), max_size=6))
def test_random_pdus_in_full_feature_phase(stream):
    ini = Initiator(AccessPolicy(AuthConfig()))
    ini.login()
    drive(ini, b"".join(stream))
    ini.conn.timer(1000.0)


@settings(max_examples=120, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_reader_never_raises(blob):
    reader = P.PduReader(8192)
    reader.header_digest = bool(len(blob) & 1)
    items, used = reader.feed(memoryview(blob))
    assert 0 <= used <= len(blob)
    for item in items:
        assert isinstance(item, (P.Pdu, P.PduError))


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=10))
def test_login_text_never_raises(pairs):
    ini = Initiator(AccessPolicy(AuthConfig()))
    data = b"\0".join(f"{k}={v}".encode() for k, v in pairs)
    raw = P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, lun=1 << 16, itt=1,
                           words=(0, 1, 0, 0, 0, 0, 0), data=data)
    ini.conn.receive(memoryview(raw), 0.0)
    out = b"".join(bytes(b) for b in ini.conn.take_output())
    assert P.parse_header(out).opcode == P.OP_LOGIN_RSP
