#!/usr/bin/env bash
# fleecectl (SPEC section 7) against a live mount: every verb; exit codes
# for completed (0), failed and cancelled jobs and refused commands (1),
# usage errors (2) and an unreachable mount (3); finding the mount (-m,
# $FLEECE_MOUNT, the only one, several); transactions from the command line
# and a file; --json that python parses; the progress bar under a real
# terminal (script(1)) and plain lines into a pipe; restore of raw and qcow2
# points, refusals, and a damaged chain that leaves no DEST.
. "$TESTS_DIR/lib.sh"

: "${FLEECECTL:?FLEECECTL must point at the fleecectl binary (run through make check)}"
command -v qemu-img >/dev/null || fail "qemu-img is needed (apt-get install qemu-utils)"
command -v script >/dev/null || fail "script(1) is needed (apt-get install util-linux)"
M=$((1024 * 1024))
# fc WANT_RC ARGS...: fleecectl -m $MNT ARGS exits WANT_RC; stdout in $FC_OUT,
# stderr in $FC_ERR.
fc() {
	local want=$1 rc=0
	shift
	"$FLEECECTL" -m "$MNT" "$@" >"$T/fc.out" 2>"$T/fc.err" || rc=$?
	FC_OUT=$(cat "$T/fc.out") FC_ERR=$(cat "$T/fc.err")
	[ "$rc" = "$want" ] || fail "fleecectl $*: exit $rc, want $want; out: $FC_OUT; err: $FC_ERR"
}
# json_lines TEXT: every line parses as a JSON object; prints how many.
json_lines() {
	"$PY" -c "
import json, sys
n = 0
for line in sys.stdin.read().splitlines():
    assert isinstance(json.loads(line), dict), line
    n += 1
print(n)" <<<"$1" || fail "not JSON lines: $1"
}

random_image "$SRC/a.img" 16M
random_image "$SRC/b.img" 8M
mount_fleece

log "commands, and what they answer"
fc 0 bitmap add a.img b1
want_eq "bitmap add answer" "$FC_OUT" ok
fc 0 backup --wait a.img "$OUT/a-full.raw" bitmap=b1 id=full
want_match "a completed job's last line" "$FC_OUT" "^full: completed$"
same "the waited backup" "$SRC/a.img" "$OUT/a-full.raw"
fc 1 backup a.img "$OUT/a-full.raw" id=again
want_match "a refused command" "$FC_ERR" "already exists.*\(File exists\)"
[ -z "$FC_OUT" ] || fail "a refused command printed on stdout: $FC_OUT"
fc 1 backup nosuch.img "$OUT/x.raw" id=x
want_match "an unknown image" "$FC_ERR" "nosuch.img"
[ ! -e "$OUT/x.raw" ] || fail "a refused backup left its target"
# mirror: refused like any verb, then one that is completed.
fc 1 mirror a.img "$OUT/a-full.raw" id=m
want_match "mirror refused" "$FC_ERR" "already exists.*\(File exists\)"
random_image "$SRC/m.img" 4M
fc 0 mirror --wait m.img "$T/m-moved.img" id=m
want_match "mirror --wait returns when ready" "$FC_OUT" "^m: ready$"
fc 0 wait --ready m
want_eq "m state" "$(status m state)" ready
fc 0 complete m
fc 0 wait m
want_match "the completed mirror" "$FC_OUT" "^m: completed$"
same "m.img mirrored" "$MNT/m.img" "$T/m-moved.img"
# Words with blanks are quoted for the control language.
mkdir -p "$T/with space"
fc 0 backup --wait b.img "$T/with space/b copy.raw" id=spaced
same "a target with blanks" "$SRC/b.img" "$T/with space/b copy.raw"

