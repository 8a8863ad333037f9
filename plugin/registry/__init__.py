"""The shared registry: volume records and staged-volume leases kept in S3, so that every
stowage of a Swarm knows the same volumes (Scope global). See docs/several-hosts.md."""

from plugin.registry.store import RegistryStore, RegistryUnavailableError

__all__ = ["RegistryStore", "RegistryUnavailableError"]
