/* transaction: executes one write to .fleece/ctl, all or nothing.
 *
 * 1. parse (control.h); 2. check every command against the current state
 *    (images exist and are regular files, ids are free, jobs exist and are in
 *    a state the verb allows) and refuse the whole write at the first problem;
 * 3. take the namespace lock exclusively and close the write gates of every
 *    image involved (draining guest writes in flight); prepare every job (a
 *    failure abandons the prepared ones and removes what they created);
 * 4. commit: the point in time T of every job in the write is this moment;
 *    then the gates reopen.
 * Locking: one control mutex serializes transactions (lock order: control
 * mutex, namespace lock, image gates in address order, job locks).
 * Errors: 0 or -errno; the answer text is "ok [id=JOB ...]" or
 * "error: <one line>", always newline-terminated, owned by the caller.
 */
#ifndef FLEECEFS_TRANSACTION_H
#define FLEECEFS_TRANSACTION_H

#include <stddef.h>

struct fleece_daemon;

int txn_execute(const struct fleece_daemon *d, const char *text, size_t len, char **answer);

#endif
