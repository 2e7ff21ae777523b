/* journal: see include/fleecefs/journal.h */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "fleecefs/journal.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

#define JOURNAL_MAGIC "FLEECEJ1"
#define JOURNAL_VERSION 1u
#define RECORD_MAGIC 0x4a524543u   /* "JREC" */
#define RECORD_ZERO 1u
/* Old content is read and appended in pieces of at most this much. */
#define PIECE_MAX (4u << 20)

struct journal_header {
	char magic[8];
	uint32_t version, cluster_size;
	uint64_t file_size, dev, ino;
	uint64_t hash;           /* of everything above */
};

struct record_header {
	uint32_t magic, flags;
	uint64_t off, len;
	uint64_t data_hash;      /* 0 for a zero record */
	uint64_t hash;           /* of the fields above */
};

struct journal {
	char *path;
	int fd;
	struct journal_file file;
	uint64_t file_size;
	uint32_t cluster_size;
	unsigned cluster_bits;
	struct cbitmap saved;
	pthread_mutex_t lock;
	uint64_t end;            /* lock: where the next record goes */
};

const char *journal_path(const struct journal *j) { return j->path; }

static uint64_t header_hash(const struct journal_header *h)
{
	return XXH3_64bits(h, offsetof(struct journal_header, hash));
}

static uint64_t record_hash(const struct record_header *r)
{
	return XXH3_64bits(r, offsetof(struct record_header, hash));
}

/* ---- a local file, through its descriptor ---------------------------------- */

static int fd_of(void *ctx) { return (int)(intptr_t)ctx; }

static int fd_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
	ssize_t got = pread_full(fd_of(ctx), buf, (size_t)len, off);
	if (got < 0)
		return (int)got;
	if ((uint64_t)got < len)   /* past the end: zeroes */
		memset((char *)buf + got, 0, (size_t)(len - (uint64_t)got));
	return 0;
}

static int fd_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
	return pwrite_full(fd_of(ctx), buf, (size_t)len, off) < 0 ? -errno : 0;
}

static int fd_zero(void *ctx, uint64_t off, uint64_t len)
{
	int fd = fd_of(ctx);
	if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
		return 0;
	static const char zeroes[65536];
	for (uint64_t done = 0; done < len;) {
		size_t n = (size_t)min_u64(len - done, sizeof(zeroes));
		if (pwrite_full(fd, zeroes, n, off + done) < 0)
			return -errno;
		done += n;
	}
	return 0;
}

static int fd_sync(void *ctx)
{
	return fdatasync(fd_of(ctx)) < 0 ? -errno : 0;
}

static int file_of_fd(int fd, struct journal_file *out)
{
	struct stat st;
	if (fstat(fd, &st) < 0)
		return -errno;
	*out = (struct journal_file){ .read = fd_read, .write = fd_write, .zero = fd_zero, .sync = fd_sync,
				      .ctx = (void *)(intptr_t)fd, .dev = (uint64_t)st.st_dev, .ino = (uint64_t)st.st_ino };
	return 0;
}

int journal_create(const char *path, int file_fd, uint64_t file_size, uint32_t cluster_size,
		   struct journal **out, char *err, size_t errlen)
{
	struct journal_file file;
	int rc = file_of_fd(file_fd, &file);
	if (rc)
		return set_error(err, errlen, -rc, "journal %s: %s", path, error_text(-rc));
	return journal_create_on(path, &file, file_size, cluster_size, out, err, errlen);
}

int journal_create_on(const char *path, const struct journal_file *file, uint64_t file_size, uint32_t cluster_size,
		      struct journal **out, char *err, size_t errlen)
{
	struct journal *j = calloc(1, sizeof(*j));
	int e;

