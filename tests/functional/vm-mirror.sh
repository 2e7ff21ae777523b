#!/usr/bin/env bash
# A real VM (../shared/vm/run-guest.sh: QEMU, virtio-blk, cache=none, i.e.
# O_DIRECT through the mount) rewrites its whole disk round after round with
# a verifiable pattern while its image is mirrored to another directory; the
# mirror reaches ready and is completed while the guest writes. The guest
# keeps running on the new file and its final verify passes, TARGET holds
# exactly what the guest wrote, and after an unmount and remount a new VM
# booted on the mount reads the same from TARGET.
. "$TESTS_DIR/lib.sh"

vm_kit

SIZE=$((16 << 20)) ROUNDS=7
guest_rounds vm.img $SIZE $ROUNDS
mkdir -p "$T/new-storage"
mount_fleece
guest_rounds_start vm.img

"$PY" "$TESTS_DIR/pattern_rounds.py" wait "$SRC/vm.img" 2 $((1 << 20)) || fail "the guest never started writing"
out=$(ctl "mirror vm.img $T/new-storage/vm.img copy-mode=write-blocking id=mv") || fail "mirror refused: $out"
for _ in $(seq 1200); do [ "$(status mv state)" = ready ] && break; sleep 0.05; done
[ "$(status mv state)" = ready ] || fail "mirror not ready: $(status mv state) $(status mv error)"
# Complete in the middle of a round, not after the guest is done.
"$PY" "$TESTS_DIR/pattern_rounds.py" wait "$SRC/vm.img" 4 $((6 << 20)) || fail "the guest did not reach round 4"
ctl "complete mv" >/dev/null || fail "complete refused"
[ "$(wait_job mv 60)" = completed ] || fail "mirror: $(status mv error)"
kill -0 "$GUEST" 2>/dev/null || fail "the guest finished before the switch"
log "switched while the guest wrote: written through $(status mv cbw_bytes) bytes"
wait "$GUEST" || fail "guest failed ($?): $(tail -5 "$T/guest.out")"
BG_PIDS=()
grep -q guest-done "$T/guest.out" || fail "guest did not finish: $(tail -5 "$T/guest.out")"

"$PATTERN" verify "$T/new-storage/vm.img" $ROUNDS 0 $SIZE || fail "TARGET does not hold what the guest wrote"
"$PATTERN" verify "$SRC/vm.img" $ROUNDS 0 $SIZE >/dev/null 2>&1 && fail "the old file got the guest's last round"

unmount_fleece
mount_fleece
cat > "$T/check.sh" <<G
pattern verify /dev/vda $ROUNDS 0 $SIZE || exit 3
echo guest-done
G
"$RUN_GUEST" "$MNT/vm.img" "$T/check.sh" --timeout 120 > "$T/check.out" 2>&1 || fail "second guest failed: $(tail -5 "$T/check.out")"
grep -q guest-done "$T/check.out" || fail "the guest after remount did not read the last round"
unmount_fleece
log "ok"
