/* uring: FUSE requests over io_uring (see uring.h). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <linux/fuse.h>

#include "fleecefs/uring.h"
#include "fleecefs/util.h"

#define ENABLE_URING_PARAM "/sys/module/fuse/parameters/enable_uring"

int uring_parse_mode(const char *text, enum uring_mode *mode)
{
	if (!strcmp(text, "on"))
		*mode = URING_ON;
	else if (!strcmp(text, "off"))
		*mode = URING_OFF;
	else if (!strcmp(text, "auto"))
		*mode = URING_AUTO;
	else
		return -EINVAL;
	return 0;
}

#ifndef HAVE_LIBURING

const char *uring_unavailable(void) { return "this fleecefs was built without liburing"; }

int uring_install(struct fuse_session *se, enum uring_mode mode, unsigned max_workers)
{
	(void)se;
	(void)max_workers;
	if (mode != URING_ON)
		return 0;
	log_error("uring=on: %s", uring_unavailable());
	return -EOPNOTSUPP;
}

void uring_stop(void) {}
void uring_quiesce(void) {}

void uring_counts(unsigned long long *served, unsigned long long *fast)
{
	*served = *fast = 0;
}

#else

#include <liburing.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

#include "fleecefs/fs.h"
#include "fleecefs/image.h"

/* The kernel's ABI for it (Linux 6.14 uapi), where the system's headers are
 * older. */
#ifndef FUSE_OVER_IO_URING
#define FUSE_OVER_IO_URING (1ULL << 41)
#endif
#ifndef FUSE_URING_IN_OUT_HEADER_SZ
#define FUSE_URING_IN_OUT_HEADER_SZ 128
#define FUSE_URING_OP_IN_OUT_SZ 128
struct fuse_uring_ent_in_out {
	uint64_t flags;
	uint64_t commit_id;
	uint32_t payload_sz;
	uint32_t padding;
	uint64_t reserved;
};
struct fuse_uring_req_header {
	char in_out[FUSE_URING_IN_OUT_HEADER_SZ];
	char op_in[FUSE_URING_OP_IN_OUT_SZ];
	struct fuse_uring_ent_in_out ring_ent_in_out;
};
enum fuse_uring_cmd {
	FUSE_IO_URING_CMD_INVALID = 0,
	FUSE_IO_URING_CMD_REGISTER = 1,
	FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2,
};
struct fuse_uring_cmd_req {
	uint64_t flags;
	uint64_t commit_id;
	uint16_t qid;
	uint8_t padding[6];
};
#endif

/* Entries per queue: a guest's queue (QD 32) from one CPU fits, and a few
 * parked control-file reads cannot starve it. */
#define QUEUE_DEPTH 32
/* Before each payload, room to put a request's headers back in front of it,
 * for libfuse's parser (the slow path); the kernel's header block lives at
 * the start of it. */
#define PAYLOAD_OFFSET 4096
#define MAX_WORKERS_DEFAULT 64
#define MIN_WORKERS 4

/* What a completion is for, in the low bits of its user_data. */
enum { TAG_FUSE = 0, TAG_IO = 1, TAG_WAKE = 2, TAG_MASK = 3 };

struct ring_queue;

struct ring_entry {
	struct ring_queue *queue;
	struct fuse_uring_req_header *hdr; /* start of the region */
	char *payload;                     /* region + PAYLOAD_OFFSET */
	struct iovec iov[2];               /* what REGISTER hands the kernel */
	/* The request it holds while userspace has it (0: the kernel has the
	 * entry); repliers on any thread find their entry by it. */
	_Atomic uint64_t commit_id;
	unsigned last_cmd;
	uint64_t last_commit_id; /* to submit it again after EAGAIN */
	struct image *image;    /* fast path in flight: gate entered */
	bool fast_write;
	char *slow_buf;         /* slow path: header + op args + payload */
	size_t slow_len;
	struct ring_entry *next; /* worker queue, or the queue's done stack */
};

