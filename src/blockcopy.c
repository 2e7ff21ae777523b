/* blockcopy: see include/fleecefs/blockcopy.h */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "fleecefs/blockcopy.h"
#include "fleecefs/image.h"
#include "fleecefs/manifest.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

int blockcopy_init(struct blockcopy *bc, struct image *image, struct target *target,
		   struct manifest *manifest, uint64_t size, uint32_t cluster_size)
{
	int rc;

	memset(bc, 0, sizeof(*bc));
	bc->image = image;
	bc->target = target;
	bc->manifest = manifest;
	bc->size = size;
	bc->cluster_size = cluster_size;
	bc->cluster_bits = log2_u64(cluster_size);
	bc->nclusters = div_round_up(size, cluster_size);
	rc = cbitmap_init(&bc->pending, bc->nclusters, true);
	if (rc)
		return rc;
	rc = inflight_init(&bc->inflight, bc->nclusters);
	if (rc)
		cbitmap_destroy(&bc->pending);
	return rc;
}

void blockcopy_destroy(struct blockcopy *bc)
{
	inflight_destroy(&bc->inflight);
	cbitmap_destroy(&bc->pending);
}

/* Reads [off, off + len) of the source into buf (page aligned, room for len
 * rounded up to 4 KiB). Bytes past the current end of file read as zero. */
static int read_source(struct blockcopy *bc, void *buf, uint64_t off, uint64_t len)
{
	ssize_t got = -EINVAL;

	if (bc->image->direct_fd >= 0 && off % 4096 == 0)
		got = pread_full(bc->image->direct_fd, buf, (size_t)((len + 4095) & ~4095ull), off);
	if (got == -EINVAL)
		got = pread_full(bc->image->read_fd, buf, (size_t)len, off);
	if (got < 0)
		return (int)got;
	if ((uint64_t)got < len)
		memset((char *)buf + got, 0, (size_t)(len - (uint64_t)got));
	return 0;
}

/* Does the source hold data anywhere in [off, off + len)? Errors count as yes. */
static bool source_has_data(struct blockcopy *bc, uint64_t off, uint64_t len)
{
	off_t data = lseek(bc->image->read_fd, (off_t)off, SEEK_DATA);
	if (data < 0)
		return errno != ENXIO;
	return (uint64_t)data < off + len;
}

/* Copies the claimed run [first, first + count): read once, checksum each
 * cluster, write the non-zero ones. The caller releases the claim. */
static int copy_run(struct blockcopy *bc, uint64_t first, uint64_t count, void *buf, uint64_t *read_bytes)
{
	uint64_t off = first << bc->cluster_bits;
	uint64_t len = min_u64(count << bc->cluster_bits, bc->size - off);
	bool data = source_has_data(bc, off, len);
	int rc;

	if (data) {
		rc = read_source(bc, buf, off, len);
		if (rc)
			return rc;
		*read_bytes += len;
	} else {
		memset(buf, 0, (size_t)len);
	}
	uint64_t write_from = 0, pos = 0;
	bool in_data = false;
	for (uint64_t i = 0; i < count; i++, pos += bc->cluster_size) {
		uint64_t clen = min_u64(bc->cluster_size, len - pos);
		const char *cdata = (const char *)buf + pos;
		bool zero = !data || buffer_is_zero(cdata, (size_t)clen);
		if (bc->manifest)
			manifest_set(bc->manifest, first + i, cdata, (size_t)clen);
		if (!zero && !in_data) {
			write_from = pos;
			in_data = true;
		} else if (zero && in_data) {
			rc = target_write(bc->target, off + write_from, (const char *)buf + write_from,
					  (size_t)(pos - write_from));
			if (rc)
				return rc;
			atomic_fetch_add(&bc->bytes_written, pos - write_from);
			in_data = false;
		}
		if (zero) {
			rc = target_write_zeroes(bc->target, off + pos, clen);
			if (rc)
				return rc;
		}
	}
	if (in_data) {
		rc = target_write(bc->target, off + write_from, (const char *)buf + write_from,
				  (size_t)(len - write_from));
		if (rc)
			return rc;
		atomic_fetch_add(&bc->bytes_written, len - write_from);
	}
	return 0;
}

static uint64_t run_bytes(const struct blockcopy *bc, uint64_t first, uint64_t count)
{
	uint64_t off = first << bc->cluster_bits;
	return min_u64(count << bc->cluster_bits, bc->size - off);
}

int blockcopy_before_write(struct blockcopy *bc, uint64_t off, uint64_t len, uint64_t deadline_ns)
{
	if (off >= bc->size || len == 0)
		return 0;
	uint64_t end = min_u64(off + len, bc->size);
	uint64_t first = off >> bc->cluster_bits, stop = ((end - 1) >> bc->cluster_bits) + 1;
	uint64_t max_run = max_u64(BLOCKCOPY_CBW_MAX >> bc->cluster_bits, 1);
	void *buf = thread_buffer(THREAD_BUFFER_COPY, (size_t)(max_run << bc->cluster_bits));

	if (!buf)
		return -ENOMEM;
	for (;;) {
		uint64_t run_first, run_count;
		int rc = inflight_claim(&bc->inflight, &bc->pending, first, stop, max_run, INFLIGHT_WAIT,
					deadline_ns, &run_first, &run_count);
		if (rc <= 0)
			return rc;
		uint64_t read_bytes = 0;
		rc = copy_run(bc, run_first, run_count, buf, &read_bytes);
		inflight_release(&bc->inflight, &bc->pending, run_first, run_count, rc == 0);
		if (rc)
			return rc;
		uint64_t bytes = run_bytes(bc, run_first, run_count);
		atomic_fetch_add(&bc->bytes_done, bytes);
		atomic_fetch_add(&bc->cbw_bytes, bytes);
		first = run_first + run_count;
	}
}

int64_t blockcopy_copy_next(struct blockcopy *bc, uint64_t *cursor, uint64_t max_bytes, uint64_t *read_bytes)
{
	uint64_t max_run = max_u64(max_bytes >> bc->cluster_bits, 1);
	uint64_t first = *cursor >> bc->cluster_bits;
	uint64_t run_first, run_count;
	void *buf = thread_buffer(THREAD_BUFFER_COPY, (size_t)(max_run << bc->cluster_bits));
	int rc;

	if (!buf)
		return -ENOMEM;
	rc = inflight_claim(&bc->inflight, &bc->pending, first, bc->nclusters, max_run, INFLIGHT_SKIP, 0,
			    &run_first, &run_count);
	if (rc <= 0) {
		*cursor = bc->size;
		return rc;
	}
	rc = copy_run(bc, run_first, run_count, buf, read_bytes);
	inflight_release(&bc->inflight, &bc->pending, run_first, run_count, rc == 0);
	*cursor = (run_first + run_count) << bc->cluster_bits;
	if (rc)
		return rc;
	uint64_t bytes = run_bytes(bc, run_first, run_count);
	atomic_fetch_add(&bc->bytes_done, bytes);
	return (int64_t)bytes;
}
