/* ctlfs: see include/fleecefs/ctlfs.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/bitmap.h"
#include "fleecefs/control.h"
#include "fleecefs/compress.h"
#include "fleecefs/ctlfs.h"
#include "fleecefs/manifest.h"
#include "fleecefs/events.h"
#include "fleecefs/inject.h"
#include "fleecefs/list.h"
#include "fleecefs/job.h"
#include "fleecefs/redirect.h"
#include "fleecefs/snapshot.h"
#include "fleecefs/snapstore.h"
#include "fleecefs/transaction.h"
#include "fleecefs/util.h"

enum ctl_kind {
	K_DIR = 1, K_CTL, K_VERSION, K_EVENTS, K_JOBS, K_SNAPSHOTS, K_BITMAPS, K_JOB_DIR, K_JOB_STATUS, K_INJECT,
	K_SNAP_DIR, K_VIEW, K_BMAP_DIR, K_BMAP, K_REDIRECTS,
};

/* flag | index (23 bits) | job serial (32 bits) | kind (8 bits) */
#define INO2(kind, serial, index)                                                                   \
	((fuse_ino_t)(CTLFS_INO_FLAG | ((uint64_t)(index) << 40) | (((uint64_t)(serial) & 0xffffffffu) << 8) | \
		      (uint64_t)(kind)))
#define INO(kind, serial) INO2(kind, serial, 0)
static enum ctl_kind kind_of(fuse_ino_t ino) { return (enum ctl_kind)(ino & 0xff); }
static uint64_t serial_of(fuse_ino_t ino) { return (ino >> 8) & 0xffffffffu; }
static unsigned index_of(fuse_ino_t ino) { return (unsigned)((ino >> 40) & 0x7fffffu); }

static const struct fleece_daemon *daemon_ctx;
/* Set once at FUSE init, before any write arrives; atomic because the thread
 * that answered init is not the one that serves the writes. The default is
 * the kernel's oldest request size. */
static _Atomic size_t max_write_request = 32 * 4096;

static const struct {
	const char *name;
	enum ctl_kind kind;
} top_entries[] = {
	{ "ctl", K_CTL }, { "version", K_VERSION }, { "events", K_EVENTS },
	{ "jobs", K_JOBS }, { "snapshots", K_SNAPSHOTS }, { "bitmaps", K_BITMAPS }, { "inject", K_INJECT },
	{ "redirects", K_REDIRECTS },
};

/* One open control file. */
struct ctl_file {
	enum ctl_kind kind;
	pthread_mutex_t lock;
	char *text;                  /* answer (ctl), content (version, status) */
	size_t len, pos;
	/* events */
	uint64_t seq;
	char carry[EVENT_LINE_MAX];  /* rest of a line a short read cut */
	size_t carry_len, carry_pos;
	fuse_req_t parked;
	size_t parked_size;
	fuse_req_t interrupted;
	struct fuse_pollhandle *ph;
	struct list_node reader_link;  /* readers_lock */
	/* views */
	struct job *job;             /* referenced */
	struct snapstore *view;
	/* ctl: a transaction opened with begin on this open file. write_lock
	 * serializes the writes of the file, held while one runs (before the
	 * control mutex; lock is taken inside it only for the answer). */
	pthread_mutex_t write_lock;
	struct ctl_session session;
	/* Every open control file, so that those still open when the daemon
	 * stops (no RELEASE will come) are freed: open_files_lock. */
	struct list_node open_link;
};

static pthread_mutex_t open_files_lock = PTHREAD_MUTEX_INITIALIZER;
static struct list_head open_files;

static void free_file(struct ctl_file *f);
static void free_open_dirs(void);

static void track_open(struct ctl_file *f, bool open)
{
	pthread_mutex_lock(&open_files_lock);
	if (open)
		list_push(&open_files, &f->open_link);
	else
		list_remove(&open_files, &f->open_link);
	pthread_mutex_unlock(&open_files_lock);
}

static pthread_mutex_t readers_lock = PTHREAD_MUTEX_INITIALIZER;
static struct list_head readers;

/* ---- attributes --------------------------------------------------------- */

static bool is_dir_kind(enum ctl_kind k)
{
	return k == K_DIR || k == K_JOBS || k == K_SNAPSHOTS || k == K_BITMAPS || k == K_JOB_DIR || k == K_SNAP_DIR ||
	       k == K_BMAP_DIR;
}

