/* target-raw: a sparse file of the image's size.
 *
 * Writes are buffered (one writer thread, see blockcopy.h): on this kind of
 * target, O_DIRECT writes into a sparse file serialize on allocation and
 * were no faster. The copy engine starts writeback as it goes
 * (start_writeback); finish makes everything durable and drops the written
 * pages from the cache, since nobody reads a fresh backup soon.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/target.h"
#include "fleecefs/util.h"

struct raw_target {
	struct target base;
	int fd;
	bool created;    /* by us: abort removes it */
};

static struct raw_target *raw(struct target *t) { return (struct raw_target *)t; }

static int raw_write(struct target *t, uint64_t off, const void *buf, size_t len)
{
	struct raw_target *r = raw(t);
	ssize_t n = pwrite_full(r->fd, buf, len, off);

	return n < 0 ? (int)n : 0;
}

static int raw_discard(struct target *t, uint64_t off, uint64_t len)
{
	if (fallocate(raw(t)->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0)
		return -errno;
	return 0;
}

static void raw_start_writeback(struct target *t)
{
	/* Starts writeback of what is dirty and drops what an earlier round
	 * already wrote: a backup does not fill the host's page cache, and
	 * recycled pages are cheaper than fresh ones on a VM host. */
	posix_fadvise(raw(t)->fd, 0, 0, POSIX_FADV_DONTNEED);
}

static int raw_write_zeroes(struct target *t, uint64_t off, uint64_t len)
{
	struct raw_target *r = raw(t);

	if (t->fresh)
		return 0;
	if (fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
		return 0;
	/* No hole punching here: write real zeroes. */
	static const char zeroes[65536];
	while (len) {
		size_t n = (size_t)min_u64(len, sizeof(zeroes));
		ssize_t w = pwrite_full(r->fd, zeroes, n, off);
		if (w < 0)
			return (int)w;
		off += n;
		len -= n;
	}
	return 0;
}

static int raw_finish(struct target *t)
{
	struct raw_target *r = raw(t);
	int rc = 0;

	if (fdatasync(r->fd) < 0)
		rc = -errno;
	else
		posix_fadvise(r->fd, 0, 0, POSIX_FADV_DONTNEED);
	if (close(r->fd) < 0 && !rc)
		rc = -errno;
	r->fd = -1;
	if (!rc)
		rc = fsync_parent_dir(t->path);
	return rc;
}

static void raw_abort(struct target *t)
{
	struct raw_target *r = raw(t);

	if (r->fd >= 0)
		close(r->fd);
	r->fd = -1;
	if (r->created)
		unlink(t->path);
}

static void raw_free(struct target *t)
{
	struct raw_target *r = raw(t);

	if (r->fd >= 0)
		close(r->fd);
	free(t->path);
	free(r);
}

static const struct target_ops raw_ops = {
	.write = raw_write,
	.write_zeroes = raw_write_zeroes,
	.discard = raw_discard,
	.start_writeback = raw_start_writeback,
	.finish = raw_finish,
	.abort = raw_abort,
	.free = raw_free,
};

/* A scratch file (a snapshot or fleecing store) is read back soon and then
 * punched or removed: left to the page cache, most of it never reaches the
 * disk, where its writeback would compete with the guest's own I/O. */
static const struct target_ops raw_scratch_ops = {
	.write = raw_write,
	.write_zeroes = raw_write_zeroes,
	.discard = raw_discard,
	.finish = raw_finish,
	.abort = raw_abort,
	.free = raw_free,
};

static int raw_create(const char *path, uint64_t size, const struct target_ops *ops, struct target **out, char *err,
		      size_t errlen)
{
	struct raw_target *r = calloc(1, sizeof(*r));

	if (!r || !(r->base.path = strdup(path))) {
		free(r);
		return set_error(err, errlen, ENOMEM, "target %s: out of memory", path);
	}
	r->base.ops = ops;
	r->base.size = size;
	r->base.fresh = 1;
	r->created = true;
	/* Backups hold whole disks: readable by the owner only. */
	r->fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (r->fd < 0) {
		int e = errno;
		free(r->base.path);
		free(r);
		return set_error(err, errlen, e, "target %s: cannot create: %s", path, strerror(e));
	}
	if (ftruncate(r->fd, (off_t)size) < 0) {
		int e = errno;
		raw_abort(&r->base);
		raw_free(&r->base);
		return set_error(err, errlen, e, "target %s: cannot size to %llu bytes: %s", path,
				 (unsigned long long)size, strerror(e));
	}
	*out = &r->base;
	return 0;
}

int target_raw_create(const char *path, uint64_t size, struct target **out, char *err, size_t errlen)
{
	return raw_create(path, size, &raw_ops, out, err, errlen);
}

int target_raw_create_scratch(const char *path, uint64_t size, struct target **out, char *err, size_t errlen)
{
	return raw_create(path, size, &raw_scratch_ops, out, err, errlen);
}

int target_raw_open_existing(const char *path, uint64_t size, struct target **out, char *err, size_t errlen)
{
	struct raw_target *r = calloc(1, sizeof(*r));
	struct stat st;

	if (!r || !(r->base.path = strdup(path))) {
		free(r);
		return set_error(err, errlen, ENOMEM, "target %s: out of memory", path);
	}
	r->base.ops = &raw_ops;
	r->base.size = size;
	r->fd = open(path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
	int e = r->fd < 0 ? errno : fstat(r->fd, &st) < 0 ? errno : 0;
	if (!e && !S_ISREG(st.st_mode))
		e = EINVAL;
	if (e || (uint64_t)st.st_size != size) {
		int rc = e ? set_error(err, errlen, e, "target %s: cannot update it: %s", path, strerror(e))
			   : set_error(err, errlen, EINVAL,
				       "target %s: is %llu bytes, the image %llu: not a full backup of this image", path,
				       (unsigned long long)st.st_size, (unsigned long long)size);
		raw_free(&r->base);
		return rc;
	}
	*out = &r->base;
	return 0;
}
