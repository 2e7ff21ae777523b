/* job: see include/fleecefs/job.h */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleecefs/events.h"
#include "fleecefs/job.h"

struct job_group {
	char name[FLEECE_NAME_MAX + 1];
	pthread_mutex_t lock;
	pthread_cond_t changed;
	struct job *members;      /* lock */
	unsigned nmembers;        /* lock */
	unsigned succeeded;       /* members waiting in job_group_wait; lock */
	bool broken;              /* a member failed or was cancelled; lock */
	unsigned refs;            /* lock */
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t registry_changed = PTHREAD_COND_INITIALIZER;
static struct job *jobs_head;      /* oldest first */
static uint64_t next_serial = 1;   /* registry_lock */
static uint64_t next_default_id = 1;

const char *job_state_name(enum job_state s)
{
	static const char *const names[] = { "running", "paused", "ready", "completed", "failed", "cancelled" };
	return names[s];
}

static struct job *find_locked(const char *id)
{
	for (struct job *j = jobs_head; j; j = j->next)
		if (strcmp(j->id, id) == 0)
			return j;
	return NULL;
}

bool job_id_taken(const char *id)
{
	pthread_mutex_lock(&registry_lock);
	bool taken = find_locked(id) != NULL;
	pthread_mutex_unlock(&registry_lock);
	return taken;
}

struct job *job_find(const char *id)
{
	pthread_mutex_lock(&registry_lock);
	struct job *j = find_locked(id);
	if (j)
		j->refs++;
	pthread_mutex_unlock(&registry_lock);
	return j;
}

int job_init(struct job *job, const struct job_driver *driver, const char *id, uint64_t speed,
	     char *err, size_t errlen)
{
	memset(job, 0, sizeof(*job));
	job->driver = driver;
	pthread_mutex_lock(&registry_lock);
	if (id && *id) {
		snprintf(job->id, sizeof(job->id), "%s", id);
	} else {
		do
			snprintf(job->id, sizeof(job->id), "job-%" PRIu64, next_default_id++);
		while (find_locked(job->id));
	}
	job->serial = next_serial++;
	pthread_mutex_unlock(&registry_lock);
	if (cond_init_monotonic(&job->wake))
		return set_error(err, errlen, ENOMEM, "job %s: cannot create a condition variable", job->id);
	pthread_mutex_init(&job->lock, NULL);
	job->state = JOB_RUNNING;
	job->resume_to = JOB_RUNNING;
	job->phase = JOB_PREPARED;
	job->speed = speed;
	job->refs = 1;
	ratelimit_set(&job->ratelimit, speed);
	return 0;
}

static void group_leave(struct job *job);
static void wake_group(struct job *job);
static int request_cancel(struct job *job, char *err, size_t errlen);

static void job_destroy(struct job *job)
{
	group_leave(job);
	pthread_cond_destroy(&job->wake);
	pthread_mutex_destroy(&job->lock);
	job->driver->free(job);
}

static void emit_state_event(struct job *job, const char *event)
{
	if (job->error[0] && (job->state == JOB_FAILED || job->state == JOB_PAUSED))
		events_emit("id=%s type=%s event=%s error=%s", job->id, job->driver->type, event, job->error);
	else
		events_emit("id=%s type=%s event=%s", job->id, job->driver->type, event);
}

/* Drops the oldest concluded jobs beyond JOB_CONCLUDED_KEPT, never `keep`
 * (the job concluding now: whoever waits for it must be able to read how it
 * ended). Registry lock held; returns the unlinked jobs to free outside it. */
static struct job *prune_locked(const struct job *keep)
{
	unsigned concluded = 0;
	struct job *dropped = NULL;

