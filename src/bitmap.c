/* bitmap: see include/fleecefs/bitmap.h */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/bitmap.h"
#include "fleecefs/control.h"
#include "fleecefs/image.h"
#include "fleecefs/redirect.h"

#define REGION_BITS 24                  /* 16 MiB write-intent regions */
#define SAVE_INTERVAL_NS 15000000000ull
#define BITMAP_MAGIC "FLEECEBM"
#define BITMAP_VERSION 1u

struct bitmap_set {
	struct image *image;                /* referenced; NULL if missing */
	struct image_hook hook;
	bool attached;
	pthread_mutex_t lock;
	struct dirty_bitmap *list;          /* changed with the gate closed */
	char *dir;                          /* STATE_DIR/bitmaps/DEV-INO */
	char *path;                         /* the image, relative to SOURCE_DIR */
	dev_t dev;
	ino_t ino;
	/* Write intent: regions written since the save before last (old) and
	 * since the last one (cur); the file holds old ∪ cur. */
	struct cbitmap intent_cur, intent_old;
	int intent_fd;
	atomic_int epoch;
	atomic_uint active[2];
	atomic_bool changed;
	struct bitmap_set *next;
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct bitmap_set *sets;
static uint64_t next_serial = 1;        /* registry_lock */
static char *state_bitmaps_dir;
static char *source_root;
static int source_dir_fd = -1;
static uint32_t min_granularity;

static pthread_t saver;
static bool saver_running;
static pthread_mutex_t saver_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t saver_wake = PTHREAD_COND_INITIALIZER;
static bool saver_stop;

/* dir/name into out; false (and an empty out) when it does not fit. */
static bool join(char *out, size_t len, const char *dir, const char *name)
{
	if (snprintf(out, len, "%s/%s", dir, name) < (int)len)
		return true;
	out[0] = '\0';
	return false;
}

/* ---- files --------------------------------------------------------------- */

/* dir/name, replaced atomically (the caller syncs the directory). */
static int write_state_file(const char *dir, const char *name, const void *data, size_t len)
{
	char path[PATH_MAX];

	if (!join(path, sizeof(path), dir, name))
		return -ENAMETOOLONG;
	return write_file_atomic(path, data, len, false);
}

static void sync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
}

/* NAME.bitmap: magic, version, flags, granularity, size, since, nbits,
 * name and reason lengths, name, reason, the words (little endian). */
struct bitmap_header {
	char magic[8];
	uint32_t version, flags;
	uint64_t granularity, size, since_ns, nbits;
	uint32_t name_len, why_len;
};
#define FLAG_ENABLED 1u
#define FLAG_INCONSISTENT 2u

static int save_words(struct bitmap_set *set, struct dirty_bitmap *bm, const struct cbitmap *bits, const char *suffix)
{
	struct bitmap_header h = { .version = BITMAP_VERSION };
	uint64_t nwords = cbitmap_words(bits);
	size_t name_len = strlen(bm->name), why_len = strlen(bm->why);
	size_t len = sizeof(h) + name_len + why_len + nwords * 8;
	char *buf = malloc(len), file[FLEECE_NAME_MAX + 16];

	if (!buf)
		return -ENOMEM;
	memcpy(h.magic, BITMAP_MAGIC, 8);
	h.flags = (atomic_load(&bm->enabled) ? FLAG_ENABLED : 0) | (bm->inconsistent ? FLAG_INCONSISTENT : 0);
	h.granularity = bm->granularity;
	h.size = bm->size;
	h.since_ns = bm->since_ns;
	h.nbits = bits->nbits;
	h.name_len = (uint32_t)name_len;
	h.why_len = (uint32_t)why_len;
	memcpy(buf, &h, sizeof(h));
	memcpy(buf + sizeof(h), bm->name, name_len);
	memcpy(buf + sizeof(h) + name_len, bm->why, why_len);
	uint64_t *words = (uint64_t *)(void *)(buf + sizeof(h) + name_len + why_len);
	for (uint64_t w = 0; w < nwords; w++) {
		uint64_t v = atomic_load_explicit(&bits->words[w], memory_order_acquire);
		memcpy(&words[w], &v, 8);
	}
	snprintf(file, sizeof(file), "%s.%s", bm->name, suffix);
	int rc = write_state_file(set->dir, file, buf, len);
	free(buf);
	return rc;
}

/* Reads NAME.SUFFIX into bm (header fields too when `header`) or ORs its
 * words into `into`. */
static int load_words(struct bitmap_set *set, const char *file, struct dirty_bitmap *bm, struct cbitmap *into)
{
	char path[PATH_MAX];
	struct bitmap_header h;
	struct stat st;
	int fd, rc = -EINVAL;

	join(path, sizeof(path), set->dir, file);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || pread_full(fd, &h, sizeof(h), 0) != sizeof(h) || memcmp(h.magic, BITMAP_MAGIC, 8) ||
	    h.version != BITMAP_VERSION || h.name_len > FLEECE_NAME_MAX || h.why_len >= sizeof(bm->why) ||
	    !is_power_of_two(h.granularity))
		goto out;
	uint64_t nwords = (h.nbits + 63) / 64;
	uint64_t off = sizeof(h) + h.name_len + h.why_len;
	if ((uint64_t)st.st_size != off + nwords * 8)
		goto out;
	if (!into) {
		memset(bm, 0, sizeof(*bm));
		if (pread_full(fd, bm->name, h.name_len, sizeof(h)) != h.name_len ||
		    pread_full(fd, bm->why, h.why_len, sizeof(h) + h.name_len) != h.why_len)
			goto out;
		bm->granularity = h.granularity;
		bm->gran_bits = log2_u64(h.granularity);
		bm->size = h.size;
		bm->since_ns = h.since_ns;
		atomic_init(&bm->enabled, (h.flags & FLAG_ENABLED) != 0);
		bm->inconsistent = (h.flags & FLAG_INCONSISTENT) != 0;
		if (cbitmap_init(&bm->bits, h.nbits, false)) {
			rc = -ENOMEM;
			goto out;
		}
		into = &bm->bits;
	}
	if (into->nbits != h.nbits)
		goto out;
	for (uint64_t w = 0; w < nwords; w++) {
		uint64_t v;
		if (pread_full(fd, &v, 8, off + w * 8) != 8)
			goto out;
		if (v)
			atomic_fetch_or(&into->words[w], v);
	}
	rc = 0;
