/* backup: see include/fleecefs/backup.h */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/backup.h"
#include "fleecefs/bitmap.h"
#include "fleecefs/blockcopy.h"
#include "fleecefs/control.h"
#include "fleecefs/daemon.h"
#include "fleecefs/image.h"
#include "fleecefs/inject.h"
#include "fleecefs/job.h"
#include "fleecefs/manifest.h"
#include "fleecefs/pending.h"
#include "fleecefs/snapshot.h"
#include "fleecefs/snapstore.h"
#include "fleecefs/target.h"

#define COPY_CHUNK_MAX (1u << 20)
/* While the guest is busy: smaller chunks (a guest request queued behind one
 * waits less) and a duty cycle of 1 / (1 + YIELD_FACTOR). */
#define COPY_CHUNK_GUEST_BUSY (256u << 10)
#define YIELD_FACTOR 3
#define YIELD_MAX_NS 200000000ull  /* a pathologically slow chunk is no reason to idle long */
/* A pass that skipped clusters after ignored errors waits this long before
 * the next, so a source that keeps failing is not hammered. */
#define IGNORED_ERROR_BACKOFF_NS 100000000ull

struct backup {
	struct job job;
	struct image_hook hook;
	struct image *image;
	char *image_path;
	char *target_path;              /* TARGET: the backup's name once complete */
	char *partial_path;             /* TARGET.partial: its name if kept partial */
	char *kept_partial;             /* set when the job ended keeping it */
	char *chain_text;               /* the chain record decided, written last */
	bool names_claimed;
	struct pending *record;         /* pending.h: what a crash must finish or undo */
	enum backup_sync sync;
	enum target_format format, source_format;
	bool checksum;
	enum error_policy on_source_error, on_target_error;
	enum cbw_policy on_cbw_error;
	uint64_t cbw_timeout_ms;
	struct target *target;
	struct manifest *manifest;
	struct copy_source *source;
	struct job *snapshot;           /* reading one of its views; referenced */
	struct snapstore fleece;        /* fleecing=on: the frozen image */
	bool fleece_open;               /* the store made (at stage), not closed yet */
	bool fleecing;                  /* ... and attached at T: the job's source */
	bool reflink;                   /* reflink=auto: copies may share blocks */
	bool in_place;                  /* raw incremental onto an earlier backup */
	bool from_partial;              /* ... which is a partial one, completed now */
	struct dirty_bitmap *bitmap;    /* bitmap=NAME, busy while we run */
	char bitmap_name[FLEECE_NAME_MAX + 1];
	enum bitmap_mode bitmap_mode;
	atomic_uint_fast64_t bytes_total;
	struct blockcopy bc;
	bool bc_ready;
	bool counted_active;
	bool attached;
	unsigned copy_workers;
	/* The copy's cluster: the daemon's, or more when the target needs its
	 * writes in larger whole units (target.h write_unit). */
	uint32_t copy_unit;
	/* Set once the job will not complete: copy-before-write stops, since
	 * the target is going to be removed anyway. */
	atomic_bool broken;
	/* Where the background copy looks next (a hint; claims decide). */
	atomic_uint_fast64_t cursor;
	/* Errors were ignored in this pass: back off before the next. */
	atomic_bool skipped_errors;
	atomic_uint_fast64_t fleece_used;
	uint64_t run_start_ns;
};

static struct backup *to_backup(struct job *job) { return (struct backup *)job; }

static const char *policy_name(enum error_policy p)
{
	return p == POLICY_STOP ? "stop" : p == POLICY_IGNORE ? "ignore" : "report";
}

/* "reading the image at offset N: Input/output error" */
static void describe_error(const struct backup *b, const struct blockcopy_error *e, char *buf, size_t len)
{
	const char *what = e->injected ? "copy-before-write (injected)" :
			   e->target ? "writing the target" : "reading the image";
	/* A target may say more than errno (a server's answer). */
	const char *why = e->target && b->target ? target_error_text(b->target, -e->err) : error_text(-e->err);
	snprintf(buf, len, "%s at offset %" PRIu64 ": %s", what, e->offset, why);
}

/* ---- the guest write path ----------------------------------------------- */

/* break-guest-write: the old data of clusters the background copy queued
 * must be in the target before the guest may overwrite them. */
static int wait_queued(struct backup *b, uint64_t off, uint64_t len)
{
	if (!b->bc.cbw_write_through || blockcopy_wait_queued(&b->bc, off, len) == 0)
		return 0;
	log_warn("backup %s: writing the target failed for the old data at offset %" PRIu64
		 ": failing the guest write (on-cbw-error=break-guest-write)", b->job.id, off);
	return -EIO;
}

/* For the io_uring fast path, which must not sleep: 0 where the write needs
 * nothing of this job (the clusters' old data is saved, and nothing waits
 * for the target), else -EAGAIN and the write goes through
 * backup_before_write. Pending bits only ever clear during a job, so a clear
 * one stays clear. */
static int backup_before_write_nowait(struct image_hook *hook, uint64_t off, uint64_t len)
{
	struct backup *b = (struct backup *)((char *)hook - offsetof(struct backup, hook));

	if (atomic_load(&b->broken))
		return 0;
	return b->bc.cbw_write_through || blockcopy_needs_copy(&b->bc, off, len) ? -EAGAIN : 0;
}

