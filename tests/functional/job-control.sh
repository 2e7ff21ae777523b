#!/bin/bash
# job-control: the job verbs of SPEC section 3 on live jobs.
#  - pause/resume of a rate-limited backup: bytes_done frozen while paused,
#    copy-before-write going on (cbw_bytes grows, guest writes do not hang),
#    resume moves it again; the target is the image at the point in time.
#  - set ID speed= at runtime: the status shows it at once and the measured
#    rate follows (slow -> fast -> slow, and set while paused, then resumed).
#  - events started, paused, resumed, completed in order, in the SPEC format.
#  - every verb in every state (running, paused, completed, failed,
#    cancelled): the illegal ones fail with EBUSY, one answer line naming
#    verb, job and state, and change nothing (no state, speed or progress
#    change, no event); the legal ones succeed. Concluded ids stay taken
#    until dismiss; unknown ids are ENOENT; two verbs on one job in one write
#    are EINVAL and neither takes effect.
. "$TESTS_DIR/lib.sh"

# lib.sh's ctl runs python3 for every command: prefer the system python over
# a version manager's shim, which costs ~100 ms a start.
if [ -x /usr/bin/python3 ] && [ "$(command -v python3)" != /usr/bin/python3 ]; then
	mkdir -p "$T/bin" && ln -s /usr/bin/python3 "$T/bin/python3" && PATH="$T/bin:$PATH"
fi

M=1048576
jobs_list() { ls -A "$MNT/.fleece/jobs" | sort | tr '\n' ' '; }

# events_of FILE ID: that job's events, without the time, one per line.
events_of() { grep -E "^time=[0-9]+\.[0-9]{9} id=$2 " "$1" | sed -E 's/^time=[0-9.]+ //' || true; }

# measure_rate ID SECONDS: bytes_done of job ID per second over a window.
measure_rate() {
	"$PY" - "$MNT/.fleece/jobs/$1/status" "$2" <<'EOF'
import sys, time
def done():
    for l in open(sys.argv[1]):
        if l.startswith("bytes_done="):
            return int(l.split("=", 1)[1])
t0 = time.monotonic(); b0 = done()
time.sleep(float(sys.argv[2]))
b1 = done(); t1 = time.monotonic()
print(int((b1 - b0) / (t1 - t0)))
EOF
}
# in_range VALUE LOW HIGH WHAT
in_range() {
	[ "$1" -ge "$2" ] && [ "$1" -le "$3" ] || fail "$4: $1 not in [$2, $3]"
}
# rate_check ID SPEED WHAT: the measured rate of job ID follows SPEED. Every
# 1 s window must stay below 1.5 x SPEED + 512K (the limiter's job, whatever
# the load); one of up to 5 windows must reach 0.6 x SPEED (the machine may
# be busy: the copy reads with O_DIRECT). Prints the rates measured.
rate_check() {
	local id=$1 speed=$2 what=$3 r seen=""
	for _ in 1 2 3 4 5; do
		r=$(measure_rate "$id" 1.0)
		seen+="$r "
		[ "$r" -le $((speed * 3 / 2 + 524288)) ] || fail "$what: rate $r B/s over speed $speed (windows: $seen)"
		if [ "$r" -ge $((speed * 6 / 10)) ]; then
			echo "$seen"
			return 0
		fi
	done
	fail "$what: rate stays below 0.6 x $speed (windows: $seen)"
}

# =============================================================================
# 1. pause / resume / set speed / events on one rate-limited backup
# =============================================================================
random_image "$SRC/vm.img" 64M
cp "$SRC/vm.img" "$T/base"      # the image at the point in time: the guest writes only later
cp "$SRC/vm.img" "$T/shadow"    # what the image must hold at the end
mount_fleece

events_start "$T/ev.pr"
t_start=$(date +%s)
ans=$(ctl "backup vm.img $OUT/pr.raw id=pr speed=1M") || fail "backup pr refused: $ans"
[ "$ans" = "ok id=pr" ] || fail "answer '$ans'"
[ "$(status pr state)" = running ] && [ "$(status pr speed)" = $((1 * M)) ] ||
	fail "pr: $(cat "$MNT/.fleece/jobs/pr/status")"

