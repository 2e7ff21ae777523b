/* util: size parsing, names, logging, clocks, small string buffers.
 *
 * Owns: the process-wide log settings (set once by main before any thread).
 * Locking: none; every function is thread-safe (logging goes through stdio's
 * or syslog's own locking).
 * Errors: parsers return 0 or -errno (-EINVAL bad syntax, -ERANGE overflow).
 */
#ifndef FLEECEFS_UTIL_H
#define FLEECEFS_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

#define FLEECE_NAME_MAX 64

/* "123", "64K", "1M", "2G", "1T" (powers of 1024; lower case accepted). */
int parse_size(const char *text, uint64_t *out);
/* Unsigned decimal without suffix. */
int parse_u64(const char *text, uint64_t *out);
/* Job, snapshot and bitmap names: 1..64 of [A-Za-z0-9._-], not starting with '.'. */
bool name_is_valid(const char *name);
static inline bool is_power_of_two(uint64_t v) { return v && !(v & (v - 1)); }
static inline unsigned log2_u64(uint64_t v) { return 63u - (unsigned)__builtin_clzll(v); }
static inline uint64_t div_round_up(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
static inline uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static inline uint64_t max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }

enum log_level { LOG_LEVEL_ERROR, LOG_LEVEL_WARNING, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG };
/* to_stderr: foreground (stderr) or daemon (syslog). */
void log_setup(bool to_stderr, bool debug);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_error(...) log_msg(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LEVEL_WARNING, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__)

uint64_t clock_monotonic_ns(void);
uint64_t clock_realtime_ns(void);
/* Sleep until the monotonic clock reaches deadline_ns. */
void sleep_until_ns(uint64_t deadline_ns);
/* For pthread_cond_timedwait on a CLOCK_MONOTONIC condition variable. */
struct timespec;
void timespec_from_ns(struct timespec *ts, uint64_t ns);
int cond_init_monotonic(void *cond /* pthread_cond_t */);

/* A growable string buffer for status texts and answers. On allocation failure
 * it stays truncated and sets .failed; callers report -ENOMEM once. */
struct strbuf {
	char *data;
	size_t len, cap;
	bool failed;
};
void strbuf_printf(struct strbuf *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void strbuf_free(struct strbuf *sb);
/* Takes the text out of the buffer (never NULL unless failed); buffer is reset. */
char *strbuf_steal(struct strbuf *sb);

/* Orders files by (st_dev, st_ino): -1, 0 or 1 (for tsearch trees). */
static inline int compare_file_ids(dev_t dev_a, ino_t ino_a, dev_t dev_b, ino_t ino_b)
{
	if (dev_a != dev_b)
		return dev_a < dev_b ? -1 : 1;
	return ino_a < ino_b ? -1 : ino_a > ino_b;
}
/* Is st the file (dev, ino)? (Record fields are often 64-bit.) */
static inline bool stat_is(const struct stat *st, uint64_t dev, uint64_t ino)
{
	return (uint64_t)st->st_dev == dev && (uint64_t)st->st_ino == ino;
}
/* "/proc/self/fd/FD" into buf: the path that reopens a descriptor. */
void proc_fd_path(char *buf, size_t len, int fd);

/* strerror for any thread (a per-thread buffer, valid until its next call). */
const char *error_text(int errnum);

/* snprintf into a fixed error buffer; always returns -err so call sites read
 * `return set_error(err, errlen, EINVAL, "...")`. */
int set_error(char *err, size_t errlen, int errnum, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* pread/pwrite that loop over short transfers; return bytes or -errno. */
ssize_t pread_full(int fd, void *buf, size_t len, uint64_t off);
ssize_t pwrite_full(int fd, const void *buf, size_t len, uint64_t off);

/* Replaces the file `path` atomically with `len` bytes of data: written to
 * DIR/.NAME.tmp, fdatasync'ed, renamed over it, and with `sync_dir` the
 * directory synced too. 0 or -errno (nothing changed on failure). */
int write_file_atomic(const char *path, const void *data, size_t len, bool sync_dir);

/* True when every byte of buf is zero (fast for large aligned buffers). */
bool buffer_is_zero(const void *buf, size_t len);



/* Per-thread, page-aligned scratch buffers that live as long as the thread:
 * the guest I/O path, the copy path and a compressing writer each get their
 * own, so a guest write that copies before it writes, or a compressed run,
 * needs no allocation. Returns NULL on ENOMEM. */
enum thread_buffer_slot { THREAD_BUFFER_GUEST, THREAD_BUFFER_COPY, THREAD_BUFFER_COMPRESS, THREAD_BUFFER_SLOTS };
void *thread_buffer(enum thread_buffer_slot slot, size_t len);

#endif
