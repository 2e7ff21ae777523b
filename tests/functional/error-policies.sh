#!/usr/bin/env bash
# Error policies, table-driven: every policy (on-source-error, on-target-error
# = report|ignore|stop, on-cbw-error = break-snapshot|break-guest-write,
# cbw-timeout) against every error point (a failing read of the image by the
# background copy, a failing write of the target, a failing copy-before-write,
# a target file system that really runs out of space, a copy-before-write
# slower than cbw-timeout, by its own delay or waiting for a slow background
# copy of the same cluster), plus rows that check that a policy for one point
# does not apply to another, and cancel of a job retrying or paused on errors.
#
# Each row: the image is idle at T (a copy is kept in $T/at-T), the backup
# starts with its background copy parked (speed=1K), the guest writes through
# the mount to clusters not copied yet (copy-before-write), then the fault
# shows. Checked: the job's state and error text, the status and event error,
# the guest writes' results (errno), the image (= everything acknowledged,
# kept in $T/shadow), the job's events, and a target equal to $T/at-T when
# the job completes (gone with its manifest when it fails or is cancelled).
# Debugging: ROWS="name ..." runs only those rows.
. "$TESTS_DIR/lib.sh"

M=$((1 << 20))
C=65536            # the default cluster size
SIZE=$((16 * M))
random_image "$SRC/vm.img" "$SIZE"
cp "$SRC/vm.img" "$T/shadow"

# Target file systems for the ENOSPC rows: 1 MiB each, grown to fix them.
for r in enospc-report enospc-ignore enospc-stop; do
	mkdir "$T/small-$r"
	mount -t tmpfs -o size=1M tmpfs "$T/small-$r"
	EXTRA_MOUNTS+=("$T/small-$r")
done

mount_fleece

# gw OFF LEN: one guest write of random data through the mount; prints
# "OK SECONDS" or "ERRNO SECONDS". A write that succeeded is applied to
# $T/shadow too, which therefore always equals what the image must hold.
cat > "$T/gw.py" <<'EOF'
import errno, os, sys, time
img, shadow, off, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = os.urandom(length)
fd = os.open(img, os.O_RDWR)
t0 = time.monotonic()
try:
    n = os.pwrite(fd, data, off)
    res = "OK" if n == length else f"SHORT-{n}"
except OSError as e:
    res = errno.errorcode.get(e.errno, str(e.errno))
dt = time.monotonic() - t0
os.close(fd)
if res == "OK":
    with open(shadow, "r+b") as f:
        f.seek(off)
        f.write(data)
print(res, f"{dt:.3f}")
EOF
gw() { "$PY" "$T/gw.py" "$MNT/vm.img" "$T/shadow" "$1" "$2"; }
# gw_ok OFF LEN: the write must succeed.
gw_ok() {
	local r
	r=$(gw "$1" "$2")
	[ "${r%% *}" = OK ] || fail "guest write of $2 bytes at $1: $r, want OK"
}

# One reader of .fleece/events for the whole test: every line into $T/events.
events_start "$T/events"

# events_of ID: the job's events, without time, id and type.
events_of() { grep -E "^time=[0-9]+\.[0-9]{9} id=$1 type=backup event=" "$T/events" | cut -d' ' -f4- || true; }
# wait_event ID REGEX [TIMEOUT_S]: until an event line of ID matches.
wait_event() {
	for _ in $(seq $((${3:-15} * 20))); do
		events_of "$1" | grep -qE "$2" && return 0
		sleep 0.05
	done
	fail "no event '$2' for $1 (got: $(events_of "$1" | tr '\n' '|'))"
}
# wait_state ID STATE [TIMEOUT_S]
wait_state() {
	for _ in $(seq $((${3:-15} * 20))); do
		[ "$(status "$1" state)" = "$2" ] && return 0
		sleep 0.05
	done
	fail "$1 did not become $2 (state $(status "$1" state), error '$(status "$1" error)')"
}
# fired SUBSTRING: the fired= count of the inject rule whose line has SUBSTRING.
fired() { inject_rules | grep -F -- "$1" | sed -n 's/.* fired=\([0-9]*\)$/\1/p' | head -1; }
# The lines of one write to inject apply in order: a rule then clear leaves
# nothing; clear then a rule leaves that rule, which fires.
inject "target-write offset=1M-2M
clear"
[ -z "$(inject_rules)" ] || fail "rule then clear in one write kept: $(inject_rules)"
inject "source-read offset=3M-4M
clear
target-write offset=5M-6M"
[ "$(inject_rules | grep -c .)" = 1 ] && inject_rules | grep -q "target-write" ||
	fail "clear then a rule in one write: $(inject_rules)"
