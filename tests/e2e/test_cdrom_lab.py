"""Linux's sr driver on our CD/DVD LUN (issue 14): a lab PC boots its disk (LUN 0) through iPXE; its OS
(the lab initramfs) logs in again with open-iscsi's iscsistart from the iBFT, finds LUN 1, a CD/DVD drive whose
disc is an ISO made here, as /dev/sr0 (sr_mod, cdrom), mounts its ISO 9660 file system (isofs) and prints
the first line of a known file, a token only this run's ISO holds."""

from __future__ import annotations

import uuid

import pytest

from lab.installer import CdromLab, make_iso

pytestmark = [pytest.mark.integration, pytest.mark.netns]


def test_the_lab_os_mounts_an_iso_from_our_cdrom_lun(workdir, boot_disk):
    token = f"cd-{uuid.uuid4().hex}"
    iso = make_iso(workdir / "disc.iso", {"BOOTFLEET.TXT": f"{token}\n".encode(), "docs/readme.txt": b"x" * 70000})
    with CdromLab(workdir, iso, pcs=1, disk=boot_disk) as lab:
        results = lab.boot()
        r = results[0]
        console = "\n".join(f"[{line.t:6.2f}] {line.text}" for line in r.console[-40:])
        assert r.ok, f"{r.summary()}\n{console}\n{lab.stack.logs(25)}"
        seen = next((line for line in r.console if "BOOTFLEET-CDROM" in line.text), None)
        assert seen is not None and f"BOOTFLEET-CDROM {token}" in seen.text, console
        print(f"\n{r.summary()}; the disc's token read through /dev/sr0 {seen.t:.2f} s after power-on")
