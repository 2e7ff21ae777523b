#!/usr/bin/env bash
# bench/scale.sh: fleecefs on a 1 TiB sparse image holding 1 GiB of scattered
# data (16384 random 64 KiB pieces), with two dirty bitmaps (issue 15,
# point 4). Measures:
#   - the daemon's peak resident size (VmHWM, reset through clear_refs before
#     each phase): idle with the bitmaps, during a sync=top backup (with its
#     manifest, checksum=xxh3), during a snapshot's life;
#   - the guest's 4 KiB write latency (fio QD1, O_DIRECT, per-I/O log, in the
#     first GiB: few new 16 MiB regions, whose first write since a save waits
#     for the bitmaps' intent log) in the 1.5 s around the start of each job,
#     p99.9 and max, beside the same in 1.5 s before it (no start) and in
#     1.5 s after it (the job running); the time the ctl write that starts
#     the job takes, and the job's own
#     start_stall_us (how long the gates were closed);
#   - sync=top's duration against `qemu-img convert -O raw` of the same image
#     (which also finds the data by SEEK_DATA) and the data's size;
#   - how long a read of the job's status file and of a bitmap's file takes
#     (open, read, close; median and max of 200) while the job runs.
#     bench/scale.sh                 DATA_PIECES=4096 bench/scale.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
WORK=${WORK:-/tmp/fleecefs-bench-scale}
DATA_PIECES=${DATA_PIECES:-16384}
[ -x "$FLEECEFS" ] || { echo "bench: build fleecefs first, or set FLEECEFS=" >&2; exit 1; }
for t in fio jq qemu-img python3; do command -v $t >/dev/null || { echo "bench: needs $t" >&2; exit 1; }; done

mkdir -p "$WORK/src" "$WORK/mnt" "$WORK/out"
img=$WORK/src/big.img
pid= fio=
# Also after a failure half way: a guest still writing keeps the mount busy,
# and a daemon left behind would hold the caller's pipe open.
cleanup() {
	set +e   # every step, whatever the one before it returned
	[ -n "$fio" ] && kill "$fio" 2>/dev/null && wait "$fio" 2>/dev/null
	mountpoint -q "$WORK/mnt" && ! fusermount3 -u "$WORK/mnt" && [ -n "$pid" ] && kill "$pid"
	[ -n "$pid" ] && wait "$pid" 2>/dev/null
	rm -rf "$WORK/out" "$WORK/src/.fleecefs" "$WORK/convert.raw"
}
trap cleanup EXIT
# What an earlier run that was killed may have left.
rm -rf "$WORK/out" "$WORK/src/.fleecefs"
mkdir -p "$WORK/out"
if [ "$(stat -c %s "$img" 2>/dev/null)" != $((1 << 40)) ] || [ "$(cat "$img.pieces" 2>/dev/null)" != "$DATA_PIECES" ]; then
	rm -f "$img"
	truncate -s 1T "$img"
	python3 - "$img" "$DATA_PIECES" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
r = random.Random(15)
for c in r.sample(range((1 << 40) >> 16), int(sys.argv[2])):
    os.pwrite(fd, os.urandom(65536), c << 16)
os.fsync(fd)
PY
	echo "$DATA_PIECES" > "$img.pieces"
fi
data_bytes=$((DATA_PIECES * 65536))

