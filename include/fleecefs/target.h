/* target: where a backup's clusters go.
 *
 * A registry of formats (target_format: raw and qcow2 files, and NBD exports
 * reached through libnbd, target-nbd.c), each
 * with its checks and how it creates a new target or reopens an earlier
 * backup; one place that checks what a command asks for (target_check: the
 * location resolved and judged, names free); the operations every target
 * has; and the rules for putting a backup on disk so that nothing half done
 * ever looks finished:
 *   - a new target is written under a hidden temporary name beside its final
 *     name (target_hidden_name), and appears under a name only through
 *     publish, once its data is durable (flush) — renamed without replacing
 *     anything, the directory synced;
 *   - a target updated in place (an incremental onto an earlier raw backup)
 *     journals the old content of every cluster before it is overwritten
 *     (journal.h), so close(keep=false) puts the earlier backup back;
 *   - a scratch target (a snapshot or fleecing store) lives in the state
 *     directory and is removed at close.
 * Life: create or open -> set_size (at the point in time) -> writes from any
 * number of threads -> flush -> [forget] -> [publish] -> close(keep) -> free.
 *
 * Locking: write, write_zeroes, discard and prepare_writes may run
 * concurrently on disjoint ranges; everything else runs on one thread with
 * no write in progress.
 * Errors: 0 or -errno; functions with an `err` buffer also fill a one-line
 * message.
 */
#ifndef FLEECEFS_TARGET_H
#define FLEECEFS_TARGET_H

#include <errno.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct target;
struct cbitmap;
struct journal_range;
struct strbuf;
struct shared_buffer;

enum target_format { FORMAT_RAW, FORMAT_QCOW2, FORMAT_NBD };

/* What a backup asks of its target, parsed from the command; target_check
 * fills `resolved`. Nothing outside the target modules looks inside a
 * location or decides how a format updates a backup. */
struct target_spec {
	enum target_format format;
	const char *location;        /* as given: an absolute path, or an NBD URI */
	const char *tls_certs;       /* NBD over TLS: certificates directory, or */
	const char *tls_psk;         /* a PSK file (NULL: libnbd's defaults) */
	bool in_place;               /* update the chain's last backup */
	bool incremental;            /* only the clusters of a bitmap */
	uint32_t cluster_size;       /* the job's copy cluster */
	bool checksum;               /* a manifest beside it */
	const char *backing;         /* backing= as given (NULL: the chain's) */
	int compress;                /* enum compress_kind */
	int compress_level;          /* 0: zstd's default */
	char resolved[PATH_MAX];     /* where it really is */
	/* A qcow2 incremental: the chain's last backup, which the new file
	 * reads through for every cluster it does not hold. */
	char backing_resolved[PATH_MAX];  /* "": none */
	enum target_format backing_format;
	uint64_t backing_size;       /* its virtual size */
};

/* Where a target may not be: inside the daemon's own mount, or in its
 * SOURCE_DIR (the mount would serve it as an image, which a guest could
 * open and write while a job writes it). */
struct target_limits {
	const char *mountpoint;
	dev_t mount_dev;             /* 0 if unknown */
	const char *source_dir;      /* NULL: not checked */
};

/* Flags of a write. */
#define TARGET_WRITE_GUEST_WAITS 1u  /* a guest write waits for this one: do the least work (no compression) */

