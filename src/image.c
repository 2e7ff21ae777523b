/* image: see include/fleecefs/image.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <search.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/image.h"
#include "fleecefs/redirect.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

/* Direct requests must be aligned to this (and are served buffered else). */
#define DIRECT_ALIGN 512u

struct image_backend {
	atomic_uint refs;            /* the image holds one; copies take more */
	int path_fd;                 /* O_PATH: the file, reopened for each kind */
	_Atomic int fds[IMAGE_IO_KINDS]; /* -1 until needed; an O_DIRECT kind the
					  * file system refuses is served buffered */
	int read_fd;                 /* O_RDONLY, -1 if the daemon may not read it */
	int direct_read_fd;          /* O_RDONLY|O_DIRECT, -1 if unsupported */
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static void *registry_root;
static pthread_rwlock_t namespace_lock = PTHREAD_RWLOCK_INITIALIZER;

unsigned image_io_kind(int open_flags)
{
	unsigned kind = 0;
	if ((open_flags & O_ACCMODE) != O_RDONLY)
		kind |= IMAGE_IO_WRITE;
	if (open_flags & O_DIRECT)
		kind |= IMAGE_IO_DIRECT;
	if ((open_flags & O_SYNC) == O_SYNC)
		kind |= IMAGE_IO_SYNC;
	else if (open_flags & O_DSYNC)
		kind |= IMAGE_IO_DSYNC;
	return kind;
}

static int kind_flags(unsigned kind)
{
	return ((kind & IMAGE_IO_WRITE) ? O_RDWR : O_RDONLY) | ((kind & IMAGE_IO_DIRECT) ? O_DIRECT : 0) |
	       ((kind & IMAGE_IO_SYNC) ? O_SYNC : (kind & IMAGE_IO_DSYNC) ? O_DSYNC : 0) | O_CLOEXEC;
}

static int reopen(int fd, int flags)
{
	char path[64];
	proc_fd_path(path, sizeof(path), fd);
	return open(path, flags | O_CLOEXEC);
}

/* ---- backends ----------------------------------------------------------------- */

static struct image_backend *backend_new(int fd)
{
	struct image_backend *b = calloc(1, sizeof(*b));

