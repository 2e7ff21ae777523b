#!/usr/bin/env bash
# A backup appears under its name only when it is complete and durable
# (issue 9, points 3, 4 and 12):
#   1. while a backup runs its target and manifest exist only under hidden
#      names beside TARGET; a SIGKILL of the daemon leaves no file under
#      TARGET's name (checksum=none too), and the next mount removes the
#      hidden leftovers of its own (and only those);
#   2. a file put at TARGET while the job runs is never replaced: the job
#      fails and says why, the file is untouched;
#   3. an incremental never follows a hard link: after `rm full.raw;
#      ln SOURCE_DIR/vm2.img full.raw` (or any second link) it is refused,
#      the live image untouched; a file replaced under the chain's name
#      (another inode) is refused too;
#   4. TARGET=MNT/../elsewhere/x.raw lies outside the mount: accepted;
#      targets really inside it (also through ..) are refused;
#   5. an incremental with checksum=none drops the manifest it made stale; a
#      group member cancelled after its copy (bitmap-mode=always) is kept
#      whole as a partial;
#   6. a crash after the job decided to publish is finished by the next mount
#      (record, temporary files and chain as a crash leaves them).
. "$TESTS_DIR/lib.sh"

M=$((1 << 20))
random_image "$SRC/vm.img" 32M
random_image "$SRC/vm2.img" 8M
mount_fleece

# =============================================================================
log "1. hidden while running; a SIGKILL leaves nothing under TARGET's name"
start k1 "backup vm.img $OUT/k1.raw speed=2M id=k1"
start k2 "backup vm.img $OUT/k2.raw speed=2M checksum=none id=k2"
for _ in $(seq 200); do [ "$(status k1 bytes_done)" -gt 0 ] && [ "$(status k2 bytes_done)" -gt 0 ] && break; sleep 0.02; done
soft eval '[ ! -e "$OUT/k1.raw" ] && [ ! -e "$OUT/k1.raw.xxh3" ] && [ ! -e "$OUT/k2.raw" ] ||
	fail "a running backup is under its name: $(ls "$OUT")"'
hidden=$(hidden_files "$OUT")
soft eval 'case "$hidden" in *.k1.raw.fleecefs-*.tmp*.k1.raw.xxh3.fleecefs-*.tmp*) ;;
	*) fail "hidden target and manifest of k1 missing: $hidden";; esac'
soft eval 'case "$hidden" in *.k2.raw.fleecefs-*.tmp*) ;; *) fail "hidden target of k2 missing: $hidden";; esac'
# A file of the same shape that is not ours stays.
touch "$OUT/.other.raw.fleecefs-1-1.tmp"
kill_daemon
soft eval '[ ! -e "$OUT/k1.raw" ] && [ ! -e "$OUT/k1.raw.xxh3" ] && [ ! -e "$OUT/k2.raw" ] ||
	fail "after SIGKILL a target is under its name: $(ls "$OUT")"'
[ -n "$(ls "$SRC/.fleecefs/pending")" ] || fail "no pending records after the kill"
mount_fleece
soft want_eq "hidden files after the next mount" "$(hidden_files "$OUT")" ".other.raw.fleecefs-1-1.tmp "
soft want_eq "pending records after the next mount" "$(ls "$SRC/.fleecefs/pending")" ""
rm "$OUT/.other.raw.fleecefs-1-1.tmp"
# TARGET exists: still refused, still untouched.
echo precious > "$OUT/k3.raw"
ctl_expect EEXIST "backup vm.img $OUT/k3.raw" >/dev/null
soft want_eq "an existing TARGET" "$(cat "$OUT/k3.raw")" precious
run_ok k4 "backup vm.img $OUT/k4.raw id=k4"
soft same "a completed backup" "$SRC/vm.img" "$OUT/k4.raw"
soft manifest_ok "$OUT/k4.raw"
soft want_eq "hidden files after a completed backup" "$(hidden_files "$OUT")" ""
soft eval '[ "$(stat -c %a "$OUT/k4.raw")" = 600 ] || fail "mode $(stat -c %a "$OUT/k4.raw")"'

# =============================================================================
log "2. a file put at TARGET while the job runs is never replaced"
start p1 "backup vm.img $OUT/p1.raw speed=8M id=p1"
echo mine > "$OUT/p1.raw"
ctl "set p1 speed=0" >/dev/null
want_eq p1 "$(wait_job p1)" failed
soft want_match "p1 error" "$(status p1 error)" "p1.raw appeared while the job ran"
soft want_eq "the file put at TARGET" "$(cat "$OUT/p1.raw")" mine
soft eval '[ ! -e "$OUT/p1.raw.xxh3" ] || fail "a manifest was published beside a foreign file"'
soft want_eq "hidden files after the failed publication" "$(hidden_files "$OUT")" ""
# The same for the manifest's name.
start p2 "backup vm.img $OUT/p2.raw speed=8M id=p2"
echo mine > "$OUT/p2.raw.xxh3"
ctl "set p2 speed=0" >/dev/null
want_eq p2 "$(wait_job p2)" failed
soft eval '[ ! -e "$OUT/p2.raw" ] && [ "$(cat "$OUT/p2.raw.xxh3")" = mine ] || fail "p2: $(ls -la "$OUT" | grep p2)"'
# Two jobs may not write one TARGET.
start p3 "backup vm.img $OUT/p3.raw speed=1M id=p3"
ctl_expect EEXIST "backup vm2.img $OUT/p3.raw id=p4" >/dev/null
ctl "cancel p3" >/dev/null
want_eq p3 "$(wait_job p3)" cancelled

