/* target-qcow2: a new qcow2 (version 3) file that qemu-img and QEMU read.
 *
 * Layout, written in this order: data clusters, appended as they come from
 * any number of threads (one atomic cursor, so a run of clusters stays one
 * write); at flush the L2 tables, the L1 table and the refcount blocks and
 * table after them; last the header in cluster 0. Until flush the file has
 * no header at all, which is harmless: it has a hidden name until publish
 * (target.h), and a crash leaves it to be removed.
 *
 * The cluster map lives in memory until flush: one table of entries per L1
 * slot, made when the first cluster in its range is written (8 bytes per
 * guest cluster of that range). Refcounts are not kept as the job goes but
 * counted from the map at flush, so a cluster written twice (a retried
 * write) or dropped (forget, zeroes over data) leaves free space and never a
 * leak that `qemu-img check` would report. A flush may run more than once
 * (a partial backup is flushed again after forget): each writes a fresh
 * copy of the metadata after everything else, the old one becomes free.
 *
 * Zero clusters follow the target's zero rule: without a backing file an
 * unallocated cluster reads as zeroes, so nothing is written; over a backing
 * file a zero cluster (the v3 zero flag) masks it.
 *
 * Locking: writes to disjoint clusters run concurrently; an L2 table is
 * installed with a compare-and-swap, each entry has one writer (the copy
 * engine claims clusters, blockcopy.h); set_size, flush, forget and close run
 * alone (target.h).
 * Errors: 0 or -errno.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <string.h>
#include <unistd.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/control.h"
#include "fleecefs/compress.h"
#include "fleecefs/journal.h"
#include "fleecefs/qcow2.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

struct qcow2_target {
	struct target base;
	int fd;
	unsigned cluster_bits;
	uint64_t cluster_size;
	struct qcow2_header header;    /* backing file and compression; the rest at flush */
	uint64_t backing_size;         /* the backing file's virtual size */
	uint64_t l1_entries;
	_Atomic(uint64_t *) *l2;       /* per L1 slot: entries in host byte order, or NULL */
	/* Updated in place (completing a partial backup): the map as it was,
	 * nothing below `immutable_below` is ever overwritten, and the header
	 * is journaled before it changes, so the file can be put back. */
	uint64_t **orig_l2;
	uint64_t immutable_below;
	uint64_t orig_file_size;
	struct journal *journal;
	bool in_place;
	/* compress=zstd: its level, and the area compressed clusters are
	 * packed into (byte granular; a new area when one is full). */
	bool compress;
	int compress_level;
	pthread_mutex_t comp_lock;
	uint64_t comp_next, comp_end;
	atomic_uint_fast64_t next_host; /* the first free byte of the file, cluster aligned */
};

static struct qcow2_target *q2(struct target *t) { return (struct qcow2_target *)t; }

static bool is_data(uint64_t entry)
{
	return !(entry & QCOW2_OFLAG_COMPRESSED) && (entry & QCOW2_OFFSET_MASK);
}

/* A data cluster this job wrote (and may write again in place). */
static bool is_own_data(const struct qcow2_target *q, uint64_t entry)
{
	return is_data(entry) && (entry & QCOW2_OFFSET_MASK) >= q->immutable_below;
}

/* The entry of guest cluster `c`; NULL when its table does not exist and
 * `create` is false, or cannot be made. */
static _Atomic uint64_t *entry_of(struct qcow2_target *q, uint64_t c, bool create)
{
	uint64_t per = qcow2_l2_entries(q->cluster_bits);
	_Atomic(uint64_t *) *slot = &q->l2[c / per];
	uint64_t *table = atomic_load_explicit(slot, memory_order_acquire);

	if (!table && create) {
		uint64_t *fresh = calloc(per, sizeof(*fresh));
		if (!fresh)
			return NULL;
		if (atomic_compare_exchange_strong_explicit(slot, &table, fresh, memory_order_acq_rel,
							    memory_order_acquire))
			table = fresh;
		else
			free(fresh);   /* another thread installed one: `table` is it */
	}
	return table ? (_Atomic uint64_t *)&table[c % per] : NULL;
}

/* Writes go whole clusters at a time; the last may end at the disk's end. */
static bool whole_clusters(const struct qcow2_target *q, uint64_t off, uint64_t len)
{
	uint64_t mask = q->cluster_size - 1;
	return !(off & mask) && (!((off + len) & mask) || off + len >= q->base.size) && off + len <= q->base.size;
}