static int backup_before_write(struct image_hook *hook, uint64_t off, uint64_t len)
{
	struct backup *b = (struct backup *)((char *)hook - offsetof(struct backup, hook));
	struct blockcopy_error e;
	char what[200];

	if (atomic_load(&b->broken))
		return 0;
	if (!blockcopy_needs_copy(&b->bc, off, len))
		return wait_queued(b, off, len);
	uint64_t start = clock_monotonic_ns();
	int rc = blockcopy_before_write(&b->bc, off, len, b->cbw_timeout_ms * 1000000ull, &e);
	if (!rc)
		rc = wait_queued(b, off, len);   /* its own copies are written already */
	latency_record(&b->job.cbw_wait, (clock_monotonic_ns() - start) / 1000);
	if (rc == 0 || !e.err)
		return rc;
	if (rc == -ETIMEDOUT)
		snprintf(what, sizeof(what), "copy-before-write of offset %" PRIu64 " took longer than cbw-timeout=%" PRIu64
			 " ms", off, b->cbw_timeout_ms);
	else
		describe_error(b, &e, what, sizeof(what));
	if (b->on_cbw_error == CBW_BREAK_GUEST_WRITE) {
		/* The snapshot stays exact: the guest's write does not happen
		 * (its old data was not saved). */
		log_warn("backup %s: %s: failing the guest write (on-cbw-error=break-guest-write)", b->job.id, what);
		return -EIO;
	}
	/* break-snapshot: the guest write goes on, the backup can no longer be
	 * exact and fails. */
	atomic_store(&b->broken, true);
	job_fail(&b->job, "copy-before-write: %s", what);
	return 0;
}

/* ---- errors of the copy ------------------------------------------------- */

/* A background copy failed: the job's policy for that side decides.
 * Returns false when the worker should stop. */
static bool handle_copy_error(struct backup *b, const struct blockcopy_error *e)
{
	enum error_policy policy = e->target ? b->on_target_error : b->on_source_error;
	char what[200];

	describe_error(b, e, what, sizeof(what));
	switch (policy) {
	case POLICY_IGNORE:
		/* The clusters stay pending; a later pass copies them. */
		log_warn("backup %s: %s (on-%s-error=ignore: retrying later)", b->job.id, what,
			 e->target ? "target" : "source");
		atomic_store(&b->skipped_errors, true);
		return true;
	case POLICY_STOP:
		/* Retried from here after resume. */
		atomic_store(&b->cursor, e->offset);
		job_pause_on_error(&b->job, "%s (on-%s-error=stop)", what, e->target ? "target" : "source");
		return true;
	case POLICY_REPORT:
		break;
	}
	job_fail(&b->job, "%s", what);
	return false;
}

/* The write-behind thread could not write queued data (blockcopy.h). */
static bool backup_queued_write_failed(void *owner, int err, uint64_t offset)
{
	struct backup *b = owner;
	struct blockcopy_error e = { .err = err, .target = true, .offset = offset };
	char what[200];

	describe_error(b, &e, what, sizeof(what));
	switch (b->on_target_error) {
	case POLICY_IGNORE:
		log_warn("backup %s: %s (on-target-error=ignore: retrying)", b->job.id, what);
		return true;
	case POLICY_STOP:
		blockcopy_hold_writes(&b->bc, true);
		job_pause_on_error(&b->job, "%s (on-target-error=stop)", what);
		return true;
	case POLICY_REPORT:
		break;
	}
	job_fail(&b->job, "%s", what);
	return false;
}

static const struct blockcopy_ops backup_copy_ops = {
	.queued_write_failed = backup_queued_write_failed,
};

static void backup_resumed(struct job *job)
{
	blockcopy_hold_writes(&to_backup(job)->bc, false);
}

static void fleece_broke(void *owner, const char *reason)
{
	struct backup *b = owner;
	job_fail(&b->job, "fleecing store: %s", reason);
}

/* Removes the store (snapstore_close; `gate_closed` as there). */
static void close_fleece(struct backup *b, bool gate_closed)
{
	if (b->fleece_open)
		snapstore_close(&b->fleece, gate_closed);
	b->fleece_open = false;
	b->fleecing = false;
}

/* ---- the background copy ------------------------------------------------ */

static void advance_cursor(struct backup *b, uint64_t to)
{
	uint_fast64_t cur = atomic_load(&b->cursor);
	while (cur < to && !atomic_compare_exchange_weak(&b->cursor, &cur, to))
		;
}

/* After a chunk that took `spent` ns: step aside if the guest did I/O on
 * the image meanwhile. Returns the new "guest busy". */
