/* snapstore: one image frozen at a point in time T, kept by copy-before-write
 * into a local store; the engine behind snapshot views and fleecing backups.
 *
 * The store is a sparse file in the state directory, laid out like the image.
 * Its copy engine (blockcopy.h) starts with every cluster pending and has no
 * background copy: a guest write copies the old data of the clusters it is
 * about to change into the store (through the write-behind queue) first.
 * Reading the frozen image (snapstore_read) serves copied clusters from the
 * store (after their queued write landed) and the others from the image,
 * registering those reads as frozen (inflight.h) so that no guest write
 * replaces what they are reading; a read never sees half-new data.
 *
 * Breaking: when the store cannot grow (ENOSPC, max-store reached) or a copy
 * fails (unless `fail_guest`: then the guest's write fails instead, and the
 * cluster stays to copy), the store is marked broken: guest writes go on without copying,
 * reads fail with EACCES (the frozen image can no longer be trusted), and
 * the owner frees the store (snapstore_close). The guest is never failed.
 *
 * Discard (fleecing): a cluster the owner has copied elsewhere needs no more
 * protection: it leaves the pending set (guest writes no longer copy it) and
 * its store space is punched.
 *
 * Locking: see blockcopy.h and inflight.h; `broken` and counters are atomic;
 * on_break is called once, from whichever thread broke the store.
 * Errors: 0 or -errno (-EACCES once broken).
 */
#ifndef FLEECEFS_SNAPSTORE_H
#define FLEECEFS_SNAPSTORE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>

#include "fleecefs/blockcopy.h"
#include "fleecefs/image.h"
#include "fleecefs/latency.h"
#include "fleecefs/source.h"

struct target;

struct snapstore {
	struct image *image;        /* referenced */
	struct image_hook hook;
	struct target *store;
	char *store_path;
	int store_read_fd;
	struct blockcopy bc;
	uint64_t size;              /* of the image at T */
	struct stat st_at_t;        /* the image's attributes at T */
	uint64_t max_store;         /* bytes, 0 = no limit; shared accounting below */
	atomic_uint_fast64_t *store_used; /* bytes of data in all stores of the owner */
	atomic_bool broken;
	char break_reason[200];     /* set once, before `broken` */
	void (*on_break)(void *owner, const char *reason);
	void *owner;
	struct copy_source source;  /* the frozen image as a copy source */
	atomic_uint_fast64_t readers; /* reads in progress; close waits for them */
	bool attached;
	bool started;               /* counted as a job of the image (attach) */
	struct latency_histogram *cbw_wait; /* where guest copy latency goes, or NULL */
	/* on-cbw-error=break-guest-write (a fleecing backup): a copy that fails
	 * fails the guest's write with EIO instead of breaking the store; set
	 * at T together with bc.cbw_write_through. */
	bool fail_guest;
};

/* Creates the store file `store_path`, sized as the image is now, and its
 * copy engine; nothing is attached yet, so it may run with the gates open
 * (file creation and a 16-million-cluster engine take milliseconds the
 * guests should not wait for). */
int snapstore_open(struct snapstore *s, struct image *image, const char *store_path, uint32_t cluster_size,
		   uint64_t max_store, atomic_uint_fast64_t *store_used,
		   void (*on_break)(void *owner, const char *reason), void *owner, char *err, size_t errlen);
/* With the image's gate closed (this is T): takes the image's attributes
 * at T and attaches the copy-before-write hook. EBUSY (nothing attached)
 * when the image's size changed since snapstore_open. */
int snapstore_attach(struct snapstore *s, char *err, size_t errlen);
/* Detaches (gate closed by the caller when `gate_closed`), stops the writers,
 * waits for reads in progress, removes the store. Afterwards every read
 * answers EACCES; the struct must outlive the handles that may still read. */
void snapstore_close(struct snapstore *s, bool gate_closed);

/* Reads [off, off + len) of the image as it was at T; returns bytes read
 * (short at the end) or -errno. */
ssize_t snapstore_read(struct snapstore *s, void *buf, uint64_t off, size_t len);
/* SEEK_DATA / SEEK_HOLE on the image as it was at T. */
int64_t snapstore_seek(struct snapstore *s, uint64_t off, int whence);
/* Clusters [first, first + count) are safe elsewhere: stop protecting them. */
void snapstore_discard(struct snapstore *s, uint64_t first, uint64_t count);
/* Marks the store broken (idempotent); reason for status and events. */
void snapstore_break(struct snapstore *s, const char *reason);

#endif
