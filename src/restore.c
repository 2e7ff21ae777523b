/* restore: see include/fleecefs/restore.h */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/manifest.h"
#include "fleecefs/reader.h"
#include "fleecefs/restore.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"
#include "fleecefs/verify.h"

/* A process that has `path` open (its pid), or 0. Only this host's
 * processes are seen, which is where a VM using an image runs. */
static long open_by_someone(const char *path, char *comm, size_t len)
{
	char want[PATH_MAX];
	DIR *proc = opendir("/proc");
	struct dirent *p;
	long found = 0;

	if (!realpath(path, want) || !proc) {
		if (proc)
			closedir(proc);
		return 0;
	}
	while (!found && (p = readdir(proc))) {
		char *end;
		long pid = strtol(p->d_name, &end, 10);
		if (*end || pid <= 0 || pid == (long)getpid())
			continue;
		char dir[64];
		snprintf(dir, sizeof(dir), "/proc/%ld/fd", pid);
		DIR *fds = opendir(dir);
		struct dirent *f;
		while (fds && !found && (f = readdir(fds))) {
			char link[PATH_MAX + 64], target[PATH_MAX];
			snprintf(link, sizeof(link), "%s/%s", dir, f->d_name);
			ssize_t n = readlink(link, target, sizeof(target) - 1);
			if (n > 0 && (target[n] = '\0', !strcmp(target, want)))
				found = pid;
		}
		if (fds)
			closedir(fds);
	}
	closedir(proc);
	if (found) {
		char cpath[64];
		snprintf(cpath, sizeof(cpath), "/proc/%ld/comm", found);
		FILE *f = fopen(cpath, "re");
		if (!f || !fgets(comm, (int)len, f))
			snprintf(comm, len, "?");
		comm[strcspn(comm, "\n")] = '\0';
		if (f)
			fclose(f);
	}
	return found;
}

/* Writes the checked disk into fd; a cluster of zeroes is a hole (punched
 * when writing in place). RESTORE_OK, or what went wrong. */
static enum restore_result copy_checked(struct reader *r, const struct manifest_file *m, int fd, bool in_place,
					const char *dest, uint64_t *holes, FILE *errs)
{
	void *buf = malloc(m->cluster_size);
	enum restore_result res = RESTORE_OK;

	if (!buf) {
		fprintf(errs, "fleecectl: restore: out of memory\n");
		return RESTORE_CANNOT;
	}
	for (uint64_t c = 0; c < m->nclusters && res == RESTORE_OK; c++) {
		struct reader_origin o;
		uint64_t sum, off = c * (uint64_t)m->cluster_size, len = min_u64(m->cluster_size, m->size - off);
		char why[600];
		if (!verify_cluster(r, m, c, buf, &sum, &o, why, sizeof(why))) {
			fprintf(errs, "fleecectl: restore: bad cluster at offset %" PRIu64 " (cluster %" PRIu64 " of %" PRIu64
				      "): %s\n", off, c, m->nclusters, why);
			res = RESTORE_DAMAGED;
			break;
		}
		int rc = 0;
		if (buffer_is_zero(buf, (size_t)len)) {
			(*holes)++;
			if (in_place && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0)
				rc = pwrite_full(fd, buf, (size_t)len, off) < 0 ? -errno : 0;
		} else if (pwrite_full(fd, buf, (size_t)len, off) < 0) {
			rc = -errno;
		}
		if (rc) {
			fprintf(errs, "fleecectl: restore: %s: writing at %" PRIu64 ": %s\n", dest, off, error_text(-rc));
			res = RESTORE_CANNOT;
		}
	}
	free(buf);
	if (res == RESTORE_OK && fdatasync(fd) < 0) {
		fprintf(errs, "fleecectl: restore: %s: %s\n", dest, error_text(errno));
		res = RESTORE_CANNOT;
	}
	return res;
}

