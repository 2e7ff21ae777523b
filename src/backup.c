/* backup: see include/fleecefs/backup.h */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "fleecefs/backup.h"
#include "fleecefs/blockcopy.h"
#include "fleecefs/control.h"
#include "fleecefs/image.h"
#include "fleecefs/job.h"
#include "fleecefs/manifest.h"
#include "fleecefs/target.h"

#define COPY_CHUNK_MAX (1u << 20)
/* While the guest is busy: smaller chunks (a guest request queued behind one
 * waits less) and a duty cycle of 1 / (1 + YIELD_FACTOR). */
#define COPY_CHUNK_GUEST_BUSY (256u << 10)
#define YIELD_FACTOR 3
/* Writeback of the target is started every so often while the guest is idle,
 * so an idle backup overlaps reading and writing instead of syncing at the
 * end; while the guest is busy it waits (copy-before-write stays a page-cache
 * copy, the disk serves the guest). */
#define WRITEBACK_EVERY (64ull << 20)
#define MAX_COPY_WORKERS 16

struct backup {
	struct job job;
	struct image_hook hook;
	struct image *image;
	char *image_path;
	char *target_path;
	enum backup_sync sync;
	enum target_format format;
	bool checksum;
	struct target *target;
	struct manifest *manifest;
	struct blockcopy bc;
	bool bc_ready;
	bool counted_active;
	bool attached;
	unsigned copy_workers;
	/* Set once the job will not complete: copy-before-write stops, since
	 * the target is going to be removed anyway. */
	atomic_bool broken;
	/* Where the background copy looks next (a hint; claims decide). */
	atomic_uint_fast64_t cursor;
	/* Bytes copied since writeback was last started. */
	atomic_uint_fast64_t unflushed;
	uint64_t run_start_ns;
};

static struct backup *to_backup(struct job *job) { return (struct backup *)job; }

static const char *strerror_safe(int e)
{
	static __thread char buf[128];
	return strerror_r(e, buf, sizeof(buf));
}

/* ---- the guest write path ----------------------------------------------- */

static int backup_before_write(struct image_hook *hook, uint64_t off, uint64_t len)
{
	struct backup *b = (struct backup *)((char *)hook - offsetof(struct backup, hook));

	if (!blockcopy_needs_copy(&b->bc, off, len) || atomic_load(&b->broken))
		return 0;
	uint64_t start = clock_monotonic_ns();
	int rc = blockcopy_before_write(&b->bc, off, len, 0);
	latency_record(&b->job.cbw_wait, (clock_monotonic_ns() - start) / 1000);
	if (rc == 0)
		return 0;
	/* on-cbw-error=break-snapshot: the guest write goes on, the backup can
	 * no longer be exact and fails. */
	atomic_store(&b->broken, true);
	job_fail(&b->job, "copy-before-write of offset %" PRIu64 " failed: %s", off, strerror_safe(-rc));
	return 0;
}

/* ---- the background copy ------------------------------------------------ */

static void advance_cursor(struct backup *b, uint64_t to)
{
	uint_fast64_t cur = atomic_load(&b->cursor);
	while (cur < to && !atomic_compare_exchange_weak(&b->cursor, &cur, to))
		;
}

/* After a chunk that took `spent` ns: step aside if the guest did I/O on
 * the image meanwhile, else maybe start writeback. Returns the new "busy". */
static bool after_chunk(struct backup *b, uint64_t *guest_seen, uint64_t spent, uint64_t copied)
{
	uint64_t seen = atomic_load_explicit(&b->image->guest_requests, memory_order_relaxed);
	bool busy = seen != *guest_seen;

	*guest_seen = seen;
	if (busy) {
		job_sleep(&b->job, clock_monotonic_ns() + YIELD_FACTOR * spent);
	} else if (atomic_fetch_add(&b->unflushed, copied) + copied >= WRITEBACK_EVERY) {
		atomic_store(&b->unflushed, 0);
		target_start_writeback(b->target);
	}
	return busy;
}

