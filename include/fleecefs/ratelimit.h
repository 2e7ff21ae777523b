/* ratelimit: paces a background copy to a rate in bytes per second.
 *
 * A virtual clock: each charge of n bytes moves `next_ns` forward by
 * n / rate seconds; a caller waits until the clock has caught up, then
 * charges what it is about to copy before it copies (so that two workers
 * never pass together), and gets back what it did not use. Idle time is not
 * banked, so a job that was paused or slow does not burst afterwards.
 * Locking: none inside; the owner (one job) serializes calls with its lock.
 * Errors: none.
 */
#ifndef FLEECEFS_RATELIMIT_H
#define FLEECEFS_RATELIMIT_H

#include <stdint.h>

struct ratelimit {
	uint64_t rate;     /* bytes/s, 0 = unlimited */
	uint64_t next_ns;  /* monotonic time before which nothing more may go */
};

void ratelimit_set(struct ratelimit *rl, uint64_t rate);
/* How long (ns) to wait from now_ns before sending more; 0 = go now. */
uint64_t ratelimit_delay(const struct ratelimit *rl, uint64_t now_ns);
/* Account n bytes about to be sent at now_ns. */
void ratelimit_charge(struct ratelimit *rl, uint64_t now_ns, uint64_t n);
/* n bytes charged were not sent after all. */
void ratelimit_refund(struct ratelimit *rl, uint64_t now_ns, uint64_t n);
/* The chunk size that keeps pacing smooth: a fiftieth of a second's worth,
 * rounded down to a multiple of `unit`, between unit and max. */
uint64_t ratelimit_chunk(const struct ratelimit *rl, uint64_t unit, uint64_t max);

#endif
