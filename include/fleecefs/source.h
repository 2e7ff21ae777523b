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

#include <stdbool.h>
#include <stdint.h>

struct copy_source;

struct copy_source_ops {
	/* [off, off + len) into buf (page aligned, with room for len rounded
	 * up to 4 KiB); bytes past the end of the source read as zero. */
	int (*read)(struct copy_source *src, void *buf, uint64_t off, uint64_t len);
	/* May [off, off + len) hold anything but zeroes? (false: surely not) */
	bool (*has_data)(struct copy_source *src, uint64_t off, uint64_t len);
	/* lseek's SEEK_DATA / SEEK_HOLE: the offset, or -errno (-ENXIO). */
	int64_t (*seek)(struct copy_source *src, uint64_t off, int whence);
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

static inline int64_t source_seek(struct copy_source *src, uint64_t off, int whence)
{
	return src->ops->seek(src, off, whence);
}

#endif