inject clear
# has_words TEXT WORDS: every |-separated word of WORDS is in TEXT.
has_words() {
	local text=$1 w ws
	[ "$2" = - ] && return 0
	IFS='|' read -ra ws <<<"$2"
	for w in "${ws[@]}"; do
		case $text in *"$w"*) ;; *) return 1;; esac
	done
}
# same_range A B OFF LEN: A and B hold the same bytes at [OFF, OFF + LEN).
same_range() { cmp -s -n "$4" -i "$3:$3" "$1" "$2"; }

# Where the guest writes, all far from where the parked background copy is.
WS_OFF=$((8 * M + 512)) WS_LEN=4096    # the write that meets a copy-before-write fault
CBW_RULE_RANGE="offset=$((8 * M))-$((8 * M + C))"
WAIT_RULE_RANGE="offset=$((4 * M))-$((4 * M + 1))"   # only the run that holds the cluster the guest writes

# meet_cbw_fault ID OUTCOME POINT OFF CLUSTER: the guest write at OFF (in
# CLUSTER) meets the copy-before-write fault: EIO and the image unchanged,
# or success; as slow as the fault makes it.
meet_cbw_fault() {
	local id=$1 outcome=$2 point=$3 off=$4 cluster=$5 r
	r=$(gw "$off" "$WS_LEN")
	case $outcome in
	eio)
		[ "${r%% *}" = EIO ] || fail "guest write at $off: $r, want EIO"
		same_range "$SRC/vm.img" "$T/at-T" "$cluster" "$C" ||
			fail "the image at $cluster changed although the guest write failed"
		[ "$(status "$id" state)" = running ] && [ -z "$(status "$id" error)" ] ||
			fail "after the failed guest write: state $(status "$id" state), error '$(status "$id" error)'"
		;;
	*)
		[ "${r%% *}" = OK ] || fail "guest write at $off: $r, want OK"
		;;
	esac
	# At least the delay (or the timeout), and for cbw-wait not the whole
	# slow read: the guest gives up at cbw-timeout.
	local min= max=
	case $point in
	timeout) min=3;;
	slow-cbw) min=0.3;;
	cbw-wait) min=1.5 max=3.9;;
	esac
	if [ -n "$min" ]; then
		awk -v t="${r#* }" -v d="$min" 'BEGIN { exit !(t >= d - 0.01) }' ||
			fail "the guest write at $off took ${r#* } s, less than $min s"
	fi
	if [ -n "$max" ]; then
		awk -v t="${r#* }" -v d="$max" 'BEGIN { exit !(t < d) }' ||
			fail "the guest write at $off took ${r#* } s: it waited for the whole slow copy, not cbw-timeout"
	fi
	case $point in
	cbw-wait) ;;
	*) [ "$(fired "$CBW_RULE_RANGE")" = 1 ] || fail "the cbw fault did not fire once: $(inject_rules)";;
	esac
	if [ "$outcome" = eio ] && [ "$point" != cbw-wait ]; then
		# Once the fault is gone the same write succeeds.
		gw_ok "$off" "$WS_LEN"
	fi
	return 0
}

