/* fleecectl: the operator's command line (fleecectl(8)). Each verb is one
 * function. Verbs that talk to a mount do it through its control files only
 * (ctlclient.h); verify and restore read backup files (verify.h,
 * restore.h). Exit codes: 0 done (a waited job completed), 1 refused,
 * failed, cancelled or damaged, 2 usage (verify/restore: cannot check),
 * 3 the mount cannot be reached. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fleecefs/ctlclient.h"
#include "fleecefs/manifest.h"
#include "fleecefs/restore.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"
#include "fleecefs/verify.h"

enum { EXIT_OK = 0, EXIT_FAILED = 1, EXIT_USAGE = 2, EXIT_UNREACHABLE = 3 };

struct options {
	const char *mount_given;
	bool json, wait, overwrite;
	bool until_ready;           /* wait --ready, mirror --wait: ready is done too */
	const char *file;           /* txn -f */
	const char *at;             /* restore --at= */
	long count;                 /* events -n */
	char mount[PATH_MAX];
};

struct verb {
	const char *name;
	int (*run)(struct options *o, int argc, char **argv);
	const char *usage;
	bool needs_mount;
};

static const struct verb *find_verb(const char *name);

static int usage_error(const struct verb *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int usage_error(const struct verb *v, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "fleecectl: %s: ", v->name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nusage: fleecectl [-m MOUNTPOINT] %s %s\n", v->name, v->usage);
	return EXIT_USAGE;
}

/* ---- JSON, one object per line ---------------------------------------------- */

static void json_string(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c < 0x20)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputc('"', f);
}

static bool all_digits(const char *s)
{
	if (!*s || (s[0] == '0' && s[1]))
		return false;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return false;
	return strlen(s) < 19;
}

/* key=value lines (and "key=value key=value" words with words) as one JSON
 * object; whole numbers become numbers. `extra` is a first member, or NULL. */
static void json_object(FILE *f, const char *text, bool words, const char *extra_key, const char *extra_value)
{
	char *copy = strdup(text), *save, *item;
	bool first = true;

	if (!copy) {
		fputs("{}\n", f);
		return;
	}
	fputc('{', f);
	if (extra_key) {
		json_string(f, extra_key);
		fputc(':', f);
		json_string(f, extra_value);
		first = false;
	}
	for (item = strtok_r(copy, words ? " \n" : "\n", &save); item; item = strtok_r(NULL, words ? " \n" : "\n", &save)) {
		char *eq = strchr(item, '=');
		if (!eq)
			continue;
		*eq = '\0';
		fputs(first ? "" : ",", f);
		first = false;
		json_string(f, item);
		fputc(':', f);
		if (all_digits(eq + 1))
			fputs(eq + 1, f);
		else
			json_string(f, eq + 1);
	}
	fputs("}\n", f);
	free(copy);
}

/* ---- sending commands ------------------------------------------------------ */

/* Sends one transaction; prints the answer. The job ids it started go
 * into ids (NULL: not wanted). */
static int send_text(struct options *o, const char *text, char ids[][FLEECE_NAME_MAX + 1], unsigned *nids, unsigned max)
{
	char answer[8192], err[PATH_MAX + 200];
	int refused;

	if (ctl_send(o->mount, text, answer, sizeof(answer), &refused, err, sizeof(err))) {
		fprintf(stderr, "fleecectl: %s\n", err);
		return EXIT_UNREACHABLE;
	}
	if (refused) {
		const char *why = !strncmp(answer, "error: ", 7) ? answer + 7 : answer;
		fprintf(stderr, "fleecectl: %s (%s)\n", why, error_text(refused));
		return EXIT_FAILED;
	}
	if (o->json)
		json_object(stdout, answer, true, "answer", strncmp(answer, "ok", 2) ? answer : "ok");
	else
		printf("%s\n", answer);
	if (ids) {
		char *copy = strdup(answer), *save;
		for (char *w = strtok_r(copy, " ", &save); w && *nids < max; w = strtok_r(NULL, " ", &save))
			if (!strncmp(w, "id=", 3))
				snprintf(ids[(*nids)++], FLEECE_NAME_MAX + 1, "%s", w + 3);
		free(copy);
	}
	return EXIT_OK;
}