static mode_t mode_of(enum ctl_kind k)
{
	switch (k) {
	case K_DIR: return S_IFDIR | 0700;
	case K_CTL: case K_INJECT: return S_IFREG | 0600;
	case K_JOBS: case K_SNAPSHOTS: case K_BITMAPS: case K_JOB_DIR: case K_SNAP_DIR: case K_BMAP_DIR:
		return S_IFDIR | 0500;
	default: return S_IFREG | 0400;
	}
}

/* ---- the bitmaps tree: .fleece/bitmaps/IMAGE/NAME -------------------------
 * Directories are the prefixes of the image paths (the image itself is a
 * directory holding its bitmaps); their paths are interned for inode numbers
 * (few, never freed). */

static pthread_mutex_t dirs_lock = PTHREAD_MUTEX_INITIALIZER;
static char **bmap_dirs;          /* index 0: the root, "" */
static unsigned nbmap_dirs;

static unsigned intern_dir(const char *path)
{
	pthread_mutex_lock(&dirs_lock);
	for (unsigned i = 0; i < nbmap_dirs; i++) {
		if (strcmp(bmap_dirs[i], path) == 0) {
			pthread_mutex_unlock(&dirs_lock);
			return i;
		}
	}
	char **grown = realloc(bmap_dirs, (nbmap_dirs + 1) * sizeof(*grown));
	char *copy = strdup(path);
	unsigned index = 0;
	if (grown && copy) {
		bmap_dirs = grown;
		bmap_dirs[nbmap_dirs] = copy;
		index = nbmap_dirs++;
	} else {
		free(copy);
		if (grown)
			bmap_dirs = grown;
	}
	pthread_mutex_unlock(&dirs_lock);
	return index;
}

static bool dir_path(unsigned index, char *out, size_t len)
{
	pthread_mutex_lock(&dirs_lock);
	bool ok = index < nbmap_dirs;
	if (ok)
		snprintf(out, len, "%s", bmap_dirs[index]);
	pthread_mutex_unlock(&dirs_lock);
	return ok;
}

/* What is at `path` under .fleece/bitmaps: a directory, a bitmap (its
 * serial), or nothing. With a listing callback, the children of `path`. */
struct bmap_walk {
	const char *path;           /* "" for the root */
	bool is_dir;
	uint64_t serial;
	void (*child)(void *arg, const char *name, bool is_dir, uint64_t serial, const char *full);
	void *arg;
	/* Names listed so far (several images share a directory): grows. */
	char (*seen)[FLEECE_NAME_MAX + 1];
	unsigned nseen, seen_cap;
};

static void bmap_walk_done(struct bmap_walk *w)
{
	free(w->seen);
	w->seen = NULL;
}

static void bmap_visit(void *arg, const char *image_path, struct dirty_bitmap *bm)
{
	struct bmap_walk *w = arg;
	char full[PATH_MAX + FLEECE_NAME_MAX + 2];
	size_t plen = strlen(w->path);

	if (snprintf(full, sizeof(full), "%s/%s", image_path, bm->name) >= (int)sizeof(full))
		return;
	if (!w->child) {
		if (strcmp(full, w->path) == 0)
			w->serial = bm->serial;
		else if (plen && strncmp(full, w->path, plen) == 0 && full[plen] == '/')
			w->is_dir = true;
		return;
	}
	const char *rest = full;
	if (plen) {
		if (strncmp(full, w->path, plen) != 0 || full[plen] != '/')
			return;
		rest = full + plen + 1;
	}
	const char *slash = strchr(rest, '/');
	char name[FLEECE_NAME_MAX + 1];
	size_t n = slash ? (size_t)(slash - rest) : strlen(rest);
	if (n > FLEECE_NAME_MAX && slash)
		n = FLEECE_NAME_MAX; /* a long directory name is shown cut, never mistaken */
	snprintf(name, sizeof(name), "%.*s", (int)n, rest);
	for (unsigned i = 0; i < w->nseen; i++)
		if (strcmp(w->seen[i], name) == 0)
			return;
	if (w->nseen == w->seen_cap) {
		unsigned cap = w->seen_cap ? w->seen_cap * 2 : 64;
		char (*grown)[FLEECE_NAME_MAX + 1] = realloc(w->seen, cap * sizeof(*grown));
		if (!grown)
			return;   /* listed without this name rather than twice */
		w->seen = grown;
		w->seen_cap = cap;
	}
	snprintf(w->seen[w->nseen++], sizeof(w->seen[0]), "%s", name);
	char sub[PATH_MAX + FLEECE_NAME_MAX + 2];
	snprintf(sub, sizeof(sub), "%.*s", (int)(rest - full + n), full);
	w->child(w->arg, name, slash != NULL, slash ? 0 : bm->serial, sub);
}

