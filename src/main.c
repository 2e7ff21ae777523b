/* fleecefs: options, mount, signals, clean shutdown. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include "fleecefs/bitmap.h"
#include "fleecefs/ctlfs.h"
#include "fleecefs/daemon.h"
#include "fleecefs/fs.h"
#include "fleecefs/inject.h"
#include "fleecefs/job.h"
#include "fleecefs/manifest.h"
#include "fleecefs/pending.h"
#include "fleecefs/redirect.h"
#include "fleecefs/util.h"
#include "fleecefs/uring.h"

#define DEFAULT_THREADS 32
#define MAX_THREADS 1024

struct options {
	char *source;
	char *mountpoint;
	char *extra_arg;
	char *state_dir;
	char *cluster_size;
	char *threads;
	char *uring;
	int debug;
	int show_version;
	int show_help;
};

enum { KEY_DEBUG, KEY_VERSION, KEY_HELP };

static const struct fuse_opt option_spec[] = {
	{ "state_dir=%s", offsetof(struct options, state_dir), 0 },
	{ "cluster_size=%s", offsetof(struct options, cluster_size), 0 },
	{ "threads=%s", offsetof(struct options, threads), 0 },
	{ "uring=%s", offsetof(struct options, uring), 0 },
	FUSE_OPT_KEY("-d", KEY_DEBUG),
	FUSE_OPT_KEY("--debug", KEY_DEBUG),
	FUSE_OPT_KEY("-V", KEY_VERSION),
	FUSE_OPT_KEY("--version", KEY_VERSION),
	FUSE_OPT_KEY("-h", KEY_HELP),
	FUSE_OPT_KEY("--help", KEY_HELP),
	FUSE_OPT_END
};

static int option_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
	struct options *o = data;

	(void)outargs;
	switch (key) {
	case KEY_DEBUG:
		o->debug = 1;
		return 0;
	case KEY_VERSION:
		o->show_version = 1;
		return 0;
	case KEY_HELP:
		o->show_help = 1;
		return 0;
	case FUSE_OPT_KEY_NONOPT:
		/* Both paths are ours to check (libfuse would print its own
		 * message for a bad mount point). */
		if (!o->source)
			o->source = strdup(arg);
		else if (!o->mountpoint)
			o->mountpoint = strdup(arg);
		else if (!o->extra_arg)
			o->extra_arg = strdup(arg);
		return 0;
	default:
		return 1;
	}
}

static void usage(const char *prog)
{
	printf("usage: %s [options] SOURCE_DIR MOUNTPOINT\n\n"
	       "Mirrors the disk images in SOURCE_DIR at MOUNTPOINT and takes live,\n"
	       "point-in-time backups of them, driven through MOUNTPOINT/.fleece/ctl.\n\n"
	       "options:\n"
	       "    -f                     stay in the foreground, log to stderr\n"
	       "    -d                     debug log (implies -f)\n"
	       "    -s                     single-threaded (debugging only)\n"
	       "    -o state_dir=DIR       persistent state (default SOURCE_DIR/.fleecefs)\n"
	       "    -o cluster_size=SIZE   copy granularity, power of two 4K..16M (default 64K)\n"
	       "    -o threads=N           FUSE worker threads (default %d); copy workers\n"
	       "                           per job are N/16, between 1 and 4\n"
	       "    -o uring=off|auto|on   FUSE requests over io_uring (default off;\n"
	       "                           auto: where the kernel allows it)\n"
	       "    -o OPT[,OPT...]        FUSE mount options (allow_other, ...)\n"
	       "    -V, --version          print the version\n"
	       "    -h, --help             print this help\n\n"
	       "See fleecefs(8) and fleecefs-control(5).\n",
	       prog, DEFAULT_THREADS);
}

static int die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "fleecefs: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return 1;
}

/* libfuse's own messages, in our format: one line, our name. libfuse may
 * print one message in several calls; lines are assembled first. Messages
 * come from the main thread before the session runs and rarely after. */
static void fuse_log_to_ours(enum fuse_log_level level, const char *fmt, va_list ap)
{
	static char line[1024];
	size_t n = strlen(line);

	vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	n = strlen(line);
	if (n + 1 < sizeof(line) && (n == 0 || line[n - 1] != '\n'))
		return;
	while (n && line[n - 1] == '\n')
		line[--n] = '\0';
	const char *text = strncmp(line, "fuse: ", 6) == 0 ? line + 6 : line;
	if (level <= FUSE_LOG_ERR)
		log_error("%s", text);
	else if (level <= FUSE_LOG_NOTICE)
		log_info("%s", text);
	else
		log_debug("%s", text);
	line[0] = '\0';
}