/* ---- waiting for jobs ------------------------------------------------------- */

static bool concluded(const char *state)
{
	return !strcmp(state, "completed") || !strcmp(state, "failed") || !strcmp(state, "cancelled");
}

static void human_bytes(double b, char *buf, size_t len)
{
	const char *unit[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	int u = 0;
	while (b >= 1024 && u < 4) {
		b /= 1024;
		u++;
	}
	snprintf(buf, len, u ? "%.1f %s" : "%.0f %s", b, unit[u]);
}

/* One job's progress: "42.0%  1.2 GiB / 2.0 GiB  85.3 MiB/s  ETA 0:09". */
static void progress_text(const char *status, char *buf, size_t len, double *fraction)
{
	char v[64], done_s[32], total_s[32], rate_s[32], eta[32] = "";
	uint64_t done = strtoull(ctl_value(status, "bytes_done", v, sizeof(v)) ? v : "0", NULL, 10);
	uint64_t total = strtoull(ctl_value(status, "bytes_total", v, sizeof(v)) ? v : "0", NULL, 10);
	uint64_t rate = strtoull(ctl_value(status, "rate", v, sizeof(v)) ? v : "0", NULL, 10);

	*fraction = total ? (double)done / (double)total : 0;
	if (*fraction > 1)
		*fraction = 1;
	human_bytes((double)done, done_s, sizeof(done_s));
	human_bytes((double)total, total_s, sizeof(total_s));
	human_bytes((double)rate, rate_s, sizeof(rate_s));
	if (rate && total > done) {
		uint64_t s = (total - done) / rate;
		snprintf(eta, sizeof(eta), "  ETA %" PRIu64 ":%02" PRIu64, s / 60, s % 60);
	}
	snprintf(buf, len, "%5.1f%%  %s / %s%s%s%s%s", *fraction * 100, done_s, total_s, rate ? "  " : "",
		 rate ? rate_s : "", rate ? "/s" : "", eta);
}

struct waited {
	char id[FLEECE_NAME_MAX + 1];
	char state[32];
	bool done;
};

static int read_status(struct options *o, const char *id, struct strbuf *sb)
{
	char rel[FLEECE_NAME_MAX + 32];
	if (strlen(id) > FLEECE_NAME_MAX)
		return -ENOENT;
	snprintf(rel, sizeof(rel), "jobs/%.*s/status", FLEECE_NAME_MAX, id);
	return ctl_read(o->mount, rel, sb);
}

/* Refreshes what the status files say (after an event, or events lost). */
static void check_states(struct options *o, struct waited *w, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		struct strbuf sb = { 0 };
		if (w[i].done)
			continue;
		if (read_status(o, w[i].id, &sb)) {
			snprintf(w[i].state, sizeof(w[i].state), "gone");
			w[i].done = true;
		} else if (ctl_value(sb.data ? sb.data : "", "state", w[i].state, sizeof(w[i].state)) &&
			   (concluded(w[i].state) || (o->until_ready && !strcmp(w[i].state, "ready")))) {
			w[i].done = true;
		}
		strbuf_free(&sb);
	}
}

static void draw_progress(struct options *o, struct waited *w, unsigned n, bool tty, bool final)
{
	for (unsigned i = 0; i < n; i++) {
		struct strbuf sb = { 0 };
		char line[200], bar[41];
		double f;
		if ((w[i].done && !final) || read_status(o, w[i].id, &sb)) {
			strbuf_free(&sb);
			continue;
		}
		progress_text(sb.data ? sb.data : "", line, sizeof(line), &f);
		if (o->json) {
			printf("{\"id\":");
			json_string(stdout, w[i].id);
			printf(",\"event\":\"progress\",\"percent\":%.1f}\n", f * 100);
		} else if (tty) {
			int fill = (int)(f * 40);
			memset(bar, '#', (size_t)fill);
			memset(bar + fill, '.', (size_t)(40 - fill));
			bar[40] = '\0';
			/* One line, redrawn in place. */
			printf("\r\033[K%s [%s] %s", w[i].id, bar, line);
		} else {
			printf("%s: %s\n", w[i].id, line);
		}
		strbuf_free(&sb);
	}
	fflush(stdout);
}

