# Root filesystem of the managed (v2) plugin. The build context must hold `wheelhouse/` with
# stowage's wheel and its dependencies, built on the host: pip inside a build has no index.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 \
    && rm -rf /var/lib/apt/lists/* \
    && echo user_allow_other >> /etc/fuse.conf

COPY wheelhouse /tmp/wheelhouse
RUN python3 -m pip install --no-index --find-links /tmp/wheelhouse stowage \
    && rm -rf /tmp/wheelhouse

# /run/docker/plugins is mandatory in a plugin's rootfs; /mnt/volumes is the PropagatedMount.
RUN mkdir -p /run/docker/plugins /mnt/volumes /var/lib/stowage

ENTRYPOINT ["stowage", "serve"]
