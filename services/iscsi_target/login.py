"""The login phase of one connection (RFC 7143 §6.3, §11.12, §11.13, §12.1.3).

Theory of operation
-------------------
A login is a series of Login Request/Response pairs. Each request names its current stage (CSG:
0 security, 1 operational) and, with the T bit, the next stage it wants (NSG: 1 operational, 3 full
feature). The target answers in the same stage and sets T only when it agrees to move on; it never
moves to a stage the initiator did not ask for. Text that does not fit one PDU arrives with the C bit;
we gather it and answer each piece with an empty response until the last.

- First request: InitiatorName is required; SessionType defaults to Normal, which requires TargetName.
  The target must exist and the access policy must admit the initiator (ACL, IP filters). We send
  TargetPortalGroupTag in our first answer to a normal session, as §13.9 requires.
- Security stage: AuthMethod picks the first offered method the policy accepts. CHAP (MD5 only,
  CHAP_A=5) goes: initiator CHAP_A → target CHAP_A, CHAP_I, CHAP_C → initiator CHAP_N, CHAP_R and,
  for mutual CHAP, its own CHAP_I, CHAP_C → target checks R = MD5(I | secret | C) and, for mutual,
  answers CHAP_N, CHAP_R with the target's secret. A request that skips the security stage (CSG 1
  first) is allowed only when the policy accepts AuthMethod None.
- Operational stage: keys are negotiated by `params.Negotiation`; we declare our
  MaxRecvDataSegmentLength in the first operational answer.
- Moving to full feature (T, NSG 3) completes the login: the session is registered (reinstating an
  older one with the same initiator, ISID and target) and gets its TSIH.

Failures answer with a Login Response carrying a status class/detail (§11.13.5) and then the
connection closes. The machine is sans-IO: `LoginMachine.handle(pdu)` returns a `LoginStep`, which the
connection (connection.py) turns into a Login Response.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, field

from services.iscsi_target import names
from services.iscsi_target.access import equal
from services.iscsi_target.params import Negotiation, NegotiationError
from services.iscsi_target.pdu import F_CONTINUE, F_TRANSIT, decode_text

# Status class/detail (§11.13.5)
SUCCESS = 0x0000
INITIATOR_ERROR = 0x0200
AUTH_FAILURE = 0x0201
AUTHZ_FAILURE = 0x0202
NOT_FOUND = 0x0203
TARGET_REMOVED = 0x0204
UNSUPPORTED_VERSION = 0x0205
TOO_MANY_CONNECTIONS = 0x0206
MISSING_PARAMETER = 0x0207
CANT_INCLUDE = 0x0208
SESSION_TYPE_UNSUPPORTED = 0x0209
SESSION_DOES_NOT_EXIST = 0x020A
INVALID_DURING_LOGIN = 0x020B
TARGET_ERROR = 0x0300
SERVICE_UNAVAILABLE = 0x0301
OUT_OF_RESOURCES = 0x0302

STAGE_SECURITY, STAGE_OPERATIONAL, STAGE_FULL = 0, 1, 3
CHAP_MD5 = "5"
CHAP_CHALLENGE_LEN = 16
TPGT = 1


@dataclass
class LoginStep:
    """What to send back for one Login Request."""

    status: int = SUCCESS
    keys: list = field(default_factory=list)
    transit: bool = False
    csg: int = 0
    nsg: int = 0
    complete: bool = False  # full feature phase starts after this response
    reason: str = ""  # for failures: why, for the event log


def decode_binary(value: str) -> bytes:
    """CHAP values are hex (0x...) or base64 (0b...) (§6.1)."""
    if len(value) > 2 and value[:2] in ("0x", "0X"):
        digits = value[2:]
        if len(digits) % 2:
            digits = "0" + digits
        return binascii.unhexlify(digits)
    if len(value) > 2 and value[:2] in ("0b", "0B"):
        return base64.b64decode(value[2:], validate=True)
    raise ValueError(f"{value[:20]!r} is neither 0x-hex nor 0b-base64")


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes([ident]) + secret + challenge).digest()


def raw_value(text: bytes, key: bytes) -> bytes | None:
    """The undecoded value of `key` in login text (names must be checked as bytes: strict UTF-8)."""
    prefix = key + b"="
    for item in text.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):]
    return None


def checked_name(raw: bytes, key: str) -> str:
    try:
        return names.canonical(raw)
    except names.NameError_ as exc:
        raise LoginFailed(MISSING_PARAMETER, f"{key} is not a valid iSCSI name: {exc}") from None


class LoginFailed(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class LoginMachine:
    """One connection's login. `registry` answers target(name) -> entry (with .policy, .alias, .name) or
    None, and discovery_policy(); `random` gives CHAP challenge bytes (injectable for tests)."""

    def __init__(self, registry, peer_ip: str, max_recv_data: int, random=os.urandom, sessions=None):
        self.registry = registry
        self.sessions = sessions  # session.SessionTable: a login naming a TSIH must name one of its sessions
        self.peer_ip = peer_ip
        self.max_recv_data = max_recv_data
        self.random = random
        self.first = True
        self.isid = 0
        self.tsih = 0
        self.cid = 0
        self.initiator = ""
        self.target_name = ""
        self.session_type = "Normal"
        self.entry = None
        self.policy = None
        self.negotiation: Negotiation | None = None
        self.auth_method: str | None = None
        self.authenticated = False
        self.chap_state = "idle"  # idle -> want_a -> challenged -> done
        self.chap_ident = 0
        self.chap_challenge = b""
        self.chap_user = ""
        self.pending_text = bytearray()
        self.stage = STAGE_SECURITY
        self.transit_to: int | None = None  # the stage the target last agreed to move to (T in its answer)
        self.versions: tuple[int, int] | None = None  # (Version-max, Version-min) of the first request
        self.sent_tpgt = False
        self.sent_declarations = False

    # ------------------------------------------------------------------ entry point
    def handle(self, pdu) -> LoginStep:
        csg = (pdu.flags >> 2) & 3
        nsg = pdu.flags & 3
        transit = bool(pdu.flags & F_TRANSIT)
        try:
            step = self._handle(pdu, csg, nsg, transit)
            if step.transit:
                self.transit_to = step.nsg
            return step
        except LoginFailed as exc:
            return LoginStep(status=exc.status, reason=exc.reason, csg=csg)
        except (NegotiationError, ValueError) as exc:
            return LoginStep(status=INITIATOR_ERROR, reason=f"malformed login text: {exc}", csg=csg)

    def _handle(self, pdu, csg, nsg, transit) -> LoginStep:
        # RFC 7143 §11.12: Version-max (byte 2) and Version-min (byte 3); we speak version 0 only, and every
        # request of one login carries the same pair.
        versions = (pdu.b2, pdu.b3)
        if pdu.b3 > 0:
            raise LoginFailed(UNSUPPORTED_VERSION, f"initiator wants iSCSI version >= {pdu.b3}")
        if pdu.b2 < pdu.b3:
            raise LoginFailed(INITIATOR_ERROR, f"Version-max {pdu.b2} is below Version-min {pdu.b3}")
        if self.versions is not None and versions != self.versions:
            raise LoginFailed(INITIATOR_ERROR, "Version-max/Version-min changed during the login")
        self.versions = versions
        if transit and pdu.flags & F_CONTINUE:
            raise LoginFailed(INITIATOR_ERROR, "login request with both T and C bits set")
        if csg in (2, 3) or (transit and (nsg == 2 or nsg <= csg)):
            raise LoginFailed(INITIATOR_ERROR, f"invalid stage transition CSG={csg} NSG={nsg}")
        isid = pdu.lun >> 16
        tsih = pdu.lun & 0xFFFF
        cid = pdu.w[0] >> 16
        if self.first:
            if isid >> 46 == 3:  # the ISID's T field: 11b is reserved (§11.12.5)
                raise LoginFailed(INITIATOR_ERROR, f"ISID 0x{isid:012x} has the reserved type 3")
            self.isid, self.tsih, self.cid = isid, tsih, cid
        elif (isid, tsih, cid) != (self.isid, self.tsih, self.cid):
            raise LoginFailed(INITIATOR_ERROR, "ISID, TSIH or CID changed during the login")
        if csg < self.stage:
            raise LoginFailed(INITIATOR_ERROR, f"login went back to stage {csg}")
        if not self.first and csg != self.stage and csg != self.transit_to:
            # §6.3: a stage is left only after the target answered with T=1 for it
            raise LoginFailed(INITIATOR_ERROR, f"CSG={csg} without the target agreeing to leave stage {self.stage}")

        self.pending_text += pdu.data
        if len(self.pending_text) > 65536:
            raise LoginFailed(INITIATOR_ERROR, "login text longer than 64 KiB")
        if pdu.flags & F_CONTINUE:
            return LoginStep(csg=csg, nsg=nsg)  # more text follows: acknowledge with an empty answer
        text = bytes(self.pending_text)
        pairs = decode_text(text)
        self.pending_text = bytearray()
        keys = dict(pairs)
        if len(keys) != len(pairs):
            raise LoginFailed(INITIATOR_ERROR, "a key appears twice in one login request")
        out: list = []
        if self.first:
            self._first_request(keys, text, out)
            self.first = False
        else:
            self._same_identity(keys, text)
        self.stage = csg

        if csg == STAGE_SECURITY:
            done = self._security(keys, out)
            if transit and done:
                return self._advance(csg, nsg, out)
            return LoginStep(keys=out, csg=csg, nsg=nsg)

        # operational stage
        if not self.authenticated:
            if self.policy.requires_chap:
                raise LoginFailed(AUTH_FAILURE, "no CHAP credentials: the initiator skipped authentication "
                                                "but this target requires CHAP")
            self.authenticated = True
            self.auth_method = "None"
        for k in ("AuthMethod", "CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"):
            if k in keys:
                raise LoginFailed(INITIATOR_ERROR, f"{k} sent in the operational stage")
        out += self.negotiation.respond(pairs)
        if not self.sent_declarations:
            out += self.negotiation.declarations()
            self.sent_declarations = True
        if transit:
            return self._advance(csg, nsg, out)
        return LoginStep(keys=out, csg=csg, nsg=nsg)

    # ------------------------------------------------------------------ stages
    def _first_request(self, keys: dict, text: bytes, out: list) -> None:
        raw = raw_value(text, b"InitiatorName")
        if not raw:
            raise LoginFailed(MISSING_PARAMETER, "InitiatorName is missing")
        self.initiator = checked_name(raw, "InitiatorName")
        session_type = keys.get("SessionType", "Normal")
        if session_type not in ("Normal", "Discovery"):
            raise LoginFailed(SESSION_TYPE_UNSUPPORTED, f"SessionType {session_type} is not supported")
        self.session_type = session_type
        if session_type == "Normal":
            raw = raw_value(text, b"TargetName")
            if not raw:
                raise LoginFailed(MISSING_PARAMETER, "TargetName is missing for a normal session")
            name = checked_name(raw, "TargetName")
            self.target_name = name
            if self.registry.target(self.target_name) is None:
                raise LoginFailed(NOT_FOUND, f"target {name} does not exist")
            # One process owns a target (owners.py); the hand-over normally made us its owner already.
            try:
                owned = self.registry.claim(self.target_name)
            except Exception as exc:  # noqa: BLE001 - its LUNs could not be opened (a file gone, a device busy)
                raise LoginFailed(TARGET_ERROR, f"target {name} could not be opened: {exc}") from None
            if not owned:
                raise LoginFailed(SERVICE_UNAVAILABLE, f"target {name} is owned by another process")
            self.entry = self.registry.target(self.target_name)
            if self.entry is None:
                raise LoginFailed(NOT_FOUND, f"target {name} does not exist")
            self.policy = self.entry.policy
        else:
            self.policy = self.registry.discovery_policy()
        if self.tsih:
            self._existing_session()
        denied = self.policy.admit(self.initiator, self.peer_ip)
        if denied:
            raise LoginFailed(AUTHZ_FAILURE, denied)
        self.negotiation = Negotiation(discovery=session_type == "Discovery", max_recv_data=self.max_recv_data)
        if session_type == "Normal":
            out.append(("TargetPortalGroupTag", str(TPGT)))
            if self.entry.alias:
                out.append(("TargetAlias", self.entry.alias))

    def _existing_session(self) -> None:
        """A non-zero TSIH: a connection for an existing session (§6.3.1, §11.12.6). It must be a session of
        this initiator, ISID and target; with MaxConnections 1 only its own connection (same CID) may log
        in again (connection reinstatement: the old connection is closed)."""
        session = self.sessions.by_tsih(self.tsih) if self.sessions is not None else None
        target = self.target_name if self.session_type == "Normal" else ""
        if session is None or (session.initiator, session.isid, session.target) != (self.initiator, self.isid, target):
            raise LoginFailed(SESSION_DOES_NOT_EXIST, f"session TSIH {self.tsih} does not exist for this "
                                                      f"initiator, ISID 0x{self.isid:012x} and target")
        if session.cid != self.cid:
            raise LoginFailed(TOO_MANY_CONNECTIONS, f"session TSIH {self.tsih} already has its one connection "
                                                    f"(CID {session.cid}; MaxConnections=1)")

    def _same_identity(self, keys: dict, text: bytes) -> None:
        """Keys that name the session may be repeated in later requests, but not changed."""
        for key, now in (("InitiatorName", self.initiator), ("TargetName", self.target_name)):
            raw = raw_value(text, key.encode())
            if raw is not None and checked_name(raw, key) != now:
                raise LoginFailed(INITIATOR_ERROR, f"{key} changed during the login")
        if keys.get("SessionType", self.session_type) != self.session_type:
            raise LoginFailed(INITIATOR_ERROR, "SessionType changed during the login")

    def _security(self, keys: dict, out: list) -> bool:
        """Run the security exchange; True once the initiator is authenticated."""
        # Operational keys do not belong here, but some initiators send them early; answering them is
        # harmless and friendlier than failing the login.
        out += self.negotiation.respond(list(keys.items()))
        if "AuthMethod" in keys:
            if self.auth_method is not None:
                raise LoginFailed(INITIATOR_ERROR, "AuthMethod offered twice")
            offered = [m.strip() for m in keys["AuthMethod"].split(",")]
            chosen = next((m for m in offered if m in self.policy.methods), None)
            if chosen is None:
                raise LoginFailed(AUTH_FAILURE, f"AuthMethod {keys['AuthMethod']} not accepted "
                                                f"(this target accepts {','.join(self.policy.methods)})")
            self.auth_method = chosen
            out.append(("AuthMethod", chosen))
            if chosen == "None":
                self.authenticated = True
                return True
            self.chap_state = "want_a"
            return False
        if self.auth_method is None:
            # No AuthMethod at all: acceptable only where no authentication is needed.
            if self.policy.requires_chap:
                raise LoginFailed(AUTH_FAILURE, "no AuthMethod offered but this target requires CHAP")
            self.auth_method = "None"
            self.authenticated = True
            return True
        if self.auth_method == "None":
            return True
        return self._chap(keys, out)

    def _chap(self, keys: dict, out: list) -> bool:
        if self.chap_state == "want_a":
            algorithms = [a.strip() for a in keys.get("CHAP_A", "").split(",")]
            if CHAP_MD5 not in algorithms:
                raise LoginFailed(AUTH_FAILURE, f"CHAP_A {keys.get('CHAP_A')!r} offers no MD5 (5)")
            self.chap_ident = self.random(1)[0]
            self.chap_challenge = self.random(CHAP_CHALLENGE_LEN)
            out += [("CHAP_A", CHAP_MD5), ("CHAP_I", str(self.chap_ident)),
                    ("CHAP_C", "0x" + self.chap_challenge.hex())]
            self.chap_state = "challenged"
            return False
        if self.chap_state == "challenged":
            name, response = keys.get("CHAP_N"), keys.get("CHAP_R")
            if name is None or response is None:
                raise LoginFailed(AUTH_FAILURE, "CHAP_N or CHAP_R is missing")
            secret = self.policy.secret(name)
            if secret is None:
                raise LoginFailed(AUTH_FAILURE, f"unknown CHAP user {name}")
            try:
                got = decode_binary(response)
            except ValueError as exc:
                raise LoginFailed(AUTH_FAILURE, f"CHAP_R: {exc}") from None
            if not equal(got, chap_response(self.chap_ident, secret, self.chap_challenge)):
                raise LoginFailed(AUTH_FAILURE, f"wrong CHAP secret for user {name}")
            self.chap_user = name
            if "CHAP_I" in keys or "CHAP_C" in keys:
                self._mutual(keys, out)
            self.chap_state = "done"
            self.authenticated = True
            return True
        return self.chap_state == "done"

    def _mutual(self, keys: dict, out: list) -> None:
        mutual = self.policy.mutual
        if mutual is None:
            raise LoginFailed(AUTH_FAILURE, "initiator asked for mutual CHAP; this target has no mutual secret")
        try:
            ident = int(keys["CHAP_I"], 0)
            challenge = decode_binary(keys["CHAP_C"])
        except (KeyError, ValueError) as exc:
            raise LoginFailed(AUTH_FAILURE, f"bad mutual CHAP_I/CHAP_C: {exc}") from None
        if not 0 <= ident <= 255 or not 1 <= len(challenge) <= 1024:
            raise LoginFailed(AUTH_FAILURE, "mutual CHAP_I or CHAP_C out of range")
        if challenge == self.chap_challenge:  # reflection attack (§12.1.3)
            raise LoginFailed(AUTH_FAILURE, "initiator reflected the target's CHAP challenge")
        name, secret = mutual
        out += [("CHAP_N", name), ("CHAP_R", "0x" + chap_response(ident, secret, challenge).hex())]

    def _advance(self, csg: int, nsg: int, out: list) -> LoginStep:
        if nsg == STAGE_FULL:
            if not self.authenticated:
                raise LoginFailed(AUTH_FAILURE, "full feature phase requested without authentication")
            return LoginStep(keys=out, transit=True, csg=csg, nsg=nsg, complete=True)
        return LoginStep(keys=out, transit=True, csg=csg, nsg=nsg)
