/* cpool: compressing clusters with zstd on a pool of threads.
 *
 * A compressed qcow2 target hands each run of clusters it writes to its
 * pool: the run's clusters are compressed each on its own (as the qcow2
 * specification wants), in parallel by the pool's threads and the caller,
 * who waits for the run. One run is in the pool at a time; a caller that
 * finds it busy compresses its run alone, so nobody waits for another's run.
 * Only writers that no guest waits for come here (target.h,
 * TARGET_WRITE_GUEST_WAITS).
 *
 * A cluster is kept compressed only when that saves at least one 512-byte
 * sector (what a compressed qcow2 cluster is counted in); otherwise its
 * length is 0 and it is stored as it is.
 *
 * Locking: `lock` guards the run (who takes which cluster, how many are
 * done); compressing happens outside it, each thread with its own zstd
 * context. Errors: 0 or -errno.
 */
#ifndef FLEECEFS_CPOOL_H
#define FLEECEFS_CPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cpool;

/* Starts `threads` threads (0: none, the callers compress alone) that
 * compress clusters of `cluster_size` bytes at zstd `level` (0: zstd's
 * default). */
int cpool_start(unsigned threads, int level, size_t cluster_size, struct cpool **out);
/* Room for one compressed cluster in `out` of cpool_compress. */
size_t cpool_slot(const struct cpool *p);
/* Compresses the clusters of buf[0, len) (the last may be short: it is
 * compressed as a whole cluster ending in zeroes) into out, cluster i at
 * out + i * cpool_slot; lens[i] is its compressed length, 0 when it is to be
 * stored uncompressed. */
int cpool_compress(struct cpool *p, const void *buf, size_t len, void *out, size_t *lens);
void cpool_stop(struct cpool *p);

/* Is zstd built in? (compress=zstd needs it.) */
bool cpool_available(void);
/* The number of threads a pool gets by default: one per core, less the
 * caller, which compresses too. */
unsigned cpool_default_threads(void);

#endif
