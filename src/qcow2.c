/* qcow2: see include/fleecefs/qcow2.h */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "fleecefs/qcow2.h"
#include "fleecefs/util.h"

bool qcow2_has_magic(const void *buf, size_t len)
{
	return len >= 4 && qcow2_be32(buf) == QCOW2_MAGIC;
}

uint64_t qcow2_l1_entries(uint64_t size, unsigned cluster_bits)
{
	return div_round_up(size, qcow2_l2_entries(cluster_bits) << cluster_bits);
}

static size_t pad8(size_t n) { return (n + 7) & ~(size_t)7; }

int qcow2_header_encode(const struct qcow2_header *h, void *cluster, size_t len)
{
	uint8_t *b = cluster;
	size_t fmt_len = strlen(h->backing_format), name_len = strlen(h->backing_file);
	size_t pos = QCOW2_HEADER_LENGTH;

	if (name_len > QCOW2_MAX_BACKING_NAME ||
	    pos + (fmt_len ? 8 + pad8(fmt_len) : 0) + 8 + name_len > len)
		return -ENAMETOOLONG;
	memset(b, 0, len);
	qcow2_put_be32(b + 0, QCOW2_MAGIC);
	qcow2_put_be32(b + 4, 3);
	qcow2_put_be32(b + 20, h->cluster_bits);
	qcow2_put_be64(b + 24, h->size);
	qcow2_put_be32(b + 32, 0);
	qcow2_put_be32(b + 36, h->l1_size);
	qcow2_put_be64(b + 40, h->l1_offset);
	qcow2_put_be64(b + 48, h->refcount_table_offset);
	qcow2_put_be32(b + 56, h->refcount_table_clusters);
	qcow2_put_be32(b + 60, 0);
	qcow2_put_be64(b + 64, 0);
	qcow2_put_be64(b + 72, h->incompatible);
	qcow2_put_be64(b + 80, h->compatible);
	qcow2_put_be64(b + 88, h->autoclear);
	qcow2_put_be32(b + 96, QCOW2_REFCOUNT_ORDER);
	qcow2_put_be32(b + 100, QCOW2_HEADER_LENGTH);
	b[104] = h->compression_type;
	if (fmt_len) {
		qcow2_put_be32(b + pos, QCOW2_EXT_BACKING_FORMAT);
		qcow2_put_be32(b + pos + 4, (uint32_t)fmt_len);
		memcpy(b + pos + 8, h->backing_format, fmt_len);
		pos += 8 + pad8(fmt_len);
	}
	pos += 8;   /* the end-of-extensions marker: type 0, length 0 */
	if (name_len) {
		qcow2_put_be64(b + 8, pos);
		qcow2_put_be32(b + 16, (uint32_t)name_len);
		memcpy(b + pos, h->backing_file, name_len);
	}
	return 0;
}

/* The extensions this reader uses; the others are skipped. */
static int decode_extensions(const uint8_t *b, size_t len, struct qcow2_header *h, char *err, size_t errlen)
{
	size_t pos = h->header_length;

	while (pos + 8 <= len) {
		uint32_t type = qcow2_be32(b + pos), elen = qcow2_be32(b + pos + 4);
		if (type == QCOW2_EXT_END)
			return 0;
		if (elen > len - pos - 8)
			return set_error(err, errlen, EINVAL, "header extension 0x%08x runs past the first cluster", type);
		if (type == QCOW2_EXT_BACKING_FORMAT) {
			if (elen >= sizeof(h->backing_format))
				return set_error(err, errlen, EINVAL, "backing format name of %u bytes", elen);
			memcpy(h->backing_format, b + pos + 8, elen);
			h->backing_format[elen] = '\0';
		}
		pos += 8 + pad8(elen);
	}
	return 0;
}

