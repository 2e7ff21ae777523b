/* fs: see include/fleecefs/fs.h */
#include "config.h"

#include <dirent.h>
#include <limits.h>
#include <poll.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <search.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#if defined(HAVE_FOPEN_PARALLEL_DIRECT_WRITES) && !defined(HAVE_FI_PARALLEL_DIRECT_WRITES)
#include <linux/fuse.h>
#endif

#include "fleecefs/ctlfs.h"
#include "fleecefs/fs.h"
#include "fleecefs/image.h"
#include "fleecefs/inject.h"
#include "fleecefs/list.h"
#include "fleecefs/redirect.h"
#include "fleecefs/util.h"

#define ATTR_TIMEOUT 1.0

struct fnode {
	dev_t dev;
	ino_t ino;
	int fd;              /* O_PATH | O_NOFOLLOW */
	uint64_t nlookup;    /* table_lock */
};

/* An open file. A regular file's handle points at its image, which does
 * every guest I/O (image.h); other files keep their own descriptor. */
struct fhandle {
	struct image *image; /* regular files */
	unsigned kind;       /* image_io_kind of the open flags */
	int fd;              /* other files; -1 for images */
	/* In live_handles, so that those a guest still holds when the daemon
	 * stops (no RELEASE will come) are closed at teardown. handles_lock. */
	struct list_node link;
};

struct dir_entry {
	char *name;
	ino_t ino;
	unsigned char type;
};

struct dhandle {
	int fd;
	struct dir_entry *entries;
	size_t n;
};

static const struct fleece_daemon *daemon_ctx;
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static void *table_root;
static struct fnode root_node;
static pthread_mutex_t handles_lock = PTHREAD_MUTEX_INITIALIZER;
static struct list_head live_handles;

static void free_handle(struct fhandle *h);

static struct fnode *node_of(fuse_ino_t ino)
{
	return ino == FUSE_ROOT_ID ? &root_node : (struct fnode *)(uintptr_t)ino;
}

static struct fhandle *handle_of(struct fuse_file_info *fi)
{
	return (struct fhandle *)(uintptr_t)fi->fh;
}

static int compare_nodes(const void *a, const void *b)
{
	const struct fnode *x = a, *y = b;
	return compare_file_ids(x->dev, x->ino, y->dev, y->ino);
}

static bool is_state_dir(const struct stat *st)
{
	return stat_is(st, daemon_ctx->state_dev, daemon_ctx->state_ino);
}

static bool is_root_control_name(fuse_ino_t parent, const char *name)
{
	return parent == FUSE_ROOT_ID && strcmp(name, FLEECE_CONTROL_DIR) == 0;
}

int fs_setup(const struct fleece_daemon *d)
{
	struct stat st;

	daemon_ctx = d;
	root_node.fd = dup(d->source_fd);
	if (root_node.fd < 0 || fstat(root_node.fd, &st) < 0)
		return -errno;
	root_node.dev = st.st_dev;
	root_node.ino = st.st_ino;
	root_node.nlookup = 1;
	return 0;
}

static void free_node(void *p)
{
	struct fnode *n = p;
	close(n->fd);
	free(n);
}

void fs_teardown(void)
{
	while (live_handles.first)
		free_handle(list_entry(live_handles.first, struct fhandle, link));
	tdestroy(table_root, free_node);
	table_root = NULL;
	if (root_node.fd >= 0)
		close(root_node.fd);
	root_node.fd = -1;
}

/* ---- lookup and the inode table ----------------------------------------- */

/* Takes ownership of fd. */
static struct fnode *table_get(const struct stat *st, int fd)
{
	struct fnode key = { .dev = st->st_dev, .ino = st->st_ino };
	struct fnode *n;