struct ring_queue {
	unsigned qid;
	struct io_uring ring;
	bool ring_made;
	pthread_t thread;
	bool thread_made;
	int wake_fd;
	uint64_t wake_value;
	struct ring_entry *ents;
	/* Replies made off the queue thread, waiting for it to commit them. */
	_Atomic(struct ring_entry *) done;
	unsigned live;          /* entries not ended by the kernel */
	unsigned fast_inflight; /* io_uring reads and writes of images */
	bool submit_failed;     /* logged once */
	/* Set by its thread once quiescing and no fast I/O is in flight. */
	atomic_bool quiet;
	atomic_ullong served, fast;
};

static struct {
	struct fuse_session *se;
	int dev_fd;
	enum uring_mode mode;
	unsigned max_workers;
	unsigned nqueues;
	size_t payload_size, region_size;
	struct ring_queue *queues;
	_Atomic uint64_t init_unique; /* the INIT request, until its reply */
	atomic_bool offered;          /* the kernel offered FUSE_OVER_IO_URING */
	atomic_bool started;          /* queues exist: replies may be theirs */
	/* The /dev/fuse loop ended: requests that arrive now are held, never
	 * served (as /dev/fuse leaves them unread), until the mount goes. */
	atomic_bool quiescing;
	atomic_bool stopping;
	/* Start-up (start_lock): every queue sets itself up on its own thread
	 * (an io_uring is best used by the task that made it), then all
	 * register together or none does. */
	pthread_mutex_t start_lock;
	pthread_cond_t start_cond;
	unsigned set_up;
	int setup_error;
	int go; /* 0 undecided, 1 register, -1 give up */
	/* The worker pool (pool_lock). */
	pthread_mutex_t pool_lock;
	pthread_cond_t pool_cond;
	struct ring_entry *work_head, *work_tail;
	unsigned queued, idle;
	pthread_t *workers;
	unsigned nworkers, starting;
	bool pool_stop;
} T = {
	.dev_fd = -1,
	.pool_lock = PTHREAD_MUTEX_INITIALIZER,
	.pool_cond = PTHREAD_COND_INITIALIZER,
	.start_lock = PTHREAD_MUTEX_INITIALIZER,
	.start_cond = PTHREAD_COND_INITIALIZER,
};

static __thread struct ring_entry *current_entry;

/* The kernel orders what one thread replied (a handle made by OPEN) before
 * what another receives after it (a READ on that handle); ThreadSanitizer
 * sees that order for read(2) and write(2) on /dev/fuse, not through
 * io_uring. Every hand-over to the kernel is a release, every request
 * taken from it an acquire, on one object. Nothing in other builds. */
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
static char kernel_order;
#define KERNEL_RELEASE() __tsan_release(&kernel_order)
#define KERNEL_ACQUIRE() __tsan_acquire(&kernel_order)
#else
#define KERNEL_RELEASE() ((void)0)
#define KERNEL_ACQUIRE() ((void)0)
#endif

const char *uring_unavailable(void)
{
	char value[8] = "";
	int fd = open(ENABLE_URING_PARAM, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return "the kernel's fuse module has no io_uring (" ENABLE_URING_PARAM " is missing; Linux 6.14 or later)";
	ssize_t n = read(fd, value, sizeof(value) - 1);
	close(fd);
	if (n <= 0 || (value[0] != 'Y' && value[0] != '1'))
		return "the kernel's fuse module has io_uring turned off (echo Y > " ENABLE_URING_PARAM ")";
	return NULL;
}

/* ---- the queue thread --------------------------------------------------- */

static struct io_uring_sqe *next_sqe(struct ring_queue *q)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);
	if (!sqe) {
		/* Full of prepared work: hand it over and take a fresh slot. */
		io_uring_submit(&q->ring);
		sqe = io_uring_get_sqe(&q->ring);
	}
	return sqe;
}

static void prep_fuse_cmd(struct ring_queue *q, struct ring_entry *ent, unsigned cmd, uint64_t commit_id)
{
	struct io_uring_sqe *sqe = next_sqe(q);
	if (!sqe) {
		log_error("io_uring queue %u: no submission slot for an entry; it is lost", q->qid);
		q->live--;
		return;
	}
	memset(sqe, 0, 2 * sizeof(*sqe)); /* 128-byte SQEs */
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->flags = IOSQE_FIXED_FILE;
	sqe->fd = 0;
	sqe->cmd_op = cmd;
	if (cmd == FUSE_IO_URING_CMD_REGISTER) {
		sqe->addr = (uint64_t)(uintptr_t)ent->iov;
		sqe->len = 2;
	}
	struct fuse_uring_cmd_req *req = (struct fuse_uring_cmd_req *)(void *)sqe->cmd;
	req->qid = (uint16_t)q->qid;
	req->commit_id = commit_id;
	ent->last_cmd = cmd;
	ent->last_commit_id = commit_id;
	io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)ent | TAG_FUSE);
}

