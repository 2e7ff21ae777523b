/* Unit tests for error injection (src/inject.c): the rule parser of
 * .fleece/inject (every refusal, all-or-nothing writes, clear), and the
 * matcher (once / every=N / from=N counting, offset overlap, errno, delay,
 * the listing with matched/fired counts). */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fleecefs/inject.h"
#include "fleecefs/util.h"

#define K 1024ull
#define M (1024ull * 1024)
#define MS 1000000ull

static char err[256];

/* Failing the Nth strndup reaches inject_apply's out-of-memory path (the
 * override is in the executable, so the library's calls land here). */
static _Thread_local unsigned strndup_fail_countdown;

char *strndup(const char *s, size_t n)
{
	if (strndup_fail_countdown && --strndup_fail_countdown == 0) {
		errno = ENOMEM;
		return NULL;
	}
	size_t len = strnlen(s, n);
	char *copy = malloc(len + 1);
	if (copy) {
		memcpy(copy, s, len);
		copy[len] = '\0';
	}
	return copy;
}

/* Criterion forks per test; the rules are global all the same, so every
 * test starts and ends without any. */
static void no_rules(void)
{
	inject_clear();
}

TestSuite(inject, .init = no_rules, .fini = no_rules, .timeout = 30);

static int apply_len(const char *text, size_t len)
{
	memset(err, 0, sizeof(err));
	return inject_apply(text, len, err, sizeof(err));
}

static int apply(const char *text)
{
	return apply_len(text, strlen(text));
}

static void apply_ok(const char *text)
{
	int rc = apply(text);
	cr_assert_eq(rc, 0, "'%s' refused (%d): %s", text, rc, err);
}

/* The listing, "" when there is no rule (caller frees). */
static char *listing(void)
{
	char *d = inject_describe();
	cr_assert_not_null(d);
	return d;
}

static unsigned count_rules(void)
{
	char *d = listing();
	unsigned n = 0;
	for (char *p = d; *p; p++)
		n += *p == '\n';
	free(d);
	return n;
}

static void assert_listing(const char *want)
{
	char *d = listing();
	cr_assert_str_eq(d, want);
	free(d);
}

/* ---- no rules ------------------------------------------------------------ */

Test(inject, without_rules_nothing_fails)
{
	cr_assert(!atomic_load(&inject_active));
	for (int p = 0; p < INJECT_POINTS; p++) {
		cr_assert_eq(inject_check((enum inject_point)p, 0, 1), 0);
		cr_assert_eq(inject_check((enum inject_point)p, 123456789, 65536), 0);
		cr_assert_eq(inject_check((enum inject_point)p, UINT64_MAX - 4096, 4096), 0);
		cr_assert_eq(inject_fire((enum inject_point)p, 0, 1), 0);
	}
	assert_listing("");
	/* Blank lines and comments add nothing. */
	apply_ok("");
	apply_ok("\n\n   \t\n# a comment\n  # another\n");
	cr_assert(!atomic_load(&inject_active));
	cr_assert_eq(count_rules(), 0);
}

/* ---- refusals -------------------------------------------------------------- */

struct bad {
	const char *line;
	const char *words; /* in the message */
};

