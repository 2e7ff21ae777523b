/* target-raw: a sparse file of the image's size.
 *
 * Three kinds (target.h): a new backup, written under a hidden name and
 * published at the end; an earlier backup updated in place, every
 * overwritten cluster journaled first (journal.h); a scratch store.
 *
 * Writes are buffered (one writer thread, see blockcopy.h): on this kind of
 * target, O_DIRECT writes into a sparse file serialize on allocation and
 * were no faster. The copy engine writes back as it goes, a round at a
 * time (start_writeback, target.h); flush makes everything durable and drops the written
 * pages from the cache, since nobody reads a fresh backup soon.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/journal.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

enum raw_kind { RAW_NEW, RAW_SCRATCH, RAW_IN_PLACE };

struct raw_target {
	struct target base;
	enum raw_kind kind;
	/* A new sparse file: nothing written reads as zeroes already, so zero
	 * clusters need no write (target.h, the zero rule). */
	bool fresh;
	int fd;
	struct journal *journal; /* RAW_IN_PLACE */
};

static struct raw_target *raw(struct target *t) { return (struct raw_target *)t; }

/* In place, nothing is overwritten before its old content is journaled. */
static int protect(struct raw_target *r, uint64_t off, uint64_t len)
{
	if (!r->journal || journal_covers(r->journal, off, len))
		return 0;
	struct journal_range range = { off, len };
	return journal_protect(r->journal, &range, 1);
}

static int raw_write(struct target *t, uint64_t off, const void *buf, size_t len, unsigned flags)
{
	(void)flags;
	struct raw_target *r = raw(t);
	int rc = protect(r, off, len);
	if (rc)
		return rc;
	ssize_t n = pwrite_full(r->fd, buf, len, off);
	return n < 0 ? (int)n : 0;
}

static int raw_clone_range(struct target *t, int src_fd, uint64_t off, uint64_t len)
{
	struct raw_target *r = raw(t);
	int rc = protect(r, off, len);
	if (rc)
		return rc;
	struct file_clone_range range = {
		.src_fd = src_fd, .src_offset = off, .src_length = len, .dest_offset = off,
	};
	return ioctl(r->fd, FICLONERANGE, &range) < 0 ? -errno : 0;
}