	if (stat_is(st, root_node.dev, root_node.ino)) {
		close(fd);
		return &root_node;
	}
	pthread_mutex_lock(&table_lock);
	void *found = tfind(&key, &table_root, compare_nodes);
	if (found) {
		n = *(struct fnode **)found;
		n->nlookup++;
		pthread_mutex_unlock(&table_lock);
		close(fd);
		return n;
	}
	n = malloc(sizeof(*n));
	/* The key must be set before tsearch compares it. */
	if (n)
		*n = (struct fnode){ .dev = st->st_dev, .ino = st->st_ino, .fd = fd, .nlookup = 1 };
	if (!n || !tsearch(n, &table_root, compare_nodes)) {
		pthread_mutex_unlock(&table_lock);
		free(n);
		close(fd);
		return NULL;
	}
	pthread_mutex_unlock(&table_lock);
	return n;
}

/* A regular file a mirror switched to another file (redirect.h) has that
 * file's data and attributes: an O_PATH descriptor of it (the caller closes
 * it), -ENOENT for any other node, -EIO when the target is missing. */
static int served_fd(const struct fnode *n)
{
	return redirect_open(n->dev, n->ino);
}

/* The attributes of the file that serves st's node, keeping the node's inode
 * number (a missing target leaves the source's: opens answer EIO). */
static void served_attr(struct stat *st)
{
	struct stat t;
	if (!S_ISREG(st->st_mode) || redirect_stat(st->st_dev, st->st_ino, &t) < 0)
		return;
	t.st_ino = st->st_ino;
	t.st_dev = st->st_dev;
	*st = t;
}

/* The descriptor whose path reaches n's data: its own, or its target's
 * (then *owned: the caller closes it). -EIO: the target is missing. */
static int data_fd(const struct fnode *n, bool *owned)
{
	int fd = served_fd(n);
	*owned = fd >= 0;
	if (fd == -ENOENT)
		return n->fd;
	return fd;
}

static int do_lookup(fuse_ino_t parent, const char *name, struct fuse_entry_param *e)
{
	struct fnode *p = node_of(parent);
	struct stat st;
	int fd = openat(p->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	if (fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
		int e2 = errno;
		close(fd);
		return -e2;
	}
	if (is_state_dir(&st)) {
		close(fd);
		return -ENOENT;
	}
	struct fnode *n = table_get(&st, fd);
	if (!n)
		return -ENOMEM;
	memset(e, 0, sizeof(*e));
	e->ino = n == &root_node ? FUSE_ROOT_ID : (fuse_ino_t)(uintptr_t)n;
	served_attr(&st);
	e->attr = st;
	e->attr_timeout = ATTR_TIMEOUT;
	e->entry_timeout = ATTR_TIMEOUT;
	return 0;
}

static void fs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;

	if (ctlfs_owns(parent))
		return ctlfs_lookup(req, parent, name);
	if (is_root_control_name(parent, name))
		return ctlfs_lookup_root(req);
	int rc = do_lookup(parent, name, &e);
	if (rc)
		fuse_reply_err(req, -rc);
	else
		fuse_reply_entry(req, &e);
}

static void forget_one(fuse_ino_t ino, uint64_t nlookup)
{
	if (ctlfs_owns(ino) || ino == FUSE_ROOT_ID)
		return;
	struct fnode *n = node_of(ino);
	pthread_mutex_lock(&table_lock);
	n->nlookup -= nlookup < n->nlookup ? nlookup : n->nlookup;
	bool gone = n->nlookup == 0;
	if (gone)
		tdelete(n, &table_root, compare_nodes);
	pthread_mutex_unlock(&table_lock);
	if (gone)
		free_node(n);
}

static void fs_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	forget_one(ino, nlookup);
	fuse_reply_none(req);
}

static void fs_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	for (size_t i = 0; i < count; i++)
		forget_one(forgets[i].ino, forgets[i].nlookup);
	fuse_reply_none(req);
}

/* ---- attributes --------------------------------------------------------- */

/* Attributes through the open handle when there is one (an image's are
 * those of the file its backend serves). */
static void reply_attr_of(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fhandle *h = fi ? handle_of(fi) : NULL;
	struct stat st;
	int rc = h && h->image ? image_fstat(h->image, &st)
		 : h ? (fstat(h->fd, &st) < 0 ? -errno : 0)
		     : (fstatat(node_of(ino)->fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0);
	if (rc < 0) {
		fuse_reply_err(req, -rc);
		return;
	}
	if (h && h->image)
		st.st_ino = node_of(ino)->ino;   /* the node's, as lookup said */
	else if (!h)
		served_attr(&st);
	fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void fs_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino))
		return ctlfs_getattr(req, ino);
	reply_attr_of(req, ino, fi);
}

