"""Who serves a target, sans-IO: the first Login PDU's framing, its TargetName, and the hand-over plan.

Theory of operation
-------------------
With `scale.iscsi_target: N` the processes share port 3260 (SO_REUSEPORT), so the kernel picks the
process that accepts a connection before anyone knows which target it wants. What SCSI keeps once per
logical unit (reservations, unit attentions, COMPARE AND WRITE's ordering, the sessions a reinstating
login must find) must live in one process, the target's *owner*:

- The owner is the process holding the kernel lock on the target's lock file (owner_locks.py). The kernel
  drops a dead process's lock at once, so ownership never outlives its holder; a process keeps it until it
  exits or the target leaves its configuration.
- When no one holds it, the *preferred* owner is the first live instance in rendezvous-hash order
  (`hrw_order`) of the target name over 0..N-1: stable, and a process's death moves only its own targets,
  each to the next instance in that target's order.
- The accepting process reads exactly the first Login PDU (`first_pdu_length`: BHS + AHS + padded data; the
  initiator sends nothing more before our answer), takes its TargetName (`login_target`) and follows `plan`:
  serve it here, or hand the socket and the bytes read to another instance (handoff.py) which starts the
  connection with them and then reads the socket itself. Discovery sessions, unknown targets and anything
  that is not a well-formed first login are served where they land.
"""

from __future__ import annotations

import hashlib
import struct

from services.iscsi_target import names
from services.iscsi_target.login import raw_value
from services.iscsi_target.pdu import BHS_LEN, F_CONTINUE, OP_LOGIN_REQ

MAX_HOPS = 2  # a hand-over may be forwarded to the lock's holder this many times (a race), then served here
_DSL = struct.Struct(">I")


def hrw_order(name: str, instances: int) -> list[int]:
    """Instances 0..instances-1, best first, by rendezvous (highest random weight) hashing of `name`."""
    def weight(i: int) -> bytes:
        return hashlib.blake2b(f"{i}\0{name}".encode(), digest_size=8).digest()

    return sorted(range(max(1, instances)), key=weight, reverse=True)


def first_pdu_length(bhs) -> int:
    """The bytes of the PDU whose 48-byte header is `bhs`: the header, AHS and padded data segment. A login
    carries no digests (they start after the login). Only a Login Request is framed: anything else gives
    BHS_LEN, to be served (and refused) where it landed."""
    if bhs[0] & 0x3F != OP_LOGIN_REQ:
        return BHS_LEN
    ahs = bhs[4] * 4
    dsl = _DSL.unpack_from(bhs, 4)[0] & 0xFFFFFF
    return BHS_LEN + ahs + ((dsl + 3) & ~3)


def login_target(pdu) -> str | None:
    """The TargetName (in the canonical form the registry keys it by) a first Login Request asks for; None
    for a discovery session, a login without one or with an invalid one, text continued in a later PDU, or
    anything malformed (any process answers, and refuses, those)."""
    pdu = bytes(pdu)
    if len(pdu) < BHS_LEN or pdu[0] & 0x3F != OP_LOGIN_REQ or pdu[1] & F_CONTINUE:
        return None
    ahs = pdu[4] * 4
    dsl = _DSL.unpack_from(pdu, 4)[0] & 0xFFFFFF
    data = pdu[BHS_LEN + ahs: BHS_LEN + ahs + dsl]
    if raw_value(data, b"SessionType") not in (None, b"Normal"):
        return None
    raw = raw_value(data, b"TargetName")
    if not raw:
        return None
    try:
        return names.canonical(raw)
    except names.NameError_:
        return None


def plan(name: str, me: int, instances: int, holder: int | None, handed: bool, hops: int) -> list[int]:
    """Instances to try in order for a connection to `name`; `me` in the list means "claim the target and
    serve it here" (a hand-over to an instance that turns out dead moves on to the next).

    holder: the instance the lock file names (None: no one holds the lock). handed: the connection was
    handed to us (the sender chose us: claim it if free)."""
    if holder == me:
        return [me]
    if holder is not None:
        return [holder, me] if hops < MAX_HOPS else [me]
    if handed:
        return [me]
    order = hrw_order(name, instances)
    if me not in order:  # an instance number above the scale (a test, or a scale being lowered)
        order.append(me)
    return order