static bool after_chunk(struct backup *b, uint64_t *guest_seen, uint64_t spent)
{
	uint64_t seen = atomic_load_explicit(&b->image->guest_requests, memory_order_relaxed);
	bool busy = seen != *guest_seen;

	*guest_seen = seen;
	if (busy)
		job_sleep(&b->job, clock_monotonic_ns() + min_u64(YIELD_FACTOR * spent, YIELD_MAX_NS));
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
		uint64_t max = guest_busy ? COPY_CHUNK_GUEST_BUSY : COPY_CHUNK_MAX;
		uint64_t chunk = job_chunk_size(job, unit, max_u64(max, unit));
		if (!job_throttle(job, chunk))
			return NULL;
		uint64_t from = atomic_load(&b->cursor), cursor = from, read_bytes = 0;
		uint64_t start = clock_monotonic_ns();
		struct blockcopy_error e;
		int64_t n = blockcopy_copy_next(&b->bc, &cursor, chunk, &read_bytes, &e);
		job_charge(job, chunk, read_bytes);
		if (n < 0) {
			if (!handle_copy_error(b, &e))
				return NULL;
			if (e.err && atomic_load(&b->cursor) != e.offset)
				advance_cursor(b, cursor);
			continue;
		}
		if (n > 0) {
			advance_cursor(b, cursor);
			if (b->fleecing) {
				/* In the target (or its queue) now: the store may let go. */
				uint64_t count = div_round_up((uint64_t)n, unit);
				snapstore_discard(&b->fleece, (cursor >> b->bc.cluster_bits) - count, count);
			}
			guest_busy = after_chunk(b, &guest_seen, clock_monotonic_ns() - start);
			continue;
		}
		/* Nothing unclaimed from `from` on. Done, or start over from 0,
		 * or everything left is being copied by others: wait for them. */
		if (blockcopy_pending_clusters(&b->bc) == 0)
			return NULL;
		if (from == 0) {
			inflight_wait_idle(&b->bc.inflight);
			if (atomic_exchange(&b->skipped_errors, false))
				job_sleep(job, clock_monotonic_ns() + IGNORED_ERROR_BACKOFF_NS);
		}
		uint_fast64_t expected = from;
		atomic_compare_exchange_strong(&b->cursor, &expected, 0);
	}
}

static bool backup_gives_up(void *arg)
{
	return job_stop_requested(arg) != JOB_GO_ON;
}

/* ---- the end: publish, keep as partial, or undo --------------------------- */

/* The chain record this job leaves behind, as text. */
static void chain_text(struct backup *b, const char *where, bool partial, struct strbuf *out)
{
	struct chain_info c = { .partial = partial, .checksum = b->checksum, .time_ns = b->job.started_ns,
				.size = b->bc.size, .dev = (uint64_t)b->target->dev, .ino = (uint64_t)b->target->ino };

	snprintf(c.target, sizeof(c.target), "%s", where);
	snprintf(c.final, sizeof(c.final), "%s", b->target_path);
	snprintf(c.format, sizeof(c.format), "%s", ctl_format_name(b->format));
	snprintf(c.sync, sizeof(c.sync), "%s", ctl_sync_name(b->sync));
	snprintf(c.job, sizeof(c.job), "%s", b->job.id);
	bitmap_chain_format(&c, out);
}

/* Records the decision (what to keep, and the chain record to write) before
 * the first rename: from here on a crash is finished, not undone. */
static int decide(struct backup *b, const char *decision, const char *where, bool partial)
{
	struct strbuf text = { 0 };
	char chain[PATH_MAX];

	if (b->bitmap) {
		if (bitmap_chain_path_by_name(b->image, b->bitmap_name, chain, sizeof(chain)) == 0)
			pending_set(b->record, "chain_file", chain);
		chain_text(b, where, partial, &text);
		if (text.failed) {
			strbuf_free(&text);
			return -ENOMEM;
		}
	}
	pending_set_chain(b->record, text.data ? text.data : "");
	pending_set(b->record, "decision", decision);
	int rc = pending_save(b->record);
	if (rc) {
		pending_set(b->record, "decision", NULL);
		pending_set_chain(b->record, "");
	} else if (b->bitmap) {
		/* Kept for the chain record, written after the renames. */
		free(b->chain_text);
		b->chain_text = strbuf_steal(&text);
	}
	strbuf_free(&text);
	return rc;
}

/* A publication failed after the decision: take the decision back, so that
 * the job's own undo (and a crash now) undoes instead. */
static void undecide(struct backup *b)
{
	pending_set(b->record, "decision", NULL);
	pending_set_chain(b->record, "");
	pending_save(b->record);
	free(b->chain_text);
	b->chain_text = NULL;
}

/* Puts the result under `name` (with its manifest), after the decision. An
 * in-place file's manifest is replaced where it keeps its name, and goes
 * when the file moves or the job wrote none (checksum=none: it would
 * describe the earlier content). */
static int publish(struct backup *b, const char *name, char *what, size_t len)
{
	char mname[PATH_MAX + 8], mold[PATH_MAX + 8];
	/* An export is overwritten by every backup into it: so is its manifest. */
	bool replace = (b->in_place && strcmp(b->target->path, name) == 0) || b->format == FORMAT_NBD;
	int rc;

	manifest_path(b->target->path, mold, sizeof(mold));
	manifest_path(name, mname, sizeof(mname));
	if (b->manifest && (rc = manifest_publish(b->manifest, mname, replace))) {
		snprintf(what, len, "manifest %s: cannot publish it: %s", mname, error_text(-rc));
		return rc;
	}
	if ((rc = target_publish(b->target, name, what, len))) {
		if (b->manifest && !replace)
			unlink(mname);
		return rc;
	}
	if (b->in_place && (strcmp(mold, mname) != 0 || !b->manifest) && unlink(mold) == 0)
		fsync_parent_dir(mold);
	return 0;
}

/* The chain record and then the bitmap's new bits (bitmap.h: in this order,
 * a crash in between leaves bits that over-approximate). */
