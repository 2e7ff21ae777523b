/* latency: a lock-free histogram of microsecond latencies for percentiles.
 *
 * Buckets are log-linear (8 per power of two), so a percentile is exact to
 * within 12.5 %. Recording is one relaxed atomic increment; reading is a scan.
 * Locking: none (atomics). Errors: none.
 */
#ifndef FLEECEFS_LATENCY_H
#define FLEECEFS_LATENCY_H

#include <stdatomic.h>
#include <stdint.h>

#define LATENCY_SUB_BITS 3
#define LATENCY_BUCKETS (64 << LATENCY_SUB_BITS)

struct latency_histogram {
	atomic_uint_fast64_t count[LATENCY_BUCKETS];
};

void latency_record(struct latency_histogram *h, uint64_t us);
/* The value below which `permille`/1000 of the samples lie; 0 when empty. */
uint64_t latency_percentile(const struct latency_histogram *h, unsigned permille);

#endif