static char *absolute_dir(const char *what, const char *path, int *rc)
{
	struct stat st;
	char *real;

	if (stat(path, &st) < 0) {
		*rc = die("%s %s: %s", what, path, error_text(errno));
		return NULL;
	}
	if (!S_ISDIR(st.st_mode)) {
		*rc = die("%s %s: not a directory", what, path);
		return NULL;
	}
	real = realpath(path, NULL);
	if (!real)
		*rc = die("%s %s: %s", what, path, error_text(errno));
	return real;
}

static bool path_is_inside(const char *inner, const char *outer)
{
	size_t n = strlen(outer);
	if (strcmp(outer, "/") == 0)
		return true;
	return strncmp(inner, outer, n) == 0 && (inner[n] == '/' || inner[n] == '\0');
}

/* The state directory holds bitmaps, chain records and the frozen old data
 * of snapshots: nobody but the daemon's user may look in. One created
 * earlier (by hand, by an older version, under another umask) may be open to
 * others: close it if it is ours, else refuse to use it. */
static int tighten_state_dir(const char *path)
{
	struct stat st;
	int rc = 0;
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0)
		return die("state_dir %s: %s", path, error_text(errno));
	if (fstat(fd, &st) < 0) {
		rc = die("state_dir %s: %s", path, error_text(errno));
	} else if (st.st_mode & 077) {
		mode_t mode = st.st_mode & 07777;
		if (st.st_uid != geteuid())
			rc = die("state_dir %s: mode %04o lets others in, and it belongs to uid %u, not to us: "
				 "make it mode 0700", path, (unsigned)mode, (unsigned)st.st_uid);
		else if (fchmod(fd, 0700) < 0)
			rc = die("state_dir %s: cannot change mode %04o to 0700: %s", path, (unsigned)mode,
				 error_text(errno));
		else
			log_info("state_dir %s: mode %04o let others in; changed to 0700", path, (unsigned)mode);
	}
	close(fd);
	return rc;
}

/* Creates the state directory if needed, keeps others out of it and proves
 * it is writable. */
static int prepare_state_dir(struct fleece_daemon *d, const char *requested)
{
	char *path = NULL;
	struct stat st;
	int rc = 0;

	if (requested)
		path = strdup(requested);
	else if (asprintf(&path, "%s/.fleecefs", d->source_dir) < 0)
		path = NULL;
	if (!path)
		return die("out of memory");
	if (mkdir(path, 0700) < 0 && errno != EEXIST) {
		rc = die("state_dir %s: cannot create: %s", path, error_text(errno));
		free(path);
		return rc;
	}
	d->state_dir = absolute_dir("state_dir", path, &rc);
	free(path);
	if (!d->state_dir)
		return rc;
	if (strcmp(d->state_dir, d->source_dir) == 0)
		return die("state_dir %s: must not be SOURCE_DIR itself", d->state_dir);
	if (path_is_inside(d->state_dir, d->mountpoint))
		return die("state_dir %s: lies inside MOUNTPOINT %s", d->state_dir, d->mountpoint);
	if ((rc = tighten_state_dir(d->state_dir)))
		return rc;
	char probe[PATH_MAX];
	snprintf(probe, sizeof(probe), "%s/.write-test-%d", d->state_dir, (int)getpid());
	int fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return die("state_dir %s: not writable: %s", d->state_dir, error_text(errno));
	close(fd);
	unlink(probe);
	if (stat(d->state_dir, &st) < 0)
		return die("state_dir %s: %s", d->state_dir, error_text(errno));
	d->state_dev = st.st_dev;
	d->state_ino = st.st_ino;
	return 0;
}

/* Copy-before-write stores only mean something to the daemon that made them:
 * after a crash they are garbage. Removes STATE_DIR/snapshots/NAME/N.store
 * and STATE_DIR/fleecing/ID.store (and the emptied directories). */
