#!/usr/bin/env bash
# contrib/fleecefs-backup over a simulated month (FLEECE_BACKUP_NOW moves its
# clock a day per run) against a real mount with two images that a writer
# keeps changing, also while each backup runs: a full every 7 days, daily
# incrementals, retention keeping 2 chains. At the end: exactly the expected
# chains and points exist, every kept point restores (fleecectl restore)
# equal to the copy of the image taken at its point in time; a second run
# while one holds the lock is refused; an image whose backup fails gives a
# non-zero exit while the other image's backup is taken, and the metrics
# show both; an image changed behind the mount starts a new chain by itself.
. "$TESTS_DIR/lib.sh"

: "${FLEECECTL:?FLEECECTL must point at the fleecectl binary (run through make check)}"
SCRIPT=$TESTS_DIR/../../contrib/fleecefs-backup
[ -x "$SCRIPT" ] || fail "no $SCRIPT"
command -v flock >/dev/null || fail "flock is needed (apt-get install util-linux)"
DAY=86400 BASE=1798761600   # 2027-01-01 00:00 UTC
M=$((1024 * 1024))
B=$T/backups
random_image "$SRC/a.img" 12M
random_image "$SRC/b.img" 6M
mount_fleece
mkdir -p "$B" "$T/metrics" "$T/refs"
cat > "$T/backup.conf" <<EOF
MOUNT=$MNT
IMAGES=all
TARGET_DIR=$B
FULL_EVERY_DAYS=7
KEEP_CHAINS=2
METRICS_DIR=$T/metrics
FLEECECTL=$FLEECECTL
EOF

# The writer: random pieces into both images through the mount, without end.
"$PY" - "$MNT/a.img" "$MNT/b.img" <<'PY' &
import os, random, sys, time
fds = [os.open(p, os.O_WRONLY) for p in sys.argv[1:]]
sizes = [os.fstat(fd).st_size for fd in fds]
r = random.Random(5)
while True:
    i = r.randrange(2)
    n = r.choice([512, 4096, 65536, 100000])
    os.pwrite(fds[i], os.urandom(n), r.randrange(0, sizes[i] - n))
    time.sleep(0.002)
PY
WRITER=$!
BG_PIDS+=("$WRITER")

# run_day D [EXPECT_RC]: stops the writer, keeps copies of both images (the
# point in time), runs the script with its clock at day D, and lets the
# writer go on as soon as the run's transaction has started its jobs.
run_day() {
	local d=$1 want=${2:-0} rc=0 label ev
	label=$(date -u -d "@$((BASE + d * DAY + 3 * 3600))" +%Y%m%dT%H%M%SZ)
	kill -STOP "$WRITER"
	sleep 0.05
	cp "$SRC/a.img" "$T/refs/a.img.$label"
	cp "$SRC/b.img" "$T/refs/b.img.$label"
	timeout 120 "$FLEECECTL" -m "$MNT" events -n 1 >/dev/null &
	ev=$!
	FLEECE_BACKUP_NOW=$((BASE + d * DAY + 3 * 3600)) "$SCRIPT" "$T/backup.conf" >"$T/run.out" 2>"$T/run.err" &
	local run=$!
	wait "$ev" || true
	kill -CONT "$WRITER"
	wait "$run" || rc=$?
	[ "$rc" = "$want" ] || fail "day $d: exit $rc, want $want: $(cat "$T/run.out" "$T/run.err")"
}

log "a month of daily runs"
for d in $(seq 0 29); do
	if [ "$d" = 10 ]; then
		# One image's backup fails (its target write at 7M: only a.img
		# is that large); the other's still happens.
		inject "target-write offset=7M-8M from=1 errno=EIO"
		run_day $d 1
		inject clear
		want_match "the failed image's line" "$(cat "$T/run.err")" "a.img: backup failed"
		grep -q "b.img" "$T/run.err" && fail "b.img reported failing: $(cat "$T/run.err")"
		want_match "metrics: a failed" "$(cat "$T/metrics/fleecefs_backup.prom")" 'fleecefs_backup_success\{image="a.img"\} 0'
		want_match "metrics: b good" "$(cat "$T/metrics/fleecefs_backup.prom")" 'fleecefs_backup_success\{image="b.img"\} 1'
		rm "$T/refs/a.img.$(date -u -d "@$((BASE + d * DAY + 3 * 3600))" +%Y%m%dT%H%M%SZ)"
	else
		run_day $d
	fi
	[ "$(ls "$MNT/.fleece/jobs" | wc -l)" = 0 ] || fail "day $d left jobs: $(ls "$MNT/.fleece/jobs")"
