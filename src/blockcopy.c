/* blockcopy: see include/fleecefs/blockcopy.h */
#include "config.h"

#include <errno.h>
#include <malloc.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleecefs/blockcopy.h"
#include "fleecefs/bufpool.h"
#include "fleecefs/source.h"
#include "fleecefs/inject.h"
#include "fleecefs/journal.h"
#include "fleecefs/manifest.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

struct writebehind_item {
	struct writebehind_item *next;
	uint64_t first, count;       /* clusters */
	uint64_t len;                /* bytes of data in buf */
	struct shared_buffer *buf;   /* shared with a target that keeps it */
};

static void *writer_thread(void *arg);
/* Items a single writer takes at once: their old content is journaled
 * together by an in-place target (one sync instead of one per item). */
#define WRITER_BATCH 64

/* ---- the daemon's write-behind budget -------------------------------------- */

/* The background copies of all engines together may queue this much; the
 * rest of the budget is for guests' copies. */
#define BACKGROUND_SHARE(max) ((max) / 4 * 3)

static pthread_mutex_t budget_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t budget_used;        /* budget_lock */
static unsigned engines_running;    /* budget_lock: engines with writers */

static bool budget_take(uint64_t bytes, uint64_t limit)
{
	pthread_mutex_lock(&budget_lock);
	bool ok = budget_used + bytes <= limit;
	if (ok)
		budget_used += bytes;
	pthread_mutex_unlock(&budget_lock);
	return ok;
}

static void budget_give(uint64_t bytes)
{
	pthread_mutex_lock(&budget_lock);
	budget_used -= bytes;
	pthread_mutex_unlock(&budget_lock);
}

/* The last engine stopped: what the queues used goes back to the system
 * (glibc keeps freed heap memory otherwise, per arena, for good). */
static void engine_stopped(void)
{
	pthread_mutex_lock(&budget_lock);
	bool idle = --engines_running == 0;
	pthread_mutex_unlock(&budget_lock);
	bufpool_detach();
	if (idle)
		malloc_trim(0);
}

int blockcopy_init(struct blockcopy *bc, struct copy_source *source, struct target *target,
		   struct manifest *manifest, uint64_t size, uint32_t cluster_size,
		   const struct blockcopy_ops *ops, void *owner)
{
	int rc;

	memset(bc, 0, sizeof(*bc));
	bc->ops = ops;
	bc->owner = owner;
	bc->source = source;
	bc->write_inject_point = INJECT_TARGET_WRITE;
	bc->target = target;
	bc->manifest = manifest;
	bc->size = size;
	bc->cluster_size = cluster_size;
	bc->cluster_bits = log2_u64(cluster_size);
	bc->nclusters = div_round_up(size, cluster_size);
	rc = cbitmap_init(&bc->pending, bc->nclusters, true);
	if (rc)
		return rc;
	rc = inflight_init(&bc->inflight, bc->nclusters);
	if (rc) {
		cbitmap_destroy(&bc->pending);
		return rc;
	}
	rc = cbitmap_init(&bc->queued, bc->nclusters, false);
	if (rc) {
		inflight_destroy(&bc->inflight);
		cbitmap_destroy(&bc->pending);
		return rc;
	}
	pthread_mutex_init(&bc->queue_lock, NULL);
	pthread_cond_init(&bc->queue_changed, NULL);
	/* Without writer threads every copy writes the target itself. */
	unsigned want = target->writers > 1 ? (unsigned)min_u64(target->writers, BLOCKCOPY_MAX_WRITERS) : 1;
	bc->writer_batch = want > 1 ? 1 : WRITER_BATCH;
	for (unsigned i = 0; i < want; i++)
		if (pthread_create(&bc->writers[bc->nwriters], NULL, writer_thread, bc) == 0)
			bc->nwriters++;
	if (bc->nwriters) {
		pthread_mutex_lock(&budget_lock);
		engines_running++;
		pthread_mutex_unlock(&budget_lock);
		bufpool_attach();
	}
	return 0;
}

