"""PDU codec: binary fixtures, framing across receive boundaries, padding, digests, oversize segments."""

import struct

import pytest
from crc32c import crc32c

from services.iscsi_target import pdu as P

# A Login Request as libiscsi sends it (captured layout): I bit, T, CSG 0 -> NSG 1, ISID 0x80123456789a,
# ITT 1, CID 0, CmdSN 1, ExpStatSN 0, data "InitiatorName=iqn.x\0" padded to 4.
LOGIN_FIXTURE = bytes.fromhex(
    "4381000000000014" "80123456789a0000" "00000001" "00000000" "00000001" "00000000"
    + "00" * 16
) + b"InitiatorName=iqn.x\0"


def test_login_fixture_decodes_every_field():
    (pdu,), used = P.PduReader().feed(memoryview(LOGIN_FIXTURE))
    assert used == len(LOGIN_FIXTURE)
    assert pdu.opcode == P.OP_LOGIN_REQ and pdu.immediate
    assert pdu.flags == 0x81 and pdu.dsl == 20
    assert pdu.lun >> 16 == 0x80123456789A and pdu.lun & 0xFFFF == 0
    assert pdu.itt == 1 and pdu.cmdsn == 1 and pdu.expstatsn == 0
    assert P.decode_text(pdu.data) == [("InitiatorName", "iqn.x")]


def test_encode_request_matches_fixture():
    raw = P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x81, lun=0x80123456789A << 16, itt=1,
                           words=(0, 1, 0, 0, 0, 0, 0), data=b"InitiatorName=iqn.x\0")
    assert raw == LOGIN_FIXTURE


def test_writer_pads_and_counts_data_segment():
    w = P.PduWriter()
    parts = w.nop_in(7, P.RSVD_TAG, 1, 2, 3, data=b"abcde")
    raw = b"".join(bytes(p) for p in parts)
    assert len(raw) == 48 + 8
    assert raw[5:8] == b"\x00\x00\x05" and raw[-3:] == b"\0\0\0"
    (nop,), _ = P.PduReader().feed(memoryview(raw))
    assert nop.opcode == P.OP_NOP_IN and nop.itt == 7 and nop.ttt == P.RSVD_TAG and nop.dsl == 5
    assert (nop.statsn, nop.exp_cmdsn, nop.max_cmdsn) == (1, 2, 3)


def test_writer_scatter_list_keeps_buffers_uncopied():
    block = memoryview(bytearray(b"x" * 4096))
    parts = P.PduWriter().data_in(1, [block[:1024], block[1024:]], 4096, 0, 0, status=0)
    assert parts[1].obj is block.obj and parts[2].obj is block.obj  # slices, not copies


def parsed(parts) -> P.Pdu:
    (pdu,), used = P.PduReader(1 << 20).feed(memoryview(b"".join(bytes(p) for p in parts)))
    return pdu


def test_builders_put_each_field_where_rfc_7143_says():
    w = P.PduWriter()
    din = parsed(w.data_in(9, [b"abcd"], 4, 5, 36, datasn=2, offset=8192, status=0, statsn=4,
                           residual_flag=P.F_UNDERFLOW, residual=100))
    assert din.opcode == P.OP_DATA_IN and din.flags == P.F_FINAL | P.F_STATUS | P.F_UNDERFLOW
    assert (din.itt, din.ttt, din.statsn, din.exp_cmdsn, din.max_cmdsn) == (9, P.RSVD_TAG, 4, 5, 36)
    assert (din.datasn, din.buffer_offset, din.residual, din.status) == (2, 8192, 100, 0)
    mid = parsed(w.data_in(9, [b"abcd"], 4, 5, 36, final=False))
    assert mid.flags == 0 and mid.statsn == 0
    rsp = parsed(w.scsi_response(9, 2, 4, 5, 36, sense=bytes(18), residual_flag=P.F_OVERFLOW, residual=7,
                                 exp_datasn=3))
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.status == 2 and rsp.flags == P.F_FINAL | P.F_OVERFLOW
    assert rsp.residual == 7 and rsp.datasn == 3 and rsp.data[:2] == b"\x00\x12" and len(rsp.data) == 20
    r2t = parsed(w.r2t(9, 77, P.encode_lun(1), 4, 5, 36, r2tsn=1, offset=1024, length=2048))
    assert r2t.opcode == P.OP_R2T and r2t.ttt == 77 and r2t.lun == P.encode_lun(1)
    assert (r2t.r2tsn, r2t.buffer_offset, r2t.desired_length) == (1, 1024, 2048)
    login = parsed(w.login_response(9, 0x80123456789A, 3, 4, 5, 36, transit=True, csg=1, nsg=3, status=0x0201))
    assert login.flags == P.F_TRANSIT | (1 << 2) | 3 and login.isid == 0x80123456789A and login.tsih == 3
    assert login.login_status == 0x0201
    logout = parsed(w.logout_response(9, 1, 4, 5, 36, time2wait=2))
    assert logout.response == 1 and logout.time2wait == 2
    msg = parsed(w.async_message(1, 4, 5, 36, parameter3=3))
    assert msg.async_event == 1 and msg.itt == P.RSVD_TAG and msg.async_parameter3 == 3
    txt = parsed(w.text_response(9, 77, 4, 5, 36, data=b"a=b\0", final=False, more=True))
    assert txt.flags == P.F_CONTINUE and txt.ttt == 77
    assert parsed(w.text_response(9, 77, 4, 5, 36, final=False)).flags == 0  # "send the rest of your request"
    rej = parsed(w.reject(P.REJECT_PROTOCOL_ERROR, LOGIN_FIXTURE, 4, 5, 36))
    assert rej.response == P.REJECT_PROTOCOL_ERROR and rej.data == LOGIN_FIXTURE[:48]
    tmf = parsed(w.tmf_response(9, 5, 4, 5, 36))
    assert tmf.opcode == P.OP_TMF_RSP and tmf.response == 5