out:
	close(fd);
	return rc;
}

static int write_intent_locked(struct bitmap_set *set)
{
	uint64_t nwords = cbitmap_words(&set->intent_cur);
	uint64_t header[2] = { REGION_BITS, set->intent_cur.nbits };
	size_t len = sizeof(header) + nwords * 8;
	uint64_t *buf = malloc(len);

	if (!buf)
		return -ENOMEM;
	memcpy(buf, header, sizeof(header));
	for (uint64_t w = 0; w < nwords; w++)
		buf[2 + w] = atomic_load(&set->intent_cur.words[w]) | atomic_load(&set->intent_old.words[w]);
	int rc = 0;
	if (pwrite_full(set->intent_fd, buf, len, 0) < 0 || fdatasync(set->intent_fd) < 0)
		rc = -errno;
	free(buf);
	return rc;
}

/* ---- the write path -------------------------------------------------------- */

static void mark_inconsistent_locked(struct bitmap_set *set, const char *why)
{
	for (struct dirty_bitmap *bm = set->list; bm; bm = bm->next) {
		if (!bm->inconsistent)
			snprintf(bm->why, sizeof(bm->why), "%s", why);
		bm->inconsistent = true;
	}
	atomic_store(&set->changed, true);
}

/* Are the regions of [off, off + len) recorded as written-to already? */
static bool intent_recorded(struct bitmap_set *set, uint64_t off, uint64_t len)
{
	uint64_t first = off >> REGION_BITS, count = ((off + len - 1) >> REGION_BITS) - first + 1;
	uint64_t nregions = set->intent_cur.nbits;

	if (first >= nregions)
		return true;
	count = min_u64(count, nregions - first);
	for (uint64_t r = first; r < first + count; r++)
		if (!cbitmap_test(&set->intent_cur, r))
			return false;
	return true;
}

/* Records the regions of [off, off + len) before the write reaches them. */
static void mark_intent(struct bitmap_set *set, uint64_t off, uint64_t len)
{
	uint64_t first = off >> REGION_BITS, count = ((off + len - 1) >> REGION_BITS) - first + 1;
	uint64_t nregions = set->intent_cur.nbits;

	if (intent_recorded(set, off, len))
		return;
	count = min_u64(count, nregions - first);
	pthread_mutex_lock(&set->lock);
	bool any_new = false;
	for (uint64_t r = first; r < first + count; r++) {
		if (!cbitmap_test(&set->intent_cur, r)) {
			cbitmap_set(&set->intent_cur, r);
			any_new = true;
		}
	}
	if (any_new) {
		int rc = write_intent_locked(set);
		if (rc) {
			char why[160];
			snprintf(why, sizeof(why), "cannot record write intent in %s: %s", set->dir, error_text(-rc));
			log_error("bitmaps of %s: %s", set->path, why);
			mark_inconsistent_locked(set, why);
		}
	}
	pthread_mutex_unlock(&set->lock);
}

/* nowait: for the io_uring fast path, which must not sleep: -EAGAIN, with
 * nothing marked, where the write would wait (a region's first write, whose
 * intent record is written and synced first; a write past a bitmap's end,
 * which takes the lock). */
static int mark_write(struct image_hook *hook, uint64_t off, uint64_t len, bool nowait)
{
	struct bitmap_set *set = (struct bitmap_set *)((char *)hook - offsetof(struct bitmap_set, hook));

	if (!len || !set->list)
		return 0;
	/* The save in progress waits for writers of the epoch it closed. */
	int e = atomic_load(&set->epoch);
	for (;;) {
		atomic_fetch_add(&set->active[e], 1);
		int now = atomic_load(&set->epoch);
		if (now == e)
			break;
		atomic_fetch_sub(&set->active[e], 1);
		e = now;
	}
	if (nowait) {
		bool waits = !intent_recorded(set, off, len);
		for (struct dirty_bitmap *bm = set->list; bm && !waits; bm = bm->next)
			waits = atomic_load_explicit(&bm->enabled, memory_order_relaxed) && off + len > bm->size;
		if (waits) {
			atomic_fetch_sub(&set->active[e], 1);
			return -EAGAIN;
		}
		/* Recorded, and not to be looked at again: a save that clears the
		 * record now moved it into the old one first, and waits for this
		 * write of its epoch to mark its bits. */
	} else {
		mark_intent(set, off, len);
	}
	for (struct dirty_bitmap *bm = set->list; bm; bm = bm->next) {
		if (!atomic_load_explicit(&bm->enabled, memory_order_relaxed))
			continue;
		if (off + len > bm->size) {
			pthread_mutex_lock(&set->lock);
			if (!bm->inconsistent)
				snprintf(bm->why, sizeof(bm->why), "the image grew beyond %" PRIu64 " bytes", bm->size);
			bm->inconsistent = true;
			pthread_mutex_unlock(&set->lock);
		}
		if (off < bm->size) {
			uint64_t end = min_u64(off + len, bm->size);
			uint64_t g0 = off >> bm->gran_bits, g1 = (end - 1) >> bm->gran_bits;
			cbitmap_mark_range(&bm->bits, g0, g1 - g0 + 1);
		}
	}
	if (!atomic_load_explicit(&set->changed, memory_order_relaxed))
		atomic_store(&set->changed, true);
	atomic_fetch_sub(&set->active[e], 1);
	return 0;
}

static int set_before_write(struct image_hook *hook, uint64_t off, uint64_t len)
{
	return mark_write(hook, off, len, false);
}

static int set_before_write_nowait(struct image_hook *hook, uint64_t off, uint64_t len)
{
	return mark_write(hook, off, len, true);
}

/* ---- saving ----------------------------------------------------------------- */

