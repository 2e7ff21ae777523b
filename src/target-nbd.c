/* target-nbd: a backup written to an NBD export, through libnbd.
 *
 * The export is a raw disk of at least the image's size, on any server
 * (qemu-nbd, nbdkit, ...). It has no name to publish under: the backup is
 * complete when the job says so, after an NBD flush succeeded (SPEC 6).
 *
 * Connections: one, or NBD_MAX_CONNS when the server advertises multi-conn
 * (then a flush on one covers the writes of all; each is flushed anyway).
 * Each connection has an I/O thread that drives libnbd's state machine
 * (poll on its socket and on an eventfd that submitters kick); any number
 * of threads submit requests with the asynchronous API and sleep until
 * their own completes, so as many requests are in flight as the copy engine
 * has writers (target.h `writers`).
 *
 * A write the server acknowledged is durable only after a flush. So the
 * target keeps a copy of every write from before it is sent until a flush
 * that started after its answer succeeded (`retained`, about NBD_RETAIN_MAX
 * bytes at most: a write past NBD_RETAIN_FLUSH flushes, and a writer waits
 * for room while one runs). If the connection drops, nothing acknowledged
 * is lost even if the server lost its cache: the reconnect writes
 * everything retained again, oldest first, before any other request. That
 * is right because a job writes each cluster once with its content at its
 * point in time (a write repeated later, even one that had failed, carries
 * the same bytes), and what comes after that for a cluster (forget's
 * zeroes, a rollback's old content) is written later through the same
 * list, so it is sent again later too.
 *
 * In place (sync=incremental onto the chain's last backup in the export):
 * before a cluster is first overwritten, its old content is read from the
 * export and made durable in a local journal (journal.h, in STATE_DIR/nbd),
 * exactly as for a raw file; a failed or cancelled job writes it back, and
 * the next mount does if the daemon (or the server) was gone. An export's
 * identity (dev 0, ino) is the XXH3-64 of its URI and its generation, the
 * count of backups that wrote into it (see "which backup the export
 * holds"): the chain names it, nothing on the server does.
 *
 * A dropped connection is a target error (-ENOTCONN): the job's policy
 * decides (stop pauses it; after resume the next write reconnects). Every
 * request that finds the connection lost gets one attempt of its own, at
 * least NBD_RECONNECT_EVERY_NS after the one before (it waits out the rest);
 * requests that queued behind an attempt that failed share its result, so a
 * dead server costs one attempt per interval, not one per request.
 *
 * Locking: a request holds `conns_lock` shared while it uses a connection;
 * a reconnect (one thread at a time, `reconnect_lock`, taken first) holds
 * it exclusive while it replaces the handles and re-sends. `lock` (a leaf)
 * guards the retained list, the flush flag and the texts. Each request's
 * completion has its own mutex.
 * Errors: 0 or -errno.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>
#include <xxhash.h>

#include "fleecefs/bufpool.h"
#include "fleecefs/cbitmap.h"
#include "fleecefs/journal.h"
#include "fleecefs/manifest.h"
#include "fleecefs/target.h"
#include "fleecefs/util.h"

#define NBD_MAX_CONNS 4
#define NBD_WRITERS 8
#define NBD_CONNECT_TIMEOUT_MS 10000
#define NBD_RETAIN_FLUSH (32u << 20)
#define NBD_RETAIN_MAX (64u << 20)
#define NBD_RECONNECT_EVERY_NS 500000000ull
#define NBD_MAX_REQUEST (32u << 20)

bool target_is_nbd_uri(const char *location)
{
	static const char *const schemes[] = { "nbd://", "nbd+unix://", "nbds://", "nbds+unix://" };
	for (unsigned i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++)
		if (strncmp(location, schemes[i], strlen(schemes[i])) == 0)
			return true;
	return false;
}

/* ---- connecting ------------------------------------------------------------ */

struct nbd_options {
	const char *uri, *tls_certs, *tls_psk;
	bool read_only;   /* a reader: no writes, no flushes needed */
	/* Ask for block status (base:allocation). Only the connection that
	 * looks at the export's zeroes does: the option is one more round
	 * trip in every handshake. */
	bool block_status;
};

/* What the server said, as one line. */
static int server_error(char *err, size_t errlen, const char *uri, const char *what)
{
	const char *text = nbd_get_error();
	int e = nbd_get_errno();
	return set_error(err, errlen, e ? e : EIO, "target %s: %s: %s", uri, what, text ? text : "no answer");
}

/* A handle connected to the export (writable, flushable), or NULL with a
 * message. Connects with a deadline: an unreachable host does not hold a
 * control write for minutes. */
static int nbd_open(const struct nbd_options *o, struct nbd_handle **out, char *err, size_t errlen)
{
	int rc;
	struct nbd_handle *h = nbd_create();
	if (!h)
		return server_error(err, errlen, o->uri, "cannot create a connection");
	nbd_set_handle_name(h, "fleecefs");
	/* The URI may name local files (socket=, tls-psk-file=): the user
	 * wrote it, as root, on the control file. */
	if (nbd_set_uri_allow_local_file(h, true) < 0 ||
	    (o->tls_certs && nbd_set_tls_certificates(h, o->tls_certs) < 0) ||
	    (o->tls_psk && nbd_set_tls_psk_file(h, o->tls_psk) < 0) ||
	    ((o->tls_certs || o->tls_psk) && nbd_set_tls(h, LIBNBD_TLS_REQUIRE) < 0)) {
		rc = server_error(err, errlen, o->uri, "TLS settings");
		goto fail;
	}
	/* Which parts of the export read as zeroes (to skip writing zeroes
	 * there); harmless where the server does not say. */
	if (o->block_status && nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0) {
		rc = server_error(err, errlen, o->uri, "cannot ask for block status");
		goto fail;
	}
	if (nbd_aio_connect_uri(h, o->uri) < 0) {
		rc = server_error(err, errlen, o->uri, "cannot connect");
		goto fail;
	}
	uint64_t deadline = clock_monotonic_ns() + NBD_CONNECT_TIMEOUT_MS * 1000000ull;
	while (nbd_aio_is_connecting(h)) {
		uint64_t now = clock_monotonic_ns();
		if (now >= deadline) {
			rc = set_error(err, errlen, ETIMEDOUT, "target %s: no answer from the server within %u s", o->uri,
				       NBD_CONNECT_TIMEOUT_MS / 1000);
			goto fail;
		}
		if (nbd_poll(h, (int)((deadline - now) / 1000000) + 1) < 0)
			break;
	}
	if (!nbd_aio_is_ready(h)) {
		rc = server_error(err, errlen, o->uri, "cannot connect");
		goto fail;
	}
	if (o->read_only) {
		*out = h;
		return 0;
	}
	if (nbd_is_read_only(h) == 1) {
		rc = set_error(err, errlen, EROFS, "target %s: the server exports it read-only", o->uri);
		goto fail;
	}
	if (nbd_can_flush(h) != 1) {
		rc = set_error(err, errlen, EOPNOTSUPP,
			       "target %s: the server cannot flush, so a backup there could never be known durable", o->uri);
		goto fail;
	}
	*out = h;
	return 0;
fail:
	nbd_close(h);
	return rc;
}

