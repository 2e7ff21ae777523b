#!/usr/bin/env bash
# No job can start between the check "is this image busy?" and an operation
# that empties or shortens it (issue 10, point 1). Each operation is held in
# the window by an injected delay (.fleece/inject point truncate, after the
# check, before the operation); a backup is started while it waits. The
# backup must then start after the operation (it waits for it) and equal
# the image at its point in time, never a full-size file of zeroes; or the
# operation fails with EBUSY. Operations: open(O_TRUNC) of an existing image
# (FUSE open), open(O_CREAT|O_TRUNC) of a name the kernel found free but
# that holds an image by the time the create runs (FUSE create) and
# truncate(2).
. "$TESTS_DIR/lib.sh"

M=$((1 << 20))
mount_fleece

# race NAME CODE [late]: runs python CODE on $MNT/NAME.img (A[0]) in the
# background with the truncate delay armed, starts a backup while it waits,
# then checks. With `late` the image gets its name only while the operation
# waits (moved there in SOURCE_DIR): the kernel found no file at its lookup
# and sent a create, which then meets the image.
race() {
	local name=$1 code=$2 late=${3:-} op rc
	if [ -n "$late" ]; then
		random_image "$SRC/$name.later" $((8 * M))
	else
		random_image "$SRC/$name.img" $((8 * M))
	fi
	inject "truncate delay=1500"
	pyerr "$code" "$MNT/$name.img" > "$T/$name.op" &
	op=$!
	for _ in $(seq 200); do inject_rules | grep -q 'matched=1' && break; sleep 0.01; done
	inject_rules | grep -q 'matched=1' || fail "$name: the operation never reached the window"
	[ -z "$late" ] || mv "$SRC/$name.later" "$SRC/$name.img"
	out=$(ctl "backup $name.img $OUT/$name.raw id=$name") || fail "$name: backup refused: $out"
	wait "$op" || true
	inject clear
	want_eq "$name: state" "$(wait_job "$name")" completed
	case $(cat "$T/$name.op") in
	OK) ;;
	*) fail "$name: the operation failed with $(cat "$T/$name.op")";;
	esac
	# The operation came first: the backup is of the emptied or shortened
	# image (without the fix, of the full-size image, holding zeroes).
	same "$name: the backup (the image at its point in time)" "$SRC/$name.img" "$OUT/$name.raw"
	[ "$(stat -c %s "$OUT/$name.raw")" -lt $((8 * M)) ] ||
		fail "$name: the backup has the size the image had before the operation"
}

log "open(O_TRUNC) of an existing image"
soft race opentrunc 'os.close(os.open(A[0], os.O_WRONLY | os.O_TRUNC))'
log "open(O_CREAT|O_TRUNC): a FUSE create that meets an image"
soft race createtrunc 'os.close(os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))' late
log "truncate(2)"
soft race truncate 'os.truncate(A[0], 2**20)'
# fallocate's collapse and insert ranges never reach a FUSE daemon (the
# kernel answers EOPNOTSUPP, which python names ENOTSUP): shown here so that this stays known.
soft expect ENOTSUP '
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(A[0], os.O_RDWR)
if libc.fallocate(fd, 8, ctypes.c_long(0), ctypes.c_long(2**20)) != 0:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e))' "$MNT/truncate.img"

unmount_fleece
end_test