static const struct bad bad_lines[] = {
	/* unknown point */
	{ "bogus", "unknown point 'bogus'" },
	{ "source_read", "unknown point" },
	{ "Source-Read", "unknown point" },
	{ "read once", "unknown point" },
	{ "clear now", "unknown point" },
	{ "once", "unknown point" },
	/* bad offset */
	{ "source-read offset=", "offset" },
	{ "source-read offset=x", "offset" },
	{ "source-read offset=x-1M", "offset" },
	{ "source-read offset=1M-x", "offset" },
	{ "source-read offset=-1M", "offset" },
	{ "source-read offset=1Q-2M", "offset" },
	{ "source-read offset=1M-2M-3M", "offset" },
	/* END <= START */
	{ "source-read offset=2M-1M", "END > START" },
	{ "target-write offset=1M-1M", "END > START" },
	{ "target-write offset=65536-65535", "END > START" },
	/* counts from 1 */
	{ "source-read every=0", "every=0" },
	{ "source-read from=0", "from=0" },
	{ "source-read from=x", "from=x" },
	{ "source-read every=x", "every=x" },
	{ "source-read every=", "every" },
	{ "source-read from=-1", "from" },
	{ "source-read every=1.5", "every" },
	/* unknown errno */
	{ "source-read errno=EBOGUS", "errno=EBOGUS" },
	{ "source-read errno=", "errno" },
	{ "source-read errno=0", "errno=0" },
	{ "source-read errno=4096", "errno=4096" },
	{ "source-read errno=-5", "errno" },
	/* delay out of range */
	{ "cbw delay=0", "delay=0" },
	{ "cbw delay=600001", "delay=600001" },
	{ "cbw delay=x", "delay=x" },
	{ "cbw delay=", "delay" },
	{ "cbw delay=-1", "delay" },
	/* occurrence given twice */
	{ "source-read once once", "once" },
	{ "source-read once every=2", "every" },
	{ "source-read every=2 once", "once" },
	{ "source-read every=2 from=3", "from" },
	{ "source-read from=3 every=2", "every" },
	{ "source-read every=2 every=3", "every" },
	{ "source-read from=1 from=1", "from" },
	/* other keys given twice */
	{ "source-read errno=EIO errno=ENOSPC", "errno" },
	{ "cbw delay=5 delay=6", "delay" },
	/* unknown words */
	{ "source-read bogus", "bogus" },
	{ "source-read bogus=1", "bogus=1" },
	{ "source-read once=1", "once=1" },
	{ "source-read every", "every" },
	{ "source-read from", "from" },
	{ "source-read offset", "offset" },
	{ "source-read errno", "errno" },
	{ "source-read delay", "delay" },
	{ "source-read Once", "Once" },
	{ "source-read clear", "clear" },
	{ "source-read target-write", "target-write" },
};

Test(inject, every_bad_line_is_refused_and_adds_nothing)
{
	for (size_t i = 0; i < sizeof(bad_lines) / sizeof(bad_lines[0]); i++) {
		const struct bad *b = &bad_lines[i];
		int rc = apply(b->line);
		cr_expect_eq(rc, -EINVAL, "'%s': rc %d, want -EINVAL (message '%s')", b->line, rc, err);
		if (rc != -EINVAL) {
			inject_clear();
			continue;
		}
		cr_expect(strstr(err, "line 1") != NULL, "'%s': message '%s' does not name line 1", b->line, err);
		cr_expect(strstr(err, b->words) != NULL, "'%s': message '%s' lacks '%s'", b->line, err, b->words);
		cr_expect(strchr(err, '\n') == NULL, "'%s': message is not one line: '%s'", b->line, err);
		cr_expect_eq(count_rules(), 0, "'%s' added a rule", b->line);
		cr_expect(!atomic_load(&inject_active), "'%s' armed injection", b->line);
	}
}

/* END = 0 is an END <= START like any other, not "to the end" (that is
 * written by leaving END out). */
Test(inject, offset_end_zero_is_refused)
{
	static const char *const lines[] = { "cbw offset=4M-0", "cbw offset=0-0", "source-read offset=1-0" };
	for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
		int rc = apply(lines[i]);
		char *d = listing();
		cr_expect_eq(rc, -EINVAL, "'%s' accepted, as the rule '%s'", lines[i], d);
		cr_expect(rc != -EINVAL || strstr(err, "END > START"), "'%s': message '%s'", lines[i], err);
		free(d);
		inject_clear();
	}
}

/* offset= given twice is refused like errno= or delay= given twice (it is
 * not merged: "offset=0-8M offset=4M" would otherwise mean 4M-8M). */
Test(inject, duplicate_offset_is_refused)
{
	static const char *const lines[] = { "source-read offset=0-1M offset=2M-3M", "cbw offset=0-8M offset=4M" };
	for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
		int rc = apply(lines[i]);
		char *d = listing();
		cr_expect_eq(rc, -EINVAL, "'%s' accepted, as the rule '%s'", lines[i], d);
		cr_expect(rc != -EINVAL || strstr(err, "offset"), "'%s': message '%s'", lines[i], err);
		free(d);
		inject_clear();
	}
}

