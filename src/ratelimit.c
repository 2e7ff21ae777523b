/* ratelimit: see include/fleecefs/ratelimit.h */
#include "config.h"

#include "fleecefs/ratelimit.h"
#include "fleecefs/util.h"

#define SLICE_NS 100000000ull

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

void ratelimit_charge(struct ratelimit *rl, uint64_t now_ns, uint64_t n)
{
	if (!rl->rate)
		return;
	/* Idle time counts for at most one slice. */
	uint64_t floor = now_ns > SLICE_NS ? now_ns - SLICE_NS : 0;
	uint64_t start = rl->next_ns > floor ? rl->next_ns : floor;
	/* n * 1e9 / rate without overflow for n up to 16 EiB / 1e9. */
	__uint128_t cost = (__uint128_t)n * 1000000000u / rl->rate;
	rl->next_ns = start + (uint64_t)cost;
}

uint64_t ratelimit_chunk(const struct ratelimit *rl, uint64_t unit, uint64_t max)
{
	uint64_t chunk = max;

	if (rl->rate && rl->rate / 10 < max)
		chunk = rl->rate / 10 / unit * unit;
	return chunk < unit ? unit : chunk;
}
