# bench/lib.sh: sourced by the bench scripts that drive fleecefs alone.
# Needs FLEECEFS, WORK, SIZE, RUNTIME set; makes $WORK/src/disk.raw (random,
# SIZE bytes, kept between runs), mounts at $WORK/mnt, targets in $WORK/out.
mkdir -p "$WORK/src" "$WORK/mnt" "$WORK/out"
img=$WORK/src/disk.raw
# make_image: $img of SIZE bytes, kept between runs: IMAGE_KIND=random (the
# default) or mixed (a third zeroes, a third text-like, a third random).
make_image() {
	local want kind=${IMAGE_KIND:-random}
	want=$(numfmt --from=iec "$SIZE")
	[ -f "$img" ] && [ "$(stat -c %s "$img")" = "$want" ] && [ "$(cat "$img.kind" 2>/dev/null)" = "$kind" ] && return
	if [ "$kind" = mixed ]; then
		python3 - "$img" "$want" <<'PY'
import os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
third = size // 3 // 65536 * 65536
r = random.Random(11)
words = ("the backup of a virtual machine keeps every cluster exact at one point in time while the "
         "guest goes on writing its disk image through the mount and fleecefs copies old data first").split()
pool = bytearray()
while len(pool) < 8 << 20:
    pool += (" ".join(r.choice(words) for _ in range(12)) + "\n").encode()
with open(path, "wb") as f:
    f.truncate(third)   # zeroes (a hole)
    f.seek(third)
    left = third
    while left:
        start = r.randrange(len(pool) - (1 << 20))
        n = min(left, 1 << 20)
        f.write(pool[start:start + n])
        left -= n
    left = size - 2 * third
    while left:
        n = min(left, 16 << 20)
        f.write(os.urandom(n))
        left -= n
PY
	else
		head -c "$want" /dev/urandom > "$img"
	fi
	echo "$kind" > "$img.kind"
}
make_image
pid=
# Every step, whatever the one before returned (set +e): a mount kept busy by
# a guest still running after a failure is not left with its daemon behind.
cleanup() {
	set +e
	mountpoint -q "$WORK/mnt" && ! fusermount3 -u "$WORK/mnt" && [ -n "$pid" ] && kill "$pid"
	[ -n "$pid" ] && wait "$pid" 2>/dev/null
	rm -rf "$WORK/out"
}
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
ctl() { echo "$1" > "$WORK/mnt/.fleece/ctl"; }
key() { sed -n "s/^$2=//p" "$WORK/mnt/.fleece/jobs/$1/status"; }
# job_seconds ID: waits for the job; prints finished - started, or fails.
job_seconds() {
	local s
	until s=$(key "$1" state); [[ $s =~ ^(completed|failed|cancelled)$ ]]; do sleep 0.02; done
	[ "$s" = completed ] || { echo "job $1 $s: $(key "$1" error)" >&2; exit 1; }
	awk -v a="$(key "$1" started)" -v b="$(key "$1" finished)" 'BEGIN { printf "%.3f\n", b - a }'
}
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