# =============================================================================
log "3. an incremental never follows a hard link"
run_ok h0 "bitmap add vm.img cb
backup vm.img $OUT/full.raw bitmap=cb id=h0"
pwrites vm.img 1000:4096
sum2=$(md5sum < "$SRC/vm2.img")
rm "$OUT/full.raw"
ln "$SRC/vm2.img" "$OUT/full.raw"
out=$(ctl_expect EINVAL "backup vm.img $OUT/full.raw sync=incremental bitmap=cb checksum=none") || exit 1
soft want_match "hard link to an image" "$out" "not the file the chain's last backup was written to"
soft want_eq "vm2.img after the refused incremental" "$(md5sum < "$SRC/vm2.img")" "$sum2"
rm "$OUT/full.raw" "$OUT/full.raw.xxh3"
# The chain's own file, given a second name (cp -al rotation): refused too.
run_ok h1 "backup vm.img $OUT/full.raw bitmap=cb id=h1"
ln "$OUT/full.raw" "$OUT/rotated.raw"
cp "$OUT/full.raw" "$T/full-before"
out=$(ctl_expect EMLINK "backup vm.img $OUT/full.raw sync=incremental bitmap=cb") || exit 1
soft want_match "second link" "$out" "has 2 links"
soft same "the rotated copy after the refusal" "$T/full-before" "$OUT/rotated.raw"
rm "$OUT/rotated.raw"
# A different file under the chain's name (another inode): refused.
cp "$OUT/full.raw" "$T/copy" && mv "$T/copy" "$OUT/full.raw"
out=$(ctl_expect EINVAL "backup vm.img $OUT/full.raw sync=incremental bitmap=cb") || exit 1
soft want_match "another inode" "$out" "not the file"
soft want_eq "jobs after the refusals" "$(ls "$MNT/.fleece/jobs" | grep -c '^h')" 2
soft want_eq "hidden files after the refusals" "$(hidden_files "$OUT")" ""
# A target in SOURCE_DIR would be an image of the mount: refused, nothing made.
before=$(ls -A "$SRC")
out=$(ctl_expect EINVAL "backup vm.img $SRC/in-source.raw id=h2") || exit 1
soft want_match "a target in SOURCE_DIR" "$out" "lies in SOURCE_DIR"
soft want_eq "SOURCE_DIR after the refusal" "$(ls -A "$SRC")" "$before"
# The chain's backup reached through another path (a bind mount of
# SOURCE_DIR) and open as an image of the mount: an incremental would
# rewrite what a guest uses. Refused while it is served.
mkdir -p "$T/bind"
mount --bind "$SRC" "$T/bind"
EXTRA_MOUNTS+=("$T/bind")
run_ok h3 "bitmap add vm.img cs
backup vm.img $T/bind/chain.raw bitmap=cs checksum=none id=h3"
"$PY" -c 'import os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); open(sys.argv[2], "w").close(); time.sleep(60)' \
	"$MNT/chain.raw" "$T/chain-open" &
HOLDER=$!
BG_PIDS+=("$HOLDER")
for _ in $(seq 100); do [ -e "$T/chain-open" ] && break; sleep 0.05; done
pwrites vm.img 8192:4096
sum=$(md5sum < "$SRC/chain.raw")
out=$(ctl_expect EBUSY "backup vm.img $T/bind/chain.raw sync=incremental bitmap=cs checksum=none id=h4") || exit 1
soft want_match "an in-place target open as an image" "$out" "in use as an image of the mount"
soft want_eq "the served file after the refusal" "$(md5sum < "$SRC/chain.raw")" "$sum"
kill "$HOLDER"; wait "$HOLDER" 2>/dev/null || true
umount "$T/bind"
rm -f "$SRC/chain.raw"

