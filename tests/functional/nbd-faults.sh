#!/usr/bin/env bash
# NBD targets when the server fails or is slow (issue 14), and pull backups
# of a snapshot view by NBD clients:
#   - a server killed mid-backup that loses what it had not flushed (nbdkit
#     with cache=writeback: writes reach the file only at a flush): with
#     on-target-error=stop the job pauses; a restarted server and resume
#     finish it exactly (the writes the dead server dropped are sent again);
#   - the same when the server dies at the final flush (stop: paused,
#     resumed, exact); a failing final flush with report fails the job;
#   - the same with report: the job fails, and the guest's writes all landed;
#   - a slow server (20 ms per write) with fleecing=on under concurrent
#     writers: exact;
#   - qemu-nbd (and nbdkit) serving a snapshot view read-only, copied with
#     nbdcopy while the guest writes: equals T.
. "$TESTS_DIR/lib.sh"

random_image "$SRC/vm.img" 32M
mount_fleece
URI="nbd+unix:///?socket=$T/k.sock"
serve_cached() {
	nbd_serve k "$T/k.sock" nbdkit -f -U "$T/k.sock" --filter=cache file "$OUT/k.raw" cache=writeback
}

# 1. stop: pause, reconnect at resume, exact.
truncate -s 32M "$OUT/k.raw"
serve_cached
cp "$SRC/vm.img" "$T/at-t"
start st "backup vm.img $URI speed=6M on-target-error=stop id=st"
sleep 1.2
pwrites vm.img 0:65536 9000000:200000 30000000:4096
nbd_kill k
wait_state st paused 30
want_match "st error" "$(status st error)" "writing the target at offset [0-9]+: .*NBD server nbd\+unix:.*k.sock, connection lost"
want_match "st connection" "$(status st target_connection)" "^lost"
[ "$(status st target_unflushed_bytes)" -gt 0 ] || log "note: nothing was unflushed at the kill"
pwrites vm.img 20000000:300000
serve_cached
ctl "resume st" >/dev/null || fail "resume st"
ctl "set st speed=0" >/dev/null || fail "set st speed=0"
want_eq "st after resume" "$(wait_job st 60)" completed
[ "$(status st target_reconnects)" -ge 1 ] || fail "st: no reconnect counted"
nbd_kill k   # what it holds now is only what was flushed to the file
same "the backup across a server crash" "$T/at-t" "$OUT/k.raw"

# 1b. The server dies just before the final flush (held there by an injected
# delay): stop pauses the job; after resume the reconnect sends again all
# the dead server dropped, the flush succeeds, and the export is exact.
rm -f "$OUT/k.raw"
truncate -s 32M "$OUT/k.raw"
serve_cached
inject "target-flush delay=1500"
start sf "backup vm.img $URI on-target-error=stop id=sf"
for _ in $(seq 300); do grep -q "matched=1" "$MNT/.fleece/inject" && break; sleep 0.05; done
grep -q "matched=1" "$MNT/.fleece/inject" || fail "sf never reached its final flush"
cp "$SRC/vm.img" "$T/at-t"   # no writes since its start: T
nbd_kill k
wait_state sf paused 30
want_match "sf error" "$(status sf error)" "cannot flush \(on-target-error=stop\): .*connection lost"
inject "clear"
serve_cached
ctl "resume sf" >/dev/null || fail "resume sf"
want_eq "sf after resume" "$(wait_job sf 60)" completed
nbd_kill k
same "the backup whose final flush met a dead server" "$T/at-t" "$OUT/k.raw"

# 1c. A final flush that fails with report: the job fails, saying so.
rm -f "$OUT/k.raw"
truncate -s 32M "$OUT/k.raw"
serve_cached
inject "target-flush errno=EIO"
start ff "backup vm.img $URI id=ff"
want_eq "ff" "$(wait_job ff 30)" failed
want_match "ff error" "$(status ff error)" "cannot flush: Input/output error"
inject "clear"

# 2. report: the job fails; the guest never notices.
rm -f "$OUT/k.raw"
truncate -s 32M "$OUT/k.raw"
serve_cached
start rp "backup vm.img $URI speed=4M id=rp"
sleep 0.5
nbd_kill k
head -c 1000000 /dev/urandom > "$T/guest.data"
dd if="$T/guest.data" of="$MNT/vm.img" bs=1000000 seek=5000000 oflag=seek_bytes conv=notrunc,fsync status=none ||
	fail "a guest write failed while the target was gone"
want_eq "rp" "$(wait_job rp 30)" failed
want_match "rp error" "$(status rp error)" "NBD server .*k.sock, connection lost"
cmp -s <(tail -c +5000001 "$SRC/vm.img" | head -c 1000000) "$T/guest.data" ||
	fail "the guest's write did not land in the image"

# 3. A slow server (20 ms per write) with fleecing=on: exact under writers.
rm -f "$OUT/slow.raw"
truncate -s 32M "$OUT/slow.raw"
nbd_serve slow "$T/slow.sock" nbdkit -f -U "$T/slow.sock" --filter=delay file "$OUT/slow.raw" wdelay=20ms
cp "$SRC/vm.img" "$T/base"
"$PY" "$TESTS_DIR/pit_writers.py" --mnt "$MNT" --base "$T/base" --target "nbd+unix:///?socket=$T/slow.sock" \
	--writers 4 --options "fleecing=on" || fail "slow server with fleecing: point in time broken"

# 4. Pull: a snapshot view served by qemu-nbd (read-only), copied by nbdcopy
# while the guest writes.
cp "$SRC/vm.img" "$T/at-t"
ctl "snapshot pull vm.img" >/dev/null || fail "snapshot pull"
nbd_serve view "$T/view.sock" qemu-nbd -r -t -f raw -k "$T/view.sock" "$MNT/.fleece/snapshots/pull/vm.img"
"$PY" - "$MNT/vm.img" <<'PY' &
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
end = time.monotonic() + 3
while time.monotonic() < end:
    os.pwrite(fd, os.urandom(random.randint(1, 200000)), random.randrange((32 << 20) - 200000))
PY
writer=$!
BG_PIDS+=("$writer")
truncate -s 32M "$T/pulled.raw"
nbdcopy -- "nbd+unix:///?socket=$T/view.sock" "$T/pulled.raw" || fail "nbdcopy from the view"
wait "$writer" || fail "guest writer"
same "the pulled view" "$T/at-t" "$T/pulled.raw"
cmp -s "$T/at-t" "$SRC/vm.img" && fail "the guest writes did not change the image (nothing was tested)"
nbd_kill view
# The same view through nbdkit (read-only file plugin).
nbd_serve kview "$T/kview.sock" nbdkit -f -r -U "$T/kview.sock" file "$MNT/.fleece/snapshots/pull/vm.img"
truncate -s 32M "$T/pulled2.raw"
nbdcopy -- "nbd+unix:///?socket=$T/kview.sock" "$T/pulled2.raw" || fail "nbdcopy from nbdkit"
same "the view pulled through nbdkit" "$T/at-t" "$T/pulled2.raw"
nbd_kill kview
ctl "release pull" >/dev/null || fail "release pull"

unmount_fleece
want_eq "daemon exit" "$DAEMON_RC" 0
end_test