	if (!b)
		return NULL;
	b->path_fd = reopen(fd, O_PATH);
	if (b->path_fd < 0) {
		free(b);
		return NULL;
	}
	for (unsigned k = 0; k < IMAGE_IO_KINDS; k++)
		atomic_init(&b->fds[k], -1);
	b->read_fd = reopen(b->path_fd, O_RDONLY);
	b->direct_read_fd = b->read_fd >= 0 ? reopen(b->path_fd, O_RDONLY | O_DIRECT) : -1;
	atomic_init(&b->refs, 1);
	return b;
}

static void backend_put(struct image_backend *b)
{
	if (!b || atomic_fetch_sub(&b->refs, 1) != 1)
		return;
	for (unsigned k = 0; k < IMAGE_IO_KINDS; k++) {
		int fd = atomic_load(&b->fds[k]);
		if (fd < 0)
			continue;
		/* A kind served by another's descriptor shares its number. */
		bool shared = false;
		for (unsigned j = 0; j < k && !shared; j++)
			shared = atomic_load(&b->fds[j]) == fd;
		if (!shared)
			close(fd);
	}
	if (b->read_fd >= 0)
		close(b->read_fd);
	if (b->direct_read_fd >= 0)
		close(b->direct_read_fd);
	close(b->path_fd);
	free(b);
}

/* For users outside the gate (copies): a referenced backend. */
static struct image_backend *backend_get(struct image *img)
{
	pthread_mutex_lock(&img->backend_lock);
	struct image_backend *b = img->backend;
	atomic_fetch_add(&b->refs, 1);
	pthread_mutex_unlock(&img->backend_lock);
	return b;
}

/* Opens the descriptor of `kind` in b if it is not there (backend_lock held
 * by the caller, or b not published yet). */
static int open_kind_locked(struct image_backend *b, unsigned kind)
{
	if (atomic_load(&b->fds[kind]) >= 0)
		return 0;
	int fd = reopen(b->path_fd, kind_flags(kind));
	if (fd < 0 && errno == EINVAL && (kind & IMAGE_IO_DIRECT)) {
		/* The file system has no O_DIRECT: serve it buffered. */
		int rc = open_kind_locked(b, kind & ~(unsigned)IMAGE_IO_DIRECT);
		if (rc)
			return rc;
		fd = atomic_load(&b->fds[kind & ~(unsigned)IMAGE_IO_DIRECT]);
	}
	if (fd < 0)
		return -errno;
	atomic_store_explicit(&b->fds[kind], fd, memory_order_release);
	return 0;
}

int image_open_kind(struct image *img, unsigned kind)
{
	int rc;

	pthread_mutex_lock(&img->backend_lock);
	rc = open_kind_locked(img->backend, kind);
	/* Unaligned requests of a direct kind take the buffered one. */
	if (!rc && (kind & IMAGE_IO_DIRECT))
		rc = open_kind_locked(img->backend, kind & ~(unsigned)IMAGE_IO_DIRECT);
	pthread_mutex_unlock(&img->backend_lock);
	return rc;
}

int image_replace_backend_locked(struct image *img, int fd)
{
	struct image_backend *b = backend_new(fd);
	int rc = 0;

	if (!b)
		return -errno ? -errno : -ENOMEM;
	pthread_mutex_lock(&img->backend_lock);
	/* Every kind a handle may use now, opened on the new file. */
	for (unsigned k = 0; k < IMAGE_IO_KINDS && !rc; k++)
		if (atomic_load(&img->backend->fds[k]) >= 0)
			rc = open_kind_locked(b, k);
	struct image_backend *old = img->backend;
	if (!rc)
		img->backend = b;
	pthread_mutex_unlock(&img->backend_lock);
	backend_put(rc ? b : old);
	return rc;
}

/* ---- the image as a copy source ---------------------------------------- */

static struct image *image_of_source(struct copy_source *src)
{
	return (struct image *)((char *)src - offsetof(struct image, source));
}

/* O_DIRECT when the offset allows it (no page cache churn for a whole-image
 * copy), else buffered; bytes past the end of the file read as zero. */
static int image_source_read(struct copy_source *src, void *buf, uint64_t off, uint64_t len)
{
	struct image_backend *b = backend_get(image_of_source(src));
	ssize_t got = -EINVAL;

	if (b->direct_read_fd >= 0 && off % 4096 == 0)
		got = pread_full(b->direct_read_fd, buf, (size_t)((len + 4095) & ~4095ull), off);
	if (got == -EINVAL)
		got = pread_full(b->read_fd, buf, (size_t)len, off);
	backend_put(b);
	if (got < 0)
		return (int)got;
	if ((uint64_t)got < len)
		memset((char *)buf + got, 0, (size_t)(len - (uint64_t)got));
	return 0;
}

static int64_t image_source_seek(struct copy_source *src, uint64_t off, int whence)
{
	struct image_backend *b = backend_get(image_of_source(src));
	off_t r = lseek(b->read_fd, (off_t)off, whence);
	int e = errno;
	backend_put(b);
	return r < 0 ? -e : r;
}

static bool image_source_has_data(struct copy_source *src, uint64_t off, uint64_t len)
{
	int64_t data = image_source_seek(src, off, SEEK_DATA);
	if (data < 0)
		return data != -ENXIO;
	return (uint64_t)data < off + len;
}

static int image_source_clone_to(struct copy_source *src, struct target *t, uint64_t off, uint64_t len)
{
	struct image_backend *b = backend_get(image_of_source(src));
	int rc = b->read_fd >= 0 ? target_clone_range(t, b->read_fd, off, len) : -EOPNOTSUPP;
	backend_put(b);
	return rc;
}

static const struct copy_source_ops image_source_ops = {
	.read = image_source_read,
	.has_data = image_source_has_data,
	.seek = image_source_seek,
	.clone_to = image_source_clone_to,
};

/* ---- the registry ---------------------------------------------------------------- */

static int compare_images(const void *a, const void *b)
{
	const struct image *x = a, *y = b;
	return compare_file_ids(x->dev, x->ino, y->dev, y->ino);
}

static struct image *lookup_locked(dev_t dev, ino_t ino)
{
	struct image key = { .dev = dev, .ino = ino };
	void *found = tfind(&key, &registry_root, compare_images);
	return found ? *(struct image **)found : NULL;
}

static void image_free(struct image *img)
{
	backend_put(img->backend);
	pthread_mutex_destroy(&img->backend_lock);
	gate_destroy(&img->gate);
	free(img->hooks);
	free(img);
}

static int image_get_served(int fd, const struct stat *st, struct image **out);

int image_get(int fd, struct image **out)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EINVAL;
	/* A file a mirror switched away from is served from its target. */
	int served = redirect_open(st.st_dev, st.st_ino);
	if (served == -EIO)
		return -EIO;
	if (served >= 0) {
		int rc = fstat(served, &st) < 0 ? -errno : 0;
		if (!rc)
			rc = image_get_served(served, &st, out);
		close(served);
		return rc;
	}
	return image_get_served(fd, &st, out);
}

