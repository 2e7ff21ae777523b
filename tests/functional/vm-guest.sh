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
"$PY" "$TESTS_DIR/pattern_rounds.py" wait "$SRC/vm.img" 2 $((1 << 20)) || fail "the guest never started writing"
out=$(ctl "backup vm.img $OUT/vm.raw id=vm speed=3M") || fail "backup refused: $out"
[ "$(wait_job vm 200)" = completed ] || fail "backup: $(status vm error)"
log "backup done: cbw_bytes=$(status vm cbw_bytes) cbw_wait_us_p99=$(status vm cbw_wait_us_p99)"
wait "$GUEST" || fail "guest failed ($?): $(tail -5 "$T/guest.out")"
BG_PIDS=()
grep -q guest-done "$T/guest.out" || fail "guest did not finish: $(tail -5 "$T/guest.out")"

"$PY" "$TESTS_DIR/pattern_rounds.py" instant "$OUT/vm.raw" "$SIZE" "$PATTERN" || fail "the backup is not the disk at one instant"
"$PATTERN" verify "$SRC/vm.img" $ROUNDS 0 $SIZE || fail "the disk lost guest writes"
unmount_fleece
log "ok"
