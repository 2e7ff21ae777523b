#!/usr/bin/env bash
# libvirt as it really runs (fleecefs(8), LIBVIRT): QEMU runs as an
# unprivileged user (libvirt-qemu on Debian; here nobody). With
# -o allow_other that user's QEMU boots from an image on the mount that it
# owns (cache=none), and writes it while root backs it up, while the control
# directory stays closed to it: it can neither read .fleece/ nor start a job.
. "$TESTS_DIR/lib.sh"

vm_kit
command -v runuser >/dev/null || fail "runuser is needed (apt-get install util-linux)"
USER_NAME=nobody
M=$((1024 * 1024)) SIZE=$((16 * M))
# The user gets a readable copy of the kit's kernel and initramfs tree (the
# cache may be shared: it is not ours to change) and a scratch directory.
chmod 755 "$T"
USER_CACHE=$T/user-cache
mkdir -p "$USER_CACHE" "$T/user-tmp"
cp -a "$FLEECE_VM_CACHE/vmlinuz" "$FLEECE_VM_CACHE/root" "$FLEECE_VM_CACHE/.ready" "$USER_CACHE/"
chmod -R a+rX "$USER_CACHE"
chown "$USER_NAME" "$T/user-tmp"
as_user() { runuser -u "$USER_NAME" -- env TMPDIR="$T/user-tmp" FLEECE_VM_CACHE="$USER_CACHE" "$@"; }

truncate -s $SIZE "$SRC/vm.img"
"$PATTERN" write "$SRC/vm.img" 1 0 $SIZE || fail "host pattern write"
# As libvirt does with dynamic_ownership: the image belongs to QEMU's user.
chown "$USER_NAME" "$SRC/vm.img"
chmod 600 "$SRC/vm.img"
chmod 755 "$SRC"
mount_fleece -o allow_other

log "the control directory is closed to QEMU's user"
as_user cat "$MNT/.fleece/version" >/dev/null 2>&1 && fail "$USER_NAME read .fleece/version"
as_user ls "$MNT/.fleece" >/dev/null 2>&1 && fail "$USER_NAME listed .fleece/"
as_user sh -c "echo 'backup vm.img $T/user-tmp/steal.raw' > '$MNT/.fleece/ctl'" 2>/dev/null &&
	fail "$USER_NAME wrote a command"
[ ! -e "$T/user-tmp/steal.raw" ] || fail "$USER_NAME started a backup"
as_user cmp -s "$SRC/vm.img" "$MNT/vm.img" || fail "$USER_NAME cannot read its image through the mount"

log "its QEMU boots from the mount and writes while root backs the image up"
cat > "$T/guest.sh" <<G
pattern verify /dev/vda 1 0 $SIZE || exit 2
pattern write /dev/vda 2 0 $SIZE || exit 3
pattern verify /dev/vda 2 0 $SIZE || exit 4
echo guest-done
G
chmod 644 "$T/guest.sh"
as_user "$RUN_GUEST" "$MNT/vm.img" "$T/guest.sh" --timeout 240 > "$T/guest.out" 2>&1 &
GUEST=$!
BG_PIDS+=("$GUEST")
# Once the guest writes round 2 (the first word of the second MiB changes):
# a backup of round 1, taken under its writes.
"$PY" "$TESTS_DIR/pattern_rounds.py" wait "$SRC/vm.img" 2 0 || fail "the guest never started writing: $(tail -5 "$T/guest.out")"
run_ok b "backup vm.img $OUT/vm.raw id=b"
wait "$GUEST" || fail "the guest failed ($?): $(tail -5 "$T/guest.out")"
BG_PIDS=()
grep -q guest-done "$T/guest.out" || fail "guest: $(tail -5 "$T/guest.out")"
"$PATTERN" verify "$SRC/vm.img" 2 0 $SIZE || fail "the guest's writes are not in the image"
# The backup is one instant of a disk going from round 1 to round 2.
"$PY" "$TESTS_DIR/pattern_rounds.py" instant "$OUT/vm.raw" "$SIZE" "$PATTERN" || fail "the backup is not one instant"
manifest_ok "$OUT/vm.raw"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"
log "ok"