static void hand_back_bitmap(struct backup *b, bool success, const struct cbitmap *left)
{
	if (!b->bitmap)
		return;
	if (b->chain_text) {
		bitmap_chain_put(b->image, b->bitmap, b->chain_text);
		free(b->chain_text);
		b->chain_text = NULL;
	}
	bitmap_job_end(b->image, b->bitmap, b->bitmap_mode, success, left, b->bc.cluster_bits);
	b->bitmap = NULL;
}

/* The job's files are settled: no record, no names. */
static void settle(struct backup *b)
{
	pending_finish(b->record);
	b->record = NULL;
	if (b->names_claimed) {
		target_name_release(b->target_path);
		target_name_release(b->partial_path);
	}
	b->names_claimed = false;
}

/* Everything of T is in the target, durably: publish it under TARGET. */
static int complete_result(struct backup *b)
{
	char what[PATH_MAX + 200], mname[PATH_MAX + 8];
	/* Updated where it is (an export is always where it is). */
	bool same_name = (b->in_place && !b->from_partial) || b->format == FORMAT_NBD;
	int rc;

	if (!same_name && ((rc = target_name_free(b->target_path, what, sizeof(what))) ||
			   (b->manifest && (rc = target_name_free(manifest_path(b->target_path, mname, sizeof(mname)), what,
							   sizeof(what)))))) {
		job_fail(&b->job, "target %s", what);
		return rc;
	}
	if ((rc = decide(b, "commit", b->target_path, false))) {
		job_fail(&b->job, "cannot record the decision in the state directory: %s", error_text(-rc));
		return rc;
	}
	if ((rc = publish(b, b->target_path, what, sizeof(what)))) {
		undecide(b);
		job_fail(&b->job, "%s", what);
		return rc;
	}
	hand_back_bitmap(b, true, NULL);
	target_close(b->target, true);
	settle(b);
	return 0;
}

/* bitmap-mode=always after a failure or cancel: what reached the target is
 * kept as a partial backup, the rest put back as it was before the job
 * (`left`); the bitmap then holds `left` plus the writes since T. */
static int keep_partial(struct backup *b, const struct cbitmap *left)
{
	char what[PATH_MAX + 200];
	int rc;

	if ((rc = target_forget(b->target, left, b->bc.cluster_bits)) || (rc = target_flush(b->target))) {
		log_warn("backup %s: cannot keep the partial backup (%s): undoing it", b->job.id, error_text(-rc));
		return rc;
	}
	if (b->manifest) {
		manifest_set_partial(b->manifest, true);
		if ((rc = manifest_forget(b->manifest, left)) || (rc = manifest_write(b->manifest)))
			return rc;
	}
	if (strcmp(b->target->path, b->partial_path) != 0 && (rc = target_name_free(b->partial_path, what, sizeof(what)))) {
		log_warn("backup %s: cannot keep the partial backup: %s", b->job.id, what);
		return rc;
	}
	if ((rc = decide(b, "partial", b->partial_path, true)))
		return rc;
	if ((rc = publish(b, b->partial_path, what, sizeof(what)))) {
		log_warn("backup %s: cannot keep the partial backup: %s", b->job.id, what);
		undecide(b);
		return rc;
	}
	hand_back_bitmap(b, false, left);
	target_close(b->target, true);
	settle(b);
	return 0;
}

/* Nothing of the job stays: a new target removed, an updated one rolled
 * back; the bitmap as if the job never ran. */
static void undo_result(struct backup *b)
{
	if (b->target) {
		int rc = target_close(b->target, false);
		if (rc)
			log_error("backup %s: cannot put %s back as it was (%s): the next mount retries from its journal",
				  b->job.id, b->target->path, error_text(-rc));
		if (rc && b->record) {
			/* The record must stay for the next mount. */
			pending_free(b->record);
			b->record = NULL;
		}
	}
	if (b->manifest)
		manifest_discard(b->manifest);
	hand_back_bitmap(b, false, NULL);
	settle(b);
}

/* The target made durable at the end; a failure is a target error like any
 * other: stop pauses the job and resume flushes again (an NBD target first
 * sends again what the failed flush did not cover), ignore retries after a
 * pause, report fails. -ECANCELED: stopped meanwhile. */
static int flush_target(struct backup *b)
{
	for (;;) {
		int rc = inject_check(INJECT_TARGET_FLUSH, 0, b->bc.size);
		if (!rc)
			rc = target_flush(b->target);
		if (!rc || b->on_target_error == POLICY_REPORT)
			return rc;
		const char *text = target_error_text(b->target, -rc);
		if (b->on_target_error == POLICY_STOP) {
			job_pause_on_error(&b->job, "target %s: cannot flush (on-target-error=stop): %s", b->target_path, text);
		} else {
			log_warn("backup %s: target %s: cannot flush: %s (on-target-error=ignore: retrying)", b->job.id,
				 b->target_path, text);
			job_sleep(&b->job, clock_monotonic_ns() + IGNORED_ERROR_BACKOFF_NS);
		}
		if (!job_wait_running(&b->job))
			return -ECANCELED;
	}
}

/* Everything of T is read: the guest needs us no more; wait for the queued
 * writes, make the target durable, conclude with the group. */
