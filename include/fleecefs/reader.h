/* reader: reads a backup file the way QEMU reads it, without the daemon.
 *
 * A backup is a raw file, or a qcow2 image (version 2 or 3, as fleecefs or
 * qemu-img wrote it) over its backing chain: backing names are relative to
 * the directory of the image that names them, the backing format comes from
 * the header extension or else from the magic, and clusters may be zero
 * clusters, unallocated (read from the backing file, or zeroes past its end
 * or without one) or compressed with zlib or zstd. The chain is a list of
 * layers, the top (the file opened) first. The top may also be an NBD
 * export (a URI, target.h): a raw disk read through libnbd.
 *
 * A reader never stops at damage. A piece it cannot read (an L1 or L2
 * entry that points past the end of the file or is not aligned, reserved
 * bits set in an entry, a cluster cut short, a compressed cluster that does
 * not decompress, an I/O error, a read past the end of the top file) reads
 * as zeroes and is reported in the read's reader_origin, so that a verifier
 * can name every bad cluster and go on.
 *
 * Locking: none; a reader is used by one thread at a time (each layer
 * caches one L2 table and one decompressed cluster).
 * Errors: reader_open returns 0 or -errno with a message naming the file:
 * ENOENT (or another open error) for a file or chain element that cannot be
 * opened, EOPNOTSUPP for an image this reader cannot follow (a format other
 * than raw and qcow2, encryption, an external data file, zstd in a build
 * without it), ELOOP for a chain longer than READER_MAX_LAYERS or that
 * loops, EINVAL for a file that is not the image it claims to be.
 */
#ifndef FLEECEFS_READER_H
#define FLEECEFS_READER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define READER_MAX_LAYERS 64u

struct reader;

/* Where the bytes of one read came from. */
#define READER_ZERO_CLUSTER UINT64_MAX
struct reader_origin {
	uint64_t layers;          /* bit i: layer i decided some of the bytes
	                           * (data, a zero cluster, or damage) */
	unsigned first_layer;     /* the first piece's layer, and the host byte */
	uint64_t first_host;      /* of its data (compressed: of the stream;
	                           * READER_ZERO_CLUSTER: none) */
	bool damaged;             /* some piece could not be read: see why */
	char why[256];            /* the first such piece, naming its file */
};

/* Opens `path` as `format` ("raw", "qcow2"; NULL: by its magic) with its
 * backing chain. */
int reader_open(const char *path, const char *format, struct reader **out, char *err, size_t errlen);
void reader_close(struct reader *r);

/* The virtual size of the top layer (a raw file: its length). */
uint64_t reader_size(const struct reader *r);
unsigned reader_layers(const struct reader *r);
/* Layer i's file name (as reached: the top as given, backing files as
 * resolved) and format ("raw", "qcow2"). */
const char *reader_layer_path(const struct reader *r, unsigned i);
const char *reader_layer_format(const struct reader *r, unsigned i);
/* The compression type qcow2 layer i declares ("zlib", "zstd"), NULL for
 * a raw layer. */
const char *reader_layer_compression(const struct reader *r, unsigned i);

/* Reads buf[0, len) from virtual offset off as QEMU would; bytes past the
 * top layer's size are damage (a backup cut short). Returns true when every
 * piece was read, false when some is damaged (origin->why says which). */
bool reader_read(struct reader *r, uint64_t off, size_t len, void *buf, struct reader_origin *origin);

#endif
