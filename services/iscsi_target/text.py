"""Text requests (RFC 7143 §11.10, §11.11, §12.3), a part of `Connection`.

SendTargets (in discovery sessions: every target this initiator at this address could log in to; in a
normal session: only its own) and renegotiation of declarative keys in full feature phase. Request text
spanning PDUs (C bit) is gathered, each piece answered empty with our TTT; an answer longer than the
initiator's MaxRecvDataSegmentLength is sent in pieces with the C bit, each continued by an empty request
carrying our TTT.

`TextRequests` is a mixin of `Connection` (connection.py): it uses the connection's `text` (TextState),
`session`, `neg`, `registry`, `peer_ip`, `portal`, `send_max`, `writer` and `out`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.iscsi_target.params import NegotiationError
from services.iscsi_target.pdu import (
    F_CONTINUE, REJECT_INVALID_FIELD, REJECT_PROTOCOL_ERROR, RSVD_TAG, decode_text, encode_text,
)

MAX_REQUEST_TEXT = 65536  # bytes of request text we gather across PDUs


@dataclass
class TextState:
    ttt: int = RSVD_TAG
    itt: int = RSVD_TAG
    remaining: bytes = b""
    request: bytearray = field(default_factory=bytearray)


class TextRequests:
    """Connection's part that answers Text Requests (see the module docstring)."""

    def _text(self, pdu) -> None:
        s = self.session
        if not s.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        t = self.text
        if pdu.ttt != RSVD_TAG:
            if pdu.ttt != t.ttt or pdu.itt != t.itt:
                self._reject(pdu.bhs, REJECT_INVALID_FIELD)
                return
            self._text_chunk(pdu.itt)
            return
        t.remaining = b""
        t.request += pdu.data
        if len(t.request) > MAX_REQUEST_TEXT:
            t.request = bytearray()
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            return
        if pdu.flags & F_CONTINUE:
            # more request text follows: answer empty with a TTT so the initiator goes on (§11.10.4)
            t.ttt = self._new_ttt()
            t.itt = pdu.itt
            self.out += self.writer.text_response(pdu.itt, t.ttt, self._next_statsn(), *self._cmdsn_words(),
                                                  final=False)
            return
        pairs = decode_text(t.request)
        t.request = bytearray()
        answer: list = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += self._send_targets(value or "")
        try:
            answer += self.neg.respond([(k, v) for k, v in pairs if k != "SendTargets"], full_feature=True)
        except NegotiationError:
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            return
        self.send_max = self.neg.initiator_max_recv
        t.remaining = encode_text(answer)
        t.itt = pdu.itt
        self._text_chunk(pdu.itt)

    def _text_chunk(self, itt: int) -> None:
        t = self.text
        chunk, t.remaining = t.remaining[: self.send_max], t.remaining[self.send_max :]
        if t.remaining:
            t.ttt = self._new_ttt()
            more, ttt = True, t.ttt
        else:
            t.ttt = RSVD_TAG
            more, ttt = False, RSVD_TAG
        self.out += self.writer.text_response(itt, ttt, self._next_statsn(), *self._cmdsn_words(),
                                              data=chunk or None, final=not more, more=more)

    def _send_targets(self, value: str) -> list:
        s = self.session
        if s.session_type == "Normal":
            names = [s.target] if value in ("", s.target) else []
            if value == "All":
                names = [s.target]  # in a normal session, only our own target (§12.3)
        elif value == "All":
            names = self.registry.visible_targets(s.initiator, self.peer_ip)
        elif value:
            names = [n for n in self.registry.visible_targets(s.initiator, self.peer_ip) if n == value.lower()]
        else:
            names = []
        ip, port = self.portal
        out = []
        for name in names:
            out.append(("TargetName", name))
            for address in self.registry.target_addresses(ip, port):
                out.append(("TargetAddress", address))
        return out
