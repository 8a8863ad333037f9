"""Driver core: volumes, options, mount reference counts and durable state. No Flask here."""

from plugin.driver.driver import VolumeDriver, VolumeInfo

__all__ = ["VolumeDriver", "VolumeInfo"]