	for (struct job *j = jobs_head; j; j = j->next) {
		pthread_mutex_lock(&j->lock);
		concluded += job_state_concluded(j->state);
		pthread_mutex_unlock(&j->lock);
	}
	for (struct job **pp = &jobs_head; *pp && concluded > JOB_CONCLUDED_KEPT;) {
		struct job *j = *pp;
		pthread_mutex_lock(&j->lock);
		bool done = job_state_concluded(j->state);
		pthread_mutex_unlock(&j->lock);
		if (!done || j == keep) {
			pp = &j->next;
			continue;
		}
		*pp = j->next;
		j->next = dropped;
		dropped = j;
		concluded--;
	}
	return dropped;
}

/* The last reference is gone: the job is unlisted and concluded (or was
 * never committed), so its thread has finished or is returning. */
static void job_free(struct job *job)
{
	/* A committed job's thread detached itself before it concluded. */
	if (job->thread_spawned && !job->thread_detached)
		pthread_join(job->thread, NULL);
	job_destroy(job);
}

void job_put(struct job *job)
{
	pthread_mutex_lock(&registry_lock);
	bool last = --job->refs == 0;
	pthread_mutex_unlock(&registry_lock);
	if (last)
		job_free(job);
}

static void free_dropped(struct job *dropped)
{
	while (dropped) {
		struct job *next = dropped->next;
		dropped->next = NULL;
		job_put(dropped);
		dropped = next;
	}
}

static void job_conclude(struct job *job, enum job_state final)
{
	pthread_mutex_lock(&registry_lock);
	pthread_mutex_lock(&job->lock);
	job->state = final;
	job->finished_ns = clock_realtime_ns();
	emit_state_event(job, job_state_name(final));
	pthread_mutex_unlock(&job->lock);
	pthread_cond_broadcast(&registry_changed);
	struct job *dropped = prune_locked(job);
	pthread_mutex_unlock(&registry_lock);
	free_dropped(dropped);
}

/* A member failed or was cancelled: the others are cancelled. */
static void group_break(struct job *job)
{
	struct job_group *g = job->group;
	char ignored[JOB_ERROR_MAX];

	if (!g)
		return;
	pthread_mutex_lock(&g->lock);
	g->broken = true;
	for (struct job *m = g->members; m; m = m->next_in_group)
		if (m != job)
			request_cancel(m, ignored, sizeof(ignored));
	pthread_cond_broadcast(&g->changed);
	pthread_mutex_unlock(&g->lock);
}

static void *job_thread(void *arg)
{
	struct job *job = arg;

	pthread_mutex_lock(&job->lock);
	while (job->phase == JOB_PREPARED)
		pthread_cond_wait(&job->wake, &job->lock);
	bool abandoned = job->phase == JOB_ABANDONED;
	pthread_mutex_unlock(&job->lock);
	if (abandoned)
		return NULL;
	enum job_state final = job->driver->run(job);
	if (final != JOB_COMPLETED)
		group_break(job);
	/* A concluded job keeps no thread: nobody joins this one, and it
	 * touches nothing of the job after concluding. */
	job->thread_detached = true;
	pthread_detach(pthread_self());
	job_conclude(job, final);
	return NULL;
}

int job_spawn(struct job *job, char *err, size_t errlen)
{
	int rc = pthread_create(&job->thread, NULL, job_thread, job);
	if (rc)
		return set_error(err, errlen, rc, "job %s: cannot start a thread: %s", job->id, error_text(rc));
	job->thread_spawned = true;
	return 0;
}

void job_commit(struct job *job)
{
	pthread_mutex_lock(&registry_lock);
	struct job **pp = &jobs_head;
	while (*pp)
		pp = &(*pp)->next;
	*pp = job;
	pthread_mutex_lock(&job->lock);
	job->phase = JOB_COMMITTED;
	job->started_ns = clock_realtime_ns();
	job->rate_mark_ns = clock_monotonic_ns();
	emit_state_event(job, "started");
	pthread_cond_broadcast(&job->wake);
	pthread_mutex_unlock(&job->lock);
	pthread_mutex_unlock(&registry_lock);
}

void job_discard(struct job *job)
{
	job_destroy(job);
}

void job_abandon(struct job *job)
{
	pthread_mutex_lock(&job->lock);
	job->phase = JOB_ABANDONED;
	pthread_cond_broadcast(&job->wake);
	pthread_mutex_unlock(&job->lock);
	if (job->thread_spawned)
		pthread_join(job->thread, NULL);
	job->thread_spawned = false;
	job->driver->abandon(job);
	job_destroy(job);
}

void job_for_each(void (*fn)(struct job *job, void *arg), void *arg)
{
	pthread_mutex_lock(&registry_lock);
	for (struct job *j = jobs_head; j; j = j->next)
		fn(j, arg);
	pthread_mutex_unlock(&registry_lock);
}

static void format_time(struct strbuf *out, const char *key, uint64_t ns)
{
	if (ns)
		strbuf_printf(out, "%s=%" PRIu64 ".%09" PRIu64 "\n", key, ns / 1000000000u, ns % 1000000000u);
	else
		strbuf_printf(out, "%s=\n", key);
}

void job_format_status(struct job *job, struct strbuf *out)
{
	struct job_progress p = { 0 };

	job->driver->progress(job, &p);
	pthread_mutex_lock(&job->lock);
	strbuf_printf(out, "id=%s\ntype=%s\n", job->id, job->driver->type);
	job->driver->status(job, out);
	strbuf_printf(out, "state=%s\n", job_state_name(job->state));
	if (job->group)
		strbuf_printf(out, "group=%s\n", job->group->name);
	strbuf_printf(out, "bytes_total=%" PRIu64 "\nbytes_done=%" PRIu64 "\ncbw_bytes=%" PRIu64 "\n",
		      p.bytes_total, job->state == JOB_PAUSED ? job->frozen_bytes_done : p.bytes_done, p.cbw_bytes);
	strbuf_printf(out, "speed=%" PRIu64 "\nrate=%" PRIu64 "\n", job->speed,
		      job_state_concluded(job->state) ? 0 : job->rate);
	strbuf_printf(out, "cbw_wait_us_p50=%" PRIu64 "\ncbw_wait_us_p99=%" PRIu64 "\n",
		      latency_percentile(&job->cbw_wait, 500), latency_percentile(&job->cbw_wait, 990));
	format_time(out, "started", job->started_ns);
	strbuf_printf(out, "start_stall_us=%" PRIu64 "\n", job->start_stall_ns / 1000);
	format_time(out, "finished", job->finished_ns);
	strbuf_printf(out, "error=%s\n", job->error);
	pthread_mutex_unlock(&job->lock);
}

void job_get(struct job *job)
{
	pthread_mutex_lock(&registry_lock);
	job->refs++;
	pthread_mutex_unlock(&registry_lock);
}

void job_wait_concluded(struct job *job)
{
	pthread_mutex_lock(&registry_lock);
	for (;;) {
		pthread_mutex_lock(&job->lock);
		bool done = job_state_concluded(job->state);
		pthread_mutex_unlock(&job->lock);
		if (done)
			break;
		pthread_cond_wait(&registry_changed, &registry_lock);
	}
	pthread_mutex_unlock(&registry_lock);
}

struct job *job_find_by_serial(uint64_t serial)
{
	struct job *found = NULL;

