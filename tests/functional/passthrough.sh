#!/bin/bash
# passthrough: the mount behaves like SOURCE_DIR (SPEC section 2). Every
# operation through the mount is compared with the source directory (and,
# where the source fs decides, with the same operation done on the source):
# read/write at any alignment and past EOF, create, mkdir/rmdir, unlink,
# rename (incl. RENAME_NOREPLACE/EXCHANGE), truncate, fallocate and
# punch-hole, fsync/fdatasync, statfs, chmod/chown/utimens, SEEK_DATA/HOLE,
# O_DIRECT, deep subdirectories, the hidden state dir, the .fleece shadow,
# ownership of files created by other users, and EBUSY for an image with a
# running job.
. "$TESTS_DIR/lib.sh"

AS_NOBODY=(setpriv --reuid=65534 --regid=65534 --clear-groups)

# same_errno CODE MNT_PATH SRC_PATH [ARGS...]: CODE (which uses A[0] as its
# path) gives the same result through the mount and on the source.
same_errno() {
	local code=$1 m=$2 s=$3 a b
	shift 3
	a=$(pyerr "$code" "$m" "$@")
	b=$(pyerr "$code" "$s" "$@")
	[ "$a" = "$b" ] || fail "$code: through the mount $a, on the source $b"
}
mtime_ns() { "$PY" -c 'import os, sys; print(os.lstat(sys.argv[1]).st_mtime_ns)' "$1"; }

chmod 0755 "$T"   # user nobody must reach the mount

# ---- the source tree ----------------------------------------------------------
mkdir -p "$SRC/a/b/c/d/e" "$SRC/sub" "$SRC/shared" "$SRC/sgid"
chmod 0777 "$SRC/shared"
chgrp 100 "$SRC/sgid" && chmod 2777 "$SRC/sgid"
head -c $((3 * 1048576 + 777)) /dev/urandom > "$SRC/data.bin"
head -c 200001 /dev/urandom > "$SRC/a/b/c/d/e/deep.bin"
head -c 5000 /dev/urandom > "$SRC/a/b/mid.bin"
echo "real file in the source" > "$SRC/.fleece"
echo "not shadowed" > "$SRC/sub/.fleece"
ln -s data.bin "$SRC/link"
ln -s .fleecefs "$SRC/to-state"
echo root-only > "$SRC/private"
chmod 0600 "$SRC/private"
echo read-only-for-others > "$SRC/shared/roots"
chmod 0644 "$SRC/shared/roots"
# Sparse: data at [0, 64K), [1M, 1M+4196), [8M, 9M); 16M long.
"$PY" - "$SRC/sparse.img" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
os.ftruncate(fd, 16 << 20)
os.pwrite(fd, os.urandom(65536), 0)
os.pwrite(fd, os.urandom(4196), 1 << 20)
os.pwrite(fd, os.urandom(1 << 20), 8 << 20)
os.close(fd)
EOF

mount_fleece -o allow_other

# ---- the tree: same names, types, modes, owners, sizes, times -----------------
listing() {
	(cd "$1" && find . \( -path ./.fleecefs -o -path ./.fleece \) -prune -o \
		-printf '%p %y %m %U %G %s %T@ %l\n' | sort)
}
diff <(listing "$SRC") <(listing "$MNT") >&2 || fail "the mount's tree differs from the source's (above)"
[ "$(readlink "$MNT/link")" = data.bin ] || fail "readlink through the mount: $(readlink "$MNT/link")"
cmp "$SRC/data.bin" "$MNT/link" || fail "reading through a symlink differs"
log "tree matches"

# ---- read: whole files and unaligned pieces -------------------------------------
for f in data.bin a/b/c/d/e/deep.bin a/b/mid.bin sparse.img sub/.fleece; do
	cmp "$SRC/$f" "$MNT/$f" || fail "$f reads differently through the mount"
done
"$PY" - "$SRC/data.bin" "$MNT/data.bin" <<'EOF' || fail "unaligned reads differ"
import os, random, sys
r = random.Random(1)
s, m = os.open(sys.argv[1], os.O_RDONLY), os.open(sys.argv[2], os.O_RDONLY)
size = os.fstat(s).st_size
for _ in range(300):
    off = r.randrange(0, size + 5000)
    n = r.choice([1, 7, 511, 513, 4095, 4097, 65537, 131072 + 3, r.randrange(1, 300000)])
    a, b = os.pread(s, n, off), os.pread(m, n, off)
    if a != b:
        sys.exit(f"pread({n}, {off}): {len(b)} bytes through the mount, {len(a)} from the source, differ")
EOF
# The mount is a window, not a copy: a change made in the source directly is
# read through a file already open on the mount.
"$PY" - "$MNT/a/b/mid.bin" "$SRC/a/b/mid.bin" <<'EOF' || fail "a change in the source is not seen"
import os, sys
m = os.open(sys.argv[1], os.O_RDONLY)
os.pread(m, 100, 0)
with open(sys.argv[2], "r+b") as f:
    f.write(b"changed-in-the-source")
if os.pread(m, 21, 0) != b"changed-in-the-source":
    sys.exit("a file open on the mount does not see a write made in the source")
