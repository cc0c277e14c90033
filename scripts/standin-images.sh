#!/usr/bin/env bash
# Stand-in base images for an air-gapped Docker host: built from Debian packages, no registry.
#
#   sudo scripts/standin-images.sh            # builds the three images below (~4 min)
#   DOCKER_HOST=unix:///path/docker.sock scripts/standin-images.sh
#
# Where registry images cannot be pulled, `docker compose up` has nothing to build on. This
# script debootstraps Debian bookworm (minbase) once and imports three images from it:
#
#   opd-standin/python:3.11      for deploy/Dockerfile's PYTHON_IMAGE (python:3.11-slim):
#                                Debian's python3 (3.11) + pip, `python` on PATH, pip allowed
#                                to install into the system interpreter (as in python:*-slim)
#   opd-standin/redis:7          for OPD_REDIS_IMAGE (redis:7.4): Debian's redis-server 7.0,
#                                WORKDIR /data like the official image
#   opd-standin/prometheus:2     for OPD_PROMETHEUS_IMAGE (prom/prometheus:v3.1.0): Debian's
#                                prometheus 2.x, ENTRYPOINT /usr/bin/prometheus
#
# Grafana has no Debian package: there is no stand-in (scripts/compose-e2e.sh checks the
# dashboard's queries against the real Prometheus instead). Needs root (debootstrap, chroot),
# debootstrap and a Docker engine. The Debian mirror is DEBIAN_MIRROR, else the host's own apt
# source, else debootstrap's default. Existing images are kept unless FORCE=1.
set -euo pipefail

PYTHON_TAG=${PYTHON_TAG:-opd-standin/python:3.11}
REDIS_TAG=${REDIS_TAG:-opd-standin/redis:7}
PROMETHEUS_TAG=${PROMETHEUS_TAG:-opd-standin/prometheus:2}
WORK=${STANDIN_WORK:-$(mktemp -d)}
trap 'rm -rf "$WORK"' EXIT

host_mirror() {  # the first Debian URI the host's apt uses (deb822 or one-line format)
  local f
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [ -r "$f" ] || continue
    awk '/^URIs:/ {print $2; exit} /^deb / && $0 !~ /security/ {print $2; exit}' "$f"
    return
  done
}

have_image() { [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

build_base() {  # debootstrap once; every image starts from a copy
  local mirror=${DEBIAN_MIRROR:-$(host_mirror)}
  echo "debootstrap bookworm (minbase) from ${mirror:-the default mirror of debootstrap}" >&2
  debootstrap --variant=minbase --include=ca-certificates bookworm "$WORK/base" ${mirror:+"$mirror"} >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  # Package scripts must not try to start services inside the chroot.
  printf '#!/bin/sh\nexit 101\n' >"$WORK/base/usr/sbin/policy-rc.d"
  chmod +x "$WORK/base/usr/sbin/policy-rc.d"
}

install_into() {  # install_into DIR PACKAGE...: apt inside a chroot copy of the base
  local root=$1; shift
  cp -a "$WORK/base" "$root"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  chroot "$root" apt-get update -qq >>"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends "$@" \
    >>"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; exit 1; }
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d"
  : >"$root/etc/resolv.conf"
}

import_image() {  # import_image DIR TAG CHANGE...: the directory as a one-layer image
  local root=$1 tag=$2; shift 2
  local changes=()
  for c in "$@"; do changes+=(--change "$c"); done
  tar -C "$root" -c . | docker import "${changes[@]}" - "$tag" >/dev/null
  local bytes
  bytes=$(docker image inspect -f '{{.Size}}' "$tag")
  echo "built $tag: $((bytes / 1000000)) MB" >&2
}

main() {
  if have_image "$PYTHON_TAG" && have_image "$REDIS_TAG" && have_image "$PROMETHEUS_TAG"; then
    echo "stand-in images present: $PYTHON_TAG $REDIS_TAG $PROMETHEUS_TAG" >&2
    return
  fi
  build_base
  install_into "$WORK/python" python3 python3-pip python-is-python3
  # python:*-slim lets pip install into the system interpreter; Debian forbids it (PEP 668).
  rm -f "$WORK"/python/usr/lib/python3*/EXTERNALLY-MANAGED
  import_image "$WORK/python" "$PYTHON_TAG" 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin' \
    'ENV LANG=C.UTF-8' 'CMD ["python3"]'
  install_into "$WORK/redis" redis-server
  mkdir -p "$WORK/redis/data"
  import_image "$WORK/redis" "$REDIS_TAG" 'WORKDIR /data' 'EXPOSE 6379' 'CMD ["redis-server"]'
  install_into "$WORK/prometheus" prometheus
  mkdir -p "$WORK/prometheus/prometheus"
  import_image "$WORK/prometheus" "$PROMETHEUS_TAG" 'ENTRYPOINT ["/usr/bin/prometheus"]' 'EXPOSE 9090' \
    'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
}

main "$@"
