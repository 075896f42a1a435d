"""The `image_store` and `images` sections, and the rules a client on an image must follow (docs/images.md).

An image's versions and its current pointer are state in the store (`<state>/images/<name>/image.json`),
not configuration: the configuration says which images the controller knows, their default mode, quota
and how many versions to keep. `clients[].image`/`mode` (shared/config/boot.py) put a PC on one.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import Field, field_validator

from shared.config.base import StrictModel
from shared.config.iscsi import parse_size

Mode = Literal["discard", "persistent", "super", "readonly", "refuse"]
MODES: tuple[str, ...] = get_args(Mode)
IMAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,39}$")
# A PC's name goes into its target IQN (case-insensitive) and its overlay's file name (case-sensitive):
# lower case only, so two names never differ by case alone.
PC_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ImageStoreConfig(StrictModel):
    reserve: int = Field(0, ge=0, description="bytes (or 2GiB) of free space no overlay write or image command may take")

    @field_validator("reserve", mode="before")
    @classmethod
    def _size(cls, value):
        return parse_size(value)


class ImageConfig(StrictModel):
    name: str = Field(description="image name: [a-z0-9][a-z0-9.-]*, at most 40")
    mode: Mode = Field("discard", description="mode of the PCs on this image that do not set clients[].mode")
    keep_versions: int = Field(3, ge=1, le=1000, description="versions `image prune` keeps")
    quota: int | None = Field(None, gt=0, description="bytes (or 10GiB) per overlay; null: no quota")
    soft_threshold: int = Field(80, ge=1, le=100, description="percent of the quota: the soft-threshold unit attention")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not IMAGE_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not an image name (1..40 of a-z 0-9 . -, starting with a letter or digit)")
        return value

    @field_validator("quota", mode="before")
    @classmethod
    def _quota(cls, value):
        return None if value is None else parse_size(value)

    @property
    def soft_threshold_bytes(self) -> int | None:
        return None if self.quota is None else self.quota * self.soft_threshold // 100


def pc_name(client) -> str:
    """The name a PC on an image goes by: its `name`, else its MAC without colons."""
    return client.name or client.mac.replace(":", "")


def effective_mode(config, client) -> str | None:
    """A client's mode: its own, else its image's; None for a client not on an image."""
    if not client.image:
        return None
    if client.mode:
        return client.mode
    image = image_config(config, client.image)
    return image.mode if image else "discard"


def image_config(config, name: str) -> ImageConfig | None:
    for image in config.images:
        if image.name == name:
            return image
    return None


def check(config) -> None:
    """The cross-section rules of images and their clients; raises ValueError naming the field."""
    names: dict[str, int] = {}
    for i, image in enumerate(config.images):
        if image.name in names:
            raise ValueError(f"images[{i}].name: {image.name} is already defined by images[{names[image.name]}]")
        names[image.name] = i
    supers: dict[str, str] = {}
    pcs: dict[str, int] = {}
    targets = {t.name for t in getattr(config.iscsi, "targets", [])}
    for i, client in enumerate(config.clients):
        if client.mode and not client.image:
            raise ValueError(f"clients[{i}].mode: a mode applies to a PC on an image; set clients[{i}].image")
        if not client.image:
            continue
        if client.target:
            raise ValueError(f"clients[{i}].image: a client boots a target or an image, not both "
                             f"(it names target {client.target} and image {client.image})")
        if client.image not in names:
            raise ValueError(f"clients[{i}].image: {client.image} is not an image in images[]")
        if client.name is not None and not PC_NAME_RE.match(client.name):
            raise ValueError(f"clients[{i}].name: {client.name!r} cannot name a PC on an image (it goes into its "
                             "target's IQN and its overlay's file name: 1..63 of a-z 0-9 -, starting with a letter or digit)")
        pc = pc_name(client)
        if pc in pcs:
            raise ValueError(f"clients[{i}].name: {pc} is already the name of clients[{pcs[pc]}] "
                             "(a PC's name names its overlay and its initiator)")
        pcs[pc] = i
        if effective_mode(config, client) == "super":
            if client.image in supers:
                raise ValueError(f"clients[{i}].mode: {supers[client.image]} is already the super client of "
                                 f"image {client.image}")
            supers[client.image] = pc
    if pcs:
        from shared.boot import pc_target_iqn  # the names live in one place

        for client in config.clients:
            if client.image and pc_target_iqn(config, client) in targets:
                i = config.clients.index(client)
                raise ValueError(f"clients[{i}].image: the PC's target {pc_target_iqn(config, client)} is also "
                                 "defined in iscsi.targets")