# ---------------------------------------------------------------------------
# row NAME POINT OUTCOME ERROR-WORDS OPTIONS...
#
# POINT, the fault:
#   src-read    source-read injection (from=1) on [4M,5M): the background copy's read
#   tgt-write   target-write injection (from=1) on [4M,5M): the background copy's write
#   enospc      the target lives on a 1 MiB tmpfs
#   cbw-read    source-read injection (once) on the cluster at 8M: read by the
#               guest's copy-before-write, the background copy being parked
#   cbw-write   target-write injection (once) on the cluster at 8M: written
#               by the guest's copy-before-write (under break-guest-write the
#               guest waits for that write; else it is queued and fails later)
#   cbw         cbw injection (once, EIO) at 8M
#   cbw-enospc  cbw injection (once, errno=ENOSPC) at 8M
#   timeout     cbw delay=3000 (once) at 8M; the row sets cbw-timeout=1500
#               (not 300 against 100: under I/O load an ordinary copy of one
#               cluster, read with O_DIRECT, can take longer than 100 ms)
#   slow-cbw    cbw delay=300 (once) at 8M; the row sets cbw-timeout=5000
#   cbw-wait    source-read delay=4000 (once) on [4M,5M): the background copy
#               holds the cluster at 4M for 4 s while the guest writes there;
#               the row sets cbw-timeout=1500 (waiting for another copy counts)
# OUTCOME:
#   failed      the background copy meets the fault, the job fails
#   ignored     the job keeps running and retrying while the fault lasts, and
#               completes, exact, once it is gone
#   paused      the job pauses (error= in status and event), dismiss is
#               refused, guest writes go on, resume after the fault is gone
#               completes it, exact
#   eio         the guest write at 8M (4M for cbw-wait) fails with EIO, the
#               image keeps the data of T there, the job goes on and
#               completes, exact
#   ignored-cancel, paused-cancel
#               the same while the fault lasts, then cancel: the job ends
#               cancelled, its target and manifest removed
#   broken      the guest write at 8M (4M) succeeds, the job fails
#   completed   nothing breaks: the write at 8M is slow but succeeds
# ERROR-WORDS: |-separated words the job's error must contain ("-": none).
row() {
	local name=$1 point=$2 outcome=$3 words=$4
	shift 4
	local opts="$*" id=$name target=$OUT/$name.raw out r
	case $point in enospc) target=$T/small-$name/$name.raw;; esac
	log "row $name: fault $point, options '${opts}': expect $outcome"

	case $point in
	src-read) inject "source-read offset=4M-5M from=1";;
	tgt-write) inject "target-write offset=4M-5M from=1";;
	cbw-read) inject "source-read $CBW_RULE_RANGE once";;
	cbw-write) inject "target-write $CBW_RULE_RANGE once";;
	cbw) inject "cbw $CBW_RULE_RANGE once";;
	cbw-enospc) inject "cbw $CBW_RULE_RANGE once errno=ENOSPC";;
	timeout) inject "cbw $CBW_RULE_RANGE once delay=3000";;
	slow-cbw) inject "cbw $CBW_RULE_RANGE once delay=300";;
	cbw-wait) inject "source-read $WAIT_RULE_RANGE once delay=4000";;
	enospc) ;;
	*) fail "row $name: unknown point $point";;
	esac

	# T: the image is idle; keep what it holds now.
	cp "$SRC/vm.img" "$T/at-T"
	out=$(ctl "backup vm.img $target id=$id speed=1K $opts") || fail "backup refused: $out"
	[ "$out" = "ok id=$id" ] || fail "answer '$out'"
	[ "$(status "$id" state)" = running ] || fail "state $(status "$id" state) right after the start"

	# Guest writes after T to clusters not copied yet (6 clusters).
	gw_ok $((12 * M + 1000)) 5000
	gw_ok $((13 * M - 100)) 200
	gw_ok $((14 * M + C - 10)) 70000
	[ "$(status "$id" cbw_bytes)" = $((6 * C)) ] ||
		fail "cbw_bytes $(status "$id" cbw_bytes) after writes to 6 uncopied clusters, want $((6 * C))"

	# The write that meets a copy-before-write fault: before the background
	# copy runs, or (cbw-wait) while it holds the cluster in a slow read.
	case $outcome in
	eio|broken|completed)
		if [ "$point" = cbw-wait ]; then
			out=$(ctl "set $id speed=0") || fail "set speed refused: $out"
			for _ in $(seq 200); do [ "$(fired "$WAIT_RULE_RANGE")" = 1 ] && break; sleep 0.02; done
			[ "$(fired "$WAIT_RULE_RANGE")" = 1 ] || fail "the background copy did not reach 4M: $(inject_rules)"
			meet_cbw_fault "$id" "$outcome" "$point" $((4 * M + 100)) $((4 * M))
			if [ "$outcome" = eio ]; then
				# The worker whose chunk took 4 s yields 3 x 4 s since the
				# guest wrote meanwhile (backup.c after_chunk), even with
				# nothing left to copy; set wakes it.
				for _ in $(seq 200); do
					[ "$(status "$id" bytes_done)" = "$SIZE" ] && break
					sleep 0.05
				done
				# (It may have completed already: nothing to wake.)
				out=$(ctl "set $id speed=0") || [ "$(status "$id" state)" = completed ] ||
					fail "set speed refused: $out"
			fi
		else
			meet_cbw_fault "$id" "$outcome" "$point" "$WS_OFF" $((8 * M))
		fi
		;;
	esac

	# Let the background copy run.
	if [ "$outcome" != broken ] && [ "$point" != cbw-wait ]; then
		out=$(ctl "set $id speed=0") || fail "set speed refused: $out"
	fi

	case $outcome in
	failed|broken)
		[ "$(wait_job "$id" 30)" = failed ] || fail "job ended $(status "$id" state), want failed"
		;;
	ignored|ignored-cancel)
		# The fault is hit again and again; the job keeps running.
		local hits=0
		for _ in $(seq 300); do
			case $point in
			enospc) hits=$(grep -c "backup $id: .*on-target-error=ignore" "$T/daemon.log" || true);;
			*) hits=$(fired "offset=4194304-5242880");;
			esac
			[ "${hits:-0}" -ge 3 ] && break
			sleep 0.05
		done
		[ "${hits:-0}" -ge 3 ] || fail "the fault was not retried (hits $hits): $(inject_rules)"
		[ "$(status "$id" state)" = running ] || fail "state $(status "$id" state) while ignoring errors"
		[ -z "$(status "$id" error)" ] || fail "error '$(status "$id" error)' while ignoring errors"
		;;
	paused|paused-cancel)
		wait_state "$id" paused
		local err
		err=$(status "$id" error)
		has_words "$err" "$words" || fail "paused with error '$err', want the words '$words'"
		wait_event "$id" '^event=paused'
		[ "$(events_of "$id" | sed -n 's/^event=paused error=//p')" = "$err" ] ||
			fail "paused event '$(events_of "$id" | grep paused)', status error '$err'"
		out=$(ctl_expect EBUSY "dismiss $id") || exit 1
		case $out in *paused*) ;; *) fail "dismiss of a paused job: '$out' does not name the state";; esac
		# Copy-before-write goes on while paused.
		local cbw0
		cbw0=$(status "$id" cbw_bytes)
		gw_ok $((15 * M + 100)) 20000
		if [ "$point" = src-read ]; then
			# The background copy stopped near 4M: these clusters were pending.
			[ "$(status "$id" cbw_bytes)" -gt "$cbw0" ] ||
				fail "cbw_bytes did not grow on a write while paused ($cbw0)"
		fi
		sleep 0.3
		[ "$(status "$id" state)" = paused ] || fail "the job left the pause by itself: $(status "$id" state)"
		;;
	esac

	# The fault goes away.
	case $outcome in
	ignored|paused)
		case $point in
		enospc) mount -o remount,size=64M "$T/small-$name" || fail "cannot grow the tmpfs";;
		*) inject clear;;
		esac
		;;
	esac
	case $outcome in
	paused) out=$(ctl "resume $id") || fail "resume refused: $out";;
	*-cancel) out=$(ctl "cancel $id") || fail "cancel refused: $out";;
	esac

	case $outcome in
	ignored|paused|eio|completed)
		[ "$(wait_job "$id" 30)" = completed ] ||
			fail "job ended $(status "$id" state) ($(status "$id" error)), want completed"
		[ -z "$(status "$id" error)" ] || fail "completed with error '$(status "$id" error)'"
		[ "$(status "$id" bytes_done)" = "$SIZE" ] || fail "bytes_done $(status "$id" bytes_done)"
		cmp "$target" "$T/at-T" || fail "the target is not the image at T"
		"$PY" "$TESTS_DIR/manifest_check.py" "$target" || fail "manifest"
		;;
	failed|broken)
		local err
		err=$(status "$id" error)
		has_words "$err" "$words" || fail "failed with error '$err', want the words '$words'"
		[ ! -e "$target" ] && [ ! -e "$target.xxh3" ] || fail "the failed job left its target or manifest"
		# Progress counts only what reached the target (a 1 MiB file
		# system holds at most 1 MiB of it), never what was only queued.
		case $point in src-read|tgt-write|enospc)
			[ "$(status "$id" bytes_done)" -lt "$SIZE" ] || fail "a failed job shows bytes_done = $SIZE";;
		esac
		[ "$point" != enospc ] || [ "$(status "$id" bytes_done)" -le "$M" ] ||
			fail "bytes_done $(status "$id" bytes_done) on a 1 MiB target file system"
		;;
	*-cancel)
		[ "$(wait_job "$id" 30)" = cancelled ] || fail "job ended $(status "$id" state), want cancelled"
		[ ! -e "$target" ] && [ ! -e "$target.xxh3" ] || fail "the cancelled job left its target or manifest"
		;;
	esac
	case $point in
	src-read|tgt-write)
		if [ "$outcome" = failed ] || [ "$outcome" = paused ] || [ "$outcome" = paused-cancel ]; then
			# The error names the offset of the run that failed: [3M, 5M).
			local at
			at=$(events_of "$id" | sed -n 's/.* at offset \([0-9]*\):.*/\1/p' | head -1)
			[ -n "$at" ] && [ $((at % C)) = 0 ] && [ "$at" -ge $((3 * M)) ] && [ "$at" -lt $((5 * M)) ] ||
				fail "the error names offset '$at', not the failed run near 4M"
		fi
		;;
	esac
	cmp "$SRC/vm.img" "$T/shadow" || fail "the image is not what the guest wrote"

	# The events, in order.
	wait_event "$id" '^event=(completed|failed|cancelled)'
	local seq want
	seq=$(events_of "$id" | sed 's/ error=.*//' | tr '\n' ' ')
	case $outcome in
	failed|broken) want="event=started event=failed ";;
	paused) want="event=started event=paused event=resumed event=completed ";;
	paused-cancel) want="event=started event=paused event=cancelled ";;
	ignored-cancel) want="event=started event=cancelled ";;
	*) want="event=started event=completed ";;
	esac
	[ "$seq" = "$want" ] || fail "events '$seq', want '$want' (all: $(events_of "$id" | tr '\n' '|'))"
	if [ "$outcome" = failed ] || [ "$outcome" = broken ]; then
		[ "$(events_of "$id" | sed -n 's/^event=failed error=//p')" = "$(status "$id" error)" ] ||
			fail "failed event '$(events_of "$id" | grep failed)', status error '$(status "$id" error)'"
	fi
	events_of "$id" | grep -E '^event=(started|resumed|completed|cancelled)' | grep -q error= &&
		fail "error= on an event other than paused or failed: $(events_of "$id" | tr '\n' '|')"
	out=$(ctl "dismiss $id") || fail "dismiss after the end refused: $out"
	return 0
}

