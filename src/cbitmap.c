/* cbitmap: see include/fleecefs/cbitmap.h */
#include "config.h"

#include <errno.h>
#include <stdlib.h>

#include "fleecefs/cbitmap.h"

static uint64_t word_count(uint64_t nbits) { return (nbits + 63) / 64; }

/* Bits [lo, hi) of one word, 0 <= lo < hi <= 64. */
static uint64_t word_mask(unsigned lo, unsigned hi)
{
	uint64_t upper = hi == 64 ? ~0ull : (1ull << hi) - 1;
	return upper & ~((1ull << lo) - 1);
}

/* Bits past nbits in the last word stay zero so counting and scanning never
 * see them. */
static uint64_t last_word_mask(const struct cbitmap *bm)
{
	unsigned tail = (unsigned)(bm->nbits % 64);
	return tail ? word_mask(0, tail) : ~0ull;
}

int cbitmap_init(struct cbitmap *bm, uint64_t nbits, bool all_set)
{
	uint64_t n = word_count(nbits);

	bm->nbits = nbits;
	bm->words = calloc(n ? n : 1, sizeof(*bm->words));
	if (!bm->words)
		return -ENOMEM;
	if (all_set)
		cbitmap_fill(bm, true);
	return 0;
}

void cbitmap_destroy(struct cbitmap *bm)
{
	free((void *)bm->words);
	bm->words = NULL;
	bm->nbits = 0;
}

void cbitmap_set(struct cbitmap *bm, uint64_t bit)
{
	atomic_fetch_or_explicit(&bm->words[bit / 64], 1ull << (bit % 64), memory_order_acq_rel);
}

void cbitmap_clear(struct cbitmap *bm, uint64_t bit)
{
	atomic_fetch_and_explicit(&bm->words[bit / 64], ~(1ull << (bit % 64)), memory_order_release);
}

static void apply_range(struct cbitmap *bm, uint64_t first, uint64_t count, bool set)
{
	uint64_t end = first + count;

	if (end > bm->nbits)
		end = bm->nbits;
	while (first < end) {
		uint64_t w = first / 64;
		unsigned lo = (unsigned)(first % 64);
		unsigned hi = (end - w * 64) >= 64 ? 64 : (unsigned)(end - w * 64);
		uint64_t mask = word_mask(lo, hi);
		if (set)
			atomic_fetch_or_explicit(&bm->words[w], mask, memory_order_acq_rel);
		else
			atomic_fetch_and_explicit(&bm->words[w], ~mask, memory_order_release);
		first = (w + 1) * 64;
	}
}

void cbitmap_set_range(struct cbitmap *bm, uint64_t first, uint64_t count)
{
	apply_range(bm, first, count, true);
}

void cbitmap_clear_range(struct cbitmap *bm, uint64_t first, uint64_t count)
{
	apply_range(bm, first, count, false);
}

void cbitmap_fill(struct cbitmap *bm, bool value)
{
	uint64_t n = word_count(bm->nbits);

	for (uint64_t w = 0; w < n; w++)
		atomic_store_explicit(&bm->words[w], value ? ~0ull : 0, memory_order_release);
	if (value && n)
		atomic_store_explicit(&bm->words[n - 1], last_word_mask(bm), memory_order_release);
}

bool cbitmap_any_set(const struct cbitmap *bm, uint64_t first, uint64_t count)
{
	uint64_t end = first + count;

	if (end > bm->nbits)
		end = bm->nbits;
	while (first < end) {
		uint64_t w = first / 64;
		unsigned lo = (unsigned)(first % 64);
		unsigned hi = (end - w * 64) >= 64 ? 64 : (unsigned)(end - w * 64);
		if (atomic_load_explicit(&bm->words[w], memory_order_acquire) & word_mask(lo, hi))
			return true;
		first = (w + 1) * 64;
	}
	return false;
}

static uint64_t next_matching(const struct cbitmap *bm, uint64_t from, bool want_set)
{
	uint64_t n = word_count(bm->nbits);

	for (uint64_t w = from / 64; from < bm->nbits && w < n; w++) {
		uint64_t word = atomic_load_explicit(&bm->words[w], memory_order_acquire);
		if (!want_set)
			word = ~word;
		word &= word_mask((unsigned)(from > w * 64 ? from - w * 64 : 0), 64);
		if (word) {
			uint64_t bit = w * 64 + (uint64_t)__builtin_ctzll(word);
			return bit < bm->nbits ? bit : bm->nbits;
		}
	}
	return bm->nbits;
}

uint64_t cbitmap_next_set(const struct cbitmap *bm, uint64_t from)
{
	return next_matching(bm, from, true);
}

uint64_t cbitmap_next_clear(const struct cbitmap *bm, uint64_t from)
{
	return next_matching(bm, from, false);
}

/* The status files count bitmaps of millions of bits: a zero word costs a
 * compare, and where the CPU has POPCNT it is used (without it each word
 * is a libgcc call). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
__attribute__((target_clones("popcnt", "default")))
#endif
uint64_t cbitmap_count(const struct cbitmap *bm)
{
	uint64_t n = word_count(bm->nbits), total = 0;

	for (uint64_t w = 0; w < n; w++) {
		uint64_t v = atomic_load_explicit(&bm->words[w], memory_order_relaxed);
		if (v)
			total += (uint64_t)__builtin_popcountll(v);
	}
	return total;
}

void cbitmap_mark_range(struct cbitmap *bm, uint64_t first, uint64_t count)
{
	uint64_t end = first + count;

	if (end > bm->nbits)
		end = bm->nbits;
	while (first < end) {
		uint64_t w = first / 64;
		unsigned lo = (unsigned)(first % 64);
		unsigned hi = (end - w * 64) >= 64 ? 64 : (unsigned)(end - w * 64);
		uint64_t mask = word_mask(lo, hi);
		if ((atomic_load_explicit(&bm->words[w], memory_order_relaxed) & mask) != mask)
			atomic_fetch_or_explicit(&bm->words[w], mask, memory_order_acq_rel);
		first = (w + 1) * 64;
	}
}

void cbitmap_or(struct cbitmap *dst, const struct cbitmap *src)
{
	uint64_t n = word_count(dst->nbits < src->nbits ? dst->nbits : src->nbits);
	for (uint64_t w = 0; w < n; w++) {
		uint64_t v = atomic_load_explicit(&src->words[w], memory_order_acquire);
		if (v)
			atomic_fetch_or_explicit(&dst->words[w], v, memory_order_acq_rel);
	}
}

void cbitmap_copy(struct cbitmap *dst, const struct cbitmap *src)
{
	uint64_t n = word_count(dst->nbits < src->nbits ? dst->nbits : src->nbits);
	for (uint64_t w = 0; w < n; w++)
		atomic_store_explicit(&dst->words[w], atomic_load_explicit(&src->words[w], memory_order_acquire),
				      memory_order_release);
}

uint64_t cbitmap_words(const struct cbitmap *bm)
{
	return word_count(bm->nbits);
}