int target_nbd_connect_reader(const char *uri, struct nbd_handle **out, char *err, size_t errlen)
{
	struct nbd_options o = { .uri = uri, .read_only = true };
	return nbd_open(&o, out, err, errlen);
}

/* ---- one request ----------------------------------------------------------- */

struct nbd_wait {
	pthread_mutex_t lock;
	pthread_cond_t done_cond;
	bool done;
	int err;
};

static int request_done(void *user_data, int *error)
{
	struct nbd_wait *w = user_data;
	pthread_mutex_lock(&w->lock);
	w->err = *error;
	w->done = true;
	pthread_cond_signal(&w->done_cond);
	pthread_mutex_unlock(&w->lock);
	return 1;   /* retire the command: nobody asks for it again */
}

/* ---- the target ------------------------------------------------------------- */

struct nbd_conn {
	struct nbd_handle *h;   /* NULL: lost (reconnect makes a new one) */
	int kick;               /* eventfd: a request was submitted */
	pthread_t thread;
	bool running;
	atomic_bool stop;
};

static const char zero_buffer[1 << 20];

struct retained {
	struct retained *next;
	uint64_t off, len;
	uint64_t cap;           /* bytes of data[] (a spare is reused for any len <= cap) */
	bool zero;
	bool answered;          /* the server answered its write (or it failed) */
	bool in_flush;          /* answered before the running flush began */
	const char *bytes;      /* the write's data: data[], or in owner's */
	struct shared_buffer *owner;  /* held while retained (NULL: data[]) */
	char data[];
};

struct nbd_target {
	struct target base;
	char *uri, *tls_certs, *tls_psk;
	uint64_t export_size;
	uint32_t max_request;
	bool can_zero, can_trim, multi_conn;
	/* The whole export read as zeroes when the job began (the server's
	 * block status said so): zero clusters need no write, as on a new
	 * sparse file. Never in place. */
	bool fresh;
	pthread_mutex_t reconnect_lock;
	pthread_rwlock_t conns_lock;
	struct nbd_conn conns[NBD_MAX_CONNS];
	unsigned nconns;
	atomic_uint next_conn;
	atomic_bool lost;
	atomic_bool resend_before_flush; /* the last flush failed */
	uint64_t last_attempt_ns;        /* reconnect_lock */
	atomic_uint attempts;            /* written under reconnect_lock */
	pthread_mutex_t lock;            /* a leaf: what follows */
	pthread_cond_t retain_room;
	unsigned reconnects;
	char state_text[300];            /* "connected" or why not */
	/* Why the connection was last lost: an ENOTCONN is explained by it
	 * even once another thread has connected again. */
	char loss_text[300];
	struct journal *journal;         /* in place: the undo journal */
	struct retained *retained_head;  /* newest first */
	uint64_t retained_bytes;
	/* Blocks a flush let go, kept for the next writes (a write copies
	 * into one instead of a fresh malloc, whose pages the kernel would
	 * map and unmap each time: a tenth of the copy's CPU). */
	struct retained *spare;
	uint64_t spare_bytes;
	bool flushing;
};

static struct nbd_target *nbdt(struct target *t) { return (struct nbd_target *)t; }

static void set_state(struct nbd_target *n, const char *fmt, const char *text)
{
	pthread_mutex_lock(&n->lock);
	snprintf(n->state_text, sizeof(n->state_text), fmt, text);
	pthread_mutex_unlock(&n->lock);
}

static void *conn_loop(void *arg)
{
	struct nbd_conn *c = arg;

	while (!atomic_load(&c->stop)) {
		int fd = nbd_aio_get_fd(c->h);
		unsigned dir = nbd_aio_get_direction(c->h);
		if (fd < 0 || nbd_aio_is_dead(c->h) || nbd_aio_is_closed(c->h))
			break;
		struct pollfd p[2] = { { .fd = fd }, { .fd = c->kick, .events = POLLIN } };
		if (dir & LIBNBD_AIO_DIRECTION_READ)
			p[0].events |= POLLIN;
		if (dir & LIBNBD_AIO_DIRECTION_WRITE)
			p[0].events |= POLLOUT;
		if (poll(p, 2, -1) < 0)
			continue;
		if (p[1].revents & POLLIN) {
			uint64_t count;
			if (read(c->kick, &count, sizeof(count)) < 0) {
				/* Nothing to do: the next poll asks again. */
			}
		}
		if (p[0].revents & (POLLIN | POLLHUP | POLLERR))
			nbd_aio_notify_read(c->h);
		else if (p[0].revents & POLLOUT)
			nbd_aio_notify_write(c->h);
	}
	/* Dead: libnbd has failed every request in flight (their callbacks
	 * ran), and fails new ones at once. */
	return NULL;
}