int qcow2_header_decode(const void *buf, size_t len, struct qcow2_header *h, char *err, size_t errlen)
{
	const uint8_t *b = buf;

	memset(h, 0, sizeof(*h));
	if (len < 72 || !qcow2_has_magic(b, len))
		return set_error(err, errlen, EINVAL, "not a qcow2 image (no QFI\\xfb magic)");
	h->version = qcow2_be32(b + 4);
	if (h->version != 2 && h->version != 3)
		return set_error(err, errlen, EOPNOTSUPP, "qcow2 version %u (only 2 and 3 are known)", h->version);
	uint64_t backing_offset = qcow2_be64(b + 8);
	uint32_t backing_len = qcow2_be32(b + 16);
	h->cluster_bits = qcow2_be32(b + 20);
	h->size = qcow2_be64(b + 24);
	h->crypt_method = qcow2_be32(b + 32);
	h->l1_size = qcow2_be32(b + 36);
	h->l1_offset = qcow2_be64(b + 40);
	h->refcount_table_offset = qcow2_be64(b + 48);
	h->refcount_table_clusters = qcow2_be32(b + 56);
	h->nb_snapshots = qcow2_be32(b + 60);
	h->snapshots_offset = qcow2_be64(b + 64);
	h->refcount_order = 4;
	h->header_length = 72;
	if (h->version == 3) {
		if (len < 104)
			return set_error(err, errlen, EINVAL, "qcow2 v3 header cut short");
		h->incompatible = qcow2_be64(b + 72);
		h->compatible = qcow2_be64(b + 80);
		h->autoclear = qcow2_be64(b + 88);
		h->refcount_order = qcow2_be32(b + 96);
		h->header_length = qcow2_be32(b + 100);
		if (h->header_length < 104 || h->header_length % 8 || h->header_length > len)
			return set_error(err, errlen, EINVAL, "qcow2 header length %u", h->header_length);
		if (h->header_length > 104)
			h->compression_type = b[104];
	}
	if (h->cluster_bits < 9 || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return set_error(err, errlen, EINVAL, "qcow2 cluster_bits %u (9 to 21 are valid)", h->cluster_bits);
	if (h->crypt_method)
		return set_error(err, errlen, EOPNOTSUPP, "an encrypted qcow2 image (crypt_method %u)", h->crypt_method);
	uint64_t known = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_COMPRESSION;
	if (h->incompatible & QCOW2_INCOMPAT_DATA_FILE)
		return set_error(err, errlen, EOPNOTSUPP, "a qcow2 image with an external data file");
	if (h->incompatible & QCOW2_INCOMPAT_EXTL2)
		return set_error(err, errlen, EOPNOTSUPP, "a qcow2 image with extended L2 entries (subclusters)");
	if (h->incompatible & ~known)
		return set_error(err, errlen, EOPNOTSUPP, "unknown qcow2 incompatible features 0x%llx",
				 (unsigned long long)(h->incompatible & ~known));
	if (!(h->incompatible & QCOW2_INCOMPAT_COMPRESSION))
		h->compression_type = QCOW2_COMPRESSION_ZLIB;
	else if (h->compression_type != QCOW2_COMPRESSION_ZSTD)
		return set_error(err, errlen, EOPNOTSUPP, "qcow2 compression type %u", h->compression_type);
	if (h->refcount_order > 6)
		return set_error(err, errlen, EINVAL, "qcow2 refcount_order %u", h->refcount_order);
	if (qcow2_l1_entries(h->size, h->cluster_bits) > h->l1_size)
		return set_error(err, errlen, EINVAL, "qcow2 L1 table of %u entries for a %llu-byte disk", h->l1_size,
				 (unsigned long long)h->size);
	if ((uint64_t)h->l1_size * 8 > QCOW2_MAX_L1_BYTES || h->l1_offset & ((1ull << h->cluster_bits) - 1))
		return set_error(err, errlen, EINVAL, "qcow2 L1 table at %llu with %u entries",
				 (unsigned long long)h->l1_offset, h->l1_size);
	if (backing_offset) {
		if (backing_len > QCOW2_MAX_BACKING_NAME || backing_offset > len || backing_len > len - backing_offset)
			return set_error(err, errlen, EINVAL, "qcow2 backing file name outside the first cluster");
		memcpy(h->backing_file, b + backing_offset, backing_len);
		h->backing_file[backing_len] = '\0';
		if (strlen(h->backing_file) != backing_len)
			return set_error(err, errlen, EINVAL, "qcow2 backing file name holds a NUL byte");
	}
	return h->version == 3 ? decode_extensions(b, len, h, err, errlen) : 0;
}

uint64_t qcow2_compressed_entry(unsigned cluster_bits, uint64_t off, uint64_t len)
{
	unsigned x = 62 - (cluster_bits - 8);
	uint64_t extra_sectors = ((off + len - 1) >> 9) - (off >> 9);
	return QCOW2_OFLAG_COMPRESSED | extra_sectors << x | off;
}

void qcow2_compressed_range(unsigned cluster_bits, uint64_t entry, uint64_t *off, uint64_t *len)
{
	unsigned x = 62 - (cluster_bits - 8);
	uint64_t sectors = ((entry >> x) & ((1ull << (cluster_bits - 8)) - 1)) + 1;

	*off = entry & ((1ull << x) - 1);
	*len = sectors * 512 - (*off & 511);
}

void qcow2_refcount_layout(unsigned cluster_bits, uint64_t used, struct qcow2_refcount_layout *out)
{
	uint64_t cluster = 1ull << cluster_bits;
	uint64_t per_block = cluster * 8 >> QCOW2_REFCOUNT_ORDER;
	uint64_t nblocks = 0, table = 0;

	/* Each round counts the structures of the round before; both only grow,
	 * so this ends (within a few rounds). */
	for (;;) {
		uint64_t total = used + nblocks + table;
		uint64_t need_blocks = div_round_up(total, per_block);
		uint64_t need_table = div_round_up(need_blocks * 8, cluster);
		if (need_blocks == nblocks && need_table == table)
			break;
		nblocks = need_blocks;
		table = need_table;
	}
	out->blocks_offset = used << cluster_bits;
	out->nblocks = nblocks;
	out->table_offset = (used + nblocks) << cluster_bits;
	out->table_clusters = (uint32_t)table;
	out->end_cluster = used + nblocks + table;
}
