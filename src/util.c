/* util: see include/fleecefs/util.h */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "fleecefs/util.h"

int parse_u64(const char *text, uint64_t *out)
{
	uint64_t value = 0;
	const char *p = text;

	if (!text || !isdigit((unsigned char)*p))
		return -EINVAL;
	for (; isdigit((unsigned char)*p); p++) {
		unsigned digit = (unsigned)(*p - '0');
		if (value > (UINT64_MAX - digit) / 10)
			return -ERANGE;
		value = value * 10 + digit;
	}
	if (*p)
		return -EINVAL;
	*out = value;
	return 0;
}

int parse_size(const char *text, uint64_t *out)
{
	char digits[32];
	size_t len;
	unsigned shift = 0;
	uint64_t value;
	int rc;

	if (!text)
		return -EINVAL;
	len = strlen(text);
	if (len == 0)
		return -EINVAL;
	/* Digits and one suffix, or it is not a size at all (whatever its length). */
	if (strspn(text, "0123456789") < len - 1 || !isdigit((unsigned char)text[0]))
		return -EINVAL;
	if (len >= sizeof(digits))
		return -ERANGE;
	memcpy(digits, text, len + 1);
	switch (digits[len - 1]) {
	case 'k': case 'K': shift = 10; break;
	case 'm': case 'M': shift = 20; break;
	case 'g': case 'G': shift = 30; break;
	case 't': case 'T': shift = 40; break;
	default: break;
	}
	if (shift)
		digits[--len] = '\0';
	rc = parse_u64(digits, &value);
	if (rc)
		return rc;
	if (shift && value > (UINT64_MAX >> shift))
		return -ERANGE;
	*out = value << shift;
	return 0;
}

bool name_is_valid(const char *name)
{
	size_t len = 0;

	if (!name || name[0] == '.' || name[0] == '\0')
		return false;
	for (; name[len]; len++) {
		unsigned char c = (unsigned char)name[len];
		if (!(isalnum(c) || c == '.' || c == '_' || c == '-'))
			return false;
		if (len >= FLEECE_NAME_MAX)
			return false;
	}
	return true;
}

/* Logging: written once by main before threads start, read-only afterwards. */
static bool log_to_stderr = true;
static bool log_debug_enabled;

void log_setup(bool to_stderr, bool debug)
{
	log_to_stderr = to_stderr;
	log_debug_enabled = debug;
	if (!to_stderr)
		openlog("fleecefs", LOG_PID, LOG_DAEMON);
}

void log_msg(enum log_level level, const char *fmt, ...)
{
	static const int syslog_levels[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
	static const char *const prefixes[] = { "error: ", "warning: ", "", "debug: " };
	char line[1024];
	va_list ap;

	if (level == LOG_LEVEL_DEBUG && !log_debug_enabled)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (log_to_stderr)
		fprintf(stderr, "fleecefs: %s%s\n", prefixes[level], line);
	else
		syslog(syslog_levels[level], "%s", line);
}

static uint64_t clock_ns(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t clock_monotonic_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
uint64_t clock_realtime_ns(void) { return clock_ns(CLOCK_REALTIME); }

void timespec_from_ns(struct timespec *ts, uint64_t ns)
{
	ts->tv_sec = (time_t)(ns / 1000000000ull);
	ts->tv_nsec = (long)(ns % 1000000000ull);
}

void sleep_until_ns(uint64_t deadline_ns)
{
	struct timespec ts;
	timespec_from_ns(&ts, deadline_ns);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

int cond_init_monotonic(void *cond)
{
	pthread_condattr_t attr;
	int rc;

	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	rc = pthread_cond_init((pthread_cond_t *)cond, &attr);
	pthread_condattr_destroy(&attr);
	return -rc;
}

void strbuf_printf(struct strbuf *sb, const char *fmt, ...)
{
	va_list ap;
	int need;

	if (sb->failed)
		return;
	for (;;) {
		size_t room = sb->cap - sb->len;
		va_start(ap, fmt);
		need = vsnprintf(sb->data ? sb->data + sb->len : NULL, room, fmt, ap);
		va_end(ap);
		if (need < 0) {
			sb->failed = true;
			return;
		}
		if ((size_t)need < room) {
			sb->len += (size_t)need;
			return;
		}
		size_t cap = sb->cap ? sb->cap * 2 : 256;
		while (cap < sb->len + (size_t)need + 1)
			cap *= 2;
		char *grown = realloc(sb->data, cap);
		if (!grown) {
			sb->failed = true;
			return;
		}
		sb->data = grown;
		sb->cap = cap;
	}
}

void strbuf_free(struct strbuf *sb)
{
	free(sb->data);
	*sb = (struct strbuf){ 0 };
}

char *strbuf_steal(struct strbuf *sb)
{
	char *text = sb->data;
	if (!text && !sb->failed)
		text = strdup("");
	*sb = (struct strbuf){ 0 };
	return text;
}

void proc_fd_path(char *buf, size_t len, int fd)
{
	snprintf(buf, len, "/proc/self/fd/%d", fd);
}

const char *error_text(int errnum)
{
	static __thread char buf[128];
	return strerror_r(errnum, buf, sizeof(buf));
}

int set_error(char *err, size_t errlen, int errnum, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -errnum;
}

ssize_t pread_full(int fd, void *buf, size_t len, uint64_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			break;
		done += (size_t)n;
	}
	return (ssize_t)done;
}

ssize_t pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		done += (size_t)n;
	}
	return (ssize_t)done;
}

