/* redirect: see include/fleecefs/redirect.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/redirect.h"
#include "fleecefs/util.h"

struct redirect {
	dev_t dev;
	ino_t ino;
	dev_t served_dev;
	ino_t served_ino;
	char *image_path;
	char *target_path;
	int fd;              /* O_PATH of the target; -1: missing */
	char why[128];       /* missing: what was found instead */
};

static pthread_rwlock_t table_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct redirect *table;
static unsigned count;
static atomic_uint nonempty;     /* count, for the lock-free "none" answer */
static char *record_path;

static void drop(struct redirect *r)
{
	if (r->fd >= 0)
		close(r->fd);
	free(r->image_path);
	free(r->target_path);
}

static struct redirect *find_locked(dev_t dev, ino_t ino)
{
	for (unsigned i = 0; i < count; i++)
		if (table[i].dev == dev && table[i].ino == ino)
			return &table[i];
	return NULL;
}

/* The table as it should be on disk, plus `extra` if given. */
static int save_locked(const struct redirect *extra, const struct redirect *skip)
{
	struct strbuf sb = { 0 };
	for (unsigned i = 0; i <= count; i++) {
		const struct redirect *r = i < count ? &table[i] : extra;
		if (!r || r == skip || (extra && i < count && r->dev == extra->dev && r->ino == extra->ino))
			continue;
		strbuf_printf(&sb, "source=%" PRIu64 ":%" PRIu64 "\nserved=%" PRIu64 ":%" PRIu64 "\nimage=%s\ntarget=%s\n\n",
			      (uint64_t)r->dev, (uint64_t)r->ino, (uint64_t)r->served_dev, (uint64_t)r->served_ino,
			      r->image_path, r->target_path);
	}
	if (sb.failed) {
		strbuf_free(&sb);
		return -ENOMEM;
	}
	int rc = write_file_atomic(record_path, sb.data ? sb.data : "", sb.len, true);
	strbuf_free(&sb);
	return rc;
}