Test(inject, good_lines_are_accepted)
{
	static const char *const good[] = {
		"source-read",
		"target-write",
		"cbw",
		"source-read offset=0-1",
		"source-read offset=1M-2M",
		"source-read offset=4M",
		"source-read offset=4M-",
		"source-read offset=65536-131072",
		"source-read once",
		"source-read every=1",
		"source-read every=1000000",
		"source-read from=1",
		"source-read from=7",
		"source-read errno=EIO",
		"source-read errno=28",
		"source-read errno=4095",
		"cbw delay=1",
		"cbw delay=600000",
		"cbw delay=5 errno=ETIMEDOUT",
		"target-write offset=1M-2M every=3 errno=ENOSPC delay=7",
		"  target-write \t once\t",
		"target-write once\r",
	};
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		int rc = apply(good[i]);
		cr_expect_eq(rc, 0, "'%s' refused: %s", good[i], err);
		cr_expect_eq(count_rules(), 1, "'%s': %u rules", good[i], count_rules());
		cr_expect(atomic_load(&inject_active));
		inject_clear();
	}
}

Test(inject, every_errno_name)
{
	static const struct {
		const char *name;
		int value;
	} names[] = {
		{ "EIO", EIO }, { "ENOSPC", ENOSPC }, { "EROFS", EROFS }, { "EACCES", EACCES }, { "EPERM", EPERM },
		{ "ETIMEDOUT", ETIMEDOUT }, { "EINVAL", EINVAL }, { "ENOMEM", ENOMEM }, { "EDQUOT", EDQUOT },
	};
	char line[64], want[128];

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		snprintf(line, sizeof(line), "target-write errno=%s", names[i].name);
		apply_ok(line);
		cr_expect_eq(inject_check(INJECT_TARGET_WRITE, 0, 512), -names[i].value, "%s", names[i].name);
		snprintf(want, sizeof(want), "target-write offset=0- once errno=%s matched=1 fired=1\n", names[i].name);
		assert_listing(want);
		inject_clear();
	}
	/* A number, even one without a name here. */
	apply_ok("cbw errno=28");
	cr_assert_eq(inject_check(INJECT_CBW, 0, 1), -ENOSPC);
	inject_clear();
	apply_ok("cbw errno=4000");
	cr_assert_eq(inject_check(INJECT_CBW, 0, 1), -4000);
	assert_listing("cbw offset=0- once errno=4000 matched=1 fired=1\n");
}

/* ---- all or nothing ---------------------------------------------------------- */

Test(inject, a_bad_line_refuses_the_whole_write)
{
	apply_ok("source-read offset=0-1M");
	cr_assert_eq(count_rules(), 1);

	cr_assert_eq(apply("target-write\nbogus\ncbw"), -EINVAL);
	cr_assert(strstr(err, "line 2") != NULL, "message '%s'", err);
	cr_assert(strstr(err, "bogus") != NULL, "message '%s'", err);
	assert_listing("source-read offset=0-1048576 once errno=EIO matched=0 fired=0\n");

	/* The good lines before and after the bad one are not applied either. */
	cr_assert_eq(apply("target-write from=1\ncbw delay=10\nsource-read every=0"), -EINVAL);
	cr_assert(strstr(err, "line 3") != NULL, "message '%s'", err);
	cr_assert_eq(count_rules(), 1);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 0, 1), 0);

	/* Line numbers count blank and comment lines. */
	cr_assert_eq(apply("cbw\n\n# comment\n   \ncbw every=0\n"), -EINVAL);
	cr_assert(strstr(err, "line 5") != NULL, "message '%s'", err);

	/* A refused write with clear in it clears nothing. */
	cr_assert_eq(apply("clear\ncbw from=x"), -EINVAL);
	cr_assert_eq(count_rules(), 1);
	cr_assert(atomic_load(&inject_active));
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 0, 1), -EIO);
}

Test(inject, a_nul_byte_refuses_the_write)
{
	static const char text[] = "source-read\0bogus\ncbw";

	cr_assert_eq(apply_len(text, sizeof(text) - 1), -EINVAL, "a line with a NUL byte was not refused");
	cr_assert(strstr(err, "line 1") != NULL, "message '%s'", err);
	cr_assert_eq(count_rules(), 0);
}

Test(inject, out_of_memory_adds_nothing)
{
	apply_ok("cbw");
	strndup_fail_countdown = 2; /* the second line */
	int rc = apply("source-read\ntarget-write\n");
	strndup_fail_countdown = 0;
	cr_assert_eq(rc, -ENOMEM, "rc %d: %s", rc, err);
	cr_assert(strstr(err, "line 2") != NULL, "message '%s'", err);
	cr_assert(strstr(err, "out of memory") != NULL, "message '%s'", err);
	assert_listing("cbw offset=0- once errno=EIO matched=0 fired=0\n");
}

