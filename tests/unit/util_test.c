/* Unit tests for util, bufpool, ratelimit and latency (src/util.c, src/bufpool.c, src/ratelimit.c,
 * src/latency.c). */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fleecefs/bufpool.h"
#include "fleecefs/latency.h"
#include "fleecefs/ratelimit.h"
#include "fleecefs/util.h"

#define MS 1000000ull
#define SEC 1000000000ull
#define MiB (1ull << 20)

/* ---- parse_u64 / parse_size -------------------------------------------- */

static void expect_u64(const char *text, uint64_t want)
{
	uint64_t v = 0xdeadbeef;
	int rc = parse_u64(text, &v);
	cr_assert_eq(rc, 0, "parse_u64('%s') = %d", text, rc);
	cr_assert_eq(v, want, "parse_u64('%s') = %llu", text, (unsigned long long)v);
}

static void expect_u64_error(const char *text, int want_rc)
{
	uint64_t v = 0xdeadbeef;
	int rc = parse_u64(text, &v);
	cr_assert_eq(rc, want_rc, "parse_u64('%s') = %d, want %d", text ? text : "(null)", rc, want_rc);
	cr_assert_eq(v, 0xdeadbeef, "parse_u64 wrote its output on error");
}

static void expect_size(const char *text, uint64_t want)
{
	uint64_t v = 0xdeadbeef;
	int rc = parse_size(text, &v);
	cr_assert_eq(rc, 0, "parse_size('%s') = %d", text, rc);
	cr_assert_eq(v, want, "parse_size('%s') = %llu, want %llu", text, (unsigned long long)v,
		     (unsigned long long)want);
}

static void expect_size_error(const char *text, int want_rc)
{
	uint64_t v = 0xdeadbeef;
	int rc = parse_size(text, &v);
	cr_assert_eq(rc, want_rc, "parse_size('%s') = %d, want %d", text ? text : "(null)", rc, want_rc);
	cr_assert_eq(v, 0xdeadbeef, "parse_size wrote its output on error");
}

Test(parse, u64)
{
	expect_u64("0", 0);
	expect_u64("7", 7);
	expect_u64("1234567890", 1234567890);
	expect_u64("007", 7);
	expect_u64("18446744073709551615", UINT64_MAX);
	expect_u64_error("18446744073709551616", -ERANGE);
	expect_u64_error("18446744073709551620", -ERANGE);
	expect_u64_error("99999999999999999999", -ERANGE);
	expect_u64_error("184467440737095516150", -ERANGE);
	expect_u64_error("", -EINVAL);
	expect_u64_error(NULL, -EINVAL);
	expect_u64_error("1K", -EINVAL);
	expect_u64_error(" 1", -EINVAL);
	expect_u64_error("1 ", -EINVAL);
	expect_u64_error("-1", -EINVAL);
	expect_u64_error("+1", -EINVAL);
	expect_u64_error("0x10", -EINVAL);
	expect_u64_error("1.0", -EINVAL);
	expect_u64_error("abc", -EINVAL);
}

Test(parse, size_suffixes)
{
	expect_size("0", 0);
	expect_size("123", 123);
	expect_size("1K", 1024);
	expect_size("64K", 64ull << 10);
	expect_size("64k", 64ull << 10);
	expect_size("1M", MiB);
	expect_size("3m", 3 * MiB);
	expect_size("2G", 2ull << 30);
	expect_size("2g", 2ull << 30);
	expect_size("1T", 1ull << 40);
	expect_size("5t", 5ull << 40);
	expect_size("0K", 0);
	expect_size("18446744073709551615", UINT64_MAX);
	expect_size("16777215T", 16777215ull << 40);
	expect_size("17179869183G", 17179869183ull << 30);
}

Test(parse, size_overflow)
{
	expect_size_error("16777216T", -ERANGE);
	expect_size_error("17179869184G", -ERANGE);
	expect_size_error("17592186044416M", -ERANGE);
	expect_size_error("18014398509481984K", -ERANGE);
	expect_size_error("18446744073709551616", -ERANGE);
	expect_size_error("99999999999999999999K", -ERANGE);
	expect_size_error("1000000000000000000000000000000", -ERANGE);
}

