/* backup: the backup job driver (copy-before-write + background copy).
 *
 * stage (inside a transaction, before the gates close): the job is made, its
 * target names are claimed, a pending record (pending.h) is written, and the
 * target and manifest files are created under hidden names (or, for an
 * incremental, the chain's backup is opened in place with its journal).
 * Nothing of it depends on the point in time, and its file-system work does
 * not stall guests.
 * prepare (the image's gate closed and the namespace lock held exclusively:
 * this is the point in time T): sizes the job to the image as it is now,
 * freezes the bitmap, builds the copy engine, attaches the before-write hook,
 * spawns the job thread.
 * run: copy workers walk the pending clusters at the job's speed while guest
 * writes copy what they are about to overwrite (blockcopy.h). The end:
 *   completed  data and manifest durable, the decision recorded, the target
 *              published under its name (never replacing anything), the
 *              chain record written, then the bitmap's new bits;
 *   partial    (failed or cancelled with bitmap-mode=always) what did not
 *              reach the target is put back as it was before the job, the
 *              rest kept under TARGET.partial with a partial manifest and
 *              chain record; the next incremental with the bitmap completes
 *              it at its own point in time;
 *   otherwise  everything undone: a new target removed, an in-place one
 *              rolled back from its journal; the bitmap keeps its bits at T
 *              plus the writes since.
 * A crash at any moment is finished or undone by the next mount (pending.h).
 * Errors follow the job's policies (SPEC section 3): on-source-error and
 * on-target-error for the background copy and the write-behind queue
 * (report: fail; ignore: retry later; stop: pause with the error, retry on
 * resume), on-cbw-error and cbw-timeout for a guest write's copy
 * (break-snapshot: the write goes on, the job fails; break-guest-write: the
 * copy is written through to the target before the guest write is
 * acknowledged, and a failing copy fails the write with EIO, the job goes on).
 * Sources: the image itself (copy-before-write through the backup's own
 * hook), a snapshot view (frozen already: no hook), or, with fleecing=on, a
 * private snapstore taken at T whose copy-before-write goes to a local store;
 * the background copy reads that frozen image and gives back the store space
 * of what it has copied. sync=top skips the image's holes (found after T, on
 * the job thread); sync=none copies nothing in the background and ends on
 * `complete`.
 * Locking: see job.h and blockcopy.h; `broken` is atomic.
 * Errors: 0 or -errno with a one-line message.
 */
#ifndef FLEECEFS_BACKUP_H
#define FLEECEFS_BACKUP_H

#include <stddef.h>
#include <stdint.h>

#include "fleecefs/target.h"

struct chain_info;
struct ctl_backup;
struct image;
struct job;
struct job_group;
struct snapstore;

struct backup_params {
	const struct ctl_backup *cmd;
	struct image *image;       /* the image, or the one under the view */
	const char *image_path;    /* as the user named it, for status */
	const struct target_spec *target;  /* checked and resolved; its format is the job's */
	enum target_format source_format;  /* what the image's bytes are (status) */
	/* sync=incremental: the bitmap's chain record (the file updated in
	 * place and the name it ends up with). */
	const struct chain_info *chain;
	uint32_t cluster_size;
	unsigned copy_workers;
	struct job_group *group;   /* NULL: none */
	/* A backup of a snapshot view: the snapshot job (referenced by the
	 * caller; the backup takes its own reference) and the view. */
	struct job *snapshot;
	struct snapstore *view;
	const char *state_dir;     /* for the fleecing store */
};

/* Before the point in time; on failure nothing is left. */
int backup_stage(const struct backup_params *p, struct job **out, char *err, size_t errlen);
/* At the point in time; on failure the caller abandons the job (job.h). */
int backup_prepare(struct job *job, const struct backup_params *p, char *err, size_t errlen);

#endif
