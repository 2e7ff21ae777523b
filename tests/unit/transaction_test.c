/* Unit tests for transactions (src/transaction.c) and dirty-bitmap crash
 * recovery (src/bitmap.c), on files in a temporary directory standing in for
 * SOURCE_DIR, the state directory and the targets (no FUSE mount: the
 * daemon's modules are driven directly).
 *   - a write whose second line fails starts nothing and leaves no file, no
 *     pending record, no job; the same first line alone runs and its backup
 *     is the image;
 *   - the answer and errno of each outcome;
 *   - a daemon that dies without stopping (a forked child that writes
 *     through a bitmap's hook, then _exit) leaves bits that the next start
 *     recovers: every write it made is dirty, every 16 MiB region it wrote
 *     is, one it did not write is not;
 *   - an image changed while no daemon ran (after a clean stop) makes its
 *     bitmaps inconsistent. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fleecefs/bitmap.h"
#include "fleecefs/control.h"
#include "fleecefs/daemon.h"
#include "fleecefs/image.h"
#include "fleecefs/job.h"
#include "fleecefs/pending.h"
#include "fleecefs/transaction.h"
#include "fleecefs/util.h"

static char top[64], src_dir[128], state_dir[128], out_dir[128], mnt[128];
static struct fleece_daemon d;

static void write_file(const char *path, size_t size, unsigned seed)
{
	char *buf = malloc(size);
	for (size_t i = 0; i < size; i++)
		buf[i] = (char)(seed + i * 31 + i / 4096);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	cr_assert(fd >= 0);
	cr_assert_eq(pwrite(fd, buf, size, 0), (ssize_t)size);
	close(fd);
	free(buf);
}

static bool same_files(const char *a, const char *b)
{
	char cmd[1024];
	snprintf(cmd, sizeof(cmd), "cmp -s '%s' '%s'", a, b);
	return system(cmd) == 0;
}

static int count_entries(const char *dir)
{
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "test $(ls -A '%s' | wc -l) = 0", dir);
	return system(cmd) == 0 ? 0 : 1;
}

static void setup(void)
{
	snprintf(top, sizeof(top), "/tmp/fleecefs-txn-test.XXXXXX");
	cr_assert(mkdtemp(top));
	snprintf(src_dir, sizeof(src_dir), "%s/src", top);
	snprintf(state_dir, sizeof(state_dir), "%s/state", top);
	snprintf(out_dir, sizeof(out_dir), "%s/out", top);
	snprintf(mnt, sizeof(mnt), "%s/mnt", top);
	mkdir(src_dir, 0700);
	mkdir(state_dir, 0700);
	mkdir(out_dir, 0700);
	mkdir(mnt, 0700);
	char path[256];
	snprintf(path, sizeof(path), "%s/a.img", src_dir);
	write_file(path, 1 << 20, 1);
	memset(&d, 0, sizeof(d));
	d.source_dir = src_dir;
	d.source_fd = open(src_dir, O_PATH | O_DIRECTORY);
	d.mountpoint = mnt;
	d.state_dir = state_dir;
	struct stat st;
	stat(state_dir, &st);
	d.state_dev = st.st_dev;
	d.state_ino = st.st_ino;
	d.cluster_size = 65536;
	d.copy_workers = 1;
	cr_assert_eq(pending_setup(state_dir), 0);
}

static void teardown(void)
{
	char cmd[256];
	job_cancel_all_and_wait();
	job_free_all();
	close(d.source_fd);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", top);
	cr_assert_eq(system(cmd), 0);
}

TestSuite(transaction, .init = setup, .fini = teardown, .timeout = 60);

static int run(const char *text, char **answer)
{
	return txn_execute(&d, text, strlen(text), answer);
}

Test(transaction, all_or_nothing)
{
	char text[1024], *answer = NULL, pending[256];

	snprintf(text, sizeof(text), "backup a.img %s/t1.raw id=t1\nbackup missing.img %s/t2.raw id=t2", out_dir,
		 out_dir);
	cr_assert_eq(run(text, &answer), -ENOENT);
	cr_assert(strncmp(answer, "error: line 2: ", 15) == 0, "answer: %s", answer);
	cr_assert(strchr(answer, '\n') == answer + strlen(answer) - 1, "one line: %s", answer);
	free(answer);
	struct job *j = job_find("t1");
	cr_assert_null(j, "line 1's job started");
	cr_assert_eq(count_entries(out_dir), 0, "a refused write left files in the target directory");
	snprintf(pending, sizeof(pending), "%s/pending", state_dir);
	cr_assert_eq(count_entries(pending), 0, "a refused write left a pending record");

	/* The first line alone. */
	snprintf(text, sizeof(text), "backup a.img %s/t1.raw id=t1", out_dir);
	cr_assert_eq(run(text, &answer), 0);
	cr_assert_str_eq(answer, "ok id=t1\n");
	free(answer);
	j = job_find("t1");
	cr_assert_not_null(j);
	job_wait_concluded(j);
	pthread_mutex_lock(&j->lock);
	enum job_state state = j->state;
	pthread_mutex_unlock(&j->lock);
	job_put(j);
	cr_assert_eq(state, JOB_COMPLETED);
	char a[256], t1[256];
	snprintf(a, sizeof(a), "%s/a.img", src_dir);
	snprintf(t1, sizeof(t1), "%s/t1.raw", out_dir);
	cr_assert(same_files(a, t1), "the backup is not the image");
	cr_assert_eq(count_entries(pending), 0, "a completed job left its pending record");
}