static void prep_wake_read(struct ring_queue *q)
{
	struct io_uring_sqe *sqe = next_sqe(q);
	if (!sqe)
		return;
	io_uring_prep_read(sqe, q->wake_fd, &q->wake_value, sizeof(q->wake_value), 0);
	io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)q | TAG_WAKE);
}

/* The reply is in the entry's header and payload: give it back to the
 * kernel, which takes it and parks the entry for the next request. */
static void commit(struct ring_queue *q, struct ring_entry *ent)
{
	uint64_t id = atomic_exchange_explicit(&ent->commit_id, 0, memory_order_relaxed);
	prep_fuse_cmd(q, ent, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, id);
}

static void set_reply(struct ring_entry *ent, int error, size_t payload_len)
{
	struct fuse_out_header out = {
		.len = (uint32_t)(sizeof(out) + payload_len),
		.error = error,
		.unique = atomic_load_explicit(&ent->commit_id, memory_order_relaxed),
	};
	memcpy(ent->hdr->in_out, &out, sizeof(out));
	ent->hdr->ring_ent_in_out.payload_sz = (uint32_t)payload_len;
}

static void reply_error_now(struct ring_queue *q, struct ring_entry *ent, int error)
{
	set_reply(ent, -error, 0);
	commit(q, ent);
}

static void *worker_main(void *arg);

/* One more worker (T.starting counted it in); false if it could not start. */
static bool add_worker(void)
{
	pthread_t tid;
	bool ok = pthread_create(&tid, NULL, worker_main, NULL) == 0;
	pthread_mutex_lock(&T.pool_lock);
	T.starting--;
	if (ok)
		T.workers[T.nworkers++] = tid;
	pthread_mutex_unlock(&T.pool_lock);
	return ok;
}

/* Hands the request to a worker, with its headers put back in front of the
 * payload the way libfuse parses a request read from /dev/fuse. */
static void to_worker(struct ring_queue *q, struct ring_entry *ent)
{
	const struct fuse_in_header *in = (const struct fuse_in_header *)(const void *)ent->hdr->in_out;
	size_t payload_len = ent->hdr->ring_ent_in_out.payload_sz;

	if (in->len < sizeof(*in) + payload_len || in->len - sizeof(*in) - payload_len > FUSE_URING_OP_IN_OUT_SZ ||
	    payload_len > T.payload_size) {
		log_warn("io_uring queue %u: request %llu (opcode %u) has a bad length %u", q->qid,
			 (unsigned long long)in->unique, in->opcode, in->len);
		reply_error_now(q, ent, EIO);
		return;
	}
	size_t op_len = in->len - sizeof(*in) - payload_len;
	char *start = ent->payload - op_len - sizeof(*in);
	memcpy(start + sizeof(*in), ent->hdr->op_in, op_len);
	memcpy(start, in, sizeof(*in));
	ent->slow_buf = start;
	ent->slow_len = in->len;
	ent->next = NULL;

	pthread_mutex_lock(&T.pool_lock);
	if (T.work_tail)
		T.work_tail->next = ent;
	else
		T.work_head = ent;
	T.work_tail = ent;
	T.queued++;
	/* All busy: one more (outside the lock; the ones there are serve
	 * meanwhile, start_queues made the first). */
	bool grow = T.queued > T.idle && T.nworkers + T.starting < T.max_workers;
	if (grow)
		T.starting++;
	pthread_cond_signal(&T.pool_cond);
	pthread_mutex_unlock(&T.pool_lock);
	if (grow)
		add_worker();
}

/* A guest read or write that no job needs to see: straight between the
 * image's descriptor and the entry's payload. false: take the slow path. */
