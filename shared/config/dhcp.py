"""The `dhcp` section of the configuration (placeholder until the dhcp service lands)."""

from shared.config.base import StrictModel


class DhcpConfig(StrictModel):
    pass
