/* snapshot: see include/fleecefs/snapshot.h */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/control.h"
#include "fleecefs/job.h"
#include "fleecefs/snapshot.h"
#include "fleecefs/snapstore.h"

struct view_dir {
	char *name;         /* last component ("" for the root) */
	unsigned parent;
};

struct member {
	char *path;         /* as named: pool/vm.img */
	const char *name;   /* its last component */
	unsigned dir;
	struct snapstore store;
	bool open;
	/* Which image it covers, for "who uses this image?" (never changes
	 * once set, never dereferenced through this field). */
	const struct image *image;
};

struct snapshot {
	struct job job;
	char *dir_path;                 /* STATE_DIR/snapshots/NAME */
	struct member *members;
	unsigned nmembers;
	struct view_dir *dirs;
	unsigned ndirs;
	uint64_t max_store;
	bool reflink;                   /* reflink=auto: stores may share blocks */
	atomic_uint_fast64_t store_used;
	atomic_uint users;              /* backups reading a view */
	pthread_mutex_t users_lock;
	char last_user[FLEECE_NAME_MAX + 1]; /* one of them, for messages; users_lock */
	atomic_bool released;
	char error[200];
};

static struct snapshot *to_snapshot(struct job *job) { return (struct snapshot *)job; }

static const struct job_driver snapshot_driver;

bool job_is_snapshot(const struct job *job)
{
	return job->driver == &snapshot_driver;
}

/* ---- the view tree ------------------------------------------------------- */

static int find_dir(struct snapshot *s, unsigned parent, const char *name)
{
	for (unsigned i = 1; i < s->ndirs; i++)
		if (s->dirs[i].parent == parent && strcmp(s->dirs[i].name, name) == 0)
			return (int)i;
	return -1;
}

/* Adds the directories of `path` and returns the index of its parent. */
static int add_dirs(struct snapshot *s, const char *path)
{
	unsigned parent = 0;
	const char *p = path;

	for (const char *slash; (slash = strchr(p, '/')); p = slash + 1) {
		char *name = strndup(p, (size_t)(slash - p));
		if (!name)
			return -ENOMEM;
		int found = find_dir(s, parent, name);
		if (found >= 0) {
			free(name);
			parent = (unsigned)found;
			continue;
		}
		struct view_dir *grown = realloc(s->dirs, (s->ndirs + 1) * sizeof(*grown));
		if (!grown) {
			free(name);
			return -ENOMEM;
		}
		s->dirs = grown;
		s->dirs[s->ndirs] = (struct view_dir){ .name = name, .parent = parent };
		parent = s->ndirs++;
	}
	return (int)parent;
}

void snapshot_list(struct job *job, unsigned dir, snapshot_entry_fn fn, void *arg)
{
	struct snapshot *s = to_snapshot(job);

	for (unsigned i = 1; i < s->ndirs; i++)
		if (s->dirs[i].parent == dir)
			fn(arg, s->dirs[i].name, true, i);
	for (unsigned i = 0; i < s->nmembers; i++)
		if (s->members[i].dir == dir)
			fn(arg, s->members[i].name, false, i);
}

int snapshot_lookup(struct job *job, unsigned dir, const char *name, bool *is_dir, unsigned *index)
{
	struct snapshot *s = to_snapshot(job);
	int d = find_dir(s, dir, name);

	if (d >= 0) {
		*is_dir = true;
		*index = (unsigned)d;
		return 0;
	}
	for (unsigned i = 0; i < s->nmembers; i++) {
		if (s->members[i].dir == dir && strcmp(s->members[i].name, name) == 0) {
			*is_dir = false;
			*index = i;
			return 0;
		}
	}
	return -ENOENT;
}

bool snapshot_has_dir(struct job *job, unsigned dir)
{
	return dir < to_snapshot(job)->ndirs;
}

struct snapstore *snapshot_member(struct job *job, unsigned index)
{
	struct snapshot *s = to_snapshot(job);
	return index < s->nmembers ? &s->members[index].store : NULL;
}

struct snapstore *snapshot_member_by_path(struct job *job, const char *path)
{
	struct snapshot *s = to_snapshot(job);
	for (unsigned i = 0; i < s->nmembers; i++)
		if (strcmp(s->members[i].path, path) == 0)
			return &s->members[i].store;
	return NULL;
}