static int truncate_node(struct fnode *n, struct fuse_file_info *fi, off_t size)
{
	char path[64];
	int rc = 0;

	image_namespace_lock_shared();
	if (image_is_busy(n->dev, n->ino)) {
		rc = -EBUSY;
	} else if ((rc = inject_check(INJECT_TRUNCATE, (uint64_t)size, 1))) {
		;
	} else if (fi && handle_of(fi)->image) {
		rc = image_change_size(handle_of(fi)->image, -1, (uint64_t)size, 0);
	} else if (fi) {
		if (ftruncate(handle_of(fi)->fd, size) < 0)
			rc = -errno;
	} else {
		bool owned;
		int fd = data_fd(n, &owned);
		if (fd < 0) {
			rc = fd;
		} else {
			proc_fd_path(path, sizeof(path), fd);
			if (truncate(path, size) < 0)
				rc = -errno;
			if (owned)
				close(fd);
		}
	}
	image_namespace_unlock();
	return rc;
}

static void fs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
	struct fnode *n;
	char path[64];
	int rc = 0;

	if (ctlfs_owns(ino))
		return ctlfs_setattr(req, ino, attr, to_set);
	n = node_of(ino);
	bool owned;
	int fd = data_fd(n, &owned);
	if (fd < 0) {
		fuse_reply_err(req, -fd);
		return;
	}
	proc_fd_path(path, sizeof(path), fd);
	if (to_set & FUSE_SET_ATTR_MODE) {
		rc = fi && !handle_of(fi)->image ? fchmod(handle_of(fi)->fd, attr->st_mode)
						 : fchmodat(AT_FDCWD, path, attr->st_mode, 0);
		if (rc < 0)
			goto err;
	}
	if (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
		uid_t uid = (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1;
		gid_t gid = (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1;
		if (fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
			goto err;
	}
	if (to_set & FUSE_SET_ATTR_SIZE) {
		rc = truncate_node(n, fi, attr->st_size);
		if (rc) {
			if (owned)
				close(fd);
			fuse_reply_err(req, -rc);
			return;
		}
	}
	if (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) {
		struct timespec tv[2] = { { .tv_nsec = UTIME_OMIT }, { .tv_nsec = UTIME_OMIT } };
		if (to_set & FUSE_SET_ATTR_ATIME_NOW)
			tv[0].tv_nsec = UTIME_NOW;
		else if (to_set & FUSE_SET_ATTR_ATIME)
			tv[0] = attr->st_atim;
		if (to_set & FUSE_SET_ATTR_MTIME_NOW)
			tv[1].tv_nsec = UTIME_NOW;
		else if (to_set & FUSE_SET_ATTR_MTIME)
			tv[1] = attr->st_mtim;
		rc = fi && !handle_of(fi)->image ? futimens(handle_of(fi)->fd, tv) : utimensat(AT_FDCWD, path, tv, 0);
		if (rc < 0)
			goto err;
	}
	if (owned)
		close(fd);
	reply_attr_of(req, ino, fi);
	return;
err:
	rc = errno;
	if (owned)
		close(fd);
	fuse_reply_err(req, rc);
}

static void fs_readlink(fuse_req_t req, fuse_ino_t ino)
{
	char buf[PATH_MAX + 1];
	ssize_t n;

	if (ctlfs_owns(ino)) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	n = readlinkat(node_of(ino)->fd, "", buf, sizeof(buf));
	if (n < 0)
		fuse_reply_err(req, errno);
	else if ((size_t)n >= sizeof(buf))
		fuse_reply_err(req, ENAMETOOLONG);
	else {
		buf[n] = '\0';
		fuse_reply_readlink(req, buf);
	}
}

/* ---- namespace changes -------------------------------------------------- */

/* Refuses names the mount reserves: .fleece in the root. */
static bool reserved_name(fuse_ino_t parent, const char *name)
{
	return ctlfs_owns(parent) || is_root_control_name(parent, name);
}

/* New files and directories belong to the caller, not to the daemon. */
static void give_to_caller(fuse_req_t req, int dirfd, const char *name)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	struct stat parent;

	if (geteuid() != 0 || ctx->uid == 0)
		return;
	gid_t gid = ctx->gid;
	if (fstat(dirfd, &parent) == 0 && (parent.st_mode & S_ISGID))
		gid = (gid_t)-1;
	fchownat(dirfd, name, ctx->uid, gid, AT_SYMLINK_NOFOLLOW);
}

static void reply_new_entry(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;
	int rc = do_lookup(parent, name, &e);
	if (rc)
		fuse_reply_err(req, -rc);
	else
		fuse_reply_entry(req, &e);
}

/* Is `name` in dirfd the (hidden) state directory? Lookups of it answer
 * ENOENT, so the kernel sends mkdir, create and a rename over it as for a
 * free name, and an unlink or rmdir through a stale cached entry. Each is
 * refused with EPERM, as for any reserved name: never EEXIST or EISDIR,
 * which would tell what is there. */
static bool names_state_dir(int dirfd, const char *name)
{
	struct stat st;
	return fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && is_state_dir(&st);
}

static void fs_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	if (reserved_name(parent, name)) {
		fuse_reply_err(req, ctlfs_owns(parent) ? EPERM : EEXIST);
		return;
	}
	int dirfd = node_of(parent)->fd;
	if (names_state_dir(dirfd, name)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	if (mkdirat(dirfd, name, mode) < 0) {
		fuse_reply_err(req, errno);
		return;
	}
	give_to_caller(req, dirfd, name);
	reply_new_entry(req, parent, name);
}

/* Would removing or replacing `name` in dirfd drop a busy image?
 * Call with the namespace lock held. */
static bool name_is_busy(int dirfd, const char *name)
{
	struct stat st;
	return fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) &&
	       image_is_busy(st.st_dev, st.st_ino);
}

