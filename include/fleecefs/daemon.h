/* daemon: the settings and handles of one mounted fleecefs, set up by main
 * before the session starts and read-only afterwards (no locking needed).
 */
#ifndef FLEECEFS_DAEMON_H
#define FLEECEFS_DAEMON_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define FLEECE_DEFAULT_CLUSTER_SIZE (64u << 10)
#define FLEECE_CONTROL_DIR ".fleece"
/* Background copy threads per job: threads/16, between 1 and this. */
#define FLEECE_MAX_COPY_WORKERS 4

struct fleece_daemon {
	char *source_dir;        /* absolute */
	int source_fd;           /* O_PATH directory */
	char *mountpoint;        /* absolute */
	dev_t mount_dev;         /* st_dev of files in our mount, 0 if unknown */
	char *state_dir;         /* absolute */
	dev_t state_dev;         /* hidden from the mount */
	ino_t state_ino;
	uint32_t cluster_size;
	unsigned threads;        /* FUSE workers */
	unsigned copy_workers;   /* background copy threads per job */
	uid_t owner_uid;         /* who mounted: owns .fleece */
	gid_t owner_gid;
	uint64_t started_ns;
};

#endif