	if (!j || !(j->path = strdup(path))) {
		free(j);
		return set_error(err, errlen, ENOMEM, "journal %s: %s", path, error_text(ENOMEM));
	}
	j->file = *file;
	j->file_size = file_size;
	j->cluster_size = cluster_size;
	j->cluster_bits = log2_u64(cluster_size);
	pthread_mutex_init(&j->lock, NULL);
	if (cbitmap_init(&j->saved, div_round_up(file_size, cluster_size), false)) {
		e = ENOMEM;
		goto fail;
	}
	j->fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (j->fd < 0) {
		e = errno;
		goto fail;
	}
	struct journal_header h = { .version = JOURNAL_VERSION, .cluster_size = cluster_size,
				    .file_size = file_size, .dev = file->dev, .ino = file->ino };
	memcpy(h.magic, JOURNAL_MAGIC, 8);
	h.hash = header_hash(&h);
	if (pwrite_full(j->fd, &h, sizeof(h), 0) < 0 || fdatasync(j->fd) < 0 || fsync_parent_dir(path) < 0) {
		e = errno ? errno : EIO;
		close(j->fd);
		unlink(path);
		goto fail;
	}
	j->end = sizeof(h);
	*out = j;
	return 0;
fail:
	if (j->saved.words)
		cbitmap_destroy(&j->saved);
	pthread_mutex_destroy(&j->lock);
	free(j->path);
	free(j);
	return set_error(err, errlen, e, "journal %s: cannot create: %s", path, error_text(e));
}

bool journal_covers(const struct journal *j, uint64_t off, uint64_t len)
{
	if (!len || off >= j->file_size)
		return true;
	uint64_t end = min_u64(off + len, j->file_size);
	uint64_t first = off >> j->cluster_bits, last = (end - 1) >> j->cluster_bits;
	for (uint64_t c = first; c <= last; c++)
		if (!cbitmap_test(&j->saved, c))
			return false;
	return true;
}

/* Appends one record of [off, off + len) whose old content is in buf (NULL:
 * zeroes). */
static int append_record(struct journal *j, uint64_t off, uint64_t len, const void *buf)
{
	struct record_header r = { .magic = RECORD_MAGIC, .flags = buf ? 0 : RECORD_ZERO, .off = off, .len = len };
	int rc = 0;

	if (buf)
		r.data_hash = XXH3_64bits(buf, (size_t)len);
	r.hash = record_hash(&r);
	/* Appended whole under the lock: a later record made durable by
	 * someone's fdatasync never lies behind a gap. */
	pthread_mutex_lock(&j->lock);
	if (pwrite_full(j->fd, &r, sizeof(r), j->end) < 0 ||
	    (buf && pwrite_full(j->fd, buf, (size_t)len, j->end + sizeof(r)) < 0))
		rc = -errno ? -errno : -EIO;
	else
		j->end += sizeof(r) + (buf ? len : 0);
	pthread_mutex_unlock(&j->lock);
	return rc;
}

/* Saves the unsaved clusters [first, first + count) (all unsaved), reading
 * them in pieces; zero clusters become zero records. */
static int save_run(struct journal *j, uint64_t first, uint64_t count, void *buf, uint64_t buf_len)
{
	uint64_t cs = j->cluster_size;

	while (count) {
		uint64_t n = min_u64(count, max_u64(buf_len >> j->cluster_bits, 1));
		uint64_t off = first << j->cluster_bits;
		uint64_t len = min_u64(n << j->cluster_bits, j->file_size - off);
		int got = j->file.read(j->file.ctx, buf, len, off);
		if (got < 0)
			return got;
		/* Split into runs of zero and of data clusters. */
		for (uint64_t pos = 0; pos < len;) {
			bool zero = buffer_is_zero((char *)buf + pos, (size_t)min_u64(cs, len - pos));
			uint64_t end = pos;
			while (end < len && buffer_is_zero((char *)buf + end, (size_t)min_u64(cs, len - end)) == zero)
				end += cs;
			end = min_u64(end, len);
			int rc = append_record(j, off + pos, end - pos, zero ? NULL : (char *)buf + pos);
			if (rc)
				return rc;
			pos = end;
		}
		first += n;
		count -= n;
	}
	return 0;
}

