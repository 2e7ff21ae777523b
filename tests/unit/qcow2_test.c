/* Unit tests for the qcow2 format helpers (src/qcow2.c) and the qcow2 target
 * (src/target-qcow2.c) driven through its operations, with qemu-img as the
 * judge of the files it writes. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/qcow2.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

/* ---- the header ------------------------------------------------------------ */

Test(qcow2, header_round_trip)
{
	static uint8_t cluster[65536];
	struct qcow2_header h = { .cluster_bits = 16, .size = 10ull << 30, .l1_size = 20, .l1_offset = 3 << 16,
				  .refcount_table_offset = 5 << 16, .refcount_table_clusters = 1,
				  .incompatible = QCOW2_INCOMPAT_COMPRESSION, .compression_type = QCOW2_COMPRESSION_ZSTD };
	struct qcow2_header back;
	char err[200];

	snprintf(h.backing_file, sizeof(h.backing_file), "/backups/vm-full.qcow2");
	snprintf(h.backing_format, sizeof(h.backing_format), "qcow2");
	cr_assert_eq(qcow2_header_encode(&h, cluster, sizeof(cluster)), 0);
	cr_assert(qcow2_has_magic(cluster, 4));
	cr_assert_eq(qcow2_header_decode(cluster, sizeof(cluster), &back, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(back.version, 3);
	cr_assert_eq(back.cluster_bits, 16);
	cr_assert_eq(back.size, 10ull << 30);
	cr_assert_eq(back.l1_size, 20);
	cr_assert_eq(back.l1_offset, 3 << 16);
	cr_assert_eq(back.refcount_table_offset, 5 << 16);
	cr_assert_eq(back.refcount_order, QCOW2_REFCOUNT_ORDER);
	cr_assert_eq(back.header_length, QCOW2_HEADER_LENGTH);
	cr_assert_eq(back.compression_type, QCOW2_COMPRESSION_ZSTD);
	cr_assert_str_eq(back.backing_file, "/backups/vm-full.qcow2");
	cr_assert_str_eq(back.backing_format, "qcow2");
}

Test(qcow2, header_backing_name_must_fit)
{
	static uint8_t cluster[4096];
	struct qcow2_header h = { .cluster_bits = 12, .size = 1 << 20 };

	memset(h.backing_file, 'a', QCOW2_MAX_BACKING_NAME);
	cr_assert_eq(qcow2_header_encode(&h, cluster, sizeof(cluster)), 0);
	cr_assert_eq(qcow2_header_encode(&h, cluster, 512), -ENAMETOOLONG);
}

Test(qcow2, header_refuses_what_the_reader_cannot_follow)
{
	static uint8_t good[4096], bad[4096];
	struct qcow2_header h = { .cluster_bits = 12, .size = 1 << 20, .l1_size = 1, .l1_offset = 4096 }, back;
	char err[200];
	/* EINVAL: not a (sane) qcow2 header; EOPNOTSUPP: one this reader
	 * cannot follow. */
	struct { unsigned at, width; uint64_t value; const char *words; int rc; } cases[] = {
		{ 0, 4, 0x12345678, "magic", -EINVAL },
		{ 4, 4, 4, "version 4", -EOPNOTSUPP },
		{ 20, 4, 30, "cluster_bits 30", -EINVAL },
		{ 32, 4, 2, "encrypted", -EOPNOTSUPP },
		{ 72, 8, QCOW2_INCOMPAT_EXTL2, "extended L2", -EOPNOTSUPP },
		{ 72, 8, QCOW2_INCOMPAT_DATA_FILE, "external data file", -EOPNOTSUPP },
		{ 72, 8, 1ull << 40, "unknown", -EOPNOTSUPP },
		{ 36, 4, 0, "L1 table of 0 entries", -EINVAL },
		{ 100, 4, 100, "header length", -EINVAL },
	};
	cr_assert_eq(qcow2_header_encode(&h, good, sizeof(good)), 0);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		memcpy(bad, good, sizeof(bad));
		if (cases[i].width == 4)
			qcow2_put_be32(bad + cases[i].at, (uint32_t)cases[i].value);
		else
			qcow2_put_be64(bad + cases[i].at, cases[i].value);
		cr_assert_eq(qcow2_header_decode(bad, sizeof(bad), &back, err, sizeof(err)), cases[i].rc, "case %zu", i);
		cr_assert(strstr(err, cases[i].words), "case %zu: '%s' lacks '%s'", i, err, cases[i].words);
	}
}

/* ---- descriptors and layout ------------------------------------------------ */

Test(qcow2, compressed_descriptor_covers_the_data)
{
	unsigned bits[] = { 12, 16, 21 };
	uint64_t offs[] = { 4096, 65536 + 511, 1ull << 40 | 7, 123456789 };
	uint64_t lens[] = { 1, 511, 512, 513, 4000 };

	for (unsigned b = 0; b < 3; b++)
		for (unsigned o = 0; o < 4; o++)
			for (unsigned l = 0; l < 5; l++) {
				if (lens[l] > (1ull << bits[b]))
					continue;
				uint64_t e = qcow2_compressed_entry(bits[b], offs[o], lens[l]), off, len;
				cr_assert(e & QCOW2_OFLAG_COMPRESSED);
				cr_assert_eq(e & QCOW2_OFLAG_COPIED, 0);
				qcow2_compressed_range(bits[b], e, &off, &len);
				cr_assert_eq(off, offs[o]);
				cr_assert_geq(len, lens[l]);
				/* The range ends at the end of the data's last sector. */
				cr_assert_eq((off + len) % 512, 0);
				cr_assert_lt(off + len - (offs[o] + lens[l]), 512);
			}
}

Test(qcow2, refcount_layout_counts_itself)
{
	unsigned bits[] = { 12, 16, 21 };
	for (unsigned b = 0; b < 3; b++) {
		uint64_t per_block = (1ull << bits[b]) * 8 / 16;
		uint64_t used_values[] = { 1, 2, per_block - 1, per_block, per_block + 1, 10 * per_block - 2,
					   (1ull << bits[b]) / 8 * per_block - 1 };
		for (unsigned u = 0; u < sizeof(used_values) / sizeof(used_values[0]); u++) {
			struct qcow2_refcount_layout l;
			uint64_t used = used_values[u];
			qcow2_refcount_layout(bits[b], used, &l);
			cr_assert_eq(l.blocks_offset, used << bits[b]);
			cr_assert_eq(l.table_offset, (used + l.nblocks) << bits[b]);
			cr_assert_eq(l.end_cluster, used + l.nblocks + l.table_clusters);
			cr_assert_geq(l.nblocks * per_block, l.end_cluster, "blocks cover everything");
			cr_assert_geq((uint64_t)l.table_clusters << bits[b], l.nblocks * 8, "table holds every block");
			cr_assert_lt((l.nblocks - 1) * per_block, l.end_cluster, "no block too many");
		}
	}
}

/* ---- the target, written through its operations ------------------------------ */

static char dir[] = "/tmp/fleecefs-qcow2-test.XXXXXX";

static void setup(void) { cr_assert_not_null(mkdtemp(dir)); }
static void teardown(void)
{
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	cr_assert_eq(system(cmd), 0);
}
TestSuite(qcow2_target, .init = setup, .fini = teardown);

static struct target *new_target(const char *name, uint32_t cluster_size, uint64_t size)
{
	struct target_spec spec = { .format = FORMAT_QCOW2, .cluster_size = cluster_size };
	struct target *t;
	char path[PATH_MAX], err[256];

	snprintf(spec.resolved, sizeof(spec.resolved), "%s/%s", dir, name);
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	cr_assert_eq(target_format(FORMAT_QCOW2)->create(&spec, path, &t, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(target_set_size(t, size, err, sizeof(err)), 0, "%s", err);
	return t;
}

/* qemu-img check finds no errors and no leaks, and the file reads as `raw`. */
static void judge(const char *name, const char *raw)
{
	char cmd[1024];
	snprintf(cmd, sizeof(cmd), "qemu-img check -q -f qcow2 '%s/%s' && qemu-img compare -q -f raw -F qcow2 '%s/%s' '%s/%s'",
		 dir, name, dir, raw, dir, name);
	cr_assert_eq(system(cmd), 0, "%s", cmd);
}

static void write_raw(const char *name, const void *buf, size_t len)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	cr_assert_geq(fd, 0);
	cr_assert_eq(pwrite_full(fd, buf, len, 0), (ssize_t)len);
	close(fd);
}

struct writer {
	struct target *t;
	const uint8_t *image;
	uint64_t cluster, clusters, first, step;
};

static void *write_clusters(void *arg)
{
	struct writer *w = arg;
	for (uint64_t c = w->first; c < w->clusters; c += w->step)
		cr_assert_eq(target_write(w->t, c * w->cluster, w->image + c * w->cluster, w->cluster, 0), 0);
	return NULL;
}

Test(qcow2_target, threads_write_disjoint_clusters)
{
	const uint64_t cluster = 4096, clusters = 3000;   /* several L2 tables of 512 entries */
	uint8_t *image = malloc(clusters * cluster);
	pthread_t th[4];
	struct writer w[4];

	for (uint64_t i = 0; i < clusters * cluster; i++)
		image[i] = (uint8_t)(i * 2654435761u >> 13);
	struct target *t = new_target("mt.qcow2", cluster, clusters * cluster);
	for (int i = 0; i < 4; i++) {
		w[i] = (struct writer){ t, image, cluster, clusters, (uint64_t)i, 4 };
		pthread_create(&th[i], NULL, write_clusters, &w[i]);
	}
	for (int i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	cr_assert_eq(target_flush(t), 0);
	cr_assert_eq(target_close(t, true), 0);
	target_free(t);
	write_raw("mt.raw", image, clusters * cluster);
	judge("mt.qcow2", "mt.raw");
	free(image);
}

/* Rewritten clusters, zeroes over data, forgotten clusters and a second
 * flush: all leave free space, never a leak or a stale mapping. */
Test(qcow2_target, rewrites_zeroes_forget_and_reflush)
{
	const uint64_t cluster = 65536, size = 40 * cluster + 1000;
	uint8_t *image = calloc(1, size), *data = malloc(size);
	struct cbitmap left;

	for (uint64_t i = 0; i < size; i++)
		data[i] = (uint8_t)(i % 251 + 1);
	struct target *t = new_target("rw.qcow2", cluster, size);
	cr_assert_eq(target_write(t, 0, data, 10 * cluster, 0), 0);            /* clusters 0-9 */
	cr_assert_eq(target_write(t, 4 * cluster, data + 4 * cluster, 2 * cluster, 0), 0);   /* 4-5 again */
	cr_assert_eq(target_write_zeroes(t, 8 * cluster, 2 * cluster), 0);   /* 8-9 back to zeroes */
	cr_assert_eq(target_write(t, 39 * cluster, data + 39 * cluster, size - 39 * cluster, 0), 0);  /* the tail */
	cr_assert_eq(target_write(t, 20 * cluster, data + 20 * cluster, 5 * cluster, 0), 0);
	cr_assert_eq(target_write(t, 3 * cluster, data, cluster / 2, 0), -EINVAL, "half a cluster");
	cr_assert_eq(target_flush(t), 0);
	/* A partial backup: clusters 20-24 did not durably arrive. */
	cr_assert_eq(cbitmap_init(&left, 41, false), 0);
	for (unsigned c = 20; c < 25; c++)
		cbitmap_set(&left, c);
	cr_assert_eq(target_forget(t, &left, 16), 0);
	cr_assert_eq(target_flush(t), 0);
	cr_assert_eq(target_close(t, true), 0);
	target_free(t);
	cbitmap_destroy(&left);
	memcpy(image, data, 8 * cluster);
	memcpy(image + 39 * cluster, data + 39 * cluster, size - 39 * cluster);
	/* qemu-img sees whole sectors: the raw reference is rounded up too. */
	uint64_t rounded = (size + 511) & ~511ull;
	image = realloc(image, rounded);
	memset(image + size, 0, rounded - size);
	write_raw("rw.raw", image, rounded);
	judge("rw.qcow2", "rw.raw");
	free(image);
	free(data);
}

Test(qcow2_target, not_kept_is_removed)
{
	char path[PATH_MAX];
	struct target *t = new_target("gone.qcow2", 65536, 1 << 20);
	static uint8_t buf[65536] = { 1 };

	cr_assert_eq(target_write(t, 0, buf, sizeof(buf), 0), 0);
	cr_assert_eq(target_close(t, false), 0);
	target_free(t);
	snprintf(path, sizeof(path), "%s/gone.qcow2", dir);
	cr_assert_eq(access(path, F_OK), -1);
}

/* ---- compression ------------------------------------------------------------- */

#ifdef HAVE_ZSTD
#include <zstd.h>

#include "fleecefs/compress.h"

struct compress_caller {
	const uint8_t *data;
	size_t len;
};

/* Compresses `len` bytes of `data` and checks every cluster against what
 * zstd gives back: compressed ones decompress to the data (padded with
 * zeroes), the others were incompressible. */
static void *compress_and_check(void *arg)
{
	struct compress_caller *c = arg;
	const size_t cluster = 65536;
	size_t n = (c->len + cluster - 1) / cluster, slot = compress_slot(cluster);
	uint8_t *out = malloc(n * slot), *back = malloc(cluster);
	size_t *lens = calloc(n, sizeof(*lens));

	cr_assert_eq(compress_clusters(0, cluster, c->data, c->len, out, lens), 0);
	for (size_t i = 0; i < n; i++) {
		size_t len = c->len - i * cluster < cluster ? c->len - i * cluster : cluster;
		if (!lens[i]) {
			/* Stored whole: it must really not have shrunk by a sector. */
			size_t r = ZSTD_compress(back, cluster, c->data + i * cluster, len, 3);
			cr_assert(ZSTD_isError(r) || r + 512 > len, "cluster %zu was compressible (%zu)", i, r);
			continue;
		}
		cr_assert_leq(lens[i], slot);
		size_t r = ZSTD_decompress(back, cluster, out + i * slot, lens[i]);
		cr_assert_eq(r, cluster, "cluster %zu: %s", i, ZSTD_isError(r) ? ZSTD_getErrorName(r) : "short");
		cr_assert_eq(memcmp(back, c->data + i * cluster, len), 0, "cluster %zu", i);
		for (size_t j = len; j < cluster; j++)
			cr_assert_eq(back[j], 0, "cluster %zu: padding", i);
	}
	free(out);
	free(back);
	free(lens);
	return NULL;
}

/* Text-like and random clusters, a short last one, three threads at once
 * (each with its own context). */
Test(compress, clusters_each_on_its_own)
{
	const size_t cluster = 65536, len = 40 * cluster + 1234;
	uint8_t *data = malloc(len);
	pthread_t th[3];
	struct compress_caller callers[3];

	for (size_t i = 0; i < len; i++)
		data[i] = (i / cluster) % 3 == 2 ? (uint8_t)(rand() & 0xff) : (uint8_t)("fleece backup "[i % 14]);
	for (int i = 0; i < 3; i++) {
		callers[i] = (struct compress_caller){ data, len - (size_t)i * cluster };
		pthread_create(&th[i], NULL, compress_and_check, &callers[i]);
	}
	for (int i = 0; i < 3; i++)
		pthread_join(th[i], NULL);
	free(data);
}
#endif

/* ---- reading compressed clusters and manifests ------------------------------ */

#include <zlib.h>

#include "fleecefs/compress.h"
#include "fleecefs/manifest.h"

/* What qemu-img writes for zlib: raw deflate with a 4 KiB window. */
static size_t deflate_cluster(const uint8_t *in, size_t len, uint8_t *out, size_t outlen)
{
	z_stream z = { 0 };
	cr_assert_eq(deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY), Z_OK);
	z.next_in = (Bytef *)(uintptr_t)in;
	z.avail_in = (uInt)len;
	z.next_out = out;
	z.avail_out = (uInt)outlen;
	cr_assert_eq(deflate(&z, Z_FINISH), Z_STREAM_END);
	size_t n = outlen - z.avail_out;
	deflateEnd(&z);
	return n;
}

Test(decompress, zlib_clusters_and_damage)
{
	const size_t cluster = 65536;
	uint8_t *in = malloc(cluster), *packed = calloc(1, 2 * cluster), *out = malloc(cluster);
	for (size_t i = 0; i < cluster; i++)
		in[i] = (uint8_t)("qcow2 zlib cluster "[i % 19]);
	size_t n = deflate_cluster(in, cluster, packed, 2 * cluster);
	/* The descriptor's range ends on a sector: trailing bytes are fine. */
	cr_assert_eq(decompress_cluster(QCOW2_COMPRESSION_ZLIB, packed, (n + 511) / 512 * 512, out, cluster), 0);
	cr_assert_eq(memcmp(in, out, cluster), 0);
	/* Cut short, or garbage: not a whole cluster. */
	cr_assert_eq(decompress_cluster(QCOW2_COMPRESSION_ZLIB, packed, n / 2, out, cluster), -EBADMSG);
	memset(packed, 0xff, 64);
	cr_assert_eq(decompress_cluster(QCOW2_COMPRESSION_ZLIB, packed, n, out, cluster), -EBADMSG);
	free(in);
	free(packed);
	free(out);
}

Test(decompress, zstd_clusters_round_trip)
{
	const size_t cluster = 65536;
	uint8_t *in = malloc(cluster), *packed = calloc(1, cluster), *out = malloc(cluster);
	size_t len = 0;
	for (size_t i = 0; i < cluster; i++)
		in[i] = (uint8_t)("zstd "[i % 5]);
	int rc = compress_clusters(0, cluster, in, cluster, packed, &len);
	if (!compress_available()) {
		cr_assert_eq(rc, -EOPNOTSUPP);
		cr_assert_eq(decompress_cluster(QCOW2_COMPRESSION_ZSTD, packed, 512, out, cluster), -EOPNOTSUPP);
	} else {
		cr_assert_eq(rc, 0);
		cr_assert(len > 0 && len < cluster);
		cr_assert_eq(decompress_cluster(QCOW2_COMPRESSION_ZSTD, packed, (len + 511) / 512 * 512, out, cluster), 0);
		cr_assert_eq(memcmp(in, out, cluster), 0);
		cr_assert_eq(decompress_cluster(QCOW2_COMPRESSION_ZSTD, packed, len / 2, out, cluster), -EBADMSG);
	}
	free(in);
	free(packed);
	free(out);
}

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	cr_assert(f);
	fputs(text, f);
	fclose(f);
}

Test(manifest, load_reads_and_refuses)
{
	char dir[] = "/tmp/fleecefs-manifest-XXXXXX", path[100], err[300];
	struct manifest_file m;
	cr_assert(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/t.xxh3", dir);

	write_text(path, "fleecefs-manifest 1\nalgorithm=xxh3-64\nformat=qcow2\nstate=partial\nsize=5000\n"
			 "cluster_size=4096\nclusters=2\nfuture=1\n00000000000000aa\nffffffffffffffff\n");
	cr_assert_eq(manifest_load(path, &m, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(m.size, 5000);
	cr_assert_eq(m.cluster_size, 4096);
	cr_assert_eq(m.nclusters, 2);
	cr_assert(m.partial);
	cr_assert_str_eq(m.format, "qcow2");
	cr_assert_eq(m.hashes[0], 0xaa);
	cr_assert_eq(m.hashes[1], UINT64_MAX);
	manifest_file_free(&m);

	struct { const char *text, *words; } bad[] = {
		{ "not a manifest\n", "line 1" },
		{ "fleecefs-manifest 1\nalgorithm=md5\nsize=1\ncluster_size=1\nclusters=1\n0000000000000001\n", "algorithm md5" },
		{ "fleecefs-manifest 1\nalgorithm=xxh3-64\nsize=5000\ncluster_size=4096\nclusters=3\n", "disagree" },
		{ "fleecefs-manifest 1\nalgorithm=xxh3-64\nsize=5000\ncluster_size=4096\nclusters=2\n"
		  "0000000000000001\n", "1 checksums for 2 clusters" },
		{ "fleecefs-manifest 1\nalgorithm=xxh3-64\nsize=10\ncluster_size=4096\nclusters=1\n"
		  "000000000000000g\n", "line 6: not a checksum" },
		{ "fleecefs-manifest 1\nalgorithm=xxh3-64\nsize=10\ncluster_size=4096\nclusters=1\n"
		  "0000000000000001\n0000000000000002\n", "more checksums than clusters" },
		{ "fleecefs-manifest 1\nalgorithm=xxh3-64\nsize=10\ncluster_size=4096\nclusters=1\n"
		  "0000000000000001", "cut short" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		write_text(path, bad[i].text);
		cr_assert_eq(manifest_load(path, &m, err, sizeof(err)), -EINVAL, "case %zu", i);
		cr_assert(strstr(err, bad[i].words), "case %zu: '%s' lacks '%s'", i, err, bad[i].words);
		cr_assert_null(m.hashes);
	}
	unlink(path);
	cr_assert_eq(manifest_load(path, &m, err, sizeof(err)), -ENOENT);
	rmdir(dir);
}