void blockcopy_stop_writers(struct blockcopy *bc)
{
	unsigned had = bc->nwriters;

	pthread_mutex_lock(&bc->queue_lock);
	bc->stopping = true;
	pthread_cond_broadcast(&bc->queue_changed);
	pthread_mutex_unlock(&bc->queue_lock);
	for (unsigned i = 0; i < bc->nwriters; i++)
		pthread_join(bc->writers[i], NULL);
	bc->nwriters = 0;
	/* Whatever is still queued is discarded (the job did not complete). */
	while (bc->queue_head) {
		struct writebehind_item *item = bc->queue_head;
		bc->queue_head = item->next;
		bc->queued_bytes -= item->len;
		budget_give(item->len);
		shared_buffer_release(item->buf);
		free(item);
	}
	bc->queue_tail = NULL;
	if (had)
		engine_stopped();
}

void blockcopy_destroy(struct blockcopy *bc)
{
	blockcopy_stop_writers(bc);
	pthread_cond_destroy(&bc->queue_changed);
	pthread_mutex_destroy(&bc->queue_lock);
	cbitmap_destroy(&bc->queued);
	inflight_destroy(&bc->inflight);
	cbitmap_destroy(&bc->pending);
}

/* Reads the claimed run [first, first + count) into buf and checksums each
 * cluster. */
static int read_run(struct blockcopy *bc, uint64_t first, uint64_t count, void *buf, uint64_t *read_bytes)
{
	uint64_t off = first << bc->cluster_bits;
	uint64_t len = min_u64(count << bc->cluster_bits, bc->size - off);
	int rc = inject_check(INJECT_SOURCE_READ, off, len);

	if (!rc)
		rc = source_read(bc->source, buf, off, len);
	if (rc)
		return rc;
	*read_bytes += len;
	return 0;
}

/* A run that is a hole at T: nothing to read, hash or queue; the target
 * makes it read as zeroes (nothing at all on a fresh target). */
static int copy_hole(struct blockcopy *bc, uint64_t first, uint64_t count, uint64_t len)
{
	uint64_t off = first << bc->cluster_bits;
	int rc = inject_check((enum inject_point)bc->write_inject_point, off, len);

	if (!rc)
		rc = target_write_zeroes(bc->target, off, len);
	if (rc)
		return rc;
	if (bc->manifest)
		manifest_set_zeroes(bc->manifest, first, count);
	atomic_fetch_add(&bc->bytes_done, len);
	return 0;
}

/* Writes a run read by read_run: non-zero clusters as data (adjacent ones in
 * one write), zero clusters as zeroes (nothing at all on a fresh target).
 * On success the run counts as done. */
static int write_run(struct blockcopy *bc, uint64_t first, uint64_t len, const void *buf, unsigned flags,
		     struct shared_buffer *owner)
{
	uint64_t off = first << bc->cluster_bits, write_from = 0, pos = 0;
	bool in_data = false;
	int rc = inject_check((enum inject_point)bc->write_inject_point, off, len);

	if (rc)
		return rc;
	for (; pos < len; pos += bc->cluster_size) {
		uint64_t clen = min_u64(bc->cluster_size, len - pos);
		bool zero = buffer_is_zero((const char *)buf + pos, (size_t)clen);
		if (!zero && !in_data) {
			write_from = pos;
			in_data = true;
		} else if (zero && in_data) {
			rc = target_write_from(bc->target, off + write_from, (const char *)buf + write_from,
					       (size_t)(pos - write_from), flags, owner);
			if (rc)
				return rc;
			atomic_fetch_add(&bc->bytes_written, pos - write_from);
			in_data = false;
		}
		if (zero && (rc = target_write_zeroes(bc->target, off + pos, clen)))
			return rc;
	}
	if (in_data) {
		rc = target_write_from(bc->target, off + write_from, (const char *)buf + write_from,
				       (size_t)(len - write_from), flags, owner);
		if (rc)
			return rc;
		atomic_fetch_add(&bc->bytes_written, len - write_from);
	}
	atomic_fetch_add(&bc->bytes_done, len);
	return 0;
}

/* ---- write-behind ------------------------------------------------------- */

/* Queue lock held. */
static void append_locked(struct blockcopy *bc, struct writebehind_item *item)
{
	item->next = NULL;
	if (bc->queue_tail)
		bc->queue_tail->next = item;
	else
		bc->queue_head = item;
	bc->queue_tail = item;
}


/* Queue lock held: puts items back at the head, in their order. */
static void push_front_locked(struct blockcopy *bc, struct writebehind_item *items)
{
	struct writebehind_item *last = items;
	if (!items)
		return;
	while (last->next)
		last = last->next;
	last->next = bc->queue_head;
	bc->queue_head = items;
	if (!bc->queue_tail)
		bc->queue_tail = last;
}

