"""Real Swarm tier (pytest markers `docker`, `s3`): several dockerds in network namespaces.

A package, so its conftest is imported as `swarm.conftest`, not as a top-level `conftest`
that would shadow the one tests/multihost imports by that name."""
