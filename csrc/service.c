/*
 * The paging service's I/O engine: READ and WRITE served by a few threads,
 * so that a page-in is never queued behind a write-back and the device sees
 * several requests at once (a loop device with direct I/O on these machines
 * does ~9k random 4 KiB writes/s one at a time and ~40k sixteen at a time).
 *
 * The service's Python loop calls pyhv_svc_serve(), which receives frames
 * on the stream socket and hands READ and WRITE to the threads.  Any other
 * frame (OPEN, CLOSE, FLUSH, DISCARD, QUERY, anything malformed) waits until
 * every request in flight has been answered, and then goes back to Python:
 * those commands are barriers, so a DISCARD or FLUSH is ordered after every
 * earlier WRITE.  Replies go out in completion order; the hypervisor matches
 * them by request id.
 *
 * Page-ins have a channel of their own, the fast channel (a second
 * SEQPACKET socket, pyhv_svc_fast): the hypervisor's fault engine sends
 * READs there, and FAST_THREADS threads wait on it; each serves the READ it
 * receives itself, with no hand-off to another thread on the path of a
 * fault, and several READs (a read-ahead window over scattered slots) are
 * on the device at once.
 *
 * READ  slot, count; payload count CRC32s, then the first page of the
 *       partition's memory they go to.  pread straight into the memory
 *       (with O_DIRECT, the device writes the pages where they will be
 *       mapped: no copy), every page checked against its CRC32 (EBADMSG),
 *       short read EIO; on an error the pages are punched out again.  No
 *       worker maps them until the hypervisor does (UFFDIO_CONTINUE): the
 *       workers register MINOR faults too.  The reply carries no data.
 * WRITE slot, count; payload count page numbers of the partition's memory
 *       (the memfd given at OPEN).  The pages are written from the shared
 *       mapping straight to slots slot..slot+count-1 (one pwritev; a short
 *       write is ENOSPC), then punched out of the memfd; the reply carries
 *       their CRC32s.  Flag RETRY (the request was in flight on a service
 *       that died): a page already gone from memory was written and punched
 *       by that service, so its CRC32 is read back from the device instead.
 *
 * A device on an NBD server (csrc/nbd.c) takes the place of the fd: the
 * same READ and WRITE become NBD commands, several in flight; a lost path
 * answers -ENOTCONN, which the hypervisor takes for a path to fail over,
 * never for a machine check.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zlib.h>

#include "nbd.h"
#include "pyhv.h"

#define PG 4096u
#define HDR 28u /* wire.HEADER.size */
#define OP_READ 3
#define OP_WRITE 4
#define JOBS 16 /* requests the engine holds at once */
#define FAST_THREADS 4 /* READs on the device at once from the fast channel */

struct svc_stream {
	int fd; /* the device (owned by Python), -1: not open (or on NBD) */
	struct pyhv_nbd *nbd; /* the device on an NBD server (owned by Python), or NULL */
	uint64_t pages;
	int snapfd; /* a snapshot its pages come from on first touch (Python's), -1: none */
	uint64_t snap_pages;
	int memfd; /* the partition's memory (owned here) */
	uint8_t *mem;
	uint64_t mem_pages;
	uint64_t errors;
};

struct job {
	struct job *next;
	uint8_t hdr[HDR];
	uint8_t *payload; /* MAX frame */
	uint8_t *io;	  /* a page, page-aligned (a retried WRITE reads a slot back) */
};

struct pyhv_svc {
	int sock;
	int fast; /* the fast channel (READs only), -1: none */
	pthread_t fast_threads[FAST_THREADS];
	/* read-held by a fast thread while it serves a READ, write-held by
	 * stream_set and stream_clear: a stream never changes under a READ */
	pthread_rwlock_t fast_lock;
	int fast_spinning; /* a fast thread polls for the next READ: the others sleep */
	pthread_mutex_t mu;
	pthread_cond_t work, idle;
	struct job *free, *reads, *writes, *writes_tail, *reads_tail;
	int busy; /* jobs taken from the free list and not returned */
	struct svc_stream *streams;
	struct job jobs[JOBS];
	int nthreads;
	pthread_t threads[16];
	uint64_t spin_ns; /* after a request, poll this long before sleeping */
	uint64_t last_ns;
};

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

