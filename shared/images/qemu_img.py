"""qemu-img for the image store: what a file to import is (`info`), and conversions with progress (`convert`)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from shared.images.errors import ImageStoreError

IMPORT_FORMATS = ("raw", "qcow2", "vpc", "vhdx", "vmdk")
EXPORT_FORMATS = ("raw", "qcow2", "vpc")
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def info(qemu_img: str, path: Path) -> dict:
    """`qemu-img info --output=json` of `path` (format, virtual-size, actual-size, ...)."""
    try:
        out = subprocess.run([qemu_img, "info", "--output=json", str(path)], capture_output=True,
                             check=True, text=True).stdout
    except FileNotFoundError:
        raise ImageStoreError(f"{qemu_img} is not installed (Debian: qemu-utils)") from None
    except subprocess.CalledProcessError as exc:
        raise ImageStoreError(f"qemu-img info {path}: {exc.stderr.strip()}") from None
    return json.loads(out)


def convert(qemu_img: str, args: list[str], total: int, progress) -> None:
    """`qemu-img convert -p ARGS`, its percentage passed on as `progress(done, total, "convert")`."""
    cmd = [qemu_img, "convert", "-p", *args]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise ImageStoreError(f"{qemu_img} is not installed (Debian: qemu-utils)") from None
    buf = b""
    while True:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            break
        buf = (buf + chunk)[-256:]
        found = _PROGRESS.findall(buf)
        if found:
            progress(int(float(found[-1]) * total / 100), total, "convert")
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.wait():
        raise ImageStoreError(f"{' '.join(cmd)}: {err or 'failed'}")
    progress(total, total, "convert")
