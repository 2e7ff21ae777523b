/* inflight: who is copying which clusters right now.
 *
 * A copy engine keeps a `pending` bitmap (set = the old data of the cluster is
 * not in the target yet). Before anyone reads a pending cluster from the source
 * to copy it, it claims the cluster here; the claim is dropped only after the
 * target write finished (inflight_release). Together they give the invariant
 * the copy-before-write proof rests on:
 *
 *   a cluster whose pending bit is clear has its old data in the target, and
 *   a pending cluster is either unclaimed (nobody has read it yet) or claimed
 *   by exactly one copier that has not finished writing it.
 *
 * Snapshot views add "frozen" reads: a reader that reads a still-pending
 * cluster from the source registers the range (inflight_read_begin); a
 * claimer releasing a run as copied first waits until no frozen read
 * overlaps it, so the guest write that caused the copy, and every later one
 * (which sees the cluster clear), lands only after those readers are done.
 * Readers never wait holding a registration.
 *
 * Owns: the claimed bitmap, the count of open claims, the frozen reads.
 * Locking: one mutex per tracker guards `claimed` and every pending-bit
 * *clear* done through inflight_release. Pending bits may be read without the
 * lock (cbitmap_test is acquire, the clear is release). Waiters sleep on one
 * condition variable, broadcast on every release; a claim is never held while
 * waiting for another claim, so claimers cannot deadlock each other.
 * Errors: inflight_init returns 0 or -ENOMEM; inflight_claim -ETIMEDOUT.
 */
#ifndef FLEECEFS_INFLIGHT_H
#define FLEECEFS_INFLIGHT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "fleecefs/cbitmap.h"

struct frozen_read {
	uint64_t first, count;
	struct frozen_read *next;
};

struct inflight {
	pthread_mutex_t lock;
	pthread_cond_t released;  /* CLOCK_MONOTONIC */
	struct cbitmap claimed;   /* under lock */
	uint64_t open_claims;     /* under lock */
	struct frozen_read *frozen; /* under lock; a handful at a time */
};

int inflight_init(struct inflight *t, uint64_t nclusters);
void inflight_destroy(struct inflight *t);

enum inflight_wait {
	/* A claimed pending cluster ahead: wait for its release, then look again
	 * (copy-before-write: the guest write may not go on before it). */
	INFLIGHT_WAIT,
	/* Step over claimed clusters and look for unclaimed pending ones
	 * (background copy: someone else is already copying those). */
	INFLIGHT_SKIP,
};

/* Looks at clusters [first, end). Claims the first run of pending, unclaimed
 * clusters (at most max_run long) and returns 1 with the run in *run_first,
 * *run_count. Returns 0 when no pending cluster is left in the range (with
 * INFLIGHT_SKIP: none that is unclaimed). With INFLIGHT_WAIT and a deadline
 * (monotonic ns, 0 = none) it returns -ETIMEDOUT when the wait outlasts it. */
int inflight_claim(struct inflight *t, const struct cbitmap *pending, uint64_t first, uint64_t end,
		   uint64_t max_run, enum inflight_wait wait, uint64_t deadline_ns,
		   uint64_t *run_first, uint64_t *run_count);

/* Ends a claim. copied: the run's old data is durable in the target, so its
 * pending bits are cleared before the claim is dropped and waiters wake to a
 * clean run. Not copied: the bits stay set and the next claimer copies them. */
void inflight_release(struct inflight *t, struct cbitmap *pending, uint64_t run_first,
		      uint64_t run_count, bool copied);

/* Clears pending bits of clusters nobody has claimed (for example clusters a
 * sync mode decides not to copy); returns how many it cleared. Claimed
 * clusters are left to their owner. */
uint64_t inflight_drop_unclaimed(struct inflight *t, struct cbitmap *pending, uint64_t first, uint64_t count);

/* Blocks until no claim is open. */
void inflight_wait_idle(struct inflight *t);

/* A view read at cluster `first` (of at most max_run clusters, below end):
 * returns the length of the run it may serve at once and where from. While a
 * claimed cluster is ahead it waits for its release. A run of pending
 * clusters is registered in `reg` (the caller reads the source, then calls
 * inflight_read_end); a run of copied clusters is not (their data at T is in
 * the store, which nothing changes any more). */
uint64_t inflight_read_begin(struct inflight *t, const struct cbitmap *pending, uint64_t first, uint64_t end,
			     uint64_t max_run, struct frozen_read *reg, bool *from_source);
void inflight_read_end(struct inflight *t, struct frozen_read *reg);

/* Clusters [first, first + count) need no copy any more (their data is safe
 * elsewhere): unclaimed pending ones leave the pending set; copied ones (not
 * pending, not claimed) are marked in `copied` (bit i for cluster first + i,
 * a bitmap of count bits) so the caller can free their copies. Claimed ones
 * are left to their copier. */
void inflight_discard(struct inflight *t, struct cbitmap *pending, uint64_t first, uint64_t count,
		      struct cbitmap *copied);

#endif
