/* compress: the compressed clusters of qcow2 files, both ways.
 *
 * Each cluster is compressed on its own, as the qcow2 specification wants
 * for zstd, and kept compressed only when that saves at least one 512-byte
 * sector (what a compressed qcow2 cluster is counted in); otherwise its
 * length is 0 and it is stored as it is.
 *
 * Who compresses: the threads that write a compressed target. Such a target
 * asks for one writer per core (target.h, `writers`), so the copy engine's
 * write-behind threads are the compression pool, each with its own run of
 * clusters and nobody waiting for another's; a copy a guest write waits for
 * is never compressed (TARGET_WRITE_GUEST_WAITS). A thread that compresses
 * lowers its own priority (nice COMPRESS_NICE) the first time: when guests
 * and compression want the same cores, the guests' requests win.
 *
 * Reading (fleecectl verify) also takes the zlib clusters that qemu-img
 * writes by default.
 *
 * Locking: none; each thread has its own contexts (freed when the thread
 * ends). Errors: 0 or -errno.
 */
#ifndef FLEECEFS_COMPRESS_H
#define FLEECEFS_COMPRESS_H

#include <stdbool.h>
#include <stddef.h>

#include "fleecefs/qcow2.h"

#define COMPRESS_NICE 10

/* Is zstd built in? (compress=zstd needs it.) */
bool compress_available(void);
/* How many threads should compress at once: one per core. */
unsigned compress_threads(void);
/* Room for one compressed cluster: anything longer would not save a sector. */
static inline size_t compress_slot(size_t cluster) { return cluster - 512; }
/* Compresses the clusters of buf[0, len) (the last may be short: it is
 * compressed as a whole cluster ending in zeroes) at zstd `level` (0:
 * zstd's default) into out, cluster i at out + i * compress_slot(cluster);
 * lens[i] is its compressed length, 0 when it is to be stored uncompressed.
 * -EOPNOTSUPP without zstd, -ENOMEM. */
int compress_clusters(int level, size_t cluster, const void *buf, size_t len, void *out, size_t *lens);

/* Decompresses one cluster of `type` from in[0, inlen) (the range its
 * descriptor names) into out[0, outlen), which it must fill. -EBADMSG when
 * the data does not decompress to a whole cluster, -EOPNOTSUPP for zstd in
 * a build without it, -ENOMEM. */
int decompress_cluster(enum qcow2_compression type, const void *in, size_t inlen, void *out, size_t outlen);

#endif