static int raw_discard(struct target *t, uint64_t off, uint64_t len)
{
	if (fallocate(raw(t)->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0)
		return -errno;
	return 0;
}

static void raw_start_writeback(struct target *t)
{
	/* A backup does not fill the host's page cache either: recycled pages
	 * are cheaper than fresh ones on a VM host. */
	target_file_writeback(t, raw(t)->fd);
}

static int zero_range(int fd, uint64_t off, uint64_t len)
{
	if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
		return 0;
	/* No hole punching here: write real zeroes. */
	static const char zeroes[65536];
	while (len) {
		size_t n = (size_t)min_u64(len, sizeof(zeroes));
		ssize_t w = pwrite_full(fd, zeroes, n, off);
		if (w < 0)
			return (int)w;
		off += n;
		len -= n;
	}
	return 0;
}

static int raw_write_zeroes(struct target *t, uint64_t off, uint64_t len)
{
	struct raw_target *r = raw(t);

	if (r->fresh)
		return 0;
	int rc = protect(r, off, len);
	return rc ? rc : zero_range(r->fd, off, len);
}

static int raw_prepare_writes(struct target *t, const struct journal_range *ranges, unsigned n)
{
	struct raw_target *r = raw(t);
	return r->journal ? journal_protect(r->journal, ranges, n) : 0;
}

static int raw_set_size(struct target *t, uint64_t size, char *err, size_t errlen)
{
	struct raw_target *r = raw(t);

	if (r->kind == RAW_IN_PLACE) {
		if (t->size != size)
			return set_error(err, errlen, EINVAL,
					 "target %s: is %llu bytes, the image %llu: not a full backup of this image", t->path,
					 (unsigned long long)t->size, (unsigned long long)size);
		return 0;
	}
	if (ftruncate(r->fd, (off_t)size) < 0)
		return set_error(err, errlen, errno, "target %s: cannot size to %llu bytes: %s", t->path,
				 (unsigned long long)size, error_text(errno));
	t->size = size;
	return 0;
}

static int raw_flush(struct target *t)
{
	struct raw_target *r = raw(t);

	int rc = target_file_sync(t, r->fd);
	if (rc)
		return rc;
	posix_fadvise(r->fd, 0, 0, POSIX_FADV_DONTNEED);
	return 0;
}

static int raw_forget(struct target *t, const struct cbitmap *left, unsigned cluster_bits)
{
	struct raw_target *r = raw(t);
	int rc = 0;

	if (r->journal) {
		/* Only what the journal saved was touched at all. */
		rc = journal_rollback(r->journal, left);
	} else {
		for (uint64_t c = cbitmap_next_set(left, 0); c < left->nbits && !rc;) {
			uint64_t end = cbitmap_next_clear(left, c);
			uint64_t off = c << cluster_bits;
			uint64_t len = min_u64((end - c) << cluster_bits, t->size - min_u64(off, t->size));
			if (len)
				rc = zero_range(r->fd, off, len);
			c = end < left->nbits ? cbitmap_next_set(left, end) : left->nbits;
		}
		if (!rc)
			rc = target_file_sync(t, r->fd);
	}
	return rc;
}

static int raw_close(struct target *t, bool keep)
{
	struct raw_target *r = raw(t);
	int rc = 0;

	if (r->journal) {
		if (!keep)
			rc = journal_rollback(r->journal, NULL);
		/* A journal that could not be applied stays for the next mount. */
		int rc2 = journal_close(r->journal, rc == 0);
		rc = rc ? rc : rc2;
		r->journal = NULL;
	}
	if (r->fd >= 0 && close(r->fd) < 0 && !rc && keep)
		rc = -errno;
	r->fd = -1;
	if (!keep && (r->kind == RAW_SCRATCH || (r->kind == RAW_NEW && !t->published))) {
		unlink(t->path);
		fsync_parent_dir(t->path);
	}
	return rc;
}

static void raw_free(struct target *t)
{
	struct raw_target *r = raw(t);

	if (r->journal)
		journal_close(r->journal, false);
	if (r->fd >= 0)
		close(r->fd);
	free(t->path);
	free(r);
}

static const struct target_ops raw_ops = {
	.write = raw_write,
	.clone_range = raw_clone_range,
	.write_zeroes = raw_write_zeroes,
	.discard = raw_discard,
	.start_writeback = raw_start_writeback,
	.prepare_writes = raw_prepare_writes,
	.set_size = raw_set_size,
	.flush = raw_flush,
	.forget = raw_forget,
	.publish = target_rename_file,
	.close = raw_close,
	.free = raw_free,
};

/* A scratch file (a snapshot or fleecing store) is read back soon and then
 * punched or removed: left to the page cache, most of it never reaches the
 * disk, where its writeback would compete with the guest's own I/O. */
static const struct target_ops raw_scratch_ops = {
	.write = raw_write,
	.clone_range = raw_clone_range,
	.write_zeroes = raw_write_zeroes,
	.discard = raw_discard,
	.set_size = raw_set_size,
	.flush = raw_flush,
	.forget = raw_forget,
	.publish = target_rename_file,
	.close = raw_close,
	.free = raw_free,
};

static struct raw_target *new_raw(const char *path, const struct target_ops *ops, enum raw_kind kind)
{
	struct raw_target *r = calloc(1, sizeof(*r));

	if (!r || !(r->base.path = strdup(path))) {
		free(r);
		return NULL;
	}
	r->base.ops = ops;
	r->kind = kind;
	r->fd = -1;
	return r;
}

static int create_file(struct raw_target *r, char *err, size_t errlen, const char *shown)
{
	int rc = target_create_file(&r->base, shown, &r->fd, err, errlen);
	r->fresh = rc == 0;
	return rc;
}

int target_raw_create(const char *final_path, const char *temp_path, struct target **out, char *err, size_t errlen)
{
	struct raw_target *r = new_raw(temp_path, &raw_ops, RAW_NEW);
	int rc;

	if (!r)
		return set_error(err, errlen, ENOMEM, "target %s: out of memory", final_path);
	if ((rc = create_file(r, err, errlen, final_path))) {
		raw_free(&r->base);
		return rc;
	}
	*out = &r->base;
	return 0;
}

int target_raw_create_scratch(const char *path, uint64_t size, struct target **out, char *err, size_t errlen)
{
	struct raw_target *r = new_raw(path, &raw_scratch_ops, RAW_SCRATCH);
	int rc;

	if (!r)
		return set_error(err, errlen, ENOMEM, "store %s: out of memory", path);
	if ((rc = create_file(r, err, errlen, path)) || (rc = raw_set_size(&r->base, size, err, errlen))) {
		raw_close(&r->base, false);
		raw_free(&r->base);
		return rc;
	}
	*out = &r->base;
	return 0;
}

int target_raw_open_in_place(const char *path, dev_t dev, ino_t ino, const char *journal_path, uint32_t cluster_size,
			     struct target **out, char *err, size_t errlen)
{
	struct raw_target *r = new_raw(path, &raw_ops, RAW_IN_PLACE);
	struct stat st;
	int rc;

	if (!r)
		return set_error(err, errlen, ENOMEM, "target %s: out of memory", path);
	if ((rc = target_open_recorded(path, dev, ino, &r->fd, &st, err, errlen)))
		goto fail;
	r->base.dev = st.st_dev;
	r->base.ino = st.st_ino;
	r->base.size = (uint64_t)st.st_size;
	if ((rc = journal_create(journal_path, r->fd, r->base.size, cluster_size, &r->journal, err, errlen)))
		goto fail;
	*out = &r->base;
	return 0;
fail:
	raw_free(&r->base);
	return rc;
}

static int raw_format_create(const struct target_spec *spec, const char *temp, struct target **out, char *err,
			     size_t errlen)
{
	return target_raw_create(spec->resolved, temp, out, err, errlen);
}

static int raw_open_existing(const struct target_spec *spec, const char *path, dev_t dev, ino_t ino,
			     const char *journal, uint32_t cluster_size, struct target **out, char *err, size_t errlen)
{
	(void)spec;
	return target_raw_open_in_place(path, dev, ino, journal, cluster_size, out, err, errlen);
}

static int raw_disk_size(int fd, uint64_t *size, char *err, size_t errlen)
{
	struct stat st;
	if (fstat(fd, &st) < 0)
		return set_error(err, errlen, errno, "%s", error_text(errno));
	*size = (uint64_t)st.st_size;
	return 0;
}

const struct target_format_ops target_raw_format = {
	.name = "raw",
	.incremental_in_place = true,
	.create = raw_format_create,
	.open_existing = raw_open_existing,
	.disk_size = raw_disk_size,
};