EOF
# A directory with many entries (more than one readdir reply) lists completely.
mkdir "$SRC/many"
for i in $(seq 600); do : > "$SRC/many/entry-with-a-rather-long-name-to-fill-buffers-$i"; done
diff <(ls -a "$SRC/many") <(ls -a "$MNT/many") >/dev/null || fail "a 600-entry directory lists differently"
[ "$(ls -a "$MNT/many" | wc -l)" = 602 ] || fail "a 600-entry directory lists $(ls -a "$MNT/many" | wc -l) entries"
log "reads match"

# ---- write: unaligned, overlapping, past EOF; then fsync -----------------------
cp "$SRC/data.bin" "$T/ref.bin"
"$PY" - "$MNT/data.bin" "$T/ref.bin" "$SRC/data.bin" <<'EOF' || fail "writes through the mount"
import os, random, sys
r = random.Random(2)
# O_NOFOLLOW on a regular file is fine (the kernel resolved the name).
m = os.open(sys.argv[1], os.O_RDWR | os.O_NOFOLLOW)
ref = os.open(sys.argv[2], os.O_RDWR)
size = os.fstat(ref).st_size
for i in range(300):
    n = r.choice([1, 3, 511, 512, 4096, 4097, 65536, 65537, r.randrange(1, 250000)])
    off = r.randrange(0, size + (1 << 20))       # up to 1 MiB past EOF
    if i % 50 == 49:
        off = os.fstat(ref).st_size + r.randrange(1, 300000)   # leaves a gap
    data = os.urandom(n)
    if os.pwrite(m, data, off) != n:
        sys.exit(f"short write of {n} at {off}")
    os.pwrite(ref, data, off)
    if i % 100 == 0:
        os.fsync(m)
    if i % 100 == 50:
        os.fdatasync(m)
os.fsync(m)
want = open(sys.argv[2], "rb").read()
got_src = open(sys.argv[3], "rb").read()
got_mnt = open(sys.argv[1], "rb").read()
if got_src != want:
    sys.exit(f"source file differs from the expected content ({len(got_src)} vs {len(want)} bytes)")
if got_mnt != want:
    sys.exit(f"file read through the mount differs ({len(got_mnt)} vs {len(want)} bytes)")
if os.fstat(m).st_size != len(want):
    sys.exit(f"fstat through the mount says {os.fstat(m).st_size}, want {len(want)}")
EOF
cmp "$SRC/data.bin" "$T/ref.bin" || fail "source file differs after writes"
# 64-bit offsets: a write 1 TiB into a new sparse file.
expect OK 'fd = os.open(A[0], os.O_RDWR | os.O_CREAT, 0o644); assert os.pwrite(fd, b"far away", 1 << 40) == 8; os.close(fd)' "$MNT/far.bin"
[ "$(stat -c %s "$SRC/far.bin")" = $(((1 << 40) + 8)) ] || fail "a write at 1 TiB: source size $(stat -c %s "$SRC/far.bin")"
[ "$(dd if="$MNT/far.bin" bs=1 skip=$((1 << 40)) count=8 status=none)" = "far away" ] || fail "reading at 1 TiB"
expect OK 'fd = os.open(A[0], os.O_RDONLY); assert os.lseek(fd, 0, os.SEEK_DATA) == os.lseek(os.open(A[1], os.O_RDONLY), 0, os.SEEK_DATA)' "$MNT/far.bin" "$SRC/far.bin"
rm "$MNT/far.bin"
# O_APPEND: appends at the end, as the source would.
printf 'one' >> "$MNT/a/b/mid.bin"
printf 'two' >> "$MNT/a/b/mid.bin"
[ "$(stat -c %s "$SRC/a/b/mid.bin")" = 5006 ] && [ "$(tail -c 6 "$SRC/a/b/mid.bin")" = onetwo ] ||
	fail "O_APPEND writes did not land at the end"
# Writing in a deep directory.
printf 'deep-write' | dd of="$MNT/a/b/c/d/e/deep.bin" bs=1 seek=100000 conv=notrunc status=none
[ "$(dd if="$SRC/a/b/c/d/e/deep.bin" bs=1 skip=100000 count=10 status=none)" = deep-write ] ||
	fail "write in a deep subdirectory not in the source"
# fsync/fdatasync on files and directories answer 0.
expect OK 'fd = os.open(A[0], os.O_RDWR); os.write(fd, b"synced"); os.fsync(fd); os.fdatasync(fd); os.close(fd)' "$MNT/a/b/mid.bin"
[ "$(head -c 6 "$SRC/a/b/mid.bin")" = synced ] || fail "fsynced data is not in the source"
expect OK 'fd = os.open(A[0], os.O_RDONLY | os.O_DIRECTORY); os.fsync(fd); os.close(fd)' "$MNT/a/b"
log "writes match"