static bool try_fast(struct ring_queue *q, struct ring_entry *ent, const struct fuse_in_header *in)
{
	bool write = in->opcode == FUSE_WRITE;
	uint64_t fh, off;
	uint32_t size;

	if (write) {
		const struct fuse_write_in *w = (const struct fuse_write_in *)(const void *)ent->hdr->op_in;
		fh = w->fh, off = w->offset, size = w->size;
		if (size != ent->hdr->ring_ent_in_out.payload_sz)
			return false;
	} else {
		const struct fuse_read_in *r = (const struct fuse_read_in *)(const void *)ent->hdr->op_in;
		fh = r->fh, off = r->offset, size = r->size;
		if (size > T.payload_size)
			return false;
	}
	unsigned kind;
	struct image *img = fs_request_image(in->nodeid, fh, &kind);
	if (!img)
		return false;
	int fd = image_async_begin(img, kind, write, size, off);
	if (fd < 0)
		return false;
	struct io_uring_sqe *sqe = next_sqe(q);
	if (!sqe) {
		image_async_end(img);
		return false;
	}
	if (write)
		io_uring_prep_write(sqe, fd, ent->payload, size, off);
	else
		io_uring_prep_read(sqe, fd, ent->payload, size, off);
	io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)ent | TAG_IO);
	ent->image = img;
	ent->fast_write = write;
	q->fast_inflight++;
	return true;
}

static void on_request(struct ring_queue *q, struct ring_entry *ent)
{
	const struct fuse_in_header *in = (const struct fuse_in_header *)(const void *)ent->hdr->in_out;

	atomic_store_explicit(&ent->commit_id, ent->hdr->ring_ent_in_out.commit_id, memory_order_relaxed);
	if (atomic_load_explicit(&T.quiescing, memory_order_relaxed))
		return; /* held: the kernel ends it when the rings close */
	atomic_fetch_add_explicit(&q->served, 1, memory_order_relaxed);
	if ((in->opcode == FUSE_WRITE || in->opcode == FUSE_READ) && try_fast(q, ent, in))
		return;
	to_worker(q, ent);
}

static void on_io_done(struct ring_queue *q, struct ring_entry *ent, int res)
{
	q->fast_inflight--;
	image_async_end(ent->image);
	ent->image = NULL;
	if (res == -EINVAL || res == -EAGAIN) {
		/* The direct request was refused (alignment the file system
		 * wants): the slow path serves it buffered, as image_read/write
		 * do. */
		to_worker(q, ent);
		return;
	}
	size_t len = 0;
	if (res >= 0 && ent->fast_write) {
		struct fuse_write_out wo = { .size = (uint32_t)res };
		memcpy(ent->payload, &wo, sizeof(wo));
		len = sizeof(wo);
	} else if (res >= 0) {
		len = (size_t)res;
	}
	atomic_fetch_add_explicit(&q->fast, 1, memory_order_relaxed);
	set_reply(ent, res < 0 ? res : 0, len);
	commit(q, ent);
}

static void on_fuse_cmd(struct ring_queue *q, struct ring_entry *ent, int res)
{
	if (res == 0) {
		on_request(q, ent);
		return;
	}
	if (res == -EAGAIN || res == -EINTR) {
		prep_fuse_cmd(q, ent, ent->last_cmd, ent->last_commit_id);
		return;
	}
	/* ENOTCONN, ECONNABORTED: the mount is going; anything else ends the
	 * entry too (the kernel holds no command for it now). */
	if (res != -ENOTCONN && res != -ECONNABORTED)
		log_warn("io_uring queue %u: %s", q->qid, error_text(-res));
	q->live--;
}

static void take_replies(struct ring_queue *q)
{
	struct ring_entry *ent = atomic_exchange_explicit(&q->done, NULL, memory_order_acquire);
	while (ent) {
		struct ring_entry *next = ent->next;
		commit(q, ent);
		ent = next;
	}
}

static int make_queue(struct ring_queue *q);

/* Sets the queue up, reports, and waits for the decision: true to go on. */
static bool queue_ready(struct ring_queue *q)
{
	int rc = make_queue(q);
	pthread_mutex_lock(&T.start_lock);
	T.set_up++;
	if (rc && !T.setup_error)
		T.setup_error = rc;
	pthread_cond_broadcast(&T.start_cond);
	while (!T.go)
		pthread_cond_wait(&T.start_cond, &T.start_lock);
	bool go = T.go > 0;
	pthread_mutex_unlock(&T.start_lock);
	return go;
}