/* The image of the file open on fd (st: its fstat), which it serves. */
static int image_get_served(int fd, const struct stat *stp, struct image **out)
{
	struct stat st = *stp;
	struct image *img;

	pthread_mutex_lock(&registry_lock);
	img = lookup_locked(st.st_dev, st.st_ino);
	if (img) {
		img->refcount++;
		pthread_mutex_unlock(&registry_lock);
		*out = img;
		return 0;
	}
	img = calloc(1, sizeof(*img));
	if (!img || !(img->backend = backend_new(fd))) {
		int e = img ? errno : ENOMEM;
		pthread_mutex_unlock(&registry_lock);
		free(img);
		return -(e ? e : ENOMEM);
	}
	img->dev = st.st_dev;
	img->ino = st.st_ino;
	img->refcount = 1;
	pthread_mutex_init(&img->backend_lock, NULL);
	gate_init(&img->gate);
	atomic_init(&img->active_jobs, 0);
	atomic_init(&img->guest_requests, 0);
	img->source.ops = &image_source_ops;
	if (!tsearch(img, &registry_root, compare_images)) {
		pthread_mutex_unlock(&registry_lock);
		image_free(img);
		return -ENOMEM;
	}
	pthread_mutex_unlock(&registry_lock);
	*out = img;
	return 0;
}

void image_ref(struct image *img)
{
	pthread_mutex_lock(&registry_lock);
	img->refcount++;
	pthread_mutex_unlock(&registry_lock);
}

void image_put(struct image *img)
{
	pthread_mutex_lock(&registry_lock);
	if (--img->refcount) {
		pthread_mutex_unlock(&registry_lock);
		return;
	}
	if (lookup_locked(img->dev, img->ino) == img)
		tdelete(img, &registry_root, compare_images);
	pthread_mutex_unlock(&registry_lock);
	image_free(img);
}

bool image_readable(const struct image *img)
{
	return img->backend->read_fd >= 0;
}

int image_switch_locked(struct image *img, int fd)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	pthread_mutex_lock(&registry_lock);
	struct image *other = lookup_locked(st.st_dev, st.st_ino);
	pthread_mutex_unlock(&registry_lock);
	if (other && other != img)
		return -EBUSY;
	int rc = image_replace_backend_locked(img, fd);
	if (rc)
		return rc;
	/* From now on the image is the file it serves: whoever opens that
	 * file (a remount through its redirect) finds this object. */
	pthread_mutex_lock(&registry_lock);
	if (lookup_locked(img->dev, img->ino) == img)
		tdelete(img, &registry_root, compare_images);
	img->dev = st.st_dev;
	img->ino = st.st_ino;
	void *added = tsearch(img, &registry_root, compare_images);
	pthread_mutex_unlock(&registry_lock);
	/* Without room in the tree the object still works through its
	 * handles; a later open makes a new one for the same file. */
	(void)added;
	return 0;
}

/* ---- guest I/O ------------------------------------------------------------------ */

static void note_guest_request(struct image *img)
{
	atomic_fetch_add_explicit(&img->guest_requests, 1, memory_order_relaxed);
}

/* The descriptor of `kind` (inside the gate). A kind nobody opened cannot
 * come through a handle; the copies' read-only one would then serve reads,
 * and writes fail with EBADF. */
static int fd_of(struct image *img, unsigned kind)
{
	int fd = atomic_load_explicit(&img->backend->fds[kind], memory_order_acquire);
	return fd >= 0 ? fd : img->backend->read_fd;
}

/* A direct request must be aligned (FUSE allows unaligned ones, most file
 * systems refuse them with O_DIRECT): else it is served buffered. */
static bool direct_fits(unsigned kind, size_t size, uint64_t off)
{
	return (kind & IMAGE_IO_DIRECT) && off % DIRECT_ALIGN == 0 && size % DIRECT_ALIGN == 0;
}

static unsigned buffered(unsigned kind) { return kind & ~(unsigned)IMAGE_IO_DIRECT; }

ssize_t image_read(struct image *img, unsigned kind, void *buf, size_t size, uint64_t off)
{
	ssize_t n = -1;

	note_guest_request(img);
	gate_enter(&img->gate);
	/* FUSE's buffer is page aligned: a direct read can go straight in. */
	if (direct_fits(kind, size, off))
		n = pread(fd_of(img, kind), buf, size, (off_t)off);
	if (!direct_fits(kind, size, off) || (n < 0 && errno == EINVAL))
		n = pread(fd_of(img, buffered(kind)), buf, size, (off_t)off);
	n = n < 0 ? -errno : n;
	gate_exit(&img->gate);
	return n;
}