/* A FUSE write buffer is not NUL-terminated: nothing past len is read (the
 * page after the text is inaccessible). */
Test(inject, unterminated_text_not_read_past_len)
{
	static const char text[] = "cbw\nsource-read from=2";
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	char *map = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	cr_assert_neq(map, MAP_FAILED);
	cr_assert_eq(mprotect(map + page, page, PROT_NONE), 0);
	char *copy = map + page - (sizeof(text) - 1);
	memcpy(copy, text, sizeof(text) - 1);
	cr_assert_eq(apply_len(copy, sizeof(text) - 1), 0, "%s", err);
	/* and nothing past len is taken as part of the last word */
	cr_assert_eq(apply_len("cbw every=25", 11), 0, "%s", err);
	assert_listing("cbw offset=0- once errno=EIO matched=0 fired=0\n"
		       "source-read offset=0- from=2 errno=EIO matched=0 fired=0\n"
		       "cbw offset=0- every=2 errno=EIO matched=0 fired=0\n");
	munmap(map, 2 * page);
}

/* ---- clear --------------------------------------------------------------------- */

Test(inject, clear_removes_every_rule)
{
	apply_ok("source-read from=1\ntarget-write from=1\ncbw from=1");
	cr_assert_eq(count_rules(), 3);
	cr_assert(atomic_load(&inject_active));
	apply_ok("clear");
	cr_assert_eq(count_rules(), 0);
	cr_assert(!atomic_load(&inject_active));
	for (int p = 0; p < INJECT_POINTS; p++)
		cr_assert_eq(inject_check((enum inject_point)p, 0, 1), 0);

	/* With blanks around it; clearing nothing is fine. */
	apply_ok("  clear \t\r\n");
	apply_ok("clear");
	cr_assert_eq(count_rules(), 0);

	/* clear, then rules, in one write: the old rules go, the new stay. */
	apply_ok("source-read from=1");
	apply_ok("clear\ncbw from=1\ntarget-write from=1");
	char *d = listing();
	cr_assert_eq(count_rules(), 2, "%s", d);
	free(d);
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 0, 1), 0);
	cr_assert_eq(inject_check(INJECT_CBW, 0, 1), -EIO);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 0, 1), -EIO);

	/* Lines apply in order: a clear after rules of the same write drops
	 * them too (and the older ones); rules after it stay. */
	inject_clear();
	apply_ok("source-read from=1");
	apply_ok("target-write from=1\nclear");
	cr_assert_eq(count_rules(), 0);
	cr_assert(!atomic_load(&inject_active));
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 0, 1), 0);
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 0, 1), 0);
	apply_ok("source-read from=1");
	apply_ok("target-write from=1\nclear\ncbw from=1\n  clear  \ncbw every=2\nsource-read errno=ENOSPC");
	assert_listing("cbw offset=0- every=2 errno=EIO matched=0 fired=0\n"
		       "source-read offset=0- once errno=ENOSPC matched=0 fired=0\n");
	/* A refused write with a clear in the middle changes nothing. */
	cr_assert_eq(apply("cbw\nclear\ntarget-write every=0"), -EINVAL);
	cr_assert_eq(count_rules(), 2);

	/* inject_clear (at exit) does the same. */
	inject_clear();
	cr_assert_eq(count_rules(), 0);
	cr_assert(!atomic_load(&inject_active));
}

/* ---- occurrences ----------------------------------------------------------------- */

/* Calls inject_check n times at offset 0; fails[i] = call i+1 failed. */
static void run_calls(enum inject_point p, unsigned n, bool *fails)
{
	for (unsigned i = 0; i < n; i++) {
		int rc = inject_check(p, 0, 4096);
		cr_assert(rc == 0 || rc == -EIO, "call %u: rc %d", i + 1, rc);
		fails[i] = rc != 0;
	}
}

static void assert_pattern(const bool *fails, const char *want)
{
	for (size_t i = 0; want[i]; i++)
		cr_assert_eq(fails[i], want[i] == 'x', "call %zu: %s, want %s (pattern %s)", i + 1,
			     fails[i] ? "failed" : "passed", want[i] == 'x' ? "failed" : "passed", want);
}

Test(inject, once_is_the_first_match_only)
{
	bool fails[8];
	apply_ok("source-read");
	run_calls(INJECT_SOURCE_READ, 8, fails);
	assert_pattern(fails, "x.......");
	assert_listing("source-read offset=0- once errno=EIO matched=8 fired=1\n");
	inject_clear();
	apply_ok("target-write once");
	run_calls(INJECT_TARGET_WRITE, 3, fails);
	assert_pattern(fails, "x..");
}

