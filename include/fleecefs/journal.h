/* journal: the undo log of a backup file (or NBD export) updated in place.
 *
 * An incremental onto an earlier raw backup overwrites some of its clusters.
 * Before any byte of a cluster changes, the cluster's old content is appended
 * to the journal and made durable (fdatasync), so the file can always be put
 * back as it was: by the job itself when it fails or is cancelled, and by the
 * next mount when a crash interrupted it (journal_recover).
 *
 * File layout (host byte order; the journal never leaves its machine):
 *   header   magic "FLEECEJ1", version, cluster size, file size, the file's
 *            st_dev and st_ino (a journal is applied only to its own file),
 *            then the XXH3-64 of all that
 *   records  { magic, flags (ZERO: the old content read as zeroes, no data
 *            follows), offset, length, XXH3-64 of the data, XXH3-64 of the
 *            fields before it } then the data
 * Records are appended under the lock and synced together: a record whose
 * fdatasync did not finish belongs to writes that never started, so a
 * recovery stops at the first record that is torn or damaged.
 *
 * A cluster is saved at most once per journal (`saved`); later writes to it
 * need no more saving. Rolling back writes saved clusters back, newest record
 * first (so the oldest content of a cluster would win), zero ones as holes.
 *
 * Locking: `lock` guards appending (offset and the record write); reads of
 * old content and fdatasync run outside it; `saved` bits are atomic and set
 * only after the record is durable.
 * Errors: 0 or -errno; the create/recover functions also fill a message.
 */
#ifndef FLEECEFS_JOURNAL_H
#define FLEECEFS_JOURNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "fleecefs/cbitmap.h"

struct journal;

struct journal_range {
	uint64_t off, len;
};

/* The file a journal protects, as the journal reads and restores it: a
 * local file through its descriptor, or an NBD export (target-nbd.c). All
 * four return 0 or -errno; read fills the whole buffer (zeroes past the
 * end); any thread may call them. */
struct journal_file {
	int (*read)(void *ctx, void *buf, uint64_t len, uint64_t off);
	int (*write)(void *ctx, const void *buf, uint64_t len, uint64_t off);
	int (*zero)(void *ctx, uint64_t off, uint64_t len);  /* reads as zeroes after */
	int (*sync)(void *ctx);                              /* all written is durable */
	void *ctx;
	uint64_t dev, ino;  /* its identity, recorded in the header */
};

/* Creates the journal file `path` (O_EXCL) for the file open on file_fd
 * (read and written through that descriptor), header durable. */
int journal_create(const char *path, int file_fd, uint64_t file_size, uint32_t cluster_size,
		   struct journal **out, char *err, size_t errlen);
/* The same for any journal_file (copied). */
int journal_create_on(const char *path, const struct journal_file *file, uint64_t file_size, uint32_t cluster_size,
		      struct journal **out, char *err, size_t errlen);
/* Saves the old content of every cluster overlapping the ranges that is not
 * saved yet; returns once it is durable. */
int journal_protect(struct journal *j, const struct journal_range *ranges, unsigned n);
/* Is every cluster of [off, off + len) saved already? (cheap, lock-free) */
bool journal_covers(const struct journal *j, uint64_t off, uint64_t len);
/* Writes the saved old content back into the file: all of it, or only the
 * clusters set in `only` (a bitmap of clusters); then fdatasync. */
int journal_rollback(struct journal *j, const struct cbitmap *only);
/* Closes the journal; with `remove`, unlinks it (and syncs its directory). */
int journal_close(struct journal *j, bool remove);
const char *journal_path(const struct journal *j);

/* After a crash: applies the journal at `path` to the file open on file_fd
 * (which must be the file it was made for) and fdatasyncs the file. The
 * journal itself is left for the caller to remove. -ENOENT: no journal. */
int journal_recover(const char *path, int file_fd, char *err, size_t errlen);
int journal_recover_on(const char *path, const struct journal_file *file, char *err, size_t errlen);

#endif
