#!/usr/bin/env bash
# `make sanitize`: the C (the relay, the batch accept, the heads) built with AddressSanitizer and
# UndefinedBehaviorSanitizer, warnings as errors, in a copy of the package; then
# the tests that go through it, against that copy, bounded in time.
#
# Python itself is not instrumented, so the ASan runtime is preloaded. Leak detection is
# off: at exit CPython leaves much of its own memory allocated on purpose, and
# those reports would drown anything of ours (the relay's own lifetime is tested
# by tests/integration/test_relay.py). Any other report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
CC=${CC:-gcc}
libasan=$("$CC" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
  echo "sanitize: $CC has no AddressSanitizer runtime (libasan.so); run ./scripts/setup.sh" >&2
  exit 2
fi

work=$(mktemp -d -t wsgate-sanitize.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r src "$work/src"
find "$work/src" -name '*.so' -delete
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1 -Werror"
CC="$CC" CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
  "$PY" setup.py -q build_ext --build-lib "$work/lib" --build-temp "$work/build"
cp "$work"/lib/wsgate/gateway/_*.so "$work/src/wsgate/gateway/"

export PYTHONPATH="$work/src" LD_PRELOAD="$libasan"
export ASAN_OPTIONS="detect_leaks=0:malloc_context_size=5:abort_on_error=1:log_path=$work/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/ubsan"
# The tests must import the instrumented build, not the one in src/.
"$PY" -c 'import sys, wsgate.gateway._relay as r, wsgate.gateway._accept as a, wsgate.gateway._heads as h
sys.exit(not all(m.__file__.startswith(sys.argv[1]) for m in (r, a, h)))' "$work/src"

status=0
run() {  # run SECONDS PYTEST-ARGS...: one bounded pytest run; remember the first failure
  local seconds=$1 code=0
  shift
  timeout "$seconds" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "$@" || code=$?
  if [ "$code" = 124 ]; then
    echo "sanitize: pytest $* did not finish within ${seconds}s" >&2
  fi
  if [ "$status" = 0 ]; then
    status=$code
  fi
}
# The relay, the frame tracker, the batch accept and the heads in this process.
# PYTHONMALLOC=malloc puts every Python object (the relay's links too) under ASan's eye.
PYTHONMALLOC=malloc run 240 tests/integration/test_relay.py tests/integration/test_accept.py \
  tests/unit/test_frames.py tests/integration/test_spare_descriptors.py \
  tests/unit/test_plain_heads.py tests/unit/test_arrival.py
# The data plane: each gateway these tests start inherits this environment, so
# it runs the same build. Python's own allocator here: a process under ASan with
# PYTHONMALLOC=malloc takes twice as long to start, and these tests start many.
# The dialed upgrades' every answer (test_dialed_upgrades) goes through the same build.
run 420 tests/integration/test_gateway_relay.py tests/integration/test_slot_endings.py \
  tests/integration/test_dialed_upgrades.py \
  -k "every_size or fragmented or many_sessions or stream_both_ways or open_files_limit \
      or backend_close_code or backend_closing or mid_response or stop_frees \
      or dialed_upgrades"

if compgen -G "$work/asan*" >/dev/null || compgen -G "$work/ubsan*" >/dev/null; then
  cat "$work"/asan* "$work"/ubsan* >&2 2>/dev/null || true
  echo "sanitize: the sanitizers reported the errors above" >&2
  exit 1
fi
exit "$status"
