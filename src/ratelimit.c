/* ratelimit: see include/fleecefs/ratelimit.h */
#include "config.h"

#include "fleecefs/ratelimit.h"
#include "fleecefs/util.h"

/* Chunks are this much of a second's worth. Admissions in any one-second
 * window are the rate give or take one chunk; what reaches the target in a
 * window may also hold the chunks in flight when it opened (one per copy
 * worker, late when the target was slow), so each chunk is 2 %: three of
 * them stay well inside the 10 % that speed= promises per second. */
#define CHUNKS_PER_SECOND 50

void ratelimit_set(struct ratelimit *rl, uint64_t rate)
{
	/* The debt was counted at the old rate (at 1 KiB/s one chunk is a
	 * minute ahead): a new rate starts from now. */
	if (rate != rl->rate)
		rl->next_ns = 0;
	rl->rate = rate;
}

uint64_t ratelimit_delay(const struct ratelimit *rl, uint64_t now_ns)
{
	if (!rl->rate || rl->next_ns <= now_ns)
		return 0;
	return rl->next_ns - now_ns;
}

static uint64_t cost_ns(const struct ratelimit *rl, uint64_t n)
{
	/* n * 1e9 / rate without overflow for n up to 16 EiB / 1e9. */
	return (uint64_t)((__uint128_t)n * 1000000000u / rl->rate);
}

void ratelimit_charge(struct ratelimit *rl, uint64_t now_ns, uint64_t n)
{
	if (!rl->rate)
		return;
	/* Idle time is not banked: after a pause or a slow stretch the copy
	 * goes on at the rate, never faster. */
	uint64_t start = rl->next_ns > now_ns ? rl->next_ns : now_ns;
	rl->next_ns = start + cost_ns(rl, n);
}

void ratelimit_refund(struct ratelimit *rl, uint64_t now_ns, uint64_t n)
{
	if (!rl->rate)
		return;
	uint64_t cost = cost_ns(rl, n);
	rl->next_ns = rl->next_ns > now_ns + cost ? rl->next_ns - cost : now_ns;
}

uint64_t ratelimit_chunk(const struct ratelimit *rl, uint64_t unit, uint64_t max)
{
	uint64_t chunk = max;

	if (rl->rate && rl->rate / CHUNKS_PER_SECOND < max)
		chunk = rl->rate / CHUNKS_PER_SECOND / unit * unit;
	return chunk < unit ? unit : chunk;
}
