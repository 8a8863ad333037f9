# Root filesystem of the managed (v2) plugin; `scripts/build-plugin` builds it, exports it and
# runs `docker plugin create` with config.json. The build context must hold `wheelhouse/`:
# stowage's wheel and its dependencies' (pyfuse3 compiled for cp311 against libfuse3), built on
# the host, because pip inside a build has no index to reach.
#
# The base is any Debian bookworm image with Python 3.11: python:3.11-slim-bookworm, or the
# debootstrap one build-plugin makes where no image registry is reachable (python3,
# python3-venv and fuse3 already in it).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# fuse3 brings libfuse3-3 (pyfuse3 links against it) and fusermount3. Skipped when the base
# has it already, so that build needs no network. Needs `docker build --network host` where
# the build's default network has no route out.
RUN if ! dpkg-query -W -f='${Status}' fuse3 2>/dev/null | grep -q "install ok installed"; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fuse3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && if ! grep -qx user_allow_other /etc/fuse.conf; then \
        echo user_allow_other >> /etc/fuse.conf; \
    fi

# A virtualenv, always: Debian's own python3 refuses pip installs into the system (PEP 668),
# and one layout for every base keeps config.json's entrypoint (/opt/stowage/bin/stowage)
# valid. Absolute paths matter: a plugin's PATH is Docker's default, not this image's ENV.
# Then the directories a plugin needs: /run/docker/plugins is mandatory in its rootfs (dockerd
# binds the socket directory there), /mnt/volumes is the PropagatedMount and /var/lib/stowage
# receives the `state` mount. One RUN: every layer costs a commit in a fresh daemon.
COPY wheelhouse /tmp/wheelhouse
RUN python3 -m venv /opt/stowage \
    && /opt/stowage/bin/pip install --no-cache-dir --no-index --disable-pip-version-check \
        --find-links /tmp/wheelhouse stowage \
    && rm -rf /tmp/wheelhouse \
    && ln -sf /opt/stowage/bin/stowage /usr/local/bin/stowage \
    && /opt/stowage/bin/python -c "import pyfuse3, plugin.cli" \
    && mkdir -p /run/docker/plugins /mnt/volumes /var/lib/stowage
ENV PATH=/opt/stowage/bin:$PATH

ENTRYPOINT ["/opt/stowage/bin/stowage", "serve", "--socket", "/run/docker/plugins/stowage.sock", \
            "--root", "/var/lib/stowage", "--mount-root", "/mnt/volumes"]
