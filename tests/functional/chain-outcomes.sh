#!/usr/bin/env bash
# Incremental chains survive every way a backup can end (issue 9, points 1-3):
# bitmap-mode (on-success, always, never) x sync (full, top, incremental) x
# outcome (success, cancel, target error, source error, daemon killed).
#
# Each cell: an image with a chain (a full backup with bitmap b), writes A,
# then the job under test at T, writes B after T. Afterwards:
#   - success: the target equals the image at T, its manifest matches;
#   - failure or cancel with bitmap-mode=always: the result is kept as
#     TARGET.partial (never under TARGET's name) with a partial manifest that
#     matches it, and the chain record says so;
#   - otherwise nothing of the job stays: a new target is gone, an in-place
#     incremental rolled back to the earlier backup, byte for byte;
#   - never a hidden temporary file left behind;
#   - the bits follow SPEC section 5;
# and in every cell the next incremental with b completes and makes the
# chain's backup equal to the image.
. "$TESTS_DIR/lib.sh"

CS=65536
M=$((1 << 20))
SIZE=$((4 * M))          # 64 clusters
A_CL="3 11 19 27 32 35 43 51 59"   # written before T (the bits at T)
B_CL="1 32 40 63"                  # written after T (32 again: copy-before-write)
NA=9 NB=4 NAB=12
ERR="offset=$((32 * CS))-$((33 * CS))"

at() { local c; for c in "$@"; do printf '%s:4096 ' $((c * CS + 100)); done; }
no_hidden() {
	[ -z "$(hidden_files "$OUT")" ] || fail "$1: hidden files left: $(hidden_files "$OUT")"
}

mount_fleece

# setup NAME: an image NAME.img with a chain for bitmap b, then writes A.
# Sets img, base (the chain's backup) and saves the base as it is now.
setup() {
	img=$1.img base=$OUT/$1-c0.raw
	random_image "$SRC/$img" "$SIZE"
	run_ok "$1-c0" "bitmap add $img b
backup $img $base bitmap=b id=$1-c0"
	pwrites "$img" $(at $A_CL)
	want_eq "$1: bits at T" "$(dirty "$img" b)" $((NA * CS))
	cp "$base" "$T/$1-base"
	cp "$SRC/$img" "$T/$1-at-T"
}

# target_of NAME SYNC: where the job under test writes.
target_of() { if [ "$2" = incremental ]; then echo "$OUT/$1-c0.raw"; else echo "$OUT/$1-t.raw"; fi; }

# after_failure NAME MODE SYNC ID KEPT: what a failed, cancelled or killed job
# leaves (KEPT=yes: a partial backup).
after_failure() {
	local name=$1 mode=$2 sync=$3 id=$4 kept=$5 tgt
	tgt=$(target_of "$name" "$sync")
	if [ "$kept" = yes ]; then
		[ ! -e "$tgt" ] || fail "$id: a partial result is under TARGET's name $tgt"
		[ -f "$tgt.partial" ] || fail "$id: no partial backup $tgt.partial: $(ls "$OUT" | grep "$name")"
		manifest_ok "$tgt.partial" "$id: partial" partial
		[ -z "$id" ] || want_eq "$id: status partial" "$(status "$id" partial)" "$tgt.partial"
		want_eq "$id: chain record" "$(bmkey "$name.img" b last_backup_target) $(bmkey "$name.img" b \
			last_backup_partial)" "$tgt.partial yes"
	else
		[ ! -e "$tgt.partial" ] && [ ! -e "$tgt.partial.xxh3" ] || fail "$id: a partial kept in mode $mode"
		if [ "$sync" = incremental ]; then
			same "$id: the earlier backup after the failed incremental" "$T/$name-base" "$tgt"
			manifest_ok "$tgt" "$id"
		else
			[ ! -e "$tgt" ] && [ ! -e "$tgt.xxh3" ] || fail "$id: the failed job left $tgt"
		fi
		want_eq "$id: chain record" "$(bmkey "$name.img" b last_backup_target)" "$OUT/$name-c0.raw"
	fi
	no_hidden "$id"
}

# next_incremental NAME SYNC OUTCOME KEPT: the chain's next incremental, exact.
next_incremental() {
	local name=$1 sync=$2 outcome=$3 kept=$4 final bits
	if [ "$sync" != incremental ] && { [ "$outcome" = success ] || [ "$kept" = yes ]; }; then
		final=$OUT/$name-t.raw
	else
		final=$OUT/$name-c0.raw
	fi
	bits=$(dirty "$name.img" b)
	run_ok "$name-next" "backup $name.img $final sync=incremental bitmap=b id=$name-next"
	want_eq "$name: the next incremental copies the bits" "$(status "$name-next" bytes_total)" "$bits"
	same "$name: the chain's backup after the next incremental" "$SRC/$name.img" "$final"
	manifest_ok "$final" "$name: after the next incremental"
	[ ! -e "$final.partial" ] && [ ! -e "$final.partial.xxh3" ] || fail "$name: the completed partial is still there"
	want_eq "$name: chain record after the next incremental" \
		"$(bmkey "$name.img" b last_backup_target) $(bmkey "$name.img" b last_backup_partial)" "$final no"
	no_hidden "$name-next"
}