/* Opens the recorded target and checks that it is the recorded file. */
static void open_target(struct redirect *r)
{
	struct stat st;
	r->fd = open(r->target_path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	if (r->fd < 0) {
		snprintf(r->why, sizeof(r->why), "%s", error_text(errno));
		return;
	}
	if (fstat(r->fd, &st) < 0 || !S_ISREG(st.st_mode) || !stat_is(&st, r->served_dev, r->served_ino)) {
		snprintf(r->why, sizeof(r->why), "it is not the file the mirror wrote");
		close(r->fd);
		r->fd = -1;
	}
}

static int append(const struct redirect *r)
{
	struct redirect *grown = realloc(table, (count + 1) * sizeof(*grown));
	if (!grown)
		return -ENOMEM;
	table = grown;
	table[count++] = *r;
	atomic_store(&nonempty, count);
	return 0;
}

static int parse_id(const char *v, dev_t *dev, ino_t *ino)
{
	uint64_t d, i;
	if (sscanf(v, "%" SCNu64 ":%" SCNu64, &d, &i) != 2)
		return -EINVAL;
	*dev = (dev_t)d;
	*ino = (ino_t)i;
	return 0;
}

int redirect_load(const char *state_dir, char *err, size_t errlen)
{
	if (asprintf(&record_path, "%s/redirects", state_dir) < 0) {
		record_path = NULL;
		return set_error(err, errlen, ENOMEM, "out of memory");
	}
	FILE *f = fopen(record_path, "re");
	if (!f)
		return errno == ENOENT ? 0 : set_error(err, errlen, errno, "%s: %s", record_path, error_text(errno));
	char line[PATH_MAX + 16];
	struct redirect r = { .fd = -1 };
	bool have_source = false, have_served = false;
	int rc = 0;
	unsigned lineno = 0;
	for (;;) {
		bool eof = !fgets(line, sizeof(line), f);
		lineno++;
		line[strcspn(line, "\n")] = '\0';
		if (eof || !line[0]) {
			if (have_source || r.image_path || r.target_path) {
				if (!have_source || !have_served || !r.image_path || !r.target_path) {
					rc = set_error(err, errlen, EINVAL, "%s: incomplete record before line %u", record_path,
						       lineno);
					break;
				}
				open_target(&r);
				if (r.fd < 0)
					log_error("image %s is served from %s, which cannot be used (%s): the image "
						  "answers EIO until that file is back", r.image_path, r.target_path, r.why);
				if ((rc = append(&r))) {
					set_error(err, errlen, ENOMEM, "out of memory");
					break;
				}
				r = (struct redirect){ .fd = -1 };
				have_source = have_served = false;
			}
			if (eof)
				break;
			continue;
		}
		char *eq = strchr(line, '=');
		if (!eq) {
			rc = set_error(err, errlen, EINVAL, "%s: line %u: not key=value", record_path, lineno);
			break;
		}
		*eq++ = '\0';
		if (!strcmp(line, "source"))
			have_source = parse_id(eq, &r.dev, &r.ino) == 0;
		else if (!strcmp(line, "served"))
			have_served = parse_id(eq, &r.served_dev, &r.served_ino) == 0;
		else if (!strcmp(line, "image") && !r.image_path)
			r.image_path = strdup(eq);
		else if (!strcmp(line, "target") && !r.target_path)
			r.target_path = strdup(eq);
	}
	if (rc)
		drop(&r);
	fclose(f);
	return rc;
}

int redirect_add(dev_t dev, ino_t ino, const char *image_path, int target_fd, const char *target_path, char *err,
		 size_t errlen)
{
	struct stat st;
	struct redirect r = { .dev = dev, .ino = ino, .fd = -1 };

	if (fstat(target_fd, &st) < 0)
		return set_error(err, errlen, errno, "target %s: %s", target_path, error_text(errno));
	r.served_dev = st.st_dev;
	r.served_ino = st.st_ino;
	char proc[64];
	proc_fd_path(proc, sizeof(proc), target_fd);
	r.fd = open(proc, O_PATH | O_CLOEXEC);
	r.image_path = strdup(image_path);
	r.target_path = strdup(target_path);
	if (r.fd < 0 || !r.image_path || !r.target_path) {
		int e = r.fd < 0 ? errno : ENOMEM;
		drop(&r);
		return set_error(err, errlen, e, "target %s: %s", target_path, error_text(e));
	}
	pthread_rwlock_wrlock(&table_lock);
	int rc = save_locked(&r, NULL);
	if (!rc) {
		struct redirect *old = find_locked(dev, ino);
		if (old) {
			drop(old);
			*old = r;
		} else if ((rc = append(&r)) != 0) {
			/* On disk but not in memory: undo the disk. */
			save_locked(NULL, NULL);
		}
	}
	pthread_rwlock_unlock(&table_lock);
	if (rc) {
		drop(&r);
		return set_error(err, errlen, -rc, "cannot record the switch in %s: %s", record_path, error_text(-rc));
	}
	return 0;
}

void redirect_remove(dev_t dev, ino_t ino)
{
	if (!atomic_load(&nonempty))
		return;
	pthread_rwlock_wrlock(&table_lock);
	struct redirect *r = find_locked(dev, ino);
	if (r && save_locked(NULL, r) == 0) {
		log_info("image %s (served from %s) was removed: its switch record goes, %s stays", r->image_path,
			 r->target_path, r->target_path);
		drop(r);
		*r = table[--count];
		atomic_store(&nonempty, count);
	}
	pthread_rwlock_unlock(&table_lock);
}

int redirect_open(dev_t dev, ino_t ino)
{
	if (!atomic_load_explicit(&nonempty, memory_order_acquire))
		return -ENOENT;
	pthread_rwlock_rdlock(&table_lock);
	struct redirect *r = find_locked(dev, ino);
	int fd = !r ? -ENOENT : r->fd < 0 ? -EIO : fcntl(r->fd, F_DUPFD_CLOEXEC, 0);
	if (fd == -1)
		fd = -errno;
	pthread_rwlock_unlock(&table_lock);
	return fd;
}

int redirect_stat(dev_t dev, ino_t ino, struct stat *st)
{
	if (!atomic_load_explicit(&nonempty, memory_order_acquire))
		return -ENOENT;
	pthread_rwlock_rdlock(&table_lock);
	struct redirect *r = find_locked(dev, ino);
	int rc = !r ? -ENOENT : r->fd < 0 ? -EIO : fstat(r->fd, st) < 0 ? -errno : 0;
	pthread_rwlock_unlock(&table_lock);
	return rc;
}

bool redirect_served_id(dev_t dev, ino_t ino, dev_t *served_dev, ino_t *served_ino)
{
	if (!atomic_load_explicit(&nonempty, memory_order_acquire))
		return false;
	pthread_rwlock_rdlock(&table_lock);
	struct redirect *r = find_locked(dev, ino);
	if (r) {
		*served_dev = r->served_dev;
		*served_ino = r->served_ino;
	}
	pthread_rwlock_unlock(&table_lock);
	return r != NULL;
}

bool redirect_source_of(dev_t served_dev, ino_t served_ino, dev_t *dev, ino_t *ino)
{
	bool found = false;
	pthread_rwlock_rdlock(&table_lock);
	for (unsigned i = 0; i < count && !found; i++)
		if (table[i].served_dev == served_dev && table[i].served_ino == served_ino) {
			*dev = table[i].dev;
			*ino = table[i].ino;
			found = true;
		}
	pthread_rwlock_unlock(&table_lock);
	return found;
}

void redirect_format(struct strbuf *out)
{
	pthread_rwlock_rdlock(&table_lock);
	for (unsigned i = 0; i < count; i++) {
		const struct redirect *r = &table[i];
		strbuf_printf(out, "image=%s target=%s state=%s%s%s\n", r->image_path, r->target_path,
			      r->fd >= 0 ? "ok" : "missing", r->fd >= 0 ? "" : " error=", r->fd >= 0 ? "" : r->why);
	}
	pthread_rwlock_unlock(&table_lock);
}

void redirect_free_all(void)
{
	pthread_rwlock_wrlock(&table_lock);
	for (unsigned i = 0; i < count; i++)
		drop(&table[i]);
	free(table);
	table = NULL;
	count = 0;
	atomic_store(&nonempty, 0);
	free(record_path);
	record_path = NULL;
	pthread_rwlock_unlock(&table_lock);
}