static void remove_stale_stores(const char *state_dir)
{
	char dir[PATH_MAX], path[PATH_MAX + 256];

	/* snapshots/NAME/N.store */
	snprintf(dir, sizeof(dir), "%s/snapshots", state_dir);
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
	for (struct dirent *e; d && (e = readdir(d));) {
		if (e->d_name[0] == '.')
			continue;
		int sub_fd = openat(dirfd(d), e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		DIR *sub = sub_fd >= 0 ? fdopendir(sub_fd) : NULL;
		for (struct dirent *f; sub && (f = readdir(sub));)
			if (f->d_name[0] != '.')
				unlinkat(dirfd(sub), f->d_name, 0);
		if (sub)
			closedir(sub);
		unlinkat(dirfd(d), e->d_name, AT_REMOVEDIR);
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		log_info("removed snapshot store %s, left over from an earlier run", path);
	}
	if (d)
		closedir(d);
	/* fleecing/ID.store */
	snprintf(dir, sizeof(dir), "%s/fleecing", state_dir);
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	d = fd >= 0 ? fdopendir(fd) : NULL;
	for (struct dirent *e; d && (e = readdir(d));) {
		if (e->d_name[0] == '.')
			continue;
		unlinkat(dirfd(d), e->d_name, 0);
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		log_info("removed fleecing store %s, left over from an earlier run", path);
	}
	if (d)
		closedir(d);
}

static bool is_mount_point(const char *path)
{
	struct stat here, parent;
	char up[PATH_MAX];

	if (strcmp(path, "/") == 0)
		return true;
	snprintf(up, sizeof(up), "%s/..", path);
	if (stat(path, &here) < 0 || stat(up, &parent) < 0)
		return false;
	return here.st_dev != parent.st_dev || here.st_ino == parent.st_ino;
}

/* The device number of our own mount, from mountinfo, so that the daemon can
 * recognise paths inside itself without asking itself. */
static dev_t find_mount_dev(const char *mountpoint)
{
	FILE *f = fopen("/proc/self/mountinfo", "r");
	char line[4096];
	dev_t found = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		unsigned major, minor;
		char where[PATH_MAX], decoded[PATH_MAX];
		if (sscanf(line, "%*u %*u %u:%u %*s %4095s", &major, &minor, where) != 3)
			continue;
		/* mountinfo escapes blanks and backslashes as \ooo. */
		size_t j = 0;
		for (size_t i = 0; where[i] && j + 1 < sizeof(decoded); i++) {
			if (where[i] == '\\' && where[i + 1] && where[i + 2] && where[i + 3]) {
				decoded[j++] = (char)((where[i + 1] - '0') * 64 + (where[i + 2] - '0') * 8 + (where[i + 3] - '0'));
				i += 3;
			} else {
				decoded[j++] = where[i];
			}
		}
		decoded[j] = '\0';
		if (strcmp(decoded, mountpoint) == 0 && strstr(line, " - fuse"))
			found = makedev(major, minor);
	}
	fclose(f);
	return found;
}

static enum uring_mode uring_mode;

/* -o cluster_size=, threads= and uring=, into d (uring_mode). 0 or 1 (after a message). */
static int apply_settings(struct fleece_daemon *d, const struct options *opts)
{
	uint64_t value;

	d->cluster_size = FLEECE_DEFAULT_CLUSTER_SIZE;
	if (opts->cluster_size) {
		if (parse_size(opts->cluster_size, &value) || !is_power_of_two(value) || value < 4096 ||
		    value > (16u << 20))
			return die("cluster_size=%s: must be a power of two from 4K to 16M", opts->cluster_size);
		d->cluster_size = (uint32_t)value;
	}
	d->threads = DEFAULT_THREADS;
	if (opts->threads) {
		if (parse_u64(opts->threads, &value) || value < 1 || value > MAX_THREADS)
			return die("threads=%s: must be a number from 1 to %d", opts->threads, MAX_THREADS);
		d->threads = (unsigned)value;
	}
	uring_mode = URING_OFF;
	if (opts->uring) {
		if (uring_parse_mode(opts->uring, &uring_mode) < 0)
			return die("uring=%s: must be on, off or auto", opts->uring);
		const char *why = uring_mode == URING_ON ? uring_unavailable() : NULL;
		if (why)
			return die("uring=on: %s", why);
	}
	unsigned workers = d->threads / 16;
	d->copy_workers = workers < 1 ? 1 : workers > FLEECE_MAX_COPY_WORKERS ? FLEECE_MAX_COPY_WORKERS : workers;
	return 0;
}

/* SOURCE_DIR and MOUNTPOINT: real directories, one not inside the other,
 * nothing mounted on the mount point. 0 or 1 (after a message). */
