/* snapstore: see include/fleecefs/snapstore.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleecefs/inject.h"
#include "fleecefs/snapstore.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

static struct snapstore *of_hook(struct image_hook *hook)
{
	return (struct snapstore *)((char *)hook - offsetof(struct snapstore, hook));
}

static struct snapstore *of_source(struct copy_source *src)
{
	return (struct snapstore *)((char *)src - offsetof(struct snapstore, source));
}

void snapstore_break(struct snapstore *s, const char *reason)
{
	static pthread_mutex_t break_lock = PTHREAD_MUTEX_INITIALIZER;
	bool first;

	pthread_mutex_lock(&break_lock);
	first = !atomic_load(&s->broken);
	if (first) {
		snprintf(s->break_reason, sizeof(s->break_reason), "%s", reason);
		atomic_store(&s->broken, true);
	}
	pthread_mutex_unlock(&break_lock);
	if (first) {
		log_warn("snapshot of %s broken: %s", s->store_path, reason);
		if (s->on_break)
			s->on_break(s->owner, reason);
	}
}

/* ---- the guest write path ----------------------------------------------- */

/* A write at or past the end of T's image leaves T's bytes alone but may
 * allocate the block that holds T's end: the last cluster is saved so that
 * the view's holes stay those of T. Does [*off, *off + *len) need a copy? */
static bool store_needs_copy(struct snapstore *s, uint64_t *off, uint64_t *len)
{
	if (*off >= s->size && s->size) {
		*off = s->size - 1;
		*len = 1;
	}
	return blockcopy_needs_copy(&s->bc, *off, *len) && !atomic_load(&s->broken);
}

/* For the io_uring fast path, which must not sleep: 0 where the store needs
 * nothing of the write, else -EAGAIN (snapstore_before_write then copies). */
static int snapstore_before_write_nowait(struct image_hook *hook, uint64_t off, uint64_t len)
{
	return store_needs_copy(of_hook(hook), &off, &len) ? -EAGAIN : 0;
}

static int snapstore_before_write(struct image_hook *hook, uint64_t off, uint64_t len)
{
	struct snapstore *s = of_hook(hook);
	struct blockcopy_error e;
	char reason[160];

	if (!store_needs_copy(s, &off, &len))
		return 0;
	uint64_t start = clock_monotonic_ns();
	int rc = blockcopy_before_write(&s->bc, off, len, 0, &e);
	if (s->cbw_wait)
		latency_record(s->cbw_wait, (clock_monotonic_ns() - start) / 1000);
	uint64_t used = atomic_fetch_add(s->store_used, e.copied) + e.copied;
	if (rc && s->fail_guest) {
		log_warn("store %s: copy-before-write at offset %" PRIu64 " failed (%s): failing the guest write "
			 "(on-cbw-error=break-guest-write)", s->store_path, e.offset, error_text(-rc));
		return -EIO;
	}
	if (rc) {
		/* The guest write goes on; the frozen image is lost. */
		snprintf(reason, sizeof(reason), "copy-before-write at offset %" PRIu64 " failed %s: %s", e.offset,
			 e.target ? "writing the store" : "reading the image", error_text(-rc));
		snapstore_break(s, reason);
	} else if (s->max_store && used > s->max_store) {
		snprintf(reason, sizeof(reason), "the store reached max-store=%" PRIu64, s->max_store);
		snapstore_break(s, reason);
	}
	return 0;
}

static bool store_write_failed(void *owner, int err, uint64_t offset)
{
	struct snapstore *s = owner;
	char reason[160];

	snprintf(reason, sizeof(reason), "writing the store at offset %" PRIu64 ": %s", offset, error_text(-err));
	snapstore_break(s, reason);
	return false;
}

static const struct blockcopy_ops store_ops = {
	.queued_write_failed = store_write_failed,
};

/* ---- reading the frozen image ------------------------------------------- */

/* Readers count themselves before looking at `broken`; close sets `broken`
 * before waiting for the count to drop: a reader either sees it broken or
 * is waited for (both sequentially consistent). */
static bool reader_enter(struct snapstore *s)
{
	atomic_fetch_add(&s->readers, 1);
	if (!atomic_load(&s->broken))
		return true;
	atomic_fetch_sub(&s->readers, 1);
	return false;
}

static void reader_exit(struct snapstore *s)
{
	atomic_fetch_sub(&s->readers, 1);
}

