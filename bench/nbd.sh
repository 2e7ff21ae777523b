#!/usr/bin/env bash
# bench/nbd.sh: backups into NBD exports (issue 14), one run, every figure a
# ratio against a baseline measured in the same run:
#   1. idle full backup of a SIZE random image into qemu-nbd (raw,
#      --cache=writeback), over a unix socket and over TCP on 127.0.0.1,
#      against `nbdcopy --flush SOURCE URI` to the same server (libnbd's own
#      copier reading the source file directly; --flush because a fleecefs
#      backup is complete only after an NBD flush). Each run gets a fresh
#      sparse export and server, and starts after a sync with the source
#      image evicted from the page cache (fleecefs reads it with O_DIRECT,
#      nbdcopy buffered: both from the disk); the two alternate
#      (A B A B ...), REPS times each, medians. fleecefs is
#      timed from the control write to state=completed seen (connect,
#      checks and the final flush included, as nbdcopy's wall time is);
#      also the CPU time of the daemon, of nbdcopy and of each qemu-nbd.
#      One warm-up pair first, not counted. Every copy, of either side, is
#      compared with the image (cmp) after it, which also gives each run
#      the same start (see check_export).
#   2. the same backup into a local raw file (fdatasync'd), for comparison.
#   3. guest 4 KiB random writes (fio, libaio, O_DIRECT, QD16, RUNTIME s)
#      through the mount while a backup goes to a slow server (nbdkit's
#      delay filter, DELAY per write), fleecing=off and fleecing=on, each
#      as a fraction of no job; the script checks that the backup was
#      still running when fio ended, and says so.
#   The daemon's peak RSS (VmHWM, reset through /proc/PID/clear_refs before
#   each backup) in each part.
# Run as root on an idle machine:
#     SIZE=2G bench/nbd.sh
#     SIZE=512M REPS=1 RUNTIME=5 bench/nbd.sh              # a quick look
#     PARTS=slow SLOW_SPEED=64M bench/nbd.sh               # only part 3
# SLOW_SPEED: speed= of the slow-server backups (0 = unlimited); FIO_REPS:
# repetitions of part 3.
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
export WORK=${WORK:-/tmp/fleecefs-bench-nbd} SIZE=${SIZE:-2G} RUNTIME=${RUNTIME:-15}
export FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
REPS=${REPS:-3} FIO_REPS=${FIO_REPS:-2} DELAY=${DELAY:-20ms} SLOW_SPEED=${SLOW_SPEED:-0}
PARTS=${PARTS:-idle local slow}
for t in fio jq qemu-nbd nbdkit nbdcopy nbdinfo python3 /usr/bin/time; do
	command -v $t >/dev/null || { echo "bench: needs $t" >&2; exit 1; }
done
[ -x "$FLEECEFS" ] || { echo "bench: build fleecefs first, or set FLEECEFS=" >&2; exit 1; }
. "$here/lib.sh"
size_bytes=$(stat -c %s "$img")
EXPORT=$WORK/out/export.raw SOCK=$WORK/nbd.sock
rm -f "$WORK/results.txt" "$WORK/server.log"

# One NBD server at a time, started and stopped by its pid.
srv_pid= srv_uri=
srv_stop() {
	[ -n "$srv_pid" ] || return 0
	kill "$srv_pid" 2>/dev/null || true
	wait "$srv_pid" 2>/dev/null || true
	srv_pid=
	rm -f "$SOCK"
}
trap 'srv_stop; cleanup' EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
# srv_start unix|tcp|slow: a fresh sparse EXPORT of SIZE behind a new server.
srv_start() {
	srv_stop
	rm -f "$EXPORT" "$SOCK"
	truncate -s "$size_bytes" "$EXPORT"
	local cmd
	case $1 in
	unix) srv_uri="nbd+unix:///?socket=$SOCK"
	      cmd=(qemu-nbd -f raw -t -e 16 -k "$SOCK" --cache=writeback "$EXPORT") ;;
	tcp)  local port; port=$(free_port); srv_uri="nbd://127.0.0.1:$port/"
	      cmd=(qemu-nbd -f raw -t -e 16 -b 127.0.0.1 -p "$port" --cache=writeback "$EXPORT") ;;
	slow) srv_uri="nbd+unix:///?socket=$SOCK"
	      cmd=(nbdkit -f -U "$SOCK" --filter=delay file "$EXPORT" wdelay="$DELAY") ;;
	esac
	"${cmd[@]}" >>"$WORK/server.log" 2>&1 </dev/null &
	srv_pid=$!
	for _ in $(seq 200); do
		kill -0 "$srv_pid" 2>/dev/null || { tail -3 "$WORK/server.log" >&2; exit 1; }
		nbdinfo --size "$srv_uri" >/dev/null 2>&1 && return 0
		sleep 0.05
	done
	echo "bench: server $1 did not come up" >&2
	exit 1
}

