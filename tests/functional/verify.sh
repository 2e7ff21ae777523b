#!/usr/bin/env bash
# fleecectl verify (SPEC sections 6 and 7): a backup and its chain checked
# against their manifests with neither the image nor the mount. Chains that
# fleecefs wrote (qcow2 on qcow2, qcow2 on raw) verify clean; then, each on
# a copy: one flipped byte in a data cluster (of the top, of a file in the
# middle, of the full below), a damaged L2 entry, a truncated file, a missing
# backing file, a missing or garbled manifest. Each is found, with the bad
# cluster's offset and the file its data came from, and the right exit
# status: 1 damage, 2 cannot check. qcow2 images that qemu-img made (zstd,
# zlib, version 2, a chain written with qemu-io) verify against manifests
# this test computes from the data it wrote.
. "$TESTS_DIR/lib.sh"

command -v qemu-img >/dev/null || fail "qemu-img is needed (apt-get install qemu-utils)"
command -v qemu-io >/dev/null || fail "qemu-io is needed (apt-get install qemu-utils)"
K=1024 M=$((1024 * 1024)) CS=65536

# make_manifest RAW TARGET CLUSTER FORMAT: TARGET.xxh3 for content RAW,
# computed here (libxxhash through ctypes), not by fleecefs.
make_manifest() {
	"$PY" - "$@" <<'PY'
import ctypes, sys
xxh = ctypes.CDLL("libxxhash.so.0")
xxh.XXH3_64bits.restype = ctypes.c_uint64
xxh.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
raw, target, cs, fmt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
data = open(raw, "rb").read()
n = (len(data) + cs - 1) // cs
with open(target + ".xxh3", "w") as f:
    f.write(f"fleecefs-manifest 1\nalgorithm=xxh3-64\nformat={fmt}\nsize={len(data)}\ncluster_size={cs}\nclusters={n}\n")
    for c in range(n):
        chunk = data[c * cs:(c + 1) * cs]
        f.write("%016x\n" % xxh.XXH3_64bits(chunk, len(chunk)))
PY
}
# flip FILE OFFSET: changes one byte of FILE.
flip() {
	"$PY" -c "
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR); off = int(sys.argv[2])
b = os.pread(fd, 1, off); assert len(b) == 1
os.pwrite(fd, bytes([b[0] ^ 0x5a]), off); os.close(fd)" "$1" "$2"
}
# mapped FILE DEPTH: "VIRTUAL HOST" of the first data cluster that QEMU
# reads for FILE from the chain element at DEPTH (0: FILE itself).
mapped() {
	qemu-img map --output=json "$1" | "$PY" -c "
import json, sys
for e in json.load(sys.stdin):
    if e['data'] and e['depth'] == int(sys.argv[1]) and 'offset' in e:
        print(e['start'], e['offset']); break
else:
    sys.exit('no data cluster at depth ' + sys.argv[1])" "$2"
}
# chain_copy NAME: a copy of the backups in $OUT, to damage.
chain_copy() {
	rm -rf "$T/$1"
	cp -a "$OUT" "$T/$1"
	D=$T/$1
}
# count_lines REGEX: lines of the last verify output that match.
count_lines() { grep -cE -- "$1" <<<"$VERIFY_OUT" || true; }

log "fleecefs chains verify clean"
random_image "$SRC/vm.img" 8M
# Holes and zeroes too: unallocated and zero clusters are checked as well.
truncate -s 10M "$SRC/vm.img"
mount_fleece
ctl "bitmap add vm.img b" >/dev/null || fail "bitmap add"
ctl "bitmap add vm.img r" >/dev/null || fail "bitmap add"
run_ok full "backup vm.img $OUT/full.qcow2 bitmap=b id=full"
run_ok rfull "backup vm.img $OUT/r.raw bitmap=r id=rfull"
pwrites vm.img $((1 * M + 100)):70000 $((5 * M)):4096 $((9 * M)):65536
run_ok inc1 "backup vm.img $OUT/inc1.qcow2 sync=incremental bitmap=b id=inc1"
pwrites vm.img $((2 * M)):131072 $((5 * M + 8192)):100
"$PY" -c "import os; fd = os.open('$MNT/vm.img', os.O_WRONLY); os.pwrite(fd, bytes(65536), $((3 * M)))"
run_ok inc2 "backup vm.img $OUT/inc2.qcow2 sync=incremental bitmap=b id=inc2"
run_ok rinc "backup vm.img $OUT/ri.qcow2 sync=incremental bitmap=r id=rinc"
# A partial (bitmap-mode=always, failed): checked against its partial manifest.
pwrites vm.img $((4 * M)):65536 $((7 * M)):1000
inject "target-write offset=7M-8M from=1 errno=EIO"
start p "backup vm.img $OUT/rp.qcow2 sync=incremental bitmap=r bitmap-mode=always id=p"
[ "$(wait_job p)" = failed ] || fail "p: $(status p state)"
inject clear
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"
# Nothing of the source is needed.
mv "$SRC/vm.img" "$T/vm.img.away"

