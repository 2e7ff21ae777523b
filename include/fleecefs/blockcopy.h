/* blockcopy: copies clusters of an image, as they were at a point in time T,
 * into a target. Shared by the background copy and by copy-before-write.
 *
 * State: `pending` (set = the cluster's content at T is not safe yet: neither
 * in the target nor in the write-behind queue) and the in-flight claims
 * (inflight.h). At T every cluster the job must copy is pending; nothing else
 * is, ever again, set.
 *
 * The proof that the target equals the image at T:
 *  1. A cluster's content changes after T only through a guest write, and
 *     every guest write calls blockcopy_before_write for its range first,
 *     inside the image's write gate (image.h), so writes in flight at T were
 *     drained before T and writes after T all pass here.
 *  2. blockcopy_before_write returns only when no cluster of the range is
 *     pending. A pending cluster is either unclaimed, and then this thread
 *     claims it, or claimed, and then this thread waits for that claim's
 *     release and looks again. It holds no claim while it waits.
 *  3. A claimer reads the source only after claiming and clears pending only
 *     after the data read is safe (release store): written to the target, or
 *     handed to the write-behind queue, which owns it until it is written.
 *     While a cluster is claimed every writer to it waits in step 2, so the
 *     claimer reads the content of T. A failed read leaves the cluster
 *     pending and unclaimed: whoever comes next copies it again.
 *  4. So for every cluster: either it is still pending, and no write touched
 *     it since T (the source still holds T's data), or it is clear and the
 *     target or the queue holds T's data. When no cluster is pending and the
 *     queue has drained without error, the target is exact.
 * After a cluster is copied, a guest write to it costs one atomic load.
 *
 * Write-behind: a guest write waits only for the old data to be read; the
 * target write happens on the engine's writer thread, from a queue. Queued
 * data of all engines together is bounded by BLOCKCOPY_BUDGET (the daemon's
 * write-behind memory, whatever the number of jobs). The background copy
 * queues its chunks too, at most BACKGROUND_SHARE of the budget, and waits
 * when its own engine's share is used (back-pressure from its target); a
 * guest write never waits for room: without room it writes the target
 * itself, and so does a background copy that finds the daemon's budget used
 * by other engines. One writer keeps the target's inode lock uncontended
 * (buffered writes serialize on it anyway); it takes queued items in batches
 * and lets the target prepare them together (an in-place target journals
 * their old content with one sync, target.h). A target whose writes cost
 * CPU (compression) asks for more writers (target.h `writers`): they then
 * take one item at a time, each working on its own.
 * A failed queued write cannot be redone from the source (the guest has
 * overwritten it), so it is kept as the engine's error and the job fails.
 *
 * Write-through (on-cbw-error=break-guest-write): a guest's copy does not go
 * through the queue but writes the target before the guest write goes on
 * (or fails it, leaving the cluster pending); a guest write to a cluster the
 * background copy has queued waits until that write is done
 * (blockcopy_wait_queued). Either way the guest write is acknowledged only
 * after its cluster's old data is in the target.
 *
 * Progress: bytes_done counts what reached the target (written, or zero
 * clusters a fresh target needs no write for), not what is only queued;
 * cbw_bytes counts what guest writes copied (read and safe).
 *
 * Zero clusters are never written to a fresh target (it is sparse); holes of
 * the source are found with SEEK_DATA and not even read.
 * Locking: see inflight.h; queue_lock guards the queue; budget_lock (a
 * leaf) the daemon-wide budget. Counters are atomics. Errors: 0 or -errno.
 */
#ifndef FLEECEFS_BLOCKCOPY_H
#define FLEECEFS_BLOCKCOPY_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/inflight.h"

struct copy_source;
struct target;
struct manifest;

/* The most a copy-before-write claims at once: one 1 MiB guest write, or one
 * cluster if clusters are larger. */
#define BLOCKCOPY_CBW_MAX (1u << 20)
#define BLOCKCOPY_BUDGET (32u << 20)
#define BLOCKCOPY_MAX_WRITERS 16