static void *queue_main(void *arg)
{
	struct ring_queue *q = arg;
	char name[16];

	snprintf(name, sizeof(name), "fleecefs-ring%u", q->qid);
	pthread_setname_np(pthread_self(), name);
	if (!queue_ready(q))
		return NULL;
	for (unsigned i = 0; i < QUEUE_DEPTH; i++)
		prep_fuse_cmd(q, &q->ents[i], FUSE_IO_URING_CMD_REGISTER, 0);
	prep_wake_read(q);
	for (;;) {
		KERNEL_RELEASE();
		int rc = io_uring_submit_and_wait(&q->ring, 1);
		KERNEL_ACQUIRE();
		if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
			if (!q->submit_failed)
				log_error("io_uring queue %u: %s", q->qid, error_text(-rc));
			q->submit_failed = true;
			/* Gates stay entered until their I/O completes: collect it
			 * before leaving. */
			if (q->fast_inflight == 0 && (q->live == 0 || atomic_load(&T.stopping)))
				break;
			sleep_until_ns(clock_monotonic_ns() + 1000000);
		}
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(&q->ring, head, cqe)
		{
			uint64_t data = io_uring_cqe_get_data64(cqe);
			void *ptr = (void *)(uintptr_t)(data & ~(uint64_t)TAG_MASK);
			seen++;
			switch (data & TAG_MASK) {
			case TAG_FUSE:
				on_fuse_cmd(q, ptr, cqe->res);
				break;
			case TAG_IO:
				on_io_done(q, ptr, cqe->res);
				break;
			default:
				if (!atomic_load(&T.stopping))
					prep_wake_read(q);
				break;
			}
		}
		io_uring_cq_advance(&q->ring, seen);
		take_replies(q);
		if (q->fast_inflight == 0 && atomic_load_explicit(&T.quiescing, memory_order_relaxed))
			atomic_store(&q->quiet, true);
		if (q->fast_inflight == 0 && (q->live == 0 || atomic_load(&T.stopping)))
			break;
	}
	io_uring_submit(&q->ring);
	atomic_store(&q->quiet, true);
	return NULL;
}

/* ---- workers --------------------------------------------------------------- */

/* A reply made on a worker (or any thread) for a ring request: to its
 * queue thread, which commits it. */
static void hand_back(struct ring_entry *ent)
{
	struct ring_queue *q = ent->queue;
	struct ring_entry *head = atomic_load_explicit(&q->done, memory_order_relaxed);
	do
		ent->next = head;
	while (!atomic_compare_exchange_weak_explicit(&q->done, &head, ent, memory_order_release, memory_order_relaxed));
	if (!head) {
		uint64_t one = 1;
		/* The counter cannot overflow here: it is read back at once. */
		if (write(q->wake_fd, &one, sizeof(one)) < 0)
			log_warn("io_uring queue %u: cannot wake it: %s", q->qid, error_text(errno));
	}
}

static void *worker_main(void *arg)
{
	(void)arg;
	pthread_setname_np(pthread_self(), "fleecefs-rwork");
	pthread_mutex_lock(&T.pool_lock);
	for (;;) {
		while (!T.work_head && !T.pool_stop) {
			T.idle++;
			pthread_cond_wait(&T.pool_cond, &T.pool_lock);
			T.idle--;
		}
		if (!T.work_head)
			break;
		struct ring_entry *ent = T.work_head;
		T.work_head = ent->next;
		if (!T.work_head)
			T.work_tail = NULL;
		T.queued--;
		pthread_mutex_unlock(&T.pool_lock);

		struct fuse_buf buf = { .size = ent->slow_len, .mem = ent->slow_buf, .fd = -1 };
		current_entry = ent;
		fuse_session_process_buf(T.se, &buf);
		current_entry = NULL;

		pthread_mutex_lock(&T.pool_lock);
	}
	pthread_mutex_unlock(&T.pool_lock);
	return NULL;
}

/* ---- libfuse's I/O on the session descriptor ---------------------------- */

