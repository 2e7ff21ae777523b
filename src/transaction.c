/* transaction: see include/fleecefs/transaction.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/backup.h"
#include "fleecefs/bitmap.h"
#include "fleecefs/control.h"
#include "fleecefs/daemon.h"
#include "fleecefs/image.h"
#include "fleecefs/inject.h"
#include "fleecefs/job.h"
#include "fleecefs/mirror.h"
#include "fleecefs/pending.h"
#include "fleecefs/qcow2.h"
#include "fleecefs/snapshot.h"
#include "fleecefs/snapstore.h"
#include "fleecefs/source.h"
#include "fleecefs/target.h"
#include "fleecefs/transaction.h"
#include "fleecefs/util.h"

static pthread_mutex_t control_mutex = PTHREAD_MUTEX_INITIALIZER;

#define ERR_MAX 512

/* What step 2 found out about one command. */
/* What a backup line needs beyond the others (allocated for those only:
 * a transaction may have many lines). */
struct backup_line {
	enum target_format source_format; /* what the image's bytes are */
	enum target_format format;        /* what TARGET will be */
	struct target_spec target; /* TARGET, checked and resolved */
	struct chain_info chain;  /* sync=incremental: the bitmap's chain record */
	struct backup_params params; /* kept from stage to prepare */
};

/* What a mirror line needs (allocated for those only). */
struct mirror_line {
	struct target_spec target;
	struct mirror_params params;
	dev_t source_dev;          /* the name's file in SOURCE_DIR */
	ino_t source_ino;
};

struct resolved {
	struct backup_line *backup;
	struct mirror_line *mirror;
	struct image *image;      /* backup: referenced */
	struct image *images[CTL_MAX_IMAGES]; /* snapshot: referenced */
	struct job *job;          /* job verbs, backup of a view: referenced */
	struct snapstore *view;   /* backup of a view */
	struct job *prepared;     /* backup (staged or prepared), snapshot */
	bool bitmap_added;        /* bitmap add: done in step 3, undone on abort */
};

struct txn_state {
	const struct fleece_daemon *d;
	struct target_limits limits;  /* the daemon's mount */
	struct ctl_txn parsed;
	struct resolved *res;
	struct image **gates;          /* every image whose writes are drained */
	unsigned ngates;
	uint64_t gates_closing_ns;     /* monotonic: when close_gates began */
	uint64_t start_stall_ns;       /* from then to the point in time */
	struct job_group **groups;    /* one per group name, this write only */
	struct strbuf answer;
	unsigned ngroups;
	char err[ERR_MAX];
};

/* Opens IMAGE below the source directory, one component at a time, never
 * following a symlink and never entering the state directory. */
static int open_image(const struct fleece_daemon *d, unsigned line, const char *path, int *out,
		      char *err, size_t errlen)
{
	char copy[PATH_MAX];
	int dirfd = d->source_fd, fd = -1;
	struct stat st;

	snprintf(copy, sizeof(copy), "%s", path);
	if (strcmp(copy, FLEECE_CONTROL_DIR) == 0 || strncmp(copy, FLEECE_CONTROL_DIR "/", 8) == 0)
		return set_error(err, errlen, ENOENT, "line %u: image %s: no such image", line, path);
	for (char *comp = copy, *next; comp; comp = next) {
		next = strchr(comp, '/');
		if (next)
			*next++ = '\0';
		fd = openat(dirfd, comp, O_PATH | O_NOFOLLOW | O_CLOEXEC);
		if (dirfd != d->source_fd)
			close(dirfd);
		if (fd < 0) {
			int e = errno;
			return set_error(err, errlen, e, "line %u: image %s: %s", line, path,
					 e == ENOENT ? "no such image" : error_text(e));
		}
		if (fstat(fd, &st) < 0) {
			int e = errno;
			close(fd);
			return set_error(err, errlen, e, "line %u: image %s: %s", line, path, error_text(e));
		}
		if (stat_is(&st, d->state_dev, d->state_ino)) {
			close(fd);
			return set_error(err, errlen, ENOENT, "line %u: image %s: no such image", line, path);
		}
		if (next && !S_ISDIR(st.st_mode)) {
			close(fd);
			return set_error(err, errlen, S_ISLNK(st.st_mode) ? ELOOP : ENOTDIR,
					 "line %u: image %s: '%s' is not a directory%s", line, path, comp,
					 S_ISLNK(st.st_mode) ? " (symlinks are not followed)" : "");
		}
		dirfd = fd;
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return set_error(err, errlen, EINVAL, "line %u: image %s: not a regular file%s", line, path,
				 S_ISLNK(st.st_mode) ? " (symlinks are not followed)" : "");
	}
	*out = fd;
	return 0;
}

/* The id a line gives a new job (backup id=, snapshot NAME), or NULL. */
static const char *new_job_id(const struct ctl_command *c)
{
	if (c->verb == CTL_BACKUP)
		return c->u.backup.id;
	if (c->verb == CTL_SNAPSHOT)
		return c->u.snapshot.name;
	if (c->verb == CTL_MIRROR)
		return c->u.mirror.id;
	return NULL;
}

