/* mirror: the mirror job driver (copy an image to a new file while the guest
 * runs, keep it in sync, switch the image over to it).
 *
 * State: `dirty` (set = the cluster may differ between the image and the
 * target). The copy clears a run's bits, then reads the image, then writes
 * the target; a guest write sets the bits of its range after it reached the
 * image (after-write hook). So for every cluster, either its bit is set, or
 * the last copy of it read the image after the last guest write to it had
 * landed: when no bit is set and no copy is in flight, the target equals the
 * image. Setting bits is always safe, which is why the first pass needs no
 * work with the gate closed: the job thread sets every cluster (sync=full)
 * or those of the image's data extents (sync=top; a hole filled meanwhile
 * was set by its writer) after the start.
 *
 * Copy modes. background: guest writes only set bits; the copy follows them
 * (ready = the first pass is done and nothing is dirty; the job stays ready
 * while later writes are copied soon after). write-blocking: a guest write
 * claims its clusters (before-write) and, if none of them is dirty, writes its
 * data to the target too before it is acknowledged (after-write), else
 * leaves them dirty; the copy claims the runs it copies, so the two never
 * interleave on a cluster, and clusters in sync stay in sync at any write
 * rate. A failing target write of a guest leaves its clusters dirty (the
 * job's on-target-error decides); the guest write itself succeeds.
 *
 * The end, each time with the gate closed so that no guest write is in
 * flight: what is dirty is copied, the target made durable.
 *   complete   (ready only) TARGET is published (renamed from its hidden
 *              name, without replacing anything), the switch is recorded
 *              durably (redirect.h), then the image's backend becomes
 *              TARGET (image_switch_locked): every handle's next request,
 *              buffered or O_DIRECT, goes there; bitmaps, hooked on the
 *              image object, go on tracking.
 *   cancel     before ready: TARGET removed (cancelled). After ready: TARGET
 *              kept as a copy of the image at the cancel (completed), the
 *              mount stays on IMAGE. Unmount cancels.
 *   failure    TARGET removed.
 * While the mirror runs the image is busy (no unlink, rename over, truncate)
 * and writes past its end fail with EFBIG (its size is the mirror's).
 * Locking: claim_lock guards `claimed` (write-blocking only); dirty bits are
 * atomic (cbitmap.h); counters are atomics; job.h for the rest. The job
 * thread closes the image's gate itself (lock order: gate close_mutex, then
 * job locks; it takes no namespace or control lock).
 * Errors: 0 or -errno with a one-line message.
 */
#ifndef FLEECEFS_MIRROR_H
#define FLEECEFS_MIRROR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct ctl_mirror;
struct image;
struct job;
struct target_spec;

struct mirror_params {
	const struct ctl_mirror *cmd;
	struct image *image;
	const char *image_path;        /* as the user named it */
	dev_t source_dev;              /* the name's file in SOURCE_DIR (the */
	ino_t source_ino;              /* redirect's key) */
	const struct target_spec *target;  /* checked and resolved, raw */
	uint32_t cluster_size;         /* granularity */
};

/* Before the gates close: the job and its target file (hidden name). */
int mirror_stage(const struct mirror_params *p, struct job **out, char *err, size_t errlen);
/* Gates closed: hooks the image and starts the thread. */
int mirror_prepare(struct job *job, const struct mirror_params *p, char *err, size_t errlen);
bool job_is_mirror(const struct job *job);
/* Is a mirror running on img (its id into id, if any)? */
bool mirror_of_image(struct image *img, char *id, size_t len);
/* complete of a mirror: EBUSY naming another job that uses its image. */
int mirror_check_complete(struct job *job, char *err, size_t errlen);
/* Has `complete` been accepted for a mirror of img (no new job may start on
 * it then)? Its id into id. */
bool mirror_completing(struct image *img, char *id, size_t len);

#endif
