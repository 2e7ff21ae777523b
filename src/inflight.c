/* inflight: see include/fleecefs/inflight.h */
#include "config.h"

#include <errno.h>
#include <time.h>

#include "fleecefs/inflight.h"
#include "fleecefs/util.h"

int inflight_init(struct inflight *t, uint64_t nclusters)
{
	int rc = cbitmap_init(&t->claimed, nclusters, false);
	if (rc)
		return rc;
	pthread_mutex_init(&t->lock, NULL);
	cond_init_monotonic(&t->released);
	t->open_claims = 0;
	return 0;
}

void inflight_destroy(struct inflight *t)
{
	pthread_cond_destroy(&t->released);
	pthread_mutex_destroy(&t->lock);
	cbitmap_destroy(&t->claimed);
}

/* First bit >= from in [from, end) that is pending and, when want_unclaimed,
 * not claimed. Word at a time; caller holds the lock. */
static uint64_t next_candidate(const struct inflight *t, const struct cbitmap *pending,
			       uint64_t from, uint64_t end, bool want_unclaimed)
{
	while (from < end) {
		uint64_t w = from / 64;
		uint64_t word = atomic_load_explicit(&pending->words[w], memory_order_acquire);
		if (want_unclaimed)
			word &= ~atomic_load_explicit(&t->claimed.words[w], memory_order_relaxed);
		word &= ~0ull << (from % 64);
		if (word) {
			uint64_t bit = w * 64 + (uint64_t)__builtin_ctzll(word);
			return bit < end ? bit : end;
		}
		from = (w + 1) * 64;
	}
	return end;
}

int inflight_claim(struct inflight *t, const struct cbitmap *pending, uint64_t first, uint64_t end,
		   uint64_t max_run, enum inflight_wait wait, uint64_t deadline_ns,
		   uint64_t *run_first, uint64_t *run_count)
{
	if (end > pending->nbits)
		end = pending->nbits;
	pthread_mutex_lock(&t->lock);
	for (;;) {
		uint64_t c = next_candidate(t, pending, first, end, wait == INFLIGHT_SKIP);
		if (c >= end) {
			pthread_mutex_unlock(&t->lock);
			return 0;
		}
		if (!cbitmap_test(&t->claimed, c)) {
			uint64_t n = 1;
			while (n < max_run && c + n < end && cbitmap_test(pending, c + n) &&
			       !cbitmap_test(&t->claimed, c + n))
				n++;
			cbitmap_set_range(&t->claimed, c, n);
			t->open_claims++;
			pthread_mutex_unlock(&t->lock);
			*run_first = c;
			*run_count = n;
			return 1;
		}
		/* Claimed by another copier: its release either clears the bit or
		 * leaves it pending and unclaimed for us; either way look again. */
		if (deadline_ns) {
			struct timespec ts;
			timespec_from_ns(&ts, deadline_ns);
			if (pthread_cond_timedwait(&t->released, &t->lock, &ts) == ETIMEDOUT &&
			    clock_monotonic_ns() >= deadline_ns) {
				pthread_mutex_unlock(&t->lock);
				return -ETIMEDOUT;
			}
		} else {
			pthread_cond_wait(&t->released, &t->lock);
		}
	}
}

static bool frozen_overlaps(const struct inflight *t, uint64_t first, uint64_t count)
{
	for (const struct frozen_read *r = t->frozen; r; r = r->next)
		if (r->first < first + count && first < r->first + r->count)
			return true;
	return false;
}

void inflight_release(struct inflight *t, struct cbitmap *pending, uint64_t run_first,
		      uint64_t run_count, bool copied)
{
	pthread_mutex_lock(&t->lock);
	/* Readers that started on the source before the claim must finish
	 * before anyone may overwrite it (nobody new starts: it is claimed). */
	while (copied && frozen_overlaps(t, run_first, run_count))
		pthread_cond_wait(&t->released, &t->lock);
	if (copied)
		cbitmap_clear_range(pending, run_first, run_count);
	cbitmap_clear_range(&t->claimed, run_first, run_count);
	t->open_claims--;
	pthread_cond_broadcast(&t->released);
	pthread_mutex_unlock(&t->lock);
}

uint64_t inflight_drop_unclaimed(struct inflight *t, struct cbitmap *pending, uint64_t first, uint64_t count)
{
	uint64_t end = min_u64(first + count, pending->nbits), dropped = 0;

	/* A word at a time, and the lock given back every 4096 words, so that
	 * a huge range (a 1 TiB sparse image) never holds claimers up long. */
	while (first < end) {
		uint64_t stop = min_u64(end, (first / 64 + 4096) * 64);
		pthread_mutex_lock(&t->lock);
		for (uint64_t c = first; c < stop;) {
			uint64_t w = c / 64, lo = c % 64, n = min_u64(64 - lo, stop - c);
			uint64_t mask = (n == 64 ? ~0ull : ((1ull << n) - 1)) << lo;
			uint64_t clear = mask & ~atomic_load_explicit(&t->claimed.words[w], memory_order_relaxed);
			uint64_t old = atomic_fetch_and_explicit(&pending->words[w], ~clear, memory_order_release);
			dropped += (uint64_t)__builtin_popcountll(old & clear);
			c += n;
		}
		pthread_mutex_unlock(&t->lock);
		first = stop;
	}
	return dropped;
}

void inflight_wait_idle(struct inflight *t)
{
	pthread_mutex_lock(&t->lock);
	while (t->open_claims)
		pthread_cond_wait(&t->released, &t->lock);
	pthread_mutex_unlock(&t->lock);
}

uint64_t inflight_read_begin(struct inflight *t, const struct cbitmap *pending, uint64_t first, uint64_t end,
			     uint64_t max_run, struct frozen_read *reg, bool *from_source)
{
	uint64_t n = 1;

	if (end > pending->nbits)
		end = pending->nbits;
	pthread_mutex_lock(&t->lock);
	while (cbitmap_test(&t->claimed, first))
		pthread_cond_wait(&t->released, &t->lock);
	bool source = cbitmap_test(pending, first);
	while (n < max_run && first + n < end && cbitmap_test(pending, first + n) == source &&
	       !cbitmap_test(&t->claimed, first + n))
		n++;
	if (source) {
		*reg = (struct frozen_read){ .first = first, .count = n, .next = t->frozen };
		t->frozen = reg;
	}
	pthread_mutex_unlock(&t->lock);
	*from_source = source;
	return n;
}

void inflight_read_end(struct inflight *t, struct frozen_read *reg)
{
	pthread_mutex_lock(&t->lock);
	for (struct frozen_read **pp = &t->frozen; *pp; pp = &(*pp)->next) {
		if (*pp == reg) {
			*pp = reg->next;
			break;
		}
	}
	pthread_cond_broadcast(&t->released);
	pthread_mutex_unlock(&t->lock);
}

void inflight_discard(struct inflight *t, struct cbitmap *pending, uint64_t first, uint64_t count,
		      struct cbitmap *copied)
{
	uint64_t end = min_u64(first + count, pending->nbits);

	pthread_mutex_lock(&t->lock);
	for (uint64_t c = first; c < end; c++) {
		if (cbitmap_test(&t->claimed, c))
			continue;
		if (cbitmap_test(pending, c))
			cbitmap_clear(pending, c);
		else
			cbitmap_set(copied, c - first);
	}
	pthread_mutex_unlock(&t->lock);
}