# The rate follows the speed: 1M, then 4M set while running, then 1M again.
# (The ranges [0.6M, 2M] and [2.4M, 6.5M] do not overlap.)
log "speed=1M: measured $(rate_check pr $((1 * M)) "speed=1M")B/s"
ans=$(ctl "set pr speed=4M") || fail "set pr speed=4M refused: $ans"
[ "$ans" = ok ] || fail "answer to set: '$ans'"
[ "$(status pr speed)" = $((4 * M)) ] || fail "after set speed=4M the status says speed=$(status pr speed)"
log "speed=4M: measured $(rate_check pr $((4 * M)) "speed=4M")B/s"
ctl "set pr speed=1M" >/dev/null || fail "set pr speed=1M refused"
[ "$(status pr speed)" = $((1 * M)) ] || fail "after set speed=1M the status says speed=$(status pr speed)"
# Chunks the copy workers sized at 4M are still copied at once and paid for
# at 1M (a short stall follows): let that pass first.
sleep 1
log "speed=1M again: measured $(rate_check pr $((1 * M)) "speed=1M after 4M")B/s"
[ "$(status pr cbw_bytes)" = 0 ] || fail "cbw_bytes=$(status pr cbw_bytes) before any guest write"
[ "$(status pr bytes_done)" -lt $((30 * M)) ] || fail "pr copied $(status pr bytes_done) bytes already"

# Pause: the background copy stops, copy-before-write goes on.
ans=$(ctl "pause pr") || fail "pause pr refused: $ans"
[ "$ans" = ok ] || fail "answer to pause: '$ans'"
[ "$(status pr state)" = paused ] || fail "after pause: state=$(status pr state)"
frozen=$(status pr bytes_done)
# A speed set while paused shows at once and does not wake the copy. (Set
# now, so that a copy going on during the pause would go at 4M/s.)
ctl "set pr speed=4M" >/dev/null || fail "set pr speed=4M (paused) refused"
[ "$(status pr speed)" = $((4 * M)) ] && [ "$(status pr state)" = paused ] ||
	fail "after set speed=4M while paused: $(cat "$MNT/.fleece/jobs/pr/status")"
# A guest writes the upper half (not copied yet) while we watch bytes_done.
"$PY" - "$MNT/vm.img" "$T/shadow" "$T/guest.out" <<'EOF' &
import os, random, signal, sys, time
signal.alarm(30)
fd = os.open(sys.argv[1], os.O_RDWR)
shadow = open(sys.argv[2], "r+b")
rng = random.Random(7)
worst = 0.0
for i in range(40):
    off = rng.randrange(32 << 20, (64 << 20) - 200000)
    data = rng.randbytes(rng.randint(1, 150000))
    t0 = time.monotonic()
    n = os.pwrite(fd, data, off)
    worst = max(worst, time.monotonic() - t0)
    assert n == len(data), (n, len(data))
    shadow.seek(off); shadow.write(data)
    time.sleep(0.025)
t0 = time.monotonic()
os.fsync(fd)
worst = max(worst, time.monotonic() - t0)
open(sys.argv[3], "w").write(f"{worst:.3f}\n")
EOF
guest=$!
BG_PIDS+=("$guest")
samples=""
for _ in 1 2 3 4 5 6; do
	samples+="$(status pr bytes_done) "
	sleep 0.2
done
wait "$guest" || fail "the guest writer failed (or hung) while the job was paused"
worst=$(cat "$T/guest.out")
log "paused: bytes_done samples $samples(frozen at $frozen); slowest guest write ${worst}s"
for s in $samples; do [ "$s" = "$frozen" ] || fail "bytes_done moved while paused: $samples (frozen at $frozen)"; done
awk -v w="$worst" 'BEGIN { exit !(w < 5.0) }' || fail "a guest write took ${worst}s while the job was paused"
cbw=$(status pr cbw_bytes)
[ "$cbw" -gt 0 ] || fail "cbw_bytes=$cbw: no copy-before-write while paused"
[ "$(status pr bytes_done)" = "$frozen" ] && [ "$(status pr state)" = paused ] ||
	fail "after the guest writes: $(cat "$MNT/.fleece/jobs/pr/status")"
sleep 0.3
[ "$(status pr bytes_done)" = "$frozen" ] || fail "bytes_done moved while paused"

