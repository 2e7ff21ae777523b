/* job: the life of a long-running operation, whatever it copies.
 *
 * A driver (backup, later snapshot and mirror) embeds struct job and supplies
 * struct job_driver. Life cycle, driven by the transaction (transaction.h):
 *   prepare  the driver builds everything that can fail (target, bitmaps,
 *            thread via job_spawn); the job is not yet visible
 *   commit   job_commit: listed, state=running, event=started; cannot fail
 *   abandon  job_abandon: the transaction failed; the driver undoes prepare
 * The job thread then runs driver->run, which returns the final state after
 * all of its teardown (so "completed" is said only when the result is
 * durable); job_conclude records it and emits the event.
 *
 * Locking: job->lock guards state, phase, stop requests, error, times, speed,
 * the rate limiter and the rate estimate. registry_lock (in job.c) guards the
 * list of jobs and serial numbers; lock order: registry_lock, then job->lock,
 * then (events are emitted under them, in order) the event listener's locks
 * (ctlfs.h). A group's lock is taken before its members' job locks.
 * Progress counters are read by the driver's progress callback without locks.
 * Errors: 0 or -errno, and a one-line message in `err`.
 */
#ifndef FLEECEFS_JOB_H
#define FLEECEFS_JOB_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "fleecefs/latency.h"
#include "fleecefs/ratelimit.h"
#include "fleecefs/util.h"

#define JOB_CONCLUDED_KEPT 64
#define JOB_ERROR_MAX 256

enum job_state { JOB_RUNNING, JOB_PAUSED, JOB_READY, JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED };

static inline bool job_state_concluded(enum job_state s) { return s >= JOB_COMPLETED; }
const char *job_state_name(enum job_state s);

enum job_stop { JOB_GO_ON, JOB_STOP_CANCEL, JOB_STOP_FAIL };

/* The verbs of .fleece/ctl that act on a job, for the legality table:
 *   cancel    running, paused, ready
 *   pause     running, ready (resume returns it to where it was)
 *   resume    paused
 *   complete  ready, or when the driver says so (a sync=none backup)
 *   set       running, paused, ready
 *   dismiss   completed, failed, cancelled
 * Anything else fails with EBUSY and a message naming the state. */
enum job_verb { JOB_VERB_CANCEL, JOB_VERB_PAUSE, JOB_VERB_RESUME, JOB_VERB_COMPLETE, JOB_VERB_SET, JOB_VERB_DISMISS };

struct image;
struct job;
struct job_group;

struct job_progress {
	uint64_t bytes_total, bytes_done, cbw_bytes;
};

struct job_driver {
	const char *type;
	/* The job's work, on its own thread; returns JOB_COMPLETED, JOB_FAILED
	 * (after job_fail) or JOB_CANCELLED, with all teardown done. */
	enum job_state (*run)(struct job *job);
	void (*progress)(struct job *job, struct job_progress *out);
	/* Driver lines of the status file (image=, target=, ...). */
	void (*status)(struct job *job, struct strbuf *out);
	/* Undo prepare after an abandoned transaction (the thread has exited). */
	void (*abandon)(struct job *job);
	void (*free)(struct job *job);
	/* May `complete` end the job while it is not ready? NULL: no. */
	bool (*completable)(struct job *job);
	/* The images the job uses (up to max into out; returns how many): a
	 * transaction holds their gates while it completes the job. NULL: none. */
	unsigned (*images)(struct job *job, struct image **out, unsigned max);
	/* The job left a pause (resume): wake what an error stop held. NULL: none. */
	void (*resumed)(struct job *job);
};

struct job {
	char id[FLEECE_NAME_MAX + 1];
	uint64_t serial;
	const struct job_driver *driver;
	pthread_mutex_t lock;
	pthread_cond_t wake;          /* CLOCK_MONOTONIC */
	enum job_state state;
	enum job_state resume_to;     /* running or ready: where resume goes */
	enum { JOB_PREPARED, JOB_COMMITTED, JOB_ABANDONED } phase;
	enum job_stop stop;
	bool complete_requested;
	/* While paused, status shows the progress of the moment of the pause
	 * (in-flight copies and copy-before-write still finish meanwhile). */
	uint64_t frozen_bytes_done;
	char error[JOB_ERROR_MAX];
	uint64_t started_ns, finished_ns;  /* realtime */
	/* How long the guests of its images waited at its start: from when the
	 * gates began to close (draining writes in flight) to its point in
	 * time (set by the transaction before job_commit). */
	uint64_t start_stall_ns;
	uint64_t speed;
	struct ratelimit ratelimit;
	uint64_t rate;                 /* bytes/s over the last second or so */
	uint64_t rate_mark_ns, rate_mark_bytes;
	struct latency_histogram cbw_wait;
	pthread_t thread;
	bool thread_spawned;
	bool thread_detached;          /* set by the thread before it concludes */
	unsigned refs;                 /* registry_lock; the list holds one */
	struct job *next;              /* registry_lock */
	struct job_group *group;       /* set before commit, then constant */
	struct job *next_in_group;     /* group's lock */
};