ssize_t snapstore_read(struct snapstore *s, void *buf, uint64_t off, size_t len)
{
	unsigned bits;

	if (!reader_enter(s))
		return -EACCES;
	bits = s->bc.cluster_bits;
	if (off >= s->size) {
		reader_exit(s);
		return 0;
	}
	uint64_t end = min_u64(off + len, s->size), pos = off;
	while (pos < end) {
		uint64_t c = pos >> bits, last = (end - 1) >> bits;
		struct frozen_read reg;
		bool from_source;
		uint64_t n = inflight_read_begin(&s->bc.inflight, &s->bc.pending, c, last + 1, UINT64_MAX, &reg,
						 &from_source);
		uint64_t run_end = min_u64(end, (c + n) << bits);
		ssize_t got;
		if (from_source) {
			/* Unchanged since T, and held so until this read ends. */
			got = image_pread(s->image, (char *)buf + (pos - off), (size_t)(run_end - pos), pos);
			inflight_read_end(&s->bc.inflight, &reg);
		} else {
			blockcopy_wait_written(&s->bc, c, n);
			got = pread_full(s->store_read_fd, (char *)buf + (pos - off), (size_t)(run_end - pos), pos);
		}
		if (got >= 0 && (uint64_t)got < run_end - pos)
			memset((char *)buf + (pos - off) + got, 0, (size_t)(run_end - pos - (uint64_t)got));
		if (got < 0 || atomic_load(&s->broken)) {
			reader_exit(s);
			return got < 0 ? got : -EACCES;
		}
		pos = run_end;
	}
	reader_exit(s);
	return (ssize_t)(end - off);
}

/* Where the next data (want_data) or hole starts in [from, end), or end;
 * r is what SEEK_DATA/SEEK_HOLE answered (-errno on failure). */
static uint64_t seek_result(int64_t r, uint64_t from, uint64_t end, bool want_data)
{
	if (r < 0)
		return want_data && r == -ENXIO ? end : from;
	return min_u64((uint64_t)r, end);
}

static uint64_t seek_in(int fd, uint64_t from, uint64_t end, bool want_data)
{
	off_t r = lseek(fd, (off_t)from, want_data ? SEEK_DATA : SEEK_HOLE);
	return seek_result(r < 0 ? -errno : r, from, end, want_data);
}

int64_t snapstore_seek(struct snapstore *s, uint64_t off, int whence)
{
	bool want_data = whence == SEEK_DATA;
	int64_t result = want_data ? -ENXIO : (int64_t)s->size;

	if (!reader_enter(s))
		return -EACCES;
	unsigned bits = s->bc.cluster_bits;
	if (off >= s->size) {
		reader_exit(s);
		return -ENXIO;
	}
	/* Run by run: an unchanged run answers from the image (held while we
	 * ask), a copied one from the store, where zero clusters are holes. */
	for (uint64_t pos = off; pos < s->size;) {
		uint64_t c = pos >> bits;
		struct frozen_read reg;
		bool from_source;
		uint64_t n = inflight_read_begin(&s->bc.inflight, &s->bc.pending, c, s->bc.nclusters, UINT64_MAX,
						 &reg, &from_source);
		uint64_t run_end = min_u64((c + n) << bits, s->size), found;
		if (from_source) {
			found = seek_result(source_seek(&s->image->source, pos, want_data ? SEEK_DATA : SEEK_HOLE), pos,
					    run_end, want_data);
			inflight_read_end(&s->bc.inflight, &reg);
		} else {
			blockcopy_wait_written(&s->bc, c, n);
			found = seek_in(s->store_read_fd, pos, run_end, want_data);
		}
		if (found < run_end) {
			result = (int64_t)found;
			break;
		}
		pos = run_end;
	}
	reader_exit(s);
	return atomic_load(&s->broken) ? -EACCES : result;
}

/* ---- as a copy source (a backup of the frozen image) -------------------- */

static int view_source_read(struct copy_source *src, void *buf, uint64_t off, uint64_t len)
{
	ssize_t got = snapstore_read(of_source(src), buf, off, (size_t)len);
	if (got < 0)
		return (int)got;
	if ((uint64_t)got < len)
		memset((char *)buf + got, 0, (size_t)(len - (uint64_t)got));
	return 0;
}

static bool view_source_has_data(struct copy_source *src, uint64_t off, uint64_t len)
{
	int64_t data = snapstore_seek(of_source(src), off, SEEK_DATA);
	return data == -EACCES || (data >= 0 && (uint64_t)data < off + len);
}

static int64_t view_source_seek(struct copy_source *src, uint64_t off, int whence)
{
	return snapstore_seek(of_source(src), off, whence);
}

static const struct copy_source_ops view_source_ops = {
	.read = view_source_read,
	.has_data = view_source_has_data,
	.seek = view_source_seek,
};

/* ---- life cycle ------------------------------------------------------------ */