int image_async_begin(struct image *img, unsigned kind, bool write, size_t size, uint64_t off)
{
	if (!gate_try_enter(&img->gate))
		return -1;
	/* Hooks change only with the gate closed: these are the hooks until
	 * image_async_end. One that may not take the write without sleeping
	 * sends it the slow way; those before it marked it already, which
	 * their before_write_nowait allows. */
	for (unsigned i = 0; write && i < img->nhooks; i++) {
		struct image_hook *h = img->hooks[i];
		if (!h->before_write_nowait || h->after_write || h->before_write_nowait(h, off, size) < 0) {
			gate_exit(&img->gate);
			return -1;
		}
	}
	note_guest_request(img);
	return fd_of(img, direct_fits(kind, size, off) ? kind : buffered(kind));
}

void image_async_end(struct image *img) { gate_exit(&img->gate); }

/* The file's current content, buffered, into any buffer (a snapshot view's
 * reads of unchanged clusters); bytes or -errno. */
ssize_t image_pread(struct image *img, void *buf, size_t size, uint64_t off)
{
	struct image_backend *b = backend_get(img);
	ssize_t n = pread_full(b->read_fd, buf, size, off);
	backend_put(b);
	return n;
}

static void after_write_upto(struct image *img, unsigned n, uint64_t off, uint64_t len, const void *buf,
			     int64_t result)
{
	for (unsigned i = 0; i < n; i++)
		if (img->hooks[i]->after_write)
			img->hooks[i]->after_write(img->hooks[i], off, len, buf, result);
}

/* Hooks, with the gate entered: 0 or the first hook's -errno. A hook that
 * refuses the write ends it for the hooks before it too: they see the end
 * (with the error) of every write whose beginning they saw. */
static int before_write(struct image *img, uint64_t off, uint64_t len)
{
	for (unsigned i = 0; i < img->nhooks; i++) {
		int rc = img->hooks[i]->before_write(img->hooks[i], off, len);
		if (rc < 0) {
			after_write_upto(img, i, off, len, NULL, rc);
			return rc;
		}
	}
	return 0;
}

static void after_write(struct image *img, uint64_t off, uint64_t len, const void *buf, int64_t result)
{
	after_write_upto(img, img->nhooks, off, len, buf, result);
}

ssize_t image_write(struct image *img, unsigned kind, const void *buf, size_t size, uint64_t off)
{
	ssize_t n = -1;

	note_guest_request(img);
	gate_enter(&img->gate);
	bool hooked = __builtin_expect(img->nhooks != 0, 0);
	if (hooked && (n = before_write(img, off, size)) < 0) {
		gate_exit(&img->gate);
		return n;
	}
	bool direct = direct_fits(kind, size, off);
	if (direct) {
		/* FUSE hands us the data at an unaligned address. */
		void *aligned = thread_buffer(THREAD_BUFFER_GUEST, size);
		if (aligned) {
			memcpy(aligned, buf, size);
			n = pwrite(fd_of(img, kind), aligned, size, (off_t)off);
		} else {
			n = -1;
			errno = ENOMEM;
		}
	}
	if (!direct || (n < 0 && errno == EINVAL))
		n = pwrite(fd_of(img, buffered(kind)), buf, size, (off_t)off);
	n = n < 0 ? -errno : n;
	if (hooked)
		after_write(img, off, size, buf, n);
	gate_exit(&img->gate);
	return n;
}

int image_fallocate(struct image *img, unsigned kind, int mode, uint64_t off, uint64_t len)
{
	int rc;

	note_guest_request(img);
	gate_enter(&img->gate);
	bool hooked = img->nhooks != 0;
	/* Punching or zeroing destroys old data like a write, and even
	 * allocating changes what SEEK_DATA says of the range (a snapshot view
	 * reports the holes of T): jobs copy it first. */
	if (hooked && (rc = before_write(img, off, len)) < 0)
		goto out;
	rc = fallocate(fd_of(img, buffered(kind)), mode, (off_t)off, (off_t)len) < 0 ? -errno : 0;
	if (hooked)
		after_write(img, off, len, NULL, rc ? rc : (int64_t)len);
out:
	gate_exit(&img->gate);
	return rc;
}

/* Any descriptor of the file that can write it (else any at all). */
static int some_fd(struct image *img, bool need_write)
{
	for (unsigned k = IMAGE_IO_WRITE; k < IMAGE_IO_KINDS; k += 2) {
		int fd = atomic_load(&img->backend->fds[k]);
		if (fd >= 0)
			return fd;
	}
	if (need_write)
		return -1;
	return img->backend->read_fd >= 0 ? img->backend->read_fd : atomic_load(&img->backend->fds[0]);
}

