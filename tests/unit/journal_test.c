/* Unit tests for the undo journal over any journal_file (src/journal.c): an
 * in-memory "export" stands for what target-nbd.c hands it. Saved clusters
 * come back on rollback (all, or only the chosen ones), zero clusters come
 * back as zeroes through the file's zero op, every rollback ends with the
 * file's sync, a journal left by a crash is applied by journal_recover_on,
 * and one recorded for another file is refused and changes nothing. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/journal.h"

#define CS 4096u
#define SIZE (64u * CS)

struct memfile {
	unsigned char data[SIZE];
	unsigned syncs, zeroes;
};

static int mf_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
	struct memfile *m = ctx;
	cr_assert_leq(off + len, SIZE);
	memcpy(buf, m->data + off, len);
	return 0;
}
static int mf_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
	struct memfile *m = ctx;
	cr_assert_leq(off + len, SIZE);
	memcpy(m->data + off, buf, len);
	return 0;
}
static int mf_zero(void *ctx, uint64_t off, uint64_t len)
{
	struct memfile *m = ctx;
	memset(m->data + off, 0, len);
	m->zeroes++;
	return 0;
}
static int mf_sync(void *ctx)
{
	((struct memfile *)ctx)->syncs++;
	return 0;
}

static struct memfile mem;
static unsigned char original[SIZE];
static char dir[64], path[128];
static char err[300];

static struct journal_file file_for(uint64_t ino)
{
	return (struct journal_file){ .read = mf_read, .write = mf_write, .zero = mf_zero, .sync = mf_sync,
				      .ctx = &mem, .dev = 0, .ino = ino };
}

static void setup(void)
{
	srand(7);
	for (unsigned i = 0; i < SIZE; i++)
		mem.data[i] = (unsigned char)rand();
	memset(mem.data + 8 * CS, 0, 2 * CS);   /* two zero clusters */
	memcpy(original, mem.data, SIZE);
	mem.syncs = mem.zeroes = 0;
	snprintf(dir, sizeof(dir), "/tmp/journal_test.XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/j", dir);
}

static void teardown(void)
{
	unlink(path);
	rmdir(dir);
}

/* The writes an incremental makes: protect, then overwrite. */
static void overwrite(struct journal *j, uint64_t off, uint64_t len)
{
	struct journal_range r = { off, len };
	cr_assert_eq(journal_protect(j, &r, 1), 0);
	cr_assert(journal_covers(j, off, len));
	memset(mem.data + off, 0xAB, len);
}

TestSuite(journal, .init = setup, .fini = teardown);

Test(journal, rollback_restores_every_saved_cluster_then_syncs)
{
	struct journal_file f = file_for(42);
	struct journal *j;
	cr_assert_eq(journal_create_on(path, &f, SIZE, CS, &j, err, sizeof(err)), 0, "%s", err);
	overwrite(j, 100, 3 * CS);         /* unaligned: clusters 0..3 */
	overwrite(j, 8 * CS, 2 * CS);      /* the zero clusters */
	overwrite(j, 40 * CS + 5, 10);
	cr_assert_neq(memcmp(mem.data, original, SIZE), 0);
	unsigned syncs = mem.syncs;
	cr_assert_eq(journal_rollback(j, NULL), 0);
	cr_assert_eq(memcmp(mem.data, original, SIZE), 0, "rollback did not restore the file");
	cr_assert_gt(mem.zeroes, 0, "zero clusters are restored through the zero op");
	cr_assert_eq(mem.syncs, syncs + 1, "a rollback ends with one sync of the file");
	cr_assert_eq(journal_close(j, true), 0);
	cr_assert_neq(access(path, F_OK), 0, "the journal is removed");
}

Test(journal, rollback_of_chosen_clusters_only)
{
	struct journal_file f = file_for(42);
	struct journal *j;
	struct cbitmap only;
	cr_assert_eq(journal_create_on(path, &f, SIZE, CS, &j, err, sizeof(err)), 0, "%s", err);
	overwrite(j, 0, 4 * CS);
	cr_assert_eq(cbitmap_init(&only, SIZE / CS, false), 0);
	cbitmap_set(&only, 1);
	cbitmap_set(&only, 3);
	cr_assert_eq(journal_rollback(j, &only), 0);
	cr_assert_eq(memcmp(mem.data + CS, original + CS, CS), 0);
	cr_assert_eq(memcmp(mem.data + 3 * CS, original + 3 * CS, CS), 0);
	cr_assert_eq(mem.data[0], 0xAB, "cluster 0 was not chosen and keeps its new content");
	cr_assert_eq(mem.data[2 * CS], 0xAB);
	cbitmap_destroy(&only);
	journal_close(j, true);
}

Test(journal, a_journal_left_by_a_crash_is_recovered_on_its_own_file_only)
{
	struct journal_file f = file_for(42), other = file_for(43);
	struct journal *j;
	cr_assert_eq(journal_create_on(path, &f, SIZE, CS, &j, err, sizeof(err)), 0, "%s", err);
	overwrite(j, 10 * CS, 5 * CS);
	journal_close(j, false);           /* the daemon died: the file stays */
	unsigned char mixed[SIZE];
	memcpy(mixed, mem.data, SIZE);
	cr_assert_eq(journal_recover_on(path, &other, err, sizeof(err)), -EINVAL);
	cr_assert(strstr(err, "another file"), "%s", err);
	cr_assert_eq(memcmp(mem.data, mixed, SIZE), 0, "a refused journal changed the file");
	cr_assert_eq(journal_recover_on(path, &f, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(memcmp(mem.data, original, SIZE), 0, "recovery did not restore the file");
	cr_assert_eq(journal_recover_on("/nonexistent/j", &f, err, sizeof(err)), -ENOENT);
}
