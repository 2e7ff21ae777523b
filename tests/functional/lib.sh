# lib.sh: sourced by every functional test. Each test gets its own temporary
# directory, mounts fleecefs there, and on exit (success, failure or signal)
# unmounts and kills what it started, by PID, then removes the directory.
set -euo pipefail

: "${FLEECEFS:?FLEECEFS must point at the fleecefs binary (run through make check)}"
: "${TESTS_DIR:=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
export TESTS_DIR

if [ ! -w /dev/fuse ] || ! command -v fusermount3 >/dev/null; then
	echo "SKIP: /dev/fuse or fusermount3 not usable here"
	exit 77
fi

T=$(mktemp -d "${TMPDIR:-/tmp}/fleecefs-test.XXXXXX")
SRC=$T/src MNT=$T/mnt OUT=$T/out
mkdir -p "$SRC" "$MNT" "$OUT"
DAEMON_PID=
BG_PIDS=()
EXTRA_MOUNTS=()   # other mounts a test made inside $T, unmounted on exit

log() { printf '%s: %s\n' "$(basename "$0")" "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
	local rc=$? p
	trap - EXIT
	if [ -n "${WATCHDOG_PID:-}" ]; then
		pkill -P "$WATCHDOG_PID" 2>/dev/null || true
		kill "$WATCHDOG_PID" 2>/dev/null || true
	fi
	# (SIGCONT too: a writer the test had stopped would not die of SIGTERM.)
	for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null && kill -CONT "$p" 2>/dev/null || true; done
	for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	# (A mount whose daemon died is no "mountpoint" any more, but it is in
	# /proc/mounts.)
	if mountpoint -q "$MNT" 2>/dev/null || grep -q " $MNT fuse" /proc/mounts; then
		fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null || true
	fi
	if [ -n "$DAEMON_PID" ]; then
		for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$DAEMON_PID" 2>/dev/null || true
		wait "$DAEMON_PID" 2>/dev/null || true
	fi
	for p in "${EXTRA_MOUNTS[@]}"; do umount "$p" 2>/dev/null || umount -l "$p" 2>/dev/null || true; done
	if [ "$rc" != 0 ] && [ -s "$T/daemon.log" ]; then
		echo "--- daemon log (last 40 lines) ---" >&2
		tail -n 40 "$T/daemon.log" >&2
	fi
	rm -rf "$T"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A watchdog: a test that hangs (a daemon that stopped answering leaves the
# test blocked in a FUSE request) fails after TEST_TIMEOUT seconds instead of
# holding up the suite. What it started dies first (anything whose command
# line names this test's directory), so the blocked request returns.
TEST_TIMEOUT=${TEST_TIMEOUT:-600}
(
	trap - EXIT
	sleep "$TEST_TIMEOUT" &
	wait $!
	echo "FAIL: $(basename "$0") timed out after ${TEST_TIMEOUT}s" >&2
	pkill -9 -f -- "$T/" 2>/dev/null
	fusermount3 -uz "$MNT" 2>/dev/null
	kill -TERM $$ 2>/dev/null
) </dev/null >&2 &
WATCHDOG_PID=$!

# mount_fleece [fleecefs options...]: mounts $SRC at $MNT in the foreground
# process $DAEMON_PID and waits until the control directory answers.
# FLEECE_URING=on|off|auto, when set, is added unless the test gives its own
# uring=: tests/run-all.sh runs one pass of the suite over each transport.
mount_fleece() {
	local transport=()
	[ -n "${FLEECE_URING:-}" ] && [[ "$*" != *uring=* ]] && transport=(-o "uring=$FLEECE_URING")
	"$FLEECEFS" -f "${transport[@]}" "$@" "$SRC" "$MNT" 2>>"$T/daemon.log" &
	DAEMON_PID=$!
	for _ in $(seq 100); do
		[ -e "$MNT/.fleece/version" ] && return 0
		kill -0 "$DAEMON_PID" 2>/dev/null || fail "fleecefs exited at mount: $(tail -3 "$T/daemon.log")"
		sleep 0.05
	done
	fail "fleecefs did not come up"
}

# unmount_fleece: unmounts and waits for the daemon; its exit status in $DAEMON_RC.
unmount_fleece() {
	fusermount3 -u "$MNT"
	DAEMON_RC=0
	wait "$DAEMON_PID" || DAEMON_RC=$?
	DAEMON_PID=
}

# term_daemon: SIGTERM for the daemon, which must be gone within 10 s; its
# exit status in $DAEMON_RC.
term_daemon() {
	kill -TERM "$DAEMON_PID"
	for _ in $(seq 200); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.05; done
	kill -0 "$DAEMON_PID" 2>/dev/null && fail "fleecefs still running 10 s after SIGTERM"
	DAEMON_RC=0
	wait "$DAEMON_PID" || DAEMON_RC=$?
	DAEMON_PID=
}

# kill_daemon: SIGKILL for the daemon (a crash), its mount detached.
kill_daemon() {
	kill -9 "$DAEMON_PID"
	wait "$DAEMON_PID" 2>/dev/null || true
	DAEMON_PID=
	fusermount3 -uz "$MNT" 2>/dev/null || true
}

# ctl COMMAND...: one write to .fleece/ctl (one transaction; pass several
# lines in one argument). Prints the answer read back; returns 0 iff the
# write succeeded. CTL_ERRNO holds the errno name the write failed with.
ctl() {
	python3 - "$MNT/.fleece/ctl" "$*" <<'PY'
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
rc = 0
try:
    os.write(fd, (sys.argv[2] + "\n").encode())
except OSError as e:
    rc = 1
    sys.stderr.write(errno.errorcode.get(e.errno, str(e.errno)) + "\n")
print(os.read(fd, 65536).decode(), end="")
sys.exit(rc)
PY
}

# ctl_expect ERRNO COMMAND...: the write must fail with ERRNO (e.g. EINVAL);
# prints the answer.
ctl_expect() {
	local want=$1 out err
	shift
	if out=$(ctl "$@" 2>"$T/ctl.err"); then
		fail "'$*' succeeded ($out), expected $want"
	fi
	err=$(cat "$T/ctl.err")
	[ "$err" = "$want" ] || fail "'$*' failed with $err, expected $want ($out)"
	case $out in "error: "*) ;; *) fail "'$*': answer '$out' is not 'error: ...'";; esac
	[ "$(printf '%s' "$out" | wc -l)" -le 1 ] || fail "'$*': answer is more than one line: $out"
	printf '%s\n' "$out"
}