log "a failed and a cancelled job exit 1; pause, resume, set, complete, dismiss"
inject "target-write offset=4M-5M from=1 errno=EIO"
fc 1 backup --wait a.img "$OUT/fail.raw" id=failing
inject clear
want_match "a failed job" "$FC_OUT" "^failing: failed: .*"
fc 0 backup a.img "$OUT/slow.raw" speed=1M id=slow
"$FLEECECTL" -m "$MNT" wait slow >"$T/wait.out" 2>&1 &
WAITER=$!
BG_PIDS+=("$WAITER")
sleep 0.5
fc 0 pause slow
want_eq "paused" "$(status slow state)" paused
fc 1 pause slow
want_match "an illegal verb" "$FC_ERR" "paused"
fc 0 resume slow
fc 0 set slow speed=2M
want_eq "speed set" "$(status slow speed)" $((2 * M))
fc 0 cancel slow
rc=0; wait "$WAITER" || rc=$?
BG_PIDS=()
want_eq "wait on a cancelled job" $rc 1
want_match "its line" "$(cat "$T/wait.out")" "^slow: cancelled"
fc 0 backup b.img "$OUT/none.raw" sync=none id=fleece
fc 0 complete fleece
fc 0 wait fleece
want_match "completed by complete" "$FC_OUT" "^fleece: completed$"
fc 0 dismiss fleece
fc 1 status fleece
want_match "a dismissed job" "$FC_ERR" "no job fleece"
fc 0 wait full
want_match "waiting for a job that already concluded" "$FC_OUT" "^full: completed$"

log "transactions: arguments, a file, both images at one point in time"
fc 0 txn --wait "backup a.img $OUT/ta.raw id=ta" "backup b.img $OUT/tb.raw id=tb"
want_match "the answer names both" "$FC_OUT" "ok id=ta id=tb"
want_match "both waited" "$FC_OUT" "ta: completed"
want_match "both waited" "$FC_OUT" "tb: completed"
printf 'backup a.img %s id=fa\nbackup b.img %s id=fb\n' "$OUT/fa.raw" "$OUT/fb.raw" > "$T/txn"
fc 0 txn --wait -f "$T/txn"
same "txn file a" "$SRC/a.img" "$OUT/fa.raw"
same "txn file b" "$SRC/b.img" "$OUT/fb.raw"
# All or nothing: one bad line, no job at all.
fc 1 txn "backup a.img $OUT/tc.raw id=tc" "backup nosuch.img $OUT/td.raw id=td"
[ ! -e "$MNT/.fleece/jobs/tc" ] && [ ! -e "$OUT/tc.raw" ] || fail "a refused transaction started a job"

log "snapshots, bitmaps and jobs in list; status, events and wait as JSON"
fc 0 snapshot s1 a.img b.img
fc 0 list
want_match "list: a job" "$FC_OUT" "backup +full +a.img +completed"
want_match "list: the snapshot" "$FC_OUT" "snapshot +s1 "
want_match "list: the bitmap" "$FC_OUT" "bitmap +b1 +a.img +active"
fc 0 list --json
[ "$(json_lines "$FC_OUT")" -ge 3 ] || fail "list --json: $FC_OUT"
grep -q '"kind":"bitmap"' <<<"$FC_OUT" || fail "list --json has no bitmap: $FC_OUT"
fc 0 release s1
fc 0 status --json full
"$PY" -c "import json, sys; d = json.loads(sys.argv[1]); assert d['id'] == 'full' and d['state'] == 'completed' and d['bytes_done'] == 16777216, d" "$FC_OUT" ||
	fail "status --json: $FC_OUT"
fc 0 status
want_match "status of all jobs" "$FC_OUT" "id=ta"
"$FLEECECTL" -m "$MNT" events --json -n 2 >"$T/events.out" 2>&1 &
EV=$!
BG_PIDS+=("$EV")
sleep 0.3
fc 0 --json backup --wait b.img "$OUT/ev.raw" id=ev
[ "$(json_lines "$FC_OUT")" -ge 2 ] || fail "backup --json --wait: $FC_OUT"
"$PY" -c "import json, sys; d = json.loads(sys.argv[1].splitlines()[-1]); assert d['final'] == 'completed' and d['id'] == 'ev', d" "$FC_OUT" ||
	fail "the last --json line of wait: $FC_OUT"
