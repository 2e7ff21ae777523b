#!/usr/bin/env bash
# bench/fleecing.sh: does a slow backup target slow the guest?
#
# fio 4 KiB random writes at QD16 (O_DIRECT) on a 2 GiB image through
# fleecefs, RUNTIME seconds each, in four phases:
#   nojob     no job
#   slow      a full backup whose every target write is delayed DELAY_MS
#             (.fleece/inject) — copy-before-write data waits for that target
#   fleecing  the same slow target, with fleecing=on — copy-before-write goes
#             to a local store instead
#   fleecing4k  the same with -o cluster_size=4K
# Prints IOPS, p99 and the ratio to "nojob"; REPS repetitions, medians.
#     bench/fleecing.sh            SIZE=512M RUNTIME=5 REPS=1 bench/fleecing.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
WORK=${WORK:-/tmp/fleecefs-bench-fleecing}
SIZE=${SIZE:-2G} RUNTIME=${RUNTIME:-10} REPS=${REPS:-3} DELAY_MS=${DELAY_MS:-20}
. "$top/bench/lib.sh"
phase() {  # NAME [backup options]
	local name=$1 opts=${2-}
	rm -f "$WORK/out"/*
	sync; echo 3 > /proc/sys/vm/drop_caches
	if [ -n "$opts" ]; then
		echo "target-write from=1 delay=$DELAY_MS" > "$WORK/mnt/.fleece/inject"
		echo "backup disk.raw $WORK/out/t.raw id=b checksum=none $opts" > "$WORK/mnt/.fleece/ctl"
	fi
	local r; r=$(fio_run)
	if [ -n "$opts" ]; then
		echo "cancel b" > "$WORK/mnt/.fleece/ctl" 2>/dev/null || true
		local p99w; p99w=$(wait_job b | sed -n 's/^cbw_wait_us_p99=//p')
		echo "dismiss b" > "$WORK/mnt/.fleece/ctl"
		echo clear > "$WORK/mnt/.fleece/inject"
		r="$r $p99w"
	fi
	echo "$name $r"
}

for rep in $(seq "$REPS"); do
	mount_fs
	phase nojob
	phase slow "speed=0"
	phase fleecing "fleecing=on"
	umount_fs
	mount_fs -o cluster_size=4K
	phase nojob4k
	phase fleecing4k "fleecing=on"
	umount_fs
done | tee "$WORK/results.txt" >&2

python3 - "$WORK/results.txt" "$DELAY_MS" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r[0], []).append(r[1:])
def med(name, i):
    v = [float(x[i]) for x in by.get(name, []) if len(x) > i]
    return st.median(v) if v else None
print(f"## Guest 4 KiB random writes (QD16) while a backup's target takes {sys.argv[2]} ms per write\n")
print("| phase | IOPS | ratio to no job | guest p99 ms | cbw wait p99 ms |")
print("|---|---|---|---|---|")
for name, base, label in [("nojob", "nojob", "no job (64K clusters)"),
                          ("slow", "nojob", "backup, slow target"),
                          ("fleecing", "nojob", "backup fleecing=on, slow target"),
                          ("nojob4k", "nojob4k", "no job (4K clusters)"),
                          ("fleecing4k", "nojob4k", "backup fleecing=on, slow target, 4K clusters")]:
    io, p99, w = med(name, 0), med(name, 1), med(name, 2)
    if io is None:
        continue
    ratio = io / med(base, 0)
    wtxt = "—" if w is None else f"{w / 1000:.1f}"
    print(f"| {label} | {io:.0f} | {ratio:.2f} | {p99 / 1000:.1f} | {wtxt} |")
PY
