/* blockcopy: copies clusters of an image, as they were at a point in time T,
 * into a target. Shared by the background copy and by copy-before-write.
 *
 * State: `pending` (set = the cluster's content at T is not in the target yet)
 * and the in-flight claims (inflight.h). At T every cluster the job must copy
 * is pending; nothing else is, ever again, set.
 *
 * The proof that the target equals the image at T:
 *  1. A cluster's content changes after T only through a guest write, and
 *     every guest write calls blockcopy_before_write for its range first,
 *     inside the image's write gate (image.h), so writes in flight at T were
 *     drained before T and writes after T all pass here.
 *  2. blockcopy_before_write returns only when no cluster of the range is
 *     pending. A pending cluster is either unclaimed, and then this thread
 *     claims it, or claimed, and then this thread waits for that claim's
 *     release and looks again. It holds no claim while it waits.
 *  3. A claimer reads the source only after claiming and clears pending only
 *     after its target write succeeded (release store). While a cluster is
 *     claimed every writer to it waits in step 2, so the claimer reads the
 *     content of T. A failed copy leaves the cluster pending and unclaimed:
 *     whoever comes next copies it again.
 *  4. So for every cluster: either it is still pending, and no write touched
 *     it since T (the source still holds T's data), or it is clear and the
 *     target holds T's data. When no cluster is pending the target is exact.
 * After a cluster is copied, a guest write to it costs one atomic load.
 *
 * Zero clusters are never written to a fresh target (it is sparse); holes of
 * the source are found with SEEK_DATA and not even read.
 * Locking: see inflight.h. Counters are atomics. Errors: 0 or -errno.
 */
#ifndef FLEECEFS_BLOCKCOPY_H
#define FLEECEFS_BLOCKCOPY_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/inflight.h"

struct image;
struct target;
struct manifest;

/* The most a copy-before-write claims at once: one 1 MiB guest write, or one
 * cluster if clusters are larger. */
#define BLOCKCOPY_CBW_MAX (1u << 20)

struct blockcopy {
	struct image *image;
	struct target *target;
	struct manifest *manifest;   /* NULL: no checksums */
	uint64_t size;               /* bytes of the image at T */
	uint32_t cluster_size;
	unsigned cluster_bits;
	uint64_t nclusters;
	struct cbitmap pending;
	struct inflight inflight;
	atomic_uint_fast64_t bytes_done;   /* pending bytes resolved, by anyone */
	atomic_uint_fast64_t cbw_bytes;    /* of which by copy-before-write */
	atomic_uint_fast64_t bytes_written; /* bytes that reached the target */
};

int blockcopy_init(struct blockcopy *bc, struct image *image, struct target *target,
		   struct manifest *manifest, uint64_t size, uint32_t cluster_size);
void blockcopy_destroy(struct blockcopy *bc);

/* Cheap test for the write path: may [off, off + len) need a copy? */
static inline bool blockcopy_needs_copy(const struct blockcopy *bc, uint64_t off, uint64_t len)
{
	if (off >= bc->size || len == 0)
		return false;
	uint64_t end = off + len < bc->size ? off + len : bc->size;
	uint64_t first = off >> bc->cluster_bits, last = (end - 1) >> bc->cluster_bits;
	return cbitmap_any_set(&bc->pending, first, last - first + 1);
}

/* Returns once the content at T of every cluster overlapping [off, off + len)
 * is in the target: 0, the copy's -errno, or -ETIMEDOUT when waiting for
 * another copier outlasted deadline_ns (monotonic, 0 = no limit). */
int blockcopy_before_write(struct blockcopy *bc, uint64_t off, uint64_t len, uint64_t deadline_ns);

/* Background copy: copies the next unclaimed pending run at or after *cursor
 * (at most max_bytes, whole clusters). Returns the bytes resolved (> 0), 0 when
 * no unclaimed pending cluster is left from *cursor on, or -errno (the run
 * stays pending). *cursor moves past the run; *read_bytes grows by what was
 * read from the source (holes are not read). */
int64_t blockcopy_copy_next(struct blockcopy *bc, uint64_t *cursor, uint64_t max_bytes, uint64_t *read_bytes);

/* Clusters still pending (each at most cluster_size bytes). */
static inline uint64_t blockcopy_pending_clusters(const struct blockcopy *bc)
{
	return cbitmap_count(&bc->pending);
}

#endif