static int write_meta(struct bitmap_set *set, bool clean)
{
	struct stat st;
	char buf[PATH_MAX + 512];
	int n;

	if (!set->image || image_fstat(set->image, &st) < 0)
		return 0;
	n = snprintf(buf, sizeof(buf),
		     "path=%s\ndev=%" PRIu64 "\nino=%" PRIu64 "\nsize=%" PRIu64 "\nmtime=%" PRId64 ".%09ld\n"
		     "ctime=%" PRId64 ".%09ld\nclean=%d\n",
		     set->path, (uint64_t)st.st_dev, (uint64_t)st.st_ino, (uint64_t)st.st_size, (int64_t)st.st_mtim.tv_sec,
		     st.st_mtim.tv_nsec, (int64_t)st.st_ctim.tv_sec, st.st_ctim.tv_nsec, clean);
	return write_state_file(set->dir, "image", buf, (size_t)n);
}

/* The image's path relative to SOURCE_DIR, as it is now (renames included). */
static void refresh_path(struct bitmap_set *set)
{
	char real[PATH_MAX];
	size_t root = strlen(source_root);

	if (!set->image || image_path(set->image, real, sizeof(real)) < 0)
		return;
	if (strncmp(real, source_root, root) == 0 && real[root] == '/') {
		char *p = strdup(real + root + 1);
		if (p) {
			free(set->path);
			set->path = p;
		}
	}
}

static void save_set(struct bitmap_set *set, bool clean)
{
	pthread_mutex_lock(&set->lock);
	cbitmap_or(&set->intent_old, &set->intent_cur);
	cbitmap_fill(&set->intent_cur, false);
	int old = atomic_load(&set->epoch);
	atomic_store(&set->epoch, !old);
	atomic_store(&set->changed, false);
	pthread_mutex_unlock(&set->lock);
	/* Every writer of the closed epoch has set its bits once this ends. */
	while (atomic_load(&set->active[old]))
		sleep_until_ns(clock_monotonic_ns() + 50000);
	pthread_mutex_lock(&set->lock);
	refresh_path(set);
	int rc = 0;
	for (struct dirty_bitmap *bm = set->list; bm && !rc; bm = bm->next)
		rc = save_words(set, bm, &bm->bits, "bitmap");
	if (!rc)
		rc = write_meta(set, clean);
	if (!rc) {
		sync_dir(set->dir);
		cbitmap_fill(&set->intent_old, false);
		rc = write_intent_locked(set);
	}
	if (rc) {
		/* The intent log still covers everything: nothing is lost, the
		 * next save tries again. */
		log_warn("bitmaps of %s: cannot save: %s", set->path, error_text(-rc));
		atomic_store(&set->changed, true);
	}
	pthread_mutex_unlock(&set->lock);
}

static void *saver_thread(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&saver_lock);
	while (!saver_stop) {
		struct timespec ts;
		timespec_from_ns(&ts, clock_realtime_ns() + SAVE_INTERVAL_NS);
		pthread_cond_timedwait(&saver_wake, &saver_lock, &ts);
		if (saver_stop)
			break;
		pthread_mutex_unlock(&saver_lock);
		pthread_mutex_lock(&registry_lock);
		for (struct bitmap_set *set = sets; set; set = set->next)
			if (set->image && atomic_load(&set->changed))
				save_set(set, false);
		pthread_mutex_unlock(&registry_lock);
		pthread_mutex_lock(&saver_lock);
	}
	pthread_mutex_unlock(&saver_lock);
	return NULL;
}

/* ---- sets ------------------------------------------------------------------- */

static void free_bitmap(struct dirty_bitmap *bm)
{
	cbitmap_destroy(&bm->bits);
	if (bm->frozen.words)
		cbitmap_destroy(&bm->frozen);
	free(bm);
}

static struct bitmap_set *new_set(struct image *img, const char *dir)
{
	struct bitmap_set *set = calloc(1, sizeof(*set));
	int64_t now = img ? image_size(img) : 0;
	uint64_t size = now > 0 ? (uint64_t)now : 0;
	uint64_t nregions = max_u64(div_round_up(size, 1ull << REGION_BITS), 1) * 2; /* room to grow */

	if (!set || !(set->dir = strdup(dir)) || cbitmap_init(&set->intent_cur, nregions, false) ||
	    cbitmap_init(&set->intent_old, nregions, false)) {
		if (set)
			free(set->dir);
		free(set);
		return NULL;
	}
	pthread_mutex_init(&set->lock, NULL);
	set->hook.before_write = set_before_write;
	set->hook.before_write_nowait = set_before_write_nowait;
	set->intent_fd = -1;
	atomic_init(&set->epoch, 0);
	atomic_init(&set->changed, false);
	if (img) {
		image_ref(img);
		set->image = img;
		set->dev = img->dev;
		set->ino = img->ino;
	}
	return set;
}

static int open_intent(struct bitmap_set *set)
{
	char path[PATH_MAX];
	join(path, sizeof(path), set->dir, "intent");
	set->intent_fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
	return set->intent_fd < 0 ? -errno : 0;
}

struct bitmap_set *bitmaps_of(struct image *img)
{
	pthread_mutex_lock(&registry_lock);
	struct bitmap_set *set = sets;
	while (set && set->image != img)
		set = set->next;
	pthread_mutex_unlock(&registry_lock);
	return set;
}

struct dirty_bitmap *bitmap_find(struct bitmap_set *set, const char *name)
{
	for (struct dirty_bitmap *bm = set ? set->list : NULL; bm; bm = bm->next)
		if (strcmp(bm->name, name) == 0)
			return bm;
	return NULL;
}

static uint64_t take_serial(void)
{
	pthread_mutex_lock(&registry_lock);
	uint64_t s = next_serial++;
	pthread_mutex_unlock(&registry_lock);
	return s;
}