static int check_new_id(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	const char *id = new_job_id(c);

	if (!id)
		return 0;
	if (job_id_taken(id))
		return set_error(s->err, sizeof(s->err), EEXIST, "line %u: %s: id %s is taken", c->line,
				 ctl_verb_name(c->verb), id);
	for (unsigned j = 0; j < i; j++) {
		const char *other = new_job_id(&s->parsed.cmds[j]);
		if (other && strcmp(other, id) == 0)
			return set_error(s->err, sizeof(s->err), EEXIST, "line %u: %s: id %s is used twice in this transaction",
					 c->line, ctl_verb_name(c->verb), id);
	}
	return 0;
}

#define VIEW_PREFIX FLEECE_CONTROL_DIR "/snapshots/"

/* `backup .fleece/snapshots/NAME/IMAGE ...`: the snapshot and its view. */
static int resolve_view(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	const char *rest = c->u.backup.image + strlen(VIEW_PREFIX);
	const char *slash = strchr(rest, '/');
	char name[FLEECE_NAME_MAX + 1];

	if (!slash || (size_t)(slash - rest) > FLEECE_NAME_MAX)
		return set_error(s->err, sizeof(s->err), ENOENT, "line %u: image %s: no such snapshot view", c->line,
				 c->u.backup.image);
	snprintf(name, sizeof(name), "%.*s", (int)(slash - rest), rest);
	struct job *job = job_find(name);
	if (!job || !job_is_snapshot(job)) {
		if (job)
			job_put(job);
		return set_error(s->err, sizeof(s->err), ENOENT, "line %u: image %s: no snapshot %s", c->line,
				 c->u.backup.image, name);
	}
	s->res[i].job = job;
	pthread_mutex_lock(&job->lock);
	bool running = !job_state_concluded(job->state) && job->stop == JOB_GO_ON;
	pthread_mutex_unlock(&job->lock);
	struct snapstore *view = snapshot_member_by_path(job, slash + 1);
	if (!view)
		return set_error(s->err, sizeof(s->err), ENOENT, "line %u: image %s: snapshot %s has no image %s",
				 c->line, c->u.backup.image, name, slash + 1);
	if (!running || atomic_load(&view->broken))
		return set_error(s->err, sizeof(s->err), EACCES, "line %u: image %s: snapshot %s is broken or ending",
				 c->line, c->u.backup.image, name);
	if (c->u.backup.fleecing)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: fleecing=on applies to an image, not to a snapshot view (it is frozen already)",
				 c->line);
	s->res[i].view = view;
	image_ref(view->image);
	s->res[i].image = view->image;
	return 0;
}

/* Opens IMAGE and finds its image object; the name's file in *named (NULL:
 * not needed). */
static int resolve_image_named(struct txn_state *s, unsigned line, const char *path, struct image **out,
			       struct stat *named)
{
	int fd = -1, rc;

	if ((rc = open_image(s->d, line, path, &fd, s->err, sizeof(s->err))))
		return rc;
	if (named && fstat(fd, named) < 0) {
		rc = -errno;
		close(fd);
		return set_error(s->err, sizeof(s->err), -rc, "line %u: image %s: %s", line, path, error_text(-rc));
	}
	rc = image_get(fd, out);
	close(fd);
	if (rc)
		return set_error(s->err, sizeof(s->err), -rc, "line %u: image %s: %s", line, path, error_text(-rc));
	if (!image_readable(*out))
		return set_error(s->err, sizeof(s->err), EACCES, "line %u: image %s: the daemon cannot read it", line,
				 path);
	return 0;
}

static int resolve_image(struct txn_state *s, unsigned line, const char *path, struct image **out)
{
	int rc = resolve_image_named(s, line, path, out, NULL);
	char id[FLEECE_NAME_MAX + 16];

	/* A mirror about to switch the image: nothing new may start on it. */
	if (!rc && mirror_completing(*out, id, sizeof(id)))
		return set_error(s->err, sizeof(s->err), EBUSY, "line %u: image %s: %s is completing (switching it)",
				 line, path, id);
	return rc;
}

/* Line j adds bitmap NAME to the image of line i, earlier in this write. */
static bool added_earlier(struct txn_state *s, unsigned i, const char *name)
{
	for (unsigned j = 0; j < i; j++) {
		const struct ctl_command *o = &s->parsed.cmds[j];
		if (o->verb == CTL_BITMAP && o->u.bitmap.op == BITMAP_ADD && s->res[j].image == s->res[i].image &&
		    strcmp(o->u.bitmap.name, name) == 0)
			return true;
	}
	return false;
}

/* Another line of this write uses the same bitmap (other than to add it). */
static int bitmap_used_twice(struct txn_state *s, unsigned i, const char *name)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	for (unsigned j = 0; j < i; j++) {
		const struct ctl_command *o = &s->parsed.cmds[j];
		const char *other = o->verb == CTL_BACKUP ? o->u.backup.bitmap :
				    o->verb == CTL_BITMAP && o->u.bitmap.op != BITMAP_ADD ? o->u.bitmap.name : NULL;
		if (other && s->res[j].image == s->res[i].image && strcmp(other, name) == 0)
			return set_error(s->err, sizeof(s->err), EINVAL,
					 "line %u: bitmap %s is used by line %u of this transaction already", c->line, name,
					 o->line);
	}
	return 0;
}

/* An incremental into a new file reads through the chain's last backup:
 * backing= (default: the chain's) must be that very file, of the image's
 * size. */