Test(parse, size_garbage)
{
	static const char *const bad[] = { "", "K", "k", "1KB", "1KiB", "1.5M", "1P", "1E", "1 K", " 1K", "1K ",
					   "-1", "+1", "0x10", "abc", "1b", "K1", "1KK" };

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		expect_size_error(bad[i], -EINVAL);
	expect_size_error(NULL, -EINVAL);
}

/* Length alone does not make text a number that overflowed. */
Test(parse, size_long_garbage_is_einval)
{
	expect_size_error("abcdefghijklmnopqrstuvwxyzabcdefghij", -EINVAL);
	expect_size_error("1xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxK", -EINVAL);
}

/* ---- names -------------------------------------------------------------- */

Test(names, valid_and_invalid)
{
	char n64[65], n65[66];

	memset(n64, 'a', 64);
	n64[64] = '\0';
	memset(n65, 'a', 65);
	n65[65] = '\0';

	static const char *const good[] = { "a", "Z", "0", "job-1", "a.b_c-D", "-", "_", "x.", "a..b", "-x" };
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		cr_assert(name_is_valid(good[i]), "'%s' refused", good[i]);
	cr_assert(name_is_valid(n64), "64 characters refused");

	static const char *const bad[] = { "", ".", "..", ".a", "a b", "a/b", "a:b", "a+b", "a\tb", "a\nb",
					   "caf\xc3\xa9", "a@b", "a*b" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert(!name_is_valid(bad[i]), "'%s' accepted", bad[i]);
	cr_assert(!name_is_valid(NULL));
	cr_assert(!name_is_valid(n65), "65 characters accepted");
	n65[64] = '!';
	cr_assert(!name_is_valid(n65));
}

/* ---- small helpers ------------------------------------------------------ */

Test(util, integer_helpers)
{
	cr_assert(!is_power_of_two(0));
	cr_assert(is_power_of_two(1));
	cr_assert(is_power_of_two(4096));
	cr_assert(is_power_of_two(1ull << 63));
	cr_assert(!is_power_of_two(3));
	cr_assert(!is_power_of_two(4097));
	cr_assert_eq(log2_u64(1), 0);
	cr_assert_eq(log2_u64(4096), 12);
	cr_assert_eq(log2_u64(4097), 12);
	cr_assert_eq(log2_u64(UINT64_MAX), 63);
	cr_assert_eq(div_round_up(0, 4), 0);
	cr_assert_eq(div_round_up(1, 4), 1);
	cr_assert_eq(div_round_up(4, 4), 1);
	cr_assert_eq(div_round_up(5, 4), 2);
	cr_assert_eq(min_u64(3, 5), 3);
	cr_assert_eq(max_u64(3, 5), 5);
}

Test(util, timespec_from_ns)
{
	struct timespec ts;

	timespec_from_ns(&ts, 3 * SEC + 250);
	cr_assert_eq(ts.tv_sec, 3);
	cr_assert_eq(ts.tv_nsec, 250);
	timespec_from_ns(&ts, 999999999);
	cr_assert_eq(ts.tv_sec, 0);
	cr_assert_eq(ts.tv_nsec, 999999999);
}

Test(util, set_error)
{
	char err[32];

	cr_assert_eq(set_error(err, sizeof(err), EINVAL, "line %d: %s", 3, "bad"), -EINVAL);
	cr_assert_str_eq(err, "line 3: bad");
	cr_assert_eq(set_error(err, 8, ENOSPC, "%s", "truncated message"), -ENOSPC);
	cr_assert_str_eq(err, "truncat");
	cr_assert_eq(set_error(NULL, 0, EIO, "ignored"), -EIO);
}

Test(util, pread_pwrite_full)
{
	char path[] = "/tmp/fleecefs-util-test-XXXXXX";
	char buf[10000], back[12000];
	int fd = mkstemp(path);

	cr_assert_geq(fd, 0);
	unlink(path);
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (char)(i * 7);
	cr_assert_eq(pwrite_full(fd, buf, sizeof(buf), 100), (ssize_t)sizeof(buf));
	cr_assert_eq(pread_full(fd, back, sizeof(buf), 100), (ssize_t)sizeof(buf));
	cr_assert_eq(memcmp(back, buf, sizeof(buf)), 0);
	/* A read across end of file returns what is there. */
	cr_assert_eq(pread_full(fd, back, sizeof(back), 100), (ssize_t)sizeof(buf));
	cr_assert_eq(pread_full(fd, back, 10, 1000000), 0);
	close(fd);
	cr_assert_eq(pread_full(fd, back, 10, 0), -EBADF);
	cr_assert_eq(pwrite_full(fd, buf, 10, 0), -EBADF);
}

Test(util, thread_buffer)
{
	char *a = thread_buffer(THREAD_BUFFER_GUEST, 100);
	char *b = thread_buffer(THREAD_BUFFER_COPY, 100);

	cr_assert_not_null(a);
	cr_assert_not_null(b);
	cr_assert_neq(a, b);
	cr_assert_eq((uintptr_t)a % 4096, 0);
	cr_assert_eq(thread_buffer(THREAD_BUFFER_GUEST, 65536), a, "a buffer big enough is reused");
	char *big = thread_buffer(THREAD_BUFFER_GUEST, 1 << 20);
	cr_assert_not_null(big);
	cr_assert_eq((uintptr_t)big % 4096, 0);
	memset(big, 1, 1 << 20);
	cr_assert_eq(thread_buffer(THREAD_BUFFER_GUEST, 10), big);
}

/* ---- buffer_is_zero ----------------------------------------------------- */

Test(util, buffer_is_zero_every_offset_and_length)
{
	/* Nonzero guard bytes on both sides must not be looked at. */
	static _Alignas(64) unsigned char buf[256];

	for (size_t start = 0; start < 16; start++) {
		for (size_t len = 0; len <= 100; len++) {
			memset(buf, 0xa5, sizeof(buf));
			memset(buf + start, 0, len);
			cr_assert(buffer_is_zero(buf + start, len), "start %zu len %zu: zeros not seen as zero", start,
				  len);
			for (size_t i = 0; i < len; i++) {
				buf[start + i] = 1;
				cr_assert(!buffer_is_zero(buf + start, len), "start %zu len %zu: byte %zu missed", start,
					  len, i);
				buf[start + i] = 0x80;
				cr_assert(!buffer_is_zero(buf + start, len));
				buf[start + i] = 0;
			}
		}
	}
}

Test(util, buffer_is_zero_large)
{
	size_t len = 4 * MiB;
	unsigned char *buf = calloc(1, len + 1);

	cr_assert_not_null(buf);
	cr_assert(buffer_is_zero(buf, len));
	cr_assert(buffer_is_zero(buf + 1, len - 1));
	buf[len - 1] = 1;
	cr_assert(!buffer_is_zero(buf, len));
	cr_assert(!buffer_is_zero(buf + 3, len - 3));
	cr_assert(buffer_is_zero(buf, len - 1));
	buf[len - 1] = 0;
	buf[len / 2 + 5] = 0x40;
	cr_assert(!buffer_is_zero(buf, len));
	cr_assert(buffer_is_zero(buf, len / 2 + 5));
	free(buf);
}

/* ---- strbuf ------------------------------------------------------------- */

Test(strbuf, printf_appends)
{
	struct strbuf sb = { 0 };

	strbuf_printf(&sb, "id=%s\n", "job-1");
	strbuf_printf(&sb, "%s", "");
	strbuf_printf(&sb, "bytes=%llu\n", 12345ull);
	cr_assert(!sb.failed);
	cr_assert_eq(sb.len, strlen("id=job-1\nbytes=12345\n"));
	cr_assert_str_eq(sb.data, "id=job-1\nbytes=12345\n");
	char *text = strbuf_steal(&sb);
	cr_assert_str_eq(text, "id=job-1\nbytes=12345\n");
	cr_assert_null(sb.data, "steal must reset the buffer");
	cr_assert_eq(sb.len, 0);
	cr_assert_eq(sb.cap, 0);
	free(text);
}

Test(strbuf, grows)
{
	struct strbuf sb = { 0 };
	char chunk[1000], want[20001];

	memset(chunk, 'x', sizeof(chunk) - 1);
	chunk[sizeof(chunk) - 1] = '\0';
	want[0] = '\0';
	for (int i = 0; i < 20; i++) {
		chunk[0] = (char)('a' + i);
		strbuf_printf(&sb, "%s", chunk);
		strcat(want, chunk);
		cr_assert_eq(sb.len, strlen(want));
		cr_assert_lt(sb.len, sb.cap);
	}
	cr_assert_str_eq(sb.data, want);
	/* One append bigger than twice the capacity. */
	char *huge = malloc(100000);
	memset(huge, 'y', 99999);
	huge[99999] = '\0';
	strbuf_printf(&sb, "%s", huge);
	cr_assert_eq(sb.len, strlen(want) + 99999);
	cr_assert_eq(memcmp(sb.data + strlen(want), huge, 99999), 0);
	cr_assert_eq(sb.data[sb.len], '\0');
	free(huge);
	strbuf_free(&sb);
	cr_assert_null(sb.data);
	cr_assert_eq(sb.len, 0);
}

Test(strbuf, steal_empty_and_failed)
{
	struct strbuf sb = { 0 };
	char *text = strbuf_steal(&sb);

	cr_assert_not_null(text, "an empty buffer steals as \"\"");
	cr_assert_str_eq(text, "");
	free(text);

	/* Once failed, appends are ignored and the caller reports ENOMEM. */
	sb.failed = true;
	strbuf_printf(&sb, "lost %d", 1);
	cr_assert_null(sb.data);
	cr_assert_eq(sb.len, 0);
	cr_assert_null(strbuf_steal(&sb));
	cr_assert(!sb.failed, "steal resets the failed flag too");
}

/* ---- ratelimit ---------------------------------------------------------- */

static const uint64_t t0 = 1000 * SEC;

Test(ratelimit, unlimited)
{
	struct ratelimit rl = { 0 };

	ratelimit_set(&rl, 0);
	cr_assert_eq(ratelimit_delay(&rl, t0), 0);
	ratelimit_charge(&rl, t0, 1ull << 40);
	cr_assert_eq(ratelimit_delay(&rl, t0), 0, "rate 0 must never delay");
	cr_assert_eq(rl.next_ns, 0);
}

Test(ratelimit, one_mib_per_second)
{
	struct ratelimit rl = { 0 };

	ratelimit_set(&rl, MiB);
	cr_assert_eq(ratelimit_delay(&rl, t0), 0, "a fresh limiter delays nothing");
	ratelimit_charge(&rl, t0, MiB);
	uint64_t d = ratelimit_delay(&rl, t0);
	/* Exactly a second: no idle time is credited. */
	cr_assert_eq(d, SEC, "delay %llu ns", (unsigned long long)d);

	/* Steady state: going exactly when allowed, 1 MiB costs exactly 1 s. */
	uint64_t now = t0 + d;
	cr_assert_eq(ratelimit_delay(&rl, now), 0);
	ratelimit_charge(&rl, now, MiB);
	cr_assert_eq(ratelimit_delay(&rl, now), SEC);
	/* Part of the wait has passed. */
	cr_assert_eq(ratelimit_delay(&rl, now + 400 * MS), 600 * MS);
	cr_assert_eq(ratelimit_delay(&rl, now + SEC), 0);
	cr_assert_eq(ratelimit_delay(&rl, now + 5 * SEC), 0);

	/* Charges before the clock caught up add up. */
	ratelimit_charge(&rl, now, MiB / 2);
	cr_assert_eq(ratelimit_delay(&rl, now), SEC + 500 * MS);
}

Test(ratelimit, small_charges_add_up)
{
	struct ratelimit rl = { 0 };
	uint64_t now = t0;

	ratelimit_set(&rl, 10 * MiB);
	ratelimit_charge(&rl, now, 0);
	now = rl.next_ns > now ? rl.next_ns : now;
	uint64_t start = rl.next_ns;
	for (int i = 0; i < 160; i++)
		ratelimit_charge(&rl, now, 64 * 1024);
	/* 10 MiB at 10 MiB/s. */
	cr_assert_eq(rl.next_ns - start, SEC);
}

Test(ratelimit, idle_time_is_not_banked)
{
	struct ratelimit rl = { 0 };

	ratelimit_set(&rl, MiB);
	ratelimit_charge(&rl, t0, MiB);
	/* Ten idle seconds later, nothing of them is credited to a burst. */
	uint64_t later = t0 + 10 * SEC;
	cr_assert_eq(ratelimit_delay(&rl, later), 0);
	ratelimit_charge(&rl, later, 2 * MiB);
	cr_assert_eq(ratelimit_delay(&rl, later), 2 * SEC);
}

Test(ratelimit, booked_then_refunded)
{
	struct ratelimit rl = { 0 };

	ratelimit_set(&rl, MiB);
	/* Two workers book a chunk each before copying: the second waits. */
	ratelimit_charge(&rl, t0, MiB / 4);
	cr_assert_eq(ratelimit_delay(&rl, t0), 250 * MS);
	ratelimit_charge(&rl, t0 + 250 * MS, MiB / 4);
	cr_assert_eq(ratelimit_delay(&rl, t0), 500 * MS);
	/* The second found only holes: what it did not read comes back. */
	ratelimit_refund(&rl, t0 + 250 * MS, MiB / 4);
	cr_assert_eq(ratelimit_delay(&rl, t0), 250 * MS);
	/* Never into the past. */
	ratelimit_refund(&rl, t0 + 100 * MS, MiB);
	cr_assert_eq(ratelimit_delay(&rl, t0 + 100 * MS), 0);
	cr_assert_eq(rl.next_ns, t0 + 100 * MS);
}

Test(ratelimit, rate_change)
{
	struct ratelimit rl = { 0 };

	ratelimit_set(&rl, MiB);
	cr_assert_eq(rl.rate, MiB);
	ratelimit_charge(&rl, t0, MiB);
	ratelimit_set(&rl, 0);
	cr_assert_eq(ratelimit_delay(&rl, t0), 0, "switching to unlimited drops the pending delay");
}

Test(ratelimit, huge_charge_does_not_overflow)
{
	struct ratelimit rl = { 0 };

	ratelimit_set(&rl, 1ull << 40);
	ratelimit_charge(&rl, t0, 1ull << 50);
	/* 2^50 B at 2^40 B/s = 1024 s. */
	cr_assert_eq(ratelimit_delay(&rl, t0), 1024 * SEC);
}

Test(ratelimit, chunk)
{
	struct ratelimit rl = { 0 };
	uint64_t unit = 64 * 1024, max = 4 * MiB;

	cr_assert_eq(ratelimit_chunk(&rl, unit, max), max, "unlimited: the largest chunk");
	ratelimit_set(&rl, MiB);
	/* A fiftieth of 1 MiB is 20971 B: never below one 64K unit. */
	cr_assert_eq(ratelimit_chunk(&rl, unit, max), unit);
	ratelimit_set(&rl, 6 * MiB);
	/* 125829 B, rounded down to one unit. */
	cr_assert_eq(ratelimit_chunk(&rl, unit, max), unit);
	ratelimit_set(&rl, 20 * MiB);
	/* 419430 B: 6 units. */
	cr_assert_eq(ratelimit_chunk(&rl, unit, max), 6 * unit);
	ratelimit_set(&rl, 1000);
	cr_assert_eq(ratelimit_chunk(&rl, unit, max), unit, "never below one unit");
	ratelimit_set(&rl, 1);
	cr_assert_eq(ratelimit_chunk(&rl, unit, max), unit);
	ratelimit_set(&rl, 1ull << 40);
	cr_assert_eq(ratelimit_chunk(&rl, unit, max), max, "never above max");
	ratelimit_set(&rl, 80 * MiB);
	/* 1677721 B: 25 units. */
	cr_assert_eq(ratelimit_chunk(&rl, unit, max), 25 * unit);
	ratelimit_set(&rl, 400 * MiB);
	cr_assert_eq(ratelimit_chunk(&rl, unit, max), max);
	for (uint64_t rate = 1000; rate < 100 * MiB; rate = rate * 3 + 7) {
		ratelimit_set(&rl, rate);
		uint64_t c = ratelimit_chunk(&rl, unit, max);
		cr_assert_eq(c % unit, 0, "rate %llu: chunk %llu", (unsigned long long)rate, (unsigned long long)c);
		cr_assert_geq(c, unit);
		cr_assert_leq(c, max);
		cr_assert_leq(c, rate / 50 > unit ? rate / 50 : unit);
	}
}

/* ---- latency ------------------------------------------------------------ */

static struct latency_histogram hist;

Test(latency, empty)
{
	memset(&hist, 0, sizeof(hist));
	cr_assert_eq(latency_percentile(&hist, 0), 0);
	cr_assert_eq(latency_percentile(&hist, 500), 0);
	cr_assert_eq(latency_percentile(&hist, 1000), 0);
}

Test(latency, small_values_exact)
{
	memset(&hist, 0, sizeof(hist));
	for (uint64_t v = 0; v < 8; v++)
		latency_record(&hist, v);
	cr_assert_eq(latency_percentile(&hist, 0), 0);
	cr_assert_eq(latency_percentile(&hist, 125), 0);
	cr_assert_eq(latency_percentile(&hist, 126), 1);
	cr_assert_eq(latency_percentile(&hist, 500), 3);
	cr_assert_eq(latency_percentile(&hist, 1000), 7);
}

static void assert_within(uint64_t got, uint64_t exact, unsigned permille)
{
	cr_assert_geq(got, exact, "p%u: %llu below the exact %llu", permille, (unsigned long long)got,
		      (unsigned long long)exact);
	cr_assert_leq(got - exact, exact / 8, "p%u: %llu more than 12.5%% above the exact %llu", permille,
		      (unsigned long long)got, (unsigned long long)exact);
}

Test(latency, uniform_one_to_thousand)
{
	memset(&hist, 0, sizeof(hist));
	for (uint64_t v = 1; v <= 1000; v++)
		latency_record(&hist, v);
	assert_within(latency_percentile(&hist, 500), 500, 500);
	assert_within(latency_percentile(&hist, 990), 990, 990);
	assert_within(latency_percentile(&hist, 999), 999, 999);
	assert_within(latency_percentile(&hist, 1000), 1000, 1000);
	assert_within(latency_percentile(&hist, 100), 100, 100);
	cr_assert_eq(latency_percentile(&hist, 1), 1);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Against exact percentiles of random data spread over many magnitudes. */
Test(latency, random_within_an_eighth)
{
	enum { N = 5000 };
	static uint64_t values[N];
	static const unsigned permilles[] = { 0, 1, 10, 100, 250, 500, 750, 900, 950, 990, 999, 1000 };
	uint64_t seed = 42;

	memset(&hist, 0, sizeof(hist));
	for (int i = 0; i < N; i++) {
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		unsigned bits = (unsigned)(seed >> 58);  /* 0..63 */
		uint64_t v = (seed >> 6) >> (63 - bits);  /* up to `bits` bits wide */
		values[i] = v;
		latency_record(&hist, v);
	}
	qsort(values, N, sizeof(values[0]), cmp_u64);
	for (size_t i = 0; i < sizeof(permilles) / sizeof(permilles[0]); i++) {
		unsigned p = permilles[i];
		uint64_t rank = ((uint64_t)N * p + 999) / 1000;
		if (!rank)
			rank = 1;
		uint64_t exact = values[rank - 1];
		uint64_t got = latency_percentile(&hist, p);
		if (exact < 8)
			cr_assert_eq(got, exact, "p%u", p);
		else
			assert_within(got, exact, p);
	}
}

Test(latency, extremes)
{
	memset(&hist, 0, sizeof(hist));
	latency_record(&hist, UINT64_MAX);
	cr_assert_eq(latency_percentile(&hist, 500), UINT64_MAX);
	latency_record(&hist, 1ull << 63);
	cr_assert_eq(latency_percentile(&hist, 0), (1ull << 63) + (1ull << 60) - 1);
	memset(&hist, 0, sizeof(hist));
	latency_record(&hist, 1000000);
	assert_within(latency_percentile(&hist, 0), 1000000, 0);
	assert_within(latency_percentile(&hist, 1000), 1000000, 1000);
}

struct recorder {
	uint64_t value;
	unsigned count;
};

static void *record_many(void *arg)
{
	struct recorder *r = arg;
	for (unsigned i = 0; i < r->count; i++)
		latency_record(&hist, r->value);
	return NULL;
}

Test(latency, concurrent_records_all_counted)
{
	pthread_t threads[4];
	struct recorder r[4];
	uint64_t total = 0;

	memset(&hist, 0, sizeof(hist));
	for (unsigned i = 0; i < 4; i++) {
		/* Two threads share each bucket. */
		r[i] = (struct recorder){ .value = i < 2 ? 100 : 5000, .count = 100000 };
		cr_assert_eq(pthread_create(&threads[i], NULL, record_many, &r[i]), 0);
	}
	for (unsigned i = 0; i < 4; i++)
		pthread_join(threads[i], NULL);
	for (unsigned b = 0; b < LATENCY_BUCKETS; b++)
		total += atomic_load(&hist.count[b]);
	cr_assert_eq(total, 400000);
	assert_within(latency_percentile(&hist, 500), 100, 500);
	assert_within(latency_percentile(&hist, 501), 5000, 501);
}

/* ---- bufpool --------------------------------------------------------------- */

Test(bufpool, buffers_come_back_aligned_and_are_used_again)
{
	bufpool_attach();
	void *a = bufpool_get(1 << 20);
	cr_assert_not_null(a);
	cr_assert_eq((uintptr_t)a % 4096, 0);
	memset(a, 0xab, 1 << 20);   /* the whole length is usable */
	bufpool_put(a, 1 << 20);
	cr_assert_eq(bufpool_pooled_bytes(), 1 << 20);
	/* A run of another length in the same class gets the same buffer. */
	void *b = bufpool_get(768 << 10);
	cr_assert_eq(b, a, "a pooled buffer of the class was not used again");
	cr_assert_eq(bufpool_pooled_bytes(), 0);
	/* Another class does not get it. */
	bufpool_put(b, 768 << 10);
	void *c = bufpool_get(64 << 10);
	cr_assert_neq(c, a);
	memset(c, 1, 64 << 10);
	bufpool_put(c, 64 << 10);
	cr_assert_eq(bufpool_pooled_bytes(), (1 << 20) + (64 << 10));
	bufpool_detach();
	cr_assert_eq(bufpool_pooled_bytes(), 0, "the last user's detach did not empty the pool");
	/* With no user, what comes back is freed, not kept. */
	void *d = bufpool_get(64 << 10);
	bufpool_put(d, 64 << 10);
	cr_assert_eq(bufpool_pooled_bytes(), 0);
}

Test(bufpool, a_shared_buffer_goes_back_when_its_last_holder_lets_go)
{
	bufpool_attach();
	void *data = bufpool_get(256 << 10);
	struct shared_buffer *b = bufpool_share(data, 256 << 10);
	cr_assert_not_null(b);
	shared_buffer_hold(b);      /* a target keeps it */
	shared_buffer_release(b);   /* the queue is done */
	cr_assert_eq(bufpool_pooled_bytes(), 0, "put back while a holder still had it");
	shared_buffer_release(b);   /* the target lets go */
	cr_assert_eq(bufpool_pooled_bytes(), 256 << 10);
	cr_assert_eq(bufpool_get(256 << 10), data);
	bufpool_put(data, 256 << 10);
	bufpool_detach();
}

Test(bufpool, keeps_at_most_its_share_and_never_pools_huge_ones)
{
	bufpool_attach();
	enum { N = BUFPOOL_KEEP / (4 << 20) + 4 };
	void *bufs[N];
	for (int i = 0; i < N; i++)
		cr_assert_not_null(bufs[i] = bufpool_get(4 << 20));
	for (int i = 0; i < N; i++)
		bufpool_put(bufs[i], 4 << 20);
	cr_assert_eq(bufpool_pooled_bytes(), BUFPOOL_KEEP, "pooled %llu", (unsigned long long)bufpool_pooled_bytes());
	void *huge = bufpool_get(BUFPOOL_LARGEST + 1);
	cr_assert_not_null(huge);
	cr_assert_eq((uintptr_t)huge % 4096, 0);
	bufpool_put(huge, BUFPOOL_LARGEST + 1);
	cr_assert_eq(bufpool_pooled_bytes(), BUFPOOL_KEEP);
	bufpool_detach();
}

/* Threads getting and putting at once: every buffer handed out is handed
 * to one thread only (each fills and checks its own). */
static void *pool_churn(void *arg)
{
	unsigned char tag = (unsigned char)(uintptr_t)arg;
	for (int i = 0; i < 2000; i++) {
		size_t len = (size_t)(4096u << (i % 6));
		unsigned char *buf = bufpool_get(len);
		if (!buf)
			return (void *)1;
		memset(buf, tag, len);
		for (size_t j = 0; j < len; j += 512)
			if (buf[j] != tag)
				return (void *)1;
		bufpool_put(buf, len);
	}
	return NULL;
}

Test(bufpool, threads_never_share_a_buffer)
{
	pthread_t t[4];
	bufpool_attach();
	for (uintptr_t i = 0; i < 4; i++)
		cr_assert_eq(pthread_create(&t[i], NULL, pool_churn, (void *)(i + 1)), 0);
	for (int i = 0; i < 4; i++) {
		void *ret;
		pthread_join(t[i], &ret);
		cr_assert_null(ret, "thread %d saw another thread's bytes", i);
	}
	bufpool_detach();
}
