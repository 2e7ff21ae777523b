/* events: the daemon's event log behind .fleece/events.
 *
 * A ring of the last EVENTS_KEPT lines, each with a sequence number. A reader
 * remembers the next sequence it wants (from the moment it opened); a reader
 * that fell further behind than the ring gets one "event=overflow lost=N" line
 * instead of the lines it missed.
 * Locking: one mutex for the ring. The listener (set once at start-up, the
 * control file system) is called after every append without the lock held.
 * Errors: none; an event that cannot be formatted is truncated, never lost.
 */
#ifndef FLEECEFS_EVENTS_H
#define FLEECEFS_EVENTS_H

#include <stddef.h>
#include <stdint.h>

#define EVENTS_KEPT 4096
#define EVENT_LINE_MAX 512

/* Appends "time=<unix.ns> " + the formatted text + "\n". */
void events_emit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The sequence number the next event will get. */
uint64_t events_next_seq(void);
/* Copies the line with sequence *seq (or the overflow notice) into buf and
 * advances *seq; returns its length, or 0 when no such event exists yet. */
size_t events_read(uint64_t *seq, char *buf, size_t buflen);
void events_set_listener(void (*listener)(void));

#endif