# refused ERRNO REGEX COMMAND: the write fails with ERRNO, its message matches
# REGEX, and nothing is left: no file in $OUT that was not there, no job "bad".
refused() {
	local before out
	before=$(ls -A "$OUT")
	out=$(ctl_expect "$1" "$3")
	want_match "'$3' message" "$out" "$2"
	want_eq "'$3' left files" "$(ls -A "$OUT")" "$before"
	[ ! -e "$MNT/.fleece/jobs/bad" ] || fail "'$3' left a job"
}

# qinfo FILE EXPR: a field of qemu-img info's JSON, e.g. "['virtual-size']".
qinfo() { qemu-img info --output=json "$1" | "$PY" -c "import json, sys; print(json.load(sys.stdin)$2)"; }
# qcow2_clean FILE: qemu-img check finds no errors and no leaks.
qcow2_clean() {
	local out
	out=$(qemu-img check -f qcow2 "$1" 2>&1) || fail "qemu-img check $1: $out"
	grep -q "No errors were found" <<<"$out" || fail "qemu-img check $1: $out"
}

# verify_rc WANT FILE [REGEX]: fleecectl verify FILE exits WANT and what it
# prints (stdout and stderr, also left in $VERIFY_OUT) matches REGEX.
verify_rc() {
	local rc=0
	: "${FLEECECTL:?FLEECECTL must point at the fleecectl binary (run through make check)}"
	"$FLEECECTL" verify "$2" >"$T/verify.out" 2>&1 || rc=$?
	VERIFY_OUT=$(cat "$T/verify.out")
	[ "$rc" = "$1" ] || fail "fleecectl verify $2: exit $rc, want $1: $VERIFY_OUT"
	[ -z "${3:-}" ] || want_match "fleecectl verify $2" "$VERIFY_OUT" "$3"
}
# verify_ok FILE: FILE and every element of its chain verify clean.
verify_ok() { verify_rc 0 "$1" "^$1: ok: "; }

