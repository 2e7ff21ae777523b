/* reader: see include/fleecefs/reader.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libnbd.h>

#include "fleecefs/compress.h"
#include "fleecefs/qcow2.h"
#include "fleecefs/reader.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

/* Bits of L1 and L2 entries the specification reserves (must be zero). */
#define L1_RESERVED (0x7f00000000000000ull | 0x1feull)
#define L2_RESERVED (0x3f00000000000000ull | 0x1feull)

struct layer {
	char *path;
	int fd;
	struct nbd_handle *nbd;     /* an NBD export (always raw): read through it */
	bool qcow2;
	dev_t dev;
	ino_t ino;
	uint64_t size;              /* virtual */
	uint64_t file_size;
	struct qcow2_header h;
	uint64_t cluster;
	uint64_t *l1;               /* host order */
	uint64_t l1_loaded;         /* entries the file holds (it may be cut short) */
	uint8_t *l2;                /* the L2 table of L1 entry l2_index */
	uint64_t l2_index;
	uint8_t *packed;            /* a compressed cluster as stored */
	uint8_t *unpacked;          /* ... and decompressed, for entry unpacked_entry */
	uint64_t unpacked_entry;
};

struct reader {
	unsigned nlayers;
	struct layer layers[READER_MAX_LAYERS];
};

uint64_t reader_size(const struct reader *r) { return r->layers[0].size; }
unsigned reader_layers(const struct reader *r) { return r->nlayers; }
const char *reader_layer_path(const struct reader *r, unsigned i) { return r->layers[i].path; }
const char *reader_layer_format(const struct reader *r, unsigned i) { return r->layers[i].qcow2 ? "qcow2" : "raw"; }
const char *reader_layer_compression(const struct reader *r, unsigned i)
{
	if (!r->layers[i].qcow2)
		return NULL;
	return r->layers[i].h.compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd" : "zlib";
}

/* ---- opening a chain ------------------------------------------------------ */

static int load_l1(struct layer *l, char *err, size_t errlen)
{
	size_t bytes = (size_t)l->h.l1_size * 8;
	uint8_t *raw = malloc(bytes ? bytes : 1);

	l->l1 = calloc(l->h.l1_size ? l->h.l1_size : 1, sizeof(*l->l1));
	if (!raw || !l->l1) {
		free(raw);
		return set_error(err, errlen, ENOMEM, "%s: out of memory for its L1 table", l->path);
	}
	ssize_t n = bytes ? pread_full(l->fd, raw, bytes, l->h.l1_offset) : 0;
	if (n < 0) {
		int e = errno;
		free(raw);
		return set_error(err, errlen, e, "%s: cannot read its L1 table: %s", l->path, error_text(e));
	}
	/* A file cut short keeps the entries it still has; the rest is
	 * damage that reads report. */
	l->l1_loaded = (uint64_t)n / 8;
	for (uint64_t i = 0; i < l->l1_loaded; i++)
		l->l1[i] = qcow2_be64(raw + i * 8);
	free(raw);
	return 0;
}

static int open_qcow2(struct layer *l, const uint8_t *first, size_t len, char *err, size_t errlen)
{
	char why[300];
	int rc = qcow2_header_decode(first, len, &l->h, why, sizeof(why));

	if (rc)
		return set_error(err, errlen, -rc, "%s: %s", l->path, why);
	if (l->h.compression_type == QCOW2_COMPRESSION_ZSTD && !compress_available())
		return set_error(err, errlen, EOPNOTSUPP,
				 "%s: zstd-compressed, and this fleecectl was built without libzstd", l->path);
	l->qcow2 = true;
	l->size = l->h.size;
	l->cluster = 1ull << l->h.cluster_bits;
	l->l2_index = UINT64_MAX;
	l->unpacked_entry = 0;
	if (!(l->l2 = malloc(l->cluster)) || !(l->packed = malloc(2 * l->cluster + 512)) ||
	    !(l->unpacked = malloc(l->cluster)))
		return set_error(err, errlen, ENOMEM, "%s: out of memory", l->path);
	return load_l1(l, err, errlen);
}

/* `name` as QEMU resolves a backing file name: relative to the directory
 * of the image that names it. */
static int backing_path(const struct layer *l, char *out, size_t len, char *err, size_t errlen)
{
	const char *name = l->h.backing_file;

	if (!strncmp(name, "json:", 5))
		return set_error(err, errlen, EOPNOTSUPP, "%s: backing file given as json: (%s)", l->path, name);
	if (!strncmp(name, "file:", 5))
		name += 5;
	if (name[0] == '/') {
		if (snprintf(out, len, "%s", name) >= (int)len)
			return set_error(err, errlen, ENAMETOOLONG, "%s: backing file name too long", l->path);
		return 0;
	}
	char dir[PATH_MAX];
	snprintf(dir, sizeof(dir), "%s", l->path);
	if (snprintf(out, len, "%s/%s", dirname(dir), name) >= (int)len)
		return set_error(err, errlen, ENAMETOOLONG, "%s: backing file name too long", l->path);
	return 0;
}

