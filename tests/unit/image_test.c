/* Unit tests for the image module (src/image.c): guest I/O through the
 * backend, hooks before and after a write, the backend replaced with the
 * gate closed, guest reads inside the gate, busy counting. Real files in a
 * temporary directory (the module does I/O on descriptors). */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/image.h"
#include "fleecefs/util.h"

static char dir[64];
static char path_a[128], path_b[128];

static void make_file(const char *path, char fill, size_t size)
{
	char *buf = malloc(size);
	memset(buf, fill, size);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	cr_assert(fd >= 0);
	cr_assert_eq(pwrite(fd, buf, size, 0), (ssize_t)size);
	close(fd);
	free(buf);
}

static void setup(void)
{
	snprintf(dir, sizeof(dir), "/tmp/fleecefs-image-test.XXXXXX");
	cr_assert(mkdtemp(dir));
	snprintf(path_a, sizeof(path_a), "%s/a.img", dir);
	snprintf(path_b, sizeof(path_b), "%s/b.img", dir);
	make_file(path_a, 'a', 65536);
	make_file(path_b, 'b', 65536);
}

static void teardown(void)
{
	unlink(path_a);
	unlink(path_b);
	rmdir(dir);
}

TestSuite(image, .init = setup, .fini = teardown, .timeout = 20);

static struct image *open_image(const char *path)
{
	int fd = open(path, O_RDONLY);
	struct image *img;
	cr_assert(fd >= 0);
	cr_assert_eq(image_get(fd, &img), 0);
	close(fd);
	return img;
}

/* A hook that records what it saw, and can refuse. */
struct recorder {
	struct image_hook hook;
	uint64_t before_off, before_len, after_off, after_len;
	int64_t after_result;
	int before_calls, after_calls;
	int refuse;          /* -errno to return from before_write */
};

static int rec_before(struct image_hook *h, uint64_t off, uint64_t len)
{
	struct recorder *r = (struct recorder *)h;
	r->before_calls++;
	r->before_off = off;
	r->before_len = len;
	return r->refuse;
}

static void rec_after(struct image_hook *h, uint64_t off, uint64_t len, const void *buf, int64_t result)
{
	struct recorder *r = (struct recorder *)h;
	(void)buf;
	r->after_calls++;
	r->after_off = off;
	r->after_len = len;
	r->after_result = result;
}

Test(image, one_object_per_file)
{
	struct image *x = open_image(path_a), *y = open_image(path_a), *z = open_image(path_b);
	cr_assert_eq(x, y, "two opens of one file share the image");
	cr_assert_neq(x, z);
	image_put(x);
	image_put(y);
	image_put(z);
}

Test(image, read_write_through_kinds)
{
	struct image *img = open_image(path_a);
	unsigned rw = image_io_kind(O_RDWR), ro = image_io_kind(O_RDONLY), direct = image_io_kind(O_RDWR | O_DIRECT);
	char buf[4096] __attribute__((aligned(4096)));

	cr_assert_eq(rw, IMAGE_IO_WRITE);
	cr_assert_eq(ro, 0);
	cr_assert_eq(direct, IMAGE_IO_WRITE | IMAGE_IO_DIRECT);
	cr_assert_eq(image_io_kind(O_WRONLY | O_SYNC), IMAGE_IO_WRITE | IMAGE_IO_SYNC);
	cr_assert_eq(image_io_kind(O_RDWR | O_DSYNC), IMAGE_IO_WRITE | IMAGE_IO_DSYNC);
	cr_assert_eq(image_open_kind(img, rw), 0);
	cr_assert_eq(image_open_kind(img, ro), 0);
	cr_assert_eq(image_open_kind(img, direct), 0);
	/* Aligned direct, unaligned direct (served buffered), buffered. */
	memset(buf, 'x', sizeof(buf));
	cr_assert_eq(image_write(img, direct, buf, 4096, 8192), 4096);
	cr_assert_eq(image_write(img, direct, "yz", 2, 100), 2);
	cr_assert_eq(image_write(img, rw, "w", 1, 65535), 1);
	cr_assert_eq(image_read(img, ro, buf, 4096, 0), 4096);
	cr_assert_eq(buf[99], 'a');
	cr_assert_eq(memcmp(buf + 100, "yz", 2), 0);
	cr_assert_eq(image_read(img, direct, buf, 4096, 8192), 4096);
	cr_assert_eq(buf[0], 'x');
	cr_assert_eq(buf[4095], 'x');
	cr_assert_eq(image_read(img, ro, buf, 10, 65530), 6, "short at the end of the file");
	cr_assert_eq(buf[5], 'w');
	cr_assert_eq(image_fsync(img, true), 0);
	cr_assert_eq(image_size(img), 65536);
	image_put(img);
}

