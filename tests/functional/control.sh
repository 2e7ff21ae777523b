#!/bin/bash
# control: the control directory (SPEC section 3). Its permissions; version;
# the ctl answer read back on the same open file; every kind of bad command
# failing with the right errno and leaving no job, target or checksum file;
# job ids, status keys, set speed, cancel, dismiss, retention of concluded
# jobs; the events file: order and format, from the moment of open, poll(2),
# and a blocked reader killed with SIGKILL.
. "$TESTS_DIR/lib.sh"

jobs_list() { ls -A "$MNT/.fleece/jobs" | sort | tr '\n' ' '; }

# refuse ERRNO COMMAND [PATH...]: the write fails with ERRNO, answers one line
# "error: ...", starts no job, and none of the PATHs (targets) nor PATH.xxh3
# exists afterwards. Prints the answer.
refuse() {
	local want=$1 cmd=$2 before after p ans
	shift 2
	before=$(jobs_list)
	ans=$(ctl_expect "$want" "$cmd") || exit 1
	after=$(jobs_list)
	[ "$before" = "$after" ] || fail "'$cmd' changed the jobs: before [$before] after [$after]"
	for p in "$@"; do
		[ ! -e "$p" ] && [ ! -L "$p" ] || fail "'$cmd' left $p behind"
		[ ! -e "$p.xxh3" ] || fail "'$cmd' left $p.xxh3 behind"
	done
	printf '%s\n' "$ans"
}

# wait_gone PID [TIMEOUT_S]: waits until a process (not necessarily our child) is gone.
wait_gone() {
	for _ in $(seq $((${2:-10} * 20))); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done
	return 1
}

chmod 0755 "$T"   # user nobody must reach the mount
# This test runs python (lib.sh's ctl) about 200 times: prefer the system
# python3 over a version manager's shim in front of it on PATH, which costs
# ~100 ms a start. Only the standard library is used.
if [ -x /usr/bin/python3 ] && [ "$(command -v python3)" != /usr/bin/python3 ]; then
	mkdir -p "$T/bin" && ln -s /usr/bin/python3 "$T/bin/python3" && PATH="$T/bin:$PATH"
fi
random_image "$SRC/vm.img" $((4 * 1048576 + 1234))
random_image "$SRC/big.img" 64M
random_image "$SRC/tiny.img" 4096
mkdir -p "$SRC/pool" "$SRC/adir"
random_image "$SRC/pool/a.img" 1M
random_image "$SRC/my disk.img" 100000
ln -s vm.img "$SRC/link.img"
mount_fleece -o allow_other

# ---- the directory: mode, owner, nobody else --------------------------------------
[ "$(stat -c %a:%u:%g "$MNT/.fleece")" = "700:$(id -u):$(id -g)" ] ||
	fail ".fleece is $(stat -c %a:%u:%g "$MNT/.fleece"), want 700 owned by the mounting user"
[ "$(stat -c %a "$MNT/.fleece/ctl")" = 600 ] || fail "ctl mode $(stat -c %a "$MNT/.fleece/ctl")"
for f in version events; do
	[ "$(stat -c %a:%u "$MNT/.fleece/$f")" = "400:$(id -u)" ] || fail "$f is $(stat -c %a:%u "$MNT/.fleece/$f")"
done
ctl "backup tiny.img $OUT/perm.raw id=perm" >/dev/null || fail "backup refused"
[ "$(wait_job perm 20)" = completed ] || fail "job perm did not complete"
if setpriv --reuid=65534 --regid=65534 --clear-groups test -r "$MNT/vm.img"; then
	AS=(setpriv --reuid=65534 --regid=65534 --clear-groups)
	expect EACCES 'os.listdir(A[0])' "$MNT/.fleece"
	expect EACCES 'os.stat(A[0])' "$MNT/.fleece/ctl"
	expect EACCES 'os.open(A[0], os.O_WRONLY)' "$MNT/.fleece/ctl"
	expect EACCES 'os.open(A[0], os.O_RDONLY)' "$MNT/.fleece/ctl"
	expect EACCES 'os.open(A[0], os.O_RDONLY)' "$MNT/.fleece/version"
	expect EACCES 'os.open(A[0], os.O_RDONLY)' "$MNT/.fleece/events"
	expect EACCES 'os.listdir(A[0])' "$MNT/.fleece/jobs"
	expect EACCES 'os.open(A[0], os.O_RDONLY)' "$MNT/.fleece/jobs/perm/status"
	expect EPERM 'os.chmod(A[0], 0o777)' "$MNT/.fleece"
	expect OK 'os.close(os.open(A[0], os.O_RDONLY))' "$MNT/vm.img"
	AS=()
	log "nobody is kept out of .fleece"
else
	log "skip: user nobody cannot reach $MNT"
