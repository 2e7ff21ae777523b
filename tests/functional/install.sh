#!/usr/bin/env bash
# What an admin installs (SPEC section 8): `make install DESTDIR=...` puts
# the programs, man pages, cron script, systemd units, bash completion and
# example configs where Debian expects them; the units name the installed
# paths and `systemd-analyze verify` accepts them; the completion completes
# verbs, job ids and images from a live mount; a mount through mount.fuse3
# (as /etc/fstab makes it) and `mount -t fuse.fleecefs` really mount.
. "$TESTS_DIR/lib.sh"

BUILDDIR=$(cd "$(dirname "$FLEECEFS")" && pwd)
command -v systemd-analyze >/dev/null || fail "systemd-analyze is needed (apt-get install systemd)"
command -v mount.fuse3 >/dev/null || fail "mount.fuse3 is needed (apt-get install fuse3)"

log "make install DESTDIR places every file"
R=$T/root
make -s -C "$BUILDDIR" install DESTDIR="$R" >"$T/install.log" 2>&1 || fail "make install: $(tail -5 "$T/install.log")"
prefix=$(sed -n 's/^prefix = //p' "$BUILDDIR/Makefile")
sysconfdir=$(sed -n 's/^sysconfdir = //p' "$BUILDDIR/Makefile")
sysconfdir=${sysconfdir//\$\{prefix\}/$prefix}
for f in bin/fleecefs bin/fleecectl sbin/fleecefs-backup share/man/man8/fleecefs.8 share/man/man8/fleecectl.8 \
	share/man/man5/fleecefs-control.5 share/bash-completion/completions/fleecectl \
	lib/systemd/system/fleecefs@.service lib/systemd/system/fleecefs-backup.service \
	lib/systemd/system/fleecefs-backup.timer share/doc/fleecefs/fstab.example; do
	[ -f "$R$prefix/$f" ] || fail "make install did not place $prefix/$f: $(cd "$R" && find . -type f | sort)"
done
for f in backup.conf.example fleecefs.conf.example; do
	[ -f "$R$sysconfdir/fleecefs/$f" ] || fail "no $sysconfdir/fleecefs/$f"
done
[ -x "$R$prefix/sbin/fleecefs-backup" ] || fail "the cron script is not executable"
grep -q "^ExecStart=$prefix/bin/fleecefs -f " "$R$prefix/lib/systemd/system/fleecefs@.service" ||
	fail "fleecefs@.service: $(grep ExecStart "$R$prefix/lib/systemd/system/fleecefs@.service")"
grep -q "^ExecStart=$prefix/sbin/fleecefs-backup $sysconfdir/fleecefs/backup.conf$" \
	"$R$prefix/lib/systemd/system/fleecefs-backup.service" || fail "fleecefs-backup.service names the wrong paths"
"$R$prefix/bin/fleecectl" --version | grep -q "^fleecectl " || fail "the installed fleecectl does not run"

log "systemd-analyze verify accepts the units"
U=$T/units
mkdir -p "$U"
# The paths as installed, so that verify finds the programs.
sed "s|$prefix/|$R$prefix/|g; s|$sysconfdir/|$R$sysconfdir/|g" "$R$prefix/lib/systemd/system/fleecefs@.service" > "$U/fleecefs@demo.service"
sed "s|$prefix/|$R$prefix/|g; s|$sysconfdir/|$R$sysconfdir/|g; s|fleecefs@default|fleecefs@demo|g" \
	"$R$prefix/lib/systemd/system/fleecefs-backup.service" > "$U/fleecefs-backup.service"
cp "$R$prefix/lib/systemd/system/fleecefs-backup.timer" "$U/"
out=$(cd "$U" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no "$U/fleecefs@demo.service" \
	"$U/fleecefs-backup.service" "$U/fleecefs-backup.timer" 2>&1 | grep -v "Failed to prepare filename\|libvirt" || true)
[ -z "$out" ] || fail "systemd-analyze verify: $out"

log "the bash completion completes verbs, job ids and images"
mount_fleece
random_image "$SRC/vm.img" 1M
ctl "backup vm.img $OUT/c.raw id=compjob" >/dev/null
wait_job compjob >/dev/null
complete_words() {
	bash -c '
		. "$1"; shift
		COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
		_fleecectl
		printf "%s\n" "${COMPREPLY[@]}"' _ "$R$prefix/share/bash-completion/completions/fleecectl" "$@"
}
want_match "verbs" "$(complete_words fleecectl -m "$MNT" ba)" "^backup$"
want_match "job ids" "$(complete_words fleecectl -m "$MNT" dismiss comp)" "^compjob$"
want_match "images" "$(complete_words fleecectl -m "$MNT" backup v)" "^vm.img$"
unmount_fleece

log "mount.fuse3 (what /etc/fstab runs) and mount -t fuse.fleecefs mount it"
# mount.fuse3 finds the program in PATH, as it would in /usr/bin.
export PATH=$BUILDDIR:$PATH
mount.fuse3 "$SRC" "$MNT" -t fuse.fleecefs -o "state_dir=$T/state,cluster_size=128K,nofail" >"$T/mount.log" 2>&1 ||
	fail "mount.fuse3: $(cat "$T/mount.log")"
DAEMON_PID=$(pgrep -n -f "fleecefs $SRC $MNT" || true)
[ -e "$MNT/.fleece/version" ] || fail "mount.fuse3 did not mount: $(cat "$T/mount.log")"
want_match "its options reached it" "$(cat "$MNT/.fleece/version")" "cluster_size=131072"
[ -d "$T/state" ] || fail "state_dir= was not used"
cmp -s "$SRC/vm.img" "$MNT/vm.img" || fail "the mount does not mirror"
fusermount3 -u "$MNT"
for _ in $(seq 100); do [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.05; done
# mount(8) runs its helpers with a PATH of its own: in a mount namespace of
# this test, the installed fleecefs is bound over /usr/local/bin, as if
# installed there (the host's /usr/local/bin is not touched).
unshare -m --propagation private bash -s "$R$prefix/bin" "$SRC" "$MNT" "$T/state" >"$T/mount.log" 2>&1 <<'NS' ||
set -eu
bin=$1 src=$2 mnt=$3 state=$4
mount --bind "$bin" /usr/local/bin
mount -t fuse.fleecefs "$src" "$mnt" -o "state_dir=$state"
pid=$(pgrep -n -f "fleecefs $src $mnt")
[ -e "$mnt/.fleece/ctl" ] || { echo "mount -t fuse.fleecefs did not mount"; exit 1; }
fusermount3 -u "$mnt"
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.05; done
echo "the daemon did not exit"; exit 1
NS
	fail "mount -t fuse.fleecefs: $(cat "$T/mount.log")"
DAEMON_PID=
log "ok"
