#!/usr/bin/env bash
# Clean shutdown (SPEC section 1): SIGTERM and fusermount3 -u with a backup
# running and a guest writing. The daemon exits 0, the running job ends
# cancelled with its target removed, the mount is gone, and every write the
# guest saw acknowledged is in the image.
. "$TESTS_DIR/lib.sh"

# writer.py IMAGE LOG: writes numbered records until the mount goes away,
# logging each acknowledged one; then checks the source file has them all.
cat > "$T/writer.py" <<'PY'
import os, random, signal, sys
path, logpath = sys.argv[1], sys.argv[2]
# SIGTERM ends the loop between records, never between a write and its log line.
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
rng = random.Random(7)
acked = open(logpath, "w")
seq = 0
try:
    while not stop:
        off = rng.randrange(0, (8 << 20) - 4096) & ~7  # word-aligned records; most clusters stay for the slow job
        data = seq.to_bytes(8, "little") * 512
        os.pwrite(fd, data, off)
        acked.write(f"{off} {seq}\n"); acked.flush()
        seq += 1
except OSError:
    pass
PY
check_acked() {  # every acknowledged record, latest per offset region, is in the source
	python3 - "$SRC/vm.img" "$T/acked" <<'PY' || fail "an acknowledged write was lost"
import sys
img = open(sys.argv[1], "rb").read()
writes = [tuple(map(int, l.split())) for l in open(sys.argv[2])]
# Replay in order onto a byte map of who wrote last, then compare.
owner = {}
for off, seq in writes:
    for blk in range(off, off + 4096, 8):
        owner[blk] = seq
bad = [o for o, s in owner.items() if int.from_bytes(img[o:o + 8], "little") != s]
assert not bad, f"{len(bad)} words lost, first at {min(bad)}"
print(f"{len(writes)} acknowledged writes all present")
PY
}

for how in sigterm unmount; do
	log "$how with a running backup and a writing guest"
	rm -f "$OUT"/*
	random_image "$SRC/vm.img" 64M
	mount_fleece
	out=$(ctl "backup vm.img $OUT/vm.raw id=b speed=2M") || fail "refused: $out"
	python3 "$T/writer.py" "$MNT/vm.img" "$T/acked" &
	W=$!
	BG_PIDS+=("$W")
	sleep 1
	[ "$(status b state)" = running ] || fail "job not running before shutdown"
	if [ $how = sigterm ]; then
		kill -TERM "$DAEMON_PID"
	else
		# The writer holds the image open; unmount needs it gone (lazy
		# unmount would leave the daemon serving it), so stop it first.
		kill "$W"; wait "$W" 2>/dev/null || true
		fusermount3 -u "$MNT"
	fi
	rc=0; wait "$DAEMON_PID" || rc=$?
	DAEMON_PID=
	wait "$W" 2>/dev/null || true
	BG_PIDS=()
	[ $rc = 0 ] || fail "$how: daemon exit status $rc"
	! mountpoint -q "$MNT" || fail "$how: still mounted"
	[ ! -e "$OUT/vm.raw" ] && [ ! -e "$OUT/vm.raw.xxh3" ] || fail "$how: cancelled job left its target"
	check_acked
done
log "ok"