# vm_kit: the VM kit ($SHARED_DIR/vm; configure SHARED_DIR=..., default
# ../shared beside the sources; tests/run-all.sh finds it for a clone
# elsewhere), set up in this test's directory unless the caller shares a
# cache. Sets RUN_GUEST and PATTERN (the guest's pattern tool, for the host).
vm_kit() {
	RUN_GUEST=${SHARED_DIR:-/nonexistent}/vm/run-guest.sh
	if [ ! -x "$RUN_GUEST" ]; then
		echo "SKIP: the VM kit was not found at ${SHARED_DIR:-(SHARED_DIR unset)}/vm/run-guest.sh" \
			"(configure SHARED_DIR=DIR to point at it)"
		exit 77
	fi
	command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 is needed (apt-get install qemu-system-x86)"
	export FLEECE_VM_CACHE=${FLEECE_VM_CACHE:-$T/vm-cache}
	# The VM tests run in parallel and share the cache; the kit's setup
	# rebuilds it in place, so one at a time.
	mkdir -p "$(dirname "$FLEECE_VM_CACHE")"
	flock "$FLEECE_VM_CACHE.lock" "$SHARED_DIR/vm/setup.sh" "$FLEECE_VM_CACHE" >/dev/null 2>&1 ||
		fail "VM kit setup failed"
	PATTERN=$FLEECE_VM_CACHE/root/bin/pattern
}

# guest_rounds IMAGE SIZE ROUNDS [RUN_GUEST ARGS...]: the host writes round 1
# of the kit's pattern over IMAGE (in $SRC), then a VM booted on $MNT/IMAGE
# rewrites its disk in rounds 2..ROUNDS, one 64 KiB write at a time in order,
# and verifies the last; it runs in the background (GUEST, output in
# $T/guest.out, "guest-done" at the end).
guest_rounds() {
	local image=$1 size=$2 rounds=$3
	truncate -s "$size" "$SRC/$image"
	"$PATTERN" write "$SRC/$image" 1 0 "$size" || fail "host pattern write"
	cat > "$T/guest.sh" <<G
for s in \$(seq 2 $rounds); do pattern write /dev/vda \$s 0 $size || exit 2; done
pattern verify /dev/vda $rounds 0 $size || exit 3
echo guest-done
G
}
guest_rounds_start() {
	"$RUN_GUEST" "$MNT/$1" "$T/guest.sh" --timeout 240 "${@:2}" > "$T/guest.out" 2>&1 &
	GUEST=$!
	BG_PIDS+=("$GUEST")
}

# status ID KEY: one key of a job's status.
status() { sed -n "s/^$2=//p" "$MNT/.fleece/jobs/$1/status"; }

# wait_job ID [TIMEOUT_S]: waits until the job concluded; prints its state.
wait_job() {
	local id=$1 limit=${2:-120} s
	for _ in $(seq $((limit * 20))); do
		s=$(status "$id" state)
		case $s in completed|failed|cancelled) echo "$s"; return 0;; esac
		sleep 0.05
	done
	fail "job $id did not conclude in ${limit}s (state $s)"
}

# wait_state ID STATE [TIMEOUT_S]: waits until the job is in STATE (fails if
# it concludes otherwise).
wait_state() {
	local s
	for _ in $(seq $((${3:-60} * 20))); do
		s=$(status "$1" state)
		[ "$s" = "$2" ] && return 0
		case $s in completed|failed|cancelled) fail "job $1 is $s, not $2: $(status "$1" error)";; esac
		sleep 0.05
	done
	fail "job $1 did not become $2 in ${3:-60}s (state $s, dirty $(status "$1" dirty_bytes))"
}
sha() { sha256sum "$1" | cut -d' ' -f1; }