/* Blocks on the events file until every job concluded; events must have
 * been opened before the jobs could conclude. */
static int wait_jobs(struct options *o, int events, char ids[][FLEECE_NAME_MAX + 1], unsigned n)
{
	struct waited w[64];
	struct strbuf pending = { 0 };
	bool tty = isatty(STDOUT_FILENO) && !o->json;
	uint64_t every = tty ? 500 : 10000, last_draw = clock_monotonic_ns();

	n = n > 64 ? 64 : n;
	for (unsigned i = 0; i < n; i++) {
		w[i] = (struct waited){ .done = false };
		snprintf(w[i].id, sizeof(w[i].id), "%s", ids[i]);
	}
	check_states(o, w, n);
	if (tty)
		draw_progress(o, w, n, tty, false);
	for (;;) {
		unsigned left = 0;
		for (unsigned i = 0; i < n; i++)
			left += !w[i].done;
		if (!left)
			break;
		char line[1024], v[64];
		int r = ctl_next_event(events, &pending, (int)every, line, sizeof(line));
		if (r < 0) {
			fprintf(stderr, "\nfleecectl: wait: the events of %s ended: %s\n", o->mount, error_text(-r));
			strbuf_free(&pending);
			return EXIT_UNREACHABLE;
		}
		if (r > 0) {
			const char *ev = ctl_event_value(line, "event", v, sizeof(v)) ? v : "";
			/* Lost events, or one of ours concluding: ask the status. */
			if (!strcmp(ev, "overflow") || concluded(ev) || (o->until_ready && !strcmp(ev, "ready")))
				check_states(o, w, n);
		}
		uint64_t now = clock_monotonic_ns();
		if (now - last_draw >= every * 1000000ull) {
			draw_progress(o, w, n, tty, false);
			last_draw = now;
		}
	}
	strbuf_free(&pending);
	int rc = EXIT_OK;
	if (tty)
		draw_progress(o, w, n, tty, true);
	if (tty)
		printf("\n");
	for (unsigned i = 0; i < n; i++) {
		struct strbuf sb = { 0 };
		char err[512] = "";
		if (strcmp(w[i].state, "completed") && !(o->until_ready && !strcmp(w[i].state, "ready")))
			rc = EXIT_FAILED;
		if (!read_status(o, w[i].id, &sb))
			ctl_value(sb.data ? sb.data : "", "error", err, sizeof(err));
		if (o->json)
			json_object(stdout, sb.data ? sb.data : "", false, "final", w[i].state);
		else
			printf("%s: %s%s%s\n", w[i].id, w[i].state, err[0] ? ": " : "", err);
		strbuf_free(&sb);
	}
	fflush(stdout);
	return rc;
}

/* ---- verbs ------------------------------------------------------------------ */

/* Sends one transaction (and frees it); with --wait, waits for the jobs it
 * started, having opened the events before sending. */
static int send_and_wait(struct options *o, struct strbuf *text)
{
	char ids[64][FLEECE_NAME_MAX + 1];
	unsigned nids = 0;
	int events = -1;

	if (o->wait && (events = ctl_open_events(o->mount)) < 0) {
		fprintf(stderr, "fleecectl: %s/.fleece/events: %s\n", o->mount, error_text(-events));
		strbuf_free(text);
		return EXIT_UNREACHABLE;
	}
	int rc = text->failed ? EXIT_FAILED : send_text(o, text->data, ids, &nids, 64);
	strbuf_free(text);
	if (rc == EXIT_OK && o->wait && nids)
		rc = wait_jobs(o, events, ids, nids);
	if (events >= 0)
		close(events);
	return rc;
}

/* Commands of the control language: the words, quoted where needed. */
static int run_command(struct options *o, const char *verb, int argc, char **argv)
{
	struct strbuf line = { 0 };

	strbuf_printf(&line, "%s", verb);
	for (int i = 0; i < argc; i++) {
		strbuf_printf(&line, " ");
		ctl_quote_word(&line, argv[i]);
	}
	strbuf_printf(&line, "\n");
	return send_and_wait(o, &line);
}

