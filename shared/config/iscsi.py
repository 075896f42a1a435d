"""The `iscsi` section of the configuration (placeholder until the iscsi service lands)."""

from shared.config.base import StrictModel


class IscsiConfig(StrictModel):
    pass
