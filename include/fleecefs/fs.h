/* fs: the FUSE low-level operations of the mount.
 *
 * Owns the inode table (one node per source inode the kernel knows, holding
 * an O_PATH descriptor, keyed by (st_dev, st_ino)), open file and directory
 * handles, and the translation of every FUSE request into calls on the source
 * tree. Control nodes (.fleece/) are handed to ctlfs; writes to regular files
 * go through image_write_begin/end so that jobs see them.
 *
 * Every regular file is opened with FOPEN_DIRECT_IO (the daemon sees every
 * guest request; no kernel page cache between guest and image) and, where the
 * build allows, FOPEN_PARALLEL_DIRECT_WRITES (the kernel does not serialize a
 * guest's writes to one image; ordering between overlapping writes is the
 * guest's, as on a block device).
 * Locking: table_lock guards the inode table and lookup counts; handles are
 * used by one request at a time per the kernel's rules for the fields we
 * change, and their descriptors are thread-safe.
 * Errors: replies carry the source's errno; EBUSY for operations that would
 * remove, replace or resize an image with an active job.
 */
#ifndef FLEECEFS_FS_H
#define FLEECEFS_FS_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include "fleecefs/daemon.h"

struct image;

extern const struct fuse_lowlevel_ops fs_operations;

/* The root node; call before the session starts. 0 or -errno. */
int fs_setup(const struct fleece_daemon *d);
/* The image a READ or WRITE request on (nodeid, fh) is for, and the kind of
 * its handle; NULL for control files and other files (the io_uring fast
 * path, uring.h). */
struct image *fs_request_image(uint64_t nodeid, uint64_t fh, unsigned *kind);
/* Frees the inode table after the session ended. */
void fs_teardown(void);

#endif