void snapshot_use(struct job *job, const char *user, bool start)
{
	struct snapshot *s = to_snapshot(job);
	pthread_mutex_lock(&s->users_lock);
	if (start) {
		atomic_fetch_add(&s->users, 1);
		snprintf(s->last_user, sizeof(s->last_user), "%s", user);
	} else {
		atomic_fetch_sub(&s->users, 1);
	}
	pthread_mutex_unlock(&s->users_lock);
}

/* ---- life cycle --------------------------------------------------------- */

static void member_broke(void *owner, const char *reason)
{
	struct snapshot *s = owner;
	/* The job thread frees every store of the snapshot. */
	job_fail(&s->job, "%s", reason);
}

static void close_stores(struct snapshot *s, bool gate_closed)
{
	for (unsigned i = 0; i < s->nmembers; i++) {
		if (s->members[i].open)
			snapstore_close(&s->members[i].store, gate_closed);
		s->members[i].open = false;
	}
	if (s->dir_path)
		rmdir(s->dir_path);
}

static enum job_state snapshot_run(struct job *job)
{
	struct snapshot *s = to_snapshot(job);

	/* Nothing to copy in the background: wait for release, cancel or a break. */
	while (job_stop_requested(job) == JOB_GO_ON)
		job_sleep(job, clock_monotonic_ns() + 1000000000ull);
	enum job_stop stop = job_stop_requested(job);
	close_stores(s, false);
	if (stop == JOB_STOP_FAIL)
		return JOB_FAILED;
	return atomic_load(&s->released) ? JOB_COMPLETED : JOB_CANCELLED;
}

static void snapshot_progress(struct job *job, struct job_progress *out)
{
	struct snapshot *s = to_snapshot(job);
	uint64_t total = 0, saved = 0;

	/* The counters stay readable after a store is closed (a failed
	 * snapshot still tells how far it got). */
	for (unsigned i = 0; i < s->nmembers; i++) {
		total += s->members[i].store.size;
		saved += atomic_load(&s->members[i].store.bc.cbw_bytes);
	}
	out->bytes_total = total;
	out->bytes_done = saved;
	out->cbw_bytes = saved;
}

static void snapshot_status(struct job *job, struct strbuf *out)
{
	struct snapshot *s = to_snapshot(job);

	strbuf_printf(out, "image=%s\nimages=%u\n", s->nmembers ? s->members[0].path : "", s->nmembers);
	for (unsigned i = 0; i < s->nmembers; i++)
		strbuf_printf(out, "image.%u=%s\n", i, s->members[i].path);
	uint64_t cloned = 0;
	for (unsigned i = 0; i < s->nmembers; i++)
		cloned += atomic_load(&s->members[i].store.bc.bytes_cloned);
	strbuf_printf(out, "target=\nsync=none\nstore_bytes=%" PRIu64 "\nmax_store=%" PRIu64 "\n",
		      (uint64_t)atomic_load(&s->store_used), s->max_store);
	strbuf_printf(out, "reflink=%s\ncloned_bytes=%" PRIu64 "\n", s->reflink ? "auto" : "off", cloned);
}

static void snapshot_abandon(struct job *job)
{
	close_stores(to_snapshot(job), true);
}

static void snapshot_free(struct job *job)
{
	struct snapshot *s = to_snapshot(job);

	close_stores(s, false);
	for (unsigned i = 0; i < s->nmembers; i++)
		free(s->members[i].path);
	for (unsigned i = 0; i < s->ndirs; i++)
		free(s->dirs[i].name);
	free(s->members);
	free(s->dirs);
	free(s->dir_path);
	pthread_mutex_destroy(&s->users_lock);
	free(s);
}

static unsigned snapshot_images(struct job *job, struct image **out, unsigned max)
{
	struct snapshot *s = to_snapshot(job);
	unsigned n = 0;
	for (unsigned i = 0; i < s->nmembers && n < max; i++)
		if (s->members[i].image)
			out[n++] = (struct image *)s->members[i].image;
	return n;
}

static const struct job_driver snapshot_driver = {
	.type = "snapshot",
	.images = snapshot_images,
	.run = snapshot_run,
	.progress = snapshot_progress,
	.status = snapshot_status,
	.abandon = snapshot_abandon,
	.free = snapshot_free,
};