/* Creates the set of an image on its first bitmap (gate closed). */
static int make_set(struct image *img, struct bitmap_set **out, char *err, size_t errlen)
{
	char dir[PATH_MAX];
	int rc;

	snprintf(dir, sizeof(dir), "%s/%" PRIu64 "-%" PRIu64, state_bitmaps_dir, (uint64_t)img->dev, (uint64_t)img->ino);
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return set_error(err, errlen, errno, "cannot create %s: %s", dir, error_text(errno));
	struct bitmap_set *set = new_set(img, dir);
	if (!set)
		return set_error(err, errlen, ENOMEM, "out of memory");
	set->path = strdup("");
	refresh_path(set);
	if ((rc = open_intent(set)) || (rc = write_intent_locked(set)) || (rc = write_meta(set, false))) {
		set_error(err, errlen, -rc, "cannot write %s: %s", dir, error_text(-rc));
		return rc;  /* the set is kept; a later add tries again */
	}
	sync_dir(state_bitmaps_dir);
	/* The bitmaps hook runs before any job's. */
	if ((rc = image_attach_locked(img, &set->hook, true)))
		return set_error(err, errlen, -rc, "out of memory");
	set->attached = true;
	pthread_mutex_lock(&registry_lock);
	set->next = sets;
	sets = set;
	pthread_mutex_unlock(&registry_lock);
	*out = set;
	return 0;
}

/* ---- start and stop -------------------------------------------------------- */

static int read_meta(const char *dir, char *path, size_t pathlen, uint64_t *dev, uint64_t *ino, uint64_t *size,
		     char *mtime, char *ctime, int *clean)
{
	char file[PATH_MAX], line[PATH_MAX + 16];
	join(file, sizeof(file), dir, "image");
	FILE *f = fopen(file, "re");
	int have = 0;

	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = '\0';
		char *eq = strchr(line, '=');
		if (!eq)
			continue;
		*eq++ = '\0';
		if (!strcmp(line, "path"))
			snprintf(path, pathlen, "%s", eq), have |= 1;
		else if (!strcmp(line, "dev"))
			*dev = strtoull(eq, NULL, 10), have |= 2;
		else if (!strcmp(line, "ino"))
			*ino = strtoull(eq, NULL, 10), have |= 4;
		else if (!strcmp(line, "size"))
			*size = strtoull(eq, NULL, 10), have |= 8;
		else if (!strcmp(line, "mtime"))
			snprintf(mtime, 32, "%s", eq), have |= 16;
		else if (!strcmp(line, "ctime"))
			snprintf(ctime, 32, "%s", eq), have |= 32;
		else if (!strcmp(line, "clean"))
			*clean = atoi(eq), have |= 64;
	}
	fclose(f);
	return have == 127 ? 0 : -EINVAL;
}

static void format_ts(char *buf, const struct timespec *ts)
{
	snprintf(buf, 32, "%" PRId64 ".%09ld", (int64_t)ts->tv_sec, ts->tv_nsec);
}

/* Finds the file with (dev, ino) below SOURCE_DIR: its path relative to it. */
static uint64_t want_dev, want_ino;
static char found_path[PATH_MAX];

static int match_inode(const char *fpath, const struct stat *st, int type, struct FTW *ftw)
{
	(void)type;
	(void)ftw;
	if (S_ISREG(st->st_mode) && stat_is(st, want_dev, want_ino)) {
		snprintf(found_path, sizeof(found_path), "%s", fpath);
		return 1;
	}
	return 0;
}

static int find_by_inode(uint64_t dev, uint64_t ino, char *out, size_t len)
{
	size_t root = strlen(source_root);

	want_dev = dev;
	want_ino = ino;
	found_path[0] = '\0';
	if (nftw(source_root, match_inode, 16, FTW_PHYS | FTW_MOUNT) != 1 || strncmp(found_path, source_root, root) ||
	    found_path[root] != '/')
		return -ENOENT;
	snprintf(out, len, "%s", found_path + root + 1);
	return 0;
}

/* What the identity record of a set says of its image. */
struct identity {
	char path[PATH_MAX];         /* relative to SOURCE_DIR ("" if unknown) */
	uint64_t dev, ino;
	struct image *image;         /* referenced; NULL if not found */
	char why[160];               /* set: the bitmaps cannot be trusted */
	int clean;                   /* 1 clean stop, 0 crash, -1 crash + changed */
};

