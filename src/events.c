/* events: see include/fleecefs/events.h */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "fleecefs/events.h"
#include "fleecefs/util.h"

static pthread_mutex_t events_lock = PTHREAD_MUTEX_INITIALIZER;
static char ring[EVENTS_KEPT][EVENT_LINE_MAX];
static uint64_t next_seq; /* events_lock */
static void (*listener)(void);

void events_set_listener(void (*fn)(void))
{
	listener = fn;
}

void events_emit(const char *fmt, ...)
{
	char line[EVENT_LINE_MAX];
	uint64_t now = clock_realtime_ns();
	int n = snprintf(line, sizeof(line), "time=%" PRIu64 ".%09" PRIu64 " ", now / 1000000000u,
			 now % 1000000000u);
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	/* One event is one line, whatever its error text says. */
	for (char *p = line; *p; p++)
		if (*p == '\n')
			*p = ' ';
	strcat(line, "\n");
	pthread_mutex_lock(&events_lock);
	memcpy(ring[next_seq % EVENTS_KEPT], line, sizeof(line));
	next_seq++;
	pthread_mutex_unlock(&events_lock);
	log_debug("event %.*s", (int)strlen(line) - 1, line);
	if (listener)
		listener();
}

uint64_t events_next_seq(void)
{
	pthread_mutex_lock(&events_lock);
	uint64_t seq = next_seq;
	pthread_mutex_unlock(&events_lock);
	return seq;
}

size_t events_read(uint64_t *seq, char *buf, size_t buflen)
{
	size_t len = 0;

	pthread_mutex_lock(&events_lock);
	uint64_t oldest = next_seq > EVENTS_KEPT ? next_seq - EVENTS_KEPT : 0;
	if (*seq < oldest) {
		uint64_t now = clock_realtime_ns();
		int n = snprintf(buf, buflen, "time=%" PRIu64 ".%09" PRIu64 " event=overflow lost=%" PRIu64 "\n",
				 now / 1000000000u, now % 1000000000u, oldest - *seq);
		len = n < 0 ? 0 : (size_t)n >= buflen ? buflen - 1 : (size_t)n;
		*seq = oldest;
	} else if (*seq < next_seq) {
		const char *line = ring[*seq % EVENTS_KEPT];
		len = strlen(line);
		if (len >= buflen)
			len = buflen - 1;
		memcpy(buf, line, len);
		buf[len] = '\0';
		(*seq)++;
	}
	pthread_mutex_unlock(&events_lock);
	return len;
}