static int write_buffer(int fd, const void *buf, size_t len, uint64_t off)
{
	ssize_t w = pwrite_full(fd, buf, len, off);
	return w < 0 ? (int)w : 0;
}

/* Where a compressed cluster of `len` bytes (at most a cluster) goes: next
 * to the one before, in an area of whole clusters, so that its last sector
 * never reaches into data that is not compressed. */
static uint64_t alloc_compressed(struct qcow2_target *q, uint64_t len)
{
	pthread_mutex_lock(&q->comp_lock);
	if (q->comp_next + len > q->comp_end) {
		uint64_t area = div_round_up(max_u64(q->cluster_size, 1u << 20), q->cluster_size) << q->cluster_bits;
		q->comp_next = atomic_fetch_add(&q->next_host, area);
		q->comp_end = q->comp_next + area;
	}
	uint64_t at = q->comp_next;
	q->comp_next += len;
	pthread_mutex_unlock(&q->comp_lock);
	return at;
}

/* Clusters compressed by the calling thread (one of the engine's writers,
 * compress.h): those that shrink packed side by side, the others stored
 * whole, each run of them in one write. */
static int write_compressed(struct qcow2_target *q, uint64_t first, uint64_t n, const uint8_t *buf, size_t len)
{
	size_t slot = compress_slot(q->cluster_size);
	/* A host cluster's refcount is 16 bits: no more than 32768 clusters
	 * may start in one. */
	uint64_t min_len = max_u64(1, q->cluster_size >> 15);
	/* One buffer per writer thread, kept: the compressed clusters, the same
	 * packed, their lengths and their entries. */
	uint8_t *out = thread_buffer(THREAD_BUFFER_COMPRESS, n * (2 * slot + sizeof(size_t) + sizeof(uint64_t)));
	if (!out)
		return -ENOMEM;
	uint8_t *packed = out + n * slot;
	size_t *lens = (size_t *)(packed + n * slot);
	uint64_t *where = (uint64_t *)(lens + n);
	int rc = compress_clusters(q->compress_level, q->cluster_size, buf, len, out, lens);

	/* Each cluster gets its place on its own (an area's tail is used up
	 * before the next area begins); places that follow each other in the
	 * file are written together. */
	uint64_t seg_start = 0, seg_at = 0, pos = 0;
	for (uint64_t i = 0; i < n && !rc; i++) {
		if (!lens[i])
			continue;
		uint64_t slot_len = max_u64(lens[i], min_len), at = alloc_compressed(q, slot_len);
		if (pos > seg_start && at != seg_at + (pos - seg_start)) {
			rc = write_buffer(q->fd, packed + seg_start, pos - seg_start, seg_at);
			seg_start = pos;
		}
		if (pos == seg_start)
			seg_at = at;
		memcpy(packed + pos, out + i * slot, lens[i]);
		memset(packed + pos + lens[i], 0, slot_len - lens[i]);
		where[i] = qcow2_compressed_entry(q->cluster_bits, at, lens[i]);
		pos += slot_len;
	}
	if (!rc && pos > seg_start)
		rc = write_buffer(q->fd, packed + seg_start, pos - seg_start, seg_at);
	for (uint64_t i = 0; i < n && !rc;) {
		if (lens[i]) {
			i++;
			continue;
		}
		uint64_t j = i;
		while (j < n && !lens[j])
			j++;
		uint64_t from = i << q->cluster_bits, bytes = min_u64((j - i) << q->cluster_bits, len - from);
		uint64_t host = atomic_fetch_add(&q->next_host, (j - i) << q->cluster_bits);
		rc = write_buffer(q->fd, buf + from, bytes, host);
		for (; i < j; i++)
			where[i] = host + ((i << q->cluster_bits) - from);
	}
	/* The entries change only once their data is written. */
	for (uint64_t i = 0; i < n && !rc; i++)
		atomic_store_explicit(entry_of(q, first + i, false), where[i], memory_order_relaxed);
	return rc;
}

