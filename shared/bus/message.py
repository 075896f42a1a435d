"""Bus messages: one msgpack map per frame, validated on receipt (sans-IO: no sockets here).

Every message is `{"t": type, "v": version, ...}`. Types:

- `kv`      controller -> service (PUB, and in a snapshot): one key of the replicated store.
            `{epoch, seq, key, val}`; `val` None deletes the key. Keys (named below, the one place):
            `config` -> {revision, config}, `lease/<ip>` -> {mac, expires},
            `command/<service>/<id>` -> {name, args, ts}.
- `hugz`    controller -> service (PUB): heartbeat `{epoch, seq}`; a service that sees a seq it has
            not received, or a new epoch (controller restarted), takes a new snapshot.
- `icanhaz` service -> controller (snapshot socket): `{}`, ask for the whole store.
- `kthxbai` controller -> service (snapshot socket): `{epoch, seq}` ends a snapshot; the `kv`
            messages before it carry the store at `seq`.
- `event`   service -> controller (PUSH): `{service, instance, pid, ts, type, fields}`.
- `beat`    service -> controller (PUSH): `{service, instance, pid, started, revision, emitted,
            dropped, counters, controller, failed}`, sent every heartbeat interval; `failed` is nil or
            `{revision, reason}`: the last revision the service could not apply and why, in words
            (cleared when a revision applies).
"""

from __future__ import annotations

from typing import Any

import msgpack

VERSION = 1

KV = "kv"
HUGZ = "hugz"
ICANHAZ = "icanhaz"
KTHXBAI = "kthxbai"
EVENT = "event"
BEAT = "beat"

# Keys of the replicated store
CONFIG_KEY = "config"
LEASE_PREFIX = "lease/"
PCBOOT_PREFIX = "pcboot/"  # pcboot/<mac>: {image, version, boot, mode}, the controller's word on a PC's power-on
COMMAND_PREFIX = "command/"


def lease_key(ip: str) -> str:
    return f"{LEASE_PREFIX}{ip}"


def command_prefix(service: str) -> str:
    """Keys of the operations asked of every process of `service`: `command/<service>/<id>`."""
    return f"{COMMAND_PREFIX}{service}/"


# Fields each type must carry, with their Python types, checked on receipt.
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    KV: {"epoch": str, "seq": int, "key": str},
    HUGZ: {"epoch": str, "seq": int},
    ICANHAZ: {},
    KTHXBAI: {"epoch": str, "seq": int},
    EVENT: {"service": str, "instance": int, "ts": (int, float), "type": str, "fields": dict},
    BEAT: {"service": str, "instance": int, "pid": int, "revision": int, "emitted": int, "dropped": int},
}


# Fields that may be absent or nil, checked when present (older senders omit them).
_OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    BEAT: {"failed": dict},
}


class BadMessage(ValueError):
    pass


def pack(kind: str, /, **body: Any) -> bytes:
    body["t"] = kind
    body["v"] = VERSION
    return msgpack.packb(body, use_bin_type=True)


def unpack(frame: bytes) -> dict[str, Any]:
    """Decode and validate one frame; raises BadMessage naming what is wrong."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadMessage(f"not msgpack: {exc}") from None
    if not isinstance(msg, dict):
        raise BadMessage(f"not a map: {type(msg).__name__}")
    kind = msg.get("t")
    if kind not in _SCHEMA:
        raise BadMessage(f"unknown type {kind!r}")
    if msg.get("v") != VERSION:
        raise BadMessage(f"{kind}: version {msg.get('v')!r}, expected {VERSION}")
    for field, ftype in _SCHEMA[kind].items():
        if not isinstance(msg.get(field), ftype):
            raise BadMessage(f"{kind}: field {field!r} missing or not {ftype}")
    for field, ftype in _OPTIONAL.get(kind, {}).items():
        value = msg.get(field)
        if value is not None and not isinstance(value, ftype):
            raise BadMessage(f"{kind}: field {field!r} not {ftype}")
    failed = msg.get("failed") if kind == BEAT else None
    if failed is not None and not (isinstance(failed.get("revision"), int) and isinstance(failed.get("reason"), str)):
        raise BadMessage("beat: field 'failed' must be {revision: int, reason: str}")
    return msg