# Between rows: no rule, no job left, the shadow in step with the image.
reset_row() {
	local j s
	inject clear
	for j in $(ls "$MNT/.fleece/jobs"); do
		s=$(status "$j" state)
		case $s in running|paused) ctl "cancel $j" >/dev/null || true; wait_job "$j" 30 >/dev/null;; esac
		ctl "dismiss $j" >/dev/null || true
	done
	cp "$SRC/vm.img" "$T/shadow"
}

# NAME            POINT       OUTCOME        ; OPTIONS                                                  ; ERROR WORDS
TABLE=$(cat <<'EOF'
src-report        src-read    failed         ; on-source-error=report                                   ; reading the image at offset|Input/output error
src-ignore        src-read    ignored        ; on-source-error=ignore                                   ; -
src-stop          src-read    paused         ; on-source-error=stop                                     ; reading the image at offset|Input/output error|on-source-error=stop
src-not-target    src-read    failed         ; on-target-error=stop on-cbw-error=break-guest-write      ; reading the image at offset
tgt-report        tgt-write   failed         ; on-target-error=report                                   ; writing the target at offset|Input/output error
tgt-ignore        tgt-write   ignored        ; on-target-error=ignore                                   ; -
tgt-stop          tgt-write   paused         ; on-target-error=stop                                     ; writing the target at offset|Input/output error|on-target-error=stop
tgt-ignore-cancel tgt-write   ignored-cancel ; on-target-error=ignore                                   ; -
tgt-stop-cancel   tgt-write   paused-cancel  ; on-target-error=stop                                     ; writing the target at offset|on-target-error=stop
tgt-not-source    tgt-write   failed         ; on-source-error=stop on-cbw-error=break-guest-write      ; writing the target at offset
enospc-report     enospc      failed         ; on-target-error=report                                   ; writing the target at offset|No space left on device
enospc-ignore     enospc      ignored        ; on-target-error=ignore                                   ; -
enospc-stop       enospc      paused         ; on-target-error=stop                                     ; writing the target at offset|No space left on device|on-target-error=stop
cbwread-snapshot  cbw-read    broken         ; on-cbw-error=break-snapshot                              ; copy-before-write|8388608|Input/output error
cbwread-guest     cbw-read    eio            ; on-cbw-error=break-guest-write                           ; -
cbwread-default   cbw-read    broken         ; on-source-error=stop on-target-error=stop                ; copy-before-write|Input/output error
cbwread-ign-guest cbw-read    eio            ; on-source-error=ignore on-cbw-error=break-guest-write    ; -
cbwwrite-guest    cbw-write   eio            ; on-cbw-error=break-guest-write                           ; -
cbwwrite-snapshot cbw-write   broken         ; -                                                        ; writing the target at offset 8388608|Input/output error
cbw-snapshot      cbw         broken         ; -                                                        ; copy-before-write|8389120|Input/output error
cbw-guest         cbw         eio            ; on-cbw-error=break-guest-write                           ; -
cbw-enospc-guest  cbw-enospc  eio            ; on-cbw-error=break-guest-write on-target-error=ignore    ; -
timeout-snapshot  timeout     broken         ; cbw-timeout=1500                                         ; copy-before-write|8389120|cbw-timeout=1500
timeout-guest     timeout     eio            ; cbw-timeout=1500 on-cbw-error=break-guest-write          ; -
wait-snapshot     cbw-wait    broken         ; cbw-timeout=1500                                         ; copy-before-write|4194404|cbw-timeout=1500
wait-guest        cbw-wait    eio            ; cbw-timeout=1500 on-cbw-error=break-guest-write          ; -
timeout-not-hit   slow-cbw    completed      ; cbw-timeout=5000 on-cbw-error=break-guest-write          ; -
EOF
)