static int q2_write(struct target *t, uint64_t off, const void *buf, size_t len, unsigned flags)
{
	struct qcow2_target *q = q2(t);
	uint64_t first = off >> q->cluster_bits, n = div_round_up(len, q->cluster_size);
	bool fresh = true;

	if (!len)
		return 0;
	if (!whole_clusters(q, off, len))
		return -EINVAL;
	for (uint64_t i = 0; i < n; i++) {
		_Atomic uint64_t *e = entry_of(q, first + i, true);
		if (!e)
			return -ENOMEM;
		if (is_own_data(q, atomic_load_explicit(e, memory_order_relaxed)))
			fresh = false;
	}
	if (q->compress && !(flags & TARGET_WRITE_GUEST_WAITS))
		return write_compressed(q, first, n, buf, len);
	if (fresh) {
		/* The common case: new clusters, side by side in the file. */
		uint64_t host = atomic_fetch_add(&q->next_host, n << q->cluster_bits);
		ssize_t w = pwrite_full(q->fd, buf, len, host);
		if (w < 0)
			return (int)w;   /* the space stays unreferenced: free, not leaked */
		for (uint64_t i = 0; i < n; i++)
			atomic_store_explicit(entry_of(q, first + i, false), host + (i << q->cluster_bits),
					      memory_order_relaxed);
		return 0;
	}
	/* Some clusters were written before (a retry): those in place. */
	for (uint64_t i = 0; i < n; i++) {
		_Atomic uint64_t *e = entry_of(q, first + i, false);
		uint64_t entry = atomic_load_explicit(e, memory_order_relaxed);
		uint64_t pos = i << q->cluster_bits, clen = min_u64(q->cluster_size, len - pos);
		uint64_t host = is_own_data(q, entry) ? entry & QCOW2_OFFSET_MASK
						      : atomic_fetch_add(&q->next_host, q->cluster_size);
		ssize_t w = pwrite_full(q->fd, (const char *)buf + pos, (size_t)clen, host);
		if (w < 0)
			return (int)w;
		atomic_store_explicit(e, host, memory_order_relaxed);
	}
	return 0;
}

static int q2_write_zeroes(struct target *t, uint64_t off, uint64_t len)
{
	struct qcow2_target *q = q2(t);
	bool backing = q->header.backing_file[0] != '\0';

	if (!len)
		return 0;
	if (!whole_clusters(q, off, len))
		return -EINVAL;
	for (uint64_t c = off >> q->cluster_bits, end = div_round_up(off + len, q->cluster_size); c < end; c++) {
		_Atomic uint64_t *e = entry_of(q, c, backing);
		if (backing && !e)
			return -ENOMEM;
		if (e)   /* data written here before becomes free space */
			atomic_store_explicit(e, backing ? QCOW2_OFLAG_ZERO : 0, memory_order_relaxed);
	}
	return 0;
}

static void q2_start_writeback(struct target *t)
{
	target_file_writeback(t, q2(t)->fd);
}

static int q2_set_size(struct target *t, uint64_t size, char *err, size_t errlen)
{
	struct qcow2_target *q = q2(t);
	/* QEMU counts a disk in 512-byte sectors and cuts a qcow2 size down to
	 * them: a size that is no multiple of 512 is rounded up, the rest of
	 * its last sector reads as zeroes (as for a raw file in QEMU). */
	uint64_t virtual_size = (size + 511) & ~511ull;
	uint64_t entries = qcow2_l1_entries(virtual_size, q->cluster_bits);

	if (q->in_place) {
		if (virtual_size != q->header.size)
			return set_error(err, errlen, EINVAL,
					 "target %s: holds a %llu-byte disk, the image is %llu bytes: take a new full backup",
					 t->path, (unsigned long long)q->header.size, (unsigned long long)size);
		t->size = size;
		return 0;
	}
	if (q->header.backing_file[0] && virtual_size != ((q->backing_size + 511) & ~511ull))
		return set_error(err, errlen, EINVAL,
				 "target %s: the image is %llu bytes at the point in time, its backing file %s %llu: take "
				 "a new full backup", t->path, (unsigned long long)size, q->header.backing_file,
				 (unsigned long long)q->backing_size);

	if (entries * 8 > QCOW2_MAX_L1_BYTES)
		return set_error(err, errlen, EFBIG,
				 "target %s: a %llu-byte disk needs an L1 table larger than QEMU reads with %llu-byte "
				 "clusters: use a larger cluster_size", t->path, (unsigned long long)size,
				 (unsigned long long)q->cluster_size);
	_Atomic(uint64_t *) *l2 = calloc(entries ? entries : 1, sizeof(*l2));
	if (!l2)
		return set_error(err, errlen, ENOMEM, "target %s: out of memory for the cluster map", t->path);
	free(q->l2);
	q->l2 = l2;
	q->l1_entries = entries;
	t->size = size;
	q->header.size = virtual_size;
	return 0;
}

