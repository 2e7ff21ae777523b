/* Unit tests for the in-flight claim tracker (src/inflight.c). */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/inflight.h"
#include "fleecefs/util.h"

#define MS 1000000ull

static struct inflight tracker;
static struct cbitmap pending;

static void setup(uint64_t nclusters, bool all_pending)
{
	cr_assert_eq(inflight_init(&tracker, nclusters), 0);
	cr_assert_eq(cbitmap_init(&pending, nclusters, all_pending), 0);
}

static void teardown(void)
{
	if (pending.words) {
		inflight_destroy(&tracker);
		cbitmap_destroy(&pending);
	}
}

TestSuite(inflight, .fini = teardown, .timeout = 20);

static void sleep_ms(unsigned ms)
{
	sleep_until_ns(clock_monotonic_ns() + ms * MS);
}

/* Claims and checks the run it gets. */
static void expect_claim(uint64_t first, uint64_t end, uint64_t max_run, enum inflight_wait wait,
			 uint64_t want_first, uint64_t want_count)
{
	uint64_t rf = UINT64_MAX, rc = UINT64_MAX;
	int r = inflight_claim(&tracker, &pending, first, end, max_run, wait, 0, &rf, &rc);

	cr_assert_eq(r, 1, "claim [%llu, %llu) returned %d", (unsigned long long)first, (unsigned long long)end, r);
	cr_assert_eq(rf, want_first, "run starts at %llu, want %llu", (unsigned long long)rf,
		     (unsigned long long)want_first);
	cr_assert_eq(rc, want_count, "run of %llu, want %llu", (unsigned long long)rc, (unsigned long long)want_count);
}

static void expect_nothing(uint64_t first, uint64_t end, enum inflight_wait wait)
{
	uint64_t rf = 12345, rc = 12345;
	int r = inflight_claim(&tracker, &pending, first, end, 16, wait, 0, &rf, &rc);

	cr_assert_eq(r, 0, "claim [%llu, %llu) returned %d (run %llu+%llu)", (unsigned long long)first,
		     (unsigned long long)end, r, (unsigned long long)rf, (unsigned long long)rc);
	cr_assert_eq(rf, 12345, "nothing claimed but the run was written");
}

Test(inflight, claims_first_pending_run)
{
	setup(200, false);
	cbitmap_set_range(&pending, 3, 3);
	cbitmap_set(&pending, 10);
	cbitmap_set_range(&pending, 62, 5);

	expect_claim(0, 200, 8, INFLIGHT_SKIP, 3, 3);
	expect_claim(0, 200, 8, INFLIGHT_SKIP, 10, 1);
	/* Runs continue across a word boundary. */
	expect_claim(0, 200, 8, INFLIGHT_SKIP, 62, 5);
	expect_nothing(0, 200, INFLIGHT_SKIP);
	cr_assert_eq(tracker.open_claims, 3);
	/* Claiming never changes pending. */
	cr_assert_eq(cbitmap_count(&pending), 9);
}

Test(inflight, run_capped_at_max_run)
{
	setup(100, true);
	expect_claim(0, 100, 16, INFLIGHT_SKIP, 0, 16);
	expect_claim(0, 100, 16, INFLIGHT_SKIP, 16, 16);
	expect_claim(0, 100, 1, INFLIGHT_SKIP, 32, 1);
	expect_claim(0, 100, 1000, INFLIGHT_SKIP, 33, 67);
	expect_nothing(0, 100, INFLIGHT_SKIP);
}

Test(inflight, claim_stays_in_range)
{
	setup(100, true);
	expect_claim(50, 60, 100, INFLIGHT_SKIP, 50, 10);
	expect_nothing(50, 60, INFLIGHT_SKIP);
	/* end past nbits is clamped. */
	expect_claim(95, 1000, 100, INFLIGHT_SKIP, 95, 5);
	expect_nothing(100, 1000, INFLIGHT_SKIP);
	expect_nothing(40, 40, INFLIGHT_SKIP);
	expect_claim(40, 41, 100, INFLIGHT_WAIT, 40, 1);
}

Test(inflight, nothing_pending)
{
	setup(100, false);
	expect_nothing(0, 100, INFLIGHT_SKIP);
	expect_nothing(0, 100, INFLIGHT_WAIT);
	cr_assert_eq(tracker.open_claims, 0);
}

Test(inflight, skip_steps_over_claimed)
{
	setup(64, true);
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 0, 8);
	expect_claim(4, 64, 8, INFLIGHT_SKIP, 8, 8);
	/* A run ends where a claimed cluster begins. */
	uint64_t rf, rc;
	cr_assert_eq(inflight_claim(&tracker, &pending, 20, 21, 1, INFLIGHT_SKIP, 0, &rf, &rc), 1);
	expect_claim(16, 64, 100, INFLIGHT_SKIP, 16, 4);
	expect_claim(16, 64, 100, INFLIGHT_SKIP, 21, 43);
	expect_nothing(0, 64, INFLIGHT_SKIP);
}