static void *writer_thread(void *arg)
{
	struct blockcopy *bc = arg;
	uint64_t unwritten = 0;

	pthread_mutex_lock(&bc->queue_lock);
	for (;;) {
		while ((!bc->queue_head || bc->held) && !bc->stopping)
			pthread_cond_wait(&bc->queue_changed, &bc->queue_lock);
		if (bc->stopping)
			break;
		/* Take a batch off the queue. */
		struct writebehind_item *batch = bc->queue_head, *last = batch;
		struct journal_range ranges[WRITER_BATCH];
		unsigned n = 1;
		ranges[0] = (struct journal_range){ batch->first << bc->cluster_bits, batch->len };
		while (n < bc->writer_batch && last->next) {
			last = last->next;
			ranges[n++] = (struct journal_range){ last->first << bc->cluster_bits, last->len };
		}
		bc->queue_head = last->next;
		if (!bc->queue_head)
			bc->queue_tail = NULL;
		last->next = NULL;
		bc->writing += n;
		bool discard = bc->queue_error != 0;
		pthread_mutex_unlock(&bc->queue_lock);
		/* Each write would do this itself; together it costs one sync.
		 * A failure shows again in the writes. */
		if (!discard && n > 1)
			target_prepare_writes(bc->target, ranges, n);
		pthread_mutex_lock(&bc->queue_lock);
		while (batch) {
			struct writebehind_item *item = batch;
			batch = item->next;
			item->next = NULL;
			discard = bc->queue_error != 0;
			if ((bc->held && !discard) || bc->stopping) {
				/* Stopped on an error meanwhile: the rest waits; or the
				 * engine stops: the rest is discarded with the queue. */
				item->next = batch;
				for (struct writebehind_item *i = item; i; i = i->next)
					bc->writing--;
				push_front_locked(bc, item);
				break;
			}
			pthread_mutex_unlock(&bc->queue_lock);
			int rc = discard ? 0 : write_run(bc, item->first, item->len, item->buf->data, 0, item->buf);
			/* Hand what was written to writeback as we go: dirty pages
			 * stay bounded, and the final sync finds little to do. */
			unwritten += item->len;
			if (unwritten >= TARGET_WRITEBACK_ROUND) {
				unwritten = 0;
				target_start_writeback(bc->target);
			}
			/* The data exists nowhere else (the guest may have
			 * overwritten the source): keep it for another try if the
			 * job wants that. */
			uint64_t off = item->first << bc->cluster_bits;
			bool retry = rc && bc->ops && bc->ops->queued_write_failed(bc->owner, rc, off);
			pthread_mutex_lock(&bc->queue_lock);
			bc->writing--;
			if (retry) {
				bc->write_failures++;
				pthread_cond_broadcast(&bc->queue_changed);
				append_locked(bc, item);
				/* Not in a tight loop against a target that keeps failing. */
				struct timespec ts;
				timespec_from_ns(&ts, clock_realtime_ns() + 100000000ull);
				pthread_cond_timedwait(&bc->queue_changed, &bc->queue_lock, &ts);
				continue;
			}
			if (rc)
				bc->write_failures++;
			if (rc && !bc->queue_error) {
				bc->queue_error = rc;
				bc->queue_error_offset = off;
			}
			bc->queued_bytes -= item->len;
			budget_give(item->len);
			/* Only data that reached the target stops being "queued":
			 * what failed or was discarded stays marked, the job's
			 * left-overs. */
			if (!rc && !discard)
				cbitmap_clear_range(&bc->queued, item->first, item->count);
			pthread_cond_broadcast(&bc->queue_changed);
			shared_buffer_release(item->buf);
			free(item);
		}
	}
	pthread_mutex_unlock(&bc->queue_lock);
	return NULL;
}

void blockcopy_hold_writes(struct blockcopy *bc, bool hold)
{
	pthread_mutex_lock(&bc->queue_lock);
	bc->held = hold;
	pthread_cond_broadcast(&bc->queue_changed);
	pthread_mutex_unlock(&bc->queue_lock);
}

/* Background copy: waits for room for `bytes` in its engine's share and
 * books it in the daemon's budget, before claiming anything, so that it
 * never holds a claim (which a guest write may be waiting for) while it
 * waits for the writers. False: no queue (gone, failed, write-through, or
 * the budget is used by others); the caller copies without it. */
