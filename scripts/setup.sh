#!/usr/bin/env bash
# Set up everything wsgate's commands need on a fresh Debian machine, idempotently:
# the virtualenv with the package and its dev tools, and the system binaries the
# tests and demo use (redis-server, redis-sentinel, haproxy, chromium; nginx and perf with --bench).
set -euo pipefail
cd "$(dirname "$0")/.."

want_bench=0
want_browser=1
for arg in "$@"; do
  case "$arg" in
    --bench) want_bench=1 ;;
    --no-browser) want_browser=0 ;;
    --minimal) want_browser=0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}

packages=()
# The relay is a C extension: it needs a compiler and Python's headers.
command -v cc >/dev/null || packages+=(gcc libc6-dev)
# make sanitize builds it with gcc's AddressSanitizer and UndefinedBehaviorSanitizer.
[ -e "$(gcc -print-file-name=libasan.so 2>/dev/null)" ] || packages+=(gcc)
"$PYTHON" - <<'PY' || packages+=(python3-dev)
import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
PY
command -v redis-server >/dev/null || packages+=(redis-server)
command -v redis-sentinel >/dev/null || packages+=(redis-sentinel)
# The edge tests put a real HAProxy in front of the gateway (PROXY protocol, X-Forwarded-For).
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || packages+=(haproxy)
if [ "$want_browser" = 1 ]; then
  command -v chromium >/dev/null || packages+=(chromium)
fi
if [ "$want_bench" = 1 ]; then
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || packages+=(nginx)
  command -v perf >/dev/null || packages+=(linux-perf)  # bench.cost counts instructions
  command -v valgrind >/dev/null || packages+=(valgrind)  # ...or, without counters, callgrind does
fi
if [ "${#packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${packages[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  else
    echo "setup: cannot install ${packages[*]} (needs root and apt-get); what needs them will fail or skip" >&2
  fi
fi

# The manifest tests render deploy/ with kubectl's kustomize; kubectl is not in
# Debian's packages (https://kubernetes.io/docs/tasks/tools/). Without it they skip.
command -v kubectl >/dev/null || echo "setup: kubectl not found: the deploy/ manifest tests will skip" >&2

stamp=.venv/.wsgate-installed
# Reinstall (and so recompile the C) when the package definition or the C sources change.
digest=$(cat pyproject.toml setup.py src/wsgate/gateway/*.c | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[dev]'
  echo "$digest" > "$stamp"
fi
