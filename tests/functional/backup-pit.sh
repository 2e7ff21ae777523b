#!/usr/bin/env bash
# A backup taken under several concurrent, unaligned writers equals the image
# at the point in time, byte for byte, and no acknowledged write is lost
# (SPEC section 4). Run with the default 64K clusters and with 4K clusters,
# where the writers' 3000-byte stripes straddle every cluster boundary.
. "$TESTS_DIR/lib.sh"

run() {
	local label=$1 pace=$2 inject=$3; shift 3
	rm -f "$OUT"/*
	random_image "$SRC/vm.img" 32M
	cp "$SRC/vm.img" "$T/base"
	mount_fleece "$@"
	log "$label"
	[ -z "$inject" ] || echo "$inject" > "$MNT/.fleece/inject"
	python3 "$TESTS_DIR/pit_writers.py" --mnt "$MNT" --base "$T/base" --target "$OUT/vm.raw" \
		--writers 6 --pace "$pace" --options "speed=6M" || fail "$label: point in time broken"
	unmount_fleece
	[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"
}

run "64K clusters, 6 small writers + 1 big writer, backup at 6 MiB/s" 0.01 ""
run "4K clusters, writers as fast as they go" 0 "" -o cluster_size=4K
# Every read of the image by the job takes 3 ms longer: a copy holds its claim
# that much longer, so guest writes to a cluster being copied are sure to come
# while it is read. A copier that let them through early would be caught.
run "64K clusters, every job read of the image delayed 3 ms" 0.002 "source-read from=1 delay=3"

log "ok"