Test(inflight, wait_claims_unclaimed_without_blocking)
{
	setup(64, false);
	cbitmap_set_range(&pending, 5, 4);
	expect_claim(0, 64, 100, INFLIGHT_WAIT, 5, 4);
}

Test(inflight, release_copied_clears_pending)
{
	setup(64, true);
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 0, 8);
	inflight_release(&tracker, &pending, 0, 8, true);
	cr_assert_eq(tracker.open_claims, 0);
	cr_assert_eq(cbitmap_count(&pending), 56);
	cr_assert_eq(cbitmap_next_set(&pending, 0), 8);
	cr_assert_eq(cbitmap_count(&tracker.claimed), 0);
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 8, 8);
}

Test(inflight, release_not_copied_leaves_pending_and_claimable)
{
	setup(64, true);
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 0, 8);
	inflight_release(&tracker, &pending, 0, 8, false);
	cr_assert_eq(tracker.open_claims, 0);
	cr_assert_eq(cbitmap_count(&pending), 64);
	cr_assert_eq(cbitmap_count(&tracker.claimed), 0);
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 0, 8);
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 8, 8);
}

struct waiter {
	uint64_t first, end, deadline_ns;
	int result;
	uint64_t run_first, run_count;
	atomic_bool *flag;  /* set by the main thread just before it releases */
	bool flag_seen;     /* flag's value when the claim returned */
	atomic_bool done;
};

static void *wait_claim(void *arg)
{
	struct waiter *w = arg;

	w->result = inflight_claim(&tracker, &pending, w->first, w->end, 64, INFLIGHT_WAIT, w->deadline_ns,
				   &w->run_first, &w->run_count);
	w->flag_seen = atomic_load(w->flag);
	atomic_store(&w->done, true);
	return NULL;
}

/* Holds [0, 8) claimed, starts a WAIT claimer on [0, 64) and checks it stays
 * blocked until the release. */
static void wait_for_release(bool copied, struct waiter *w)
{
	static atomic_bool released;
	pthread_t thread;

	setup(64, true);
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 0, 8);
	atomic_store(&released, false);
	*w = (struct waiter){ .first = 0, .end = 64, .flag = &released };
	cr_assert_eq(pthread_create(&thread, NULL, wait_claim, w), 0);
	sleep_ms(50);
	cr_assert(!atomic_load(&w->done), "WAIT claim returned while the cluster ahead was claimed");
	atomic_store(&released, true);
	inflight_release(&tracker, &pending, 0, 8, copied);
	pthread_join(thread, NULL);
	cr_assert(w->flag_seen, "WAIT claim returned before the release");
	cr_assert_eq(w->result, 1);
}

Test(inflight, wait_blocks_until_release_copied)
{
	struct waiter w;

	wait_for_release(true, &w);
	/* The copied run is no longer pending; the waiter takes what follows. */
	cr_assert_eq(w.run_first, 8);
	cr_assert_eq(w.run_count, 56);
}

Test(inflight, wait_blocks_until_release_not_copied)
{
	struct waiter w;

	wait_for_release(false, &w);
	/* Still pending, now unclaimed: the waiter copies it itself. */
	cr_assert_eq(w.run_first, 0);
	cr_assert_eq(w.run_count, 64);
}

Test(inflight, wait_does_not_step_over_a_claim)
{
	pthread_t thread;
	static atomic_bool released;
	struct waiter w = { .first = 0, .end = 64, .flag = &released };

	/* Unclaimed pending clusters lie behind the claimed one; WAIT must still
	 * wait for the claim ahead instead of taking them. */
	setup(64, false);
	cbitmap_set(&pending, 5);
	cbitmap_set_range(&pending, 20, 10);
	expect_claim(0, 6, 8, INFLIGHT_SKIP, 5, 1);
	cr_assert_eq(pthread_create(&thread, NULL, wait_claim, &w), 0);
	sleep_ms(50);
	cr_assert(!atomic_load(&w.done), "WAIT claim stepped over a claimed cluster");
	atomic_store(&released, true);
	inflight_release(&tracker, &pending, 5, 1, true);
	pthread_join(thread, NULL);
	cr_assert(w.flag_seen);
	cr_assert_eq(w.result, 1);
	cr_assert_eq(w.run_first, 20);
	cr_assert_eq(w.run_count, 10);
}

