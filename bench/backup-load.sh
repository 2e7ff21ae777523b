#!/usr/bin/env bash
# bench/backup-load.sh: the guest against its backup (issue 15, point 1).
# How fast is the guest while an unlimited full backup runs, and how long
# does that backup take under the guest's load, as the guest's queue depth
# goes from 1 to 32?
#
# On a SIZE image (random data) through fleecefs, for each QD in QDS and
# 4 KiB random write and read (O_DIRECT, libaio):
#   nojob    fio for RUNTIME s with no job
#   during   fio starts, LEAD s later a full backup (checksum=none, like
#            bench/run.sh) starts; fio stops when the backup ends. IOPS and
#            p99 count the I/Os completed while the job ran (fio's per-I/O
#            log), and the backup's own clock (started/finished) is its time
# plus the idle full backup (no guest I/O), median of REPS.
# Prints one table: guest IOPS during / no job, p99 during, backup time
# under load / idle.
#     bench/backup-load.sh       QDS="1 16" SIZE=1G REPS=1 bench/backup-load.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
export WORK=${WORK:-/tmp/fleecefs-bench-load} SIZE=${SIZE:-2G} RUNTIME=${RUNTIME:-8}
QDS=${QDS:-1 4 16 32} REPS=${REPS:-1} LEAD=${LEAD:-1}
. "$top/bench/lib.sh"

# fio_log RW QD LOG SECONDS: fio in the background (its PID in fio_pid),
# per-I/O completion log.
fio_log() {
	rm -f "$3"_lat.1.log
	fio --name=g --filename="$WORK/mnt/disk.raw" --rw="$1" --bs=4k --iodepth="$2" --ioengine=libaio --direct=1 \
	    --runtime="$4" --time_based --randrepeat=0 --norandommap \
	    --write_lat_log="$3" --log_avg_msec=0 --log_unix_epoch=1 >/dev/null 2>&1 &
	fio_pid=$!
}
# window LOG FROM TO: "IOPS P99_MS" of the completions in [FROM, TO] (epoch s;
# empty: all).
window() {
	python3 - "$1"_lat.1.log "${2:-0}" "${3:-1e12}" <<'PY'
import sys
a, b = float(sys.argv[2]) * 1000, float(sys.argv[3]) * 1000
t = [(int(l.split(",")[0]), int(l.split(",")[1])) for l in open(sys.argv[1])]
if a == 0:
    a, b = t[0][0], t[-1][0]
lat = sorted(v for when, v in t if a <= when <= b)
span = max((b - a) / 1000, 1e-3)
print(f"{len(lat) / span:.0f} {lat[int(len(lat) * 0.99)] / 1e6:.2f}")
PY
}

mount_fs
idle=()
for _ in $(seq "$REPS"); do
	rm -f "$WORK/out/t.raw"; drop_caches
	ctl "backup disk.raw $WORK/out/t.raw checksum=none id=idle"
	idle+=("$(job_seconds idle)")
	ctl "dismiss idle"
done
idle_s=$(printf '%s\n' "${idle[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
echo "idle $idle_s" >&2

rows=()
for qd in $QDS; do
	for rw in randwrite randread; do
		for rep in $(seq "$REPS"); do
			drop_caches
			fio_log "$rw" "$qd" "$WORK/nojob" "$RUNTIME"; wait "$fio_pid" || true
			read -r base _ <<<"$(window "$WORK/nojob")"
			rm -f "$WORK/out/t.raw"; drop_caches
			fio_log "$rw" "$qd" "$WORK/during" 600
			sleep "$LEAD"
			ctl "backup disk.raw $WORK/out/t.raw checksum=none id=b"
			secs=$(job_seconds b)
			kill -INT "$fio_pid"; wait "$fio_pid" || true
			read -r iops p99 <<<"$(window "$WORK/during" "$(key b started)" "$(key b finished)")"
			ctl "dismiss b"
			echo "$qd $rw $base $iops $p99 $secs" >&2
			rows+=("$qd $rw $base $iops $p99 $secs")
		done
	done
done
umount_fs

printf '%s\n' "${rows[@]}" > "$WORK/rows.txt"
python3 - "$idle_s" "$SIZE" "$WORK/rows.txt" <<'PY'
import statistics as st, sys
idle = float(sys.argv[1])
by = {}
for line in open(sys.argv[3]):
    qd, rw, base, iops, p99, secs = line.split()
    by.setdefault((int(qd), rw), []).append((float(base), float(iops), float(p99), float(secs)))
print(f"## The guest against an unlimited full backup ({sys.argv[2]} image; idle backup {idle:.2f} s)\n")
print("| QD | workload | no job IOPS | during IOPS | during / no job | p99 ms during | backup s | backup / idle |")
print("|---|---|---|---|---|---|---|---|")
for (qd, rw), v in sorted(by.items()):
    base, iops, p99, secs = (st.median(x[i] for x in v) for i in range(4))
    print(f"| {qd} | 4 KiB {rw} | {base:.0f} | {iops:.0f} | {iops / base:.2f} | {p99:.2f} | {secs:.2f} | {secs / idle:.2f} |")
PY
