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
guest_rounds vm.img $SIZE $ROUNDS
mount_fleece
guest_rounds_start vm.img

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
