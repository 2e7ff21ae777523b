#!/usr/bin/env bash
# run-all.sh: the whole test suite from a fresh Debian 12 machine.
# Installs what is missing, builds, and runs `make check`: a normal build
# with -Werror, a build without libzstd under its compression test, a build
# with -fsanitize=address,undefined, then the daemon built with
# -fsanitize=thread under the tests that stress its threads.
# Needs root (FUSE mounts, test mounts of tmpfs, apt-get).
#   SKIP_ASAN=1 tests/run-all.sh    only the normal pass (and distcheck)
#   SKIP_DISTCHECK=1                 no make distcheck (the release tarball
#                                    built and its own make check run)
# The last line is always "N passed, N failed, N skipped", summed over the
# test-suite.log of every pass that ran (a pass that could not build or run
# its tests, and a ThreadSanitizer report, count as one failure each). The
# exit status is non-zero if anything failed or was skipped: a test that
# should run here and skips is a failure.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
contrib/install-deps.sh --tests
# FUSE over io_uring (uring.sh, and the suite's mounts, below) needs the
# fuse module's switch, off until someone turns it on.
uring_param=/sys/module/fuse/parameters/enable_uring
if [ -e "$uring_param" ] && ! grep -q '^[Y1]' "$uring_param"; then
	echo Y >"$uring_param" || echo "run-all: cannot turn on $uring_param" >&2
fi
# The daemon's default is /dev/fuse; the tests' mounts use the rings where
# the kernel has them (lib.sh, mount_fleece), but for the ASan pass below.
grep -q '^[Y1]' "$uring_param" 2>/dev/null && export FLEECE_URING=on
[ -x configure ] || autoreconf -fi >/dev/null
jobs=$(nproc)
# The shared kit (the VM the vm-guest test boots): configure and the tests
# reach it only through SHARED_DIR. Beside the sources by default; a clone
# elsewhere in this workplace finds it at its fixed place.
if [ -z "${SHARED_DIR:-}" ]; then
	for d in "$top/../shared" /work/shared; do
		[ -x "$d/vm/run-guest.sh" ] && { SHARED_DIR=$(cd "$d" && pwd); break; }
	done
fi
export SHARED_DIR=${SHARED_DIR:-$top/../shared}
# The VM test's kernel and initramfs, shared by both passes.
export FLEECE_VM_CACHE=${FLEECE_VM_CACHE:-$top/build-check/vm-cache}

passed=0 failed=0 skipped=0
notes=()   # failures no test-suite.log counts

# tally DIR: adds the counts of the test-suite.log that make check wrote in
# DIR (XFAIL counts as passed, XPASS and ERROR as failed).
tally() {
	local log=$1/test-suite.log key n
	[ -f "$log" ] || return 1
	for key in PASS XFAIL FAIL XPASS ERROR SKIP; do
		n=$(sed -n "s/^# $key: *\([0-9]*\).*/\1/p" "$log" | head -n 1)
		n=${n:-0}
		case $key in
		PASS|XFAIL) passed=$((passed + n)) ;;
		SKIP) skipped=$((skipped + n)) ;;
		*) failed=$((failed + n)) ;;
		esac
	done
}

# The summary, whatever ended the run.
summary() {
	local rc=$? note
	trap - EXIT
	if [ "$rc" != 0 ] && [ "$failed" = 0 ]; then
		failed=1
		notes+=("the run stopped early (status $rc)")
	fi
	for note in "${notes[@]}"; do echo "=== counted as a failure: $note"; done
	[ "$skipped" = 0 ] || echo "=== $skipped test(s) skipped: a test that should run here and skips is a failure"
	echo "$passed passed, $failed failed, $skipped skipped"
	[ "$failed" = 0 ] && [ "$skipped" = 0 ] && exit "$rc"
	exit 1
}
trap summary EXIT

