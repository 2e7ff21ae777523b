/* bufpool: see include/fleecefs/bufpool.h */
#include "config.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "fleecefs/bufpool.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
/* A pooled buffer is off limits until it is handed out again. */
#define POOL_POISON(buf, len) ASAN_POISON_MEMORY_REGION(buf, len)
#define POOL_UNPOISON(buf, len) ASAN_UNPOISON_MEMORY_REGION(buf, len)
#else
#define POOL_POISON(buf, len) ((void)(buf), (void)(len))
#define POOL_UNPOISON(buf, len) ((void)(buf), (void)(len))
#endif

#define SMALLEST_SHIFT 12
#define LARGEST_SHIFT 25
#define NCLASSES (LARGEST_SHIFT - SMALLEST_SHIFT + 1)

_Static_assert(BUFPOOL_LARGEST == 1u << LARGEST_SHIFT, "BUFPOOL_LARGEST is the largest class");

/* A pooled buffer's first bytes link it into its class's list. */
struct pooled {
	struct pooled *next;
};

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct pooled *free_lists[NCLASSES];   /* pool_lock */
static uint64_t pooled_bytes;                 /* pool_lock */
static unsigned users;                        /* pool_lock */

/* The class of len, or -1 for one too large to pool. */
static int class_of(size_t len)
{
	unsigned shift = SMALLEST_SHIFT;
	while (shift <= LARGEST_SHIFT && ((size_t)1 << shift) < len)
		shift++;
	return shift <= LARGEST_SHIFT ? (int)(shift - SMALLEST_SHIFT) : -1;
}

static size_t capacity_of(int class, size_t len)
{
	return class >= 0 ? (size_t)1 << (class + SMALLEST_SHIFT) : (len + 4095) & ~(size_t)4095;
}

void *bufpool_get(size_t len)
{
	int class = class_of(len);
	size_t cap = capacity_of(class, len);
	void *buf = NULL;

	if (class >= 0) {
		pthread_mutex_lock(&pool_lock);
		struct pooled *p = free_lists[class];
		if (p) {
			POOL_UNPOISON(p, sizeof(*p));
			free_lists[class] = p->next;
			pooled_bytes -= cap;
			buf = p;
		}
		pthread_mutex_unlock(&pool_lock);
		if (buf) {
			POOL_UNPOISON(buf, cap);
			return buf;
		}
	}
	return posix_memalign(&buf, 4096, cap) ? NULL : buf;
}

void bufpool_put(void *buf, size_t len)
{
	if (!buf)
		return;
	int class = class_of(len);
	size_t cap = capacity_of(class, len);
	bool kept = false;

	if (class >= 0) {
		pthread_mutex_lock(&pool_lock);
		if (users && pooled_bytes + cap <= BUFPOOL_KEEP) {
			struct pooled *p = buf;
			p->next = free_lists[class];
			free_lists[class] = p;
			pooled_bytes += cap;
			POOL_POISON(buf, cap);
			kept = true;
		}
		pthread_mutex_unlock(&pool_lock);
	}
	if (!kept)
		free(buf);
}

void bufpool_trim(void)
{
	struct pooled *lists[NCLASSES];

	pthread_mutex_lock(&pool_lock);
	for (int c = 0; c < NCLASSES; c++) {
		lists[c] = free_lists[c];
		free_lists[c] = NULL;
	}
	pooled_bytes = 0;
	pthread_mutex_unlock(&pool_lock);
	for (int c = 0; c < NCLASSES; c++)
		while (lists[c]) {
			struct pooled *p = lists[c];
			POOL_UNPOISON(p, capacity_of(c, 0));
			lists[c] = p->next;
			free(p);
		}
}

void bufpool_attach(void)
{
	pthread_mutex_lock(&pool_lock);
	users++;
	pthread_mutex_unlock(&pool_lock);
}

void bufpool_detach(void)
{
	pthread_mutex_lock(&pool_lock);
	bool last = --users == 0;
	pthread_mutex_unlock(&pool_lock);
	if (last)
		bufpool_trim();
}

uint64_t bufpool_pooled_bytes(void)
{
	pthread_mutex_lock(&pool_lock);
	uint64_t bytes = pooled_bytes;
	pthread_mutex_unlock(&pool_lock);
	return bytes;
}

struct shared_buffer *bufpool_share(void *data, size_t len)
{
	struct shared_buffer *b = malloc(sizeof(*b));
	if (!b)
		return NULL;
	b->data = data;
	b->len = len;
	atomic_init(&b->holders, 1);
	return b;
}

void shared_buffer_hold(struct shared_buffer *b)
{
	atomic_fetch_add_explicit(&b->holders, 1, memory_order_relaxed);
}

void shared_buffer_release(struct shared_buffer *b)
{
	/* acq_rel: every holder's reads of the bytes happen before the put. */
	if (b && atomic_fetch_sub_explicit(&b->holders, 1, memory_order_acq_rel) == 1) {
		bufpool_put(b->data, b->len);
		free(b);
	}
}