# ---- create, mkdir, rmdir, unlink ----------------------------------------------
expect OK 'fd = os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640); os.write(fd, b"created\n"); os.close(fd)' "$MNT/a/new.txt"
[ "$(cat "$SRC/a/new.txt")" = created ] || fail "created file not in the source"
[ "$(stat -c %a "$SRC/a/new.txt")" = 640 ] || fail "created file has mode $(stat -c %a "$SRC/a/new.txt"), want 640"
same_errno 'os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)' "$MNT/a/new.txt" "$SRC/a/new.txt"
expect EEXIST 'os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)' "$MNT/a/new.txt"
expect OK 'os.close(os.open(A[0], os.O_WRONLY | os.O_TRUNC))' "$MNT/a/new.txt"
[ "$(stat -c %s "$SRC/a/new.txt")" = 0 ] || fail "O_TRUNC through the mount did not truncate"
(umask 022 && mkdir -p "$MNT/n1/n2/n3/n4/n5/n6")
[ -d "$SRC/n1/n2/n3/n4/n5/n6" ] || fail "mkdir -p through the mount did not reach the source"
[ "$(stat -c %a "$SRC/n1/n2/n3/n4/n5/n6")" = 755 ] || fail "mkdir mode $(stat -c %a "$SRC/n1/n2/n3/n4/n5/n6")"
echo leaf > "$MNT/n1/n2/n3/n4/n5/n6/leaf"
[ "$(cat "$SRC/n1/n2/n3/n4/n5/n6/leaf")" = leaf ] || fail "file in a deep new directory not in the source"
expect EEXIST 'os.mkdir(A[0])' "$MNT/n1/n2"
expect ENOTEMPTY 'os.rmdir(A[0])' "$MNT/n1/n2/n3/n4/n5/n6"
expect ENOTDIR 'os.rmdir(A[0])' "$MNT/n1/n2/n3/n4/n5/n6/leaf"
same_errno 'os.unlink(A[0])' "$MNT/n1/n2" "$SRC/n1/n2"
expect ENOENT 'os.unlink(A[0])' "$MNT/n1/nothing"
expect OK 'os.unlink(A[0])' "$MNT/n1/n2/n3/n4/n5/n6/leaf"
[ ! -e "$SRC/n1/n2/n3/n4/n5/n6/leaf" ] || fail "unlinked file still in the source"
expect OK 'os.rmdir(A[0])' "$MNT/n1/n2/n3/n4/n5/n6"
[ ! -e "$SRC/n1/n2/n3/n4/n5/n6" ] || fail "removed directory still in the source"
expect ENOENT 'os.stat(A[0])' "$MNT/n1/n2/n3/n4/n5/n6"
log "create, mkdir, rmdir, unlink ok"

# ---- rename ------------------------------------------------------------------------
echo r1 > "$MNT/r1"; echo r2 > "$MNT/r2"; echo r3 > "$MNT/r3"
expect OK 'os.rename(A[0], A[1])' "$MNT/r1" "$MNT/r1-renamed"
[ ! -e "$SRC/r1" ] && [ "$(cat "$SRC/r1-renamed")" = r1 ] || fail "rename within a directory"
expect OK 'os.rename(A[0], A[1])' "$MNT/r1-renamed" "$MNT/a/b/c/r1-moved"
[ "$(cat "$SRC/a/b/c/r1-moved")" = r1 ] || fail "rename into a subdirectory"
expect OK 'os.rename(A[0], A[1])' "$MNT/a/b/c/r1-moved" "$MNT/r2"
[ "$(cat "$SRC/r2")" = r1 ] && [ ! -e "$SRC/a/b/c/r1-moved" ] || fail "rename over an existing file"
expect EEXIST 'renameat2(A[0], A[1], 1)' "$MNT/r2" "$MNT/r3"   # RENAME_NOREPLACE
[ "$(cat "$SRC/r2")" = r1 ] && [ "$(cat "$SRC/r3")" = r3 ] || fail "RENAME_NOREPLACE changed files"
expect OK 'renameat2(A[0], A[1], 1)' "$MNT/r3" "$MNT/a/r3-new"
[ "$(cat "$SRC/a/r3-new")" = r3 ] && [ ! -e "$SRC/r3" ] || fail "RENAME_NOREPLACE to a free name"
expect OK 'renameat2(A[0], A[1], 2)' "$MNT/r2" "$MNT/a/r3-new"    # RENAME_EXCHANGE
[ "$(cat "$SRC/r2")" = r3 ] && [ "$(cat "$SRC/a/r3-new")" = r1 ] || fail "RENAME_EXCHANGE did not swap"
expect OK 'os.rename(A[0], A[1])' "$MNT/n1" "$MNT/a/b/n1-moved"
[ -d "$SRC/a/b/n1-moved/n2/n3" ] || fail "directory rename into a subdirectory"
same_errno 'os.rename(A[0], A[0] + "-x")' "$MNT/no-such" "$SRC/no-such"
log "rename ok"

# ---- truncate ------------------------------------------------------------------------
head -c 300000 /dev/urandom > "$SRC/trunc.bin"
cp "$SRC/trunc.bin" "$T/trunc.ref"
truncate -s 12345 "$MNT/trunc.bin"
truncate -s 12345 "$T/trunc.ref"
cmp "$SRC/trunc.bin" "$T/trunc.ref" || fail "truncate shrink (path)"
truncate -s $((5 * 1048576 + 3)) "$MNT/trunc.bin"
truncate -s $((5 * 1048576 + 3)) "$T/trunc.ref"
cmp "$SRC/trunc.bin" "$T/trunc.ref" || fail "truncate grow (path)"
cmp "$MNT/trunc.bin" "$T/trunc.ref" || fail "truncate grow: reads through the mount"
expect OK 'fd = os.open(A[0], os.O_RDWR); os.ftruncate(fd, 7777); os.close(fd)' "$MNT/trunc.bin"
[ "$(stat -c %s "$SRC/trunc.bin")" = 7777 ] && cmp -n 7777 "$SRC/trunc.bin" "$T/trunc.ref" || fail "ftruncate"
[ "$(stat -c %s "$MNT/trunc.bin")" = 7777 ] || fail "size through the mount after ftruncate"
log "truncate ok"