static int resolve_backing(struct txn_state *s, unsigned i, const struct chain_info *chain, const char *chain_format)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	const struct ctl_backup *b = &c->u.backup;
	struct target_spec *spec = &s->res[i].backup->target;
	const char *path = b->backing ? b->backing : chain->target;
	char msg[200];
	struct stat st;
	int e;

	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0 || !realpath(path, spec->backing_resolved)) {
		e = errno;
		if (fd >= 0)
			close(fd);
		return set_error(s->err, sizeof(s->err), e, "line %u: backup: backing %s: %s", c->line, path, error_text(e));
	}
	if (!stat_is(&st, chain->dev, chain->ino)) {
		close(fd);
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: backing %s is not the last backup of bitmap %s (%s): an incremental "
				 "holds only what changed since that one", c->line, path, b->bitmap, chain->target);
	}
	spec->backing_format = strcmp(chain_format, "qcow2") == 0 ? FORMAT_QCOW2 : FORMAT_RAW;
	const struct target_format_ops *format = target_format(spec->backing_format);
	int bad = format->disk_size(fd, &spec->backing_size, msg, sizeof(msg));
	close(fd);
	if (bad)
		return set_error(s->err, sizeof(s->err), -bad, "line %u: backup: backing %s: %s", c->line, path, msg);
	/* Both as QEMU sees them: in whole 512-byte sectors. */
	uint64_t now = (uint64_t)image_size(s->res[i].image);
	if ((spec->backing_size + 511) / 512 != (now + 511) / 512)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: backing %s holds a %llu-byte disk, %s is %llu bytes now: take a new full "
				 "backup", c->line, path, (unsigned long long)spec->backing_size, b->image,
				 (unsigned long long)now);
	return 0;
}

static int check_backup_bitmap(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	const struct ctl_backup *b = &c->u.backup;
	struct chain_info *chain = &s->res[i].backup->chain;
	char msg[ERR_MAX - 32];
	int rc;

	if ((rc = bitmap_used_twice(s, i, b->bitmap)))
		return rc;
	bool fresh = added_earlier(s, i, b->bitmap);
	if (!fresh && (rc = bitmap_job_check(s->res[i].image, b->bitmap, b->sync == SYNC_INCREMENTAL, msg,
					     sizeof(msg))))
		return set_error(s->err, sizeof(s->err), -rc, "line %u: backup %s: %s", c->line, b->image, msg);
	if (b->sync != SYNC_INCREMENTAL)
		return 0;
	if (fresh || bitmap_chain_get(s->res[i].image, b->bitmap, chain))
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: bitmap %s has no full backup yet (start its chain with sync=full "
				 "bitmap=%s)", c->line, b->bitmap, b->bitmap);
	const char *target = s->res[i].backup->target.resolved;
	const char *chain_format = chain->format[0] ? chain->format : "raw";
	const struct target_format_ops *format = target_format(s->res[i].backup->format);
	/* A partial backup is completed where it is, whatever the format: the
	 * clusters it lacks are in the bitmap. */
	if (chain->partial && strcmp(chain_format, format->name) == 0)
		s->res[i].backup->target.in_place = true;
	bool in_place = s->res[i].backup->target.in_place;
	if (chain->partial && b->backing)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: the last backup of bitmap %s is the partial %s, which this incremental "
				 "completes with the backing file it has: no backing=", c->line, b->bitmap, chain->target);
	if (in_place && strcmp(target, chain->final) != 0)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: an incremental with bitmap %s continues its last backup %s%s%s, not %s",
				 c->line, b->bitmap, chain->final, chain->partial ? " (kept partial as " : "",
				 chain->partial ? chain->target : "", target);
	if (in_place && image_is_served((dev_t)chain->dev, (ino_t)chain->ino))
		return set_error(s->err, sizeof(s->err), EBUSY,
				 "line %u: backup: %s, the chain's last backup, is in use as an image of the mount: an "
				 "incremental would rewrite it under its user", c->line, chain->target);
	if (in_place && strcmp(chain_format, format->name) != 0)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: %s is a %s backup: a %s incremental updates its backup in place and "
				 "would destroy it", c->line, chain->target, chain_format, format->name);
	if (!chain->dev && !chain->ino)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: the chain record of bitmap %s does not say which file %s is (written "
				 "by an older fleecefs): take a new full backup with bitmap=%s", c->line, b->bitmap,
				 chain->target, b->bitmap);
	if (!in_place && chain->partial)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: the last backup of bitmap %s is the partial %s backup %s: complete it "
				 "with a %s incremental (format=%s)", c->line, b->bitmap, chain_format, chain->target,
				 chain_format, chain_format);
	if (!in_place && (rc = resolve_backing(s, i, chain, chain_format)))
		return rc;
	if (!chain->checksum && b->checksum)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: %s has no manifest (taken with checksum=none): use checksum=none, or "
				 "take a new full backup", c->line, chain->target);
	if (target_name_taken(chain->final))
		return set_error(s->err, sizeof(s->err), EEXIST, "line %u: target %s: is being written by another job",
				 c->line, chain->final);
	if (in_place && pending_names(chain->final))
		return set_error(s->err, sizeof(s->err), EBUSY,
				 "line %u: backup: %s, the chain's last backup, still waits for the rollback of an "
				 "interrupted incremental (its journal is in the state directory; the next mount applies "
				 "it)", c->line, chain->final);
	if (chain->partial) {
		/* Completed, it gets TARGET's name: nothing may be there. */
		struct target_spec final = { .format = s->res[i].backup->format, .location = chain->final,
					     .checksum = b->checksum, .cluster_size = s->d->cluster_size };
		char msg[ERR_MAX - 32];
		if ((rc = target_check(&final, &s->limits, msg, sizeof(msg))))
			return set_error(s->err, sizeof(s->err), -rc, "line %u: %s", c->line, msg);
	}
	return 0;
}

