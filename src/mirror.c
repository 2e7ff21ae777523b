/* mirror: see include/fleecefs/mirror.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/control.h"
#include "fleecefs/image.h"
#include "fleecefs/inject.h"
#include "fleecefs/job.h"
#include "fleecefs/mirror.h"
#include "fleecefs/pending.h"
#include "fleecefs/redirect.h"
#include "fleecefs/source.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

/* The background copy: runs of at most this, smaller while the guest is
 * busy, stepping aside for YIELD_FACTOR times what a run took (as backup.c). */
#define RUN_MAX (1u << 20)
#define RUN_GUEST_BUSY (256u << 10)
#define YIELD_FACTOR 3
#define YIELD_MAX_NS 200000000ull
/* Nothing dirty: look again this often (guest writes set bits, they do not
 * wake the copy: no syscall or lock on their path). */
#define IDLE_POLL_NS 5000000ull
#define ERROR_BACKOFF_NS 100000000ull
/* complete and cancel-after-ready copy what is dirty with the gate open
 * first, so that the closed gate holds guests only for the last bits. */
#define CONVERGE_PASSES 8

struct mirror {
	struct job job;
	struct image *image;
	char *image_path;
	char *target_path;           /* TARGET, as resolved */
	dev_t source_dev;
	ino_t source_ino;
	struct target *target;       /* under its hidden name until published */
	struct pending *record;
	bool name_claimed, attached, counted_active;
	enum backup_sync sync;
	enum mirror_copy_mode mode;
	enum error_policy on_source_error, on_target_error;
	uint64_t size;
	uint32_t cluster_size;
	unsigned cluster_bits;
	uint64_t nclusters;
	struct cbitmap dirty;
	struct cbitmap written;      /* clusters the target holds data in */
	bool bitmaps_ready;
	struct image_hook hook;
	/* write-blocking: who is writing which clusters of the target. */
	pthread_mutex_t claim_lock;
	pthread_cond_t claim_released;
	struct cbitmap claimed;
	atomic_bool first_pass_done;
	atomic_bool ended;           /* no more target writes from guests */
	atomic_bool switched;
	atomic_uint_fast64_t bytes_copied;   /* by the copy */
	atomic_uint_fast64_t through_bytes;  /* written through by guests */
	atomic_uint_fast64_t guest_failures; /* guest writes left dirty by a target error */
	uint64_t gate_closed_ns;     /* when final_sync closed the gate */
	uint64_t unflushed;          /* copied since the last writeback round (job thread); the
	                              * rounds (and one when caught up) leave the flush at
	                              * complete little to write */
};

static const struct job_driver mirror_driver;

static struct mirror *to_mirror(struct job *job) { return (struct mirror *)job; }

bool job_is_mirror(const struct job *job) { return job->driver == &mirror_driver; }

static const char *policy_name(enum error_policy p)
{
	return p == POLICY_STOP ? "stop" : p == POLICY_IGNORE ? "ignore" : "report";
}

static void cluster_span(const struct mirror *m, uint64_t off, uint64_t len, uint64_t *first, uint64_t *count)
{
	uint64_t end = min_u64(off + len, m->size);
	*first = off >> m->cluster_bits;
	*count = end > off ? ((end - 1) >> m->cluster_bits) - *first + 1 : 0;
}

/* ---- claims (write-blocking) ------------------------------------------------ */

static void claim(struct mirror *m, uint64_t first, uint64_t count)
{
	pthread_mutex_lock(&m->claim_lock);
	while (cbitmap_any_set(&m->claimed, first, count))
		pthread_cond_wait(&m->claim_released, &m->claim_lock);
	cbitmap_set_range(&m->claimed, first, count);
	pthread_mutex_unlock(&m->claim_lock);
}

static void unclaim(struct mirror *m, uint64_t first, uint64_t count)
{
	pthread_mutex_lock(&m->claim_lock);
	cbitmap_clear_range(&m->claimed, first, count);
	pthread_cond_broadcast(&m->claim_released);
	pthread_mutex_unlock(&m->claim_lock);
}

/* ---- errors ------------------------------------------------------------------ */

/* A copy (or a guest's write-through) failed: the policy of that side
 * decides; the clusters are dirty again either way. false: the job fails. */
