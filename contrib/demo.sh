#!/usr/bin/env bash
# demo.sh: a live backup of a generated disk image under write load, verified.
#
# Builds fleecefs if needed, generates a 256 MiB random image, mounts it,
# starts seven writer threads (unaligned writes of 1 byte to 1.1 MiB, racing
# each other and the backup) and, while they write, takes a backup through
# .fleece/ctl. Then it proves the backup equals the image at the instant the
# command returned, byte for byte, and that no acknowledged write was lost.
# Runs as root on Debian 12 (installs what is missing); cleans up after itself.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/contrib/install-deps.sh"
if [ ! -x "$top/build-check/fleecefs" ]; then
	echo "demo: building fleecefs"
	(cd "$top" && { [ -x configure ] || autoreconf -fi >/dev/null; })
	mkdir -p "$top/build-check"
	(cd "$top/build-check" && { [ -f Makefile ] || ../configure -q --enable-werror; } && make -s -j"$(nproc)")
fi
FLEECEFS=$top/build-check/fleecefs

demo=$(mktemp -d /tmp/fleecefs-demo.XXXXXX)
src=$demo/images mnt=$demo/mnt out=$demo/backups
mkdir -p "$src" "$mnt" "$out"
daemon= events=
cleanup() {
	[ -n "$events" ] && kill "$events" 2>/dev/null
	mountpoint -q "$mnt" && fusermount3 -u "$mnt"
	[ -n "$daemon" ] && wait "$daemon" 2>/dev/null
	rm -rf "$demo"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
say "generating a 256 MiB random disk image in $src"
head -c 256M /dev/urandom > "$src/vm.img"
cp "$src/vm.img" "$demo/base"

say "mounting: fleecefs $src $mnt"
"$FLEECEFS" -f "$src" "$mnt" 2>"$demo/daemon.log" &
daemon=$!
for _ in $(seq 100); do [ -e "$mnt/.fleece/version" ] && break; sleep 0.05; done
ls -l "$mnt"
cat "$mnt/.fleece/events" > "$demo/events" &
events=$!

say "7 writers hammer $mnt/vm.img; after 1 s: echo 'backup vm.img $out/vm.raw speed=64M' > $mnt/.fleece/ctl"
python3 "$top/tests/functional/pit_writers.py" --mnt "$mnt" --base "$demo/base" \
	--target "$out/vm.raw" --writers 6 --pace 0.0005 --options "speed=64M"

say "the job's status file (.fleece/jobs/pit/status)"
cat "$mnt/.fleece/jobs/pit/status"
say "events seen on .fleece/events"
cat "$demo/events"
say "the backup's XXH3 manifest against its content"
python3 "$top/tests/functional/manifest_check.py" "$out/vm.raw"
ls -ls "$out"
say "demo passed: the backup is the image at the point in time, while it was being written"
