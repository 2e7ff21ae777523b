/* bufpool: page-aligned data buffers of the copy engines, used again rather
 * than freed.
 *
 * A copy reads a run (up to a MiB) into a buffer that a writer thread lets go
 * once the target has it. Freed to glibc, such buffers go back to the kernel
 * (mmap threshold, heap trimming) and the next one costs a page fault and a
 * page clear per 4 KiB: on an idle backup into an NBD server that was a
 * quarter of the daemon's CPU. The pool keeps them instead, in power-of-two
 * size classes (4 KiB up to BUFPOOL_LARGEST; larger ones are not pooled),
 * at most BUFPOOL_KEEP bytes in all; bufpool_trim gives everything back
 * (the last copy engine to stop calls it).
 *
 * Owns: the free lists and their byte count (the buffers in use belong to
 * whoever got them).
 * Locking: one internal mutex, a leaf; every function may be called from any
 * thread.
 * Errors: bufpool_get returns NULL when out of memory.
 */
#ifndef FLEECEFS_BUFPOOL_H
#define FLEECEFS_BUFPOOL_H

#include <stddef.h>
#include <stdint.h>

#define BUFPOOL_LARGEST (32u << 20)
#define BUFPOOL_KEEP (32u << 20)

/* A 4096-aligned buffer of at least len bytes (len > 0). */
void *bufpool_get(size_t len);
/* Gives back a buffer bufpool_get(len) returned, with the same len. */
void bufpool_put(void *buf, size_t len);
/* Frees every pooled buffer. */
void bufpool_trim(void);
/* Bytes held in the pool now (for tests). */
uint64_t bufpool_pooled_bytes(void);

#endif
