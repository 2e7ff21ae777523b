/* target: see include/fleecefs/target.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/stat.h>

#include "fleecefs/manifest.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

void target_free(struct target *t)
{
	if (t)
		t->ops->free(t);
}

int fsync_parent_dir(const char *path)
{
	char *copy = strdup(path);
	int fd, rc = 0;

	if (!copy)
		return -ENOMEM;
	fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	free(copy);
	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0 && errno != EINVAL)
		rc = -errno;
	close(fd);
	return rc;
}

int target_files_for(const char *final, const char *in_place_file, uint64_t serial, struct target_files *out)
{
	char manifest_temp_of[PATH_MAX + 8];

	if (target_is_nbd_uri(final)) {
		/* An export: written where it is, also when kept partial; its
		 * manifest and an in-place update's journal are files in the
		 * state directory (manifest.h). */
		manifest_path(final, manifest_temp_of, sizeof(manifest_temp_of));
		if (snprintf(out->temp, sizeof(out->temp), "%s", final) >= (int)sizeof(out->temp) ||
		    snprintf(out->manifest, sizeof(out->manifest), "%s", manifest_temp_of) >= (int)sizeof(out->manifest) ||
		    target_hidden_name(manifest_temp_of, serial, "tmp", out->manifest_temp, sizeof(out->manifest_temp)) ||
		    target_hidden_name(manifest_temp_of, serial, "journal", out->journal, sizeof(out->journal)) ||
		    snprintf(out->partial, sizeof(out->partial), "%s", final) >= (int)sizeof(out->partial))
			return -ENAMETOOLONG;
		(void)in_place_file;   /* the export itself, always */
		return 0;
	}
	if (target_hidden_name(final, serial, "tmp", out->temp, sizeof(out->temp)) ||
	    target_hidden_name(manifest_path(final, manifest_temp_of, sizeof(manifest_temp_of)), serial, "tmp",
			       out->manifest_temp, sizeof(out->manifest_temp)) ||
	    target_hidden_name(in_place_file ? in_place_file : out->temp, serial, "journal", out->journal,
			       sizeof(out->journal)) ||
	    snprintf(out->manifest, sizeof(out->manifest), "%s", manifest_temp_of) >= (int)sizeof(out->manifest) ||
	    snprintf(out->partial, sizeof(out->partial), "%s.partial", final) >= (int)sizeof(out->partial))
		return -ENAMETOOLONG;
	return 0;
}

int target_name_free(const char *name, char *what, size_t len)
{
	struct stat st;
	if (!target_is_nbd_uri(name) && lstat(name, &st) == 0) {
		snprintf(what, len, "%.4000s appeared while the job ran", name);
		return -EEXIST;
	}
	return 0;
}

int target_hidden_name(const char *path, uint64_t serial, const char *tag, char *out, size_t len)
{
	const char *slash = strrchr(path, '/');
	const char *base = slash ? slash + 1 : path;
	int dirlen = slash ? (int)(slash - path) : 0;
	char suffix[96];

	int n = snprintf(suffix, sizeof(suffix), ".fleecefs-%ld-%" PRIu64 ".%s", (long)getpid(), serial, tag);
	/* A file name has at most NAME_MAX bytes: the leading dot, the name
	 * (cut if need be) and the suffix. */
	int keep = (int)strlen(base);
	if (keep > NAME_MAX - 1 - n)
		keep = NAME_MAX - 1 - n;
	if (snprintf(out, len, "%.*s/.%.*s%s", dirlen, path, keep, base, suffix) >= (int)len)
		return -ENAMETOOLONG;
	return 0;
}

int rename_noreplace(const char *from, const char *to)
{
	if (renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) < 0) {
		if (errno != EINVAL && errno != ENOSYS)
			return -errno;
		/* A file system without RENAME_NOREPLACE: link never replaces. */
		if (link(from, to) < 0)
			return -errno;
		if (unlink(from) < 0) {
			int e = errno;
			unlink(to);
			return -e;
		}
	}
	return fsync_parent_dir(to);
}