struct target_ops {
	int (*write)(struct target *t, uint64_t off, const void *buf, size_t len, unsigned flags);
	/* The same, with buf inside `owner` (bufpool.h), which the target may
	 * hold for as long as it needs the bytes instead of copying them.
	 * NULL: write is used. */
	int (*write_shared)(struct target *t, uint64_t off, const void *buf, size_t len, unsigned flags,
			    struct shared_buffer *owner);
	/* Make [off, off + len) hold what the same range of the file open on
	 * src_fd holds by sharing its blocks (FICLONERANGE on a reflink file
	 * system: XFS with reflink, btrfs), nothing read or written. -EOPNOTSUPP,
	 * -EXDEV or -EINVAL when the file systems cannot (the caller copies
	 * instead). NULL: never. */
	int (*clone_range)(struct target *t, int src_fd, uint64_t off, uint64_t len);
	/* Make [off, off + len) read as zeroes (a hole where possible). */
	int (*write_zeroes)(struct target *t, uint64_t off, uint64_t len);
	/* Give back the space of [off, off + len) (its content is not needed
	 * any more). NULL: not supported. */
	int (*discard)(struct target *t, uint64_t off, uint64_t len);
	/* Called every TARGET_WRITEBACK_ROUND bytes written: waits until the
	 * previous call's writeback is on the disk, then starts writing back
	 * what was written since (target_file_writeback). A long copy overlaps
	 * its writeback instead of paying for it at the end, and keeps at most
	 * one round of it queued at the disk, ahead of the guest's own I/O. */
	void (*start_writeback)(struct target *t);
	/* Writes to these ranges come next: do, for all of them at once, what
	 * each write would otherwise do on its own before it lands (an in-place
	 * target journals the old content, with one sync). NULL: nothing. */
	int (*prepare_writes)(struct target *t, const struct journal_range *ranges, unsigned n);
	/* At the point in time: the target holds `size` bytes. */
	int (*set_size)(struct target *t, uint64_t size, char *err, size_t errlen);
	/* Everything written so far is durable. */
	int (*flush)(struct target *t);
	/* For status: key=value lines about where the target is (an NBD
	 * target: its server and the connection's state). NULL: none. */
	void (*describe)(struct target *t, struct strbuf *out);
	/* What error err of this target means, in its own words (a server's
	 * state), into buf; any thread. NULL: t->error or errno's text. */
	void (*explain)(struct target *t, int err, char *buf, size_t len);
	/* The clusters set in `left` did not (durably) get their new content:
	 * make them hold again what they held before the job (zeroes for a new
	 * file), durably. */
	int (*forget)(struct target *t, const struct cbitmap *left, unsigned cluster_bits);
	/* Gives the file the name `name`, never replacing anything (EEXIST),
	 * and makes the directory entry durable. */
	int (*publish)(struct target *t, const char *name, char *err, size_t errlen);
	/* The job is over. keep: what was written stays (an in-place target
	 * drops its journal). !keep: undo everything (a new file is removed, an
	 * updated one rolled back to its earlier content). */
	int (*close)(struct target *t, bool keep);
	void (*free)(struct target *t);
};

/* The rule for zero clusters is the target's: write_zeroes makes a range read
 * as zeroes; a new sparse file reads as zeroes where nothing was written and
 * does nothing, an updated file punches the range, a format over a backing
 * file must mask it (qcow2: zero clusters). The copy engine always asks. */
struct target {
	const struct target_ops *ops;
	char *path;          /* where the file is now */
	uint64_t size;
	/* Writes must cover whole units of this many bytes, aligned (a
	 * compressed qcow2 cluster is written whole); 0: any. */
	uint32_t write_unit;
	/* How many threads may write it at once to good effect (a compressing
	 * target: one per core, each compressing its own run); 0 or 1: one. */
	unsigned writers;
	bool published;      /* a new file has its final name (target_rename_file) */
	/* It does not start out reading as zeroes (an export): the holes a
	 * sync=top backup skips must be written as zeroes. */
	bool holes_need_zeroes;
	dev_t dev;           /* of the file, once open */
	ino_t ino;
	/* The first error a writeback round saw (target_file_writeback), 0:
	 * none. Waiting for a round consumes the file's writeback error, so
	 * fdatasync would no longer report it: the format's flush returns
	 * this instead. Set by the one thread that writes back, read by flush
	 * once the writes are done. */
	atomic_int writeback_error;
	/* The last error a format can say more about than errno (a server's
	 * answer); empty: errno says it. */
	char error[256];
};

/* A format: its checks and how it makes or reopens a target. */
struct target_format_ops {
	const char *name;
	/* How this format makes an incremental: by updating the chain's last
	 * backup in place (raw), or as a new file over it (qcow2). */
	bool incremental_in_place;
	/* Format-specific checks of a resolved spec (gates open). */
	int (*check)(const struct target_spec *spec, char *err, size_t errlen);
	/* A new target to be published as spec->resolved, written under the
	 * hidden name `temp`. */
	int (*create)(const struct target_spec *spec, const char *temp, struct target **out, char *err, size_t errlen);
	/* The chain's backup at `path`, the file (dev, ino), updated in place
	 * with the undo journal `journal` (spec: how to reach it, e.g. TLS). */
	int (*open_existing)(const struct target_spec *spec, const char *path, dev_t dev, ino_t ino,
			     const char *journal, uint32_t cluster_size,
			     struct target **out, char *err, size_t errlen);
	/* How large the disk is that the file open on fd holds (a backing file
	 * an incremental reads through). */
	int (*disk_size)(int fd, uint64_t *size, char *err, size_t errlen);
};