static void fs_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	int rc = 0;

	if (reserved_name(parent, name)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	int dirfd = node_of(parent)->fd;
	if (names_state_dir(dirfd, name)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	image_namespace_lock_shared();
	struct stat st;
	bool last = fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1;
	if (name_is_busy(dirfd, name))
		rc = EBUSY;
	else if (unlinkat(dirfd, name, 0) < 0)
		rc = errno;
	else if (last)
		redirect_remove(st.st_dev, st.st_ino);
	image_namespace_unlock();
	fuse_reply_err(req, rc);
}

static void fs_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	if (reserved_name(parent, name)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	int dirfd = node_of(parent)->fd;
	if (names_state_dir(dirfd, name)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	fuse_reply_err(req, unlinkat(dirfd, name, AT_REMOVEDIR) < 0 ? errno : 0);
}

static void fs_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
		      const char *newname, unsigned int flags)
{
	int rc = 0;

	if (reserved_name(parent, name) || reserved_name(newparent, newname)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	int olddir = node_of(parent)->fd, newdir = node_of(newparent)->fd;
	if (names_state_dir(olddir, name) || names_state_dir(newdir, newname)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	image_namespace_lock_shared();
	/* The renamed image itself may be busy: its job follows the inode. What
	 * it replaces may not be. */
	struct stat st;
	bool replaces_last = !(flags & RENAME_EXCHANGE) && fstatat(newdir, newname, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
			     S_ISREG(st.st_mode) && st.st_nlink == 1;
	if (name_is_busy(newdir, newname) || ((flags & RENAME_EXCHANGE) && name_is_busy(olddir, name)))
		rc = EBUSY;
	else if (renameat2(olddir, name, newdir, newname, flags) < 0)
		rc = errno;
	else if (replaces_last)
		redirect_remove(st.st_dev, st.st_ino);
	image_namespace_unlock();
	fuse_reply_err(req, rc);
}

/* ---- files -------------------------------------------------------------- */

static void reply_open_file(fuse_req_t req, struct fuse_file_info *fi)
{
	fi->direct_io = 1;
	fi->keep_cache = 0;
#if defined(HAVE_FI_PARALLEL_DIRECT_WRITES)
	fi->parallel_direct_writes = 1;
	fuse_reply_open(req, fi);
#elif defined(HAVE_FOPEN_PARALLEL_DIRECT_WRITES)
	/* libfuse 3.14 has no field for this flag; its fuse_reply_open is
	 * exactly "fill fuse_open_out, send it", so send it ourselves. */
	struct fuse_open_out out = { .fh = fi->fh, .open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES };
	if (fi->nonseekable)
		out.open_flags |= FOPEN_NONSEEKABLE;
	fuse_reply_buf(req, (const char *)&out, sizeof(out));
#else
	fuse_reply_open(req, fi);
#endif
}

static void link_handle(struct fhandle *h)
{
	pthread_mutex_lock(&handles_lock);
	list_push(&live_handles, &h->link);
	pthread_mutex_unlock(&handles_lock);
}

static void free_handle(struct fhandle *h)
{
	pthread_mutex_lock(&handles_lock);
	list_remove(&live_handles, &h->link);
	pthread_mutex_unlock(&handles_lock);
	if (h->fd >= 0)
		close(h->fd);
	if (h->image)
		image_put(h->image);
	free(h);
}

/* Builds the handle for fd, opened with `flags` (takes ownership: an
 * image's handle keeps no descriptor of its own). 0 or -errno. */
static int make_handle(int fd, int flags, struct fuse_file_info *fi)
{
	struct fhandle *h = calloc(1, sizeof(*h));
	struct stat st;
	int rc;

	if (!h) {
		close(fd);
		return -ENOMEM;
	}
	h->fd = fd;
	h->kind = image_io_kind(flags);
	if (fstat(fd, &st) < 0) {
		rc = -errno;
		goto fail;
	}
	if (S_ISREG(st.st_mode)) {
		if ((rc = image_get(fd, &h->image)) || (rc = image_open_kind(h->image, h->kind)))
			goto fail;
		close(fd);
		h->fd = -1;
	}
	fi->fh = (uintptr_t)h;
	link_handle(h);
	return 0;
fail:
	free_handle(h);
	return rc;
}

/* The kernel passes append semantics to us as explicit offsets, and has
 * resolved the name itself (O_NOFOLLOW would refuse the /proc/self/fd link
 * the source is reopened through). */
static int source_open_flags(int flags)
{
	return (flags & ~(O_CREAT | O_EXCL | O_NOCTTY | O_APPEND | O_NOFOLLOW)) | O_CLOEXEC;
}

static void fs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fnode *n;
	char path[64];
	int fd = -1, rc = 0;

	if (ctlfs_owns(ino))
		return ctlfs_open(req, ino, fi);
	n = node_of(ino);
	int flags = source_open_flags(fi->flags);
	bool owned;
	int base = data_fd(n, &owned);
	if (base < 0) {
		fuse_reply_err(req, -base);
		return;
	}
	proc_fd_path(path, sizeof(path), base);
	/* The check and the truncating open under one hold of the namespace
	 * lock: no job can start in between and see its image emptied
	 * without copy-before-write. */
	if (flags & O_TRUNC) {
		image_namespace_lock_shared();
		if (image_is_busy(n->dev, n->ino))
			rc = -EBUSY;
		else
			rc = inject_check(INJECT_TRUNCATE, 0, 1);
	}
	if (!rc) {
		fd = open(path, flags);
		if (fd < 0 && errno == EINVAL && (flags & O_DIRECT)) {
			/* The source file system has no O_DIRECT: serve the
			 * guest from a buffered descriptor instead. */
			flags &= ~O_DIRECT;
			fd = open(path, flags);
		}
		if (fd < 0)
			rc = -errno;
	}
	if (fi->flags & O_TRUNC)
		image_namespace_unlock();
	if (owned)
		close(base);
	if (!rc)
		rc = make_handle(fd, flags, fi);
	if (rc) {
		fuse_reply_err(req, -rc);
		return;
	}
	reply_open_file(req, fi);
}

static void fs_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
	struct fuse_entry_param e;
	int rc;

	if (reserved_name(parent, name)) {
		fuse_reply_err(req, ctlfs_owns(parent) ? EPERM : EEXIST);
		return;
	}
	int dirfd = node_of(parent)->fd;
	if (names_state_dir(dirfd, name)) {
		fuse_reply_err(req, EPERM);
		return;
	}
	int flags = source_open_flags(fi->flags);
	/* As in fs_open: the check and the truncating open under one hold. */
	bool truncating = flags & O_TRUNC;
	int fd = -1;
	if (truncating) {
		image_namespace_lock_shared();
		rc = name_is_busy(dirfd, name) ? -EBUSY : inject_check(INJECT_TRUNCATE, 0, 1);
	} else {
		rc = 0;
	}
	if (!rc) {
		fd = openat(dirfd, name, flags | O_CREAT | (fi->flags & O_EXCL) | O_NOFOLLOW, mode);
		if (fd < 0 && errno == EINVAL && (flags & O_DIRECT)) {
			flags &= ~O_DIRECT;
			fd = openat(dirfd, name, flags | O_CREAT | (fi->flags & O_EXCL) | O_NOFOLLOW, mode);
		}
		if (fd < 0)
			rc = -errno;
	}
	if (truncating)
		image_namespace_unlock();
	if (rc) {
		fuse_reply_err(req, -rc);
		return;
	}
	give_to_caller(req, dirfd, name);
	if ((rc = make_handle(fd, flags, fi)) || (rc = do_lookup(parent, name, &e))) {
		if (fi->fh)
			free_handle(handle_of(fi));
		fuse_reply_err(req, -rc);
		return;
	}
	fi->direct_io = 1;
	if (fuse_reply_create(req, &e, fi) != 0) {
		forget_one(e.ino, 1);
		free_handle(handle_of(fi));
	}
}

static int64_t or_errno(int64_t n) { return n < 0 ? -errno : n; }

static void fs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino))
		return ctlfs_read(req, ino, size, off, fi);
	void *buf = thread_buffer(THREAD_BUFFER_GUEST, size);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	struct fhandle *h = handle_of(fi);
	ssize_t n = h->image ? image_read(h->image, h->kind, buf, size, (uint64_t)off) : or_errno(pread(h->fd, buf, size, off));
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else
		fuse_reply_buf(req, buf, (size_t)n);
}