int target_create_file(struct target *t, const char *shown, int *fd, char *err, size_t errlen)
{
	struct stat st;

	/* Backups hold whole disks: readable by the owner only. */
	*fd = open(t->path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (*fd < 0 || fstat(*fd, &st) < 0) {
		int e = errno;
		if (*fd >= 0) {
			close(*fd);
			unlink(t->path);
		}
		*fd = -1;
		return set_error(err, errlen, e, "target %s: cannot create: %s", shown, error_text(e));
	}
	t->dev = st.st_dev;
	t->ino = st.st_ino;
	return 0;
}

int target_open_recorded(const char *path, dev_t dev, ino_t ino, int *fd, struct stat *st, char *err, size_t errlen)
{
	*fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
	if (*fd < 0 || fstat(*fd, st) < 0) {
		int e = errno;
		return set_error(err, errlen, e, "target %s: cannot update it: %s%s", path, error_text(e),
				 e == ELOOP ? " (a symlink; the chain's backup is a regular file)" : "");
	}
	/* Only the very file the chain recorded, and nothing that another name
	 * (a hard link into SOURCE_DIR, a cp -al rotation) could make live. */
	if (!S_ISREG(st->st_mode))
		return set_error(err, errlen, EINVAL, "target %s: not a regular file", path);
	if (!stat_is(st, dev, ino))
		return set_error(err, errlen, EINVAL,
				 "target %s: is not the file the chain's last backup was written to (inode %llu, recorded "
				 "%llu): take a new full backup", path, (unsigned long long)st->st_ino,
				 (unsigned long long)ino);
	if (st->st_nlink != 1)
		return set_error(err, errlen, EMLINK,
				 "target %s: has %llu links: an incremental updates a backup in place and would change "
				 "every other name of it (hard-link rotation?); take a new full backup",
				 path, (unsigned long long)st->st_nlink);
	return 0;
}

void target_file_writeback(struct target *t, int fd)
{
	/* The wait reports (and consumes) a failed writeback: kept for flush. */
	if (sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE) < 0) {
		int none = 0;
		atomic_compare_exchange_strong(&t->writeback_error, &none, -errno);
	}
	/* Writes back what is dirty (without waiting) and drops what is clean:
	 * the round that just finished. */
	posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
}

int target_file_sync(struct target *t, int fd)
{
	int rc = fdatasync(fd) < 0 ? -errno : 0;
	int lost = atomic_load(&t->writeback_error);
	return lost ? lost : rc;
}

int target_rename_file(struct target *t, const char *name, char *err, size_t errlen)
{
	if (strcmp(t->path, name) == 0)
		return 0;
	int rc = rename_noreplace(t->path, name);
	if (rc)
		return set_error(err, errlen, -rc, "target %s: cannot rename it to %s: %s", t->path, name,
				 error_text(-rc));
	char *copy = strdup(name);
	if (copy) {
		free(t->path);
		t->path = copy;
	}
	t->published = true;
	return 0;
}

/* ---- names in use ---------------------------------------------------------- */

static pthread_mutex_t names_lock = PTHREAD_MUTEX_INITIALIZER;
static char **names;
static unsigned nnames, names_cap;

static int find_name_locked(const char *path)
{
	for (unsigned i = 0; i < nnames; i++)
		if (strcmp(names[i], path) == 0)
			return (int)i;
	return -1;
}

int target_name_claim(const char *path)
{
	int rc = 0;

	pthread_mutex_lock(&names_lock);
	if (find_name_locked(path) >= 0) {
		rc = -EEXIST;
	} else {
		if (nnames == names_cap) {
			unsigned cap = names_cap ? names_cap * 2 : 16;
			char **grown = realloc(names, cap * sizeof(*grown));
			if (!grown)
				rc = -ENOMEM;
			else {
				names = grown;
				names_cap = cap;
			}
		}
		if (!rc && !(names[nnames] = strdup(path)))
			rc = -ENOMEM;
		if (!rc)
			nnames++;
	}
	pthread_mutex_unlock(&names_lock);
	return rc;
}

void target_name_release(const char *path)
{
	pthread_mutex_lock(&names_lock);
	int i = find_name_locked(path);
	if (i >= 0) {
		free(names[i]);
		names[i] = names[--nnames];
	}
	if (!nnames) {
		free(names);
		names = NULL;
		names_cap = 0;
	}
	pthread_mutex_unlock(&names_lock);
}

bool target_name_taken(const char *path)
{
	pthread_mutex_lock(&names_lock);
	bool taken = find_name_locked(path) >= 0;
	pthread_mutex_unlock(&names_lock);
	return taken;
}

/* ---- formats and checks ------------------------------------------------------ */