static int finish_copy(struct backup *b)
{
	struct job *job = &b->job;
	uint64_t copied_ns = clock_monotonic_ns(), where = 0;
	char what[200];

	/* Nothing is left to copy before a guest write, except under
	 * break-guest-write, where a guest write still waits for the queued
	 * writes of its cluster: the hook stays until they drained. */
	if (b->attached && !b->bc.cbw_write_through)
		image_detach(b->image, &b->hook);
	b->attached = b->attached && b->bc.cbw_write_through;
	int rc = blockcopy_drain(&b->bc, &where, backup_gives_up, job);
	if (b->attached)
		image_detach(b->image, &b->hook);
	b->attached = false;
	if (rc == -ECANCELED)
		return rc;
	uint64_t drained_ns = clock_monotonic_ns();
	if (rc) {
		struct blockcopy_error e = { .err = rc, .target = true, .offset = where };
		describe_error(b, &e, what, sizeof(what));
		job_fail(job, "%s", what);
	} else if ((rc = flush_target(b))) {
		if (rc != -ECANCELED)
			job_fail(job, "target %s: cannot flush: %s", b->target_path, error_text(-rc));
	} else if (b->manifest && (rc = manifest_write(b->manifest))) {
		job_fail(job, "manifest %s.xxh3: cannot write: %s", b->target_path, error_text(-rc));
	}
	log_debug("backup %s: read in %.3f s, queue drained in %.3f s, target and manifest durable in %.3f s",
		  job->id, (copied_ns - b->run_start_ns) / 1e9, (drained_ns - copied_ns) / 1e9,
		  (clock_monotonic_ns() - drained_ns) / 1e9);
	if (rc)
		return rc;
	/* A concluding job keeps no thread. */
	blockcopy_stop_writers(&b->bc);
	/* Grouped jobs complete together or not at all. */
	return job_group_wait(job) ? 0 : -ECANCELED;
}

static enum job_state backup_run(struct job *job)
{
	struct backup *b = to_backup(job);
	pthread_t helpers[FLEECE_MAX_COPY_WORKERS];
	unsigned nhelpers = 0;
	enum job_state final = JOB_FAILED;

	b->run_start_ns = clock_monotonic_ns();
	if (b->in_place)
		blockcopy_prepare_target(&b->bc);
	if (b->sync == SYNC_TOP)
		atomic_fetch_sub(&b->bytes_total, blockcopy_skip_holes(&b->bc));
	if (b->sync == SYNC_NONE) {
		/* Only copy-before-write: the job runs until `complete`. */
		while (job_stop_requested(job) == JOB_GO_ON && !job_complete_requested(job))
			job_sleep(job, clock_monotonic_ns() + 1000000000ull);
	} else {
		for (unsigned i = 1; i < b->copy_workers && nhelpers < FLEECE_MAX_COPY_WORKERS; i++)
			if (pthread_create(&helpers[nhelpers], NULL, copy_worker, b) == 0)
				nhelpers++;
		copy_worker(b);
		for (unsigned i = 0; i < nhelpers; i++)
			pthread_join(helpers[i], NULL);
	}

	/* A paused job does not complete until it is resumed. */
	if (job_wait_running(job) && (b->sync == SYNC_NONE || blockcopy_pending_clusters(&b->bc) == 0)) {
		int rc = finish_copy(b);
		if (!rc)
			rc = complete_result(b);
		if (!rc)
			final = JOB_COMPLETED;
		else if (rc == -ECANCELED && job_stop_requested(job) != JOB_STOP_FAIL)
			final = JOB_CANCELLED;
	} else {
		final = job_stop_requested(job) == JOB_STOP_CANCEL ? JOB_CANCELLED : JOB_FAILED;
	}
	if (final != JOB_COMPLETED) {
		atomic_store(&b->broken, true);
		if (b->attached)
			image_detach(b->image, &b->hook);
		b->attached = false;
		blockcopy_stop_writers(&b->bc);
		/* What never durably reached the target. */
		struct cbitmap left = { 0 };
		bool kept = false;
		if (b->bitmap && b->bitmap_mode == BITMAP_MODE_ALWAYS && blockcopy_left_over(&b->bc, &left) == 0) {
			kept = keep_partial(b, &left) == 0;
			if (kept) {
				b->kept_partial = strdup(b->partial_path);
				log_info("backup %s: kept the partial backup %s; the next incremental with bitmap %s "
					 "completes it", job->id, b->partial_path, b->bitmap_name);
			}
			cbitmap_destroy(&left);
		}
		if (!kept)
			undo_result(b);
	}
	if (b->fleecing)
		snapstore_close(&b->fleece, false);   /* keeps its counters readable */
	if (b->counted_active)
		image_job_ended(b->image);
	b->counted_active = false;
	if (b->snapshot)
		snapshot_use(b->snapshot, b->job.id, false);
	return final;
}

/* ---- status and life cycle ---------------------------------------------- */

static void backup_progress(struct job *job, struct job_progress *out)
{
	struct backup *b = to_backup(job);
	out->bytes_total = atomic_load(&b->bytes_total);
	out->bytes_done = atomic_load(&b->bc.bytes_done);
	/* With fleecing, guest writes copy into the store, not the target. */
	out->cbw_bytes = atomic_load(b->fleecing ? &b->fleece.bc.cbw_bytes : &b->bc.cbw_bytes);
}

