/* manifest: see include/fleecefs/manifest.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <xxhash.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/manifest.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

static struct manifest *new_manifest(const char *temp_path, uint32_t cluster_size)
{
	struct manifest *m = calloc(1, sizeof(*m));

	if (!m || !(m->temp_path = strdup(temp_path))) {
		free(m);
		return NULL;
	}
	m->fd = -1;
	m->sums_fd = -1;
	m->cluster_size = cluster_size;
	return m;
}

/* The table: an unnamed file in the manifest's directory. Where the file
 * system has no O_TMPFILE, a named one unlinked at once. */
static int open_table(struct manifest *m)
{
	char dir[PATH_MAX];
	const char *slash = strrchr(m->temp_path, '/');

	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if (snprintf(dir, sizeof(dir), "%.*s", (int)(slash - m->temp_path), m->temp_path) >= (int)sizeof(dir))
		return -ENAMETOOLONG;
	if (!dir[0])
		snprintf(dir, sizeof(dir), "/");
	m->sums_fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (m->sums_fd >= 0)
		return 0;
	if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
		return -errno;
	char name[PATH_MAX];
	if (snprintf(name, sizeof(name), "%s.sums.XXXXXX", m->temp_path) >= (int)sizeof(name))
		return -ENAMETOOLONG;
	if ((m->sums_fd = mkostemp(name, O_CLOEXEC)) < 0)
		return -errno;
	unlink(name);
	return 0;
}

static int write_slots(int fd, uint64_t slot, const uint64_t *sums, uint64_t count)
{
	ssize_t n = pwrite_full(fd, sums, (size_t)(count * sizeof(*sums)), (off_t)(slot * sizeof(*sums)));
	return n < 0 ? (int)n : 0;
}

static int read_slots(int fd, uint64_t slot, uint64_t *sums, uint64_t count)
{
	ssize_t n = pread_full(fd, sums, (size_t)(count * sizeof(*sums)), (off_t)(slot * sizeof(*sums)));
	if (n < 0)
		return (int)n;
	/* Never written (a sparse table): zeroes. */
	memset((char *)sums + n, 0, (size_t)(count * sizeof(*sums)) - (size_t)n);
	return 0;
}

