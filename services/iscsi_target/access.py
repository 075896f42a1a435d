"""Who may log in: the seed's four access modes, the Guest user, IP filters and initiator-name ACLs.

`AccessPolicy` is built from one target's effective `AuthConfig` (its own, or the global one it inherits)
plus the target's ACL. The login state machine asks it three things: may this initiator at this address
try at all (`admit`), which AuthMethods it offers (`methods`), and the secret of a CHAP name (`secret`).
Discovery sessions use the global settings with no ACL. Sans-IO, pure functions of the config.
"""

from __future__ import annotations

import hmac

from shared.config.iscsi import AuthConfig, ip_allowed


class AccessPolicy:
    def __init__(self, auth: AuthConfig, acls: list[str] | tuple = ()):
        self.auth = auth
        self.acls = frozenset(a.lower() for a in acls)
        self._secrets = {u.username: u.secret.encode() for u in auth.users}

    def admit(self, initiator: str, ip: str) -> str | None:
        """None if this initiator may go on to authenticate, else the reason it may not."""
        if self.acls and initiator.lower() not in self.acls:
            return f"initiator {initiator} is not in the target's ACL"
        if self.auth.mode in ("ip", "mixed") and not ip_allowed(self.auth, ip):
            return f"address {ip} is denied by the IP filters"
        return None

    @property
    def methods(self) -> tuple[str, ...]:
        """AuthMethod values we accept, in our order of preference."""
        if self.auth.mode in ("anonymous", "ip"):
            return ("None",)
        return ("CHAP", "None") if self.auth.guest else ("CHAP",)

    @property
    def requires_chap(self) -> bool:
        return "None" not in self.methods

    def secret(self, username: str) -> bytes | None:
        return self._secrets.get(username)

    @property
    def mutual(self) -> tuple[str, bytes] | None:
        m = self.auth.mutual
        return (m.username, m.secret.encode()) if m else None

    def visible_to(self, initiator: str, ip: str) -> bool:
        """SendTargets lists a target only to initiators that could log in to it."""
        return self.admit(initiator, ip) is None


def equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
