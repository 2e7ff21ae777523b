#!/usr/bin/env bash
# bench/transport.sh: the two ways guest requests reach the daemon, with no
# job, beside the plain file, interleaved (plain, uring=off, uring=on, plain,
# ...) so that the host's drift falls on all three alike. Per round and case
# (4 KiB random write and read, O_DIRECT, QD 16; QD 1 too with QD1=1):
# IOPS of each, the mount's fraction of the plain run just before it, and
# the daemon's CPU time (user + system, all its threads) per 10k requests.
# Prints the medians as markdown. Needs the fuse module's enable_uring (it
# says so otherwise). Run as root on an otherwise idle machine:
#     bench/transport.sh                 # 1 GiB image, 5 s runs, 5 rounds
#     ROUNDS=3 RUNTIME=4 bench/transport.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export WORK=${WORK:-/tmp/fleecefs-bench-transport} SIZE=${SIZE:-1G} RUNTIME=${RUNTIME:-5}
export FLEECEFS=${FLEECEFS:-$here/../build-check/fleecefs}
ROUNDS=${ROUNDS:-5}
param=/sys/module/fuse/parameters/enable_uring
grep -q '^[Y1]' "$param" 2>/dev/null || { echo "transport: turn on $param first (echo Y > $param)" >&2; exit 1; }
. "$here/lib.sh"
plain=$WORK/plain.raw
[ -f "$plain" ] && [ "$(stat -c %s "$plain")" = "$(stat -c %s "$img")" ] || cp "$img" "$plain"
# Nothing of the images' making left to write back during the runs.
sync

# fio_iops FILE RW QD: IOPS of RUNTIME s of 4 KiB RW at queue depth QD.
fio_iops() {
	fio --name=t --filename="$1" --rw="$2" --bs=4k --iodepth="$3" --ioengine=libaio --direct=1 \
	    --runtime="$RUNTIME" --time_based --randrepeat=0 --norandommap --output-format=json 2>/dev/null |
		jq -r ".jobs[0].$([ "$2" = randwrite ] && echo write || echo read).iops | floor"
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# mounted MODE RW QD: "IOPS CPU_MS_PER_10K" through a fresh mount with uring=MODE.
mounted() {
	mount_fs -o "uring=$1"
	local t0 t1 iops hz
	hz=$(getconf CLK_TCK)
	t0=$(cpu_ticks "$pid")
	iops=$(fio_iops "$WORK/mnt/disk.raw" "$2" "$3")
	t1=$(cpu_ticks "$pid")
	umount_fs
	awk -v i="$iops" -v d=$((t1 - t0)) -v hz="$hz" -v rt="$RUNTIME" \
		'BEGIN { printf "%.0f %.0f\n", i, d * 1000 / hz / (i * rt / 10000) }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

cases="randwrite:16 randread:16"
[ "${QD1:-0}" = 1 ] && cases+=" randwrite:1 randread:1"
declare -A col
for round in $(seq "$ROUNDS"); do
	for c in $cases; do
		rw=${c%:*} qd=${c#*:}
		p=$(fio_iops "$plain" "$rw" "$qd")
		read -r off off_cpu < <(mounted off "$rw" "$qd")
		read -r on on_cpu < <(mounted on "$rw" "$qd")
		echo "round $round $rw QD$qd: plain $p, uring=off $off (cpu $off_cpu ms/10k), uring=on $on (cpu $on_cpu ms/10k)" >&2
		col[$c.plain]+="$p "
		col[$c.off]+="$(awk -v a="$off" -v b="$p" 'BEGIN { printf "%.3f", a / b }') "
		col[$c.on]+="$(awk -v a="$on" -v b="$p" 'BEGIN { printf "%.3f", a / b }') "
		col[$c.offcpu]+="$off_cpu " col[$c.oncpu]+="$on_cpu "
		col[$c.offiops]+="$off " col[$c.oniops]+="$on "
	done
done
m() { tr ' ' '\n' <<<"${col[$1]}" | grep . | median; }
printf '\n### FUSE transport, no job (%s rounds interleaved, %s s each, %s image; medians)\n\n' "$ROUNDS" "$RUNTIME" "$SIZE"
printf '| 4 KiB O_DIRECT | plain IOPS | uring=off IOPS | of plain | CPU ms / 10k req | uring=on IOPS | of plain | CPU ms / 10k req |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for c in $cases; do
	printf '| %s QD%s | %s | %s | %s | %s | %s | %s | %s |\n' "${c%:*}" "${c#*:}" "$(m "$c.plain")" \
		"$(m "$c.offiops")" "$(m "$c.off")" "$(m "$c.offcpu")" "$(m "$c.oniops")" "$(m "$c.on")" "$(m "$c.oncpu")"
done