verify_ok "$OUT/inc2.qcow2"
want_eq "files checked for inc2" "$(count_lines ': ok: ')" 3
want_match "the chain" "$VERIFY_OUT" "inc2.qcow2: ok: 160 clusters of 65536 bytes, 10485760 bytes \(qcow2 over 2 backing files\)"
want_match "inc1 against its own manifest" "$VERIFY_OUT" "inc1.qcow2: ok: .*its own manifest"
want_match "full against its own manifest" "$VERIFY_OUT" "full.qcow2: ok: .*its own manifest"
verify_ok "$OUT/ri.qcow2"
want_match "a qcow2 incremental on a raw full" "$VERIFY_OUT" "r.raw: ok: "
verify_ok "$OUT/r.raw"
verify_ok "$OUT/rp.qcow2.partial"
want_match "the partial" "$VERIFY_OUT" "rp.qcow2.partial: ok: .*a partial backup"
# A partial is no disk that ever was: restore refuses it.
rc=0; "$FLEECECTL" restore "$OUT/rp.qcow2.partial" "$T/from-partial" 2>"$T/restore.err" || rc=$?
want_eq "restore of a partial" $rc 2
want_match "it says why" "$(cat "$T/restore.err")" "is a partial backup"
[ ! -e "$T/from-partial" ] || fail "restore of a partial left a file"
# Several backups at once: the worst result.
"$FLEECECTL" verify "$OUT/full.qcow2" "$OUT/inc1.qcow2" >/dev/null || fail "verify of two backups"

log "a flipped byte in the middle of the chain: found in the top's view and in its own"
chain_copy flip1
read -r virt host <<<"$(mapped "$D/inc2.qcow2" 1)"
flip "$D/inc1.qcow2" $((host + 777))
verify_rc 1 "$D/inc2.qcow2" "inc2.qcow2: bad cluster at offset $virt \(cluster $((virt / CS)) of 160\): checksum mismatch; data from $D/inc1.qcow2 at host offset $(printf '%#x' "$host")"
want_match "inc1's own check" "$VERIFY_OUT" "^$D/inc1.qcow2: bad cluster at offset $virt "
want_match "inc2 summary" "$VERIFY_OUT" "inc2.qcow2: DAMAGED: 1 of 160 clusters bad"
want_match "full is fine" "$VERIFY_OUT" "full.qcow2: ok: "
verify_rc 0 "$D/full.qcow2"

log "a flipped byte in the top and in the full below"
chain_copy flip2
read -r virt host <<<"$(mapped "$D/inc2.qcow2" 0)"
flip "$D/inc2.qcow2" $((host + 5))
read -r fvirt fhost <<<"$(mapped "$D/inc2.qcow2" 2)"
flip "$D/full.qcow2" $((fhost + 65535))
verify_rc 1 "$D/inc2.qcow2" "inc2.qcow2: bad cluster at offset $virt .*data from $D/inc2.qcow2"
want_match "the full's cluster in the top's view" "$VERIFY_OUT" "inc2.qcow2: bad cluster at offset $fvirt .*data from $D/full.qcow2"
want_match "the full's own check" "$VERIFY_OUT" "^$D/full.qcow2: bad cluster at offset $fvirt "
want_match "and inc1's" "$VERIFY_OUT" "^$D/inc1.qcow2: bad cluster at offset $fvirt "
want_eq "bad cluster lines" "$(count_lines 'bad cluster at')" 4

log "a damaged L2 entry (past the end of the file, reserved bits)"
chain_copy l2
# l2_entry FILE VIRT VALUE: sets the L2 entry of virtual offset VIRT.
l2_entry() {
	"$PY" - "$@" <<'PY'
import os, struct, sys
path, virt, value = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0)
fd = os.open(path, os.O_RDWR)
h = os.pread(fd, 48, 0)
bits, l1 = struct.unpack(">I", h[20:24])[0], struct.unpack(">Q", h[40:48])[0]
vc = virt >> bits
l1e = struct.unpack(">Q", os.pread(fd, 8, l1 + 8 * (vc >> (bits - 3))))[0] & 0x00fffffffffffe00
os.pwrite(fd, struct.pack(">Q", value), l1e + 8 * (vc & ((1 << (bits - 3)) - 1)))
os.close(fd)
PY
}
read -r virt host <<<"$(mapped "$D/inc2.qcow2" 0)"
l2_entry "$D/inc2.qcow2" "$virt" "$(printf '%#x' $(((1 << 63) | (1 << 40))))"
verify_rc 1 "$D/inc2.qcow2" "inc2.qcow2: bad cluster at offset $virt .*the L2 entry of virtual offset $virt points to 0x10000000000, past the end of the file"
l2_entry "$D/inc2.qcow2" "$virt" "$(printf '%#x' $(((1 << 63) | host | 0x10)))"
verify_rc 1 "$D/inc2.qcow2" "inc2.qcow2: bad cluster at offset $virt .*reserved bits set"
# An entry pointing at another cluster of the file: the sums find it.
read -r virt2 host2 <<<"$(qemu-img map --output=json "$OUT/inc2.qcow2" | "$PY" -c "
import json, sys
d = [e for e in json.load(sys.stdin) if e['data'] and e['depth'] == 0]
print(d[-1]['start'], d[-1]['offset'] + d[-1]['length'] - 65536)")"
l2_entry "$D/inc2.qcow2" "$virt" "$(printf '%#x' $(((1 << 63) | host2)))"
verify_rc 1 "$D/inc2.qcow2" "inc2.qcow2: bad cluster at offset $virt .*checksum mismatch; data from $D/inc2.qcow2 at host offset $(printf '%#x' "$host2")"

