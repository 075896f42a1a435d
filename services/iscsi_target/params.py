"""Text key negotiation (RFC 7143 §6.2 and §13): the target's side of the operational keys.

Each key has a kind that says how the offer and our own value combine: a list (we pick the first offered
value we support), numeric min/max, boolean AND/OR, or a declaration (the sender states its own limit and
the other side does not answer). `Negotiation.respond` takes the offered pairs of one request and returns
the pairs to send back; `Negotiation.values` holds the session's results. Sans-IO, no state but the dict.
"""

from __future__ import annotations

from dataclasses import dataclass

# Our limits. MaxRecvDataSegmentLength is what we accept per PDU; the bursts what one command may move.
TARGET_MAX_RECV_DATA = 262144
TARGET_MAX_BURST = 16776192
TARGET_FIRST_BURST = 262144


@dataclass(frozen=True)
class Key:
    kind: str  # list | min | max | and | or | declare
    default: object
    ours: object = None  # our value for min/max/and/or; the values we support for a list
    lo: int = 0
    hi: int = 0
    leading_only: bool = True  # only on the session's first connection (all of these, with MaxConnections 1)
    normal_only: bool = False  # irrelevant in a discovery session


KEYS: dict[str, Key] = {
    "HeaderDigest": Key("list", "None", ("CRC32C", "None"), leading_only=False),
    "DataDigest": Key("list", "None", ("CRC32C", "None"), leading_only=False),
    "MaxConnections": Key("min", 1, 1, 1, 65535),
    "InitialR2T": Key("or", True, False, normal_only=True),
    "ImmediateData": Key("and", True, True, normal_only=True),
    "MaxRecvDataSegmentLength": Key("declare", 8192, None, 512, 16777215, leading_only=False),
    "MaxBurstLength": Key("min", 262144, TARGET_MAX_BURST, 512, 16777215, normal_only=True),
    "FirstBurstLength": Key("min", 65536, TARGET_FIRST_BURST, 512, 16777215, normal_only=True),
    "DefaultTime2Wait": Key("max", 2, 2, 0, 3600),
    "DefaultTime2Retain": Key("min", 20, 20, 0, 3600),
    "MaxOutstandingR2T": Key("min", 1, 1, 1, 65535, normal_only=True),
    "DataPDUInOrder": Key("or", True, True, normal_only=True),
    "DataSequenceInOrder": Key("or", True, True, normal_only=True),
    "ErrorRecoveryLevel": Key("min", 0, 0, 0, 2),
    # RFC 3720 markers: RFC 7143 dropped them, older initiators still offer them; we never use them.
    "IFMarker": Key("and", False, False, leading_only=False),
    "OFMarker": Key("and", False, False, leading_only=False),
    "IFMarkInt": Key("reject_irrelevant", "Irrelevant", leading_only=False),
    "OFMarkInt": Key("reject_irrelevant", "Irrelevant", leading_only=False),
}

# Keys handled by the login state machine (security stage and session identity), never answered here.
LOGIN_KEYS = frozenset({
    "InitiatorName", "InitiatorAlias", "TargetName", "SessionType", "AuthMethod", "TargetAlias",
    "TargetAddress", "TargetPortalGroupTag", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R",
})


class NegotiationError(ValueError):
    """An offer we cannot accept at all (a malformed numeric, a value out of range the RFC makes fatal)."""


def _bool(text: str) -> bool | None:
    return {"Yes": True, "No": False}.get(text)


def _fmt(value) -> str:
    if value is True:
        return "Yes"
    if value is False:
        return "No"
    return str(value)


class Negotiation:
    """One session's operational parameters, negotiated over one or more requests."""

    def __init__(self, discovery: bool = False, max_recv_data: int = TARGET_MAX_RECV_DATA):
        self.discovery = discovery
        self.values: dict[str, object] = {name: key.default for name, key in KEYS.items()}
        self.values["TargetMaxRecvDataSegmentLength"] = max_recv_data
        self.max_recv_data = max_recv_data
        self.answered: set[str] = set()
        self.declared_ours = False

    def respond(self, pairs: list[tuple[str, str | None]], full_feature: bool = False) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name, value in pairs:
            if name in LOGIN_KEYS or name == "SendTargets":
                continue
            key = KEYS.get(name)
            if value is None:
                raise NegotiationError(f"key {name} has no '=' (RFC 7143 §6.1)")
            if key is None:
                out.append((name, "NotUnderstood"))
                continue
            if full_feature and key.leading_only:
                out.append((name, "Reject"))  # may only be negotiated at login
                continue
            if self.discovery and key.normal_only:
                out.append((name, "Irrelevant"))
                continue
            answer = self._negotiate(name, key, value)
            if answer is not None:
                out.append((name, answer))
        self._check_bursts()
        return out

    def declarations(self) -> list[tuple[str, str]]:
        """Our MaxRecvDataSegmentLength, declared once per login (the initiator does not answer it)."""
        if self.declared_ours:
            return []
        self.declared_ours = True
        return [("MaxRecvDataSegmentLength", str(self.max_recv_data))]

    def _negotiate(self, name: str, key: Key, value: str):
        if key.kind == "reject_irrelevant":
            return "Irrelevant"
        if key.kind == "list":
            offered = [v.strip() for v in value.split(",")]
            for choice in offered:
                if choice in key.ours:
                    self.values[name] = choice
                    return choice
            return "Reject"
        if key.kind in ("and", "or"):
            offered = _bool(value)
            if offered is None:
                return "Reject"
            result = (offered and key.ours) if key.kind == "and" else (offered or key.ours)
            self.values[name] = result
            return _fmt(result)
        try:
            number = int(value, 0) if value.lower().startswith("0x") else int(value)
        except ValueError:
            return "Reject"
        if not key.lo <= number <= key.hi:
            return "Reject"
        if key.kind == "declare":
            self.values[name] = number  # the initiator's receive limit: our send limit
            return None
        result = min(number, key.ours) if key.kind == "min" else max(number, key.ours)
        self.values[name] = result
        return str(result)

    def _check_bursts(self) -> None:
        # FirstBurstLength MUST NOT exceed MaxBurstLength (§13.14); clamp rather than fail the login.
        if self.values["FirstBurstLength"] > self.values["MaxBurstLength"]:
            self.values["FirstBurstLength"] = self.values["MaxBurstLength"]

    # Convenience accessors for the connection's hot path
    @property
    def header_digest(self) -> bool:
        return self.values["HeaderDigest"] == "CRC32C"

    @property
    def data_digest(self) -> bool:
        return self.values["DataDigest"] == "CRC32C"

    @property
    def initiator_max_recv(self) -> int:
        return int(self.values["MaxRecvDataSegmentLength"])
