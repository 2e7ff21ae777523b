/* image: one source file as jobs see it.
 *
 * An image is identified by (st_dev, st_ino) of its source file, so every open
 * through the mount and every job on that file share one object, whatever path
 * or rename brought them there. It owns read-only descriptors for copying, the
 * write gate (gate.h) and the list of before-write hooks that jobs attach.
 *
 * Guest writes, write-zeroes and punch-holes run as
 *     rc = image_write_begin(img, off, len);   // enters the gate, runs hooks
 *     if (rc == 0) { pwrite/fallocate...; image_write_end(img); }
 * Hooks run in attach order with the gate entered; a hook may block (copy-
 * before-write) and may fail the write with -errno.
 *
 * Locking:
 *   - registry_lock (mutex): the (dev, ino) tree and every refcount.
 *   - the namespace lock (rwlock): held shared by operations that would make a
 *     busy image vanish or change size (unlink, rename over, truncate), and
 *     exclusively by a transaction while it starts jobs; so "is it busy?" and
 *     the operation happen atomically with respect to job starts.
 *   - hooks[]/nhooks: changed only with the image's gate closed (image_attach/
 *     image_detach close it themselves or the caller holds it closed), read by
 *     writers inside the gate. No lock on the write path.
 *   - active_jobs: incremented under the namespace lock held exclusively,
 *     decremented atomically by concluding jobs.
 * Errors: 0 or -errno.
 */
#ifndef FLEECEFS_IMAGE_H
#define FLEECEFS_IMAGE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "fleecefs/gate.h"
#include "fleecefs/source.h"

struct image_hook {
	/* Before the guest changes [off, off + len) of the image. */
	int (*before_write)(struct image_hook *hook, uint64_t off, uint64_t len);
};

struct image {
	dev_t dev;
	ino_t ino;
	unsigned refcount;      /* registry_lock */
	int read_fd;            /* O_RDONLY, -1 if the daemon may not read it */
	int direct_fd;          /* O_RDONLY|O_DIRECT, -1 if unsupported */
	struct gate gate;
	struct image_hook **hooks;   /* grows; changed only with the gate closed */
	unsigned nhooks, hooks_cap;
	atomic_uint active_jobs;
	/* Guest reads and writes served, for background copies to notice a busy
	 * guest and step aside. Relaxed: only "did it move?" matters. */
	atomic_uint_fast64_t guest_requests;
	/* The image as a copy source (source.h): its current content. */
	struct copy_source source;
};

static inline void image_note_guest_request(struct image *img)
{
	atomic_fetch_add_explicit(&img->guest_requests, 1, memory_order_relaxed);
}

/* Finds or creates the image of the file open on fd (any access mode). */
int image_get(int fd, struct image **out);
void image_ref(struct image *img);
void image_put(struct image *img);
/* Looks up an existing image without creating one; takes a reference. */
struct image *image_find(dev_t dev, ino_t ino);

int image_write_begin_slow(struct image *img, uint64_t off, uint64_t len);
static inline int image_write_begin(struct image *img, uint64_t off, uint64_t len)
{
	image_note_guest_request(img);
	gate_enter(&img->gate);
	if (__builtin_expect(img->nhooks == 0, 1))
		return 0;
	return image_write_begin_slow(img, off, len);
}
static inline void image_write_end(struct image *img) { gate_exit(&img->gate); }

/* With the gate closed by the caller. 0 or -ENOMEM. */
int image_attach_locked(struct image *img, struct image_hook *hook);
void image_detach_locked(struct image *img, struct image_hook *hook);
/* Closes the gate (draining writes), detaches, reopens. */
void image_detach(struct image *img, struct image_hook *hook);

void image_namespace_lock_shared(void);
void image_namespace_lock_exclusive(void);
void image_namespace_unlock(void);
/* With the namespace lock held: does a job run on the file (dev, ino)? */
bool image_is_busy(dev_t dev, ino_t ino);

/* Size of the source file now (fstat), or -errno. */
int64_t image_size(const struct image *img);

#endif