# Resume: running again, bytes_done moves, at the new speed. The status is
# read right after the resume, in the same process: by then the live
# bytes_done is frozen + cbw + what the copy did in the pause (nothing, but
# for the chunks in flight at pause and at resume: at most ~1M; a copy that
# went on during the ~1.8 s pause at 4M/s would show ~7M).
out=$("$PY" - "$MNT/.fleece/ctl" "$MNT/.fleece/jobs/pr/status" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.write(fd, b"resume pr\n")
ans = os.read(fd, 4096).decode().strip()
st = dict(l.split("=", 1) for l in open(sys.argv[2]).read().splitlines())
print(ans, st["state"], st["bytes_done"])
EOF
) || fail "resume pr refused: $out"
read -r ans state b1 <<<"$out"
[ "$ans" = ok ] || fail "answer to resume: '$ans'"
[ "$state" = running ] || fail "after resume: state=$state"
[ "$b1" -ge $((frozen + cbw)) ] || fail "after resume bytes_done=$b1 < frozen $frozen + cbw $cbw"
[ "$b1" -le $((frozen + cbw + 5 * M / 2)) ] ||
	fail "the background copy went on while paused: bytes_done $frozen at pause, $b1 at resume (cbw $cbw)"
log "bytes_done $frozen at pause, $b1 right after resume, cbw $cbw"
moved=
for _ in $(seq 60); do
	[ "$(status pr bytes_done)" -gt "$b1" ] && { moved=1; break; }
	sleep 0.05
done
[ -n "$moved" ] || fail "bytes_done does not move after resume ($b1)"
log "resumed at speed=4M (set while paused): measured $(rate_check pr $((4 * M)) "speed=4M after resume")B/s"
# status rate= covers about the last second: it shows the speed once the job
# has run that long since the resume.
rate_shown() {
	local r
	for _ in $(seq 40); do
		r=$(status pr rate)
		[ "$r" -ge $((2 * M)) ] && [ "$r" -le $((7 * M)) ] && return 0
		sleep 0.1
	done
	fail "status rate=$r at speed=4M, after more than a second of running"
}
soft rate_shown

ctl "set pr speed=0" >/dev/null || fail "set pr speed=0 refused"
[ "$(wait_job pr 40)" = completed ] || fail "pr: $(cat "$MNT/.fleece/jobs/pr/status")"
cmp "$T/base" "$OUT/pr.raw" || fail "the target is not the image at the point in time"
cmp "$T/shadow" "$SRC/vm.img" || fail "the image lost guest writes made while the job was paused"
python3 "$TESTS_DIR/manifest_check.py" "$OUT/pr.raw" >/dev/null || fail "pr manifest"
[ "$(status pr bytes_done)" = $((64 * M)) ] && [ "$(status pr cbw_bytes)" = "$cbw" ] ||
	fail "pr at the end: $(cat "$MNT/.fleece/jobs/pr/status")"
events_stop "$T/ev.pr"
got=$(events_of "$T/ev.pr" pr | tr '\n' '|')
[ "$got" = "id=pr type=backup event=started|id=pr type=backup event=paused|id=pr type=backup event=resumed|id=pr type=backup event=completed|" ] ||
	fail "events of pr: $got (all: $(cat "$T/ev.pr"))"
grep -vE '^time=[0-9]+\.[0-9]{9} id=[A-Za-z0-9._-]+ type=backup event=[a-z]+( error=.*)?$' "$T/ev.pr" &&
	fail "event lines not in the SPEC format (above)"
awk '{ split($1, a, "="); t = a[2] + 0; if (t < prev) bad = 1; prev = t } END { exit bad }' "$T/ev.pr" ||
	fail "event times out of order: $(cat "$T/ev.pr")"
log "pause/resume/speed/events ok ($(($(date +%s) - t_start)) s)"

# =============================================================================
# 2. every verb in every state
# =============================================================================
random_image "$SRC/tiny.img" 4096
random_image "$SRC/small.img" $((1 * M))
for n in r p x; do random_image "$SRC/$n.img" $((16 * M)); done

