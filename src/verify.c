/* verify: see include/fleecefs/verify.h */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "fleecefs/manifest.h"
#include "fleecefs/reader.h"
#include "fleecefs/util.h"
#include "fleecefs/verify.h"

/* What the check of TARGET learnt about each cluster, for its chain. */
struct seen {
	uint64_t *sums;             /* of TARGET's view */
	uint8_t *lowest;            /* the top-most layer that decided any byte
	                             * (nlayers: none did, all zeroes) */
	uint8_t *damaged;
};

/* One file's check: its manifest, the reader of its view, the counts. */
struct check {
	const char *name;
	struct manifest_file m;
	struct reader *r;
	uint8_t *buf;
	uint64_t bad, listed, unlisted;   /* clusters; lines; clusters */
	uint64_t run_first, run_count;
	char run_why[600];
	FILE *out;
};

/* Prints the run of bad clusters waiting to be listed. */
static void flush_run(struct check *k)
{
	uint64_t first = k->run_first, last = k->run_first + k->run_count - 1, cs = k->m.cluster_size;

	if (!k->run_count)
		return;
	k->run_count = 0;
	if (k->listed == VERIFY_LIST_MAX) {
		k->unlisted += last - first + 1;
		return;
	}
	k->listed++;
	if (first == last)
		fprintf(k->out, "%s: bad cluster at offset %" PRIu64 " (cluster %" PRIu64 " of %" PRIu64 "): %s\n", k->name,
			first * cs, first, k->m.nclusters, k->run_why);
	else
		fprintf(k->out, "%s: bad clusters at offsets %" PRIu64 " to %" PRIu64 " (clusters %" PRIu64 " to %" PRIu64
				" of %" PRIu64 "): %s\n", k->name, first * cs, last * cs, first, last, k->m.nclusters,
			k->run_why);
}

/* Bad clusters in a row that are bad for the same reason (a file cut
 * short, a lost L2 table) make one line. */
