/* redirect: images served from another file since a mirror switched them.
 *
 * A completed mirror leaves the image's file in SOURCE_DIR untouched under
 * its name and serves MOUNTPOINT/IMAGE from TARGET from then on, also after
 * a remount. This table says which source files (st_dev, st_ino: the name's
 * inode, whatever renames happen through the mount) are served from where,
 * and keeps it durably in STATE_DIR/redirects (replaced atomically, the
 * directory synced) before the switch happens, so that a remount never
 * serves the stale old file.
 *
 * Record: blocks of key=value lines separated by an empty line:
 *   source=DEV:INO   the file in SOURCE_DIR the mount names IMAGE
 *   served=DEV:INO   the file it is served from (TARGET)
 *   image=PATH       IMAGE's path below SOURCE_DIR at the switch (display)
 *   target=PATH      TARGET's absolute path
 * At load each target is opened (O_PATH, never following a symlink) and
 * checked to be the recorded regular file; one that is missing or another
 * file is kept in the table as `missing`: the image then answers EIO rather
 * than serving the old file, and .fleece/redirects says why.
 *
 * Locking: one rwlock (a leaf); lookups with an empty table take no lock.
 * The O_PATH descriptors belong to the table and live until redirect_free_all
 * or until their record is replaced or removed (callers get a dup).
 * Errors: 0 or -errno, with a one-line message where there is a buffer.
 */
#ifndef FLEECEFS_REDIRECT_H
#define FLEECEFS_REDIRECT_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct stat;
struct strbuf;

/* Loads STATE_DIR/redirects (a missing file is an empty table). */
int redirect_load(const char *state_dir, char *err, size_t errlen);
/* Records durably that the source file (dev, ino), named `image_path`, is
 * served from the file open on target_fd, `target_path`, replacing an
 * earlier record of that source. */
int redirect_add(dev_t dev, ino_t ino, const char *image_path, int target_fd, const char *target_path, char *err,
		 size_t errlen);
/* The source file (dev, ino) is gone (its last name unlinked through the
 * mount): its record goes (TARGET itself is left alone). */
void redirect_remove(dev_t dev, ino_t ino);
/* Is (dev, ino) served from elsewhere? -ENOENT: no. Else a new O_PATH
 * descriptor of the file it is served from (the caller closes it), or -EIO
 * when that file is missing. */
int redirect_open(dev_t dev, ino_t ino);
/* fstat of the file (dev, ino) is served from: 0, -ENOENT (not
 * redirected) or -EIO (missing). One syscall, no descriptor made. */
int redirect_stat(dev_t dev, ino_t ino, struct stat *st);
/* The served file's identity for (dev, ino), if redirected (true). */
bool redirect_served_id(dev_t dev, ino_t ino, dev_t *served_dev, ino_t *served_ino);
/* The source file a record serves from (served_dev, served_ino), if any. */
bool redirect_source_of(dev_t served_dev, ino_t served_ino, dev_t *dev, ino_t *ino);
/* .fleece/redirects: one line per record. */
void redirect_format(struct strbuf *out);
void redirect_free_all(void);

#endif
