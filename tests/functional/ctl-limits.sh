#!/bin/bash
# ctl-limits: a write to .fleece/ctl or .fleece/inject too large to reach the
# daemon in one piece (SPEC section 3) is refused whole with EMSGSIZE before
# anything of it runs. The kernel cuts a write(2) into requests of at most
# max_write bytes (1 MiB here), the first up to a page shorter when the buffer
# is not page aligned; each piece used to run as a transaction of its own: a
# 2 MiB write starting with a backup started it, and a line cut at the piece
# boundary ran with what was left of it (speed=1M read as speed=1).
# Checked with page-aligned and unaligned buffers: the limit works, one byte
# more is refused, bigger writes are refused, a cut line never runs, the
# answer says why, and the daemon serves on.
. "$TESTS_DIR/lib.sh"

random_image "$SRC/tiny.img" 65536
mount_fleece

# The limit: one page less than the largest request the kernel sends, which
# is min(max_write, fs.fuse.max_pages_limit pages); libfuse 3 negotiates a
# max_write of 1 MiB where the kernel allows it.
pages=$(cat /proc/sys/fs/fuse/max_pages_limit 2>/dev/null || echo 256)
request=$((pages * 4096 < 1048576 ? pages * 4096 : 1048576))
want_limit=$((request - 4096))
limit=$(sed -n 's/^ctl_max_write=//p' "$MNT/.fleece/version")
[ "$limit" = "$want_limit" ] || fail "version says ctl_max_write=$limit, want $want_limit"
log "limit $limit bytes"

jobs_list() { ls -A "$MNT/.fleece/jobs" | tr '\n' ' '; }

# probe FILE SIZE OFFSET FIRST [CUT_AT]: writes SIZE bytes to FILE (ctl or
# inject) in one write(2), from a buffer OFFSET bytes into a page-aligned
# mapping: the line FIRST, then '#' comment lines. With CUT_AT, the line
# "backup tiny.img $OUT/cut.raw id=cut speed=1M" instead starts so that the
# byte at CUT_AT (from the start of the write) is its final "M". Prints
# "OK <written>" or the errno name, then the answer read back on the same open
# file.
probe() {
	"$PY" - "$MNT/.fleece/$1" "$2" "$3" "$4" "${5:-}" "$OUT" <<'EOF'
import errno, mmap, os, sys
path, size, off, first, cut, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]

def pad(n):
    # n bytes of comment lines of at most 100 bytes, each ending in "\n"
    lines = []
    while n > 0:
        k = min(n, 100)
        if 0 < n - k < 2:
            k = n - 2
        lines.append(b"#" * (k - 1) + b"\n")
        n -= k
    return b"".join(lines)

if cut:
    line = f"backup tiny.img {out}/cut.raw id=cut speed=1M\n".encode()
    before = int(cut) - (len(line) - 2)    # the "M" lands at offset cut
    data = pad(before) + line
else:
    data = (first + "\n").encode()
data += pad(size - len(data))
assert len(data) == size, (len(data), size)
if cut:
    assert data[int(cut):int(cut) + 2] == b"M\n", data[int(cut) - 8:int(cut) + 2]
m = mmap.mmap(-1, size + 2 * mmap.PAGESIZE)
m[off:off + size] = data
fd = os.open(path, os.O_RDWR)
try:
    n = os.write(fd, memoryview(m)[off:off + size])
    print(f"OK {n}")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
print(os.read(fd, 65536).decode(), end="")
EOF
}

# refused FILE SIZE OFFSET FIRST [CUT_AT]: the write fails with EMSGSIZE, its
# answer is the one-line refusal, and no job, target or rule appeared.
refused() {
	local before out
	before=$(jobs_list)
	out=$(probe "$@")
	[ "$(sed -n 1p <<<"$out")" = EMSGSIZE ] || fail "a $2-byte write to $1 (offset $3): $(head -1 <<<"$out"), want EMSGSIZE"
	# The daemon sees the first piece: up to $request bytes less the offset
	# of the buffer into its page.
	local noun=transaction piece=$(($2 < request - $3 % 4096 ? $2 : request - $3 % 4096))
	[ "$1" = inject ] && noun=write
	[ "$(sed -n '2,$p' <<<"$out")" = "error: the write is $piece bytes or more; one $noun must fit in $limit bytes (the kernel splits larger writes)" ] ||
		fail "a $2-byte write to $1: answer '$(sed -n '2,$p' <<<"$out")'"
	[ "$(jobs_list)" = "$before" ] || fail "a refused $2-byte write changed the jobs: [$before] -> [$(jobs_list)]"
	[ -z "$(ls -A "$OUT")" ] || fail "a refused $2-byte write left files: $(ls -A "$OUT")"
	[ -z "$(cat "$MNT/.fleece/inject")" ] || fail "a refused $2-byte write added rules: $(cat "$MNT/.fleece/inject")"
}