/* Fills attributes; -ENOENT when the node is a job that is gone. */
static int fill_attr(fuse_ino_t ino, struct stat *st)
{
	enum ctl_kind k = kind_of(ino);
	uint64_t t = daemon_ctx->started_ns;

	struct snapstore *view = NULL;
	struct stat at_t;

	if (k < K_DIR || k > K_REDIRECTS)
		return -ENOENT;
	if (k == K_BMAP_DIR) {
		char path[PATH_MAX];
		struct bmap_walk w = { .path = path };
		if (!dir_path(index_of(ino), path, sizeof(path)))
			return -ENOENT;
		bitmaps_for_each(bmap_visit, &w);
		if (!w.is_dir)
			return -ENOENT;
	}
	if (k == K_BMAP && !bitmap_exists(serial_of(ino)))
		return -ENOENT;
	if (k == K_JOB_DIR || k == K_JOB_STATUS || k == K_SNAP_DIR || k == K_VIEW) {
		struct job *job = job_find_by_serial(serial_of(ino));
		if (!job)
			return -ENOENT;
		t = job->started_ns ? job->started_ns : t;
		bool ok = true;
		if (k == K_SNAP_DIR)
			ok = job_is_snapshot(job) && snapshot_has_dir(job, index_of(ino));
		if (k == K_VIEW) {
			ok = job_is_snapshot(job) && (view = snapshot_member(job, index_of(ino)));
			if (ok)
				at_t = view->st_at_t;
		}
		job_put(job);
		if (!ok)
			return -ENOENT;
	}
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = mode_of(k);
	st->st_nlink = is_dir_kind(k) ? 2 : 1;
	st->st_uid = daemon_ctx->owner_uid;
	st->st_gid = daemon_ctx->owner_gid;
	st->st_blksize = 4096;
	st->st_atim.tv_sec = st->st_mtim.tv_sec = st->st_ctim.tv_sec = (time_t)(t / 1000000000u);
	if (view) {
		/* A frozen file: the image's size, times and allocation at T,
		 * the same for the whole life of the snapshot. */
		st->st_size = at_t.st_size;
		st->st_blocks = at_t.st_blocks;
		st->st_atim = at_t.st_atim;
		st->st_mtim = at_t.st_mtim;
		st->st_ctim = at_t.st_ctim;
	}
	return 0;
}

static void reply_entry(fuse_req_t req, fuse_ino_t ino)
{
	struct fuse_entry_param e = { .ino = ino };
	int rc = fill_attr(ino, &e.attr);

	if (rc) {
		fuse_reply_err(req, -rc);
		return;
	}
	/* Timeouts 0: jobs come and go, nothing here may be cached. */
	fuse_reply_entry(req, &e);
}

static void wake_readers(void);

void ctlfs_init(const struct fleece_daemon *d)
{
	daemon_ctx = d;
	events_set_listener(wake_readers);
}

void ctlfs_set_max_write(size_t max_request)
{
	atomic_store_explicit(&max_write_request, max_request, memory_order_relaxed);
}

size_t ctlfs_write_limit(void)
{
	size_t request = atomic_load_explicit(&max_write_request, memory_order_relaxed);
	long page = sysconf(_SC_PAGESIZE);
	size_t shorter = (size_t)(page > 0 ? page : 4096);
	return request > shorter ? request - shorter : 0;
}

void ctlfs_lookup_root(fuse_req_t req)
{
	reply_entry(req, INO(K_DIR, 0));
}

static void find_job_dir(fuse_req_t req, const char *name)
{
	struct job *job = job_find(name);

	if (!job) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fuse_ino_t ino = INO(K_JOB_DIR, job->serial);
	job_put(job);
	reply_entry(req, ino);
}