fi
# Not even its owner can open it up or put things in it.
[ "$(pyerr 'os.chmod(A[0], 0o777)' "$MNT/.fleece")" != OK ] || fail "chmod of .fleece succeeded"
[ "$(stat -c %a "$MNT/.fleece")" = 700 ] || fail ".fleece mode changed to $(stat -c %a "$MNT/.fleece")"
[ "$(pyerr 'os.mkdir(A[0])' "$MNT/.fleece/extra")" != OK ] || fail "mkdir in .fleece succeeded"
[ "$(pyerr 'os.close(os.open(A[0], os.O_WRONLY | os.O_CREAT, 0o600))' "$MNT/.fleece/extra")" != OK ] ||
	fail "creating a file in .fleece succeeded"
[ "$(pyerr 'os.unlink(A[0])' "$MNT/.fleece/ctl")" != OK ] || fail "unlink of .fleece/ctl succeeded"
expect EACCES 'os.open(A[0], os.O_WRONLY)' "$MNT/.fleece/version"
expect EACCES 'os.open(A[0], os.O_WRONLY)' "$MNT/.fleece/jobs/perm/status"
[ "$(ls -A "$MNT/.fleece" | sort | tr '\n' ' ')" = "bitmaps ctl events inject jobs redirects snapshots version " ] ||
	fail ".fleece holds: $(ls -A "$MNT/.fleece")"

# ---- version ----------------------------------------------------------------------
v=$(sed -n 's/^version=//p' "$MNT/.fleece/version")
[ -n "$v" ] && "$FLEECEFS" --version | grep -qF "$v" || fail "version=$v does not match --version"
grep -Eq '^features=(.* )?backup( |$)' "$MNT/.fleece/version" || fail "features lacks backup"
grep -Eq '^features=(.* )?events( |$)' "$MNT/.fleece/version" || fail "features lacks events"
grep -qx 'cluster_size=65536' "$MNT/.fleece/version" || fail "no cluster_size=65536 in version"
grep -qvE '^[a-z_]+=' "$MNT/.fleece/version" && fail "version has a line that is not key=value: $(cat "$MNT/.fleece/version")"

# ---- the answer is read back on the same open file --------------------------------------
"$PY" - "$MNT/.fleece/ctl" "$OUT" <<'EOF' || fail "ctl read-back"
import errno, os, re, sys
ctl, out = sys.argv[1], sys.argv[2]
fd = os.open(ctl, os.O_RDWR)
other = os.open(ctl, os.O_RDWR)
cmd = f"backup tiny.img {out}/rb1.raw id=rb1\n".encode()
if os.write(fd, cmd) != len(cmd):
    sys.exit("short write")
a = os.read(fd, 4096).decode()
if a != "ok id=rb1\n":
    sys.exit(f"answer {a!r}, want 'ok id=rb1'")
if os.read(other, 4096) != b"":
    sys.exit("another open file of ctl sees the answer")
try:
    os.write(fd, b"no-such-verb x\n")
    sys.exit("a bad command was accepted")
except OSError as e:
    if e.errno != errno.EINVAL:
        sys.exit(f"bad command: {errno.errorcode[e.errno]}")
a = os.read(fd, 4096).decode()
if not re.fullmatch(r"error: [^\n]+\n", a) or "no-such-verb" not in a:
    sys.exit(f"answer to a bad command: {a!r}")
os.write(fd, f"backup tiny.img {out}/rb2.raw\n".encode())
a = os.read(fd, 4096).decode()
if not re.fullmatch(r"ok id=job-[0-9]+\n", a):
    sys.exit(f"answer with a default id: {a!r}")
EOF
# The shell way: echo > ctl (open with O_TRUNC, one write).
echo "backup tiny.img $OUT/sh.raw id=sh" > "$MNT/.fleece/ctl" || fail "echo > ctl failed"
(echo "bogus" > "$MNT/.fleece/ctl") 2>/dev/null && fail "echo bogus > ctl succeeded"
for id in rb1 sh; do [ "$(wait_job "$id" 20)" = completed ] || fail "job $id did not complete"; done
cmp "$SRC/tiny.img" "$OUT/rb1.raw" && cmp "$SRC/tiny.img" "$OUT/sh.raw" || fail "backup differs"
log "ctl read-back ok"

# ---- bad commands: errno, and nothing left behind -----------------------------------------
# An events reader watches the whole section: refused commands emit nothing.
events_start "$T/refusal-events"

t=$OUT/t.raw
echo "precious" > "$OUT/exists.raw"
ln -s "$OUT/nowhere.raw" "$OUT/dangling.raw"
ln -s "$OUT/exists.raw" "$OUT/link-to-existing.raw"
echo "old checksums" > "$OUT/has-sum.raw.xxh3"
long_id=$(printf 'a%.0s' $(seq 65))

