/* bitmap: persistent, crash-safe dirty bitmaps of images.
 *
 * A dirty bitmap records which granules (granularity bytes, a power of two
 * not below the cluster size) of an image were written since it was added or
 * last reset. The bitmaps of one image form a set attached to the image as
 * its first before-write hook; a guest write sets the bits of its range (a
 * test before the atomic OR keeps shared cache lines quiet).
 *
 * Persistence, in STATE_DIR/bitmaps/DEV-INO/ (the image's inode, so a rename
 * through the mount changes nothing):
 *   image          key=value: the image's path, its identity (dev, ino,
 *                  size, mtime, ctime) and clean=1 after a clean stop
 *   NAME.bitmap    the bits and settings, replaced atomically (rename)
 *   NAME.frozen    the bits at T while a backup uses the bitmap
 *   NAME.chain     the backup its bits are relative to (struct chain_info)
 *   intent         the write-intent log (below)
 *
 * Crash safety, as Linux md's write-intent bitmap does it: the image is cut
 * into regions of REGION bytes. Before the first write into a region since
 * the last save, the region is recorded in `intent` and fdatasync'ed; the
 * fine bits are saved lazily (every SAVE_INTERVAL, at stops, after changes
 * by commands). After a crash, bits = last save ∪ every recorded region: it
 * may over-approximate, never miss a write that reached the image. A save
 * flips an epoch and waits for the writers of the old epoch, so every write
 * whose bit is not in the saved copy is covered by a region that stays
 * recorded until the next save.
 *
 * Identity: at a clean stop the image's identity is recorded; at mount a
 * different identity, a missing record, a missing image (or, after a crash,
 * a changed identity with nothing in the intent log) makes every bitmap of
 * the image state=inconsistent, and incremental backups refuse it.
 *
 * Locking: registry_lock guards the list of sets; set->lock guards a set's
 * bitmap list changes (made with the image's gate closed as well, so the
 * hook reads the list without a lock), each bitmap's settings and the intent
 * log. Bits are atomic (cbitmap.h).
 * Errors: 0 or -errno with a one-line message.
 */
#ifndef FLEECEFS_BITMAP_H
#define FLEECEFS_BITMAP_H

#include <limits.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fleecefs/cbitmap.h"
#include "fleecefs/util.h"

struct image;
struct job;
struct strbuf;
struct ctl_bitmap;

struct dirty_bitmap {
	char name[FLEECE_NAME_MAX + 1];
	uint64_t serial;            /* unique for the daemon's life (inodes) */
	uint64_t granularity;
	unsigned gran_bits;
	uint64_t size;              /* bytes of the image it covers */
	struct cbitmap bits;
	atomic_bool enabled;
	bool inconsistent;          /* set->lock */
	char why[160];              /* set->lock */
	uint64_t since_ns;          /* realtime: recording since */
	char busy_job[FLEECE_NAME_MAX + 1]; /* set->lock; "" when free */
	struct cbitmap frozen;      /* the bits at T while busy */
	struct dirty_bitmap *next;
};

struct bitmap_set;

/* Start-up: loads every set in STATE_DIR/bitmaps, checks identities,
 * recovers from a crash. */
int bitmaps_start(const char *state_dir, int source_fd, const char *source_dir, uint32_t cluster_size);
/* Then saves every SAVE_INTERVAL from a thread of its own: started once the
 * daemon is in the background (a fork keeps no thread but the caller's). */
void bitmaps_start_saver(void);
/* Clean stop: final save, identities recorded, clean=1. */
void bitmaps_stop(void);

/* The set of an image, or NULL (no bitmaps). Referenced by the registry for
 * the daemon's life; callers do not free it. */
struct bitmap_set *bitmaps_of(struct image *img);
struct dirty_bitmap *bitmap_find(struct bitmap_set *set, const char *name);

/* The transaction's bitmap commands, with the image's gate closed. */
int bitmap_check(struct image *img, const struct ctl_bitmap *cmd, char *err, size_t errlen);
int bitmap_apply(struct image *img, const struct ctl_bitmap *cmd, char *err, size_t errlen);

/* Backups. bitmap_job_check: may job use NAME (exists, not busy, and for
 * sync=incremental consistent)? bitmap_job_begin, at T with the gate
 * closed: the bits at T are frozen (and saved), the bitmap goes on recording
 * the writes after T, and is busy. bitmap_job_end applies bitmap-mode:
 * success: keep the writes after T (on-success, always) or add the frozen
 * bits back (never); failure: add the frozen bits back, unless the job kept
 * its partial result (bitmap-mode=always): then the granules it did not
 * copy (`left`, a cluster bitmap of the backup), pass NULL otherwise. Call it
 * only after the chain record describes the backup the new bits are relative
 * to: a crash in between then leaves bits that over-approximate. */
int bitmap_job_check(struct image *img, const char *name, bool need_consistent, char *err, size_t errlen);
int bitmap_job_begin(struct image *img, const char *name, const char *job_id, struct dirty_bitmap **out, char *err,
		     size_t errlen);
void bitmap_job_end(struct image *img, struct dirty_bitmap *bm, int mode, bool success, const struct cbitmap *left,
		    unsigned cluster_bits);
/* The chain record of a bitmap, NAME.chain: the backup its bits are
 * relative to. `target` is where that backup's file is; a partial backup
 * (bitmap-mode=always after a failure) is there under a .partial name and
 * gets `final` when an incremental completes it. */
struct chain_info {
	char target[PATH_MAX];
	char final[PATH_MAX];
	int partial;
	char format[16], sync[16];
	char job[FLEECE_NAME_MAX + 1];
	uint64_t time_ns, size, dev, ino;
	bool checksum;
};
/* The record as text (key=value lines), to write now or at recovery. */
void bitmap_chain_format(const struct chain_info *c, struct strbuf *out);
/* Where the record of bitmap NAME lives (for a pending record, pending.h). */
int bitmap_chain_path_by_name(struct image *img, const char *name, char *out, size_t len);
/* Replaces the record durably; 0 or -errno. */
int bitmap_chain_put(struct image *img, struct dirty_bitmap *bm, const char *text);
/* The record of bitmap NAME of the image; -ENOENT when there is none. */
int bitmap_chain_get(struct image *img, const char *name, struct chain_info *out);

/* .fleece/bitmaps: path of every image that has bitmaps, and status text. */
typedef void (*bitmap_visit_fn)(void *arg, const char *image_path, struct dirty_bitmap *bm);
void bitmaps_for_each(bitmap_visit_fn fn, void *arg);
/* Does the bitmap of this serial still exist? (No counting: stat and
 * lookup of its file ask this; only open builds the text.) */
bool bitmap_exists(uint64_t serial);
/* Status of the bitmap with this serial; -ENOENT when gone. */
int bitmap_status(uint64_t serial, struct strbuf *out);

#endif
