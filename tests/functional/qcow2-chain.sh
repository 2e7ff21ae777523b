#!/usr/bin/env bash
# qcow2 incremental chains (SPEC sections 3 and 5): a full backup and three
# incrementals, each a new qcow2 file holding only the clusters dirty at its
# point in time over the previous backup as its backing file; writes between
# them straddle clusters and write zeroes (zero clusters mask the backing).
# qemu-img judges every point: check clean, compare equal to the image at
# that point, convert flattens it, and each manifest (read through the chain)
# describes the whole image. A chain may start on a raw full backup. A real
# VM boots from the third incremental (cache=none) and verifies its pattern.
# backing= that is not the chain's last backup, or of another size, is
# refused whole.
. "$TESTS_DIR/lib.sh"

command -v qemu-img >/dev/null || fail "qemu-img is needed (apt-get install qemu-utils)"
vm_kit

K=1024 M=$((1024 * 1024)) SIZE=$((16 * 1024 * 1024))
# zeroes IMAGE OFF LEN: a guest write of zero bytes (not a hole) through the mount.
zeroes() {
	"$PY" -c "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); os.pwrite(fd, bytes(int(sys.argv[3])), int(sys.argv[2]))" \
		"$MNT/$1" "$2" "$3"
}
# pat SEED OFF LEN: the guest's pattern, written through the mount (O_DIRECT, 4K pieces).
pat() { "$PATTERN" write "$MNT/vm.img" "$1" "$2" "$3" 4096 || fail "pattern write $*"; }
# point FILE REF BACKING_NAME BACKING_FORMAT: one point of a chain, judged.
point() {
	local file=$1 ref=$2 backing=$3 bformat=$4 flat
	qcow2_clean "$file"
	want_eq "$(basename "$file") backing" "$(qinfo "$file" ".get('backing-filename', '')")" "$backing"
	[ -z "$backing" ] || want_eq "$(basename "$file") backing format" "$(qinfo "$file" "['backing-filename-format']")" "$bformat"
	want_eq "$(basename "$file") virtual size" "$(qinfo "$file" "['virtual-size']")" $SIZE
	qemu-img compare -q -f raw -F qcow2 "$ref" "$file" || fail "$(basename "$file") differs from its point in time"
	flat=$T/flat.raw
	qemu-img convert -f qcow2 -O raw "$file" "$flat" || fail "qemu-img convert $file"
	same "$(basename "$file") flattened" "$ref" "$flat"
	rm -f "$flat"
	manifest_ok "$file" "$(basename "$file")"
}

truncate -s $SIZE "$SRC/vm.img"
"$PATTERN" write "$SRC/vm.img" 1 0 $SIZE || fail "host pattern write"
mount_fleece
ctl "bitmap add vm.img b" >/dev/null || fail "bitmap add"

log "a full qcow2 backup starts the chain"
run_ok full "backup vm.img $OUT/full.qcow2 bitmap=b id=full"
cp "$SRC/vm.img" "$T/ref0"
point "$OUT/full.qcow2" "$T/ref0" "" ""

log "incremental 1: writes straddling clusters, zeroes over data, an unaligned random write"
pat 2 $((60 * K)) $((136 * K))
zeroes vm.img $M $((192 * K))
zeroes vm.img $((3 * M + 1000)) 70000
pwrites vm.img $((5 * M + 123)):100000
cp "$SRC/vm.img" "$T/ref1"
want_eq "dirty before inc1" "$(dirty vm.img b)" $((11 * 64 * K))
run_ok inc1 "backup vm.img $OUT/inc1.qcow2 sync=incremental bitmap=b id=inc1"
want_eq "inc1 bytes_done" "$(status inc1 bytes_done)" $((11 * 64 * K))
point "$OUT/inc1.qcow2" "$T/ref1" full.qcow2 qcow2
# Only what changed is in the file: 11 clusters (4 + 3 + 2 + 2), of which the
# 3 wholly zeroed are zero clusters (no data), plus metadata.
data=$(qemu-img map -f qcow2 --output=json "$OUT/inc1.qcow2" |
	"$PY" -c "import json, sys; print(sum(e['length'] for e in json.load(sys.stdin) if e['data'] and e['depth'] == 0))")