/* ---- flush: the metadata, after the data ----------------------------------- */

struct q2_layout {
	uint64_t l2_tables;      /* how many are written */
	uint64_t l2_first;       /* host cluster of the first */
	uint64_t l1_first, l1_clusters;
	struct qcow2_refcount_layout rc;
};

static bool table_used(const uint64_t *table, uint64_t per)
{
	for (uint64_t i = 0; i < per; i++)
		if (table[i])
			return true;
	return false;
}

static uint64_t *table_at(struct qcow2_target *q, uint64_t i)
{
	return atomic_load_explicit(&q->l2[i], memory_order_acquire);
}

static void plan(struct qcow2_target *q, struct q2_layout *l)
{
	uint64_t per = qcow2_l2_entries(q->cluster_bits);

	l->l2_tables = 0;
	for (uint64_t i = 0; i < q->l1_entries; i++)
		if (table_at(q, i) && table_used(table_at(q, i), per))
			l->l2_tables++;
	l->l2_first = div_round_up(atomic_load(&q->next_host), q->cluster_size);
	l->l1_first = l->l2_first + l->l2_tables;
	l->l1_clusters = div_round_up(q->l1_entries * 8, q->cluster_size);
	qcow2_refcount_layout(q->cluster_bits, l->l1_first + l->l1_clusters, &l->rc);
}

static int count_ref(uint16_t *refs, uint64_t nclusters, uint64_t cluster)
{
	if (cluster >= nclusters || refs[cluster] == UINT16_MAX)
		return -EIO;   /* a map entry past the file: our own bug, never written out */
	refs[cluster]++;
	return 0;
}

/* Each host cluster's refcount: how many entries and structures use it. */
static int count_refs(struct qcow2_target *q, const struct q2_layout *l, uint16_t *refs)
{
	uint64_t per = qcow2_l2_entries(q->cluster_bits), n = l->rc.end_cluster;
	int rc = count_ref(refs, n, 0);

	for (uint64_t i = 0; i < q->l1_entries && !rc; i++) {
		const uint64_t *table = table_at(q, i);
		for (uint64_t j = 0; table && j < per && !rc; j++) {
			uint64_t e = table[j];
			if (is_data(e)) {
				rc = count_ref(refs, n, (e & QCOW2_OFFSET_MASK) >> q->cluster_bits);
			} else if (e & QCOW2_OFLAG_COMPRESSED) {
				uint64_t off, len;
				qcow2_compressed_range(q->cluster_bits, e, &off, &len);
				for (uint64_t c = off >> q->cluster_bits; c <= (off + len - 1) >> q->cluster_bits && !rc; c++)
					rc = count_ref(refs, n, c);
			}
		}
	}
	for (uint64_t c = l->l2_first; c < l->rc.end_cluster && !rc; c++)
		rc = count_ref(refs, n, c);
	return rc;
}

static int write_l2_tables(struct qcow2_target *q, const struct q2_layout *l, const uint16_t *refs, uint64_t *l1)
{
	uint64_t per = qcow2_l2_entries(q->cluster_bits), host = l->l2_first << q->cluster_bits;
	uint8_t *buf = malloc(q->cluster_size);
	int rc = 0;

	if (!buf)
		return -ENOMEM;
	for (uint64_t i = 0; i < q->l1_entries && !rc; i++) {
		const uint64_t *table = table_at(q, i);
		if (!table || !table_used(table, per))
			continue;
		for (uint64_t j = 0; j < per; j++) {
			uint64_t e = table[j];
			if (is_data(e) && refs[(e & QCOW2_OFFSET_MASK) >> q->cluster_bits] == 1)
				e |= QCOW2_OFLAG_COPIED;
			qcow2_put_be64(buf + j * 8, e);
		}
		ssize_t w = pwrite_full(q->fd, buf, q->cluster_size, host);
		rc = w < 0 ? (int)w : 0;
		l1[i] = host | QCOW2_OFLAG_COPIED;
		host += q->cluster_size;
	}
	free(buf);
	return rc;
}