# hidden_files DIR: the hidden files fleecefs writes targets, manifests and
# journals under while a job runs (.NAME.fleecefs-PID-SERIAL.tmp|journal).
hidden_files() { find "$1" -maxdepth 1 -name '.*.fleecefs-*' -printf '%f\n' | sort | tr '\n' ' '; }

# bmkey IMAGE NAME KEY: one key of a bitmap's status.
bmkey() { sed -n "s/^$3=//p" "$MNT/.fleece/bitmaps/$1/$2"; }
dirty() { bmkey "$1" "$2" dirty_bytes; }
# want_eq WHAT GOT WANT
want_eq() { [ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"; }
# want_match WHAT TEXT REGEX (grep -E, case-insensitive)
want_match() { grep -qiE -- "$3" <<<"$2" || fail "$1: '$2' does not match /$3/"; }
# start ID COMMAND: one write that must start exactly job ID.
start() {
	local out
	out=$(ctl "$2") || fail "'$2' refused: $out"
	[ "$out" = "ok id=$1" ] || fail "'$2': answer '$out', want 'ok id=$1'"
}
# run_ok ID COMMAND: starts the job and waits until it completed.
run_ok() {
	local s
	start "$1" "$2"
	s=$(wait_job "$1" 60)
	[ "$s" = completed ] || fail "job $1 $s: $(status "$1" error)"
}
# same WHAT A B: byte-identical files; names the differing clusters (of
# $CS bytes, default 64 KiB) if not.
same() {
	cmp -s "$2" "$3" && return 0
	fail "$1: $2 and $3 differ in clusters $("$PY" - "$2" "$3" "${CS:-65536}" <<'PY'
import sys
a, b, cs = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read(), int(sys.argv[3])
d = [c for c in range(max(len(a), len(b)) // cs + 1) if a[c * cs:(c + 1) * cs] != b[c * cs:(c + 1) * cs]]
print(len(d), d[:20], "sizes", len(a), len(b))
PY
)"
}
# manifest_ok TARGET [WHAT [STATE]]: TARGET.xxh3 describes what TARGET holds
# (and is a complete manifest, or one of STATE, e.g. partial), as an
# independent check reads it, and fleecectl verify agrees for the chain.
manifest_ok() {
	local out
	out=$("$PY" "$TESTS_DIR/manifest_check.py" "$1" "${3:-complete}" 2>&1) ||
		fail "${2:+$2: }manifest of $1 does not match it: $out"
	verify_ok "$1"
}

# pwrites IMAGE OFF:LEN...: random data written at each place through the mount.
pwrites() {
	"$PY" - "$MNT/$1" "${@:2}" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
for a in sys.argv[2:]:
    off, n = (int(x) for x in a.split(":"))
    assert os.pwrite(fd, os.urandom(n), off) == n
os.close(fd)
PY
}
# events_start FILE: a background reader of .fleece/events, open from now,
# appending every line to FILE until events_stop FILE, which lets it drain
# what is waiting before it stops. Several may run at once.
events_start() {
	rm -f "$1.ready" "$1.stop"
	"$PY" - "$MNT/.fleece/events" "$1" <<'EOF' &
import os, select, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
out = open(sys.argv[2], "w")
open(sys.argv[2] + ".ready", "w").close()
p = select.poll()
p.register(fd, select.POLLIN)
while True:
    stop = os.path.exists(sys.argv[2] + ".stop")   # checked before the last poll
    if p.poll(50):
        out.write(os.read(fd, 65536).decode())
        out.flush()
    elif stop:
        break
EOF
	BG_PIDS+=("$!")
	eval "EVPID_$(basename "$1" | tr -c 'A-Za-z0-9_\n' _)=$!"
	for _ in $(seq 100); do [ -e "$1.ready" ] && return 0; sleep 0.05; done
	fail "events reader for $1 did not start"
}
events_stop() {
	local var pid
	var="EVPID_$(basename "$1" | tr -c 'A-Za-z0-9_\n' _)"
	pid=${!var}
	touch "$1.stop"
	for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
	wait "$pid" || fail "events reader for $1 failed"
}

# random_image PATH SIZE: random content, not sparse.
random_image() { head -c "$2" /dev/urandom > "$1"; }

# soft CHECK [ARGS...]: runs CHECK (a function or command) in a subshell; if it
# fails (or calls fail), the failure is reported and counted and the test goes
# on, so that one broken behaviour does not hide the next. end_test fails the
# test if any soft check failed. CHECK cannot change the caller's variables.
SOFT_FAILS=0
soft() {
	if ! ( "$@" ); then
		printf 'FAIL (continuing): %s\n' "$*" >&2
		SOFT_FAILS=$((SOFT_FAILS + 1))
	fi
	return 0
}
end_test() {
	[ "$SOFT_FAILS" = 0 ] || fail "$SOFT_FAILS check(s) failed (see FAIL lines above)"
	log "PASS"
}

# Python for small probes: /usr/bin/python3 when there (usable by user nobody,
# and much quicker to start than a pyenv shim).
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
AS=()   # put in front of pyerr's python, e.g. to run as another user

# pyerr CODE [ARGS...]: runs python CODE (os, sys, errno, ctypes imported, the
# ARGS in A, renameat2(a, b, flags) available); prints OK, or the errno name
# of the OSError it raised.
pyerr() {
	"${AS[@]}" "$PY" -c '
import ctypes, errno, os, sys
A = sys.argv[2:]
def renameat2(a, b, flags):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, a.encode(), -100, b.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
try:
    exec(sys.argv[1])
    print("OK")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
' "$@"
}

# expect WANT CODE [ARGS...]: pyerr must print WANT.
expect() {
	local want=$1 got
	shift
	got=$(pyerr "$@")
	[ "$got" = "$want" ] || fail "$1 (${*:2}): got $got, want $want"
}

# inject RULES: one write of RULES (lines) to .fleece/inject; fails the test
# unless the answer is "ok". inject_rules: what reading it lists now.
inject() {
	local out
	out=$("$PY" - "$MNT/.fleece/inject" "$1" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    os.write(fd, (sys.argv[2] + "\n").encode())
except OSError as e:
    print(os.read(fd, 4096).decode().strip() or e)
    sys.exit(1)
print(os.read(fd, 4096).decode(), end="")
PY
) || fail "inject '$1' refused: $out"
	[ "$out" = ok ] || fail "inject '$1': answer '$out'"
}
inject_rules() { cat "$MNT/.fleece/inject"; }

# NBD servers for the NBD target tests. nbd_serve NAME WAIT CMD...: starts
# CMD in the background (its PID in $NBD_PID_<NAME>, killed on exit) and
# waits until WAIT is ready: a unix socket path, or tcp:PORT.
nbd_serve() {
	local name=$1 wait=$2 pid
	shift 2
	case $wait in tcp:*) ;; *) rm -f "$wait";; esac
	"$@" >>"$T/nbd-$name.log" 2>&1 &
	pid=$!
	BG_PIDS+=("$pid")
	printf -v "NBD_PID_$name" '%s' "$pid"
	for _ in $(seq 200); do
		kill -0 "$pid" 2>/dev/null || fail "NBD server $name exited: $(tail -3 "$T/nbd-$name.log")"
		case $wait in
		tcp:*) "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" \
			"${wait#tcp:}" 2>/dev/null && return 0 ;;
		*) [ -S "$wait" ] && return 0 ;;
		esac
		sleep 0.05
	done
	fail "NBD server $name did not come up"
}
# nbd_kill NAME: SIGKILL for that server (a crash), and wait for it.
nbd_kill() {
	local var="NBD_PID_$1"
	kill -9 "${!var}" 2>/dev/null || true
	wait "${!var}" 2>/dev/null || true
}
# free_port: a TCP port nobody listens on now.
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
