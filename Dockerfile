# Berth: one image for the controller and the node plugin of every backend.
#
#   scripts/build-image                       wheels, then the image (base: debootstrapped Debian 12)
#   pip wheel . -w build/wheels && \
#     podman build --build-arg BASE=docker.io/library/debian:bookworm-slim -t berth .
#
# Debian's own python3 runs the driver, since Ceph's bindings (python3-rbd, python3-rados) exist
# only for it; the driver and its PyPI dependencies live in a venv that sees the system packages.
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
# The driver's wheel and its dependencies' wheels, made beforehand by scripts/build-image
# (`pip wheel . -w build/wheels`): the build itself needs no package index, only Debian's mirror.
COPY build/wheels /wheels
RUN python3 -m venv --system-site-packages /opt/berth \
 && /opt/berth/bin/pip install --no-cache-dir --no-compile --no-index --find-links /wheels \
      berth-csi \
 && /opt/berth/bin/pip uninstall -y -q pip setuptools \
 && find /opt/berth -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="berth" \
      org.opencontainers.image.description="Berth: a Kubernetes CSI driver (hostPath, NFS, Ceph RBD)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The node tools each backend needs: util-linux (mount, losetup, blkid, fsfreeze), mkfs and grow
# for ext4/xfs, ceph-common (rbd map, mount.ceph), rbd-nbd, rbd-fuse and ceph-fuse (+ fuse3 to
# unmount them), libnfs13 for the NFS controller, python3-rbd/rados for the RBD and CephFS
# controllers. No compilers, no apt lists.
# Documentation, manuals and translations are left out (licences stay), as in Debian's slim images.
# hadolint ignore=DL3008
RUN printf '%s\n' 'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
      'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*' \
      'path-exclude=/usr/share/locale/*' > /etc/dpkg/dpkg.cfg.d/berth-slim \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-rbd python3-rados util-linux mount e2fsprogs xfsprogs \
      ceph-common rbd-nbd rbd-fuse ceph-fuse fuse3 libnfs13 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/apt \
      /var/log/dpkg.log \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin berth
COPY --from=build /opt/berth /opt/berth
ENV PATH=/opt/berth/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The controller of a shared backend (NFS through libnfs, RBD through librbd) needs no
# privilege; the node plugin and hostPath run as root (the chart sets runAsUser: 0 there).
USER 10001
ENTRYPOINT ["csi-driver"]
