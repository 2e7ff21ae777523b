/* Unit tests for the atomic cluster bitmap (src/cbitmap.c). */
#include "config.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/util.h"

static struct cbitmap bm;

static void destroy_bm(void)
{
	if (bm.words)
		cbitmap_destroy(&bm);
}

TestSuite(cbitmap, .fini = destroy_bm);

/* The word past nbits must stay zero, so nothing outside the bitmap is ever
 * counted or found. */
static void assert_tail_clear(const struct cbitmap *b)
{
	if (b->nbits % 64 == 0)
		return;
	uint64_t last = atomic_load(&b->words[b->nbits / 64]);
	cr_assert_eq(last >> (b->nbits % 64), 0, "bits past nbits=%llu set: %016llx",
		     (unsigned long long)b->nbits, (unsigned long long)last);
}

Test(cbitmap, init_clear)
{
	static const uint64_t sizes[] = { 1, 63, 64, 65, 100, 127, 128, 129, 1000 };

	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		uint64_t n = sizes[i];
		cr_assert_eq(cbitmap_init(&bm, n, false), 0);
		cr_assert_eq(bm.nbits, n);
		cr_assert_eq(cbitmap_count(&bm), 0);
		cr_assert_eq(cbitmap_next_set(&bm, 0), n, "nbits %llu", (unsigned long long)n);
		cr_assert_eq(cbitmap_next_clear(&bm, 0), 0);
		cr_assert_eq(cbitmap_next_clear(&bm, n - 1), n - 1);
		cr_assert(!cbitmap_any_set(&bm, 0, n + 200));
		for (uint64_t b = 0; b < n; b++)
			cr_assert(!cbitmap_test(&bm, b));
		cbitmap_destroy(&bm);
		cr_assert_null(bm.words);
		cr_assert_eq(bm.nbits, 0);
	}
}

Test(cbitmap, init_set_not_multiple_of_64)
{
	static const uint64_t sizes[] = { 1, 5, 63, 64, 65, 100, 127, 128, 129, 200, 1000 };

	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		uint64_t n = sizes[i];
		cr_assert_eq(cbitmap_init(&bm, n, true), 0);
		assert_tail_clear(&bm);
		cr_assert_eq(cbitmap_count(&bm), n, "nbits %llu: count %llu", (unsigned long long)n,
			     (unsigned long long)cbitmap_count(&bm));
		cr_assert_eq(cbitmap_next_clear(&bm, 0), n, "a bit past nbits was found clear");
		cr_assert_eq(cbitmap_next_clear(&bm, n - 1), n);
		cr_assert_eq(cbitmap_next_set(&bm, n - 1), n - 1);
		cr_assert_eq(cbitmap_next_set(&bm, n), n);
		cr_assert_eq(cbitmap_next_set(&bm, n + 100), n);
		cr_assert(cbitmap_any_set(&bm, n - 1, 1));
		cr_assert(!cbitmap_any_set(&bm, n, 1000), "a bit past nbits was seen set");
		for (uint64_t b = 0; b < n; b++)
			cr_assert(cbitmap_test(&bm, b));
		cbitmap_destroy(&bm);
	}
}

Test(cbitmap, zero_bits)
{
	cr_assert_eq(cbitmap_init(&bm, 0, true), 0);
	cr_assert_eq(cbitmap_count(&bm), 0);
	cr_assert_eq(cbitmap_next_set(&bm, 0), 0);
	cr_assert_eq(cbitmap_next_clear(&bm, 0), 0);
	cr_assert(!cbitmap_any_set(&bm, 0, 64));
	cbitmap_fill(&bm, true);
	cr_assert_eq(cbitmap_count(&bm), 0);
	cbitmap_set_range(&bm, 0, 10);
	cr_assert_eq(cbitmap_count(&bm), 0);
}

