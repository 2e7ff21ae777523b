/* image: see include/fleecefs/image.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <search.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/image.h"
#include "fleecefs/util.h"

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static void *registry_root;
static pthread_rwlock_t namespace_lock = PTHREAD_RWLOCK_INITIALIZER;

/* ---- the image as a copy source ---------------------------------------- */

static struct image *image_of_source(struct copy_source *src)
{
	return (struct image *)((char *)src - offsetof(struct image, source));
}

/* O_DIRECT when the offset allows it (no page cache churn for a whole-image
 * copy), else buffered; bytes past the end of the file read as zero. */
static int image_source_read(struct copy_source *src, void *buf, uint64_t off, uint64_t len)
{
	struct image *img = image_of_source(src);
	ssize_t got = -EINVAL;

	if (img->direct_fd >= 0 && off % 4096 == 0)
		got = pread_full(img->direct_fd, buf, (size_t)((len + 4095) & ~4095ull), off);
	if (got == -EINVAL)
		got = pread_full(img->read_fd, buf, (size_t)len, off);
	if (got < 0)
		return (int)got;
	if ((uint64_t)got < len)
		memset((char *)buf + got, 0, (size_t)(len - (uint64_t)got));
	return 0;
}

static bool image_source_has_data(struct copy_source *src, uint64_t off, uint64_t len)
{
	off_t data = lseek(image_of_source(src)->read_fd, (off_t)off, SEEK_DATA);
	if (data < 0)
		return errno != ENXIO;
	return (uint64_t)data < off + len;
}

static int64_t image_source_seek(struct copy_source *src, uint64_t off, int whence)
{
	off_t r = lseek(image_of_source(src)->read_fd, (off_t)off, whence);
	return r < 0 ? -errno : r;
}

static const struct copy_source_ops image_source_ops = {
	.read = image_source_read,
	.has_data = image_source_has_data,
	.seek = image_source_seek,
};

static int compare_images(const void *a, const void *b)
{
	const struct image *x = a, *y = b;
	if (x->dev != y->dev)
		return x->dev < y->dev ? -1 : 1;
	if (x->ino != y->ino)
		return x->ino < y->ino ? -1 : 1;
	return 0;
}

static int reopen(int fd, int flags)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	return open(path, flags | O_CLOEXEC);
}

static struct image *lookup_locked(dev_t dev, ino_t ino)
{
	struct image key = { .dev = dev, .ino = ino };
	void *found = tfind(&key, &registry_root, compare_images);
	return found ? *(struct image **)found : NULL;
}

int image_get(int fd, struct image **out)
{
	struct stat st;
	struct image *img;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EINVAL;
	pthread_mutex_lock(&registry_lock);
	img = lookup_locked(st.st_dev, st.st_ino);
	if (img) {
		img->refcount++;
		pthread_mutex_unlock(&registry_lock);
		*out = img;
		return 0;
	}
	img = calloc(1, sizeof(*img));
	if (!img) {
		pthread_mutex_unlock(&registry_lock);
		return -ENOMEM;
	}
	img->dev = st.st_dev;
	img->ino = st.st_ino;
	img->refcount = 1;
	img->read_fd = reopen(fd, O_RDONLY);
	img->direct_fd = img->read_fd >= 0 ? reopen(fd, O_RDONLY | O_DIRECT) : -1;
	gate_init(&img->gate);
	atomic_init(&img->active_jobs, 0);
	atomic_init(&img->guest_requests, 0);
	img->source.ops = &image_source_ops;
	if (!tsearch(img, &registry_root, compare_images)) {
		pthread_mutex_unlock(&registry_lock);
		image_put(img);
		return -ENOMEM;
	}
	pthread_mutex_unlock(&registry_lock);
	*out = img;
	return 0;
}

struct image *image_find(dev_t dev, ino_t ino)
{
	struct image *img;

	pthread_mutex_lock(&registry_lock);
	img = lookup_locked(dev, ino);
	if (img)
		img->refcount++;
	pthread_mutex_unlock(&registry_lock);
	return img;
}

void image_ref(struct image *img)
{
	pthread_mutex_lock(&registry_lock);
	img->refcount++;
	pthread_mutex_unlock(&registry_lock);
}

void image_put(struct image *img)
{
	pthread_mutex_lock(&registry_lock);
	if (--img->refcount) {
		pthread_mutex_unlock(&registry_lock);
		return;
	}
	if (lookup_locked(img->dev, img->ino) == img)
		tdelete(img, &registry_root, compare_images);
	pthread_mutex_unlock(&registry_lock);
	if (img->read_fd >= 0)
		close(img->read_fd);
	if (img->direct_fd >= 0)
		close(img->direct_fd);
	gate_destroy(&img->gate);
	free(img->hooks);
	free(img);
}

int image_write_begin_slow(struct image *img, uint64_t off, uint64_t len)
{
	for (unsigned i = 0; i < img->nhooks; i++) {
		int rc = img->hooks[i]->before_write(img->hooks[i], off, len);
		if (rc < 0) {
			gate_exit(&img->gate);
			return rc;
		}
	}
	return 0;
}

int image_attach_locked(struct image *img, struct image_hook *hook)
{
	if (img->nhooks == img->hooks_cap) {
		unsigned cap = img->hooks_cap ? img->hooks_cap * 2 : 4;
		struct image_hook **grown = realloc(img->hooks, cap * sizeof(*grown));
		if (!grown)
			return -ENOMEM;
		img->hooks = grown;
		img->hooks_cap = cap;
	}
	img->hooks[img->nhooks++] = hook;
	return 0;
}

void image_detach_locked(struct image *img, struct image_hook *hook)
{
	for (unsigned i = 0; i < img->nhooks; i++) {
		if (img->hooks[i] != hook)
			continue;
		for (; i + 1 < img->nhooks; i++)
			img->hooks[i] = img->hooks[i + 1];
		img->hooks[--img->nhooks] = NULL;
		return;
	}
}

void image_detach(struct image *img, struct image_hook *hook)
{
	gate_close(&img->gate);
	image_detach_locked(img, hook);
	gate_open(&img->gate);
}

void image_namespace_lock_shared(void) { pthread_rwlock_rdlock(&namespace_lock); }
void image_namespace_lock_exclusive(void) { pthread_rwlock_wrlock(&namespace_lock); }
void image_namespace_unlock(void) { pthread_rwlock_unlock(&namespace_lock); }

bool image_is_busy(dev_t dev, ino_t ino)
{
	bool busy = false;

	pthread_mutex_lock(&registry_lock);
	struct image *img = lookup_locked(dev, ino);
	if (img)
		busy = atomic_load(&img->active_jobs) > 0;
	pthread_mutex_unlock(&registry_lock);
	return busy;
}

int64_t image_size(const struct image *img)
{
	struct stat st;
	if (fstat(img->read_fd, &st) < 0)
		return -errno;
	return st.st_size;
}