#define COMMAND_VERB(fn, word)                                                \
	static int fn(struct options *o, int argc, char **argv)               \
	{                                                                     \
		return run_command(o, word, argc, argv);                      \
	}
COMMAND_VERB(cmd_backup, "backup")

/* A mirror does not conclude by itself: --wait waits until it is ready (in
 * sync, to be completed) or has failed. */
static int cmd_mirror(struct options *o, int argc, char **argv)
{
	o->until_ready = true;
	return run_command(o, "mirror", argc, argv);
}
COMMAND_VERB(cmd_snapshot, "snapshot")
COMMAND_VERB(cmd_release, "release")
COMMAND_VERB(cmd_cancel, "cancel")
COMMAND_VERB(cmd_pause, "pause")
COMMAND_VERB(cmd_resume, "resume")
COMMAND_VERB(cmd_complete, "complete")
COMMAND_VERB(cmd_dismiss, "dismiss")
COMMAND_VERB(cmd_set, "set")
COMMAND_VERB(cmd_bitmap, "bitmap")

/* Several commands, one transaction: from the arguments (one per
 * argument) or from a file (-f FILE, - for stdin; one per line). */
static int cmd_txn(struct options *o, int argc, char **argv)
{
	struct strbuf text = { 0 };

	if (o->file) {
		FILE *f = strcmp(o->file, "-") ? fopen(o->file, "re") : stdin;
		char line[4096];
		if (!f) {
			fprintf(stderr, "fleecectl: txn: %s: %s\n", o->file, error_text(errno));
			return EXIT_USAGE;
		}
		while (fgets(line, sizeof(line), f))
			strbuf_printf(&text, "%s%s", line, strchr(line, '\n') ? "" : "\n");
		if (f != stdin)
			fclose(f);
	}
	for (int i = 0; i < argc; i++)
		strbuf_printf(&text, "%s\n", argv[i]);
	if (!text.len) {
		strbuf_free(&text);
		return usage_error(find_verb("txn"), "no commands");
	}
	return send_and_wait(o, &text);
}

/* The job ids, in directory order. */
static unsigned list_jobs(struct options *o, char ids[][FLEECE_NAME_MAX + 1], unsigned max)
{
	char path[PATH_MAX + 32];
	unsigned n = 0;
	struct dirent *e;

	snprintf(path, sizeof(path), "%s/.fleece/jobs", o->mount);
	DIR *d = opendir(path);
	while (d && n < max && (e = readdir(d)))
		if (e->d_name[0] != '.' && strlen(e->d_name) <= FLEECE_NAME_MAX)
			snprintf(ids[n++], FLEECE_NAME_MAX + 1, "%.*s", FLEECE_NAME_MAX, e->d_name);
	if (d)
		closedir(d);
	return n;
}

static int cmd_status(struct options *o, int argc, char **argv)
{
	char all[256][FLEECE_NAME_MAX + 1];
	unsigned n = 0;
	int rc = EXIT_OK;

	if (!argc)
		n = list_jobs(o, all, 256);
	for (unsigned i = 0; i < (argc ? (unsigned)argc : n); i++) {
		const char *id = argc ? argv[i] : all[i];
		struct strbuf sb = { 0 };
		if (read_status(o, id, &sb)) {
			fprintf(stderr, "fleecectl: status: no job %s\n", id);
			rc = EXIT_FAILED;
		} else if (o->json) {
			json_object(stdout, sb.data ? sb.data : "", false, NULL, NULL);
		} else {
			printf("%s%s", i ? "\n" : "", sb.data ? sb.data : "");
		}
		strbuf_free(&sb);
	}
	return rc;
}