static bool copy_failed(struct mirror *m, bool target, int err, uint64_t off)
{
	enum error_policy policy = target ? m->on_target_error : m->on_source_error;
	char what[200];

	snprintf(what, sizeof(what), "%s at offset %" PRIu64 ": %s", target ? "writing the target" : "reading the image",
		 off, target ? target_error_text(m->target, err) : error_text(err));
	switch (policy) {
	case POLICY_IGNORE:
		log_warn("mirror %s: %s (on-%s-error=ignore: retrying later)", m->job.id, what, target ? "target" : "source");
		return true;
	case POLICY_STOP:
		job_pause_on_error(&m->job, "%s (on-%s-error=stop)", what, target ? "target" : "source");
		return true;
	case POLICY_REPORT:
		break;
	}
	job_fail(&m->job, "%s", what);
	return false;
}

/* ---- the guest write path -------------------------------------------------- */

static int mirror_before_write(struct image_hook *hook, uint64_t off, uint64_t len)
{
	struct mirror *m = (struct mirror *)((char *)hook - offsetof(struct mirror, hook));
	uint64_t first, count;

	/* Its size is the mirror's: the target cannot follow a growing image. */
	if (off + len > m->size && len)
		return -EFBIG;
	if (m->mode == COPY_MODE_WRITE_BLOCKING) {
		cluster_span(m, off, len, &first, &count);
		if (count)
			claim(m, first, count);
	}
	return 0;
}

static void mirror_after_write(struct image_hook *hook, uint64_t off, uint64_t len, const void *buf, int64_t result)
{
	struct mirror *m = (struct mirror *)((char *)hook - offsetof(struct mirror, hook));
	uint64_t first, count;

	cluster_span(m, off, len, &first, &count);
	if (!count)
		return;
	if (m->mode != COPY_MODE_WRITE_BLOCKING) {
		cbitmap_mark_range(&m->dirty, first, count);
		return;
	}
	/* In sync before this write: keep it so, with the guest's own data. */
	bool through = result == (int64_t)len && buf && !atomic_load(&m->ended) &&
		       !cbitmap_any_set(&m->dirty, first, count);
	if (through) {
		int rc = inject_check(INJECT_TARGET_WRITE, off, len);
		if (!rc)
			rc = target_write(m->target, off, buf, len, TARGET_WRITE_GUEST_WAITS);
		if (rc == 0) {
			cbitmap_mark_range(&m->written, first, count);
			atomic_fetch_add(&m->through_bytes, len);
		} else {
			through = false;
			atomic_fetch_add(&m->guest_failures, 1);
			copy_failed(m, true, -rc, off);
		}
	}
	if (!through)
		cbitmap_mark_range(&m->dirty, first, count);
	unclaim(m, first, count);
}

/* ---- the copy ---------------------------------------------------------------- */

/* Copies the dirty run starting at cluster c (at most max_bytes). Returns the
 * cluster after the run, or -1 when the job should stop (it failed). */