static int check_bitmap(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	const struct ctl_bitmap *b = &c->u.bitmap;
	char msg[ERR_MAX - 32];
	int rc;

	if (strncmp(b->image, VIEW_PREFIX, strlen(VIEW_PREFIX)) == 0)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: bitmap: bitmaps belong to images, not to snapshot views", c->line);
	if ((rc = resolve_image(s, c->line, b->image, &s->res[i].image)))
		return rc;
	if (b->op != BITMAP_ADD && (rc = bitmap_used_twice(s, i, b->name)))
		return rc;
	/* Each line meets the state before this write (plus earlier adds). */
	if (b->op != BITMAP_ADD && added_earlier(s, i, b->name))
		return set_error(s->err, sizeof(s->err), EINVAL, "line %u: bitmap %s is added by this transaction already",
				 c->line, b->name);
	if (b->op == BITMAP_ADD && added_earlier(s, i, b->name))
		return set_error(s->err, sizeof(s->err), EEXIST, "line %u: bitmap add: %s is added twice", c->line,
				 b->name);
	if ((rc = bitmap_check(s->res[i].image, b, msg, sizeof(msg))))
		snprintf(s->err, sizeof(s->err), "line %u: %s", c->line, msg);
	return rc;
}

/* What the source is: a qcow2 file (its magic) is already an image QEMU
 * boots, so its backup is a byte copy (raw) whatever TARGET's suffix says;
 * wrapping it as the disk of another qcow2 happens only when asked for. */
static int choose_format(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	const struct ctl_backup *b = &c->u.backup;
	struct backup_line *bl = s->res[i].backup;
	unsigned char magic[4];
	char msg[256];
	bool got;

	if (s->res[i].view)
		got = s->res[i].view->size >= sizeof(magic) &&
		      source_read(&s->res[i].view->source, magic, 0, sizeof(magic)) == 0;
	else
		got = image_pread(s->res[i].image, magic, sizeof(magic), 0) == (ssize_t)sizeof(magic);
	bl->source_format = got && qcow2_has_magic(magic, sizeof(magic)) ? FORMAT_QCOW2 : FORMAT_RAW;
	bl->format = b->format;
	if (bl->source_format == FORMAT_QCOW2 && !b->format_given && b->format != FORMAT_NBD) {
		/* A byte copy, unless this continues a chain that was begun
		 * as qcow2 (which took an explicit format=qcow2). */
		bool qcow2_chain = b->sync == SYNC_INCREMENTAL && b->bitmap && s->res[i].image &&
				   bitmap_chain_get(s->res[i].image, b->bitmap, &bl->chain) == 0 &&
				   strcmp(bl->chain.format, "qcow2") == 0;
		bl->format = qcow2_chain ? FORMAT_QCOW2 : FORMAT_RAW;
	}
	if (bl->format != b->format && ctl_backup_check_format(b, bl->format, msg, sizeof(msg)))
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: backup: %s is a qcow2 image, backed up byte for byte (format=raw) unless "
				 "format=qcow2 is given: %s", c->line, b->image, msg);
	return 0;
}

static int check_backup(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	const struct ctl_backup *b = &c->u.backup;
	unsigned line = c->line;
	int rc;

	if ((rc = check_new_id(s, i)))
		return rc;
	if (!(s->res[i].backup = calloc(1, sizeof(*s->res[i].backup))))
		return set_error(s->err, sizeof(s->err), ENOMEM, "line %u: out of memory", line);
	if (strncmp(b->image, VIEW_PREFIX, strlen(VIEW_PREFIX)) == 0) {
		if (b->bitmap)
			return set_error(s->err, sizeof(s->err), EINVAL,
					 "line %u: backup: bitmaps belong to images, not to snapshot views", line);
		rc = resolve_view(s, i);
	} else {
		rc = resolve_image(s, line, b->image, &s->res[i].image);
	}
	if (rc || (rc = choose_format(s, i)))
		return rc;
	/* The format says what an incremental is (raw: the chain's last backup
	 * updated in place). */
	struct backup_line *bl = s->res[i].backup;
	const struct target_format_ops *format = target_format(bl->format);
	struct target_spec *spec = &bl->target;
	*spec = (struct target_spec){ .format = bl->format, .location = b->target, .checksum = b->checksum,
				      .in_place = b->sync == SYNC_INCREMENTAL && format && format->incremental_in_place,
				      .incremental = b->sync == SYNC_INCREMENTAL, .cluster_size = s->d->cluster_size,
				      .backing = b->backing, .compress = (int)b->compress,
				      .compress_level = b->compress_level, .tls_certs = b->tls_certs,
				      .tls_psk = b->tls_psk };
	char msg[ERR_MAX - 32];
	if ((rc = target_check(spec, &s->limits, msg, sizeof(msg))))
		return set_error(s->err, sizeof(s->err), -rc, "line %u: %s", line, msg);
	for (unsigned j = 0; j < i; j++)
		if (s->parsed.cmds[j].verb == CTL_BACKUP && strcmp(s->res[j].backup->target.resolved, spec->resolved) == 0)
			return set_error(s->err, sizeof(s->err), EEXIST,
					 "line %u: backup: target %s is used twice in this transaction", line, spec->resolved);
	return b->bitmap ? check_backup_bitmap(s, i) : 0;
}

