/* source: where a copy reads the data of its point in time from.
 *
 * An image (image.h) is a source whose content at T is its current content
 * for every cluster nobody has overwritten since (copy-before-write sees to
 * that). A snapshot view (snapshot.h) is a source that is T for every byte,
 * whatever the guest does. The copy engine (blockcopy.h) reads through this
 * interface and does not care which one it has.
 * Locking: both operations may run concurrently from any thread.
 * Errors: read returns 0 or -errno.
 */
#ifndef FLEECEFS_SOURCE_H
#define FLEECEFS_SOURCE_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

struct copy_source;
struct target;

struct copy_source_ops {
	/* [off, off + len) into buf (page aligned, with room for len rounded
	 * up to 4 KiB); bytes past the end of the source read as zero. */
	int (*read)(struct copy_source *src, void *buf, uint64_t off, uint64_t len);
	/* May [off, off + len) hold anything but zeroes? (false: surely not) */
	bool (*has_data)(struct copy_source *src, uint64_t off, uint64_t len);
	/* lseek's SEEK_DATA / SEEK_HOLE: the offset, or -errno (-ENXIO). */
	int64_t (*seek)(struct copy_source *src, uint64_t off, int whence);
	/* Has t take [off, off + len) from the source's file by sharing blocks
	 * (target_clone_range). NULL: the source is not one file at those
	 * offsets (a view of a snapshot). */
	int (*clone_to)(struct copy_source *src, struct target *t, uint64_t off, uint64_t len);
};

struct copy_source {
	const struct copy_source_ops *ops;
};

static inline int source_read(struct copy_source *src, void *buf, uint64_t off, uint64_t len)
{
	return src->ops->read(src, buf, off, len);
}

static inline bool source_has_data(struct copy_source *src, uint64_t off, uint64_t len)
{
	return src->ops->has_data(src, off, len);
}

/* 0, or -errno: -EOPNOTSUPP when this source cannot. */
static inline int source_clone_to(struct copy_source *src, struct target *t, uint64_t off, uint64_t len)
{
	return src->ops->clone_to ? src->ops->clone_to(src, t, off, len) : -EOPNOTSUPP;
}

static inline int64_t source_seek(struct copy_source *src, uint64_t off, int whence)
{
	return src->ops->seek(src, off, whence);
}

#endif