Test(transaction, errnos_and_answers)
{
	char text[1024], *answer = NULL;
	struct { const char *line; int err; const char *words; } cases[] = {
		{ "backup a.img %s/x.raw speed=fast", -EINVAL, "speed=fast" },
		{ "backup a.img %s/../mnt/x.raw", -EINVAL, "inside the mount" },
		{ "backup a.img %s/nodir/x.raw", -ENOENT, "nodir" },
		{ "cancel nosuchjob%s", -ENOENT, "no job nosuchjob" },
		{ "backup a.img %s/x.qcow2 sync=none", -EINVAL, "sync=none cannot write qcow2" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		snprintf(text, sizeof(text), cases[i].line, i == 3 ? "" : out_dir);
		cr_assert_eq(run(text, &answer), cases[i].err, "'%s': %s", text, answer);
		cr_assert(strstr(answer, cases[i].words), "'%s': answer %s", text, answer);
		free(answer);
	}
	cr_assert_eq(count_entries(out_dir), 0);
}

/* ---- bitmap recovery after a daemon that did not stop ------------------------- */

/* In the forked "daemon": the bitmaps started, the image of `rel` (in
 * SOURCE_DIR) open for writing, bitmap "b" added to it; exits on failure. */
static struct image *child_image_with_bitmap(const char *rel)
{
	char path[256], err[256];
	struct image *img;
	snprintf(path, sizeof(path), "%s/%s", src_dir, rel);
	int fd = open(path, O_RDWR);
	if (bitmaps_start(state_dir, d.source_fd, src_dir, d.cluster_size) || image_get(fd, &img) ||
	    image_open_kind(img, IMAGE_IO_WRITE))
		_exit(2);
	struct ctl_bitmap add = { .op = BITMAP_ADD, .image = rel, .name = "b" };
	gate_close(&img->gate);
	int rc = bitmap_apply(img, &add, err, sizeof(err));
	gate_open(&img->gate);
	if (rc)
		_exit(3);
	return img;
}

/* In the test: the next start, and bitmap "b" of `rel`. */
static struct dirty_bitmap *restart_and_find(const char *rel, struct image **img)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/%s", src_dir, rel);
	cr_assert_eq(bitmaps_start(state_dir, d.source_fd, src_dir, d.cluster_size), 0);
	int fd = open(path, O_RDONLY);
	cr_assert_eq(image_get(fd, img), 0);
	close(fd);
	struct dirty_bitmap *bm = bitmap_find(bitmaps_of(*img), "b");
	cr_assert_not_null(bm, "the bitmap is gone after the restart");
	return bm;
}