# completed
ctl "backup tiny.img $OUT/vc.raw id=vc" >/dev/null || fail "backup vc refused"
[ "$(wait_job vc 20)" = completed ] || fail "vc did not complete"
# failed: the first read of the image fails (no other job reads meanwhile)
echo "source-read errno=EIO" > "$MNT/.fleece/inject"
ctl "backup small.img $OUT/vf.raw id=vf" >/dev/null || fail "backup vf refused"
[ "$(wait_job vf 20)" = failed ] || fail "vf: $(cat "$MNT/.fleece/jobs/vf/status")"
echo clear > "$MNT/.fleece/inject"
case $(status vf error) in *"Input/output error"*) ;; *) fail "vf error=$(status vf error)";; esac
[ ! -e "$OUT/vf.raw" ] && [ ! -e "$OUT/vf.raw.xxh3" ] || fail "the failed job left its target"
# cancelled
ctl "backup x.img $OUT/vx.raw id=vx speed=256K" >/dev/null || fail "backup vx refused"
ans=$(ctl "cancel vx") || fail "cancel of running vx refused: $ans"
[ "$ans" = ok ] || fail "answer to cancel: '$ans'"
[ "$(wait_job vx 20)" = cancelled ] || fail "vx: $(status vx state)"
[ ! -e "$OUT/vx.raw" ] && [ ! -e "$OUT/vx.raw.xxh3" ] || fail "the cancelled job left its target"
# running and paused, slow enough to stay so for a minute
ctl "backup r.img $OUT/vr.raw id=vr speed=256K
backup p.img $OUT/vp.raw id=vp speed=256K" >/dev/null || fail "backups vr, vp refused"
ctl "pause vp" >/dev/null || fail "pause vp refused"
[ "$(status vr state)" = running ] && [ "$(status vp state)" = paused ] || fail "vr/vp not running/paused"

# What must not change when a verb is refused: for a job that runs, its state,
# speed, error and times; for the others every key but rate.
fingerprint() {
	if [ "$(status "$1" state)" = running ]; then
		grep -E '^(state|speed|error|started|finished|group)=' "$MNT/.fleece/jobs/$1/status"
	else
		grep -vE '^rate=' "$MNT/.fleece/jobs/$1/status"
	fi
}
# illegal ID VERB STATE
illegal() {
	local id=$1 verb=$2 state=$3 cmd before after ans re applies want
	cmd="$verb $id"
	[ "$verb" = set ] && cmd="set $id speed=3M"
	before=$(fingerprint "$id")
	ans=$(ctl_expect EBUSY "$cmd") || exit 1
	re="^error: line 1: $verb $id: job is $state \\($verb applies to ([^()]+)\\)$"
	[[ $ans =~ $re ]] || fail "'$cmd' on a $state job: answer '$ans', want 'error: line 1: $verb $id: job is $state ($verb applies to ...)'"
	applies=${BASH_REMATCH[1]}
	case $verb in
	cancel|set) want="running, paused or ready" ;;
	pause) want=running ;;
	resume) want=paused ;;
	complete) want=ready ;;
	dismiss) want=concluded ;;
	esac
	[[ $applies == *"$want"* ]] || fail "'$cmd': '$applies' does not name the legal state(s) ($want)"
	after=$(fingerprint "$id")
	[ "$before" = "$after" ] || fail "refused '$cmd' changed the job: before [$before] after [$after]"
	[ -e "$MNT/.fleece/jobs/$id/status" ] || fail "refused '$cmd' removed the job"
}

events_start "$T/ev.table"
declare -A job_of=([running]=vr [paused]=vp [completed]=vc [failed]=vf [cancelled]=vx)
declare -A legal=(
	[running]="cancel pause set" [paused]="cancel resume set"
	[completed]="dismiss" [failed]="dismiss" [cancelled]="dismiss")
table=""
for state in running paused completed failed cancelled; do
	row=""
	for verb in cancel pause resume complete dismiss set; do
		if [[ " ${legal[$state]} " == *" $verb "* ]]; then
			row+="$verb:legal "
		else
			illegal "${job_of[$state]}" "$verb" "$state"
			row+="$verb:EBUSY "
		fi
	done
	table+="  $state: $row"$'\n'
done
log "verb table (illegal ones refused):"$'\n'"$table"
[ "$(status vr state)" = running ] && [ "$(status vp state)" = paused ] || fail "vr/vp changed state"

# Unknown ids: ENOENT, for every verb.
for cmd in "cancel nosuch" "pause nosuch" "resume nosuch" "complete nosuch" "dismiss nosuch" "set nosuch speed=1M"; do
	ans=$(ctl_expect ENOENT "$cmd")
	grep -q nosuch <<<"$ans" || fail "'$cmd': the answer does not name the id: $ans"