static int write_l1(struct qcow2_target *q, const struct q2_layout *l, const uint64_t *l1)
{
	size_t len = (size_t)(l->l1_clusters << q->cluster_bits);
	if (!len)
		return 0;
	uint8_t *buf = calloc(1, len);
	if (!buf)
		return -ENOMEM;
	for (uint64_t i = 0; i < q->l1_entries; i++)
		qcow2_put_be64(buf + i * 8, l1[i]);
	int rc = write_buffer(q->fd, buf, len, l->l1_first << q->cluster_bits);
	free(buf);
	return rc;
}

static int write_refcounts(struct qcow2_target *q, const struct q2_layout *l, const uint16_t *refs)
{
	uint64_t per_block = q->cluster_size / 2, n = l->rc.end_cluster;
	size_t table_len = (size_t)l->rc.table_clusters << q->cluster_bits;
	uint8_t *block = malloc(q->cluster_size), *table = calloc(1, table_len);
	int rc = block && table ? 0 : -ENOMEM;

	for (uint64_t b = 0; b < l->rc.nblocks && !rc; b++) {
		memset(block, 0, q->cluster_size);
		for (uint64_t j = 0; j < per_block && b * per_block + j < n; j++)
			qcow2_put_be16(block + j * 2, refs[b * per_block + j]);
		uint64_t at = l->rc.blocks_offset + (b << q->cluster_bits);
		rc = write_buffer(q->fd, block, q->cluster_size, at);
		qcow2_put_be64(table + b * 8, at);
	}
	if (!rc)
		rc = write_buffer(q->fd, table, table_len, l->rc.table_offset);
	free(block);
	free(table);
	return rc;
}

static int write_header(struct qcow2_target *q, const struct q2_layout *l)
{
	uint8_t *buf = malloc(q->cluster_size);
	if (!buf)
		return -ENOMEM;
	q->header.cluster_bits = q->cluster_bits;
	q->header.l1_size = (uint32_t)q->l1_entries;
	q->header.l1_offset = l->l1_clusters ? l->l1_first << q->cluster_bits : 0;
	q->header.refcount_table_offset = l->rc.table_offset;
	q->header.refcount_table_clusters = l->rc.table_clusters;
	int rc = qcow2_header_encode(&q->header, buf, q->cluster_size);
	if (!rc)
		rc = write_buffer(q->fd, buf, q->cluster_size, 0);
	free(buf);
	return rc;
}

static int q2_flush(struct target *t)
{
	struct qcow2_target *q = q2(t);
	struct q2_layout l;

	plan(q, &l);
	uint16_t *refs = calloc(l.rc.end_cluster, sizeof(*refs));
	uint64_t *l1 = calloc(q->l1_entries ? q->l1_entries : 1, sizeof(*l1));
	int rc = refs && l1 ? count_refs(q, &l, refs) : -ENOMEM;

	if (!rc)
		rc = write_l2_tables(q, &l, refs, l1);
	if (!rc)
		rc = write_l1(q, &l, l1);
	if (!rc)
		rc = write_refcounts(q, &l, refs);
	free(refs);
	free(l1);
	/* The header points at the new metadata only once it is durable. */
	if (!rc)
		rc = target_file_sync(t, q->fd);
	if (!rc && q->journal) {
		struct journal_range header = { 0, q->cluster_size };
		rc = journal_protect(q->journal, &header, 1);
	}
	if (!rc)
		rc = write_header(q, &l);
	if (!rc && fdatasync(q->fd) < 0)
		rc = -errno;
	/* Whatever comes after goes behind this copy of the metadata. */
	atomic_store(&q->next_host, max_u64(atomic_load(&q->next_host), l.rc.end_cluster << q->cluster_bits));
	if (!rc)
		posix_fadvise(q->fd, 0, 0, POSIX_FADV_DONTNEED);
	return rc;
}