refuse EINVAL "frobnicate vm.img $t" "$t" >/dev/null
refuse EINVAL "backup" >/dev/null
refuse EINVAL "backup vm.img" >/dev/null
refuse EINVAL "cancel" >/dev/null
refuse EINVAL "cancel a b" >/dev/null
refuse EINVAL "dismiss" >/dev/null
refuse EINVAL "set perm" >/dev/null
refuse EINVAL "set perm 5M" >/dev/null
refuse EINVAL "set perm speed=fast" >/dev/null
refuse EINVAL "backup /vm.img $t" "$t" >/dev/null
refuse EINVAL "backup $SRC/vm.img $t" "$t" >/dev/null
refuse EINVAL "backup ../src/vm.img $t" "$t" >/dev/null
refuse EINVAL "backup pool/../vm.img $t" "$t" >/dev/null
refuse EINVAL "backup ./vm.img $t" "$t" >/dev/null
refuse EINVAL "backup adir $t" "$t" >/dev/null
refuse EINVAL "backup pool $t" "$t" >/dev/null
refuse EINVAL "backup link.img $t" "$t" >/dev/null
refuse EINVAL "backup vm.img out/t.raw" "$T/out/t.raw" >/dev/null
refuse EINVAL "backup vm.img $MNT/t.raw" "$MNT/t.raw" "$SRC/t.raw" >/dev/null
refuse EINVAL "backup vm.img $MNT/pool/t.raw" "$MNT/pool/t.raw" "$SRC/pool/t.raw" >/dev/null
refuse EINVAL "backup vm.img $t id=bad/id" "$t" >/dev/null
refuse EINVAL "backup vm.img $t id=.hidden" "$t" >/dev/null
refuse EINVAL "backup vm.img $t id=a*b" "$t" >/dev/null
refuse EINVAL "backup vm.img $t id=" "$t" >/dev/null
refuse EINVAL "backup vm.img $t id=$long_id" "$t" >/dev/null
refuse EINVAL "backup vm.img $t speed=garbage" "$t" >/dev/null
refuse EINVAL "backup vm.img $t speed=-1" "$t" >/dev/null
refuse EINVAL "backup vm.img $t speed=1.5M" "$t" >/dev/null
refuse EINVAL "backup vm.img $t speed=1X" "$t" >/dev/null
refuse EINVAL "backup vm.img $t colour=blue" "$t" >/dev/null
refuse EINVAL "backup vm.img $t fast" "$t" >/dev/null
refuse EINVAL "backup vm.img $t sync=bogus" "$t" >/dev/null
refuse EINVAL "backup vm.img $t format=vmdk" "$t" >/dev/null
refuse EINVAL "backup vm.img $t checksum=md5" "$t" >/dev/null
refuse EINVAL "backup vm.img $t speed=1M speed=2M" "$t" >/dev/null
refuse EINVAL "backup \"vm.img $t" "$t" >/dev/null
refuse EINVAL "" >/dev/null
refuse EINVAL "# only a comment" >/dev/null
refuse EINVAL "backup vm.img $t id=$(printf 'x%.0s' $(seq 5000))" "$t" >/dev/null
refuse ENOENT "backup missing.img $t" "$t" >/dev/null
refuse ENOENT "backup pool/missing.img $t" "$t" >/dev/null
refuse ENOENT "backup nodir/vm.img $t" "$t" >/dev/null
refuse ENOENT "backup .fleece/ctl $t" "$t" >/dev/null
refuse ENOENT "backup .fleecefs/x $t" "$t" >/dev/null
refuse ENOENT "backup vm.img $OUT/nodir/t.raw" "$OUT/nodir" >/dev/null
refuse ENOENT "cancel nosuchjob" >/dev/null
refuse ENOENT "dismiss nosuchjob" >/dev/null
refuse ENOENT "set nosuchjob speed=1M" >/dev/null
refuse EEXIST "backup vm.img $OUT/exists.raw" >/dev/null
[ "$(cat "$OUT/exists.raw")" = precious ] && [ ! -e "$OUT/exists.raw.xxh3" ] || fail "an existing target was touched"
refuse EEXIST "backup vm.img $SRC/vm.img" >/dev/null
cmp "$SRC/vm.img" "$MNT/vm.img" && [ ! -e "$SRC/vm.img.xxh3" ] || fail "backup onto the image itself touched it"
refuse EEXIST "backup vm.img $OUT/dangling.raw" "$OUT/nowhere.raw" >/dev/null
[ -L "$OUT/dangling.raw" ] && [ ! -e "$OUT/dangling.raw.xxh3" ] || fail "the dangling symlink target was replaced"
refuse EEXIST "backup vm.img $OUT/link-to-existing.raw" >/dev/null
[ "$(cat "$OUT/exists.raw")" = precious ] || fail "a symlinked target was written through"
refuse EEXIST "backup vm.img $OUT/has-sum.raw" >/dev/null
[ ! -e "$OUT/has-sum.raw" ] || fail "a refused backup (TARGET.xxh3 exists) left its target"
[ "$(cat "$OUT/has-sum.raw.xxh3")" = "old checksums" ] || fail "an existing TARGET.xxh3 was changed or removed"
refuse EEXIST "backup vm.img $t id=perm" "$t" >/dev/null
refuse EEXIST "$(printf 'backup vm.img %s id=dup\nbackup pool/a.img %s id=dup' "$OUT/d1.raw" "$OUT/d2.raw")" \
	"$OUT/d1.raw" "$OUT/d2.raw" >/dev/null