static bool reserve_room(struct blockcopy *bc, uint64_t bytes)
{
	uint64_t limit = BACKGROUND_SHARE(BLOCKCOPY_BUDGET);

	pthread_mutex_lock(&bc->queue_lock);
	while (bc->nwriters && !bc->stopping && !bc->queue_error && bc->queued_bytes &&
	       bc->queued_bytes + bytes > limit)
		pthread_cond_wait(&bc->queue_changed, &bc->queue_lock);
	bool ok = bc->nwriters && !bc->stopping && !bc->queue_error && budget_take(bytes, limit);
	if (ok)
		bc->queued_bytes += bytes;
	pthread_mutex_unlock(&bc->queue_lock);
	return ok;
}

static void unreserve_room(struct blockcopy *bc, uint64_t bytes)
{
	pthread_mutex_lock(&bc->queue_lock);
	bc->queued_bytes -= bytes;
	budget_give(bytes);
	pthread_cond_broadcast(&bc->queue_changed);
	pthread_mutex_unlock(&bc->queue_lock);
}

/* Hands a run's data (buf, from bufpool_get, owned by the queue from now on) to the
 * writers, in `reserved` bytes booked by reserve_room (0: none booked, it
 * takes room now if there is some). False: not queued, the caller writes. */
static bool enqueue_run(struct blockcopy *bc, uint64_t first, uint64_t count, uint64_t len, void *buf,
			uint64_t reserved)
{
	struct writebehind_item *item = malloc(sizeof(*item));
	struct shared_buffer *shared = item ? bufpool_share(buf, (size_t)len) : NULL;
	if (!shared) {
		free(item);
		return false;
	}
	*item = (struct writebehind_item){ .first = first, .count = count, .len = len, .buf = shared };
	pthread_mutex_lock(&bc->queue_lock);
	bool room = bc->nwriters && !bc->stopping && (reserved || budget_take(len, BLOCKCOPY_BUDGET));
	if (room) {
		if (reserved > len) {
			/* Booked more than the run turned out to be. */
			bc->queued_bytes -= reserved - len;
			budget_give(reserved - len);
		}
		bc->queued_bytes += reserved ? 0 : len;
		cbitmap_set_range(&bc->queued, first, count);
		append_locked(bc, item);
		pthread_cond_broadcast(&bc->queue_changed);
	}
	pthread_mutex_unlock(&bc->queue_lock);
	if (!room) {
		free(shared);   /* buf stays the caller's */
		free(item);
	}
	return room;
}

int blockcopy_drain(struct blockcopy *bc, uint64_t *offset, bool (*give_up)(void *arg), void *arg)
{
	int rc = 0;

	pthread_mutex_lock(&bc->queue_lock);
	while ((bc->queue_head || bc->writing) && !bc->queue_error) {
		if (give_up && give_up(arg)) {
			rc = -ECANCELED;
			break;
		}
		/* Polls, since what ends a wait may be outside the engine (a
		 * job cancelled while its writes are held). */
		struct timespec ts;
		timespec_from_ns(&ts, clock_realtime_ns() + 50000000ull);
		pthread_cond_timedwait(&bc->queue_changed, &bc->queue_lock, &ts);
	}
	if (!rc)
		rc = bc->queue_error;
	if (offset)
		*offset = bc->queue_error_offset;
	pthread_mutex_unlock(&bc->queue_lock);
	return rc;
}

void blockcopy_wait_written(struct blockcopy *bc, uint64_t first, uint64_t count)
{
	if (!cbitmap_any_set(&bc->queued, first, count))
		return;
	pthread_mutex_lock(&bc->queue_lock);
	while (cbitmap_any_set(&bc->queued, first, count) && !bc->stopping && !bc->queue_error)
		pthread_cond_wait(&bc->queue_changed, &bc->queue_lock);
	pthread_mutex_unlock(&bc->queue_lock);
}

int blockcopy_wait_queued(struct blockcopy *bc, uint64_t off, uint64_t len)
{
	if (off >= bc->size || !len)
		return 0;
	uint64_t end = min_u64(off + len, bc->size);
	uint64_t first = off >> bc->cluster_bits, count = ((end - 1) >> bc->cluster_bits) - first + 1;
	if (!cbitmap_any_set(&bc->queued, first, count))
		return 0;
	pthread_mutex_lock(&bc->queue_lock);
	uint64_t failures = bc->write_failures;
	bool queued;
	while ((queued = cbitmap_any_set(&bc->queued, first, count)) && !bc->stopping && !bc->queue_error &&
	       bc->write_failures == failures)
		pthread_cond_wait(&bc->queue_changed, &bc->queue_lock);
	int rc = queued && !bc->stopping && !bc->queue_error ? -EIO : 0;
	pthread_mutex_unlock(&bc->queue_lock);
	return rc;
}

