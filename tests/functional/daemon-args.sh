#!/bin/bash
# daemon-args: the daemon's command line (SPEC section 1). Bad arguments end
# with a non-zero status, exactly one stderr line "fleecefs: <what is wrong>",
# and nothing mounted; good ones mount; fusermount3 -u and SIGTERM end the
# daemon with status 0; -o cluster_size reaches the version file and the jobs;
# mount(8) and mount.fuse3 can start it.
. "$TESTS_DIR/lib.sh"

# Mount points below $T, one per line (mountinfo escapes nothing in our paths).
mounts_below_t() { awk -v t="$T/" 'index($5, t) == 1 { print $5 }' /proc/self/mountinfo; }

RUN_AS=()
# run_refused WHAT PATTERN ARGS...: fleecefs ARGS must exit non-zero within 5 s
# with one stderr line starting "fleecefs:" and matching PATTERN (grep -E, case
# insensitive), leave nothing mounted below $T and print nothing else on stderr.
# RUN_AS (an array) is put in front of the command.
run_refused() {
	local what=$1 pattern=$2 rc=0 pid n
	shift 2
	local before
	before=$(mounts_below_t)
	"${RUN_AS[@]}" "$FLEECEFS" "$@" >"$T/refused.out" 2>"$T/refused.err" &
	pid=$!
	for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
	if kill -0 "$pid" 2>/dev/null; then
		# It took the arguments and (probably) mounted: stop it here, since
		# this may run in a subshell (soft) that cannot hand it to cleanup.
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
		kill -9 "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		mountpoint -q "$MNT" && { fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" || true; }
		fail "$what: fleecefs $* accepted the arguments and ran (it should have refused)"
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
# A state dir that would be visible through the mount (it is the source dir
# itself) or that lies inside the mount point (the daemon would reach it
# through its own mount, if at all).
mkdir -p "$T/src3"
soft run_refused "state_dir is SOURCE_DIR" 'state_dir' -f -o "state_dir=$T/src3" "$T/src3" "$MNT"
soft run_refused "state_dir inside MOUNTPOINT" 'state_dir' -f -o "state_dir=$MNT/state" "$T/src3" "$MNT"
rmdir "$MNT/state" 2>/dev/null || true
# An option neither fleecefs nor FUSE knows (in its own source dir: whether a
# refused start may create the state dir is not what this checks).
soft run_refused "unknown -o option" 'no_such_option' -f -o no_such_option "$T/src2" "$MNT"

# A state directory the daemon's user cannot write: run it as nobody (it must
# refuse before it would need /dev/fuse). Root would write anywhere.
chmod 0755 "$T"
mkdir -p "$T/ro-state" "$T/ro-parent" "$T/nobody-src"
chmod 0555 "$T/ro-state" "$T/ro-parent"
chmod 0777 "$T/nobody-src"
if setpriv --reuid=65534 --regid=65534 --clear-groups sh -c "test -x '$FLEECEFS' && test -w '$T/nobody-src'"; then
	RUN_AS=(setpriv --reuid=65534 --regid=65534 --clear-groups)
	soft run_refused "state_dir not writable (nobody)" "state_dir.*$T/ro-state" \
		-f -o "state_dir=$T/ro-state" "$T/nobody-src" "$MNT"
	soft run_refused "state_dir cannot be created (nobody)" "state_dir.*$T/ro-parent/state" \
		-f -o "state_dir=$T/ro-parent/state" "$T/nobody-src" "$MNT"
	RUN_AS=()
	[ ! -e "$T/ro-parent/state" ] || fail "a state dir appeared in a read-only directory"
	ls -A "$T/ro-state" | grep -q . && fail "the refused daemon left files in $T/ro-state: $(ls -A "$T/ro-state")"
else
	log "skip: user nobody cannot run $FLEECEFS or reach $T; unwritable state_dir as non-root not tested"
fi

# The refused runs created nothing in the source directory either.
[ ! -e "$SRC/.fleecefs" ] || soft fail "a refused daemon created $SRC/.fleecefs"

