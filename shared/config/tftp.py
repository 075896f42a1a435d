"""The `tftp` section of the configuration (placeholder until the tftp service lands)."""

from shared.config.base import StrictModel


class TftpConfig(StrictModel):
    pass