log "truncated files"
chain_copy trunc
truncate -s $(($(stat -c %s "$D/inc1.qcow2") / 2)) "$D/inc1.qcow2"
verify_rc 1 "$D/inc2.qcow2" "inc2.qcow2: bad clusters? at offsets? [0-9]+ .*inc1.qcow2: .*(past the end of the file|cut short)"
want_match "inc1's own check" "$VERIFY_OUT" "inc1.qcow2: DAMAGED"
truncate -s $((3 * M + 1000)) "$D/r.raw"
# Clusters bad for one reason in a row: one line.
verify_rc 1 "$D/r.raw" "r.raw: bad clusters at offsets $((3 * M)) to $((159 * CS)) \(clusters 48 to 159 of 160\): $D/r.raw: ends at byte $((3 * M + 1000)) \(cut short\)"
want_match "every cluster past the cut" "$VERIFY_OUT" "r.raw: DAMAGED: 112 of 160 clusters bad"
# Every cluster different: the first 100 listed, the rest counted.
head -c $((10 * M)) /dev/urandom >"$D/r.raw"
verify_rc 1 "$D/r.raw" "r.raw: bad cluster at offset $((99 * CS)) \(cluster 99 of 160\)"
want_eq "lines listed" "$(count_lines 'bad cluster at')" 100
want_match "the rest counted" "$VERIFY_OUT" "r.raw: ... and 60 more bad clusters"
truncate -s 20000 "$D/full.qcow2"
verify_rc 1 "$D/full.qcow2" "full.qcow2: DAMAGED"

log "cannot check: a missing backing file, a missing or garbled manifest"
chain_copy missing
rm "$D/inc1.qcow2"
verify_rc 2 "$D/inc2.qcow2" "cannot check: backing file $D/inc1.qcow2 \(of $D/inc2.qcow2\): No such file or directory"
[ "$(count_lines ': ok: ')" = 0 ] || fail "an unchecked chain said ok: $VERIFY_OUT"
rm "$D/inc2.qcow2.xxh3"
verify_rc 2 "$D/inc2.qcow2" "cannot check: manifest $D/inc2.qcow2.xxh3: No such file or directory"
sed -i '9s/.*/not a checksum/' "$D/full.qcow2.xxh3"
verify_rc 2 "$D/full.qcow2" "manifest $D/full.qcow2.xxh3: line 9: not a checksum"
# A backing file's manifest missing: checked as part of the top only.
chain_copy nomanifest
rm "$D/inc1.qcow2.xxh3"
verify_rc 0 "$D/inc2.qcow2" "inc1.qcow2 has no manifest of its own: checked only as part of"
verify_rc 2 "$T/nothing-here.qcow2" "cannot check: manifest"
out=$("$FLEECECTL" verify 2>&1) && fail "verify without a target succeeded"
rc=0; "$FLEECECTL" frobnicate >/dev/null 2>&1 || rc=$?
want_eq "an unknown command" $rc 2

log "random damage to a chain's metadata: an answer, never a crash"
chain_copy fuzz
cp "$D/inc2.qcow2" "$T/inc2-orig"
# A sanitizer's report must not pass for exit 1 (damage).
ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=99 UBSAN_OPTIONS=${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}exitcode=99 \
	"$PY" - "$D/inc2.qcow2" "$T/inc2-orig" "$FLEECECTL" <<'PY' || fail "verify of damaged metadata"