static int conn_start(struct nbd_conn *c, struct nbd_handle *h)
{
	c->h = h;
	atomic_store(&c->stop, false);
	if (c->kick < 0 && (c->kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
		return -errno;
	int rc = pthread_create(&c->thread, NULL, conn_loop, c);
	if (rc)
		return -rc;
	c->running = true;
	return 0;
}

static void conn_kick(struct nbd_conn *c)
{
	uint64_t one = 1;
	if (write(c->kick, &one, sizeof(one)) < 0) {
		/* The counter is full: the loop is awake anyway. */
	}
}

/* Stops the loop and drops the handle (a polite disconnect if it works). */
static void conn_stop(struct nbd_conn *c, bool polite)
{
	if (c->running) {
		atomic_store(&c->stop, true);
		conn_kick(c);
		pthread_join(c->thread, NULL);
		c->running = false;
	}
	if (c->h) {
		if (polite && nbd_aio_is_ready(c->h))
			nbd_shutdown(c->h, 0);
		nbd_close(c->h);
		c->h = NULL;
	}
}

enum nbd_op { OP_WRITE, OP_ZERO, OP_TRIM, OP_FLUSH, OP_READ };

static void mark_lost(struct nbd_target *n, const char *why)
{
	pthread_mutex_lock(&n->lock);
	snprintf(n->state_text, sizeof(n->state_text), "lost: %s", why);
	snprintf(n->loss_text, sizeof(n->loss_text), "%s", why);
	pthread_mutex_unlock(&n->lock);
	atomic_store(&n->lost, true);
}

/* Did a request fail with err because the connection is gone? libnbd fails
 * the requests in flight with ENOTCONN as the connection dies, possibly
 * before the handle reads as dead. */
static bool connection_gone(struct nbd_handle *h, int err)
{
	return err == ENOTCONN || err == EPIPE || err == ECONNRESET || err == ESHUTDOWN || nbd_aio_is_dead(h) ||
	       nbd_aio_is_closed(h);
}

/* One request on connection c, waited for. conns_lock held (either way). */
static int conn_request(struct nbd_target *n, struct nbd_conn *c, enum nbd_op op, uint64_t off, const void *buf,
			uint64_t len)
{
	struct nbd_wait w = { .lock = PTHREAD_MUTEX_INITIALIZER, .done_cond = PTHREAD_COND_INITIALIZER };
	nbd_completion_callback cb = { .callback = request_done, .user_data = &w };
	int64_t cookie;

	if (!c->h) {
		mark_lost(n, "the connection is not open");
		return -ENOTCONN;
	}
	switch (op) {
	case OP_WRITE:
		cookie = nbd_aio_pwrite(c->h, buf, len, off, cb, 0);
		break;
	case OP_ZERO:
		cookie = nbd_aio_zero(c->h, len, off, cb, 0);
		break;
	case OP_TRIM:
		cookie = nbd_aio_trim(c->h, len, off, cb, 0);
		break;
	case OP_READ:
		cookie = nbd_aio_pread(c->h, (void *)buf, len, off, cb, 0);
		break;
	default:
		cookie = nbd_aio_flush(c->h, cb, 0);
		break;
	}
	if (cookie < 0) {
		int e = nbd_get_errno();
		if (connection_gone(c->h, e)) {
			mark_lost(n, nbd_get_error() ? nbd_get_error() : "the connection is closed");
			return -ENOTCONN;
		}
		return -(e ? e : EIO);
	}
	if (nbd_aio_get_direction(c->h) & LIBNBD_AIO_DIRECTION_WRITE)
		conn_kick(c);
	pthread_mutex_lock(&w.lock);
	while (!w.done)
		pthread_cond_wait(&w.done_cond, &w.lock);
	pthread_mutex_unlock(&w.lock);
	pthread_mutex_destroy(&w.lock);
	pthread_cond_destroy(&w.done_cond);
	if (!w.err)
		return 0;
	if (connection_gone(c->h, w.err)) {
		mark_lost(n, "the server closed the connection");
		return -ENOTCONN;
	}
	return -w.err;
}

/* r's bytes are not needed any more. */
static void let_go(struct retained *r)
{
	shared_buffer_release(r->owner);
	r->owner = NULL;
	r->bytes = NULL;
}

static void free_list(struct retained *r)
{
	while (r) {
		struct retained *next = r->next;
		let_go(r);
		free(r);
		r = next;
	}
}

/* Writes everything retained again, oldest first. conns_lock exclusive. */
static int resend_retained(struct nbd_target *n)
{
	pthread_mutex_lock(&n->lock);
	unsigned count = 0;
	for (struct retained *r = n->retained_head; r; r = r->next)
		count++;
	struct retained **all = count ? malloc(count * sizeof(*all)) : NULL;
	unsigned i = count;
	if (all)
		for (struct retained *r = n->retained_head; r; r = r->next)
			all[--i] = r;
	pthread_mutex_unlock(&n->lock);
	if (count && !all)
		return -ENOMEM;
	/* The list only grows at its head meanwhile and nothing leaves it
	 * (a flush lets go only after its request, which needs conns_lock),
	 * so these stay valid. */
	int rc = 0;
	for (i = 0; i < count && !rc; i++) {
		struct retained *r = all[i];
		enum nbd_op op = r->zero && n->can_zero ? OP_ZERO : OP_WRITE;
		for (uint64_t done = 0; done < r->len && !rc;) {
			uint64_t piece = min_u64(r->len - done, r->zero && !n->can_zero ? sizeof(zero_buffer) : n->max_request);
			const void *buf = r->zero ? (n->can_zero ? NULL : zero_buffer) : r->bytes + done;
			rc = conn_request(n, &n->conns[0], op, r->off + done, buf, piece);
			done += piece;
		}
	}
	free(all);
	return rc;
}

/* Makes every connection work again after a loss. reconnect_lock held. */
static int reconnect_locked(struct nbd_target *n, unsigned attempts_seen)
{
	uint64_t now = clock_monotonic_ns();
	char err[300] = "";
	int rc = 0;

	if (!atomic_load(&n->lost))
		return 0;
	if (atomic_load(&n->attempts) != attempts_seen)
		return -ENOTCONN;
	if (n->last_attempt_ns && now - n->last_attempt_ns < NBD_RECONNECT_EVERY_NS) {
		uint64_t rest = NBD_RECONNECT_EVERY_NS - (now - n->last_attempt_ns);
		struct timespec ts = { (time_t)(rest / 1000000000ull), (long)(rest % 1000000000ull) };
		while (nanosleep(&ts, &ts) && errno == EINTR)
			;
	}
	n->last_attempt_ns = clock_monotonic_ns();
	atomic_fetch_add(&n->attempts, 1);
	pthread_rwlock_wrlock(&n->conns_lock);
	for (unsigned i = 0; i < n->nconns; i++)
		conn_stop(&n->conns[i], false);
	struct nbd_options o = { n->uri, n->tls_certs, n->tls_psk, false, false };
	for (unsigned i = 0; i < n->nconns && !rc; i++) {
		struct nbd_handle *h;
		if ((rc = nbd_open(&o, &h, err, sizeof(err))))
			break;
		if ((uint64_t)nbd_get_size(h) < n->base.size) {
			snprintf(err, sizeof(err), "the export shrank to %" PRId64 " bytes", nbd_get_size(h));
			nbd_close(h);
			rc = -ENOSPC;
		} else if ((rc = conn_start(&n->conns[i], h))) {
			nbd_close(h);
			snprintf(err, sizeof(err), "cannot start an I/O thread");
		}
	}
	if (!rc) {
		atomic_store(&n->lost, false);
		if ((rc = resend_retained(n)))
			snprintf(err, sizeof(err), "writing again what was not flushed: %s", error_text(-rc));
	}
	pthread_rwlock_unlock(&n->conns_lock);
	if (rc) {
		atomic_store(&n->lost, true);
		set_state(n, "lost: reconnecting failed: %s", err);
		return -ENOTCONN;
	}
	pthread_mutex_lock(&n->lock);
	n->reconnects++;
	snprintf(n->state_text, sizeof(n->state_text), "connected");
	uint64_t again = n->retained_bytes;
	pthread_mutex_unlock(&n->lock);
	log_info("target %s: connected again; wrote again the %" PRIu64 " bytes not yet flushed", n->uri, again);
	return 0;
}

/* Runs fn with conns_lock shared, reconnecting first if the connection was
 * lost. */
static int with_connection(struct nbd_target *n, enum nbd_op op, uint64_t off, const void *buf, uint64_t len)
{
	if (atomic_load(&n->lost)) {
		unsigned attempts_seen = atomic_load(&n->attempts);
		pthread_mutex_lock(&n->reconnect_lock);
		int rc = reconnect_locked(n, attempts_seen);
		pthread_mutex_unlock(&n->reconnect_lock);
		if (rc)
			return rc;
	}
	int rc = 0;
	pthread_rwlock_rdlock(&n->conns_lock);
	if (op == OP_FLUSH) {
		/* Each connection's writes are flushed on it (multi-conn or not). */
		for (unsigned i = 0; i < n->nconns && !rc; i++)
			rc = conn_request(n, &n->conns[i], OP_FLUSH, 0, NULL, 0);
	} else {
		rc = conn_request(n, &n->conns[atomic_fetch_add(&n->next_conn, 1) % n->nconns], op, off, buf, len);
	}
	pthread_rwlock_unlock(&n->conns_lock);
	return rc;
}

/* [off, off + len) in requests the server takes. */
static int request(struct nbd_target *n, enum nbd_op op, uint64_t off, const void *buf, uint64_t len)
{
	if (op == OP_FLUSH)
		return with_connection(n, op, 0, NULL, 0);
	while (len) {
		uint64_t piece = min_u64(len, n->max_request);
		int rc = with_connection(n, op, off, buf, piece);
		if (rc)
			return rc;
		off += piece;
		len -= piece;
		if (buf)
			buf = (const char *)buf + piece;
	}
	return 0;
}

/* Flushes; every retained write answered before it started is durable
 * after it and let go. They stay on the list while it runs: a reconnect
 * meanwhile must write them again before the flush is sent. */
static int flush_retained(struct nbd_target *n)
{
	/* A flush that failed may have lost what it was to cover (a server's
	 * failed fsync drops dirty pages): send it all again first. After a
	 * lost connection the reconnect does that. */
	if (atomic_exchange(&n->resend_before_flush, false)) {
		pthread_rwlock_wrlock(&n->conns_lock);
		int rc = atomic_load(&n->lost) ? 0 : resend_retained(n);
		pthread_rwlock_unlock(&n->conns_lock);
		if (rc) {
			atomic_store(&n->resend_before_flush, true);
			return rc;
		}
	}
	pthread_mutex_lock(&n->lock);
	while (n->flushing)
		pthread_cond_wait(&n->retain_room, &n->lock);
	n->flushing = true;
	for (struct retained *r = n->retained_head; r; r = r->next)
		r->in_flush = r->answered;
	pthread_mutex_unlock(&n->lock);

	int rc = request(n, OP_FLUSH, 0, NULL, 0);
	if (rc)
		atomic_store(&n->resend_before_flush, true);

	/* A reconnect re-sends the list under conns_lock exclusive, reading
	 * entries without n->lock: what this flush covered may leave the list
	 * (its buffer going back to the pool) only while no re-send runs. */
	struct retained *covered = NULL;
	pthread_rwlock_rdlock(&n->conns_lock);
	pthread_mutex_lock(&n->lock);
	for (struct retained **at = &n->retained_head; *at;) {
		struct retained *r = *at;
		if (r->in_flush && !rc) {
			*at = r->next;
			r->next = covered;
			covered = r;
			n->retained_bytes -= r->zero ? 0 : r->len;
		} else {
			r->in_flush = false;
			at = &r->next;
		}
	}
	/* Back to the spares, up to the retention bound; the rest freed. */
	struct retained *drop = NULL;
	while (covered) {
		struct retained *r = covered;
		covered = r->next;
		let_go(r);
		if (r->cap && n->spare_bytes + r->cap <= NBD_RETAIN_MAX) {
			r->next = n->spare;
			n->spare = r;
			n->spare_bytes += r->cap;
		} else {
			r->next = drop;
			drop = r;
		}
	}
	n->flushing = false;
	pthread_cond_broadcast(&n->retain_room);
	pthread_mutex_unlock(&n->lock);
	pthread_rwlock_unlock(&n->conns_lock);
	free_list(drop);
	return rc;
}

/* A write's data, kept from before it is sent until a flush covers it: a
 * copy, or with an owner a hold on the caller's buffer (NULL buf: zeroes). */
static struct retained *retain_begin(struct nbd_target *n, uint64_t off, const void *buf, uint64_t len,
				     struct shared_buffer *owner)
{
	struct retained *r = NULL;
	uint64_t need = buf && !owner ? len : 0;
	if (need) {
		pthread_mutex_lock(&n->lock);
		for (struct retained **at = &n->spare; *at; at = &(*at)->next) {
			if ((*at)->cap >= need) {
				r = *at;
				*at = r->next;
				n->spare_bytes -= r->cap;
				break;
			}
		}
		pthread_mutex_unlock(&n->lock);
	}
	if (!r) {
		if (!(r = malloc(sizeof(*r) + need)))
			return NULL;
		r->cap = need;
	}
	r->off = off;
	r->len = len;
	r->zero = !buf;
	r->answered = false;
	r->in_flush = false;
	r->owner = owner;
	if (owner) {
		shared_buffer_hold(owner);
		r->bytes = buf;
	} else if (buf) {
		memcpy(r->data, buf, len);
		r->bytes = r->data;
	} else {
		r->bytes = NULL;
	}
	pthread_mutex_lock(&n->lock);
	while (n->flushing && n->retained_bytes >= NBD_RETAIN_MAX)
		pthread_cond_wait(&n->retain_room, &n->lock);
	r->next = n->retained_head;
	n->retained_head = r;
	n->retained_bytes += buf ? len : 0;
	pthread_mutex_unlock(&n->lock);
	return r;
}

/* The write of r was answered (or failed: then it is sent again at a
 * reconnect, harmlessly, or the caller writes it again). */
static int retain_end(struct nbd_target *n, struct retained *r)
{
	pthread_mutex_lock(&n->lock);
	r->answered = true;
	bool flush_now = !n->flushing && n->retained_bytes >= NBD_RETAIN_FLUSH;
	pthread_mutex_unlock(&n->lock);
	return flush_now ? flush_retained(n) : 0;
}

static int write_retained(struct nbd_target *n, enum nbd_op op, uint64_t off, const void *buf, uint64_t len,
			  const void *kept, struct shared_buffer *owner)
{
	struct retained *r = retain_begin(n, off, kept, len, owner);
	if (!r)
		return -ENOMEM;
	int rc = request(n, op, off, buf, len);
	int rc2 = retain_end(n, r);
	return rc ? rc : rc2;
}

/* ---- which backup the export holds ------------------------------------------
 * Nothing on the server says which backup an export holds, so the state
 * directory counts the backups that began writing into it
 * (STATE_DIR/nbd/HASH.gen, HASH the URI's as for its manifest): a full or
 * top backup takes the next generation when its target is created, before
 * its first write, and the chain record names the export by URI and
 * generation.
 * A chain whose last backup was overwritten since (by another chain, or by
 * a backup that failed) no longer matches, and its next incremental in
 * place is refused instead of completing on foreign content. An in-place
 * incremental keeps the generation: it ends as T2 or rolls back to T1.
 * Exports written before generations existed are generation 0. */

static void generation_path(const char *uri, char *buf, size_t len)
{
	snprintf(buf, len, "%s/%016llx.gen", manifest_nbd_dir(), (unsigned long long)XXH3_64bits(uri, strlen(uri)));
}

/* The export's generation, 0 if none was recorded (or no state directory). */
static uint64_t export_generation(const char *uri)
{
	char path[PATH_MAX], text[32] = "";
	if (!manifest_nbd_dir())
		return 0;
	generation_path(uri, path, sizeof(path));
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t got = read(fd, text, sizeof(text) - 1);
	close(fd);
	return got > 0 ? strtoull(text, NULL, 10) : 0;
}

/* Durably records that a new backup begins writing into the export. */
static int next_generation(const char *uri, uint64_t *generation)
{
	char path[PATH_MAX], text[32];
	if (!manifest_nbd_dir()) {
		*generation = 0;
		return 0;
	}
	generation_path(uri, path, sizeof(path));
	uint64_t next = export_generation(uri) + 1;
	int len = snprintf(text, sizeof(text), "%" PRIu64 "\n", next);
	int rc = write_file_atomic(path, text, (size_t)len, true);
	if (!rc)
		*generation = next;
	return rc;
}

static uint64_t export_identity(const char *uri, uint64_t generation)
{
	size_t len = strlen(uri);
	uint64_t h = generation ? XXH3_64bits_withSeed(uri, len, generation) : XXH3_64bits(uri, len);
	return h ? h : 1;
}

/* In place, nothing is overwritten before its old content is journaled. */
static int protect(struct nbd_target *n, uint64_t off, uint64_t len)
{
	if (!n->journal || journal_covers(n->journal, off, len))
		return 0;
	struct journal_range range = { off, len };
	return journal_protect(n->journal, &range, 1);
}

static int nbdt_write(struct target *t, uint64_t off, const void *buf, size_t len, unsigned flags)
{
	(void)flags;
	struct nbd_target *n = nbdt(t);
	int rc = protect(n, off, len);
	return rc ? rc : write_retained(n, OP_WRITE, off, buf, len, buf, NULL);
}

/* The copy engine's run buffers are kept as they are, not copied (a copy of
 * every byte sent was a sixth of the daemon's CPU). */
static int nbdt_write_shared(struct target *t, uint64_t off, const void *buf, size_t len, unsigned flags,
			     struct shared_buffer *owner)
{
	(void)flags;
	struct nbd_target *n = nbdt(t);
	int rc = protect(n, off, len);
	return rc ? rc : write_retained(n, OP_WRITE, off, buf, len, buf, owner);
}

static int zero_range(struct nbd_target *n, uint64_t off, uint64_t len)
{
	if (n->can_zero)   /* the server makes it read as zeroes, a hole where it can */
		return write_retained(n, OP_ZERO, off, NULL, len, NULL, NULL);
	int rc = 0;
	for (uint64_t done = 0; done < len && !rc; done += sizeof(zero_buffer)) {
		uint64_t piece = min_u64(len - done, sizeof(zero_buffer));
		rc = write_retained(n, OP_WRITE, off + done, zero_buffer, piece, NULL, NULL);
	}
	return rc;
}

static int nbdt_write_zeroes(struct target *t, uint64_t off, uint64_t len)
{
	struct nbd_target *n = nbdt(t);
	if (n->fresh)
		return 0;
	int rc = protect(n, off, len);
	return rc ? rc : zero_range(n, off, len);
}

static int nbdt_prepare_writes(struct target *t, const struct journal_range *ranges, unsigned count)
{
	struct nbd_target *n = nbdt(t);
	return n->journal ? journal_protect(n->journal, ranges, count) : 0;
}

/* ---- the export as a journal sees it ---------------------------------------- */

static int jf_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
	struct nbd_target *n = ctx;
	uint64_t inside = off < n->export_size ? min_u64(len, n->export_size - off) : 0;
	int rc = inside ? request(n, OP_READ, off, buf, inside) : 0;
	if (!rc && inside < len)
		memset((char *)buf + inside, 0, (size_t)(len - inside));
	return rc;
}

static int jf_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
	return write_retained(ctx, OP_WRITE, off, buf, len, buf, NULL);
}