# ---- fallocate, punch hole, zero range, and SEEK_HOLE ------------------------------
head -c 1048576 /dev/urandom > "$SRC/falloc.bin"
cp "$SRC/falloc.bin" "$T/falloc.ref"
fallocate -l 4194304 "$MNT/falloc.bin"
[ "$(stat -c %s "$SRC/falloc.bin")" = 4194304 ] || fail "fallocate -l did not grow the source file"
fallocate -n -o 4194304 -l 1048576 "$MNT/falloc.bin"
[ "$(stat -c %s "$SRC/falloc.bin")" = 4194304 ] || fail "fallocate --keep-size changed the size"
blocks_before=$(stat -c %b "$SRC/falloc.bin")
fallocate -p -o 262144 -l 131072 "$MNT/falloc.bin"
fallocate -z -o 524288 -l 8192 "$MNT/falloc.bin"
blocks_after=$(stat -c %b "$SRC/falloc.bin")
[ "$blocks_after" -lt "$blocks_before" ] || fail "punch-hole freed no blocks ($blocks_before -> $blocks_after)"
"$PY" - "$MNT/falloc.bin" "$SRC/falloc.bin" "$T/falloc.ref" <<'EOF' || fail "fallocate results"
import os, sys
m, s = os.open(sys.argv[1], os.O_RDONLY), os.open(sys.argv[2], os.O_RDONLY)
ref = bytearray(open(sys.argv[3], "rb").read()) + bytes(3 << 20)
ref[262144:393216] = bytes(131072)
ref[524288:532480] = bytes(8192)
for name, fd in (("mount", m), ("source", s)):
    got = os.pread(fd, 8 << 20, 0)
    if got != ref:
        sys.exit(f"content through the {name} is wrong after fallocate/punch/zero")
if os.pread(m, 131072, 262144) != bytes(131072):
    sys.exit("the punched range does not read as zeros")
for off in (0, 262144, 300000, 393216):
    a = [os.lseek(s, off, w) for w in (os.SEEK_HOLE, os.SEEK_DATA)]
    b = [os.lseek(m, off, w) for w in (os.SEEK_HOLE, os.SEEK_DATA)]
    if a != b:
        sys.exit(f"SEEK_HOLE/SEEK_DATA from {off}: mount {b}, source {a}")
if os.lseek(s, 0, os.SEEK_HOLE) == 262144 and os.lseek(m, 262144, os.SEEK_DATA) != 393216:
    sys.exit("the punched hole is not seen through the mount")
EOF
log "fallocate ok"

# ---- SEEK_DATA / SEEK_HOLE on a sparse file ---------------------------------------------
"$PY" - "$MNT/sparse.img" "$SRC/sparse.img" <<'EOF' || fail "SEEK_DATA/SEEK_HOLE"
import errno, os, sys
m, s = os.open(sys.argv[1], os.O_RDONLY), os.open(sys.argv[2], os.O_RDONLY)
M = 1 << 20
def seek(fd, off, whence):
    try:
        return os.lseek(fd, off, whence)
    except OSError as e:
        return errno.errorcode[e.errno]
if seek(s, 0, os.SEEK_HOLE) == 16 * M:
    print("note: the source fs reports no holes; comparing anyway")
for off in (0, 4095, 65535, 65536, 70000, M - 1, M, M + 4196, M + 8192, 4 * M, 8 * M - 1, 8 * M,
            9 * M - 1, 9 * M, 16 * M - 1, 16 * M, 16 * M + 1):
    for w, name in ((os.SEEK_DATA, "SEEK_DATA"), (os.SEEK_HOLE, "SEEK_HOLE")):
        a, b = seek(s, off, w), seek(m, off, w)
        if a != b:
            sys.exit(f"lseek({off}, {name}): mount {b}, source {a}")
EOF
log "SEEK_DATA/SEEK_HOLE match"

# ---- statfs ------------------------------------------------------------------------------
"$PY" - "$MNT" "$SRC" <<'EOF' || fail "statfs"
import os, sys
m, s = os.statvfs(sys.argv[1]), os.statvfs(sys.argv[2])
for k in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
    if getattr(m, k) != getattr(s, k):
        sys.exit(f"statfs {k}: mount {getattr(m, k)}, source {getattr(s, k)}")
for k in ("f_bfree", "f_bavail"):   # others may write meanwhile: within 1%
    if abs(getattr(m, k) - getattr(s, k)) > s.f_blocks // 100:
        sys.exit(f"statfs {k}: mount {getattr(m, k)}, source {getattr(s, k)}")
EOF
[ "$(df -P "$MNT" | awk 'NR == 2 { print $2 }')" = "$(df -P "$SRC" | awk 'NR == 2 { print $2 }')" ] ||
	fail "df size differs: $(df -P "$MNT" "$SRC")"
log "statfs matches"

