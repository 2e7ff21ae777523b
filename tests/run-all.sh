#!/usr/bin/env bash
# run-all.sh: the whole test suite from a fresh Debian 12 machine.
# Installs what is missing, builds, and runs `make check`: a normal build
# with -Werror, then a build with -fsanitize=address,undefined, then the
# daemon built with -fsanitize=thread under the tests that stress its threads.
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

TSAN_TESTS="tests/functional/backup-pit.sh tests/functional/job-control.sh tests/functional/transactions.sh tests/functional/stop-resume.sh tests/functional/shutdown.sh"
start=$(date +%s)
pass build-check --enable-werror
if [ "${SKIP_ASAN:-0}" != 1 ]; then
	export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:halt_on_error=1
	export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
	pass build-asan --enable-werror --enable-sanitizers=address
	# The daemon under ThreadSanitizer, driven by the tests that hammer its
	# threads (criterion itself cannot start under TSan, so no unit tests
	# here). Any report fails the pass.
	rm -f "$top"/build-tsan/tsan-report.*
	export TSAN_OPTIONS="halt_on_error=0 second_deadlock_stack=1 log_path=$top/build-tsan/tsan-report"
	TESTS="$TSAN_TESTS" pass build-tsan --enable-werror --enable-sanitizers=thread
	if ls "$top"/build-tsan/tsan-report.* >/dev/null 2>&1; then
		cat "$top"/build-tsan/tsan-report.*
		echo "=== ThreadSanitizer reported the above"
		exit 1
	fi
fi
echo "=== all tests passed in $(( $(date +%s) - start ))s"