void ctlfs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	switch (kind_of(parent)) {
	case K_DIR:
		for (size_t i = 0; i < sizeof(top_entries) / sizeof(top_entries[0]); i++)
			if (strcmp(name, top_entries[i].name) == 0)
				return reply_entry(req, INO(top_entries[i].kind, 0));
		break;
	case K_JOBS:
		return find_job_dir(req, name);
	case K_JOB_DIR:
		if (strcmp(name, "status") == 0)
			return reply_entry(req, INO(K_JOB_STATUS, serial_of(parent)));
		break;
	case K_BITMAPS:
	case K_BMAP_DIR: {
		char path[PATH_MAX], full[PATH_MAX + FLEECE_NAME_MAX + 2];
		if (kind_of(parent) == K_BITMAPS)
			path[0] = '\0';
		else if (!dir_path(index_of(parent), path, sizeof(path)))
			break;
		snprintf(full, sizeof(full), "%s%s%s", path, path[0] ? "/" : "", name);
		struct bmap_walk w = { .path = full };
		bitmaps_for_each(bmap_visit, &w);
		if (w.serial)
			return reply_entry(req, INO(K_BMAP, w.serial));
		if (w.is_dir)
			return reply_entry(req, INO2(K_BMAP_DIR, 0, intern_dir(full)));
		break;
	}
	case K_SNAPSHOTS: {
		struct job *job = job_find(name);
		if (!job)
			break;
		fuse_ino_t ino = job_is_snapshot(job) ? INO2(K_SNAP_DIR, job->serial, 0) : 0;
		job_put(job);
		if (ino)
			return reply_entry(req, ino);
		break;
	}
	case K_SNAP_DIR: {
		struct job *job = job_find_by_serial(serial_of(parent));
		bool is_dir = false;
		unsigned index = 0;
		int rc = job && job_is_snapshot(job) ? snapshot_lookup(job, index_of(parent), name, &is_dir, &index) : -ENOENT;
		if (job)
			job_put(job);
		if (!rc)
			return reply_entry(req, INO2(is_dir ? K_SNAP_DIR : K_VIEW, serial_of(parent), index));
		break;
	}
	default:
		break;
	}
	fuse_reply_err(req, ENOENT);
}

void ctlfs_getattr(fuse_req_t req, fuse_ino_t ino)
{
	struct stat st;
	int rc = fill_attr(ino, &st);

	if (rc)
		fuse_reply_err(req, -rc);
	else
		fuse_reply_attr(req, &st, 0);
}

void ctlfs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set)
{
	(void)attr;
	/* `echo cmd > ctl` truncates first: allow that, and nothing else. */
	if ((kind_of(ino) != K_CTL && kind_of(ino) != K_INJECT) || (to_set & ~(FUSE_SET_ATTR_SIZE | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW |
						 FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_CTIME))) {
		fuse_reply_err(req, EPERM);
		return;
	}
	ctlfs_getattr(req, ino);
}

/* ---- files -------------------------------------------------------------- */

static char *version_text(void)
{
	struct strbuf sb = { 0 };
	strbuf_printf(&sb, "version=%s\nfeatures=backup sync-full sync-top sync-none format-raw format-qcow2 backing "
			   "checksum-xxh3 events pause error-policies groups inject snapshot fleecing bitmaps "
			   "sync-incremental mirror nbd%s\ncluster_size=%" PRIu32 "\nctl_max_write=%zu\nnbd_manifests=%s\n",
		      PACKAGE_VERSION, compress_available() ? " compress-zstd" : "", daemon_ctx->cluster_size,
		      ctlfs_write_limit(), manifest_nbd_dir() ? manifest_nbd_dir() : "");
	return strbuf_steal(&sb);
}

static void remove_reader(struct ctl_file *f)
{
	pthread_mutex_lock(&readers_lock);
	list_remove(&readers, &f->reader_link);
	pthread_mutex_unlock(&readers_lock);
}

/* A file whose open failed: nothing else knows it yet. */
static void drop_unopened(struct ctl_file *f)
{
	pthread_mutex_destroy(&f->write_lock);
	pthread_mutex_destroy(&f->lock);
	free(f);
}

