#!/usr/bin/env bash
# A backup's copy engine is made before the gates close, for the source's
# size then (issue 15, point 4: its tables grow with the image, and no guest
# should wait for them). The image may change size between that and the
# point in time: each case holds the start there (inject point start,
# delay), changes the image's size through the mount, and checks that the
# backup is the image at its point in time, whole, at its new size (an
# engine kept at the old size would copy too little or too much). An error
# injected there starts nothing and leaves no file.
. "$TESTS_DIR/lib.sh"

M=$((1 << 20))
mount_fleece

# resize NAME CODE: CODE (python, on A[0] = the image through the mount) runs
# while the start of a full backup of NAME.img waits.
resize() {
	local name=$1 code=$2 out
	random_image "$SRC/$name.img" $((8 * M))
	inject "start delay=1500"
	ctl "backup $name.img $OUT/$name.raw id=$name" > "$T/$name.ctl" &
	local starter=$!
	for _ in $(seq 200); do inject_rules | grep -q 'matched=1' && break; sleep 0.01; done
	inject_rules | grep -q 'matched=1' || fail "$name: the start never reached the window"
	want_eq "$name: the resize" "$(pyerr "$code" "$MNT/$name.img")" OK
	wait "$starter" || fail "$name: backup refused: $(cat "$T/$name.ctl")"
	inject clear
	want_eq "$name: state" "$(wait_job "$name")" completed
	same "$name: the backup (the image at its point in time)" "$SRC/$name.img" "$OUT/$name.raw"
	want_eq "$name: bytes_total" "$(status "$name" bytes_total)" "$(stat -c %s "$SRC/$name.img")"
}

log "the image grows before the point in time (data past its old end)"
soft resize grow 'fd = os.open(A[0], os.O_WRONLY); os.pwrite(fd, os.urandom(1 << 20), (8 << 20) + (512 << 10)); os.close(fd)'
log "the image shrinks before the point in time"
soft resize shrink 'os.truncate(A[0], 3 << 20)'

log "fleecing: the store is made before the point in time too; a size change refuses"
random_image "$SRC/f.img" $((8 * M))
inject "start delay=1500"
ctl "backup f.img $OUT/f.raw fleecing=on id=f" > "$T/f.ctl" 2>&1 &
starter=$!
for _ in $(seq 200); do inject_rules | grep -q 'matched=1' && break; sleep 0.01; done
inject_rules | grep -q 'matched=1' || fail "f: the start never reached the window"
ls "$SRC/.fleecefs/fleecing/" | grep -q '^f\..*\.store$' || fail "f: no store made before the point in time"
want_eq "f: the resize" "$(pyerr 'os.truncate(A[0], 9 << 20)' "$MNT/f.img")" OK
wait "$starter" && fail "f: the backup started on a store of the old size: $(cat "$T/f.ctl")"
inject clear
want_match "f: the answer" "$(cat "$T/f.ctl")" "EBUSY|fleecing store: the image's size changed from 8388608 to 9437184 bytes"
[ ! -e "$MNT/.fleece/jobs/f" ] || fail "a job f exists"
[ -z "$(ls -A "$SRC/.fleecefs/fleecing/")" ] || fail "stores left: $(ls -A "$SRC/.fleecefs/fleecing/")"
[ ! -e "$OUT/f.raw" ] && [ -z "$(hidden_files "$OUT")" ] || fail "target files left: $(ls -A "$OUT")"
# Tried again, it starts, and is the image.
run_ok f "backup f.img $OUT/f.raw fleecing=on id=f"
same "f: the backup" "$SRC/f.img" "$OUT/f.raw"

log "an error at the start starts nothing and leaves no file"
random_image "$SRC/e.img" $((4 * M))
inject "start errno=EIO"
out=$(ctl "backup e.img $OUT/e.raw id=e" 2>&1) && fail "the backup started: $out"
want_match "the answer" "$out" "start: .*input/output error.*injected"
inject clear
[ ! -e "$MNT/.fleece/jobs/e" ] || fail "a job e exists: $(cat "$MNT/.fleece/jobs/e/status")"
left=$(ls -A "$OUT" | grep -v -e '^grow\.raw' -e '^shrink\.raw' -e '^f\.raw' || true)
[ -z "$left" ] || fail "files left in the target directory: $left"
# The same backup starts once the rule is gone.
run_ok e "backup e.img $OUT/e.raw id=e"
same "e: the backup" "$SRC/e.img" "$OUT/e.raw"

unmount_fleece
end_test