static int create_temp(struct manifest *m, const char *shown, char *err, size_t errlen)
{
	m->fd = open(m->temp_path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (m->fd < 0)
		return set_error(err, errlen, errno, "manifest %s: cannot create: %s", shown, error_text(errno));
	return 0;
}

int manifest_create(const char *temp_path, uint32_t cluster_size, struct manifest **out, char *err, size_t errlen)
{
	struct manifest *m = new_manifest(temp_path, cluster_size);
	int rc;

	if (!m)
		return set_error(err, errlen, ENOMEM, "manifest %s: out of memory", temp_path);
	if ((rc = create_temp(m, temp_path, err, errlen))) {
		manifest_free(m);
		return rc;
	}
	*out = m;
	return 0;
}

/* Takes the checksums of a manifest one by one, in order, once its header is
 * read (out->nclusters is set then); 0 or -errno. */
typedef int (*sum_sink)(void *arg, const struct manifest_file *header, uint64_t index, uint64_t sum);

/* Reads and checks a manifest, streaming its checksums to `sink`. */
static int parse_manifest(const char *path, struct manifest_file *out, sum_sink sink, void *arg, char *err,
			  size_t errlen)
{
	char line[128];
	unsigned lineno = 1;
	uint64_t n = 0, c = 0;
	bool have_size = false, have_cs = false, have_n = false, have_algorithm = false;
	FILE *f = fopen(path, "re");
	int rc;

	*out = (struct manifest_file){ 0 };
	snprintf(out->format, sizeof(out->format), "raw");
	if (!f)
		return set_error(err, errlen, errno, "manifest %s: %s", path, error_text(errno));
#define header_ok (have_algorithm && have_size && have_cs && have_n && n == div_round_up(out->size, out->cluster_size))
#define BAD(...) do { fclose(f); return set_error(err, errlen, EINVAL, "manifest " __VA_ARGS__); } while (0)
	if (!fgets(line, sizeof(line), f) || strcmp(line, "fleecefs-manifest 1\n"))
		BAD("%s: line 1: not a fleecefs manifest", path);
	/* key=value up to the first checksum; keys we do not know are skipped. */
	bool in_header = true;
	while (fgets(line, sizeof(line), f)) {
		lineno++;
		size_t len = strlen(line);
		if (!len || line[len - 1] != '\n')
			BAD("%s: line %u: cut short or too long", path, lineno);
		line[--len] = '\0';
		char *eq = strchr(line, '=');
		if (in_header && eq) {
			*eq = '\0';
			const char *v = eq + 1;
			if (!strcmp(line, "algorithm")) {
				if (strcmp(v, "xxh3-64"))
					BAD("%s: line %u: algorithm %s (only xxh3-64 is known)", path, lineno, v);
				have_algorithm = true;
			} else if (!strcmp(line, "size")) {
				have_size = !parse_u64(v, &out->size);
			} else if (!strcmp(line, "cluster_size")) {
				uint64_t cs;
				have_cs = !parse_u64(v, &cs) && cs && cs <= (1u << 30);
				out->cluster_size = (uint32_t)cs;
			} else if (!strcmp(line, "clusters")) {
				have_n = !parse_u64(v, &n);
			} else if (!strcmp(line, "state")) {
				out->partial = !strcmp(v, "partial");
			} else if (!strcmp(line, "format")) {
				snprintf(out->format, sizeof(out->format), "%s", v);
			}
			continue;
		}
		if (in_header) {
			in_header = false;
			if (!header_ok)
				BAD("%s: its header lacks algorithm, size, cluster_size or clusters, or they disagree", path);
			out->nclusters = n;
		}
		char *end;
		uint64_t sum;
		if (len != 16 || c >= n || (sum = strtoull(line, &end, 16), *end))
			BAD("%s: line %u: %s", path, lineno, c >= n ? "more checksums than clusters" : "not a checksum");
		if ((rc = sink(arg, out, c, sum))) {
			fclose(f);
			return set_error(err, errlen, -rc, "manifest %s: %s", path, error_text(-rc));
		}
		c++;
	}
	if (in_header && !header_ok)
		BAD("%s: its header lacks algorithm, size, cluster_size or clusters, or they disagree", path);
	if (c != n)
		BAD("%s: %" PRIu64 " checksums for %" PRIu64 " clusters", path, c, n);
#undef BAD
#undef header_ok
	fclose(f);
	out->nclusters = n;
	return 0;
}

static int sum_into_array(void *arg, const struct manifest_file *header, uint64_t index, uint64_t sum)
{
	struct manifest_file *out = arg;
	if (index == 0 && !(out->hashes = calloc(header->nclusters, sizeof(*out->hashes))))
		return -ENOMEM;
	out->hashes[index] = sum;
	return 0;
}

int manifest_load(const char *path, struct manifest_file *out, char *err, size_t errlen)
{
	struct manifest_file got = { 0 };
	int rc = parse_manifest(path, out, sum_into_array, &got, err, errlen);

	out->hashes = got.hashes;
	if (!rc && !out->hashes && !(out->hashes = calloc(1, sizeof(*out->hashes))))
		rc = set_error(err, errlen, ENOMEM, "manifest %s: out of memory", path);
	if (rc)
		manifest_file_free(out);
	return rc;
}

void manifest_file_free(struct manifest_file *f)
{
	free(f->hashes);
	f->hashes = NULL;
}

/* The old checksums of an update, into both halves of the table, a batch
 * at a time. */
struct old_sums {
	struct manifest *m;
	uint64_t first, count;
	uint64_t batch[4096];
};

static int flush_old_sums(struct old_sums *o, uint64_t nclusters)
{
	int rc = 0;
	if (o->count && !(rc = write_slots(o->m->sums_fd, o->first, o->batch, o->count)))
		rc = write_slots(o->m->sums_fd, nclusters + o->first, o->batch, o->count);
	o->first += o->count;
	o->count = 0;
	return rc;
}

static int sum_into_table(void *arg, const struct manifest_file *header, uint64_t index, uint64_t sum)
{
	struct old_sums *o = arg;
	(void)index;
	o->batch[o->count++] = sum;
	return o->count == sizeof(o->batch) / sizeof(o->batch[0]) ? flush_old_sums(o, header->nclusters) : 0;
}

/* Reads the manifest an update starts from into the table. */
static int read_old(struct manifest *m, const char *path, char *err, size_t errlen)
{
	struct manifest_file mf;
	struct old_sums *o = calloc(1, sizeof(*o));
	char why[300];
	int rc;

	if (!o)
		return set_error(err, errlen, ENOMEM, "manifest %s: out of memory", path);
	o->m = m;
	rc = parse_manifest(path, &mf, sum_into_table, o, why, sizeof(why));
	if (!rc && (rc = flush_old_sums(o, mf.nclusters)))
		snprintf(why, sizeof(why), "manifest %s: cannot keep its checksums: %s", path, error_text(-rc));
	free(o);
	if (rc == -ENOENT)
		return set_error(err, errlen, EINVAL,
				 "manifest %s: %s (an incremental with checksum=xxh3 updates the full backup's manifest; "
				 "use checksum=none, or take a new full backup)", path, error_text(ENOENT));
	if (rc)
		return set_error(err, errlen, -rc, "%s", why);
	if (mf.cluster_size != m->cluster_size)
		return set_error(err, errlen, EINVAL,
				 "manifest %s: does not describe a backup with cluster_size=%" PRIu32
				 " (use checksum=none, or take a new full backup)", path, m->cluster_size);
	m->size = mf.size;
	m->nclusters = mf.nclusters;
	return 0;
}

int manifest_open_update(const char *existing, const char *temp_path, uint32_t cluster_size, struct manifest **out,
			 char *err, size_t errlen)
{
	struct manifest *m = new_manifest(temp_path, cluster_size);
	int rc;

	if (!m)
		return set_error(err, errlen, ENOMEM, "manifest %s: out of memory", existing);
	m->update = true;
	if ((rc = open_table(m))) {
		set_error(err, errlen, -rc, "manifest %s: cannot make its table: %s", existing, error_text(-rc));
		manifest_free(m);
		return rc;
	}
	if ((rc = read_old(m, existing, err, errlen)) || (rc = create_temp(m, existing, err, errlen))) {
		manifest_free(m);
		return rc;
	}
	/* Every slot holds its old checksum (no copying with the gates closed). */
	if (cbitmap_init(&m->hashed, m->nclusters, true)) {
		manifest_discard(m);
		manifest_free(m);
		return set_error(err, errlen, ENOMEM, "manifest %s: out of memory", existing);
	}
	*out = m;
	return 0;
}

int manifest_set_size(struct manifest *m, uint64_t size, char *err, size_t errlen)
{
	int rc;

	if (m->update) {
		if (size != m->size)
			return set_error(err, errlen, EINVAL, "manifest describes %" PRIu64 " bytes, the image has %" PRIu64,
					 m->size, size);
		return 0;
	}
	m->size = size;
	m->nclusters = div_round_up(size, m->cluster_size);
	if ((rc = open_table(m)))
		return set_error(err, errlen, -rc, "manifest %s: cannot make its table: %s", m->temp_path,
				 error_text(-rc));
	if (cbitmap_init(&m->hashed, m->nclusters, false))
		return set_error(err, errlen, ENOMEM, "manifest: out of memory for %" PRIu64 " clusters", m->nclusters);
	return 0;
}

int manifest_set_run(struct manifest *m, uint64_t first, uint64_t count, const void *data, uint64_t len)
{
	uint64_t sums[256];
	int rc = 0;

	for (uint64_t done = 0; done < count && !rc;) {
		uint64_t n = min_u64(count - done, sizeof(sums) / sizeof(sums[0]));
		for (uint64_t i = 0; i < n; i++) {
			uint64_t pos = (done + i) * m->cluster_size;
			sums[i] = XXH3_64bits((const char *)data + pos, (size_t)min_u64(m->cluster_size, len - pos));
		}
		rc = write_slots(m->sums_fd, first + done, sums, n);
		done += n;
	}
	if (!rc)
		cbitmap_mark_range(&m->hashed, first, count);
	return rc;
}

void manifest_set_zeroes(struct manifest *m, uint64_t first, uint64_t count)
{
	/* Not hashed reads as zeroes (the zero checksum, computed once). */
	cbitmap_clear_range(&m->hashed, first, count);
}

int manifest_forget(struct manifest *m, const struct cbitmap *left)
{
	for (uint64_t c = cbitmap_next_set(left, 0); c < left->nbits && c < m->nclusters;
	     c = cbitmap_next_set(left, c + 1)) {
		if (m->update) {
			uint64_t old;
			int rc = read_slots(m->sums_fd, m->nclusters + c, &old, 1);
			if (rc || (rc = write_slots(m->sums_fd, c, &old, 1)))
				return rc;
			cbitmap_set(&m->hashed, c);
		} else
			cbitmap_clear(&m->hashed, c);
	}
	return 0;
}

void manifest_set_partial(struct manifest *m, bool partial) { m->partial = partial; }
void manifest_set_format(struct manifest *m, const char *format) { m->format = format; }

/* The checksum of `len` zero bytes. */
static uint64_t zero_hash(uint64_t len)
{
	void *zero = calloc(1, (size_t)(len ? len : 1));
	uint64_t h = zero ? XXH3_64bits(zero, (size_t)len) : 0;
	free(zero);
	return h;
}

int manifest_write(struct manifest *m)
{
	uint64_t last_len = m->size - (m->nclusters ? (m->nclusters - 1) * (uint64_t)m->cluster_size : 0);
	uint64_t zero_full = zero_hash(m->cluster_size), zero_last = zero_hash(last_len);
	enum { BATCH = 8192 };
	uint64_t *sums = malloc(BATCH * sizeof(*sums));
	int rc = 0;

	if (!sums)
		return -ENOMEM;
	/* Written again (a group member cancelled after its copy, now kept as
	 * partial): from the start. */
	if (m->fd < 0 && (m->fd = open(m->temp_path, O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC)) < 0) {
		free(sums);
		return -errno;
	}
	FILE *f = fdopen(m->fd, "w");
	if (!f) {
		free(sums);
		return -errno;
	}
	m->fd = -1;
	fprintf(f, "fleecefs-manifest 1\nalgorithm=xxh3-64\nformat=%s\n%ssize=%" PRIu64 "\ncluster_size=%" PRIu32
		   "\nclusters=%" PRIu64 "\n", m->format ? m->format : "raw", m->partial ? "state=partial\n" : "",
		m->size, m->cluster_size, m->nclusters);
	for (uint64_t first = 0; first < m->nclusters && !rc; first += BATCH) {
		uint64_t n = min_u64(BATCH, m->nclusters - first);
		if ((rc = read_slots(m->sums_fd, first, sums, n)))
			break;
		for (uint64_t i = 0; i < n; i++) {
			uint64_t c = first + i;
			uint64_t h = cbitmap_test(&m->hashed, c) ? sums[i] : c + 1 == m->nclusters ? zero_last : zero_full;
			fprintf(f, "%016" PRIx64 "\n", h);
		}
	}
	free(sums);
	if (!rc && (fflush(f) != 0 || fdatasync(fileno(f)) != 0))
		rc = -errno;
	if (fclose(f) != 0 && !rc)
		rc = -errno;
	return rc;
}

int manifest_publish(struct manifest *m, const char *name, bool replace)
{
	if (!replace)
		return rename_noreplace(m->temp_path, name);
	if (rename(m->temp_path, name) < 0)
		return -errno;
	return fsync_parent_dir(name);
}

void manifest_discard(struct manifest *m)
{
	if (m->fd >= 0)
		close(m->fd);
	m->fd = -1;
	unlink(m->temp_path);
}

void manifest_free(struct manifest *m)
{
	if (!m)
		return;
	if (m->fd >= 0)
		close(m->fd);
	if (m->sums_fd >= 0)
		close(m->sums_fd);
	if (m->hashed.words)
		cbitmap_destroy(&m->hashed);
	free(m->temp_path);
	free(m);
}

static char *nbd_manifest_dir;

int manifest_use_nbd_dir(const char *dir)
{
	char *copy = strdup(dir);
	if (!copy)
		return -ENOMEM;
	free(nbd_manifest_dir);
	nbd_manifest_dir = copy;
	return 0;
}

int manifest_set_state_dir(const char *state_dir)
{
	char dir[PATH_MAX];
	if (snprintf(dir, sizeof(dir), "%s/nbd", state_dir) >= (int)sizeof(dir))
		return -ENAMETOOLONG;
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return -errno;
	return manifest_use_nbd_dir(dir);
}

const char *manifest_nbd_dir(void)
{
	return nbd_manifest_dir;
}

const char *manifest_path(const char *target, char *buf, size_t len)
{
	if (target_is_nbd_uri(target) && nbd_manifest_dir)
		snprintf(buf, len, "%s/%016llx.xxh3", nbd_manifest_dir,
			 (unsigned long long)XXH3_64bits(target, strlen(target)));
	else
		snprintf(buf, len, "%s.xxh3", target);
	return buf;
}