static int check_paths(struct fleece_daemon *d, const struct options *opts)
{
	int rc = 1;

	if (!(d->source_dir = absolute_dir("SOURCE_DIR", opts->source, &rc)) ||
	    !(d->mountpoint = absolute_dir("MOUNTPOINT", opts->mountpoint, &rc)))
		return rc;
	if (path_is_inside(d->mountpoint, d->source_dir))
		return die("MOUNTPOINT %s lies inside SOURCE_DIR %s", d->mountpoint, d->source_dir);
	if (is_mount_point(d->mountpoint))
		return die("MOUNTPOINT %s is busy: something is already mounted there", d->mountpoint);
	d->source_fd = open(d->source_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (d->source_fd < 0)
		return die("SOURCE_DIR %s: %s", d->source_dir, error_text(errno));
	return 0;
}

/* The FUSE session, with the mount options we always add; it checks the
 * remaining -o options (libfuse says which it does not know) before
 * anything is created on disk. */
static struct fuse_session *new_session(struct fuse_args *args, struct fleece_daemon *d)
{
	char fsname[PATH_MAX + 16];

	snprintf(fsname, sizeof(fsname), "-ofsname=%s", d->source_dir);
	/* Permission checks by the kernel against the source's modes; without
	 * this, allow_other would let anyone write any image. */
	if (fuse_opt_add_arg(args, "-odefault_permissions") || fuse_opt_add_arg(args, "-osubtype=fleecefs") ||
	    fuse_opt_add_arg(args, fsname)) {
		die("out of memory");
		return NULL;
	}
	return fuse_session_new(args, &fs_operations, sizeof(fs_operations), d);
}

/* The state directory, and what earlier runs left in it. 0 or 1. */
static int open_state(struct fleece_daemon *d, const struct options *opts)
{
	int rc = prepare_state_dir(d, opts->state_dir);
	if (rc)
		return rc;
	remove_stale_stores(d->state_dir);
	if (pending_setup(d->state_dir) < 0)
		return die("state_dir %s: cannot create %s/pending: %s", d->state_dir, d->state_dir, error_text(errno));
	if ((rc = manifest_set_state_dir(d->state_dir)) < 0)
		return die("state_dir %s: cannot create %s/nbd: %s", d->state_dir, d->state_dir, error_text(-rc));
	/* What a crash left half done: finished or undone before anything runs. */
	pending_recover(d->state_dir);
	return 0;
}

/* The modules that serve the mount, then the mount itself. 0 or 1. */
static int start_serving(struct fuse_session *se, struct fleece_daemon *d, bool foreground, bool debug)
{
	d->owner_uid = getuid();
	d->owner_gid = getgid();
	d->started_ns = clock_realtime_ns();
	/* The kernel applies the caller's umask; ours must not apply twice. */
	umask(0);
	log_setup(foreground || debug, debug);
	if (fs_setup(d) < 0)
		return die("SOURCE_DIR %s: %s", d->source_dir, error_text(errno));
	ctlfs_init(d);
	char msg[512];
	/* Before anything opens an image: a switched one is served from its
	 * mirror's target. */
	if (redirect_load(d->state_dir, msg, sizeof(msg)) < 0)
		return die("state_dir %s: cannot load the switched images: %s", d->state_dir, msg);
	if (bitmaps_start(d->state_dir, d->source_fd, d->source_dir, d->cluster_size) < 0)
		return die("state_dir %s: cannot load the dirty bitmaps: %s", d->state_dir, error_text(errno));
	if (fuse_set_signal_handlers(se) != 0)
		return die("cannot install signal handlers");
	if (fuse_session_mount(se, d->mountpoint) != 0) {
		fuse_remove_signal_handlers(se);
		return die("MOUNTPOINT %s: cannot mount (is /dev/fuse usable? see above)", d->mountpoint);
	}
	d->mount_dev = find_mount_dev(d->mountpoint);
	if (uring_install(se, uring_mode, d->threads) < 0) {
		fuse_session_unmount(se);
		fuse_remove_signal_handlers(se);
		return die("MOUNTPOINT %s: cannot serve it over io_uring (see above)", d->mountpoint);
	}
	if (fuse_daemonize(foreground || debug) != 0) {
		fuse_session_unmount(se);
		fuse_remove_signal_handlers(se);
		return die("cannot go to the background");
	}
	/* Threads only now: the background daemon is a fork, which keeps none
	 * but the one that called it. */
	bitmaps_start_saver();
	log_info("serving %s at %s (state_dir %s, cluster_size %u, threads %u)", d->source_dir, d->mountpoint,
		 d->state_dir, d->cluster_size, d->threads);
	return 0;
}

/* Serves FUSE requests until unmounted or signalled; the loop's status. */
static int serve(struct fuse_session *se, const struct fuse_cmdline_opts *cli, unsigned threads)
{
	if (cli->singlethread)
		return fuse_session_loop(se);
	struct fuse_loop_config *cfg = fuse_loop_cfg_create();
	fuse_loop_cfg_set_clone_fd(cfg, 1);
	fuse_loop_cfg_set_max_threads(cfg, threads);
	/* Idle workers are never destroyed (the default): a guest's next burst
	 * should not pay for thread creation. */
	if (cli->max_idle_threads != UINT_MAX)
		fuse_loop_cfg_set_idle_threads(cfg, cli->max_idle_threads);
	int rc = fuse_session_loop_mt(se, cfg);
	fuse_loop_cfg_destroy(cfg);
	return rc;
}

/* Clean stop: every guest request has been answered. Jobs end as cancelled
 * (their new targets removed, incrementals rolled back, always-mode
 * partials kept), parked event reads end, what the guests wrote is made
 * durable, the mount goes. The exit status. */
static int stop_serving(struct fuse_session *se, const struct fleece_daemon *d, int loop_rc)
{
	/* Nothing more is served, over /dev/fuse or the rings, before the jobs
	 * end and the bitmaps are saved. */
	uring_quiesce();
	log_info("stopping: cancelling jobs");
	job_cancel_all_and_wait();
	/* After the jobs: they hand their bitmaps back first. */
	bitmaps_stop();
	ctlfs_shutdown();
	int sync_fd = open(d->source_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (sync_fd < 0 || syncfs(sync_fd) < 0)
		log_warn("syncfs %s: %s", d->source_dir, error_text(errno));
	if (sync_fd >= 0)
		close(sync_fd);
	fuse_session_unmount(se);
	/* The rings hold /dev/fuse open until they stop: only then does the
	 * kernel end the connection. */
	uring_stop();
	fuse_remove_signal_handlers(se);
	int rc = loop_rc < 0 && loop_rc != -EINTR ? 1 : 0;
	if (rc)
		log_error("session ended with %s", error_text(-loop_rc));
	else
		log_info("unmounted %s", d->mountpoint);
	return rc;
}

static void free_options(struct options *opts)
{
	free(opts->source);
	free(opts->mountpoint);
	free(opts->extra_arg);
	free(opts->state_dir);
	free(opts->cluster_size);
	free(opts->threads);
	free(opts->uring);
}

/* The command line into opts and cli: 0, 1 (bad), or -1 (done: help or
 * version printed). */
static int parse_command_line(struct fuse_args *args, struct options *opts, struct fuse_cmdline_opts *cli,
			      const char *prog)
{
	if (fuse_opt_parse(args, opts, option_spec, option_proc) != 0)
		return die("bad options (see fleecefs --help)");
	if (opts->show_help || opts->show_version) {
		if (opts->show_help)
			usage(prog);
		else
			printf("fleecefs %s (libfuse %s)\n", PACKAGE_VERSION, fuse_pkgversion());
		return -1;
	}
	if (fuse_parse_cmdline(args, cli) != 0)
		return die("bad options (see fleecefs --help)");
	if (!opts->source || !opts->mountpoint)
		return die("SOURCE_DIR and MOUNTPOINT are required (see fleecefs --help)");
	if (opts->extra_arg)
		return die("unexpected argument '%s' after MOUNTPOINT", opts->extra_arg);
	return 0;
}

int main(int argc, char *argv[])
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	struct fuse_cmdline_opts cli = { 0 };
	struct options opts = { 0 };
	struct fleece_daemon d = { .source_fd = -1 };
	struct fuse_session *se = NULL;
	int rc;

	log_setup(true, false);
	fuse_set_log_func(fuse_log_to_ours);
	rc = parse_command_line(&args, &opts, &cli, argv[0]);
	if (rc < 0)
		rc = 0;
	else if (!rc && !(rc = apply_settings(&d, &opts)) && !(rc = check_paths(&d, &opts)) &&
		 (se = new_session(&args, &d)) && !(rc = open_state(&d, &opts)) &&
		 !(rc = start_serving(se, &d, cli.foreground, opts.debug)))
		rc = stop_serving(se, &d, serve(se, &cli, d.threads));
	else if (!rc)
		rc = 1;   /* the session could not be made (libfuse said why) */
	bitmaps_stop();     /* a no-op after a clean stop */
	if (se)
		fuse_session_destroy(se);
	ctlfs_teardown();
	job_free_all();
	inject_clear();
	fs_teardown();
	redirect_free_all();
	if (d.source_fd >= 0)
		close(d.source_fd);
	free(d.source_dir);
	free(d.mountpoint);
	free(d.state_dir);
	free_options(&opts);
	free(cli.mountpoint);
	fuse_opt_free_args(&args);
	return rc;
}
