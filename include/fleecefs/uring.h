/* uring: FUSE requests over io_uring (the kernel's fuse-io-uring), beside
 * the /dev/fuse loop.
 *
 * With `-o uring=on` (or `auto`) and the fuse module's enable_uring set, the
 * daemon offers FUSE_OVER_IO_URING in its INIT reply and registers one ring
 * queue per possible CPU; the kernel then hands each request to the queue of
 * the CPU that issued it and takes the reply in the same io_uring command
 * that fetches the next request. The /dev/fuse loop keeps running: it serves
 * INIT, FORGET and INTERRUPT, and everything if the rings never come up.
 *
 * What it owns:
 *   - per queue, a thread with its own io_uring (128-byte SQEs) that is the
 *     only submitter to it, and `depth` entries (a header block and a
 *     page-aligned payload buffer the kernel copies requests into);
 *   - the fast path: a guest READ or WRITE of an image that needs no hook
 *     (image_async_begin) is submitted as an io_uring read or write of the
 *     image's descriptor straight from or into the entry's payload, and
 *     answered from its completion: no thread handoff, no copy;
 *   - a pool of worker threads for everything else (libfuse's own request
 *     processing, fuse_session_process_buf), growing when all are busy;
 *   - libfuse's custom I/O for the session descriptor: reads pass through
 *     (noting INIT); writes carrying the reply to a ring request are put into
 *     that request's entry and committed by its queue's thread; all other
 *     writes go to /dev/fuse.
 * Locking: each entry belongs to one party at a time (kernel, its queue
 * thread, one worker); it passes worker -> queue thread through a lock-free
 * stack and an eventfd, queue thread -> worker through the pool's mutex.
 * Only queue threads touch their io_uring.
 * Errors: uring_install returns 0 or -errno with a message logged; once
 * mounted, a ring that cannot start is logged and the /dev/fuse loop serves.
 */
#ifndef FLEECEFS_URING_H
#define FLEECEFS_URING_H

#include <stdbool.h>

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

enum uring_mode { URING_OFF, URING_AUTO, URING_ON };

/* "on", "off" or "auto" into *mode; 0 or -EINVAL. */
int uring_parse_mode(const char *text, enum uring_mode *mode);
/* Can this build and this kernel use it? NULL if so, else why not. */
const char *uring_unavailable(void);
/* After fuse_session_mount, before the loop; `max_workers` bounds the
 * threads that serve what the fast path does not. */
int uring_install(struct fuse_session *se, enum uring_mode mode, unsigned max_workers);
/* When the /dev/fuse loop has ended (a signal, or the unmount): the rings
 * serve no request that arrives from now on, and the reads and writes they
 * have in flight are done when it returns. */
void uring_quiesce(void);
/* After the mount is gone: stops the queues and the workers. */
void uring_stop(void);
/* Requests the rings served so far, and of those the fast path. */
void uring_counts(unsigned long long *served, unsigned long long *fast);

#endif