Test(inject, every_n)
{
	bool fails[10];
	apply_ok("cbw every=3");
	run_calls(INJECT_CBW, 10, fails);
	assert_pattern(fails, "..x..x..x.");
	assert_listing("cbw offset=0- every=3 errno=EIO matched=10 fired=3\n");
	inject_clear();
	apply_ok("cbw every=1");
	run_calls(INJECT_CBW, 4, fails);
	assert_pattern(fails, "xxxx");
}

Test(inject, from_n)
{
	bool fails[8];
	apply_ok("target-write from=3");
	run_calls(INJECT_TARGET_WRITE, 8, fails);
	assert_pattern(fails, "..xxxxxx");
	assert_listing("target-write offset=0- from=3 errno=EIO matched=8 fired=6\n");
	inject_clear();
	apply_ok("target-write from=1");
	run_calls(INJECT_TARGET_WRITE, 3, fails);
	assert_pattern(fails, "xxx");
}

/* Only matching operations count towards once/every/from: other points and
 * operations outside the range do not. */
Test(inject, only_matching_operations_count)
{
	apply_ok("source-read offset=1M-2M every=2");
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 1 * M, 4096), 0);   /* match 1 */
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 0, 4096), 0);       /* not a match */
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 3 * M, 4096), 0);   /* not a match */
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 1 * M, 4096), 0);  /* other point */
	cr_assert_eq(inject_check(INJECT_CBW, 1 * M, 4096), 0);           /* other point */
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 1 * M + 8192, 1), -EIO); /* match 2 */
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 1 * M, 1), 0);      /* match 3 */
	assert_listing("source-read offset=1048576-2097152 every=2 errno=EIO matched=3 fired=1\n");
}

/* ---- offsets ----------------------------------------------------------------------- */

Test(inject, an_operation_touching_the_range_matches)
{
	apply_ok("target-write offset=1M-2M from=1");
	/* just before: ends at START */
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 1 * M - 4096, 4096), 0);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 0, 1 * M), 0);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 1 * M - 1, 1), 0);
	/* its last byte is START */
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 1 * M - 4096, 4097), -EIO);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 0, 1 * M + 1), -EIO);
	/* inside, at both ends */
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 1 * M, 1), -EIO);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 1 * M + 300 * K, 64 * K), -EIO);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 2 * M - 1, 1), -EIO);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 2 * M - 1, 1 * M), -EIO);
	/* covering it */
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 0, 16 * M), -EIO);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 1 * M, 1 * M), -EIO);
	/* just after: starts at END */
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 2 * M, 1), 0);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 2 * M, 1 * M), 0);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 5 * M, 4096), 0);
	/* another point at the same place */
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 1 * M, 4096), 0);
	cr_assert_eq(inject_check(INJECT_CBW, 1 * M, 4096), 0);
	assert_listing("target-write offset=1048576-2097152 from=1 errno=EIO matched=8 fired=8\n");
}

Test(inject, open_ended_and_whole_ranges)
{
	apply_ok("cbw offset=4M from=1");
	cr_assert_eq(inject_check(INJECT_CBW, 4 * M - 1, 1), 0);
	cr_assert_eq(inject_check(INJECT_CBW, 4 * M - 1, 2), -EIO);
	cr_assert_eq(inject_check(INJECT_CBW, 4 * M, 1), -EIO);
	cr_assert_eq(inject_check(INJECT_CBW, 1ull << 40, 4096), -EIO);
	inject_clear();
	apply_ok("cbw offset=4M- from=1");
	cr_assert_eq(inject_check(INJECT_CBW, 0, 4 * M), 0);
	cr_assert_eq(inject_check(INJECT_CBW, 100 * M, 1), -EIO);
	assert_listing("cbw offset=4194304- from=1 errno=EIO matched=1 fired=1\n");
	inject_clear();
	/* No offset: everything, from 0 on. */
	apply_ok("source-read from=1");
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 0, 1), -EIO);
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 1ull << 40, 1), -EIO);
	/* Single byte range. */
	inject_clear();
	apply_ok("source-read offset=100-101 from=1");
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 99, 1), 0);
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 100, 1), -EIO);
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 101, 1), 0);
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 0, 4096), -EIO);
}