struct frame_hdr { /* wire.HEADER, "<QHBBiIII" */
	uint64_t req;
	uint16_t stream;
	uint8_t op;
	uint8_t flags;
	int32_t status;
	uint32_t slot;
	uint32_t count;
	uint32_t crc;
} __attribute__((packed));
_Static_assert(sizeof(struct frame_hdr) == HDR, "wire.HEADER");

static void reply(int sock, const struct frame_hdr *rq, int status, const void *data, size_t n)
{
	struct frame_hdr h = *rq;
	h.status = status;
	struct iovec iov[2] = {{&h, HDR}, {(void *)data, n}};
	struct msghdr m = {.msg_iov = iov, .msg_iovlen = (data && n) ? 2 : 1};
	for (;;) {
		if (sendmsg(sock, &m, MSG_NOSIGNAL) >= 0)
			return;
		if (errno == EINTR)
			continue;
		if (errno == EPIPE || errno == ECONNRESET)
			return; /* the hypervisor is gone: the receiving loop sees EOF */
		/* A reply that cannot be sent must not become a wrong one (a WRITE
		 * done but answered as failed would leave its pages as holes): this
		 * service ends, and the hypervisor resends what it had in flight to
		 * the other one, marked RETRY. */
		fprintf(stderr, "pyhv-service: reply to request %llu cannot be sent: %s; exiting\n",
			(unsigned long long)rq->req, strerror(errno));
		_exit(1);
	}
}

static void note_error(struct svc_stream *st, const struct frame_hdr *h, int err)
{
	__atomic_add_fetch(&st->errors, 1, __ATOMIC_RELAXED);
	fprintf(stderr, "pyhv-service: stream %u %s slot %u+%u: %s\n", h->stream,
		h->op == OP_READ ? "READ" : "WRITE", h->slot, h->count, strerror(err));
}

static uint32_t page_crc(const uint8_t *p)
{
	return (uint32_t)crc32(0L, p, PG);
}

static int punch(struct svc_stream *st, uint64_t page, uint64_t count)
{
	if (fallocate(st->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(page * PG),
		      (off_t)(count * PG)) < 0)
		return -errno;
	return 0;
}

/* n bytes at off of the device (or of the snapshot), whole: 0 or -errno
 * (-EIO for a short read; -ENOTCONN: the NBD path is lost) */
static int dev_read(struct svc_stream *st, int snap, void *dst, size_t n, off_t off)
{
	if (st->nbd && !snap)
		return pyhv_nbd_pread(st->nbd, dst, n, (uint64_t)off);
	int fd = snap ? st->snapfd : st->fd;
	ssize_t got;
	do
		got = pread(fd, dst, n, off);
	while (got < 0 && errno == EINTR);
	return got < 0 ? -errno : (size_t)got != n ? -EIO : 0;
}

/* straight into the partition's memory, where no worker maps them yet (they
 * fault on them, MISSING or MINOR, until the hypervisor maps them) */
static int read_in(struct svc_stream *st, const struct frame_hdr *h, struct job *j)
{
	uint32_t first;
	memcpy(&first, j->payload + 4 * (size_t)h->count, 4);
	if ((uint64_t)first + h->count > st->mem_pages)
		return -EINVAL;
	uint8_t *dst = st->mem + (size_t)first * PG;
	size_t n = (size_t)h->count * PG;
	int snap = h->flags & PYHV_SVC_SNAP; /* (slot: the page there) */
	int r = dev_read(st, snap, dst, n, (off_t)h->slot * PG);
	for (uint32_t i = 0; !r && i < h->count; i++) {
		uint32_t want;
		memcpy(&want, j->payload + 4 * i, 4);
		if (page_crc(dst + (size_t)i * PG) != want)
			r = -EBADMSG;
	}
	/* nothing of it stays behind; but not after a lost path: another
	 * service may be filling these very pages for the stream now */
	if (r && r != -ENOTCONN)
		punch(st, first, h->count);
	return r;
}



