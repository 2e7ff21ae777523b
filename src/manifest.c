/* manifest: see include/fleecefs/manifest.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/manifest.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

int manifest_create(const char *target_path, uint64_t size, uint32_t cluster_size,
		    struct manifest **out, char *err, size_t errlen)
{
	struct manifest *m = calloc(1, sizeof(*m));

	if (!m || asprintf(&m->path, "%s.xxh3", target_path) < 0) {
		free(m);
		return set_error(err, errlen, ENOMEM, "manifest for %s: out of memory", target_path);
	}
	m->size = size;
	m->cluster_size = cluster_size;
	m->nclusters = div_round_up(size, cluster_size);
	m->hashes = calloc(m->nclusters ? m->nclusters : 1, sizeof(*m->hashes));
	if (!m->hashes) {
		manifest_free(m);
		return set_error(err, errlen, ENOMEM, "manifest for %s: out of memory", target_path);
	}
	m->fd = open(m->path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (m->fd < 0) {
		int e = errno;
		int rc = set_error(err, errlen, e, "manifest %s: cannot create: %s", m->path, strerror(e));
		manifest_free(m);
		return rc;
	}
	*out = m;
	return 0;
}

void manifest_set(struct manifest *m, uint64_t cluster, const void *data, size_t len)
{
	m->hashes[cluster] = XXH3_64bits(data, len);
}

int manifest_finish(struct manifest *m)
{
	FILE *f = fdopen(m->fd, "w");
	int rc = 0;

	if (!f)
		return -errno;
	m->fd = -1;
	fprintf(f, "fleecefs-manifest 1\nalgorithm=xxh3-64\nsize=%" PRIu64 "\ncluster_size=%" PRIu32
		   "\nclusters=%" PRIu64 "\n", m->size, m->cluster_size, m->nclusters);
	for (uint64_t c = 0; c < m->nclusters; c++)
		fprintf(f, "%016" PRIx64 "\n", m->hashes[c]);
	if (fflush(f) != 0 || fdatasync(fileno(f)) != 0)
		rc = -errno;
	if (fclose(f) != 0 && !rc)
		rc = -errno;
	if (!rc && m->tmp_path && rename(m->tmp_path, m->path) < 0)
		rc = -errno;
	if (!rc)
		rc = fsync_parent_dir(m->path);
	return rc;
}

void manifest_abort(struct manifest *m)
{
	if (m->fd >= 0)
		close(m->fd);
	m->fd = -1;
	unlink(m->tmp_path ? m->tmp_path : m->path);
}

void manifest_free(struct manifest *m)
{
	if (!m)
		return;
	if (m->fd >= 0)
		close(m->fd);
	free(m->hashes);
	free(m->old);
	free(m->tmp_path);
	free(m->path);
	free(m);
}

int manifest_update(const char *target_path, uint64_t size, uint32_t cluster_size, struct manifest **out, char *err,
		    size_t errlen)
{
	char path[4200], line[128];
	uint64_t n = 0, fsize = 0, fcs = 0;
	int rc;

	snprintf(path, sizeof(path), "%s.xxh3", target_path);
	FILE *f = fopen(path, "re");
	if (!f)
		return set_error(err, errlen, errno == ENOENT ? EINVAL : errno,
				 "manifest %s: %s (an incremental with checksum=xxh3 updates the full backup's manifest; "
				 "use checksum=none, or take a new full backup)", path, strerror(errno));
	uint64_t *old = NULL;
	bool ok = fgets(line, sizeof(line), f) && !strcmp(line, "fleecefs-manifest 1\n");
	while (ok && fgets(line, sizeof(line), f) && strchr(line, '=')) {
		if (!strncmp(line, "size=", 5))
			fsize = strtoull(line + 5, NULL, 10);
		else if (!strncmp(line, "cluster_size=", 13))
			fcs = strtoull(line + 13, NULL, 10);
		else if (!strncmp(line, "clusters=", 9)) {
			n = strtoull(line + 9, NULL, 10);
			break;
		}
	}
	ok = ok && fsize == size && fcs == cluster_size && n == div_round_up(size, cluster_size) &&
	     (old = calloc(n ? n : 1, sizeof(*old)));
	for (uint64_t c = 0; ok && c < n; c++)
		ok = fgets(line, sizeof(line), f) && sscanf(line, "%" SCNx64, &old[c]) == 1;
	fclose(f);
	if (!ok) {
		free(old);
		return set_error(err, errlen, EINVAL,
				 "manifest %s: does not describe this image with cluster_size=%" PRIu32
				 " (use checksum=none, or take a new full backup)", path, cluster_size);
	}
	struct manifest *m = calloc(1, sizeof(*m));
	if (!m || !(m->path = strdup(path)) || asprintf(&m->tmp_path, "%s.new", path) < 0 ||
	    !(m->hashes = calloc(n ? n : 1, sizeof(*m->hashes)))) {
		if (m) {
			m->fd = -1;
			manifest_free(m);
		}
		free(old);
		return set_error(err, errlen, ENOMEM, "manifest %s: out of memory", path);
	}
	m->size = size;
	m->cluster_size = cluster_size;
	m->nclusters = n;
	m->old = old;
	unlink(m->tmp_path);  /* left by an interrupted update */
	m->fd = open(m->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (m->fd < 0) {
		int e = errno;
		rc = set_error(err, errlen, e, "manifest %s: cannot create: %s", m->tmp_path, strerror(e));
		manifest_free(m);
		return rc;
	}
	*out = m;
	memcpy(m->hashes, old, n * sizeof(*old));
	return 0;
}

void manifest_keep_old(struct manifest *m, const struct cbitmap *left)
{
	if (!m->old)
		return;
	for (uint64_t c = cbitmap_next_set(left, 0); c < left->nbits && c < m->nclusters;
	     c = cbitmap_next_set(left, c + 1))
		m->hashes[c] = m->old[c];
}
