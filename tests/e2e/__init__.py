"""Real-dockerd end-to-end tier (pytest marker `docker`); see conftest.py."""