static int write_full(struct svc_stream *st, struct iovec *iov, int cnt, off_t off)
{
	if (st->nbd)
		return pyhv_nbd_pwritev(st->nbd, iov, cnt, (uint64_t)off);
	int fd = st->fd;
	size_t want = 0;
	for (int i = 0; i < cnt; i++)
		want += iov[i].iov_len;
	ssize_t put;
	do
		put = pwritev(fd, iov, cnt, off);
	while (put < 0 && errno == EINTR);
	if (put < 0)
		return -errno;
	return (size_t)put == want ? 0 : -ENOSPC;
}

/* CRC32s into crcs[]; returns 0 or -errno */
static int do_write(struct svc_stream *st, const struct frame_hdr *h, struct job *j,
		    uint32_t *crcs)
{
	uint32_t pages[PYHV_SVC_MAX_PAGES];
	struct iovec iov[PYHV_SVC_MAX_PAGES];
	memcpy(pages, j->payload, 4 * (size_t)h->count);
	for (uint32_t i = 0; i < h->count; i++)
		if (pages[i] >= st->mem_pages)
			return -EINVAL;
	if (h->flags & PYHV_SVC_RETRY) {
		/* page by page: what is gone from memory was written by the
		 * service that held this request before (it punches only after
		 * a complete write) */
		for (uint32_t i = 0; i < h->count; i++) {
			uint8_t *p = st->mem + (size_t)pages[i] * PG;
			off_t off = (off_t)(h->slot + i) * PG;
			/* in memory (SEEK_DATA counts a page swapped out as data,
			 * where mincore would not) */
			off_t at = lseek(st->memfd, (off_t)pages[i] * PG, SEEK_DATA);
			if (at < 0 && errno != ENXIO)
				return -errno;
			if (at == (off_t)pages[i] * PG) {
				iov[0] = (struct iovec){p, PG};
				int r = write_full(st, iov, 1, off);
				if (r)
					return r;
				crcs[i] = page_crc(p);
			} else {
				int r = dev_read(st, 0, j->io, PG, off);
				if (r)
					return r;
				crcs[i] = page_crc(j->io);
			}
		}
	} else {
		for (uint32_t i = 0; i < h->count; i++)
			iov[i] = (struct iovec){st->mem + (size_t)pages[i] * PG, PG};
		int r = write_full(st, iov, (int)h->count, (off_t)h->slot * PG);
		if (r)
			return r;
		/* the pages are write-protected in every worker while they are
		 * paged out: what was written is what is there */
		for (uint32_t i = 0; i < h->count; i++)
			crcs[i] = page_crc(iov[i].iov_base);
	}
	/* on the device now: out of memory, runs of neighbours in one punch.  A
	 * punch that fails leaves a copy in memory, which is harmless (the
	 * page is on the device; a page-in reads over it): the WRITE is done. */
	for (uint32_t i = 0; i < h->count;) {
		uint32_t k = i + 1;
		while (k < h->count && pages[k] == pages[k - 1] + 1)
			k++;
		int r = punch(st, pages[i], k - i);
		if (r)
			fprintf(stderr, "pyhv-service: stream %u: punch of pages %u+%u: %s\n",
				h->stream, pages[i], k - i, strerror(-r));
		i = k;
	}
	return 0;
}

static void run_job(struct pyhv_svc *s, struct job *j, int sock)
{
	struct frame_hdr h;
	memcpy(&h, j->hdr, HDR);
	struct svc_stream *st = &s->streams[h.stream];
	int r;
	if (h.op == OP_READ) {
		r = read_in(st, &h, j);
		if (r)
			note_error(st, &h, -r);
		reply(sock, &h, r, NULL, 0);
	} else {
		uint32_t crcs[PYHV_SVC_MAX_PAGES];
		r = do_write(st, &h, j, crcs);
		if (r)
			note_error(st, &h, -r);
		reply(sock, &h, r, r ? NULL : crcs, r ? 0 : 4 * (size_t)h.count);
	}
}