want_eq "inc1 data of its own" "$data" $((8 * 64 * K))
zero_own=$(qemu-img map -f qcow2 --output=json "$OUT/inc1.qcow2" |
	"$PY" -c "import json, sys; print(sum(e['length'] for e in json.load(sys.stdin) if e['zero'] and e['depth'] == 0))")
want_eq "inc1 zero clusters masking the backing" "$zero_own" $((3 * 64 * K))

log "incremental 2: over inc1; data over an earlier zero cluster"
pat 3 $((8 * M - 4 * K)) $((72 * K))
pat 3 $((M + 64 * K)) $((64 * K))
cp "$SRC/vm.img" "$T/ref2"
run_ok inc2 "backup vm.img $OUT/inc2.qcow2 sync=incremental bitmap=b id=inc2"
point "$OUT/inc2.qcow2" "$T/ref2" inc1.qcow2 qcow2

log "incremental 3: backing= given explicitly; zeroes over part of a cluster"
pat 4 $((12 * M)) $((64 * K))
zeroes vm.img $((60 * K)) $((4 * K))
cp "$SRC/vm.img" "$T/ref3"
run_ok inc3 "backup vm.img $OUT/inc3.qcow2 sync=incremental bitmap=b backing=$OUT/inc2.qcow2 id=inc3"
point "$OUT/inc3.qcow2" "$T/ref3" inc2.qcow2 qcow2
# Every earlier point still reads as its own time.
point "$OUT/inc1.qcow2" "$T/ref1" full.qcow2 qcow2
point "$OUT/full.qcow2" "$T/ref0" "" ""

log "bad backing= and a resized image are refused whole"
refused EINVAL "backing .*inc2.qcow2 is not the last backup of bitmap b" \
	"backup vm.img $OUT/inc4.qcow2 sync=incremental bitmap=b backing=$OUT/inc2.qcow2 id=bad"
refused ENOENT "backing .*nosuch.qcow2" \
	"backup vm.img $OUT/inc4.qcow2 sync=incremental bitmap=b backing=$OUT/nosuch.qcow2 id=bad"
refused EEXIST "already exists" "backup vm.img $OUT/inc3.qcow2 sync=incremental bitmap=b id=bad"
refused EINVAL "backing= applies only to sync=incremental" "backup vm.img $OUT/x.qcow2 backing=$OUT/inc3.qcow2 id=bad"
cp "$OUT/inc3.qcow2" "$T/inc3-copy"
refused EINVAL "inc3-copy is not the last backup" \
	"backup vm.img $OUT/inc4.qcow2 sync=incremental bitmap=b backing=$T/inc3-copy id=bad"
truncate -s $((SIZE + M)) "$MNT/vm.img"
refused EINVAL "holds a $SIZE-byte disk, vm.img is $((SIZE + M)) bytes" \
	"backup vm.img $OUT/inc4.qcow2 sync=incremental bitmap=b id=bad"
truncate -s $SIZE "$MNT/vm.img"

log "a VM boots from the third incremental (cache=none) and finds its data"
cp "$OUT/inc3.qcow2" "$T/inc3-before"
cat > "$T/guest.sh" <<G
set -e
zero() { [ -z "\$(dd if=/dev/vda bs=4096 skip=\$((\$1 / 4096)) count=\$((\$2 / 4096)) 2>/dev/null | od -An -v -tx1 | tr -d ' 0\n')" ]; }
pattern verify /dev/vda 1 $((2 * M)) $((M))
pattern verify /dev/vda 1 $((15 * M)) $M
pattern verify /dev/vda 2 $((64 * K)) $((132 * K)) 4096
zero $((60 * K)) $((4 * K))
zero $M $((64 * K))
pattern verify /dev/vda 3 $((M + 64 * K)) $((64 * K))
zero $((M + 128 * K)) $((64 * K))
pattern verify /dev/vda 3 $((8 * M - 4 * K)) $((72 * K)) 4096
pattern verify /dev/vda 4 $((12 * M)) $((64 * K))
echo guest-verified
G
"$RUN_GUEST" "$OUT/inc3.qcow2" "$T/guest.sh" --format qcow2 --timeout 180 > "$T/guest.out" 2>&1 ||
	fail "the guest could not verify the chain ($?): $(tail -5 "$T/guest.out")"