static uint64_t run_bytes(const struct blockcopy *bc, uint64_t first, uint64_t count)
{
	uint64_t off = first << bc->cluster_bits;
	return min_u64(count << bc->cluster_bits, bc->size - off);
}

void blockcopy_allow_clone(struct blockcopy *bc, bool allow)
{
	atomic_store(&bc->clone, allow && bc->source->ops->clone_to && bc->target->ops->clone_range);
}

/* Shares a claimed run's blocks with the target (reflink) instead of
 * writing them. 0: the run is in the target; 1: copy it instead; -errno:
 * the target failed. An injected target-write rule is checked once the
 * clone stands for the write, so a run that falls back meets it once, in
 * the copy's write. */
static int clone_run(struct blockcopy *bc, uint64_t first, uint64_t count, uint64_t bytes)
{
	uint64_t off = first << bc->cluster_bits;
	int rc = source_clone_to(bc->source, bc->target, off, bytes);

	if (rc == 0) {
		if ((rc = inject_check((enum inject_point)bc->write_inject_point, off, bytes)))
			return rc;
		atomic_fetch_add(&bc->bytes_done, bytes);
		atomic_fetch_add(&bc->bytes_cloned, bytes);
		return 0;
	}
	/* The file systems cannot (not reflink, not one file system, blocks
	 * larger than a cluster): stop trying. A run ending in a partial last
	 * block (EINVAL unless it ends the source file) or a failure of the
	 * moment (ENOSPC, EIO) only falls back, and the copy says what fails. */
	bool tail = first + count == bc->nclusters && bc->size % 4096;
	if (rc == -EOPNOTSUPP || rc == -EXDEV || rc == -ENOTTY || rc == -EPERM || rc == -ETXTBSY ||
	    rc == -EBADF || (rc == -EINVAL && !tail))
		atomic_store(&bc->clone, false);
	return 1;
}

/* Copies a run this thread has claimed and releases the claim: reads it
 * into a buffer of its own, which the write-behind queue takes over (or, if
 * there is no room, or the engine writes through, writes it right away), or
 * clones it (reflink; with a manifest after the read, for the checksums).
 * The claim is released as copied only once the data is safe. The buffer
 * comes from the pool (bufpool.h): a fresh one per copy cost a page fault
 * and a page clear per 4 KiB. */
static int copy_claimed_run(struct blockcopy *bc, uint64_t run_first, uint64_t run_count, bool by_guest,
			    uint64_t reserved, uint64_t *read_bytes, struct blockcopy_error *e)
{
	uint64_t bytes = run_bytes(bc, run_first, run_count);
	void *buf = NULL;
	int rc;

	*e = (struct blockcopy_error){ .offset = run_first << bc->cluster_bits, .copied = e->copied };
	/* The background copy looks for holes first (a guest write does not:
	 * on a file system with few holes the lseek only competes with the
	 * guest's own I/O for the inode). */
	if (!by_guest && !source_has_data(bc->source, run_first << bc->cluster_bits, bytes)) {
		rc = copy_hole(bc, run_first, run_count, bytes);
		e->target = rc != 0;
		goto out;
	}
	/* A guest copy with a manifest does not clone: the queue hides its
	 * write better than a clone, which takes the image's inode lock. The
	 * background copy with a manifest reads for the checksums, then
	 * clones. */
	bool clone = atomic_load_explicit(&bc->clone, memory_order_relaxed) && !(by_guest && bc->manifest);
	if (clone && !bc->manifest && (rc = clone_run(bc, run_first, run_count, bytes)) <= 0) {
		e->target = rc != 0;
		goto out;
	}
	if (!(buf = bufpool_get((size_t)bytes))) {
		rc = -ENOMEM;
		goto out;
	}
	if ((rc = read_run(bc, run_first, run_count, buf, read_bytes)))
		goto out;
	/* The manifest's table lives beside the target: its failure is the
	 * target's. */
	if (bc->manifest && (rc = manifest_set_run(bc->manifest, run_first, run_count, buf, bytes))) {
		e->target = true;
		goto out;
	}
	if (clone && bc->manifest && (rc = clone_run(bc, run_first, run_count, bytes)) <= 0) {
		e->target = rc != 0;
		goto out;
	}
	if (!(by_guest && bc->cbw_write_through) &&
	    enqueue_run(bc, run_first, run_count, bytes, buf, by_guest ? 0 : reserved)) {
		buf = NULL;
		reserved = 0;
		rc = 0;
	} else {
		rc = write_run(bc, run_first, bytes, buf, by_guest ? TARGET_WRITE_GUEST_WAITS : 0, NULL);
		e->target = rc != 0;
	}
out:
	if (reserved)
		unreserve_room(bc, reserved);
	bufpool_put(buf, (size_t)bytes);
	inflight_release(&bc->inflight, &bc->pending, run_first, run_count, rc == 0);
	return e->err = rc;
}