Test(image, hooks_before_and_after)
{
	struct image *img = open_image(path_a);
	struct recorder r = { .hook = { rec_before, rec_after } }, first = { .hook = { rec_before, NULL } };
	unsigned rw = image_io_kind(O_RDWR);
	char c;

	cr_assert_eq(image_open_kind(img, rw), 0);
	gate_close(&img->gate);
	cr_assert_eq(image_attach_locked(img, &r.hook, false), 0);
	cr_assert_eq(image_attach_locked(img, &first.hook, true), 0);
	gate_open(&img->gate);
	cr_assert_eq(image_write(img, rw, "hello", 5, 1000), 5);
	cr_assert_eq(r.before_calls, 1);
	cr_assert_eq(first.before_calls, 1);
	cr_assert_eq(r.before_off, 1000);
	cr_assert_eq(r.before_len, 5);
	cr_assert_eq(r.after_calls, 1, "after_write sees the end of the write");
	cr_assert_eq(r.after_off, 1000);
	cr_assert_eq(r.after_result, 5);
	/* A hook that refuses: the write does not happen, nobody after it runs. */
	first.refuse = -EIO;
	cr_assert_eq(image_write(img, rw, "X", 1, 1000), -EIO);
	cr_assert_eq(r.before_calls, 1, "hooks after a refusing one do not run");
	cr_assert_eq(image_read(img, rw, &c, 1, 1000), 1);
	cr_assert_eq(c, 'h', "a refused write leaves the data");
	first.refuse = 0;
	/* fallocate zeroing goes through the hooks like a write. */
	cr_assert_eq(image_fallocate(img, rw, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096), 0);
	cr_assert_eq(r.before_off, 0);
	cr_assert_eq(r.before_len, 4096);
	cr_assert_eq(r.after_result, 4096);
	cr_assert_eq(image_read(img, rw, &c, 1, 1000), 1);
	cr_assert_eq(c, 0);
	image_detach(img, &r.hook);
	image_detach(img, &first.hook);
	cr_assert_eq(image_write(img, rw, "Z", 1, 0), 1);
	cr_assert_eq(r.before_calls, 2, "a detached hook runs no more");
	image_put(img);
}

Test(image, backend_replaced_with_the_gate_closed)
{
	struct image *img = open_image(path_a);
	unsigned rw = image_io_kind(O_RDWR), direct = image_io_kind(O_RDWR | O_DIRECT);
	char c;

	cr_assert_eq(image_open_kind(img, rw), 0);
	cr_assert_eq(image_open_kind(img, direct), 0);
	cr_assert_eq(image_read(img, rw, &c, 1, 0), 1);
	cr_assert_eq(c, 'a');
	int fd = open(path_b, O_RDONLY);
	gate_close(&img->gate);
	cr_assert_eq(image_replace_backend_locked(img, fd), 0);
	gate_open(&img->gate);
	close(fd);
	/* Every kind a handle had goes to the new file now. */
	cr_assert_eq(image_read(img, rw, &c, 1, 0), 1);
	cr_assert_eq(c, 'b');
	cr_assert_eq(image_write(img, rw, "Q", 1, 5), 1);
	char buf[4096] __attribute__((aligned(4096)));
	cr_assert_eq(image_read(img, direct, buf, 4096, 0), 4096);
	cr_assert_eq(buf[5], 'Q');
	/* The source file itself is untouched. */
	int a = open(path_a, O_RDONLY);
	cr_assert_eq(pread(a, &c, 1, 5), 1);
	cr_assert_eq(c, 'a');
	close(a);
	/* Copies read the new file too. */
	char copy[4096] __attribute__((aligned(4096)));
	cr_assert_eq(source_read(&img->source, copy, 0, 4096), 0);
	cr_assert_eq(copy[5], 'Q');
	image_put(img);
}