# =============================================================================
log "4. targets judged by where they really are"
mkdir -p "$T/elsewhere"
run_ok r1 "backup vm2.img $MNT/../elsewhere/x.raw id=r1"
soft same "a backup to MNT/../elsewhere" "$SRC/vm2.img" "$T/elsewhere/x.raw"
soft want_eq "its target as resolved" "$(status r1 target)" "$T/elsewhere/x.raw"
out=$(ctl_expect EINVAL "backup vm2.img $T/elsewhere/../mnt/y.raw") || exit 1
soft want_match "inside through .." "$out" "inside the mount"
mkdir -p "$SRC/sub"
ln -s "$MNT/sub" "$T/link-into-mount"
out=$(ctl_expect EINVAL "backup vm2.img $T/link-into-mount/z.raw") || exit 1
soft want_match "inside through a symlink" "$out" "inside the mount"
soft eval '[ ! -e "$SRC/sub/z.raw" ] && [ ! -e "$SRC/sub/y.raw" ] || fail "a refused target was created"'

# =============================================================================
log "5. an incremental without checksums drops the manifest it made stale"
random_image "$SRC/cs.img" 4M
run_ok cs0 "bitmap add cs.img b
backup cs.img $OUT/cs.raw bitmap=b id=cs0"
pwrites cs.img 70000:100
run_ok cs1 "backup cs.img $OUT/cs.raw sync=incremental bitmap=b checksum=none id=cs1"
soft same "cs.raw after the incremental" "$SRC/cs.img" "$OUT/cs.raw"
soft eval '[ ! -e "$OUT/cs.raw.xxh3" ] || fail "the manifest of the earlier content is still there"'
out=$(ctl_expect EINVAL "backup cs.img $OUT/cs.raw sync=incremental bitmap=b") || exit 1
soft want_match "an incremental with checksums onto a backup without" "$out" "no manifest"

# A group member cancelled after its copy was done, with bitmap-mode=always:
# kept as a partial (its manifest written a second time, as partial).
random_image "$SRC/g1.img" 4M
random_image "$SRC/g2.img" 4M
out=$(ctl "bitmap add g1.img b
backup g1.img $OUT/g1.raw bitmap=b bitmap-mode=always group=g id=g1
backup g2.img $OUT/g2.raw speed=64K group=g id=g2") || fail "group refused: $out"
for _ in $(seq 200); do [ "$(status g1 bytes_done)" = $((4 * M)) ] && break; sleep 0.05; done
sleep 0.3
ctl "cancel g2" >/dev/null || fail "cancel g2"
want_eq g1 "$(wait_job g1)" cancelled
want_eq g2 "$(wait_job g2)" cancelled
soft want_eq "g1: partial" "$(status g1 partial)" "$OUT/g1.raw.partial"
soft manifest_ok "$OUT/g1.raw.partial" "g1 (kept after its copy)" partial
soft same "g1's partial holds everything" "$SRC/g1.img" "$OUT/g1.raw.partial"
soft eval '[ ! -e "$OUT/g2.raw" ] && [ ! -e "$OUT/g1.raw" ] || fail "a cancelled member is under its name"'
soft want_eq "hidden files after the group" "$(hidden_files "$OUT")" ""

# =============================================================================
log "6. a crash after the decision is finished by the next mount"
# As a crash between the decision and the renames leaves it: the record with
# decision=commit, the data and manifest under their hidden names.
unmount_fleece
tmp="$OUT/.done.raw.fleecefs-99999-7.tmp" mtmp="$OUT/.done.raw.xxh3.fleecefs-99999-7.tmp"
cp "$SRC/vm2.img" "$tmp"
"$PY" - "$tmp" "$mtmp" <<'PY'
import ctypes, sys
xxh = ctypes.CDLL("libxxhash.so.0")
xxh.XXH3_64bits.restype = ctypes.c_uint64
xxh.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
data, cs = open(sys.argv[1], "rb").read(), 65536
n = (len(data) + cs - 1) // cs
with open(sys.argv[2], "w") as f:
    f.write(f"fleecefs-manifest 1\nalgorithm=xxh3-64\nsize={len(data)}\ncluster_size={cs}\nclusters={n}\n")
    for c in range(n):
        chunk = data[c * cs:(c + 1) * cs]
        f.write("%016x\n" % xxh.XXH3_64bits(chunk, len(chunk)))
PY
cat > "$SRC/.fleecefs/pending/99999-7" <<EOF
kind=new
file=$tmp
final=$OUT/done.raw
partial=$OUT/done.raw.partial
manifest_temp=$mtmp
dev=$(stat -c %d "$tmp")
ino=$(stat -c %i "$tmp")
decision=commit
EOF
mount_fleece
soft same "the finished publication" "$SRC/vm2.img" "$OUT/done.raw"
soft manifest_ok "$OUT/done.raw" "the finished publication"
soft want_eq "hidden files after it" "$(hidden_files "$OUT")" ""
soft want_eq "pending records after it" "$(ls "$SRC/.fleecefs/pending")" ""
soft eval 'grep -q "finished publishing $OUT/done.raw" "$T/daemon.log" || fail "the recovery said nothing"'

unmount_fleece
want_eq "daemon exit status" "$DAEMON_RC" 0
end_test
