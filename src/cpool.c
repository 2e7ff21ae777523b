/* cpool: see include/fleecefs/cpool.h */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleecefs/cpool.h"
#include "fleecefs/util.h"

unsigned cpool_default_threads(void)
{
	long cores = sysconf(_SC_NPROCESSORS_ONLN);
	return cores > 1 ? (unsigned)(cores > 64 ? 63 : cores - 1) : 1;
}

#ifdef HAVE_ZSTD
#include <zstd.h>

bool cpool_available(void) { return true; }

struct cpool {
	pthread_mutex_t lock;
	pthread_cond_t work, done;
	bool stopping;
	unsigned nthreads;
	pthread_t *threads;
	int level;
	size_t cluster;
	/* The run in the pool (busy), and how far it got. */
	bool busy;
	const uint8_t *src;
	size_t len;
	uint8_t *out;
	size_t *lens;
	size_t n, next, finished;
};

/* Each thread's zstd context and a cluster to pad a short last one in,
 * freed when the thread ends. */
struct thread_ctx {
	ZSTD_CCtx *cctx;
	uint8_t *pad;
	size_t pad_len;
};
static pthread_key_t ctx_key;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;

static void free_ctx(void *arg)
{
	struct thread_ctx *c = arg;
	ZSTD_freeCCtx(c->cctx);
	free(c->pad);
	free(c);
}
static void make_key(void) { pthread_key_create(&ctx_key, free_ctx); }

static struct thread_ctx *thread_ctx(size_t cluster)
{
	pthread_once(&ctx_once, make_key);
	struct thread_ctx *c = pthread_getspecific(ctx_key);
	if (!c) {
		if (!(c = calloc(1, sizeof(*c))) || !(c->cctx = ZSTD_createCCtx())) {
			free(c);
			return NULL;
		}
		pthread_setspecific(ctx_key, c);
	}
	if (c->pad_len < cluster) {
		uint8_t *pad = realloc(c->pad, cluster);
		if (!pad)
			return NULL;
		c->pad = pad;
		c->pad_len = cluster;
	}
	return c;
}

size_t cpool_slot(const struct cpool *p)
{
	/* Anything longer would not save a sector. */
	return p->cluster - 512;
}

static int compress_one(const struct cpool *p, const uint8_t *src, size_t len, uint8_t *out, size_t *out_len)
{
	struct thread_ctx *c = thread_ctx(p->cluster);
	if (!c)
		return -ENOMEM;
	if (len < p->cluster) {
		memcpy(c->pad, src, len);
		memset(c->pad + len, 0, p->cluster - len);
		src = c->pad;
	}
	size_t r = ZSTD_compressCCtx(c->cctx, out, cpool_slot(p), src, p->cluster, p->level);
	/* Too big for the slot (dstSize_tooSmall) or any other failure: the
	 * cluster is stored as it is, which is always right. */
	*out_len = ZSTD_isError(r) ? 0 : r;
	return 0;
}

/* Takes clusters of the run until none is left; lock held on entry and exit. */
static int work_on_run(struct cpool *p)
{
	int rc = 0;
	while (p->busy && p->next < p->n) {
		size_t i = p->next++;
		const uint8_t *src = p->src + i * p->cluster;
		size_t len = min_u64(p->cluster, p->len - i * p->cluster);
		uint8_t *out = p->out + i * cpool_slot(p);
		size_t *out_len = &p->lens[i];
		pthread_mutex_unlock(&p->lock);
		int r = compress_one(p, src, len, out, out_len);
		pthread_mutex_lock(&p->lock);
		if (r) {
			*out_len = 0;
			rc = r;
		}
		if (++p->finished == p->n)
			pthread_cond_broadcast(&p->done);
	}
	return rc;
}

static void *pool_thread(void *arg)
{
	struct cpool *p = arg;

	pthread_mutex_lock(&p->lock);
	while (!p->stopping) {
		if (p->busy && p->next < p->n)
			work_on_run(p);   /* a failure stores the cluster uncompressed */
		else
			pthread_cond_wait(&p->work, &p->lock);
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

int cpool_compress(struct cpool *p, const void *buf, size_t len, void *out, size_t *lens)
{
	size_t n = div_round_up(len, p->cluster);

	pthread_mutex_lock(&p->lock);
	if (p->busy || !p->nthreads) {
		/* Another run is in the pool: this one alone, without waiting. */
		pthread_mutex_unlock(&p->lock);
		for (size_t i = 0; i < n; i++) {
			size_t clen = min_u64(p->cluster, len - i * p->cluster);
			if (compress_one(p, (const uint8_t *)buf + i * p->cluster, clen, (uint8_t *)out + i * cpool_slot(p),
					 &lens[i]))
				lens[i] = 0;
		}
		return 0;
	}
	p->busy = true;
	p->src = buf;
	p->len = len;
	p->out = out;
	p->lens = lens;
	p->n = n;
	p->next = p->finished = 0;
	pthread_cond_broadcast(&p->work);
	work_on_run(p);
	while (p->finished < p->n)
		pthread_cond_wait(&p->done, &p->lock);
	p->busy = false;
	pthread_mutex_unlock(&p->lock);
	return 0;
}

int cpool_start(unsigned threads, int level, size_t cluster_size, struct cpool **out)
{
	struct cpool *p = calloc(1, sizeof(*p));

	if (!p || (threads && !(p->threads = calloc(threads, sizeof(*p->threads))))) {
		free(p);
		return -ENOMEM;
	}
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->work, NULL);
	pthread_cond_init(&p->done, NULL);
	p->level = level ? level : ZSTD_CLEVEL_DEFAULT;
	p->cluster = cluster_size;
	for (; p->nthreads < threads; p->nthreads++)
		if (pthread_create(&p->threads[p->nthreads], NULL, pool_thread, p))
			break;   /* fewer threads: slower, still right */
	*out = p;
	return 0;
}

void cpool_stop(struct cpool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	p->stopping = true;
	pthread_cond_broadcast(&p->work);
	pthread_mutex_unlock(&p->lock);
	for (unsigned i = 0; i < p->nthreads; i++)
		pthread_join(p->threads[i], NULL);
	pthread_cond_destroy(&p->work);
	pthread_cond_destroy(&p->done);
	pthread_mutex_destroy(&p->lock);
	free(p->threads);
	free(p);
}

#else /* !HAVE_ZSTD */

bool cpool_available(void) { return false; }
size_t cpool_slot(const struct cpool *p) { (void)p; return 0; }
int cpool_start(unsigned threads, int level, size_t cluster_size, struct cpool **out)
{
	(void)threads, (void)level, (void)cluster_size;
	*out = NULL;
	return -EOPNOTSUPP;
}
int cpool_compress(struct cpool *p, const void *buf, size_t len, void *out, size_t *lens)
{
	(void)p, (void)buf, (void)len, (void)out, (void)lens;
	return -EOPNOTSUPP;
}
void cpool_stop(struct cpool *p) { (void)p; }

#endif
