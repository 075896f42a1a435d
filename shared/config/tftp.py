"""The `tftp` section: where the TFTP service listens, what it serves, and the limits of option negotiation.

`TftpConfig()` with no arguments is safe: read-only, no uploads, only files under `<state dir>/tftp`.
"""

from __future__ import annotations

import posixpath

from pydantic import Field, field_validator, model_validator

from shared.config.base import IPv4, StrictModel

BLKSIZE_MIN = 8  # RFC 2348
BLKSIZE_MAX = 65464  # RFC 2348: largest block that fits a 65535-byte IP datagram
TIMEOUT_MIN = 1  # RFC 2349, seconds
TIMEOUT_MAX = 255
WINDOWSIZE_MAX = 65535  # RFC 7440


class TftpConfig(StrictModel):
    root: str = Field(
        "tftp",
        description="folder served; a relative path is under the state dir (var/tftp by default)",
    )
    address: IPv4 = Field("0.0.0.0", description="address the request socket binds; 0.0.0.0 = all addresses")
    port: int = Field(69, ge=0, le=65535, description="UDP port of requests (0: any free port, for tests)")
    upload_dir: str | None = Field(
        None,
        description="folder under root that accepts write requests (WRQ); none = read-only server",
    )
    upload_overwrite: bool = Field(False, description="an upload may replace an existing file (else error 6)")
    upload_max_size: int = Field(64 << 20, ge=0, description="bytes; a larger upload fails with error 3")
    max_blksize: int = Field(
        BLKSIZE_MAX, ge=BLKSIZE_MIN, le=BLKSIZE_MAX,
        description="bytes; a client asking more gets this (RFC 2348 lets the server answer smaller)",
    )
    default_timeout: float = Field(
        1.0, gt=0, le=TIMEOUT_MAX, description="seconds before a retransmission when the client asks no timeout"
    )
    min_timeout: int = Field(TIMEOUT_MIN, ge=TIMEOUT_MIN, le=TIMEOUT_MAX, description="seconds; smallest timeout option accepted")
    max_timeout: int = Field(TIMEOUT_MAX, ge=TIMEOUT_MIN, le=TIMEOUT_MAX, description="seconds; largest timeout option accepted")
    retries: int = Field(5, ge=0, le=100, description="retransmissions of one packet before the transfer fails")
    max_windowsize: int = Field(
        64, ge=1, le=WINDOWSIZE_MAX, description="blocks sent before an ACK (RFC 7440); a client asking more gets this"
    )
    busy_poll_us: int = Field(
        100, ge=0, le=100_000,
        description="microseconds the serving thread keeps polling without sleeping after a packet while "
        "transfers run (a lock-step client's next ACK then costs no wake-up); 0 = always sleep",
    )
    gso: bool = Field(
        True,
        description="send a window's blocks in one call with UDP generic segmentation offload (Linux 4.18+); "
        "turned off by itself where the kernel refuses it",
    )
    cache_mib: int = Field(
        256, ge=0, description="MiB of file contents kept in memory, shared by all transfers (0: read every block)"
    )
    cache_max_file_mib: int = Field(64, ge=0, description="MiB; larger files are read block by block from disk")
    threads: int = Field(
        1, ge=1, le=64,
        description="serving threads in each process, each with its own SO_REUSEPORT socket and epoll loop "
        "(socket calls release the GIL, so two threads overlap kernel work); processes: scale.tftp",
    )
    max_transfers: int = Field(2000, ge=1, description="transfers in flight per serving thread; more get error 0 'server busy'")
    dynamic_files: list[str] = Field(
        default_factory=list,
        description="file names rendered per client as the iPXE script, besides boot.script",
    )
    pxelinux_paths: bool = Field(
        True,
        description="render the iPXE script for pxelinux.cfg/01-<mac> when no such file exists under root",
    )
    netascii: bool = Field(True, description="accept netascii mode (converted in memory)")
    netascii_max_size: int = Field(16 << 20, ge=0, description="bytes; a larger file asked in netascii gets error 0")

    @field_validator("upload_dir")
    @classmethod
    def _inside_root(cls, value: str | None) -> str | None:
        if value is None:
            return None
        norm = posixpath.normpath(value.strip())
        if norm.startswith("/") or norm == ".." or norm.startswith("../") or norm in ("", "."):
            raise ValueError(f"{value} must be a folder under root (relative, without ..), not the root itself")
        return norm

    @field_validator("dynamic_files")
    @classmethod
    def _plain_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{name!r} must be a relative file name without ..")
        return value

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> "TftpConfig":
        if self.min_timeout > self.max_timeout:
            raise ValueError(f"min_timeout {self.min_timeout} is larger than max_timeout {self.max_timeout}")
        return self
