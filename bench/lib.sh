# bench/lib.sh: sourced by the bench scripts that drive fleecefs alone.
# Needs FLEECEFS, WORK, SIZE, RUNTIME set; makes $WORK/src/disk.raw (random,
# SIZE bytes, kept between runs), mounts at $WORK/mnt, targets in $WORK/out.
mkdir -p "$WORK/src" "$WORK/mnt" "$WORK/out"
img=$WORK/src/disk.raw
want=$(numfmt --from=iec "$SIZE")
[ -f "$img" ] && [ "$(stat -c %s "$img")" = "$want" ] || head -c "$want" /dev/urandom > "$img"
pid=
cleanup() { mountpoint -q "$WORK/mnt" && fusermount3 -u "$WORK/mnt"; [ -n "$pid" ] && wait "$pid" 2>/dev/null; rm -rf "$WORK/out"; }
trap cleanup EXIT

mount_fs() { "$FLEECEFS" -f "$@" "$WORK/src" "$WORK/mnt" 2>>"$WORK/daemon.log" & pid=$!
	     for _ in $(seq 100); do [ -e "$WORK/mnt/.fleece/ctl" ] && return; sleep 0.05; done; exit 1; }
umount_fs() { fusermount3 -u "$WORK/mnt"; wait "$pid" || true; pid=; }
# fio_run [FILE]: 4 KiB random writes QD16 O_DIRECT for RUNTIME s: "IOPS P99_US".
fio_run() {
	fio --name=w --filename="${1:-$WORK/mnt/disk.raw}" --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
	    --direct=1 --runtime="$RUNTIME" --time_based --randrepeat=0 --norandommap --output-format=json 2>/dev/null |
		jq -r '.jobs[0].write | "\(.iops) \(.clat_ns.percentile["99.000000"] / 1000)"'
}
# wait_job ID: until it concluded; prints its status.
wait_job() {
	local s=$WORK/mnt/.fleece/jobs/$1/status
	until grep -qE '^state=(completed|failed|cancelled)' "$s"; do sleep 0.02; done
	cat "$s"
}