static int jf_zero(void *ctx, uint64_t off, uint64_t len)
{
	return zero_range(ctx, off, len);
}

static int jf_sync(void *ctx)
{
	return flush_retained(ctx);
}

static struct journal_file journal_file_of(struct nbd_target *n)
{
	return (struct journal_file){ .read = jf_read, .write = jf_write, .zero = jf_zero, .sync = jf_sync, .ctx = n,
				      .dev = 0, .ino = export_identity(n->uri, 0) };
}

static int nbdt_discard(struct target *t, uint64_t off, uint64_t len)
{
	struct nbd_target *n = nbdt(t);
	return n->can_trim ? request(n, OP_TRIM, off, NULL, len) : 0;
}

static int nbdt_set_size(struct target *t, uint64_t size, char *err, size_t errlen)
{
	struct nbd_target *n = nbdt(t);
	if (n->export_size < size)
		return set_error(err, errlen, ENOSPC, "target %s: the export holds %" PRIu64 " bytes, the image %" PRIu64,
				 n->uri, n->export_size, size);
	t->size = size;
	return 0;
}

static int nbdt_flush(struct target *t)
{
	return flush_retained(nbdt(t));
}

static void nbdt_describe(struct target *t, struct strbuf *out)
{
	struct nbd_target *n = nbdt(t);
	pthread_mutex_lock(&n->lock);
	strbuf_printf(out, "target_connection=%s\ntarget_connections=%u\ntarget_reconnects=%u\ntarget_unflushed_bytes=%" PRIu64
		      "\n", n->state_text, n->nconns, n->reconnects, n->retained_bytes);
	pthread_mutex_unlock(&n->lock);
}

