#!/usr/bin/env bash
# format=qcow2 (SPEC section 6): full and top backups into qcow2 v3 files
# that qemu-img, the independent judge here, finds clean (check), equal to
# the image at the point in time (the racing writers of pit_writers.py, read
# back through qemu-img convert) and described right (info); zero clusters
# unallocated; the qcow2 cluster is the job's up to 2M; a failed or killed
# job leaves nothing under TARGET; a qcow2 source is backed up byte for byte
# unless format=qcow2 is given; bad combinations are refused whole.
. "$TESTS_DIR/lib.sh"

command -v qemu-img >/dev/null || fail "qemu-img is needed (apt-get install qemu-utils)"


pit() {   # pit LABEL CLUSTER QCOW2_CLUSTER OPTIONS
	local label=$1 cs=$2 want=$3 opts=$4
	rm -f "$OUT"/* "$OUT"/.??* 2>/dev/null || true
	if [ "$opts" = sync=top ]; then
		# Data islands and holes: a hole at T is a hole in the backup.
		truncate -s 32M "$SRC/vm.img"
		for off in 1 6 13 20 27; do
			head -c 1500000 /dev/urandom | dd of="$SRC/vm.img" bs=1M seek="$off" conv=notrunc status=none
		done
	else
		random_image "$SRC/vm.img" 32M
	fi
	cp --sparse=always "$SRC/vm.img" "$T/base"
	mount_fleece -o cluster_size="$cs"
	log "$label"
	"$PY" "$TESTS_DIR/pit_writers.py" --mnt "$MNT" --base "$T/base" --target "$OUT/vm.qcow2" --qcow2 \
		--writers 4 --lead 0.5 --tail 0.5 --options "speed=12M $opts" >"$T/pit.out" 2>&1 ||
		fail "$label: $(tr '\n' '|' <"$T/pit.out")"
	want_eq "$label: format" "$(qinfo "$OUT/vm.qcow2" "['format']")" qcow2
	want_eq "$label: virtual size" "$(qinfo "$OUT/vm.qcow2" "['virtual-size']")" $((32 << 20))
	want_eq "$label: cluster size" "$(qinfo "$OUT/vm.qcow2" "['cluster-size']")" "$want"
	want_eq "$label: backing" "$(qinfo "$OUT/vm.qcow2" ".get('backing-filename', '')")" ""
	want_eq "$label: compat" "$(qinfo "$OUT/vm.qcow2" "['format-specific']['data']['compat']")" 1.1
	manifest_ok "$OUT/vm.qcow2" "$label"
	want_eq "$label: manifest format" "$(sed -n 's/^format=//p' "$OUT/vm.qcow2.xxh3")" qcow2
	want_eq "$label: status format" "$(status pit format)" qcow2
	[ -z "$(hidden_files "$OUT")" ] || fail "$label: hidden files left: $(hidden_files "$OUT")"
	unmount_fleece
	[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"
}

pit "sync=full, 64K clusters, writers racing the copy" 64K 65536 ""
pit "sync=full, 4K clusters" 4K 4096 ""
pit "sync=full, 4M job clusters: 2M qcow2 clusters, two per job cluster" 4M 2097152 ""
pit "sync=top, 64K clusters, holes at T" 64K 65536 sync=top

mount_fleece

log "zero clusters and holes stay unallocated; odd sizes; an empty image"
rm -f "$OUT"/*
truncate -s 64M "$SRC/sparse.img"
for off in 0 17 40; do head -c 100000 /dev/urandom | dd of="$SRC/sparse.img" bs=1M seek="$off" conv=notrunc status=none; done
dd if=/dev/zero of="$SRC/sparse.img" bs=1M seek=30 count=2 conv=notrunc status=none
head -c $((3 * 1048576 + 12345)) /dev/urandom > "$SRC/odd.img"
: > "$SRC/empty.img"
out=$(ctl "backup sparse.img $OUT/sparse.qcow2 id=z
backup odd.img $OUT/odd.qcow2 id=o
backup empty.img $OUT/empty.qcow2 id=e") || fail "refused: $out"
want_eq "answer" "$out" "ok id=z id=o id=e"
for j in z o e; do [ "$(wait_job $j)" = completed ] || fail "$j: $(status $j error)"; done
for f in sparse odd empty; do
	qcow2_clean "$OUT/$f.qcow2"
	qemu-img compare -q -f raw -F qcow2 "$SRC/$f.img" "$OUT/$f.qcow2" || fail "$f.qcow2 differs from $f.img"
	manifest_ok "$OUT/$f.qcow2" "$f"
done
# 3 islands of 100000 bytes touch at most 2 clusters each; zeroes and holes none.
data=$(qemu-img map -f qcow2 --output=json "$OUT/sparse.qcow2" |
	"$PY" -c "import json, sys; print(sum(e['length'] for e in json.load(sys.stdin) if e['data']))")
[ "$data" -le $((6 * 65536)) ] || fail "sparse.qcow2 maps $data bytes of data: zero clusters were allocated"
[ "$(stat -c %s "$OUT/sparse.qcow2")" -le $((12 * 65536)) ] || fail "sparse.qcow2 is $(stat -c %s "$OUT/sparse.qcow2") bytes"
# QEMU counts whole 512-byte sectors: an odd size is rounded up, the rest zeroes.
want_eq "odd virtual size" "$(qinfo "$OUT/odd.qcow2" "['virtual-size']")" $(((3 * 1048576 + 12345 + 511) / 512 * 512))
want_eq "empty virtual size" "$(qinfo "$OUT/empty.qcow2" "['virtual-size']")" 0

log "a target error halfway: the job fails, nothing under TARGET, nothing hidden, the earlier backup intact"
random_image "$SRC/vm.img" 16M
rm -f "$OUT"/*
run_ok e0 "backup vm.img $OUT/earlier.qcow2 id=e0"
cp "$SRC/vm.img" "$T/earlier-ref"
# earlier_intact: the earlier backup still verifies and equals its own time.
earlier_intact() {
	verify_ok "$OUT/earlier.qcow2"
	qemu-img compare -q -f raw -F qcow2 "$T/earlier-ref" "$OUT/earlier.qcow2" || fail "earlier.qcow2 changed"
}
pwrites vm.img $((3 * 1048576)):200000
inject "target-write offset=8M-9M from=1 errno=EIO"
start f "backup vm.img $OUT/fail.qcow2 id=f"
[ "$(wait_job f)" = failed ] || fail "f: $(status f state)"
inject clear
[ ! -e "$OUT/fail.qcow2" ] && [ ! -e "$OUT/fail.qcow2.xxh3" ] || fail "the failed job left its target"
[ -z "$(hidden_files "$OUT")" ] || fail "hidden files left: $(hidden_files "$OUT")"
earlier_intact

log "bad input is refused whole"
refused EINVAL "sync=none cannot write qcow2" "backup vm.img $OUT/x.qcow2 sync=none id=bad"
refused EINVAL "sync=none cannot write qcow2" "backup vm.img $OUT/x.raw format=qcow2 sync=none id=bad"
refused EINVAL "compress=zstd:99" "backup vm.img $OUT/x.qcow2 compress=zstd:99 id=bad"
refused EINVAL "compress needs format=qcow2" "backup vm.img $OUT/x.raw compress=zstd id=bad"
refused EINVAL "format=banana" "backup vm.img $OUT/x.qcow2 format=banana id=bad"
refused EINVAL "bitmap b has no full backup yet" \
	"bitmap add vm.img b
backup vm.img $OUT/x.qcow2 sync=incremental bitmap=b id=bad"
[ ! -e "$MNT/.fleece/bitmaps/vm.img/b" ] || fail "the refused transaction added its bitmap"
ctl "bitmap add vm.img b" >/dev/null || fail "bitmap add refused"
run_ok full "backup vm.img $OUT/chain.qcow2 bitmap=b id=full"
cp "$OUT/chain.qcow2" "$T/chain-before"
refused EINVAL "chain.qcow2 is a qcow2 backup: a raw incremental .* would destroy it" \
	"backup vm.img $OUT/chain.qcow2 sync=incremental bitmap=b format=raw id=bad"
same "the chain's qcow2 backup after a refused raw incremental" "$T/chain-before" "$OUT/chain.qcow2"
rm -f "$OUT"/chain.qcow2*

log "a killed daemon leaves nothing under TARGET; the next mount cleans up"
inject "target-write from=1 delay=100"
start k "backup vm.img $OUT/killed.qcow2 id=k"
sleep 0.5
kill_daemon
[ ! -e "$OUT/killed.qcow2" ] || fail "killed.qcow2 exists after the kill"
mount_fleece
[ ! -e "$OUT/killed.qcow2" ] && [ ! -e "$OUT/killed.qcow2.xxh3" ] || fail "killed.qcow2 appeared at the next mount"
[ -z "$(hidden_files "$OUT")" ] || fail "the next mount left hidden files: $(hidden_files "$OUT")"
earlier_intact
run_ok k2 "backup vm.img $OUT/killed.qcow2 id=k2"
qcow2_clean "$OUT/killed.qcow2"
qemu-img compare -q -f raw -F qcow2 "$SRC/vm.img" "$OUT/killed.qcow2" || fail "the backup after the remount differs"

log "a qcow2 source: a byte copy unless format=qcow2 is given"
rm -f "$OUT"/*
random_image "$T/disk.raw" 8M
qemu-img convert -f raw -O qcow2 "$T/disk.raw" "$SRC/vm.qcow2"
run_ok q1 "backup vm.qcow2 $OUT/copy.qcow2 id=q1"
want_eq "q1 format" "$(status q1 format)" raw
want_eq "q1 source_format" "$(status q1 source_format)" qcow2
same "byte copy of a qcow2 source" "$SRC/vm.qcow2" "$OUT/copy.qcow2"
qcow2_clean "$OUT/copy.qcow2"
qemu-img compare -q -f raw -F qcow2 "$T/disk.raw" "$OUT/copy.qcow2" || fail "the copy's disk differs"
manifest_ok "$OUT/copy.qcow2" "byte copy"
want_eq "byte copy manifest format" "$(sed -n 's/^format=//p' "$OUT/copy.qcow2.xxh3")" raw
run_ok q2 "backup vm.qcow2 $OUT/wrapped.qcow2 id=q2 format=qcow2"
want_eq "q2 format" "$(status q2 format)" qcow2
qcow2_clean "$OUT/wrapped.qcow2"
qemu-img compare -q -f raw -F qcow2 "$SRC/vm.qcow2" "$OUT/wrapped.qcow2" || fail "the wrapped container differs"
want_eq "a raw image's source_format" "$(status k2 source_format)" raw
refused EINVAL "vm.qcow2 is a qcow2 image.*compress needs format=qcow2" \
	"backup vm.qcow2 $OUT/x.qcow2 compress=zstd id=bad"

end_test
