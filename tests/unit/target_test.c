/* Unit tests for what the file targets share (src/target.c): the writeback
 * rounds of a long copy, on a real file in the build directory, with the
 * page cache as the judge (mincore). */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "fleecefs/target.h"
#include "fleecefs/util.h"

#define ROUND (1u << 20)

static int fd = -1;
static struct target tgt;   /* only its writeback_error is used */
static char path[] = "target_test.XXXXXX";

static void make_file(void)
{
	struct statfs sf;
	fd = mkstemp(path);
	cr_assert(fd >= 0);
	cr_assert(fstatfs(fd, &sf) == 0);
	/* tmpfs keeps its pages whatever we ask: nothing to judge there. */
	cr_assert(sf.f_type != TMPFS_MAGIC, "the build directory is on tmpfs: run the tests from a disk");
}

static void remove_file(void)
{
	if (fd >= 0)
		close(fd);
	unlink(path);
}

static void write_round(unsigned n)
{
	static char buf[ROUND];
	memset(buf, 'a' + (int)n, sizeof(buf));
	cr_assert(pwrite_full(fd, buf, sizeof(buf), (off_t)n * ROUND) == (ssize_t)sizeof(buf));
}

/* Pages of round n still in the page cache. */
static unsigned resident_pages(unsigned n)
{
	long page = sysconf(_SC_PAGESIZE);
	unsigned char vec[ROUND / 4096];
	void *map = mmap(NULL, ROUND, PROT_READ, MAP_SHARED, fd, (off_t)n * ROUND);
	cr_assert(map != MAP_FAILED);
	cr_assert(mincore(map, ROUND, vec) == 0);
	unsigned count = 0;
	for (unsigned i = 0; i < ROUND / (unsigned)page; i++)
		count += vec[i] & 1;
	munmap(map, ROUND);
	return count;
}

TestSuite(target_file_writeback, .init = make_file, .fini = remove_file);

/* The second call waits for the first round's writeback: its pages are
 * clean by then and leave the cache (a fresh backup is not read soon). Were
 * the wait missing, they would still be under writeback and stay. */
Test(target_file_writeback, the_next_round_waits_for_the_last_and_drops_it)
{
	write_round(0);
	target_file_writeback(&tgt, fd);
	write_round(1);
	target_file_writeback(&tgt, fd);
	cr_expect_eq(resident_pages(0), 0, "round 0 was on the disk and should have left the cache");
	write_round(2);
	target_file_writeback(&tgt, fd);
	cr_expect_eq(resident_pages(1), 0);
	/* What the rounds wrote reads back. */
	char c;
	cr_assert(pread(fd, &c, 1, 2 * ROUND - 1) == 1);
	cr_expect_eq(c, 'b');
}

/* Waiting for a round consumes the file's writeback error (fdatasync on the
 * same open file would not see it again): the flush must still fail. */
Test(target_file_writeback, a_lost_round_fails_the_flush)
{
	write_round(0);
	cr_expect_eq(target_file_sync(&tgt, fd), 0);
	atomic_store(&tgt.writeback_error, -EIO);
	write_round(1);
	cr_expect_eq(target_file_sync(&tgt, fd), -EIO, "fdatasync succeeds, but a round was lost");
}