struct image *fs_request_image(uint64_t nodeid, uint64_t fh, unsigned *kind)
{
	if (ctlfs_owns(nodeid))
		return NULL;
	struct fhandle *h = (struct fhandle *)(uintptr_t)fh;
	if (!h || !h->image)
		return NULL;
	*kind = h->kind;
	return h->image;
}

static void fs_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino))
		return ctlfs_write(req, ino, buf, size, fi);
	struct fhandle *h = handle_of(fi);
	ssize_t n;

	/* Jobs on an image see the write before it lands (image.h). */
	if (h->image)
		n = image_write(h->image, h->kind, buf, size, (uint64_t)off);
	else
		n = or_errno(pwrite(h->fd, buf, size, off));
	if (n < 0)
		fuse_reply_err(req, (int)-n);
	else
		fuse_reply_write(req, (size_t)n);
}

static void fs_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	fuse_reply_err(req, 0);
}

static void fs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino))
		return ctlfs_release(req, ino, fi);
	free_handle(handle_of(fi));
	fuse_reply_err(req, 0);
}

static void fs_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino)) {
		fuse_reply_err(req, 0);
		return;
	}
	struct fhandle *h = handle_of(fi);
	int rc = h->image ? image_fsync(h->image, datasync != 0)
			  : ((datasync ? fdatasync(h->fd) : fsync(h->fd)) < 0 ? -errno : 0);
	fuse_reply_err(req, -rc);
}