# ---- chmod, chown, utimens ------------------------------------------------------------------
chmod 0604 "$MNT/a/new.txt"
[ "$(stat -c %a "$SRC/a/new.txt")" = 604 ] || fail "chmod through the mount: $(stat -c %a "$SRC/a/new.txt")"
chmod 0750 "$MNT/a/b"
[ "$(stat -c %a "$SRC/a/b")" = 750 ] || fail "chmod of a directory: $(stat -c %a "$SRC/a/b")"
chmod 0755 "$MNT/a/b"
expect OK 'fd = os.open(A[0], os.O_RDONLY); os.fchmod(fd, 0o612); os.close(fd)' "$MNT/a/new.txt"
[ "$(stat -c %a "$SRC/a/new.txt")" = 612 ] || fail "fchmod through the mount: $(stat -c %a "$SRC/a/new.txt")"
chown 65534:100 "$MNT/a/new.txt"
[ "$(stat -c %u:%g "$SRC/a/new.txt")" = 65534:100 ] || fail "chown: $(stat -c %u:%g "$SRC/a/new.txt")"
chgrp 0 "$MNT/a/new.txt"
[ "$(stat -c %u:%g "$SRC/a/new.txt")" = 65534:0 ] || fail "chgrp: $(stat -c %u:%g "$SRC/a/new.txt")"
[ "$(stat -c %u:%g:%a "$MNT/a/new.txt")" = "$(stat -c %u:%g:%a "$SRC/a/new.txt")" ] || fail "stat through the mount after chown"
TZ=UTC touch -m -d '2001-02-03 04:05:06.123456789' "$MNT/a/new.txt"
[ "$(mtime_ns "$SRC/a/new.txt")" = 981173106123456789 ] || fail "touch -d: source mtime $(mtime_ns "$SRC/a/new.txt")"
[ "$(mtime_ns "$MNT/a/new.txt")" = 981173106123456789 ] || fail "touch -d: mount mtime $(mtime_ns "$MNT/a/new.txt")"
TZ=UTC touch -a -d '2002-03-04 05:06:07' "$MNT/a/new.txt"
[ "$(stat -c %X "$SRC/a/new.txt")" = 1015218367 ] || fail "touch -a -d: source atime $(stat -c %X "$SRC/a/new.txt")"
[ "$(mtime_ns "$SRC/a/new.txt")" = 981173106123456789 ] || fail "touch -a changed the mtime"
expect OK 'fd = os.open(A[0], os.O_RDONLY); os.utime(fd, ns=(1, 2000000003)); os.close(fd)' "$MNT/a/new.txt"
[ "$(mtime_ns "$SRC/a/new.txt")" = 2000000003 ] || fail "futimens: source mtime $(mtime_ns "$SRC/a/new.txt")"
touch "$MNT/a/new.txt"
now=$(date +%s)
[ $((now - $(stat -c %Y "$SRC/a/new.txt"))) -le 5 ] || fail "touch (now) did not set the mtime to now"
log "chmod, chown, utimens ok"

# ---- O_DIRECT ----------------------------------------------------------------------------
dd if="$MNT/data.bin" of="$T/direct.out" iflag=direct bs=64K status=none || fail "dd iflag=direct failed"
cmp "$T/direct.out" "$SRC/data.bin" || fail "dd iflag=direct read differs"
head -c 4194304 /dev/urandom > "$T/direct.in"
dd if="$T/direct.in" of="$MNT/direct.bin" oflag=direct bs=64K conv=fsync status=none || fail "dd oflag=direct failed"
cmp "$T/direct.in" "$SRC/direct.bin" || fail "dd oflag=direct: source differs"
cmp "$T/direct.in" "$MNT/direct.bin" || fail "dd oflag=direct: reading back differs"
"$PY" - "$MNT/direct.bin" "$SRC/direct.bin" "$DAEMON_PID" <<'EOF' || fail "O_DIRECT"
import errno, mmap, os, sys
mnt, src, daemon = sys.argv[1], os.path.realpath(sys.argv[2]), sys.argv[3]
buf = mmap.mmap(-1, 65536)
buf.write(os.urandom(65536))
fd = os.open(mnt, os.O_RDWR | os.O_DIRECT)
if os.pwrite(fd, buf, 131072) != 65536:
    sys.exit("short aligned O_DIRECT write")
# The daemon holds the source open with O_DIRECT too (QEMU cache=none), if
# the source fs allows O_DIRECT at all.
try:
    os.close(os.open(src, os.O_RDONLY | os.O_DIRECT))
    source_direct = True
except OSError:
    source_direct = False
if source_direct:
    found = False
    for f in os.listdir(f"/proc/{daemon}/fd"):
        try:
            if os.readlink(f"/proc/{daemon}/fd/{f}") != src:
                continue
            flags = int(open(f"/proc/{daemon}/fdinfo/{f}").read().split("flags:")[1].split()[0], 8)
        except OSError:
            continue
        if flags & os.O_ACCMODE == os.O_RDWR and flags & os.O_DIRECT:
            found = True
    if not found:
        sys.exit("the daemon has no O_RDWR|O_DIRECT descriptor of the source for an O_DIRECT open")
rbuf = mmap.mmap(-1, 65536)
if os.preadv(fd, [rbuf], 131072) != 65536 or rbuf[:] != buf[:]:
    sys.exit("aligned O_DIRECT read back differs")
with open(src, "rb") as f:
    f.seek(131072)
    if f.read(65536) != buf[:]:
        sys.exit("aligned O_DIRECT write is not in the source")
# Unaligned O_DIRECT write (offset, length and buffer): through the mount it
# either succeeds with the right bytes, or fails with EINVAL exactly like the
# source file system does.
before = open(src, "rb").read()
data = os.urandom(1000)
try:
    n = os.pwrite(fd, data, 12345)
    if n != 1000:
        sys.exit(f"unaligned O_DIRECT write wrote {n}")
    after = open(src, "rb").read()
    if after != before[:12345] + data + before[12345 + 1000:]:
        sys.exit("unaligned O_DIRECT write: wrong bytes in the source")
    got = os.pread(os.open(mnt, os.O_RDONLY), 1000, 12345)
    if got != data:
        sys.exit("unaligned O_DIRECT write: reads back wrong")
