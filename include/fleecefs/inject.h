/* inject: deliberate errors and delays at chosen points of the copy path, for
 * tests and for users who reproduce a bug (in the spirit of QEMU's blkdebug).
 *
 * Rules are written to .fleece/inject, one per line, applied in order (one
 * write replaces nothing: each line adds a rule; "clear" removes every rule
 * so far, also those added by earlier lines of the same write):
 *
 *     POINT [offset=START-END] [once|every=N|from=N] [errno=NAME] [delay=MS]
 *
 *   POINT       source-read   a job reading the image (background copy,
 *                             copy-before-write, a mirror's copy)
 *               target-write  a backup or mirror writing its target (data or
 *                             zeroes; a write-blocking mirror's guest writes)
 *               store-write   a snapshot or fleecing store being written
 *               cbw           a guest write's copy-before-write, before it
 *                             starts (a delay here is a slow copy)
 *               truncate      an operation of the mount that shortens or
 *                             empties a file (O_TRUNC open or create,
 *                             truncate, fallocate collapse/insert), after
 *                             its check that no job runs on the file and
 *                             before it acts (offset: the new size)
 *               target-flush  a backup making its target durable at its end
 *                             (offset: the whole target)
 *               start         a command that starts jobs, once their files
 *                             and copy engines are made, before the gates
 *                             close for the point in time (offset: 0)
 *   offset=     the rule applies to operations overlapping [START, END)
 *               (sizes with K, M, G, T; END may be omitted: to the end)
 *   once        the first matching operation only (the default)
 *   every=N     the Nth, 2Nth, 3Nth, ... matching operation
 *   from=N      the Nth matching operation and every one after it
 *   errno=NAME  the error the operation fails with (EIO, ENOSPC, EROFS,
 *               EACCES, EPERM, ETIMEDOUT, EINVAL or a number); default EIO
 *               unless a delay alone is given
 *   delay=MS    sleep this long before the operation (then fail it too if
 *               errno= is given, else let it go on)
 *
 * Reading .fleece/inject lists the rules with how often each matched and fired.
 * Cost when no rule exists: one relaxed atomic load per operation, no lock.
 * Locking: rules_lock guards the rule list and counters; delays sleep outside it.
 * Errors: inject_apply returns 0 or -EINVAL/-ENOMEM with a one-line message.
 */
#ifndef FLEECEFS_INJECT_H
#define FLEECEFS_INJECT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

enum inject_point {
	INJECT_SOURCE_READ, INJECT_TARGET_WRITE, INJECT_CBW, INJECT_STORE_WRITE, INJECT_TRUNCATE, INJECT_TARGET_FLUSH,
	INJECT_START, INJECT_POINTS
};

extern atomic_bool inject_active;

int inject_fire(enum inject_point point, uint64_t off, uint64_t len);

/* 0, or the -errno an armed rule makes this operation fail with (after its
 * delay, if any). */
static inline int inject_check(enum inject_point point, uint64_t off, uint64_t len)
{
	if (__builtin_expect(!atomic_load_explicit(&inject_active, memory_order_relaxed), 1))
		return 0;
	return inject_fire(point, off, len);
}

/* Parses a write to .fleece/inject and applies it, all lines or none. */
int inject_apply(const char *text, size_t len, char *err, size_t errlen);
/* The rules as text (malloc'd). */
char *inject_describe(void);
/* Drops every rule (at exit). */
void inject_clear(void);

#endif