struct writebehind_item;

/* Where a copy failed. */
struct blockcopy_error {
	int err;            /* -errno */
	bool target;        /* writing the target (else reading the source) */
	bool injected;      /* an injected copy-before-write error (inject.h) */
	uint64_t offset;
	uint64_t copied;    /* bytes this call copied (also on success) */
};

struct blockcopy_ops {
	/* A queued target write failed: true keeps its data queued to be
	 * written again (after a pause, or while writes are held), false gives
	 * up (the engine keeps the error; the job cannot complete). */
	bool (*queued_write_failed)(void *owner, int err, uint64_t offset);
};

struct blockcopy {
	struct copy_source *source;
	struct target *target;
	struct manifest *manifest;   /* NULL: no checksums */
	uint64_t size;               /* bytes of the image at T */
	uint32_t cluster_size;
	unsigned cluster_bits;
	uint64_t nclusters;
	struct cbitmap pending;
	struct inflight inflight;
	/* Clusters whose data went to the write-behind queue and has not
	 * reached the target (set and cleared under queue_lock; stays set when
	 * that write failed or was discarded). */
	struct cbitmap queued;
	/* Which injection point (inject.h) its target writes are: target-write
	 * for a backup, store-write for a snapshot or fleecing store. */
	int write_inject_point;
	/* Guest copies never queue: each writes the target before the guest
	 * write goes on (on-cbw-error=break-guest-write). */
	bool cbw_write_through;
	/* Copies share the source's blocks instead (blockcopy_allow_clone);
	 * cleared for good when the file systems refuse. */
	atomic_bool clone;
	atomic_uint_fast64_t bytes_cloned; /* of bytes_done: shared, not written */
	atomic_uint_fast64_t bytes_done;   /* bytes that reached the target */
	atomic_uint_fast64_t cbw_bytes;    /* copied by guest writes (safe: in the
					    * target or the queue) */
	atomic_uint_fast64_t bytes_written; /* data bytes written (not zeroes) */

	/* Write-behind queue; queue_lock guards everything below. */
	pthread_mutex_t queue_lock;
	pthread_cond_t queue_changed;
	struct writebehind_item *queue_head, *queue_tail;
	uint64_t queued_bytes;       /* queued or being written (or booked) */
	unsigned writing;
	int queue_error;             /* first failed queued write, -errno */
	uint64_t write_failures;     /* queued writes that failed (kept or not) */
	uint64_t queue_error_offset;
	bool stopping;
	bool held;                   /* writers wait (a job stopped on error) */
	const struct blockcopy_ops *ops;
	void *owner;
	pthread_t writers[BLOCKCOPY_MAX_WRITERS];
	unsigned nwriters;
	unsigned writer_batch;       /* items a writer takes at once */
};

int blockcopy_init(struct blockcopy *bc, struct copy_source *source, struct target *target,
		   struct manifest *manifest, uint64_t size, uint32_t cluster_size,
		   const struct blockcopy_ops *ops, void *owner);
/* Copies of this engine may share blocks (reflink) instead of reading and
 * writing: where both its source and its target are files on one file
 * system that can (target.h clone_range). A cloned run is in the target at
 * once (nothing queued), so a guest waits for no read and no write. With a
 * manifest, a guest copy does not clone (the checksum needs the data; the
 * queue hides the write) and the background copy reads, then clones. Where
 * the kernel refuses, the engine copies as before, from that run on. */
void blockcopy_allow_clone(struct blockcopy *bc, bool allow);
/* Writers stop taking queued writes while held (and go on when released). */
void blockcopy_hold_writes(struct blockcopy *bc, bool hold);
/* Stops the writer threads, discarding what is still queued (after a drain
 * nothing is); no target write runs after it returns. A concluded job calls
 * it at once: it keeps no thread and no queue memory. */
void blockcopy_stop_writers(struct blockcopy *bc);
void blockcopy_destroy(struct blockcopy *bc);
/* Waits until every queued write reached the target; returns the first
 * queued write's error (0 if none) and its offset in *offset, or -ECANCELED
 * as soon as give_up(arg) says so (checked every 50 ms; NULL: never). */