int image_fsync(struct image *img, bool datasync)
{
	gate_enter(&img->gate);
	/* Any descriptor of the file syncs all of it. */
	int fd = some_fd(img, false);
	int rc = fd < 0 ? -EBADF : (datasync ? fdatasync(fd) : fsync(fd)) < 0 ? -errno : 0;
	gate_exit(&img->gate);
	return rc;
}

int64_t image_lseek(struct image *img, uint64_t off, int whence)
{
	gate_enter(&img->gate);
	int fd = some_fd(img, false);
	off_t r = fd < 0 ? -1 : lseek(fd, (off_t)off, whence);
	int64_t rc = fd < 0 ? -EBADF : r < 0 ? -errno : r;
	gate_exit(&img->gate);
	return rc;
}

int image_fstat(struct image *img, struct stat *st)
{
	struct image_backend *b = backend_get(img);
	int rc = fstat(b->path_fd, st) < 0 ? -errno : 0;
	backend_put(b);
	return rc;
}

int image_change_size(struct image *img, int mode, uint64_t off, uint64_t len)
{
	gate_enter(&img->gate);
	int fd = some_fd(img, true);
	int rc;
	if (fd < 0)
		rc = -EBADF;
	else if (mode < 0)
		rc = ftruncate(fd, (off_t)off) < 0 ? -errno : 0;
	else
		rc = fallocate(fd, mode, (off_t)off, (off_t)len) < 0 ? -errno : 0;
	gate_exit(&img->gate);
	return rc;
}

int image_path(struct image *img, char *buf, size_t len)
{
	char proc[64];
	struct image_backend *b = backend_get(img);

	proc_fd_path(proc, sizeof(proc), b->path_fd);
	ssize_t n = readlink(proc, buf, len - 1);
	int e = errno;
	backend_put(b);
	if (n < 0)
		return -e;
	buf[n] = '\0';
	return 0;
}

/* ---- jobs ---------------------------------------------------------------------- */

int image_attach_locked(struct image *img, struct image_hook *hook, bool first)
{
	if (img->nhooks == img->hooks_cap) {
		unsigned cap = img->hooks_cap ? img->hooks_cap * 2 : 4;
		struct image_hook **grown = realloc(img->hooks, cap * sizeof(*grown));
		if (!grown)
			return -ENOMEM;
		img->hooks = grown;
		img->hooks_cap = cap;
	}
	if (first) {
		memmove(img->hooks + 1, img->hooks, img->nhooks * sizeof(*img->hooks));
		img->hooks[0] = hook;
	} else {
		img->hooks[img->nhooks] = hook;
	}
	img->nhooks++;
	return 0;
}

void image_detach_locked(struct image *img, struct image_hook *hook)
{
	for (unsigned i = 0; i < img->nhooks; i++) {
		if (img->hooks[i] != hook)
			continue;
		for (; i + 1 < img->nhooks; i++)
			img->hooks[i] = img->hooks[i + 1];
		img->hooks[--img->nhooks] = NULL;
		return;
	}
}

void image_detach(struct image *img, struct image_hook *hook)
{
	gate_close(&img->gate);
	image_detach_locked(img, hook);
	gate_open(&img->gate);
}

void image_job_started(struct image *img) { atomic_fetch_add(&img->active_jobs, 1); }
void image_job_ended(struct image *img) { atomic_fetch_sub(&img->active_jobs, 1); }

void image_namespace_lock_shared(void) { pthread_rwlock_rdlock(&namespace_lock); }
void image_namespace_lock_exclusive(void) { pthread_rwlock_wrlock(&namespace_lock); }
void image_namespace_unlock(void) { pthread_rwlock_unlock(&namespace_lock); }

bool image_is_busy(dev_t dev, ino_t ino)
{
	bool busy = false;

	redirect_served_id(dev, ino, &dev, &ino);
	pthread_mutex_lock(&registry_lock);
	struct image *img = lookup_locked(dev, ino);
	if (img)
		busy = atomic_load(&img->active_jobs) > 0;
	pthread_mutex_unlock(&registry_lock);
	return busy;
}

bool image_is_served(dev_t dev, ino_t ino)
{
	pthread_mutex_lock(&registry_lock);
	bool known = lookup_locked(dev, ino) != NULL;
	pthread_mutex_unlock(&registry_lock);
	return known;
}

int64_t image_size(struct image *img)
{
	struct stat st;
	int rc = image_fstat(img, &st);
	return rc ? rc : st.st_size;
}
