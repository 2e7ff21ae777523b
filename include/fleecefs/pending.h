/* pending: what a running job has on disk outside the state directory, so
 * that the next mount can finish or undo what a crash interrupted.
 *
 * Every backup with a file target keeps a record, STATE_DIR/pending/PID-SERIAL,
 * key=value lines, replaced atomically (write_file_atomic) at each step:
 *   kind=new|in-place|nbd|nbd-in-place   a new file, an earlier backup updated
 *                           in place, a backup into an NBD export (file= its
 *                           URI; tls_certs= tls_psk= how to reach it)
 *   file=PATH               where the data file is while the job runs (new:
 *                           its hidden temporary name)
 *   dev= ino=               the data file, once it exists
 *   final=PATH              its name when the job completes
 *   partial=PATH            its name when a failed job keeps it as partial
 *   manifest_temp=PATH      the manifest being written (hidden name)
 *   manifest_old=PATH       the manifest it replaces (in place)
 *   journal=PATH            the undo journal (in place, journal.h)
 *   chain_file=PATH         the bitmap's chain record, if any
 *   decision=commit|partial the data and manifest are durable and the job
 *                           has decided what to keep: from here on a crash is
 *                           finished forwards, not undone
 *   chain.KEY=VALUE         the chain record to write with the decision
 * The record is written before the first file is created and removed after
 * the last step, so a crash at any moment leaves either nothing or a record.
 *
 * Recovery (pending_recover, at mount, before anything else runs): without a
 * decision everything is undone: temporary files removed, an in-place file
 * rolled back from its journal and put back under its name. With one, the
 * publication is redone: the data file and manifest renamed to their names,
 * the chain record written, the journal removed. Every step is idempotent.
 *
 * Locking: a record belongs to one job; the directory needs no lock.
 * Errors: 0 or -errno.
 */
#ifndef FLEECEFS_PENDING_H
#define FLEECEFS_PENDING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct pending;

/* Once at start (STATE_DIR/pending); 0 or -errno. */
int pending_setup(const char *state_dir);
/* Finishes or undoes what earlier runs left (see above); logs what it did. */
void pending_recover(const char *state_dir);

/* Is there a record of an in-place update of `final` that was neither
 * decided nor rolled back (its rollback failed; the next mount retries)?
 * Then `final` does not hold its earlier backup now. */
bool pending_names(const char *final);

/* A new record (in memory) for the job with this serial. */
struct pending *pending_new(uint64_t serial);
/* Sets KEY (replacing an earlier value; NULL value removes it). */
void pending_set(struct pending *p, const char *key, const char *value);
void pending_set_u64(struct pending *p, const char *key, uint64_t value);
/* The chain record lines to write with the decision ("" clears them). */
void pending_set_chain(struct pending *p, const char *text);
/* Writes the record durably. */
int pending_save(struct pending *p);
/* The job is over: removes the record (file and memory). */
void pending_finish(struct pending *p);
/* Frees the memory only (the file stays, for the next mount). */
void pending_free(struct pending *p);

#endif