/* A TARGET that names the image's own file (or a link to it). */
static bool names_image(const char *target, dev_t dev, ino_t ino, struct image *img)
{
	struct stat st, served;
	if (stat(target, &st) < 0)
		return false;
	if (stat_is(&st, dev, ino))
		return true;
	return image_fstat(img, &served) == 0 && stat_is(&st, served.st_dev, served.st_ino);
}

static int check_mirror(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	const struct ctl_mirror *m = &c->u.mirror;
	struct stat named;
	char id[FLEECE_NAME_MAX + 16];
	int rc;

	if ((rc = check_new_id(s, i)))
		return rc;
	if (!(s->res[i].mirror = calloc(1, sizeof(*s->res[i].mirror))))
		return set_error(s->err, sizeof(s->err), ENOMEM, "line %u: out of memory", c->line);
	struct mirror_line *ml = s->res[i].mirror;
	if (strncmp(m->image, VIEW_PREFIX, strlen(VIEW_PREFIX)) == 0)
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: mirror: a snapshot view is read-only: mirror the image itself", c->line);
	if ((rc = resolve_image_named(s, c->line, m->image, &s->res[i].image, &named)))
		return rc;
	ml->source_dev = named.st_dev;
	ml->source_ino = named.st_ino;
	if (mirror_of_image(s->res[i].image, id, sizeof(id)))
		return set_error(s->err, sizeof(s->err), EBUSY, "line %u: mirror %s: %s runs on it already", c->line,
				 m->image, id);
	for (unsigned j = 0; j < i; j++)
		if (s->parsed.cmds[j].verb == CTL_MIRROR && s->res[j].image == s->res[i].image)
			return set_error(s->err, sizeof(s->err), EBUSY,
					 "line %u: mirror %s: line %u of this transaction mirrors it already", c->line,
					 m->image, s->parsed.cmds[j].line);
	if (names_image(m->target, named.st_dev, named.st_ino, s->res[i].image))
		return set_error(s->err, sizeof(s->err), EINVAL, "line %u: mirror: target %s is %s itself", c->line,
				 m->target, m->image);
	/* A byte copy of the image file, whatever TARGET's suffix says. */
	ml->target = (struct target_spec){ .format = FORMAT_RAW, .location = m->target,
					   .cluster_size = m->granularity ? (uint32_t)m->granularity : s->d->cluster_size };
	char msg[ERR_MAX - 32];
	if ((rc = target_check(&ml->target, &s->limits, msg, sizeof(msg))))
		return set_error(s->err, sizeof(s->err), -rc, "line %u: %s", c->line, msg);
	for (unsigned j = 0; j < i; j++)
		if ((s->parsed.cmds[j].verb == CTL_BACKUP && !strcmp(s->res[j].backup->target.resolved, ml->target.resolved)) ||
		    (s->parsed.cmds[j].verb == CTL_MIRROR && !strcmp(s->res[j].mirror->target.resolved, ml->target.resolved)))
			return set_error(s->err, sizeof(s->err), EEXIST, "line %u: mirror: target %s is used twice in this "
					 "transaction", c->line, ml->target.resolved);
	return 0;
}

static int check_snapshot(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	int rc;

	if ((rc = check_new_id(s, i)))
		return rc;
	for (unsigned k = 0; k < c->u.snapshot.nimages; k++)
		if ((rc = resolve_image(s, c->line, c->u.snapshot.images[k], &s->res[i].images[k])))
			return rc;
	return 0;
}

static int check_release(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	struct job *job = job_find(c->u.job.id);
	char msg[ERR_MAX - 32];

	if (!job)
		return set_error(s->err, sizeof(s->err), ENOENT, "line %u: release: no snapshot %s", c->line,
				 c->u.job.id);
	s->res[i].job = job;
	if (!job_is_snapshot(job))
		return set_error(s->err, sizeof(s->err), EINVAL,
				 "line %u: release %s: not a snapshot (a %s job ends with cancel)", c->line, job->id,
				 job->driver->type);
	for (unsigned j = 0; j < i; j++)
		if (s->res[j].job == job)
			return set_error(s->err, sizeof(s->err), EINVAL,
					 "line %u: release %s: the job is already acted on by line %u of this transaction",
					 c->line, job->id, s->parsed.cmds[j].line);
	int rc = snapshot_check_release(job, msg, sizeof(msg));
	if (rc)
		snprintf(s->err, sizeof(s->err), "line %u: %s", c->line, msg);
	return rc;
}

/* The job verbs of the control language: which legality rule each follows
 * (job.h) and what it does once checked (set: job_set_speed, complete: in
 * the commit step). */
static const struct {
	enum job_verb verb;
	int (*act)(struct job *job, char *err, size_t errlen);
} job_verbs[] = {
	[CTL_CANCEL] = { JOB_VERB_CANCEL, job_cancel },
	[CTL_PAUSE] = { JOB_VERB_PAUSE, job_pause },
	[CTL_RESUME] = { JOB_VERB_RESUME, job_resume },
	[CTL_COMPLETE] = { JOB_VERB_COMPLETE, NULL },
	[CTL_DISMISS] = { JOB_VERB_DISMISS, job_dismiss },
	[CTL_SET] = { JOB_VERB_SET, NULL },
	[CTL_RELEASE] = { JOB_VERB_CANCEL, snapshot_release },
};