/* ---- several rules ----------------------------------------------------------------- */

Test(inject, rules_are_independent)
{
	apply_ok("source-read offset=0-1M from=1 errno=ENOSPC\nsource-read offset=1M-2M from=1 errno=EROFS");
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 0, 4096), -ENOSPC);
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 1 * M, 4096), -EROFS);
	cr_assert_eq(inject_check(INJECT_SOURCE_READ, 3 * M, 4096), 0);
	/* An operation matching both fails (with one of the two errors), and
	 * counts for both. */
	int rc = inject_check(INJECT_SOURCE_READ, 1 * M - 1, 2);
	cr_assert(rc == -ENOSPC || rc == -EROFS, "rc %d", rc);
	assert_listing("source-read offset=0-1048576 from=1 errno=ENOSPC matched=2 fired=2\n"
		       "source-read offset=1048576-2097152 from=1 errno=EROFS matched=2 fired=2\n");
	/* A rule added later goes after them. */
	apply_ok("cbw once");
	cr_assert_eq(count_rules(), 3);
}

/* ---- delays ------------------------------------------------------------------------ */

Test(inject, delay_alone_slows_and_succeeds)
{
	apply_ok("cbw delay=120");
	uint64_t t0 = clock_monotonic_ns();
	int rc = inject_check(INJECT_CBW, 0, 4096);
	uint64_t took = clock_monotonic_ns() - t0;
	cr_assert_eq(rc, 0, "a delay without errno= failed the operation: %d", rc);
	cr_assert_geq(took, 120 * MS, "took %llu ns", (unsigned long long)took);
	/* once: the next one is not delayed */
	t0 = clock_monotonic_ns();
	cr_assert_eq(inject_check(INJECT_CBW, 0, 4096), 0);
	took = clock_monotonic_ns() - t0;
	cr_assert_lt(took, 100 * MS, "an operation the rule did not fire for took %llu ns", (unsigned long long)took);
	assert_listing("cbw offset=0- once delay=120 matched=2 fired=1\n");
}

Test(inject, delay_with_errno_slows_then_fails)
{
	apply_ok("target-write offset=1M-2M every=2 delay=80 errno=EROFS");
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 1 * M, 4096), 0);
	uint64_t t0 = clock_monotonic_ns();
	int rc = inject_check(INJECT_TARGET_WRITE, 1 * M, 4096);
	uint64_t took = clock_monotonic_ns() - t0;
	cr_assert_eq(rc, -EROFS);
	cr_assert_geq(took, 80 * MS, "took %llu ns", (unsigned long long)took);
	/* outside the range: neither delayed nor failed */
	t0 = clock_monotonic_ns();
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 3 * M, 4096), 0);
	cr_assert_lt(clock_monotonic_ns() - t0, 60 * MS);
	assert_listing("target-write offset=1048576-2097152 every=2 errno=EROFS delay=80 matched=2 fired=1\n");
}

/* ---- the listing ---------------------------------------------------------------------- */

Test(inject, describe_lists_rules_in_order_with_counts)
{
	apply_ok("source-read offset=1M-2M every=3 errno=ENOSPC\n"
		 "cbw delay=250\n"
		 "target-write offset=4M from=2\n"
		 "cbw offset=0-64K errno=7");
	assert_listing("source-read offset=1048576-2097152 every=3 errno=ENOSPC matched=0 fired=0\n"
		       "cbw offset=0- once delay=250 matched=0 fired=0\n"
		       "target-write offset=4194304- from=2 errno=EIO matched=0 fired=0\n"
		       "cbw offset=0-65536 once errno=7 matched=0 fired=0\n");
	for (int i = 0; i < 4; i++)
		cr_assert_eq(inject_check(INJECT_SOURCE_READ, 1 * M + (uint64_t)i, 1), i == 2 ? -ENOSPC : 0);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 8 * M, 1), i >= 1 ? -EIO : 0);
	cr_assert_eq(inject_check(INJECT_TARGET_WRITE, 0, 1), 0);
	assert_listing("source-read offset=1048576-2097152 every=3 errno=ENOSPC matched=4 fired=1\n"
		       "cbw offset=0- once delay=250 matched=0 fired=0\n"
		       "target-write offset=4194304- from=2 errno=EIO matched=3 fired=2\n"
		       "cbw offset=0-65536 once errno=7 matched=0 fired=0\n");
}
