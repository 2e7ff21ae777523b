#!/usr/bin/env bash
# bench/run.sh: fleecefs, the peer users would pick today (qemu-storage-daemon's
# FUSE export with its backup job) and the plain file, measured side by side in
# one run by ../shared/bench/anchors.sh, then merged into one table
# (bench/compare.py). Run by hand, as root, on an otherwise idle machine:
#
#     bench/run.sh                  # 2 GiB image, 10 s per fio run, 3 reps (~20 min)
#     SIZE=512M RUNTIME=5 REPS=1 bench/run.sh     # a quick look
#
# fio workloads: 1 MiB sequential write/read and 4 KiB random write/read, QD16,
# O_DIRECT, on: the plain file; each layer with no job; each layer while a
# full backup at unlimited speed runs; and a copy-before-write-only phase
# (a sync=none job on both). Plus
# the idle full backup of the image against `qemu-img convert` and dd.
# Results: $WORK/results/{qsd,fleecefs}-TIMESTAMP and the merged markdown on
# stdout (also in $WORK/results/compare-TIMESTAMP.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
ANCHORS=${ANCHORS:-${SHARED_DIR:-$top/../shared}/bench/anchors.sh}
export WORK=${WORK:-/tmp/fleecefs-bench}
export FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
[ -x "$ANCHORS" ] || { echo "bench: $ANCHORS not found (set ANCHORS=)" >&2; exit 1; }
[ -x "$FLEECEFS" ] || { echo "bench: build fleecefs first (tests/run-all.sh or make), or set FLEECEFS=" >&2; exit 1; }
for t in fio jq qemu-img qemu-storage-daemon; do
	command -v $t >/dev/null || { echo "bench: needs $t (apt-get install fio jq qemu-utils qemu-system-common)" >&2; exit 1; }
done
stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$WORK/results"

echo "== peer: qemu-storage-daemon" >&2
RESULTS=$WORK/results/qsd-$stamp "$ANCHORS" >/dev/null

echo "== fleecefs ($FLEECEFS)" >&2
# The control-directory hooks of SPEC section 3; start=/end= are the job's own
# clock, from its status file, so hook start-up costs are not counted.
RESULTS=$WORK/results/fleecefs-$stamp IMPL_NAME=fleecefs \
MOUNT_CMD='"$FLEECEFS" -f "$SRC_DIR" "$MNT" 2>>"$WORK/fleecefs.log" & echo $! >"$DAEMON_PIDFILE"; for i in $(seq 100); do [ -e "$MNT/.fleece/ctl" ] && exit 0; sleep 0.1; done; exit 1' \
UNMOUNT_CMD='fusermount3 -u "$MNT"; p=$(cat "$DAEMON_PIDFILE"); while kill -0 $p 2>/dev/null; do sleep 0.1; done' \
START_BACKUP_CMD='if [ "$SYNC" = none ]; then opts="sync=none"; else opts="sync=$SYNC speed=$BACKUP_SPEED"; fi; printf "backup disk.raw %s %s id=%s checksum=none\n" "$TARGET" "$opts" "$JOB_ID" >"$MNT/.fleece/ctl" && sed -n "s/^started=/start=/p" "$MNT/.fleece/jobs/$JOB_ID/status"' \
WAIT_BACKUP_CMD='s=$MNT/.fleece/jobs/$JOB_ID/status; until grep -qE "^state=(completed|failed|cancelled)" "$s"; do sleep 0.02; done; sed -n "s/^finished=/end=/p" "$s"; grep -q "^state=completed" "$s"; r=$?; echo "dismiss $JOB_ID" >"$MNT/.fleece/ctl"; exit $r' \
CANCEL_BACKUP_CMD='s=$MNT/.fleece/jobs/$JOB_ID/status; [ -e "$s" ] || exit 0; echo "cancel $JOB_ID" >"$MNT/.fleece/ctl" 2>/dev/null; until grep -qE "^state=(failed|cancelled|completed)" "$s"; do sleep 0.02; done; sed -n "s/^finished=/end=/p" "$s"; echo "dismiss $JOB_ID" >"$MNT/.fleece/ctl"' \
"$ANCHORS" >/dev/null

python3 "$here/compare.py" "$WORK/results/qsd-$stamp" "$WORK/results/fleecefs-$stamp" | tee "$WORK/results/compare-$stamp.md"

# ISSUE15=1 adds the rows of issue 15 to the same run, each script printing
# its own table into the same markdown file (about 30 minutes more).
if [ "${ISSUE15:-0}" = 1 ]; then
	for b in backup-load reflink scale transport; do
		echo "== $b" >&2
		WORK=$WORK/$b "$here/$b.sh" | tee -a "$WORK/results/compare-$stamp.md"
	done
fi
