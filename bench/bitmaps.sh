#!/usr/bin/env bash
# bench/bitmaps.sh: what do dirty bitmaps cost, and what do incrementals save?
#
# On a SIZE random image (default 2 GiB) through fleecefs, REPS repetitions,
# medians:
#   (a) a full raw backup with bitmap=b1 (bitmap add + backup in one write),
#       then 1% of the image dirtied (random distinct 64 KiB clusters written
#       through the mount), then the incremental onto that full: its time
#       over the full's (target: at most 0.05). Times are the jobs' own
#       started..finished (both make target and manifest durable).
#   (b) fio 4 KiB random writes, QD16, O_DIRECT, RUNTIME seconds through the
#       mount, with no bitmap, then with one enabled bitmap added right
#       before fio (so the first write into each 16 MiB region, which
#       records the region in the write-intent log and fdatasyncs it, is
#       included): IOPS ratio (target: tracking costs at most 5%). The two
#       phases alternate their order between repetitions; the ratio is the
#       median of the per-repetition ratios. On a noisy VM (plain 4 KiB
#       random write IOPS swing by +-20% from run to run) 3 repetitions do
#       not resolve 5%: raise REPS.
# Run by hand, as root, on an otherwise idle machine:
#     bench/bitmaps.sh            SIZE=512M RUNTIME=5 REPS=1 bench/bitmaps.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
WORK=${WORK:-/tmp/fleecefs-bench-bitmaps}
SIZE=${SIZE:-2G} RUNTIME=${RUNTIME:-10} REPS=${REPS:-3} DIRTY_PCT=${DIRTY_PCT:-1}
. "$top/bench/lib.sh"
rm -rf "$WORK/src/.fleecefs"     # bitmaps left by an interrupted run

for rep in $(seq "$REPS"); do
	mount_fs
	# (a) full, 1% dirty, incremental
	rm -f "$WORK/out"/*
	drop_caches
	ctl "bitmap add disk.raw b1
backup disk.raw $WORK/out/full.raw bitmap=b1 id=full"
	full=$(job_seconds full)
	python3 - "$WORK/mnt/disk.raw" "$DIRTY_PCT" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
cs = 65536
n = os.fstat(fd).st_size // cs
for c in random.sample(range(n), max(1, n * int(sys.argv[2]) // 100)):
    os.pwrite(fd, os.urandom(cs), c * cs)
os.fsync(fd)
PY
	dirty=$(sed -n 's/^dirty_bytes=//p' "$WORK/mnt/.fleece/bitmaps/disk.raw/b1")
	drop_caches
	ctl "backup disk.raw $WORK/out/full.raw sync=incremental bitmap=b1 id=inc"
	inc=$(job_seconds inc)
	copied=$(key inc bytes_total)
	cmp -s "$img" "$WORK/out/full.raw" || { echo "the incremental's target differs from the image" >&2; exit 1; }
	ctl "bitmap remove disk.raw b1"
	echo "backup $full $inc $dirty $copied"
	# (b) fio without and with a fresh bitmap; the order alternates between
	# repetitions so that a drift of the machine does not favour one side.
	for phase in $( [ $((rep % 2)) = 1 ] && echo none bitmap || echo bitmap none); do
		drop_caches
		if [ "$phase" = none ]; then
			echo "fio-none $(fio_run)"
		else
			ctl "bitmap add disk.raw b1"
			echo "fio-bitmap $(fio_run) $(sed -n 's/^dirty_bytes=//p' "$WORK/mnt/.fleece/bitmaps/disk.raw/b1")"
			ctl "bitmap remove disk.raw b1"
		fi
	done
	umount_fs
done | tee "$WORK/results.txt" >&2

python3 - "$WORK/results.txt" "$SIZE" "$DIRTY_PCT" "$RUNTIME" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r[0], []).append([float(x) for x in r[1:]])
med = lambda name, i: st.median(x[i] for x in by[name])
reps = len(by["backup"])
full, inc = med("backup", 0), med("backup", 1)
ratios = [x[1] / x[0] for x in by["backup"]]
print(f"## Dirty bitmaps: {sys.argv[2]} random image, medians of {reps}\n")
print("| measure | value | target |")
print("|---|---|---|")
print(f"| full backup with bitmap=b1 | {full:.2f} s | |")
print(f"| incremental after {sys.argv[3]}% of the 64K clusters written "
      f"({med('backup', 3) / 2**20:.1f} MiB copied, dirty_bytes {med('backup', 2) / 2**20:.1f} MiB) | {inc:.3f} s | |")
print(f"| incremental / full | {st.median(ratios):.4f} | ≤ 0.05 |")
io0, p0 = med("fio-none", 0), med("fio-none", 1)
io1, p1 = med("fio-bitmap", 0), med("fio-bitmap", 1)
ratio = st.median(b[0] / a[0] for a, b in zip(by["fio-none"], by["fio-bitmap"]))
print(f"| fio 4K randwrite QD16 O_DIRECT {sys.argv[4]} s, no bitmap | {io0:.0f} IOPS, p99 {p0 / 1000:.2f} ms | |")
print(f"| same, one enabled bitmap added just before | {io1:.0f} IOPS, p99 {p1 / 1000:.2f} ms "
      f"(dirty after: {med('fio-bitmap', 2) / 2**20:.0f} MiB) | |")
print(f"| IOPS with bitmap / without (per repetition, median) | {ratio:.3f} (cost {100 * (1 - ratio):.1f}%) | ≥ 0.95 |")
PY