	pthread_mutex_lock(&registry_lock);
	for (struct job *j = jobs_head; j; j = j->next) {
		if (j->serial == serial) {
			j->refs++;
			found = j;
			break;
		}
	}
	pthread_mutex_unlock(&registry_lock);
	return found;
}

static const char *const verb_names[] = { "cancel", "pause", "resume", "complete", "set", "dismiss" };
static const char *const verb_applies[] = {
	"a running, paused or ready job", "a running or ready job", "a paused job",
	"a ready job or a sync=none backup", "a running, paused or ready job", "a concluded job",
};

/* job->lock held. */
static int check_verb_locked(struct job *job, enum job_verb verb, char *err, size_t errlen)
{
	bool ok;

	switch (verb) {
	case JOB_VERB_PAUSE: ok = job->state == JOB_RUNNING || job->state == JOB_READY; break;
	case JOB_VERB_RESUME: ok = job->state == JOB_PAUSED; break;
	case JOB_VERB_COMPLETE:
		ok = job->state == JOB_READY ||
		     (!job_state_concluded(job->state) && job->driver->completable && job->driver->completable(job));
		break;
	case JOB_VERB_DISMISS: ok = job_state_concluded(job->state); break;
	default: ok = !job_state_concluded(job->state); break;
	}
	/* A stop already on its way makes the job as good as concluded. */
	if (ok && verb != JOB_VERB_DISMISS && job->stop != JOB_GO_ON)
		return set_error(err, errlen, EBUSY, "%s %s: job is %s", verb_names[verb], job->id,
				 job->stop == JOB_STOP_CANCEL ? "being cancelled" : "failing");
	if (ok)
		return 0;
	return set_error(err, errlen, EBUSY, "%s %s: job is %s (%s applies to %s)", verb_names[verb], job->id,
			 job_state_name(job->state), verb_names[verb], verb_applies[verb]);
}

int job_check_verb(struct job *job, enum job_verb verb, char *err, size_t errlen)
{
	pthread_mutex_lock(&job->lock);
	int rc = check_verb_locked(job, verb, err, errlen);
	pthread_mutex_unlock(&job->lock);
	return rc;
}

static void wake_group(struct job *job)
{
	if (job->group) {
		pthread_mutex_lock(&job->group->lock);
		pthread_cond_broadcast(&job->group->changed);
		pthread_mutex_unlock(&job->group->lock);
	}
}

/* Sets the stop request; does not touch the job's group (its lock may be
 * held by the caller). */
static int request_cancel(struct job *job, char *err, size_t errlen)
{
	pthread_mutex_lock(&job->lock);
	int rc = check_verb_locked(job, JOB_VERB_CANCEL, err, errlen);
	if (!rc)
		job->stop = JOB_STOP_CANCEL;
	pthread_cond_broadcast(&job->wake);
	pthread_mutex_unlock(&job->lock);
	return rc;
}

int job_cancel(struct job *job, char *err, size_t errlen)
{
	int rc = request_cancel(job, err, errlen);
	if (!rc)
		wake_group(job);
	return rc;
}

static void pause_locked(struct job *job)
{
	struct job_progress p = { 0 };

	job->driver->progress(job, &p);
	job->frozen_bytes_done = p.bytes_done;
	job->resume_to = job->state == JOB_READY ? JOB_READY : JOB_RUNNING;
	job->state = JOB_PAUSED;
	emit_state_event(job, "paused");
}

int job_pause(struct job *job, char *err, size_t errlen)
{
	pthread_mutex_lock(&job->lock);
	int rc = check_verb_locked(job, JOB_VERB_PAUSE, err, errlen);
	if (!rc)
		pause_locked(job);
	pthread_mutex_unlock(&job->lock);
	if (!rc)
		wake_group(job);
	return rc;
}

int job_resume(struct job *job, char *err, size_t errlen)
{
	pthread_mutex_lock(&job->lock);
	int rc = check_verb_locked(job, JOB_VERB_RESUME, err, errlen);
	if (!rc) {
		job->state = job->resume_to;
		job->error[0] = '\0';
		emit_state_event(job, "resumed");
		pthread_cond_broadcast(&job->wake);
	}
	pthread_mutex_unlock(&job->lock);
	if (!rc && job->driver->resumed)
		job->driver->resumed(job);
	if (!rc)
		wake_group(job);
	return rc;
}

int job_complete(struct job *job, char *err, size_t errlen)
{
	pthread_mutex_lock(&job->lock);
	int rc = check_verb_locked(job, JOB_VERB_COMPLETE, err, errlen);
	if (!rc)
		job->complete_requested = true;
	pthread_cond_broadcast(&job->wake);
	pthread_mutex_unlock(&job->lock);
	return rc;
}

void job_pause_on_error(struct job *job, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&job->lock);
	if (job->stop == JOB_GO_ON && (job->state == JOB_RUNNING || job->state == JOB_READY)) {
		va_start(ap, fmt);
		vsnprintf(job->error, sizeof(job->error), fmt, ap);
		va_end(ap);
		for (char *p = job->error; *p; p++)
			if (*p == '\n')
				*p = ' ';
		pause_locked(job);
	}
	pthread_mutex_unlock(&job->lock);
}