# cell MODE SYNC OUTCOME (not "killed")
cell() {
	local mode=$1 sync=$2 outcome=$3 name="$1-$2-$3" id="$1-$2-$3-j" tgt speed=0 state want kept=no bits
	setup "$name"
	tgt=$(target_of "$name" "$sync")
	case $outcome in
	cancel) speed=256K;;
	target-error) inject "target-write $ERR";;
	source-error) inject "source-read $ERR";;
	esac
	start "$id" "backup $img $tgt sync=$sync bitmap=b bitmap-mode=$mode speed=$speed id=$id"
	if [ "$outcome" = cancel ]; then
		for _ in $(seq 200); do [ "$(status "$id" bytes_done)" -gt 0 ] && break; sleep 0.02; done
		ctl "cancel $id" >/dev/null || fail "cancel $id"
	fi
	pwrites "$img" $(at $B_CL)
	state=$(wait_job "$id" 60)
	inject clear
	case $outcome in success) want=completed;; cancel) want=cancelled;; *) want=failed;; esac
	want_eq "$id: state ($(status "$id" error))" "$state" "$want"
	bits=$(dirty "$img" b)
	if [ "$outcome" = success ]; then
		same "$id: the target is the image at T" "$T/$name-at-T" "$tgt"
		manifest_ok "$tgt" "$id"
		want_eq "$id: status partial" "$(status "$id" partial)" ""
		no_hidden "$id"
		if [ "$mode" = never ]; then
			want_eq "$id: bits (never: bits at T + writes since)" "$bits" $((NAB * CS))
		else
			want_eq "$id: bits (writes since T)" "$bits" $((NB * CS))
		fi
	else
		[ "$mode" = always ] && kept=yes
		after_failure "$name" "$mode" "$sync" "$id" "$kept"
		if [ "$kept" = no ]; then
			want_eq "$id: bits (as if it never ran)" "$bits" $((NAB * CS))
		else
			# What was not copied, plus B: at least B, and (for the
			# incremental) at most A + B.
			[ "$bits" -ge $((NB * CS)) ] || fail "$id: bits $bits below the writes since T"
			[ "$sync" != incremental ] || [ "$bits" -le $((NAB * CS)) ] || fail "$id: bits $bits above A + B"
		fi
	fi
	next_incremental "$name" "$sync" "$outcome" "$kept"
}

for mode in on-success always never; do
	for sync in full top incremental; do
		for outcome in success cancel target-error source-error; do
			log "$mode x $sync x $outcome"
			cell "$mode" "$sync" "$outcome"
		done
	done
done

# ---- the daemon killed mid-job: every cell at once, one kill -------------------
log "daemon killed: all modes x syncs at once"
names=()
for mode in on-success always never; do
	for sync in full top incremental; do
		name=$mode-$sync-killed
		setup "$name"
		names+=("$name")
		start "$name-j" "backup $img $(target_of "$name" "$sync") sync=$sync bitmap=b bitmap-mode=$mode speed=64K id=$name-j"
	done
done
for name in "${names[@]}"; do
	for _ in $(seq 200); do [ "$(status "$name-j" bytes_done)" -gt 0 ] && break; sleep 0.02; done
	pwrites "$name.img" $(at $B_CL)
done
for name in "${names[@]}"; do
	[ "$(status "$name-j" state)" = running ] || fail "$name-j is $(status "$name-j" state) at the kill"
done
kill_daemon
# Before the next mount the hidden files are still there; it removes them.
[ -n "$(hidden_files "$OUT")" ] || fail "no hidden files after the kill (nothing to recover?)"
mount_fleece
for name in "${names[@]}"; do
	mode=${name%%-*}
	sync=${name#*-}
	sync=${sync%-killed}
	[ "$mode" = on ] && { mode=on-success; sync=${name#on-success-}; sync=${sync%-killed}; }
	after_failure "$name" "$mode" "$sync" "" no
	bits=$(dirty "$name.img" b)
	[ "$bits" -ge $((NAB * CS)) ] || fail "$name: bits $bits after the crash miss writes (< A + B)"
	next_incremental "$name" "$sync" killed no
done
grep -q "removed .*unfinished target" "$T/daemon.log" || fail "the recovery did not say what it removed"
grep -q "rolled back to its earlier backup" "$T/daemon.log" || fail "the recovery did not say what it rolled back"

unmount_fleece
want_eq "daemon exit status" "$DAEMON_RC" 0
end_test