Test(cbitmap, set_clear_test)
{
	cr_assert_eq(cbitmap_init(&bm, 200, false), 0);
	static const uint64_t bits[] = { 0, 1, 62, 63, 64, 65, 127, 128, 199 };
	for (size_t i = 0; i < sizeof(bits) / sizeof(bits[0]); i++) {
		cbitmap_set(&bm, bits[i]);
		cr_assert(cbitmap_test(&bm, bits[i]));
		cr_assert_eq(cbitmap_count(&bm), i + 1);
	}
	cr_assert(!cbitmap_test(&bm, 2));
	cr_assert(!cbitmap_test(&bm, 126));
	cr_assert(!cbitmap_test(&bm, 198));
	/* Setting twice is idempotent. */
	cbitmap_set(&bm, 64);
	cr_assert_eq(cbitmap_count(&bm), 9);

	cbitmap_clear(&bm, 64);
	cr_assert(!cbitmap_test(&bm, 64));
	cr_assert(cbitmap_test(&bm, 63));
	cr_assert(cbitmap_test(&bm, 65));
	cr_assert_eq(cbitmap_count(&bm), 8);
	cbitmap_clear(&bm, 64);
	cr_assert_eq(cbitmap_count(&bm), 8);
	cbitmap_clear(&bm, 199);
	cr_assert_eq(cbitmap_next_set(&bm, 129), 200);
}

Test(cbitmap, ranges_across_words)
{
	cr_assert_eq(cbitmap_init(&bm, 300, false), 0);
	cbitmap_set_range(&bm, 60, 10);
	cr_assert_eq(cbitmap_count(&bm), 10);
	cr_assert(!cbitmap_test(&bm, 59));
	cr_assert(cbitmap_test(&bm, 60));
	cr_assert(cbitmap_test(&bm, 63));
	cr_assert(cbitmap_test(&bm, 64));
	cr_assert(cbitmap_test(&bm, 69));
	cr_assert(!cbitmap_test(&bm, 70));
	cr_assert_eq(cbitmap_next_set(&bm, 0), 60);
	cr_assert_eq(cbitmap_next_clear(&bm, 60), 70);

	/* A range over several whole words plus partial ends. */
	cbitmap_set_range(&bm, 5, 250);
	cr_assert_eq(cbitmap_count(&bm), 250);
	cr_assert_eq(cbitmap_next_set(&bm, 0), 5);
	cr_assert_eq(cbitmap_next_clear(&bm, 5), 255);

	cbitmap_clear_range(&bm, 63, 66);
	cr_assert_eq(cbitmap_count(&bm), 250 - 66);
	cr_assert(cbitmap_test(&bm, 62));
	cr_assert(!cbitmap_test(&bm, 63));
	cr_assert(!cbitmap_test(&bm, 128));
	cr_assert(cbitmap_test(&bm, 129));
	cr_assert_eq(cbitmap_next_clear(&bm, 5), 63);
	cr_assert_eq(cbitmap_next_set(&bm, 63), 129);

	/* Exactly one word, aligned. */
	cbitmap_fill(&bm, false);
	cbitmap_set_range(&bm, 128, 64);
	cr_assert_eq(cbitmap_count(&bm), 64);
	cr_assert_eq(cbitmap_next_set(&bm, 0), 128);
	cr_assert_eq(cbitmap_next_clear(&bm, 128), 192);
	cbitmap_clear_range(&bm, 128, 64);
	cr_assert_eq(cbitmap_count(&bm), 0);

	/* An empty range changes nothing. */
	cbitmap_set_range(&bm, 10, 0);
	cr_assert_eq(cbitmap_count(&bm), 0);
}

Test(cbitmap, ranges_clamped_at_nbits)
{
	cr_assert_eq(cbitmap_init(&bm, 100, false), 0);
	cbitmap_set_range(&bm, 90, 1000);
	cr_assert_eq(cbitmap_count(&bm), 10);
	assert_tail_clear(&bm);
	cr_assert_eq(cbitmap_next_clear(&bm, 90), 100);
	cr_assert(cbitmap_any_set(&bm, 95, UINT64_MAX - 95));
	cbitmap_clear_range(&bm, 95, 1000);
	cr_assert_eq(cbitmap_count(&bm), 5);
	cr_assert_eq(cbitmap_next_set(&bm, 95), 100);
	cbitmap_set_range(&bm, 100, 10);
	cr_assert_eq(cbitmap_count(&bm), 5);
	assert_tail_clear(&bm);
}