/* Is `location` an NBD URI (nbd://, nbd+unix://, nbds://, nbds+unix://)
 * rather than a path? */
bool target_is_nbd_uri(const char *location);

/* A connection to read the export `uri` (TLS files as URI parameters),
 * for readers of backups (reader.h). 0 or -errno with the server's answer. */
struct nbd_handle;
int target_nbd_connect_reader(const char *uri, struct nbd_handle **out, char *err, size_t errlen);
/* After a crash: applies the undo journal of an in-place incremental to the
 * export `uri` and flushes it (journal.h journal_recover). */
int target_nbd_recover(const char *uri, const char *tls_certs, const char *tls_psk, const char *journal_path,
		       char *err, size_t errlen);

/* The format's operations; NULL for one this version cannot write. */
const struct target_format_ops *target_format(enum target_format format);
/* Resolves spec->location into spec->resolved (its directory's real path and
 * its name; symlinks and ".." of the directory followed, never the last
 * component) and checks it: an existing directory, not inside the mount, and
 * for a new target nothing at its name or its manifest's, and no other job
 * writing it; not in SOURCE_DIR; then the format's own checks. EINVAL, ENOENT, ENOTDIR, EEXIST,
 * EOPNOTSUPP with a message (no "line N:": the caller says where). */
int target_check(struct target_spec *spec, const struct target_limits *limits, char *err, size_t errlen);
/* What the last failure of t was, as text (its own words, or errno's);
 * valid in this thread until its next call. */
const char *target_error_text(struct target *t, int err);

/* DIR/.NAME.fleecefs-PID-SERIAL.TAG for the file `path` (NAME cut to fit). */
int target_hidden_name(const char *path, uint64_t serial, const char *tag, char *out, size_t len);

/* The files a job (serial) keeps for its target `final` while it runs, and
 * the names it may end under: the target module decides where they are
 * (for the file formats: beside it). `data` is where the data file is while
 * the job runs (in place: the chain's backup; else `temp`). */
struct target_files {
	char temp[PATH_MAX];          /* a new target, until published */
	char manifest[PATH_MAX];      /* final's manifest (manifest.h) */
	char manifest_temp[PATH_MAX]; /* the manifest, until published */
	char journal[PATH_MAX];       /* the undo journal of an in-place update */
	char partial[PATH_MAX];       /* where a kept partial result goes */
};
/* 0 or -ENAMETOOLONG. in_place_file: the file updated in place, or NULL. */
int target_files_for(const char *final, const char *in_place_file, uint64_t serial, struct target_files *out);
/* Nothing at `name`? (Names are checked again right before publication: a
 * user may have put something there while the job ran.) 0, or -EEXIST with
 * "NAME appeared while the job ran" in what. */
int target_name_free(const char *name, char *what, size_t len);

/* A new raw target that will be published as `final_path`, created (size 0,
 * O_EXCL, mode 0600, never following a symlink) under `temp_path`. */
int target_raw_create(const char *final_path, const char *temp_path, struct target **out, char *err, size_t errlen);
/* A scratch file of `size` bytes (a snapshot store), read back soon and
 * removed at close: no early writeback, its pages stay cached. */
int target_raw_create_scratch(const char *path, uint64_t size, struct target **out, char *err, size_t errlen);
/* An earlier raw backup at `path` to update in place: it must be the file
 * (dev, ino) with no other link, and `journal_path` is created for it. */
int target_raw_open_in_place(const char *path, dev_t dev, ino_t ino, const char *journal_path, uint32_t cluster_size,
			     struct target **out, char *err, size_t errlen);