int journal_protect(struct journal *j, const struct journal_range *ranges, unsigned n)
{
	void *buf = NULL;
	bool appended = false;
	uint64_t want = 0;
	int rc = 0;

	for (unsigned i = 0; i < n; i++)
		want += ranges[i].len + j->cluster_size;
	want = min_u64(want, PIECE_MAX);
	for (unsigned i = 0; i < n && !rc; i++) {
		if (journal_covers(j, ranges[i].off, ranges[i].len))
			continue;
		uint64_t end = min_u64(ranges[i].off + ranges[i].len, j->file_size);
		uint64_t first = ranges[i].off >> j->cluster_bits, last = (end - 1) >> j->cluster_bits;
		if (!buf && posix_memalign(&buf, 4096, (size_t)max_u64(want, j->cluster_size))) {
			buf = NULL;
			rc = -ENOMEM;
			break;
		}
		for (uint64_t c = first; c <= last && !rc;) {
			if (cbitmap_test(&j->saved, c)) {
				c++;
				continue;
			}
			uint64_t run_end = c;
			while (run_end <= last && !cbitmap_test(&j->saved, run_end))
				run_end++;
			rc = save_run(j, c, run_end - c, buf, max_u64(want, j->cluster_size));
			appended = true;
			c = run_end;
		}
	}
	free(buf);
	if (!rc && appended && fdatasync(j->fd) < 0)
		rc = -errno;
	if (rc)
		return rc;
	/* Durable now: these clusters may be overwritten. */
	for (unsigned i = 0; i < n; i++) {
		if (!ranges[i].len || ranges[i].off >= j->file_size)
			continue;
		uint64_t end = min_u64(ranges[i].off + ranges[i].len, j->file_size);
		uint64_t first = ranges[i].off >> j->cluster_bits, last = (end - 1) >> j->cluster_bits;
		cbitmap_set_range(&j->saved, first, last - first + 1);
	}
	return 0;
}

/* ---- applying records ---------------------------------------------------- */

/* Writes back [off, off + len) of one record (data in buf, NULL: zeroes),
 * restricted to the clusters in `only` when given. */
static int write_back(const struct journal_file *file, uint64_t off, uint64_t len, const char *buf,
		      const struct cbitmap *only, unsigned cluster_bits)
{
	uint64_t cs = 1ull << cluster_bits;

	for (uint64_t pos = 0; pos < len;) {
		uint64_t c = (off + pos) >> cluster_bits;
		uint64_t piece = min_u64(len - pos, ((c + 1) << cluster_bits) - (off + pos));
		if (only) {
			/* Gather a run of wanted (or unwanted) clusters. */
			bool want = c < only->nbits && cbitmap_test(only, c);
			while (pos + piece < len) {
				uint64_t c2 = (off + pos + piece) >> cluster_bits;
				if ((c2 < only->nbits && cbitmap_test(only, c2)) != want)
					break;
				piece = min_u64(len - pos, piece + cs);
			}
			if (!want) {
				pos += piece;
				continue;
			}
		} else {
			piece = len - pos;
		}
		int rc = buf ? file->write(file->ctx, buf + pos, piece, off + pos) : file->zero(file->ctx, off + pos, piece);
		if (rc)
			return rc;
		pos += piece;
	}
	return 0;
}

/* Applies the records of the journal open on jfd to file_fd, newest first,
 * so that if a cluster was ever saved twice its oldest content wins. */
