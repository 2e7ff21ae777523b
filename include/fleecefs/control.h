/* control: the command language of .fleece/ctl, parsed into typed requests.
 *
 * One write(2) is one transaction, unless begin/commit join several (below):
 * every non-empty line is one command (lines starting with '#' are
 * comments). Words are separated by blanks; a word may be double-quoted
 * ("a b", with \" and \\ inside) to hold blanks.
 * Positional arguments come first, then key=value options.
 *
 * This module only checks what can be checked from the text: syntax, value
 * ranges, names, path shapes and option combinations. Whether an image, job
 * or bitmap exists is for the executor (transaction.h).
 * Locking: none (pure functions). Errors: ctl_parse returns 0 or -errno
 * (-EINVAL for any bad input, -ENOMEM) with "line N: verb: what" in err.
 */
#ifndef FLEECEFS_CONTROL_H
#define FLEECEFS_CONTROL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fleecefs/target.h"

#define CTL_MAX_LINE 4096
#define CTL_MAX_IMAGES 64

enum ctl_verb {
	CTL_BACKUP, CTL_MIRROR, CTL_SNAPSHOT, CTL_RELEASE, CTL_BITMAP,
	CTL_CANCEL, CTL_PAUSE, CTL_RESUME, CTL_COMPLETE, CTL_DISMISS, CTL_SET,
};

enum backup_sync { SYNC_FULL, SYNC_TOP, SYNC_INCREMENTAL, SYNC_NONE };
enum bitmap_mode { BITMAP_MODE_ON_SUCCESS, BITMAP_MODE_ALWAYS, BITMAP_MODE_NEVER };
enum error_policy { POLICY_REPORT, POLICY_IGNORE, POLICY_STOP };
enum cbw_policy { CBW_BREAK_SNAPSHOT, CBW_BREAK_GUEST_WRITE };
enum compress_kind { COMPRESS_NONE, COMPRESS_ZSTD };
enum mirror_copy_mode { COPY_MODE_BACKGROUND, COPY_MODE_WRITE_BLOCKING };
enum bitmap_op { BITMAP_ADD, BITMAP_REMOVE, BITMAP_CLEAR, BITMAP_ENABLE, BITMAP_DISABLE, BITMAP_MERGE };

struct ctl_backup {
	const char *image, *target;
	enum backup_sync sync;
	enum target_format format;   /* format=, else from TARGET's suffix */
	bool format_given;
	const char *bitmap;          /* NULL: none */
	enum bitmap_mode bitmap_mode;
	bool bitmap_mode_given;
	const char *backing;         /* NULL: default */
	enum compress_kind compress;
	int compress_level;          /* 0 = zstd's default */
	bool checksum;               /* xxh3 manifest */
	uint64_t speed;              /* bytes/s, 0 = unlimited */
	enum error_policy on_source_error, on_target_error;
	enum cbw_policy on_cbw_error;
	uint64_t cbw_timeout_ms;     /* 0 = none */
	bool fleecing;
	uint64_t max_store;          /* 0 = no limit */
	const char *id;              /* NULL: job-N */
	const char *group;           /* NULL: none */
	const char *tls_certs;       /* nbds:// TARGET: certificates directory */
	const char *tls_psk;         /* nbds:// TARGET: PSK file */
	bool reflink;                /* reflink=auto: copies may share blocks (default off) */
};

struct ctl_mirror {
	const char *image, *target;
	enum backup_sync sync;       /* full or top */
	uint64_t speed;
	const char *id;
	enum mirror_copy_mode copy_mode;
	uint64_t granularity;        /* 0: the daemon's cluster size */
	enum error_policy on_source_error, on_target_error;
};

struct ctl_snapshot {
	const char *name;
	const char *images[CTL_MAX_IMAGES];
	unsigned nimages;
	uint64_t max_store;
	bool reflink;                /* reflink=auto (default off) */
};

struct ctl_bitmap {
	enum bitmap_op op;
	const char *image, *name;
	uint64_t granularity;        /* 0 = default */
	bool disabled;
	const char *sources[CTL_MAX_IMAGES];
	unsigned nsources;
};

/* cancel, pause, resume, complete, dismiss, set, release. */
struct ctl_target_id {
	const char *id;
	uint64_t speed;              /* set */
};

struct ctl_command {
	enum ctl_verb verb;
	unsigned line;
	union {
		struct ctl_backup backup;
		struct ctl_mirror mirror;
		struct ctl_snapshot snapshot;
		struct ctl_bitmap bitmap;
		struct ctl_target_id job;
	} u;
};

struct ctl_txn {
	struct ctl_command *cmds;
	unsigned ncmds;
	char **storage;              /* the words the commands point into */
	unsigned nstorage;
};

int ctl_parse(const char *text, size_t len, struct ctl_txn *txn, char *err, size_t errlen);
void ctl_txn_free(struct ctl_txn *txn);
const char *ctl_verb_name(enum ctl_verb verb);
const char *ctl_sync_name(enum backup_sync sync);
const char *ctl_format_name(enum target_format format);
/* The options that depend on the target's format, for `format` (the one
 * parsed, or the one a transaction settles on for the source). EINVAL with
 * a message (no "line N:"). */
int ctl_backup_check_format(const struct ctl_backup *b, enum target_format format, char *err, size_t errlen);

/* IMAGE paths: relative, no empty, "." or ".." components. */
bool ctl_image_path_is_valid(const char *path);

/* ---- one transaction over several writes: begin ... commit ----------------
 * Shells write one line per write(2). On one open ctl file, a write whose
 * first command is the line "begin" opens a transaction; the commands of that
 * write after it and of every later write on the file are added to it, each
 * checked at once (ctl_parse, numbered "line N" for the Nth command since
 * begin), until a write whose last command is "commit" runs them as one
 * transaction, or "abort" drops them. A write refused while a transaction is
 * open aborts it (the message says so): a script never commits less than it
 * wrote. Without begin, a write is a transaction of its own, as always.
 * Locking: none; the caller serializes the writes of one session.
 * Errors: ctl_session_feed returns 0 or -EINVAL (misplaced begin, commit or
 * abort, bad syntax), -EMSGSIZE (more than max bytes or max_lines commands)
 * or -ENOMEM, with a one-line message; on error no transaction is open. */
#define CTL_SESSION_MAX (16u << 20)
/* As many as one write of the shortest commands can hold: the executor costs
 * about 1 KiB per command, so 16 MiB of them would cost gigabytes. */
#define CTL_SESSION_MAX_COMMANDS 131072u

struct ctl_session {
	bool open;
	char *text;                  /* the commands since begin, one per line */
	size_t len, cap;
	unsigned lines;              /* commands in text */
	size_t max;                  /* most bytes of text; 0: CTL_SESSION_MAX */
	unsigned max_lines;          /* most commands; 0: CTL_SESSION_MAX_COMMANDS */
};

enum ctl_feed_action {
	CTL_FEED_RUN,                /* no transaction open: run this write itself */
	CTL_FEED_APPENDED,           /* begin, or commands added: answer "ok" */
	CTL_FEED_COMMIT,             /* run text (len bytes) as one transaction, then ctl_session_end */
	CTL_FEED_ABORTED,            /* abort: dropped, answer "ok" */
};

int ctl_session_feed(struct ctl_session *s, const char *buf, size_t len, enum ctl_feed_action *action, char *err,
		     size_t errlen);
/* Drops the transaction, if one is open (true then), and its text. */
bool ctl_session_end(struct ctl_session *s);

#endif
