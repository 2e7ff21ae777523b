#!/usr/bin/env bash
# bench/mirror.sh: moving a running image with a mirror, fleecefs beside
# qemu-storage-daemon's blockdev-mirror, one run, one image, ratios to the
# plain file and to the layer with no job. qemu-storage-daemon 7.2 refuses
# blockdev-mirror under its writable FUSE export ("permissions 'resize' are
# both required by an unnamed block device ... and unshared by mirror job"),
# so the peer serves the image over NBD (a unix socket) and fio and the probe
# reach it with fio's nbd engine and bench/nbd_probe.py; fleecefs is driven
# through its mount (libaio, O_DIRECT) as a VM would use it.
#   - time to ready of the image, idle and under 4 KiB random writes (QD16)
#   - guest 4 KiB random write IOPS (QD16, O_DIRECT) while the mirror runs,
#     copy-mode=background and write-blocking, as a fraction of no job
#   - from `complete` to the first guest write served by TARGET: a probe
#     writes a counter (4 KiB, O_DIRECT, QD1) in a loop; the old file's last
#     counter is the last write before the switch, the next one is the first
#     on TARGET, and its completion time minus the moment complete was sent
#     is the figure.
# Run as root on an idle machine:  SIZE=2G RUNTIME=10 bench/mirror.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
export WORK=${WORK:-/tmp/fleecefs-bench-mirror} SIZE=${SIZE:-2G} RUNTIME=${RUNTIME:-10}
export FLEECEFS=${FLEECEFS:-$top/build-check/fleecefs}
LEAD=2   # seconds of fio before the mirror starts (qsd stalls fio's set-up)
for t in fio jq qemu-storage-daemon python3; do
	command -v $t >/dev/null || { echo "bench: needs $t" >&2; exit 1; }
done
[ -x "$FLEECEFS" ] || { echo "bench: build fleecefs first, or set FLEECEFS=" >&2; exit 1; }
. "$here/lib.sh"
size_bytes=$(stat -c %s "$img")
QSD_DIR=$WORK/qsd QSD_SOCK=$WORK/qsd/qmp.sock
mkdir -p "$QSD_DIR"
qsd_pid=
cleanup_qsd() {
	[ -n "$qsd_pid" ] || return 0
	python3 "$here/qmp_mirror.py" "$QSD_SOCK" quit >/dev/null 2>&1 || true
	wait "$qsd_pid" 2>/dev/null || true
	qsd_pid=
	return 0
}
trap 'cleanup_qsd; cleanup' EXIT

mount_qsd() {
	rm -f "$QSD_SOCK" "$QSD_DIR/nbd.sock"
	qemu-storage-daemon --blockdev "driver=file,node-name=file0,filename=$img,aio=native,cache.direct=on" \
		--blockdev driver=raw,node-name=fmt0,file=file0 \
		--nbd-server "addr.type=unix,addr.path=$QSD_DIR/nbd.sock" \
		--export nbd,id=exp0,node-name=fmt0,name=fmt0,writable=on \
		--chardev "socket,id=qmp0,path=$QSD_SOCK,server=on,wait=off" --monitor chardev=qmp0 \
		>"$QSD_DIR/qsd.log" 2>&1 </dev/null &
	qsd_pid=$!
	for _ in $(seq 200); do
		[ -S "$QSD_SOCK" ] && [ -S "$QSD_DIR/nbd.sock" ] && return 0
		sleep 0.05
	done
	cat "$QSD_DIR/qsd.log" >&2
	exit 1
}

# The two layers behind one set of verbs: file, start MODE, wait_ready
# (prints seconds since start), complete, cancel. TARGET is $WORK/out/t.img.
fs_file() { [ "$impl" = qsd ] && echo "nbd" || echo "$WORK/mnt/disk.raw"; }
now() { python3 -c 'import time; print("%.6f" % time.monotonic())'; }
m_start() {
	rm -f "$WORK/out/t.img"
	t_start=$(now)
	if [ "$impl" = qsd ]; then
		truncate -s "$size_bytes" "$WORK/out/t.img"
		python3 "$here/qmp_mirror.py" "$QSD_SOCK" start "$WORK/out/t.img" "$1"
	else
		ctl "mirror disk.raw $WORK/out/t.img copy-mode=$1 id=mv"
	fi
}
m_wait_ready() {
	local t
	if [ "$impl" = qsd ]; then
		t=$(python3 "$here/qmp_mirror.py" "$QSD_SOCK" wait-ready)
	else
		until [ "$(key mv state)" = ready ]; do
			[[ $(key mv state) =~ ^(failed|cancelled)$ ]] && { echo "mirror $(key mv state): $(key mv error)" >&2; exit 1; }
			sleep 0.005
		done
		t=$(now)
	fi
	awk -v a="$t_start" -v b="$t" 'BEGIN { printf "%.2f\n", b - a }'
}
m_end() {  # complete|cancel
	if [ "$impl" = qsd ]; then
		python3 "$here/qmp_mirror.py" "$QSD_SOCK" "$1"
	else
		ctl "$1 mv"
		until [[ $(key mv state) =~ ^(completed|failed|cancelled)$ ]]; do sleep 0.005; done
		ctl "dismiss mv"
	fi
}