static int check_job_verb(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	const char *verb = ctl_verb_name(c->verb);
	struct job *job = job_find(c->u.job.id);
	char msg[ERR_MAX - 32];

	if (!job)
		return set_error(s->err, sizeof(s->err), ENOENT, "line %u: %s: no job %s", c->line, verb, c->u.job.id);
	s->res[i].job = job;
	for (unsigned j = 0; j < i; j++)
		if (s->res[j].job == job)
			return set_error(s->err, sizeof(s->err), EINVAL,
					 "line %u: %s %s: the job is already acted on by line %u of this transaction", c->line,
					 verb, job->id, s->parsed.cmds[j].line);
	int rc = job_check_verb(job, job_verbs[c->verb].verb, msg, sizeof(msg));
	if (rc)
		snprintf(s->err, sizeof(s->err), "line %u: %s", c->line, msg);
	return rc;
}

/* complete: also the images the job uses, whose gates the transaction holds
 * while the driver completes (a mirror switches its image then). */
static int check_complete(struct txn_state *s, unsigned i)
{
	int rc = check_job_verb(s, i);
	char msg[ERR_MAX - 32];
	if (!rc && (rc = mirror_check_complete(s->res[i].job, msg, sizeof(msg))))
		return set_error(s->err, sizeof(s->err), -rc, "line %u: %s", s->parsed.cmds[i].line, msg);
	if (!rc && s->res[i].job->driver->images) {
		unsigned n = s->res[i].job->driver->images(s->res[i].job, s->res[i].images, CTL_MAX_IMAGES);
		for (unsigned k = 0; k < n; k++)
			image_ref(s->res[i].images[k]);   /* released with the line */
	}
	return rc;
}

static int compare_pointers(const void *a, const void *b)
{
	uintptr_t x = (uintptr_t)*(void *const *)a, y = (uintptr_t)*(void *const *)b;
	return x < y ? -1 : x > y;
}

/* Closes the gates of every involved image, in address order, once each. */
static void close_gates(struct txn_state *s)
{
	s->ngates = 0;
	for (unsigned i = 0; i < s->parsed.ncmds; i++) {
		/* A view is frozen already: its image's writes need no drain. */
		if (s->res[i].image && !s->res[i].view)
			s->gates[s->ngates++] = s->res[i].image;
		for (unsigned k = 0; k < CTL_MAX_IMAGES && s->res[i].images[k]; k++)
			s->gates[s->ngates++] = s->res[i].images[k];
	}
	qsort(s->gates, s->ngates, sizeof(s->gates[0]), compare_pointers);
	unsigned n = 0;
	for (unsigned i = 0; i < s->ngates; i++)
		if (!n || s->gates[n - 1] != s->gates[i])
			s->gates[n++] = s->gates[i];
	s->ngates = n;
	for (unsigned i = 0; i < s->ngates; i++)
		gate_close(&s->gates[i]->gate);
}

static void open_gates(struct txn_state *s)
{
	for (unsigned i = s->ngates; i-- > 0;)
		gate_open(&s->gates[i]->gate);
}

/* The group object for NAME, shared by the lines of this write that name it. */
static struct job_group *group_for(struct txn_state *s, const char *name)
{
	if (!name)
		return NULL;
	for (unsigned i = 0; i < s->ngroups; i++)
		if (strcmp(job_group_name_of(s->groups[i]), name) == 0)
			return s->groups[i];
	struct job_group *g = job_group_new(name);
	if (g)
		s->groups[s->ngroups++] = g;
	return g;
}

/* Before the gates close: the snapshot's files and copy engines. */
static int stage_snapshot(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	struct snapshot_params p = {
		.cmd = &c->u.snapshot,
		.images = s->res[i].images,
		.state_dir = s->d->state_dir,
		.cluster_size = s->d->cluster_size,
	};
	char msg[ERR_MAX - 32];
	int rc = snapshot_stage(&p, &s->res[i].prepared, msg, sizeof(msg));
	if (rc)
		snprintf(s->err, sizeof(s->err), "line %u: %s", c->line, msg);
	return rc;
}

static int prepare_snapshot(struct txn_state *s, unsigned i)
{
	char msg[ERR_MAX - 32];
	int rc = snapshot_prepare(s->res[i].prepared, msg, sizeof(msg));
	if (rc)
		snprintf(s->err, sizeof(s->err), "line %u: %s", s->parsed.cmds[i].line, msg);
	return rc;
}

static int prepare_bitmap(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	char msg[ERR_MAX - 32];

	if (c->u.bitmap.op != BITMAP_ADD)
		return 0;
	int rc = bitmap_apply(s->res[i].image, &c->u.bitmap, msg, sizeof(msg));
	if (rc) {
		snprintf(s->err, sizeof(s->err), "line %u: %s", c->line, msg);
		return rc;
	}
	s->res[i].bitmap_added = true;
	return 0;
}

static int prepare_backup(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	struct job_group *group = group_for(s, c->u.backup.group);
	char msg[ERR_MAX - 32];

	if (c->u.backup.group && !group)
		return set_error(s->err, sizeof(s->err), ENOMEM, "line %u: out of memory", c->line);
	s->res[i].backup->params.group = group;
	int rc = backup_prepare(s->res[i].prepared, &s->res[i].backup->params, msg, sizeof(msg));
	if (rc)
		snprintf(s->err, sizeof(s->err), "line %u: %s", c->line, msg);
	return rc;
}