Test(cbitmap, any_set)
{
	cr_assert_eq(cbitmap_init(&bm, 256, false), 0);
	cbitmap_set(&bm, 64);
	cbitmap_set(&bm, 200);
	cr_assert(cbitmap_any_set(&bm, 0, 65));
	cr_assert(!cbitmap_any_set(&bm, 0, 64));
	cr_assert(cbitmap_any_set(&bm, 64, 1));
	cr_assert(!cbitmap_any_set(&bm, 65, 135));
	cr_assert(cbitmap_any_set(&bm, 65, 136));
	cr_assert(cbitmap_any_set(&bm, 10, 246));
	cr_assert(!cbitmap_any_set(&bm, 201, 55));
	cr_assert(!cbitmap_any_set(&bm, 64, 0), "an empty range has nothing set");
	cr_assert(!cbitmap_any_set(&bm, 300, 10));
}

Test(cbitmap, next_set_and_clear)
{
	cr_assert_eq(cbitmap_init(&bm, 200, false), 0);
	cbitmap_set(&bm, 3);
	cbitmap_set(&bm, 70);
	cbitmap_set(&bm, 71);
	cbitmap_set(&bm, 190);
	cr_assert_eq(cbitmap_next_set(&bm, 0), 3);
	cr_assert_eq(cbitmap_next_set(&bm, 3), 3);
	cr_assert_eq(cbitmap_next_set(&bm, 4), 70);
	cr_assert_eq(cbitmap_next_set(&bm, 64), 70);
	cr_assert_eq(cbitmap_next_set(&bm, 71), 71);
	cr_assert_eq(cbitmap_next_set(&bm, 72), 190);
	cr_assert_eq(cbitmap_next_set(&bm, 191), 200);
	cr_assert_eq(cbitmap_next_set(&bm, 199), 200);
	cr_assert_eq(cbitmap_next_set(&bm, 200), 200);
	cr_assert_eq(cbitmap_next_clear(&bm, 3), 4);
	cr_assert_eq(cbitmap_next_clear(&bm, 70), 72);

	cbitmap_fill(&bm, true);
	cbitmap_clear(&bm, 130);
	cr_assert_eq(cbitmap_next_clear(&bm, 0), 130);
	cr_assert_eq(cbitmap_next_clear(&bm, 130), 130);
	cr_assert_eq(cbitmap_next_clear(&bm, 131), 200);
	cr_assert_eq(cbitmap_next_set(&bm, 130), 131);
}

Test(cbitmap, fill)
{
	cr_assert_eq(cbitmap_init(&bm, 130, false), 0);
	cbitmap_fill(&bm, true);
	cr_assert_eq(cbitmap_count(&bm), 130);
	assert_tail_clear(&bm);
	cbitmap_fill(&bm, false);
	cr_assert_eq(cbitmap_count(&bm), 0);
	cr_assert_eq(cbitmap_next_set(&bm, 0), 130);
	cbitmap_fill(&bm, true);
	cr_assert_eq(cbitmap_next_clear(&bm, 0), 130);
}

/* Random operations against a plain bool array, for many sizes around word
 * boundaries. A fixed seed keeps it deterministic. */
Test(cbitmap, matches_reference_model)
{
	uint64_t seed = 0x9e3779b97f4a7c15ull;
	bool ref[300];

	for (uint64_t n = 1; n <= 260; n += (n < 140 ? 1 : 7)) {
		cr_assert_eq(cbitmap_init(&bm, n, (n & 1) != 0), 0);
		for (uint64_t b = 0; b < n; b++)
			ref[b] = (n & 1) != 0;
		for (int op = 0; op < 200; op++) {
			seed = seed * 6364136223846793005ull + 1442695040888963407ull;
			uint64_t r = seed >> 33;
			uint64_t a = r % n, count = (r >> 12) % (n + 10);
			switch (r % 5) {
			case 0:
				cbitmap_set(&bm, a);
				ref[a] = true;
				break;
			case 1:
				cbitmap_clear(&bm, a);
				ref[a] = false;
				break;
			case 2:
			case 3: {
				bool value = (r % 5) == 2;
				if (value)
					cbitmap_set_range(&bm, a, count);
				else
					cbitmap_clear_range(&bm, a, count);
				for (uint64_t b = a; b < n && b < a + count; b++)
					ref[b] = value;
				break;
			}
			default:
				cbitmap_fill(&bm, (r >> 20) & 1);
				for (uint64_t b = 0; b < n; b++)
					ref[b] = (r >> 20) & 1;
				break;
			}
			uint64_t want_count = 0, want_next_set = n, want_next_clear = n;
			bool want_any = false;
			for (uint64_t b = 0; b < n; b++) {
				want_count += ref[b];
				if (b >= a && ref[b] && want_next_set == n)
					want_next_set = b;
				if (b >= a && !ref[b] && want_next_clear == n)
					want_next_clear = b;
				if (b >= a && b < a + count && ref[b])
					want_any = true;
			}
			cr_assert_eq(cbitmap_count(&bm), want_count, "n %llu op %d", (unsigned long long)n, op);
			cr_assert_eq(cbitmap_next_set(&bm, a), want_next_set, "n %llu op %d", (unsigned long long)n, op);
			cr_assert_eq(cbitmap_next_clear(&bm, a), want_next_clear, "n %llu op %d",
				     (unsigned long long)n, op);
			cr_assert_eq(cbitmap_any_set(&bm, a, count), want_any, "n %llu op %d", (unsigned long long)n, op);
			cr_assert_eq(cbitmap_test(&bm, a), ref[a]);
			assert_tail_clear(&bm);
		}
		cbitmap_destroy(&bm);
	}
}

