#!/usr/bin/env bash
# A real VM (../shared/vm/run-guest.sh: QEMU, virtio-blk, cache=none, i.e.
# O_DIRECT through the mount) rewrites its whole disk round after round with
# a pattern whose every word depends on (seed, offset), while the host takes a
# rate-limited backup. The guest issues one 64 KiB write at a time, in order,
# so the disk at any instant is "round s up to X, round s-1 after X": the
# backup must be exactly that for one s and one X, and the disk must end as
# the last round wrote it.
. "$TESTS_DIR/lib.sh"

vm_kit

SIZE=$((16 << 20)) ROUNDS=7
truncate -s $SIZE "$SRC/vm.img"
"$PATTERN" write "$SRC/vm.img" 1 0 $SIZE || fail "host pattern write"
mount_fleece

cat > "$T/guest.sh" <<G
for s in \$(seq 2 $ROUNDS); do pattern write /dev/vda \$s 0 $SIZE || exit 2; done
pattern verify /dev/vda $ROUNDS 0 $SIZE || exit 3
echo guest-done
G
"$RUN_GUEST" "$MNT/vm.img" "$T/guest.sh" --timeout 240 > "$T/guest.out" 2>&1 &
GUEST=$!
BG_PIDS+=("$GUEST")

# Start the backup once the guest is well into its writing.
python3 - "$SRC/vm.img" <<'PY' || fail "the guest never started writing"
import struct, sys, time
M = (1 << 64) - 1
def word(seed, off):
    x = ((seed * 0x9E3779B97F4A7C15) & M) ^ off
    x ^= x >> 33; x = (x * 0xff51afd7ed558ccd) & M; x ^= x >> 33
    return x
deadline = time.monotonic() + 200
while time.monotonic() < deadline:
    with open(sys.argv[1], "rb") as f:
        f.seek(1 << 20)
        if struct.unpack("<Q", f.read(8))[0] == word(2, 1 << 20):
            sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
PY
out=$(ctl "backup vm.img $OUT/vm.raw id=vm speed=3M") || fail "backup refused: $out"
[ "$(wait_job vm 200)" = completed ] || fail "backup: $(status vm error)"
log "backup done: cbw_bytes=$(status vm cbw_bytes) cbw_wait_us_p99=$(status vm cbw_wait_us_p99)"
wait "$GUEST" || fail "guest failed ($?): $(tail -5 "$T/guest.out")"
BG_PIDS=()
grep -q guest-done "$T/guest.out" || fail "guest did not finish: $(tail -5 "$T/guest.out")"

python3 - "$OUT/vm.raw" "$SIZE" "$PATTERN" <<'PY' || fail "the backup is not the disk at one instant"
import struct, subprocess, sys
M = (1 << 64) - 1
def word(seed, off):
    x = ((seed * 0x9E3779B97F4A7C15) & M) ^ off
    x ^= x >> 33; x = (x * 0xff51afd7ed558ccd) & M; x ^= x >> 33
    return x
path, size, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
first = lambda off: struct.unpack_from("<Q", data, off)[0]
seed = next((s for s in range(1, 20) if first(0) == word(s, 0)), None)
assert seed, "chunk 0 holds no round's pattern"
x = next((o for o in range(0, size, 65536) if first(o) != word(seed, o)), size)
def verify(s, off, n):
    if n and subprocess.run([pattern, "verify", path, str(s), str(off), str(n)]).returncode:
        sys.exit(f"round {s} does not hold on [{off}, {off + n})")
verify(seed, 0, x)
verify(seed - 1, x, size - x)
print(f"backup = round {seed} up to offset {x}, round {seed - 1} after it")
PY
"$PATTERN" verify "$SRC/vm.img" $ROUNDS 0 $SIZE || fail "the disk lost guest writes"
unmount_fleece
log "ok"