# ---- MOUNTPOINT already a mount point -----------------------------------------
mount_fleece
first_pid=$DAEMON_PID
soft run_refused "MOUNTPOINT busy" "$MNT.*(busy|mounted)|(busy|mounted).*$MNT" -f "$T/src2" "$MNT"
kill -0 "$first_pid" || fail "the first daemon died when a second tried its mount point"
cmp "$SRC/vm.img" "$MNT/vm.img" || fail "the first mount no longer serves after a refused second mount"
[ "$(awk -v m="$MNT" '$5 == m' /proc/self/mountinfo | wc -l)" = 1 ] || fail "$MNT is mounted more than once"

# ---- the default state dir -----------------------------------------------------
[ -d "$SRC/.fleecefs" ] || fail "the default state dir $SRC/.fleecefs was not created"
[ "$(stat -c %a "$SRC/.fleecefs")" = 700 ] || fail "state dir mode is $(stat -c %a "$SRC/.fleecefs"), want 700"
[ "$(stat -c %u "$SRC/.fleecefs")" = "$(id -u)" ] || fail "state dir is not owned by the mounting user"
grep -qx 'cluster_size=65536' "$MNT/.fleece/version" || fail "default cluster_size is not 64K: $(cat "$MNT/.fleece/version")"

# ---- fusermount3 -u: exit status 0 ----------------------------------------------
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "fleecefs exited $DAEMON_RC after fusermount3 -u"
! mountpoint -q "$MNT" || fail "$MNT still mounted after fusermount3 -u"
# A clean stop (no jobs, nothing failing) has nothing to warn about; a warning
# here means part of the shutdown (cancel, save, sync) did not happen.
no_warnings() {
	! grep -Ei 'warning|error' "$T/daemon.log" || fail "clean mount and unmount logged warnings (above)"
}
soft no_warnings

# ---- an existing state dir open to others: tightened when ours, else refused -------
chmod 0755 "$SRC/.fleecefs"
mount_fleece
[ "$(stat -c %a "$SRC/.fleecefs")" = 700 ] ||
	fail "an existing state dir of mode 0755 kept mode $(stat -c %a "$SRC/.fleecefs"), want 700"
grep -q "state_dir $SRC/.fleecefs: mode 0755 let others in; changed to 0700" "$T/daemon.log" ||
	fail "no log line about the state dir's mode: $(cat "$T/daemon.log")"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "fleecefs exited $DAEMON_RC"
mkdir -p "$T/src-foreign" "$T/foreign-state"
chmod 0750 "$T/foreign-state"
chown 65534:65534 "$T/foreign-state"
soft run_refused "state_dir open to others, owned by another user" "state_dir.*$T/foreign-state.*0750" \
	-f -o "state_dir=$T/foreign-state" "$T/src-foreign" "$MNT"
[ "$(stat -c %a:%u "$T/foreign-state")" = 750:65534 ] ||
	fail "a refused daemon changed another user's state dir: $(stat -c %a:%u "$T/foreign-state")"
ls -A "$T/foreign-state" | grep -q . && fail "the refused daemon left files in $T/foreign-state"

# ---- SIGTERM: exit status 0 and unmounted ----------------------------------------
mount_fleece -o "state_dir=$T/state-explicit"
[ "$(stat -c %a "$T/state-explicit")" = 700 ] || fail "state_dir= created with mode $(stat -c %a "$T/state-explicit")"
term_daemon
[ "$DAEMON_RC" = 0 ] || fail "fleecefs exited $DAEMON_RC after SIGTERM"
! mountpoint -q "$MNT" || fail "$MNT still mounted after SIGTERM"
[ -z "$(mounts_below_t)" ] || fail "still mounted after SIGTERM: $(mounts_below_t)"

# ---- cluster_size and threads ----------------------------------------------------
mount_fleece -o cluster_size=4K,threads=1
grep -qx 'cluster_size=4096' "$MNT/.fleece/version" || fail "cluster_size=4K: version says $(cat "$MNT/.fleece/version")"
ans=$(ctl "backup vm.img $OUT/cs.raw id=cs") || fail "backup with cluster_size=4K refused: $ans"
[ "$(wait_job cs 30)" = completed ] || fail "job cs: $(cat "$MNT/.fleece/jobs/cs/status")"
[ "$(status cs cluster_size)" = 4096 ] || fail "job status cluster_size=$(status cs cluster_size), want 4096"
cmp "$SRC/vm.img" "$OUT/cs.raw" || fail "backup with cluster_size=4K differs from the image"
grep -qx 'cluster_size=4096' "$OUT/cs.raw.xxh3" && grep -qx 'clusters=16' "$OUT/cs.raw.xxh3" ||
	fail "checksum file does not use 4K clusters: $(head -5 "$OUT/cs.raw.xxh3")"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "fleecefs exited $DAEMON_RC"