static void backup_status(struct job *job, struct strbuf *out)
{
	struct backup *b = to_backup(job);
	strbuf_printf(out, "image=%s\ntarget=%s\nsync=%s\nformat=%s\nchecksum=%s\ncluster_size=%" PRIu32 "\n",
		      b->image_path, b->target_path, ctl_sync_name(b->sync), ctl_format_name(b->format),
		      b->checksum ? "xxh3" : "none", b->bc.cluster_size);
	strbuf_printf(out, "source_format=%s\nfleecing=%s\n", ctl_format_name(b->source_format),
		      b->fleecing ? "on" : "off");
	if (b->bitmap_name[0])
		strbuf_printf(out, "bitmap=%s\nbitmap_mode=%s\n", b->bitmap_name,
			      b->bitmap_mode == BITMAP_MODE_ALWAYS ? "always" :
			      b->bitmap_mode == BITMAP_MODE_NEVER ? "never" : "on-success");
	/* Only set once concluded (the run's end writes it before the state). */
	if (job_state_concluded(job->state))
		strbuf_printf(out, "partial=%s\n", b->kept_partial ? b->kept_partial : "");
	strbuf_printf(out, "reflink=%s\ncloned_bytes=%" PRIu64 "\n", b->reflink ? "auto" : "off",
		      (uint64_t)atomic_load(&b->bc.bytes_cloned));
	if (b->fleecing)
		strbuf_printf(out, "store_bytes=%" PRIu64 "\nstore_cloned_bytes=%" PRIu64 "\n",
			      (uint64_t)atomic_load(b->fleece.store_used), (uint64_t)atomic_load(&b->fleece.bc.bytes_cloned));
	if (b->target)
		target_describe(b->target, out);
	strbuf_printf(out, "on_source_error=%s\non_target_error=%s\non_cbw_error=%s\ncbw_timeout=%" PRIu64 "\n",
		      policy_name(b->on_source_error), policy_name(b->on_target_error),
		      b->on_cbw_error == CBW_BREAK_GUEST_WRITE ? "break-guest-write" : "break-snapshot",
		      b->cbw_timeout_ms);
}

static void backup_abandon(struct job *job)
{
	struct backup *b = to_backup(job);
	/* The transaction still holds the gate closed (or never closed it). */
	if (b->attached)
		image_detach_locked(b->image, &b->hook);
	b->attached = false;
	close_fleece(b, true);
	if (b->snapshot)
		snapshot_use(b->snapshot, b->job.id, false);
	if (b->counted_active)
		image_job_ended(b->image);
	b->counted_active = false;
	undo_result(b);
}

static void backup_free(struct job *job)
{
	struct backup *b = to_backup(job);
	if (b->bc_ready)
		blockcopy_destroy(&b->bc);
	target_free(b->target);
	manifest_free(b->manifest);
	pending_free(b->record);
	if (b->names_claimed) {
		target_name_release(b->target_path);
		target_name_release(b->partial_path);
	}
	if (b->image)
		image_put(b->image);
	if (b->snapshot)
		job_put(b->snapshot);
	free(b->image_path);
	free(b->target_path);
	free(b->partial_path);
	free(b->kept_partial);
	free(b->chain_text);
	free(b);
}

static bool backup_completable(struct job *job)
{
	return to_backup(job)->sync == SYNC_NONE;
}

static unsigned backup_images(struct job *job, struct image **out, unsigned max)
{
	if (!max)
		return 0;
	out[0] = to_backup(job)->image;
	return 1;
}

static const struct job_driver backup_driver = {
	.type = "backup",
	.completable = backup_completable,
	.images = backup_images,
	.run = backup_run,
	.progress = backup_progress,
	.status = backup_status,
	.abandon = backup_abandon,
	.free = backup_free,
	.resumed = backup_resumed,
};

/* ---- stage: the files, before the point in time ----------------------------- */

static int claim_names(struct backup *b, char *err, size_t errlen)
{
	int rc = target_name_claim(b->target_path);
	/* (An export keeps a partial result where it is: one name.) */
	if (!rc && strcmp(b->partial_path, b->target_path) && (rc = target_name_claim(b->partial_path)))
		target_name_release(b->target_path);
	if (rc == -EEXIST)
		return set_error(err, errlen, EEXIST, "backup %s: target %s is being written by another job", b->image_path,
				 b->target_path);
	if (rc)
		return set_error(err, errlen, -rc, "backup %s: out of memory", b->image_path);
	b->names_claimed = true;
	return 0;
}

