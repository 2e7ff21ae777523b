/* compress: see include/fleecefs/compress.h */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <zlib.h>
#ifdef HAVE_ZSTD
#include <zstd.h>
#endif

#include "fleecefs/compress.h"
#include "fleecefs/util.h"

unsigned compress_threads(void)
{
	long cores = sysconf(_SC_NPROCESSORS_ONLN);
	return cores > 1 ? (unsigned)(cores > 64 ? 64 : cores) : 1;
}

bool compress_available(void)
{
#ifdef HAVE_ZSTD
	return true;
#else
	return false;
#endif
}

/* Each thread's contexts (made when first needed) and a cluster to pad a
 * short last one in. */
struct thread_ctx {
#ifdef HAVE_ZSTD
	ZSTD_CCtx *cctx;
	ZSTD_DCtx *dctx;
#endif
	z_stream inflater;
	bool inflater_ready;
	uint8_t *pad;
	size_t pad_len;
};
static pthread_key_t ctx_key;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;

static void free_ctx(void *arg)
{
	struct thread_ctx *c = arg;
#ifdef HAVE_ZSTD
	ZSTD_freeCCtx(c->cctx);
	ZSTD_freeDCtx(c->dctx);
#endif
	if (c->inflater_ready)
		inflateEnd(&c->inflater);
	free(c->pad);
	free(c);
}
static void make_key(void) { pthread_key_create(&ctx_key, free_ctx); }

static struct thread_ctx *thread_ctx(void)
{
	pthread_once(&ctx_once, make_key);
	struct thread_ctx *c = pthread_getspecific(ctx_key);
	if (!c && (c = calloc(1, sizeof(*c))) && pthread_setspecific(ctx_key, c)) {
		free(c);
		c = NULL;
	}
	return c;
}

#ifdef HAVE_ZSTD
int compress_clusters(int level, size_t cluster, const void *buf, size_t len, void *out, size_t *lens)
{
	struct thread_ctx *c = thread_ctx();
	size_t slot = compress_slot(cluster);

	if (!c)
		return -ENOMEM;
	if (!c->cctx) {
		if (!(c->cctx = ZSTD_createCCtx()))
			return -ENOMEM;
		/* Compression is background work: on a busy host the guest's
		 * requests get the CPU first (Linux: nice is per thread). */
		setpriority(PRIO_PROCESS, (id_t)gettid(), COMPRESS_NICE);
	}
	if (c->pad_len < cluster) {
		uint8_t *pad = realloc(c->pad, cluster);
		if (!pad)
			return -ENOMEM;
		c->pad = pad;
		c->pad_len = cluster;
	}
	for (size_t i = 0, pos = 0; pos < len; i++, pos += cluster) {
		const uint8_t *src = (const uint8_t *)buf + pos;
		if (len - pos < cluster) {
			memcpy(c->pad, src, len - pos);
			memset(c->pad + (len - pos), 0, cluster - (len - pos));
			src = c->pad;
		}
		size_t r = ZSTD_compressCCtx(c->cctx, (uint8_t *)out + i * slot, slot, src, cluster,
					     level ? level : ZSTD_CLEVEL_DEFAULT);
		/* Too big for the slot (dstSize_tooSmall) or any other failure:
		 * the cluster is stored as it is, which is always right. */
		lens[i] = ZSTD_isError(r) ? 0 : r;
	}
	return 0;
}

/* A zstd cluster: a frame that must produce the whole cluster; the bytes
 * after it (the rest of its last sector) are not ours to judge. */
static int unzstd(struct thread_ctx *c, const void *in, size_t inlen, void *out, size_t outlen)
{
	if (!c->dctx && !(c->dctx = ZSTD_createDCtx()))
		return -ENOMEM;
	ZSTD_DCtx_reset(c->dctx, ZSTD_reset_session_only);
	ZSTD_inBuffer input = { in, inlen, 0 };
	ZSTD_outBuffer output = { out, outlen, 0 };
	while (output.pos < output.size) {
		size_t r = ZSTD_decompressStream(c->dctx, &output, &input);
		if (ZSTD_isError(r) || r == 0 || (input.pos == input.size && output.pos < output.size))
			break;
	}
	return output.pos == output.size ? 0 : -EBADMSG;
}
#else
int compress_clusters(int level, size_t cluster, const void *buf, size_t len, void *out, size_t *lens)
{
	(void)level, (void)cluster, (void)buf, (void)len, (void)out, (void)lens;
	return -EOPNOTSUPP;
}
#endif

/* A zlib cluster: raw deflate (no header) with a 4 KiB window, as QEMU
 * writes it; it must produce the whole cluster. */
static int inflate_cluster(struct thread_ctx *c, const void *in, size_t inlen, void *out, size_t outlen)
{
	if (!c->inflater_ready) {
		if (inflateInit2(&c->inflater, -12) != Z_OK)
			return -ENOMEM;
		c->inflater_ready = true;
	} else if (inflateReset(&c->inflater) != Z_OK) {
		return -EBADMSG;
	}
	c->inflater.next_in = (Bytef *)(uintptr_t)in;
	c->inflater.avail_in = (uInt)inlen;
	c->inflater.next_out = out;
	c->inflater.avail_out = (uInt)outlen;
	int rc = inflate(&c->inflater, Z_FINISH);
	return (rc == Z_STREAM_END || rc == Z_BUF_ERROR) && c->inflater.avail_out == 0 ? 0 : -EBADMSG;
}

int decompress_cluster(enum qcow2_compression type, const void *in, size_t inlen, void *out, size_t outlen)
{
	struct thread_ctx *c = thread_ctx();

	if (!c)
		return -ENOMEM;
	if (type == QCOW2_COMPRESSION_ZLIB)
		return inflate_cluster(c, in, inlen, out, outlen);
#ifdef HAVE_ZSTD
	if (type == QCOW2_COMPRESSION_ZSTD)
		return unzstd(c, in, inlen, out, outlen);
#endif
	return -EOPNOTSUPP;
}
