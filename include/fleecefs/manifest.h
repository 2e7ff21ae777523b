/* manifest: TARGET.xxh3, the per-cluster XXH3-64 checksums of a backup.
 *
 * Text, so that it can be read with standard tools:
 *     fleecefs-manifest 1
 *     algorithm=xxh3-64
 *     format=raw|qcow2         how to read the file (a raw copy of a qcow2
 *                              image is raw); absent: raw
 *     [state=partial]          a partial backup (bitmap-mode=always)
 *     size=<bytes of the image at the point in time>
 *     cluster_size=<bytes>
 *     clusters=<n>
 *     <16 hex digits>            one line per cluster, in order
 * Header lines are key=value up to the first line without '=' (readers skip
 * keys they do not know). The last cluster is hashed over its real length; a
 * zero cluster hashes its zero bytes like any other. A manifest always
 * describes what its file holds.
 *
 * Like its target, a manifest is written under a hidden temporary name
 * (created when the job is staged, so that a clash fails the command) and
 * published at the end; an in-place update starts from the checksums of the
 * manifest it replaces.
 * Clusters the job never hashed read as zeroes (sync=top skips holes without
 * reading them): their zero checksum, computed once, is written for them.
 *
 * The checksums of a job are not held in memory (at 64 KiB clusters a
 * 1 TiB image has 16 million): they live in an unnamed file beside the
 * manifest (O_TMPFILE, gone with the descriptor even after a crash), in the
 * page cache, not in the daemon; an update keeps the old checksums there too.
 *
 * Locking: a cluster's slot is written by whoever holds the claim of that
 * cluster (inflight.h), so no two threads write one slot (pwrite, no lock);
 * `hashed` is atomic.
 * Errors: 0 or -errno; functions with `err` also fill a one-line message.
 */
#ifndef FLEECEFS_MANIFEST_H
#define FLEECEFS_MANIFEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fleecefs/cbitmap.h"

struct manifest {
	char *temp_path;            /* where it is written */
	int fd;
	uint64_t size;
	uint32_t cluster_size;
	uint64_t nclusters;
	int sums_fd;                /* the table: slot c at 8c; an update's old
				       checksums at 8 (nclusters + c) */
	struct cbitmap hashed;      /* slot c holds the cluster's checksum */
	bool update;                /* in place: starts from the old checksums */
	bool partial;
	const char *format;         /* a static name; NULL: raw */
};

/* Where the manifest of the backup file `target` is: TARGET.xxh3 (buf). */
const char *manifest_path(const char *target, char *buf, size_t len);
/* Where manifests of NBD targets live: STATE_DIR/nbd/HASH.xxh3 (HASH the
 * XXH3-64 of the URI), since an export has no directory beside it. Once
 * at start by the daemon, which creates the directory; fleecectl learns it
 * from the mount's .fleece/version (nbd_manifests=) and uses it as is. */
int manifest_set_state_dir(const char *state_dir);
int manifest_use_nbd_dir(const char *dir);
const char *manifest_nbd_dir(void);   /* NULL: not set */
/* A new manifest, created empty under temp_path (O_EXCL); sized at T. */
int manifest_create(const char *temp_path, uint32_t cluster_size, struct manifest **out, char *err, size_t errlen);
/* An in-place update of the manifest at `existing` (which must describe a
 * file of clusters of cluster_size), written under temp_path. */
int manifest_open_update(const char *existing, const char *temp_path, uint32_t cluster_size, struct manifest **out,
			 char *err, size_t errlen);
/* At the point in time: `size` bytes (an update must keep its size). */
int manifest_set_size(struct manifest *m, uint64_t size, char *err, size_t errlen);
/* The checksums of `count` clusters from `first`, whose data (the last
 * cluster of the image may be short) is `len` bytes at `data`. One write to
 * the table. 0 or -errno. */
int manifest_set_run(struct manifest *m, uint64_t first, uint64_t count, const void *data, uint64_t len);
/* Clusters that read as zeroes at T (a hole): no hashing needed. */
void manifest_set_zeroes(struct manifest *m, uint64_t first, uint64_t count);
/* The clusters set in `left` did not get their new content: they keep
 * their old checksums (update) or read as zeroes again (new file). */
int manifest_forget(struct manifest *m, const struct cbitmap *left);
void manifest_set_partial(struct manifest *m, bool partial);
/* How TARGET is read to get the content summed ("raw", "qcow2"; static). */
void manifest_set_format(struct manifest *m, const char *format);
/* Writes the temporary file and makes it durable. */
int manifest_write(struct manifest *m);
/* Renames it to `name` (replacing an older manifest only when `replace`). */
int manifest_publish(struct manifest *m, const char *name, bool replace);
/* Removes the temporary file (the job did not keep its result). */
void manifest_discard(struct manifest *m);
void manifest_free(struct manifest *m);

/* A manifest as read back (fleecectl verify, an in-place update). */
struct manifest_file {
	uint64_t size;
	uint32_t cluster_size;
	uint64_t nclusters;
	uint64_t *hashes;
	bool partial;
	char format[16];            /* "raw" when the manifest does not say */
};
/* Reads and checks a whole manifest: -errno of the open (ENOENT: there is
 * none), EINVAL when it is not one (the message names the line). */
int manifest_load(const char *path, struct manifest_file *out, char *err, size_t errlen);
void manifest_file_free(struct manifest_file *f);

#endif
