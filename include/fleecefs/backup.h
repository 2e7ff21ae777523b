/* backup: the backup job driver (copy-before-write + background copy).
 *
 * prepare (inside a transaction, with the image's gate closed and the
 * namespace lock held exclusively): sizes the job to the image as it is now,
 * which is the point in time T; creates the target and manifest; builds the
 * copy engine; attaches the before-write hook; spawns the job thread.
 * run: copy workers walk the pending clusters at the job's speed while guest
 * writes copy what they are about to overwrite (blockcopy.h); the job ends
 * completed once nothing is pending and the target and manifest are durable,
 * cancelled or failed otherwise (target and manifest removed).
 * Errors follow the job's policies (SPEC section 3): on-source-error and
 * on-target-error for the background copy and the write-behind queue
 * (report: fail; ignore: retry later; stop: pause with the error, retry on
 * resume), on-cbw-error and cbw-timeout for a guest write's copy
 * (break-snapshot: the write goes on, the job fails; break-guest-write: the
 * write fails with EIO, the job goes on).
 * Sources: the image itself (copy-before-write through the backup's own
 * hook), a snapshot view (frozen already: no hook), or, with fleecing=on, a
 * private snapstore taken at T whose copy-before-write goes to a local store;
 * the background copy reads that frozen image and gives back the store space
 * of what it has copied. sync=top copies only clusters with data at T;
 * sync=none copies nothing in the background and ends on `complete`.
 * Locking: see job.h and blockcopy.h; `broken` is atomic.
 * Errors: 0 or -errno with a one-line message.
 */
#ifndef FLEECEFS_BACKUP_H
#define FLEECEFS_BACKUP_H

#include <stddef.h>
#include <stdint.h>

struct ctl_backup;
struct image;
struct job;
struct job_group;
struct snapstore;

struct backup_params {
	const struct ctl_backup *cmd;
	struct image *image;       /* the image, or the one under the view */
	const char *image_path;    /* as the user named it, for status */
	uint32_t cluster_size;
	unsigned copy_workers;
	struct job_group *group;   /* NULL: none */
	/* A backup of a snapshot view: the snapshot job (referenced by the
	 * caller; the backup takes its own reference) and the view. */
	struct job *snapshot;
	struct snapstore *view;
	const char *state_dir;     /* for the fleecing store */
};

int backup_prepare(const struct backup_params *p, struct job **out, char *err, size_t errlen);

#endif
