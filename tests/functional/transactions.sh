#!/bin/bash
# transactions: one write(2) to ctl is one transaction (SPEC section 3, 4).
#  - Backups started in one write share one point in time across images: a
#    writer updates A then B in lock-step with a sequence number; in every
#    pair of targets seqA == seqB or seqA == seqB + 1, and each target is
#    exactly the image at its sequence number. (Negative control: two writes
#    a moment apart show a larger gap; logged only.)
#  - A transaction with one failing line starts nothing and creates nothing:
#    no job, no target, no TARGET.xxh3, no event, no verb applied.
#  - Groups: a failing member cancels the others (also one whose copy was
#    done, and one still copying), targets removed; members whose copy is
#    done wait for the others and then complete together; cancel of one
#    member (copying or waiting) cancels the others; a member paused while
#    it waits holds the group until resumed; a group is a group of one
#    write; status shows group=.
#  - The same image twice in one write: two exact, identical targets.
. "$TESTS_DIR/lib.sh"

if [ -x /usr/bin/python3 ] && [ "$(command -v python3)" != /usr/bin/python3 ]; then
	mkdir -p "$T/bin" && ln -s /usr/bin/python3 "$T/bin/python3" && PATH="$T/bin:$PATH"
fi

M=1048576
jobs_list() { ls -A "$MNT/.fleece/jobs" | sort | tr '\n' ' '; }

# ---- the sequence writer and its checker -------------------------------------
# seq.py write STOP PROGRESS SIZE IMAGE...: step n = 1, 2, ... writes record n
#   (4096 bytes: magic, n, n repeated) at slot n % K of every IMAGE, in the
#   order given, one pwrite each, as fast as it goes; slots straddle cluster
#   boundaries. Stops when STOP exists; PROGRESS holds the last step done.
# seq.py check TARGET BASE: prints the highest n in TARGET, after checking that
#   TARGET is exactly BASE plus the records 1..n (the image at step n).
cat > "$T/seq.py" <<'EOF'
import os, struct, sys
MAGIC = b"fleeceSQ"
def layout(size):
    k = size // 65536 - 1
    return k, 65536, 65536 - 1000          # slots, stride, offset in the stride
def rec(n):
    return struct.pack("<8sQ", MAGIC, n) + n.to_bytes(8, "little") * 510
def off(n, k, stride, delta):
    return (n % k) * stride + delta
if sys.argv[1] == "write":
    stop, prog, size = sys.argv[2], sys.argv[3], int(sys.argv[4])
    k, stride, delta = layout(size)
    fds = [os.open(p, os.O_RDWR) for p in sys.argv[5:]]
    n = 0
    while True:
        n += 1
        r, o = rec(n), off(n, k, stride, delta)
        for fd in fds:
            if os.pwrite(fd, r, o) != len(r):
                sys.exit(f"short write at step {n}")
        if n % 128 == 0:
            with open(prog + ".tmp", "w") as f:
                f.write(str(n))
            os.rename(prog + ".tmp", prog)
            if os.path.exists(stop):
                break
else:
    target, base = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
    if len(target) != len(base):
        sys.exit(f"{sys.argv[2]}: size {len(target)}, want {len(base)}")
    k, stride, delta = layout(len(base))
    seq = 0
    for s in range(k):
        m, n = struct.unpack_from("<8sQ", target, s * stride + delta)
        if m == MAGIC:
            seq = max(seq, n)
    if not seq:
        sys.exit(f"{sys.argv[2]}: no record of the writer")
    want = bytearray(base)
    for s in range(k):
        n = seq - (seq - s) % k
        if n >= 1:
            o = off(n, k, stride, delta)
            want[o:o + 4096] = rec(n)
    if want != target:
        d = next(i for i in range(len(base)) if want[i] != target[i])
        sys.exit(f"{sys.argv[2]}: differs from the image at step {seq} at offset {d}")
    print(seq)
EOF

# writer_start NAME IMAGE...: a sequence writer on the mounted images, after
# keeping a copy of each as $T/base.IMAGE; waits until it made progress.
writer_start() {
	local name=$1 img
	shift
	for img in "$@"; do cp "$SRC/$img" "$T/base.$img"; done
	rm -f "$T/$name.stop" "$T/$name.prog"
	"$PY" "$T/seq.py" write "$T/$name.stop" "$T/$name.prog" "$(stat -c %s "$SRC/$1")" \
		"${@/#/$MNT/}" &
	BG_PIDS+=("$!")
	eval "WRITER_$name=$!"
	for _ in $(seq 200); do [ -s "$T/$name.prog" ] && [ "$(cat "$T/$name.prog")" -ge 512 ] && return 0; sleep 0.05; done
	fail "writer $name makes no progress"
}
writer_stop() {
	local var="WRITER_$1"
	touch "$T/$1.stop"
	wait "${!var}" || fail "writer $1 failed"
}
seq_of() { "$PY" "$T/seq.py" check "$1" "$2" || fail "target $1 is not exact"; }