/* The pending record, then the files it names. */
static int stage_files(struct backup *b, const struct backup_params *p, const struct target_files *files, char *err,
		       size_t errlen)
{
	const struct ctl_backup *cmd = p->cmd;
	const char *temp = files->temp, *mtemp = files->manifest_temp, *journal = files->journal;
	char mpath[PATH_MAX + 8];
	const char *data = b->in_place ? p->chain->target : temp;
	int rc;

	if (!(b->record = pending_new(b->job.serial)))
		return set_error(err, errlen, ENOMEM, "backup %s: out of memory", cmd->image);
	bool export = b->format == FORMAT_NBD;
	pending_set(b->record, "kind", export ? (b->in_place ? "nbd-in-place" : "nbd") : b->in_place ? "in-place" : "new");
	if (export) {
		/* How the next mount reaches the export to roll it back. */
		pending_set(b->record, "tls_certs", p->target->tls_certs);
		pending_set(b->record, "tls_psk", p->target->tls_psk);
	}
	pending_set(b->record, "file", data);
	pending_set(b->record, "final", b->target_path);
	pending_set(b->record, "partial", b->partial_path);
	if (cmd->checksum)
		pending_set(b->record, "manifest_temp", mtemp);
	if (b->in_place) {
		pending_set(b->record, "journal", journal);
		pending_set(b->record, "manifest_old", manifest_path(data, mpath, sizeof(mpath)));
	}
	if ((rc = pending_save(b->record)))
		return set_error(err, errlen, -rc, "backup %s: cannot write to the state directory: %s", cmd->image,
				 error_text(-rc));
	const struct target_format_ops *format = target_format(p->target->format);
	if (b->in_place)
		rc = format->open_existing(p->target, data, (dev_t)p->chain->dev, (ino_t)p->chain->ino, journal, p->cluster_size,
					   &b->target, err, errlen);
	else
		rc = format->create(p->target, temp, &b->target, err, errlen);
	if (rc)
		return rc;
	b->copy_unit = max_u64(p->cluster_size, b->target->write_unit);
	pending_set_u64(b->record, "dev", (uint64_t)b->target->dev);
	pending_set_u64(b->record, "ino", (uint64_t)b->target->ino);
	if ((rc = pending_save(b->record)))
		return set_error(err, errlen, -rc, "backup %s: cannot write to the state directory: %s", cmd->image,
				 error_text(-rc));
	if (cmd->checksum) {
		/* An incremental starts from the checksums of the chain's last
		 * backup (updated in place, or under the new file). */
		rc = p->chain ? manifest_open_update(manifest_path(p->chain->target, mpath, sizeof(mpath)), mtemp,
						     b->copy_unit, &b->manifest, err, errlen)
				 : manifest_create(mtemp, b->copy_unit, &b->manifest, err, errlen);
		if (!rc)
			/* An export holds the raw disk. */
			manifest_set_format(b->manifest, ctl_format_name(b->format == FORMAT_NBD ? FORMAT_RAW : b->format));
		if (rc && !p->chain)
			/* Named as the user will see it. */
			set_error(err, errlen, -rc, "manifest %s: cannot create: %s", manifest_path(b->target_path, mpath,
				  sizeof(mpath)), error_text(-rc));
	}
	return rc;
}

static int init_engine(struct backup *b, const struct ctl_backup *cmd, struct copy_source *source, uint64_t size,
		       char *err, size_t errlen)
{
	int rc = blockcopy_init(&b->bc, source, b->target, b->manifest, size, b->copy_unit, &backup_copy_ops, b);
	if (rc)
		return set_error(err, errlen, -rc, "backup %s: out of memory for %" PRIu64 " clusters", cmd->image,
				 div_round_up(size, b->copy_unit));
	b->bc_ready = true;
	return 0;
}

/* Before the gates close: the copy engine for the source and size as they
 * are now. Its tables grow with the image (16 M clusters for 1 TiB, about
 * 1 ms to set up), and no guest should wait for them. Nothing uses it
 * before T: the job is not attached and its thread does not run. */
static int stage_engine(struct backup *b, const struct backup_params *p, char *err, size_t errlen)
{
	int rc;

	if (p->cmd->fleecing) {
		/* The store too (a file, and its own engine): attached at T. */
		char store[4200], msg[300];
		snprintf(store, sizeof(store), "%s/fleecing", p->state_dir);
		mkdir(store, 0700);
		snprintf(store, sizeof(store), "%s/fleecing/%s.%" PRIu64 ".store", p->state_dir, b->job.id, b->job.serial);
		if ((rc = snapstore_open(&b->fleece, p->image, store, b->copy_unit, p->cmd->max_store, &b->fleece_used,
					 fleece_broke, b, msg, sizeof(msg))))
			return set_error(err, errlen, -rc, "backup %s: fleecing store: %s", p->cmd->image, msg);
		b->fleece_open = true;
		return init_engine(b, p->cmd, &b->fleece.source, b->fleece.size, err, errlen);
	}
	if (p->view)
		return init_engine(b, p->cmd, &p->view->source, p->view->size, err, errlen);
	int64_t now = image_size(p->image);
	/* Unreadable now: prepare says so, at T. */
	return now < 0 ? 0 : init_engine(b, p->cmd, &p->image->source, (uint64_t)now, err, errlen);
}

int backup_stage(const struct backup_params *p, struct job **out, char *err, size_t errlen)
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
	b->hook.before_write_nowait = backup_before_write_nowait;
	b->sync = cmd->sync;
	b->format = p->target->format;
	b->source_format = p->source_format;
	b->checksum = cmd->checksum;
	b->reflink = cmd->reflink;
	b->on_source_error = cmd->on_source_error;
	b->on_target_error = cmd->on_target_error;
	b->on_cbw_error = cmd->on_cbw_error;
	b->cbw_timeout_ms = cmd->cbw_timeout_ms;
	b->copy_workers = p->copy_workers ? p->copy_workers : 1;
	b->in_place = p->target->in_place;
	b->from_partial = b->in_place && p->chain->partial;
	atomic_init(&b->broken, false);
	atomic_init(&b->cursor, 0);
	atomic_init(&b->skipped_errors, false);
	atomic_init(&b->fleece_used, 0);
	atomic_init(&b->bytes_total, 0);
	image_ref(p->image);
	b->image = p->image;
	b->image_path = strdup(cmd->image);
	b->target_path = strdup(p->target->resolved);
	struct target_files *files = malloc(sizeof(*files));
	if (files && target_files_for(p->target->resolved, b->in_place ? p->chain->target : NULL, b->job.serial,
				      files)) {
		free(files);
		rc = set_error(err, errlen, ENAMETOOLONG, "backup %s: target %s: name too long", cmd->image,
			       p->target->resolved);
		goto fail;
	}
	if (!files || !b->image_path || !b->target_path || !(b->partial_path = strdup(files->partial))) {
		free(files);
		rc = set_error(err, errlen, ENOMEM, "backup %s: out of memory", cmd->image);
		goto fail;
	}
	rc = claim_names(b, err, errlen);
	if (!rc)
		rc = stage_files(b, p, files, err, errlen);
	if (!rc)
		rc = stage_engine(b, p, err, errlen);
	free(files);
	if (rc)
		goto fail;
	*out = &b->job;
	return 0;