static void report_bad(struct check *k, uint64_t c, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void report_bad(struct check *k, uint64_t c, const char *fmt, ...)
{
	char why[sizeof(k->run_why)];
	va_list ap;

	k->bad++;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	if (k->run_count && k->run_first + k->run_count == c && !strcmp(why, k->run_why)) {
		k->run_count++;
		return;
	}
	flush_run(k);
	k->run_first = c;
	k->run_count = 1;
	memcpy(k->run_why, why, sizeof(why));
}

/* "data from FILE at host offset X", or who else decided the bytes. */
static void describe_origin(const struct reader *r, const struct reader_origin *o, char *buf, size_t len)
{
	if (!o->layers) {
		snprintf(buf, len, "unallocated in every file of the chain (reads as zeroes)");
		return;
	}
	if (!(o->layers & (o->layers - 1))) {
		if (o->first_host == READER_ZERO_CLUSTER)
			snprintf(buf, len, "a zero cluster in %s", reader_layer_path(r, o->first_layer));
		else
			snprintf(buf, len, "data from %s at host offset %#" PRIx64, reader_layer_path(r, o->first_layer),
				 o->first_host);
		return;
	}
	size_t used = (size_t)snprintf(buf, len, "data from");
	for (unsigned i = 0; i < reader_layers(r) && used < len; i++)
		if (o->layers & (1ull << i))
			used += (size_t)snprintf(buf + used, len - used, "%s %s", used > 9 ? "," : "",
						 reader_layer_path(r, i));
}

static uint64_t cluster_len(const struct manifest_file *m, uint64_t c)
{
	return min_u64(m->cluster_size, m->size - c * (uint64_t)m->cluster_size);
}

bool verify_cluster(struct reader *r, const struct manifest_file *m, uint64_t c, void *buf, uint64_t *sum,
		    struct reader_origin *o, char *why, size_t whylen)
{
	uint64_t len = cluster_len(m, c);
	bool whole = reader_read(r, c * (uint64_t)m->cluster_size, (size_t)len, buf, o);

	*sum = XXH3_64bits(buf, (size_t)len);
	if (!whole) {
		snprintf(why, whylen, "%s", o->why);
		return false;
	}
	if (*sum != m->hashes[c]) {
		char from[400];
		describe_origin(r, o, from, sizeof(from));
		snprintf(why, whylen, "checksum mismatch; %s", from);
		return false;
	}
	return true;
}

/* Reads cluster c of k's view, sums it and reports it when it is wrong. */
static void check_cluster(struct check *k, uint64_t c, struct seen *seen)
{
	struct reader_origin o;
	uint64_t sum;
	char why[600];
	bool good = verify_cluster(k->r, &k->m, c, k->buf, &sum, &o, why, sizeof(why));

	if (seen) {
		seen->sums[c] = sum;
		seen->lowest[c] = (uint8_t)(o.layers ? (unsigned)__builtin_ctzll(o.layers) : reader_layers(k->r));
		seen->damaged[c] = o.damaged;
	}
	if (!good)
		report_bad(k, c, "%s", why);
}

/* Does the file's size agree with its manifest? (A raw file cut short
 * shows in its clusters; anything else is reported here.) */
static void check_size(struct check *k, const char *format)
{
	uint64_t have = reader_size(k->r), want = k->m.size;

	if (!strcmp(format, "qcow2"))
		want = (want + 511) / 512 * 512;   /* QEMU's disks are whole sectors */
	if (have > want || (have < want && !strcmp(format, "qcow2"))) {
		k->bad++;
		fprintf(k->out, "%s: %s %" PRIu64 " bytes, its manifest %" PRIu64 "\n", k->name,
			!strcmp(format, "qcow2") ? "holds a virtual disk of" : "is", have, want);
	}
}

static void summary(struct check *k, const char *what)
{
	flush_run(k);
	if (k->unlisted)
		fprintf(k->out, "%s: ... and %" PRIu64 " more bad clusters\n", k->name, k->unlisted);
	if (k->bad)
		fprintf(k->out, "%s: DAMAGED: %" PRIu64 " of %" PRIu64 " clusters bad%s\n", k->name, k->bad,
			k->m.nclusters, what);
	else
		fprintf(k->out, "%s: ok: %" PRIu64 " clusters of %" PRIu32 " bytes, %" PRIu64 " bytes%s%s\n", k->name,
			k->m.nclusters, k->m.cluster_size, k->m.size, k->m.partial ? ", a partial backup" : "", what);
}

/* Opens k's manifest and view. VERIFY_OK, or what to return. */
static enum verify_result open_check(struct check *k, const char *path, FILE *errs, bool must_have_manifest,
				     bool *no_manifest)
{
	char mpath[4096], err[600];
	int rc;

	manifest_path(path, mpath, sizeof(mpath));
	if ((rc = manifest_load(mpath, &k->m, err, sizeof(err)))) {
		if (rc == -ENOENT && !must_have_manifest) {
			*no_manifest = true;
			return VERIFY_OK;
		}
		fprintf(errs, "fleecectl: verify %s: cannot check: %s\n", path, err);
		return VERIFY_CANNOT;
	}
	if ((rc = reader_open(path, k->m.format, &k->r, err, sizeof(err)))) {
		/* A file that is not what its manifest says is damage; one that
		 * is not there, or that this reader cannot follow, is not. */
		if (rc == -EINVAL) {
			fprintf(k->out, "%s: DAMAGED: %s\n", path, err);
			return VERIFY_DAMAGED;
		}
		fprintf(errs, "fleecectl: verify %s: cannot check: %s\n", path, err);
		return VERIFY_CANNOT;
	}
	if (!(k->buf = malloc(k->m.cluster_size))) {
		fprintf(errs, "fleecectl: verify %s: out of memory\n", path);
		return VERIFY_CANNOT;
	}
	return VERIFY_OK;
}

static void close_check(struct check *k)
{
	reader_close(k->r);
	manifest_file_free(&k->m);
	free(k->buf);
}

static enum verify_result worse(enum verify_result a, enum verify_result b)
{
	/* Damage found outranks what could not be checked. */
	if (a == VERIFY_DAMAGED || b == VERIFY_DAMAGED)
		return VERIFY_DAMAGED;
	return a == VERIFY_CANNOT || b == VERIFY_CANNOT ? VERIFY_CANNOT : VERIFY_OK;
}

/* Backing file `layer` of the top's chain against its own manifest. */
static enum verify_result check_element(const struct check *top, const struct seen *seen, unsigned layer, FILE *out,
					FILE *errs)
{
	const char *path = reader_layer_path(top->r, layer);
	struct check k = { .name = path, .out = out };
	bool no_manifest = false;
	enum verify_result res = open_check(&k, path, errs, false, &no_manifest);

	if (no_manifest) {
		fprintf(errs, "fleecectl: verify: %s has no manifest of its own: checked only as part of %s\n", path,
			top->name);
		return VERIFY_OK;
	}
	if (res != VERIFY_OK) {
		close_check(&k);
		return res;
	}
	check_size(&k, k.m.format);
	/* The same clusters at the same places: what the top read from this
	 * file or below is this file's view too. */
	bool same_shape = k.m.cluster_size == top->m.cluster_size && k.m.size == top->m.size &&
			  !strcmp(reader_layer_format(k.r, 0), reader_layer_format(top->r, layer));
	uint64_t reread = 0;
	for (uint64_t c = 0; c < k.m.nclusters; c++) {
		/* Read again only what differs, or to say why it is bad. */
		if (same_shape && seen->lowest[c] >= layer && !seen->damaged[c] && seen->sums[c] == k.m.hashes[c])
			continue;
		reread++;
		check_cluster(&k, c, NULL);
	}
	char what[120];
	snprintf(what, sizeof(what), " (its own manifest; %" PRIu64 " clusters read again)", reread);
	summary(&k, what);
	res = k.bad ? VERIFY_DAMAGED : VERIFY_OK;
	close_check(&k);
	return res;
}

enum verify_result verify_backup(const char *target, FILE *out, FILE *errs)
{
	struct check top = { .name = target, .out = out };
	struct seen seen = { 0 };
	enum verify_result res = open_check(&top, target, errs, true, NULL);

	if (res != VERIFY_OK) {
		close_check(&top);
		return res;
	}
	uint64_t n = top.m.nclusters ? top.m.nclusters : 1;
	if (!(seen.sums = malloc(n * sizeof(*seen.sums))) || !(seen.lowest = malloc(n)) || !(seen.damaged = malloc(n))) {
		fprintf(errs, "fleecectl: verify %s: out of memory for %" PRIu64 " clusters\n", target, n);
		res = VERIFY_CANNOT;
		goto done;
	}
	check_size(&top, top.m.format);
	for (uint64_t c = 0; c < top.m.nclusters; c++)
		check_cluster(&top, c, &seen);
	unsigned layers = reader_layers(top.r);
	char what[200] = "";
	if (layers > 1)
		snprintf(what, sizeof(what), " (%s over %u backing file%s)", reader_layer_format(top.r, 0), layers - 1,
			 layers > 2 ? "s" : "");
	else if (!strcmp(reader_layer_format(top.r, 0), "qcow2"))
		snprintf(what, sizeof(what), " (qcow2)");
	summary(&top, what);
	res = top.bad ? VERIFY_DAMAGED : VERIFY_OK;
	for (unsigned i = 1; i < layers; i++)
		res = worse(res, check_element(&top, &seen, i, out, errs));
done:
	free(seen.sums);
	free(seen.lowest);
	free(seen.damaged);
	close_check(&top);
	return res;
}