/* ---- concurrency -------------------------------------------------------- */

#define NTHREADS 4
#define CONC_BITS 128 /* two words, so threads collide often */
#define RUN_NS 500000000ull

struct toggler {
	unsigned index;
	atomic_bool *go, *stop;
	unsigned lost;   /* times this thread saw its own bit in the wrong state */
	unsigned rounds;
};

/* Thread t owns bits t*8 .. t*8+7 of every word. Every word is shared, so a
 * non-atomic read-modify-write would drop the neighbours' updates; few
 * threads and words keep them truly concurrent on few CPUs. */
static void *toggle_bits(void *arg)
{
	struct toggler *t = arg;

	while (!atomic_load(t->go))
		;
	for (unsigned round = 0; !atomic_load_explicit(t->stop, memory_order_relaxed); round++) {
		t->rounds++;
		uint64_t first = (round % (CONC_BITS / 64)) * 64 + t->index * 8;
		uint64_t bit = first + (round / (CONC_BITS / 64)) % 8;
		cbitmap_set(&bm, bit);
		if (!cbitmap_test(&bm, bit))
			t->lost++;
		cbitmap_clear(&bm, bit);
		if (cbitmap_test(&bm, bit))
			t->lost++;
		cbitmap_set_range(&bm, first, 8);
		for (uint64_t b = first; b < first + 8; b++)
			if (!cbitmap_test(&bm, b))
				t->lost++;
		cbitmap_clear_range(&bm, first, 8);
		if (cbitmap_any_set(&bm, first, 8))
			t->lost++;
	}
	/* Leave a known final pattern: the even bits of the owned slices. */
	for (uint64_t w = 0; w < CONC_BITS / 64; w++)
		for (uint64_t k = 0; k < 8; k += 2)
			cbitmap_set(&bm, w * 64 + t->index * 8 + k);
	return NULL;
}

Test(cbitmap, concurrent_distinct_bits_lose_no_update, .timeout = 20)
{
	pthread_t threads[NTHREADS];
	struct toggler t[NTHREADS];
	atomic_bool go = false, stop = false;

	cr_assert_eq(cbitmap_init(&bm, CONC_BITS, false), 0);
	for (unsigned i = 0; i < NTHREADS; i++) {
		t[i] = (struct toggler){ .index = i, .go = &go, .stop = &stop };
		cr_assert_eq(pthread_create(&threads[i], NULL, toggle_bits, &t[i]), 0);
	}
	atomic_store(&go, true);
	sleep_until_ns(clock_monotonic_ns() + RUN_NS);
	atomic_store(&stop, true);
	for (unsigned i = 0; i < NTHREADS; i++)
		pthread_join(threads[i], NULL);
	for (unsigned i = 0; i < NTHREADS; i++) {
		cr_assert_eq(t[i].lost, 0, "thread %u saw %u lost updates of its own bits", i, t[i].lost);
		cr_assert_gt(t[i].rounds, 0, "thread %u never ran", i);
	}
	for (uint64_t bit = 0; bit < CONC_BITS; bit++)
		cr_assert_eq(cbitmap_test(&bm, bit), bit % 64 < NTHREADS * 8 && bit % 2 == 0, "bit %llu",
			     (unsigned long long)bit);
	cr_assert_eq(cbitmap_count(&bm), CONC_BITS / 64 * NTHREADS * 4);
}
