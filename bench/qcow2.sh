#!/usr/bin/env bash
# bench/qcow2.sh: what do qcow2 targets and zstd compression cost?
#
# On a SIZE image of mixed content (default 2 GiB: a third zeroes, a third
# text-like, a third random), REPS repetitions, medians, all in one run:
#   (a) idle full backup into raw and into qcow2 (job started..finished,
#       both durable, page cache dropped before each): qcow2 / raw
#       (target: at most 1.1);
#   (b) idle full backup into qcow2 with compress=zstd (default level) and
#       `qemu-img convert -c -O qcow2 -o compression_type=zstd` of the same
#       image (wall time, then sync): qemu-img / fleecefs (target: at least
#       2) and the sizes (target: fleecefs at most 1.05 of qemu-img's);
#   (c) a qcow2 incremental after 1% of the 64K clusters are written, over
#       the qcow2 full: its time / the full's (target: at most 0.05);
#   (d) fleecectl verify of that chain (both files, each against its own
#       manifest) against reading the raw image once (cat), caches dropped:
#       verify / read (no target; it should read the chain about once);
#   (e) fio 4 KiB random writes, QD16, O_DIRECT, RUNTIME seconds through the
#       mount, with no job and during a compressed qcow2 backup (speed= set
#       so that the backup outlasts fio): IOPS ratio (target: at least 0.3),
#       and during a raw backup at the same speed (what copy-before-write
#       costs without compression).
# Every result is checked with qemu-img compare before it counts.
# Run by hand, as root, on an otherwise idle machine:
#     bench/qcow2.sh            SIZE=512M RUNTIME=5 REPS=1 bench/qcow2.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
FLEECECTL=${FLEECECTL:-$top/build-check/fleecectl}
WORK=${WORK:-/tmp/fleecefs-bench-qcow2}
SIZE=${SIZE:-2G} RUNTIME=${RUNTIME:-10} REPS=${REPS:-3}
IMAGE_KIND=mixed
. "$top/bench/lib.sh"
rm -rf "$WORK/src/.fleecefs"
same() { qemu-img compare -q -f raw -F "$2" "$img" "$1" || { echo "$1 differs from the image" >&2; exit 1; }; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

for rep in $(seq "$REPS"); do
	mount_fs
	rm -f "$WORK/out"/*
	# (a) raw and qcow2; the order alternates between repetitions.
	for kind in $( [ $((rep % 2)) = 1 ] && echo raw qcow2 || echo qcow2 raw); do
		drop_caches
		ctl "backup disk.raw $WORK/out/full.$kind id=full-$kind"
		echo "full-$kind $(job_seconds "full-$kind")"
		same "$WORK/out/full.$kind" "$kind"
	done
	# (b) zstd: fleecefs and qemu-img
	drop_caches
	ctl "backup disk.raw $WORK/out/z.qcow2 compress=zstd id=z"
	t=$(job_seconds z)
	echo "zstd-fleecefs $t $(stat -c %s "$WORK/out/z.qcow2")"
	same "$WORK/out/z.qcow2" qcow2
	drop_caches
	a=$(now)
	qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$img" "$WORK/out/q.qcow2"
	sync "$WORK/out/q.qcow2"
	echo "zstd-qemu-img $(since "$a") $(stat -c %s "$WORK/out/q.qcow2")"
	rm -f "$WORK/out/q.qcow2" "$WORK/out/z.qcow2"*
	# (c) a 1% qcow2 incremental over a qcow2 full
	rm -f "$WORK/out"/full.*
	drop_caches
	ctl "bitmap add disk.raw b1
backup disk.raw $WORK/out/chain0.qcow2 bitmap=b1 id=c0"
	full=$(job_seconds c0)
	python3 - "$WORK/mnt/disk.raw" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
cs = 65536
n = os.fstat(fd).st_size // cs
for c in random.sample(range(n), max(1, n // 100)):
    os.pwrite(fd, os.urandom(cs), c * cs)
os.fsync(fd)
PY
	drop_caches
	ctl "backup disk.raw $WORK/out/chain1.qcow2 sync=incremental bitmap=b1 id=c1"
	echo "incremental $full $(job_seconds c1)"
	same "$WORK/out/chain1.qcow2" qcow2
	# (d) verify the chain; read the image once
	drop_caches
	a=$(now)
	"$FLEECECTL" verify "$WORK/out/chain1.qcow2" >/dev/null
	v=$(since "$a")
	drop_caches
	a=$(now)
	cat "$img" >/dev/null
	echo "verify $v $(since "$a")"
	ctl "bitmap remove disk.raw b1"
	rm -f "$WORK/out"/*
	# (e) fio with no job, and during a compressed backup that outlasts it
	for phase in $( [ $((rep % 2)) = 1 ] && echo none zstd raw || echo raw zstd none); do
		drop_caches
		if [ "$phase" = none ]; then
			echo "fio-none $(fio_run)"
		else
			# Holes take no time: the speed is set by the two thirds with data.
			speed=$(( $(numfmt --from=iec "$SIZE") * 2 / 3 / (RUNTIME + 3) ))
			if [ "$phase" = zstd ]; then
				ctl "backup disk.raw $WORK/out/fio.qcow2 compress=zstd speed=$speed id=f$phase"
			else
				ctl "backup disk.raw $WORK/out/fio.raw speed=$speed id=f$phase"
			fi
			echo "fio-$phase $(fio_run) $(key "f$phase" state)"
			job_seconds "f$phase" >/dev/null
			ctl "dismiss f$phase"
			rm -f "$WORK/out"/*
		fi
	done
	umount_fs
	# The fio writes changed the image: a fresh one for the next repetition.
	rm -f "$img"
	make_image
done | tee "$WORK/results.txt" >&2

python3 - "$WORK/results.txt" "$SIZE" "$RUNTIME" <<'PY'
import statistics as st, sys
by = {}
for r in (l.split() for l in open(sys.argv[1]) if l.strip()):
    by.setdefault(r[0], []).append(r[1:])
num = lambda name, i: [float(x[i]) for x in by[name]]
med = lambda name, i: st.median(num(name, i))
reps = len(by["full-raw"])
print(f"## qcow2 targets and zstd: {sys.argv[2]} image (a third zeroes, a third text, a third random), medians of {reps}\n")
print("| measure | value | target |")
print("|---|---|---|")
raw, q2 = med("full-raw", 0), med("full-qcow2", 0)
print(f"| idle full backup, raw | {raw:.2f} s | |")
print(f"| idle full backup, qcow2 | {q2:.2f} s | |")
print(f"| qcow2 / raw (per repetition, median) | {st.median(b / a for a, b in zip(num('full-raw', 0), num('full-qcow2', 0))):.3f} | ≤ 1.1 |")
zt, zs = med("zstd-fleecefs", 0), med("zstd-fleecefs", 1)
qt, qs = med("zstd-qemu-img", 0), med("zstd-qemu-img", 1)
print(f"| compress=zstd backup | {zt:.2f} s, {zs / 2**20:.1f} MiB | |")
print(f"| qemu-img convert -c -O qcow2 -o compression_type=zstd | {qt:.2f} s, {qs / 2**20:.1f} MiB | |")
print(f"| qemu-img time / fleecefs time | {st.median(q / z for z, q in zip(num('zstd-fleecefs', 0), num('zstd-qemu-img', 0))):.2f} | ≥ 2 |")
print(f"| fleecefs size / qemu-img size | {zs / qs:.3f} | ≤ 1.05 |")
full, inc = med("incremental", 0), med("incremental", 1)
print(f"| qcow2 full with bitmap / 1% qcow2 incremental | {full:.2f} s / {inc:.3f} s | |")
print(f"| incremental / full | {st.median(b / a for a, b in zip(num('incremental', 0), num('incremental', 1))):.4f} | ≤ 0.05 |")
vt, rt = med("verify", 0), med("verify", 1)
print(f"| fleecectl verify of that chain / cat of the raw image | {vt:.2f} s / {rt:.2f} s = {vt / rt:.2f} | |")
n0, n1 = med("fio-none", 0), med("fio-zstd", 0)
print(f"| fio 4K randwrite QD16 O_DIRECT {sys.argv[3]} s, no job | {n0:.0f} IOPS, p99 {med('fio-none', 1) / 1000:.2f} ms | |")
print(f"| same, during a compressed qcow2 backup | {n1:.0f} IOPS, p99 {med('fio-zstd', 1) / 1000:.2f} ms | |")
print(f"| during / no job (per repetition, median) | {st.median(b / a for a, b in zip(num('fio-none', 0), num('fio-zstd', 0))):.3f} | ≥ 0.3 |")
r1 = med("fio-raw", 0)
print(f"| same, during a raw backup at the same speed | {r1:.0f} IOPS, p99 {med('fio-raw', 1) / 1000:.2f} ms | |")
print(f"| raw: during / no job (the cost of copy-before-write itself) | {st.median(b / a for a, b in zip(num('fio-none', 0), num('fio-raw', 0))):.3f} | |")
PY
