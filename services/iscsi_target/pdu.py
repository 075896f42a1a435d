"""iSCSI PDU codec (RFC 7143 §11): the 48-byte Basic Header Segment, AHS, padding and CRC32C digests.

Sans-IO. `parse_header` decodes a BHS in place from any buffer; `PduReader` frames a byte stream into
`Pdu` objects whose data segment is a memoryview of the caller's receive buffer (no copy: a WRITE's
data goes from there to `os.pwrite`). `PduWriter` has one builder per target PDU (`data_in`, `r2t`,
`scsi_response`, ...); each returns a list of buffers for one scatter-gather send:
[header(+digest), data..., padding, data digest], so READ data (mmap slices) is never copied here.

Every BHS is decoded with one precompiled Struct: the first 20 bytes (opcode, flags, two opcode-specific
bytes, TotalAHSLength+DataSegmentLength, LUN, ITT) then seven big-endian words (bytes 20..47) whose
meaning depends on the opcode. Digests are little-endian CRC32C, as Linux and libiscsi put them on the wire.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

BHS_LEN = 48
RSVD_TAG = 0xFFFFFFFF

# Initiator opcodes
OP_NOP_OUT = 0x00
OP_SCSI_CMD = 0x01
OP_TMF_REQ = 0x02
OP_LOGIN_REQ = 0x03
OP_TEXT_REQ = 0x04
OP_DATA_OUT = 0x05
OP_LOGOUT_REQ = 0x06
OP_SNACK = 0x10
# Target opcodes
OP_NOP_IN = 0x20
OP_SCSI_RSP = 0x21
OP_TMF_RSP = 0x22
OP_LOGIN_RSP = 0x23
OP_TEXT_RSP = 0x24
OP_DATA_IN = 0x25
OP_LOGOUT_RSP = 0x26
OP_R2T = 0x31
OP_ASYNC = 0x32
OP_REJECT = 0x3F

INITIATOR_OPCODES = frozenset({OP_NOP_OUT, OP_SCSI_CMD, OP_TMF_REQ, OP_LOGIN_REQ, OP_TEXT_REQ, OP_DATA_OUT, OP_LOGOUT_REQ, OP_SNACK})

OPCODE_NAMES = {
    OP_NOP_OUT: "NOP-Out", OP_SCSI_CMD: "SCSI Command", OP_TMF_REQ: "Task Management Request",
    OP_LOGIN_REQ: "Login Request", OP_TEXT_REQ: "Text Request", OP_DATA_OUT: "Data-Out",
    OP_LOGOUT_REQ: "Logout Request", OP_SNACK: "SNACK", OP_NOP_IN: "NOP-In", OP_SCSI_RSP: "SCSI Response",
    OP_TMF_RSP: "Task Management Response", OP_LOGIN_RSP: "Login Response", OP_TEXT_RSP: "Text Response",
    OP_DATA_IN: "Data-In", OP_LOGOUT_RSP: "Logout Response", OP_R2T: "R2T", OP_ASYNC: "Async Message",
    OP_REJECT: "Reject",
}

# Flags (byte 1)
F_FINAL = 0x80
F_READ = 0x40  # SCSI Command R
F_WRITE = 0x20  # SCSI Command W
F_CONTINUE = 0x40  # Login/Text C
F_TRANSIT = 0x80  # Login T
F_ACK = 0x40  # Data-In A
F_BIDI_OVERFLOW = 0x10
F_BIDI_UNDERFLOW = 0x08
F_OVERFLOW = 0x04
F_UNDERFLOW = 0x02
F_STATUS = 0x01  # Data-In S

# Reject reasons (§11.17.1)
REJECT_DATA_DIGEST = 0x02
REJECT_SNACK = 0x03
REJECT_PROTOCOL_ERROR = 0x04
REJECT_NOT_SUPPORTED = 0x05
REJECT_IMMEDIATE = 0x06
REJECT_TASK_IN_PROGRESS = 0x07
REJECT_INVALID_DATA_ACK = 0x08
REJECT_INVALID_FIELD = 0x09
REJECT_OUT_OF_RESOURCES = 0x0A
REJECT_WAITING_FOR_LOGOUT = 0x0C

_BHS = struct.Struct(">BBBBIQI7I")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_LE32 = struct.Struct("<I")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class PduError(ValueError):
    """A PDU that cannot be framed or decoded. `fatal`: the byte stream can no longer be trusted."""

    def __init__(self, message: str, *, reason: int = REJECT_PROTOCOL_ERROR, fatal: bool = False, bhs: bytes = b""):
        super().__init__(message)
        self.reason = reason
        self.fatal = fatal
        self.bhs = bhs


class Pdu:
    """One decoded PDU. `w` holds BHS bytes 20..47 as seven words; the accessors name them per opcode."""

    __slots__ = ("opcode", "immediate", "flags", "b2", "b3", "ahs_len", "dsl", "lun", "itt", "w", "bhs", "ahs", "data")

    def __init__(self, opcode, immediate, flags, b2, b3, ahs_len, dsl, lun, itt, w, bhs, ahs=b"", data=b""):
        self.opcode = opcode
        self.immediate = immediate
        self.flags = flags
        self.b2 = b2
        self.b3 = b3
        self.ahs_len = ahs_len
        self.dsl = dsl
        self.lun = lun
        self.itt = itt
        self.w = w
        self.bhs = bhs
        self.ahs = ahs
        self.data = data

    @property
    def name(self) -> str:
        return OPCODE_NAMES.get(self.opcode, f"opcode 0x{self.opcode:02x}")

    @property
    def final(self) -> bool:
        return bool(self.flags & F_FINAL)

    # Words by their RFC names; which apply depends on the opcode.
    @property
    def cmdsn(self) -> int:  # requests: bytes 24..27
        return self.w[1]

    @property
    def expstatsn(self) -> int:  # requests: bytes 28..31
        return self.w[2]

    @property
    def edtl(self) -> int:  # SCSI Command: Expected Data Transfer Length
        return self.w[0]

    @property
    def ttt(self) -> int:  # NOP-Out/In, Text, Data-Out/In, R2T: Target Transfer Tag
        return self.w[0]

    @property
    def datasn(self) -> int:  # Data-Out, Data-In
        return self.w[4]

    @property
    def buffer_offset(self) -> int:  # Data-Out, Data-In, R2T
        return self.w[5]

    @property
    def referenced_itt(self) -> int:  # Task Management Request: the task to abort
        return self.w[0]

    @property
    def ref_cmdsn(self) -> int:  # Task Management Request: RefCmdSN
        return self.w[3]

    @property
    def cid(self) -> int:  # Login and Logout Request: bytes 20..21
        return self.w[0] >> 16

    @property
    def isid(self) -> int:  # Login Request and Response: bytes 8..13
        return self.lun >> 16

    @property
    def tsih(self) -> int:  # Login Request and Response: bytes 14..15
        return self.lun & 0xFFFF

    # Target PDUs (what the tests' initiator reads back).
    @property
    def statsn(self) -> int:  # responses: bytes 24..27
        return self.w[1]

    @property
    def exp_cmdsn(self) -> int:  # responses: bytes 28..31
        return self.w[2]

    @property
    def max_cmdsn(self) -> int:  # responses: bytes 32..35
        return self.w[3]

    @property
    def response(self) -> int:  # SCSI, Task Management and Logout Response; Reject's reason
        return self.b2

    @property
    def status(self) -> int:  # SCSI Response, Data-In with S: the SCSI status
        return self.b3

    @property
    def login_status(self) -> int:  # Login Response: status class << 8 | detail (bytes 36..37)
        return self.w[4] >> 16

    @property
    def async_event(self) -> int:  # Asynchronous Message: byte 36
        return self.w[4] >> 24

    @property
    def async_parameter3(self) -> int:  # Asynchronous Message: bytes 42..43 (logout: seconds to wait)
        return self.w[5] & 0xFFFF

    @property
    def time2wait(self) -> int:  # Logout Response: bytes 40..41
        return self.w[5] >> 16

    @property
    def r2tsn(self) -> int:  # R2T
        return self.w[4]

    @property
    def desired_length(self) -> int:  # R2T: Desired Data Transfer Length
        return self.w[6]

    @property
    def residual(self) -> int:  # SCSI Response, Data-In: Residual Count
        return self.w[6]

    @property
    def cdb(self) -> bytes:
        cdb = self.bhs[32:48]
        # An extended-CDB AHS (type 1) carries the bytes beyond 16 (§11.2.2.3).
        if self.ahs and len(self.ahs) >= 4 and self.ahs[2] == 1:
            ext_len = _U16.unpack_from(self.ahs, 0)[0] - 1
            cdb = bytes(cdb) + bytes(self.ahs[4 : 4 + ext_len])
        return cdb

    def __repr__(self) -> str:
        return f"<{self.name} itt=0x{self.itt:08x} flags=0x{self.flags:02x} dsl={self.dsl}>"


def parse_header(buf, offset: int = 0) -> Pdu:
    """Decode the BHS at buf[offset:offset+48] (no AHS, no data)."""
    b0, flags, b2, b3, lens, lun, itt, *w = _BHS.unpack_from(buf, offset)
    return Pdu(b0 & 0x3F, bool(b0 & 0x40), flags, b2, b3, (lens >> 24) * 4, lens & 0xFFFFFF, lun, itt, w,
               bytes(buf[offset : offset + BHS_LEN]))


def padded(n: int) -> int:
    return (n + 3) & ~3


class PduReader:
    """Frames PDUs out of a byte stream. Call `feed(view)`; it returns (pdus, consumed): every complete
    PDU in `view`, and how many bytes they took. The caller keeps the rest and feeds it again with more.

    `max_data` bounds the data segment (our MaxRecvDataSegmentLength); a larger one is fatal because a
    peer that ignores the negotiated limit cannot be trusted to frame the stream either.
    """

    def __init__(self, max_data: int = 8192):
        self.max_data = max_data
        self.header_digest = False
        self.data_digest = False

    def needed(self, view) -> int:
        """Total bytes of the PDU starting at view[0] (at least 48), for buffer sizing."""
        if len(view) < BHS_LEN:
            return BHS_LEN
        lens = _U32.unpack_from(view, 4)[0]
        return self._total(lens)

    def _total(self, lens: int) -> int:
        total = BHS_LEN + (lens >> 24) * 4 + padded(lens & 0xFFFFFF)
        if self.header_digest:
            total += 4
        if self.data_digest and lens & 0xFFFFFF:
            total += 4
        return total

    def feed(self, view: memoryview) -> tuple[list, int]:
        pdus: list = []
        pos = 0
        end = len(view)
        while end - pos >= BHS_LEN:
            lens = _U32.unpack_from(view, pos + 4)[0]
            dsl = lens & 0xFFFFFF
            total = self._total(lens)
            if end - pos < total:
                if dsl > self.max_data:  # refuse before we buffer megabytes of it
                    pdus.append(self._oversize(view, pos, dsl))
                break
            if dsl > self.max_data:
                pdus.append(self._oversize(view, pos, dsl))
                return pdus, pos
            pdus.append(self._decode(view, pos, lens))
            pos += total
        return pdus, pos

    def _oversize(self, view, pos, dsl) -> PduError:
        return PduError(f"data segment of {dsl} bytes exceeds MaxRecvDataSegmentLength {self.max_data}",
                        fatal=True, bhs=bytes(view[pos : pos + BHS_LEN]))

    def _decode(self, view, pos, lens):
        ahs_len = (lens >> 24) * 4
        dsl = lens & 0xFFFFFF
        hend = pos + BHS_LEN + ahs_len
        if self.header_digest:
            got = _LE32.unpack_from(view, hend)[0]
            if crc32c(view[pos:hend]) != got:
                # The length fields themselves may be wrong: the stream is lost (ERL 0: drop the connection).
                return PduError("header digest mismatch", fatal=True, bhs=bytes(view[pos : pos + BHS_LEN]))
            dstart = hend + 4
        else:
            dstart = hend
        pdu = parse_header(view, pos)
        if ahs_len:
            pdu.ahs = bytes(view[pos + BHS_LEN : hend])
        data = view[dstart : dstart + dsl]
        if self.data_digest and dsl:
            pend = dstart + padded(dsl)
            got = _LE32.unpack_from(view, pend)[0]
            if crc32c(view[dstart:pend]) != got:
                return PduError(f"{pdu.name}: data digest mismatch", reason=REJECT_DATA_DIGEST, bhs=pdu.bhs)
        pdu.data = data
        return pdu


class PduWriter:
    """Builds target PDUs as scatter lists, one named builder per PDU type (§11). Digests follow the
    negotiated settings (off during login).

    Every response carries StatSN, ExpCmdSN and MaxCmdSN; the connection passes the values it stamps.
    `data` is a bytes-like or a list of them (`dlen`: their total, when the caller knows it already).
    """

    def __init__(self):
        self.header_digest = False
        self.data_digest = False

    def _pdu(self, b0, flags, b2, b3, lun, itt, w0, w1, w2, w3, w4, w5, w6, data=None, dlen=None) -> list:
        """[header(+digest), data..., padding, data digest]: the BHS fields in wire order."""
        if data is None:
            dlen = 0
        elif not isinstance(data, list):
            data = [data]
            dlen = len(data[0])
        elif dlen is None:
            dlen = sum(len(p) for p in data)
        return self._frame(_BHS.pack(b0, flags, b2, b3, dlen, lun, itt, w0, w1, w2, w3, w4, w5, w6), data, dlen)

    def _frame(self, header: bytes, parts, dlen: int) -> list:
        if self.header_digest:
            header += _LE32.pack(crc32c(header))
        out = [header]
        if dlen:
            out.extend(parts)
            pad = _PAD[dlen & 3]
            if pad:
                out.append(pad)
            if self.data_digest:
                crc = 0
                for p in parts:
                    crc = crc32c(p, crc)
                if pad:
                    crc = crc32c(pad, crc)
                out.append(_LE32.pack(crc))
        return out

    def data_in(self, itt, data: list, dlen, exp_cmdsn, max_cmdsn, *, datasn=0, offset=0, final=True, status=None,
                statsn=0, residual_flag=0, residual=0) -> list:
        """Data-In (§11.7): `data` a list of buffers of `dlen` bytes. `status` given: the S bit, the status,
        StatSN and the residual ride along."""
        flags = F_FINAL if final else 0
        if status is None:
            header = _BHS.pack(OP_DATA_IN, flags, 0, 0, dlen, 0, itt, RSVD_TAG, 0, exp_cmdsn, max_cmdsn, datasn,
                               offset, 0)
        else:
            header = _BHS.pack(OP_DATA_IN, flags | F_STATUS | residual_flag, 0, status, dlen, 0, itt, RSVD_TAG,
                               statsn, exp_cmdsn, max_cmdsn, datasn, offset, residual)
        if dlen & 3 or self.header_digest or self.data_digest:
            return self._frame(header, data, dlen)
        return [header, *data]  # the READ hot path: whole words, no digests

    def scsi_response(self, itt, status, statsn, exp_cmdsn, max_cmdsn, *, sense=None, residual_flag=0, residual=0,
                      exp_datasn=0) -> list:
        """SCSI Response (§11.4); sense data goes in the data segment behind its 2-byte SenseLength."""
        if not sense:
            header = _BHS.pack(OP_SCSI_RSP, F_FINAL | residual_flag, 0, status, 0, 0, itt, 0, statsn, exp_cmdsn,
                               max_cmdsn, exp_datasn, 0, residual)
            return [header + _LE32.pack(crc32c(header))] if self.header_digest else [header]
        return self._pdu(OP_SCSI_RSP, F_FINAL | residual_flag, 0, status, 0, itt, 0, statsn, exp_cmdsn, max_cmdsn,
                         exp_datasn, 0, residual, _U16.pack(len(sense)) + bytes(sense))

    def r2t(self, itt, ttt, lun, statsn, exp_cmdsn, max_cmdsn, *, r2tsn, offset, length) -> list:
        """R2T (§11.8): ask for `length` bytes at buffer `offset`. StatSN is not advanced by it."""
        return self._pdu(OP_R2T, F_FINAL, 0, 0, lun, itt, ttt, statsn, exp_cmdsn, max_cmdsn, r2tsn, offset, length)

    def nop_in(self, itt, ttt, statsn, exp_cmdsn, max_cmdsn, *, lun=0, data=None) -> list:
        """NOP-In (§11.19): an echo (our ITT is theirs, TTT reserved) or a ping (ITT reserved, our TTT)."""
        return self._pdu(OP_NOP_IN, F_FINAL, 0, 0, lun, itt, ttt, statsn, exp_cmdsn, max_cmdsn, 0, 0, 0, data)

    def tmf_response(self, itt, response, statsn, exp_cmdsn, max_cmdsn) -> list:
        """Task Management Function Response (§11.6)."""
        return self._pdu(OP_TMF_RSP, F_FINAL, response, 0, 0, itt, 0, statsn, exp_cmdsn, max_cmdsn, 0, 0, 0)

    def text_response(self, itt, ttt, statsn, exp_cmdsn, max_cmdsn, *, data=None, final=True, more=False) -> list:
        """Text Response (§11.11). `more`: the C bit, more of our text follows; not `final` and no data:
        the empty answer that asks for the rest of a request sent with C."""
        flags = (F_FINAL if final else 0) | (F_CONTINUE if more else 0)
        return self._pdu(OP_TEXT_RSP, flags, 0, 0, 0, itt, ttt, statsn, exp_cmdsn, max_cmdsn, 0, 0, 0, data)

    def login_response(self, itt, isid, tsih, statsn, exp_cmdsn, max_cmdsn, *, transit, csg, nsg, status=0,
                       data=None) -> list:
        """Login Response (§11.13): stages in the flags, ISID+TSIH where requests carry the LUN."""
        flags = (F_TRANSIT | (csg << 2) | nsg) if transit else (csg << 2)
        return self._pdu(OP_LOGIN_RSP, flags, 0, 0, (isid << 16) | tsih, itt, 0, statsn, exp_cmdsn, max_cmdsn,
                         status << 16, 0, 0, data)

    def logout_response(self, itt, response, statsn, exp_cmdsn, max_cmdsn, *, time2wait=0, time2retain=0) -> list:
        """Logout Response (§11.15)."""
        return self._pdu(OP_LOGOUT_RSP, F_FINAL, response, 0, 0, itt, 0, statsn, exp_cmdsn, max_cmdsn, 0,
                         (time2wait << 16) | time2retain, 0)

    def async_message(self, event, statsn, exp_cmdsn, max_cmdsn, *, parameter3=0) -> list:
        """Asynchronous Message (§11.9); event 1 asks for a logout within `parameter3` seconds."""
        return self._pdu(OP_ASYNC, F_FINAL, 0, 0, 0, RSVD_TAG, RSVD_TAG, statsn, exp_cmdsn, max_cmdsn, event << 24,
                         parameter3, 0)

    def reject(self, reason, bhs, statsn, exp_cmdsn, max_cmdsn) -> list:
        """Reject (§11.17), carrying the offending header."""
        return self._pdu(OP_REJECT, F_FINAL, reason, 0, 0, RSVD_TAG, 0, statsn, exp_cmdsn, max_cmdsn, 0, 0, 0,
                         bytes(bhs[:BHS_LEN]))


def encode_request(opcode: int, *, flags: int = 0, immediate: bool = False, b2: int = 0, b3: int = 0, lun: int = 0,
                   itt: int = 0, words=(0, 0, 0, 0, 0, 0, 0), data: bytes = b"", ahs: bytes = b"",
                   header_digest: bool = False, data_digest: bool = False) -> bytes:
    """An initiator PDU as bytes: for tests, the fuzz harness and the malformed-PDU corpus."""
    lens = ((len(ahs) // 4) << 24) | len(data)
    bhs = _BHS.pack(opcode | (0x40 if immediate else 0), flags, b2, b3, lens, lun, itt, *words)
    out = bhs + ahs
    if header_digest:
        out += _LE32.pack(crc32c(out))
    if data:
        body = bytes(data) + _PAD[len(data) & 3]
        out += body
        if data_digest:
            out += _LE32.pack(crc32c(body))
    return out


def encode_lun(lun: int) -> int:
    """SAM LUN (8 bytes as a big-endian int): flat addressing above 255, peripheral below (§11.2.2)."""
    if lun < 256:
        return lun << 48
    return (0x4000 | (lun & 0x3FFF)) << 48


def decode_lun(raw: int) -> int:
    first = raw >> 48
    method = first >> 14
    if method in (0, 1):  # peripheral or flat space addressing
        return first & 0x3FFF
    return 0xFFFF  # an addressing method we do not serve: no such LUN


def encode_text(pairs) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def decode_text(data) -> list[tuple[str, str]]:
    """key=value\\0 pairs (§6.1). A pair without '=' is kept with value None so the caller can reject it."""
    out = []
    for item in bytes(data).split(b"\0"):
        if not item:
            continue
        text = item.decode("utf-8", "replace")
        key, sep, value = text.partition("=")
        out.append((key, value if sep else None))
    return out