static void nbdt_explain(struct target *t, int err, char *buf, size_t len)
{
	struct nbd_target *n = nbdt(t);
	pthread_mutex_lock(&n->lock);
	if (err == ENOTCONN && n->loss_text[0] && strncmp(n->state_text, "lost", 4) != 0)
		snprintf(buf, len, "%s (NBD server %s, connection lost: %s; now %s)", error_text(err), n->uri,
			 n->loss_text, n->state_text);
	else
		snprintf(buf, len, "%s (NBD server %s, connection %s)", error_text(err), n->uri, n->state_text);
	pthread_mutex_unlock(&n->lock);
}

/* What a failed job leaves: zeroes where `left` says, as for a new file;
 * in place, the old content back. */
static int nbdt_forget(struct target *t, const struct cbitmap *left, unsigned cluster_bits)
{
	struct nbd_target *n = nbdt(t);
	if (n->journal)   /* only what the journal saved was touched at all */
		return journal_rollback(n->journal, left);
	int rc = 0;
	for (uint64_t c = cbitmap_next_set(left, 0); c < left->nbits && !rc;) {
		uint64_t end = cbitmap_next_clear(left, c);
		uint64_t off = c << cluster_bits;
		uint64_t len = min_u64((end - c) << cluster_bits, t->size - min_u64(off, t->size));
		if (len)
			rc = zero_range(n, off, len);   /* whatever a fresh export read */
		c = end < left->nbits ? cbitmap_next_set(left, end) : left->nbits;
	}
	return rc ? rc : nbdt_flush(t);
}

