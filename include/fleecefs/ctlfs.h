/* ctlfs: the .fleece/ control tree of the mount.
 *
 *   .fleece/            0700, owned by the user who mounted
 *     ctl               write: one transaction (at most ctlfs_write_limit()
 *                       bytes), or part of one from begin to commit on this
 *                       open file (control.h); read: its answer
 *     version           key=value lines
 *     events            blocking, pollable stream of event lines
 *     jobs/ID/status    one job's status, taken when the file is opened
 *     snapshots/NAME/IMAGE   read-only views of a snapshot (snapshot.h)
 *     inject            error injection rules (inject.h): write rules, read them
 *     bitmaps/IMAGE/NAME    one dirty bitmap's status (bitmap.h)
 *     redirects         images a mirror switched: image= target= state=
 *                       (redirect.h), a line each
 *
 * Inode numbers of control nodes carry CTLFS_INO_FLAG, which no pointer-based
 * inode number of the passthrough layer (fs.c) can have; job nodes encode the
 * job's serial number, so a dismissed job's nodes simply stop resolving.
 * Every control node is direct-I/O and never cached by the kernel.
 *
 * Locking: each open file has its own state under its lock; the writes of
 * one open file are serialized by its write lock, held while the write runs
 * (taken before the control mutex of transaction.h). Events readers are kept
 * in a list under readers_lock. The event listener (events.h) runs in the
 * thread that emitted the event, which may hold the job registry lock and a
 * job's lock (events are emitted under them, so each job's events keep their
 * order); it takes readers_lock, then a reader's lock, reads the ring (the
 * events lock) and answers parked reads there: replying to FUSE writes to
 * /dev/fuse, which does not block. Order: job registry lock -> job lock ->
 * readers_lock -> open file's lock -> events lock. Nothing here takes a job
 * lock while holding readers_lock or a file's lock. Requests are answered
 * from any thread.
 * Errors: FUSE replies with errno; never crashes on any input.
 */
#ifndef FLEECEFS_CTLFS_H
#define FLEECEFS_CTLFS_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stddef.h>

#include "fleecefs/daemon.h"

#define CTLFS_INO_FLAG (1ull << 63)

static inline bool ctlfs_owns(fuse_ino_t ino) { return (ino & CTLFS_INO_FLAG) != 0; }

void ctlfs_init(const struct fleece_daemon *d);
/* The most bytes one write request from the kernel can carry (negotiated at
 * FUSE init). A write to ctl or inject that may be only the first piece of a
 * larger write(2) is refused whole with EMSGSIZE: anything over this less one
 * page, since the first piece from an unaligned buffer is up to a page short. */
void ctlfs_set_max_write(size_t max_request);
/* The largest write ctl and inject accept. */
size_t ctlfs_write_limit(void);
/* Answers parked event reads (unmount). */
void ctlfs_shutdown(void);
/* Frees the control files still open when the session ended. */
void ctlfs_teardown(void);

/* Lookup of ".fleece" in the root. */
void ctlfs_lookup_root(fuse_req_t req);
void ctlfs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name);
void ctlfs_getattr(fuse_req_t req, fuse_ino_t ino);
void ctlfs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set);
void ctlfs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void ctlfs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void ctlfs_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, struct fuse_file_info *fi);
void ctlfs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void ctlfs_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void ctlfs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void ctlfs_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
void ctlfs_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct fuse_pollhandle *ph);
void ctlfs_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi);

#endif