static void fs_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino)) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	struct fhandle *h = handle_of(fi);
	int rc = 0;

	if (!h->image) {
		rc = fallocate(h->fd, mode, off, len) < 0 ? -errno : 0;
	} else if (mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE)) {
		/* Shifts data and changes the size: like truncate (the kernel
		 * does not pass these to FUSE today; kept for when it does). */
		struct fnode *n = node_of(ino);
		image_namespace_lock_shared();
		if (image_is_busy(n->dev, n->ino))
			rc = -EBUSY;
		else if (!(rc = inject_check(INJECT_TRUNCATE, (uint64_t)off, 1)))
			rc = image_change_size(h->image, mode, (uint64_t)off, (uint64_t)len);
		image_namespace_unlock();
	} else {
		rc = image_fallocate(h->image, h->kind, mode, (uint64_t)off, (uint64_t)len);
	}
	fuse_reply_err(req, -rc);
}

static void fs_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino))
		return ctlfs_lseek(req, ino, off, whence, fi);
	struct fhandle *h = handle_of(fi);
	int64_t r = h->image ? image_lseek(h->image, (uint64_t)off, whence) : or_errno(lseek(h->fd, off, whence));
	if (r < 0)
		fuse_reply_err(req, (int)-r);
	else
		fuse_reply_lseek(req, r);
}