void job_set_ready(struct job *job, bool ready)
{
	pthread_mutex_lock(&job->lock);
	if (job->state == JOB_PAUSED) {
		job->resume_to = ready ? JOB_READY : JOB_RUNNING;
	} else if (ready && job->state == JOB_RUNNING) {
		job->state = JOB_READY;
		emit_state_event(job, "ready");
	} else if (!ready && job->state == JOB_READY) {
		job->state = JOB_RUNNING;
	}
	pthread_mutex_unlock(&job->lock);
}

bool job_complete_requested(struct job *job)
{
	pthread_mutex_lock(&job->lock);
	bool requested = job->complete_requested;
	pthread_mutex_unlock(&job->lock);
	return requested;
}

bool job_wait_running(struct job *job)
{
	pthread_mutex_lock(&job->lock);
	while (job->state == JOB_PAUSED && job->stop == JOB_GO_ON)
		pthread_cond_wait(&job->wake, &job->lock);
	bool go_on = job->stop == JOB_GO_ON;
	pthread_mutex_unlock(&job->lock);
	return go_on;
}

int job_dismiss(struct job *job, char *err, size_t errlen)
{
	pthread_mutex_lock(&registry_lock);
	int rc = job_check_verb(job, JOB_VERB_DISMISS, err, errlen);
	if (rc) {
		pthread_mutex_unlock(&registry_lock);
		return rc;
	}
	for (struct job **pp = &jobs_head; *pp; pp = &(*pp)->next) {
		if (*pp == job) {
			*pp = job->next;
			break;
		}
	}
	pthread_mutex_unlock(&registry_lock);
	job->next = NULL;
	job_put(job);
	return 0;
}

