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
	m->cluster_size = cluster_size;
	return m;
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

int manifest_load(const char *path, struct manifest_file *out, char *err, size_t errlen)
{
	char line[128];
	unsigned lineno = 1;
	uint64_t n = 0, c = 0;
	bool have_size = false, have_cs = false, have_n = false, have_algorithm = false;
	FILE *f = fopen(path, "re");

	*out = (struct manifest_file){ 0 };
	snprintf(out->format, sizeof(out->format), "raw");
	if (!f)
		return set_error(err, errlen, errno, "manifest %s: %s", path, error_text(errno));
#define header_ok (have_algorithm && have_size && have_cs && have_n && n == div_round_up(out->size, out->cluster_size))
#define BAD(...) do { fclose(f); manifest_file_free(out); \
		return set_error(err, errlen, EINVAL, "manifest " __VA_ARGS__); } while (0)
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
			if (!(out->hashes = calloc(n ? n : 1, sizeof(*out->hashes))))
				BAD("%s: out of memory for %" PRIu64 " checksums", path, n);
		}
		char *end;
		if (len != 16 || c >= n || (out->hashes[c] = strtoull(line, &end, 16), *end))
			BAD("%s: line %u: %s", path, lineno, c >= n ? "more checksums than clusters" : "not a checksum");
		c++;
	}
	if (in_header && !header_ok)
		BAD("%s: its header lacks algorithm, size, cluster_size or clusters, or they disagree", path);
	if (c != n)
		BAD("%s: %" PRIu64 " checksums for %" PRIu64 " clusters", path, c, n);
	if (!out->hashes && !(out->hashes = calloc(1, sizeof(*out->hashes))))
		BAD("%s: out of memory", path);
#undef BAD
#undef header_ok
	fclose(f);
	out->nclusters = n;
	return 0;
}

void manifest_file_free(struct manifest_file *f)
{
	free(f->hashes);
	f->hashes = NULL;
}

/* Reads the manifest an update starts from (malloc'd into *hashes). */
static int read_manifest(const char *path, uint32_t cluster_size, uint64_t *size, uint64_t **hashes, char *err,
			 size_t errlen)
{
	struct manifest_file mf;
	char why[300];
	int rc = manifest_load(path, &mf, why, sizeof(why));

	*hashes = NULL;
	if (rc == -ENOENT)
		return set_error(err, errlen, EINVAL,
				 "manifest %s: %s (an incremental with checksum=xxh3 updates the full backup's manifest; "
				 "use checksum=none, or take a new full backup)", path, error_text(ENOENT));
	if (rc)
		return set_error(err, errlen, -rc, "%s", why);
	if (mf.cluster_size != cluster_size) {
		manifest_file_free(&mf);
		return set_error(err, errlen, EINVAL,
				 "manifest %s: does not describe a backup with cluster_size=%" PRIu32
				 " (use checksum=none, or take a new full backup)", path, cluster_size);
	}
	*size = mf.size;
	*hashes = mf.hashes;
	return 0;
}

/* The checksum table of `size` bytes; an update starts from its old sums. */
static int allocate(struct manifest *m, uint64_t size)
{
	m->size = size;
	m->nclusters = div_round_up(size, m->cluster_size);
	m->hashes = calloc(m->nclusters ? m->nclusters : 1, sizeof(*m->hashes));
	if (!m->hashes || cbitmap_init(&m->hashed, m->nclusters, m->old != NULL)) {
		free(m->hashes);
		m->hashes = NULL;
		return -ENOMEM;
	}
	if (m->old)
		memcpy(m->hashes, m->old, m->nclusters * sizeof(*m->old));
	return 0;
}

int manifest_open_update(const char *existing, const char *temp_path, uint32_t cluster_size, struct manifest **out,
			 char *err, size_t errlen)
{
	struct manifest *m = new_manifest(temp_path, cluster_size);
	int rc;

	if (!m)
		return set_error(err, errlen, ENOMEM, "manifest %s: out of memory", existing);
	if ((rc = read_manifest(existing, cluster_size, &m->old_size, &m->old, err, errlen)) ||
	    (rc = create_temp(m, existing, err, errlen))) {
		manifest_free(m);
		return rc;
	}
	if (allocate(m, m->old_size)) {
		manifest_discard(m);
		manifest_free(m);
		return set_error(err, errlen, ENOMEM, "manifest %s: out of memory", existing);
	}
	*out = m;
	return 0;
}

int manifest_set_size(struct manifest *m, uint64_t size, char *err, size_t errlen)
{
	if (m->old) {
		/* Allocated when staged (no copying with the gates closed). */
		if (size != m->size)
			return set_error(err, errlen, EINVAL, "manifest describes %" PRIu64 " bytes, the image has %" PRIu64,
					 m->size, size);
		return 0;
	}
	if (allocate(m, size))
		return set_error(err, errlen, ENOMEM, "manifest: out of memory for %" PRIu64 " clusters",
				 div_round_up(size, m->cluster_size));
	return 0;
}

void manifest_set(struct manifest *m, uint64_t cluster, const void *data, size_t len)
{
	m->hashes[cluster] = XXH3_64bits(data, len);
	if (!cbitmap_test(&m->hashed, cluster))
		cbitmap_set(&m->hashed, cluster);
}

void manifest_set_zeroes(struct manifest *m, uint64_t first, uint64_t count)
{
	/* Not hashed reads as zeroes (the zero checksum, computed once). */
	cbitmap_clear_range(&m->hashed, first, count);
}

void manifest_forget(struct manifest *m, const struct cbitmap *left)
{
	for (uint64_t c = cbitmap_next_set(left, 0); c < left->nbits && c < m->nclusters;
	     c = cbitmap_next_set(left, c + 1)) {
		if (m->old) {
			m->hashes[c] = m->old[c];
			cbitmap_set(&m->hashed, c);
		} else
			cbitmap_clear(&m->hashed, c);
	}
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
	int rc = 0;

	/* Written again (a group member cancelled after its copy, now kept as
	 * partial): from the start. */
	if (m->fd < 0 && (m->fd = open(m->temp_path, O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC)) < 0)
		return -errno;
	FILE *f = fdopen(m->fd, "w");
	if (!f)
		return -errno;
	m->fd = -1;
	fprintf(f, "fleecefs-manifest 1\nalgorithm=xxh3-64\nformat=%s\n%ssize=%" PRIu64 "\ncluster_size=%" PRIu32
		   "\nclusters=%" PRIu64 "\n", m->format ? m->format : "raw", m->partial ? "state=partial\n" : "",
		m->size, m->cluster_size, m->nclusters);
	for (uint64_t c = 0; c < m->nclusters; c++) {
		uint64_t h = cbitmap_test(&m->hashed, c) ? m->hashes[c] : c + 1 == m->nclusters ? zero_last : zero_full;
		fprintf(f, "%016" PRIx64 "\n", h);
	}
	if (fflush(f) != 0 || fdatasync(fileno(f)) != 0)
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
	if (m->hashed.words)
		cbitmap_destroy(&m->hashed);
	free(m->hashes);
	free(m->old);
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