import os, random, shutil, subprocess, sys
path, orig, fc = sys.argv[1:4]
r = random.Random(13)
size = os.path.getsize(orig)
seen = {0: 0, 1: 0, 2: 0}
for i in range(120):
    shutil.copyfile(orig, path)
    fd = os.open(path, os.O_RDWR)
    for _ in range(r.choice([1, 2, 8])):
        # Header, L1, L2 and refcount structures: the first clusters and the last.
        off = r.choice([r.randrange(0, 3 * 65536), r.randrange(max(0, size - 3 * 65536), size)])
        os.pwrite(fd, bytes([r.randrange(256)]), off)
    if i % 10 == 9:
        os.ftruncate(fd, r.randrange(0, size))
    os.close(fd)
    p = subprocess.run([fc, "verify", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    if p.returncode not in (0, 1, 2):
        sys.exit(f"round {i}: exit {p.returncode}: {p.stderr.decode()[-500:]}")
    seen[p.returncode] += 1
print("exit codes", seen)
PY

log "qcow2 images made by qemu-img: zstd, zlib, version 2, a qemu-io chain"
Q=$T/q
mkdir -p "$Q"
# Mixed content: zeroes, text, random, by 64K cluster.
"$PY" - "$Q/mixed.raw" <<'PY'
import os, random, sys
random.seed(7)
out = bytearray()
for i in range(96):
    k = i % 3
    if k == 1:
        words = [random.choice(["backup", "cluster", "guest", "qcow2", "zstd", "fleece"]) for _ in range(12000)]
        out += (" ".join(words).encode() * 2)[:65536]
    elif k == 2:
        out += os.urandom(65536)
    else:
        out += bytes(65536)
out += b"tail" * 100    # not a whole cluster
open(sys.argv[1], "wb").write(out)
PY
qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$Q/mixed.raw" "$Q/zstd.qcow2"
want_eq "zstd image" "$(qinfo "$Q/zstd.qcow2" "['format-specific']['data']['compression-type']")" zstd
qemu-img convert -f raw -O qcow2 -c "$Q/mixed.raw" "$Q/zlib.qcow2"
qemu-img convert -f raw -O qcow2 -o compat=0.10,cluster_size=4096 "$Q/mixed.raw" "$Q/v2.qcow2"
for img in zstd zlib v2; do
	make_manifest "$Q/mixed.raw" "$Q/$img.qcow2" 65536 qcow2
	verify_ok "$Q/$img.qcow2"
done
# A different manifest cluster than the image's: 4K sums over 64K clusters.
make_manifest "$Q/mixed.raw" "$Q/zlib.qcow2" 4096 qcow2
verify_ok "$Q/zlib.qcow2"
# A damaged compressed cluster (its stream): found.
cp "$Q/zstd.qcow2" "$Q/zstd-bad.qcow2"
cp "$Q/zstd.qcow2.xxh3" "$Q/zstd-bad.qcow2.xxh3"
size=$(stat -c %s "$Q/zstd-bad.qcow2")
flip "$Q/zstd-bad.qcow2" $((size - 3000))
verify_rc 1 "$Q/zstd-bad.qcow2" "bad cluster at offset .*(does not decompress|checksum mismatch)"
# A qemu-io chain: base (zlib, 4K clusters) <- top (writes, zero writes).
qemu-img convert -f raw -O qcow2 -c -o cluster_size=4096 "$Q/mixed.raw" "$Q/base.qcow2"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$Q/top.qcow2"
qemu-io -f qcow2 -c "write -P 0xab 100k 200k" -c "write -z 1M 300k" -c "write -P 0x11 6000k 1k" "$Q/top.qcow2" >/dev/null
cp "$Q/mixed.raw" "$Q/top.raw"
"$PY" - "$Q/top.raw" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
os.pwrite(fd, b"\xab" * (200 << 10), 100 << 10)
os.pwrite(fd, bytes(300 << 10), 1 << 20)
os.pwrite(fd, b"\x11" * 1024, 6000 << 10)
os.close(fd)
PY
make_manifest "$Q/top.raw" "$Q/top.qcow2" 65536 qcow2
verify_ok "$Q/top.qcow2"
verify_rc 0 "$Q/top.qcow2" "base.qcow2 has no manifest of its own"
# A raw backing file (qemu-img create -F raw).
qemu-img create -q -f qcow2 -b mixed.raw -F raw "$Q/over-raw.qcow2"
qemu-io -f qcow2 -c "write -P 0x22 64k 64k" "$Q/over-raw.qcow2" >/dev/null
cp "$Q/mixed.raw" "$Q/over-raw.raw"
"$PY" -c "import os; fd = os.open('$Q/over-raw.raw', os.O_WRONLY); os.pwrite(fd, b'\x22' * 65536, 65536)"
make_manifest "$Q/over-raw.raw" "$Q/over-raw.qcow2" 65536 qcow2
make_manifest "$Q/mixed.raw" "$Q/mixed.raw" 65536 raw
verify_ok "$Q/over-raw.qcow2"
want_match "the raw backing's own manifest" "$VERIFY_OUT" "mixed.raw: ok: "

log "ok"
