/* latency: see include/fleecefs/latency.h */
#include "config.h"

#include "fleecefs/latency.h"
#include "fleecefs/util.h"

static unsigned bucket_of(uint64_t v)
{
	if (v < (1u << LATENCY_SUB_BITS))
		return (unsigned)v;
	unsigned exp = log2_u64(v);
	unsigned sub = (unsigned)(v >> (exp - LATENCY_SUB_BITS)) & ((1u << LATENCY_SUB_BITS) - 1);
	return ((exp - LATENCY_SUB_BITS + 1) << LATENCY_SUB_BITS) + sub;
}

/* Upper bound of a bucket (the value reported for it). */
static uint64_t bucket_top(unsigned b)
{
	if (b < (1u << LATENCY_SUB_BITS))
		return b;
	unsigned exp = (b >> LATENCY_SUB_BITS) + LATENCY_SUB_BITS - 1;
	uint64_t sub = b & ((1u << LATENCY_SUB_BITS) - 1);
	uint64_t base = (1ull << exp) | (sub << (exp - LATENCY_SUB_BITS));
	return base + (1ull << (exp - LATENCY_SUB_BITS)) - 1;
}

void latency_record(struct latency_histogram *h, uint64_t us)
{
	unsigned b = bucket_of(us);
	if (b >= LATENCY_BUCKETS)
		b = LATENCY_BUCKETS - 1;
	atomic_fetch_add_explicit(&h->count[b], 1, memory_order_relaxed);
}

uint64_t latency_percentile(const struct latency_histogram *h, unsigned permille)
{
	uint64_t total = 0, seen = 0;

	for (unsigned b = 0; b < LATENCY_BUCKETS; b++)
		total += atomic_load_explicit(&h->count[b], memory_order_relaxed);
	if (!total)
		return 0;
	if (permille > 1000)
		permille = 1000;
	uint64_t rank = div_round_up(total * permille, 1000);
	if (!rank)
		rank = 1;
	for (unsigned b = 0; b < LATENCY_BUCKETS; b++) {
		seen += atomic_load_explicit(&h->count[b], memory_order_relaxed);
		if (seen >= rank)
			return bucket_top(b);
	}
	return bucket_top(LATENCY_BUCKETS - 1);
}
