/* qcow2: the on-disk format, as docs/interop/qcow2.txt of QEMU publishes it.
 *
 * What a writer and a reader of version 3 images both need: the header (with
 * its extensions and the backing file name, all in the first cluster), the
 * two-level cluster map (L1 -> L2 -> host cluster), the cluster descriptors
 * (standard, zero, compressed) and where the refcount structures of a file
 * go. Everything is big endian on disk; these functions convert.
 *
 * This module holds no state and does no I/O: target-qcow2.c writes images,
 * the reader (qcow2-read.c) reads them.
 * Errors: 0 or -errno; functions with `err` also fill a one-line message.
 */
#ifndef FLEECEFS_QCOW2_H
#define FLEECEFS_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QCOW2_MAGIC 0x514649fbu
#define QCOW2_HEADER_LENGTH 112u      /* v3 fields and compression_type, padded */
#define QCOW2_MIN_CLUSTER_BITS 12u    /* what we write: 4K .. 2M */
#define QCOW2_MAX_CLUSTER_BITS 21u
#define QCOW2_REFCOUNT_ORDER 4u       /* 16-bit refcounts, QEMU's default */
#define QCOW2_MAX_L1_BYTES (32u << 20) /* QEMU refuses larger L1 tables */
#define QCOW2_MAX_BACKING_NAME 1023u

#define QCOW2_OFLAG_COPIED (1ull << 63)     /* refcount exactly one */
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO 1ull               /* standard descriptor: reads as zeroes */
#define QCOW2_OFFSET_MASK 0x00fffffffffffe00ull

#define QCOW2_INCOMPAT_DIRTY (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ull << 4)

#define QCOW2_EXT_END 0u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau

enum qcow2_compression { QCOW2_COMPRESSION_ZLIB = 0, QCOW2_COMPRESSION_ZSTD = 1 };

struct qcow2_header {
	uint32_t version;
	uint32_t cluster_bits;
	uint64_t size;                   /* virtual size */
	uint32_t crypt_method;
	uint32_t l1_size;                /* entries */
	uint64_t l1_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompatible, compatible, autoclear;
	uint32_t refcount_order;
	uint32_t header_length;
	uint8_t compression_type;        /* enum qcow2_compression */
	char backing_file[QCOW2_MAX_BACKING_NAME + 1];   /* "": none */
	char backing_format[32];         /* "": not recorded */
};

/* Writes h (version 3), its backing format extension and backing file name
 * into `cluster` (len = the cluster size, zeroed first). -ENAMETOOLONG when
 * the name does not fit. */
int qcow2_header_encode(const struct qcow2_header *h, void *cluster, size_t len);
/* Reads a header from the first `len` bytes of a file and checks that this
 * reader can follow it (version 2 or 3, no encryption, no external data
 * file, no extended L2 entries, sane sizes): EINVAL when it is not a
 * sane qcow2 header, EOPNOTSUPP for one this reader cannot follow; with a
 * message. */
int qcow2_header_decode(const void *buf, size_t len, struct qcow2_header *h, char *err, size_t errlen);
/* Does this buffer start with the qcow2 magic? */
bool qcow2_has_magic(const void *buf, size_t len);

static inline uint64_t qcow2_l2_entries(unsigned cluster_bits) { return 1ull << (cluster_bits - 3); }
/* L1 entries needed for a virtual size. */
uint64_t qcow2_l1_entries(uint64_t size, unsigned cluster_bits);

/* A compressed cluster descriptor for data at host byte `off`, `len` bytes
 * long, and back: the range of bytes a reader must read (the sectors the
 * descriptor names; decompression stops once a cluster is produced). */
uint64_t qcow2_compressed_entry(unsigned cluster_bits, uint64_t off, uint64_t len);
void qcow2_compressed_range(unsigned cluster_bits, uint64_t entry, uint64_t *off, uint64_t *len);

/* Where the refcount structures of a file go when its first `used` host
 * clusters are taken: the blocks, then the table, sized so that the blocks
 * also count themselves and the table. */
struct qcow2_refcount_layout {
	uint64_t blocks_offset;
	uint64_t nblocks;
	uint64_t table_offset;
	uint32_t table_clusters;
	uint64_t end_cluster;   /* the first host cluster after them */
};
void qcow2_refcount_layout(unsigned cluster_bits, uint64_t used, struct qcow2_refcount_layout *out);

/* Big-endian loads and stores. */
static inline uint64_t qcow2_be64(const void *p)
{
	const uint8_t *b = p;
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | b[i];
	return v;
}
static inline uint32_t qcow2_be32(const void *p)
{
	const uint8_t *b = p;
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}
static inline uint16_t qcow2_be16(const void *p)
{
	const uint8_t *b = p;
	return (uint16_t)(b[0] << 8 | b[1]);
}
static inline void qcow2_put_be64(void *p, uint64_t v)
{
	uint8_t *b = p;
	for (int i = 7; i >= 0; i--, v >>= 8)
		b[i] = (uint8_t)v;
}
static inline void qcow2_put_be32(void *p, uint32_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 24);
	b[1] = (uint8_t)(v >> 16);
	b[2] = (uint8_t)(v >> 8);
	b[3] = (uint8_t)v;
}
static inline void qcow2_put_be16(void *p, uint16_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 8);
	b[1] = (uint8_t)v;
}

#endif