# accepted ID SIZE OFFSET: a backup padded to SIZE bytes runs and completes.
accepted() {
	local out
	out=$(probe ctl "$2" "$3" "backup tiny.img $OUT/$1.raw id=$1")
	[ "$out" = "OK $2
ok id=$1" ] || fail "a $2-byte write (offset $3) with a backup: $out"
	[ "$(wait_job "$1" 30)" = completed ] || fail "job $1: $(cat "$MNT/.fleece/jobs/$1/status")"
	cmp "$SRC/tiny.img" "$OUT/$1.raw" || fail "backup $1 differs from the image"
	ctl "dismiss $1" >/dev/null || fail "dismiss $1"
	rm -f "$OUT/$1.raw" "$OUT/$1.raw.xxh3"
}

# ---- 2 MiB writes starting with a valid backup --------------------------------------
for off in 0 1 100 4095; do
	soft refused ctl $((2 * 1048576)) "$off" "backup tiny.img $OUT/big.raw id=big"
done
soft refused ctl $((8 * 1048576)) 0 "backup tiny.img $OUT/big.raw id=big"
soft refused ctl $((request + 1)) 0 "backup tiny.img $OUT/big.raw id=big"
# Exactly one request: the kernel does not split it, but it is over the limit.
soft refused ctl "$request" 0 "backup tiny.img $OUT/big.raw id=big"
log "large writes refused"

# ---- the limit itself, and one byte more ----------------------------------------------
for off in 0 1 2048 4095; do
	soft accepted "at-limit-$off" "$limit" "$off"
	soft refused ctl $((limit + 1)) "$off" "backup tiny.img $OUT/over.raw id=over"
done
log "exactly $limit bytes accepted, $((limit + 1)) refused"

# ---- a line cut at the piece boundary never runs ----------------------------------------
# "... speed=1" ends the first piece, "M" starts the second. Aligned, the
# first piece is $request bytes; from 100 bytes into a page, 100 fewer.
soft refused ctl $((2 * 1048576)) 0 "" "$request"
soft refused ctl $((2 * 1048576)) 100 "" $((request - 100))
[ ! -e "$MNT/.fleece/jobs/cut" ] || fail "the cut line ran: $(cat "$MNT/.fleece/jobs/cut/status")"
log "cut lines never run"

# ---- .fleece/inject: the same limit --------------------------------------------------------
soft refused inject $((2 * 1048576)) 0 "source-read from=1"
soft refused inject $((2 * 1048576)) 7 "source-read from=1"
soft refused inject $((limit + 1)) 0 "source-read from=1"
out=$(probe inject "$limit" 1 "cbw from=1")
[ "$out" = "OK $limit
ok" ] || fail "a $limit-byte write to inject: $out"
[ "$(cat "$MNT/.fleece/inject")" = "cbw offset=0- from=1 errno=EIO matched=0 fired=0" ] ||
	fail "inject rules after a write at the limit: $(cat "$MNT/.fleece/inject")"
inject clear
log "inject: the same limit"

# ---- O_DIRECT opens of ctl and inject: refused ------------------------------------------------
# (with O_DIRECT and aio the pieces of one write may come out of order)
soft expect EINVAL 'os.open(A[0], os.O_RDWR | os.O_DIRECT)' "$MNT/.fleece/ctl"
soft expect EINVAL 'os.open(A[0], os.O_WRONLY | os.O_DIRECT)' "$MNT/.fleece/inject"
soft expect OK 'os.close(os.open(A[0], os.O_RDWR))' "$MNT/.fleece/ctl"

# ---- the daemon serves on ------------------------------------------------------------------
ans=$(ctl "backup tiny.img $OUT/after.raw id=after") || fail "a small write after the refusals: $ans"
[ "$(wait_job after 30)" = completed ] || fail "job after did not complete"
cmp "$SRC/tiny.img" "$OUT/after.raw" || fail "backup after differs"
[ "$(jobs_list)" = "after " ] || fail "jobs at the end: $(jobs_list)"

end_test
