#!/usr/bin/env bash
# compress=zstd[:LEVEL] on qcow2 targets (SPEC section 6): each cluster
# compressed on its own as the qcow2 specification says for zstd, so that
# qemu-img (the judge) reads it: check clean, compare equal, info says zstd;
# smaller than uncompressed on mixed data; an incompressible image is stored
# uncompressed; levels; writers racing a compressed backup; a compressed
# incremental chain. A daemon built without libzstd refuses compress=zstd,
# saying why, and creates nothing (tests/run-all.sh runs this test on such a
# build too).
. "$TESTS_DIR/lib.sh"

command -v qemu-img >/dev/null || fail "qemu-img is needed (apt-get install qemu-utils)"
M=$((1024 * 1024))

# mixed_image PATH SIZE: a third zeroes, a third text, a third random.
mixed_image() {
	"$PY" - "$1" "$2" <<'PY'
import os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
third = size // 3 // 65536 * 65536
r = random.Random(5)
words = b"backup cluster fleece guest image point time qemu zstd writes chain the of and to".split()
text = bytearray()
while len(text) < third:
    text += b" ".join(r.choice(words) for _ in range(16)) + b"\n"
with open(path, "wb") as f:
    f.write(bytes(third))
    f.write(text[:third])
    f.write(os.urandom(size - 2 * third))
PY
}
# compressed FILE: the percentage of compressed clusters qemu-img check sees.
compressed() { qemu-img check -f qcow2 "$1" | sed -n 's/.* \([0-9.]*\)% compressed clusters.*/\1/p'; }
exact() {   # exact FILE REF
	qcow2_clean "$1"
	qemu-img compare -q -f raw -F qcow2 "$2" "$1" || fail "$(basename "$1") differs from $(basename "$2")"
	manifest_ok "$1" "$(basename "$1")"
}

mixed_image "$SRC/vm.img" $((24 * M))
mount_fleece

if ! grep -Eq '^features=(.* )?compress-zstd( |$)' "$MNT/.fleece/version"; then
	log "built without libzstd: compress=zstd is refused, nothing is created"
	refused ENOTSUP "built without libzstd" "backup vm.img $OUT/x.qcow2 compress=zstd id=bad"
	refused ENOTSUP "built without libzstd" "backup vm.img $OUT/x.qcow2 compress=zstd:5 id=bad"
	run_ok plain "backup vm.img $OUT/plain.qcow2 id=plain"
	exact "$OUT/plain.qcow2" "$SRC/vm.img"
	log "ok"
	exit 0
fi

log "mixed data: smaller than uncompressed, zstd clusters qemu-img reads"
run_ok plain "backup vm.img $OUT/plain.qcow2 id=plain"
run_ok z "backup vm.img $OUT/z.qcow2 compress=zstd id=z"
exact "$OUT/plain.qcow2" "$SRC/vm.img"
exact "$OUT/z.qcow2" "$SRC/vm.img"
want_eq "compression type" "$(qinfo "$OUT/z.qcow2" "['format-specific']['data']['compression-type']")" zstd
want_eq "plain compression type" "$(qinfo "$OUT/plain.qcow2" "['format-specific']['data']['compression-type']")" zlib
zs=$(stat -c %s "$OUT/z.qcow2") ps=$(stat -c %s "$OUT/plain.qcow2")
log "sizes: compressed $zs, plain $ps"
# The zero third is not stored at all, the text third shrinks to a fifth,
# the random third stays: about 0.6 of the plain file.
[ "$zs" -lt $((ps * 7 / 10)) ] || fail "compressed $zs bytes is not much smaller than plain $ps"
pct=$(compressed "$OUT/z.qcow2")
"$PY" -c "import sys; sys.exit(not 45 < float('$pct') < 55)" ||
	fail "$pct% of the allocated clusters are compressed: the text half should be, the random half not"
want_eq "plain compressed clusters" "$(compressed "$OUT/plain.qcow2")" 0.00

log "an incompressible image is stored uncompressed"
random_image "$SRC/random.img" $((4 * M))
run_ok r "backup random.img $OUT/r.qcow2 compress=zstd id=r"
exact "$OUT/r.qcow2" "$SRC/random.img"
want_eq "compressed clusters of random data" "$(compressed "$OUT/r.qcow2")" 0.00

log "levels"
run_ok l1 "backup vm.img $OUT/l1.qcow2 compress=zstd:1 id=l1"
run_ok l19 "backup vm.img $OUT/l19.qcow2 compress=zstd:19 id=l19"
exact "$OUT/l1.qcow2" "$SRC/vm.img"
exact "$OUT/l19.qcow2" "$SRC/vm.img"
[ "$(stat -c %s "$OUT/l19.qcow2")" -le "$(stat -c %s "$OUT/l1.qcow2")" ] ||
	fail "level 19 ($(stat -c %s "$OUT/l19.qcow2")) is larger than level 1 ($(stat -c %s "$OUT/l1.qcow2"))"

log "4K and 2M clusters"
unmount_fleece
for cs in 4K 4M; do
	mount_fleece -o cluster_size=$cs
	run_ok c$cs "backup vm.img $OUT/c$cs.qcow2 compress=zstd id=c$cs"
	exact "$OUT/c$cs.qcow2" "$SRC/vm.img"
	"$PY" -c "import sys; sys.exit(not float('$(compressed "$OUT/c$cs.qcow2")') > 20)" ||
		fail "no compressed clusters with $cs clusters"
	unmount_fleece
done
mount_fleece

log "writers racing a compressed backup"
mixed_image "$SRC/vm.img" $((24 * M))
cp "$SRC/vm.img" "$T/base"
"$PY" "$TESTS_DIR/pit_writers.py" --mnt "$MNT" --base "$T/base" --target "$OUT/pit.qcow2" --qcow2 \
	--writers 4 --lead 0.5 --tail 0.5 --options "speed=8M compress=zstd" >"$T/pit.out" 2>&1 ||
	fail "pit: $(tr '\n' '|' <"$T/pit.out")"
manifest_ok "$OUT/pit.qcow2" pit

log "a compressed incremental chain"
ctl "bitmap add vm.img b" >/dev/null || fail "bitmap add"
run_ok f "backup vm.img $OUT/f.qcow2 bitmap=b compress=zstd id=f"
cp "$SRC/vm.img" "$T/ref0"
"$PY" - "$MNT/vm.img" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
os.pwrite(fd, b"incremental " * 20000, 9 * 1048576 + 77)   # text: compresses
os.pwrite(fd, bytes(70000), 100000)                       # zeroes over zeroes and text
os.pwrite(fd, os.urandom(5000), 20 * 1048576 - 3)         # random: stored whole
PY
cp "$SRC/vm.img" "$T/ref1"
run_ok i "backup vm.img $OUT/i.qcow2 sync=incremental bitmap=b compress=zstd id=i"
exact "$OUT/i.qcow2" "$T/ref1"
exact "$OUT/f.qcow2" "$T/ref0"
want_eq "incremental's backing" "$(qinfo "$OUT/i.qcow2" ".get('backing-filename', '')")" f.qcow2

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"
log "ok"