/* A new DEST: written under a hidden name beside it, renamed when whole. */
static enum restore_result restore_new(struct reader *r, const struct manifest_file *m, const char *dest,
				       uint64_t *holes, FILE *errs)
{
	char copy[PATH_MAX], dir[PATH_MAX], temp[PATH_MAX + 64];

	snprintf(copy, sizeof(copy), "%s", dest);
	snprintf(dir, sizeof(dir), "%s", dest);
	if (snprintf(temp, sizeof(temp), "%s/.%s.fleecefs-restore-%ld.tmp", dirname(dir), basename(copy), (long)getpid()) >=
	    (int)sizeof(temp)) {
		fprintf(errs, "fleecectl: restore: %s: name too long\n", dest);
		return RESTORE_CANNOT;
	}
	int fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0) {
		fprintf(errs, "fleecectl: restore: %s: cannot create: %s\n", temp, error_text(errno));
		return RESTORE_CANNOT;
	}
	enum restore_result res = RESTORE_OK;
	if (ftruncate(fd, (off_t)m->size) < 0) {
		fprintf(errs, "fleecectl: restore: %s: %s\n", temp, error_text(errno));
		res = RESTORE_CANNOT;
	}
	if (res == RESTORE_OK)
		res = copy_checked(r, m, fd, false, temp, holes, errs);
	if (close(fd) < 0 && res == RESTORE_OK) {
		fprintf(errs, "fleecectl: restore: %s: %s\n", temp, error_text(errno));
		res = RESTORE_CANNOT;
	}
	int rc = res == RESTORE_OK ? rename_noreplace(temp, dest) : 0;
	if (rc) {
		fprintf(errs, "fleecectl: restore: %s: %s\n", dest,
			rc == -EEXIST ? "appeared meanwhile: not replaced" : error_text(-rc));
		res = RESTORE_CANNOT;
	}
	if (res != RESTORE_OK)
		unlink(temp);
	return res;
}

enum restore_result restore_backup(const char *backup, const char *dest, bool overwrite, FILE *out, FILE *errs)
{
	char mpath[PATH_MAX + 8], err[600], comm[64];
	struct manifest_file m;
	struct reader *r = NULL;
	struct stat st;
	int rc;

	manifest_path(backup, mpath, sizeof(mpath));
	if ((rc = manifest_load(mpath, &m, err, sizeof(err)))) {
		fprintf(errs, "fleecectl: restore %s: cannot check it: %s\n", backup, err);
		return RESTORE_CANNOT;
	}
	enum restore_result res = RESTORE_CANNOT;
	bool exists = lstat(dest, &st) == 0;
	long pid = 0;
	if (m.partial) {
		/* What it lacks reads as zeroes or as the point below: never a
		 * disk that was. */
		fprintf(errs, "fleecectl: restore: %s is a partial backup (bitmap-mode=always): the next incremental "
			      "completes it; restore the point below it instead\n", backup);
	} else if ((rc = reader_open(backup, m.format, &r, err, sizeof(err)))) {
		fprintf(errs, "fleecectl: restore %s: %s\n", backup, err);
		res = rc == -EINVAL ? RESTORE_DAMAGED : RESTORE_CANNOT;
	} else if (exists && !overwrite) {
		fprintf(errs, "fleecectl: restore: %s exists (--overwrite writes over it)\n", dest);
	} else if (exists && !S_ISREG(st.st_mode)) {
		fprintf(errs, "fleecectl: restore: %s is not a regular file\n", dest);
	} else if (exists && (pid = open_by_someone(dest, comm, sizeof(comm)))) {
		fprintf(errs, "fleecectl: restore: %s is open by process %ld (%s): stop it first\n", dest, pid, comm);
	} else {
		uint64_t holes = 0;
		if (!exists) {
			res = restore_new(r, &m, dest, &holes, errs);
		} else {
			/* In place: the whole backup is checked before a byte of
			 * DEST changes, then again on the way. */
			FILE *quiet = fopen("/dev/null", "we");
			enum verify_result v = verify_backup(backup, quiet ? quiet : errs, errs);
			if (quiet)
				fclose(quiet);
			int fd = -1;
			if (v != VERIFY_OK) {
				fprintf(errs, "fleecectl: restore: %s does not verify (fleecectl verify %s says why): %s "
					      "left as it was\n", backup, backup, dest);
				res = v == VERIFY_DAMAGED ? RESTORE_DAMAGED : RESTORE_CANNOT;
			} else if ((fd = open(dest, O_WRONLY | O_NOFOLLOW | O_CLOEXEC)) < 0 ||
				   ftruncate(fd, (off_t)m.size) < 0) {
				fprintf(errs, "fleecectl: restore: %s: %s\n", dest, error_text(errno));
			} else {
				res = copy_checked(r, &m, fd, true, dest, &holes, errs);
				if (res != RESTORE_OK)
					fprintf(errs, "fleecectl: restore: %s is only partly restored\n", dest);
			}
			if (fd >= 0)
				close(fd);
		}
		if (res == RESTORE_OK)
			fprintf(out, "%s: restored from %s: %" PRIu64 " bytes, %" PRIu64 " clusters checked, %" PRIu64
				     " left as holes\n", dest, backup, m.size, m.nclusters, holes);
	}
	reader_close(r);
	manifest_file_free(&m);
	return res;
}