static void *io_thread(void *arg)
{
	struct pyhv_svc *s = arg;
	pthread_mutex_lock(&s->mu);
	for (;;) {
		struct job *j = s->reads; /* page-ins first: a fault waits on them */
		if (j) {
			s->reads = j->next;
			if (!s->reads)
				s->reads_tail = NULL;
		} else if ((j = s->writes)) {
			s->writes = j->next;
			if (!s->writes)
				s->writes_tail = NULL;
		} else {
			pthread_cond_wait(&s->work, &s->mu);
			continue;
		}
		pthread_mutex_unlock(&s->mu);
		run_job(s, j, s->sock);
		pthread_mutex_lock(&s->mu);
		j->next = s->free;
		s->free = j;
		if (--s->busy == 0 || s->busy == JOBS - 1)
			pthread_cond_broadcast(&s->idle);
	}
	return NULL;
}

struct pyhv_svc *pyhv_svc_new(int sock, int threads, int spin_us)
{
	struct pyhv_svc *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->sock = sock;
	s->fast = -1;
	s->spin_ns = spin_us > 0 ? (uint64_t)spin_us * 1000u : 0;
	s->streams = calloc(PYHV_SVC_MAX_STREAMS, sizeof(*s->streams));
	if (!s->streams)
		goto fail;
	for (int i = 0; i < PYHV_SVC_MAX_STREAMS; i++)
		s->streams[i].fd = s->streams[i].memfd = s->streams[i].snapfd = -1;
	for (int i = 0; i < JOBS; i++) {
		struct job *j = &s->jobs[i];
		j->payload = malloc(PYHV_SVC_MAX_FRAME);
		if (!j->payload || posix_memalign((void **)&j->io, PG, PG))
			goto fail;
		j->next = s->free;
		s->free = j;
	}
	pthread_mutex_init(&s->mu, NULL);
	pthread_rwlock_init(&s->fast_lock, NULL);
	pthread_cond_init(&s->work, NULL);
	pthread_cond_init(&s->idle, NULL);
	if (threads < 1)
		threads = 1;
	if (threads > 16)
		threads = 16;
	for (int i = 0; i < threads; i++) {
		if (pthread_create(&s->threads[i], NULL, io_thread, s))
			goto fail; /* the process is starting: it exits on NULL */
		s->nthreads++;
	}
	return s;
fail:
	return NULL; /* leaks what it got: the service cannot run and exits */
}

int pyhv_svc_stream_set(struct pyhv_svc *s, unsigned stream, int fd, struct pyhv_nbd *nbd,
			uint64_t pages, int memfd, uint64_t mem_size, int snapfd, uint64_t snap_pages)
{
	/* called between serve() calls: no job runs */
	if (stream >= PYHV_SVC_MAX_STREAMS)
		return -EINVAL;
	struct svc_stream *st = &s->streams[stream];
	void *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		return -errno;
	int dupfd = dup(memfd);
	if (dupfd < 0) {
		int e = errno;
		munmap(mem, mem_size);
		return -e;
	}
	/* the old stream (a reopen) goes and the new one comes under one hold of
	 * the lock: a READ sees one or the other, never a stream half set */
	pthread_rwlock_wrlock(&s->fast_lock);
	if (st->mem)
		munmap(st->mem, st->mem_pages * PG);
	if (st->memfd >= 0)
		close(st->memfd);
	st->memfd = dupfd;
	st->mem = mem;
	st->mem_pages = mem_size / PG;
	st->fd = fd;
	st->nbd = nbd;
	st->pages = pages;
	st->snapfd = snapfd;
	st->snap_pages = snap_pages;
	st->errors = 0;
	pthread_rwlock_unlock(&s->fast_lock);
	return 0;
}

void pyhv_svc_stream_clear(struct pyhv_svc *s, unsigned stream)
{
	if (stream >= PYHV_SVC_MAX_STREAMS)
		return;
	struct svc_stream *st = &s->streams[stream];
	pthread_rwlock_wrlock(&s->fast_lock);
	if (st->mem)
		munmap(st->mem, st->mem_pages * PG);
	if (st->memfd >= 0)
		close(st->memfd);
	st->mem = NULL;
	st->memfd = st->fd = st->snapfd = -1;
	st->nbd = NULL;
	st->pages = st->mem_pages = st->snap_pages = 0;
	pthread_rwlock_unlock(&s->fast_lock);
}

