/* Unit tests for manifests (src/manifest.c): what a job sets, zeroes and
 * forgets is what the written manifest says, an update starts from the old
 * checksums and forgets back to them, and the checksums of a 1 TiB image are
 * not held in the daemon's memory (its resident size grows by the `hashed`
 * bitmap, not by 8 bytes per cluster). */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/manifest.h"

#define CS 4096u

static char dir[] = "/tmp/fleecefs-manifest-test.XXXXXX";
static char path[256], temp[256];
static char err[400];

static void setup(void)
{
	cr_assert_not_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/t.raw.xxh3", dir);
	snprintf(temp, sizeof(temp), "%s/.t.raw.xxh3.tmp", dir);
}

static void teardown(void)
{
	unlink(path);
	unlink(temp);
	cr_assert_eq(rmdir(dir), 0, "the table left no file behind");
}

TestSuite(manifest, .init = setup, .fini = teardown);

static uint64_t sum_of(const void *data, size_t len) { return XXH3_64bits(data, len); }

/* A new manifest of `size` bytes, `count` clusters from `first` set to `fill`. */
static struct manifest *new_with(uint64_t size, uint64_t first, uint64_t count, int fill)
{
	struct manifest *m;
	cr_assert_eq(manifest_create(temp, CS, &m, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(manifest_set_size(m, size, err, sizeof(err)), 0, "%s", err);
	if (count) {
		unsigned char *data = malloc(count * CS);
		memset(data, fill, count * CS);
		cr_assert_eq(manifest_set_run(m, first, count, data, count * CS), 0);
		free(data);
	}
	return m;
}

static void publish(struct manifest *m)
{
	cr_assert_eq(manifest_write(m), 0);
	cr_assert_eq(manifest_publish(m, path, true), 0);
	manifest_free(m);
}

Test(manifest, set_zeroed_and_forgotten_clusters_are_written_as_such)
{
	unsigned char zero[CS] = { 0 }, ones[CS], twos[CS];
	memset(ones, 1, CS);
	memset(twos, 2, CS);
	/* 10 clusters, the last one 100 bytes. */
	struct manifest *m = new_with(9 * CS + 100, 0, 4, 1);
	cr_assert_eq(manifest_set_run(m, 9, 1, twos, 100), 0);
	manifest_set_zeroes(m, 1, 1);
	struct cbitmap left;
	cr_assert_eq(cbitmap_init(&left, 10, false), 0);
	cbitmap_set(&left, 2);
	cr_assert_eq(manifest_forget(m, &left), 0);
	cbitmap_destroy(&left);
	publish(m);

	struct manifest_file f;
	cr_assert_eq(manifest_load(path, &f, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(f.nclusters, 10);
	cr_assert_eq(f.size, 9 * CS + 100);
	cr_assert_eq(f.hashes[0], sum_of(ones, CS));
	cr_assert_eq(f.hashes[1], sum_of(zero, CS), "a hole at T");
	cr_assert_eq(f.hashes[2], sum_of(zero, CS), "forgotten: reads as zeroes again");
	cr_assert_eq(f.hashes[3], sum_of(ones, CS));
	cr_assert_eq(f.hashes[4], sum_of(zero, CS), "never copied");
	cr_assert_eq(f.hashes[9], sum_of(twos, 100), "the short last cluster");
	manifest_file_free(&f);
}

Test(manifest, an_update_starts_from_the_old_sums_and_forgets_back_to_them)
{
	unsigned char ones[CS], threes[CS], zero[CS] = { 0 };
	memset(ones, 1, CS);
	memset(threes, 3, CS);
	publish(new_with(8 * CS, 0, 8, 1));

	struct manifest *m;
	cr_assert_eq(manifest_open_update(path, temp, CS, &m, err, sizeof(err)), 0, "%s", err);
	cr_assert_neq(manifest_set_size(m, 9 * CS, err, sizeof(err)), 0, "an update keeps its size");
	cr_assert_eq(manifest_set_size(m, 8 * CS, err, sizeof(err)), 0, "%s", err);
	unsigned char data[3 * CS];
	memset(data, 3, sizeof(data));
	cr_assert_eq(manifest_set_run(m, 2, 3, data, sizeof(data)), 0);
	manifest_set_zeroes(m, 7, 1);
	struct cbitmap left;
	cr_assert_eq(cbitmap_init(&left, 8, false), 0);
	cbitmap_set(&left, 3);
	cr_assert_eq(manifest_forget(m, &left), 0);
	cbitmap_destroy(&left);
	publish(m);

	struct manifest_file f;
	cr_assert_eq(manifest_load(path, &f, err, sizeof(err)), 0, "%s", err);
	uint64_t want[8];
	for (int c = 0; c < 8; c++)
		want[c] = sum_of(ones, CS);
	want[2] = want[4] = sum_of(threes, CS);
	want[7] = sum_of(zero, CS);
	for (int c = 0; c < 8; c++)
		cr_assert_eq(f.hashes[c], want[c], "cluster %d", c);
	manifest_file_free(&f);
}

static long rss_kib(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long kib = -1;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld", &kib) == 1)
			break;
	if (f)
		fclose(f);
	return kib;
}

Test(manifest, the_sums_of_a_terabyte_are_not_in_memory)
{
	/* 64 KiB clusters of 1 TiB: 16 Mi clusters, 128 MiB of checksums; 16384
	 * scattered ones touch a page of an in-memory table each (64 MiB). */
	const uint64_t cs = 65536, size = 1ull << 40, n = size / cs;
	static unsigned char data[65536];
	struct manifest *m;
	long before = rss_kib();

	cr_assert_eq(manifest_create(temp, (uint32_t)cs, &m, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(manifest_set_size(m, size, err, sizeof(err)), 0, "%s", err);
	srand(15);
	for (int i = 0; i < 16384; i++) {
		data[0] = (unsigned char)i;
		uint64_t c = ((uint64_t)rand() * 65536u + (uint64_t)rand()) % n;
		cr_assert_eq(manifest_set_run(m, c, 1, data, cs), 0);
	}
	long grown = rss_kib() - before;
	manifest_discard(m);
	manifest_free(m);
	/* The `hashed` bitmap (2 MiB) and slack. */
	cr_assert_lt(grown, 8 * 1024, "resident size grew by %ld KiB", grown);
}
