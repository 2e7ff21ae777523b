#!/usr/bin/env bash
# Work that grows with size or with the number of jobs (issue 9, points 9
# and 10):
#   1. sync=top on a 1 TiB sparse image (16.7 million clusters, two 8 MiB
#      data regions): starting it stalls no guest write (the holes are found
#      after the point in time, their checksums are computed once), and
#      bytes_total becomes the data size;
#   2. concluded jobs keep no thread: 40 completed, undismissed jobs leave
#      the daemon with the threads it had before;
#   3. write-behind memory is bounded for the whole daemon: 21 backups of one
#      image into a slow target at once raise the daemon's RSS by at most
#      the budget and the copy workers' buffers, and it returns near idle
#      when they end (measured in /proc/PID/status; not under ASan, whose
#      allocator keeps freed memory on purpose).
. "$TESTS_DIR/lib.sh"

M=$((1 << 20))
proc() { sed -n "s/^$1:[[:space:]]*\([0-9]*\).*/\1/p" "/proc/$DAEMON_PID/status"; }
asan=no
# (Not `| grep -q`: under pipefail ldd's SIGPIPE would hide the match.)
case $(ldd "$FLEECEFS" 2>/dev/null) in *libasan*) asan=yes;; esac

# =============================================================================
log "1. sync=top on a 1 TiB sparse image"
truncate -s 1T "$SRC/big.img"
head -c $((8 * M)) /dev/urandom | dd of="$SRC/big.img" conv=notrunc status=none
head -c $((8 * M)) /dev/urandom | dd of="$SRC/big.img" bs=1M seek=$((512 * 1024)) conv=notrunc status=none
mount_fleece
# A guest writing 4 KiB blocks into the data all the time, logging the
# slowest write of each half second.
"$PY" - "$MNT/big.img" "$T/writer.log" "$T/writer.stop" <<'PY' &
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
log = open(sys.argv[2], "w")
rng = random.Random(1)
worst, mark = 0.0, time.monotonic()
while not os.path.exists(sys.argv[3]):
    t = time.monotonic()
    os.pwrite(fd, os.urandom(4096), rng.randrange(0, 8 * 2**20 - 4096))
    worst = max(worst, time.monotonic() - t)
    if time.monotonic() - mark > 0.5:
        log.write(f"{worst:.3f}\n")
        log.flush()
        worst, mark = 0.0, time.monotonic()
    time.sleep(0.002)
log.write(f"{worst:.3f}\n")
PY
writer=$!
BG_PIDS+=("$writer")
sleep 1
t0=$(date +%s.%N)
start big "backup big.img $OUT/big.raw sync=top speed=1M id=big"
t1=$(date +%s.%N)
for _ in $(seq 200); do [ "$(status big bytes_total)" -lt $((1 << 30)) ] && break; sleep 0.05; done
sleep 2
touch "$T/writer.stop"
wait "$writer" || fail "the guest writer failed"
worst=$(sort -n "$T/writer.log" | tail -1)
took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
log "   starting the backup took $took s; the slowest guest write meanwhile $worst s"
# The defect stalled every guest write for about 65 s here.
soft eval 'awk -v t="$took" "BEGIN { exit !(t < 5) }" || fail "starting sync=top took $took s"'
soft eval 'awk -v w="$worst" "BEGIN { exit !(w < 5) }" || fail "a guest write stalled $worst s while sync=top started"'
# The data (copy-before-write may have copied a few more clusters meanwhile).
total=$(status big bytes_total)
soft eval '[ "$total" -ge $((16 * M)) ] && [ "$total" -le $((17 * M)) ] || fail "bytes_total $total, want the 16 MiB of data"'
ctl "cancel big" >/dev/null || fail "cancel big"
want_eq big "$(wait_job big)" cancelled
soft want_eq "hidden files after the cancel" "$(hidden_files "$OUT")" ""
rm -f "$SRC/big.img"

# =============================================================================
log "2. concluded jobs keep no thread"
random_image "$SRC/small.img" 1M
run_ok warm "backup small.img $OUT/warm.raw id=warm"
threads0=$(proc Threads)
cmds=
for i in $(seq 40); do cmds+="backup small.img $OUT/s$i.raw id=s$i"$'\n'; done
out=$(ctl "$cmds") || fail "40 backups refused: $out"
for i in $(seq 40); do want_eq "s$i" "$(wait_job "s$i")" completed; done
sleep 0.5
threads1=$(proc Threads)
log "   threads: $threads0 before, $threads1 with 40 concluded jobs"
soft eval '[ "$threads1" -le $((threads0 + 2)) ] || fail "40 concluded jobs hold $((threads1 - threads0)) threads"'
for i in $(seq 40); do ctl "dismiss s$i" >/dev/null; done

# =============================================================================
log "3. write-behind memory is bounded for the whole daemon"
random_image "$SRC/mem.img" 64M
sleep 0.5
rss0=$(proc VmRSS)
# Every target write takes 2 s: no job gets far before the cancels.
inject "target-write from=1 delay=2000"
cmds=
for i in $(seq 21); do cmds+="backup mem.img $OUT/m$i.raw id=m$i"$'\n'; done
out=$(ctl "$cmds") || fail "21 backups refused: $out"
peak=0
for _ in $(seq 30); do
	r=$(proc VmRSS)
	[ "$r" -gt "$peak" ] && peak=$r
	sleep 0.1
done
out=
for i in $(seq 21); do out+="cancel m$i"$'\n'; done
ctl "$out" >/dev/null || fail "cancel of the 21 jobs refused"
inject clear
for i in $(seq 21); do want_eq "m$i" "$(wait_job "m$i")" cancelled; done
sleep 0.5
rss1=$(proc VmRSS)
log "   RSS: idle $((rss0 / 1024)) MiB, with 21 jobs on a slow target $((peak / 1024)) MiB, after them $((rss1 / 1024)) MiB"
if [ "$asan" = no ]; then
	# The budget (32 MiB) plus one chunk per copy worker (2 x 1 MiB per job).
	soft eval '[ $((peak - rss0)) -le $((150 * 1024)) ] || fail "21 jobs took $(((peak - rss0) / 1024)) MiB"'
	soft eval '[ $((rss1 - rss0)) -le $((24 * 1024)) ] || fail "$(((rss1 - rss0) / 1024)) MiB stayed after the jobs"'
else
	log "   (ASan build: RSS bounds not judged)"
fi
soft want_eq "hidden files after the cancels" "$(hidden_files "$OUT")" ""

unmount_fleece
want_eq "daemon exit status" "$DAEMON_RC" 0
end_test