static int64_t copy_run(struct mirror *m, uint64_t c, uint64_t max_bytes, bool throttled)
{
	uint64_t max_run = max_u64(1, max_bytes >> m->cluster_bits);
	uint64_t end = min_u64(cbitmap_next_clear(&m->dirty, c), c + max_run);
	uint64_t count = end - c, off = c << m->cluster_bits;
	uint64_t len = min_u64(count << m->cluster_bits, m->size - off);
	bool blocking = m->mode == COPY_MODE_WRITE_BLOCKING;

	if (throttled && !job_throttle(&m->job, len))
		return (int64_t)end;
	if (blocking)
		claim(m, c, count);
	/* Cleared before reading: a guest write landing after the read sets
	 * them again (mirror.h). */
	cbitmap_clear_range(&m->dirty, c, count);
	int rc = 0;
	bool target_side = false;
	uint64_t read_bytes = 0;
	if (!source_has_data(&m->image->source, off, len)) {
		/* A hole: the target needs a write only where it holds data. */
		if (cbitmap_any_set(&m->written, c, count)) {
			rc = inject_check(INJECT_TARGET_WRITE, off, len);
			if (!rc)
				rc = target_discard(m->target, off, len);
			if (rc)
				rc = target_write_zeroes(m->target, off, len);
			target_side = true;
			if (!rc)
				cbitmap_clear_range(&m->written, c, count);
		}
	} else {
		void *buf = thread_buffer(THREAD_BUFFER_COPY, (size_t)((len + 4095) & ~4095ull));
		rc = buf ? inject_check(INJECT_SOURCE_READ, off, len) : -ENOMEM;
		if (!rc)
			rc = source_read(&m->image->source, buf, off, len);
		read_bytes = len;
		if (!rc) {
			target_side = true;
			if (buffer_is_zero(buf, (size_t)len) && !cbitmap_any_set(&m->written, c, count))
				rc = 0;
			else if (!(rc = inject_check(INJECT_TARGET_WRITE, off, len)) &&
				 !(rc = target_write(m->target, off, buf, (size_t)len, 0)))
				cbitmap_mark_range(&m->written, c, count);
		}
	}
	if (rc) {
		cbitmap_mark_range(&m->dirty, c, count);
	} else {
		atomic_fetch_add(&m->bytes_copied, len);
		m->unflushed += len;
	}
	if (blocking)
		unclaim(m, c, count);
	/* After the unclaim: a guest write to the run never waits for the
	 * round's disk I/O. */
	if (m->unflushed >= TARGET_WRITEBACK_ROUND) {
		target_start_writeback(m->target);
		m->unflushed = 0;
	}
	if (throttled)
		job_charge(&m->job, len, read_bytes);
	if (rc && !copy_failed(m, target_side, -rc, off))
		return -1;
	if (rc)
		job_sleep(&m->job, clock_monotonic_ns() + ERROR_BACKOFF_NS);
	return (int64_t)end;
}

/* One pass over the dirty clusters from 0 (unthrottled when the gate is
 * closed or the job is ending). false: the job failed. */
static bool copy_all_dirty(struct mirror *m, bool throttled)
{
	for (uint64_t c = cbitmap_next_set(&m->dirty, 0); c < m->nclusters; c = cbitmap_next_set(&m->dirty, c)) {
		int64_t next = copy_run(m, c, RUN_MAX, throttled);
		if (next < 0)
			return false;
		if (job_stop_requested(&m->job) == JOB_STOP_FAIL)
			return false;
		c = (uint64_t)next;
	}
	return true;
}

/* The first pass's work list: every cluster (full) or those of data
 * extents (top), set after the start (setting is always safe). */
static void mark_first_pass(struct mirror *m)
{
	if (m->sync == SYNC_FULL) {
		cbitmap_set_range(&m->dirty, 0, m->nclusters);
		return;
	}
	for (uint64_t off = 0; off < m->size;) {
		int64_t data = source_seek(&m->image->source, off, SEEK_DATA);
		if (data < 0 || (uint64_t)data >= m->size)
			break;
		int64_t hole = source_seek(&m->image->source, (uint64_t)data, SEEK_HOLE);
		uint64_t to = hole < 0 ? m->size : min_u64((uint64_t)hole, m->size);
		uint64_t first = (uint64_t)data >> m->cluster_bits;
		cbitmap_set_range(&m->dirty, first, div_round_up(to, m->cluster_size) - first);
		off = to;
	}
}

static bool dirty_none(struct mirror *m) { return cbitmap_next_set(&m->dirty, 0) >= m->nclusters; }

/* Copies until nothing is dirty, or the job is stopped, completed or has
 * caught up; runs while the job is running or ready. */
static bool copy_loop(struct mirror *m)
{
	struct job *job = &m->job;
	uint64_t cursor = 0;
	uint64_t guest_seen = atomic_load_explicit(&m->image->guest_requests, memory_order_relaxed);
	bool guest_busy = false;

	for (;;) {
		if (job_stop_requested(job) != JOB_GO_ON)
			return job_stop_requested(job) != JOB_STOP_FAIL;
		if (!job_wait_running(job))
			continue;
		if (job_complete_requested(job))
			return true;
		uint64_t c = cbitmap_next_set(&m->dirty, cursor);
		if (c >= m->nclusters && cursor) {
			cursor = 0;
			continue;
		}
		if (c >= m->nclusters) {
			/* Caught up. */
			if (m->unflushed) {
				target_start_writeback(m->target);
				m->unflushed = 0;
			}
			job_set_ready(job, true);
			job_sleep(job, clock_monotonic_ns() + IDLE_POLL_NS);
			continue;
		}
		uint64_t start = clock_monotonic_ns();
		uint64_t max = job_chunk_size(job, m->cluster_size,
					      max_u64(guest_busy ? RUN_GUEST_BUSY : RUN_MAX, m->cluster_size));
		int64_t next = copy_run(m, c, max, true);
		if (next < 0)
			return false;
		cursor = (uint64_t)next;
		uint64_t seen = atomic_load_explicit(&m->image->guest_requests, memory_order_relaxed);
		guest_busy = seen != guest_seen;
		guest_seen = seen;
		/* In write-blocking mode the guest keeps clusters in sync itself:
		 * stepping aside costs nothing there once ready. */
		if (guest_busy && m->mode == COPY_MODE_BACKGROUND)
			job_sleep(job, clock_monotonic_ns() +
					       min_u64(YIELD_FACTOR * (clock_monotonic_ns() - start), YIELD_MAX_NS));
	}
}

