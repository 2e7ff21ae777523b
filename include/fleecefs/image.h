/* image: one source file, as guests and jobs see it.
 *
 * An image is identified by (st_dev, st_ino) of the file it serves, so every
 * open through the mount and every job on that file share one object, whatever
 * path or rename brought them there. That is the source file, or the target a
 * mirror switched it to (redirect.h: opening the source then finds the
 * target's image). It owns:
 *   - the backend: the file's descriptors, one per kind of guest access
 *     (read-only or read-write, O_DIRECT, O_DSYNC, O_SYNC; opened when a
 *     handle first needs it) and read-only ones for copies. All guest I/O
 *     goes through image_read/write/fallocate/fsync/lseek; the fs layer's
 *     handles point at the image, never at a descriptor, so the backend can
 *     be replaced as a whole (image_replace_backend, with the gate closed:
 *     a mirror's switch to its target) without any handle knowing;
 *   - the gate (gate.h): guest reads and writes run inside it, so closing it
 *     drains them all;
 *   - the hooks jobs attach: before_write runs before the guest changes a
 *     range (and may block, copy-before-write, or fail the write), after_write
 *     sees the range and the result once it is done;
 *   - the count of jobs that keep the image busy (no unlink, rename over or
 *     truncate meanwhile).
 *
 * Locking:
 *   - registry_lock (mutex): the (dev, ino) tree and every refcount.
 *   - the namespace lock (rwlock): held shared by operations that would make a
 *     busy image vanish or change size (unlink, rename over, truncate, a
 *     truncating open or create) across their check and their act, and
 *     exclusively by a transaction while it starts jobs; so "is it busy?" and
 *     the operation happen atomically with respect to job starts.
 *   - hooks[]/nhooks: changed only with the image's gate closed (the attach
 *     and detach functions close it themselves or the caller holds it
 *     closed), read by writers inside the gate. No lock on the write path.
 *   - backend: read inside the gate without a lock (it changes only with the
 *     gate closed); users outside the gate (copies) take a reference under
 *     backend_lock (a leaf). A backend's descriptors appear once (-1 to fd,
 *     under backend_lock) and stay until it is freed.
 *   - active_jobs: counted up under the namespace lock held exclusively
 *     (image_job_started), down atomically (image_job_ended).
 * Errors: 0 or -errno (I/O functions: bytes or -errno).
 */
#ifndef FLEECEFS_IMAGE_H
#define FLEECEFS_IMAGE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "fleecefs/gate.h"
#include "fleecefs/source.h"

/* The kind of a guest's access, from its open flags. */
enum {
	IMAGE_IO_WRITE = 1,      /* opened for writing */
	IMAGE_IO_DIRECT = 2,     /* O_DIRECT: aligned requests bypass the cache */
	IMAGE_IO_DSYNC = 4,
	IMAGE_IO_SYNC = 8,
	IMAGE_IO_KINDS = 16,
};
unsigned image_io_kind(int open_flags);

struct image_hook {
	/* Before the guest changes [off, off + len) of the image; 0 or -errno
	 * (the write fails). */
	int (*before_write)(struct image_hook *hook, uint64_t off, uint64_t len);
	/* After it (or after a later hook refused it): `result` is the bytes
	 * written or -errno; `buf` the data written (NULL for fallocate and
	 * refused writes). NULL: not needed. */
	void (*after_write)(struct image_hook *hook, uint64_t off, uint64_t len, const void *buf, int64_t result);
	/* before_write for a caller that must not sleep (image_async_begin):
	 * 0 done, -EAGAIN where it would wait (the write then goes through
	 * before_write). Only for hooks without after_write whose work may be
	 * done more than once for a write. NULL: such writes always wait. */
	int (*before_write_nowait)(struct image_hook *hook, uint64_t off, uint64_t len);
};

struct image_backend;

