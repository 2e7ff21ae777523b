/* Unit tests for the write gate (src/gate.c). */
#include "config.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "fleecefs/gate.h"
#include "fleecefs/util.h"

#define MS 1000000ull

static struct gate gate;

static void setup(void)
{
	gate_init(&gate);
}

static void teardown(void)
{
	gate_destroy(&gate);
}

TestSuite(gate, .init = setup, .fini = teardown, .timeout = 20);

static void sleep_ms(unsigned ms)
{
	sleep_until_ns(clock_monotonic_ns() + ms * MS);
}

Test(gate, enter_exit_counting)
{
	cr_assert_eq(atomic_load(&gate.inside), 0);
	cr_assert(!atomic_load(&gate.closed));
	gate_enter(&gate);
	gate_enter(&gate);
	gate_enter(&gate);
	cr_assert_eq(atomic_load(&gate.inside), 3);
	gate_exit(&gate);
	cr_assert_eq(atomic_load(&gate.inside), 2);
	gate_exit(&gate);
	gate_exit(&gate);
	cr_assert_eq(atomic_load(&gate.inside), 0);
	cr_assert(!atomic_load(&gate.closed));
}

Test(gate, close_and_open_without_writers)
{
	gate_close(&gate);
	cr_assert(atomic_load(&gate.closed));
	cr_assert_eq(atomic_load(&gate.inside), 0);
	gate_open(&gate);
	cr_assert(!atomic_load(&gate.closed));
	/* Writers use the fast path again. */
	gate_enter(&gate);
	cr_assert_eq(atomic_load(&gate.inside), 1);
	gate_exit(&gate);
	/* And the gate can be closed again. */
	gate_close(&gate);
	cr_assert(atomic_load(&gate.closed));
	gate_open(&gate);
}

struct writer {
	atomic_bool entered;
	atomic_bool exiting;   /* set just before gate_exit */
	atomic_bool *opened;   /* set by the main thread just before gate_open */
	bool opened_at_entry;
	unsigned hold_ms;
};

static void *writer(void *arg)
{
	struct writer *w = arg;

	gate_enter(&gate);
	w->opened_at_entry = w->opened ? atomic_load(w->opened) : true;
	atomic_store(&w->entered, true);
	sleep_ms(w->hold_ms);
	atomic_store(&w->exiting, true);
	gate_exit(&gate);
	return NULL;
}

Test(gate, close_waits_for_writer_inside)
{
	struct writer w = { .hold_ms = 100 };
	pthread_t thread;

	cr_assert_eq(pthread_create(&thread, NULL, writer, &w), 0);
	while (!atomic_load(&w.entered))
		sched_yield();
	gate_close(&gate);
	cr_assert(atomic_load(&w.exiting), "gate_close returned while a writer was inside");
	cr_assert_eq(atomic_load(&gate.inside), 0);
	gate_open(&gate);
	pthread_join(thread, NULL);
}

Test(gate, close_waits_for_every_writer)
{
	struct writer w[4];
	pthread_t threads[4];

	for (unsigned i = 0; i < 4; i++) {
		w[i] = (struct writer){ .hold_ms = 20 + 20 * i };
		cr_assert_eq(pthread_create(&threads[i], NULL, writer, &w[i]), 0);
	}
	for (unsigned i = 0; i < 4; i++)
		while (!atomic_load(&w[i].entered))
			sched_yield();
	gate_close(&gate);
	for (unsigned i = 0; i < 4; i++)
		cr_assert(atomic_load(&w[i].exiting), "writer %u still inside after gate_close", i);
	gate_open(&gate);
	for (unsigned i = 0; i < 4; i++)
		pthread_join(threads[i], NULL);
}

Test(gate, writers_block_while_closed)
{
	static atomic_bool opened;
	struct writer w[3];
	pthread_t threads[3];

	gate_close(&gate);
	for (unsigned i = 0; i < 3; i++) {
		w[i] = (struct writer){ .opened = &opened };
		cr_assert_eq(pthread_create(&threads[i], NULL, writer, &w[i]), 0);
	}
	sleep_ms(50);
	for (unsigned i = 0; i < 3; i++)
		cr_assert(!atomic_load(&w[i].entered), "writer %u got in while the gate was closed", i);
	/* Blocked writers back out, so a closer sees nobody inside. A writer may
	 * be counted for an instant on its way to sleep; give it time. */
	uint64_t limit = clock_monotonic_ns() + 2000 * MS;
	while (atomic_load(&gate.inside) != 0 && clock_monotonic_ns() < limit)
		sched_yield();
	cr_assert_eq(atomic_load(&gate.inside), 0, "blocked writers still counted inside");
	atomic_store(&opened, true);
	gate_open(&gate);
	for (unsigned i = 0; i < 3; i++) {
		pthread_join(threads[i], NULL);
		cr_assert(w[i].opened_at_entry, "writer %u entered before gate_open", i);
		cr_assert(atomic_load(&w[i].exiting));
	}
	cr_assert_eq(atomic_load(&gate.inside), 0);
}