void ctlfs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	enum ctl_kind k = kind_of(ino);
	int acc = fi->flags & O_ACCMODE;

	if (is_dir_kind(k)) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	if (k != K_CTL && k != K_INJECT && acc != O_RDONLY) {
		fuse_reply_err(req, EACCES);
		return;
	}
	/* With O_DIRECT (and aio) the kernel may send the pieces of one write
	 * out of order, so a split write could not be refused whole. */
	if ((k == K_CTL || k == K_INJECT) && (fi->flags & O_DIRECT)) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	struct ctl_file *f = calloc(1, sizeof(*f));
	if (!f) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	f->kind = k;
	pthread_mutex_init(&f->lock, NULL);
	pthread_mutex_init(&f->write_lock, NULL);
	if (k == K_VIEW) {
		f->job = job_find_by_serial(serial_of(ino));
		f->view = f->job && job_is_snapshot(f->job) ? snapshot_member(f->job, index_of(ino)) : NULL;
		if (!f->view) {
			if (f->job)
				job_put(f->job);
			drop_unopened(f);
			fuse_reply_err(req, ENOENT);
			return;
		}
	} else if (k == K_BMAP) {
		struct strbuf sb = { 0 };
		if (bitmap_status(serial_of(ino), &sb) == 0)
			f->text = strbuf_steal(&sb);
		else
			strbuf_free(&sb);
	} else if (k == K_VERSION) {
		f->text = version_text();
	} else if (k == K_REDIRECTS) {
		struct strbuf sb = { 0 };
		redirect_format(&sb);
		f->text = sb.failed ? NULL : sb.data ? strbuf_steal(&sb) : strdup("");
		strbuf_free(&sb);
	} else if (k == K_INJECT) {
		f->text = inject_describe();
	} else if (k == K_JOB_STATUS) {
		struct job *job = job_find_by_serial(serial_of(ino));
		if (job) {
			struct strbuf sb = { 0 };
			job_format_status(job, &sb);
			job_put(job);
			f->text = strbuf_steal(&sb);
		} else {
			drop_unopened(f);
			fuse_reply_err(req, ENOENT);
			return;
		}
	} else if (k == K_EVENTS) {
		f->seq = events_next_seq();
		pthread_mutex_lock(&readers_lock);
		list_push(&readers, &f->reader_link);
		pthread_mutex_unlock(&readers_lock);
	}
	if (k != K_CTL && k != K_EVENTS && k != K_VIEW && !f->text) {
		drop_unopened(f);
		fuse_reply_err(req, ENOMEM);
		return;
	}
	f->len = f->text ? strlen(f->text) : 0;
	track_open(f, true);
	fi->fh = (uintptr_t)f;
	fi->direct_io = 1;
	fi->nonseekable = k == K_EVENTS || k == K_CTL || k == K_INJECT;
	if (fuse_reply_open(req, fi) != 0)
		free_file(f);
}

/* f->lock held. Copies whole event lines (and a cut line's rest) into buf. */
static size_t fill_events(struct ctl_file *f, char *buf, size_t size)
{
	size_t used = 0;

	for (;;) {
		if (f->carry_pos < f->carry_len) {
			size_t n = min_u64(f->carry_len - f->carry_pos, size - used);
			memcpy(buf + used, f->carry + f->carry_pos, n);
			used += n;
			f->carry_pos += n;
			if (f->carry_pos < f->carry_len)
				return used;
		}
		if (used == size)
			return used;
		f->carry_len = events_read(&f->seq, f->carry, sizeof(f->carry));
		f->carry_pos = 0;
		if (!f->carry_len)
			return used;
		/* A line that does not fit waits for the next read unless nothing
		 * was delivered yet (then it is cut). */
		if (used && f->carry_len > size - used)
			return used;
	}
}

static void events_interrupted(fuse_req_t req, void *arg)
{
	struct ctl_file *f = arg;

	pthread_mutex_lock(&f->lock);
	if (f->parked == req) {
		f->parked = NULL;
		fuse_reply_err(req, EINTR);
	} else {
		f->interrupted = req;
	}
	pthread_mutex_unlock(&f->lock);
}

static void read_events(fuse_req_t req, struct ctl_file *f, size_t size)
{
	char buf[4 * EVENT_LINE_MAX];

	size = min_u64(size, sizeof(buf));
	fuse_req_interrupt_func(req, events_interrupted, f);
	pthread_mutex_lock(&f->lock);
	size_t n = fill_events(f, buf, size);
	if (n) {
		pthread_mutex_unlock(&f->lock);
		fuse_reply_buf(req, buf, n);
		return;
	}
	if (f->interrupted == req || fuse_req_interrupted(req)) {
		f->interrupted = NULL;
		pthread_mutex_unlock(&f->lock);
		fuse_reply_err(req, EINTR);
		return;
	}
	if (f->parked) {
		/* One parked read per open file; a second reader on the same
		 * file gets what it would get after the first. */
		pthread_mutex_unlock(&f->lock);
		fuse_reply_err(req, EAGAIN);
		return;
	}
	f->parked = req;
	f->parked_size = size;
	pthread_mutex_unlock(&f->lock);
}

/* The event listener: answer parked reads, wake pollers. */
static void wake_readers(void)
{
	char buf[4 * EVENT_LINE_MAX];

	pthread_mutex_lock(&readers_lock);
	for (struct list_node *node = readers.first; node; node = node->next) {
		struct ctl_file *f = list_entry(node, struct ctl_file, reader_link);
		pthread_mutex_lock(&f->lock);
		if (f->parked) {
			size_t n = fill_events(f, buf, f->parked_size);
			if (n) {
				fuse_reply_buf(f->parked, buf, n);
				f->parked = NULL;
			}
		}
		if (f->ph) {
			fuse_lowlevel_notify_poll(f->ph);
			fuse_pollhandle_destroy(f->ph);
			f->ph = NULL;
		}
		pthread_mutex_unlock(&f->lock);
	}
	pthread_mutex_unlock(&readers_lock);
}