static void wait_child(pid_t child)
{
	int status;
	waitpid(child, &status, 0);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
}

Test(transaction, bitmap_bits_survive_a_crash)
{
	pid_t child = fork();
	cr_assert_geq(child, 0);
	if (child == 0) {
		/* The daemon: a bitmap, guest writes through the image, no stop. */
		struct image *img = child_image_with_bitmap("a.img");
		char data[100] = "written";
		if (image_write(img, IMAGE_IO_WRITE, data, sizeof(data), 300000) != sizeof(data))
			_exit(4);
		_exit(0);   /* a crash: nothing saved but what the write path made durable */
	}
	wait_child(child);
	struct image *img;
	struct dirty_bitmap *bm = restart_and_find("a.img", &img);
	uint64_t g = 300000 / bm->granularity;
	cr_assert(cbitmap_test(&bm->bits, g), "the write at 300000 is not dirty after the crash");
	cr_assert(!bm->inconsistent, "a crash with the intent log is not inconsistent: %s", bm->why);
	bitmaps_stop();
	image_put(img);
}

/* A clean stop records the image's identity; a change made while no daemon
 * ran makes the bitmap inconsistent at the next start. */
Test(transaction, bitmap_offline_change_is_inconsistent)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/a.img", src_dir);
	pid_t child = fork();
	cr_assert_geq(child, 0);
	if (child == 0) {
		child_image_with_bitmap("a.img");
		bitmaps_stop();   /* the clean stop */
		_exit(0);
	}
	wait_child(child);
	/* Behind fleecefs' back. */
	int wfd = open(path, O_WRONLY);
	cr_assert_eq(pwrite(wfd, "x", 1, 4096), 1);
	close(wfd);
	struct image *img;
	struct dirty_bitmap *bm = restart_and_find("a.img", &img);
	cr_assert(bm->inconsistent, "an offline change left the bitmap consistent");
	cr_assert(strstr(bm->why, "while fleecefs was not running"), "reason: %s", bm->why);
	bitmaps_stop();
	image_put(img);
}

/* After a crash, every 16 MiB region written since the last save is dirty,
 * and a region nobody wrote stays clean. */
Test(transaction, bitmap_crash_covers_every_written_region)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/big.img", src_dir);
	int cfd = open(path, O_RDWR | O_CREAT, 0600);
	cr_assert(cfd >= 0);
	cr_assert_eq(ftruncate(cfd, 48 << 20), 0);
	close(cfd);
	pid_t child = fork();
	cr_assert_geq(child, 0);
	if (child == 0) {
		struct image *img = child_image_with_bitmap("big.img");
		char data[4096] = "written";
		if (image_write(img, IMAGE_IO_WRITE, data, sizeof(data), 100) != sizeof(data) ||
		    image_write(img, IMAGE_IO_WRITE, data, sizeof(data), 40 << 20) != sizeof(data))
			_exit(4);
		_exit(0);
	}
	wait_child(child);
	struct image *img;
	struct dirty_bitmap *bm = restart_and_find("big.img", &img);
	uint64_t gran = bm->granularity;
	cr_assert(cbitmap_test(&bm->bits, 100 / gran), "the write at 100 is not dirty");
	cr_assert(cbitmap_test(&bm->bits, (40ull << 20) / gran), "the write at 40M is not dirty");
	cr_assert(!cbitmap_test(&bm->bits, (20ull << 20) / gran), "a region nobody wrote is dirty");
	cr_assert(!bm->inconsistent, "%s", bm->why);
	bitmaps_stop();
	image_put(img);
}