/* Finds the image of dir and judges its identity record. */
static void check_identity(const char *dir, struct identity *id)
{
	char mtime[32] = "", ctime[32] = "";
	uint64_t size = 0;

	if (read_meta(dir, id->path, sizeof(id->path), &id->dev, &id->ino, &size, mtime, ctime, &id->clean)) {
		/* Without the record the image is still found by its inode (the
		 * directory's name), so its writes go on being tracked; but
		 * nothing proves it was not changed meanwhile. */
		snprintf(id->why, sizeof(id->why), "the record of the image's identity is missing");
		const char *base = strrchr(dir, '/');
		if (base && sscanf(base + 1, "%" SCNu64 "-%" SCNu64, &id->dev, &id->ino) == 2 &&
		    find_by_inode(id->dev, id->ino, id->path, sizeof(id->path)) == 0) {
			int fd = openat(source_dir_fd, id->path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
			if (fd >= 0) {
				if (image_get(fd, &id->image))
					id->image = NULL;
				close(fd);
			}
		}
		return;
	}
	int fd = openat(source_dir_fd, id->path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	struct stat st;
	dev_t src_dev;
	ino_t src_ino;
	/* A switched image renamed through the mount: its name is found by the
	 * source file's inode (the recorded identity is the target's). */
	if (fd < 0 && errno == ENOENT && redirect_source_of((dev_t)id->dev, (ino_t)id->ino, &src_dev, &src_ino) &&
	    find_by_inode((uint64_t)src_dev, (uint64_t)src_ino, id->path, sizeof(id->path)) == 0)
		fd = openat(source_dir_fd, id->path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	/* The identity is the served file's: after a mirror's switch, the
	 * target's (redirect.h), whose image opening the old name finds. */
	if (fd < 0 || fstat(fd, &st) < 0) {
		snprintf(id->why, sizeof(id->why), "image %.100s is gone", id->path);
	} else if (image_get(fd, &id->image)) {
		id->image = NULL;
		snprintf(id->why, sizeof(id->why), "cannot open %.100s", id->path);
	} else if (image_fstat(id->image, &st) < 0 || !stat_is(&st, id->dev, id->ino)) {
		image_put(id->image);
		id->image = NULL;
		snprintf(id->why, sizeof(id->why), "%.100s is not the file the bitmaps were recorded for", id->path);
	} else {
		char m[32], c[32];
		format_ts(m, &st.st_mtim);
		format_ts(c, &st.st_ctim);
		bool same = (uint64_t)st.st_size == size && !strcmp(m, mtime) && !strcmp(c, ctime);
		if (!same && id->clean)
			snprintf(id->why, sizeof(id->why),
				 "%.80s was changed while fleecefs was not running (size, mtime or ctime differ)", id->path);
		else if (!same)
			id->clean = -1; /* after a crash: the intent log tells */
	}
	if (fd >= 0)
		close(fd);
}

/* The NAME.bitmap files of the set's directory, with the bits a backup had
 * frozen when it was interrupted added back. */
static void load_bitmaps(struct bitmap_set *set)
{
	DIR *d = opendir(set->dir);
	for (struct dirent *e; d && (e = readdir(d));) {
		size_t n = strlen(e->d_name);
		if (n < 8 || strcmp(e->d_name + n - 7, ".bitmap") || e->d_name[0] == '.')
			continue;
		struct dirty_bitmap *bm = malloc(sizeof(*bm));
		if (!bm || load_words(set, e->d_name, bm, NULL)) {
			log_error("bitmaps: %s/%s is damaged: ignored", set->dir, e->d_name);
			free(bm);
			continue;
		}
		bm->serial = take_serial();
		bm->gran_bits = log2_u64(bm->granularity);
		/* A backup was running: what it froze is dirty again. */
		char frozen[FLEECE_NAME_MAX + 16], fpath[PATH_MAX];
		snprintf(frozen, sizeof(frozen), "%s.frozen", bm->name);
		if (load_words(set, frozen, NULL, &bm->bits) == 0)
			log_info("bitmap %s of %s: a backup was interrupted; its bits are kept", bm->name, set->path);
		join(fpath, sizeof(fpath), set->dir, frozen);
		unlink(fpath);
		bm->next = set->list;
		set->list = bm;
	}
	if (d)
		closedir(d);
}

/* After a crash: every region recorded in the intent log is dirty in every
 * enabled bitmap. Returns how many regions were recorded. */
static uint64_t replay_intent(struct bitmap_set *set)
{
	char ipath[PATH_MAX];
	uint64_t header[2] = { 0, 0 }, regions = 0;

	join(ipath, sizeof(ipath), set->dir, "intent");
	int ifd = open(ipath, O_RDONLY | O_CLOEXEC);
	if (ifd < 0)
		return 0;
	if (pread_full(ifd, header, sizeof(header), 0) == sizeof(header) && header[0] < 64) {
		uint64_t nwords = (header[1] + 63) / 64;
		for (uint64_t w = 0; w < nwords; w++) {
			uint64_t v = 0;
			if (pread_full(ifd, &v, 8, sizeof(header) + w * 8) != 8)
				break;
			for (; v; v &= v - 1) {
				uint64_t r = w * 64 + (uint64_t)__builtin_ctzll(v);
				regions++;
				for (struct dirty_bitmap *bm = set->list; bm; bm = bm->next) {
					if (!atomic_load(&bm->enabled))
						continue;
					uint64_t from = r << header[0], to = (r + 1) << header[0];
					uint64_t g0 = from >> bm->gran_bits, g1 = div_round_up(to, bm->granularity);
					cbitmap_set_range(&bm->bits, g0, g1 - g0);
				}
			}
		}
	}
	close(ifd);
	return regions;
}

/* Loads one STATE_DIR/bitmaps/DEV-INO directory. */
static void load_set(const char *dir)
{
	struct identity id = { .path = "" };

	check_identity(dir, &id);
	struct bitmap_set *set = new_set(id.image, dir);
	if (id.image)
		image_put(id.image);
	if (!set)
		return;
	/* A missing image is listed under its inode, never a state path. */
	if (!id.path[0])
		snprintf(id.path, sizeof(id.path), "missing-%" PRIu64 "-%" PRIu64, id.dev, id.ino);
	set->path = strdup(id.path);
	if (!set->image) {
		set->dev = (dev_t)id.dev;
		set->ino = (ino_t)id.ino;
	}
	load_bitmaps(set);
	uint64_t regions = replay_intent(set);
	if (id.clean == -1 && !regions)
		snprintf(id.why, sizeof(id.why),
			 "%.60s was changed while fleecefs was not running (identity differs, no write of fleecefs pending)",
			 set->path);
	if (regions)
		log_warn("bitmaps of %s: fleecefs did not stop cleanly; %" PRIu64
			 " region(s) of 16 MiB written meanwhile count as dirty", set->path, regions);
	if (id.why[0]) {
		mark_inconsistent_locked(set, id.why);
		log_error("bitmaps of %s are inconsistent: %s", set->path, id.why);
	}
	if (set->image) {
		open_intent(set);
		if (image_attach_locked(set->image, &set->hook, true) == 0)
			set->attached = true;
	}
	pthread_mutex_lock(&registry_lock);
	set->next = sets;
	sets = set;
	pthread_mutex_unlock(&registry_lock);
	if (set->image)
		save_set(set, false); /* the recovered state is the new base */
}

int bitmaps_start(const char *state_dir, int source_fd, const char *source_dir, uint32_t cluster_size)
{
	char dir[PATH_MAX];

	snprintf(dir, sizeof(dir), "%s/bitmaps", state_dir);
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return -errno;
	state_bitmaps_dir = strdup(dir);
	source_root = strdup(source_dir);
	source_dir_fd = source_fd;
	min_granularity = cluster_size;
	if (!state_bitmaps_dir || !source_root)
		return -ENOMEM;
	DIR *d = opendir(dir);
	for (struct dirent *e; d && (e = readdir(d));) {
		if (e->d_name[0] == '.')
			continue;
		char sub[PATH_MAX];
		join(sub, sizeof(sub), dir, e->d_name);
		load_set(sub);
	}
	if (d)
		closedir(d);
	return 0;
}

void bitmaps_start_saver(void)
{
	saver_stop = false;
	saver_running = pthread_create(&saver, NULL, saver_thread, NULL) == 0;
	if (!saver_running)
		log_warn("dirty bitmaps: no saver thread: they are saved only at a clean stop");
}

void bitmaps_stop(void)
{
	if (!state_bitmaps_dir)
		return;
	if (saver_running) {
		pthread_mutex_lock(&saver_lock);
		saver_stop = true;
		pthread_cond_broadcast(&saver_wake);
		pthread_mutex_unlock(&saver_lock);
		pthread_join(saver, NULL);
		saver_running = false;
	}
	pthread_mutex_lock(&registry_lock);
	struct bitmap_set *all = sets;
	sets = NULL;
	pthread_mutex_unlock(&registry_lock);
	while (all) {
		struct bitmap_set *set = all;
		all = set->next;
		struct stat st;
		if (set->image && image_fstat(set->image, &st) == 0 && st.st_nlink == 0) {
			/* The image was deleted through the mount: so are its bitmaps. */
			char file[PATH_MAX + 256];
			DIR *d = opendir(set->dir);
			for (struct dirent *e; d && (e = readdir(d));) {
				if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
					continue;
				join(file, sizeof(file), set->dir, e->d_name);
				unlink(file);
			}
			if (d)
				closedir(d);
			rmdir(set->dir);
		} else if (set->image) {
			save_set(set, true);
		}
		if (set->attached)
			image_detach(set->image, &set->hook);
		while (set->list) {
			struct dirty_bitmap *bm = set->list;
			set->list = bm->next;
			free_bitmap(bm);
		}
		if (set->intent_fd >= 0)
			close(set->intent_fd);
		if (set->image)
			image_put(set->image);
		cbitmap_destroy(&set->intent_cur);
		cbitmap_destroy(&set->intent_old);
		pthread_mutex_destroy(&set->lock);
		free(set->dir);
		free(set->path);
		free(set);
	}
	free(state_bitmaps_dir);
	free(source_root);
	state_bitmaps_dir = source_root = NULL;
}

/* ---- commands --------------------------------------------------------------- */

static const char *op_name(enum bitmap_op op)
{
	static const char *const names[] = { "add", "remove", "clear", "enable", "disable", "merge" };
	return names[op];
}

int bitmap_check(struct image *img, const struct ctl_bitmap *cmd, char *err, size_t errlen)
{
	struct bitmap_set *set = bitmaps_of(img);
	struct dirty_bitmap *bm = bitmap_find(set, cmd->name);
	const char *op = op_name(cmd->op);

	if (cmd->op == BITMAP_ADD) {
		uint64_t g = cmd->granularity ? cmd->granularity : max_u64(64 << 10, min_granularity);
		if (bm)
			return set_error(err, errlen, EEXIST, "bitmap add: %s already has a bitmap %s", cmd->image,
					 cmd->name);
		if (g < min_granularity)
			return set_error(err, errlen, EINVAL,
					 "bitmap add: granularity %" PRIu64 " is below the cluster size %" PRIu32, g,
					 min_granularity);
		if (image_size(img) < 0)
			return set_error(err, errlen, EACCES, "bitmap add: cannot read %s", cmd->image);
		return 0;
	}
	if (!bm)
		return set_error(err, errlen, ENOENT, "bitmap %s: %s has no bitmap %s", op, cmd->image, cmd->name);
	pthread_mutex_lock(&set->lock);
	int rc = 0;
	if (bm->busy_job[0] && cmd->op != BITMAP_ENABLE && cmd->op != BITMAP_DISABLE)
		rc = set_error(err, errlen, EBUSY, "bitmap %s %s: used by job %s", op, cmd->name, bm->busy_job);
	for (unsigned i = 0; !rc && cmd->op == BITMAP_MERGE && i < cmd->nsources; i++) {
		struct dirty_bitmap *src = bitmap_find(set, cmd->sources[i]);
		if (!src)
			rc = set_error(err, errlen, ENOENT, "bitmap merge: %s has no bitmap %s", cmd->image,
				       cmd->sources[i]);
		else if (src->granularity != bm->granularity || src->size != bm->size)
			rc = set_error(err, errlen, EINVAL,
				       "bitmap merge: %s and %s differ in granularity or size", cmd->name, src->name);
		else if (src->inconsistent)
			rc = set_error(err, errlen, EINVAL, "bitmap merge: %s is inconsistent (%s)", src->name, src->why);
	}
	pthread_mutex_unlock(&set->lock);
	return rc;
}

int bitmap_apply(struct image *img, const struct ctl_bitmap *cmd, char *err, size_t errlen)
{
	struct bitmap_set *set = bitmaps_of(img);
	int rc;

	if (cmd->op == BITMAP_ADD) {
		if (!set && (rc = make_set(img, &set, err, errlen)))
			return rc;
		struct dirty_bitmap *bm = calloc(1, sizeof(*bm));
		uint64_t size = (uint64_t)image_size(img);
		if (!bm)
			return set_error(err, errlen, ENOMEM, "out of memory");
		snprintf(bm->name, sizeof(bm->name), "%s", cmd->name);
		bm->granularity = cmd->granularity ? cmd->granularity : max_u64(64 << 10, min_granularity);
		bm->gran_bits = log2_u64(bm->granularity);
		bm->size = size;
		bm->since_ns = clock_realtime_ns();
		bm->serial = take_serial();
		atomic_init(&bm->enabled, !cmd->disabled);
		if (cbitmap_init(&bm->bits, div_round_up(size, bm->granularity), false)) {
			free(bm);
			return set_error(err, errlen, ENOMEM, "out of memory");
		}
		pthread_mutex_lock(&set->lock);
		rc = save_words(set, bm, &bm->bits, "bitmap");
		if (rc) {
			pthread_mutex_unlock(&set->lock);
			free_bitmap(bm);
			return set_error(err, errlen, -rc, "bitmap add: cannot save in %s: %s", set->dir, error_text(-rc));
		}
		sync_dir(set->dir);
		bm->next = set->list;
		set->list = bm;
		pthread_mutex_unlock(&set->lock);
		return 0;
	}
	struct dirty_bitmap *bm = bitmap_find(set, cmd->name);
	pthread_mutex_lock(&set->lock);
	switch (cmd->op) {
	case BITMAP_REMOVE: {
		for (struct dirty_bitmap **pp = &set->list; *pp; pp = &(*pp)->next) {
			if (*pp == bm) {
				*pp = bm->next;
				break;
			}
		}
		char path[PATH_MAX];
		const char *const suffixes[] = { "bitmap", "chain", "frozen" };
		for (int i = 0; i < 3; i++) {
			snprintf(path, sizeof(path), "%s/%s.%s", set->dir, bm->name, suffixes[i]);
			unlink(path);
		}
		sync_dir(set->dir);
		free_bitmap(bm);
		pthread_mutex_unlock(&set->lock);
		return 0;
	}
	case BITMAP_CLEAR:
		cbitmap_fill(&bm->bits, false);
		bm->inconsistent = false;
		bm->why[0] = '\0';
		bm->since_ns = clock_realtime_ns();
		break;
	case BITMAP_ENABLE:
	case BITMAP_DISABLE:
		atomic_store(&bm->enabled, cmd->op == BITMAP_ENABLE);
		break;
	case BITMAP_MERGE:
		for (unsigned i = 0; i < cmd->nsources; i++)
			cbitmap_or(&bm->bits, &bitmap_find(set, cmd->sources[i])->bits);
		break;
	default:
		break;
	}
	rc = save_words(set, bm, &bm->bits, "bitmap");
	pthread_mutex_unlock(&set->lock);
	if (rc)
		log_warn("bitmap %s: cannot save now (%s); the next save retries", bm->name, error_text(-rc));
	atomic_store(&set->changed, true);
	return 0;
}

/* ---- jobs ---------------------------------------------------------------------- */

int bitmap_job_check(struct image *img, const char *name, bool need_consistent, char *err, size_t errlen)
{
	struct bitmap_set *set = bitmaps_of(img);
	struct dirty_bitmap *bm = bitmap_find(set, name);
	int rc = 0;

	if (!bm)
		return set_error(err, errlen, ENOENT, "the image has no bitmap %s", name);
	pthread_mutex_lock(&set->lock);
	if (bm->busy_job[0])
		rc = set_error(err, errlen, EBUSY, "bitmap %s is used by job %s", name, bm->busy_job);
	else if (need_consistent && bm->inconsistent)
		rc = set_error(err, errlen, EINVAL,
			       "bitmap %s is inconsistent (%s): an incremental backup would miss changes; take a full "
			       "backup with bitmap=%s to start a new chain",
			       name, bm->why, name);
	pthread_mutex_unlock(&set->lock);
	return rc;
}

int bitmap_job_begin(struct image *img, const char *name, const char *job_id, struct dirty_bitmap **out, char *err,
		     size_t errlen)
{
	struct bitmap_set *set = bitmaps_of(img);
	struct dirty_bitmap *bm = bitmap_find(set, name);
	int rc;

	if (!bm)
		return set_error(err, errlen, ENOENT, "the image has no bitmap %s", name);
	pthread_mutex_lock(&set->lock);
	if (cbitmap_init(&bm->frozen, bm->bits.nbits, false)) {
		pthread_mutex_unlock(&set->lock);
		return set_error(err, errlen, ENOMEM, "out of memory");
	}
	cbitmap_copy(&bm->frozen, &bm->bits);
	/* The bits of T are on disk before the live bitmap forgets them. */
	if ((rc = save_words(set, bm, &bm->frozen, "frozen"))) {
		cbitmap_destroy(&bm->frozen);
		pthread_mutex_unlock(&set->lock);
		return set_error(err, errlen, -rc, "bitmap %s: cannot save in %s: %s", name, set->dir, error_text(-rc));
	}
	cbitmap_fill(&bm->bits, false);
	/* A full backup starts a new chain: the bitmap is trustworthy again. */
	bm->inconsistent = false;
	bm->why[0] = '\0';
	bm->since_ns = clock_realtime_ns();
	snprintf(bm->busy_job, sizeof(bm->busy_job), "%s", job_id);
	atomic_store(&set->changed, true);
	pthread_mutex_unlock(&set->lock);
	*out = bm;
	return 0;
}

void bitmap_job_end(struct image *img, struct dirty_bitmap *bm, int mode, bool success, const struct cbitmap *left,
		    unsigned cluster_bits)
{
	struct bitmap_set *set = bitmaps_of(img);
	char path[PATH_MAX];

	pthread_mutex_lock(&set->lock);
	if (success && mode == BITMAP_MODE_NEVER) {
		cbitmap_or(&bm->bits, &bm->frozen);
	} else if (!success && mode == BITMAP_MODE_ALWAYS && left) {
		/* What the job did not copy stays to do. */
		for (uint64_t c = cbitmap_next_set(left, 0); c < left->nbits; c = cbitmap_next_set(left, c + 1))
			cbitmap_set(&bm->bits, (c << cluster_bits) >> bm->gran_bits);
	} else if (!success) {
		cbitmap_or(&bm->bits, &bm->frozen);
	}
	cbitmap_destroy(&bm->frozen);
	bm->busy_job[0] = '\0';
	int rc = save_words(set, bm, &bm->bits, "bitmap");
	if (!rc) {
		snprintf(path, sizeof(path), "%s/%s.frozen", set->dir, bm->name);
		unlink(path);
	}
	pthread_mutex_unlock(&set->lock);
	if (rc)
		log_warn("bitmap %s: cannot save (%s); its .frozen file keeps the bits of T", bm->name, error_text(-rc));
}

void bitmap_chain_format(const struct chain_info *c, struct strbuf *out)
{
	strbuf_printf(out, "target=%s\nfinal=%s\npartial=%d\nformat=%s\nsync=%s\ntime=%" PRIu64 ".%09" PRIu64
			   "\njob=%s\nsize=%" PRIu64 "\ndev=%" PRIu64 "\nino=%" PRIu64 "\nchecksum=%s\n",
		      c->target, c->final, c->partial, c->format, c->sync, c->time_ns / 1000000000u,
		      c->time_ns % 1000000000u, c->job, c->size, c->dev, c->ino, c->checksum ? "xxh3" : "none");
}

int bitmap_chain_path_by_name(struct image *img, const char *name, char *out, size_t len)
{
	struct bitmap_set *set = bitmaps_of(img);
	if (!set || snprintf(out, len, "%s/%s.chain", set->dir, name) >= (int)len)
		return -ENOENT;
	return 0;
}

int bitmap_chain_put(struct image *img, struct dirty_bitmap *bm, const char *text)
{
	struct bitmap_set *set = bitmaps_of(img);
	char file[FLEECE_NAME_MAX + 16];

	snprintf(file, sizeof(file), "%s.chain", bm->name);
	pthread_mutex_lock(&set->lock);
	int rc = write_state_file(set->dir, file, text, strlen(text));
	if (!rc)
		sync_dir(set->dir);
	pthread_mutex_unlock(&set->lock);
	if (rc)
		log_warn("bitmap %s: cannot record its chain: %s", bm->name, error_text(-rc));
	return rc;
}

/* Reads NAME.chain of the set into *c. */
static int read_chain(struct bitmap_set *set, const char *name, struct chain_info *c)
{
	char path[PATH_MAX], line[PATH_MAX + 16];

	memset(c, 0, sizeof(*c));
	if (!set || snprintf(path, sizeof(path), "%s/%s.chain", set->dir, name) >= (int)sizeof(path))
		return -ENOENT;
	FILE *f = fopen(path, "re");
	if (!f)
		return -errno;
	c->checksum = true;
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = '\0';
		char *eq = strchr(line, '=');
		if (!eq)
			continue;
		*eq++ = '\0';
		if (!strcmp(line, "target"))
			snprintf(c->target, sizeof(c->target), "%s", eq);
		else if (!strcmp(line, "final"))
			snprintf(c->final, sizeof(c->final), "%s", eq);
		else if (!strcmp(line, "partial"))
			c->partial = atoi(eq) != 0;
		else if (!strcmp(line, "format"))
			snprintf(c->format, sizeof(c->format), "%s", eq);
		else if (!strcmp(line, "sync"))
			snprintf(c->sync, sizeof(c->sync), "%s", eq);
		else if (!strcmp(line, "job"))
			snprintf(c->job, sizeof(c->job), "%s", eq);
		else if (!strcmp(line, "time")) {
			char *frac;
			c->time_ns = strtoull(eq, &frac, 10) * 1000000000ull;
			if (*frac == '.')
				c->time_ns += strtoull(frac + 1, NULL, 10);
		}
		else if (!strcmp(line, "size"))
			c->size = strtoull(eq, NULL, 10);
		else if (!strcmp(line, "dev"))
			c->dev = strtoull(eq, NULL, 10);
		else if (!strcmp(line, "ino"))
			c->ino = strtoull(eq, NULL, 10);
		else if (!strcmp(line, "checksum"))
			c->checksum = strcmp(eq, "none") != 0;
	}
	fclose(f);
	if (!c->final[0])
		snprintf(c->final, sizeof(c->final), "%s", c->target);
	return c->target[0] ? 0 : -ENOENT;
}

int bitmap_chain_get(struct image *img, const char *name, struct chain_info *out)
{
	return read_chain(bitmaps_of(img), name, out);
}

/* ---- listing and status --------------------------------------------------------- */

void bitmaps_for_each(bitmap_visit_fn fn, void *arg)
{
	pthread_mutex_lock(&registry_lock);
	for (struct bitmap_set *set = sets; set; set = set->next) {
		pthread_mutex_lock(&set->lock);
		refresh_path(set);
		for (struct dirty_bitmap *bm = set->list; bm; bm = bm->next)
			fn(arg, set->path, bm);
		pthread_mutex_unlock(&set->lock);
	}
	pthread_mutex_unlock(&registry_lock);
}

bool bitmap_exists(uint64_t serial)
{
	bool found = false;

	pthread_mutex_lock(&registry_lock);
	for (struct bitmap_set *set = sets; set && !found; set = set->next) {
		pthread_mutex_lock(&set->lock);
		for (struct dirty_bitmap *bm = set->list; bm && !found; bm = bm->next)
			found = bm->serial == serial;
		pthread_mutex_unlock(&set->lock);
	}
	pthread_mutex_unlock(&registry_lock);
	return found;
}

int bitmap_status(uint64_t serial, struct strbuf *out)
{
	int rc = -ENOENT;

	pthread_mutex_lock(&registry_lock);
	for (struct bitmap_set *set = sets; set && rc; set = set->next) {
		pthread_mutex_lock(&set->lock);
		for (struct dirty_bitmap *bm = set->list; bm; bm = bm->next) {
			if (bm->serial != serial)
				continue;
			uint64_t dirty = cbitmap_count(&bm->bits) * bm->granularity;
			struct chain_info chain;
			if (read_chain(set, bm->name, &chain) == 0)
				strbuf_printf(out, "last_backup_target=%s\nlast_backup_sync=%s\nlast_backup_time=%" PRIu64
						   ".%09" PRIu64 "\nlast_backup_partial=%s\n", chain.target, chain.sync,
					      chain.time_ns / 1000000000u, chain.time_ns % 1000000000u,
					      chain.partial ? "yes" : "no");
			strbuf_printf(out, "name=%s\nimage=%s\ngranularity=%" PRIu64 "\ndirty_bytes=%" PRIu64 "\n", bm->name,
				      set->path, bm->granularity, min_u64(dirty, bm->size));
			strbuf_printf(out, "state=%s\nrecording=%s\nsince=%" PRIu64 ".%09" PRIu64 "\nbusy=%s\nreason=%s\n",
				      bm->inconsistent ? "inconsistent" : "active",
				      atomic_load(&bm->enabled) ? "yes" : "no", bm->since_ns / 1000000000u,
				      bm->since_ns % 1000000000u, bm->busy_job, bm->inconsistent ? bm->why : "");
			rc = 0;
			break;
		}
		pthread_mutex_unlock(&set->lock);
	}
	pthread_mutex_unlock(&registry_lock);
	return rc;
}
