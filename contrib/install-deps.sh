#!/usr/bin/env bash
# install-deps.sh [--tests]: installs, on Debian 12, what building fleecefs
# needs (and with --tests what its test suite needs). Idempotent: installs
# only what is missing, and touches apt only then.
set -euo pipefail
pkgs=(build-essential autoconf automake libtool pkg-config libfuse3-dev fuse3
      libzstd-dev zlib1g-dev libxxhash-dev libnbd-dev liburing-dev libcriterion-dev python3)
[ "${1:-}" = --tests ] && pkgs+=(fio qemu-utils qemu-system-x86 cpio util-linux libnbd-bin nbdkit xfsprogs)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
	echo "install-deps: need root to install: ${missing[*]}" >&2
	exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