static int q2_forget(struct target *t, const struct cbitmap *left, unsigned cluster_bits)
{
	struct qcow2_target *q = q2(t);

	/* What the cluster read as before the job: its old entry in a file
	 * updated in place, else unallocated (zeroes, or the backing file). */
	for (uint64_t c = cbitmap_next_set(left, 0); c < left->nbits; c = cbitmap_next_set(left, c + 1)) {
		uint64_t from = (c << cluster_bits) >> q->cluster_bits;
		uint64_t to = min_u64(div_round_up((c + 1) << cluster_bits, q->cluster_size),
				      div_round_up(t->size, q->cluster_size));
		uint64_t per = qcow2_l2_entries(q->cluster_bits);
		for (uint64_t g = from; g < to; g++) {
			_Atomic uint64_t *e = entry_of(q, g, false);
			const uint64_t *orig = q->orig_l2 ? q->orig_l2[g / per] : NULL;
			if (e)
				atomic_store_explicit(e, orig ? orig[g % per] : 0, memory_order_relaxed);
		}
	}
	return 0;
}

static int q2_close(struct target *t, bool keep)
{
	struct qcow2_target *q = q2(t);
	int rc = 0;


	if (q->journal) {
		/* The old header back: the old map and data were never touched. */
		if (!keep && (rc = journal_rollback(q->journal, NULL)) == 0 &&
		    ftruncate(q->fd, (off_t)q->orig_file_size) == 0)
			fdatasync(q->fd);
		/* A journal that could not be applied stays for the next mount. */
		int rc2 = journal_close(q->journal, rc == 0);
		rc = rc ? rc : rc2;
		q->journal = NULL;
	}
	if (q->fd >= 0 && close(q->fd) < 0 && keep && !rc)
		rc = -errno;
	q->fd = -1;
	if (!keep && !q->in_place && !t->published) {
		unlink(t->path);
		fsync_parent_dir(t->path);
	}
	return rc;
}

static void free_tables(uint64_t **tables, uint64_t n, bool atomic_slots)
{
	for (uint64_t i = 0; tables && i < n; i++)
		free(atomic_slots ? atomic_load((_Atomic(uint64_t *) *)&tables[i]) : tables[i]);
	free(tables);
}

static void q2_free(struct target *t)
{
	struct qcow2_target *q = q2(t);

	pthread_mutex_destroy(&q->comp_lock);
	if (q->journal)
		journal_close(q->journal, false);
	if (q->fd >= 0)
		close(q->fd);
	free_tables((uint64_t **)q->l2, q->l1_entries, true);
	free_tables(q->orig_l2, q->l1_entries, false);
	free(t->path);
	free(q);
}

static const struct target_ops qcow2_ops = {
	.write = q2_write,
	.write_zeroes = q2_write_zeroes,
	.start_writeback = q2_start_writeback,
	.set_size = q2_set_size,
	.flush = q2_flush,
	.forget = q2_forget,
	.publish = target_rename_file,
	.close = q2_close,
	.free = q2_free,
};

/* The backing file is named relative to the new file when both share a
 * directory, so that a backup directory can be moved or copied elsewhere
 * whole (QEMU resolves a relative name from the image's directory). */
static int set_backing(struct qcow2_target *q, const struct target_spec *spec, char *err, size_t errlen)
{
	const char *b = spec->backing_resolved, *slash = strrchr(b, '/'), *tslash = strrchr(spec->resolved, '/');
	bool same_dir = slash && tslash && slash - b == tslash - spec->resolved &&
			strncmp(b, spec->resolved, (size_t)(slash - b)) == 0;
	const char *name = same_dir ? slash + 1 : b;

	if (strlen(name) > QCOW2_MAX_BACKING_NAME)
		return set_error(err, errlen, ENAMETOOLONG, "target %s: backing file name %s is longer than qcow2 allows",
				 spec->resolved, name);
	snprintf(q->header.backing_file, sizeof(q->header.backing_file), "%s", name);
	snprintf(q->header.backing_format, sizeof(q->header.backing_format), "%s",
		 spec->backing_format == FORMAT_QCOW2 ? "qcow2" : "raw");
	q->backing_size = spec->backing_size;
	return 0;
}

/* A target at `path` with the daemon's cluster size: one qcow2 cluster per
 * job cluster, up to the 2 MiB QEMU reads (a larger job cluster spans
 * several). */
static struct qcow2_target *new_q2(const char *path, uint32_t cluster_size)
{
	struct qcow2_target *q = calloc(1, sizeof(*q));