int snapshot_check_release(struct job *job, char *err, size_t errlen)
{
	struct snapshot *s = to_snapshot(job);
	int rc = 0;

	pthread_mutex_lock(&s->users_lock);
	unsigned users = atomic_load(&s->users);
	if (users == 1)
		rc = set_error(err, errlen, EBUSY, "release %s: backup %s still reads its views", job->id, s->last_user);
	else if (users)
		rc = set_error(err, errlen, EBUSY, "release %s: %u backups (%s, ...) still read its views", job->id, users,
			       s->last_user);
	pthread_mutex_unlock(&s->users_lock);
	return rc;
}

int snapshot_release(struct job *job, char *err, size_t errlen)
{
	struct snapshot *s = to_snapshot(job);
	int rc = snapshot_check_release(job, err, errlen);

	if (rc)
		return rc;
	atomic_store(&s->released, true);
	job_cancel(job, err, errlen);   /* refused when already concluded: fine */
	job_wait_concluded(job);
	return job_dismiss(job, err, errlen);
}

int snapshot_stage(const struct snapshot_params *p, struct job **out, char *err, size_t errlen)
{
	const struct ctl_snapshot *cmd = p->cmd;
	struct snapshot *s = calloc(1, sizeof(*s));
	char path[PATH_MAX];
	int rc;

	if (!s)
		return set_error(err, errlen, ENOMEM, "snapshot %s: out of memory", cmd->name);
	if ((rc = job_init(&s->job, &snapshot_driver, cmd->name, 0, err, errlen))) {
		free(s);
		return rc;
	}
	s->max_store = cmd->max_store;
	s->reflink = cmd->reflink;
	atomic_init(&s->store_used, 0);
	atomic_init(&s->users, 0);
	atomic_init(&s->released, false);
	pthread_mutex_init(&s->users_lock, NULL);
	s->members = calloc(cmd->nimages, sizeof(*s->members));
	s->dirs = calloc(1, sizeof(*s->dirs));
	if (!s->members || !s->dirs || !(s->dirs[0].name = strdup(""))) {
		rc = set_error(err, errlen, ENOMEM, "snapshot %s: out of memory", cmd->name);
		goto fail;
	}
	s->ndirs = 1;
	snprintf(path, sizeof(path), "%s/snapshots", p->state_dir);
	mkdir(path, 0700);
	snprintf(path, sizeof(path), "%s/snapshots/%s", p->state_dir, cmd->name);
	if (mkdir(path, 0700) < 0 && errno != EEXIST) {
		rc = set_error(err, errlen, errno, "snapshot %s: cannot create %s: %s", cmd->name, path, error_text(errno));
		goto fail;
	}
	s->dir_path = strdup(path);
	for (unsigned i = 0; i < cmd->nimages; i++) {
		struct member *m = &s->members[i];
		int dir = add_dirs(s, cmd->images[i]);
		if (dir < 0 || !(m->path = strdup(cmd->images[i]))) {
			rc = set_error(err, errlen, ENOMEM, "snapshot %s: out of memory", cmd->name);
			goto fail;
		}
		s->nmembers++;
		m->dir = (unsigned)dir;
		const char *slash = strrchr(m->path, '/');
		m->name = slash ? slash + 1 : m->path;
		char store[PATH_MAX], msg[300];
		snprintf(store, sizeof(store), "%s/%u.store", s->dir_path, i);
		if ((rc = snapstore_open(&m->store, p->images[i], store, p->cluster_size, cmd->max_store, &s->store_used,
					 member_broke, s, msg, sizeof(msg)))) {
			set_error(err, errlen, -rc, "snapshot %s: image %s: %s", cmd->name, cmd->images[i], msg);
			goto fail;
		}
		m->open = true;
		m->image = p->images[i];
		blockcopy_allow_clone(&m->store.bc, cmd->reflink);
	}
	if ((rc = job_spawn(&s->job, err, errlen)))
		goto fail;
	*out = &s->job;
	return 0;
fail:
	close_stores(s, false);
	job_discard(&s->job);
	return rc;
}

int snapshot_prepare(struct job *job, char *err, size_t errlen)
{
	struct snapshot *s = to_snapshot(job);
	char msg[300];
	int rc;

	for (unsigned i = 0; i < s->nmembers; i++)
		if ((rc = snapstore_attach(&s->members[i].store, msg, sizeof(msg))))
			return set_error(err, errlen, -rc, "snapshot %s: image %s: %s", job->id, s->members[i].path, msg);
	return 0;
}
