#!/usr/bin/env bash
# run-all.sh: the whole test suite from a fresh Debian 12 machine.
# Installs what is missing, builds, and runs `make check`: a normal build
# with -Werror, then a build with -fsanitize=address,undefined, then the unit
# tests of the threaded code under -fsanitize=thread.
# Needs root (FUSE mounts, test mounts of tmpfs, apt-get).
#   SKIP_ASAN=1 tests/run-all.sh    only the normal pass
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
contrib/install-deps.sh --tests
[ -x configure ] || autoreconf -fi >/dev/null
jobs=$(nproc)
# The VM test's kernel and initramfs, shared by both passes.
export FLEECE_VM_CACHE=${FLEECE_VM_CACHE:-$top/build-check/vm-cache}

pass() {  # NAME CONFIGURE-ARGS...
	local dir=$top/$1
	shift
	mkdir -p "$dir"
	echo "=== $(basename "$dir"): configure $*"
	(cd "$dir" && { [ -f Makefile ] || "$top/configure" -q "$@"; } && make -s -j"$jobs") || return 1
	echo "=== $(basename "$dir"): make check"
	local only=()
	[ -n "${TESTS:-}" ] && only=(TESTS="$TESTS")
	if ! (cd "$dir" && make -s -j2 check "${only[@]}"); then
		for log in "$dir"/tests/unit/*.log "$dir"/tests/functional/*.log; do
			grep -qE '^(FAIL|ERROR)' "$log" 2>/dev/null && { echo "--- $log"; tail -n 60 "$log"; }
		done
		return 1
	fi
}

UNIT_TESTS="tests/unit/control_test tests/unit/cbitmap_test tests/unit/inflight_test tests/unit/gate_test tests/unit/util_test"
start=$(date +%s)
pass build-check --enable-werror
if [ "${SKIP_ASAN:-0}" != 1 ]; then
	export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:halt_on_error=1
	export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
	pass build-asan --enable-werror --enable-sanitizers=address
	# The threaded building blocks (claims, gate, bitmaps) under
	# ThreadSanitizer: their unit tests hammer them from many threads.
	export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
	TESTS="$UNIT_TESTS" pass build-tsan --enable-werror --enable-sanitizers=thread
fi
echo "=== all tests passed in $(( $(date +%s) - start ))s"