/* An export has no name to take: the result stays where it is. */
static int nbdt_publish(struct target *t, const char *name, char *err, size_t errlen)
{
	(void)name;
	(void)err;
	(void)errlen;
	t->published = true;
	return 0;
}

static int nbdt_close_target(struct target *t, bool keep)
{
	struct nbd_target *n = nbdt(t);
	int rc = 0;
	/* Kept: durable already (the job flushed). Not kept: a new backup
	 * cannot be taken back on an export (only its record says it failed);
	 * one in place is rolled back, or its journal stays for the next mount. */
	if (n->journal) {
		if (!keep)
			rc = journal_rollback(n->journal, NULL);
		int rc2 = journal_close(n->journal, rc == 0);
		rc = rc ? rc : rc2;
		n->journal = NULL;
	}
	for (unsigned i = 0; i < n->nconns; i++)
		conn_stop(&n->conns[i], true);
	/* A concluded job keeps no buffers: nothing is sent again now. */
	pthread_mutex_lock(&n->lock);
	struct retained *gone = n->retained_head, *spares = n->spare;
	n->retained_head = n->spare = NULL;
	n->retained_bytes = n->spare_bytes = 0;
	snprintf(n->state_text, sizeof(n->state_text), "closed");
	pthread_mutex_unlock(&n->lock);
	free_list(gone);
	free_list(spares);
	return rc;
}

