"""One image for a room of PCs (issue 13): QEMU PCs boot at once from ONE image, each through its own target
and overlay; discard and persistent overlays across a power-off/on; a super PC's marker published as the next
version, seen by a PC that powers on afterwards and not by one that kept running; the base version's digest
unchanged at the end. Results are read back through each PC's target by QEMU's libiscsi, logged in as that
PC (lab/golden.py)."""

from __future__ import annotations

import json
import time

import pytest

from lab import image
from lab.golden import GoldenLab

pytestmark = [pytest.mark.integration, pytest.mark.netns]

MODES = {"d1": "discard", "d2": "discard", "watch": "discard", "p1": "persistent", "super": "super"}


def _explain(boots, gl=None) -> str:
    out = []
    for b in boots.values():
        out.append(f"--- {b.name} {b.mac}: {b.error or 'ok'}\n{b.tail()}")
    if gl is not None and gl.stack is not None:
        out.append(gl.stack.logs(25))
    return "\n".join(out)


def test_pcs_boot_one_image_with_overlays_and_a_published_version(workdir, boot_disk):
    started = time.monotonic()
    with GoldenLab(workdir, boot_disk, MODES) as gl:
        info = gl.stack.cli_json("image", "info", "lab")["image"]
        v1_digest = info["versions"][0]["digest"]
        assert info["current"] == 1 and "import golden.img" in info["versions"][0]["source"]
        assert "import lab:" in gl.import_output  # the progress, through a pipe

        # five PCs at once from one image, three of them discard (watch stays up)
        boots = gl.boot(list(MODES), keep=("watch",))
        assert all(b.error is None for b in boots.values()), _explain(boots, gl)
        first = {n: b.nonce for n, b in boots.items()}
        assert len(set(first.values())) == len(MODES) and None not in first.values(), first
        for n, b in boots.items():
            assert b.value("TOKEN") == gl.token, _explain(boots)  # they all read the one image
            assert b.value("INITIATOR") == gl.initiator(n), _explain(boots)  # option 203 named each PC
            assert b.value("PREV") == "none" and b.value("SEEMARK") == "none", _explain(boots)
            assert b.value("READBACK") == b.nonce, _explain(boots)  # each reads back its own write
        assert boots["super"].value("MARKED") == first["super"]
        # through each PC's own target: its own nonce, nobody else's
        for n in MODES:
            assert gl.parse(gl.read_sector(n, image.NONCE_SECTOR), "NONCE") == first[n], n

        # publish the super PC's writes, once it is logged out (it powered off without logging out)
        deadline = time.monotonic() + 30
        while True:
            pcs = {p["pc"]: p for p in gl.stack.cli_json("image", "info", "lab")["image"]["pcs"]}
            if pcs["super"]["sessions"] == 0:
                break
            assert time.monotonic() < deadline, f"the super PC still logged in: {pcs['super']}"
            time.sleep(0.5)
        published = gl.stack.cli("image", "publish", "lab", timeout=120)
        assert published.returncode == 0, published.stderr
        assert "version 2 published from super" in published.stdout, published.stdout
        watch_clock = time.monotonic() - gl.running["watch"].pc.powered_on

        # the one that kept running still sees version 1; those that power on now see version 2
        again = gl.boot(["d1", "p1"])
        assert all(b.error is None for b in again.values()), _explain(again, gl)
        d1, p1 = again["d1"], again["p1"]
        assert d1.value("PREV") != first["d1"] and d1.value("PREV") == first["super"], _explain(again)  # discard: gone
        assert d1.value("SEEMARK") == first["super"], _explain(again)  # the published version's marker
        assert p1.value("PREV") == first["p1"], _explain(again)  # persistent: kept
        assert p1.value("SEEMARK") == "none", _explain(again)  # on the version its overlay sits on
        assert gl.parse(gl.read_sector("d1", image.NONCE_SECTOR), "NONCE") == d1.nonce
        watched = gl.running["watch"].watched(since=watch_clock)
        watch = gl.stop("watch")
        assert len(watched) >= 3 and set(watched) == {"none"}, watch.tail()

        clients = {c["mac"]: c for c in gl.stack.cli_json("clients")["clients"]}
        assert (clients[d1.mac]["version"], clients[d1.mac]["mode"]) == (2, "discard"), clients[d1.mac]
        assert (clients[p1.mac]["version"], clients[p1.mac]["mode"]) == (1, "persistent"), clients[p1.mac]
        assert clients[boots["watch"].mac]["version"] == 1
        assert clients[p1.mac]["overlay"] > 0
        assert gl.stack.cli_json("client", d1.mac)["client"]["target"] == gl.target("d1")
        listed = gl.stack.cli("--json", "events", "--type", "image.overlay.reset", "--limit", "1000").stdout
        resets = [json.loads(line)["fields"] for line in listed.splitlines() if line.strip()]
        assert any(r["mac"] == d1.mac and r["reason"] == "power-on" for r in resets), resets  # the iSCSI target's
        assert not any(r["mac"] == p1.mac and r["reason"] == "power-on" for r in resets), resets

        # client reset: p1 starts over on the current version (once its last session is gone)
        deadline = time.monotonic() + 30
        while (reset := gl.stack.cli("client", "reset", p1.mac)).returncode != 0:
            assert "logged in" in reset.stderr and time.monotonic() < deadline, reset.stderr
            time.sleep(0.5)
        assert gl.stack.cli_json("client", p1.mac)["client"]["version"] == 2
        assert gl.parse(gl.read_sector("p1", image.NONCE_SECTOR), "NONCE") == first["super"]  # version 2's sector

        # the base version is what was imported
        verified = gl.stack.cli("--json", "image", "verify", "lab", timeout=120)
        assert verified.returncode == 0, verified.stderr
        info = gl.stack.cli_json("image", "info", "lab")["image"]
        assert info["versions"][0]["digest"] == v1_digest and info["current"] == 2
        assert info["verified"]["ok"], info["verified"]
    markers = ", ".join(f"{b.name} {b.marker_s:.1f}" for b in [*boots.values(), *again.values()])
    print(f"one-image lab: {time.monotonic() - started:.0f} s; marker s after power-on: {markers}")