@pytest.mark.parametrize("split", [1, 3, 47, 48, 49, 60, 67])
def test_reader_frames_across_any_split(split):
    raw = LOGIN_FIXTURE * 2
    reader = P.PduReader()
    pdus, used = reader.feed(memoryview(raw[:split]))
    rest = raw[used:]
    more, used2 = reader.feed(memoryview(rest))
    assert len(pdus) + len(more) == 2 and used2 == len(rest)


def test_reader_reports_need_for_partial_pdu():
    reader = P.PduReader()
    assert reader.needed(memoryview(LOGIN_FIXTURE[:10])) == 48
    assert reader.needed(memoryview(LOGIN_FIXTURE[:50])) == len(LOGIN_FIXTURE)


def test_digests_round_trip_and_detect_corruption():
    raw = P.encode_request(P.OP_NOP_OUT, immediate=True, flags=0x80, itt=5, data=b"ping!", header_digest=True,
                           data_digest=True)
    reader = P.PduReader()
    reader.header_digest = reader.data_digest = True
    (pdu,), _ = reader.feed(memoryview(raw))
    assert bytes(pdu.data) == b"ping!"
    # the header digest is little-endian CRC32C of the BHS, as Linux and libiscsi compute it
    assert raw[48:52] == struct.pack("<I", crc32c(raw[:48]))
    bad = bytearray(raw)
    bad[-6] ^= 1
    (err,), _ = reader.feed(memoryview(bytes(bad)))
    assert isinstance(err, P.PduError) and err.reason == P.REJECT_DATA_DIGEST and not err.fatal
    bad = bytearray(raw)
    bad[20] ^= 1
    (err,), _ = reader.feed(memoryview(bytes(bad)))
    assert isinstance(err, P.PduError) and err.fatal


def test_writer_digests_verify_with_reader():
    w = P.PduWriter()
    w.header_digest = w.data_digest = True
    raw = b"".join(bytes(p) for p in w.nop_in(7, 1, 2, 3, 4, data=[b"ab", b"cde"]))
    r = P.PduReader()
    r.header_digest = r.data_digest = True
    (pdu,), used = r.feed(memoryview(raw))
    assert used == len(raw) and bytes(pdu.data) == b"abcde"


def test_oversize_data_segment_is_fatal_before_buffering():
    head = bytearray(LOGIN_FIXTURE[:48])
    head[5:8] = (100000).to_bytes(3, "big")
    (err,), used = P.PduReader(8192).feed(memoryview(bytes(head)))
    assert isinstance(err, P.PduError) and err.fatal and used == 0


def test_ahs_and_extended_cdb():
    ahs = struct.pack(">HBB", 5, 1, 0) + b"\x11\x22\x33\x44"
    raw = P.encode_request(P.OP_SCSI_CMD, flags=0x80, words=(0, 1, 0, 0, 0, 0, 0), ahs=ahs)
    (pdu,), used = P.PduReader().feed(memoryview(raw))
    assert used == len(raw) and pdu.ahs_len == 8 and pdu.cdb[16:] == b"\x11\x22\x33\x44"


def test_lun_encoding():
    assert P.decode_lun(P.encode_lun(0)) == 0
    assert P.decode_lun(P.encode_lun(5)) == 5
    assert P.decode_lun(P.encode_lun(300)) == 300
    assert P.encode_lun(1) == 0x0001000000000000


def test_text_codec():
    assert P.decode_text(P.encode_text([("A", "1"), ("B", "x,y")])) == [("A", "1"), ("B", "x,y")]
    assert P.decode_text(b"Broken\0") == [("Broken", None)]
