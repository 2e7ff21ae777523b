/* Unit tests for the job model (src/job.c) with a driver of its own: the
 * READY state (entered by the driver, left by complete; pause in ready
 * returns to ready), the legality of verbs there, the events, and a driver's
 * failure path through job_discard. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleecefs/events.h"
#include "fleecefs/job.h"
#include "fleecefs/util.h"

struct test_job {
	struct job job;
	bool freed_marker;
};

static int frees;

/* Gets ready at once, then waits until completed or stopped. */
static enum job_state ready_run(struct job *job)
{
	job_set_ready(job, true);
	while (job_stop_requested(job) == JOB_GO_ON && !job_complete_requested(job))
		job_sleep(job, clock_monotonic_ns() + 20000000ull);
	return job_stop_requested(job) == JOB_STOP_CANCEL ? JOB_CANCELLED : JOB_COMPLETED;
}

static void progress(struct job *job, struct job_progress *out) { (void)job; memset(out, 0, sizeof(*out)); }
static void status(struct job *job, struct strbuf *out) { (void)job; (void)out; }
static void abandon(struct job *job) { (void)job; }
static void free_job(struct job *job) { frees++; free(job); }

static const struct job_driver ready_driver = {
	.type = "test",
	.run = ready_run,
	.progress = progress,
	.status = status,
	.abandon = abandon,
	.free = free_job,
};

static enum job_state state_of(struct job *job)
{
	pthread_mutex_lock(&job->lock);
	enum job_state s = job->state;
	pthread_mutex_unlock(&job->lock);
	return s;
}

static void wait_state(struct job *job, enum job_state want)
{
	for (int i = 0; i < 500 && state_of(job) != want; i++)
		sleep_until_ns(clock_monotonic_ns() + 10000000ull);
	cr_assert_eq(state_of(job), want, "state %s, want %s", job_state_name(state_of(job)), job_state_name(want));
}

/* The events of `id` since *seq, as "e1 e2 ..." (the event= words). */
static void events_of(uint64_t *seq, const char *id, char *out, size_t len)
{
	char line[EVENT_LINE_MAX], want[80];
	snprintf(want, sizeof(want), " id=%s ", id);
	out[0] = '\0';
	while (events_read(seq, line, sizeof(line))) {
		if (!strstr(line, want))
			continue;
		char *e = strstr(line, "event=");
		size_t n = strcspn(e + 6, " \n");
		snprintf(out + strlen(out), len - strlen(out), "%.*s ", (int)n, e + 6);
	}
}

Test(job, ready_pause_resume_complete)
{
	struct test_job *t = calloc(1, sizeof(*t));
	char err[256], evs[256];
	uint64_t seq = events_next_seq();

	cr_assert_eq(job_init(&t->job, &ready_driver, "r1", 0, err, sizeof(err)), 0);
	cr_assert_eq(job_spawn(&t->job, err, sizeof(err)), 0);
	job_commit(&t->job);
	wait_state(&t->job, JOB_READY);
	/* Legal in ready: pause, set, cancel, complete; not resume, dismiss. */
	cr_assert_eq(job_check_verb(&t->job, JOB_VERB_RESUME, err, sizeof(err)), -EBUSY);
	cr_assert(strstr(err, "job is ready"), "%s", err);
	cr_assert_eq(job_check_verb(&t->job, JOB_VERB_DISMISS, err, sizeof(err)), -EBUSY);
	cr_assert_eq(job_check_verb(&t->job, JOB_VERB_COMPLETE, err, sizeof(err)), 0);
	cr_assert_eq(job_set_speed(&t->job, 1000, err, sizeof(err)), 0);
	/* A pause in ready returns to ready. */
	cr_assert_eq(job_pause(&t->job, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(state_of(&t->job), JOB_PAUSED);
	cr_assert_eq(job_check_verb(&t->job, JOB_VERB_COMPLETE, err, sizeof(err)), -EBUSY, "complete while paused");
	cr_assert_eq(job_resume(&t->job, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(state_of(&t->job), JOB_READY, "resume returns to ready");
	cr_assert_eq(job_complete(&t->job, err, sizeof(err)), 0, "%s", err);
	job_wait_concluded(&t->job);
	cr_assert_eq(state_of(&t->job), JOB_COMPLETED);
	events_of(&seq, "r1", evs, sizeof(evs));
	cr_assert_str_eq(evs, "started ready paused resumed completed ");
	cr_assert_eq(job_dismiss(&t->job, err, sizeof(err)), 0);
	job_free_all();
}

Test(job, paused_before_ready_resumes_into_ready)
{
	struct test_job *t = calloc(1, sizeof(*t));
	char err[256];

	cr_assert_eq(job_init(&t->job, &ready_driver, "r2", 0, err, sizeof(err)), 0);
	/* Paused while running (before the thread ran), then the driver
	 * becomes ready: resume goes to ready. */
	t->job.state = JOB_RUNNING;
	cr_assert_eq(job_spawn(&t->job, err, sizeof(err)), 0);
	job_commit(&t->job);
	wait_state(&t->job, JOB_READY);
	cr_assert_eq(job_pause(&t->job, err, sizeof(err)), 0);
	job_set_ready(&t->job, false);
	cr_assert_eq(state_of(&t->job), JOB_PAUSED, "leaving ready while paused stays paused");
	cr_assert_eq(job_resume(&t->job, err, sizeof(err)), 0);
	cr_assert_eq(state_of(&t->job), JOB_RUNNING, "it fell behind while paused: resume goes to running");
	job_set_ready(&t->job, true);
	cr_assert_eq(state_of(&t->job), JOB_READY);
	cr_assert_eq(job_cancel(&t->job, err, sizeof(err)), 0);
	job_wait_concluded(&t->job);
	cr_assert_eq(state_of(&t->job), JOB_CANCELLED);
	job_free_all();
}

Test(job, discard_frees_through_the_driver)
{
	struct test_job *t = calloc(1, sizeof(*t));
	char err[256];

	frees = 0;
	cr_assert_eq(job_init(&t->job, &ready_driver, "d1", 0, err, sizeof(err)), 0);
	cr_assert(!job_id_taken("d1"), "a job that was never committed is not listed");
	job_discard(&t->job);
	cr_assert_eq(frees, 1);
}