static void nbd_free_target(struct target *t)
{
	struct nbd_target *n = nbdt(t);
	if (n->journal)
		journal_close(n->journal, false);
	for (unsigned i = 0; i < n->nconns; i++) {
		conn_stop(&n->conns[i], false);
		if (n->conns[i].kick >= 0)
			close(n->conns[i].kick);
	}
	free_list(n->retained_head);
	free_list(n->spare);
	pthread_mutex_destroy(&n->lock);
	pthread_mutex_destroy(&n->reconnect_lock);
	pthread_rwlock_destroy(&n->conns_lock);
	pthread_cond_destroy(&n->retain_room);
	free(n->uri);
	free(n->tls_certs);
	free(n->tls_psk);
	free(t->path);
	free(n);
}

static const struct target_ops nbd_ops = {
	.write = nbdt_write,
	.write_shared = nbdt_write_shared,
	.write_zeroes = nbdt_write_zeroes,
	.prepare_writes = nbdt_prepare_writes,
	.discard = nbdt_discard,
	.set_size = nbdt_set_size,
	.flush = nbdt_flush,
	.describe = nbdt_describe,
	.explain = nbdt_explain,
	.forget = nbdt_forget,
	.publish = nbdt_publish,
	.close = nbdt_close_target,
	.free = nbd_free_target,
};

static char *dup_or_null(const char *s, bool *failed)
{
	char *d = s ? strdup(s) : NULL;
	if (s && !d)
		*failed = true;
	return d;
}

struct zero_walk {
	uint64_t pos;
	bool all_zero;
};

static int extent_seen(void *user_data, const char *context, uint64_t offset, uint32_t *entries, size_t n,
		       int *error)
{
	(void)offset;
	(void)error;
	struct zero_walk *w = user_data;
	if (strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
		return 0;
	for (size_t i = 0; i + 1 < n; i += 2) {
		if (!(entries[i + 1] & LIBNBD_STATE_ZERO))
			w->all_zero = false;
		w->pos += entries[i];
	}
	return 0;
}

/* Does every byte of the export read as zeroes (block status)? No answer,
 * or any doubt: no. */
static bool reads_as_zeroes(struct nbd_handle *h, uint64_t size)
{
	if (nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) != 1)
		return false;
	struct zero_walk w = { .pos = 0, .all_zero = true };
	while (w.pos < size && w.all_zero) {
		uint64_t before = w.pos;
		nbd_extent_callback cb = { .callback = extent_seen, .user_data = &w };
		if (nbd_block_status(h, min_u64(size - w.pos, 1u << 30), w.pos, cb, 0) < 0 || w.pos == before)
			return false;
	}
	return w.all_zero;
}

struct opener {
	pthread_t thread;
	const struct nbd_options *options;
	struct nbd_handle *h;   /* NULL: failed */
	bool started;
};

static void *opener_thread(void *arg)
{
	struct opener *op = arg;
	char ignored[300];
	if (nbd_open(op->options, &op->h, ignored, sizeof(ignored)))
		op->h = NULL;
	return NULL;
}

/* `count` more connections, their handshakes at once (over TCP each takes
 * a few round trips, which servers without TCP_NODELAY stretch to tens of
 * ms) and while the caller goes on: openers_start, then openers_finish,
 * which returns how many opened, in out[0..]. */
static void openers_start(struct opener *ops, const struct nbd_options *o, unsigned count)
{
	for (unsigned i = 0; i < count; i++) {
		ops[i] = (struct opener){ .options = o };
		ops[i].started = pthread_create(&ops[i].thread, NULL, opener_thread, &ops[i]) == 0;
	}
}

static unsigned openers_finish(struct opener *ops, unsigned count, struct nbd_handle **out)
{
	unsigned got = 0;
	for (unsigned i = 0; i < count; i++) {
		if (!ops[i].started)
			continue;
		pthread_join(ops[i].thread, NULL);
		if (ops[i].h)
			out[got++] = ops[i].h;
	}
	return got;
}

