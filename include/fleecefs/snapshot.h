/* snapshot: the `snapshot NAME IMAGE...` job and its views.
 *
 * One snapshot freezes several images at one point in time (the transaction
 * closes all their gates): each image gets a snapstore (snapstore.h) under
 * STATE_DIR/snapshots/NAME/. The views .fleece/snapshots/NAME/IMAGE (IMAGE
 * as named in the command, subdirectories included) read the images as they
 * were at T. The job (type=snapshot, id=NAME) runs until `release NAME`,
 * which frees the stores and removes the job and its views at once. When a
 * store cannot grow or a copy fails, the snapshot fails: all its stores are
 * freed, the guest goes on, the views stay listed but every read answers
 * EACCES until `release`. A view read by a backup (a view is a valid IMAGE
 * for backup) cannot be released until that backup concludes.
 *
 * Locking: the member and directory tables are built in stage and constant
 * afterwards; `users` is atomic. Callers hold a job reference (job.h) for as
 * long as they use a snapshot's members.
 * Errors: 0 or -errno with a one-line message.
 */
#ifndef FLEECEFS_SNAPSHOT_H
#define FLEECEFS_SNAPSHOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ctl_snapshot;
struct image;
struct job;
struct snapstore;

struct snapshot_params {
	const struct ctl_snapshot *cmd;
	struct image **images;      /* one per cmd->images[i] */
	const char *state_dir;
	uint32_t cluster_size;
};

/* With the gates open: the job, its directory and its stores, sized as the
 * images are now; nothing copies yet. */
int snapshot_stage(const struct snapshot_params *p, struct job **out, char *err, size_t errlen);
/* With the gates closed (this is T): the stores take the images' state at
 * T and start copying before writes. On failure the caller abandons the
 * job (which detaches what was attached). */
int snapshot_prepare(struct job *job, char *err, size_t errlen);
bool job_is_snapshot(const struct job *job);
/* Ends a snapshot (running or concluded) and dismisses it; EBUSY while a
 * backup reads one of its views. Waits until the stores are gone. */
int snapshot_release(struct job *job, char *err, size_t errlen);
int snapshot_check_release(struct job *job, char *err, size_t errlen);

/* The view tree. Directory 0 is .fleece/snapshots/NAME itself. */
typedef void (*snapshot_entry_fn)(void *arg, const char *name, bool is_dir, unsigned index);
void snapshot_list(struct job *job, unsigned dir, snapshot_entry_fn fn, void *arg);
/* 0 and *is_dir, *index; or -ENOENT. */
int snapshot_lookup(struct job *job, unsigned dir, const char *name, bool *is_dir, unsigned *index);
bool snapshot_has_dir(struct job *job, unsigned dir);
struct snapstore *snapshot_member(struct job *job, unsigned index);  /* NULL if none */
/* The member named by an image path (for `backup .fleece/snapshots/...`). */
struct snapstore *snapshot_member_by_path(struct job *job, const char *path);
/* A backup (named `user`) starts or stops reading one of the views. */
void snapshot_use(struct job *job, const char *user, bool start);

#endif