/* ---- the end ------------------------------------------------------------------ */

/* With the gate open: dirty clusters copied (a few passes), the target made
 * durable. Then, gate closed: the rest, durable again; no guest write is in
 * flight and none will write the target any more. 0: returns with the gate
 * closed; -errno: the job failed, the gate is open. */
static int final_sync(struct mirror *m)
{
	for (unsigned i = 0; i < CONVERGE_PASSES && !dirty_none(m); i++)
		if (!copy_all_dirty(m, false))
			return -EIO;
	int rc = target_flush(m->target);
	if (rc) {
		job_fail(&m->job, "flushing the target: %s", target_error_text(m->target, -rc));
		return rc;
	}
	gate_close(&m->image->gate);
	m->gate_closed_ns = clock_monotonic_ns();
	atomic_store(&m->ended, true);
	image_detach_locked(m->image, &m->hook);
	m->attached = false;
	if (!copy_all_dirty(m, false) || !dirty_none(m)) {
		gate_open(&m->image->gate);
		if (job_stop_requested(&m->job) != JOB_STOP_FAIL)
			job_fail(&m->job, "copying the last dirty clusters failed");
		return -EIO;
	}
	if ((rc = target_flush(m->target))) {
		gate_open(&m->image->gate);
		job_fail(&m->job, "flushing the target: %s", target_error_text(m->target, -rc));
		return rc;
	}
	return 0;
}

/* Gate closed: the target is durable and equals the image. Published under
 * TARGET's name now, a crash from here on leaves a complete copy there. */
static int publish(struct mirror *m)
{
	char what[PATH_MAX + 64];
	int rc = target_publish(m->target, m->target_path, what, sizeof(what));
	if (rc)
		job_fail(&m->job, "%s", what);
	return rc;
}

/* Gate closed, target durable and published: record the switch, then serve
 * the target. On failure the mount stays on IMAGE, whose content is what
 * the guest wrote (the target is a copy of it). */