static int cmd_wait(struct options *o, int argc, char **argv)
{
	char ids[64][FLEECE_NAME_MAX + 1];

	if (!argc || argc > 64)
		return usage_error(find_verb("wait"), "which jobs?");
	/* Events first: a job that concludes after the check is seen. */
	int events = ctl_open_events(o->mount);
	if (events < 0) {
		fprintf(stderr, "fleecectl: %s/.fleece/events: %s\n", o->mount, error_text(-events));
		return EXIT_UNREACHABLE;
	}
	for (int i = 0; i < argc; i++) {
		struct strbuf sb = { 0 };
		int missing = read_status(o, argv[i], &sb);
		strbuf_free(&sb);
		if (missing) {
			close(events);
			fprintf(stderr, "fleecectl: wait: no job %s\n", argv[i]);
			return EXIT_FAILED;
		}
		snprintf(ids[i], sizeof(ids[i]), "%s", argv[i]);
	}
	int rc = wait_jobs(o, events, ids, (unsigned)argc);
	close(events);
	return rc;
}

static int cmd_events(struct options *o, int argc, char **argv)
{
	(void)argv;
	if (argc)
		return usage_error(find_verb("events"), "no arguments");
	int fd = ctl_open_events(o->mount);
	struct strbuf pending = { 0 };
	if (fd < 0) {
		fprintf(stderr, "fleecectl: %s/.fleece/events: %s\n", o->mount, error_text(-fd));
		return EXIT_UNREACHABLE;
	}
	for (long seen = 0; o->count <= 0 || seen < o->count; seen++) {
		char line[1024];
		int r = ctl_next_event(fd, &pending, -1, line, sizeof(line));
		if (r < 0)
			break;
		if (o->json)
			json_object(stdout, line, true, NULL, NULL);
		else
			printf("%s\n", line);
		fflush(stdout);
	}
	strbuf_free(&pending);
	close(fd);
	return EXIT_OK;
}

/* One row of `list` for each bitmap file found under .fleece/bitmaps. */
static struct options *walk_options;
static size_t walk_root_len;
static int list_bitmap(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	(void)st, (void)ftw;
	if (type != FTW_F)
		return 0;
	struct strbuf sb = { 0 };
	if (ctl_read(walk_options->mount, path + walk_root_len - strlen("bitmaps"), &sb) == 0 && sb.data) {
		char name[80], image[PATH_MAX], state[32], rec[8], dirty[32];
		if (ctl_value(sb.data, "name", name, sizeof(name)) && ctl_value(sb.data, "image", image, sizeof(image))) {
			if (walk_options->json)
				json_object(stdout, sb.data, false, "kind", "bitmap");
			else
				printf("bitmap    %-20s %-24s %-13s recording=%-3s dirty=%s\n", name, image,
				       ctl_value(sb.data, "state", state, sizeof(state)) ? state : "?",
				       ctl_value(sb.data, "recording", rec, sizeof(rec)) ? rec : "?",
				       ctl_value(sb.data, "dirty_bytes", dirty, sizeof(dirty)) ? dirty : "?");
		}
	}
	strbuf_free(&sb);
	return 0;
}

static int cmd_list(struct options *o, int argc, char **argv)
{
	char ids[256][FLEECE_NAME_MAX + 1], path[PATH_MAX + 32];
	(void)argv;

	if (argc)
		return usage_error(find_verb("list"), "no arguments");
	unsigned n = list_jobs(o, ids, 256);
	if (!o->json)
		printf("%-9s %-20s %-24s %-13s %s\n", "KIND", "NAME", "IMAGE", "STATE", "DETAIL");
	for (unsigned i = 0; i < n; i++) {
		struct strbuf sb = { 0 };
		char type[32], sync[32], image[PATH_MAX], state[32], target[PATH_MAX], line[200];
		double f;
		if (read_status(o, ids[i], &sb) == 0 && sb.data) {
			if (o->json) {
				json_object(stdout, sb.data, false, "kind", "job");
			} else {
				progress_text(sb.data, line, sizeof(line), &f);
				printf("%-9s %-20s %-24s %-13s %s -> %s  %s\n",
				       ctl_value(sb.data, "type", type, sizeof(type)) ? type : "job", ids[i],
				       ctl_value(sb.data, "image", image, sizeof(image)) ? image : "-",
				       ctl_value(sb.data, "state", state, sizeof(state)) ? state : "?",
				       ctl_value(sb.data, "sync", sync, sizeof(sync)) ? sync : "",
				       ctl_value(sb.data, "target", target, sizeof(target)) ? target : "-", line);
			}
		}
		strbuf_free(&sb);
	}
	snprintf(path, sizeof(path), "%s/.fleece/snapshots", o->mount);
	DIR *d = opendir(path);
	struct dirent *e;
	while (d && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		if (o->json) {
			printf("{\"kind\":\"snapshot\",\"name\":");
			json_string(stdout, e->d_name);
			printf("}\n");
		} else {
			printf("%-9s %-20s %-24s %-13s .fleece/snapshots/%s/\n", "snapshot", e->d_name, "-", "-",
			       e->d_name);
		}
	}
	if (d)
		closedir(d);
	snprintf(path, sizeof(path), "%s/.fleece/bitmaps", o->mount);
	walk_options = o;
	walk_root_len = strlen(path);
	nftw(path, list_bitmap, 16, FTW_PHYS);
	return EXIT_OK;
}

