#!/usr/bin/env bash
# on-target-error=stop under live guest writes. Writer threads write through
# the mount (pit_writers.py) while a backup runs; in the middle of it, every
# write of the target starts failing (target-write injection). The job
# pauses (state=paused, error= names the offset, a "paused" event with the same
# error), dismiss is refused (EBUSY, naming the state), copy-before-write goes
# on while paused (the writers see no error, cbw_bytes grows, bytes_done stays),
# resumed while the fault lasts it pauses again, and once the fault is gone
# `resume` finishes the job: the target equals the image at T (checked by
# pit_writers.py against every write), the manifest matches, and the events
# are started, paused, resumed, paused, resumed, completed.
. "$TESTS_DIR/lib.sh"

M=$((1 << 20))
SIZE=$((32 * M))
random_image "$SRC/vm.img" "$SIZE"
cp "$SRC/vm.img" "$T/base"
mount_fleece

# Every event line into $T/events.
events_start "$T/events"
events_of() { grep -E "^time=[0-9]+\.[0-9]{9} id=$1 type=backup event=" "$T/events" | cut -d' ' -f4- || true; }

# The writers, and the backup (id=pit) they start after half a second.
"$PY" "$TESTS_DIR/pit_writers.py" --mnt "$MNT" --base "$T/base" --target "$OUT/vm.raw" \
	--writers 4 --pace 0.005 --lead 0.5 --tail 1 --timeout 60 \
	--options "speed=8M on-target-error=stop" >"$T/pit.out" 2>&1 &
pit=$!
BG_PIDS+=("$pit")
pit_failed() { fail "$1 (pit_writers: $(tr '\n' '|' <"$T/pit.out"))"; }

for _ in $(seq 400); do [ -e "$MNT/.fleece/jobs/pit/status" ] && break; sleep 0.05; done
[ -e "$MNT/.fleece/jobs/pit/status" ] || pit_failed "the backup did not start"
[ "$(status pit on_target_error)" = stop ] || fail "on_target_error=$(status pit on_target_error)"

# Mid-job: once some of it is done, every target write fails.
for _ in $(seq 400); do
	[ "$(status pit bytes_done)" -ge $((6 * M)) ] && break
	[ "$(status pit state)" = running ] || fail "state $(status pit state) before the fault: $(status pit error)"
	sleep 0.05
done
[ "$(status pit bytes_done)" -ge $((6 * M)) ] || fail "the backup made no progress: $(status pit bytes_done)"
[ "$(status pit state)" = running ] || fail "state $(status pit state) before the fault"
log "fault at bytes_done=$(status pit bytes_done)"
inject "target-write from=1"

for _ in $(seq 400); do [ "$(status pit state)" = paused ] && break; sleep 0.05; done
[ "$(status pit state)" = paused ] || fail "the job did not pause: state $(status pit state), error '$(status pit error)'"
err=$(status pit error)
log "paused: $err"
# The failed write is a run of whole clusters (a background chunk or a
# guest's copy), and the pause comes in the middle of the backup.
at=$(printf '%s' "$err" | sed -n 's/^writing the target at offset \([0-9]*\): Input\/output error (on-target-error=stop)$/\1/p')
[ -n "$at" ] || fail "error '$err' does not say which target write failed and why"
[ $((at % 65536)) = 0 ] && [ "$at" -lt "$SIZE" ] || fail "error names offset $at, not a cluster of the image"
[ "$(status pit bytes_done)" -lt "$SIZE" ] || fail "paused only after everything was copied"
fired=$(sed -n 's/.* fired=\([0-9]*\)$/\1/p' "$MNT/.fleece/inject")
[ "${fired:-0}" -ge 1 ] || fail "the injected fault never fired: $(cat "$MNT/.fleece/inject")"
for _ in $(seq 100); do events_of pit | grep -q '^event=paused' && break; sleep 0.05; done
[ "$(events_of pit | sed -n 's/^event=paused error=//p' | head -1)" = "$err" ] ||
	fail "paused event '$(events_of pit | grep paused)' does not carry the error '$err'"

