#!/usr/bin/env bash
# bench/ab.sh A_BINARY B_BINARY: two fleecefs builds on the same image,
# interleaved (A B, B A, A B, ...: drift and order both cancel), for the
# fio cases that decide whether a change made the guest slower:
#   4 KiB random write and read (QD16, O_DIRECT) with no job, during an
#   unlimited full backup, and with a sync=none job (copy-before-write only);
#   1 MiB sequential read with a sync=none job.
# Prints the median IOPS of each side per case and B / A.
#   PAIRS=4 RUNTIME=6 SIZE=1G bench/ab.sh build-old/fleecefs build-new/fleecefs
#   CASES="randread:4k:cbw randwrite:4k:none" ...   only these (RW:BS:JOB)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
A=${1:?usage: ab.sh A_BINARY B_BINARY} B=${2:?usage: ab.sh A_BINARY B_BINARY}
export WORK=${WORK:-/tmp/fleecefs-bench-ab} SIZE=${SIZE:-1G} RUNTIME=${RUNTIME:-6}
PAIRS=${PAIRS:-4}
export FLEECEFS=$A
. "$here/lib.sh"

# one BINARY RW BS JOB: mounts BINARY, starts JOB (none|full|cbw), runs fio,
# prints its IOPS, stops the job and unmounts.
one() {
	local bin=$1 rw=$2 bs=$3 job=$4 iops
	FLEECEFS=$bin mount_fs
	rm -f "$WORK/out/t.raw"
	case $job in
	full) ctl "backup disk.raw $WORK/out/t.raw checksum=none id=j" ;;
	cbw) ctl "backup disk.raw $WORK/out/t.raw sync=none checksum=none id=j" ;;
	esac
	iops=$(fio --name=ab --filename="$WORK/mnt/disk.raw" --rw="$rw" --bs="$bs" --iodepth=16 --ioengine=libaio \
		--direct=1 --runtime="$RUNTIME" --time_based --randrepeat=0 --norandommap --output-format=json 2>/dev/null |
		jq -r ".jobs[0].$([ "${rw#rand}" = write ] || [ "$rw" = write ] && echo write || echo read).iops")
	[ "$job" = none ] || { ctl "cancel j" 2>/dev/null || true; wait_job j >/dev/null; }
	umount_fs
	printf '%.0f\n' "$iops"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf '| case (%s pairs, %s s, %s) | A IOPS | B IOPS | B / A |\n|---|---|---|---|\n' "$PAIRS" "$RUNTIME" "$SIZE"
CASES=${CASES:-randwrite:4k:none randread:4k:none randwrite:4k:full randwrite:4k:cbw randread:4k:cbw read:1m:cbw}
for c in $CASES; do
	IFS=: read -r rw bs job <<<"$c"
	set -- "$rw" "$bs" "$job"
	a=() b=()
	for p in $(seq "$PAIRS"); do
		if [ $((p % 2)) = 1 ]; then
			drop_caches; a+=("$(one "$A" "$1" "$2" "$3")")
			drop_caches; b+=("$(one "$B" "$1" "$2" "$3")")
		else
			drop_caches; b+=("$(one "$B" "$1" "$2" "$3")")
			drop_caches; a+=("$(one "$A" "$1" "$2" "$3")")
		fi
	done
	ma=$(printf '%s\n' "${a[@]}" | median) mb=$(printf '%s\n' "${b[@]}" | median)
	printf '| %s %s, job %s | %s | %s | %.2f |\n' "$1" "$2" "$3" "$ma" "$mb" "$(awk -v a="$ma" -v b="$mb" 'BEGIN { print b / a }')"
done