pass() {  # NAME CONFIGURE-ARGS...
	local dir=$top/$1 name=$1
	shift
	mkdir -p "$dir"
	echo "=== $(basename "$dir"): configure $*"
	if ! (cd "$dir" && { [ -f Makefile ] || "$top/configure" -q "$@"; } && make -s -j"$jobs"); then
		failed=$((failed + 1))
		notes+=("$name: the build failed")
		return 1
	fi
	echo "=== $(basename "$dir"): make check"
	local only=() rc=0
	[ -n "${TESTS:-}" ] && only=(TESTS="$TESTS")
	# A log left by an earlier run must not be counted for this one.
	rm -f "$dir/test-suite.log"
	(cd "$dir" && make -s -j2 check "${only[@]}") || rc=$?
	if ! tally "$dir"; then
		failed=$((failed + 1))
		notes+=("$name: make check wrote no test-suite.log (status $rc)")
		return 1
	fi
	if [ "$rc" != 0 ]; then
		for log in "$dir"/tests/unit/*.log "$dir"/tests/functional/*.log; do
			grep -qE '^(FAIL|ERROR)' "$log" 2>/dev/null && { echo "--- $log"; tail -n 60 "$log"; }
		done
		return 1
	fi
}

TSAN_TESTS="tests/functional/backup-pit.sh tests/functional/mirror.sh tests/functional/job-control.sh tests/functional/transactions.sh tests/functional/stop-resume.sh tests/functional/shutdown.sh tests/functional/ctl-begin-commit.sh tests/functional/publication.sh tests/functional/qcow2-targets.sh tests/functional/qcow2-compress.sh tests/functional/uring.sh"
start=$(date +%s)
pass build-check --enable-werror
# A daemon built without libzstd refuses compress=zstd, saying why (the
# test checks either way).
TESTS=tests/functional/qcow2-compress.sh pass build-nozstd --enable-werror --without-zstd
if [ "${SKIP_ASAN:-0}" != 1 ]; then
	export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:halt_on_error=1
	export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
	# This pass serves through /dev/fuse (the other passes use the rings
	# where the kernel has them), so both transports see the whole suite.
	FLEECE_URING=off pass build-asan --enable-werror --enable-sanitizers=address
	# The daemon under ThreadSanitizer, driven by the tests that hammer its
	# threads (criterion itself cannot start under TSan, so no unit tests
	# here). Any report fails the pass.
	rm -f "$top"/build-tsan/tsan-report.*
	export TSAN_OPTIONS="halt_on_error=0 second_deadlock_stack=1 log_path=$top/build-tsan/tsan-report"
	TESTS="$TSAN_TESTS" pass build-tsan --enable-werror --enable-sanitizers=thread
	if ls "$top"/build-tsan/tsan-report.* >/dev/null 2>&1; then
		cat "$top"/build-tsan/tsan-report.*
		echo "=== ThreadSanitizer reported the above"
		failed=$((failed + 1))
		notes+=("build-tsan: ThreadSanitizer reports")
		exit 1
	fi
fi
# The release tarball carries everything its own make check needs.
if [ "${SKIP_DISTCHECK:-0}" != 1 ]; then
	echo "=== build-check: make distcheck"
	unset TSAN_OPTIONS
	# The tarball's own make check: every unit test, and the functional
	# tests that need each helper file the tarball must carry (lib.sh,
	# pit_writers.py, manifest_check.py, pattern_rounds.py and the VM kit's
	# use, make install). The whole functional suite already ran above
	# (normal and ASan builds); a third run from the tarball would take
	# five minutes of the 20-minute budget and prove nothing more.
	dist_tests=$(printf 'print-tests:\n\t@echo $(TESTS)\n' |
		make -s -C "$top/build-check" -f Makefile -f - print-tests | tr ' ' '\n' | grep '^tests/unit/' | tr '\n' ' ')
	dist_tests+="tests/functional/backup-basic.sh tests/functional/backup-pit.sh tests/functional/install.sh"
	dist_tests+=" tests/functional/fleecectl.sh tests/functional/nbd-targets.sh tests/functional/vm-guest.sh"
	[ -n "$dist_tests" ] || { echo "run-all: no test list for distcheck" >&2; exit 1; }
	if (cd "$top/build-check" && make -s -j"$jobs" distcheck TESTS="$dist_tests" >"$top/build-check/distcheck.log" 2>&1); then
		passed=$((passed + 1))
	else
		tail -n 60 "$top/build-check/distcheck.log"
		failed=$((failed + 1))
		notes+=("make distcheck failed (build-check/distcheck.log)")
	fi
fi
if [ "$failed" = 0 ] && [ "$skipped" = 0 ]; then
	echo "=== all tests passed in $(( $(date +%s) - start ))s"
else
	echo "=== finished in $(( $(date +%s) - start ))s, not all passed"
fi