uint64_t pyhv_svc_stream_errors(struct pyhv_svc *s, unsigned stream)
{
	return stream < PYHV_SVC_MAX_STREAMS ? s->streams[stream].errors : 0;
}

/* Is this frame one the threads serve?  Anything not quite right is left to
 * Python, which answers it with the error. */
static int hot(struct pyhv_svc *s, const struct frame_hdr *h, size_t payload)
{
	if (h->op != OP_READ && h->op != OP_WRITE)
		return 0;
	struct svc_stream *st = &s->streams[h->stream];
	if ((st->fd < 0 && !st->nbd) || !st->mem || h->count < 1 || h->count > PYHV_SVC_MAX_PAGES)
		return 0;
	if (h->flags & PYHV_SVC_SNAP) {
		if (h->op != OP_READ || st->snapfd < 0 || (uint64_t)h->slot + h->count > st->snap_pages)
			return 0;
	} else if ((uint64_t)h->slot + h->count > st->pages) {
		return 0;
	}
	if (payload != 4 * (size_t)h->count + (h->op == OP_READ ? 4 : 0))
		return 0;
	return 1;
}

static void wait_idle(struct pyhv_svc *s)
{
	pthread_mutex_lock(&s->mu);
	while (s->busy)
		pthread_cond_wait(&s->idle, &s->mu);
	pthread_mutex_unlock(&s->mu);
}

long pyhv_svc_serve(struct pyhv_svc *s, uint8_t *buf, size_t cap, int *flags_out, int *fds,
		    int maxfds, int *nfds)
{
	*nfds = 0;
	for (;;) {
		pthread_mutex_lock(&s->mu);
		while (!s->free)
			pthread_cond_wait(&s->idle, &s->mu);
		struct job *j = s->free;
		s->free = j->next;
		s->busy++;
		pthread_mutex_unlock(&s->mu);

		union {
			char b[CMSG_SPACE(sizeof(int) * 8)];
			struct cmsghdr align;
		} cbuf;
		struct iovec iov[2] = {{j->hdr, HDR}, {j->payload, PYHV_SVC_MAX_FRAME - HDR}};
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2, .msg_control = cbuf.b,
				   .msg_controllen = sizeof(cbuf.b)};
		ssize_t n;
		for (;;) {
			/* busy for a moment after a request: the next one is often
			 * close behind, and a sleeping thread costs a wake-up */
			int spin = s->spin_ns && now_ns() - s->last_ns < s->spin_ns;
			n = recvmsg(s->sock, &m, MSG_CMSG_CLOEXEC | (spin ? MSG_DONTWAIT : 0));
			if (n >= 0)
				break;
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN && spin) {
				sched_yield(); /* whoever else wants this CPU has it */
				continue;
			}
			break;
		}
		if (n > 0)
			s->last_ns = now_ns();
		int err = n < 0 ? errno : 0;
		int got_fds = 0;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
			if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
				continue;
			int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (int i = 0; i < k; i++) {
				int fd;
				memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
				if (*nfds < maxfds)
					fds[(*nfds)++] = fd;
				else
					close(fd);
			}
			got_fds = 1;
		}
		struct frame_hdr h;
		memcpy(&h, j->hdr, HDR);
		if (n >= (ssize_t)HDR && !got_fds && !(m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) &&
		    hot(s, &h, (size_t)n - HDR)) {
			pthread_mutex_lock(&s->mu);
			if (h.op == OP_READ && s->busy == 1) {
				/* nothing else in hand: served by this thread, which
				 * saves waking another on the path of a fault */
				pthread_mutex_unlock(&s->mu);
				run_job(s, j, s->sock);
				pthread_mutex_lock(&s->mu);
				j->next = s->free;
				s->free = j;
				s->busy--;
				pthread_mutex_unlock(&s->mu);
				continue;
			}
			j->next = NULL;
			struct job **head = h.op == OP_READ ? &s->reads : &s->writes;
			struct job **tail = h.op == OP_READ ? &s->reads_tail : &s->writes_tail;
			if (*tail)
				(*tail)->next = j;
			else
				*head = j;
			*tail = j;
			pthread_cond_signal(&s->work);
			pthread_mutex_unlock(&s->mu);
			continue;
		}
		/* for Python: once everything before it has been answered */
		pthread_mutex_lock(&s->mu);
		j->next = s->free;
		s->free = j;
		s->busy--;
		pthread_mutex_unlock(&s->mu);
		wait_idle(s);
		if (n < 0)
			return -err;
		*flags_out = m.msg_flags;
		size_t take = (size_t)n < cap ? (size_t)n : cap;
		size_t first = take < HDR ? take : HDR;
		memcpy(buf, j->hdr, first);
		if (take > HDR)
			memcpy(buf + HDR, j->payload, take - HDR);
		return (long)take;
	}
}