# start_job ID COMMAND [wait]: the control write, answered "ok id=ID"; with
# wait, waits until the job concluded (it must complete) and prints the
# seconds from just before the write to state=completed seen, and the job's
# own started..finished. In Python so its start-up is not timed.
start_job() {
	python3 - "$WORK/mnt/.fleece" "$1" "$2" "${3-}" <<'PY'
import os, sys, time
fleece, job, cmd, wait = sys.argv[1:]
fd = os.open(fleece + "/ctl", os.O_RDWR)
t0 = time.time()
try:
    os.write(fd, (cmd + "\n").encode())
except OSError as e:
    sys.exit("bench: '%s' refused: %s: %s" % (cmd, e.strerror, os.read(fd, 65536).decode().strip()))
ans = os.read(fd, 65536).decode().strip()
if ans != "ok id=" + job:
    sys.exit("bench: '%s': answer '%s'" % (cmd, ans))
if not wait:
    sys.exit(0)
while True:
    st = dict(l.split("=", 1) for l in open("%s/jobs/%s/status" % (fleece, job)).read().splitlines() if "=" in l)
    if st["state"] in ("completed", "failed", "cancelled"):
        break
    time.sleep(0.005)
t1 = time.time()
if st["state"] != "completed":
    sys.exit("bench: job %s %s: %s" % (job, st["state"], st["error"]))
print("%.3f %.3f" % (t1 - t0, float(st["finished"]) - float(st["started"])))
sys.stderr.write("  %s: wall %.3f s, job's own started..finished %.3f s, connections %s\n"
                 % (job, t1 - t0, float(st["finished"]) - float(st["started"]), st.get("target_connections", "-")))
PY
}
hwm_reset() { echo 5 > "/proc/$pid/clear_refs"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status"; }
# note_hwm idle|local|slow: the largest VmHWM seen per part.
declare -A peak=([idle]=0 [local]=0 [slow]=0)
note_hwm() { local h; h=$(hwm_kib); [ "$h" -le "${peak[$1]}" ] || peak[$1]=$h; echo "  VmHWM $h KiB" >&2; }
# cpu_s PID: user+system CPU seconds the process used so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$1/stat"; }
# fs_backup ID TARGET: an idle full backup; prints "WALL_S JOB_S DAEMON_CPU_S".
fs_backup() {
	local c0 r
	c0=$(cpu_s "$pid")
	r=$(start_job "$1" "backup disk.raw $2 id=$1" wait)
	echo "$r $(awk -v a="$c0" -v b="$(cpu_s "$pid")" 'BEGIN { printf "%.2f", b - a }')"
	ctl "dismiss $1"
}
# nbdcopy_run: prints "WALL_S CPU_S".
nbdcopy_run() {
	/usr/bin/time -f "%e %U %S" -o "$WORK/nbdcopy.time" nbdcopy --flush -- "$img" "$srv_uri"
	awk '{ printf "%.3f %.2f\n", $1, $2 + $3 }' "$WORK/nbdcopy.time"
}
# settle: writeback done, and the source image out of the page cache (only
# it: the programs themselves stay cached, so neither side pays a cold start).
settle() { sync; dd if="$img" iflag=nocache count=0 status=none; }
res() { echo "$*" >> "$WORK/results.txt"; echo "$*" >&2; }
# check_export WHAT [FILE]: the export (or FILE) holds the image. Run after every
# copy, by both sides: besides checking, it gives every run the same start.
# On this VM a copy that came right after such a 4 GiB read (pages just freed
# by the page cache) ran nbdcopy 2x faster with a third of its CPU time than
# one that did not; fleecefs (O_DIRECT source reads) did not change.
check_export() { cmp -s "$img" "${2:-$EXPORT}" || { echo "bench: $1: the copy differs from the image" >&2; exit 1; }; }

mount_fs
rss0=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
echo "fleecefs $("$FLEECEFS" --version 2>/dev/null | head -1), $(nproc) CPUs, SIZE=$SIZE" >&2

# 1. Idle full backups into qemu-nbd, unix socket and TCP, against nbdcopy.
if [[ " $PARTS " == *" idle "* ]]; then
	# A warm-up pair first, not counted (the first backup of a run was up to
	# 2.5x slower than the next ones in trial runs).
	srv_start unix; settle; fs_backup w0 "$srv_uri" >/dev/null; check_export "warm-up fleecefs"
	srv_start unix; settle; nbdcopy_run >/dev/null; check_export "warm-up nbdcopy"
	for kind in unix tcp; do
		for rep in $(seq "$REPS"); do
			srv_start "$kind"; settle; hwm_reset
			s=$(fs_backup "i$kind$rep" "$srv_uri"); note_hwm idle
			res "idle $kind fleecefs $s $(cpu_s "$srv_pid")"
			check_export "$kind fleecefs $rep"
			srv_start "$kind"; settle
			s=$(nbdcopy_run)
			res "idle $kind nbdcopy $s $(cpu_s "$srv_pid")"
			check_export "$kind nbdcopy $rep"
		done
	done
	srv_stop
fi

# 2. The same backup into a local raw file.
if [[ " $PARTS " == *" local "* ]]; then
	rm -f "$EXPORT"
	for rep in $(seq "$REPS"); do
		rm -f "$WORK/out/local.raw" "$WORK/out/local.raw.xxh3"; settle; hwm_reset
		s=$(fs_backup "l$rep" "$WORK/out/local.raw"); note_hwm local
		res "idle local fleecefs $s"
		check_export "local $rep" "$WORK/out/local.raw"
	done
	rm -f "$WORK/out/local.raw" "$WORK/out/local.raw.xxh3"
fi

# 3. Guest writes during a backup to a slow server.
if [[ " $PARTS " == *" slow "* ]]; then
	speed=
	[ "$SLOW_SPEED" = 0 ] || speed=" speed=$SLOW_SPEED"
	for rep in $(seq "$FIO_REPS"); do
		settle
		r=$(fio_run)
		res "fio nojob $r"
		for fl in off on; do
			id=s$fl$rep
			srv_start slow; settle; hwm_reset
			start_job "$id" "backup disk.raw $srv_uri id=$id fleecing=$fl$speed"
			r=$(fio_run)
			state=$(key "$id" state) done_b=$(key "$id" bytes_done) conns=$(key "$id" target_connections)
			ctl "cancel $id" 2>/dev/null || true
			until [[ $(key "$id" state) =~ ^(completed|failed|cancelled)$ ]]; do sleep 0.05; done
			echo "  $id: at fio's end state=$state bytes_done=$done_b of $size_bytes," \
				"connections $conns, cbw_wait_us_p99=$(key "$id" cbw_wait_us_p99), ended $(key "$id" state)" >&2
			note_hwm slow
			ctl "dismiss $id"
			res "fio fleecing=$fl $r $state $done_b"
		done
	done
	srv_stop
fi
umount_fs
echo "peak_rss ${peak[idle]} ${peak[local]} ${peak[slow]} $rss0" >> "$WORK/results.txt"

python3 - "$WORK/results.txt" "$size_bytes" "$DELAY" "$RUNTIME" "$SLOW_SPEED" <<'PY'
import statistics as st, sys
path, size, delay, runtime, speed = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
rows = [l.split() for l in open(path) if l.strip()]
def vals(*prefix):
    return [r[len(prefix):] for r in rows if tuple(r[:len(prefix)]) == prefix]
mb = size / 1e6
print(f"| measure (SIZE={size >> 20} MiB) | value | ratio | goal |")
print("|---|---|---|---|")
fs_unix = None
for kind, label in (("unix", "unix socket"), ("tcp", "TCP 127.0.0.1")):
    fsv = vals("idle", kind, "fleecefs")
    fs = [float(v[0]) for v in fsv]
    nc = [float(v[0]) for v in vals("idle", kind, "nbdcopy")]
    if not fs or not nc:
        continue
    if kind == "unix":
        fs_unix = st.median(fs)
    pairs = [a / b for a, b in zip(nc, fs)]   # fleecefs MB/s / nbdcopy MB/s, per pair
    print(f"| idle full backup into qemu-nbd, {label}: fleecefs / nbdcopy MB/s (median of {len(fs)}) "
          f"| {mb / st.median(fs):.0f} / {mb / st.median(nc):.0f} | {st.median(nc) / st.median(fs):.2f} "
          f"(per pair {', '.join(f'{p:.2f}' for p in pairs)}) | ≥ 0.9 |")
    print(f"| the same, seconds: fleecefs wall (job's own started..finished) / nbdcopy --flush "
          f"| {st.median(fs):.2f} ({st.median(float(v[1]) for v in fsv):.2f}) / {st.median(nc):.2f} | | |")
    fcpu = st.median(float(v[2]) for v in fsv)
    ncpu = st.median(float(v[1]) for v in vals("idle", kind, "nbdcopy"))
    print(f"| the same, CPU s: fleecefs daemon / nbdcopy (qemu-nbd serving each) "
          f"| {fcpu:.2f} / {ncpu:.2f} ({st.median(float(v[3]) for v in fsv):.2f} / "
          f"{st.median(float(v[2]) for v in vals('idle', kind, 'nbdcopy')):.2f}) | {fcpu / ncpu:.1f}× | |")
locv = vals("idle", "local", "fleecefs")
loc = [float(v[0]) for v in locv]
if loc:
    ratio = f"{fs_unix / st.median(loc):.2f} (local MB/s / NBD unix MB/s)" if fs_unix else ""
    print(f"| idle full backup into a local raw file, fleecefs MB/s (median of {len(loc)}; daemon CPU s) "
          f"| {mb / st.median(loc):.0f} ({st.median(float(v[2]) for v in locv):.2f}) | {ratio} | |")
nojob = [float(v[0]) for v in vals("fio", "nojob")]
if nojob:
    base = st.median(nojob)
    p99 = st.median(float(v[1]) for v in vals("fio", "nojob"))
    print(f"| fio 4K randwrite QD16, {runtime} s, no job: IOPS (p99 ms) | {base:.0f} ({p99 / 1000:.1f}) | 1.00 | |")
    for fl, goal in (("off", "low"), ("on", "close to 1")):
        v = vals("fio", "fleecing=" + fl)
        if not v:
            continue
        io = st.median(float(x[0]) for x in v)
        p = st.median(float(x[1]) for x in v)
        states = ", ".join(f"{x[2]} at {int(x[3]) / size:.0%}" for x in v)
        print(f"| the same during a backup to nbdkit, {delay} per write, speed={speed}, fleecing={fl}: IOPS (p99 ms) "
              f"| {io:.0f} ({p / 1000:.1f}) | {io / base:.2f} | {goal} |")
        print(f"| backup at fio's end (fleecing={fl}) | {states} | | running |")
for v in vals("peak_rss"):
    for i, what in enumerate(("idle NBD backups into qemu-nbd", "idle backups into a local raw file",
                              "backups to the slow NBD server under fio")):
        if int(v[i]):
            print(f"| daemon peak RSS (VmHWM), {what} | {int(v[i]) / 1024:.0f} MiB | "
                  f"(RSS after mount {int(v[3]) / 1024:.0f} MiB) | |")
PY
