"""S3 FUSE filesystem: `python -m plugin.fusefs` mounts one bucket prefix (one process per mount,
because pyfuse3 keeps a single session per process)."""