wait "$EV" || fail "events -n 2 failed"
BG_PIDS=()
want_eq "two events" "$(json_lines "$(cat "$T/events.out")")" 2
"$PY" -c "
import json, sys
e = [json.loads(l) for l in open(sys.argv[1])]
assert [x['event'] for x in e] == ['started', 'completed'] and all(x['id'] == 'ev' for x in e), e" "$T/events.out" ||
	fail "events: $(cat "$T/events.out")"

log "the progress bar on a terminal; plain lines into a pipe"
script -qfec "$FLEECECTL -m $MNT backup --wait a.img $OUT/tty.raw speed=8M id=tty" "$T/typescript" >/dev/null
"$PY" - "$T/typescript" <<'PY' || fail "the terminal progress: $(tr '\r\033' '|~' < "$T/typescript" | tail -c 400)"
import re, sys
# The terminal turns each newline into \r\n: only a lone \r redraws.
t = open(sys.argv[1], "rb").read().decode().replace("\r\n", "\n")
frames = t.split("\r")
assert len(frames) >= 3, "not redrawn in place"
assert "\x1b[K" in t, "no line clearing"
assert re.search(r"tty \[#{40}\] 100\.0%", frames[-1]), frames[-1][-200:]
assert re.search(r"\d+\.\d%", frames[1]), frames[1]
assert "tty: completed" in frames[-1]
PY
fc 0 backup --wait a.img "$OUT/pipe.raw" speed=8M id=pipe
if grep -q $'\033\|\r' "$T/fc.out"; then fail "escape codes into a pipe: $(cat -A "$T/fc.out")"; fi
want_match "plain lines" "$FC_OUT" "^pipe: completed$"

log "usage errors exit 2, an unreachable mount 3"
fc 2 frobnicate
fc 2 wait
fc 0 restore -h
want_match "per-verb help" "$FC_OUT" "usage: fleecectl .*restore .*BACKUP DEST"
rc=0; "$FLEECECTL" -m "$T/nowhere" list >/dev/null 2>"$T/err" || rc=$?
want_eq "no such mount" $rc 3
want_match "it says where" "$(cat "$T/err")" "$T/nowhere: not a fleecefs mount"
rc=0; FLEECE_MOUNT=$MNT "$FLEECECTL" status full >/dev/null || rc=$?
want_eq "FLEECE_MOUNT" $rc 0
# Finding the mount, in a mount namespace of our own (the host keeps its
# mounts; other tests may have theirs).
mkdir -p "$T/mnt2" "$T/src2"
"$FLEECEFS" -f "$T/src2" "$T/mnt2" 2>>"$T/daemon2.log" &
D2=$!
BG_PIDS+=("$D2")
for _ in $(seq 100); do [ -e "$T/mnt2/.fleece/version" ] && break; sleep 0.05; done
unshare -m --propagation private bash -s "$FLEECECTL" "$MNT" "$T/mnt2" "$T/ns.err" >"$T/ns.out" 2>&1 <<'NS' || fail "in a namespace: $(cat "$T/ns.out")"
set -u
fc=$1 mine=$2 other=$3 err=$4
# Only our two mounts stay visible here.
awk '$3 == "fuse.fleecefs" { print $2 }' /proc/self/mounts | while read -r m; do
	[ "$m" = "$mine" ] || [ "$m" = "$other" ] || umount -l "$m"
done
rc=0; "$fc" list >/dev/null 2>"$err" || rc=$?
[ "$rc" = 2 ] && grep -q "2 fleecefs mounts" "$err" && grep -q "$mine" "$err" || { echo "two mounts: $rc $(cat "$err")"; exit 1; }
umount -l "$other"
"$fc" status full | grep -q "^id=full$" || { echo "the only mount was not found"; exit 1; }
umount -l "$mine"
rc=0; "$fc" list >/dev/null 2>"$err" || rc=$?
[ "$rc" = 3 ] && grep -q "no fleecefs mount found" "$err" || { echo "no mount: $rc $(cat "$err")"; exit 1; }
NS
fusermount3 -u "$T/mnt2"
wait "$D2" || fail "the second daemon failed"
BG_PIDS=()

