#!/usr/bin/env bash
# bench/reflink.sh: copy-before-write by cloning (reflink=auto) against
# copying (reflink=off) on an XFS file system with reflink, made in a loop
# file under $WORK by this script (issue 15, point 2).
#
# fio 4 KiB random writes at QD16 (O_DIRECT) on a SIZE image in that XFS,
# RUNTIME s per phase, interleaved per repetition:
#   nojob             no job
#   snapshot          a snapshot held for the whole run (store beside the image)
#   snapshot-off      the same with reflink=off
#   fleecing          a full backup with fleecing=on (store beside the image),
#                     target outside the XFS, every target write delayed
#                     DELAY_MS (a slow target: the guest sees copy-before-write
#                     into the store only)
#   fleecing-off      the same with reflink=off
# Also the image's extent count (filefrag) before and after one snapshot's
# life (snapshot, RUNTIME s of writes, release), with reflink auto and off.
#     bench/reflink.sh            SIZE=512M RUNTIME=5 REPS=1 bench/reflink.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
WORK=${WORK:-/tmp/fleecefs-bench-reflink}
SIZE=${SIZE:-2G} RUNTIME=${RUNTIME:-10} REPS=${REPS:-3} DELAY_MS=${DELAY_MS:-20}
command -v mkfs.xfs >/dev/null || { echo "bench: needs mkfs.xfs (apt-get install xfsprogs)" >&2; exit 1; }
command -v filefrag >/dev/null || { echo "bench: needs filefrag (e2fsprogs)" >&2; exit 1; }
[ -x "$FLEECEFS" ] || { echo "bench: build fleecefs first, or set FLEECEFS=" >&2; exit 1; }

# The XFS file system: three times the image (image, store, room to spare).
mkdir -p "$WORK/xfs" "$WORK/out"
xfs_mounted() { mountpoint -q "$WORK/xfs"; }
xfs_mounted && umount "$WORK/xfs"
size_bytes=$(numfmt --from=iec "$SIZE")
rm -f "$WORK/xfs.img"
truncate -s $((size_bytes * 3 + (512 << 20))) "$WORK/xfs.img"
mkfs.xfs -q -m reflink=1 "$WORK/xfs.img"
# A loop device with direct I/O, so that the XFS's writes reach the disk
# as on a real one (not through a second page cache).
loopdev=$(losetup --find --show --direct-io=on "$WORK/xfs.img")
mount "$loopdev" "$WORK/xfs"
mkdir -p "$WORK/xfs/src"
# lib.sh makes its image in $WORK/src: point that at the XFS.
ln -sfn "$WORK/xfs/src" "$WORK/src"
. "$top/bench/lib.sh"
cleanup_xfs() { cleanup; xfs_mounted && umount "$WORK/xfs"; losetup -d "$loopdev" 2>/dev/null; rm -f "$WORK/xfs.img" "$WORK/src"; }
trap cleanup_xfs EXIT

extents() { filefrag "$img" | sed -n 's/.*: \([0-9]*\) extents\? found/\1/p'; }

phase() {  # NAME KIND [options]
	local name=$1 kind=$2 opts=${3-} r
	rm -f "$WORK/out"/*
	drop_caches
	case $kind in
	snapshot) ctl "snapshot s disk.raw $opts" ;;
	fleecing) echo "target-write from=1 delay=$DELAY_MS" > "$WORK/mnt/.fleece/inject"
		  ctl "backup disk.raw $WORK/out/t.raw id=b checksum=none fleecing=on $opts" ;;
	esac
	r=$(fio_run)
	case $kind in
	snapshot) r="$r $(key s cloned_bytes)"; ctl "release s" ;;
	fleecing) r="$r $(key b store_cloned_bytes)"; ctl "cancel b"; wait_job b >/dev/null; ctl "dismiss b"
		  echo clear > "$WORK/mnt/.fleece/inject" ;;
	esac
	echo "$name $r"
}

# life REFLINK: extents before, after a snapshot's life of RUNTIME s of writes.
life() {
	local before after
	cp --reflink=never "$img" "$img.fresh" && mv "$img.fresh" "$img"
	before=$(extents)
	mount_fs
	ctl "snapshot s disk.raw reflink=$1"
	fio_run >/dev/null
	ctl "release s"
	umount_fs
	after=$(extents)
	echo "life-$1 $before $after"
}

{
	for rep in $(seq "$REPS"); do
		mount_fs
		phase nojob none
		phase snapshot snapshot reflink=auto
		phase snapshot-off snapshot reflink=off
		phase fleecing fleecing reflink=auto
		phase fleecing-off fleecing reflink=off
		umount_fs
	done
	life auto
	life off
} | tee "$WORK/results.txt" >&2

python3 - "$WORK/results.txt" "$SIZE" "$DELAY_MS" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r[0], []).append([float(x) for x in r[1:]])
def med(name, i):
    v = [x[i] for x in by.get(name, []) if len(x) > i]
    return st.median(v) if v else None
print(f"## Copy-before-write on XFS with reflink ({sys.argv[2]} image, fio 4 KiB random write QD16 O_DIRECT)\n")
print("| phase | IOPS | ratio to no job | p99 ms | bytes cloned |")
print("|---|---|---|---|---|")
base = med("nojob", 0)
for name, label in [("nojob", "no job"), ("snapshot", "snapshot, reflink=auto"),
                    ("snapshot-off", "snapshot, reflink=off"),
                    ("fleecing", f"backup fleecing=on, target {sys.argv[3]} ms/write, reflink=auto"),
                    ("fleecing-off", f"backup fleecing=on, target {sys.argv[3]} ms/write, reflink=off")]:
    io = med(name, 0)
    if io is None:
        continue
    cl = med(name, 2)
    cltxt = "—" if cl is None else f"{cl / 2**20:.0f} MiB"
    print(f"| {label} | {io:.0f} | {io / base:.2f} | {med(name, 1) / 1000:.2f} | {cltxt} |")
print("\n| a snapshot's life | image extents before | after |\n|---|---|---|")
for r in rows:
    if r[0].startswith("life-"):
        print(f"| reflink={r[0][5:]} | {r[1]} | {r[2]} |")
PY