static struct ring_entry *entry_of(uint64_t unique)
{
	if (!unique)
		return NULL;
	struct ring_entry *ent = current_entry;
	if (ent && atomic_load_explicit(&ent->commit_id, memory_order_relaxed) == unique)
		return ent;
	for (unsigned qi = 0; qi < T.nqueues; qi++)
		for (unsigned i = 0; i < QUEUE_DEPTH; i++) {
			ent = &T.queues[qi].ents[i];
			if (atomic_load_explicit(&ent->commit_id, memory_order_relaxed) == unique)
				return ent;
		}
	return NULL;
}

static ssize_t reply_to_ring(struct ring_entry *ent, const struct iovec *iov, int count)
{
	const struct fuse_out_header *out = iov[0].iov_base;
	size_t len = 0;
	int error = out->error;

	for (int i = 1; i < count; i++)
		len += iov[i].iov_len;
	if (len > T.payload_size) {
		log_warn("io_uring: a reply of %zu bytes does not fit the %zu-byte buffer", len, T.payload_size);
		error = -EIO;
		len = 0;
	} else {
		size_t at = 0;
		for (int i = 1; i < count; i++) {
			memmove(ent->payload + at, iov[i].iov_base, iov[i].iov_len);
			at += iov[i].iov_len;
		}
	}
	set_reply(ent, error, len);
	hand_back(ent);
	return (ssize_t)(sizeof(*out) + len);
}

static void start_queues(void);

/* The INIT reply, with FUSE_OVER_IO_URING added when the kernel offered it
 * (libfuse 3.14 does not know the flag). The queues start once the kernel
 * has taken it. */
static ssize_t reply_init(int fd, struct iovec *iov, int count)
{
	const struct fuse_out_header *out = iov[0].iov_base;
	struct fuse_init_out init;
	struct iovec patched[2];

	atomic_store(&T.init_unique, 0);
	bool use = T.offered && out->error == 0 && count == 2 && iov[1].iov_len == sizeof(init);
	if (!use) {
		if (T.mode == URING_ON)
			log_warn("uring=on: the kernel did not offer FUSE over io_uring; serving through /dev/fuse");
		return writev(fd, iov, count);
	}
	memcpy(&init, iov[1].iov_base, sizeof(init));
	init.flags |= FUSE_INIT_EXT;
	init.flags2 |= (uint32_t)(FUSE_OVER_IO_URING >> 32);
	size_t pages = (init.flags & FUSE_MAX_PAGES) ? init.max_pages : 32;
	long page = sysconf(_SC_PAGESIZE);
	size_t need = pages * (size_t)(page > 0 ? page : 4096);
	if (need < init.max_write)
		need = init.max_write;
	if (need < 8192)
		need = 8192;
	T.payload_size = need;
	patched[0] = iov[0];
	patched[1].iov_base = &init;
	patched[1].iov_len = sizeof(init);
	ssize_t n = writev(fd, patched, 2);
	if (n >= 0)
		start_queues();
	return n;
}

static ssize_t transport_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	(void)userdata;
	const struct fuse_out_header *out = iov[0].iov_base;

	if (atomic_load_explicit(&T.started, memory_order_acquire)) {
		struct ring_entry *ent = entry_of(out->unique);
		if (ent)
			return reply_to_ring(ent, iov, count);
	}
	KERNEL_RELEASE();
	uint64_t init = atomic_load_explicit(&T.init_unique, memory_order_relaxed);
	if (init && out->unique == init)
		return reply_init(fd, iov, count);
	return writev(fd, iov, count);
}

static ssize_t transport_read(int fd, void *buf, size_t len, void *userdata)
{
	(void)userdata;
	ssize_t n = read(fd, buf, len);
	const struct fuse_in_header *in = buf;

	KERNEL_ACQUIRE();
	if (n >= (ssize_t)(sizeof(*in) + sizeof(struct fuse_init_in)) && in->opcode == FUSE_INIT) {
		const struct fuse_init_in *arg = (const void *)(in + 1);
		T.offered = (arg->flags & FUSE_INIT_EXT) && (arg->flags2 & (uint32_t)(FUSE_OVER_IO_URING >> 32));
		atomic_store(&T.init_unique, in->unique);
	}
	return n;
}

/* ---- setup and teardown ----------------------------------------------------- */