int blockcopy_drain(struct blockcopy *bc, uint64_t *offset, bool (*give_up)(void *arg), void *arg);
/* break-guest-write: waits until no cluster of [off, off + len) is still
 * queued. -EIO when a queued write failed meanwhile and its data is kept for
 * another try (its old data is not in the target); 0 when written, or when
 * the engine is ending (stopping, or its queue failed: the job fails). */
int blockcopy_wait_queued(struct blockcopy *bc, uint64_t off, uint64_t len);
/* Waits until no cluster of [first, first + count) is still queued: their
 * data is then in the target (for readers of the target, e.g. a view). */
void blockcopy_wait_written(struct blockcopy *bc, uint64_t first, uint64_t count);

/* Cheap test for the write path: may [off, off + len) need a copy? */
static inline bool blockcopy_needs_copy(const struct blockcopy *bc, uint64_t off, uint64_t len)
{
	if (off >= bc->size || len == 0)
		return false;
	uint64_t end = off + len < bc->size ? off + len : bc->size;
	uint64_t first = off >> bc->cluster_bits, last = (end - 1) >> bc->cluster_bits;
	return cbitmap_any_set(&bc->pending, first, last - first + 1);
}

/* Returns once the content at T of every cluster overlapping [off, off + len)
 * is safe: 0, or the copy's -errno (details in *e; e->copied says how much
 * this call copied, whatever others copied meanwhile). With timeout_ns (0 =
 * none), a copy that took longer, waits included, fails with -ETIMEDOUT
 * (what it copied stays copied). */
int blockcopy_before_write(struct blockcopy *bc, uint64_t off, uint64_t len, uint64_t timeout_ns,
			   struct blockcopy_error *e);

/* Background copy: copies the next unclaimed pending run at or after *cursor
 * (at most max_bytes, whole clusters). Returns the bytes resolved (> 0), 0 when
 * no unclaimed pending cluster is left from *cursor on, or -errno (the run
 * stays pending; details in *e). *cursor moves past the run; *read_bytes
 * grows by what was read from the source (holes are not read). */
int64_t blockcopy_copy_next(struct blockcopy *bc, uint64_t *cursor, uint64_t max_bytes, uint64_t *read_bytes,
			    struct blockcopy_error *e);

/* sync=top: clusters that hold no data of the source at T (holes, found
 * with SEEK_DATA/SEEK_HOLE) stop being pending; returns their bytes. Runs
 * after T, on the job's thread, while guests write: a hole seen now was a
 * hole at T too (a write or punch after T copies the cluster first, so it is
 * no longer pending), and a cluster claimed meanwhile is left to its copier.
 * Its work grows with the image's extents, never with the gates closed. */
uint64_t blockcopy_skip_holes(struct blockcopy *bc);

/* sync=incremental: only the clusters of the granules set in `granules`
 * (granule = 2^gran_bits bytes, not below the cluster size) stay pending;
 * returns the bytes to copy. Call at T, before anything is copied. */
uint64_t blockcopy_restrict(struct blockcopy *bc, const struct cbitmap *granules, unsigned gran_bits);
/* Lets the target prepare, before the copy starts, for every cluster still
 * pending (an in-place target journals all their old content up front, in
 * offset order, with a sync per few hundred runs instead of one per write).
 * A failure is only lost time: each write prepares itself again. */
int blockcopy_prepare_target(struct blockcopy *bc);
/* After the writers stopped: the clusters whose data at T is not durably in
 * the target (still pending, or queued and failed or discarded), into `out`
 * (initialised here; the caller destroys it). 0 or -ENOMEM. */
int blockcopy_left_over(struct blockcopy *bc, struct cbitmap *out);
/* Clusters still pending (each at most cluster_size bytes). */
static inline uint64_t blockcopy_pending_clusters(const struct blockcopy *bc)
{
	return cbitmap_count(&bc->pending);
}

#endif