# fio_window LOG_PREFIX: mean IOPS of the 250 ms samples from LEAD s on.
fio_window() {
	awk -F, -v from=$((LEAD * 1000)) '$1 >= from { s += $2; n++ } END { printf "%.0f\n", n ? s / n * 4 : 0 }' \
		"$1"_iops.1.log
}
fio_bg() {  # FILE|nbd LOG_PREFIX
	local where=(--filename="$1" --ioengine=libaio --direct=1)
	[ "$1" = nbd ] && where=(--ioengine=nbd --uri="nbd+unix:///fmt0?socket=$QSD_DIR/nbd.sock" --size="$size_bytes")
	fio --name=w "${where[@]}" --rw=randwrite --bs=4k --iodepth=16 \
	    --runtime="$RUNTIME" --time_based --randrepeat=0 --norandommap --write_iops_log="$2" \
	    --log_avg_msec=250 --output=/dev/null >/dev/null 2>&1 &
	fio_pid=$!
}

# probe FILE OUT: writes counter n (4 KiB, O_DIRECT) at offset 0, again and
# again, until OUT.stop exists; OUT gets "n completion_time" lines.
probe_start() {
	rm -f "$2" "$2.stop"
	if [ "$1" = nbd ]; then
		python3 "$here/nbd_probe.py" "$QSD_DIR/nbd.sock" fmt0 "$2" &
		probe_pid=$!
		return
	fi
	python3 - "$1" "$2" <<'PY' &
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
times = []
n = 0
while not os.path.exists(sys.argv[2] + ".stop"):
    n += 1
    buf.seek(0)
    buf.write(n.to_bytes(8, "little"))
    os.pwrite(fd, buf, 0)
    times.append("%d %.6f" % (n, time.monotonic()))
open(sys.argv[2], "w").write("\n".join(times) + "\n")
PY
	probe_pid=$!
}
counter_of() { python3 -c 'import sys; print(int.from_bytes(open(sys.argv[1], "rb").read(8), "little"))' "$1"; }

results=()
row() { results+=("$(printf '| %s | %s | %s |' "$1" "$2" "$3")"); }

drop_caches
fio_bg "$img" "$WORK/plain" && wait "$fio_pid"
plain=$(fio_window "$WORK/plain")
for impl in qsd fleecefs; do
	echo "== $impl" >&2
	if [ "$impl" = qsd ]; then mount_qsd; else mount_fs; fi
	file=$(fs_file)
	fio_bg "$file" "$WORK/$impl-nojob" && wait "$fio_pid"
	nojob=$(fio_window "$WORK/$impl-nojob")
	row "$impl$([ "$impl" = qsd ] && echo ' (NBD)'): 4K randwrite QD16, no job (IOPS, / plain $plain)" "$nojob" \
		"$(awk -v a="$nojob" -v b="$plain" 'BEGIN { printf "%.2f", a / b }')"
	drop_caches
	m_start background
	idle=$(m_wait_ready)
	m_end cancel
	row "$impl: time to ready, idle ($SIZE)" "$idle s" ""
	for mode in background write-blocking; do
		fio_bg "$file" "$WORK/$impl-$mode"
		sleep "$LEAD"
		m_start "$mode"
		ready=$(m_wait_ready 2>&1) || ready="not ready"
		wait "$fio_pid" || true
		during=$(fio_window "$WORK/$impl-$mode")
		m_end cancel
		row "$impl: time to ready under 4K randwrite QD16, $mode" "$ready s" ""
		row "$impl: 4K randwrite IOPS during the mirror, $mode (/ no job)" "$during" \
			"$(awk -v a="$during" -v b="$nojob" 'BEGIN { printf "%.2f", a / b }')"
	done
	# complete -> first write served by TARGET, with the probe writing.
	m_start background
	m_wait_ready >/dev/null
	probe_start "$file" "$WORK/probe"
	sleep 1
	t0=$(now)
	m_end complete
	sleep 0.5
	touch "$WORK/probe.stop"
	wait "$probe_pid"
	last_old=$(counter_of "$img")
	first_new=$(awk -v n=$((last_old + 1)) '$1 == n { print $2 }' "$WORK/probe")
	switch_ms=$(awk -v a="$t0" -v b="$first_new" 'BEGIN { printf "%.1f", (b - a) * 1000 }')
	gap_ms=$(awk 'NR > 1 { d = $2 - p; if (d > m) m = d } { p = $2 } END { printf "%.1f", m * 1000 }' "$WORK/probe")
	row "$impl: complete -> first guest write on TARGET (ms; longest probe gap ms)" "$switch_ms" "$gap_ms"
	[ "$(counter_of "$WORK/out/t.img")" -gt "$last_old" ] || echo "$impl: TARGET did not get the writes after the switch" >&2
	# Back to the original file for the next layer (the image is the same file again).
	if [ "$impl" = qsd ]; then cleanup_qsd; else umount_fs; rm -f "$WORK/src/.fleecefs/redirects"; fi
	cp --sparse=never "$WORK/out/t.img" "$img"
	rm -f "$WORK/out/t.img"
done
printf '| measure (SIZE=%s, RUNTIME=%s s) | value | ratio |\n|---|---|---|\n' "$SIZE" "$RUNTIME"
printf '%s\n' "${results[@]}"