static void *copy_worker(void *arg)
{
	struct backup *b = arg;
	struct job *job = &b->job;
	uint64_t unit = b->bc.cluster_size;
	uint64_t guest_seen = atomic_load_explicit(&b->image->guest_requests, memory_order_relaxed);
	bool guest_busy = false;

	for (;;) {
		int queued_error = blockcopy_queue_error(&b->bc);
		if (queued_error) {
			job_fail(job, "target write failed: %s", strerror_safe(-queued_error));
			return NULL;
		}
		uint64_t max = guest_busy ? COPY_CHUNK_GUEST_BUSY : COPY_CHUNK_MAX;
		uint64_t chunk = job_chunk_size(job, unit, max_u64(max, unit));
		if (!job_throttle(job))
			return NULL;
		uint64_t from = atomic_load(&b->cursor), cursor = from, read_bytes = 0;
		uint64_t start = clock_monotonic_ns();
		int64_t n = blockcopy_copy_next(&b->bc, &cursor, chunk, &read_bytes);
		job_charge(job, read_bytes);
		if (n < 0) {
			job_fail(job, "background copy at offset %" PRIu64 ": %s", cursor, strerror_safe((int)-n));
			return NULL;
		}
		if (n > 0) {
			advance_cursor(b, cursor);
			guest_busy = after_chunk(b, &guest_seen, clock_monotonic_ns() - start, read_bytes);
			continue;
		}
		/* Nothing unclaimed from `from` on. Done, or start over from 0,
		 * or everything left is being copied by others: wait for them. */
		if (blockcopy_pending_clusters(&b->bc) == 0)
			return NULL;
		if (from == 0)
			inflight_wait_idle(&b->bc.inflight);
		uint_fast64_t expected = from;
		atomic_compare_exchange_strong(&b->cursor, &expected, 0);
	}
}

static enum job_state backup_run(struct job *job)
{
	struct backup *b = to_backup(job);
	pthread_t helpers[MAX_COPY_WORKERS];
	unsigned nhelpers = 0;
	enum job_state final;

	b->run_start_ns = clock_monotonic_ns();
	for (unsigned i = 1; i < b->copy_workers && nhelpers < MAX_COPY_WORKERS; i++)
		if (pthread_create(&helpers[nhelpers], NULL, copy_worker, b) == 0)
			nhelpers++;
	copy_worker(b);
	for (unsigned i = 0; i < nhelpers; i++)
		pthread_join(helpers[i], NULL);

	uint64_t copied_ns = clock_monotonic_ns();
	enum job_stop stop = job_stop_requested(job);
	if (stop == JOB_GO_ON && blockcopy_pending_clusters(&b->bc) == 0) {
		/* All of T is read; no guest write needs us any more. */
		image_detach(b->image, &b->hook);
		b->attached = false;
		uint64_t where = 0;
		int rc = blockcopy_drain(&b->bc, &where);
		uint64_t drained_ns = clock_monotonic_ns();
		if (rc)
			job_fail(job, "target %s: write at offset %" PRIu64 " failed: %s", b->target_path, where,
				 strerror_safe(-rc));
		else if ((rc = target_finish(b->target)))
			job_fail(job, "target %s: cannot flush: %s", b->target_path, strerror_safe(-rc));
		else if (b->manifest && (rc = manifest_finish(b->manifest)))
			job_fail(job, "manifest %s: cannot write: %s", b->manifest->path, strerror_safe(-rc));
		final = rc ? JOB_FAILED : JOB_COMPLETED;
		log_debug("backup %s: read in %.3f s, queue drained in %.3f s, target and manifest durable in %.3f s",
			  job->id, (copied_ns - b->run_start_ns) / 1e9, (drained_ns - copied_ns) / 1e9,
			  (clock_monotonic_ns() - drained_ns) / 1e9);
	} else {
		final = stop == JOB_STOP_CANCEL ? JOB_CANCELLED : JOB_FAILED;
	}
	if (final != JOB_COMPLETED) {
		atomic_store(&b->broken, true);
		if (b->attached)
			image_detach(b->image, &b->hook);
		b->attached = false;
		blockcopy_stop_writers(&b->bc);
		target_abort(b->target);
		if (b->manifest)
			manifest_abort(b->manifest);
	}
	atomic_fetch_sub(&b->image->active_jobs, 1);
	b->counted_active = false;
	return final;
}

/* ---- status and life cycle ---------------------------------------------- */

static void backup_progress(struct job *job, struct job_progress *out)
{
	struct backup *b = to_backup(job);
	out->bytes_total = b->bc.size;
	out->bytes_done = atomic_load(&b->bc.bytes_done);
	out->cbw_bytes = atomic_load(&b->bc.cbw_bytes);
}