"$FLEECEFS" -f "$WORK/src" "$WORK/mnt" 2>>"$WORK/daemon.log" & pid=$!
for _ in $(seq 100); do [ -e "$WORK/mnt/.fleece/ctl" ] && break; sleep 0.05; done
ctl() { echo "$1" > "$WORK/mnt/.fleece/ctl"; }
key() { sed -n "s/^$2=//p" "$WORK/mnt/.fleece/jobs/$1/status"; }
hwm() { sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$pid/status"; }
reset_hwm() { echo 5 > "/proc/$pid/clear_refs"; }

ctl "bitmap add big.img b1"
ctl "bitmap add big.img b2"
# Guest writes that both bitmaps see: 64 MiB in 1024 scattered pieces.
python3 - "$WORK/mnt/big.img" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
r = random.Random(16)
for _ in range(1024):
    os.pwrite(fd, os.urandom(65536), r.randrange((1 << 40) >> 16) << 16)
os.fsync(fd)
PY
reset_hwm; sleep 1
echo "idle_hwm_kib $(hwm)"

# file_times FILE...: median and max ms of open+read+close, 200 times each.
file_times() {
	python3 - "$@" <<'PY'
import statistics, sys, time
for path in sys.argv[1:]:
    t = []
    for _ in range(200):
        a = time.perf_counter()
        with open(path, "rb") as f:
            f.read()
        t.append((time.perf_counter() - a) * 1000)
    print(f"{statistics.median(t):.3f} {max(t):.3f}")
PY
}

# phase NAME START_COMMAND STOP_COMMAND WAIT(completes|hold)
phase() {
	local name=$1 start=$2 stop=$3 how=$4 t0 t1 lat=$WORK/lat-$1
	rm -f "$lat"_lat.1.log
	sync; echo 3 > /proc/sys/vm/drop_caches
	fio --name=g --filename="$WORK/mnt/big.img" --rw=randwrite --bs=4k --iodepth=1 --ioengine=psync --direct=1 \
	    --size=1G --runtime=8 --time_based --randrepeat=0 --norandommap \
	    --write_lat_log="$lat" --log_avg_msec=0 --log_unix_epoch=1 >/dev/null 2>&1 &
	fio=$!
	sleep 3
	reset_hwm
	t0=$(date +%s.%N); ctl "$start"; t1=$(date +%s.%N)
	echo "${name}_start_stall_us $(key "$name" start_stall_us)"
	# The file reads wait until the latency windows below have passed, so
	# that they are not counted as the start's cost.
	sleep 2.6
	local times; times=$(file_times "$WORK/mnt/.fleece/jobs/$name/status" "$WORK/mnt/.fleece/bitmaps/big.img/b1" | tr '\n' ' ')
	if [ "$how" = completes ]; then
		until [[ $(key "$name" state) =~ ^(completed|failed|cancelled)$ ]]; do sleep 0.05; done
		[ "$(key "$name" state)" = completed ] || { echo "$name: $(key "$name" state) $(key "$name" error)" >&2; exit 1; }
		echo "${name}_seconds $(awk -v a="$(key "$name" started)" -v b="$(key "$name" finished)" 'BEGIN { printf "%.2f", b - a }')"
	else
		wait "$fio" || true
	fi
	echo "${name}_hwm_kib $(hwm)"
	wait "$fio" 2>/dev/null || true
	fio=
	ctl "$stop"
	echo "${name}_ctl_ms $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) * 1000 }')"
	echo "${name}_files_ms $times"
	# Completions in [start - 0.5 s, start + 1 s] (the latency around the
	# start), in the 1.5 s before that (the same guest, no start) and in the
	# 1.5 s after it (the job running, its start behind it).
	python3 - "$lat"_lat.1.log "$t0" "$name" <<'PY'
import sys
t0 = float(sys.argv[2]) * 1000
rows = [(int(l.split(",")[0]), int(l.split(",")[1]) / 1e6) for l in open(sys.argv[1])]
for label, a, b in (("start", t0 - 500, t0 + 1000), ("before", t0 - 2000, t0 - 500),
                    ("running", t0 + 1000, t0 + 2500)):
    lat = sorted(v for t, v in rows if a <= t <= b)
    p999 = lat[min(len(lat) - 1, int(len(lat) * 0.999))]
    print(f"{sys.argv[3]}_{label}_lat_ms {p999:.2f} {lat[-1]:.2f} {len(lat)}")
PY
}

phase top "backup big.img $WORK/out/top.raw sync=top id=top" "dismiss top" completes
phase snap "snapshot snap big.img" "release snap" hold
echo "data_bytes $data_bytes"
sync; echo 3 > /proc/sys/vm/drop_caches
a=$(date +%s.%N); qemu-img convert -O raw "$img" "$WORK/convert.raw"; sync -f "$WORK/convert.raw"; b=$(date +%s.%N)
echo "convert_seconds $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", b - a }')"