static struct image *reader_img;
static atomic_bool reader_done;

static void *one_read(void *arg)
{
	char c;
	(void)arg;
	image_read(reader_img, 0, &c, 1, 0);
	atomic_store(&reader_done, true);
	return NULL;
}

Test(image, guest_reads_enter_the_gate)
{
	pthread_t t;

	reader_img = open_image(path_a);
	cr_assert_eq(image_open_kind(reader_img, 0), 0);
	atomic_store(&reader_done, false);
	gate_close(&reader_img->gate);
	pthread_create(&t, NULL, one_read, NULL);
	sleep_until_ns(clock_monotonic_ns() + 100000000ull);
	cr_assert(!atomic_load(&reader_done), "a read ran while the gate was closed");
	gate_open(&reader_img->gate);
	pthread_join(t, NULL);
	cr_assert(atomic_load(&reader_done));
	image_put(reader_img);
}

Test(image, busy_while_a_job_runs)
{
	struct image *img = open_image(path_a);
	image_namespace_lock_shared();
	cr_assert(!image_is_busy(img->dev, img->ino));
	image_namespace_unlock();
	image_job_started(img);
	image_namespace_lock_shared();
	cr_assert(image_is_busy(img->dev, img->ino));
	image_namespace_unlock();
	image_job_ended(img);
	image_namespace_lock_shared();
	cr_assert(!image_is_busy(img->dev, img->ino));
	image_namespace_unlock();
	image_put(img);
}

static int nowait_calls, nowait_result;
static int rec_nowait(struct image_hook *h, uint64_t off, uint64_t len)
{
	(void)h;
	(void)off;
	(void)len;
	nowait_calls++;
	return nowait_result;
}

/* The io_uring fast path: a descriptor with the gate entered, or -1 with
 * nothing held, never a sleep. */
Test(image, async_begin_takes_only_what_needs_no_wait)
{
	struct image *img = open_image(path_a);
	unsigned rw = image_io_kind(O_RDWR);
	struct recorder slow = { .hook = { rec_before, NULL } };
	struct recorder quick = { .hook = { rec_before, NULL, rec_nowait } };

	cr_assert_eq(image_open_kind(img, rw), 0);
	int fd = image_async_begin(img, rw, true, 4096, 0);
	cr_assert_geq(fd, 0, "no hooks: a write goes the fast way");
	cr_assert_eq(atomic_load(&img->gate.inside), 1, "with the gate entered");
	image_async_end(img);
	cr_assert_eq(atomic_load(&img->gate.inside), 0);

	/* A hook that may sleep (copy-before-write) takes every write. */
	gate_close(&img->gate);
	cr_assert_eq(image_attach_locked(img, &slow.hook, false), 0);
	gate_open(&img->gate);
	cr_assert_eq(image_async_begin(img, rw, true, 4096, 0), -1);
	cr_assert_eq(atomic_load(&img->gate.inside), 0, "a refusal holds nothing");
	fd = image_async_begin(img, rw, false, 4096, 0);
	cr_assert_geq(fd, 0, "reads need no hook");
	image_async_end(img);
	image_detach(img, &slow.hook);

	/* A hook that can take it without sleeping (a dirty bitmap) does. */
	gate_close(&img->gate);
	cr_assert_eq(image_attach_locked(img, &quick.hook, true), 0);
	gate_open(&img->gate);
	nowait_calls = 0, nowait_result = 0;
	fd = image_async_begin(img, rw, true, 4096, 8192);
	cr_assert_geq(fd, 0);
	cr_assert_eq(nowait_calls, 1);
	cr_assert_eq(quick.before_calls, 0, "not the sleeping variant");
	image_async_end(img);
	nowait_result = -EAGAIN;
	cr_assert_eq(image_async_begin(img, rw, true, 4096, 8192), -1, "it would wait: the slow way");
	cr_assert_eq(atomic_load(&img->gate.inside), 0);

	/* A closed gate: no sleep, no entry. */
	nowait_result = 0;
	gate_close(&img->gate);
	cr_assert_eq(image_async_begin(img, rw, false, 4096, 0), -1);
	cr_assert_eq(atomic_load(&img->gate.inside), 0);
	gate_open(&img->gate);
	image_detach(img, &quick.hook);
	image_put(img);
}