refuse EEXIST "$(printf 'backup vm.img %s\nbackup pool/a.img %s' "$t" "$t")" "$t" >/dev/null
ans=$(refuse EBUSY "cancel perm")
grep -q completed <<<"$ans" || fail "cancel of a completed job: the message does not name its state: $ans"
refuse EBUSY "set perm speed=1M" >/dev/null
# Two-line transactions whose second line fails: the first never happened.
ans=$(refuse ENOENT "$(printf 'backup vm.img %s id=tx1\nbackup missing.img %s id=tx2' "$OUT/tx1.raw" "$OUT/tx2.raw")" \
	"$OUT/tx1.raw" "$OUT/tx2.raw")
grep -q 'line 2' <<<"$ans" || fail "the error does not say where: $ans"
ans=$(refuse EINVAL "$(printf 'backup vm.img %s id=tx1\nbackup vm.img %s speed=oops' "$OUT/tx1.raw" "$OUT/tx2.raw")" \
	"$OUT/tx1.raw" "$OUT/tx2.raw")
grep -q 'line 2' <<<"$ans" || fail "the error does not say where: $ans"
refuse ENOENT "$(printf 'backup vm.img %s id=tx1\ncancel nosuchjob' "$OUT/tx1.raw")" "$OUT/tx1.raw" >/dev/null
refuse EEXIST "$(printf 'backup vm.img %s id=tx1\nbackup pool/a.img %s' "$OUT/tx1.raw" "$OUT/exists.raw")" \
	"$OUT/tx1.raw" >/dev/null
# ... also when the second line fails only while being set up (its TARGET.xxh3 exists).
refuse EEXIST "$(printf 'backup vm.img %s id=tx1\nbackup pool/a.img %s id=tx2' "$OUT/tx1.raw" "$OUT/has-sum.raw")" \
	"$OUT/tx1.raw" >/dev/null
[ ! -e "$OUT/has-sum.raw" ] || fail "a refused backup (TARGET.xxh3 exists) left its target"
[ "$(cat "$OUT/has-sum.raw.xxh3")" = "old checksums" ] || fail "an existing TARGET.xxh3 was changed or removed"
# Refused by what they name, nothing left.
refuse ENOENT "backup vm.img $t sync=incremental bitmap=b1" "$t" >/dev/null
refuse EEXIST "mirror vm.img $OUT/exists.raw" "$OUT/m.raw" >/dev/null
refuse ENOENT "release s1" >/dev/null
refuse ENOENT "bitmap remove vm.img b1" >/dev/null
# perm has completed: the job verbs other than dismiss are refused by state.
for v in pause resume complete; do
	ans=$(refuse EBUSY "$v perm")
	grep -q "job is completed" <<<"$ans" || fail "$v of a completed job: the message does not name its state: $ans"
done
refuse EEXIST "$(printf 'backup vm.img %s id=tx1\nmirror vm.img %s' "$OUT/tx1.raw" "$OUT/exists.raw")" "$OUT/tx1.raw" >/dev/null
# A NUL byte in the command text.
"$PY" - "$MNT/.fleece/ctl" "$OUT/nul.raw" <<'EOF' || fail "NUL byte"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    os.write(fd, f"backup vm.img {sys.argv[2]}\0 id=x\n".encode())
    sys.exit("a command with a NUL byte was accepted")
except OSError as e:
    if e.errno != errno.EINVAL:
        sys.exit(f"NUL byte: {errno.errorcode[e.errno]}")
if not os.read(fd, 4096).startswith(b"error: "):
    sys.exit("no error answer")
EOF
[ ! -e "$OUT/nul.raw" ] || fail "a refused command with a NUL byte left its target"
# The daemon is still fine, and no refused command emitted an event.
grep -q '^version=' "$MNT/.fleece/version" || fail "the daemon stopped answering"
events_stop "$T/refusal-events"
[ ! -s "$T/refusal-events" ] || fail "refused commands emitted events: $(cat "$T/refusal-events")"
log "bad commands refused cleanly"