fail:
	close_fleece(b, false);
	undo_result(b);
	job_discard(&b->job);
	return rc;
}

/* ---- prepare: at the point in time ------------------------------------------ */

/* Where T is read from: a snapshot view (frozen already), a private frozen
 * image (fleecing), or the image itself, protected by our own copy-before-
 * write hook. The image's gate is closed: this is T. Sets b->source; the
 * size at T in *size. */
static int choose_source(struct backup *b, const struct backup_params *p, uint64_t *size, char *err, size_t errlen)
{
	const struct ctl_backup *cmd = p->cmd;
	int rc;

	if (p->view) {
		job_get(p->snapshot);
		b->snapshot = p->snapshot;
		snapshot_use(p->snapshot, b->job.id, true);
		b->source = &p->view->source;
		*size = p->view->size;
		return 0;
	}
	if (cmd->fleecing) {
		/* Made at stage; a size change since refuses (EBUSY), and the
		 * abandon closes the store. */
		char msg[300];
		if ((rc = snapstore_attach(&b->fleece, msg, sizeof(msg))))
			return set_error(err, errlen, -rc, "backup %s: fleecing store: %s", cmd->image, msg);
		b->fleecing = true;
		blockcopy_allow_clone(&b->fleece.bc, cmd->reflink);
		b->fleece.cbw_wait = &b->job.cbw_wait;
		/* break-guest-write holds for the store's copies too. */
		b->fleece.fail_guest = b->on_cbw_error == CBW_BREAK_GUEST_WRITE;
		b->fleece.bc.cbw_write_through = b->fleece.fail_guest;
		b->source = &b->fleece.source;
		*size = b->fleece.size;
		return 0;
	}
	int64_t now = image_size(p->image);
	if (now < 0)
		return set_error(err, errlen, (int)-now, "backup %s: cannot read the image: %s", cmd->image,
				 error_text((int)-now));
	b->source = &p->image->source;
	*size = (uint64_t)now;
	return 0;
}

/* At T: the copy engine for `size` bytes (the staged one, unless the image
 * changed size since), and what it has to copy. */
static int build_engine(struct backup *b, const struct ctl_backup *cmd, uint64_t size, char *err, size_t errlen)
{
	int rc;

	if (b->bc_ready && (b->bc.size != size || b->bc.source != b->source)) {
		blockcopy_destroy(&b->bc);
		b->bc_ready = false;
	}
	if (!b->bc_ready && (rc = init_engine(b, cmd, b->source, size, err, errlen)))
		return rc;
	b->bc.cbw_write_through = b->on_cbw_error == CBW_BREAK_GUEST_WRITE;
	blockcopy_allow_clone(&b->bc, cmd->reflink);
	if (cmd->sync == SYNC_INCREMENTAL)
		atomic_store(&b->bytes_total, blockcopy_restrict(&b->bc, &b->bitmap->frozen, b->bitmap->gran_bits));
	else
		atomic_store(&b->bytes_total, size);   /* sync=top: less once the holes are known */
	return 0;
}

int backup_prepare(struct job *job, const struct backup_params *p, char *err, size_t errlen)
{
	struct backup *b = to_backup(job);
	const struct ctl_backup *cmd = p->cmd;
	uint64_t size = 0;
	int rc;

	if ((rc = choose_source(b, p, &size, err, errlen)) || (rc = target_set_size(b->target, size, err, errlen)) ||
	    (b->manifest && (rc = manifest_set_size(b->manifest, size, err, errlen))))
		return rc;
	if (cmd->bitmap) {
		char msg[300];
		b->bitmap_mode = cmd->bitmap_mode;
		snprintf(b->bitmap_name, sizeof(b->bitmap_name), "%s", cmd->bitmap);
		if ((rc = bitmap_job_begin(p->image, cmd->bitmap, b->job.id, &b->bitmap, msg, sizeof(msg))))
			return set_error(err, errlen, -rc, "backup %s: %s", cmd->image, msg);
	}
	if ((rc = build_engine(b, cmd, size, err, errlen)))
		return rc;
	if (!p->view && !cmd->fleecing) {
		if ((rc = image_attach_locked(p->image, &b->hook, false)))
			return set_error(err, errlen, -rc, "backup %s: out of memory", cmd->image);
		b->attached = true;
		/* Counted before the thread can run, so it can never count down first. */
		image_job_started(p->image);
		b->counted_active = true;
	}
	if (p->group)
		job_group_add(p->group, &b->job);
	return job_spawn(&b->job, err, errlen);
}