/* A fast channel thread: receive a READ, serve it here, answer; the one
 * that finished last polls a moment for the next before sleeping (one at a
 * time: several polling threads would take the CPUs from the workers).
 * End-of-file (the hypervisor is gone) ends the threads; the main loop sees
 * the same on the stream socket.  A frame shorter than a header (an empty
 * one included, which reads like end-of-file) is not the engine's: the
 * channel is shut down, which ends every fast thread at once and shows the
 * hypervisor the channel closed (it fails the service over), rather than
 * one thread ending and the channel left open with fewer and then none to
 * answer it.  Anything else but a READ the engine would send is answered
 * EINVAL. */
static void *fast_thread(void *arg)
{
	struct pyhv_svc *s = arg;
	struct job j;
	uint64_t last = 0;
	int spinning = 0;
	j.payload = malloc(PYHV_SVC_MAX_FRAME);
	if (!j.payload || posix_memalign((void **)&j.io, PG, PG))
		return NULL;
	for (;;) {
		struct iovec iov[2] = {{j.hdr, HDR}, {j.payload, PYHV_SVC_MAX_FRAME - HDR}};
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
		int spin = s->spin_ns && now_ns() - last < s->spin_ns &&
			   (spinning || !__atomic_exchange_n(&s->fast_spinning, 1, __ATOMIC_ACQ_REL));
		if (spinning && !spin)
			__atomic_store_n(&s->fast_spinning, 0, __ATOMIC_RELEASE);
		spinning = spin;
		ssize_t n = recvmsg(s->fast, &m, spin ? MSG_DONTWAIT : 0);
		if (n < 0 && (errno == EINTR || (errno == EAGAIN && spin))) {
			if (errno == EAGAIN)
				sched_yield();
			continue;
		}
		if (spinning) { /* another may poll while this one serves */
			__atomic_store_n(&s->fast_spinning, 0, __ATOMIC_RELEASE);
			spinning = 0;
		}
		if (n < (ssize_t)HDR) {
			shutdown(s->fast, SHUT_RDWR); /* (wakes the others: they read EOF) */
			break;
		}
		last = now_ns();
		struct frame_hdr h;
		memcpy(&h, j.hdr, HDR);
		pthread_rwlock_rdlock(&s->fast_lock);
		if (h.op == OP_READ && !(m.msg_flags & MSG_TRUNC) && hot(s, &h, (size_t)n - HDR))
			run_job(s, &j, s->fast);
		else
			reply(s->fast, &h, -EINVAL, NULL, 0);
		pthread_rwlock_unlock(&s->fast_lock);
	}
	free(j.payload);
	free(j.io);
	return NULL;
}

int pyhv_svc_fast(struct pyhv_svc *s, int sock)
{
	if (s->fast >= 0)
		return -EBUSY;
	s->fast = sock;
	for (int i = 0; i < FAST_THREADS; i++) {
		int r = pthread_create(&s->fast_threads[i], NULL, fast_thread, s);
		if (r)
			return i ? 0 : -r; /* fewer threads serve as well, only slower */
	}
	return 0;
}
