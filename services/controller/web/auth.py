"""Who may do what on the web server: the token file, the password hash, browser sessions, CSRF.

- The token: 32 random bytes (URL-safe base64) in `<state_dir>/web-token`, mode 0600, written at the controller's
  start when missing; whoever can read the state directory can act, as with the control socket.
- The password (optional): `web.password_hash` = `pbkdf2_sha256$<iterations>$<salt>$<hash>` (hashlib's PBKDF2,
  compared in constant time). `python -m services.controller.web.auth hash` prints one for a password it asks.
- Either one, sent as `Authorization: Bearer <token or password>`, authenticates an API call (Prometheus'
  `authorization: {credentials_file: ...}` sends the token this way); `POST /login` trades one for a session
  cookie (HttpOnly, SameSite=Strict, Secure over TLS). A session's POSTs must also carry its CSRF token
  (`X-CSRF-Token`, which the pages hold in a meta tag), so another site cannot make the browser act.

Sans-IO apart from the token file: the clock is passed in.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

TOKEN_FILE = "web-token"
ITERATIONS = 310_000  # OWASP's figure for PBKDF2-HMAC-SHA256
COOKIE = "bootfleet_session"


def ensure_token(state_dir: Path) -> str:
    """The token in `<state_dir>/web-token`, written (mode 0600) when missing or empty."""
    path = Path(state_dir) / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            os.chmod(path, 0o600)
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def hash_password(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, encoded: str) -> bool:
    try:
        scheme, iterations, salt, digest = encoded.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


@dataclass
class Session:
    csrf: str
    expires: float


class Auth:
    def __init__(self, token: str, password_hash: str | None, session_seconds: float):
        self.token = token
        self.password_hash = password_hash
        self.session_seconds = session_seconds
        self.sessions: dict[str, Session] = {}

    def secret_ok(self, secret: str | None) -> bool:
        """The token, or the configured password."""
        if not secret:
            return False
        if hmac.compare_digest(secret.encode(), self.token.encode()):
            return True
        return bool(self.password_hash) and check_password(secret, self.password_hash)

    def bearer_ok(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return self.secret_ok(header[len("Bearer ") :].strip())

    def login(self, secret: str, now: float) -> tuple[str, Session] | None:
        if not self.secret_ok(secret):
            return None
        for sid in [k for k, s in self.sessions.items() if s.expires <= now]:
            del self.sessions[sid]
        sid = secrets.token_urlsafe(32)
        session = self.sessions[sid] = Session(csrf=secrets.token_urlsafe(24), expires=now + self.session_seconds)
        return sid, session

    def session(self, cookie_header: str | None, now: float) -> Session | None:
        sid = _cookie(cookie_header, COOKIE)
        session = self.sessions.get(sid) if sid else None
        if session is None or session.expires <= now:
            return None
        return session

    def logout(self, cookie_header: str | None) -> None:
        sid = _cookie(cookie_header, COOKIE)
        if sid:
            self.sessions.pop(sid, None)

    def may_act(self, headers, now: float) -> bool:
        """A POST: a bearer secret, or a session with its CSRF token."""
        if self.bearer_ok(headers.get("Authorization")):
            return True
        session = self.session(headers.get("Cookie"), now)
        csrf = headers.get("X-CSRF-Token") or ""
        return session is not None and hmac.compare_digest(csrf.encode(), session.csrf.encode())

    def may_read(self, headers, now: float) -> bool:
        return self.bearer_ok(headers.get("Authorization")) or self.session(headers.get("Cookie"), now) is not None


def _cookie(header: str | None, name: str) -> str | None:
    for part in (header or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None


MIN_PASSWORD = 8


def read_password() -> str:
    """A new password: asked twice on a terminal, else the first line of standard input. ValueError says why not."""
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if len(password) >= MIN_PASSWORD and getpass.getpass("again: ") != password:
            raise ValueError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password of at least {MIN_PASSWORD} characters, please")
    return password


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["hash"]:
        print("usage: python -m services.controller.web.auth hash   (prints web.password_hash for a password; "
              "also `bootfleet web passwd`)", file=sys.stderr)
        return 2
    try:
        password = read_password()
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