log "restore: a raw backup, a qcow2 chain's points, holes kept"
truncate -s 24M "$SRC/a.img"     # a hole at the end
fc 0 bitmap add a.img q
fc 0 backup --wait a.img "$OUT/q0.qcow2" bitmap=q id=q0
cp "$SRC/a.img" "$T/ref0"
pwrites a.img $((2 * M)):100000 $((9 * M + 7)):5000
fc 0 backup --wait a.img "$OUT/q1.qcow2" sync=incremental bitmap=q id=q1
cp "$SRC/a.img" "$T/ref1"
fc 0 restore "$OUT/q1.qcow2" "$T/r1.raw"
want_match "the summary" "$FC_OUT" "r1.raw: restored from .*q1.qcow2: 25165824 bytes, 384 clusters checked, 128 left as holes"
same "restored from the incremental" "$T/ref1" "$T/r1.raw"
[ "$(du -k "$T/r1.raw" | cut -f1)" -le $((17 * 1024)) ] || fail "holes were written: $(du -k "$T/r1.raw")"
fc 0 restore "$OUT/q0.qcow2" "$T/r0.raw"
same "restored from the full" "$T/ref0" "$T/r0.raw"
fc 0 restore "$OUT/a-full.raw" "$T/rr.raw"
cmp -s "$T/rr.raw" "$OUT/a-full.raw" || fail "restore of a raw backup differs"
fc 2 restore "$OUT/q1.qcow2" "$T/r1.raw"
want_match "DEST exists" "$FC_ERR" "exists \(--overwrite writes over it\)"
[ -z "$(hidden_files "$T")" ] || fail "restore left hidden files: $(hidden_files "$T")"

log "restore over an image through the mount: only when nothing has it open"
cp "$SRC/b.img" "$T/b-before"
fc 0 backup --wait b.img "$OUT/b0.raw" id=b0
pwrites b.img 0:1048576
exec 7<"$MNT/b.img"
fc 2 restore --overwrite "$OUT/b0.raw" "$MNT/b.img"
want_match "an open image" "$FC_ERR" "is open by process [0-9]+"
exec 7<&-
fc 0 restore --overwrite "$OUT/b0.raw" "$MNT/b.img"
same "b.img restored in place" "$T/b-before" "$SRC/b.img"

log "restore of a damaged chain: exit 1, no DEST"
read -r virt host <<<"$(qemu-img map --output=json "$OUT/q1.qcow2" | "$PY" -c "
import json, sys
e = next(e for e in json.load(sys.stdin) if e['data'] and e['depth'] == 1 and 'offset' in e)
print(e['start'], e['offset'])")"
cp "$OUT/q0.qcow2" "$T/q0-good"
"$PY" -c "
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR); o = int(sys.argv[2])
os.pwrite(fd, bytes([os.pread(fd, 1, o)[0] ^ 1]), o)" "$OUT/q0.qcow2" $((host + 10))
fc 1 restore "$OUT/q1.qcow2" "$T/bad.raw"
want_match "the bad cluster" "$FC_ERR" "bad cluster at offset $virt .*q0.qcow2"
[ ! -e "$T/bad.raw" ] || fail "a failed restore left DEST"
[ -z "$(hidden_files "$T")" ] || fail "a failed restore left hidden files: $(hidden_files "$T")"
fc 1 restore --overwrite "$OUT/q1.qcow2" "$T/r1.raw"
same "an image a bad backup did not touch" "$T/ref1" "$T/r1.raw"
cp "$T/q0-good" "$OUT/q0.qcow2"

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"
log "ok"