int blockcopy_before_write(struct blockcopy *bc, uint64_t off, uint64_t len, uint64_t timeout_ns,
			   struct blockcopy_error *e)
{
	if (off >= bc->size || len == 0)
		return 0;
	uint64_t start = timeout_ns ? clock_monotonic_ns() : 0;
	uint64_t deadline = timeout_ns ? start + timeout_ns : 0;
	uint64_t end = min_u64(off + len, bc->size);
	uint64_t first = off >> bc->cluster_bits, stop = ((end - 1) >> bc->cluster_bits) + 1;
	uint64_t max_run = max_u64(BLOCKCOPY_CBW_MAX >> bc->cluster_bits, 1);
	int rc;

	*e = (struct blockcopy_error){ .offset = off };
	if ((rc = inject_check(INJECT_CBW, off, len))) {
		e->injected = true;
		return e->err = rc;
	}
	for (;;) {
		uint64_t run_first, run_count, read_bytes = 0;
		rc = inflight_claim(&bc->inflight, &bc->pending, first, stop, max_run, INFLIGHT_WAIT, deadline,
				    &run_first, &run_count);
		if (rc <= 0)
			break;
		uint64_t bytes = run_bytes(bc, run_first, run_count), copied = e->copied;
		rc = copy_claimed_run(bc, run_first, run_count, true, 0, &read_bytes, e);
		e->copied = copied;
		if (rc)
			return rc;
		e->copied += bytes;
		atomic_fetch_add(&bc->cbw_bytes, bytes);
		first = run_first + run_count;
	}
	if (!rc && deadline && clock_monotonic_ns() > deadline)
		rc = -ETIMEDOUT;
	return e->err = rc;
}

int64_t blockcopy_copy_next(struct blockcopy *bc, uint64_t *cursor, uint64_t max_bytes, uint64_t *read_bytes,
			    struct blockcopy_error *e)
{
	uint64_t max_run = max_u64(max_bytes >> bc->cluster_bits, 1);
	uint64_t first = *cursor >> bc->cluster_bits;
	uint64_t run_first, run_count;
	int rc;

	*e = (struct blockcopy_error){ .offset = *cursor };
	uint64_t reserved = max_run << bc->cluster_bits;
	if (!reserve_room(bc, reserved))
		reserved = 0;
	rc = inflight_claim(&bc->inflight, &bc->pending, first, bc->nclusters, max_run, INFLIGHT_SKIP, 0,
			    &run_first, &run_count);
	if (rc <= 0) {
		if (reserved)
			unreserve_room(bc, reserved);
		*cursor = bc->size;
		return rc;
	}
	uint64_t bytes = run_bytes(bc, run_first, run_count);
	/* Without room booked the copy writes the target itself. */
	rc = copy_claimed_run(bc, run_first, run_count, false, reserved, read_bytes, e);
	*cursor = (run_first + run_count) << bc->cluster_bits;
	if (rc)
		return rc;
	return (int64_t)bytes;
}

