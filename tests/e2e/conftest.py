"""The real-dockerd tier's fixtures (private dockerd, test images, stowage as a legacy plugin,
`e2e`, `calls`, `s3_server`) live in harness/e2e_fixtures.py, registered once for the session by
tests/conftest.py, so that tests/e2e and tests/security share one dockerd per pytest run."""
