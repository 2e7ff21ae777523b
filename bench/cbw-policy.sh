#!/usr/bin/env bash
# bench/cbw-policy.sh: what on-cbw-error=break-guest-write costs.
#
# Under break-guest-write every copy is written through to the target before
# it counts (no write-behind), so that a guest write is acknowledged only
# after its cluster's old data is in the target. Measured on a SIZE random
# image, in one run, medians of REPS:
#   guest 4 KiB random writes (fio QD16, O_DIRECT, RUNTIME s) with no job,
#   during an unlimited full backup (default break-snapshot), and during one
#   with break-guest-write: IOPS, ratio to no job, guest p99, cbw wait p99;
#   the idle full backup's time with each policy.
#     bench/cbw-policy.sh          SIZE=512M RUNTIME=5 REPS=1 bench/cbw-policy.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
WORK=${WORK:-/tmp/fleecefs-bench-cbw}
SIZE=${SIZE:-2G} RUNTIME=${RUNTIME:-10} REPS=${REPS:-3}
. "$top/bench/lib.sh"

phase() {  # NAME [backup options]
	local name=$1 opts=${2-}
	rm -f "$WORK/out"/*
	sync; echo 3 > /proc/sys/vm/drop_caches
	[ -z "$opts" ] || echo "backup disk.raw $WORK/out/t.raw id=b checksum=none speed=0 $opts" > "$WORK/mnt/.fleece/ctl"
	local r; r=$(fio_run)
	if [ -n "$opts" ]; then
		echo "cancel b" > "$WORK/mnt/.fleece/ctl" 2>/dev/null || true
		r="$r $(wait_job b | sed -n 's/^cbw_wait_us_p99=//p')"
		echo "dismiss b" > "$WORK/mnt/.fleece/ctl"
	fi
	echo "$name $r"
}
idle() {  # NAME [backup options]
	rm -f "$WORK/out"/*
	sync; echo 3 > /proc/sys/vm/drop_caches
	local t0; t0=$(date +%s.%N)
	echo "backup disk.raw $WORK/out/t.raw id=b checksum=none $2" > "$WORK/mnt/.fleece/ctl"
	wait_job b >/dev/null
	echo "dismiss b" > "$WORK/mnt/.fleece/ctl"
	echo "$1 $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')"
}

for rep in $(seq "$REPS"); do
	mount_fs
	phase nojob
	phase snapshot "on-cbw-error=break-snapshot"
	phase guest "on-cbw-error=break-guest-write"
	idle idle-snapshot "on-cbw-error=break-snapshot"
	idle idle-guest "on-cbw-error=break-guest-write"
	umount_fs
done | tee "$WORK/results.txt" >&2

python3 - "$WORK/results.txt" <<'PY'
import statistics as st, sys
by = {}
for r in (l.split() for l in open(sys.argv[1]) if l.strip()):
    by.setdefault(r[0], []).append([float(x) for x in r[1:]])
med = lambda n, i: st.median(x[i] for x in by[n])
print("## Guest 4 KiB random writes (QD16) during an unlimited full backup, by on-cbw-error\n")
print("| phase | IOPS | ratio to no job | guest p99 ms | cbw wait p99 ms |")
print("|---|---|---|---|---|")
for name, label in [("nojob", "no job"), ("snapshot", "break-snapshot (write-behind)"),
                    ("guest", "break-guest-write (write-through)")]:
    w = "—" if name == "nojob" else f"{med(name, 2) / 1000:.1f}"
    print(f"| {label} | {med(name, 0):.0f} | {med(name, 0) / med('nojob', 0):.2f} | {med(name, 1) / 1000:.1f} | {w} |")
print(f"\nIdle full backup: break-snapshot {med('idle-snapshot', 0):.2f} s, "
      f"break-guest-write {med('idle-guest', 0):.2f} s "
      f"({med('idle-guest', 0) / med('idle-snapshot', 0):.2f}x)")
PY