extern const struct target_format_ops target_raw_format;
extern const struct target_format_ops target_qcow2_format;
extern const struct target_format_ops target_nbd_format;

const struct target_format_ops *target_format(enum target_format format)
{
	switch (format) {
	case FORMAT_RAW:
		return &target_raw_format;
	case FORMAT_QCOW2:
		return &target_qcow2_format;
	case FORMAT_NBD:
		return &target_nbd_format;
	}
	return NULL;
}

const char *target_error_text(struct target *t, int err)
{
	static __thread char said[400];   /* per thread, as error_text's */
	if (t && t->ops->explain) {
		t->ops->explain(t, err, said, sizeof(said));
		return said;
	}
	return t && t->error[0] ? t->error : error_text(err);
}

int target_check(struct target_spec *spec, const struct target_limits *limits, char *err, size_t errlen)
{
	const char *target = spec->location;
	const char *slash = strrchr(target, '/');
	const struct target_format_ops *format = target_format(spec->format);
	char dir[PATH_MAX], real[PATH_MAX], sum[PATH_MAX + 8];
	struct stat st;

	if (!format)
		return set_error(err, errlen, EOPNOTSUPP, "target %s: a format this version cannot write", target);
	if (target_is_nbd_uri(target) != (spec->format == FORMAT_NBD))
		return set_error(err, errlen, EINVAL, "target %s: an NBD export is written as a raw disk (format=raw; serve a "
				 "qcow2 file with qemu-nbd -f qcow2)", target);
	if (spec->format == FORMAT_NBD) {
		if (snprintf(spec->resolved, sizeof(spec->resolved), "%s", target) >= (int)sizeof(spec->resolved))
			return set_error(err, errlen, ENAMETOOLONG, "target %s: URI too long", target);
		if (target_name_taken(spec->resolved))
			return set_error(err, errlen, EEXIST, "target %s: is being written by another job", target);
		return format->check(spec, err, errlen);
	}
	if (spec->tls_certs || spec->tls_psk)
		return set_error(err, errlen, EINVAL, "target %s: tls-certs= and tls-psk= apply to nbds:// targets", target);
	if (!slash || !strcmp(slash + 1, "") || !strcmp(slash + 1, ".") || !strcmp(slash + 1, ".."))
		return set_error(err, errlen, EINVAL, "target %s: must name a file", target);
	snprintf(dir, sizeof(dir), "%.*s", slash == target ? 1 : (int)(slash - target), target);
	if (!realpath(dir, real)) {
		int e = errno;
		return set_error(err, errlen, e, "target %s: directory %s: %s", target, dir, error_text(e));
	}
	if (stat(real, &st) < 0 || !S_ISDIR(st.st_mode))
		return set_error(err, errlen, ENOTDIR, "target %s: %s is not a directory", target, dir);
	size_t mlen = strlen(limits->mountpoint);
	bool inside = strncmp(real, limits->mountpoint, mlen) == 0 && (real[mlen] == '/' || real[mlen] == '\0');
	if (inside || (limits->mount_dev && st.st_dev == limits->mount_dev))
		return set_error(err, errlen, EINVAL, "target %s: lies inside the mount %s", target, limits->mountpoint);
	if (snprintf(spec->resolved, sizeof(spec->resolved), "%s/%s", strcmp(real, "/") ? real : "", slash + 1) >=
	    (int)sizeof(spec->resolved))
		return set_error(err, errlen, ENAMETOOLONG, "target %s: name too long", target);
	if (!spec->in_place) {
		if (lstat(spec->resolved, &st) == 0)
			return set_error(err, errlen, EEXIST, "target %s: already exists", target);
		manifest_path(spec->resolved, sum, sizeof(sum));
		if (spec->checksum && lstat(sum, &st) == 0)
			return set_error(err, errlen, EEXIST, "target %s: its manifest %s already exists", target, sum);
		if (target_name_taken(spec->resolved))
			return set_error(err, errlen, EEXIST, "target %s: is being written by another job", target);
	}
	size_t slen = limits->source_dir ? strlen(limits->source_dir) : 0;
	if (slen && strncmp(spec->resolved, limits->source_dir, slen) == 0 && spec->resolved[slen] == '/')
		return set_error(err, errlen, EINVAL, "target %s: lies in SOURCE_DIR %s: the mount would serve it as an image",
				 target, limits->source_dir);
	return format->check ? format->check(spec, err, errlen) : 0;
}