# ---- jobs: ids, status, two jobs in one write ----------------------------------------------
ans=$(ctl "$(printf 'backup vm.img %s id=m1\nbackup pool/a.img %s' "$OUT/m1.raw" "$OUT/m2.raw")") ||
	fail "two-job transaction refused: $ans"
[[ $ans =~ ^ok\ id=m1\ id=(job-[0-9]+)$ ]] || fail "answer to a two-job transaction: '$ans'"
m2=${BASH_REMATCH[1]}
ans=$(ctl "backup tiny.img $OUT/long.raw id=$(printf 'L%.0s' $(seq 64))") || fail "a 64-character id refused: $ans"
ans=$(ctl "backup tiny.img $OUT/odd.raw id=A-z_0.9") || fail "id A-z_0.9 refused: $ans"
[ "$ans" = "ok id=A-z_0.9" ] || fail "answer '$ans'"
# Blank lines, comments, CRLF line ends and quoted words with blanks.
ans=$(ctl "$(printf '\n# a comment\r\n  backup "my disk.img" "%s" id=q1\r\n\n' "$OUT/with space.raw")") ||
	fail "a transaction with comments, CRLF and quotes refused: $ans"
[ "$ans" = "ok id=q1" ] || fail "answer '$ans'"
for id in m1 "$m2" A-z_0.9 q1; do [ "$(wait_job "$id" 20)" = completed ] || fail "job $id did not complete"; done
cmp "$SRC/my disk.img" "$OUT/with space.raw" || fail "backup of a quoted image name to a quoted target differs"
[ "$(status q1 image)" = "my disk.img" ] && [ "$(status q1 target)" = "$OUT/with space.raw" ] ||
	fail "status of q1: $(cat "$MNT/.fleece/jobs/q1/status")"
cmp "$SRC/vm.img" "$OUT/m1.raw" && cmp "$SRC/pool/a.img" "$OUT/m2.raw" || fail "two-job transaction: backups differ"
[ -s "$OUT/m1.raw.xxh3" ] || fail "no checksum file next to the target"
[ "$(ls "$MNT/.fleece/jobs/m1")" = status ] || fail "job dir holds: $(ls "$MNT/.fleece/jobs/m1")"
expect ENOENT 'os.stat(A[0])' "$MNT/.fleece/jobs/nosuchjob/status"

check_status_keys() {
	local id=$1 k
	for k in id type image target sync state bytes_total bytes_done cbw_bytes speed rate \
		cbw_wait_us_p50 cbw_wait_us_p99 started start_stall_us finished error; do
		[ "$(grep -c "^$k=" "$MNT/.fleece/jobs/$id/status")" = 1 ] ||
			fail "status of $id does not have exactly one $k=: $(cat "$MNT/.fleece/jobs/$id/status")"
	done
	grep -qvE '^[a-z0-9_]+=' "$MNT/.fleece/jobs/$id/status" &&
		fail "status of $id has a line that is not key=value: $(cat "$MNT/.fleece/jobs/$id/status")"
	return 0
}
check_status_keys m1
size=$(stat -c %s "$SRC/vm.img")
[ "$(status m1 id)" = m1 ] && [ "$(status m1 type)" = backup ] && [ "$(status m1 image)" = vm.img ] &&
	[ "$(status m1 target)" = "$OUT/m1.raw" ] && [ "$(status m1 sync)" = full ] &&
	[ "$(status m1 state)" = completed ] && [ "$(status m1 bytes_total)" = "$size" ] &&
	[ "$(status m1 bytes_done)" = "$size" ] && [ "$(status m1 cbw_bytes)" = 0 ] &&
	[ "$(status m1 speed)" = 0 ] && [ -z "$(status m1 error)" ] ||
	fail "status of m1: $(cat "$MNT/.fleece/jobs/m1/status")"
for k in rate cbw_wait_us_p50 cbw_wait_us_p99; do
	[[ $(status m1 $k) =~ ^[0-9]+$ ]] || fail "m1 $k=$(status m1 $k)"
done
started=$(status m1 started) finished=$(status m1 finished)
[[ $started =~ ^[0-9]+\.[0-9]{9}$ && $finished =~ ^[0-9]+\.[0-9]{9}$ ]] || fail "m1 started=$started finished=$finished"
[ "${started%.*}" -le "${finished%.*}" ] && [ $(($(date +%s) - ${started%.*})) -lt 60 ] || fail "m1 times: $started $finished"
# The guests' pause at the start: one for both jobs of the write.
stall=$(status m1 start_stall_us)
[[ $stall =~ ^[0-9]+$ ]] && [ "$stall" -gt 0 ] && [ "$stall" = "$(status "$m2" start_stall_us)" ] ||
	fail "start_stall_us: m1 $stall, $m2 $(status "$m2" start_stall_us)"
