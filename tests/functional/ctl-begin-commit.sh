#!/bin/bash
# ctl-begin-commit: one transaction over several writes on one open ctl file
# (begin ... commit), for shells, which write one line per write(2).
# 1. The EXAMPLES section of fleecefs-control(5), extracted from the man page
#    source and run by bash as it stands (paths substituted), against a
#    lock-step writer stamping a counter into db.img then app.img, block 0,
#    over and over: both backups hold the counters of one point in time. The
#    same two lines without begin/commit are two points in time, which the
#    check tells apart.
# 2. Every rule on a real mount, with errnos and answers: begin/commit/abort
#    placement, a bad line aborting the transaction, commit answering for the
#    transaction, abort and close dropping it, other open files unaffected,
#    the caps (16 MiB, 131072 commands).
. "$TESTS_DIR/lib.sh"

MAN=$TESTS_DIR/../../man/fleecefs-control.5
[ -r "$MAN" ] || fail "no man page at $MAN"
random_image "$SRC/db.img" 1M
random_image "$SRC/app.img" 1M
random_image "$SRC/tiny.img" 65536
cp "$SRC/db.img" "$T/db.orig"
cp "$SRC/app.img" "$T/app.orig"
mount_fleece

# ---- the documented example --------------------------------------------------------
# The first .nf/.fi block of EXAMPLES, with the roff escapes it may use undone.
example=$(awk '/^\.SH EXAMPLES/ { ex = 1; next } ex && /^\.SH/ { exit }
	ex && /^\.nf/ { code = 1; next } ex && code && /^\.fi/ { exit } code' "$MAN" |
	sed -e 's/\\-/-/g' -e 's/\\e/\\\\/g')
[ -n "$example" ] || fail "no example in the EXAMPLES section of $MAN"
grep -q '\\' <<<"$example" && fail "the example uses roff escapes this test does not undo: $example"
grep -qx 'echo begin >&3' <<<"$example" && grep -qx 'echo commit >&3' <<<"$example" ||
	fail "the example is not one transaction with begin and commit: $example"
# The answer it promises, from the comment after cat.
want_answer=$(sed -n 's/^cat <&3 *# *//p' <<<"$example")
[ "$want_answer" = "ok id=db id=app" ] || fail "the example promises the answer '$want_answer'"
script=$(sed -e "s|/srv/vm-disks|$MNT|g" -e "s|/backup/|$OUT/|g" <<<"$example")
grep -q /srv/ <<<"$script" && fail "unsubstituted path in the example: $script"

# writer: block 0 of db.img, then of app.img, each stamped with counter c
# (512 copies of c as 8 bytes), c = 1, 2, 3, ... as fast as it goes.
start_writer() {
	rm -f "$T/writer.ready" "$T/writer.stop" "$T/writer.count"
	"$PY" - "$MNT" "$T/writer" <<'EOF' &
import os, struct, sys
mnt, base = sys.argv[1], sys.argv[2]
db = os.open(f"{mnt}/db.img", os.O_RDWR)
app = os.open(f"{mnt}/app.img", os.O_RDWR)
c = 0
while True:
    c += 1
    block = struct.pack("<Q", c) * 512
    if os.pwrite(db, block, 0) != 4096 or os.pwrite(app, block, 0) != 4096:
        sys.exit("short write")
    if c == 200:
        open(base + ".ready", "w").close()
    if c % 32 == 0 and os.path.exists(base + ".stop"):
        break
open(base + ".count", "w").write(f"{c}\n")
EOF
	WRITER=$!
	BG_PIDS+=("$WRITER")
	for _ in $(seq 200); do [ -e "$T/writer.ready" ] && return 0; sleep 0.05; done
	fail "the writer did not start"
}
# stop_writer: sets COUNT, the last counter written.
stop_writer() {
	touch "$T/writer.stop"
	wait "$WRITER" || fail "the writer failed"
	unset 'BG_PIDS[${#BG_PIDS[@]}-1]'
	COUNT=$(cat "$T/writer.count")
}

# stamp FILE: the counter in block 0 of FILE (all 512 copies must agree).
stamp() {
	"$PY" - "$1" <<'EOF'
import struct, sys
block = open(sys.argv[1], "rb").read(4096)
values = set(struct.unpack("<512Q", block))
if len(values) != 1:
    sys.exit(f"{sys.argv[1]}: block 0 is torn: {sorted(values)[:4]}")
print(values.pop())
EOF
}

