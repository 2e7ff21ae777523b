/* pending: see include/fleecefs/pending.h */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/journal.h"
#include "fleecefs/pending.h"
#include "fleecefs/manifest.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

#define MAX_KEYS 64

struct pending {
	char path[PATH_MAX + 64];
	char *keys[MAX_KEYS], *values[MAX_KEYS];
	unsigned n;
};

static char pending_dir[PATH_MAX];

int pending_setup(const char *state_dir)
{
	if (snprintf(pending_dir, sizeof(pending_dir), "%s/pending", state_dir) >= (int)sizeof(pending_dir))
		return -ENAMETOOLONG;
	if (mkdir(pending_dir, 0700) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

struct pending *pending_new(uint64_t serial)
{
	struct pending *p = calloc(1, sizeof(*p));

	if (p)
		snprintf(p->path, sizeof(p->path), "%.4000s/%ld-%" PRIu64, pending_dir, (long)getpid(), serial);
	return p;
}

static const char *get(const struct pending *p, const char *key)
{
	for (unsigned i = 0; i < p->n; i++)
		if (strcmp(p->keys[i], key) == 0)
			return p->values[i];
	return NULL;
}

void pending_set(struct pending *p, const char *key, const char *value)
{
	for (unsigned i = 0; i < p->n; i++) {
		if (strcmp(p->keys[i], key) != 0)
			continue;
		free(p->values[i]);
		if (value && (p->values[i] = strdup(value)))
			return;
		free(p->keys[i]);
		p->keys[i] = p->keys[--p->n];
		p->values[i] = p->values[p->n];
		return;
	}
	if (!value || p->n == MAX_KEYS)
		return;
	p->keys[p->n] = strdup(key);
	p->values[p->n] = strdup(value);
	if (p->keys[p->n] && p->values[p->n]) {
		p->n++;
	} else {
		free(p->keys[p->n]);
		free(p->values[p->n]);
	}
}

void pending_set_u64(struct pending *p, const char *key, uint64_t value)
{
	char buf[32];
	snprintf(buf, sizeof(buf), "%" PRIu64, value);
	pending_set(p, key, buf);
}

void pending_set_chain(struct pending *p, const char *text)
{
	for (unsigned i = 0; i < p->n;) {
		if (strncmp(p->keys[i], "chain.", 6) == 0) {
			pending_set(p, p->keys[i], NULL);
			continue;
		}
		i++;
	}
	for (const char *line = text; line && *line;) {
		const char *nl = strchr(line, '\n');
		size_t len = nl ? (size_t)(nl - line) : strlen(line);
		const char *eq = memchr(line, '=', len);
		if (eq) {
			char key[80], value[PATH_MAX + 64];
			snprintf(key, sizeof(key), "chain.%.*s", (int)(eq - line), line);
			snprintf(value, sizeof(value), "%.*s", (int)(len - (size_t)(eq - line) - 1), eq + 1);
			pending_set(p, key, value);
		}
		line = nl ? nl + 1 : NULL;
	}
}

int pending_save(struct pending *p)
{
	struct strbuf sb = { 0 };

	for (unsigned i = 0; i < p->n; i++)
		strbuf_printf(&sb, "%s=%s\n", p->keys[i], p->values[i]);
	if (sb.failed) {
		strbuf_free(&sb);
		return -ENOMEM;
	}
	int rc = write_file_atomic(p->path, sb.data ? sb.data : "", sb.len, true);
	strbuf_free(&sb);
	return rc;
}

void pending_free(struct pending *p)
{
	if (!p)
		return;
	for (unsigned i = 0; i < p->n; i++) {
		free(p->keys[i]);
		free(p->values[i]);
	}
	free(p);
}

void pending_finish(struct pending *p)
{
	if (!p)
		return;
	if (unlink(p->path) == 0)
		fsync_parent_dir(p->path);
	pending_free(p);
}

/* ---- recovery ---------------------------------------------------------------- */

static struct pending *load(const char *path)
{
	struct pending *p = calloc(1, sizeof(*p));
	char line[PATH_MAX + 128];
	FILE *f = fopen(path, "re");

	if (!p || !f) {
		free(p);
		if (f)
			fclose(f);
		return NULL;
	}
	snprintf(p->path, sizeof(p->path), "%.4100s", path);
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = '\0';
		char *eq = strchr(line, '=');
		if (!eq)
			continue;
		*eq = '\0';
		pending_set(p, line, eq + 1);
	}
	fclose(f);
	return p;
}

static uint64_t get_u64(const struct pending *p, const char *key)
{
	const char *v = get(p, key);
	return v ? strtoull(v, NULL, 10) : 0;
}

/* Which of the record's names holds the data file now ("" if none). */
static const char *locate(const struct pending *p)
{
	const char *names[] = { get(p, "file"), get(p, "final"), get(p, "partial") };
	uint64_t dev = get_u64(p, "dev"), ino = get_u64(p, "ino");
	const char *kind = get(p, "kind");
	struct stat st;

	if (kind && strncmp(kind, "nbd", 3) == 0)
		return names[0] ? names[0] : "";   /* an export: never a file here */

	for (unsigned i = 0; i < 3; i++) {
		if (!names[i] || lstat(names[i], &st) < 0 || !S_ISREG(st.st_mode))
			continue;
		if (ino ? stat_is(&st, dev, ino) : i == 0)
			return names[i];
	}
	return "";
}

static void remove_file(const char *path)
{
	if (path && unlink(path) == 0)
		fsync_parent_dir(path);
}

static void write_chain(const struct pending *p)
{
	const char *file = get(p, "chain_file");
	struct strbuf sb = { 0 };

	if (!file)
		return;
	/* In the order written: the record keeps the job's order. */
	for (unsigned i = 0; i < p->n; i++)
		if (strncmp(p->keys[i], "chain.", 6) == 0)
			strbuf_printf(&sb, "%s=%s\n", p->keys[i] + 6, p->values[i]);
	if (sb.len && write_file_atomic(file, sb.data, sb.len, true) < 0)
		log_error("recovery: cannot write the chain record %s: %s", file, error_text(errno));
	strbuf_free(&sb);
}

/* Returns false if the record must stay (a rollback to retry). */
static bool undo(const struct pending *p, const char *where)
{
	const char *kind = get(p, "kind"), *file = get(p, "file"), *journal = get(p, "journal");
	char err[300];

	remove_file(get(p, "manifest_temp"));
	if (kind && strcmp(kind, "nbd") == 0) {
		log_warn("recovery: the backup into %s was interrupted: the export holds no complete backup", file);
		return true;
	}
	if (kind && strcmp(kind, "nbd-in-place") == 0) {
		int rc = journal && file ? target_nbd_recover(file, get(p, "tls_certs"), get(p, "tls_psk"), journal, err,
							     sizeof(err)) : 0;
		if (rc && rc != -ENOENT) {
			log_error("recovery: %s; the journal and its record are kept: the next mount tries again", err);
			return false;
		}
		remove_file(journal);
		log_info("recovery: %s rolled back to its earlier backup (an incremental was interrupted)", file);
		return true;
	}
	if (!kind || strcmp(kind, "in-place") != 0) {
		/* A new file that never got its name. */
		if (*where && file && strcmp(where, file) == 0) {
			remove_file(file);
			log_info("recovery: removed %s, the unfinished target of an interrupted backup", file);
		}
		return true;
	}
	if (!*where) {
		if (journal && access(journal, F_OK) == 0)
			log_error("recovery: %s is gone; its journal %s is kept", file, journal);
		return true;
	}
	int fd = open(where, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
	int rc = fd < 0 ? -errno : journal ? journal_recover(journal, fd, err, sizeof(err)) : 0;
	if (fd >= 0)
		close(fd);
	if (rc && rc != -ENOENT) {
		log_error("recovery: %s: %s; the journal is kept", where, fd < 0 ? error_text(-rc) : err);
		return true;
	}
	remove_file(journal);
	if (file && strcmp(where, file) != 0 && rename_noreplace(where, file) < 0)
		log_error("recovery: cannot rename %s back to %s: %s", where, file, error_text(errno));
	log_info("recovery: %s rolled back to its earlier backup (an incremental was interrupted)", file);
	return true;
}

static void redo(const struct pending *p, const char *where, const char *decision)
{
	const char *name = get(p, strcmp(decision, "partial") == 0 ? "partial" : "final");
	const char *mtemp = get(p, "manifest_temp"), *mold = get(p, "manifest_old");
	char manifest[PATH_MAX + 8];

	if (!name)
		return;
	if (!*where) {
		log_error("recovery: the file of %s is gone; nothing to finish", name);
		remove_file(mtemp);
		return;
	}
	const char *kind = get(p, "kind");
	bool export = kind && strncmp(kind, "nbd", 3) == 0;   /* nothing to rename */
	if (!export && strcmp(where, name) != 0 && rename_noreplace(where, name) < 0) {
		log_error("recovery: cannot rename %s to %s: %s", where, name, error_text(errno));
		return;
	}
	manifest_path(name, manifest, sizeof(manifest));
	if (mtemp && access(mtemp, F_OK) == 0 && rename(mtemp, manifest) == 0)
		fsync_parent_dir(manifest);
	/* The earlier manifest describes nothing any more: it was replaced,
	 * or its file moved, or the job wrote none. */
	if (mold && (strcmp(mold, manifest) != 0 || !mtemp))
		remove_file(mold);
	write_chain(p);
	remove_file(get(p, "journal"));
	log_info("recovery: finished publishing %s (the daemon stopped after the backup was decided)", name);
}

bool pending_names(const char *final)
{
	DIR *d = pending_dir[0] ? opendir(pending_dir) : NULL;
	bool found = false;
	char path[PATH_MAX + 256];

	for (struct dirent *e; d && !found && (e = readdir(d));) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", pending_dir, e->d_name);
		struct pending *p = load(path);
		if (!p)
			continue;
		const char *name = get(p, "final");
		found = name && strcmp(name, final) == 0 && get(p, "journal") && !get(p, "decision");
		pending_free(p);
	}
	if (d)
		closedir(d);
	return found;
}

void pending_recover(const char *state_dir)
{
	char dir[PATH_MAX], path[PATH_MAX + 256];

	snprintf(dir, sizeof(dir), "%s/pending", state_dir);
	DIR *d = opendir(dir);
	for (struct dirent *e; d && (e = readdir(d));) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		if (e->d_name[0] == '.') {
			unlink(path);   /* a record write that never finished */
			continue;
		}
		struct pending *p = load(path);
		if (!p)
			continue;
		const char *decision = get(p, "decision");
		const char *where = locate(p);
		bool settled = true;
		if (decision)
			redo(p, where, decision);
		else
			settled = undo(p, where);
		if (settled)
			pending_finish(p);
		else
			pending_free(p);
	}
	if (d)
		closedir(d);
}