mount_fleece -o cluster_size=16M
grep -qx 'cluster_size=16777216' "$MNT/.fleece/version" || fail "cluster_size=16M: version says $(cat "$MNT/.fleece/version")"
unmount_fleece
mount_fleece -o cluster_size=131072 -s
grep -qx 'cluster_size=131072' "$MNT/.fleece/version" || fail "cluster_size=131072: version says $(cat "$MNT/.fleece/version")"
cmp "$SRC/vm.img" "$MNT/vm.img" || fail "single-threaded mount does not serve the image"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "fleecefs -s exited $DAEMON_RC"

# ---- mount.fuse3 and mount(8) ------------------------------------------------------
# The daemon of a helper mount runs in the background: find it by its command
# line, so that cleanup can stop it.
find_daemon() {
	local exe p
	exe=$(readlink -f "$FLEECEFS")
	for p in /proc/[0-9]*; do
		[ "$(readlink "$p/exe" 2>/dev/null)" = "$exe" ] || continue
		tr '\0' '\n' < "$p/cmdline" 2>/dev/null | grep -qxF "$MNT" && { echo "${p#/proc/}"; return 0; }
	done
	return 1
}

# check_helper_mount STATE_DIR: the mount is served by a background daemon
# with that state dir; unmount it with umount(8) and see the daemon go.
check_helper_mount() {
	local state=$1 pid fstype
	pid=$(find_daemon) || fail "no fleecefs daemon serves $MNT after the helper mount"
	BG_PIDS+=("$pid")
	fstype=$(awk -v m="$MNT" '$5 == m { for (i = 7; $i != "-"; i++); print $(i + 1) }' /proc/self/mountinfo)
	[ "$fstype" = fuse.fleecefs ] || fail "mounted with type '$fstype', want fuse.fleecefs"
	for _ in $(seq 100); do [ -e "$MNT/.fleece/version" ] && break; sleep 0.05; done
	grep -q '^version=' "$MNT/.fleece/version" || fail "no control directory on the helper mount"
	cmp "$SRC/vm.img" "$MNT/vm.img" || fail "the helper mount does not serve the image"
	[ "$(stat -c %a "$state")" = 700 ] || fail "state_dir $state not created with mode 0700"
	umount "$MNT" || fail "umount $MNT failed"
	for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
	kill -0 "$pid" 2>/dev/null && fail "the daemon $pid did not exit after umount"
	! mountpoint -q "$MNT" || fail "$MNT still mounted after umount"
	unset 'BG_PIDS[${#BG_PIDS[@]}-1]'
}

helper=
for h in /sbin/mount.fuse3 /usr/sbin/mount.fuse3; do [ -x "$h" ] && { helper=$h; break; }; done
if [ -z "$helper" ]; then
	log "skip: mount.fuse3 is not installed; mount(8) not tested"
else
	mkdir -p "$T/bin"
	ln -s "$FLEECEFS" "$T/bin/fleecefs"
	# As from fstab "SRC MNT fuse.fleecefs state_dir=..." with fleecefs on PATH:
	# mount.fuse3 runs "fleecefs SRC MNT -o OPTS" through /bin/sh.
	PATH="$T/bin:$PATH" "$helper" "$SRC" "$MNT" -t fuse.fleecefs -o "state_dir=$T/state-helper" ||
		fail "mount.fuse3 -t fuse.fleecefs failed"
	check_helper_mount "$T/state-helper"
	log "mount.fuse3 -t fuse.fleecefs: mounted, served, unmounted"
	# mount(8) itself. It runs helpers with a clean environment (no PATH), so an
	# uninstalled binary is named in the source as TYPE#SOURCE; the mount then
	# still has type fuse.fleecefs (the daemon sets its subtype).
	if command -v mount >/dev/null; then
		mount -t fuse "$FLEECEFS#$SRC" "$MNT" -o "state_dir=$T/state-mount" ||
			fail "mount -t fuse '$FLEECEFS#$SRC' $MNT failed"
		check_helper_mount "$T/state-mount"
		log "mount -t fuse FLEECEFS#SRC: mounted, served, unmounted"
	fi
fi

end_test