[ "$(status "$m2" image)" = pool/a.img ] || fail "status of $m2: $(cat "$MNT/.fleece/jobs/$m2/status")"

# ---- set speed, running status -----------------------------------------------------------------
ans=$(ctl "backup big.img $OUT/sp.raw speed=1M id=sp") || fail "backup refused: $ans"
check_status_keys sp
[ "$(status sp state)" = running ] && [ -z "$(status sp finished)" ] && [ "$(status sp speed)" = 1048576 ] &&
	[ "$(status sp bytes_total)" = 67108864 ] || fail "status of sp: $(cat "$MNT/.fleece/jobs/sp/status")"
# A backup appears under its name only once complete: meanwhile it is written
# under a hidden name beside it.
[ ! -e "$OUT/sp.raw" ] || fail "a running job's target is already under its name"
case $(hidden_files "$OUT") in *.sp.raw.fleecefs-*.tmp*) ;; *) fail "no hidden target of the running job: $(ls -a "$OUT")";; esac
ctl "set sp speed=2M" >/dev/null || fail "set sp speed=2M refused"
[ "$(status sp speed)" = 2097152 ] || fail "after set speed=2M: speed=$(status sp speed)"
sleep 0.5
done_bytes=$(status sp bytes_done)
[ "$done_bytes" -lt 33554432 ] || fail "at 1-2 MiB/s, $done_bytes bytes were copied in about a second"
[ "$(status sp state)" = running ] || fail "sp is $(status sp state)"
t0=$(date +%s)
ctl "set sp speed=0" >/dev/null || fail "set sp speed=0 refused"
[ "$(status sp speed)" = 0 ] || fail "after set speed=0: speed=$(status sp speed)"
[ "$(wait_job sp 20)" = completed ] || fail "sp: $(cat "$MNT/.fleece/jobs/sp/status")"
[ $(($(date +%s) - t0)) -le 15 ] || fail "sp took $(($(date +%s) - t0)) s after speed=0"
cmp "$SRC/big.img" "$OUT/sp.raw" || fail "sp backup differs"
log "set speed ok"

# ---- cancel and dismiss ------------------------------------------------------------------------------
ans=$(ctl "backup big.img $OUT/cx.raw speed=1M id=cx") || fail "backup refused: $ans"
[ ! -e "$OUT/cx.raw" ] && [ ! -e "$OUT/cx.raw.xxh3" ] || fail "running job cx shows its target or manifest"
[ -n "$(hidden_files "$OUT")" ] || fail "running job cx has no hidden target or manifest"
ans=$(refuse EBUSY "dismiss cx")
grep -q running <<<"$ans" || fail "dismiss of a running job: the message does not name the state: $ans"
[ "$(status cx state)" = running ] || fail "cx is $(status cx state) after a refused dismiss"
ans=$(ctl "cancel cx") || fail "cancel refused: $ans"
[ "$ans" = ok ] || fail "answer to cancel: '$ans'"
[ "$(wait_job cx 20)" = cancelled ] || fail "cx: $(cat "$MNT/.fleece/jobs/cx/status")"
[ ! -e "$OUT/cx.raw" ] && [ ! -e "$OUT/cx.raw.xxh3" ] || fail "cancelled job left $(ls "$OUT" | grep cx)"
[ -z "$(hidden_files "$OUT")" ] || fail "cancelled job left hidden files: $(hidden_files "$OUT")"
[[ $(status cx finished) =~ ^[0-9]+\.[0-9]{9}$ ]] || fail "cancelled job has no finished time"
ans=$(refuse EBUSY "cancel cx")
grep -q cancelled <<<"$ans" || fail "cancel of a cancelled job: the message does not name the state: $ans"
refuse EEXIST "backup tiny.img $OUT/cx2.raw id=cx" "$OUT/cx2.raw" >/dev/null   # still taken
ans=$(ctl "dismiss cx") || fail "dismiss refused: $ans"
[ "$ans" = ok ] || fail "answer to dismiss: '$ans'"
jobs_list | grep -qw cx && fail "dismissed job still listed: $(jobs_list)"
expect ENOENT 'os.stat(A[0])' "$MNT/.fleece/jobs/cx"
refuse ENOENT "dismiss cx" >/dev/null
ans=$(ctl "backup tiny.img $OUT/cx2.raw id=cx") || fail "the id of a dismissed job is not free again: $ans"
[ "$(wait_job cx 20)" = completed ] || fail "cx (second) did not complete"
log "cancel and dismiss ok"