void snapstore_discard(struct snapstore *s, uint64_t first, uint64_t count)
{
	struct cbitmap copied;

	if (cbitmap_init(&copied, count, false))
		return;  /* keeping the copies is always safe */
	inflight_discard(&s->bc.inflight, &s->bc.pending, first, count, &copied);
	for (uint64_t i = cbitmap_next_set(&copied, 0); i < count; i = cbitmap_next_set(&copied, i + 1)) {
		uint64_t c = first + i, off = c << s->bc.cluster_bits;
		uint64_t n = min_u64(s->bc.cluster_size, s->size - off);
		blockcopy_wait_written(&s->bc, c, 1);
		if (target_discard(s->store, off, n) == 0)
			atomic_fetch_sub(s->store_used, min_u64(n, atomic_load(s->store_used)));
	}
	cbitmap_destroy(&copied);
}

int snapstore_open(struct snapstore *s, struct image *image, const char *store_path, uint32_t cluster_size,
		   uint64_t max_store, atomic_uint_fast64_t *store_used,
		   void (*on_break)(void *owner, const char *reason), void *owner, char *err, size_t errlen)
{
	struct stat st;
	int rc;

	memset(s, 0, sizeof(*s));
	s->store_read_fd = -1;
	s->hook.before_write = snapstore_before_write;
	s->hook.before_write_nowait = snapstore_before_write_nowait;
	s->source.ops = &view_source_ops;
	s->max_store = max_store;
	s->store_used = store_used;
	s->on_break = on_break;
	s->owner = owner;
	atomic_init(&s->broken, false);
	atomic_init(&s->readers, 0);
	if ((rc = image_fstat(image, &st)))
		return set_error(err, errlen, -rc, "cannot read the image: %s", error_text(-rc));
	s->size = (uint64_t)st.st_size;
	if (!(s->store_path = strdup(store_path)))
		return set_error(err, errlen, ENOMEM, "out of memory");
	if ((rc = target_raw_create_scratch(store_path, s->size, &s->store, err, errlen)))
		goto fail;
	s->store_read_fd = open(store_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (s->store_read_fd < 0) {
		rc = set_error(err, errlen, errno, "store %s: %s", store_path, error_text(errno));
		goto fail;
	}
	if ((rc = blockcopy_init(&s->bc, &image->source, s->store, NULL, s->size, cluster_size, &store_ops, s))) {
		rc = set_error(err, errlen, -rc, "out of memory");
		goto fail;
	}
	s->bc.write_inject_point = INJECT_STORE_WRITE;
	image_ref(image);
	s->image = image;
	return 0;
fail:
	if (s->store_read_fd >= 0)
		close(s->store_read_fd);
	if (s->store) {
		target_close(s->store, false);
		target_free(s->store);
	}
	free(s->store_path);
	memset(s, 0, sizeof(*s));
	return rc;
}

int snapstore_attach(struct snapstore *s, char *err, size_t errlen)
{
	int rc;

	if ((rc = image_fstat(s->image, &s->st_at_t)))
		return set_error(err, errlen, -rc, "cannot read the image: %s", error_text(-rc));
	if ((uint64_t)s->st_at_t.st_size != s->size)
		return set_error(err, errlen, EBUSY, "the image's size changed from %" PRIu64 " to %" PRIu64
				 " bytes while the store was made: nothing started, try again", s->size,
				 (uint64_t)s->st_at_t.st_size);
	if ((rc = image_attach_locked(s->image, &s->hook, false)))
		return set_error(err, errlen, -rc, "out of memory");
	s->attached = true;
	s->started = true;
	image_job_started(s->image);
	return 0;
}

void snapstore_close(struct snapstore *s, bool gate_closed)
{
	if (!s->image)
		return;
	/* No guest write copies into the store, no read starts after this. */
	atomic_store(&s->broken, true);
	if (s->attached) {
		if (gate_closed)
			image_detach_locked(s->image, &s->hook);
		else
			image_detach(s->image, &s->hook);
	}
	s->attached = false;
	blockcopy_stop_writers(&s->bc);
	while (atomic_load(&s->readers))
		sleep_until_ns(clock_monotonic_ns() + 1000000);
	target_close(s->store, false);
	blockcopy_destroy(&s->bc);
	target_free(s->store);
	s->store = NULL;
	close(s->store_read_fd);
	s->store_read_fd = -1;
	if (s->started)
		image_job_ended(s->image);
	s->started = false;
	image_put(s->image);
	s->image = NULL;
	free(s->store_path);
	s->store_path = NULL;
	/* `broken` stays set: handles still open on a view keep answering EACCES. */
}