done
kill -STOP "$WRITER"

log "two chains kept per image, each a full and its incrementals"
for img in a.img b.img; do
	chains=$(ls "$B/$img")
	want_eq "$img chains" "$(echo $chains)" "20270122T030000Z 20270129T030000Z"
	want_eq "$img points of the older kept chain" "$(ls "$B/$img/20270122T030000Z" | grep -c 'Z.qcow2$')" 7
	want_eq "$img points of the current chain" "$(ls "$B/$img/20270129T030000Z" | grep -c 'Z.qcow2$')" 2
done

log "every kept point restores equal to its image at that time"
n=0
for img in a.img b.img; do
	for p in "$B/$img"/*/*Z.qcow2; do
		label=$(basename "$p" .qcow2)
		"$FLEECECTL" restore "$p" "$T/restored" >/dev/null || fail "restore $p"
		same "$img at $label" "$T/refs/$img.$label" "$T/restored"
		rm "$T/restored"
		n=$((n + 1))
	done
done
want_eq "points restored" $n 18
# --at picks a point of an image's directory: by label, or the newest at or
# before a time.
"$FLEECECTL" restore --at=20270123T030000Z "$B/a.img" "$T/restored" >/dev/null || fail "restore --at=LABEL"
same "--at=LABEL" "$T/refs/a.img.20270123T030000Z" "$T/restored"
rm "$T/restored"
"$FLEECECTL" restore --at="2027-01-25" "$B/b.img" "$T/restored" >"$T/at.out" || fail "restore --at=DAY"
want_match "the point it took" "$(cat "$T/at.out")" "20270125T030000Z.qcow2: the point for --at=2027-01-25"
same "--at=DAY" "$T/refs/b.img.20270125T030000Z" "$T/restored"
rm "$T/restored"
rc=0; "$FLEECECTL" restore --at="2027-01-02 12:00" "$B/b.img" "$T/restored" 2>"$T/at.err" || rc=$?
want_eq "a time before every kept point" $rc 1
want_match "it says so" "$(cat "$T/at.err")" "no point in .* at or before 2027-01-02 12:00"
[ ! -e "$T/restored" ] || fail "restore --at of nothing left a file"

log "a run while another holds the lock is refused"
flock "$B/.lock" sleep 2 &
HOLDER=$!
sleep 0.3
rc=0; FLEECE_BACKUP_NOW=$((BASE + 30 * DAY)) "$SCRIPT" "$T/backup.conf" >/dev/null 2>"$T/lock.err" || rc=$?
wait "$HOLDER"
want_eq "a second run" $rc 1
want_match "it says why" "$(cat "$T/lock.err")" "another run holds .*\.lock"

log "an image changed behind the mount starts a new chain by itself"
kill -CONT "$WRITER"
kill "$WRITER"
wait "$WRITER" 2>/dev/null || true
BG_PIDS=()
unmount_fleece
"$PY" -c "import os; fd = os.open('$SRC/a.img', os.O_WRONLY); os.pwrite(fd, b'offline', 4096)"
mount_fleece
cp "$SRC/a.img" "$T/refs/a.img.offline"
FLEECE_BACKUP_NOW=$((BASE + 30 * DAY + 3 * 3600)) "$SCRIPT" "$T/backup.conf" >"$T/run.out" 2>"$T/run.err" ||
	fail "the run after an offline change: $(cat "$T/run.out" "$T/run.err")"
want_match "why a new chain" "$(cat "$T/run.out")" "a.img: a full backup, a new chain \(its bitmap is inconsistent"
want_eq "a.img chains after it" "$(ls "$B/a.img" | tr '\n' ' ')" "20270129T030000Z 20270131T030000Z "
"$FLEECECTL" restore "$B/a.img/20270131T030000Z/20270131T030000Z.qcow2" "$T/restored" >/dev/null
same "the new chain's full" "$T/refs/a.img.offline" "$T/restored"
want_match "metrics" "$(cat "$T/metrics/fleecefs_backup.prom")" 'fleecefs_backup_last_success_timestamp_seconds\{image="b.img"\} [0-9]+'

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"
log "ok"