int job_set_speed(struct job *job, uint64_t speed, char *err, size_t errlen)
{
	pthread_mutex_lock(&job->lock);
	int rc = check_verb_locked(job, JOB_VERB_SET, err, errlen);
	if (!rc) {
		job->speed = speed;
		ratelimit_set(&job->ratelimit, speed);
		pthread_cond_broadcast(&job->wake);
	}
	pthread_mutex_unlock(&job->lock);
	return rc;
}

enum job_stop job_stop_requested(struct job *job)
{
	pthread_mutex_lock(&job->lock);
	enum job_stop stop = job->stop;
	pthread_mutex_unlock(&job->lock);
	return stop;
}

void job_fail(struct job *job, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&job->lock);
	if (!job->error[0]) {
		va_start(ap, fmt);
		vsnprintf(job->error, sizeof(job->error), fmt, ap);
		va_end(ap);
		for (char *p = job->error; *p; p++)
			if (*p == '\n')
				*p = ' ';
	}
	if (job->stop != JOB_STOP_FAIL)
		job->stop = JOB_STOP_FAIL;
	pthread_cond_broadcast(&job->wake);
	pthread_mutex_unlock(&job->lock);
}

/* job->lock held. Keeps `rate` as bytes per second over windows of ~1 s. */
static void update_rate_locked(struct job *job, uint64_t now, uint64_t done)
{
	if (now - job->rate_mark_ns < 1000000000ull)
		return;
	job->rate = (done - job->rate_mark_bytes) * 1000000000ull / (now - job->rate_mark_ns);
	job->rate_mark_ns = now;
	job->rate_mark_bytes = done;
}

bool job_throttle(struct job *job, uint64_t bytes)
{
	struct job_progress p = { 0 };

	job->driver->progress(job, &p);
	pthread_mutex_lock(&job->lock);
	for (;;) {
		uint64_t now = clock_monotonic_ns();
		update_rate_locked(job, now, p.bytes_done);
		if (job->state == JOB_PAUSED && job->stop == JOB_GO_ON) {
			pthread_cond_wait(&job->wake, &job->lock);
			/* The pause is not progress: restart the rate window. */
			job->rate = 0;
			job->rate_mark_ns = clock_monotonic_ns();
			job->driver->progress(job, &p);
			job->rate_mark_bytes = p.bytes_done;
			continue;
		}
		if (job->stop != JOB_GO_ON) {
			pthread_mutex_unlock(&job->lock);
			return false;
		}
		uint64_t delay = ratelimit_delay(&job->ratelimit, now);
		if (!delay) {
			/* Booked under the lock: the next worker waits for it. */
			ratelimit_charge(&job->ratelimit, now, bytes);
			pthread_mutex_unlock(&job->lock);
			return true;
		}
		struct timespec ts;
		timespec_from_ns(&ts, now + delay);
		pthread_cond_timedwait(&job->wake, &job->lock, &ts);
	}
}

void job_charge(struct job *job, uint64_t booked, uint64_t used)
{
	if (used >= booked)
		return;
	pthread_mutex_lock(&job->lock);
	ratelimit_refund(&job->ratelimit, clock_monotonic_ns(), booked - used);
	pthread_mutex_unlock(&job->lock);
}