/* Before the gates close: a backup's files (what does not depend on the
 * point in time, and may take the file system a while). */
static int stage_backup(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	struct backup_line *bl = s->res[i].backup;
	char msg[ERR_MAX - 32];

	bl->params = (struct backup_params){
		.snapshot = s->res[i].view ? s->res[i].job : NULL,
		.view = s->res[i].view,
		.state_dir = s->d->state_dir,
		.cmd = &c->u.backup,
		.image = s->res[i].image,
		.image_path = c->u.backup.image,
		.target = &bl->target,
		.chain = c->u.backup.sync == SYNC_INCREMENTAL ? &bl->chain : NULL,
		.cluster_size = s->d->cluster_size,
		.copy_workers = s->d->copy_workers,
		.source_format = bl->source_format,
	};
	int rc = backup_stage(&bl->params, &s->res[i].prepared, msg, sizeof(msg));
	if (rc)
		snprintf(s->err, sizeof(s->err), "line %u: %s", c->line, msg);
	return rc;
}

static int stage_mirror(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	struct mirror_line *ml = s->res[i].mirror;
	char msg[ERR_MAX - 32];

	ml->params = (struct mirror_params){
		.cmd = &c->u.mirror,
		.image = s->res[i].image,
		.image_path = c->u.mirror.image,
		.source_dev = ml->source_dev,
		.source_ino = ml->source_ino,
		.target = &ml->target,
		.cluster_size = ml->target.cluster_size,
	};
	int rc = mirror_stage(&ml->params, &s->res[i].prepared, msg, sizeof(msg));
	if (rc)
		snprintf(s->err, sizeof(s->err), "line %u: %s", c->line, msg);
	return rc;
}

static int prepare_mirror(struct txn_state *s, unsigned i)
{
	char msg[ERR_MAX - 32];
	int rc = mirror_prepare(s->res[i].prepared, &s->res[i].mirror->params, msg, sizeof(msg));
	if (rc)
		snprintf(s->err, sizeof(s->err), "line %u: %s", s->parsed.cmds[i].line, msg);
	return rc;
}

/* Bitmap commands other than add cannot fail once checked: they take effect
 * at the same point in time as the jobs. */
static void commit_bitmap(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	char ignored[ERR_MAX];

	if (c->u.bitmap.op != BITMAP_ADD)
		bitmap_apply(s->res[i].image, &c->u.bitmap, ignored, sizeof(ignored));
}

static void commit_job(struct txn_state *s, unsigned i)
{
	s->res[i].prepared->start_stall_ns = s->start_stall_ns;
	job_commit(s->res[i].prepared);
	strbuf_printf(&s->answer, " id=%s", s->res[i].prepared->id);
	s->res[i].prepared = NULL;
}

/* With the gates of the job's images closed. */
static void commit_complete(struct txn_state *s, unsigned i)
{
	char ignored[ERR_MAX];
	job_complete(s->res[i].job, ignored, sizeof(ignored));
}

/* After the gates reopened (release waits for a snapshot's teardown, which
 * drains the image's writes itself). Checked in step 2; a job whose state
 * moved on since (it concluded, an error paused it) keeps its new state. */
static void run_job_verb(struct txn_state *s, unsigned i)
{
	const struct ctl_command *c = &s->parsed.cmds[i];
	char ignored[ERR_MAX];

	if (c->verb == CTL_SET)
		job_set_speed(s->res[i].job, c->u.job.speed, ignored, sizeof(ignored));
	else if (job_verbs[c->verb].act)
		job_verbs[c->verb].act(s->res[i].job, ignored, sizeof(ignored));
}

/* What each verb does in each step of a transaction (NULL: nothing):
 * check (state as it is, all or nothing), stage (gates open: files),
 * prepare (gates closed: may fail, then everything is abandoned), commit
 * (gates closed: cannot fail; the point in time), after (gates open). */
struct verb_steps {
	int (*check)(struct txn_state *s, unsigned i);
	int (*stage)(struct txn_state *s, unsigned i);
	int (*prepare)(struct txn_state *s, unsigned i);
	void (*commit)(struct txn_state *s, unsigned i);
	void (*after)(struct txn_state *s, unsigned i);
};

static const struct verb_steps verb_steps[] = {
	[CTL_BACKUP] = { check_backup, stage_backup, prepare_backup, commit_job, NULL },
	[CTL_MIRROR] = { check_mirror, stage_mirror, prepare_mirror, commit_job, NULL },
	[CTL_SNAPSHOT] = { check_snapshot, stage_snapshot, prepare_snapshot, commit_job, NULL },
	[CTL_RELEASE] = { check_release, NULL, NULL, NULL, run_job_verb },
	[CTL_BITMAP] = { check_bitmap, NULL, prepare_bitmap, commit_bitmap, NULL },
	[CTL_CANCEL] = { check_job_verb, NULL, NULL, NULL, run_job_verb },
	[CTL_PAUSE] = { check_job_verb, NULL, NULL, NULL, run_job_verb },
	[CTL_RESUME] = { check_job_verb, NULL, NULL, NULL, run_job_verb },
	[CTL_COMPLETE] = { check_complete, NULL, NULL, commit_complete, NULL },
	[CTL_DISMISS] = { check_job_verb, NULL, NULL, NULL, run_job_verb },
	[CTL_SET] = { check_job_verb, NULL, NULL, NULL, run_job_verb },
};