# check_backups DB_ID APP_ID: both complete; sets DB and APP, their
# counters. Beyond block 0 (never written) they equal the images as created.
check_backups() {
	local id
	for id in "$1" "$2"; do
		[ "$(wait_job "$id" 60)" = completed ] || fail "job $id: $(cat "$MNT/.fleece/jobs/$id/status")"
	done
	cmp -i 4096 "$OUT/$1.raw" "$T/db.orig" || fail "backup $1 differs beyond block 0"
	cmp -i 4096 "$OUT/$2.raw" "$T/app.orig" || fail "backup $2 differs beyond block 0"
	DB=$(stamp "$OUT/$1.raw") && APP=$(stamp "$OUT/$2.raw") || fail "cannot read the counters"
}

# One point in time T with one writer doing db(c), app(c), db(c+1), ...: at T
# no write is in flight (the transaction drained both images), so the images
# hold a prefix of that sequence: it ends with db(c) (db = c, app = c - 1) or
# with app(c) (both c).
one_point() { [ "$1" = "$2" ] || [ "$1" = $(($2 + 1)) ]; }

# round WHAT SCRIPT ANSWER DB_ID APP_ID: runs SCRIPT with bash while the
# writer runs; it must say nothing on stderr and print ANSWER, and the two
# backups must complete. Sets db, app (their counters) and count (the
# writer's last).
round() {
	start_writer
	answer=$(bash -c "$2" 2>"$T/bash.err") || fail "$1 failed: $answer $(cat "$T/bash.err")"
	[ ! -s "$T/bash.err" ] || fail "$1: bash complained: $(cat "$T/bash.err")"
	[ "$answer" = "$3" ] || fail "$1 answered '$answer', want '$3'"
	check_backups "$4" "$5"
	stop_writer
	db=$DB app=$APP count=$COUNT
	log "$1: db=$db app=$app (writer reached $count)"
}

round "the example" "$script" "$want_answer" db app
[ "$db" -ge 200 ] || fail "db's backup holds counter $db, from before the writer was running"
[ "$count" -gt "$db" ] || fail "the writer did not go on after the point in time ($count, $db)"
one_point "$db" "$app" || fail "the example's backups are not of one point in time: db=$db app=$app"

# The same, slowed down: the shell pauses 0.2 s after every line (the writer
# goes on meanwhile), and still both are of the moment of commit.
slow=$(sed -e 's|/db\.raw id=db|/db-slow.raw id=db-slow|' -e 's|/app\.raw id=app|/app-slow.raw id=app-slow|' \
	-e '/^echo /s/$/; sleep 0.2/' <<<"$script")
round "the slowed example" "$slow" "ok id=db-slow id=app-slow" db-slow app-slow
one_point "$db" "$app" || fail "the slowed example's backups are not of one point in time: db=$db app=$app"

# Without begin and commit: two transactions, 0.2 s apart; only the second
# answer is read back, and the counters show the two points in time.
two=$(sed -e '/^echo begin/d' -e '/^echo commit/d' -e 's|/db\.raw id=db|/db-two.raw id=db-two|' \
	-e 's|/app\.raw id=app|/app-two.raw id=app-two|' -e '/^echo "backup db/s/$/; sleep 0.2/' <<<"$script")
round "two writes" "$two" "ok id=app-two" db-two app-two
one_point "$db" "$app" && fail "two transactions 0.2 s apart look like one point in time (db=$db app=$app): the check cannot tell"
[ "$app" -gt "$db" ] || fail "app's backup ($app) should be later than db's ($db)"
ctl "$(printf 'dismiss %s\n' db app db-slow app-slow db-two app-two)" >/dev/null || fail "dismiss"
log "the documented example is one point in time"

# ---- the rules --------------------------------------------------------------------------
jobs_list() { ls -A "$MNT/.fleece/jobs" | tr '\n' ' '; }

# writes WRITE...: the writes on one open file of ctl, in order (each
# argument one write(2); "@pad:N" is a comment line of N bytes); per write
# one line "OK|ERRNO answer". The file is closed at the end.
writes() {
	"$PY" - "$MNT/.fleece/ctl" "$@" <<'EOF'
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for w in sys.argv[2:]:
    data = w.encode()
    if w.startswith("@pad:"):
        data = b"#" * (int(w[5:]) - 1) + b"\n"
    try:
        os.write(fd, data)
        r = "OK"
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    a = os.read(fd, 65536).decode()
    print(f"{r} {a}", end="" if a.endswith("\n") else "\n")
EOF
}