static unsigned possible_cpus(void)
{
	/* The kernel makes one queue per possible CPU: "0-3" or "0,2-5". */
	unsigned count = 0, lo, hi;
	FILE *f = fopen("/sys/devices/system/cpu/possible", "re");
	if (f) {
		int c = 0;
		while (fscanf(f, "%u", &lo) == 1) {
			hi = lo;
			if ((c = fgetc(f)) == '-') {
				if (fscanf(f, "%u", &hi) != 1)
					break;
				c = fgetc(f);
			}
			count += hi - lo + 1;
			if (c != ',')
				break;
		}
		fclose(f);
	}
	if (!count) {
		long n = sysconf(_SC_NPROCESSORS_CONF);
		count = n > 0 ? (unsigned)n : 1;
	}
	return count;
}

static int make_queue(struct ring_queue *q)
{
	struct io_uring_params params = { .flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE,
					  .cq_entries = 4 * QUEUE_DEPTH + 8 };

	q->wake_fd = eventfd(0, EFD_CLOEXEC);
	if (q->wake_fd < 0)
		return -errno;
	int rc = io_uring_queue_init_params(2 * QUEUE_DEPTH + 4, &q->ring, &params);
	if (rc < 0)
		return rc;
	q->ring_made = true;
	/* A registered file: the ring keeps /dev/fuse open however libfuse
	 * closes its descriptor at unmount. */
	if ((rc = io_uring_register_files(&q->ring, &T.dev_fd, 1)) < 0)
		return rc;
	q->ents = calloc(QUEUE_DEPTH, sizeof(*q->ents));
	if (!q->ents)
		return -ENOMEM;
	for (unsigned i = 0; i < QUEUE_DEPTH; i++) {
		struct ring_entry *ent = &q->ents[i];
		/* Untouched pages cost nothing: resident memory grows only
		 * with the requests' real sizes. */
		void *region = mmap(NULL, T.region_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (region == MAP_FAILED)
			return -errno;
		ent->queue = q;
		ent->hdr = region;
		ent->payload = (char *)region + PAYLOAD_OFFSET;
		ent->iov[0].iov_base = ent->hdr;
		ent->iov[0].iov_len = sizeof(*ent->hdr);
		ent->iov[1].iov_base = ent->payload;
		ent->iov[1].iov_len = T.payload_size;
		q->live++;
	}
	return 0;
}

static void free_queues(void)
{
	for (unsigned qi = 0; qi < T.nqueues; qi++) {
		struct ring_queue *q = &T.queues[qi];
		if (q->ring_made)
			io_uring_queue_exit(&q->ring);
		if (q->wake_fd >= 0)
			close(q->wake_fd);
		if (q->ents)
			for (unsigned i = 0; i < QUEUE_DEPTH; i++)
				if (q->ents[i].hdr)
					munmap(q->ents[i].hdr, T.region_size);
		free(q->ents);
	}
	free(T.queues);
	T.queues = NULL;
	T.nqueues = 0;
}

static void start_queues(void)
{
	unsigned n = possible_cpus(), made = 0;

	T.region_size = PAYLOAD_OFFSET + T.payload_size;
	T.queues = calloc(n, sizeof(*T.queues));
	T.workers = calloc(T.max_workers, sizeof(*T.workers));
	if (!T.queues || !T.workers) {
		log_warn("io_uring: out of memory; serving through /dev/fuse");
		free(T.queues);
		free(T.workers);
		T.queues = NULL;
		T.workers = NULL;
		return;
	}
	for (unsigned i = 0; i < n; i++) {
		T.queues[i].qid = i;
		T.queues[i].wake_fd = -1;
	}
	T.nqueues = n;
	/* The first workers, so that a request is never left without one (more
	 * start when all are busy). */
	for (unsigned i = 0; i < MIN_WORKERS && i < T.max_workers; i++) {
		pthread_mutex_lock(&T.pool_lock);
		T.starting++;
		pthread_mutex_unlock(&T.pool_lock);
		add_worker();
	}
	for (; made < n; made++) {
		if (pthread_create(&T.queues[made].thread, NULL, queue_main, &T.queues[made]) != 0)
			break;
		T.queues[made].thread_made = true;
	}
	pthread_mutex_lock(&T.start_lock);
	while (T.set_up < made)
		pthread_cond_wait(&T.start_cond, &T.start_lock);
	int rc = made < n || !T.nworkers ? -EAGAIN : T.setup_error;
	/* Repliers may look for their entry as soon as one is registered. */
	if (!rc)
		atomic_store_explicit(&T.started, true, memory_order_release);
	T.go = rc ? -1 : 1;
	pthread_cond_broadcast(&T.start_cond);
	pthread_mutex_unlock(&T.start_lock);
	if (rc) {
		/* No queue registered anything: the kernel keeps using /dev/fuse. */
		log_warn("io_uring: cannot set up the queues (%s); serving through /dev/fuse", error_text(-rc));
		for (unsigned i = 0; i < made; i++) {
			pthread_join(T.queues[i].thread, NULL);
			T.queues[i].thread_made = false;
		}
		free_queues();
		return;
	}
	log_info("FUSE over io_uring: %u queues of %u requests, %zu-byte buffers", n, QUEUE_DEPTH, T.payload_size);
}

int uring_install(struct fuse_session *se, enum uring_mode mode, unsigned max_workers)
{
	static const struct fuse_custom_io io = { .writev = transport_writev, .read = transport_read };

	if (mode == URING_OFF)
		return 0;
	const char *why = uring_unavailable();
	if (why) {
		if (mode == URING_AUTO)
			return 0;
		log_error("uring=on: %s", why);
		return -EOPNOTSUPP;
	}
	T.se = se;
	T.mode = mode;
	T.dev_fd = fuse_session_fd(se);
	T.max_workers = max_workers ? max_workers : MAX_WORKERS_DEFAULT;
	int rc = fuse_session_custom_io(se, &io, T.dev_fd);
	if (rc < 0)
		log_error("uring: libfuse refused the custom I/O: %s", error_text(-rc));
	return rc;
}

void uring_quiesce(void)
{
	if (!atomic_load(&T.started))
		return;
	atomic_store(&T.quiescing, true);
	for (unsigned qi = 0; qi < T.nqueues; qi++) {
		uint64_t one = 1;
		if (T.queues[qi].thread_made && write(T.queues[qi].wake_fd, &one, sizeof(one)) < 0)
			log_warn("io_uring queue %u: cannot wake it: %s", qi, error_text(errno));
	}
	/* Reads and writes in flight end within their I/O's time. */
	uint64_t deadline = clock_monotonic_ns() + 10000000000ull;
	for (unsigned qi = 0; qi < T.nqueues; qi++)
		while (T.queues[qi].thread_made && !atomic_load(&T.queues[qi].quiet) && clock_monotonic_ns() < deadline)
			sleep_until_ns(clock_monotonic_ns() + 1000000);
}

void uring_stop(void)
{
	atomic_store(&T.stopping, true);
	for (unsigned qi = 0; qi < T.nqueues; qi++) {
		struct ring_queue *q = &T.queues[qi];
		if (!q->thread_made)
			continue;
		uint64_t one = 1;
		if (write(q->wake_fd, &one, sizeof(one)) < 0)
			log_warn("io_uring queue %u: cannot wake it: %s", qi, error_text(errno));
		pthread_join(q->thread, NULL);
		q->thread_made = false;
	}
	pthread_mutex_lock(&T.pool_lock);
	T.pool_stop = true;
	pthread_cond_broadcast(&T.pool_cond);
	unsigned nworkers = T.nworkers;
	pthread_mutex_unlock(&T.pool_lock);
	for (unsigned i = 0; i < nworkers; i++)
		pthread_join(T.workers[i], NULL);
	unsigned long long served, fast;
	uring_counts(&served, &fast);
	if (T.nqueues)
		log_info("FUSE over io_uring: %llu requests served, %llu of them on the fast path", served, fast);
	atomic_store(&T.started, false);
	free_queues();
	free(T.workers);
	T.workers = NULL;
}

void uring_counts(unsigned long long *served, unsigned long long *fast)
{
	*served = *fast = 0;
	for (unsigned qi = 0; qi < T.nqueues; qi++) {
		*served += atomic_load_explicit(&T.queues[qi].served, memory_order_relaxed);
		*fast += atomic_load_explicit(&T.queues[qi].fast, memory_order_relaxed);
	}
}

#endif