/* The steps that may fail, over every line in order: the first failure
 * ends the transaction. */
static int check_all(struct txn_state *s)
{
	int rc = 0;
	for (unsigned i = 0; i < s->parsed.ncmds && !rc; i++)
		rc = verb_steps[s->parsed.cmds[i].verb].check(s, i);
	return rc;
}

static int stage_all(struct txn_state *s)
{
	int rc = 0;
	for (unsigned i = 0; i < s->parsed.ncmds && !rc; i++)
		if (verb_steps[s->parsed.cmds[i].verb].stage)
			rc = verb_steps[s->parsed.cmds[i].verb].stage(s, i);
	return rc;
}

static bool staged_any(const struct txn_state *s)
{
	for (unsigned i = 0; i < s->parsed.ncmds; i++)
		if (s->res[i].prepared)
			return true;
	return false;
}

static int prepare_all(struct txn_state *s)
{
	int rc = 0;
	for (unsigned i = 0; i < s->parsed.ncmds && !rc; i++)
		if (verb_steps[s->parsed.cmds[i].verb].prepare)
			rc = verb_steps[s->parsed.cmds[i].verb].prepare(s, i);
	return rc;
}

/* With the gates closed: every new job starts at this one point in time. */
static void commit_all(struct txn_state *s)
{
	s->start_stall_ns = clock_monotonic_ns() - s->gates_closing_ns;
	strbuf_printf(&s->answer, "ok");
	for (unsigned i = 0; i < s->parsed.ncmds; i++)
		if (verb_steps[s->parsed.cmds[i].verb].commit)
			verb_steps[s->parsed.cmds[i].verb].commit(s, i);
	strbuf_printf(&s->answer, "\n");
}

static void after_all(struct txn_state *s)
{
	for (unsigned i = 0; i < s->parsed.ncmds; i++)
		if (verb_steps[s->parsed.cmds[i].verb].after)
			verb_steps[s->parsed.cmds[i].verb].after(s, i);
}

/* With the gates still closed, so no guest write ever sees a hook of a job
 * that never started. */
static void abandon_prepared(struct txn_state *s)
{
	char ignored[ERR_MAX];

	for (unsigned i = s->parsed.ncmds; i-- > 0;) {
		if (s->res[i].prepared)
			job_abandon(s->res[i].prepared);
		s->res[i].prepared = NULL;
		if (s->res[i].bitmap_added) {
			struct ctl_bitmap undo = s->parsed.cmds[i].u.bitmap;
			undo.op = BITMAP_REMOVE;
			bitmap_apply(s->res[i].image, &undo, ignored, sizeof(ignored));
		}
		s->res[i].bitmap_added = false;
	}
}

static void release_resolved(struct txn_state *s)
{
	for (unsigned i = 0; s->res && i < s->parsed.ncmds; i++) {
		if (s->res[i].image)
			image_put(s->res[i].image);
		for (unsigned k = 0; k < CTL_MAX_IMAGES && s->res[i].images[k]; k++)
			image_put(s->res[i].images[k]);
		if (s->res[i].job)
			job_put(s->res[i].job);
		free(s->res[i].backup);
		free(s->res[i].mirror);
	}
	free(s->res);
}

int txn_execute(const struct fleece_daemon *d, const char *text, size_t len, char **answer)
{
	struct txn_state s = { .d = d,
			       .limits = { .mountpoint = d->mountpoint, .mount_dev = d->mount_dev, .source_dir = d->source_dir } };
	int rc;

	pthread_mutex_lock(&control_mutex);
	rc = ctl_parse(text, len, &s.parsed, s.err, sizeof(s.err));
	if (!rc && (!(s.res = calloc(s.parsed.ncmds, sizeof(*s.res))) ||
		    !(s.groups = calloc(s.parsed.ncmds, sizeof(*s.groups))) ||
		    !(s.gates = calloc(s.parsed.ncmds * (CTL_MAX_IMAGES + 1), sizeof(*s.gates)))))
		rc = set_error(s.err, sizeof(s.err), ENOMEM, "out of memory");
	if (!rc)
		rc = check_all(&s);
	if (!rc && (rc = stage_all(&s)))
		abandon_prepared(&s);
	if (!rc && staged_any(&s) && (rc = inject_check(INJECT_START, 0, 1))) {
		rc = set_error(s.err, sizeof(s.err), -rc, "start: %s (injected)", error_text(-rc));
		abandon_prepared(&s);
	}
	if (!rc) {
		image_namespace_lock_exclusive();
		s.gates_closing_ns = clock_monotonic_ns();
		close_gates(&s);
		rc = prepare_all(&s);
		if (!rc)
			commit_all(&s);
		else
			abandon_prepared(&s);
		open_gates(&s);
		image_namespace_unlock();
		if (!rc)
			after_all(&s);
	}
	release_resolved(&s);
	for (unsigned i = 0; i < s.ngroups; i++)
		job_group_put(s.groups[i]);
	free(s.groups);
	free(s.gates);
	ctl_txn_free(&s.parsed);
	pthread_mutex_unlock(&control_mutex);
	if (rc) {
		strbuf_free(&s.answer);
		strbuf_printf(&s.answer, "error: %s\n", s.err);
		log_info("control: %s", s.err);
	}
	*answer = strbuf_steal(&s.answer);
	return rc;
}