static int nbd_create_target(const struct target_spec *spec, const char *temp, struct target **out, char *err,
			     size_t errlen)
{
	(void)temp;
	struct nbd_target *n = calloc(1, sizeof(*n));
	bool failed = !n;
	int rc;

	if (n) {
		n->uri = dup_or_null(spec->location, &failed);
		n->tls_certs = dup_or_null(spec->tls_certs, &failed);
		n->tls_psk = dup_or_null(spec->tls_psk, &failed);
		n->base.path = dup_or_null(spec->location, &failed);
		for (unsigned i = 0; i < NBD_MAX_CONNS; i++)
			n->conns[i].kick = -1;
		pthread_mutex_init(&n->lock, NULL);
		pthread_mutex_init(&n->reconnect_lock, NULL);
		pthread_rwlockattr_t attr;
		pthread_rwlockattr_init(&attr);
		/* A reconnect must not wait behind a stream of requests. */
		pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
		pthread_rwlock_init(&n->conns_lock, &attr);
		pthread_rwlockattr_destroy(&attr);
		pthread_cond_init(&n->retain_room, NULL);
		n->nconns = 1;
	}
	if (failed) {
		if (n)
			nbd_free_target(&n->base);
		return set_error(err, errlen, ENOMEM, "target %s: out of memory", spec->location);
	}
	n->base.ops = &nbd_ops;
	n->base.writers = NBD_WRITERS;
	/* A new backup takes the next generation before the gates close (no
	 * fsync at T): a transaction that aborts after this only makes the
	 * chain's next incremental refuse, the safe side. */
	uint64_t generation = export_generation(n->uri);
	if (!spec->in_place && (rc = next_generation(n->uri, &generation))) {
		set_error(err, errlen, -rc, "target %s: cannot record the new backup in %s: %s", n->uri,
			  manifest_nbd_dir(), error_text(-rc));
		goto fail;
	}
	n->base.ino = (ino_t)export_identity(n->uri, generation);
	struct nbd_options o = { n->uri, n->tls_certs, n->tls_psk, false, !spec->in_place };
	struct nbd_handle *h;
	if ((rc = nbd_open(&o, &h, err, errlen)))
		goto fail;
	o.block_status = false;
	int64_t size = nbd_get_size(h);
	n->export_size = size > 0 ? (uint64_t)size : 0;
	n->can_zero = nbd_can_zero(h) == 1;
	n->can_trim = nbd_can_trim(h) == 1;
	n->multi_conn = nbd_can_multi_conn(h) == 1;
	/* More connections only where the server says they see one another's
	 * writes (multi-conn); one is enough if the others fail. */
	struct opener openers[NBD_MAX_CONNS - 1];
	unsigned more = n->multi_conn ? NBD_MAX_CONNS - 1 : 0;
	openers_start(openers, &o, more);
	n->fresh = !spec->in_place && reads_as_zeroes(h, n->export_size);
	n->base.holes_need_zeroes = !n->fresh;
	int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
	n->max_request = max > 0 && max < NBD_MAX_REQUEST ? (uint32_t)max : NBD_MAX_REQUEST;
	struct nbd_handle *extra[NBD_MAX_CONNS - 1];
	unsigned got = openers_finish(openers, more, extra);
	if ((rc = conn_start(&n->conns[0], h))) {
		nbd_close(h);
		for (unsigned i = 0; i < got; i++)
			nbd_close(extra[i]);
		set_error(err, errlen, -rc, "target %s: cannot start its I/O thread: %s", n->uri, error_text(-rc));
		goto fail;
	}
	for (unsigned i = 0; i < got; i++)
		if (conn_start(&n->conns[n->nconns], extra[i]))
			nbd_close(extra[i]);
		else
			n->nconns++;
	snprintf(n->state_text, sizeof(n->state_text), "connected");
	*out = &n->base;
	return 0;
fail:
	nbd_free_target(&n->base);
	return rc;
}

/* Before anything starts: the files TLS needs are there, and the server
 * answers with a writable export (its size is checked at the point in
 * time, by set_size). */
static int nbd_check(const struct target_spec *spec, char *err, size_t errlen)
{
	const char *uri = spec->location;
	bool tls = strncmp(uri, "nbds", 4) == 0;   /* libnbd says if it cannot do TLS */
	struct stat st;

	if ((spec->tls_certs || spec->tls_psk) && !tls)
		return set_error(err, errlen, EINVAL, "target %s: tls-certs= and tls-psk= need an nbds:// or nbds+unix:// URI",
				 uri);
	if (spec->tls_certs && spec->tls_psk)
		return set_error(err, errlen, EINVAL, "target %s: give tls-certs= or tls-psk=, not both", uri);
	if (spec->tls_certs && stat(spec->tls_certs, &st) < 0)
		return set_error(err, errlen, errno, "target %s: tls-certs=%s: %s", uri, spec->tls_certs, error_text(errno));
	if (spec->tls_certs && !S_ISDIR(st.st_mode))
		return set_error(err, errlen, ENOTDIR, "target %s: tls-certs=%s: not a directory", uri, spec->tls_certs);
	if (spec->tls_psk && access(spec->tls_psk, R_OK) < 0)
		return set_error(err, errlen, errno, "target %s: tls-psk=%s: %s", uri, spec->tls_psk, error_text(errno));
	struct nbd_options o = { uri, spec->tls_certs, spec->tls_psk, false, false };
	struct nbd_handle *h;
	int rc = nbd_open(&o, &h, err, errlen);
	if (!rc)
		nbd_close(h);
	return rc;
}

/* The chain's last backup in the export at `path`, updated in place. */
static int nbd_open_existing(const struct target_spec *spec, const char *path, dev_t dev, ino_t ino,
			     const char *journal_path, uint32_t cluster_size, struct target **out, char *err,
			     size_t errlen)
{
	if (dev != 0)
		return set_error(err, errlen, EINVAL, "target %s: is not the export the chain's last backup went to", path);
	if ((uint64_t)ino != export_identity(path, export_generation(path)))
		return set_error(err, errlen, EINVAL,
				 "target %s: another backup has written into the export since the chain's last backup went "
				 "there; start the chain again with a full backup", path);
	struct target_spec at = *spec;
	at.location = path;
	int rc = nbd_create_target(&at, NULL, out, err, errlen);
	if (rc)
		return rc;
	struct nbd_target *n = nbdt(*out);
	struct journal_file file = journal_file_of(n);
	if ((rc = journal_create_on(journal_path, &file, n->export_size, cluster_size, &n->journal, err, errlen))) {
		nbd_free_target(*out);
		*out = NULL;
	}
	return rc;
}

int target_nbd_recover(const char *uri, const char *tls_certs, const char *tls_psk, const char *journal_path,
		       char *err, size_t errlen)
{
	struct target_spec spec = { .format = FORMAT_NBD, .location = uri, .tls_certs = tls_certs, .tls_psk = tls_psk,
				    .in_place = true };
	struct target *t;
	int rc = nbd_create_target(&spec, NULL, &t, err, errlen);
	if (rc)
		return rc;
	struct journal_file file = journal_file_of(nbdt(t));
	rc = journal_recover_on(journal_path, &file, err, errlen);   /* flushes when done */
	nbdt_close_target(t, true);
	nbd_free_target(t);
	return rc;
}

const struct target_format_ops target_nbd_format = {
	.name = "nbd",
	.incremental_in_place = true,
	.check = nbd_check,
	.create = nbd_create_target,
	.open_existing = nbd_open_existing,
};