static int cmd_verify(struct options *o, int argc, char **argv)
{
	enum verify_result worst = VERIFY_OK;

	if (argc < 1)
		return usage_error(find_verb("verify"), "which backup?");
	for (int i = 0; i < argc; i++) {
		/* An export's manifest is in the daemon's state directory, which
		 * the mount names. */
		if (target_is_nbd_uri(argv[i]) && !manifest_nbd_dir()) {
			struct strbuf sb = { 0 };
			char dir[PATH_MAX] = "", err[PATH_MAX + 200] = "";
			if ((!o->mount[0] && ctl_find_mount(o->mount_given, o->mount, sizeof(o->mount), err, sizeof(err))) ||
			    ctl_read(o->mount, "version", &sb) ||
			    !ctl_value(sb.data ? sb.data : "", "nbd_manifests", dir, sizeof(dir)) || !dir[0]) {
				strbuf_free(&sb);
				fprintf(stderr, "fleecectl: verify %s: the manifest of an NBD backup is in the state directory "
					"of the daemon that took it, which its mount names: cannot ask %s%s%s\n", argv[i],
					o->mount[0] ? o->mount : "a mount (-m)", err[0] ? ": " : "", err);
				return EXIT_UNREACHABLE;
			}
			strbuf_free(&sb);
			manifest_use_nbd_dir(dir);
		}
	}
	for (int i = 0; i < argc; i++) {
		enum verify_result r;
		if (o->json) {
			/* The report as text, then one object with the result. */
			char *text = NULL;
			size_t len = 0;
			FILE *mem = open_memstream(&text, &len);
			r = mem ? verify_backup(argv[i], mem, stderr) : VERIFY_CANNOT;
			if (mem)
				fclose(mem);
			printf("{\"target\":");
			json_string(stdout, argv[i]);
			printf(",\"result\":\"%s\",\"report\":[",
			       r == VERIFY_OK ? "ok" : r == VERIFY_DAMAGED ? "damaged" : "cannot-check");
			char *save;
			bool first = true;
			for (char *l = text ? strtok_r(text, "\n", &save) : NULL; l; l = strtok_r(NULL, "\n", &save)) {
				fputs(first ? "" : ",", stdout);
				json_string(stdout, l);
				first = false;
			}
			printf("]}\n");
			free(text);
		} else {
			r = verify_backup(argv[i], stdout, stderr);
		}
		fflush(stdout);
		if (r == VERIFY_DAMAGED || (r == VERIFY_CANNOT && worst == VERIFY_OK))
			worst = r;
	}
	return (int)worst;
}

/* A point's label (fleecefs-backup names points YYYYmmddTHHMMSSZ.qcow2) as
 * seconds; -1 when it is none. */
static time_t label_time(const char *label)
{
	struct tm tm = { 0 };
	const char *end = strptime(label, "%Y%m%dT%H%M%SZ", &tm);
	return end && (!*end || !strcmp(end, ".qcow2")) ? timegm(&tm) : (time_t)-1;
}