# ---- events -----------------------------------------------------------------------------------------
# record_events OUT IDS...: a background reader, opened now, that blocks in
# read(2) and stops once every ID concluded (or after 30 s).
record_events() {
	"$PY" - "$MNT/.fleece/events" "$@" <<'EOF' &
import os, re, signal, sys
signal.alarm(30)
fd = os.open(sys.argv[1], os.O_RDONLY)
out = sys.argv[2]
waiting = set(sys.argv[3:])
open(out + ".ready", "w").close()
buf = ""
with open(out, "w") as f:
    while waiting:
        buf += os.read(fd, 4096).decode()
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            f.write(line + "\n")
            f.flush()
            m = re.search(r" id=(\S+) .*event=(completed|failed|cancelled)", line)
            if m:
                waiting.discard(m.group(1))
EOF
	BG_PIDS+=("$!")
	for _ in $(seq 100); do [ -e "$1.ready" ] && return 0; sleep 0.05; done
	fail "events reader did not start"
}
record_events "$T/ev.a" ev1 ev2
pid_a=${BG_PIDS[-1]}
record_events "$T/ev.b" ev1 ev2
pid_b=${BG_PIDS[-1]}
ctl "backup vm.img $OUT/ev1.raw id=ev1" >/dev/null || fail "backup ev1 refused"
ctl "backup big.img $OUT/ev2.raw id=ev2 speed=1M" >/dev/null || fail "backup ev2 refused"
[ "$(wait_job ev1 20)" = completed ] || fail "ev1 did not complete"
ctl "cancel ev2" >/dev/null || fail "cancel ev2 refused"
[ "$(wait_job ev2 20)" = cancelled ] || fail "ev2 not cancelled"
now=$(date +%s)
for pid in "$pid_a" "$pid_b"; do
	wait_gone "$pid" 10 || fail "an events reader did not get the conclusion events"
	wait "$pid" || fail "an events reader failed"
done
for f in "$T/ev.a" "$T/ev.b"; do
	got=$(grep -E ' id=ev[12] ' "$f" | sed -E 's/^time=[0-9]+\.[0-9]{9} //' | tr '\n' '|')
	ev1=$(grep -E ' id=ev1 ' "$f" | sed -E 's/^time=[0-9]+\.[0-9]{9} //' | tr '\n' '|')
	ev2=$(grep -E ' id=ev2 ' "$f" | sed -E 's/^time=[0-9]+\.[0-9]{9} //' | tr '\n' '|')
	[ "$ev1" = "id=ev1 type=backup event=started|id=ev1 type=backup event=completed|" ] ||
		fail "events for ev1: $ev1 (all: $(cat "$f"))"
	[ "$ev2" = "id=ev2 type=backup event=started|id=ev2 type=backup event=cancelled|" ] ||
		fail "events for ev2: $ev2 (all: $(cat "$f"))"
	grep -vE '^time=[0-9]+\.[0-9]{9} id=[A-Za-z0-9._-]+ type=backup event=[a-z]+( error=.*)?$' "$f" &&
		fail "event lines not in the SPEC format (above)"
	awk -v now="$now" '{ split($1, a, "="); t = a[2] + 0; if (t < prev || t > now + 5 || t < now - 60) bad = 1; prev = t }
		END { exit bad }' "$f" || fail "event times out of order or off the clock: $(cat "$f")"
done
# A reader opened now sees nothing of the past; poll(2) reports POLLIN only
# when an event is pending.
"$PY" - "$MNT/.fleece/events" "$MNT/.fleece/ctl" "$OUT/ev3.raw" "$MNT/.fleece/jobs/ev3/status" <<'EOF' || fail "events from the moment of open / poll"
import os, select, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
p = select.poll()
p.register(fd, select.POLLIN)
if p.poll(300):
    sys.exit(f"poll reports an event on a fresh reader though nothing happened: {p.poll(0)}")
small = os.open(sys.argv[1], os.O_RDONLY)   # read 7 bytes at a time below
c = os.open(sys.argv[2], os.O_RDWR)
os.write(c, f"backup tiny.img {sys.argv[3]} id=ev3\n".encode())
deadline = time.time() + 20
while "state=completed" not in open(sys.argv[4]).read():
    if time.time() > deadline:
        sys.exit("ev3 did not complete")
    time.sleep(0.02)
got = ""
while "event=completed" not in got:
    r = p.poll(5000)
    if not r or not r[0][1] & select.POLLIN:
        sys.exit(f"no POLLIN although events are pending (got so far: {got!r})")
    got += os.read(fd, 4096).decode()
lines = got.splitlines()
if any(" id=ev1 " in l or " id=ev2 " in l for l in lines):
    sys.exit(f"a reader opened later saw earlier events: {got!r}")
if [l.split(" ", 1)[1] for l in lines if " id=ev3 " in l] != ["id=ev3 type=backup event=started",
                                                                 "id=ev3 type=backup event=completed"]:
    sys.exit(f"events for ev3: {got!r}")