struct closer {
	atomic_bool closed;
	atomic_bool *opening; /* set by the first closer just before gate_open */
	bool opening_seen;
};

static void *second_closer(void *arg)
{
	struct closer *c = arg;

	gate_close(&gate);
	c->opening_seen = atomic_load(c->opening);
	atomic_store(&c->closed, true);
	gate_open(&gate);
	return NULL;
}

Test(gate, one_closer_at_a_time)
{
	static atomic_bool opening;
	struct closer c = { .opening = &opening };
	pthread_t thread;

	gate_close(&gate);
	cr_assert_eq(pthread_create(&thread, NULL, second_closer, &c), 0);
	sleep_ms(50);
	cr_assert(!atomic_load(&c.closed), "a second gate_close returned while the gate was held closed");
	atomic_store(&opening, true);
	gate_open(&gate);
	pthread_join(thread, NULL);
	cr_assert(c.opening_seen, "the second closer got the gate before the first opened it");
	cr_assert(!atomic_load(&gate.closed));
}

/* ---- stress ------------------------------------------------------------- */

#define STRESS_WRITERS 8

static atomic_bool stop;
static atomic_bool held_closed;   /* between gate_close returning and gate_open */
static atomic_uint really_inside; /* writers between gate_enter and gate_exit */
static atomic_uint writer_violations;
static atomic_ullong writes;

static void *stress_writer(void *arg)
{
	(void)arg;
	while (!atomic_load(&stop)) {
		gate_enter(&gate);
		atomic_fetch_add(&really_inside, 1);
		if (atomic_load(&held_closed))
			atomic_fetch_add(&writer_violations, 1);
		for (volatile int spin = 0; spin < 20; spin++)
			;
		atomic_fetch_sub(&really_inside, 1);
		gate_exit(&gate);
		atomic_fetch_add(&writes, 1);
	}
	return NULL;
}

Test(gate, stress_closed_means_empty)
{
	pthread_t threads[STRESS_WRITERS];
	uint64_t deadline = clock_monotonic_ns() + 1500 * MS;
	unsigned closes = 0, closer_violations = 0;
	unsigned long long writes_before;

	for (unsigned i = 0; i < STRESS_WRITERS; i++)
		cr_assert_eq(pthread_create(&threads[i], NULL, stress_writer, NULL), 0);
	while (clock_monotonic_ns() < deadline) {
		gate_close(&gate);
		atomic_store(&held_closed, true);
		/* gate.inside itself may blink while writers back out; count only
		 * those past gate_enter. */
		if (atomic_load(&really_inside) != 0)
			closer_violations++;
		writes_before = atomic_load(&writes);
		for (volatile int spin = 0; spin < 2000; spin++)
			;
		/* Still nobody inside after a while: new writers are held off. */
		if (atomic_load(&really_inside) != 0)
			closer_violations++;
		if (atomic_load(&writes) > writes_before + STRESS_WRITERS)
			closer_violations++;
		atomic_store(&held_closed, false);
		gate_open(&gate);
		closes++;
		for (volatile int spin = 0; spin < 2000; spin++)
			;
	}
	atomic_store(&stop, true);
	for (unsigned i = 0; i < STRESS_WRITERS; i++)
		pthread_join(threads[i], NULL);

	cr_assert_eq(closer_violations, 0, "%u of %u closes found a writer inside", closer_violations, closes);
	cr_assert_eq(atomic_load(&writer_violations), 0, "%u writes ran while the gate was closed",
		     atomic_load(&writer_violations));
	cr_assert_gt(closes, 10);
	cr_assert_gt(atomic_load(&writes), 1000, "writers made no progress");
	cr_assert_eq(atomic_load(&gate.inside), 0);
	cr_assert(!atomic_load(&gate.closed));
}

/* The io_uring queue thread must never sleep: gate_try_enter refuses while
 * the gate is closed and leaves no count behind, and a closer that drains
 * still waits for a writer that got in. */
Test(gate, try_enter_refuses_while_closed)
{
	cr_assert(gate_try_enter(&gate));
	cr_assert_eq(atomic_load(&gate.inside), 1);
	gate_exit(&gate);
	gate_close(&gate);
	cr_assert(!gate_try_enter(&gate));
	cr_assert_eq(atomic_load(&gate.inside), 0, "a refused try left a count");
	gate_open(&gate);
	cr_assert(gate_try_enter(&gate));
	gate_exit(&gate);
	cr_assert_eq(atomic_load(&gate.inside), 0);
}

static void *close_then_mark(void *arg)
{
	atomic_bool *closed = arg;
	gate_close(&gate);
	atomic_store(closed, true);
	gate_open(&gate);
	return NULL;
}

Test(gate, close_waits_for_a_try_entered_writer)
{
	atomic_bool closed = false;
	pthread_t closer;

	cr_assert(gate_try_enter(&gate));
	cr_assert_eq(pthread_create(&closer, NULL, close_then_mark, &closed), 0);
	sleep_ms(50);
	cr_assert(!atomic_load(&closed), "the gate closed over a writer inside");
	gate_exit(&gate);
	pthread_join(closer, NULL);
	cr_assert(atomic_load(&closed));
}