/* --at=TIME: "@SECONDS", "YYYY-mm-dd[ HH:MM[:SS]]" (UTC) or a label. */
static time_t parse_at(const char *at)
{
	const char *formats[] = { "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d" };
	struct tm tm;
	char *end;

	if (at[0] == '@') {
		long long v = strtoll(at + 1, &end, 10);
		return *end || end == at + 1 ? (time_t)-1 : (time_t)v;
	}
	for (size_t i = 0; i < sizeof(formats) / sizeof(formats[0]); i++) {
		memset(&tm, 0, sizeof(tm));
		const char *e = strptime(at, formats[i], &tm);
		if (e && !*e)
			return i == 3 ? timegm(&tm) + 86399 : timegm(&tm);   /* a day: up to its end */
	}
	return label_time(at);
}

/* The point of a backup directory (fleecefs-backup's IMAGE directory: one
 * subdirectory per chain) named LABEL, or the newest at or before TIME. */
static int resolve_at(const char *dir, const char *at, char *out, size_t len)
{
	time_t want = parse_at(at), best = -1;
	DIR *d = opendir(dir);
	struct dirent *c;

	if (!d) {
		fprintf(stderr, "fleecectl: restore: %s: %s\n", dir, error_text(errno));
		return EXIT_USAGE;
	}
	if (want == (time_t)-1) {
		closedir(d);
		fprintf(stderr, "fleecectl: restore: --at=%s: a label (20261201T030000Z), YYYY-mm-dd[ HH:MM[:SS]] "
				"(UTC) or @SECONDS\n", at);
		return EXIT_USAGE;
	}
	while ((c = readdir(d))) {
		char sub[PATH_MAX];
		if (label_time(c->d_name) == (time_t)-1 ||
		    snprintf(sub, sizeof(sub), "%s/%s", dir, c->d_name) >= (int)sizeof(sub))
			continue;
		DIR *chain = opendir(sub);
		struct dirent *p;
		while (chain && (p = readdir(chain))) {
			time_t t = label_time(p->d_name);
			size_t n = strlen(p->d_name);
			if (t == (time_t)-1 || n < 6 || strcmp(p->d_name + n - 6, ".qcow2") || t > want || t <= best)
				continue;
			best = t;
			snprintf(out, len, "%s/%s", sub, p->d_name);
		}
		if (chain)
			closedir(chain);
	}
	closedir(d);
	if (best == (time_t)-1) {
		fprintf(stderr, "fleecectl: restore: no point in %s at or before %s\n", dir, at);
		return EXIT_FAILED;
	}
	return EXIT_OK;
}

static int cmd_restore(struct options *o, int argc, char **argv)
{
	char point[PATH_MAX * 2];

	if (argc != 2)
		return usage_error(find_verb("restore"), "needs BACKUP and DEST");
	const char *backup = argv[0];
	if (o->at) {
		int rc = resolve_at(argv[0], o->at, point, sizeof(point));
		if (rc)
			return rc;
		printf("%s: the point for --at=%s\n", point, o->at);
		backup = point;
	}
	return (int)restore_backup(backup, argv[1], o->overwrite, stdout, stderr);
}

static const struct verb verbs[] = {
	{ "backup", cmd_backup, "[--wait] IMAGE TARGET [key=value ...]", true },
	{ "mirror", cmd_mirror, "[--wait] IMAGE TARGET [key=value ...]   (--wait: until ready)", true },
	{ "snapshot", cmd_snapshot, "NAME IMAGE... [max-store=SIZE]", true },
	{ "release", cmd_release, "NAME", true },
	{ "cancel", cmd_cancel, "ID", true },
	{ "pause", cmd_pause, "ID", true },
	{ "resume", cmd_resume, "ID", true },
	{ "complete", cmd_complete, "ID", true },
	{ "dismiss", cmd_dismiss, "ID", true },
	{ "set", cmd_set, "ID speed=RATE", true },
	{ "bitmap", cmd_bitmap, "add|remove|clear|enable|disable|merge IMAGE NAME ...", true },
	{ "txn", cmd_txn, "[--wait] [-f FILE|-] ['COMMAND' ...]", true },
	{ "status", cmd_status, "[--json] [ID...]", true },
	{ "list", cmd_list, "[--json]", true },
	{ "wait", cmd_wait, "[--json] [--ready] ID...", true },
	{ "events", cmd_events, "[--json] [-n COUNT]", true },
	{ "verify", cmd_verify, "[--json] TARGET...", false },
	{ "restore", cmd_restore, "[--overwrite] BACKUP DEST | --at=LABEL|TIME BACKUP_DIR DEST", false },
};