Test(inflight, deadline_times_out)
{
	uint64_t rf = 777, rc = 777;

	setup(64, true);
	expect_claim(0, 8, 8, INFLIGHT_SKIP, 0, 8);
	uint64_t start = clock_monotonic_ns();
	int r = inflight_claim(&tracker, &pending, 0, 64, 8, INFLIGHT_WAIT, start + 50 * MS, &rf, &rc);
	uint64_t elapsed = clock_monotonic_ns() - start;
	cr_assert_eq(r, -ETIMEDOUT, "returned %d", r);
	cr_assert_geq(elapsed, 50 * MS, "timed out early, after %llu ns", (unsigned long long)elapsed);
	cr_assert_lt(elapsed, 5000 * MS, "took %llu ns", (unsigned long long)elapsed);
	cr_assert_eq(rf, 777, "a timed-out claim wrote a run");
	cr_assert_eq(tracker.open_claims, 1, "a timed-out claim must not open a claim");
	cr_assert_eq(cbitmap_count(&tracker.claimed), 8);

	/* A deadline already past fails at once. */
	start = clock_monotonic_ns();
	r = inflight_claim(&tracker, &pending, 0, 64, 8, INFLIGHT_WAIT, 1, &rf, &rc);
	cr_assert_eq(r, -ETIMEDOUT);
	cr_assert_lt(clock_monotonic_ns() - start, 1000 * MS);
}

Test(inflight, deadline_irrelevant_without_conflict)
{
	setup(64, true);
	uint64_t rf, rc;
	/* Past deadline, but nothing to wait for. */
	cr_assert_eq(inflight_claim(&tracker, &pending, 0, 64, 8, INFLIGHT_WAIT, 1, &rf, &rc), 1);
	cr_assert_eq(rf, 0);
	cr_assert_eq(rc, 8);
	/* SKIP never waits, so never times out. */
	cr_assert_eq(inflight_claim(&tracker, &pending, 0, 64, 8, INFLIGHT_SKIP, 1, &rf, &rc), 1);
	cr_assert_eq(rf, 8);
}

Test(inflight, release_before_deadline)
{
	pthread_t thread;
	static atomic_bool released;
	struct waiter w = { .first = 0, .end = 64, .flag = &released };

	setup(64, true);
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 0, 8);
	w.deadline_ns = clock_monotonic_ns() + 10000 * MS;
	cr_assert_eq(pthread_create(&thread, NULL, wait_claim, &w), 0);
	sleep_ms(30);
	atomic_store(&released, true);
	inflight_release(&tracker, &pending, 0, 8, true);
	pthread_join(thread, NULL);
	cr_assert(w.flag_seen);
	cr_assert_eq(w.result, 1, "returned %d", w.result);
	cr_assert_eq(w.run_first, 8);
}

Test(inflight, drop_unclaimed)
{
	setup(128, true);
	expect_claim(10, 128, 5, INFLIGHT_SKIP, 10, 5);
	inflight_drop_unclaimed(&tracker, &pending, 0, 128);
	cr_assert_eq(cbitmap_count(&pending), 5, "claimed clusters must stay pending");
	cr_assert_eq(cbitmap_next_set(&pending, 0), 10);
	cr_assert_eq(cbitmap_next_clear(&pending, 10), 15);
	/* The owner decides: not copied leaves them pending. */
	inflight_release(&tracker, &pending, 10, 5, false);
	cr_assert_eq(cbitmap_count(&pending), 5);
	inflight_drop_unclaimed(&tracker, &pending, 0, 128);
	cr_assert_eq(cbitmap_count(&pending), 0);
}

Test(inflight, drop_unclaimed_range)
{
	setup(128, true);
	inflight_drop_unclaimed(&tracker, &pending, 60, 10);
	cr_assert_eq(cbitmap_count(&pending), 118);
	cr_assert(cbitmap_test(&pending, 59));
	cr_assert(!cbitmap_test(&pending, 60));
	cr_assert(!cbitmap_test(&pending, 69));
	cr_assert(cbitmap_test(&pending, 70));
	/* count past nbits is clamped. */
	inflight_drop_unclaimed(&tracker, &pending, 120, 1000);
	cr_assert_eq(cbitmap_count(&pending), 110);
	inflight_drop_unclaimed(&tracker, &pending, 0, 0);
	cr_assert_eq(cbitmap_count(&pending), 110);
}

static atomic_uint releases;

static void *wait_idle(void *arg)
{
	unsigned *seen = arg;

	inflight_wait_idle(&tracker);
	*seen = atomic_load(&releases);
	return NULL;
}