# Rows may be picked with ROWS="name ..." (for debugging).
start=$(date +%s) nrows=0
while IFS=';' read -r head opts words; do
	read -r name point outcome <<<"$head"
	[ -n "$name" ] || continue
	case " ${ROWS:-$name} " in *" $name "*) ;; *) continue;; esac
	words=$(printf '%s' "$words" | sed -E 's/^ +//; s/ +$//')
	[ "$(echo $opts)" = - ] && opts=
	reset_row </dev/null
	nrows=$((nrows + 1))
	soft row "$name" "$point" "$outcome" "$words" $opts </dev/null
done <<<"$TABLE"
[ "$nrows" -gt 0 ] || fail "no row ran"
log "$nrows rows in $(( $(date +%s) - start )) s"

# break-guest-write and the write-behind queue: the background copy queued
# the cluster at 4M and its write keeps failing (on-target-error=ignore
# retries it); a guest write there must not be acknowledged before that old
# data is in the target: EIO; once the target works, it succeeds.
queued_guest() {
	reset_row </dev/null
	local id=bgq-guest target=$OUT/bgq-guest.raw r
	cp "$SRC/vm.img" "$T/at-T"
	inject "target-write offset=$((4 * M))-$((4 * M + 1)) from=1"
	out=$(ctl "backup vm.img $target id=$id on-target-error=ignore on-cbw-error=break-guest-write") ||
		fail "backup refused: $out"
	for _ in $(seq 200); do [ "$(fired "offset=4194304-4194305")" -ge 2 ] && break; sleep 0.05; done
	[ "$(fired "offset=4194304-4194305")" -ge 2 ] || fail "the write at 4M was not retried: $(inject_rules)"
	r=$(gw $((4 * M + 100)) 4096)
	[ "${r%% *}" = EIO ] || fail "guest write to a cluster whose old data is only queued: $r, want EIO"
	same_range "$SRC/vm.img" "$T/at-T" $((4 * M)) "$C" || fail "the image at 4M changed although the write failed"
	[ "$(status "$id" state)" = running ] || fail "$id is $(status "$id" state)"
	inject clear
	gw_ok $((4 * M + 100)) 4096
	[ "$(wait_job "$id" 30)" = completed ] || fail "$id ended $(status "$id" state): $(status "$id" error)"
	cmp "$target" "$T/at-T" || fail "the target is not the image at T"
	cmp "$SRC/vm.img" "$T/shadow" || fail "the image is not what the guest wrote"
}
case " ${ROWS:-bgq-guest} " in *" bgq-guest "*) soft queued_guest;; esac

events_stop "$T/events"
grep -vE '^time=[0-9]+\.[0-9]{9} id=[A-Za-z0-9._-]+ type=backup event=[a-z]+( error=.*)?$' "$T/events" &&
	fail "event lines not in the documented format (above)"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exit $DAEMON_RC"
end_test
