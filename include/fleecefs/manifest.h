/* manifest: TARGET.xxh3, the per-cluster XXH3-64 checksums of a backup.
 *
 * Text, so that it can be read with standard tools:
 *     fleecefs-manifest 1
 *     algorithm=xxh3-64
 *     size=<bytes of the image at the point in time>
 *     cluster_size=<bytes>
 *     clusters=<n>
 *     <16 hex digits>            one line per cluster, in order
 * The last cluster is hashed over its real length; a zero cluster hashes its
 * zero bytes like any other.
 *
 * The file is created (O_EXCL) when the job is prepared so that a name clash
 * fails the command, filled and made durable when the job completes, and
 * removed when it does not.
 * Locking: hashes[] is written by whoever holds the claim of that cluster
 * (inflight.h), so no two threads write one slot. Errors: 0 or -errno.
 */
#ifndef FLEECEFS_MANIFEST_H
#define FLEECEFS_MANIFEST_H

#include <stddef.h>
#include <stdint.h>

struct cbitmap;

struct manifest {
	char *path;
	int fd;
	uint64_t size;
	uint32_t cluster_size;
	uint64_t nclusters;
	uint64_t *hashes;
	/* In-place update: the new file is written beside the old one and
	 * renamed over it on finish; old[] are the checksums it had. */
	char *tmp_path;
	uint64_t *old;
};

int manifest_create(const char *target_path, uint64_t size, uint32_t cluster_size,
		    struct manifest **out, char *err, size_t errlen);
/* For an in-place update: reads TARGET.xxh3 (which must describe `size`
 * bytes in clusters of cluster_size); on finish it is replaced atomically by
 * the old checksums of every cluster not set since and the new ones of those
 * set. The old file stays until then (a crash keeps the chain usable). */
int manifest_update(const char *target_path, uint64_t size, uint32_t cluster_size, struct manifest **out, char *err,
		    size_t errlen);
void manifest_set(struct manifest *m, uint64_t cluster, const void *data, size_t len);
/* In-place update that did not complete: the clusters set in `left` (not
 * durably written) keep their old checksums. */
void manifest_keep_old(struct manifest *m, const struct cbitmap *left);
int manifest_finish(struct manifest *m);
void manifest_abort(struct manifest *m);
void manifest_free(struct manifest *m);

#endif