def _events(gl, type) -> list[dict]:
    listed = gl.stack.cli("--json", "events", "--type", type, "--limit", "1000").stdout
    return [json.loads(line)["fields"] for line in listed.splitlines() if line.strip()]


def test_a_hard_reset_while_its_session_is_up_starts_a_discard_pc_clean(workdir, boot_disk):
    """The reset button, while the OS reads its disk: the target still holds that boot's session (the default
    pings, 30 + 15 s, have not noticed it dead) when the firmware logs in again; that login, of a newer
    power-on, closes it and empties the overlay: the nonce of the boot before is gone."""
    started = time.monotonic()
    with GoldenLab(workdir, boot_disk, {"watch": "discard"}, nop=(30, 15)) as gl:
        boots = gl.boot(["watch"], keep=("watch",))
        first = boots["watch"]
        assert first.error is None and first.nonce, _explain(boots, gl)
        again = gl.hard_reset("watch")
        assert again.error is None, f"{again.error}\n{gl.stack.logs(25)}"
        assert again.value("PREV") == "none", again.tail()  # the last boot's nonce is gone
        assert again.nonce and again.nonce != first.nonce, again.tail()
        dead = [e for e in _events(gl, "iscsi.logout") if "powered on again" in (e.get("reason") or "")]
        assert dead, _events(gl, "iscsi.logout")  # the first boot's session, closed by the second's login
        resets = [r for r in _events(gl, "image.overlay.reset") if r["mac"] == first.mac and r["reason"] == "power-on"]
        assert len(resets) == 2, resets
    print(f"hard reset lab: {time.monotonic() - started:.0f} s")