	if (!q || !(q->base.path = strdup(path))) {
		free(q);
		return NULL;
	}
	q->base.ops = &qcow2_ops;
	q->fd = -1;
	pthread_mutex_init(&q->comp_lock, NULL);
	q->cluster_bits = (unsigned)min_u64(log2_u64(cluster_size), QCOW2_MAX_CLUSTER_BITS);
	q->cluster_size = 1ull << q->cluster_bits;
	q->base.write_unit = (uint32_t)q->cluster_size;
	return q;
}

/* compress=zstd: the header says so, and one writer per core compresses. */
static int start_compression(struct qcow2_target *q, int level, char *err, size_t errlen)
{
	if (!compress_available())
		return set_error(err, errlen, EOPNOTSUPP, "target %s: this fleecefs was built without libzstd",
				 q->base.path);
	q->header.incompatible |= QCOW2_INCOMPAT_COMPRESSION;
	q->header.compression_type = QCOW2_COMPRESSION_ZSTD;
	q->compress = true;
	q->compress_level = level;
	q->base.writers = compress_threads();
	return 0;
}

static int q2_create(const struct target_spec *spec, const char *temp, struct target **out, char *err, size_t errlen)
{
	struct qcow2_target *q = new_q2(temp, spec->cluster_size);
	int rc;

	if (!q)
		return set_error(err, errlen, ENOMEM, "target %s: out of memory", spec->resolved);
	atomic_init(&q->next_host, q->cluster_size);   /* cluster 0 is the header */
	if ((spec->backing_resolved[0] && (rc = set_backing(q, spec, err, errlen))) ||
	    (spec->compress == COMPRESS_ZSTD && (rc = start_compression(q, spec->compress_level, err, errlen))) ||
	    (rc = target_create_file(&q->base, spec->resolved, &q->fd, err, errlen))) {
		q2_free(&q->base);
		return rc;
	}
	*out = &q->base;
	return 0;
}

/* ---- an earlier backup, updated in place ------------------------------------ */

static int read_at(int fd, void *buf, size_t len, uint64_t off)
{
	ssize_t n = pread_full(fd, buf, len, off);
	return n < 0 ? (int)n : (size_t)n == len ? 0 : -EIO;
}

/* The cluster map of the file into memory, twice: the one the job changes
 * and the one forget goes back to. */
static int load_map(struct qcow2_target *q, uint64_t file_size, char *err, size_t errlen)
{
	uint64_t per = qcow2_l2_entries(q->cluster_bits), n = q->l1_entries;
	size_t l1_len = (size_t)n * 8;
	uint8_t *l1 = malloc(l1_len ? l1_len : 1), *raw = malloc(q->cluster_size);
	int rc = 0;

	q->l2 = calloc(n ? n : 1, sizeof(*q->l2));
	q->orig_l2 = calloc(n ? n : 1, sizeof(*q->orig_l2));
	if (!l1 || !raw || !q->l2 || !q->orig_l2)
		rc = set_error(err, errlen, ENOMEM, "target %s: out of memory for its cluster map", q->base.path);
	else if (l1_len && (rc = read_at(q->fd, l1, l1_len, q->header.l1_offset)))
		set_error(err, errlen, -rc, "target %s: cannot read its L1 table: %s", q->base.path, error_text(-rc));
	for (uint64_t i = 0; i < n && !rc; i++) {
		uint64_t at = qcow2_be64(l1 + i * 8) & QCOW2_OFFSET_MASK;
		if (!at)
			continue;
		uint64_t *table = malloc(q->cluster_size), *orig = malloc(q->cluster_size);
		q->orig_l2[i] = orig;
		atomic_store(&q->l2[i], table);
		if (!table || !orig) {
			rc = set_error(err, errlen, ENOMEM, "target %s: out of memory for its cluster map", q->base.path);
		} else if (at + q->cluster_size > file_size || (rc = read_at(q->fd, raw, q->cluster_size, at))) {
			rc = set_error(err, errlen, rc ? -rc : EINVAL, "target %s: its L2 table at %llu cannot be read",
				       q->base.path, (unsigned long long)at);
		} else {
			for (uint64_t j = 0; j < per; j++)
				orig[j] = table[j] = qcow2_be64(raw + j * 8) & ~QCOW2_OFLAG_COPIED;
		}
	}
	free(l1);
	free(raw);
	return rc;
}

