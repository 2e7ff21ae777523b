/* verify: checks a backup and its chain against their manifests, without
 * the source (fleecectl verify).
 *
 * TARGET is read as its manifest says (raw, or qcow2 through its backing
 * chain, reader.h) and every cluster is summed and compared with
 * TARGET.xxh3, which describes the whole disk at TARGET's point in time.
 * Then each backing file with a manifest of its own is checked against it:
 * a cluster that TARGET read entirely from that file or below is the same
 * in both views, so its sum is compared without reading it again, and only
 * the clusters the files above it hold are read through its own chain. A
 * chain is thus read about once, however long it is.
 *
 * Each bad cluster is reported on `out` with its offset and what is wrong:
 * the file its data came from for a checksum mismatch, the damaged
 * structure otherwise. Reasons it cannot check go to `errs`.
 *
 * Locking: none (one call, one thread). Returns an enum verify_result.
 */
#ifndef FLEECEFS_VERIFY_H
#define FLEECEFS_VERIFY_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "fleecefs/manifest.h"
#include "fleecefs/reader.h"

enum verify_result {
	VERIFY_OK = 0,          /* every cluster of every file checked is right */
	VERIFY_DAMAGED = 1,     /* some cluster or structure is wrong */
	VERIFY_CANNOT = 2,      /* a manifest or chain element is missing or unreadable */
};

/* How many lines of bad clusters (a run of them that are bad for one
 * reason is one line) are listed for one file before the rest is only
 * counted. */
#define VERIFY_LIST_MAX 100u

enum verify_result verify_backup(const char *target, FILE *out, FILE *errs);

/* Reads cluster c of the disk that m describes through r into buf (one
 * cluster of m) and checks it: true when it matches m. Otherwise `why`
 * says what is wrong: the damage, or a checksum mismatch and where the
 * data came from. *sum and *o get what was read. */
bool verify_cluster(struct reader *r, const struct manifest_file *m, uint64_t c, void *buf, uint64_t *sum,
		    struct reader_origin *o, char *why, size_t whylen);

#endif
