/* Unit tests for the copy engine (src/blockcopy.c) against an in-memory
 * source and target: a full copy, copy-before-write keeping T, a guest write
 * and the background copy meeting on one cluster in both orders (made
 * deterministic by a source whose reads can be held), a failed read left
 * pending, write-through under break-guest-write, progress that counts
 * only what reached the target, and runs shared instead of copied (reflink)
 * with their fallbacks. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleecefs/blockcopy.h"
#include "fleecefs/source.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

#define CS 4096u
#define NCL 64u
#define SIZE ((uint64_t)CS * NCL)

/* ---- an in-memory source whose reads of one cluster can be held ------------- */

struct mem_source {
	struct copy_source base;
	unsigned char *data;
	pthread_mutex_t lock;
	pthread_cond_t changed;
	int64_t hold_cluster;        /* a read touching it waits for release */
	bool holding, released;
	int fail_reads;              /* the next N reads fail with EIO */
	atomic_uint reads;
	int clone_error;             /* what clones return (0: they share) */
	int clone_errors_left;       /* ... this many times (-1: always) */
	atomic_uint clones;
};

static struct mem_source src;

static int mem_read(struct copy_source *s, void *buf, uint64_t off, uint64_t len)
{
	struct mem_source *m = (struct mem_source *)s;
	atomic_fetch_add(&m->reads, 1);
	pthread_mutex_lock(&m->lock);
	if (m->fail_reads > 0) {
		m->fail_reads--;
		pthread_mutex_unlock(&m->lock);
		return -EIO;
	}
	if (m->hold_cluster >= 0 && off <= (uint64_t)m->hold_cluster * CS &&
	    (uint64_t)m->hold_cluster * CS < off + len) {
		m->holding = true;
		pthread_cond_broadcast(&m->changed);
		while (!m->released)
			pthread_cond_wait(&m->changed, &m->lock);
		m->hold_cluster = -1;
	}
	/* Copied under the lock: a test "guest write" changes data under it. */
	memcpy(buf, m->data + off, (size_t)min_u64(len, SIZE - off));
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static bool mem_has_data(struct copy_source *s, uint64_t off, uint64_t len)
{
	(void)s;
	(void)off;
	(void)len;
	return true;
}

static int64_t mem_seek(struct copy_source *s, uint64_t off, int whence)
{
	(void)s;
	return whence == SEEK_DATA ? (int64_t)off : (int64_t)SIZE;
}

struct mem_target;
static struct mem_target tgt;

/* "Sharing" the source's bytes: the target gets them without a read. */
static int mem_clone_to(struct copy_source *s, struct target *t, uint64_t off, uint64_t len);

static const struct copy_source_ops mem_source_ops = {
	.read = mem_read, .has_data = mem_has_data, .seek = mem_seek, .clone_to = mem_clone_to,
};

/* The guest changes [off, off + len) of the source (after before_write). */
static void guest_change(uint64_t off, uint64_t len, unsigned char byte)
{
	pthread_mutex_lock(&src.lock);
	memset(src.data + off, byte, (size_t)len);
	pthread_mutex_unlock(&src.lock);
}

static void wait_holding(void)
{
	pthread_mutex_lock(&src.lock);
	while (!src.holding)
		pthread_cond_wait(&src.changed, &src.lock);
	pthread_mutex_unlock(&src.lock);
}

static void release_hold(void)
{
	pthread_mutex_lock(&src.lock);
	src.released = true;
	pthread_cond_broadcast(&src.changed);
	pthread_mutex_unlock(&src.lock);
}

/* ---- an in-memory target ------------------------------------------------------- */

struct mem_target {
	struct target base;
	unsigned char *data;
	pthread_mutex_t lock;
	pthread_cond_t changed;
	bool block_writes;           /* writes wait while set */
	atomic_uint writes;
};

static int mem_clone_to(struct copy_source *s, struct target *t, uint64_t off, uint64_t len)
{
	struct mem_source *m = (struct mem_source *)s;
	struct mem_target *mt = (struct mem_target *)t;
	atomic_fetch_add(&m->clones, 1);
	if (m->clone_error && m->clone_errors_left) {
		if (m->clone_errors_left > 0)
			m->clone_errors_left--;
		return m->clone_error;
	}
	pthread_mutex_lock(&m->lock);
	pthread_mutex_lock(&mt->lock);
	memcpy(mt->data + off, m->data + off, (size_t)len);
	pthread_mutex_unlock(&mt->lock);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

/* Never called: mem_clone_to does the sharing; its presence says "can". */
static int mem_clone_range(struct target *t, int src_fd, uint64_t off, uint64_t len)
{
	(void)t;
	(void)src_fd;
	(void)off;
	(void)len;
	return -EOPNOTSUPP;
}

static int mem_write(struct target *t, uint64_t off, const void *buf, size_t len, unsigned flags)
{
	(void)flags;
	struct mem_target *m = (struct mem_target *)t;
	pthread_mutex_lock(&m->lock);
	while (m->block_writes)
		pthread_cond_wait(&m->changed, &m->lock);
	memcpy(m->data + off, buf, len);
	atomic_fetch_add(&m->writes, 1);
	pthread_cond_broadcast(&m->changed);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int mem_write_zeroes(struct target *t, uint64_t off, uint64_t len)
{
	struct mem_target *m = (struct mem_target *)t;
	pthread_mutex_lock(&m->lock);
	memset(m->data + off, 0, (size_t)len);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int mem_set_size(struct target *t, uint64_t size, char *err, size_t errlen)
{
	(void)err;
	(void)errlen;
	t->size = size;
	return 0;
}

static int mem_flush(struct target *t) { (void)t; return 0; }
static int mem_close(struct target *t, bool keep) { (void)t; (void)keep; return 0; }
static void mem_free(struct target *t) { (void)t; }

static const struct target_ops mem_target_ops = {
	.write = mem_write,
	.clone_range = mem_clone_range,
	.write_zeroes = mem_write_zeroes,
	.set_size = mem_set_size,
	.flush = mem_flush,
	.close = mem_close,
	.free = mem_free,
};

static void unblock_writes(void)
{
	pthread_mutex_lock(&tgt.lock);
	tgt.block_writes = false;
	pthread_cond_broadcast(&tgt.changed);
	pthread_mutex_unlock(&tgt.lock);
}

/* ---- fixture --------------------------------------------------------------------- */

static struct blockcopy bc;
static unsigned char at_t[SIZE];

static void setup(void)
{
	memset(&src, 0, sizeof(src));
	src.base.ops = &mem_source_ops;
	src.data = malloc(SIZE);
	for (uint64_t i = 0; i < SIZE; i++)
		src.data[i] = (unsigned char)(1 + (i * 7 + i / CS) % 251);   /* no zero cluster */
	memcpy(at_t, src.data, SIZE);
	pthread_mutex_init(&src.lock, NULL);
	pthread_cond_init(&src.changed, NULL);
	src.hold_cluster = -1;
	memset(&tgt, 0, sizeof(tgt));
	tgt.base.ops = &mem_target_ops;
	tgt.base.size = SIZE;
	tgt.data = calloc(1, SIZE);
	pthread_mutex_init(&tgt.lock, NULL);
	pthread_cond_init(&tgt.changed, NULL);
	cr_assert_eq(blockcopy_init(&bc, &src.base, &tgt.base, NULL, SIZE, CS, NULL, NULL), 0);
}

static void teardown(void)
{
	unblock_writes();
	release_hold();
	blockcopy_destroy(&bc);
	free(src.data);
	free(tgt.data);
}

TestSuite(blockcopy, .init = setup, .fini = teardown, .timeout = 30);

/* Copies in the background until nothing is left, then drains. */
static void copy_all(void)
{
	struct blockcopy_error e;
	uint64_t cursor = 0, read = 0;
	for (int i = 0; i < 10000 && blockcopy_pending_clusters(&bc); i++) {
		int64_t n = blockcopy_copy_next(&bc, &cursor, 8 * CS, &read, &e);
		cr_assert_geq(n, 0, "copy_next failed: %d", e.err);
		if (n == 0)
			cursor = 0;
	}
	cr_assert_eq(blockcopy_pending_clusters(&bc), 0);
	cr_assert_eq(blockcopy_drain(&bc, NULL, NULL, NULL), 0);
}

Test(blockcopy, full_copy_is_the_source)
{
	copy_all();
	cr_assert_eq(memcmp(tgt.data, at_t, SIZE), 0);
	cr_assert_eq(atomic_load(&bc.bytes_done), SIZE);
}

Test(blockcopy, copy_before_write_keeps_t)
{
	struct blockcopy_error e;
	/* The guest writes clusters 3..5 and an unaligned range over 10|11. */
	cr_assert_eq(blockcopy_before_write(&bc, 3 * CS, 3 * CS, 0, &e), 0);
	guest_change(3 * CS, 3 * CS, 0xee);
	cr_assert_eq(blockcopy_before_write(&bc, 11 * CS - 100, 200, 0, &e), 0);
	guest_change(11 * CS - 100, 200, 0xdd);
	cr_assert(!blockcopy_needs_copy(&bc, 3 * CS, 3 * CS), "copied clusters need no copy again");
	copy_all();
	cr_assert_eq(memcmp(tgt.data, at_t, SIZE), 0, "the target is the source at T");
	cr_assert_eq(atomic_load(&bc.cbw_bytes), 5 * CS);
}

static atomic_bool guest_done;

static void *guest_writes_cluster_7(void *arg)
{
	struct blockcopy_error e;
	(void)arg;
	cr_assert_eq(blockcopy_before_write(&bc, 7 * CS + 10, 10, 0, &e), 0);
	guest_change(7 * CS + 10, 10, 0x55);
	atomic_store(&guest_done, true);
	return NULL;
}

static void *background_from_7(void *arg)
{
	struct blockcopy_error e;
	uint64_t cursor = 7 * CS, read = 0;
	(void)arg;
	cr_assert_gt(blockcopy_copy_next(&bc, &cursor, CS, &read, &e), 0);
	return NULL;
}

Test(blockcopy, guest_write_waits_for_the_background_copy_of_its_cluster)
{
	pthread_t bg, guest;

	/* The background copy claims cluster 7 and is held inside its read. */
	src.hold_cluster = 7;
	pthread_create(&bg, NULL, background_from_7, NULL);
	wait_holding();
	/* The guest's write to cluster 7 must wait for that copy. */
	atomic_store(&guest_done, false);
	pthread_create(&guest, NULL, guest_writes_cluster_7, NULL);
	sleep_until_ns(clock_monotonic_ns() + 100000000ull);
	cr_assert(!atomic_load(&guest_done), "the guest wrote while its cluster was being copied");
	release_hold();
	pthread_join(bg, NULL);
	pthread_join(guest, NULL);
	cr_assert(atomic_load(&guest_done));
	copy_all();
	cr_assert_eq(memcmp(tgt.data, at_t, SIZE), 0, "the target holds T for cluster 7");
	cr_assert_eq(atomic_load(&bc.cbw_bytes), 0, "the guest copied nothing: the background had it");
}

static void *guest_copy_held(void *arg)
{
	struct blockcopy_error e;
	(void)arg;
	cr_assert_eq(blockcopy_before_write(&bc, 7 * CS, CS, 0, &e), 0);
	guest_change(7 * CS, CS, 0x77);
	atomic_store(&guest_done, true);
	return NULL;
}

Test(blockcopy, background_copy_steps_over_a_cluster_the_guest_copies)
{
	pthread_t guest;
	struct blockcopy_error e;
	uint64_t cursor = 7 * CS, read = 0;

	/* The guest's copy-before-write claims cluster 7 and is held reading. */
	src.hold_cluster = 7;
	atomic_store(&guest_done, false);
	pthread_create(&guest, NULL, guest_copy_held, NULL);
	wait_holding();
	/* The background copy does not wait: it copies what comes next. */
	int64_t n = blockcopy_copy_next(&bc, &cursor, CS, &read, &e);
	cr_assert_eq(n, CS);
	cr_assert_eq(cursor, 9 * CS, "the background copied cluster 8, not the claimed 7");
	cr_assert(!atomic_load(&guest_done));
	release_hold();
	pthread_join(guest, NULL);
	copy_all();
	cr_assert_eq(memcmp(tgt.data, at_t, SIZE), 0);
	cr_assert_eq(atomic_load(&bc.cbw_bytes), CS);
}

Test(blockcopy, a_failed_read_stays_pending_and_is_copied_again)
{
	struct blockcopy_error e;
	uint64_t cursor = 0, read = 0;

	src.fail_reads = 1;
	cr_assert_eq(blockcopy_copy_next(&bc, &cursor, CS, &read, &e), -EIO);
	cr_assert(!e.target, "a read error is the source's");
	cr_assert(blockcopy_needs_copy(&bc, 0, 1), "cluster 0 is still pending");
	cr_assert_eq(blockcopy_before_write(&bc, 0, 1, 0, &e), 0, "a guest write copies it then");
	guest_change(0, 1, 0);
	copy_all();
	cr_assert_eq(memcmp(tgt.data, at_t, SIZE), 0);
}

Test(blockcopy, progress_counts_only_what_reached_the_target)
{
	struct blockcopy_error e;
	uint64_t cursor = 0, read = 0;

	/* Writes hang: the background copy's chunks stay queued. */
	tgt.block_writes = true;
	cr_assert_eq(blockcopy_copy_next(&bc, &cursor, 4 * CS, &read, &e), 4 * CS);
	cr_assert_eq(blockcopy_pending_clusters(&bc), NCL - 4, "the chunk is safe (queued)");
	cr_assert_eq(atomic_load(&bc.bytes_done), 0, "queued is not done");
	unblock_writes();
	cr_assert_eq(blockcopy_drain(&bc, NULL, NULL, NULL), 0);
	cr_assert_eq(atomic_load(&bc.bytes_done), 4 * CS);
}

static void *guest_write_through(void *arg)
{
	struct blockcopy_error e;
	(void)arg;
	cr_assert_eq(blockcopy_before_write(&bc, 20 * CS, CS, 0, &e), 0);
	atomic_store(&guest_done, true);
	return NULL;
}

Test(blockcopy, write_through_acknowledges_after_the_target_write)
{
	pthread_t guest;

	bc.cbw_write_through = true;
	tgt.block_writes = true;
	atomic_store(&guest_done, false);
	pthread_create(&guest, NULL, guest_write_through, NULL);
	sleep_until_ns(clock_monotonic_ns() + 100000000ull);
	cr_assert(!atomic_load(&guest_done), "the guest went on before its old data was in the target");
	cr_assert_eq(atomic_load(&tgt.writes), 0);
	unblock_writes();
	pthread_join(guest, NULL);
	cr_assert_eq(memcmp(tgt.data + 20 * CS, at_t + 20 * CS, CS), 0, "in the target when the guest goes on");
	cr_assert_eq(atomic_load(&bc.bytes_done), CS);
}

Test(blockcopy, wait_queued_holds_a_guest_until_the_queued_write)
{
	struct blockcopy_error e;
	uint64_t cursor = 30 * CS, read = 0;

	bc.cbw_write_through = true;
	tgt.block_writes = true;
	cr_assert_eq(blockcopy_copy_next(&bc, &cursor, CS, &read, &e), CS);
	cr_assert(!blockcopy_needs_copy(&bc, 30 * CS, CS), "cluster 30 is queued, not pending");
	unblock_writes();
	cr_assert_eq(blockcopy_wait_queued(&bc, 30 * CS, CS), 0);
	cr_assert_eq(memcmp(tgt.data + 30 * CS, at_t + 30 * CS, CS), 0);
}

Test(blockcopy, shared_runs_need_no_read_and_no_write)
{
	struct blockcopy_error e;

	blockcopy_allow_clone(&bc, true);
	cr_assert_eq(blockcopy_before_write(&bc, 3 * CS + 5, 2 * CS, 0, &e), 0);
	guest_change(3 * CS + 5, 2 * CS, 0xee);
	cr_assert(!blockcopy_needs_copy(&bc, 3 * CS, 3 * CS), "shared clusters are safe at once");
	cr_assert_eq(memcmp(tgt.data + 3 * CS, at_t + 3 * CS, 3 * CS), 0, "in the target, not queued");
	copy_all();
	cr_assert_eq(memcmp(tgt.data, at_t, SIZE), 0, "the target is the source at T");
	cr_assert_eq(atomic_load(&src.reads), 0);
	cr_assert_eq(atomic_load(&tgt.writes), 0);
	cr_assert_eq(atomic_load(&bc.bytes_cloned), SIZE);
	cr_assert_eq(atomic_load(&bc.bytes_done), SIZE);
	cr_assert_eq(atomic_load(&bc.cbw_bytes), 3 * CS);
}

Test(blockcopy, a_refused_clone_copies_and_stops_trying)
{
	struct blockcopy_error e;

	src.clone_error = -EOPNOTSUPP;
	src.clone_errors_left = -1;
	blockcopy_allow_clone(&bc, true);
	cr_assert_eq(blockcopy_before_write(&bc, 3 * CS, CS, 0, &e), 0);
	guest_change(3 * CS, CS, 0xee);
	copy_all();
	cr_assert_eq(memcmp(tgt.data, at_t, SIZE), 0);
	cr_assert_eq(atomic_load(&src.clones), 1, "one refusal is enough");
	cr_assert(!atomic_load(&bc.clone));
	cr_assert_eq(atomic_load(&bc.bytes_cloned), 0);
}

Test(blockcopy, a_failure_of_the_moment_copies_that_run_only)
{
	struct blockcopy_error e;

	src.clone_error = -EIO;
	src.clone_errors_left = 1;
	blockcopy_allow_clone(&bc, true);
	cr_assert_eq(blockcopy_before_write(&bc, 3 * CS, CS, 0, &e), 0);
	guest_change(3 * CS, CS, 0xee);
	copy_all();
	cr_assert_eq(memcmp(tgt.data, at_t, SIZE), 0);
	cr_assert(atomic_load(&bc.clone), "cloning goes on");
	cr_assert_eq(atomic_load(&bc.bytes_cloned), SIZE - CS, "all but the failed run shared");
	cr_assert_eq(atomic_load(&src.reads), 1, "the failed run was read and written instead");
}

Test(blockcopy, clone_off_copies)
{
	blockcopy_allow_clone(&bc, false);
	copy_all();
	cr_assert_eq(memcmp(tgt.data, at_t, SIZE), 0);
	cr_assert_eq(atomic_load(&src.clones), 0);
	cr_assert_eq(atomic_load(&bc.bytes_cloned), 0);
}