/* A partial qcow2 backup this daemon wrote (bitmap-mode=always), completed
 * by the next incremental: new clusters and metadata go after everything
 * in it, and only the header is overwritten, journaled first. */
static int q2_open_existing(const struct target_spec *spec, const char *path, dev_t dev, ino_t ino,
			    const char *journal_path, uint32_t cluster_size, struct target **out, char *err, size_t errlen)
{
	(void)spec;
	struct qcow2_target *q = new_q2(path, cluster_size);
	uint8_t *first = malloc(1u << QCOW2_MAX_CLUSTER_BITS);
	struct stat st;
	char why[200];
	int rc;

	if (!q || !first) {
		if (q)
			q2_free(&q->base);
		free(first);
		return set_error(err, errlen, ENOMEM, "target %s: out of memory", path);
	}
	q->in_place = true;
	if ((rc = target_open_recorded(path, dev, ino, &q->fd, &st, err, errlen)))
		goto fail;
	ssize_t n = pread_full(q->fd, first, 1u << QCOW2_MAX_CLUSTER_BITS, 0);
	if ((rc = qcow2_header_decode(first, n > 0 ? (size_t)n : 0, &q->header, why, sizeof(why)))) {
		rc = set_error(err, errlen, EINVAL, "target %s: %s", path, why);
		goto fail;
	}
	q->l1_entries = qcow2_l1_entries(q->header.size, q->cluster_bits);
	if (q->header.version != 3 || q->header.cluster_bits != q->cluster_bits || q->header.nb_snapshots ||
	    q->header.refcount_order != QCOW2_REFCOUNT_ORDER || q->header.l1_size != q->l1_entries ||
	    (q->header.incompatible & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT))) {
		rc = set_error(err, errlen, EINVAL,
			       "target %s: not a qcow2 backup of this daemon's cluster size (%llu) as fleecefs writes them",
			       path, (unsigned long long)q->cluster_size);
		goto fail;
	}
	q->base.dev = st.st_dev;
	q->base.ino = st.st_ino;
	q->base.size = q->header.size;
	q->orig_file_size = (uint64_t)st.st_size;
	q->immutable_below = div_round_up(q->orig_file_size, q->cluster_size) << q->cluster_bits;
	atomic_init(&q->next_host, q->immutable_below);
	/* Completed as it was begun: compressed if it is. */
	if ((rc = load_map(q, q->orig_file_size, err, errlen)) ||
	    ((q->header.incompatible & QCOW2_INCOMPAT_COMPRESSION) &&
	     (rc = start_compression(q, 0, err, errlen))) ||
	    (rc = journal_create(journal_path, q->fd, q->orig_file_size, (uint32_t)q->cluster_size, &q->journal, err,
				 errlen)))
		goto fail;
	free(first);
	*out = &q->base;
	return 0;
fail:
	free(first);
	q2_free(&q->base);
	return rc;
}

static int q2_check(const struct target_spec *spec, char *err, size_t errlen)
{
	if (spec->cluster_size < (1u << QCOW2_MIN_CLUSTER_BITS))
		return set_error(err, errlen, EINVAL, "target %s: qcow2 needs a cluster size of at least 4K",
				 spec->location);
	if (spec->compress == COMPRESS_ZSTD && !compress_available())
		return set_error(err, errlen, EOPNOTSUPP,
				 "target %s: compress=zstd: this fleecefs was built without libzstd (install libzstd-dev and "
				 "build it again)", spec->location);
	return 0;
}

/* The virtual size in the header (which, with the backing file's name,
 * fits in the first 64 KiB). */
static int q2_disk_size(int fd, uint64_t *size, char *err, size_t errlen)
{
	const size_t len = 65536;
	struct qcow2_header h;
	uint8_t *first = malloc(len);
	ssize_t n = first ? pread(fd, first, len, 0) : -1;
	int rc = qcow2_header_decode(first, n > 0 ? (size_t)n : 0, &h, err, errlen);
	free(first);
	if (!rc)
		*size = h.size;
	return rc;
}

const struct target_format_ops target_qcow2_format = {
	.name = "qcow2",
	.incremental_in_place = false,
	.check = q2_check,
	.create = q2_create,
	.open_existing = q2_open_existing,
	.disk_size = q2_disk_size,
};