static const struct verb *find_verb(const char *name)
{
	for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++)
		if (!strcmp(verbs[i].name, name))
			return &verbs[i];
	return NULL;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: fleecectl [-m MOUNTPOINT] [--json] VERB [ARGS...]   (fleecectl VERB -h: its usage)\n");
	for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++)
		fprintf(f, "  %-9s %s\n", verbs[i].name, verbs[i].usage);
	fprintf(f, "Without -m: $FLEECE_MOUNT, else the only fleecefs mount.\n"
		   "Exit: 0 ok (--wait: the job completed; a mirror: is ready), 1 refused/failed/cancelled/damaged, 2 usage "
		   "(verify, restore: cannot check), 3 mount unreachable.\n");
}

/* Options may come before or after the verb, up to "--". */
static int take_option(struct options *o, const struct verb *v, int *i, int argc, char **argv, bool *help)
{
	const char *a = argv[*i];
	if (!strcmp(a, "--json"))
		o->json = true;
	else if (!strcmp(a, "--wait"))
		o->wait = true;
	else if (!strcmp(a, "--overwrite"))
		o->overwrite = true;
	else if (!strcmp(a, "--ready"))
		o->until_ready = true;
	else if (!strncmp(a, "--at=", 5))
		o->at = a + 5;
	else if (!strcmp(a, "-h") || !strcmp(a, "--help"))
		*help = true;
	else if ((!strcmp(a, "-m") || !strcmp(a, "-f") || !strcmp(a, "-n")) && *i + 1 < argc) {
		const char *val = argv[++*i];
		if (a[1] == 'm')
			o->mount_given = val;
		else if (a[1] == 'f')
			o->file = val;
		else if ((o->count = strtol(val, NULL, 10)) <= 0)
			return v ? usage_error(v, "-n %s: a count from 1", val) : EXIT_USAGE;
	} else {
		if (v)
			return usage_error(v, "unknown option %s", a);
		fprintf(stderr, "fleecectl: unknown option %s\n", a);
		usage(stderr);
		return EXIT_USAGE;
	}
	return -1;
}

int main(int argc, char **argv)
{
	struct options o = { 0 };
	const struct verb *v = NULL;
	char *args[argc > 0 ? argc : 1];
	int nargs = 0, rc;
	bool help = false, options_end = false;

	for (int i = 1; i < argc; i++) {
		if (!options_end && !strcmp(argv[i], "--")) {
			options_end = true;
		} else if (!options_end && argv[i][0] == '-' && argv[i][1]) {
			if (!v && !strcmp(argv[i], "--version")) {
				printf("fleecectl %s\n", PACKAGE_VERSION);
				return EXIT_OK;
			}
			if ((rc = take_option(&o, v, &i, argc, argv, &help)) >= 0)
				return rc;
		} else if (!v) {
			if (!(v = find_verb(argv[i]))) {
				fprintf(stderr, "fleecectl: %s: unknown command\n", argv[i]);
				usage(stderr);
				return EXIT_USAGE;
			}
		} else {
			args[nargs++] = argv[i];
		}
	}
	if (!v) {
		usage(help ? stdout : stderr);
		return help ? EXIT_OK : EXIT_USAGE;
	}
	if (help) {
		printf("usage: fleecectl [-m MOUNTPOINT] %s %s\n", v->name, v->usage);
		return EXIT_OK;
	}
	if (v->needs_mount) {
		char err[PATH_MAX + 200];
		int e = ctl_find_mount(o.mount_given, o.mount, sizeof(o.mount), err, sizeof(err));
		if (e) {
			fprintf(stderr, "fleecectl: %s\n", err);
			return e == -EINVAL ? EXIT_USAGE : EXIT_UNREACHABLE;
		}
	}
	return v->run(&o, nargs, args);
}