bool buffer_is_zero(const void *buf, size_t len)
{
	const unsigned char *p = buf;
	size_t head = (uintptr_t)p % sizeof(uint64_t);

	if (head) {
		head = sizeof(uint64_t) - head;
		for (; head && len; head--, len--, p++)
			if (*p)
				return false;
	}
	const uint64_t *w = (const uint64_t *)(const void *)p;
	for (; len >= 4 * sizeof(uint64_t); len -= 4 * sizeof(uint64_t), w += 4)
		if (w[0] | w[1] | w[2] | w[3])
			return false;
	p = (const unsigned char *)w;
	for (; len; len--, p++)
		if (*p)
			return false;
	return true;
}

struct thread_buffers {
	void *data[THREAD_BUFFER_SLOTS];
	size_t len[THREAD_BUFFER_SLOTS];
};

static pthread_key_t buffers_key;
static pthread_once_t buffers_once = PTHREAD_ONCE_INIT;

static void free_thread_buffers(void *p)
{
	struct thread_buffers *tb = p;
	for (int i = 0; i < THREAD_BUFFER_SLOTS; i++)
		free(tb->data[i]);
	free(tb);
}

static void make_buffers_key(void)
{
	pthread_key_create(&buffers_key, free_thread_buffers);
}

void *thread_buffer(enum thread_buffer_slot slot, size_t len)
{
	struct thread_buffers *tb;

	pthread_once(&buffers_once, make_buffers_key);
	tb = pthread_getspecific(buffers_key);
	if (!tb) {
		tb = calloc(1, sizeof(*tb));
		if (!tb || pthread_setspecific(buffers_key, tb)) {
			free(tb);
			return NULL;
		}
	}
	if (tb->len[slot] < len) {
		void *p;
		size_t want = len < 65536 ? 65536 : len;
		if (posix_memalign(&p, 4096, want))
			return NULL;
		free(tb->data[slot]);
		tb->data[slot] = p;
		tb->len[slot] = want;
	}
	return tb->data[slot];
}

int write_file_atomic(const char *path, const void *data, size_t len, bool sync_dir)
{
	char tmp[PATH_MAX], dir[PATH_MAX];
	const char *slash = strrchr(path, '/');
	int fd, rc = 0;

	if (!slash || snprintf(tmp, sizeof(tmp), "%.*s/.%s.tmp", (int)(slash - path), path, slash + 1) >= (int)sizeof(tmp))
		return -ENAMETOOLONG;
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	if (pwrite_full(fd, data, len, 0) < 0 || fdatasync(fd) < 0)
		rc = errno ? -errno : -EIO;
	close(fd);
	if (!rc && rename(tmp, path) < 0)
		rc = -errno;
	if (rc || !sync_dir) {
		if (rc)
			unlink(tmp);
		return rc;
	}
	snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
	if (!dir[0])
		snprintf(dir, sizeof(dir), "/");
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd >= 0) {
		if (fsync(fd) < 0 && errno != EINVAL)
			rc = -errno;
		close(fd);
	}
	return rc;
}
