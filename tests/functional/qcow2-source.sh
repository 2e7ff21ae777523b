#!/usr/bin/env bash
# A qcow2 image as the source (SPEC section 6; most VMs' disks are qcow2
# files): a VM runs on MOUNTPOINT/vm.qcow2 (--format qcow2, cache=none) and
# keeps writing while `backup vm.qcow2 vm-backup.qcow2` copies it byte for
# byte (the default for a qcow2 source, whatever the suffix): the copy
# passes qemu-img check, verifies against its manifest, and the VM kit boots
# it and finds everything the guest wrote before the backup. An explicit
# format=qcow2 chain of the same source holds the container file: flattening
# its last point gives back the container file of that instant, which QEMU
# boots.
. "$TESTS_DIR/lib.sh"

command -v qemu-img >/dev/null || fail "qemu-img is needed (apt-get install qemu-utils)"
vm_kit

M=$((1024 * 1024)) ROUNDS=6
# boot IMAGE SCRIPT_TEXT: the VM kit runs SCRIPT_TEXT on IMAGE (qcow2) and it
# must print guest-ok.
boot() {
	printf '%s\necho guest-ok\n' "$2" > "$T/guest.sh"
	"$RUN_GUEST" "$1" "$T/guest.sh" --format qcow2 --timeout 240 > "$T/guest.out" 2>&1 ||
		fail "guest on $(basename "$1") failed ($?): $(tail -5 "$T/guest.out")"
	grep -q guest-ok "$T/guest.out" || fail "guest on $(basename "$1"): $(tail -5 "$T/guest.out")"
}

qemu-img create -q -f qcow2 "$SRC/vm.qcow2" 32M
mount_fleece

log "a VM writes into vm.qcow2 through the mount while it is backed up"
# Round 1 fills [0, 8M); later rounds rewrite [8M, 16M) while the backup runs.
cat > "$T/guest.sh" <<G
pattern write /dev/vda 1 0 $((8 * M)) || exit 2
for s in \$(seq 2 $ROUNDS); do pattern write /dev/vda \$s $((8 * M)) $((8 * M)) 4096 || exit 3; done
pattern verify /dev/vda 1 0 $((8 * M)) || exit 4
pattern verify /dev/vda $ROUNDS $((8 * M)) $((8 * M)) 4096 || exit 5
echo guest-done
G
"$RUN_GUEST" "$MNT/vm.qcow2" "$T/guest.sh" --format qcow2 --timeout 300 > "$T/guest.out" 2>&1 &
GUEST=$!
BG_PIDS+=("$GUEST")
# QEMU allocates clusters in the order the guest writes them: a container
# past 10 MiB means round 1 is acknowledged and round 2 is under way.
for _ in $(seq 2000); do
	[ "$(stat -c %s "$SRC/vm.qcow2")" -gt $((10 * M)) ] && break
	kill -0 "$GUEST" 2>/dev/null || fail "the guest ended early: $(tail -5 "$T/guest.out")"
	sleep 0.1
done
[ "$(stat -c %s "$SRC/vm.qcow2")" -gt $((10 * M)) ] || fail "the guest never got to round 2"
# Slow enough that the guest's writes race it (copy-before-write).
start live "backup vm.qcow2 $OUT/vm-backup.qcow2 speed=4M id=live"
want_eq "a qcow2 source" "$(status live source_format)" qcow2
want_eq "backed up byte for byte" "$(status live format)" raw
[ "$(wait_job live 240)" = completed ] || fail "live: $(status live error)"
log "live backup: cbw_bytes=$(status live cbw_bytes)"
wait "$GUEST" || fail "the guest failed ($?): $(tail -5 "$T/guest.out")"
BG_PIDS=()
grep -q guest-done "$T/guest.out" || fail "guest: $(tail -5 "$T/guest.out")"

# A byte copy of a running qcow2 is that file at one instant: QEMU's own
# ordering of data and metadata makes it consistent.
qcow2_clean "$OUT/vm-backup.qcow2"
manifest_ok "$OUT/vm-backup.qcow2" "the live byte copy"
want_eq "its manifest reads it as bytes" "$(sed -n 's/^format=//p' "$OUT/vm-backup.qcow2.xxh3")" raw
cp "$OUT/vm-backup.qcow2" "$T/boot.qcow2"
boot "$T/boot.qcow2" "pattern verify /dev/vda 1 0 $((8 * M)) || exit 1"

log "an explicit format=qcow2 chain holds the container file"
ctl "bitmap add vm.qcow2 c" >/dev/null || fail "bitmap add"
run_ok wfull "backup vm.qcow2 $OUT/wrap-full.qcow2 format=qcow2 bitmap=c id=wfull"
cp "$SRC/vm.qcow2" "$T/container0"
qemu-img compare -q -f raw -F qcow2 "$T/container0" "$OUT/wrap-full.qcow2" || fail "wrap-full is not the container file"
manifest_ok "$OUT/wrap-full.qcow2" wrap-full
# The guest changes its disk again (through the mount).
boot "$MNT/vm.qcow2" "pattern write /dev/vda 7 $((2 * M)) $M || exit 1"
# The chain was begun as qcow2: its incrementals continue it so.
run_ok winc "backup vm.qcow2 $OUT/wrap-inc.qcow2 sync=incremental bitmap=c id=winc"
want_eq "winc format" "$(status winc format)" qcow2
cp "$SRC/vm.qcow2" "$T/container1"
want_eq "wrap-inc backing" "$(qinfo "$OUT/wrap-inc.qcow2" "['backing-filename']")" wrap-full.qcow2
qcow2_clean "$OUT/wrap-inc.qcow2"
manifest_ok "$OUT/wrap-inc.qcow2" wrap-inc
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"

log "restoring the chain's last point gives back the container file"
qemu-img convert -f qcow2 -O raw "$OUT/wrap-inc.qcow2" "$T/restored.qcow2"
same "the restored container" "$T/container1" "$T/restored.qcow2"
qcow2_clean "$T/restored.qcow2"
boot "$T/restored.qcow2" "pattern verify /dev/vda 1 0 $((2 * M)) || exit 1
pattern verify /dev/vda 7 $((2 * M)) $M || exit 2
pattern verify /dev/vda 1 $((3 * M)) $((5 * M)) || exit 3
pattern verify /dev/vda $ROUNDS $((8 * M)) $((8 * M)) 4096 || exit 4"
log "ok"