static inline int target_write(struct target *t, uint64_t off, const void *buf, size_t len, unsigned flags)
{
	return t->ops->write(t, off, buf, len, flags);
}
/* buf lies inside owner (NULL: a buffer of the caller's only). */
static inline int target_write_from(struct target *t, uint64_t off, const void *buf, size_t len, unsigned flags,
				    struct shared_buffer *owner)
{
	if (owner && t->ops->write_shared)
		return t->ops->write_shared(t, off, buf, len, flags, owner);
	return t->ops->write(t, off, buf, len, flags);
}
static inline int target_write_zeroes(struct target *t, uint64_t off, uint64_t len)
{
	return t->ops->write_zeroes(t, off, len);
}
static inline int target_clone_range(struct target *t, int src_fd, uint64_t off, uint64_t len)
{
	return t->ops->clone_range ? t->ops->clone_range(t, src_fd, off, len) : -EOPNOTSUPP;
}
static inline int target_discard(struct target *t, uint64_t off, uint64_t len)
{
	return t->ops->discard ? t->ops->discard(t, off, len) : 0;
}
static inline void target_start_writeback(struct target *t)
{
	if (t->ops->start_writeback)
		t->ops->start_writeback(t);
}
static inline int target_prepare_writes(struct target *t, const struct journal_range *ranges, unsigned n)
{
	return t->ops->prepare_writes ? t->ops->prepare_writes(t, ranges, n) : 0;
}
static inline int target_set_size(struct target *t, uint64_t size, char *err, size_t errlen)
{
	return t->ops->set_size(t, size, err, errlen);
}
static inline int target_flush(struct target *t) { return t->ops->flush(t); }
static inline void target_describe(struct target *t, struct strbuf *out)
{
	if (t->ops->describe)
		t->ops->describe(t, out);
}
static inline int target_forget(struct target *t, const struct cbitmap *left, unsigned cluster_bits)
{
	return t->ops->forget(t, left, cluster_bits);
}
static inline int target_publish(struct target *t, const char *name, char *err, size_t errlen)
{
	return t->ops->publish(t, name, err, errlen);
}
static inline int target_close(struct target *t, bool keep) { return t->ops->close(t, keep); }
void target_free(struct target *t);

/* For the formats: creates t->path (O_EXCL, mode 0600, never following a
 * symlink), fills t->dev and t->ino; `shown` names it in the message. */
int target_create_file(struct target *t, const char *shown, int *fd, char *err, size_t errlen);
/* For the formats' open_existing: opens the chain's backup at `path` for
 * writing (never following a symlink) and checks that it is the recorded
 * file (dev, ino), regular, with no other link (EINVAL, EMLINK). On error
 * *fd may be open (the caller closes it). */
struct stat;
int target_open_recorded(const char *path, dev_t dev, ino_t ino, int *fd, struct stat *st, char *err, size_t errlen);
/* How many bytes a copy writes between two start_writeback calls. Each
 * round is queued at the disk while the next is written: the guest's I/O
 * waits behind at most one round. 64 MiB rounds put 9-11 ms on a QD1 guest
 * write's p99.9 during a backup; 256 KiB rounds 1.3-2.7 ms, with the same
 * idle copy speed (bench/README.md, issue 15 point 4). */
#define TARGET_WRITEBACK_ROUND (256u << 10)

/* The file formats' start_writeback on their file: waits for the writeback
 * the previous call started (sync_file_range), drops those pages, which a
 * fresh backup does not need soon, and starts writing back the dirty ones.
 * A failed round is kept in t->writeback_error. */
void target_file_writeback(struct target *t, int fd);
/* For the formats' flush: the error of a failed writeback round, else
 * fdatasync's. 0 or -errno. */
int target_file_sync(struct target *t, int fd);
/* The formats' publish: renames the file to `name` (rename_noreplace), makes
 * t->path follow and sets t->published. */
int target_rename_file(struct target *t, const char *name, char *err, size_t errlen);

/* fsync the directory that holds path (so a new entry survives a crash). */
int fsync_parent_dir(const char *path);
/* Renames `from` to `to` without replacing an existing `to` (EEXIST), then
 * syncs the directory. */
int rename_noreplace(const char *from, const char *to);
/* Is this target path being written by a job now? Jobs claim their final
 * (and partial) names for their life; claim fails with -EEXIST when taken. */
int target_name_claim(const char *path);
void target_name_release(const char *path);
bool target_name_taken(const char *path);

#endif
