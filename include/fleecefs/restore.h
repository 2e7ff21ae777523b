/* restore: writes the disk of one backup point (a raw backup, or the top of
 * a raw/qcow2 chain) into DEST, checking every cluster against the
 * backup's manifest on the way (fleecectl restore).
 *
 * A new DEST is written under a hidden name beside it and renamed into place
 * only when every cluster checked out and the file is durable, so a bad
 * backup leaves no DEST at all; clusters that read as zeroes stay holes. An
 * existing DEST (an image through the mount, say) is overwritten only when
 * `overwrite` is set and no process has it open, and only after a first
 * pass has checked the whole backup; it is then written in place (zero
 * clusters punched) and sized to the backup.
 *
 * Locking: none (one call, one thread). Returns an enum restore_result;
 * messages go to `errs`, the summary to `out`.
 */
#ifndef FLEECEFS_RESTORE_H
#define FLEECEFS_RESTORE_H

#include <stdbool.h>
#include <stdio.h>

enum restore_result {
	RESTORE_OK = 0,
	RESTORE_DAMAGED = 1,    /* a cluster did not match: nothing restored */
	RESTORE_CANNOT = 2,     /* no manifest, DEST in the way or busy, I/O errors */
};

enum restore_result restore_backup(const char *backup, const char *dest, bool overwrite, FILE *out, FILE *errs);

#endif