out=$(ctl_expect EBUSY "dismiss pit") || exit 1
case $out in *paused*) ;; *) fail "dismiss of a paused job: '$out' does not name the state";; esac

# Copy-before-write goes on while paused; the background copy does not.
cbw0=$(status pit cbw_bytes) done0=$(status pit bytes_done)
grown=
for _ in $(seq 200); do
	kill -0 "$pit" 2>/dev/null || pit_failed "the writers stopped while the job was paused"
	[ "$(status pit state)" = paused ] || fail "the job left the pause by itself: $(status pit state)"
	[ "$(status pit bytes_done)" = "$done0" ] || fail "bytes_done moved while paused: $done0 -> $(status pit bytes_done)"
	if [ "$(status pit cbw_bytes)" -ge $((cbw0 + 4 * 65536)) ]; then grown=1; break; fi
	sleep 0.05
done
[ -n "$grown" ] || fail "cbw_bytes did not grow while paused: $cbw0 -> $(status pit cbw_bytes)"
sleep 0.5   # a while longer under the writers
[ "$(status pit state)" = paused ] || fail "the job left the pause by itself: $(status pit state)"
log "while paused: cbw_bytes $cbw0 -> $(status pit cbw_bytes), bytes_done stays $done0"

# Resumed while the fault lasts: the held write is retried, fails again,
# and the job pauses again.
fired0=$(sed -n 's/.* fired=\([0-9]*\)$/\1/p' "$MNT/.fleece/inject")
out=$(ctl "resume pit") || fail "resume refused: $out"
[ "$out" = ok ] || fail "answer to resume: '$out'"
for _ in $(seq 200); do
	[ "$(events_of pit | grep -c '^event=paused')" = 2 ] && break
	sleep 0.05
done
[ "$(events_of pit | grep -c '^event=paused')" = 2 ] ||
	fail "resumed with the fault still there, the job did not pause again: $(events_of pit | tr '\n' '|')"
[ "$(status pit state)" = paused ] || fail "state $(status pit state) after the second pause"
err2=$(status pit error)
case $err2 in "writing the target at offset "*": Input/output error (on-target-error=stop)") ;;
*) fail "second pause: error '$err2'";; esac
fired1=$(sed -n 's/.* fired=\([0-9]*\)$/\1/p' "$MNT/.fleece/inject")
[ "$fired1" -gt "$fired0" ] || fail "resume did not retry the failed write (fired $fired0 -> $fired1)"

# The fault goes away; resume retries the held writes and finishes.
inject clear
out=$(ctl "resume pit") || fail "resume refused: $out"
[ "$out" = ok ] || fail "answer to resume: '$out'"
wait "$pit" || pit_failed "the writers or the point-in-time check failed"
log "$(tail -n 2 "$T/pit.out" | tr '\n' ' ')"

[ "$(status pit state)" = completed ] || fail "state $(status pit state)"
[ -z "$(status pit error)" ] || fail "a completed job still reports error '$(status pit error)'"
[ "$(status pit bytes_done)" = "$SIZE" ] || fail "bytes_done $(status pit bytes_done)"
[ "$(status pit cbw_bytes)" -gt "$cbw0" ] || fail "cbw_bytes $(status pit cbw_bytes)"
"$PY" "$TESTS_DIR/manifest_check.py" "$OUT/vm.raw" || fail "manifest"

for _ in $(seq 100); do events_of pit | grep -q '^event=completed' && break; sleep 0.05; done
seq=$(events_of pit | sed 's/ error=.*//' | tr '\n' ' ')
[ "$seq" = "event=started event=paused event=resumed event=paused event=resumed event=completed " ] ||
	fail "events: $(events_of pit | tr '\n' '|')"
events_of pit | grep -v '^event=paused' | grep -q error= && fail "error= on another event: $(events_of pit)"
awk '{ split($1, a, "="); t = a[2] + 0; if (t < prev) bad = 1; prev = t } END { exit bad }' \
	<(grep ' id=pit ' "$T/events") || fail "event times out of order: $(cat "$T/events")"
out=$(ctl "dismiss pit") || fail "dismiss after completion refused: $out"

events_stop "$T/events"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exit $DAEMON_RC"
log "ok"
