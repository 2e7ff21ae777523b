#!/usr/bin/env bash
# sync=incremental into an NBD export (issue 14): the export holding the
# chain's last backup is updated in place, every overwritten cluster's old
# content journaled locally first, so it is always the image at one point
# in time: T2 when the incremental completes (under concurrent writers),
# T1 again after one fails (injected target error), is cancelled, dies with
# the daemon (the next mount rolls back), or loses its server (the next
# mount rolls back once the server is back; meanwhile a new incremental on
# the chain is refused); with on-target-error=stop a lost server pauses the
# incremental and resume finishes it. fleecectl verify agrees each time.
# Once another backup wrote into the export, the chain's next incremental
# in place is refused.
. "$TESTS_DIR/lib.sh"

random_image "$SRC/vm.img" 32M
truncate -s 32M "$OUT/exp.raw"
serve() { nbd_serve q "$T/q.sock" qemu-nbd -f raw -t -e 16 -k "$T/q.sock" --cache=writeback "$OUT/exp.raw"; }
serve
URI="nbd+unix:///?socket=$T/q.sock"
export FLEECE_MOUNT=$MNT
mount_fleece
ctl "bitmap add vm.img b" >/dev/null || fail "bitmap add"
run_ok full "backup vm.img $URI bitmap=b id=full"
same "the full backup" "$SRC/vm.img" "$OUT/exp.raw"

# 1. An incremental under 6 writers equals the image at T2.
cp "$SRC/vm.img" "$T/base"
"$PY" "$TESTS_DIR/pit_writers.py" --mnt "$MNT" --base "$T/base" --target "$URI" --writers 6 \
	--options "sync=incremental bitmap=b" || fail "incremental into the export: point in time broken"
ctl "dismiss pit" >/dev/null
verify_rc 0 "$URI" "ok"
[ -z "$(ls "$SRC"/.fleecefs/nbd/ | grep journal || true)" ] || fail "a journal is left: $(ls "$SRC/.fleecefs/nbd")"
cp "$OUT/exp.raw" "$T/t1"   # the chain's last backup now

# t1_again WHAT: the export holds the last backup again, and verifies.
t1_again() {
	same "$1: the export rolled back" "$T/t1" "$OUT/exp.raw"
	verify_rc 0 "$URI" "ok"
}
dirty_some() { pwrites vm.img 0:300000 5000000:65536 12000000:1000000 31000000:4096; }

# 2. A target write fails: the job fails, the export is T1 again.
dirty_some
inject "target-write offset=12M-13M"
start f1 "backup vm.img $URI sync=incremental bitmap=b id=f1"
want_eq "f1" "$(wait_job f1)" failed
inject "clear"
t1_again "failed incremental"

# 3. Cancelled halfway.
start c1 "backup vm.img $URI sync=incremental bitmap=b speed=1M id=c1"
sleep 0.6
ctl "cancel c1" >/dev/null || fail "cancel c1"
want_eq "c1" "$(wait_job c1)" cancelled
t1_again "cancelled incremental"

# 4. The daemon dies halfway: the next mount rolls the export back.
start k1 "backup vm.img $URI sync=incremental bitmap=b speed=1M id=k1"
sleep 0.6
kill_daemon
cmp -s "$T/t1" "$OUT/exp.raw" && log "note: nothing of k1 had reached the export"
mount_fleece
grep -q "rolled back to its earlier backup" "$T/daemon.log" || fail "the mount did not roll the export back"
t1_again "incremental killed with the daemon"

# 5. The server dies halfway (report): the job fails, the rollback cannot
# run; a new incremental on the chain is refused until the next mount,
# which rolls back once the server is there again.
start s1 "backup vm.img $URI sync=incremental bitmap=b speed=1M id=s1"
sleep 0.6
nbd_kill q
want_eq "s1" "$(wait_job s1 30)" failed
serve
refused EBUSY "waits for the rollback" "backup vm.img $URI sync=incremental bitmap=b id=bad"
unmount_fleece
mount_fleece
t1_again "incremental whose server died"

# 6. stop: the server dies, the job pauses; a new server and resume finish it.
cp "$SRC/vm.img" "$T/at-t2"
start p1 "backup vm.img $URI sync=incremental bitmap=b speed=1M on-target-error=stop id=p1"
pwrites vm.img 7000000:65536
sleep 0.6
nbd_kill q
wait_state p1 paused 30
serve
ctl "resume p1" >/dev/null || fail "resume p1"
ctl "set p1 speed=0" >/dev/null
want_eq "p1" "$(wait_job p1 60)" completed
same "the incremental across a server crash" "$T/at-t2" "$OUT/exp.raw"
verify_rc 0 "$URI" "ok"

# 7. Another backup into the export (here one that fails halfway) leaves it
# holding no backup of chain b: b's next incremental is refused, also after
# a remount, instead of completing on foreign content; a new chain's full
# and incremental into it work.
inject "target-write offset=12M-13M"
start ff "backup vm.img $URI id=ff"
want_eq "ff" "$(wait_job ff)" failed
inject "clear"
refused EINVAL "another backup has written into the export" "backup vm.img $URI sync=incremental bitmap=b id=bad"
ctl "bitmap add vm.img b2" >/dev/null || fail "bitmap add b2"
run_ok full2 "backup vm.img $URI bitmap=b2 id=full2"
pwrites vm.img 3000000:70000
run_ok inc2 "backup vm.img $URI sync=incremental bitmap=b2 id=inc2"
same "the new chain's incremental" "$SRC/vm.img" "$OUT/exp.raw"
unmount_fleece
mount_fleece
refused EINVAL "another backup has written into the export" "backup vm.img $URI sync=incremental bitmap=b id=bad"

unmount_fleece
want_eq "daemon exit" "$DAEMON_RC" 0
end_test