static int apply(int jfd, const struct journal_file *file, uint64_t from, const struct journal_header *h,
		 const struct cbitmap *only, uint64_t *applied)
{
	unsigned bits = log2_u64(h->cluster_size);
	uint64_t *where = NULL;
	size_t n = 0, cap = 0;
	void *buf = NULL;
	size_t buf_cap = 0;
	int rc = 0;

	*applied = 0;
	for (uint64_t pos = from;;) {
		struct record_header r;
		if (pread_full(jfd, &r, sizeof(r), pos) != sizeof(r) || r.magic != RECORD_MAGIC ||
		    r.hash != record_hash(&r) || r.off > h->file_size || r.len > h->file_size - r.off ||
		    r.len > (1ull << 32) || r.len == 0)
			break;  /* the tail: writes that never started */
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			uint64_t *grown = realloc(where, cap * sizeof(*grown));
			if (!grown) {
				free(where);
				return -ENOMEM;
			}
			where = grown;
		}
		where[n++] = pos;
		pos += sizeof(r) + ((r.flags & RECORD_ZERO) ? 0 : r.len);
	}
	for (size_t i = n; i-- > 0 && !rc;) {
		struct record_header r;
		const char *data = NULL;
		if (pread_full(jfd, &r, sizeof(r), where[i]) != sizeof(r)) {
			rc = -EIO;
			break;
		}
		if (!(r.flags & RECORD_ZERO)) {
			if (r.len > buf_cap) {
				free(buf);
				buf_cap = (size_t)r.len;
				if (!(buf = malloc(buf_cap))) {
					rc = -ENOMEM;
					break;
				}
			}
			/* Torn data: a record of the last, unsynced group, whose
			 * write never started. */
			if (pread_full(jfd, buf, (size_t)r.len, where[i] + sizeof(r)) != (ssize_t)r.len ||
			    XXH3_64bits(buf, (size_t)r.len) != r.data_hash)
				continue;
			data = buf;
		}
		if (!(rc = write_back(file, r.off, r.len, data, only, bits)))
			(*applied)++;
	}
	free(buf);
	free(where);
	if (!rc)
		rc = file->sync(file->ctx);
	return rc;
}

int journal_rollback(struct journal *j, const struct cbitmap *only)
{
	struct journal_header h;
	uint64_t applied;

	if (pread_full(j->fd, &h, sizeof(h), 0) != sizeof(h))
		return -EIO;
	return apply(j->fd, &j->file, sizeof(h), &h, only, &applied);
}

int journal_close(struct journal *j, bool remove)
{
	int rc = 0;

	if (!j)
		return 0;
	close(j->fd);
	if (remove) {
		if (unlink(j->path) < 0 && errno != ENOENT)
			rc = -errno;
		else
			rc = fsync_parent_dir(j->path);
	}
	cbitmap_destroy(&j->saved);
	pthread_mutex_destroy(&j->lock);
	free(j->path);
	free(j);
	return rc;
}

int journal_recover(const char *path, int file_fd, char *err, size_t errlen)
{
	struct journal_file file;
	int rc = file_of_fd(file_fd, &file);
	if (rc)
		return set_error(err, errlen, -rc, "journal %s: %s", path, error_text(-rc));
	return journal_recover_on(path, &file, err, errlen);
}

int journal_recover_on(const char *path, const struct journal_file *file, char *err, size_t errlen)
{
	struct journal_header h;
	uint64_t applied = 0;
	int jfd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC), rc;

	if (jfd < 0)
		return errno == ENOENT ? -ENOENT : set_error(err, errlen, errno, "journal %s: %s", path, error_text(errno));
	if (pread_full(jfd, &h, sizeof(h), 0) != sizeof(h) || memcmp(h.magic, JOURNAL_MAGIC, 8) ||
	    h.hash != header_hash(&h) || h.version != JOURNAL_VERSION || !is_power_of_two(h.cluster_size)) {
		/* The header is written and synced before the first record: a
		 * journal without one never protected a write. */
		rc = 0;
		goto out;
	}
	if (h.dev != file->dev || h.ino != file->ino) {
		rc = set_error(err, errlen, EINVAL, "journal %s belongs to another file (inode %llu, not %llu)", path,
			       (unsigned long long)h.ino, (unsigned long long)file->ino);
		goto out;
	}
	rc = apply(jfd, file, sizeof(h), &h, NULL, &applied);
	if (rc)
		set_error(err, errlen, -rc, "journal %s: cannot roll back: %s", path, error_text(-rc));
	else
		log_info("journal %s: rolled back %llu record(s)", path, (unsigned long long)applied);
out:
	close(jfd);
	return rc;
}