Test(inflight, wait_idle)
{
	pthread_t thread;
	unsigned seen = 99;

	setup(64, true);
	inflight_wait_idle(&tracker); /* nothing open: returns at once */
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 0, 8);
	expect_claim(0, 64, 8, INFLIGHT_SKIP, 8, 8);
	atomic_store(&releases, 0);
	cr_assert_eq(pthread_create(&thread, NULL, wait_idle, &seen), 0);
	sleep_ms(20);
	atomic_fetch_add(&releases, 1);
	inflight_release(&tracker, &pending, 0, 8, true);
	sleep_ms(20);
	atomic_fetch_add(&releases, 1);
	inflight_release(&tracker, &pending, 8, 8, false);
	pthread_join(thread, NULL);
	cr_assert_eq(seen, 2, "wait_idle returned after %u of 2 releases", seen);
	cr_assert_eq(tracker.open_claims, 0);
}

/* ---- stress ------------------------------------------------------------- */

#define STRESS_CLUSTERS 4096
#define STRESS_THREADS 6

static atomic_uint copies[STRESS_CLUSTERS];  /* finished copies per cluster */
static atomic_uint holders[STRESS_CLUSTERS]; /* threads copying it right now */
static atomic_uint overlaps;                 /* times two copied at once */
static atomic_uint stale_claims;             /* claimed a cluster no longer pending */

struct copier {
	unsigned index;
	uint64_t seed;
};

static uint64_t next_random(uint64_t *seed)
{
	*seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
	return *seed >> 33;
}

/* Background copiers (SKIP over the whole image) race guest-write-like
 * copiers (WAIT on a small random range); some copies "fail" and are
 * released as not copied, to be redone by someone. */
static void *copier_thread(void *arg)
{
	struct copier *c = arg;
	bool guest = c->index % 2;

	for (;;) {
		uint64_t first = 0, end = STRESS_CLUSTERS, rf, rc;
		if (guest) {
			first = next_random(&c->seed) % STRESS_CLUSTERS;
			end = first + 1 + next_random(&c->seed) % 32;
		}
		uint64_t max_run = 1 + next_random(&c->seed) % 16;
		int r = inflight_claim(&tracker, &pending, first, end, max_run,
				       guest ? INFLIGHT_WAIT : INFLIGHT_SKIP, 0, &rf, &rc);
		if (r == 0) {
			if (cbitmap_count(&pending) == 0)
				return NULL;
			sched_yield();
			continue;
		}
		bool fail = next_random(&c->seed) % 8 == 0;
		for (uint64_t i = rf; i < rf + rc; i++) {
			if (!cbitmap_test(&pending, i))
				atomic_fetch_add(&stale_claims, 1);
			if (atomic_fetch_add(&holders[i], 1) != 0)
				atomic_fetch_add(&overlaps, 1);
		}
		for (volatile int spin = 0; spin < 50; spin++)
			;
		for (uint64_t i = rf; i < rf + rc; i++) {
			if (!fail)
				atomic_fetch_add(&copies[i], 1);
			atomic_fetch_sub(&holders[i], 1);
		}
		inflight_release(&tracker, &pending, rf, rc, !fail);
	}
}

Test(inflight, stress_every_cluster_copied_exactly_once)
{
	uint64_t stop = clock_monotonic_ns() + 1500 * MS;
	unsigned rounds = 0;

	setup(STRESS_CLUSTERS, false);
	do {
		pthread_t threads[STRESS_THREADS];
		struct copier c[STRESS_THREADS];

		cbitmap_fill(&pending, true);
		for (unsigned i = 0; i < STRESS_CLUSTERS; i++)
			atomic_store(&copies[i], 0);
		for (unsigned i = 0; i < STRESS_THREADS; i++) {
			c[i] = (struct copier){ .index = i, .seed = rounds * 131u + i + 1 };
			cr_assert_eq(pthread_create(&threads[i], NULL, copier_thread, &c[i]), 0);
		}
		for (unsigned i = 0; i < STRESS_THREADS; i++)
			pthread_join(threads[i], NULL);
		rounds++;

		cr_assert_eq(atomic_load(&overlaps), 0, "round %u: a cluster was copied by two threads at once", rounds);
		cr_assert_eq(atomic_load(&stale_claims), 0, "round %u: a claim covered a cluster already copied",
			     rounds);
		for (unsigned i = 0; i < STRESS_CLUSTERS; i++)
			cr_assert_eq(atomic_load(&copies[i]), 1, "round %u: cluster %u copied %u times", rounds, i,
				     atomic_load(&copies[i]));
		cr_assert_eq(cbitmap_count(&pending), 0);
		cr_assert_eq(cbitmap_count(&tracker.claimed), 0);
		cr_assert_eq(tracker.open_claims, 0);
	} while (clock_monotonic_ns() < stop && rounds < 200);
	cr_assert_geq(rounds, 1);
}