done
# Two verbs on one job in one write: EINVAL, and neither happens.
before=$(fingerprint vr)
ans=$(ctl_expect EINVAL "set vr speed=5M
pause vr")
grep -q 'line 2' <<<"$ans" || fail "two verbs on vr: the answer does not say where: $ans"
ctl_expect EINVAL "pause vr
pause vr" >/dev/null
ctl_expect EINVAL "cancel vr
cancel vr" >/dev/null
[ "$before" = "$(fingerprint vr)" ] || fail "a refused two-verb write changed vr: [$before] -> [$(fingerprint vr)]"
before=$(fingerprint vp)
ctl_expect EINVAL "set vp speed=5M
resume vp" >/dev/null
[ "$before" = "$(fingerprint vp)" ] || fail "a refused two-verb write changed vp: [$before] -> [$(fingerprint vp)]"
# ... an illegal verb in a write with legal ones: the whole write is refused.
ans=$(ctl_expect EBUSY "set vp speed=5M
resume vr")
[[ $ans == "error: line 2: resume vr: job is running (resume applies to "* ]] || fail "answer: $ans"
[ "$(status vp speed)" = 262144 ] || fail "a refused write changed vp's speed to $(status vp speed)"
sleep 0.3
events_stop "$T/ev.table"
[ ! -s "$T/ev.table" ] || fail "refused verbs emitted events: $(cat "$T/ev.table")"

# The legal ones. Concluded ids stay taken until dismissed.
events_start "$T/ev.legal"
for id in vc vf vx; do
	ctl_expect EEXIST "backup tiny.img $OUT/again-$id.raw id=$id" >/dev/null
	[ ! -e "$OUT/again-$id.raw" ] || fail "a refused backup with the taken id $id left its target"
	ans=$(ctl "dismiss $id") || fail "dismiss $id ($(status "$id" state)) refused: $ans"
	[ "$ans" = ok ] || fail "answer to dismiss: '$ans'"
	[ ! -e "$MNT/.fleece/jobs/$id" ] || fail "dismissed job $id still listed"
	ctl_expect ENOENT "dismiss $id" >/dev/null
	ctl_expect ENOENT "cancel $id" >/dev/null
	ans=$(ctl "backup tiny.img $OUT/again-$id.raw id=$id") || fail "id $id not free after dismiss: $ans"
	[ "$ans" = "ok id=$id" ] || fail "answer '$ans'"
done
# running: set, pause, resume, cancel
[ "$(ctl "set vr speed=300K")" = ok ] && [ "$(status vr speed)" = 307200 ] && [ "$(status vr state)" = running ] ||
	fail "set on running vr: $(cat "$MNT/.fleece/jobs/vr/status")"
[ "$(ctl "pause vr")" = ok ] && [ "$(status vr state)" = paused ] || fail "pause on running vr: $(status vr state)"
[ "$(ctl "resume vr")" = ok ] && [ "$(status vr state)" = running ] || fail "resume on paused vr: $(status vr state)"
[ "$(ctl "cancel vr")" = ok ] || fail "cancel on running vr refused"
[ "$(wait_job vr 20)" = cancelled ] || fail "vr: $(status vr state)"
# paused: set, resume, pause, cancel
b=$(status vp bytes_done)
[ "$(ctl "set vp speed=300K")" = ok ] && [ "$(status vp speed)" = 307200 ] && [ "$(status vp state)" = paused ] &&
	[ "$(status vp bytes_done)" = "$b" ] || fail "set on paused vp: $(cat "$MNT/.fleece/jobs/vp/status")"
[ "$(ctl "resume vp")" = ok ] && [ "$(status vp state)" = running ] || fail "resume on paused vp: $(status vp state)"
[ "$(ctl "pause vp")" = ok ] && [ "$(status vp state)" = paused ] || fail "pause on running vp: $(status vp state)"
[ "$(ctl "cancel vp")" = ok ] || fail "cancel on paused vp refused"
[ "$(wait_job vp 20)" = cancelled ] || fail "vp: $(status vp state)"
[ ! -e "$OUT/vr.raw" ] && [ ! -e "$OUT/vp.raw" ] || fail "cancelled jobs left their targets"
for id in vc vf vx; do [ "$(wait_job "$id" 20)" = completed ] || fail "second $id did not complete"; done
cmp "$SRC/tiny.img" "$OUT/again-vx.raw" || fail "backup under a reused id differs"
events_stop "$T/ev.legal"
for id in vr vp; do
	got=$(events_of "$T/ev.legal" "$id" | tr '\n' '|')
	case $id in
	vr) want="id=vr type=backup event=paused|id=vr type=backup event=resumed|id=vr type=backup event=cancelled|" ;;
	vp) want="id=vp type=backup event=resumed|id=vp type=backup event=paused|id=vp type=backup event=cancelled|" ;;
	esac
	[ "$got" = "$want" ] || fail "events of $id: $got, want $want"
done
log "legal verbs ok"

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "fleecefs exited $DAEMON_RC"
end_test