void ctlfs_shutdown(void)
{
	pthread_mutex_lock(&readers_lock);
	for (struct list_node *node = readers.first; node; node = node->next) {
		struct ctl_file *f = list_entry(node, struct ctl_file, reader_link);
		pthread_mutex_lock(&f->lock);
		if (f->parked)
			fuse_reply_err(f->parked, EINTR);
		f->parked = NULL;
		pthread_mutex_unlock(&f->lock);
	}
	pthread_mutex_unlock(&readers_lock);
}

void ctlfs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	struct ctl_file *f = (struct ctl_file *)(uintptr_t)fi->fh;

	(void)ino;
	if (f->kind == K_EVENTS) {
		read_events(req, f, size);
		return;
	}
	if (f->kind == K_VIEW) {
		void *buf = thread_buffer(THREAD_BUFFER_GUEST, size);
		ssize_t n = buf ? snapstore_read(f->view, buf, off < 0 ? 0 : (uint64_t)off, size) : -ENOMEM;
		if (n < 0)
			fuse_reply_err(req, (int)-n);
		else
			fuse_reply_buf(req, buf, (size_t)n);
		return;
	}
	pthread_mutex_lock(&f->lock);
	/* ctl and inject: the answer is read from the start after each write,
	 * whatever the file offset; the other files are plain text at an offset. */
	bool cursor = f->kind == K_CTL || f->kind == K_INJECT;
	size_t pos = cursor ? f->pos : (off < 0 ? f->len : min_u64((uint64_t)off, f->len));
	size_t n = min_u64(size, f->len - pos);
	char *copy = n ? malloc(n) : NULL;
	if (n && copy)
		memcpy(copy, f->text + pos, n);
	if (cursor && copy)
		f->pos += n;
	pthread_mutex_unlock(&f->lock);
	if (n && !copy)
		fuse_reply_err(req, ENOMEM);
	else
		fuse_reply_buf(req, copy, n);
	free(copy);
}

/* One write to ctl: a transaction of its own, or part of one opened with
 * begin on this file. f->write_lock held. */
static int write_ctl(struct ctl_file *f, const char *buf, size_t size, char **answer)
{
	enum ctl_feed_action action;
	struct strbuf sb = { 0 };
	char err[512];
	int rc = ctl_session_feed(&f->session, buf, size, &action, err, sizeof(err));

	if (rc) {
		log_info("control: %s", err);
		strbuf_printf(&sb, "error: %s\n", err);
		*answer = strbuf_steal(&sb);
		return rc;
	}
	switch (action) {
	case CTL_FEED_RUN:
		return txn_execute(daemon_ctx, buf, size, answer);
	case CTL_FEED_COMMIT:
		rc = txn_execute(daemon_ctx, f->session.text, f->session.len, answer);
		ctl_session_end(&f->session);
		return rc;
	case CTL_FEED_APPENDED:
	case CTL_FEED_ABORTED:
		break;
	}
	strbuf_printf(&sb, "ok\n");
	*answer = strbuf_steal(&sb);
	return 0;
}

void ctlfs_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, struct fuse_file_info *fi)
{
	struct ctl_file *f = (struct ctl_file *)(uintptr_t)fi->fh;
	char *answer = NULL;

	if (kind_of(ino) != K_CTL && kind_of(ino) != K_INJECT) {
		fuse_reply_err(req, EACCES);
		return;
	}
	int rc;
	size_t limit = ctlfs_write_limit();
	pthread_mutex_lock(&f->write_lock);
	if (size > limit) {
		/* The kernel may have cut a larger write(2) here: running this
		 * piece would run part of it, and the rest as another write. */
		bool aborted = ctl_session_end(&f->session);
		struct strbuf sb = { 0 };
		strbuf_printf(&sb, "error: the write is %zu bytes or more; one %s must fit in %zu bytes "
			      "(the kernel splits larger writes)%s\n", size,
			      kind_of(ino) == K_CTL ? "transaction" : "write", limit,
			      aborted ? "; the transaction was aborted, nothing of it ran" : "");
		answer = strbuf_steal(&sb);
		log_info("control: %s refused a write of %zu bytes or more (the limit is %zu)%s",
			 kind_of(ino) == K_CTL ? "ctl" : "inject", size, limit,
			 aborted ? "; its open transaction was aborted" : "");
		rc = -EMSGSIZE;
	} else if (kind_of(ino) == K_CTL) {
		rc = write_ctl(f, buf, size, &answer);
	} else {
		char err[256];
		struct strbuf sb = { 0 };
		rc = inject_apply(buf, size, err, sizeof(err));
		if (rc)
			strbuf_printf(&sb, "error: %s\n", err);
		else
			strbuf_printf(&sb, "ok\n");
		answer = strbuf_steal(&sb);
	}
	pthread_mutex_lock(&f->lock);
	free(f->text);
	f->text = answer;
	f->len = answer ? strlen(answer) : 0;
	f->pos = 0;
	pthread_mutex_unlock(&f->lock);
	pthread_mutex_unlock(&f->write_lock);
	if (rc)
		fuse_reply_err(req, -rc);
	else
		fuse_reply_write(req, size);
}