for img in a b s; do random_image "$SRC/$img.img" $((16 * M)); done
mount_fleece

# =============================================================================
# 1. one point in time across images
# =============================================================================
writer_start ab a.img b.img
last=0
for i in 1 2 3 4 5; do
	ans=$(ctl "backup a.img $OUT/a$i.raw id=a$i speed=8M
backup b.img $OUT/b$i.raw id=b$i speed=8M") || fail "transaction $i refused: $ans"
	[ "$ans" = "ok id=a$i id=b$i" ] || fail "answer '$ans'"
	for j in "a$i" "b$i"; do [ "$(wait_job "$j" 60)" = completed ] || fail "$j: $(status "$j" error)"; done
	sa=$(seq_of "$OUT/a$i.raw" "$T/base.a.img")
	sb=$(seq_of "$OUT/b$i.raw" "$T/base.b.img")
	log "transaction $i: seqA=$sa seqB=$sb (cbw_bytes $(status "a$i" cbw_bytes)/$(status "b$i" cbw_bytes))"
	[ "$sa" = "$sb" ] || [ "$sa" = $((sb + 1)) ] ||
		fail "transaction $i: A at step $sa, B at step $sb: not one point in time"
	[ "$sa" -gt "$last" ] || fail "transaction $i: the writer did not advance ($last -> $sa)"
	last=$sa
	rm -f "$OUT/a$i.raw" "$OUT/b$i.raw" "$OUT/a$i.raw.xxh3" "$OUT/b$i.raw.xxh3"
done
# Negative control: two writes a moment apart are two points in time.
ctl "backup a.img $OUT/na.raw id=na speed=8M" >/dev/null || fail "backup na refused"
sleep 0.2
ctl "backup b.img $OUT/nb.raw id=nb speed=8M" >/dev/null || fail "backup nb refused"
for j in na nb; do [ "$(wait_job "$j" 60)" = completed ] || fail "$j: $(status "$j" error)"; done
writer_stop ab
sa=$(seq_of "$OUT/na.raw" "$T/base.a.img")
sb=$(seq_of "$OUT/nb.raw" "$T/base.b.img")
log "negative control (two writes 0.2 s apart): seqA=$sa seqB=$sb, gap $((sb - sa)) steps"
[ "$(status a1 group)" = "" ] || fail "a job without group= shows group=$(status a1 group)"

# =============================================================================
# 2. the same image twice in one write
# =============================================================================
writer_start s s.img
for i in 1 2; do
	ans=$(ctl "backup s.img $OUT/s$i-1.raw id=s$i-1 speed=8M
backup s.img $OUT/s$i-2.raw id=s$i-2 speed=16M") || fail "refused: $ans"
	for j in "s$i-1" "s$i-2"; do [ "$(wait_job "$j" 60)" = completed ] || fail "$j: $(status "$j" error)"; done
	s1=$(seq_of "$OUT/s$i-1.raw" "$T/base.s.img")
	s2=$(seq_of "$OUT/s$i-2.raw" "$T/base.s.img")
	cmp "$OUT/s$i-1.raw" "$OUT/s$i-2.raw" || fail "two backups of s.img in one write differ (steps $s1, $s2)"
	python3 "$TESTS_DIR/manifest_check.py" "$OUT/s$i-1.raw" >/dev/null &&
		python3 "$TESTS_DIR/manifest_check.py" "$OUT/s$i-2.raw" >/dev/null || fail "manifest of s$i"
	log "same image twice: both at step $s1, identical"
done
writer_stop s

# =============================================================================
# 3. a transaction with a failing line starts nothing, creates nothing
# =============================================================================
ctl "backup a.img $OUT/lx.raw id=lx speed=256K" >/dev/null || fail "backup lx refused"
mkdir "$T/ro"
mount -t tmpfs -o ro tmpfs "$T/ro"
EXTRA_MOUNTS+=("$T/ro")
echo precious > "$OUT/exists.raw"
events_file=$T/refused.events
events_start "$events_file"

# refuse_txn ERRNO LINE2: "backup a.img t1 id=t1" + LINE2 is refused with
# ERRNO, the answer names line 2, and nothing of line 1 exists.
refuse_txn() {
	local want=$1 line2=$2 before ans
	before=$(jobs_list)
	ans=$(ctl_expect "$want" "backup a.img $OUT/t1.raw id=t1 speed=1M
$line2") || exit 1
	grep -q 'line 2' <<<"$ans" || fail "'$line2': the answer does not say where: $ans"
	[ "$(jobs_list)" = "$before" ] || fail "'$line2': jobs changed: [$before] -> [$(jobs_list)]"
	[ ! -e "$MNT/.fleece/jobs/t1" ] || fail "'$line2': job t1 exists"
	for p in "$OUT/t1.raw" "$OUT/t1.raw.xxh3" "$OUT/t2.raw" "$OUT/t2.raw.xxh3"; do
		[ ! -e "$p" ] || fail "'$line2': $p was left behind"
	done
	log "refused as a whole ($want): line 2 '$line2'"
}
refuse_txn ENOENT "backup nosuch.img $OUT/t2.raw id=t2"
refuse_txn EEXIST "backup b.img $OUT/exists.raw id=t2"
refuse_txn EINVAL "backup b.img $OUT/t2.raw id=t2 speed=fast"
refuse_txn EINVAL "backup b.img $OUT/t2.raw id=t2 colour=blue"
refuse_txn EEXIST "backup b.img $OUT/t2.raw id=lx"
refuse_txn EEXIST "backup b.img $OUT/t2.raw id=t1"
refuse_txn EEXIST "backup b.img $OUT/t1.raw id=t2"
refuse_txn EEXIST "mirror b.img $OUT/exists.raw id=t2"
refuse_txn EROFS "backup b.img $T/ro/t2.raw id=t2"     # fails when the target is created
refuse_txn ENOENT "cancel nosuchjob"
refuse_txn EBUSY "dismiss lx"
[ "$(cat "$OUT/exists.raw")" = precious ] || fail "an existing target was touched"
# A verb on line 1 does not happen either.
ctl_expect ENOENT "set lx speed=5M
backup nosuch.img $OUT/t2.raw" >/dev/null
ctl_expect ENOENT "pause lx
backup nosuch.img $OUT/t2.raw" >/dev/null
ctl_expect ENOENT "cancel lx
backup nosuch.img $OUT/t2.raw" >/dev/null
[ "$(status lx state)" = running ] && [ "$(status lx speed)" = 262144 ] ||
	fail "verbs of refused writes took effect on lx: $(cat "$MNT/.fleece/jobs/lx/status")"
sleep 0.3
events_stop "$events_file"
[ ! -s "$events_file" ] || fail "refused transactions emitted events: $(cat "$events_file")"
ctl "cancel lx" >/dev/null || fail "cancel lx refused"
[ "$(wait_job lx 20)" = cancelled ] || fail "lx not cancelled"

# =============================================================================
# 4. groups
# =============================================================================
random_image "$SRC/small.img" $((4 * M))
random_image "$SRC/big.img" $((16 * M))
random_image "$SRC/big2.img" $((16 * M))

# 4a. One member fails reading its image (an injected EIO that only the big
# image reaches); the other had copied everything and would have completed
# alone: it is cancelled, and both targets are removed.
echo "source-read offset=6M- errno=EIO" > "$MNT/.fleece/inject"
ans=$(ctl "backup small.img $OUT/g1s.raw id=g1s group=g1
backup big.img $OUT/g1b.raw id=g1b group=g1 speed=2M") || fail "group g1 refused: $ans"
[ "$(status g1s group)" = g1 ] && [ "$(status g1b group)" = g1 ] ||
	fail "members do not show group=g1: $(status g1s group) $(status g1b group)"
for _ in $(seq 200); do [ "$(status g1s bytes_done)" = $((4 * M)) ] && break; sleep 0.05; done
[ "$(status g1s bytes_done)" = $((4 * M)) ] || fail "g1s did not copy its image: $(cat "$MNT/.fleece/jobs/g1s/status")"
[ "$(status g1b state)" = running ] || fail "g1b is $(status g1b state) before reaching 6M"
[ "$(status g1s state)" = running ] || fail "g1s ($(status g1s state)) did not wait for g1b"
[ "$(wait_job g1b 30)" = failed ] || fail "g1b: $(cat "$MNT/.fleece/jobs/g1b/status")"
[ "$(wait_job g1s 30)" = cancelled ] || fail "g1s is $(status g1s state) after g1b failed, want cancelled"
echo clear > "$MNT/.fleece/inject"
case $(status g1b error) in *"Input/output error"*) ;; *) fail "g1b error=$(status g1b error)";; esac
for p in g1s.raw g1s.raw.xxh3 g1b.raw g1b.raw.xxh3; do [ ! -e "$OUT/$p" ] || fail "group g1 left $p"; done
log "group g1: a member that failed cancelled the one that had copied everything"

# 4b. The small member fails writing its target (a 1M tmpfs fills up) while
# the big one is copying: the big one is cancelled mid-copy.
mkdir "$T/tiny"
mount -t tmpfs -o size=1M tmpfs "$T/tiny"
EXTRA_MOUNTS+=("$T/tiny")
ans=$(ctl "backup small.img $T/tiny/g2s.raw id=g2s group=g2
backup big.img $OUT/g2b.raw id=g2b group=g2 speed=2M") || fail "group g2 refused: $ans"
[ "$(wait_job g2s 30)" = failed ] || fail "g2s: $(cat "$MNT/.fleece/jobs/g2s/status")"
[ "$(wait_job g2b 30)" = cancelled ] || fail "g2b is $(status g2b state) after g2s failed, want cancelled"
case $(status g2s error) in *"No space left"*) ;; *) fail "g2s error=$(status g2s error)";; esac
[ "$(status g2b bytes_done)" -lt $((16 * M)) ] || fail "g2b copied everything before it was cancelled"
for p in "$T/tiny/g2s.raw" "$T/tiny/g2s.raw.xxh3" "$OUT/g2b.raw" "$OUT/g2b.raw.xxh3"; do
	[ ! -e "$p" ] || fail "group g2 left $p"
done
log "group g2: a member whose target filled up cancelled the one still copying"

# 4c. Both succeed: the small one waits for the big one, then both complete.
ans=$(ctl "backup small.img $OUT/g3s.raw id=g3s group=g3
backup big.img $OUT/g3b.raw id=g3b group=g3 speed=8M") || fail "group g3 refused: $ans"
# Sampled in this order, g3s may be seen concluded only once g3b has copied
# everything (the two then conclude together, in either order).
waited=0
for _ in $(seq 600); do
	ss=$(status g3s state)
	sdone=$(status g3s bytes_done)
	bdone=$(status g3b bytes_done)
	sb=$(status g3b state)
	if [ "$ss" != running ] && [ "$bdone" -lt $((16 * M)) ]; then
		fail "g3s is $ss while g3b has copied only $bdone bytes"
	fi
	[ "$sb" = running ] || break
	[ "$ss" = running ] && [ "$sdone" = $((4 * M)) ] && waited=$((waited + 1))
	sleep 0.05
done
[ "$waited" -ge 5 ] || fail "g3s was seen waiting for g3b only $waited times"
[ "$(wait_job g3b 30)" = completed ] || fail "g3b: $(status g3b error)"
[ "$(wait_job g3s 30)" = completed ] || fail "g3s: $(status g3s error)"
cmp "$SRC/small.img" "$OUT/g3s.raw" && cmp "$SRC/big.img" "$OUT/g3b.raw" || fail "group g3 targets differ"
awk -v s="$(status g3s finished)" -v b="$(status g3b started)" 'BEGIN { exit !(s - b >= 1.0) }' ||
	fail "g3s finished $(status g3s finished), less than 1 s after the start $(status g3b started)"
log "group g3: the small member waited for the big one ($waited samples), both completed"

# 4d. cancel of one member cancels the others.
ans=$(ctl "backup big.img $OUT/g4a.raw id=g4a group=g4 speed=1M
backup big2.img $OUT/g4b.raw id=g4b group=g4 speed=1M
backup small.img $OUT/g4c.raw id=g4c group=g4") || fail "group g4 refused: $ans"
[ "$(status g4c group)" = g4 ] || fail "g4c group=$(status g4c group)"
sleep 0.3
[ "$(ctl "cancel g4a")" = ok ] || fail "cancel g4a refused"
for j in g4a g4b g4c; do [ "$(wait_job "$j" 20)" = cancelled ] || fail "$j is $(status "$j" state), want cancelled"; done
for p in g4a.raw g4b.raw g4c.raw g4a.raw.xxh3 g4b.raw.xxh3 g4c.raw.xxh3; do
	[ ! -e "$OUT/$p" ] || fail "group g4 left $p"
done
log "group g4: cancel of one member cancelled the others"

# 4e. cancel of the member that waits (its copy done) cancels the others.
ans=$(ctl "backup small.img $OUT/g5s.raw id=g5s group=g5
backup big.img $OUT/g5b.raw id=g5b group=g5 speed=2M") || fail "group g5 refused: $ans"
for _ in $(seq 200); do [ "$(status g5s bytes_done)" = $((4 * M)) ] && break; sleep 0.05; done
[ "$(status g5s state)" = running ] && [ "$(status g5b state)" = running ] ||
	fail "g5s/g5b: $(status g5s state)/$(status g5b state)"
[ "$(ctl "cancel g5s")" = ok ] || fail "cancel of the waiting member g5s refused"
for j in g5s g5b; do [ "$(wait_job "$j" 20)" = cancelled ] || fail "$j is $(status "$j" state), want cancelled"; done
for p in g5s.raw g5b.raw g5s.raw.xxh3 g5b.raw.xxh3; do [ ! -e "$OUT/$p" ] || fail "group g5 left $p"; done
log "group g5: cancel of the waiting member cancelled the other"

# 4f. A member paused while it waits for the group stays paused: it does not
# conclude, and neither does the group, until it is resumed (a paused job
# does not complete; and a group whose other members completed could no
# longer conclude together if the paused one were then cancelled).
group_pause() {
	local ans
	ans=$(ctl "backup small.img $OUT/g7s.raw id=g7s group=g7
backup big.img $OUT/g7b.raw id=g7b group=g7 speed=8M") || fail "group g7 refused: $ans"
	for _ in $(seq 200); do [ "$(status g7s bytes_done)" = $((4 * M)) ] && break; sleep 0.05; done
	[ "$(status g7s state)" = running ] || fail "g7s is $(status g7s state) before g7b copied its image"
	[ "$(ctl "pause g7s")" = ok ] && [ "$(status g7s state)" = paused ] || fail "pause of waiting g7s"
	for _ in $(seq 400); do [ "$(status g7b bytes_done)" = $((16 * M)) ] && break; sleep 0.05; done
	[ "$(status g7b bytes_done)" = $((16 * M)) ] || fail "g7b did not copy its image"
	sleep 1
	local s7s s7b
	s7s=$(status g7s state) s7b=$(status g7b state)
	if [ "$s7s" != paused ] || [ "$s7b" != running ]; then
		fail "group g7, g7s paused while waiting, g7b done copying: g7s is $s7s, g7b is $s7b (want paused, running)"
	fi
	[ "$(ctl "resume g7s")" = ok ] || fail "resume g7s refused"
	for j in g7s g7b; do [ "$(wait_job "$j" 20)" = completed ] || fail "$j: $(status "$j" state)"; done
	cmp "$SRC/small.img" "$OUT/g7s.raw" && cmp "$SRC/big.img" "$OUT/g7b.raw" || fail "group g7 targets differ"
}
soft group_pause
for j in g7s g7b; do   # whatever happened: conclude both before going on
	case $(status "$j" state) in running|paused) ctl "cancel $j" >/dev/null 2>&1 || true;; esac
done
for j in g7s g7b; do wait_job "$j" 20 >/dev/null; done
log "group g7: pause of a waiting member checked"

# 4g. A group is a group of one write: the same name in another write is
# another group.
ctl "backup big.img $OUT/g6a.raw id=g6a group=g6 speed=1M" >/dev/null || fail "g6a refused"
ctl "backup big2.img $OUT/g6b.raw id=g6b group=g6 speed=1M" >/dev/null || fail "g6b refused"
[ "$(ctl "cancel g6b")" = ok ] || fail "cancel g6b refused"
[ "$(wait_job g6b 20)" = cancelled ] || fail "g6b: $(status g6b state)"
sleep 0.5
[ "$(status g6a state)" = running ] || fail "cancel of g6b (group g6 of another write) made g6a $(status g6a state)"
ctl "set g6a speed=0" >/dev/null || fail "set g6a speed=0 refused"
[ "$(wait_job g6a 30)" = completed ] || fail "g6a: $(status g6a state) $(status g6a error)"
cmp "$SRC/big.img" "$OUT/g6a.raw" || fail "g6a target differs"
log "group g6: groups of different writes are independent"

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "fleecefs exited $DAEMON_RC"
end_test
