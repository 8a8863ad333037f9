"""stowage: a Docker volume plugin for local-directory and S3 volumes."""

__version__ = "0.1.0"

#: The driver name users pass to `docker volume create --driver`.
PLUGIN_NAME = "stowage"