except OSError as e:
    if e.errno != errno.EINVAL:
        sys.exit(f"unaligned O_DIRECT write failed with {errno.errorcode[e.errno]}")
    sfd = os.open(src, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(sfd, data, 12345)
        sys.exit("unaligned O_DIRECT write: EINVAL through the mount, but the source fs accepts it")
    except OSError as e2:
        if e2.errno != errno.EINVAL:
            sys.exit(f"source fs: {errno.errorcode[e2.errno]}")
    if open(src, "rb").read() != before:
        sys.exit("failed unaligned O_DIRECT write changed the file")
EOF
log "O_DIRECT ok"

# ---- the state directory is invisible and unreachable ----------------------------------
state_ino=$(stat -c %i "$SRC/.fleecefs")
ls -a "$MNT" | grep -qx '.fleecefs' && fail "the state dir is listed in the mount root"
expect ENOENT 'os.lstat(A[0])' "$MNT/.fleecefs"
expect ENOENT 'os.listdir(A[0])' "$MNT/.fleecefs"
expect ENOENT 'os.listdir(A[0])' "$MNT/to-state"      # a symlink to it
expect ENOENT 'os.rmdir(A[0])' "$MNT/.fleecefs"
mkdir "$MNT/empty-dir"
pyerr 'os.rename(A[0], A[1])' "$MNT/empty-dir" "$MNT/.fleecefs" > "$T/rename-over-state"
pyerr 'os.mkdir(A[0])' "$MNT/.fleecefs" > "$T/mkdir-state"
[ -d "$SRC/.fleecefs" ] && [ "$(stat -c %i "$SRC/.fleecefs")" = "$state_ino" ] ||
	fail "renaming a directory over the hidden state dir replaced it ($(cat "$T/rename-over-state"))"
[ "$(cat "$T/rename-over-state")" != OK ] || fail "renaming a directory over the hidden state dir succeeded"
[ "$(cat "$T/mkdir-state")" != OK ] || fail "mkdir of the state dir's name succeeded"
echo secret > "$SRC/.fleecefs/secret"
expect ENOENT 'os.open(A[0], os.O_RDONLY)' "$MNT/.fleecefs/secret"
expect ENOENT 'os.open(A[0], os.O_RDONLY)' "$MNT/to-state/secret"
[ "$(pyerr 'os.close(os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC))' "$MNT/.fleecefs")" != OK ] ||
	fail "creating a file named like the state dir succeeded"
[ "$(cat "$SRC/.fleecefs/secret")" = secret ] || fail "the state dir's content changed"
ctl_expect ENOENT "backup .fleecefs/secret $OUT/secret.raw" >/dev/null
[ ! -e "$OUT/secret.raw" ] || fail "a refused backup of the state dir left a target"
# What the daemon is asked about its name answers EPERM, as for any reserved
# name (EEXIST or EISDIR would tell that something is there); lookups stay
# ENOENT, and from them the kernel answers unlink, rmdir and a rename from it
# without asking the daemon.
touch "$MNT/a-file"
soft expect EPERM 'os.mkdir(A[0])' "$MNT/.fleecefs"
soft expect EPERM 'os.mkdir(A[0], 0o700)' "$MNT/.fleecefs"
soft expect EPERM 'os.close(os.open(A[0], os.O_WRONLY | os.O_CREAT, 0o600))' "$MNT/.fleecefs"
soft expect EPERM 'os.close(os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))' "$MNT/.fleecefs"
soft expect EPERM 'os.close(os.open(A[0], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))' "$MNT/.fleecefs"
soft expect EPERM 'open(A[0], "x").close()' "$MNT/.fleecefs"
soft expect EPERM 'os.rename(A[0], A[1])' "$MNT/empty-dir" "$MNT/.fleecefs"
soft expect EPERM 'os.rename(A[0], A[1])' "$MNT/a-file" "$MNT/.fleecefs"
soft expect EPERM 'renameat2(A[0], A[1], 1)' "$MNT/a-file" "$MNT/.fleecefs"    # RENAME_NOREPLACE
soft expect ENOENT 'os.stat(A[0])' "$MNT/.fleecefs"
soft expect ENOENT 'os.unlink(A[0])' "$MNT/.fleecefs"
soft expect ENOENT 'os.rmdir(A[0])' "$MNT/.fleecefs"
soft expect ENOENT 'os.rename(A[0], A[1])' "$MNT/.fleecefs" "$MNT/moved-state"
soft expect ENOENT 'renameat2(A[0], A[1], 2)' "$MNT/empty-dir" "$MNT/.fleecefs" # RENAME_EXCHANGE needs both
soft expect ENOENT 'os.close(os.open(A[0], os.O_RDONLY))' "$MNT/.fleecefs"
[ -d "$SRC/.fleecefs" ] && [ "$(stat -c %i "$SRC/.fleecefs")" = "$state_ino" ] &&
	[ ! -e "$SRC/moved-state" ] || fail "the state dir was changed by the refused operations"
[ -f "$SRC/a-file" ] && [ -d "$SRC/empty-dir" ] || fail "a refused rename moved its source"
# The kernel does send an unlink or rmdir for a name whose cached entry is
# stale: look names up through the mount, then move the state dir to them
# behind its back (for a moment: the entries live 1 s).
"$PY" - "$SRC" "$MNT" > "$T/stale-state" <<'EOF' || fail "stale-entry probe: $(cat "$T/stale-state")"
import errno, os, sys
src, mnt = sys.argv[1], sys.argv[2]
os.mkdir(f"{mnt}/stale-dir")
open(f"{mnt}/stale-file", "w").close()
got = []
for name, remove in (("stale-dir", os.rmdir), ("stale-file", os.unlink)):
    os.stat(f"{mnt}/{name}")
    remove(f"{src}/{name}")
    os.rename(f"{src}/.fleecefs", f"{src}/{name}")
    try:
        remove(f"{mnt}/{name}")
        got.append(f"{name}:OK")
    except OSError as e:
        got.append(f"{name}:{errno.errorcode.get(e.errno, str(e.errno))}")
    finally:
        os.rename(f"{src}/{name}", f"{src}/.fleecefs")
print(" ".join(got))
EOF
[ "$(cat "$T/stale-state")" = "stale-dir:EPERM stale-file:EPERM" ] ||
	fail "rmdir/unlink of the state dir through a stale entry: $(cat "$T/stale-state"), want EPERM for both"
[ -d "$SRC/.fleecefs" ] && [ "$(stat -c %i "$SRC/.fleecefs")" = "$state_ino" ] &&
	[ "$(cat "$SRC/.fleecefs/secret")" = secret ] || fail "the state dir was changed through a stale entry"
rm -f "$MNT/a-file"
log "default state dir hidden"

# ---- .fleece in SOURCE_DIR is shadowed by the control dir (in the root only) ------------
[ "$(ls -a "$MNT" | grep -cx '.fleece')" = 1 ] || fail ".fleece is not listed exactly once: $(ls -a "$MNT")"
[ -d "$MNT/.fleece" ] || fail "$MNT/.fleece is not the control directory"
[ "$(stat -c %a "$MNT/.fleece")" = 700 ] || fail ".fleece mode $(stat -c %a "$MNT/.fleece")"
grep -q '^version=' "$MNT/.fleece/version" || fail "no control files under .fleece"
expect EISDIR 'os.read(os.open(A[0], os.O_RDONLY), 100)' "$MNT/.fleece"
[ "$(pyerr 'os.unlink(A[0])' "$MNT/.fleece")" != OK ] || fail "unlink of .fleece succeeded"
[ "$(pyerr 'os.rename(A[0], A[1])' "$MNT/.fleece" "$MNT/fleece-moved")" != OK ] || fail "rename of .fleece succeeded"
[ "$(pyerr 'os.rename(A[0], A[1])' "$MNT/a/b/mid.bin" "$MNT/.fleece")" != OK ] || fail "rename over .fleece succeeded"
[ "$(cat "$SRC/.fleece")" = "real file in the source" ] || fail "the shadowed source file changed"
[ ! -e "$SRC/fleece-moved" ] && [ -e "$SRC/a/b/mid.bin" ] || fail "a refused rename moved a file"
[ "$(cat "$MNT/sub/.fleece")" = "not shadowed" ] || fail "sub/.fleece is shadowed too"
log ".fleece shadowed"

# ---- other users (allow_other, default_permissions) -----------------------------------
if "${AS_NOBODY[@]}" test -x "$MNT/shared"; then
	AS=("${AS_NOBODY[@]}")
	expect OK 'fd = os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644); os.write(fd, b"n"); os.close(fd)' "$MNT/shared/by-nobody"
	expect OK 'os.mkdir(A[0], 0o755)' "$MNT/shared/dir-by-nobody"
	expect OK 'fd = os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666); os.close(fd)' "$MNT/sgid/by-nobody"
	expect OK 'os.mkdir(A[0], 0o777)' "$MNT/sgid/dir-by-nobody"
	expect OK 'fd = os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666); os.close(fd)' "$SRC/sgid/direct-by-nobody"
	expect OK 'os.mkdir(A[0], 0o777)' "$SRC/sgid/direct-dir-by-nobody"
	expect EACCES 'os.open(A[0], os.O_WRONLY)' "$MNT/shared/roots"
	expect EACCES 'os.open(A[0], os.O_RDONLY)' "$MNT/private"
	expect EACCES 'os.unlink(A[0])' "$MNT/a/new.txt"
	expect EACCES 'os.open(A[0], os.O_WRONLY | os.O_CREAT, 0o644)' "$MNT/not-allowed"
	AS=()
	[ "$(stat -c %u:%g "$SRC/shared/by-nobody")" = 65534:65534 ] ||
		fail "file created by nobody is owned by $(stat -c %u:%g "$SRC/shared/by-nobody")"
	[ "$(stat -c %u:%g "$SRC/shared/dir-by-nobody")" = 65534:65534 ] ||
		fail "directory created by nobody is owned by $(stat -c %u:%g "$SRC/shared/dir-by-nobody")"
	[ "$(stat -c %u:%g:%a "$SRC/sgid/by-nobody")" = "$(stat -c %u:%g:%a "$SRC/sgid/direct-by-nobody")" ] ||
		fail "in a setgid dir: through the mount $(stat -c %u:%g:%a "$SRC/sgid/by-nobody"), directly $(stat -c %u:%g:%a "$SRC/sgid/direct-by-nobody")"
	[ "$(stat -c %u:%g:%a "$SRC/sgid/dir-by-nobody")" = "$(stat -c %u:%g:%a "$SRC/sgid/direct-dir-by-nobody")" ] ||
		fail "dir in a setgid dir: through the mount $(stat -c %u:%g:%a "$SRC/sgid/dir-by-nobody"), directly $(stat -c %u:%g:%a "$SRC/sgid/direct-dir-by-nobody")"
	[ ! -e "$SRC/not-allowed" ] || fail "nobody created a file in a root-owned directory"
	log "other users ok"
else
	log "skip: user nobody cannot reach $MNT"
fi

# ---- a state_dir below a subdirectory -------------------------------------------------------
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "fleecefs exited $DAEMON_RC"
mount_fleece -o "allow_other,state_dir=$SRC/sub/state"
[ "$(stat -c %a "$SRC/sub/state")" = 700 ] || fail "state_dir not created 0700"
echo secret > "$SRC/sub/state/secret"
ls -a "$MNT/sub" | grep -qx state && fail "state_dir sub/state is listed in the mount"
expect ENOENT 'os.lstat(A[0])' "$MNT/sub/state"
expect ENOENT 'os.open(A[0], os.O_RDONLY)' "$MNT/sub/state/secret"
expect ENOENT 'os.listdir(A[0])' "$MNT/sub/state"
find "$MNT/sub" | grep -q state && fail "find through the mount shows the state dir"
ctl_expect ENOENT "backup sub/state/secret $OUT/secret.raw" >/dev/null
[ "$(cat "$MNT/sub/.fleece")" = "not shadowed" ] || fail "sub/.fleece unreadable with state_dir=sub/state"
log "state_dir=sub/state hidden"

# ---- EBUSY for an image with a running job -----------------------------------------------
random_image "$SRC/vm.img" 64M
cp "$SRC/vm.img" "$T/vm.orig"
echo other > "$SRC/other"
ans=$(ctl "backup vm.img $OUT/vm.raw speed=1M id=busy") || fail "backup refused: $ans"
[ "$(status busy state)" = running ] || fail "job busy is $(status busy state)"
expect EBUSY 'os.unlink(A[0])' "$MNT/vm.img"
expect EBUSY 'os.truncate(A[0], 0)' "$MNT/vm.img"
expect EBUSY 'os.truncate(A[0], 128 << 20)' "$MNT/vm.img"
expect EBUSY 'fd = os.open(A[0], os.O_RDWR); os.ftruncate(fd, 4096)' "$MNT/vm.img"
expect EBUSY 'os.rename(A[0], A[1])' "$MNT/other" "$MNT/vm.img"
expect EBUSY 'renameat2(A[0], A[1], 2)' "$MNT/other" "$MNT/vm.img"
expect EBUSY 'os.open(A[0], os.O_WRONLY | os.O_TRUNC)' "$MNT/vm.img"
expect EBUSY 'os.open(A[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)' "$MNT/vm.img"
# (FUSE itself refuses collapse-range; the daemon would say EBUSY.)
fallocate -c -o 0 -l 65536 "$MNT/vm.img" 2>/dev/null && fail "fallocate --collapse-range of a busy image succeeded"
truncate -s 0 "$MNT/vm.img" 2>/dev/null && fail "truncate -s 0 of a busy image succeeded"
[ "$(cat "$SRC/other")" = other ] || fail "the file renamed over the busy image changed"
cmp "$SRC/vm.img" "$T/vm.orig" || fail "the busy image changed"
[ "$(status busy state)" = running ] || fail "job busy is $(status busy state) after the refused operations"
# Renaming the image itself is fine: the job follows the file.
expect OK 'os.rename(A[0], A[1])' "$MNT/vm.img" "$MNT/a/vm-renamed.img"
cmp "$SRC/a/vm-renamed.img" "$T/vm.orig" || fail "renamed image differs"
ctl "set busy speed=0" >/dev/null || fail "set busy speed=0 refused"
[ "$(wait_job busy 30)" = completed ] || fail "job busy: $(cat "$MNT/.fleece/jobs/busy/status")"
cmp "$OUT/vm.raw" "$T/vm.orig" || fail "backup of the renamed image differs from the image"
# After a cancelled job, unlink works.
ans=$(ctl "backup a/vm-renamed.img $OUT/vm2.raw speed=1M id=busy2") || fail "backup refused: $ans"
expect EBUSY 'os.unlink(A[0])' "$MNT/a/vm-renamed.img"
ctl "cancel busy2" >/dev/null || fail "cancel busy2 refused"
[ "$(wait_job busy2 30)" = cancelled ] || fail "job busy2: $(cat "$MNT/.fleece/jobs/busy2/status")"
expect OK 'os.unlink(A[0])' "$MNT/a/vm-renamed.img"
[ ! -e "$SRC/a/vm-renamed.img" ] || fail "unlink after the job did not remove the image"
[ ! -e "$OUT/vm2.raw" ] && [ ! -e "$OUT/vm2.raw.xxh3" ] || fail "cancelled job left its target"
expect OK 'os.rename(A[0], A[1])' "$MNT/other" "$MNT/a/b/mid.bin"   # over a file without a job
log "EBUSY ok"

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "fleecefs exited $DAEMON_RC"
end_test