static void backup_status(struct job *job, struct strbuf *out)
{
	struct backup *b = to_backup(job);
	strbuf_printf(out, "image=%s\ntarget=%s\nsync=%s\nformat=%s\nchecksum=%s\ncluster_size=%" PRIu32 "\n",
		      b->image_path, b->target_path, ctl_sync_name(b->sync), ctl_format_name(b->format),
		      b->checksum ? "xxh3" : "none", b->bc.cluster_size);
}

static void backup_abandon(struct job *job)
{
	struct backup *b = to_backup(job);
	/* The transaction still holds the gate closed. */
	if (b->attached)
		image_detach_locked(b->image, &b->hook);
	b->attached = false;
	if (b->counted_active)
		atomic_fetch_sub(&b->image->active_jobs, 1);
	b->counted_active = false;
	if (b->target)
		target_abort(b->target);
	if (b->manifest)
		manifest_abort(b->manifest);
}

static void backup_free(struct job *job)
{
	struct backup *b = to_backup(job);
	if (b->bc_ready)
		blockcopy_destroy(&b->bc);
	target_free(b->target);
	manifest_free(b->manifest);
	if (b->image)
		image_put(b->image);
	free(b->image_path);
	free(b->target_path);
	free(b);
}

static const struct job_driver backup_driver = {
	.type = "backup",
	.run = backup_run,
	.progress = backup_progress,
	.status = backup_status,
	.abandon = backup_abandon,
	.free = backup_free,
};

int backup_prepare(const struct backup_params *p, struct job **out, char *err, size_t errlen)
{
	const struct ctl_backup *cmd = p->cmd;
	struct backup *b = calloc(1, sizeof(*b));
	int rc;

	if (!b)
		return set_error(err, errlen, ENOMEM, "backup %s: out of memory", cmd->image);
	rc = job_init(&b->job, &backup_driver, cmd->id, cmd->speed, err, errlen);
	if (rc) {
		free(b);
		return rc;
	}
	b->hook.before_write = backup_before_write;
	b->sync = cmd->sync;
	b->format = cmd->format;
	b->checksum = cmd->checksum;
	b->copy_workers = p->copy_workers ? p->copy_workers : 1;
	atomic_init(&b->broken, false);
	atomic_init(&b->cursor, 0);
	atomic_init(&b->unflushed, 0);
	image_ref(p->image);
	b->image = p->image;
	b->image_path = strdup(cmd->image);
	b->target_path = strdup(cmd->target);
	if (!b->image_path || !b->target_path) {
		rc = set_error(err, errlen, ENOMEM, "backup %s: out of memory", cmd->image);
		goto fail;
	}
	/* The gate is closed: this size is the size at T. */
	int64_t size = image_size(p->image);
	if (size < 0) {
		rc = set_error(err, errlen, (int)-size, "backup %s: cannot read the image: %s", cmd->image,
			       strerror_safe((int)-size));
		goto fail;
	}
	if ((rc = target_raw_create(cmd->target, (uint64_t)size, &b->target, err, errlen)))
		goto fail;
	if (cmd->checksum &&
	    (rc = manifest_create(cmd->target, (uint64_t)size, p->cluster_size, &b->manifest, err, errlen)))
		goto fail;
	if ((rc = blockcopy_init(&b->bc, p->image, b->target, b->manifest, (uint64_t)size, p->cluster_size))) {
		rc = set_error(err, errlen, -rc, "backup %s: out of memory for %" PRIu64 " clusters", cmd->image,
			       div_round_up((uint64_t)size, p->cluster_size));
		goto fail;
	}
	b->bc_ready = true;
	if ((rc = image_attach_locked(p->image, &b->hook))) {
		rc = set_error(err, errlen, EBUSY, "backup %s: too many jobs on this image (at most %d)", cmd->image,
			       IMAGE_MAX_HOOKS);
		goto fail;
	}
	b->attached = true;
	/* Counted before the thread can run, so it can never count down first. */
	atomic_fetch_add(&p->image->active_jobs, 1);
	b->counted_active = true;
	if ((rc = job_spawn(&b->job, err, errlen)))
		goto fail;
	*out = &b->job;
	return 0;
fail:
	backup_abandon(&b->job);
	pthread_cond_destroy(&b->job.wake);
	pthread_mutex_destroy(&b->job.lock);
	backup_free(&b->job);
	return rc;
}
