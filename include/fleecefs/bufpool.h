/* bufpool: page-aligned data buffers of the copy engines, used again rather
 * than freed.
 *
 * A copy reads a run (up to a MiB) into a buffer that a writer thread lets go
 * once the target has it. Freed to glibc, such buffers go back to the kernel
 * (mmap threshold, heap trimming) and the next one costs a page fault and a
 * page clear per 4 KiB: on an idle backup into an NBD server that was a
 * quarter of the daemon's CPU. The pool keeps them instead, in power-of-two
 * size classes (4 KiB up to BUFPOOL_LARGEST; larger ones are not pooled),
 * at most BUFPOOL_KEEP bytes in all, and only while a copy engine runs
 * (bufpool_attach); when the last one detaches the pool is emptied, and
 * buffers put back later (a target letting go after its job) are freed.
 *
 * A buffer can be shared (bufpool_share): a copy engine's queue and a target
 * that keeps what it wrote until a flush covers it (an NBD export) then hold
 * the same bytes instead of a copy each, and the last to let go puts it back.
 * Shared bytes are never changed.
 *
 * Owns: the free lists and their byte count (the buffers in use belong to
 * whoever got them; a shared one to its holders together).
 * Locking: one internal mutex, a leaf; every function may be called from any
 * thread.
 * Errors: bufpool_get returns NULL when out of memory.
 */
#ifndef FLEECEFS_BUFPOOL_H
#define FLEECEFS_BUFPOOL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define BUFPOOL_LARGEST (32u << 20)
#define BUFPOOL_KEEP (32u << 20)

/* A copy engine starts using the pool / stops (the last one empties it). */
void bufpool_attach(void);
void bufpool_detach(void);
/* A 4096-aligned buffer of at least len bytes (len > 0). */
void *bufpool_get(size_t len);
/* Gives back a buffer bufpool_get(len) returned, with the same len. */
void bufpool_put(void *buf, size_t len);
/* Frees every pooled buffer. */
void bufpool_trim(void);
struct shared_buffer {
	void *data;
	size_t len;              /* as given to bufpool_get */
	atomic_uint holders;
};

/* data (from bufpool_get(len)) with one holder, the caller. NULL: out of
 * memory, and data is still the caller's alone. */
struct shared_buffer *bufpool_share(void *data, size_t len);
void shared_buffer_hold(struct shared_buffer *b);
/* The last holder's release puts the data back in the pool. */
void shared_buffer_release(struct shared_buffer *b);

/* Bytes held in the pool now (for tests). */
uint64_t bufpool_pooled_bytes(void);

#endif
