/* inject: see include/fleecefs/inject.h */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "fleecefs/inject.h"
#include "fleecefs/util.h"

enum occurrence { OCCUR_ONCE, OCCUR_EVERY, OCCUR_FROM };

struct rule {
	struct rule *next;
	enum inject_point point;
	uint64_t start, end;       /* end 0: to the end */
	enum occurrence occurrence;
	uint64_t n;
	int err;                   /* positive errno, 0: none */
	uint64_t delay_ms;
	uint64_t matched, fired;   /* rules_lock */
};

atomic_bool inject_active;
static pthread_mutex_t rules_lock = PTHREAD_MUTEX_INITIALIZER;
static struct rule *rules;     /* in the order given */

static const char *const point_names[] = { "source-read", "target-write", "cbw", "store-write", "truncate", "target-flush", "start" };

static const struct {
	const char *name;
	int value;
} errno_names[] = {
	{ "EIO", EIO }, { "ENOSPC", ENOSPC }, { "EROFS", EROFS }, { "EACCES", EACCES }, { "EPERM", EPERM },
	{ "ETIMEDOUT", ETIMEDOUT }, { "EINVAL", EINVAL }, { "ENOMEM", ENOMEM }, { "EDQUOT", EDQUOT },
};

static bool rule_fires(struct rule *r)
{
	switch (r->occurrence) {
	case OCCUR_ONCE: return r->matched == 1;
	case OCCUR_EVERY: return r->matched % r->n == 0;
	case OCCUR_FROM: return r->matched >= r->n;
	}
	return false;
}

int inject_fire(enum inject_point point, uint64_t off, uint64_t len)
{
	uint64_t delay_ms = 0;
	int err = 0;

	pthread_mutex_lock(&rules_lock);
	for (struct rule *r = rules; r; r = r->next) {
		if (r->point != point || off + len <= r->start || (r->end && off >= r->end))
			continue;
		r->matched++;
		if (!rule_fires(r))
			continue;
		r->fired++;
		delay_ms = max_u64(delay_ms, r->delay_ms);
		if (r->err && !err)
			err = r->err;
	}
	pthread_mutex_unlock(&rules_lock);
	if (delay_ms)
		sleep_until_ns(clock_monotonic_ns() + delay_ms * 1000000ull);
	if (err)
		log_debug("inject: %s at offset %" PRIu64 " fails with %s", point_names[point], off, error_text(err));
	return -err;
}

static int parse_errno(const char *v, int *out)
{
	uint64_t n;

	for (size_t i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++) {
		if (strcmp(v, errno_names[i].name) == 0) {
			*out = errno_names[i].value;
			return 0;
		}
	}
	if (parse_u64(v, &n) == 0 && n > 0 && n < 4096) {
		*out = (int)n;
		return 0;
	}
	return -EINVAL;
}

static const char *errno_name(int e)
{
	for (size_t i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++)
		if (errno_names[i].value == e)
			return errno_names[i].name;
	return NULL;
}

/* One rule line (already split at blanks, modifiable). */
static int parse_rule(char *line, unsigned lineno, struct rule *r, char *err, size_t errlen)
{
	char *save = NULL, *word = strtok_r(line, " \t\r", &save);
	bool have_err = false, have_occ = false, have_offset = false;
	int point = -1;

	*r = (struct rule){ .occurrence = OCCUR_ONCE };
	for (int p = 0; p < INJECT_POINTS; p++)
		if (strcmp(word, point_names[p]) == 0)
			point = p;
	if (point < 0)
		return set_error(err, errlen, EINVAL,
				 "line %u: unknown point '%s' (points: source-read, target-write, store-write, cbw, truncate, target-flush, start)", lineno,
				 word);
	r->point = (enum inject_point)point;
	while ((word = strtok_r(NULL, " \t\r", &save))) {
		char *eq = strchr(word, '=');
		const char *v = eq ? eq + 1 : "";
		if (eq)
			*eq = '\0';
		if (!strcmp(word, "once") && !eq && !have_occ) {
			have_occ = true;
		} else if ((!strcmp(word, "every") || !strcmp(word, "from")) && eq && !have_occ) {
			have_occ = true;
			r->occurrence = word[0] == 'e' ? OCCUR_EVERY : OCCUR_FROM;
			if (parse_u64(v, &r->n) || r->n == 0)
				return set_error(err, errlen, EINVAL, "line %u: %s=%s: expected a count from 1", lineno,
						 word, v);
		} else if (!strcmp(word, "offset") && eq && !have_offset) {
			char *dash = strchr(v, '-');
			have_offset = true;
			if (dash)
				*dash = '\0';
			bool has_end = dash && dash[1];
			if (parse_size(v, &r->start) || (has_end && parse_size(dash + 1, &r->end)) ||
			    (has_end && r->end <= r->start))
				return set_error(err, errlen, EINVAL, "line %u: offset: expected START-END with END > START",
						 lineno);
		} else if (!strcmp(word, "errno") && eq && !have_err) {
			have_err = true;
			if (parse_errno(v, &r->err))
				return set_error(err, errlen, EINVAL, "line %u: errno=%s: unknown (EIO, ENOSPC, ...)",
						 lineno, v);
		} else if (!strcmp(word, "delay") && eq && !r->delay_ms) {
			if (parse_u64(v, &r->delay_ms) || r->delay_ms == 0 || r->delay_ms > 600000)
				return set_error(err, errlen, EINVAL, "line %u: delay=%s: expected 1 to 600000 ms",
						 lineno, v);
		} else {
			return set_error(err, errlen, EINVAL, "line %u: unexpected '%s%s%s'", lineno, word,
					 eq ? "=" : "", v);
		}
	}
	if (!have_err && !r->delay_ms)
		r->err = EIO;
	return 0;
}

