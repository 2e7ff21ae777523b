/* manifest: see include/fleecefs/manifest.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

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
	if (!rc)
		rc = fsync_parent_dir(m->path);
	return rc;
}

void manifest_abort(struct manifest *m)
{
	if (m->fd >= 0)
		close(m->fd);
	m->fd = -1;
	unlink(m->path);
}

void manifest_free(struct manifest *m)
{
	if (!m)
		return;
	if (m->fd >= 0)
		close(m->fd);
	free(m->hashes);
	free(m->path);
	free(m);
}