uint64_t job_chunk_size(struct job *job, uint64_t unit, uint64_t max)
{
	pthread_mutex_lock(&job->lock);
	uint64_t chunk = ratelimit_chunk(&job->ratelimit, unit, max);
	pthread_mutex_unlock(&job->lock);
	return chunk;
}

void job_sleep(struct job *job, uint64_t deadline_ns)
{
	struct timespec ts;

	timespec_from_ns(&ts, deadline_ns);
	pthread_mutex_lock(&job->lock);
	if (job->stop == JOB_GO_ON)
		pthread_cond_timedwait(&job->wake, &job->lock, &ts);
	pthread_mutex_unlock(&job->lock);
}

void job_cancel_all_and_wait(void)
{
	pthread_mutex_lock(&registry_lock);
	for (struct job *j = jobs_head; j; j = j->next) {
		pthread_mutex_lock(&j->lock);
		if (!job_state_concluded(j->state) && j->stop == JOB_GO_ON)
			j->stop = JOB_STOP_CANCEL;
		pthread_cond_broadcast(&j->wake);
		pthread_mutex_unlock(&j->lock);
		wake_group(j);
	}
	for (;;) {
		bool running = false;
		for (struct job *j = jobs_head; j; j = j->next) {
			pthread_mutex_lock(&j->lock);
			running |= !job_state_concluded(j->state);
			pthread_mutex_unlock(&j->lock);
		}
		if (!running)
			break;
		pthread_cond_wait(&registry_changed, &registry_lock);
	}
	pthread_mutex_unlock(&registry_lock);
}

void job_free_all(void)
{
	pthread_mutex_lock(&registry_lock);
	struct job *all = jobs_head;
	jobs_head = NULL;
	pthread_mutex_unlock(&registry_lock);
	free_dropped(all);
}

struct job_group *job_group_new(const char *name)
{
	struct job_group *g = calloc(1, sizeof(*g));

	if (!g)
		return NULL;
	snprintf(g->name, sizeof(g->name), "%s", name);
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->changed, NULL);
	g->refs = 1;
	return g;
}

void job_group_put(struct job_group *g)
{
	pthread_mutex_lock(&g->lock);
	bool last = --g->refs == 0;
	pthread_mutex_unlock(&g->lock);
	if (last) {
		pthread_cond_destroy(&g->changed);
		pthread_mutex_destroy(&g->lock);
		free(g);
	}
}

void job_group_add(struct job_group *g, struct job *job)
{
	pthread_mutex_lock(&g->lock);
	g->refs++;
	g->nmembers++;
	job->group = g;
	job->next_in_group = g->members;
	g->members = job;
	pthread_mutex_unlock(&g->lock);
}

static void group_leave(struct job *job)
{
	struct job_group *g = job->group;

	if (!g)
		return;
	pthread_mutex_lock(&g->lock);
	for (struct job **pp = &g->members; *pp; pp = &(*pp)->next_in_group) {
		if (*pp == job) {
			*pp = job->next_in_group;
			break;
		}
	}
	pthread_mutex_unlock(&g->lock);
	job->group = NULL;
	job_group_put(g);
}

/* Group lock held. A paused member holds the whole group back: nobody
 * concludes while one of them is paused. */
static bool any_member_paused(struct job_group *g)
{
	for (struct job *m = g->members; m; m = m->next_in_group) {
		pthread_mutex_lock(&m->lock);
		bool paused = m->state == JOB_PAUSED;
		pthread_mutex_unlock(&m->lock);
		if (paused)
			return true;
	}
	return false;
}

bool job_group_wait(struct job *job)
{
	struct job_group *g = job->group;
	bool ok;

	if (!g)
		return job_wait_running(job);
	pthread_mutex_lock(&g->lock);
	g->succeeded++;
	pthread_cond_broadcast(&g->changed);
	for (;;) {
		if (g->broken || job_stop_requested(job) != JOB_GO_ON) {
			ok = false;
			break;
		}
		if (g->succeeded == g->nmembers && !any_member_paused(g)) {
			ok = true;
			break;
		}
		pthread_cond_wait(&g->changed, &g->lock);
	}
	pthread_mutex_unlock(&g->lock);
	return ok;
}

const char *job_group_name_of(const struct job_group *group)
{
	return group->name;
}
