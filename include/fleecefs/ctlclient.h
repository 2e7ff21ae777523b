/* ctlclient: a client of a fleecefs mount through its control files only
 * (fleecectl): finding the mount, sending a transaction and reading its
 * answer on the same open file, reading status files, following events.
 *
 * Locking: none (one thread). Errors: 0 or -errno, with a one-line message
 * in `err` naming the mount or file.
 */
#ifndef FLEECEFS_CTLCLIENT_H
#define FLEECEFS_CTLCLIENT_H

#include <stdbool.h>
#include <stddef.h>

#include "fleecefs/util.h"

/* The mount to talk to: `given` (-m), else $FLEECE_MOUNT, else the only
 * fuse.fleecefs mount in /proc/self/mounts. -ENOENT: none found; -EINVAL:
 * several (the message lists them); -ENOTCONN: not a fleecefs mount. */
int ctl_find_mount(const char *given, char *out, size_t len, char *err, size_t errlen);

/* Sends `text` (one or more lines: one transaction) to MOUNT/.fleece/ctl in
 * one write and reads the answer back on the same open file into `answer`
 * (without its newline). Returns 0 when the daemon answered (see *refused:
 * the write failed with that errno, and the answer says why), -errno when
 * the control file could not be reached. */
int ctl_send(const char *mount, const char *text, char *answer, size_t len, int *refused, char *err,
	     size_t errlen);

/* Reads MOUNT/.fleece/REL whole into `out` (strbuf_free it). */
int ctl_read(const char *mount, const char *rel, struct strbuf *out);

/* The value of `key` in key=value lines (a status file), copied into buf;
 * NULL if absent. */
const char *ctl_value(const char *text, const char *key, char *buf, size_t len);
/* The same in an event line (key=value words; only a last error= may hold
 * blanks, and it is cut at the first). */
const char *ctl_event_value(const char *line, const char *key, char *buf, size_t len);

/* A word as the control language reads it: quoted when it holds blanks,
 * quotes or backslashes (appended to sb). */
void ctl_quote_word(struct strbuf *sb, const char *word);

/* Opens MOUNT/.fleece/events (events from now on); the fd, or -errno. */
int ctl_open_events(const char *mount);
/* Reads the next whole event line from fd into line (len bytes), waiting
 * at most timeout_ms (-1: forever). 1: a line; 0: timeout; -errno. Keeps
 * partial reads in `pending` (a strbuf owned by the caller). */
int ctl_next_event(int fd, struct strbuf *pending, int timeout_ms, char *line, size_t len);

#endif