/* ---- directories -------------------------------------------------------- */

static void free_dir(struct dhandle *d)
{
	for (size_t i = 0; i < d->n; i++)
		free(d->entries[i].name);
	free(d->entries);
	d->entries = NULL;
	d->n = 0;
}

static int add_dir_entry(struct dhandle *d, size_t *cap, const char *name, ino_t ino, unsigned char type)
{
	if (d->n == *cap) {
		size_t grown = *cap ? *cap * 2 : 32;
		struct dir_entry *e = realloc(d->entries, grown * sizeof(*e));
		if (!e)
			return -ENOMEM;
		d->entries = e;
		*cap = grown;
	}
	char *copy = strdup(name);
	if (!copy)
		return -ENOMEM;
	d->entries[d->n++] = (struct dir_entry){ .name = copy, .ino = ino, .type = type };
	return 0;
}

/* Reads the whole directory, hiding the state directory and putting the
 * control directory into the root. */
static int load_dir(struct dhandle *d, bool is_root)
{
	struct stat dirst;
	size_t cap = 0;
	int rc = 0;

	free_dir(d);
	int fd = dup(d->fd);
	if (fd < 0 || fstat(fd, &dirst) < 0) {
		if (fd >= 0)
			close(fd);
		return -errno;
	}
	lseek(fd, 0, SEEK_SET);
	DIR *dir = fdopendir(fd);
	if (!dir) {
		close(fd);
		return -errno;
	}
	struct dirent *de;
	errno = 0;
	while (!rc && (de = readdir(dir))) {
		if (is_root && strcmp(de->d_name, FLEECE_CONTROL_DIR) == 0)
			continue;
		if (dirst.st_dev == daemon_ctx->state_dev && de->d_ino == daemon_ctx->state_ino) {
			struct stat st;
			if (fstatat(d->fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && is_state_dir(&st))
				continue;
		}
		rc = add_dir_entry(d, &cap, de->d_name, de->d_ino, de->d_type);
		errno = 0;
	}
	if (!rc && errno)
		rc = -errno;
	closedir(dir);
	if (!rc && is_root)
		rc = add_dir_entry(d, &cap, FLEECE_CONTROL_DIR, CTLFS_INO_FLAG, DT_DIR);
	return rc;
}

static void fs_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino))
		return ctlfs_opendir(req, ino, fi);
	struct dhandle *d = calloc(1, sizeof(*d));
	if (!d) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	d->fd = openat(node_of(ino)->fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int rc = d->fd < 0 ? -errno : load_dir(d, ino == FUSE_ROOT_ID);
	if (rc) {
		if (d->fd >= 0)
			close(d->fd);
		free_dir(d);
		free(d);
		fuse_reply_err(req, -rc);
		return;
	}
	fi->fh = (uintptr_t)d;
	if (fuse_reply_open(req, fi) != 0) {
		close(d->fd);
		free_dir(d);
		free(d);
	}
}

