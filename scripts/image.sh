#!/usr/bin/env bash
# Build wsgate's container image with podman, offline from any package index.
#
#   scripts/image.sh wheelhouse      the Python dependencies as wheels, built by the host's pip
#   scripts/image.sh base [NAME]     a Debian bookworm base image made locally with mmdebstrap
#   scripts/image.sh image           the image (BASE=..., IMAGE=... in the environment)
#
# The wheelhouse (.cache/wheelhouse) and the base's tarball ($XDG_CACHE_HOME/wsgate)
# are kept between runs and rebuilt when what they are made from changes.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-docker.io/library/python:3.11-slim-bookworm}
IMAGE=${IMAGE:-localhost/wsgate:dev}
PYTHON=${PYTHON:-python3}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/wsgate
# Explicit limits and runc: podman's defaults (and crun) fail where the container
# may not raise its own limits.
PODMAN_RUN_FLAGS=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=1024:1024)

need_tools() {
  local packages=()
  command -v podman >/dev/null || packages+=(podman)
  command -v buildah >/dev/null || packages+=(buildah)
  command -v runc >/dev/null || [ -x /usr/sbin/runc ] || packages+=(runc)
  command -v catatonit >/dev/null || packages+=(catatonit)  # podman's pods need it (kube play)
  for tool in "$@"; do
    command -v "$tool" >/dev/null || packages+=("$tool")
  done
  [ "${#packages[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "image: installing ${packages[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  else
    echo "image: ${packages[*]} missing (install them, or run as root to have them installed)" >&2
    exit 2
  fi
}

wheelhouse() {
  local dir=.cache/wheelhouse stamp digest
  stamp=$dir/.digest
  digest=$( (cat pyproject.toml "$0"; "$PYTHON" -VV) | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ]; then
    return 0
  fi
  echo "image: building the wheelhouse with $("$PYTHON" -V)"
  rm -rf "$dir"
  mkdir -p "$dir/run" "$dir/build"
  local venv=.cache/wheel-tools
  [ -x "$venv/bin/pip" ] || "$PYTHON" -m venv "$venv"
  # The dependencies of the package (its own wheel is built in the image), and
  # what building that wheel needs.
  # async-timeout: redis needs it on Python < 3.11.3 (Debian bookworm has 3.11.2),
  # which a newer host's pip would leave out.
  "$venv/bin/pip" wheel --quiet --wheel-dir "$dir/run" . 'async-timeout>=4.0.3'
  rm -f "$dir"/run/wsgate-*.whl
  "$venv/bin/pip" wheel --quiet --wheel-dir "$dir/build" 'setuptools>=68' wheel
  "$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")' > "$dir/python-tag"
  echo "$digest" > "$stamp"
}

base() {
  local name=${1:-localhost/wsgate-base:bookworm} tarball=$CACHE/base-bookworm.tar
  need_tools mmdebstrap
  if podman image exists "$name"; then
    return 0
  fi
  mkdir -p "$CACHE"
  if [ ! -f "$tarball" ] || [ ! -s "$tarball" ]; then
    echo "image: making a bookworm base with mmdebstrap (a minute or two)"
    # The format is named: mmdebstrap guesses it from the name's ending, and
    # some versions take "base-bookworm.tar.part" for a directory to fill.
    rm -rf "$tarball" "$tarball.part"
    mmdebstrap --quiet --format=tar --variant=minbase \
      --include=python3,python3-venv,ca-certificates bookworm "$tarball.part"
    mv "$tarball.part" "$tarball"
  fi
  podman import --quiet "$tarball" "$name" >/dev/null
  echo "image: $name imported from $tarball"
}

image() {
  need_tools
  wheelhouse
  podman build "${PODMAN_RUN_FLAGS[@]}" --build-arg "BASE=$BASE" --tag "$IMAGE" \
    --file Containerfile .
}

case "${1:-image}" in
  wheelhouse) wheelhouse ;;
  base) base "${2:-}" ;;
  image) image ;;
  *) echo "image.sh: unknown command $1 (wheelhouse, base, image)" >&2; exit 2 ;;
esac
