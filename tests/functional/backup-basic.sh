#!/usr/bin/env bash
# Full raw backups of idle images: byte-exact, holes and zero clusters stay
# holes, odd sizes, empty images, subdirectories, the xxh3 manifest, and a
# target that runs out of space fails the job without touching the guest.
. "$TESTS_DIR/lib.sh"

allocated() { echo $(( $(stat -c %b "$1") * 512 )); }

# A sparse image: data islands, a cluster of real zeroes, holes between.
truncate -s 64M "$SRC/sparse.img"
for off in 0 5 17 40 63; do
	head -c 100000 /dev/urandom | dd of="$SRC/sparse.img" bs=1M seek="$off" conv=notrunc status=none
done
dd if=/dev/zero of="$SRC/sparse.img" bs=1M seek=30 count=2 conv=notrunc status=none
# An odd size: not a multiple of the cluster, not of 512.
head -c $((10 * 1048576 + 12345)) /dev/urandom > "$SRC/odd.img"
: > "$SRC/empty.img"
mkdir -p "$SRC/pool/deep"
random_image "$SRC/pool/deep/vm.img" 8M

mount_fleece

log "sparse image: exact, holes and zero clusters stay holes"
out=$(ctl "backup sparse.img $OUT/sparse.raw id=sparse") || fail "backup refused: $out"
[ "$out" = "ok id=sparse" ] || fail "answer '$out'"
[ "$(wait_job sparse)" = completed ] || fail "sparse: $(status sparse error)"
cmp "$SRC/sparse.img" "$OUT/sparse.raw" || fail "sparse backup differs"
[ "$(stat -c %s "$OUT/sparse.raw")" = $((64 << 20)) ] || fail "sparse target size"
a=$(allocated "$OUT/sparse.raw")
# 5 islands of 100000 bytes touch at most 2 clusters each; the zero MiBs none.
[ "$a" -le $((10 * 65536 + 65536)) ] || fail "target allocates $a bytes: holes or zero clusters were written"
[ "$(status sparse bytes_done)" = $((64 << 20)) ] || fail "bytes_done $(status sparse bytes_done)"
python3 - "$OUT/sparse.raw" <<'PY' || fail "target has no hole where the image had one"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
hole = os.lseek(fd, 0, os.SEEK_HOLE)
assert hole <= 2 * 65536, hole
data = os.lseek(fd, 5 << 20, os.SEEK_DATA)
assert (5 << 20) <= data < (5 << 20) + 65536, data
PY
python3 "$TESTS_DIR/manifest_check.py" "$OUT/sparse.raw" || fail "sparse manifest"

log "odd size, empty image, image in a subdirectory"
out=$(ctl "backup odd.img $OUT/odd.raw id=odd
backup empty.img $OUT/empty.raw id=empty
backup pool/deep/vm.img $OUT/deep.raw id=deep checksum=none") || fail "refused: $out"
for j in odd empty deep; do [ "$(wait_job $j)" = completed ] || fail "$j: $(status $j error)"; done
cmp "$SRC/odd.img" "$OUT/odd.raw" || fail "odd-size backup differs"
python3 "$TESTS_DIR/manifest_check.py" "$OUT/odd.raw" || fail "odd manifest"
[ -f "$OUT/empty.raw" ] && [ "$(stat -c %s "$OUT/empty.raw")" = 0 ] || fail "empty target"
python3 "$TESTS_DIR/manifest_check.py" "$OUT/empty.raw" || fail "empty manifest"
cmp "$SRC/pool/deep/vm.img" "$OUT/deep.raw" || fail "subdirectory backup differs"
[ ! -e "$OUT/deep.raw.xxh3" ] || fail "checksum=none wrote a manifest"
[ "$(status deep image)" = pool/deep/vm.img ] || fail "status image= $(status deep image)"
[ "$(stat -c %a "$OUT/odd.raw")" = 600 ] || fail "target mode $(stat -c %a "$OUT/odd.raw"), want 600"

log "a target that fills up: the job fails, the guest does not notice"
mkdir "$T/small"
mount -t tmpfs -o size=2M tmpfs "$T/small"
EXTRA_MOUNTS+=("$T/small")
random_image "$SRC/big.img" 16M
cp "$SRC/big.img" "$T/shadow"
out=$(ctl "backup big.img $T/small/big.raw id=full speed=4M") || fail "refused: $out"
# Guest writes while the copy fails must still land.
python3 - "$MNT/big.img" "$T/shadow" <<'PY' || fail "guest write failed during the failing backup"
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDWR); sh = open(sys.argv[2], "r+b")
rng = random.Random(1)
end = time.monotonic() + 1.5
while time.monotonic() < end:
    off = rng.randrange(0, (16 << 20) - 70000); data = rng.randbytes(rng.randint(1, 70000))
    assert os.pwrite(fd, data, off) == len(data)
    sh.seek(off); sh.write(data)
PY
[ "$(wait_job full)" = failed ] || fail "job on a full target did not fail"
case $(status full error) in *"No space left"*) ;; *) fail "error text: $(status full error)";; esac
[ ! -e "$T/small/big.raw" ] && [ ! -e "$T/small/big.raw.xxh3" ] || fail "failed job left its target behind"
cmp "$SRC/big.img" "$T/shadow" || fail "image differs from what the guest wrote"

log "a target that cannot be created fails the command, starts nothing"
mkdir "$T/ro"
mount -t tmpfs -o ro tmpfs "$T/ro"
EXTRA_MOUNTS+=("$T/ro")
ctl_expect EROFS "backup big.img $T/ro/x.raw id=ro" >/dev/null
[ ! -e "$MNT/.fleece/jobs/ro" ] || fail "a job was left behind"

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exit $DAEMON_RC"
log "ok"
