/* gate: counts guest writes in flight on one image and lets a control thread
 * drain them to take a point in time.
 *
 * A writer brackets its work with gate_enter/gate_exit. gate_close waits until
 * no writer is inside and keeps new ones out until gate_open; in between, the
 * closer may change what writers depend on (the image's hook list) and read
 * the image knowing no write is half done.
 *
 * Fast path: gate_enter and gate_exit are one atomic add each and no lock.
 * Proof sketch: the writer increments `inside` then reads `closed`; the closer
 * sets `closed` then reads `inside`, both sequentially consistent, so at least
 * one of them sees the other. A writer that sees `closed` backs out and sleeps;
 * a closer that sees `inside > 0` sleeps until the last writer leaves.
 * Locking: `lock` guards sleeping only. Only one closer at a time: callers hold
 * `close_mutex` (gate_close takes it and gate_open drops it).
 * Errors: none.
 */
#ifndef FLEECEFS_GATE_H
#define FLEECEFS_GATE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

struct gate {
	atomic_uint inside;
	atomic_bool closed;
	pthread_mutex_t lock;
	pthread_cond_t changed;
	pthread_mutex_t close_mutex;
};

void gate_init(struct gate *g);
void gate_destroy(struct gate *g);

static inline void gate_exit_slow(struct gate *g)
{
	pthread_mutex_lock(&g->lock);
	pthread_cond_broadcast(&g->changed);
	pthread_mutex_unlock(&g->lock);
}

void gate_enter_slow(struct gate *g);

static inline void gate_enter(struct gate *g)
{
	atomic_fetch_add(&g->inside, 1);
	if (__builtin_expect(atomic_load(&g->closed), 0))
		gate_enter_slow(g);
}

static inline void gate_exit(struct gate *g)
{
	if (atomic_fetch_sub(&g->inside, 1) == 1 && __builtin_expect(atomic_load(&g->closed), 0))
		gate_exit_slow(g);
}

/* For a caller that must not sleep (an io_uring queue thread): true with the
 * gate entered, false (nothing held) while it is closed. */
static inline bool gate_try_enter(struct gate *g)
{
	atomic_fetch_add(&g->inside, 1);
	if (__builtin_expect(!atomic_load(&g->closed), 1))
		return true;
	gate_exit(g);
	return false;
}

/* Drains writers; returns with the gate closed. */
void gate_close(struct gate *g);
void gate_open(struct gate *g);

#endif