grep -q guest-verified "$T/guest.out" || fail "guest: $(tail -5 "$T/guest.out")"
same "inc3.qcow2 after QEMU read it" "$T/inc3-before" "$OUT/inc3.qcow2"

log "a chain on a raw full backup"
ctl "bitmap add vm.img r" >/dev/null || fail "bitmap add r"
run_ok rfull "backup vm.img $OUT/rfull.raw bitmap=r id=rfull"
cp "$SRC/vm.img" "$T/rref0"
pat 5 $((4 * M + 4 * K)) $((128 * K))
cp "$SRC/vm.img" "$T/rref1"
run_ok rinc1 "backup vm.img $OUT/rinc1.qcow2 sync=incremental bitmap=r id=rinc1"
point "$OUT/rinc1.qcow2" "$T/rref1" rfull.raw raw
same "the raw full backup under its incremental" "$T/rref0" "$OUT/rfull.raw"
# Its chain is qcow2 now: a raw incremental would update rinc1.qcow2 in place.
refused EINVAL "rinc1.qcow2 is a qcow2 backup: a raw incremental" \
	"backup vm.img $OUT/rinc1.qcow2 sync=incremental bitmap=r format=raw id=bad"

log "a qcow2 incremental that fails halfway leaves nothing, the chain verifies; the next one is exact"
pat 6 $((6 * M)) $M
inject "target-write offset=6656K-7M from=1 errno=EIO"
start fi "backup vm.img $OUT/rinc2.qcow2 sync=incremental bitmap=r id=fi"
[ "$(wait_job fi)" = failed ] || fail "fi: $(status fi state)"
inject clear
[ ! -e "$OUT/rinc2.qcow2" ] && [ ! -e "$OUT/rinc2.qcow2.xxh3" ] || fail "the failed incremental left its target"
[ -z "$(hidden_files "$OUT")" ] || fail "hidden files left: $(hidden_files "$OUT")"
point "$OUT/rinc1.qcow2" "$T/rref1" rfull.raw raw
cp "$SRC/vm.img" "$T/rref2"
run_ok rinc2 "backup vm.img $OUT/rinc2.qcow2 sync=incremental bitmap=r id=rinc2"
point "$OUT/rinc2.qcow2" "$T/rref2" rinc1.qcow2 qcow2
point "$OUT/rinc1.qcow2" "$T/rref1" rfull.raw raw

log "a daemon killed during a qcow2 incremental: nothing under TARGET, the chain intact, the next one exact"
pat 7 $((9 * M)) $((256 * K))
inject "target-write from=1 delay=3000"
start ki "backup vm.img $OUT/rinc3.qcow2 sync=incremental bitmap=r id=ki"
sleep 0.5
want_eq "ki while it writes" "$(status ki state)" running
kill_daemon
mount_fleece
[ ! -e "$OUT/rinc3.qcow2" ] && [ ! -e "$OUT/rinc3.qcow2.xxh3" ] || fail "the killed incremental left its target"
[ -z "$(hidden_files "$OUT")" ] || fail "the next mount left hidden files: $(hidden_files "$OUT")"
point "$OUT/rinc2.qcow2" "$T/rref2" rinc1.qcow2 qcow2
cp "$SRC/vm.img" "$T/rref3"
run_ok rinc3 "backup vm.img $OUT/rinc3.qcow2 sync=incremental bitmap=r id=rinc3"
point "$OUT/rinc3.qcow2" "$T/rref3" rinc2.qcow2 qcow2

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"
log "ok"
