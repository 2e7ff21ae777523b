#!/usr/bin/env bash
# fio writes through the mount with O_DIRECT at queue depth 16 and verifies
# every block it wrote (crc32c headers), while a backup runs: copy-before-write
# must never corrupt, lose or reorder what the guest wrote, and the backup is,
# byte for byte, the image at T (kept aside before fio starts).
. "$TESTS_DIR/lib.sh"
command -v fio >/dev/null || { echo "SKIP: fio not installed"; exit 77; }

random_image "$SRC/vm.img" 128M
mount_fleece

run_fio() {  # NAME RW BS
	fio --name="$1" --filename="$MNT/vm.img" --rw="$2" --bsrange="$3" --size=128M \
	    --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 \
	    --do_verify=1 --verify_state_save=0 --randrepeat=0 --output="$T/fio-$1.out" >/dev/null 2>&1 &
	FIO=$!
	BG_PIDS+=("$FIO")
}

for spec in "rand4k randwrite 4k-4k" "randmix randwrite 512-192k" "seq1m write 1m-1m"; do
	set -- $spec
	log "fio $2 bs=$3 with verify, during a backup"
	rm -f "$OUT"/*
	# T: the image is idle until fio starts.
	cp "$SRC/vm.img" "$T/at-T"
	# The backup first, slow enough to outlast fio's write phase.
	out=$(ctl "backup vm.img $OUT/$1.raw id=$1 speed=24M") || fail "backup refused: $out"
	run_fio "$1" "$2" "$3"
	wait "$FIO" || fail "fio $1 failed verification: $(grep -iE 'verify|error' "$T/fio-$1.out" | head -5)"
	BG_PIDS=()
	[ "$(wait_job "$1")" = completed ] || fail "backup $1: $(status "$1" error)"
	[ "$(status "$1" cbw_bytes)" -gt 0 ] || fail "no copy-before-write happened: the test did not overlap"
	python3 "$TESTS_DIR/manifest_check.py" "$OUT/$1.raw" >/dev/null || fail "manifest of $1"
	cmp "$T/at-T" "$OUT/$1.raw" || fail "backup $1 is not the image at T"
done
unmount_fleece
log "PASS"
