"""CURVE keys for a bus over tcp:// (several hosts): `bootfleet keys generate` writes them.

<state_dir>/keys/server.key(_secret): the controller's pair; client.key(_secret): the services' pair
(copy it to each service host); authorized/: public keys the controller accepts (ZAP, via zmq.auth).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "keys"


def generate(state_dir: Path, force: bool = False) -> list[Path]:
    d = keys_dir(state_dir)
    if (d / "server.key_secret").exists() and not force:
        raise FileExistsError(f"{d} already holds keys (use --force to replace them)")
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    server_pub, server_sec = zmq.auth.create_certificates(str(d), "server")
    client_pub, client_sec = zmq.auth.create_certificates(str(d), "client")
    shutil.copy(client_pub, d / "authorized" / "client.key")
    return [Path(p) for p in (server_pub, server_sec, client_pub, client_sec)]


def server_secure(ctx: zmq.Context, sockets: list[zmq.Socket], state_dir: Path) -> ThreadAuthenticator:
    """Make the controller's sockets CURVE servers that accept only authorized client keys."""
    d = keys_dir(state_dir)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(d / "authorized"))
    public, secret = zmq.auth.load_certificate(str(d / "server.key_secret"))
    for sock in sockets:
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    return auth


def client_secure(sock: zmq.Socket, state_dir: Path) -> None:
    d = keys_dir(state_dir)
    public, secret = zmq.auth.load_certificate(str(d / "client.key_secret"))
    server_public, _ = zmq.auth.load_certificate(str(d / "server.key"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
