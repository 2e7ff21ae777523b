/* target: where a backup's clusters go.
 *
 * An interface with one implementation per format (raw now; qcow2 later).
 * A target is created empty (O_EXCL, never following a symlink in the last
 * component), receives cluster-aligned writes from any number of threads, and
 * is either finished (flushed, durable, kept) or aborted (closed and removed).
 *
 * Locking: write and write_zeroes may run concurrently on disjoint ranges;
 * create, finish and abort run on one thread with no write in progress.
 * Errors: 0 or -errno; create also fills a one-line message.
 */
#ifndef FLEECEFS_TARGET_H
#define FLEECEFS_TARGET_H

#include <stddef.h>
#include <stdint.h>

struct target;

struct target_ops {
	int (*write)(struct target *t, uint64_t off, const void *buf, size_t len);
	/* Make [off, off + len) read as zeroes (a hole where possible). */
	int (*write_zeroes)(struct target *t, uint64_t off, uint64_t len);
	/* Give back the space of [off, off + len) (its content is not needed
	 * any more). NULL: not supported. */
	int (*discard)(struct target *t, uint64_t off, uint64_t len);
	/* Start writing back what was written so far, without waiting (lets a
	 * long copy overlap its writeback instead of paying for it at the end). */
	void (*start_writeback)(struct target *t);
	/* Durable: data, size and the directory entry. */
	int (*finish)(struct target *t);
	/* Close and remove what create made. */
	void (*abort)(struct target *t);
	void (*free)(struct target *t);
};

struct target {
	const struct target_ops *ops;
	char *path;
	uint64_t size;
	/* Known to read as zeroes already (fresh sparse file): zero clusters need
	 * no write at all. */
	int fresh;
};

/* Creates a raw target of `size` bytes at the absolute `path`. */
int target_raw_create(const char *path, uint64_t size, struct target **out, char *err, size_t errlen);
/* The same for a scratch file that is read back soon and then removed (a
 * snapshot store): no early writeback, its pages stay cached. */
int target_raw_create_scratch(const char *path, uint64_t size, struct target **out, char *err, size_t errlen);
/* Opens an existing raw target of exactly `size` bytes to update it in place
 * (an incremental onto an earlier full backup). Its abort never removes it. */
int target_raw_open_existing(const char *path, uint64_t size, struct target **out, char *err, size_t errlen);

static inline int target_write(struct target *t, uint64_t off, const void *buf, size_t len)
{
	return t->ops->write(t, off, buf, len);
}
static inline int target_write_zeroes(struct target *t, uint64_t off, uint64_t len)
{
	return t->ops->write_zeroes(t, off, len);
}
static inline int target_discard(struct target *t, uint64_t off, uint64_t len)
{
	return t->ops->discard ? t->ops->discard(t, off, len) : 0;
}
static inline void target_start_writeback(struct target *t)
{
	if (t->ops->start_writeback)
		t->ops->start_writeback(t);
}
int target_finish(struct target *t);
void target_abort(struct target *t);
void target_free(struct target *t);

/* fsync the directory that holds path (so a new entry survives a crash). */
int fsync_parent_dir(const char *path);

#endif
