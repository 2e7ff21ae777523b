/* ctlclient: see include/fleecefs/ctlclient.h */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fleecefs/ctlclient.h"
#include "fleecefs/util.h"

/* /proc/self/mounts escapes blanks and backslashes as \ooo. */
static void unescape_mount_field(char *s)
{
	char *out = s;
	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' && s[3] >= '0' &&
		    s[3] <= '7') {
			*out++ = (char)((s[1] - '0') << 6 | (s[2] - '0') << 3 | (s[3] - '0'));
			s += 3;
		} else {
			*out++ = *s;
		}
	}
	*out = '\0';
}

static int check_mount(const char *mount, char *err, size_t errlen)
{
	char ctl[PATH_MAX];
	struct stat st;

	snprintf(ctl, sizeof(ctl), "%s/.fleece/ctl", mount);
	if (stat(ctl, &st) < 0)
		return set_error(err, errlen, ENOTCONN, "%s: not a fleecefs mount, or not reachable (%s: %s)", mount,
				 ctl, error_text(errno));
	return 0;
}

int ctl_find_mount(const char *given, char *out, size_t len, char *err, size_t errlen)
{
	const char *env = getenv("FLEECE_MOUNT");

	if (!given && env && *env)
		given = env;
	if (given) {
		if (snprintf(out, len, "%s", given) >= (int)len)
			return set_error(err, errlen, ENAMETOOLONG, "%s: name too long", given);
		return check_mount(out, err, errlen);
	}
	FILE *f = fopen("/proc/self/mounts", "re");
	if (!f)
		return set_error(err, errlen, errno, "/proc/self/mounts: %s (give -m MOUNTPOINT)", error_text(errno));
	char line[4096], found[PATH_MAX] = "";
	struct strbuf all = { 0 };
	unsigned n = 0;
	while (fgets(line, sizeof(line), f)) {
		char *save, *src = strtok_r(line, " ", &save), *dir = strtok_r(NULL, " ", &save),
			    *type = strtok_r(NULL, " ", &save);
		if (!src || !dir || !type || strcmp(type, "fuse.fleecefs"))
			continue;
		unescape_mount_field(dir);
		snprintf(found, sizeof(found), "%s", dir);
		strbuf_printf(&all, "%s%s", n++ ? ", " : "", dir);
	}
	fclose(f);
	int rc = 0;
	if (n == 0)
		rc = set_error(err, errlen, ENOENT, "no fleecefs mount found (give -m MOUNTPOINT or set FLEECE_MOUNT)");
	else if (n > 1)
		rc = set_error(err, errlen, EINVAL, "%u fleecefs mounts (%s): say which with -m MOUNTPOINT", n,
			       all.data ? all.data : "");
	else if (snprintf(out, len, "%s", found) >= (int)len)
		rc = set_error(err, errlen, ENAMETOOLONG, "%s: name too long", found);
	else
		rc = check_mount(out, err, errlen);
	strbuf_free(&all);
	return rc;
}

int ctl_send(const char *mount, const char *text, char *answer, size_t len, int *refused, char *err,
	     size_t errlen)
{
	char path[PATH_MAX];

	snprintf(path, sizeof(path), "%s/.fleece/ctl", mount);
	*refused = 0;
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return set_error(err, errlen, errno, "%s: %s", path, error_text(errno));
	size_t tlen = strlen(text);
	/* One write, one transaction: never split it. */
	ssize_t w = write(fd, text, tlen);
	if (w < 0)
		*refused = errno;
	else if ((size_t)w != tlen)
		*refused = EIO;
	ssize_t r = read(fd, answer, len - 1);
	int e = errno;
	close(fd);
	if (r < 0)
		return set_error(err, errlen, e, "%s: reading the answer: %s", path, error_text(e));
	answer[r] = '\0';
	while (r > 0 && answer[r - 1] == '\n')
		answer[--r] = '\0';
	return 0;
}

static const char *ctl_value_sep(const char *text, char sep, const char *key, char *buf, size_t len);

int ctl_read(const char *mount, const char *rel, struct strbuf *out)
{
	char path[PATH_MAX], buf[16384];

	snprintf(path, sizeof(path), "%s/.fleece/%s", mount, rel);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	ssize_t n;
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		strbuf_printf(out, "%.*s", (int)n, buf);
	int e = n < 0 ? errno : 0;
	close(fd);
	if (e)
		return -e;
	return out->failed ? -ENOMEM : 0;
}

const char *ctl_value(const char *text, const char *key, char *buf, size_t len)
{
	return ctl_value_sep(text, '\n', key, buf, len);
}

const char *ctl_event_value(const char *line, const char *key, char *buf, size_t len)
{
	return ctl_value_sep(line, ' ', key, buf, len);
}

static const char *ctl_value_sep(const char *text, char sep, const char *key, char *buf, size_t len)
{
	size_t klen = strlen(key);

	for (const char *p = text; p && *p;) {
		const char *eol = strchr(p, sep);
		size_t llen = eol ? (size_t)(eol - p) : strlen(p);
		if (llen > klen && !strncmp(p, key, klen) && p[klen] == '=') {
			size_t vlen = llen - klen - 1;
			if (vlen >= len)
				vlen = len - 1;
			memcpy(buf, p + klen + 1, vlen);
			buf[vlen] = '\0';
			return buf;
		}
		p = eol ? eol + 1 : NULL;
	}
	return NULL;
}

void ctl_quote_word(struct strbuf *sb, const char *word)
{
	if (*word && !strpbrk(word, " \t\"\\")) {
		strbuf_printf(sb, "%s", word);
		return;
	}
	strbuf_printf(sb, "\"");
	for (const char *p = word; *p; p++)
		strbuf_printf(sb, "%s%c", *p == '"' || *p == '\\' ? "\\" : "", *p);
	strbuf_printf(sb, "\"");
}

int ctl_open_events(const char *mount)
{
	char path[PATH_MAX];

	snprintf(path, sizeof(path), "%s/.fleece/events", mount);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}

/* Takes the first whole line out of `pending`. */
static bool take_line(struct strbuf *pending, char *line, size_t len)
{
	char *nl = pending->data ? memchr(pending->data, '\n', pending->len) : NULL;
	if (!nl)
		return false;
	size_t n = (size_t)(nl - pending->data);
	snprintf(line, len, "%.*s", (int)n, pending->data);
	memmove(pending->data, nl + 1, pending->len - n - 1);
	pending->len -= n + 1;
	pending->data[pending->len] = '\0';
	return true;
}

int ctl_next_event(int fd, struct strbuf *pending, int timeout_ms, char *line, size_t len)
{
	uint64_t deadline = timeout_ms < 0 ? 0 : clock_monotonic_ns() + (uint64_t)timeout_ms * 1000000ull;

	for (;;) {
		if (take_line(pending, line, len))
			return 1;
		int wait_ms = -1;
		if (timeout_ms >= 0) {
			uint64_t now = clock_monotonic_ns();
			if (now >= deadline)
				return 0;
			wait_ms = (int)((deadline - now) / 1000000ull) + 1;
		}
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int r = poll(&p, 1, wait_ms);
		if (r < 0 && errno != EINTR)
			return -errno;
		if (r <= 0)
			continue;
		char buf[4096];
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			return -errno;
		if (n == 0)
			return -EPIPE;   /* the mount went away */
		if (n > 0)
			strbuf_printf(pending, "%.*s", (int)n, buf);
	}
}
