#!/usr/bin/env bash
# Copy-before-write without copying (issue 15, point 2): on an XFS file system
# with reflink, made in a loop file inside the test's directory, snapshot and
# fleecing stores and raw targets beside the image share the image's blocks
# (FICLONERANGE) instead of reading and writing them, and stay exact under
# concurrent unaligned writers (pit_writers.py: the view or the backup is one
# instant's cut of every writer's history), with reflink=auto. By default
# (reflink=off) it copies; a target on
# another file system falls back to copying; an in-place incremental still
# journals what it overwrites (a cancelled one rolls back); a failed read
# while sharing is allowed still fails the backup.
. "$TESTS_DIR/lib.sh"

command -v mkfs.xfs >/dev/null || fail "mkfs.xfs not found (contrib/install-deps.sh --tests installs xfsprogs)"
truncate -s 2G "$T/xfs.img"
mkfs.xfs -q -m reflink=1 "$T/xfs.img" || fail "mkfs.xfs -m reflink=1 failed"
mkdir "$T/xfs"
mount -o loop "$T/xfs.img" "$T/xfs" || fail "cannot mount the XFS loop file"
EXTRA_MOUNTS+=("$T/xfs")
SRC=$T/xfs/src OUT=$T/xfs/out EXT=$T/ext
mkdir -p "$SRC" "$OUT" "$EXT"

random_image "$SRC/vm.img" 32M

# pit LABEL [pit_writers options...]: one run of the writers against a fresh
# mount; the base is the image as the run starts.
pit() {
	local label=$1; shift
	cp "$SRC/vm.img" "$T/base"
	mount_fleece "${MOUNT_OPTS[@]}"
	log "$label"
	"$PY" "$TESTS_DIR/pit_writers.py" --mnt "$MNT" --base "$T/base" --writers 4 --pace 0.002 "$@" ||
		fail "$label: point in time broken"
	unmount_fleece
	[ "$DAEMON_RC" = 0 ] || fail "$label: daemon exited with $DAEMON_RC"
}
MOUNT_OPTS=()

pit "1. a snapshot's store shares the image's blocks" --snapshot s1 --options reflink=auto \
	--expect cloned_bytes=positive
pit "2. by default (reflink=off) it copies" --snapshot s2 --expect cloned_bytes=zero
MOUNT_OPTS=(-o cluster_size=4K)
pit "3. 4K clusters: every 3000-byte stripe straddles a shared cluster" --snapshot s3 \
	--options reflink=auto --expect cloned_bytes=positive
MOUNT_OPTS=()
pit "4. fleecing=on: the store shares, the target is written from the view" --target "$OUT/f.raw" \
	--options "fleecing=on speed=8M reflink=auto" --expect store_cloned_bytes=positive --expect cloned_bytes=zero
pit "5. checksum=none beside the image: copy-before-write and background copy share" --target "$OUT/n.raw" \
	--options "checksum=none speed=8M reflink=auto" --expect cloned_bytes=positive
pit "6. a manifest: the background copy reads for the checksums, then shares" --target "$OUT/c.raw" \
	--options "speed=8M reflink=auto" --expect cloned_bytes=positive
manifest_ok "$OUT/c.raw" "shared backup with a manifest"
pit "7. a target on another file system: copied" --target "$EXT/e.raw" --options "checksum=none speed=8M reflink=auto" \
	--expect cloned_bytes=zero
rm -f "$OUT"/*

log "8. an in-place incremental shares, and a cancelled one rolls back"
mount_fleece
out=$(ctl "bitmap add vm.img b1
backup vm.img $OUT/full.raw bitmap=b1 checksum=none reflink=auto id=full") || fail "full refused: $out"
want_eq full "$(wait_job full)" completed
same "full" "$SRC/vm.img" "$OUT/full.raw"
pwrites vm.img 0:200000 5000000:70000 20000000:1000000
start inc "backup vm.img $OUT/full.raw sync=incremental bitmap=b1 checksum=none reflink=auto id=inc"
want_eq inc "$(wait_job inc)" completed
same "incremental in place" "$SRC/vm.img" "$OUT/full.raw"
[ "$(status inc cloned_bytes)" -gt 0 ] || fail "inc: cloned_bytes=$(status inc cloned_bytes), want > 0"
cp "$OUT/full.raw" "$T/before"
pwrites vm.img 65536:3000000 9000000:4000000 30000000:2000000
# Target writes (here clones) from the third on fail and are retried
# (on-target-error=ignore), so the job is surely running when cancelled.
inject "target-write from=3 errno=EIO"
start inc2 "backup vm.img $OUT/full.raw sync=incremental bitmap=b1 checksum=none reflink=auto on-target-error=ignore id=inc2"
for _ in $(seq 100); do [ "$(status inc2 cloned_bytes)" -gt 0 ] && break; sleep 0.05; done
[ "$(status inc2 cloned_bytes)" -gt 0 ] || fail "inc2 shared nothing before the cancel"
ctl "cancel inc2" >/dev/null || fail "cancel inc2"
want_eq inc2 "$(wait_job inc2)" cancelled
echo clear > "$MNT/.fleece/inject"
same "the cancelled incremental rolled back" "$T/before" "$OUT/full.raw"

log "9. a failed read for the checksums of a shared run fails the backup (it is not retried away)"
inject "source-read errno=EIO"
start rf "backup vm.img $OUT/rf.raw reflink=auto id=rf"
want_eq rf "$(wait_job rf)" failed
echo clear > "$MNT/.fleece/inject"
case $(status rf error) in *"Input/output error"*) ;; *) fail "rf error=$(status rf error)" ;; esac
[ ! -e "$OUT/rf.raw" ] && [ ! -e "$OUT/rf.raw.xxh3" ] || fail "the failed backup left its target"
unmount_fleece
end_test