/* Opens one layer; `named_by` is the image whose backing file it is. */
static int open_layer(struct reader *r, const char *path, const char *format, const char *named_by, char *err,
		      size_t errlen)
{
	struct layer *l = &r->layers[r->nlayers];
	struct stat st;
	int rc;

	*l = (struct layer){ .fd = -1 };
	if (!(l->path = strdup(path)))
		return set_error(err, errlen, ENOMEM, "%s: out of memory", path);
	r->nlayers++;
	if (!named_by && target_is_nbd_uri(path)) {
		if (format && strcmp(format, "raw"))
			return set_error(err, errlen, EOPNOTSUPP, "%s: an NBD export is read as a raw disk, not %s", path,
					 format);
		if ((rc = target_nbd_connect_reader(path, &l->nbd, err, errlen)))
			return rc;
		int64_t size = nbd_get_size(l->nbd);
		l->size = l->file_size = size > 0 ? (uint64_t)size : 0;
		return 0;
	}
	if ((l->fd = open(path, O_RDONLY | O_CLOEXEC)) < 0 || fstat(l->fd, &st) < 0) {
		int e = errno;
		if (named_by)
			return set_error(err, errlen, e, "backing file %s (of %s): %s", path, named_by, error_text(e));
		return set_error(err, errlen, e, "%s: %s", path, error_text(e));
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
		return set_error(err, errlen, EINVAL, "%s: not a file", path);
	l->dev = st.st_dev;
	l->ino = st.st_ino;
	for (unsigned i = 0; i + 1 < r->nlayers; i++)
		if (r->layers[i].dev == l->dev && r->layers[i].ino == l->ino)
			return set_error(err, errlen, ELOOP, "%s: the backing chain comes back to it (through %s)", path,
					 named_by);
	l->file_size = S_ISREG(st.st_mode) ? (uint64_t)st.st_size : (uint64_t)lseek(l->fd, 0, SEEK_END);
	l->size = l->file_size;
	if (format && strcmp(format, "raw") && strcmp(format, "qcow2"))
		return set_error(err, errlen, EOPNOTSUPP, "%s: format %s (only raw and qcow2 are read)", path, format);

	/* The header, its extensions and the backing name: the first cluster. */
	const size_t first_len = 1u << QCOW2_MAX_CLUSTER_BITS;
	uint8_t *first = malloc(first_len);
	if (!first)
		return set_error(err, errlen, ENOMEM, "%s: out of memory", path);
	ssize_t n = pread_full(l->fd, first, first_len, 0);
	if (n < 0) {
		int e = errno;
		free(first);
		return set_error(err, errlen, e, "%s: %s", path, error_text(e));
	}
	bool magic = qcow2_has_magic(first, (size_t)n);
	if (format ? !strcmp(format, "qcow2") : magic)
		rc = open_qcow2(l, first, (size_t)n, err, errlen);
	else
		rc = 0;
	free(first);
	if (rc || !l->qcow2 || !l->h.backing_file[0])
		return rc;

	if (r->nlayers == READER_MAX_LAYERS)
		return set_error(err, errlen, ELOOP, "%s: a backing chain of more than %u files", r->layers[0].path,
				 READER_MAX_LAYERS);
	char next[PATH_MAX];
	if ((rc = backing_path(l, next, sizeof(next), err, errlen)))
		return rc;
	return open_layer(r, next, l->h.backing_format[0] ? l->h.backing_format : NULL, l->path, err, errlen);
}

int reader_open(const char *path, const char *format, struct reader **out, char *err, size_t errlen)
{
	struct reader *r = calloc(1, sizeof(*r));

	if (!r)
		return set_error(err, errlen, ENOMEM, "%s: out of memory", path);
	int rc = open_layer(r, path, format, NULL, err, errlen);
	if (rc) {
		reader_close(r);
		return rc;
	}
	*out = r;
	return 0;
}

void reader_close(struct reader *r)
{
	if (!r)
		return;
	for (unsigned i = 0; i < r->nlayers; i++) {
		struct layer *l = &r->layers[i];
		if (l->fd >= 0)
			close(l->fd);
		if (l->nbd) {
			nbd_shutdown(l->nbd, 0);
			nbd_close(l->nbd);
		}
		free(l->path);
		free(l->l1);
		free(l->l2);
		free(l->packed);
		free(l->unpacked);
	}
	free(r);
}

/* ---- reading -------------------------------------------------------------- */

__attribute__((format(printf, 2, 3))) static void damage(struct reader_origin *o, const char *fmt, ...)
{
	if (o->damaged)
		return;
	o->damaged = true;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(o->why, sizeof(o->why), fmt, ap);
	va_end(ap);
}

static void supplied(struct reader_origin *o, unsigned layer, uint64_t host)
{
	if (!o->layers) {
		o->first_layer = layer;
		o->first_host = host;
	}
	o->layers |= 1ull << layer;
}

enum lookup { UNALLOCATED, ZEROES, DATA, COMPRESSED, DAMAGED };

/* Where the qcow2 cluster holding virtual byte v is; *entry is its L2
 * entry (DATA: the host offset). */
static enum lookup lookup(struct layer *l, uint64_t v, uint64_t *entry, struct reader_origin *o)
{
	unsigned bits = l->h.cluster_bits;
	uint64_t vcluster = v >> bits, l1i = vcluster >> (bits - 3), l2i = vcluster & ((1ull << (bits - 3)) - 1);

	if (l1i >= l->h.l1_size)
		return UNALLOCATED;
	if (l1i >= l->l1_loaded) {
		damage(o, "%s: its L1 table is cut short (the file ends at %" PRIu64 ")", l->path, l->file_size);
		return DAMAGED;
	}
	uint64_t l1e = l->l1[l1i], l2_at = l1e & QCOW2_OFFSET_MASK;
	if (l1e & L1_RESERVED) {
		damage(o, "%s: L1 entry %" PRIu64 " has reserved bits set (%#" PRIx64 ")", l->path, l1i, l1e);
		return DAMAGED;
	}
	if (!l2_at)
		return UNALLOCATED;
	if (l2_at & (l->cluster - 1) || l2_at + l->cluster > l->file_size) {
		damage(o, "%s: L1 entry %" PRIu64 " points to %#" PRIx64 ", %s", l->path, l1i, l2_at,
		       l2_at & (l->cluster - 1) ? "not a cluster boundary" : "past the end of the file");
		return DAMAGED;
	}
	if (l->l2_index != l1i) {
		if (pread_full(l->fd, l->l2, l->cluster, l2_at) != (ssize_t)l->cluster) {
			damage(o, "%s: cannot read the L2 table at %#" PRIx64 ": %s", l->path, l2_at, error_text(errno));
			return DAMAGED;
		}
		l->l2_index = l1i;
	}
	uint64_t l2e = qcow2_be64(l->l2 + l2i * 8);
	*entry = l2e;
	if (l2e & QCOW2_OFLAG_COMPRESSED) {
		uint64_t at, len;
		qcow2_compressed_range(bits, l2e, &at, &len);
		if (at >= l->file_size || l2e & QCOW2_OFLAG_COPIED) {
			damage(o, "%s: the L2 entry of virtual offset %" PRIu64 " (%#" PRIx64 ") names %s", l->path,
			       v & ~(l->cluster - 1), l2e,
			       at >= l->file_size ? "data past the end of the file" : "a compressed cluster as copied");
			return DAMAGED;
		}
		return COMPRESSED;
	}
	if (l2e & L2_RESERVED) {
		damage(o, "%s: the L2 entry of virtual offset %" PRIu64 " has reserved bits set (%#" PRIx64 ")", l->path,
		       v & ~(l->cluster - 1), l2e);
		return DAMAGED;
	}
	if (l->h.version >= 3 && l2e & QCOW2_OFLAG_ZERO)
		return ZEROES;
	uint64_t host = l2e & QCOW2_OFFSET_MASK;
	if (!host)
		return UNALLOCATED;
	if (host & (l->cluster - 1) || host >= l->file_size) {
		damage(o, "%s: the L2 entry of virtual offset %" PRIu64 " points to %#" PRIx64 ", %s", l->path,
		       v & ~(l->cluster - 1), host, host & (l->cluster - 1) ? "not a cluster boundary" : "past the end of the file");
		return DAMAGED;
	}
	*entry = host;
	return DATA;
}

static bool unpack(struct layer *l, uint64_t entry, uint64_t v, struct reader_origin *o)
{
	uint64_t at, len;

	if (l->unpacked_entry == entry)
		return true;
	qcow2_compressed_range(l->h.cluster_bits, entry, &at, &len);
	len = min_u64(len, l->file_size - at);
	ssize_t n = pread_full(l->fd, l->packed, (size_t)len, at);
	int rc = n < 0 ? -errno : decompress_cluster((enum qcow2_compression)l->h.compression_type, l->packed,
						     (size_t)n, l->unpacked, l->cluster);
	if (rc) {
		l->unpacked_entry = 0;
		damage(o, "%s: the compressed cluster of virtual offset %" PRIu64 " (at %#" PRIx64 ") %s", l->path,
		       v & ~(l->cluster - 1), at, rc == -EBADMSG ? "does not decompress" : error_text(-rc));
		return false;
	}
	l->unpacked_entry = entry;
	return true;
}

static void read_layer(struct reader *r, unsigned i, uint64_t off, size_t len, uint8_t *buf,
		       struct reader_origin *o);

/* What layer i does not hold: the next layer's, or zeroes. */
static void read_below(struct reader *r, unsigned i, uint64_t off, size_t len, uint8_t *buf, struct reader_origin *o)
{
	if (i + 1 < r->nlayers)
		read_layer(r, i + 1, off, len, buf, o);
	else
		memset(buf, 0, len);
}

static void read_qcow2(struct reader *r, unsigned i, uint64_t off, size_t len, uint8_t *buf, struct reader_origin *o)
{
	struct layer *l = &r->layers[i];

	while (len) {
		uint64_t in = off & (l->cluster - 1), entry = 0;
		size_t n = (size_t)min_u64(len, l->cluster - in);
		switch (lookup(l, off, &entry, o)) {
		case UNALLOCATED:
			read_below(r, i, off, n, buf, o);
			break;
		case ZEROES:
		case DAMAGED:
			/* This layer decides these bytes, as data would. */
			memset(buf, 0, n);
			supplied(o, i, READER_ZERO_CLUSTER);
			break;
		case DATA: {
			ssize_t got = pread_full(l->fd, buf, n, entry + in);
			if (got != (ssize_t)n) {
				memset(buf + (got > 0 ? got : 0), 0, n - (size_t)(got > 0 ? got : 0));
				damage(o, "%s: the cluster of virtual offset %" PRIu64 " at %#" PRIx64 " is cut short (%s)",
				       l->path, off - in, entry, got < 0 ? error_text(errno) : "the file ends before it");
			}
			supplied(o, i, entry + in);
			break;
		}
		case COMPRESSED:
			if (unpack(l, entry, off, o))
				memcpy(buf, l->unpacked + in, n);
			else
				memset(buf, 0, n);
			supplied(o, i, entry & ((1ull << (62 - (l->h.cluster_bits - 8))) - 1));
			break;
		}
		off += n;
		buf += n;
		len -= n;
	}
}

static void read_layer(struct reader *r, unsigned i, uint64_t off, size_t len, uint8_t *buf,
		       struct reader_origin *o)
{
	struct layer *l = &r->layers[i];

	/* Past a backing file's end a disk reads as zeroes. */
	if (off >= l->size) {
		memset(buf, 0, len);
		return;
	}
	if (off + len > l->size) {
		size_t inside = (size_t)(l->size - off);
		memset(buf + inside, 0, len - inside);
		len = inside;
	}
	if (l->qcow2) {
		read_qcow2(r, i, off, len, buf, o);
		return;
	}
	if (l->nbd) {
		for (size_t done = 0; done < len;) {
			size_t piece = len - done < (32u << 20) ? len - done : (32u << 20);
			if (nbd_pread(l->nbd, buf + done, piece, off + done, 0) < 0) {
				memset(buf + done, 0, len - done);
				damage(o, "%s: cannot read %zu bytes at %" PRIu64 ": %s", l->path, len - done, off + done,
				       nbd_get_error() ? nbd_get_error() : "?");
				break;
			}
			done += piece;
		}
		supplied(o, i, off);
		return;
	}
	ssize_t got = pread_full(l->fd, buf, len, off);
	if (got != (ssize_t)len) {
		memset(buf + (got > 0 ? got : 0), 0, len - (size_t)(got > 0 ? got : 0));
		damage(o, "%s: cannot read %zu bytes at %" PRIu64 ": %s", l->path, len, off,
		       got < 0 ? error_text(errno) : "cut short");
	}
	supplied(o, i, off);
}

bool reader_read(struct reader *r, uint64_t off, size_t len, void *buf, struct reader_origin *origin)
{
	const struct layer *top = &r->layers[0];

	*origin = (struct reader_origin){ 0 };
	if (off + len > top->size) {
		damage(origin, "%s: ends at byte %" PRIu64 " (cut short)", top->path, top->size);
		if (off >= top->size) {
			memset(buf, 0, len);
			return false;
		}
	}
	read_layer(r, 0, off, len, buf, origin);
	return !origin->damaged;
}