static int switch_to_target(struct mirror *m)
{
	char msg[PATH_MAX + 128];
	int fd = open(m->target_path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	struct stat st;
	int rc;

	if (fd < 0 || fstat(fd, &st) < 0 || !stat_is(&st, m->target->dev, m->target->ino)) {
		rc = fd < 0 ? -errno : -ESTALE;
		job_fail(&m->job, "switching to %s: %s", m->target_path,
			 rc == -ESTALE ? "it is not the file the mirror wrote" : error_text(-rc));
		if (fd >= 0)
			close(fd);
		return rc;
	}
	if ((rc = redirect_add(m->source_dev, m->source_ino, m->image_path, fd, m->target_path, msg, sizeof(msg)))) {
		job_fail(&m->job, "%s", msg);
	} else if ((rc = image_switch_locked(m->image, fd))) {
		redirect_remove(m->source_dev, m->source_ino);
		job_fail(&m->job, "switching to %s: %s", m->target_path, error_text(-rc));
	} else {
		atomic_store(&m->switched, true);
		log_info("mirror %s: %s is served from %s now", m->job.id, m->image_path, m->target_path);
	}
	close(fd);
	return rc;
}

static void end_busy(struct mirror *m)
{
	if (m->counted_active)
		image_job_ended(m->image);
	m->counted_active = false;
}

/* The job ends without a result: the hook goes (gate open), the target is
 * removed, under whichever name it has. */
static void remove_target(struct mirror *m)
{
	if (m->attached)
		image_detach(m->image, &m->hook);
	m->attached = false;
	atomic_store(&m->ended, true);
	if (m->target && m->target->published) {
		unlink(m->target->path);
		fsync_parent_dir(m->target->path);
	}
	if (m->target)
		target_close(m->target, false);
	pending_finish(m->record);
	m->record = NULL;
}

static bool ended_ready(struct job *job)
{
	pthread_mutex_lock(&job->lock);
	bool ready = job->state == JOB_READY || (job->state == JOB_PAUSED && job->resume_to == JOB_READY);
	pthread_mutex_unlock(&job->lock);
	return ready;
}

static enum job_state mirror_run(struct job *job)
{
	struct mirror *m = to_mirror(job);

	mark_first_pass(m);
	atomic_store(&m->first_pass_done, true);
	bool ok = copy_loop(m);
	enum job_stop stop = job_stop_requested(job);
	bool completing = ok && stop == JOB_GO_ON && job_complete_requested(job);

	if (!ok || stop == JOB_STOP_FAIL || (stop == JOB_STOP_CANCEL && !ended_ready(job))) {
		remove_target(m);
		end_busy(m);
		return ok && stop == JOB_STOP_CANCEL ? JOB_CANCELLED : JOB_FAILED;
	}
	/* Completing, or cancelled in sync: the target becomes a copy of the
	 * image at this moment. */
	if (final_sync(m)) {
		remove_target(m);
		end_busy(m);
		return JOB_FAILED;
	}
	uint64_t t_copied = clock_monotonic_ns();
	int rc = publish(m);
	uint64_t t_published = clock_monotonic_ns();
	if (!rc && completing)
		rc = switch_to_target(m);
	gate_open(&m->image->gate);
	uint64_t t_open = clock_monotonic_ns();
	log_info("mirror %s: guest requests held %.1f ms (last copy and flush %.1f, publish %.1f, switch %.1f)", job->id,
		 (double)(t_open - m->gate_closed_ns) / 1e6, (double)(t_copied - m->gate_closed_ns) / 1e6,
		 (double)(t_published - t_copied) / 1e6, (double)(t_open - t_published) / 1e6);
	end_busy(m);
	if (rc) {
		remove_target(m);
		return JOB_FAILED;
	}
	rc = target_close(m->target, true);
	pending_finish(m->record);
	m->record = NULL;
	if (rc && !completing) {
		job_fail(job, "closing the target: %s", error_text(-rc));
		return JOB_FAILED;
	}
	if (!completing)
		log_info("mirror %s: cancelled in sync: %s is a copy of %s at the cancel", job->id, m->target_path,
			 m->image_path);
	return JOB_COMPLETED;
}

/* ---- status and life cycle ------------------------------------------------- */

static uint64_t dirty_bytes(struct mirror *m)
{
	return m->bitmaps_ready ? min_u64(cbitmap_count(&m->dirty) << m->cluster_bits, m->size) : 0;
}

static void mirror_progress(struct job *job, struct job_progress *out)
{
	struct mirror *m = to_mirror(job);
	uint64_t dirty = dirty_bytes(m), done = atomic_load(&m->bytes_copied);
	/* As QEMU counts a mirror: what was copied, and what is still to copy. */
	out->bytes_done = done;
	out->bytes_total = done + dirty;
	if (!atomic_load(&m->first_pass_done))
		out->bytes_total = max_u64(out->bytes_total, m->sync == SYNC_FULL ? m->size : done);
	out->cbw_bytes = atomic_load(&m->through_bytes);
}

static void mirror_status(struct job *job, struct strbuf *out)
{
	struct mirror *m = to_mirror(job);
	bool concluded = job_state_concluded(job->state);
	bool in_sync = atomic_load(&m->first_pass_done) && dirty_none(m);
	strbuf_printf(out, "image=%s\ntarget=%s\nsync=%s\ncopy_mode=%s\ngranularity=%" PRIu32 "\n", m->image_path,
		      m->target_path, ctl_sync_name(m->sync),
		      m->mode == COPY_MODE_WRITE_BLOCKING ? "write-blocking" : "background", m->cluster_size);
	strbuf_printf(out, "dirty_bytes=%" PRIu64 "\nin_sync=%s\nswitched=%s\nguest_target_errors=%" PRIu64 "\n",
		      concluded ? 0 : dirty_bytes(m), concluded ? "no" : in_sync ? "yes" : "no",
		      atomic_load(&m->switched) ? "yes" : "no", (uint64_t)atomic_load(&m->guest_failures));
	strbuf_printf(out, "on_source_error=%s\non_target_error=%s\n", policy_name(m->on_source_error),
		      policy_name(m->on_target_error));
}

static void mirror_abandon(struct job *job)
{
	struct mirror *m = to_mirror(job);
	/* The transaction still holds the gate closed (or never closed it). */
	if (m->attached)
		image_detach_locked(m->image, &m->hook);
	m->attached = false;
	end_busy(m);
	if (m->target)
		target_close(m->target, false);
	pending_finish(m->record);
	m->record = NULL;
}

static void mirror_free(struct job *job)
{
	struct mirror *m = to_mirror(job);
	target_free(m->target);
	pending_free(m->record);
	if (m->name_claimed)
		target_name_release(m->target_path);
	if (m->bitmaps_ready) {
		cbitmap_destroy(&m->dirty);
		cbitmap_destroy(&m->written);
		cbitmap_destroy(&m->claimed);
	}
	pthread_mutex_destroy(&m->claim_lock);
	pthread_cond_destroy(&m->claim_released);
	if (m->image)
		image_put(m->image);
	free(m->image_path);
	free(m->target_path);
	free(m);
}

static unsigned mirror_images(struct job *job, struct image **out, unsigned max)
{
	if (!max)
		return 0;
	out[0] = to_mirror(job)->image;
	return 1;
}

static const struct job_driver mirror_driver = {
	.type = "mirror",
	.images = mirror_images,
	.run = mirror_run,
	.progress = mirror_progress,
	.status = mirror_status,
	.abandon = mirror_abandon,
	.free = mirror_free,
};

/* ---- finding jobs by image ------------------------------------------------- */

struct image_search {
	struct image *image;
	const struct job *except;
	bool mirrors_only, completing_only;
	char *id;
	size_t len;
	bool found;
};

static void match_job(struct job *job, void *arg)
{
	struct image_search *q = arg;
	struct image *used[CTL_MAX_IMAGES];

	if (q->found || job == q->except || !job->driver->images || (q->mirrors_only && !job_is_mirror(job)))
		return;
	pthread_mutex_lock(&job->lock);
	bool live = !job_state_concluded(job->state) && job->phase == JOB_COMMITTED;
	bool completing = job->complete_requested;
	pthread_mutex_unlock(&job->lock);
	if (!live || (q->completing_only && !completing))
		return;
	unsigned n = job->driver->images(job, used, CTL_MAX_IMAGES);
	for (unsigned i = 0; i < n && !q->found; i++)
		if (used[i] == q->image) {
			q->found = true;
			if (q->id)
				snprintf(q->id, q->len, "%s %s", job->driver->type, job->id);
		}
}

bool mirror_of_image(struct image *img, char *id, size_t len)
{
	struct image_search q = { .image = img, .mirrors_only = true, .id = id, .len = len };
	job_for_each(match_job, &q);
	return q.found;
}

bool mirror_completing(struct image *img, char *id, size_t len)
{
	struct image_search q = { .image = img, .mirrors_only = true, .completing_only = true, .id = id, .len = len };
	job_for_each(match_job, &q);
	return q.found;
}

int mirror_check_complete(struct job *job, char *err, size_t errlen)
{
	char other[FLEECE_NAME_MAX + 16];
	struct image_search q = { .image = to_mirror(job)->image, .except = job, .id = other, .len = sizeof(other) };

	if (!job_is_mirror(job))
		return 0;
	job_for_each(match_job, &q);
	if (q.found)
		return set_error(err, errlen, EBUSY,
				 "complete %s: %s uses %s: the mirror cannot switch the image while it runs", job->id, other,
				 to_mirror(job)->image_path);
	return 0;
}

/* ---- stage and prepare ------------------------------------------------------- */

int mirror_stage(const struct mirror_params *p, struct job **out, char *err, size_t errlen)
{
	const struct ctl_mirror *cmd = p->cmd;
	struct mirror *m = calloc(1, sizeof(*m));
	struct target_files files;
	int rc;

	if (!m)
		return set_error(err, errlen, ENOMEM, "mirror %s: out of memory", cmd->image);
	if ((rc = job_init(&m->job, &mirror_driver, cmd->id, cmd->speed, err, errlen))) {
		free(m);
		return rc;
	}
	pthread_mutex_init(&m->claim_lock, NULL);
	cond_init_monotonic(&m->claim_released);
	m->hook.before_write = mirror_before_write;
	m->hook.after_write = mirror_after_write;
	m->sync = cmd->sync;
	m->mode = cmd->copy_mode;
	m->on_source_error = cmd->on_source_error;
	m->on_target_error = cmd->on_target_error;
	m->cluster_size = p->cluster_size;
	m->cluster_bits = log2_u64(p->cluster_size);
	m->source_dev = p->source_dev;
	m->source_ino = p->source_ino;
	image_ref(p->image);
	m->image = p->image;
	m->image_path = strdup(cmd->image);
	m->target_path = strdup(p->target->resolved);
	if (!m->image_path || !m->target_path) {
		rc = set_error(err, errlen, ENOMEM, "mirror %s: out of memory", cmd->image);
		goto fail;
	}
	if ((rc = target_name_claim(m->target_path))) {
		rc = set_error(err, errlen, -rc, "mirror %s: target %s %s", cmd->image, m->target_path,
			       rc == -EEXIST ? "is being written by another job" : "cannot be claimed");
		goto fail;
	}
	m->name_claimed = true;
	if (target_files_for(m->target_path, NULL, m->job.serial, &files)) {
		rc = set_error(err, errlen, ENAMETOOLONG, "mirror %s: target %s: name too long", cmd->image, m->target_path);
		goto fail;
	}
	/* A crash leaves a record, and the next mount removes the file. */
	if (!(m->record = pending_new(m->job.serial))) {
		rc = set_error(err, errlen, ENOMEM, "mirror %s: out of memory", cmd->image);
		goto fail;
	}
	pending_set(m->record, "kind", "new");
	pending_set(m->record, "file", files.temp);
	pending_set(m->record, "final", m->target_path);
	if ((rc = pending_save(m->record))) {
		rc = set_error(err, errlen, -rc, "mirror %s: cannot write to the state directory: %s", cmd->image,
			       error_text(-rc));
		goto fail;
	}
	if ((rc = target_raw_create(m->target_path, files.temp, &m->target, err, errlen)))
		goto fail;
	pending_set_u64(m->record, "dev", (uint64_t)m->target->dev);
	pending_set_u64(m->record, "ino", (uint64_t)m->target->ino);
	if ((rc = pending_save(m->record))) {
		rc = set_error(err, errlen, -rc, "mirror %s: cannot write to the state directory: %s", cmd->image,
			       error_text(-rc));
		goto fail;
	}
	*out = &m->job;
	return 0;
fail:
	if (m->target)
		target_close(m->target, false);
	pending_finish(m->record);
	m->record = NULL;
	job_discard(&m->job);
	return rc;
}

int mirror_prepare(struct job *job, const struct mirror_params *p, char *err, size_t errlen)
{
	struct mirror *m = to_mirror(job);
	int64_t size = image_size(p->image);
	int rc;

	if (size < 0)
		return set_error(err, errlen, (int)-size, "mirror %s: cannot read the image: %s", m->image_path,
				 error_text((int)-size));
	m->size = (uint64_t)size;
	m->nclusters = div_round_up(m->size, m->cluster_size);
	if ((rc = target_set_size(m->target, m->size, err, errlen)))
		return rc;
	if (cbitmap_init(&m->dirty, m->nclusters, false) || cbitmap_init(&m->written, m->nclusters, false) ||
	    cbitmap_init(&m->claimed, m->nclusters, false)) {
		cbitmap_destroy(&m->dirty);
		cbitmap_destroy(&m->written);
		return set_error(err, errlen, ENOMEM, "mirror %s: out of memory for %" PRIu64 " clusters", m->image_path,
				 m->nclusters);
	}
	m->bitmaps_ready = true;
	if ((rc = image_attach_locked(p->image, &m->hook, false)))
		return set_error(err, errlen, -rc, "mirror %s: out of memory", m->image_path);
	m->attached = true;
	image_job_started(p->image);
	m->counted_active = true;
	return job_spawn(&m->job, err, errlen);
}
