/* control: see include/fleecefs/control.h */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleecefs/control.h"
#include "fleecefs/util.h"

#define MAX_WORDS 80

struct words {
	char *argv[MAX_WORDS];
	unsigned argc;
};

/* Where a parse error is reported. */
struct where {
	unsigned line;
	const char *verb;
	char *err;
	size_t errlen;
};

static int fail(const struct where *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(const struct where *w, const char *fmt, ...)
{
	char what[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	if (w->verb)
		return set_error(w->err, w->errlen, EINVAL, "line %u: %s: %s", w->line, w->verb, what);
	return set_error(w->err, w->errlen, EINVAL, "line %u: %s", w->line, what);
}

const char *ctl_verb_name(enum ctl_verb verb)
{
	static const char *const names[] = { "backup", "mirror", "snapshot", "release", "bitmap", "cancel",
					     "pause", "resume", "complete", "dismiss", "set" };
	return names[verb];
}

const char *ctl_sync_name(enum backup_sync sync)
{
	static const char *const names[] = { "full", "top", "incremental", "none" };
	return names[sync];
}

const char *ctl_format_name(enum target_format format)
{
	return format == FORMAT_QCOW2 ? "qcow2" : format == FORMAT_NBD ? "nbd" : "raw";
}

bool ctl_image_path_is_valid(const char *path)
{
	if (!path || !*path || *path == '/' || strlen(path) >= PATH_MAX)
		return false;
	for (const char *p = path; *p;) {
		const char *slash = strchr(p, '/');
		size_t n = slash ? (size_t)(slash - p) : strlen(p);
		if (n == 0 || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
			return false;
		if (!slash)
			break;
		p = slash + 1;
		if (!*p)
			return false; /* trailing slash */
	}
	return true;
}

static bool target_path_is_valid(const char *path)
{
	size_t n = strlen(path);
	return path[0] == '/' && n > 1 && n < PATH_MAX && path[n - 1] != '/';
}

/* Splits one line into words, in place. Quotes group, backslash escapes
 * inside quotes. */
static int split_words(char *line, struct words *out, const struct where *w)
{
	char *src = line, *dst = line;

	out->argc = 0;
	for (;;) {
		while (*src == ' ' || *src == '\t' || *src == '\r')
			src++;
		if (!*src)
			return 0;
		if (out->argc == MAX_WORDS)
			return fail(w, "too many words (at most %d)", MAX_WORDS);
		out->argv[out->argc++] = dst;
		bool quoted = false;
		for (; *src; src++) {
			if (quoted) {
				if (*src == '"') {
					quoted = false;
				} else if (*src == '\\' && (src[1] == '"' || src[1] == '\\')) {
					*dst++ = *++src;
				} else {
					*dst++ = *src;
				}
			} else if (*src == '"') {
				quoted = true;
			} else if (*src == ' ' || *src == '\t' || *src == '\r') {
				break;
			} else {
				*dst++ = *src;
			}
		}
		if (quoted)
			return fail(w, "unterminated quote");
		bool end = !*src;
		*dst++ = '\0';
		if (end)
			return 0;
		src++;
	}
}

/* ---- option values ------------------------------------------------------ */

struct choice {
	const char *name;
	int value;
};

static int parse_choice(const struct where *w, const char *key, const char *value,
			const struct choice *choices, int *out)
{
	char known[256] = "";

	for (const struct choice *c = choices; c->name; c++) {
		if (strcmp(value, c->name) == 0) {
			*out = c->value;
			return 0;
		}
		snprintf(known + strlen(known), sizeof(known) - strlen(known), "%s%s",
			 c == choices ? "" : ", ", c->name);
	}
	return fail(w, "%s=%s: expected one of %s", key, value, known);
}

static int parse_size_option(const struct where *w, const char *key, const char *value, uint64_t *out)
{
	int rc = parse_size(value, out);
	if (rc == -ERANGE)
		return fail(w, "%s=%s: too large", key, value);
	if (rc)
		return fail(w, "%s=%s: not a size (digits with an optional K, M, G or T)", key, value);
	return 0;
}

static int parse_name_option(const struct where *w, const char *what, const char *value, const char **out)
{
	if (!name_is_valid(value))
		return fail(w, "%s '%s': names are 1 to 64 characters of A-Z a-z 0-9 . _ - and do not start with '.'",
			    what, value);
	*out = value;
	return 0;
}

static int parse_image_arg(const struct where *w, const char *value, const char **out)
{
	if (!ctl_image_path_is_valid(value))
		return fail(w, "IMAGE '%s': must be a path relative to the mount root, without '.' or '..' or empty components",
			    value);
	*out = value;
	return 0;
}

static int parse_target_arg(const struct where *w, const char *what, const char *value, const char **out)
{
	if (!target_path_is_valid(value))
		return fail(w, "%s '%s': must be an absolute path to a file", what, value);
	*out = value;
	return 0;
}

/* key=value splitting with duplicate detection over a key table. */
static int split_option(const struct where *w, char *word, const char *const *keys, uint64_t *seen,
			unsigned *index, const char **value)
{
	char *eq = strchr(word, '=');
	char known[512] = "";

	if (!eq) {
		for (unsigned i = 0; keys[i]; i++)
			snprintf(known + strlen(known), sizeof(known) - strlen(known), "%s%s", i ? ", " : "", keys[i]);
		return fail(w, "unexpected argument '%s' (options are key=value: %s)", word, known);
	}
	*eq = '\0';
	for (unsigned i = 0; keys[i]; i++) {
		if (strcmp(word, keys[i]) != 0)
			continue;
		if (*seen & (1ull << i))
			return fail(w, "option %s given twice", word);
		*seen |= 1ull << i;
		*index = i;
		*value = eq + 1;
		if (!**value)
			return fail(w, "option %s has an empty value", word);
		return 0;
	}
	for (unsigned i = 0; keys[i]; i++)
		snprintf(known + strlen(known), sizeof(known) - strlen(known), "%s%s", i ? ", " : "", keys[i]);
	return fail(w, "unknown option '%s' (known: %s)", word, known);
}

static bool has_suffix(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);
	return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* ---- verbs -------------------------------------------------------------- */

static const struct choice sync_choices[] = {
	{ "full", SYNC_FULL }, { "top", SYNC_TOP }, { "incremental", SYNC_INCREMENTAL }, { "none", SYNC_NONE }, { 0 }
};
static const struct choice format_choices[] = { { "raw", FORMAT_RAW }, { "qcow2", FORMAT_QCOW2 }, { 0 } };
static const struct choice bitmap_mode_choices[] = {
	{ "on-success", BITMAP_MODE_ON_SUCCESS }, { "always", BITMAP_MODE_ALWAYS }, { "never", BITMAP_MODE_NEVER }, { 0 }
};
static const struct choice policy_choices[] = {
	{ "report", POLICY_REPORT }, { "ignore", POLICY_IGNORE }, { "stop", POLICY_STOP }, { 0 }
};
static const struct choice cbw_choices[] = {
	{ "break-snapshot", CBW_BREAK_SNAPSHOT }, { "break-guest-write", CBW_BREAK_GUEST_WRITE }, { 0 }
};
static const struct choice checksum_choices[] = { { "xxh3", 1 }, { "none", 0 }, { 0 } };
static const struct choice on_off_choices[] = { { "on", 1 }, { "off", 0 }, { 0 } };
static const struct choice reflink_choices[] = { { "auto", 1 }, { "off", 0 }, { 0 } };
static const struct choice copy_mode_choices[] = {
	{ "background", COPY_MODE_BACKGROUND }, { "write-blocking", COPY_MODE_WRITE_BLOCKING }, { 0 }
};

static int parse_compress(const struct where *w, const char *value, struct ctl_backup *b)
{
	uint64_t level;

	if (strcmp(value, "none") == 0) {
		b->compress = COMPRESS_NONE;
		return 0;
	}
	if (strcmp(value, "zstd") == 0) {
		b->compress = COMPRESS_ZSTD;
		return 0;
	}
	if (strncmp(value, "zstd:", 5) == 0 && parse_u64(value + 5, &level) == 0 && level >= 1 && level <= 19) {
		b->compress = COMPRESS_ZSTD;
		b->compress_level = (int)level;
		return 0;
	}
	return fail(w, "compress=%s: expected none, zstd or zstd:LEVEL with LEVEL 1 to 19", value);
}

enum backup_key {
	BK_SYNC, BK_FORMAT, BK_BITMAP, BK_BITMAP_MODE, BK_BACKING, BK_COMPRESS, BK_CHECKSUM, BK_SPEED,
	BK_ON_SOURCE_ERROR, BK_ON_TARGET_ERROR, BK_ON_CBW_ERROR, BK_CBW_TIMEOUT, BK_FLEECING, BK_MAX_STORE,
	BK_ID, BK_GROUP, BK_TLS_CERTS, BK_TLS_PSK, BK_REFLINK,
};
static const char *const backup_keys[] = {
	"sync", "format", "bitmap", "bitmap-mode", "backing", "compress", "checksum", "speed",
	"on-source-error", "on-target-error", "on-cbw-error", "cbw-timeout", "fleecing", "max-store",
	"id", "group", "tls-certs", "tls-psk", "reflink", NULL,
};

/* One key=value option of backup into b. */
static int parse_backup_option(const struct where *w, enum backup_key key, const char *v, struct ctl_backup *b)
{
	const char *k = backup_keys[key];
	int rc = 0, choice = 0;

	switch (key) {
	case BK_SYNC:
		rc = parse_choice(w, k, v, sync_choices, &choice);
		b->sync = (enum backup_sync)choice;
		break;
	case BK_FORMAT:
		rc = parse_choice(w, k, v, format_choices, &choice);
		b->format = (enum target_format)choice;
		b->format_given = true;
		break;
	case BK_BITMAP:
		rc = parse_name_option(w, "bitmap", v, &b->bitmap);
		break;
	case BK_BITMAP_MODE:
		rc = parse_choice(w, k, v, bitmap_mode_choices, &choice);
		b->bitmap_mode = (enum bitmap_mode)choice;
		b->bitmap_mode_given = true;
		break;
	case BK_BACKING:
		rc = parse_target_arg(w, "backing", v, &b->backing);
		break;
	case BK_COMPRESS:
		rc = parse_compress(w, v, b);
		break;
	case BK_CHECKSUM:
		rc = parse_choice(w, k, v, checksum_choices, &choice);
		b->checksum = choice;
		break;
	case BK_SPEED:
		rc = parse_size_option(w, k, v, &b->speed);
		break;
	case BK_ON_SOURCE_ERROR:
		rc = parse_choice(w, k, v, policy_choices, &choice);
		b->on_source_error = (enum error_policy)choice;
		break;
	case BK_ON_TARGET_ERROR:
		rc = parse_choice(w, k, v, policy_choices, &choice);
		b->on_target_error = (enum error_policy)choice;
		break;
	case BK_ON_CBW_ERROR:
		rc = parse_choice(w, k, v, cbw_choices, &choice);
		b->on_cbw_error = (enum cbw_policy)choice;
		break;
	case BK_CBW_TIMEOUT:
		rc = parse_u64(v, &b->cbw_timeout_ms) ? fail(w, "cbw-timeout=%s: expected milliseconds", v) : 0;
		break;
	case BK_FLEECING:
		rc = parse_choice(w, k, v, on_off_choices, &choice);
		b->fleecing = choice;
		break;
	case BK_MAX_STORE:
		rc = parse_size_option(w, k, v, &b->max_store);
		break;
	case BK_ID:
		rc = parse_name_option(w, "id", v, &b->id);
		break;
	case BK_GROUP:
		rc = parse_name_option(w, "group", v, &b->group);
		break;
	case BK_TLS_CERTS:
		rc = parse_target_arg(w, "tls-certs", v, &b->tls_certs);
		break;
	case BK_TLS_PSK:
		rc = parse_target_arg(w, "tls-psk", v, &b->tls_psk);
		break;
	case BK_REFLINK:
		rc = parse_choice(w, k, v, reflink_choices, &choice);
		b->reflink = choice;
		break;
	}
	return rc;
}

/* Combinations, checked the way QEMU checks its backup arguments. */
static int check_backup_options(const struct where *w, const struct ctl_backup *b, uint64_t seen)
{
	if (b->sync == SYNC_INCREMENTAL && !b->bitmap)
		return fail(w, "sync=incremental needs bitmap=NAME");
	if (b->bitmap_mode_given && !b->bitmap)
		return fail(w, "bitmap-mode needs bitmap=NAME");
	if (b->sync == SYNC_NONE && b->bitmap)
		return fail(w, "sync=none cannot use a bitmap");
	if ((seen & (1ull << BK_MAX_STORE)) && !b->fleecing)
		return fail(w, "max-store applies only with fleecing=on");
	if (b->fleecing && b->sync == SYNC_NONE)
		return fail(w, "fleecing=on needs a background copy (sync=none has none)");
	char why[256];
	return ctl_backup_check_format(b, b->format, why, sizeof(why)) ? fail(w, "%s", why) : 0;
}

int ctl_backup_check_format(const struct ctl_backup *b, enum target_format format, char *err, size_t errlen)
{
	if (b->compress != COMPRESS_NONE && format != FORMAT_QCOW2)
		return set_error(err, errlen, EINVAL, "compress needs format=qcow2 (raw targets are not compressed)");
	if (b->backing && !(format == FORMAT_QCOW2 && b->sync == SYNC_INCREMENTAL))
		return set_error(err, errlen, EINVAL, "backing= applies only to sync=incremental with format=qcow2");
	if (format == FORMAT_QCOW2 && b->sync == SYNC_NONE)
		return set_error(err, errlen, EINVAL,
				 "sync=none cannot write qcow2 (it copies only what guests overwrite; use a raw target, or "
				 "fleecing=on with sync=full)");
	return 0;
}

static int parse_backup(const struct where *w, struct words *words, struct ctl_backup *b)
{
	uint64_t seen = 0;
	int rc;

	*b = (struct ctl_backup){ .checksum = true };
	if (words->argc < 3)
		return fail(w, "usage: backup IMAGE TARGET [key=value ...]");
	bool nbd = target_is_nbd_uri(words->argv[2]);
	if ((rc = parse_image_arg(w, words->argv[1], &b->image)))
		return rc;
	if (nbd && strlen(words->argv[2]) < PATH_MAX)
		b->target = words->argv[2];
	else if ((rc = parse_target_arg(w, "TARGET", words->argv[2], &b->target)))
		return rc;
	b->format = has_suffix(b->target, ".qcow2") ? FORMAT_QCOW2 : FORMAT_RAW;
	for (unsigned i = 3; i < words->argc; i++) {
		unsigned key;
		const char *v;
		if ((rc = split_option(w, words->argv[i], backup_keys, &seen, &key, &v)) ||
		    (rc = parse_backup_option(w, (enum backup_key)key, v, b)))
			return rc;
	}
	if (nbd) {
		/* An export is a disk: written byte for byte. */
		if (b->format == FORMAT_QCOW2)
			return fail(w, "format=qcow2: an NBD export is written as a raw disk (to keep qcow2 files on a "
				    "server, export them with qemu-nbd -f qcow2)");
		b->format = FORMAT_NBD;
	} else if (b->tls_certs || b->tls_psk) {
		return fail(w, "tls-certs= and tls-psk= apply only to an nbds:// or nbds+unix:// TARGET");
	}
	return check_backup_options(w, b, seen);
}

enum mirror_key { MK_SYNC, MK_SPEED, MK_ID, MK_COPY_MODE, MK_GRANULARITY, MK_ON_SOURCE_ERROR, MK_ON_TARGET_ERROR };
static const char *const mirror_keys[] = { "sync", "speed", "id", "copy-mode", "granularity", "on-source-error",
					   "on-target-error", NULL };
#define MIRROR_MIN_GRANULARITY 4096u
#define MIRROR_MAX_GRANULARITY (64u << 20)

static int parse_mirror(const struct where *w, struct words *words, struct ctl_mirror *m)
{
	uint64_t seen = 0;
	int rc, choice = 0;

	*m = (struct ctl_mirror){ 0 };
	if (words->argc < 3)
		return fail(w, "usage: mirror IMAGE TARGET [sync=full|top] [speed=RATE] [id=ID] [granularity=SIZE] "
			    "[copy-mode=background|write-blocking] [on-source-error=P] [on-target-error=P]");
	if ((rc = parse_image_arg(w, words->argv[1], &m->image)) ||
	    (rc = parse_target_arg(w, "TARGET", words->argv[2], &m->target)))
		return rc;
	for (unsigned i = 3; i < words->argc; i++) {
		unsigned key;
		const char *v;
		if ((rc = split_option(w, words->argv[i], mirror_keys, &seen, &key, &v)))
			return rc;
		switch ((enum mirror_key)key) {
		case MK_SYNC:
			rc = parse_choice(w, "sync", v, sync_choices, &choice);
			if (!rc && choice != SYNC_FULL && choice != SYNC_TOP)
				rc = fail(w, "sync=%s: a mirror copies with sync=full or sync=top", v);
			m->sync = (enum backup_sync)choice;
			break;
		case MK_SPEED:
			rc = parse_size_option(w, "speed", v, &m->speed);
			break;
		case MK_ID:
			rc = parse_name_option(w, "id", v, &m->id);
			break;
		case MK_COPY_MODE:
			rc = parse_choice(w, "copy-mode", v, copy_mode_choices, &choice);
			m->copy_mode = (enum mirror_copy_mode)choice;
			break;
		case MK_GRANULARITY:
			rc = parse_size_option(w, "granularity", v, &m->granularity);
			if (!rc && (!is_power_of_two(m->granularity) || m->granularity < MIRROR_MIN_GRANULARITY ||
				    m->granularity > MIRROR_MAX_GRANULARITY))
				rc = fail(w, "granularity=%s: must be a power of two from 4K to 64M", v);
			break;
		case MK_ON_SOURCE_ERROR:
			rc = parse_choice(w, "on-source-error", v, policy_choices, &choice);
			m->on_source_error = (enum error_policy)choice;
			break;
		case MK_ON_TARGET_ERROR:
			rc = parse_choice(w, "on-target-error", v, policy_choices, &choice);
			m->on_target_error = (enum error_policy)choice;
			break;
		}
		if (rc)
			return rc;
	}
	return 0;
}

static int parse_snapshot(const struct where *w, struct words *words, struct ctl_snapshot *s)
{
	static const char *const keys[] = { "max-store", "reflink", NULL };
	uint64_t seen = 0;
	int rc;

	*s = (struct ctl_snapshot){ 0 };
	if (words->argc < 3)
		return fail(w, "usage: snapshot NAME IMAGE [IMAGE ...] [max-store=SIZE] [reflink=off|auto]");
	if ((rc = parse_name_option(w, "snapshot name", words->argv[1], &s->name)))
		return rc;
	for (unsigned i = 2; i < words->argc; i++) {
		if (strchr(words->argv[i], '=')) {
			unsigned key;
			const char *v;
			int choice = 0;
			if ((rc = split_option(w, words->argv[i], keys, &seen, &key, &v)))
				return rc;
			if (key == 0)
				rc = parse_size_option(w, "max-store", v, &s->max_store);
			else if (!(rc = parse_choice(w, "reflink", v, reflink_choices, &choice)))
				s->reflink = choice;
			if (rc)
				return rc;
			continue;
		}
		if (seen)
			return fail(w, "IMAGE '%s' after options", words->argv[i]);
		if (s->nimages == CTL_MAX_IMAGES)
			return fail(w, "at most %d images", CTL_MAX_IMAGES);
		if ((rc = parse_image_arg(w, words->argv[i], &s->images[s->nimages])))
			return rc;
		for (unsigned j = 0; j < s->nimages; j++)
			if (strcmp(s->images[j], s->images[s->nimages]) == 0)
				return fail(w, "IMAGE '%s' given twice", words->argv[i]);
		s->nimages++;
	}
	if (!s->nimages)
		return fail(w, "usage: snapshot NAME IMAGE [IMAGE ...] [max-store=SIZE] [reflink=off|auto]");
	return 0;
}

static int parse_bitmap(const struct where *w, struct words *words, struct ctl_bitmap *b)
{
	static const struct choice ops[] = {
		{ "add", BITMAP_ADD }, { "remove", BITMAP_REMOVE }, { "clear", BITMAP_CLEAR },
		{ "enable", BITMAP_ENABLE }, { "disable", BITMAP_DISABLE }, { "merge", BITMAP_MERGE }, { 0 }
	};
	int rc, op;

	*b = (struct ctl_bitmap){ 0 };
	if (words->argc < 2)
		return fail(w, "usage: bitmap add|remove|clear|enable|disable|merge IMAGE NAME ...");
	if ((rc = parse_choice(w, "operation", words->argv[1], ops, &op)))
		return rc;
	b->op = (enum bitmap_op)op;
	if (words->argc < 4)
		return fail(w, "usage: bitmap %s IMAGE NAME%s", words->argv[1],
			    op == BITMAP_MERGE ? " SRC [SRC ...]" : op == BITMAP_ADD ? " [granularity=SIZE] [disabled]" : "");
	if ((rc = parse_image_arg(w, words->argv[2], &b->image)) ||
	    (rc = parse_name_option(w, "bitmap", words->argv[3], &b->name)))
		return rc;
	for (unsigned i = 4; i < words->argc; i++) {
		const char *word = words->argv[i];
		if (b->op == BITMAP_MERGE) {
			if (b->nsources == CTL_MAX_IMAGES)
				return fail(w, "at most %d source bitmaps", CTL_MAX_IMAGES);
			if ((rc = parse_name_option(w, "source bitmap", word, &b->sources[b->nsources++])))
				return rc;
		} else if (b->op == BITMAP_ADD && strcmp(word, "disabled") == 0) {
			if (b->disabled)
				return fail(w, "'disabled' given twice");
			b->disabled = true;
		} else if (b->op == BITMAP_ADD && strncmp(word, "granularity=", 12) == 0) {
			if (b->granularity)
				return fail(w, "option granularity given twice");
			if ((rc = parse_size_option(w, "granularity", word + 12, &b->granularity)))
				return rc;
			if (!is_power_of_two(b->granularity))
				return fail(w, "granularity=%s: must be a power of two", word + 12);
		} else {
			return fail(w, "unexpected argument '%s'", word);
		}
	}
	if (b->op == BITMAP_MERGE && !b->nsources)
		return fail(w, "usage: bitmap merge IMAGE DEST SRC [SRC ...]");
	return 0;
}

static int parse_job_verb(const struct where *w, struct words *words, enum ctl_verb verb, struct ctl_target_id *j)
{
	int rc;

	*j = (struct ctl_target_id){ 0 };
	if (verb == CTL_SET) {
		if (words->argc != 3)
			return fail(w, "usage: set ID speed=RATE");
		if ((rc = parse_name_option(w, "job id", words->argv[1], &j->id)))
			return rc;
		static const char *const keys[] = { "speed", NULL };
		uint64_t seen = 0;
		unsigned key;
		const char *v;
		if ((rc = split_option(w, words->argv[2], keys, &seen, &key, &v)))
			return rc;
		return parse_size_option(w, "speed", v, &j->speed);
	}
	if (words->argc != 2)
		return fail(w, "usage: %s %s", ctl_verb_name(verb), verb == CTL_RELEASE ? "NAME" : "ID");
	return parse_name_option(w, verb == CTL_RELEASE ? "snapshot name" : "job id", words->argv[1], &j->id);
}

static int parse_line(char *line, unsigned lineno, struct ctl_command *cmd, char *err, size_t errlen)
{
	static const struct choice verbs[] = {
		{ "backup", CTL_BACKUP }, { "mirror", CTL_MIRROR }, { "snapshot", CTL_SNAPSHOT },
		{ "release", CTL_RELEASE }, { "bitmap", CTL_BITMAP }, { "cancel", CTL_CANCEL },
		{ "pause", CTL_PAUSE }, { "resume", CTL_RESUME }, { "complete", CTL_COMPLETE },
		{ "dismiss", CTL_DISMISS }, { "set", CTL_SET }, { 0 }
	};
	struct where w = { .line = lineno, .err = err, .errlen = errlen };
	struct words words;
	int rc, verb = -1;

	if ((rc = split_words(line, &words, &w)))
		return rc;
	for (const struct choice *c = verbs; c->name; c++)
		if (strcmp(words.argv[0], c->name) == 0)
			verb = c->value;
	if (verb < 0)
		return fail(&w, "unknown command '%s' (commands: backup, mirror, snapshot, release, bitmap, "
				"cancel, pause, resume, complete, dismiss, set)", words.argv[0]);
	w.verb = words.argv[0];
	cmd->verb = (enum ctl_verb)verb;
	cmd->line = lineno;
	switch (cmd->verb) {
	case CTL_BACKUP:
		return parse_backup(&w, &words, &cmd->u.backup);
	case CTL_MIRROR:
		return parse_mirror(&w, &words, &cmd->u.mirror);
	case CTL_SNAPSHOT:
		return parse_snapshot(&w, &words, &cmd->u.snapshot);
	case CTL_BITMAP:
		return parse_bitmap(&w, &words, &cmd->u.bitmap);
	default:
		return parse_job_verb(&w, &words, cmd->verb, &cmd->u.job);
	}
}

/* ctl_parse, with the first line of text numbered first_line + 1. */
static int parse_text(const char *text, size_t len, unsigned first_line, struct ctl_txn *txn, char *err,
		      size_t errlen)
{
	unsigned lineno = first_line, cap = 0;
	size_t pos = 0;
	int rc = 0;

	*txn = (struct ctl_txn){ 0 };
	const char *nul = memchr(text, '\0', len);
	if (nul) {
		unsigned line = first_line + 1;
		for (const char *p = text; p < nul; p++)
			line += *p == '\n';
		return set_error(err, errlen, EINVAL, "line %u: contains a NUL byte", line);
	}
	while (pos < len) {
		const char *nl = memchr(text + pos, '\n', len - pos);
		size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
		const char *start = text + pos;
		pos += n + (nl ? 1 : 0);
		lineno++;
		/* The text is not NUL-terminated: never look past this line. */
		size_t skip = 0;
		while (skip < n && (start[skip] == ' ' || start[skip] == '\t' || start[skip] == '\r'))
			skip++;
		if (skip >= n || start[skip] == '#')
			continue;
		if (n > CTL_MAX_LINE) {
			rc = set_error(err, errlen, EINVAL, "line %u: longer than %d characters", lineno, CTL_MAX_LINE);
			break;
		}
		char *line = strndup(start, n);
		bool grown = true;
		if (txn->nstorage == cap) {
			/* Doubling: a write (or transaction) of 100000 short
			 * lines must not copy the arrays 100000 times. */
			unsigned more = cap ? cap * 2 : 16;
			char **storage = realloc(txn->storage, more * sizeof(*storage));
			if (storage)
				txn->storage = storage;
			struct ctl_command *cmds = storage ? realloc(txn->cmds, more * sizeof(*cmds)) : NULL;
			if (cmds)
				txn->cmds = cmds;
			grown = storage && cmds;
			if (grown)
				cap = more;
		}
		if (!line || !grown) {
			free(line);
			rc = set_error(err, errlen, ENOMEM, "line %u: out of memory", lineno);
			break;
		}
		txn->storage[txn->nstorage++] = line;
		rc = parse_line(line, lineno, &txn->cmds[txn->ncmds], err, errlen);
		if (rc)
			break;
		txn->ncmds++;
	}
	if (!rc && !txn->ncmds)
		rc = set_error(err, errlen, EINVAL, "no command (write one command per line, e.g. 'backup vm.img /backup/vm.raw')");
	if (rc)
		ctl_txn_free(txn);
	return rc;
}

int ctl_parse(const char *text, size_t len, struct ctl_txn *txn, char *err, size_t errlen)
{
	return parse_text(text, len, 0, txn, err, errlen);
}

void ctl_txn_free(struct ctl_txn *txn)
{
	for (unsigned i = 0; i < txn->nstorage; i++)
		free(txn->storage[i]);
	free(txn->storage);
	free(txn->cmds);
	*txn = (struct ctl_txn){ 0 };
}

/* ---- transactions over several writes ------------------------------------- */

enum line_kind { LINE_NONE, LINE_COMMAND, LINE_BEGIN, LINE_COMMIT, LINE_ABORT };

static bool is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\r';
}

/* What one line of a write is: nothing (blank, comment), one of the
 * transaction words alone, or a command. The words must stand alone, so that
 * "begin" with arguments is an error and not a command that looks like one. */
static int classify_line(const char *line, size_t n, enum line_kind *kind, char *err, size_t errlen)
{
	static const struct {
		const char *word;
		enum line_kind kind;
	} words[] = { { "begin", LINE_BEGIN }, { "commit", LINE_COMMIT }, { "abort", LINE_ABORT } };
	size_t i = 0, w;

	while (i < n && is_blank(line[i]))
		i++;
	if (i == n || line[i] == '#') {
		*kind = LINE_NONE;
		return 0;
	}
	for (w = i; w < n && !is_blank(line[w]); w++)
		;
	*kind = LINE_COMMAND;
	for (size_t k = 0; k < sizeof(words) / sizeof(words[0]); k++) {
		if (w - i != strlen(words[k].word) || memcmp(line + i, words[k].word, w - i) != 0)
			continue;
		*kind = words[k].kind;
		while (w < n && is_blank(line[w]))
			w++;
		if (w < n)
			return set_error(err, errlen, EINVAL, "%s takes no arguments", words[k].word);
	}
	return 0;
}

static int session_append(struct ctl_session *s, const char *line, size_t n, char *err, size_t errlen)
{
	size_t max = s->max ? s->max : CTL_SESSION_MAX;
	unsigned max_lines = s->max_lines ? s->max_lines : CTL_SESSION_MAX_COMMANDS;

	if (s->len + n + 1 > max)
		return set_error(err, errlen, EMSGSIZE, "the transaction would be larger than %zu bytes", max);
	if (s->lines == max_lines)
		return set_error(err, errlen, EMSGSIZE, "the transaction would have more than %u commands", max_lines);
	if (s->len + n + 1 > s->cap) {
		size_t cap = s->cap ? s->cap : 4096;
		while (cap < s->len + n + 1)
			cap *= 2;
		char *grown = realloc(s->text, cap);
		if (!grown)
			return set_error(err, errlen, ENOMEM, "out of memory");
		s->text = grown;
		s->cap = cap;
	}
	memcpy(s->text + s->len, line, n);
	s->text[s->len + n] = '\n';
	s->len += n + 1;
	s->lines++;
	return 0;
}

bool ctl_session_end(struct ctl_session *s)
{
	bool was_open = s->open;
	size_t max = s->max;
	unsigned max_lines = s->max_lines;

	free(s->text);
	*s = (struct ctl_session){ .max = max, .max_lines = max_lines };
	return was_open;
}

int ctl_session_feed(struct ctl_session *s, const char *buf, size_t len, enum ctl_feed_action *action, char *err,
		     size_t errlen)
{
	bool was_open = s->open, first = true;
	size_t old_len = s->len, pos = 0;
	unsigned old_lines = s->lines;
	enum line_kind last = LINE_NONE;
	int rc = 0;

	*action = CTL_FEED_RUN;
	/* Every command line is classified, in order. Without a transaction
	 * open or opened here, the write is a transaction of its own, as it
	 * always was: only misplaced transaction words are refused here. */
	while (pos < len && !rc) {
		const char *line = buf + pos;
		const char *nl = memchr(line, '\n', len - pos);
		size_t n = nl ? (size_t)(nl - line) : len - pos;
		enum line_kind kind;
		pos += n + (nl ? 1 : 0);
		if ((rc = classify_line(line, n, &kind, err, errlen)) || kind == LINE_NONE)
			continue;
		if (last == LINE_COMMIT || last == LINE_ABORT) {
			rc = set_error(err, errlen, EINVAL, "%s must be the last command of its write",
				       last == LINE_COMMIT ? "commit" : "abort");
			break;
		}
		switch (kind) {
		case LINE_BEGIN:
			if (s->open)
				rc = set_error(err, errlen, EINVAL, "begin: a transaction is already open on this file");
			else if (!first)
				rc = set_error(err, errlen, EINVAL,
					       "begin must be the first command of its write (it opens a transaction "
					       "that later writes on this open file add to)");
			else
				s->open = true;
			break;
		case LINE_COMMIT:
		case LINE_ABORT:
			if (!s->open)
				rc = set_error(err, errlen, EINVAL, "%s: no transaction is open on this file (write begin first)",
					       kind == LINE_COMMIT ? "commit" : "abort");
			break;
		case LINE_COMMAND:
			if (s->open)
				rc = session_append(s, line, n, err, errlen);
			break;
		case LINE_NONE:
			break;
		}
		first = false;
		last = kind;
	}
	if (!rc && !s->open)
		return 0; /* CTL_FEED_RUN */
	/* Every command this write added, checked now, numbered within the
	 * transaction: the writer learns of a bad line when it writes it. */
	if (!rc && s->lines > old_lines) {
		struct ctl_txn txn;
		rc = parse_text(s->text + old_len, s->len - old_len, old_lines, &txn, err, errlen);
		if (!rc)
			ctl_txn_free(&txn);
	}
	if (!rc && last == LINE_COMMIT && !s->lines)
		rc = set_error(err, errlen, EINVAL, "commit: the transaction is empty");
	if (rc) {
		if (was_open) {
			size_t used = strnlen(err, errlen);
			snprintf(err + used, errlen - used, "; the transaction was aborted, nothing of it ran");
		}
		ctl_session_end(s);
		return rc;
	}
	if (last == LINE_ABORT) {
		ctl_session_end(s);
		*action = CTL_FEED_ABORTED;
	} else {
		*action = last == LINE_COMMIT ? CTL_FEED_COMMIT : CTL_FEED_APPENDED;
	}
	return 0;
}