/* Fills the generic part; `id` NULL or "" picks the next free "job-N". */
int job_init(struct job *job, const struct job_driver *driver, const char *id, uint64_t speed,
	     char *err, size_t errlen);
/* Starts the job's thread, which waits for commit or abandon. */
int job_spawn(struct job *job, char *err, size_t errlen);
/* A job that was initialized but never spawned: undoes job_init and frees
 * it through its driver (for the driver's own failure paths). */
void job_discard(struct job *job);
void job_commit(struct job *job);
/* The transaction failed: stops the thread, lets the driver undo, frees. */
void job_abandon(struct job *job);

/* Returns a referenced job (job_put when done) or NULL. A job leaves the list
 * on dismiss or when pruned (more than JOB_CONCLUDED_KEPT concluded) and is
 * freed with its last reference. */
struct job *job_find(const char *id);
void job_get(struct job *job);
void job_put(struct job *job);
/* Blocks until the job has concluded (its teardown is done). */
void job_wait_concluded(struct job *job);
/* Is `id` taken by a listed job? */
bool job_id_taken(const char *id);
/* Calls fn for every listed job, oldest first, under the registry lock. */
void job_for_each(void (*fn)(struct job *job, void *arg), void *arg);
/* Like job_find, by serial number (the control tree's inode numbers). */
struct job *job_find_by_serial(uint64_t serial);
void job_format_status(struct job *job, struct strbuf *out);

/* 0 when VERB is legal in the job's current state, else -EBUSY and
 * "VERB ID: job is STATE (VERB applies to ...)". */
int job_check_verb(struct job *job, enum job_verb verb, char *err, size_t errlen);
int job_cancel(struct job *job, char *err, size_t errlen);
int job_pause(struct job *job, char *err, size_t errlen);
int job_resume(struct job *job, char *err, size_t errlen);
int job_complete(struct job *job, char *err, size_t errlen);
int job_dismiss(struct job *job, char *err, size_t errlen);
int job_set_speed(struct job *job, uint64_t speed, char *err, size_t errlen);

/* Groups: jobs of one transaction with the same group= conclude together.
 * A member whose work succeeded waits in job_group_wait until every member
 * succeeded and none is paused (true) or one failed or was cancelled (false:
 * it ends cancelled, its result removed); a member that fails or is
 * cancelled cancels the others. Without a group, job_group_wait waits while
 * the job is paused: a paused job never concludes as completed. */
struct job_group *job_group_new(const char *name);
/* Before commit; the job holds a reference to the group from then on. */
void job_group_add(struct job_group *group, struct job *job);
void job_group_put(struct job_group *group);
bool job_group_wait(struct job *job);
const char *job_group_name_of(const struct job_group *group);

/* For the driver's thread. */
enum job_stop job_stop_requested(struct job *job);
/* Records the first error and asks the job thread to stop as failed; safe
 * from any thread (the copy-before-write path uses it). */
void job_fail(struct job *job, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* on-*-error=stop: the job pauses with this error in its status and its
 * "paused" event, until resume; safe from any thread. */
void job_pause_on_error(struct job *job, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Has `complete` been accepted for this job? */
bool job_complete_requested(struct job *job);
/* The driver's work caught up (ready: in sync, `complete` may end it) or
 * fell behind again; event "ready" on entering. A job paused meanwhile
 * returns to that state when resumed. */
void job_set_ready(struct job *job, bool ready);
/* Blocks while the job is paused; false when a stop is requested. */
bool job_wait_running(struct job *job);
/* Waits while paused, then until the rate limiter lets more through, and
 * books `bytes` (the chunk about to be copied); false when a stop is
 * requested instead. */
bool job_throttle(struct job *job, uint64_t bytes);
/* After the chunk: `used` of the `booked` bytes were really read (holes are
 * not); the rest is given back to the rate limit. */
void job_charge(struct job *job, uint64_t booked, uint64_t used);
/* The chunk size the background copy should use now. */
uint64_t job_chunk_size(struct job *job, uint64_t unit, uint64_t max);
/* Sleeps until deadline (monotonic ns) or until woken by a request. */
void job_sleep(struct job *job, uint64_t deadline_ns);

/* Shutdown: cancel every running job and wait until all have concluded. */
void job_cancel_all_and_wait(void);
/* Frees every concluded job (at exit, after job_cancel_all_and_wait). */
void job_free_all(void);

#endif