uint64_t blockcopy_skip_holes(struct blockcopy *bc)
{
	uint64_t cs = bc->cluster_size, pos = 0, dropped = 0;

	/* Walk the holes: every cluster wholly inside one holds no data. Their
	 * manifest lines are the zero checksum (manifest.h). */
	while (pos < bc->size) {
		int64_t hole = source_seek(bc->source, pos, SEEK_HOLE);
		if (hole < 0 || (uint64_t)hole >= bc->size)
			break;
		int64_t data = source_seek(bc->source, (uint64_t)hole, SEEK_DATA);
		uint64_t hole_end = data < 0 ? bc->size : min_u64((uint64_t)data, bc->size);
		uint64_t first = div_round_up((uint64_t)hole, cs);
		uint64_t end = hole_end == bc->size ? bc->nclusters : hole_end / cs;
		if (end > first && bc->target->holes_need_zeroes) {
			/* Each cluster dropped here must read as zeroes on the target; one
			 * a guest write copied meanwhile holds its data of T already. */
			uint64_t run = first, run_len = 0;
			for (uint64_t c = first; c <= end; c++) {
				bool dropped_now = c < end && inflight_drop_unclaimed(&bc->inflight, &bc->pending, c, 1);
				if (dropped_now) {
					if (!run_len)
						run = c;
					run_len++;
					continue;
				}
				if (run_len) {
					uint64_t off = run << bc->cluster_bits;
					uint64_t len = min_u64(run_len << bc->cluster_bits, bc->size - off);
					int rc = target_write_zeroes(bc->target, off, len);
					dropped += len;
					if (rc) {
						/* Dropped clusters never become pending again (a
						 * guest write may have changed them since): the
						 * job cannot complete. */
						pthread_mutex_lock(&bc->queue_lock);
						if (!bc->queue_error) {
							bc->queue_error = rc;
							bc->queue_error_offset = off;
						}
						pthread_mutex_unlock(&bc->queue_lock);
					}
					run_len = 0;
				}
			}
		} else if (end > first) {
			/* The last cluster may be short: on its own. */
			bool has_last = end == bc->nclusters;
			uint64_t n = inflight_drop_unclaimed(&bc->inflight, &bc->pending, first, end - first - has_last);
			dropped += n * cs;
			if (has_last && inflight_drop_unclaimed(&bc->inflight, &bc->pending, end - 1, 1))
				dropped += bc->size - ((end - 1) << bc->cluster_bits);
		}
		pos = hole_end;
	}
	return dropped;
}

uint64_t blockcopy_restrict(struct blockcopy *bc, const struct cbitmap *granules, unsigned gran_bits)
{
	uint64_t total = 0;

	cbitmap_fill(&bc->pending, false);
	for (uint64_t g = cbitmap_next_set(granules, 0); g < granules->nbits; g = cbitmap_next_set(granules, g + 1)) {
		/* A granule covers clusters, or lies in one (a copy cluster larger
		 * than the bitmap's granularity). */
		if (gran_bits >= bc->cluster_bits)
			cbitmap_set_range(&bc->pending, g << (gran_bits - bc->cluster_bits),
					  1ull << (gran_bits - bc->cluster_bits));
		else
			cbitmap_set(&bc->pending, g >> (bc->cluster_bits - gran_bits));
	}
	for (uint64_t c = cbitmap_next_set(&bc->pending, 0); c < bc->nclusters; c = cbitmap_next_set(&bc->pending, c + 1))
		total += min_u64(bc->cluster_size, bc->size - (c << bc->cluster_bits));
	return total;
}

int blockcopy_prepare_target(struct blockcopy *bc)
{
	struct journal_range ranges[256];
	unsigned n = 0;
	int rc = 0;

	if (!bc->target->ops->prepare_writes)
		return 0;
	for (uint64_t c = cbitmap_next_set(&bc->pending, 0); c < bc->nclusters && !rc;) {
		uint64_t end = cbitmap_next_clear(&bc->pending, c);
		ranges[n++] = (struct journal_range){ c << bc->cluster_bits, run_bytes(bc, c, end - c) };
		if (n == sizeof(ranges) / sizeof(ranges[0])) {
			rc = target_prepare_writes(bc->target, ranges, n);
			n = 0;
		}
		c = end < bc->nclusters ? cbitmap_next_set(&bc->pending, end) : bc->nclusters;
	}
	if (n && !rc)
		rc = target_prepare_writes(bc->target, ranges, n);
	return rc;
}

int blockcopy_left_over(struct blockcopy *bc, struct cbitmap *out)
{
	int rc = cbitmap_init(out, bc->nclusters, false);
	if (rc)
		return rc;
	cbitmap_copy(out, &bc->pending);
	pthread_mutex_lock(&bc->queue_lock);
	cbitmap_or(out, &bc->queued);
	pthread_mutex_unlock(&bc->queue_lock);
	return 0;
}