# expect_writes WANT WRITE...: writes must print WANT, start no job and leave
# nothing in $OUT.
expect_writes() {
	local want=$1 got before
	shift
	before=$(jobs_list)
	got=$(writes "$@")
	[ "$got" = "$want" ] || fail "writes [$(printf '%q ' "$@")]:
got:
$got
want:
$want"
	[ "$(jobs_list)" = "$before" ] || fail "writes [$*] changed the jobs: [$before] -> [$(jobs_list)]"
	[ -z "$(ls -A "$OUT")" ] || fail "writes [$*] left files: $(ls -A "$OUT")"
}

rm -f "$OUT"/*
B1="backup tiny.img $OUT/s1.raw id=s1"
B2="backup tiny.img $OUT/s2.raw id=s2"
ABORTED="; the transaction was aborted, nothing of it ran"

# Closing the file before commit drops the transaction.
expect_writes "OK ok
OK ok
OK ok" begin "$B1" "$B2"
grep -q 'ctl closed with a transaction open (2 commands since begin): dropped, nothing of it ran' "$T/daemon.log" ||
	fail "closing with a transaction open was not logged"
# abort drops it; commit then has nothing to commit.
expect_writes "OK ok
OK ok
OK ok
EINVAL error: commit: no transaction is open on this file (write begin first)" begin "$B1" abort commit
expect_writes "OK ok
EINVAL error: abort: no transaction is open on this file (write begin first)" "begin
$B1
abort" abort
# Misplaced words, without a transaction: the whole write is refused, its
# first line did not run.
expect_writes "EINVAL error: begin must be the first command of its write (it opens a transaction that later writes on this open file add to)" "$B1
begin"
expect_writes "EINVAL error: commit: no transaction is open on this file (write begin first)" "$B1
commit"
expect_writes "EINVAL error: begin takes no arguments" "begin now"
expect_writes "OK ok
EINVAL error: commit: the transaction is empty$ABORTED" begin commit
expect_writes "EINVAL error: commit: the transaction is empty" "begin
commit"
# Inside a transaction, any refused write aborts it.
expect_writes "OK ok
OK ok
EINVAL error: begin: a transaction is already open on this file$ABORTED
EINVAL error: commit: no transaction is open on this file (write begin first)" begin "$B1" begin commit
expect_writes "OK ok
OK ok
EINVAL error: commit must be the last command of its write$ABORTED
EINVAL error: commit: no transaction is open on this file (write begin first)" begin "$B1" "commit
$B2" commit
expect_writes "OK ok
OK ok
EINVAL error: line 2: backup: speed=oops: not a size (digits with an optional K, M, G or T)$ABORTED
EINVAL error: commit: no transaction is open on this file (write begin first)" begin "$B1" "$B2 speed=oops" commit
# A write over the size limit inside a transaction.
# (The size the daemon names is that of the first piece: it depends on where
# python's buffer starts in its page.)
got=$(writes begin "$B1" @pad:2097152 commit | sed 's/the write is [0-9]* bytes/the write is N bytes/')
[ "$got" = "OK ok
OK ok
EMSGSIZE error: the write is N bytes or more; one transaction must fit in $(sed -n 's/^ctl_max_write=//p' "$MNT/.fleece/version") bytes (the kernel splits larger writes)$ABORTED
EINVAL error: commit: no transaction is open on this file (write begin first)" ] ||
	fail "a write over the limit inside a transaction: $got"
[ -z "$(jobs_list)" ] && [ -z "$(ls -A "$OUT")" ] || fail "a refused big write left jobs or files"
# commit answers for the transaction: a failing line fails it all, with its errno.
expect_writes "OK ok
OK ok
OK ok
ENOENT error: line 2: image missing.img: no such image" begin "$B1" "backup missing.img $OUT/m.raw id=m" commit
expect_writes "OK ok
OK ok
OK ok
EEXIST error: line 2: backup: id s1 is used twice in this transaction" begin "$B1" "backup tiny.img $OUT/s1b.raw id=s1" commit
log "refusals: nothing ran"

# Success: commit answers ok and the ids; the jobs ran as one transaction.
got=$(writes "# a comment first
begin" "$B1" "
# blank and comment lines are fine" "$B2
commit")
[ "$got" = "OK ok
OK ok
OK ok
OK ok id=s1 id=s2" ] || fail "a committed transaction: $got"
for id in s1 s2; do
	[ "$(wait_job "$id" 30)" = completed ] || fail "job $id did not complete"
	cmp "$SRC/tiny.img" "$OUT/$id.raw" || fail "backup $id differs"
done
ctl "dismiss s1
dismiss s2" >/dev/null || fail "dismiss"
rm -f "$OUT"/*

# Another open file of ctl is not part of the transaction: its writes run at
# once, each its own transaction.
"$PY" - "$MNT/.fleece/ctl" "$OUT" <<'EOF' || fail "two open files"
import errno, os, sys
ctl, out = sys.argv[1], sys.argv[2]
a, b = os.open(ctl, os.O_RDWR), os.open(ctl, os.O_RDWR)
def write(fd, text):
    try:
        os.write(fd, text.encode())
        r = "OK"
    except OSError as e:
        r = errno.errorcode[e.errno]
    return f"{r} {os.read(fd, 4096).decode().strip()}"
steps = [
    (a, "begin", "OK ok"),
    (a, f"backup tiny.img {out}/a.raw id=in-a", "OK ok"),
    (b, f"backup tiny.img {out}/b.raw id=in-b", "OK ok id=in-b"),
    (b, "commit", "EINVAL error: commit: no transaction is open on this file (write begin first)"),
    (a, "commit", "OK ok id=in-a"),
]
for fd, text, want in steps:
    got = write(fd, text)
    if got != want:
        sys.exit(f"{text!r} on {'ab'[fd != a]}: {got!r}, want {want!r}")
EOF
for id in in-a in-b; do [ "$(wait_job "$id" 30)" = completed ] || fail "job $id did not complete"; done
ctl "dismiss in-a
dismiss in-b" >/dev/null || fail "dismiss"
rm -f "$OUT"/*
log "other open files are not part of it"

# The 16 MiB cap: lines of about 4 KiB in writes of about 1 MiB; the write
# that would pass 16 MiB fails with EMSGSIZE and aborts the transaction.
"$PY" - "$MNT/.fleece/ctl" <<'EOF' || fail "16 MiB cap"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
line = ("backup tiny.img /" + "x" * 3997 + "\n").encode()
assert len(line) == 4015
chunk = line * 260          # 1043900 bytes, under the write limit
os.write(fd, b"begin\n")
total = 0
for i in range(1, 40):
    try:
        os.write(fd, chunk)
        total += len(chunk)
    except OSError as e:
        if e.errno != errno.EMSGSIZE:
            sys.exit(f"write {i}: {errno.errorcode[e.errno]}")
        break
else:
    sys.exit("no write was refused")
a = os.read(fd, 4096).decode()
if a != ("error: the transaction would be larger than 16777216 bytes; the transaction was aborted, "
         "nothing of it ran\n"):
    sys.exit(f"answer {a!r}")
if not (total <= 16 << 20 < total + len(chunk)):
    sys.exit(f"refused after {total} bytes")
try:
    os.write(fd, b"commit\n")
    sys.exit("commit after the cap was accepted")
except OSError as e:
    if e.errno != errno.EINVAL:
        sys.exit(f"commit after the cap: {errno.errorcode[e.errno]}")
EOF
[ -z "$(jobs_list)" ] || fail "jobs after the cap: $(jobs_list)"
# And at most 131072 commands (the shortest ones fit 130560 into one write).
"$PY" - "$MNT/.fleece/ctl" <<'EOF' || fail "command cap"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.write(fd, b"begin\n" + b"pause a\n" * 130000)
os.write(fd, b"pause a\n" * 1072)
try:
    os.write(fd, b"pause a\n")
    sys.exit("command 131073 was accepted")
except OSError as e:
    if e.errno != errno.EMSGSIZE:
        sys.exit(f"command 131073: {errno.errorcode[e.errno]}")
a = os.read(fd, 4096).decode()
if a != "error: the transaction would have more than 131072 commands; the transaction was aborted, nothing of it ran\n":
    sys.exit(f"answer {a!r}")
EOF
log "16 MiB and 131072-command caps"

# The daemon serves on; a plain write is still one transaction.
ans=$(ctl "$B1") || fail "a plain write after all this: $ans"
[ "$ans" = "ok id=s1" ] || fail "a plain write answered '$ans'"
[ "$(wait_job s1 30)" = completed ] || fail "job s1 did not complete"

end_test