if p.poll(300):
    sys.exit("poll reports POLLIN after every event was read")
pieces = ""
while pieces.count("\n") < len(lines):
    piece = os.read(small, 7).decode()
    if not 0 < len(piece) <= 7:
        sys.exit(f"a 7-byte read returned {piece!r}")
    pieces += piece
if pieces.splitlines() != lines:
    sys.exit(f"small reads give {pieces!r}, whole reads {got!r}")
EOF
log "events ok"

# A reader blocked in read(2) and killed with SIGKILL goes away at once, and
# the daemon goes on. (Run inside a subshell whose stderr is discarded, so
# that the shell does not report the kill.)
(
	"$PY" - "$MNT/.fleece/events" "$T/blocked" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
os.read(fd, 4096)
EOF
	true   # (not the last command: the subshell must not become python)
) 2>/dev/null &
wrapper=$!
BG_PIDS+=("$wrapper")
for _ in $(seq 100); do [ -s "$T/blocked" ] && break; sleep 0.05; done
blocked=$(cat "$T/blocked") || fail "the blocked reader did not start"
BG_PIDS+=("$blocked")
for _ in $(seq 100); do [ "$(awk '{ print $3 }' "/proc/$blocked/stat" 2>/dev/null)" = S ] && break; sleep 0.02; done
sleep 0.2   # inside read(2), parked in the daemon
kill -9 "$blocked"
wait_gone "$blocked" 5 || fail "a reader blocked on .fleece/events does not die from SIGKILL"
wait "$wrapper" || true
grep -q '^version=' "$MNT/.fleece/version" || fail "the daemon stopped answering after a killed reader"
record_events "$T/ev.c" ev4
pid_c=${BG_PIDS[-1]}
ctl "backup tiny.img $OUT/ev4.raw id=ev4" >/dev/null || fail "backup ev4 refused"
[ "$(wait_job ev4 20)" = completed ] || fail "ev4 did not complete"
wait_gone "$pid_c" 10 || fail "a new events reader got nothing after a killed one"
log "killed reader ok"

# ---- retention: at most 64 concluded jobs, the oldest dropped -------------------------------------
for id in $(ls "$MNT/.fleece/jobs"); do ctl "dismiss $id" >/dev/null || fail "dismiss $id refused"; done
[ -z "$(jobs_list)" ] || fail "jobs left after dismissing all: $(jobs_list)"
ans=$(ctl "backup big.img $OUT/keeper.raw id=keeper speed=1M checksum=none") || fail "backup keeper refused: $ans"
"$PY" - "$MNT/.fleece/ctl" "$OUT" <<'EOF' || fail "66 backups"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for i in range(1, 67):
    os.write(fd, f"backup tiny.img {sys.argv[2]}/r{i:02}.raw id=r{i:02} checksum=none\n".encode())
    a = os.read(fd, 4096)
    if a != f"ok id=r{i:02}\n".encode():
        sys.exit(f"backup r{i:02}: {a!r}")
EOF
want_r=$(for i in $(seq 3 66); do printf 'r%02d ' "$i"; done)
for _ in $(seq 200); do
	[ "$(jobs_list)" = "keeper $want_r" ] && break
	sleep 0.05
done
[ "$(jobs_list)" = "keeper $want_r" ] || fail "after 66 concluded jobs and a running one, listed: $(jobs_list)"
for i in $(seq 3 66); do
	[ "$(status "$(printf r%02d "$i")" state)" = completed ] || fail "r$i: $(status "$(printf r%02d "$i")" state)"
done
[ "$(status keeper state)" = running ] || fail "keeper is $(status keeper state)"
ctl "cancel keeper" >/dev/null || fail "cancel keeper refused"
# The job that just concluded is the newest concluded one: it stays, and the
# oldest remaining concluded one goes.
keeper_kept() {
	for _ in $(seq 200); do
		[ -e "$MNT/.fleece/jobs/keeper" ] || break
		[ "$(status keeper state)" = cancelled ] && break
		sleep 0.05
	done
	[ -e "$MNT/.fleece/jobs/keeper" ] ||
		fail "the job that just concluded (keeper) was dropped at once: listed $(jobs_list)"
	[ "$(status keeper state)" = cancelled ] || fail "keeper is $(status keeper state)"
	want=$(for i in $(seq 4 66); do printf 'r%02d ' "$i"; done)
	[ "$(jobs_list)" = "keeper $want" ] || fail "after keeper concluded, listed: $(jobs_list)"
}
soft keeper_kept
[ "$(ls "$MNT/.fleece/jobs" | wc -l)" = 64 ] || fail "$(ls "$MNT/.fleece/jobs" | wc -l) jobs listed, want 64"
log "retention checked"

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "fleecefs exited $DAEMON_RC"
end_test