static void fs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino))
		return ctlfs_readdir(req, ino, size, off, fi);
	struct dhandle *d = (struct dhandle *)(uintptr_t)fi->fh;
	char *buf;
	size_t used = 0;

	/* A rewind sees the directory as it is now. */
	if (off == 0) {
		int rc = load_dir(d, ino == FUSE_ROOT_ID);
		if (rc) {
			fuse_reply_err(req, -rc);
			return;
		}
	}
	buf = malloc(size);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	for (size_t i = off < 0 ? d->n : (size_t)off; i < d->n; i++) {
		struct stat st = { .st_ino = d->entries[i].ino, .st_mode = (mode_t)d->entries[i].type << 12 };
		size_t need = fuse_add_direntry(req, buf + used, size - used, d->entries[i].name, &st, (off_t)i + 1);
		if (need > size - used)
			break;
		used += need;
	}
	fuse_reply_buf(req, buf, used);
	free(buf);
}

static void fs_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino))
		return ctlfs_releasedir(req, ino, fi);
	struct dhandle *d = (struct dhandle *)(uintptr_t)fi->fh;
	close(d->fd);
	free_dir(d);
	free(d);
	fuse_reply_err(req, 0);
}

static void fs_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	if (ctlfs_owns(ino)) {
		fuse_reply_err(req, 0);
		return;
	}
	int fd = ((struct dhandle *)(uintptr_t)fi->fh)->fd;
	fuse_reply_err(req, (datasync ? fdatasync(fd) : fsync(fd)) < 0 ? errno : 0);
}

static void fs_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct statvfs sv;
	int fd = ctlfs_owns(ino) ? root_node.fd : node_of(ino)->fd;

	if (fstatvfs(fd, &sv) < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_statfs(req, &sv);
}

static void fs_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{
	if (ctlfs_owns(ino))
		return ctlfs_poll(req, ino, fi, ph);
	if (ph)
		fuse_pollhandle_destroy(ph);
	fuse_reply_poll(req, POLLIN | POLLOUT);
}

/* The most one write request can carry: the kernel cuts a write to a
 * direct-I/O file into requests of at most min(max_write, max_pages pages).
 * libfuse asks for as many pages as max_write needs; the kernel grants at
 * most fs.fuse.max_pages_limit (256 where that setting does not exist). */
static size_t write_request_max(unsigned max_write)
{
	unsigned long pages = 256;
	long page = sysconf(_SC_PAGESIZE);
	FILE *f = fopen("/proc/sys/fs/fuse/max_pages_limit", "re");

	if (f) {
		unsigned long limit;
		if (fscanf(f, "%lu", &limit) == 1 && limit > 0)
			pages = limit;
		fclose(f);
	}
	size_t by_pages = pages * (size_t)(page > 0 ? page : 4096);
	return max_write < by_pages ? max_write : by_pages;
}

static void fs_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	/* Every guest request reaches us as it was issued: no splicing through
	 * pipes (an extra copy for small requests), no writeback cache (it would
	 * move the point in time away from what the guest was told). */
	conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE | FUSE_CAP_WRITEBACK_CACHE);
	if (conn->capable & FUSE_CAP_ASYNC_DIO)
		conn->want |= FUSE_CAP_ASYNC_DIO;
	if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
		conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
	/* Async direct I/O counts as background requests: let a guest queue of
	 * 64 through. */
	conn->max_background = 64;
	conn->congestion_threshold = 48;
	conn->time_gran = 1;
	/* The control files refuse writes that may reach them in pieces. */
	ctlfs_set_max_write(write_request_max(conn->max_write));
}

const struct fuse_lowlevel_ops fs_operations = {
	.init = fs_init,
	.lookup = fs_lookup,
	.forget = fs_forget,
	.forget_multi = fs_forget_multi,
	.getattr = fs_getattr,
	.setattr = fs_setattr,
	.readlink = fs_readlink,
	.mkdir = fs_mkdir,
	.unlink = fs_unlink,
	.rmdir = fs_rmdir,
	.rename = fs_rename,
	.open = fs_open,
	.create = fs_create,
	.read = fs_read,
	.write = fs_write,
	.flush = fs_flush,
	.release = fs_release,
	.fsync = fs_fsync,
	.opendir = fs_opendir,
	.readdir = fs_readdir,
	.releasedir = fs_releasedir,
	.fsyncdir = fs_fsyncdir,
	.statfs = fs_statfs,
	.fallocate = fs_fallocate,
	.lseek = fs_lseek,
	.poll = fs_poll,
};
