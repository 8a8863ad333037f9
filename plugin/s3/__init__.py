"""Everything that talks to S3: client construction and credentials, SigV4, the kept-alive
HTTP transport and the fast operations on it, one XML parser and one error scheme, dates,
the s3fs metadata codec, the fast-path fallback rule, and the object stores the copy engine
and the FUSE filesystem use. Nothing here imports from the rest of `plugin` but leaf
modules (`plugin.options`), so both the daemon and the FUSE process can use it.

Submodules are imported on demand: boto3, botocore and awscrt cost hundreds of ms to import,
and the FUSE mount goes live before any of them is loaded.
"""
