#!/usr/bin/env bash
# Backups into NBD exports (SPEC 6, issue 14) on real servers of this
# machine: qemu-nbd serving a raw file (unix socket) and a qcow2 file (TCP),
# nbdkit's memory plugin (TCP, multi-conn) and file plugin (unix socket).
# Each full, top or incremental backup runs under concurrent unaligned guest
# writers and the export, read back with nbdcopy or qemu-img, equals the
# image at T.
# Then TLS with a PSK, and every bad input refused with nothing started.
. "$TESTS_DIR/lib.sh"

random_image "$SRC/vm.img" 24M
mount_fleece

# pit LABEL URI OPTIONS [IMAGE]: a backup into URI under 6 writers equals T.
pit() {
	cp "$SRC/${4:-vm.img}" "$T/base"
	log "$1"
	"$PY" "$TESTS_DIR/pit_writers.py" --mnt "$MNT" --base "$T/base" --target "$2" --writers 6 \
		--image "${4:-vm.img}" --options "$3" || fail "$1: point in time broken"
	ctl "dismiss pit" >/dev/null || fail "dismiss pit"
}

# 1. qemu-nbd, a raw file, over a unix socket; sync=full.
truncate -s 24M "$OUT/q.raw"
nbd_serve q "$T/q.sock" qemu-nbd -f raw -t -e 16 -k "$T/q.sock" --cache=writeback "$OUT/q.raw"
pit "qemu-nbd raw file, unix socket, sync=full" "nbd+unix:///?socket=$T/q.sock" "speed=8M"
# Its manifest is in the state directory (an export has no directory).
ls "$SRC"/.fleecefs/nbd/*.xxh3 >/dev/null 2>&1 || fail "no manifest of the NBD backup in STATE_DIR/nbd"
# fleecectl verify reads the export through libnbd against that manifest
# (the mount says where it is); a changed byte on the server is found.
export FLEECE_MOUNT=$MNT
Q="nbd+unix:///?socket=$T/q.sock"
verify_rc 0 "$Q" "ok"
# A byte that surely differs (a fixed one equals the random data 1 in 256).
"$PY" -c "import os,sys; fd=os.open(sys.argv[1],os.O_RDWR); b=os.pread(fd,1,5000000); os.pwrite(fd,bytes([b[0]^0xff]),5000000)" "$OUT/q.raw"
verify_rc 1 "$Q" "offset 49[0-9]{5}"
# fleecectl takes URIs where it takes targets.
out=$("$FLEECECTL" backup --wait vm.img "$Q" id=ctl 2>&1) || fail "fleecectl backup --wait into $Q: $out: $(status ctl state) $(status ctl error)"
want_eq "ctl" "$(status ctl state)" completed
verify_rc 0 "$Q" "ok"

# 2. qemu-nbd, a qcow2 file, over TCP: the export is the qcow2's disk; the
# file stays a clean qcow2 (qemu-img check) holding T.
qemu-img create -q -f qcow2 "$OUT/q.qcow2" 32M
port=$(free_port)
nbd_serve qq "tcp:$port" qemu-nbd -f qcow2 -t -e 16 -b 127.0.0.1 -p "$port" "$OUT/q.qcow2"
ctl "bitmap add vm.img qb" >/dev/null || fail "bitmap add qb"
cp "$SRC/vm.img" "$T/at-t"
start qc "backup vm.img nbd://127.0.0.1:$port bitmap=qb id=qc"
pwrites vm.img 0:70000 5000000:300000 20000000:65536
want_eq "qc" "$(wait_job qc)" completed
want_eq "qc target_connection" "$(status qc target_connection)" closed
nbdcopy -- "nbd://127.0.0.1:$port" "$T/qc.raw" || fail "nbdcopy from the qcow2 export"
truncate -s 24M "$T/qc.raw"
same "qcow2 export" "$T/at-t" "$T/qc.raw"
# The chain's incremental updates the qcow2 behind the export in place.
pit "qemu-nbd qcow2 file, TCP, sync=incremental" "nbd://127.0.0.1:$port" "sync=incremental bitmap=qb"
nbd_kill qq
qemu-img check -q -f qcow2 "$OUT/q.qcow2" || fail "the qcow2 behind qemu-nbd is not clean"

# 3. nbdkit memory over TCP (multi-conn: several connections); sync=top of a
# sparse image: holes come out as zeroes on an export that held data.
port=$(free_port)
nbd_serve mem "tcp:$port" nbdkit -f -i 127.0.0.1 -p "$port" memory 32M
head -c 32M /dev/urandom | nbdcopy -- - "nbd://127.0.0.1:$port"
truncate -s 24M "$SRC/sparse.img"
"$PY" - "$SRC/sparse.img" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
for off in (0, 3 << 20, 9 << 20, 17 << 20):
    os.pwrite(fd, os.urandom(1 << 20), off)
PY
pit "nbdkit memory, TCP, sync=top of a sparse image" "nbd://127.0.0.1:$port" "sync=top" sparse.img
# A chain on it: full, then an incremental in place over several connections.
ctl "bitmap add sparse.img mb" >/dev/null || fail "bitmap add mb"
run_ok mf "backup sparse.img nbd://127.0.0.1:$port bitmap=mb id=mf"
pit "nbdkit memory, TCP, sync=incremental" "nbd://127.0.0.1:$port" "sync=incremental bitmap=mb" sparse.img

# ... and into an export that reads as zeroes (a new sparse file behind
# nbdkit, whose block status says so), where zero clusters need no write:
# nbdkit's stats filter counts no zero request.
truncate -s 24M "$OUT/z.raw" "$SRC/zero.img"
head -c 2M /dev/urandom | dd of="$SRC/zero.img" bs=1M seek=10 conv=notrunc status=none
nbd_serve z "$T/z.sock" nbdkit -f -U "$T/z.sock" --filter=stats file "$OUT/z.raw" statsfile="$T/z.stats"
run_ok zf "backup zero.img nbd+unix:///?socket=$T/z.sock id=zf"
same "a sparse image into a fresh export" "$SRC/zero.img" "$OUT/z.raw"
kill -TERM "$NBD_PID_z"
wait "$NBD_PID_z" || true
grep -q "^write:" "$T/z.stats" || fail "no stats from nbdkit: $(cat "$T/z.stats")"
! grep -E "^zero: [1-9]" "$T/z.stats" || fail "zeroes were written into an export that read as zeroes"

# 4. nbdkit file plugin over a unix socket, with a job status that names the
# connection while it runs.
truncate -s 24M "$OUT/k.raw"
nbd_serve file "$T/k.sock" nbdkit -f -U "$T/k.sock" file "$OUT/k.raw"
cp "$SRC/vm.img" "$T/at-t"
start kf "backup vm.img nbd+unix:///?socket=$T/k.sock speed=4M id=kf"
sleep 0.3
want_eq "kf connection while running" "$(status kf target_connection)" connected
want_eq "kf target" "$(status kf target)" "nbd+unix:///?socket=$T/k.sock"
pwrites vm.img 100:1000000 12000000:4096
ctl "set kf speed=0" >/dev/null
want_eq "kf" "$(wait_job kf)" completed
same "nbdkit file export" "$T/at-t" "$OUT/k.raw"

# 5. TLS with a pre-shared key: nbdkit requires TLS; the right key works,
# a wrong one fails the command and starts nothing.
printf 'fleece:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$T/keys.psk"
printf 'fleece:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$T/wrong.psk"
chmod 600 "$T"/*.psk
truncate -s 24M "$OUT/tls.raw"
nbd_serve tls "$T/tls.sock" nbdkit -f -U "$T/tls.sock" --tls=require --tls-psk="$T/keys.psk" file "$OUT/tls.raw"
cp "$SRC/vm.img" "$T/at-t"
run_ok tl "backup vm.img nbds+unix://fleece@/?socket=$T/tls.sock tls-psk=$T/keys.psk id=tl"
same "TLS export" "$T/at-t" "$OUT/tls.raw"
refused EIO "tls.sock: cannot connect: .*(TLS|gnutls)" \
	"backup vm.img nbds+unix://fleece@/?socket=$T/tls.sock tls-psk=$T/wrong.psk id=bad"
refused EINVAL "TLS|nbds" "backup vm.img nbd+unix:///?socket=$T/tls.sock tls-psk=$T/keys.psk id=bad"
refused ENOENT "tls-psk=.*missing.psk" "backup vm.img nbds+unix://fleece@/?socket=$T/tls.sock tls-psk=$T/missing.psk id=bad"
refused ENOENT "tls-certs=.*nocerts" "backup vm.img nbds+unix://fleece@/?socket=$T/tls.sock tls-certs=$T/nocerts id=bad"

# 6. Bad input: nothing starts, one line says what.
refused EINVAL "URI|nbd" "backup vm.img nbd://[bad id=bad"
port=$(free_port)
refused ECONNREFUSED "127.0.0.1:$port.*connect" "backup vm.img nbd://127.0.0.1:$port id=bad"
refused ENOENT "cannot connect" "backup vm.img nbd+unix:///?socket=$T/nobody.sock id=bad"
truncate -s 24M "$OUT/ro.raw"
nbd_serve ro "$T/ro.sock" qemu-nbd -f raw -t -r -k "$T/ro.sock" "$OUT/ro.raw"
refused EROFS "read-only" "backup vm.img nbd+unix:///?socket=$T/ro.sock id=bad"
truncate -s 8M "$OUT/small.raw"
nbd_serve small "$T/small.sock" qemu-nbd -f raw -t -k "$T/small.sock" "$OUT/small.raw"
refused ENOSPC "8388608 bytes, the image 25165824" "backup vm.img nbd+unix:///?socket=$T/small.sock id=bad"
refused EINVAL "raw disk" "backup vm.img nbd+unix:///?socket=$T/small.sock format=qcow2 id=bad"
"$PY" - "$MNT/.fleece/ctl" <<'PY' || fail "bitmap add"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR); os.write(fd, b"bitmap add vm.img nb\n")
PY
refused EINVAL "bitmap nb has no full backup yet" \
	"backup vm.img nbd+unix:///?socket=$T/k.sock sync=incremental bitmap=nb id=bad"
refused EINVAL "absolute path" "mirror vm.img nbd+unix:///?socket=$T/k.sock id=bad"
[ -z "$(ls -A "$MNT/.fleece/jobs" | grep -v -e '^job-' -e '^qc$' -e '^kf$' -e '^tl$' -e '^ctl$' -e '^zf$' -e '^mf$' || true)" ] ||
	fail "a refused command left a job: $(ls "$MNT/.fleece/jobs")"

unmount_fleece
want_eq "daemon exit" "$DAEMON_RC" 0
end_test
