#!/bin/bash
# daemon-args: the daemon's command line (SPEC section 1). Bad arguments end
# with a non-zero status, exactly one stderr line "fleecefs: <what is wrong>",
# and nothing mounted; good ones mount; fusermount3 -u and SIGTERM end the
# daemon with status 0; -o cluster_size reaches the version file and the jobs;
# mount(8) and mount.fuse3 can start it.
. "$TESTS_DIR/lib.sh"

# Mount points below $T, one per line (mountinfo escapes nothing in our paths).
mounts_below_t() { awk -v t="$T/" 'index($5, t) == 1 { print $5 }' /proc/self/mountinfo; }

# run_refused WHAT PATTERN ARGS...: fleecefs ARGS must exit non-zero within 5 s
# with one stderr line starting "fleecefs:" and matching PATTERN (grep -E, case
# insensitive), leave nothing mounted below $T and print nothing else on stderr.
run_refused() {
	local what=$1 pattern=$2 rc=0 pid n
	shift 2
	local before
	before=$(mounts_below_t)
	"$FLEECEFS" "$@" >"$T/refused.out" 2>"$T/refused.err" &
	pid=$!
	for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
	if kill -0 "$pid" 2>/dev/null; then
		BG_PIDS+=("$pid")
		fail "$what: fleecefs $* is still running after 5 s (it should have refused)"
	fi
	wait "$pid" || rc=$?
	[ "$rc" != 0 ] || fail "$what: fleecefs $* exited 0"
	n=$(wc -l < "$T/refused.err")
	[ "$n" = 1 ] || fail "$what: expected one line on stderr, got $n: $(cat "$T/refused.err")"
	grep -q '^fleecefs: ' "$T/refused.err" ||
		fail "$what: stderr line does not start with 'fleecefs: ': $(cat "$T/refused.err")"
	grep -Eqi -- "$pattern" "$T/refused.err" ||
		fail "$what: stderr does not say what is wrong (want /$pattern/): $(cat "$T/refused.err")"
	[ "$(mounts_below_t)" = "$before" ] || fail "$what: something got mounted: $(mounts_below_t)"
	log "refused ($what): $(cat "$T/refused.err")"
}

# ---- --version and --help ---------------------------------------------------
out=$("$FLEECEFS" --version) || fail "--version exited non-zero"
grep -Eq '^fleecefs [0-9]+\.[0-9]+' <<<"$out" || fail "--version says '$out'"
out=$("$FLEECEFS" -V) || fail "-V exited non-zero"
grep -Eq '^fleecefs [0-9]' <<<"$out" || fail "-V says '$out'"
out=$("$FLEECEFS" --help) || fail "--help exited non-zero"
grep -q 'SOURCE_DIR' <<<"$out" && grep -q 'MOUNTPOINT' <<<"$out" && grep -q 'state_dir' <<<"$out" &&
	grep -q 'cluster_size' <<<"$out" && grep -q 'threads' <<<"$out" ||
	fail "--help does not describe the arguments and options: $out"
out=$("$FLEECEFS" -h) || fail "-h exited non-zero"

# ---- bad arguments ------------------------------------------------------------
echo data > "$T/regular-file"
mkdir -p "$SRC/inner" "$T/src2"
head -c 65536 /dev/urandom > "$SRC/vm.img"

soft run_refused "no arguments" 'SOURCE_DIR|MOUNTPOINT|usage'
soft run_refused "no MOUNTPOINT" 'MOUNTPOINT' -f "$SRC"
soft run_refused "missing SOURCE_DIR" "$T/no-such-src" -f "$T/no-such-src" "$MNT"
soft run_refused "SOURCE_DIR not a directory" "$T/regular-file.*not a directory" -f "$T/regular-file" "$MNT"
soft run_refused "missing MOUNTPOINT" "$T/no-such-mnt" -f "$SRC" "$T/no-such-mnt"
soft run_refused "MOUNTPOINT not a directory" "$T/regular-file" -f "$SRC" "$T/regular-file"
soft run_refused "MOUNTPOINT inside SOURCE_DIR" "inside" -f "$SRC" "$SRC/inner"
soft run_refused "state_dir under a regular file" "state_dir.*$T/regular-file/state" \
	-f -o "state_dir=$T/regular-file/state" "$SRC" "$MNT"
soft run_refused "state_dir is a regular file" "state_dir.*$T/regular-file" \
	-f -o "state_dir=$T/regular-file" "$SRC" "$MNT"
soft run_refused "cluster_size not a power of two" 'cluster_size' -f -o cluster_size=3000 "$SRC" "$MNT"
soft run_refused "cluster_size 96K not a power of two" 'cluster_size' -f -o cluster_size=96K "$SRC" "$MNT"
soft run_refused "cluster_size too small" 'cluster_size' -f -o cluster_size=2K "$SRC" "$MNT"
soft run_refused "cluster_size too large" 'cluster_size' -f -o cluster_size=32M "$SRC" "$MNT"
soft run_refused "cluster_size garbage" 'cluster_size' -f -o cluster_size=lots "$SRC" "$MNT"
soft run_refused "threads=0" 'threads' -f -o threads=0 "$SRC" "$MNT"
soft run_refused "threads garbage" 'threads' -f -o threads=many "$SRC" "$MNT"

# A state directory the daemon's user cannot write: run it as nobody (it
# refuses before it needs /dev/fuse).
chmod 0755 "$T"
mkdir -p "$T/ro-state" "$T/nobody-src"
chmod 0555 "$T/ro-state"
chmod 0777 "$T/nobody-src"
if setpriv --reuid=65534 --regid=65534 --clear-groups test -x "$FLEECEFS" -a -w "$T/nobody-src" 2>/dev/null; then
	soft run_refused "state_dir not writable (as nobody)" "state_dir.*$T/ro-state" \
		-f -o "state_dir=$T/ro-state" "$T/nobody-src" "$MNT" --setpriv-dummy 2>/dev/null || true
else
	log "skip: user nobody cannot reach $FLEECEFS or $T"
fi