static void free_rules(struct rule *r)
{
	while (r) {
		struct rule *next = r->next;
		free(r);
		r = next;
	}
}

void inject_clear(void)
{
	pthread_mutex_lock(&rules_lock);
	free_rules(rules);
	rules = NULL;
	atomic_store(&inject_active, false);
	pthread_mutex_unlock(&rules_lock);
}

int inject_apply(const char *text, size_t len, char *err, size_t errlen)
{
	struct rule *added = NULL, **tail = &added;
	bool clear = false;
	unsigned lineno = 0;
	int rc = 0;

	for (size_t pos = 0; pos < len && !rc;) {
		const char *nl = memchr(text + pos, '\n', len - pos);
		size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
		char *line = strndup(text + pos, n);
		pos += n + (nl ? 1 : 0);
		lineno++;
		if (!line) {
			rc = set_error(err, errlen, ENOMEM, "line %u: out of memory", lineno);
			break;
		}
		if (memchr(text + pos - n - (nl ? 1 : 0), '\0', n)) {
			free(line);
			rc = set_error(err, errlen, EINVAL, "line %u: contains a NUL byte", lineno);
			break;
		}
		if (line[strspn(line, " \t\r")] == '\0' || line[strspn(line, " \t\r")] == '#') {
			free(line);
			continue;
		}
		char *start = line + strspn(line, " \t\r");
		if (strncmp(start, "clear", 5) == 0 && start[5 + strspn(start + 5, " \t\r")] == '\0') {
			/* Lines apply in order: clear also drops the rules the
			 * lines before it in this write added. */
			clear = true;
			free_rules(added);
			added = NULL;
			tail = &added;
		} else {
			struct rule *r = malloc(sizeof(*r));
			if (!r)
				rc = set_error(err, errlen, ENOMEM, "line %u: out of memory", lineno);
			else if ((rc = parse_rule(start, lineno, r, err, errlen)))
				free(r);
			else {
				*tail = r;
				tail = &r->next;
			}
		}
		free(line);
	}
	if (rc) {
		free_rules(added);
		return rc;
	}
	/* One step under the lock: a check running meanwhile sees the old
	 * rules or the new ones, never none in between. */
	pthread_mutex_lock(&rules_lock);
	if (clear) {
		free_rules(rules);
		rules = NULL;
	}
	struct rule **end = &rules;
	while (*end)
		end = &(*end)->next;
	*end = added;
	atomic_store(&inject_active, rules != NULL);
	pthread_mutex_unlock(&rules_lock);
	return 0;
}

char *inject_describe(void)
{
	struct strbuf sb = { 0 };

	pthread_mutex_lock(&rules_lock);
	for (struct rule *r = rules; r; r = r->next) {
		strbuf_printf(&sb, "%s offset=%" PRIu64 "-", point_names[r->point], r->start);
		if (r->end)
			strbuf_printf(&sb, "%" PRIu64, r->end);
		if (r->occurrence == OCCUR_ONCE)
			strbuf_printf(&sb, " once");
		else
			strbuf_printf(&sb, " %s=%" PRIu64, r->occurrence == OCCUR_EVERY ? "every" : "from", r->n);
		if (r->err) {
			const char *name = errno_name(r->err);
			if (name)
				strbuf_printf(&sb, " errno=%s", name);
			else
				strbuf_printf(&sb, " errno=%d", r->err);
		}
		if (r->delay_ms)
			strbuf_printf(&sb, " delay=%" PRIu64, r->delay_ms);
		strbuf_printf(&sb, " matched=%" PRIu64 " fired=%" PRIu64 "\n", r->matched, r->fired);
	}
	pthread_mutex_unlock(&rules_lock);
	return strbuf_steal(&sb);
}
