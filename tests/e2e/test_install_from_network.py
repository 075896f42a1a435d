"""The seed's installation, from the network alone (issue 14): a PC with no disk and no optical drive, and an
EMPTY network disk. `bootfleet client install MAC ISO` makes its next boot the installer's: the script hooks
the disk (sanhook, drive 0x80) and boots the installer ISO from our CD/DVD target (sanboot; iPXE emulates an El
Torito CD from a 2048-byte-block SAN device); ISOLINUX starts the lab kernel, whose /init logs in from the iBFT
(both targets), mounts the disc (/dev/sr0) and writes the system it carries onto the network disk (/dev/sdX).
The controller removed the one-shot setting when the PC fetched that script, so the next power-on boots the
installed system from the network disk: its marker, the token the ISO's system carries, and its nonce."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest

from lab import image
from lab.installer import InstallLab, installer_iso

pytestmark = [pytest.mark.integration, pytest.mark.netns]


def test_a_pc_installs_its_system_from_an_iso_onto_an_empty_network_disk(workdir, boot_disk):
    started = time.monotonic()
    token = f"installed-{uuid.uuid4().hex[:16]}"
    system = workdir / "system.img"
    shutil.copyfile(boot_disk, system)
    image.write_token(system, token)
    iso = installer_iso(workdir / "lab-installer.iso", system, boot_disk)
    with InstallLab(workdir, iso, token, disk=boot_disk) as lab:
        mac = lab.results[0].mac
        client = lab.stack.cli_json("config", "get", "clients")
        entry = next(c for c in client["value"] if c["mac"] == mac)
        assert entry.get("install") == "iqn.2026-12.org.bootfleet:iso.lab-installer", entry
        pc = lab.install()
        console = "\n".join(f"[{line.t:6.2f}] {line.text}" for line in pc.lines[-50:])
        installed = pc.find(r"BOOTFLEET-INSTALLED (\S*)")
        assert installed and installed.group(1) == token, console
        assert pc.find(r"BOOTFLEET-CDROM bootfleet-installer"), console
        install_s = pc.line_time("BOOTFLEET-INSTALLED")
        entry = next(c for c in lab.stack.cli_json("config", "get", "clients")["value"] if c["mac"] == mac)
        # one boot only: removed when the PC fetched the install script
        assert entry.get("install") is None, (entry, lab.stack.cli("events", "--type", "tftp").stdout)

        results = lab.boot()  # the next power-on: the installed system, from the network disk
        r = results[0]
        tail = "\n".join(f"[{line.t:6.2f}] {line.text}" for line in r.console[-40:])
        assert r.ok and r.token_seen == token, f"{r.summary()}\n{tail}\n{lab.stack.logs(25)}"
        assert not any("BOOTFLEET-INSTALLING" in line.text for line in r.console), tail
    print(f"\ninstaller: written and powered off {install_s:.1f} s after power-on; installed system: marker "
          f"{r.marker_s:.1f} s after power-on; whole test {time.monotonic() - started:.0f} s")