struct image {
	dev_t dev;
	ino_t ino;
	unsigned refcount;      /* registry_lock */
	struct image_backend *backend;
	pthread_mutex_t backend_lock;
	struct gate gate;
	/* Private to image.c (see Locking). */
	struct image_hook **hooks;
	unsigned nhooks, hooks_cap;
	atomic_uint active_jobs;
	/* Guest reads and writes served, for background copies to notice a busy
	 * guest and step aside. Relaxed: only "did it move?" matters. */
	atomic_uint_fast64_t guest_requests;
	/* The image as a copy source (source.h): its current content. */
	struct copy_source source;
};

/* Finds or creates the image of the file open on fd (any access mode). */
int image_get(int fd, struct image **out);
void image_ref(struct image *img);
void image_put(struct image *img);
/* Can the daemon read the file (for copies)? */
bool image_readable(const struct image *img);

/* ---- guest I/O ------------------------------------------------------------- */

/* A handle of this kind is about to use the image: its descriptor is opened
 * now (never on the I/O path). */
int image_open_kind(struct image *img, unsigned kind);
ssize_t image_read(struct image *img, unsigned kind, void *buf, size_t size, uint64_t off);
/* Asynchronous guest I/O (the io_uring transport, uring.h): for a read, or a
 * write whose hooks all took it without sleeping (before_write_nowait),
 * enters the gate without sleeping and returns the descriptor to do it on
 * (O_DIRECT when the request is aligned for it); the caller does the I/O and
 * then calls image_async_end. -1 with nothing held when the gate is closed
 * or a hook would wait: use image_read/write. */
int image_async_begin(struct image *img, unsigned kind, bool write, size_t size, uint64_t off);
void image_async_end(struct image *img);
/* The file's current content into any buffer, buffered, outside the gate
 * (a snapshot view's reads of clusters nobody changed since T). */
ssize_t image_pread(struct image *img, void *buf, size_t size, uint64_t off);
/* Runs the hooks, writes, runs the after-write hooks. */
ssize_t image_write(struct image *img, unsigned kind, const void *buf, size_t size, uint64_t off);
/* fallocate: modes that change content or allocation run the hooks like a
 * write; collapse and insert (size changes) are for image_change_size. */
int image_fallocate(struct image *img, unsigned kind, int mode, uint64_t off, uint64_t len);
int image_fsync(struct image *img, bool datasync);
int64_t image_lseek(struct image *img, uint64_t off, int whence);
int image_fstat(struct image *img, struct stat *st);
/* ftruncate, or fallocate collapse/insert: the caller holds the namespace
 * lock and has checked that no job runs on the image. */
int image_change_size(struct image *img, int mode, uint64_t off, uint64_t len);
/* The path of the file now (/proc/self/fd), into buf; 0 or -errno. */
int image_path(struct image *img, char *buf, size_t len);

/* ---- jobs ------------------------------------------------------------------- */

/* With the gate closed by the caller. 0 or -ENOMEM. `first`: ahead of
 * every hook attached so far (dirty bitmaps record a write before any job
 * copies for it). */
int image_attach_locked(struct image *img, struct image_hook *hook, bool first);
void image_detach_locked(struct image *img, struct image_hook *hook);
/* Closes the gate (draining writes), detaches, reopens. */
void image_detach(struct image *img, struct image_hook *hook);
/* A job that keeps the image busy starts (namespace lock held exclusively)
 * or ends. */
void image_job_started(struct image *img);
void image_job_ended(struct image *img);
/* Replaces the backend by the file open on fd (gate closed by the caller):
 * every handle's next request goes to that file. */
int image_replace_backend_locked(struct image *img, int fd);
/* A mirror's switch (gate closed by the caller): the backend becomes the
 * file open on fd and the image is that file from now on (its key in the
 * registry, its identity). -EBUSY if another image object is that file. */
int image_switch_locked(struct image *img, int fd);

void image_namespace_lock_shared(void);
void image_namespace_lock_exclusive(void);
void image_namespace_unlock(void);
/* With the namespace lock held: does a job run on the file (dev, ino)? */
bool image_is_busy(dev_t dev, ino_t ino);
/* Is the file (dev, ino) an image now (open through the mount, used by a
 * job, or serving a switched one)? */
bool image_is_served(dev_t dev, ino_t ino);

/* Size of the source file now (fstat), or -errno. */
int64_t image_size(struct image *img);

#endif