static void free_file(struct ctl_file *f)
{
	track_open(f, false);
	if (f->kind == K_EVENTS) {
		remove_reader(f);
		pthread_mutex_lock(&f->lock);
		if (f->parked)
			fuse_reply_err(f->parked, EINTR);
		f->parked = NULL;
		if (f->ph)
			fuse_pollhandle_destroy(f->ph);
		f->ph = NULL;
		pthread_mutex_unlock(&f->lock);
	}
	if (f->job)
		job_put(f->job);
	/* Closing the file before commit drops what it wrote since begin. */
	unsigned pending = f->session.lines;
	if (ctl_session_end(&f->session))
		log_info("control: ctl closed with a transaction open (%u command%s since begin): dropped, nothing of it ran",
			 pending, pending == 1 ? "" : "s");
	free(f->text);
	pthread_mutex_destroy(&f->write_lock);
	pthread_mutex_destroy(&f->lock);
	free(f);
}

void ctlfs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	free_file((struct ctl_file *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

void ctlfs_teardown(void)
{
	while (open_files.first)
		free_file(list_entry(open_files.first, struct ctl_file, open_link));
	free_open_dirs();
}

void ctlfs_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
	struct ctl_file *f = (struct ctl_file *)(uintptr_t)fi->fh;

	(void)ino;
	if (f->kind != K_VIEW || (whence != SEEK_DATA && whence != SEEK_HOLE) || off < 0) {
		fuse_reply_err(req, f->kind == K_VIEW ? EINVAL : ESPIPE);
		return;
	}
	int64_t r = snapstore_seek(f->view, (uint64_t)off, whence);
	if (r < 0)
		fuse_reply_err(req, (int)-r);
	else
		fuse_reply_lseek(req, r);
}

void ctlfs_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{
	struct ctl_file *f = (struct ctl_file *)(uintptr_t)fi->fh;
	unsigned revents = 0;

	(void)ino;
	pthread_mutex_lock(&f->lock);
	if (f->kind != K_EVENTS) {
		revents = POLLIN | POLLOUT;
		if (ph)
			fuse_pollhandle_destroy(ph);
	} else {
		if (f->ph)
			fuse_pollhandle_destroy(f->ph);
		f->ph = ph;
		if (f->carry_pos < f->carry_len || f->seq < events_next_seq())
			revents = POLLIN;
	}
	pthread_mutex_unlock(&f->lock);
	fuse_reply_poll(req, revents);
}

/* ---- directories -------------------------------------------------------- */

struct dir_listing {
	struct strbuf names;       /* NUL-separated */
	fuse_ino_t *inos;
	unsigned n, cap;
	/* In open_dirs, so that those still open when the daemon stops (no
	 * RELEASEDIR will come) are freed: open_files_lock. */
	struct list_node open_link;
};

static struct list_head open_dirs;

static void free_listing(struct dir_listing *l)
{
	strbuf_free(&l->names);
	free(l->inos);
	free(l);
}

static void free_open_dirs(void)
{
	while (open_dirs.first) {
		struct dir_listing *l = list_entry(open_dirs.first, struct dir_listing, open_link);
		list_remove(&open_dirs, &l->open_link);
		free_listing(l);
	}
}

static void listing_add(struct dir_listing *l, const char *name, fuse_ino_t ino)
{
	if (l->n == l->cap) {
		unsigned cap = l->cap ? l->cap * 2 : 16;
		fuse_ino_t *inos = realloc(l->inos, cap * sizeof(*inos));
		if (!inos) {
			l->names.failed = true;
			return;
		}
		l->inos = inos;
		l->cap = cap;
	}
	l->inos[l->n++] = ino;
	strbuf_printf(&l->names, "%s%c", name, '\0');
}

static void add_job_entry(struct job *job, void *arg)
{
	listing_add(arg, job->id, INO(K_JOB_DIR, job->serial));
}

static void add_bmap_entry(void *arg, const char *name, bool is_dir, uint64_t serial, const char *full)
{
	listing_add(arg, name, is_dir ? INO2(K_BMAP_DIR, 0, intern_dir(full)) : INO(K_BMAP, serial));
}

static void add_snapshot_entry(struct job *job, void *arg)
{
	if (job_is_snapshot(job))
		listing_add(arg, job->id, INO2(K_SNAP_DIR, job->serial, 0));
}

struct view_listing {
	struct dir_listing *l;
	uint64_t serial;
};

static void add_view_entry(void *arg, const char *name, bool is_dir, unsigned index)
{
	struct view_listing *vl = arg;
	listing_add(vl->l, name, INO2(is_dir ? K_SNAP_DIR : K_VIEW, vl->serial, index));
}

void ctlfs_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	enum ctl_kind k = kind_of(ino);
	struct dir_listing *l;
	struct stat st;

	if (!is_dir_kind(k) || fill_attr(ino, &st)) {
		fuse_reply_err(req, is_dir_kind(k) ? ENOENT : ENOTDIR);
		return;
	}
	l = calloc(1, sizeof(*l));
	if (!l) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	listing_add(l, ".", ino);
	fuse_ino_t up = k == K_JOB_DIR ? INO(K_JOBS, 0) : k == K_DIR ? FUSE_ROOT_ID : INO(K_DIR, 0);
	if (k == K_SNAP_DIR && index_of(ino) == 0)
		up = INO(K_SNAPSHOTS, 0);
	else if (k == K_SNAP_DIR)
		up = INO2(K_SNAP_DIR, serial_of(ino), 0); /* the parent's index is not needed for ".." */
	listing_add(l, "..", up);
	if (k == K_DIR)
		for (size_t i = 0; i < sizeof(top_entries) / sizeof(top_entries[0]); i++)
			listing_add(l, top_entries[i].name, INO(top_entries[i].kind, 0));
	else if (k == K_JOBS)
		job_for_each(add_job_entry, l);
	else if (k == K_JOB_DIR)
		listing_add(l, "status", INO(K_JOB_STATUS, serial_of(ino)));
	else if (k == K_SNAPSHOTS)
		job_for_each(add_snapshot_entry, l);
	else if (k == K_BITMAPS || k == K_BMAP_DIR) {
		char path[PATH_MAX] = "";
		if (k == K_BITMAPS || dir_path(index_of(ino), path, sizeof(path))) {
			struct bmap_walk w = { .path = path, .child = add_bmap_entry, .arg = l };
			bitmaps_for_each(bmap_visit, &w);
			bmap_walk_done(&w);
		}
	}
	else if (k == K_SNAP_DIR) {
		struct job *job = job_find_by_serial(serial_of(ino));
		if (job) {
			struct view_listing vl = { .l = l, .serial = serial_of(ino) };
			snapshot_list(job, index_of(ino), add_view_entry, &vl);
			job_put(job);
		}
	}
	if (l->names.failed) {
		strbuf_free(&l->names);
		free(l->inos);
		free(l);
		fuse_reply_err(req, ENOMEM);
		return;
	}
	fi->fh = (uintptr_t)l;
	fi->cache_readdir = 0;
	pthread_mutex_lock(&open_files_lock);
	list_push(&open_dirs, &l->open_link);
	pthread_mutex_unlock(&open_files_lock);
	if (fuse_reply_open(req, fi) != 0) {
		pthread_mutex_lock(&open_files_lock);
		list_remove(&open_dirs, &l->open_link);
		pthread_mutex_unlock(&open_files_lock);
		free_listing(l);
	}
}

void ctlfs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	struct dir_listing *l = (struct dir_listing *)(uintptr_t)fi->fh;
	char *buf = malloc(size);
	size_t used = 0;
	const char *name = l->names.data;

	(void)ino;
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	for (unsigned i = 0; i < l->n; i++, name += strlen(name) + 1) {
		if ((off_t)i < off)
			continue;
		struct stat st = { .st_ino = l->inos[i], .st_mode = mode_of(kind_of(l->inos[i])) };
		if (l->inos[i] == FUSE_ROOT_ID)
			st.st_mode = S_IFDIR;
		size_t need = fuse_add_direntry(req, buf + used, size - used, name, &st, (off_t)i + 1);
		if (need > size - used)
			break;
		used += need;
	}
	fuse_reply_buf(req, buf, used);
	free(buf);
}

void ctlfs_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct dir_listing *l = (struct dir_listing *)(uintptr_t)fi->fh;

	(void)ino;
	pthread_mutex_lock(&open_files_lock);
	list_remove(&open_dirs, &l->open_link);
	pthread_mutex_unlock(&open_files_lock);
	free_listing(l);
	fuse_reply_err(req, 0);
}

