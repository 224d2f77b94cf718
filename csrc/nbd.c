/*
 * Paging devices on NBD servers (nbdkit, qemu-nbd, nbd-server, any gateway
 * that speaks NBD), through libnbd's asynchronous API.  No protocol of our
 * own: libnbd speaks NBD, we keep requests in flight and watch the path.
 *
 * A device (struct pyhv_nbd) is one export reached over one path (a URI),
 * with 1..PYHV_NBD_MAX_CONNS connections: several only where the server
 * says that they see each other's writes (NBD_FLAG_CAN_MULTI_CONN), else one.
 * Any thread calls pyhv_nbd_pread/pwritev/flush/trim: it issues its
 * commands on a connection (libnbd's handle lock is held only while a
 * command is queued and written out) and sleeps until they complete.  One
 * thread a device, the poller, waits in poll() on the connections' sockets
 * and drives libnbd's state machines (nbd_aio_notify_*), which run the
 * completion callbacks; a command that could not be written out at once
 * wakes it through an eventfd, so that it waits for POLLOUT too.  So a
 * paging service's threads (4 page-in, 4 write-back) have up to 8 commands
 * on the wire at once, a WRITE of scattered pages as one command a run.
 *
 * The path: a connection that fails (reset, end-of-file, a TLS error), or a
 * command unanswered for longer than the deadline (a link that went down
 * drops packets and says nothing: TCP would retry for minutes), loses the
 * path.  The poller shuts the sockets down; every command in flight and
 * every later call fails with ENOTCONN, which the hypervisor reads as "this
 * path is lost", never as a machine check: it moves the stream to its other
 * path, or waits and opens this one again.  An error the server answers
 * (EIO from its disk) leaves the path up and is returned as it is.
 *
 * Locking: n->mu guards the ops in flight and their counts; libnbd's handle
 * lock is taken inside nbd_* calls.  Order: handle lock, then n->mu (the
 * completion callbacks take mu under the handle lock), so nobody calls
 * nbd_* while holding mu.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "nbd.h"
#include "pyhv.h"

#ifdef PYHV_HAVE_NBD
#include <libnbd.h>

struct op { /* one call: one or more NBD commands */
	struct op *next, *prev;
	struct pyhv_nbd *n;
	uint64_t t0;
	int left; /* commands not retired (their .free has not run) */
	int err;  /* the first error */
};

struct pyhv_nbd {
	int nconn;
	struct nbd_handle *h[PYHV_NBD_MAX_CONNS];
	/* a dup of each connection's socket: polled, and shut down to end a
	 * path, with no fear of a number libnbd closed (it does, once the
	 * connection is dead) and the process reused */
	int fd[PYHV_NBD_MAX_CONNS];
	unsigned rr;
	pthread_t poller;
	int started;
	int wake; /* eventfd */
	pthread_mutex_t mu;
	pthread_cond_t done;
	struct op *head, *tail; /* in flight, oldest first */
	int dead, stop;
	uint64_t deadline_ns;
	struct pyhv_nbd_info info;
	char why[256]; /* how the path was lost */
};

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void say(char *why, size_t len, const char *what)
{
	if (why && len)
		snprintf(why, len, "%s", what && *what ? what : "unknown libnbd error");
}

/* A handle set up to connect (not connected yet), or NULL and why. */
static struct nbd_handle *start_one(const char *uri, const char *psk, char *why, size_t len,
				    int *err)
{
	struct nbd_handle *h = nbd_create();
	if (!h)
		goto fail;
	nbd_set_pread_initialize(h, false); /* the pages are ours to fill: no memset first */
	nbd_set_uri_allow_local_file(h, true); /* ?tls-psk-file= in the URI (root's config) */
	if (psk && *psk && nbd_set_tls_psk_file(h, psk) == -1)
		goto fail;
	if (nbd_aio_connect_uri(h, uri) == -1)
		goto fail;
	return h;
fail:
	*err = nbd_get_errno() ? nbd_get_errno() : EIO;
	say(why, len, nbd_get_error());
	nbd_close(h);
	return NULL;
}

/* Drive handles h[0..k-1] through connect and handshake together, within
 * timeout_ms in all.  Returns how many are ready, in h[0..] (the others are
 * closed); h[0]'s failure (or the timeout) is said in why. */
static int connect_all(struct nbd_handle **h, int k, int timeout_ms, char *why, size_t len,
		       int *err)
{
	uint64_t end = now_ns() + (uint64_t)timeout_ms * 1000000u;
	int failed[PYHV_NBD_MAX_CONNS] = {0};
	int shortened = 0;
	for (;;) {
		struct pollfd pfd[PYHV_NBD_MAX_CONNS];
		int waiting = 0;
		for (int i = 0; i < k; i++) {
			pfd[i] = (struct pollfd){-1, 0, 0};
			if (failed[i])
				continue;
			if (nbd_aio_is_ready(h[i])) {
				/* one is ready: the others get a moment more, no longer (a
				 * server with fewer free connections never takes them) */
				uint64_t soon = now_ns() + 100000000u;
				if (!shortened && soon < end)
					end = soon;
				shortened = 1;
				continue;
			}
			if (nbd_aio_is_dead(h[i]) || nbd_aio_is_closed(h[i])) {
				if (i == 0) {
					*err = nbd_get_errno() ? nbd_get_errno() : ECONNREFUSED;
					say(why, len, nbd_get_error());
				}
				failed[i] = 1;
				continue;
			}
			unsigned dir = nbd_aio_get_direction(h[i]);
			pfd[i].fd = nbd_aio_get_fd(h[i]);
			pfd[i].events = (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
					(dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0);
			waiting++;
		}
		uint64_t t = now_ns();
		if (!waiting)
			break;
		if (t >= end) {
			for (int i = 0; i < k; i++)
				if (pfd[i].fd >= 0) {
					failed[i] = 1;
					if (i == 0) {
						*err = ETIMEDOUT;
						snprintf(why, len, "no answer within %.1f s",
							 timeout_ms / 1000.0);
					}
				}
			break;
		}
		int r = poll(pfd, (nfds_t)k, (int)((end - t) / 1000000u) + 1);
		if (r < 0 && errno != EINTR) {
			*err = errno;
			say(why, len, strerror(errno));
			return 0;
		}
		for (int i = 0; i < k; i++) {
			if (pfd[i].fd < 0 || !pfd[i].revents)
				continue;
			int bad = pfd[i].revents & (POLLIN | POLLHUP | POLLERR)
					  ? nbd_aio_notify_read(h[i]) == -1
					  : nbd_aio_notify_write(h[i]) == -1;
			if (bad) {
				if (i == 0) {
					*err = nbd_get_errno() ? nbd_get_errno() : ECONNREFUSED;
					say(why, len, nbd_get_error());
				}
				failed[i] = 1;
			}
		}
	}
	int ready = 0;
	for (int i = 0; i < k; i++) {
		if (failed[i]) {
			nbd_close(h[i]);
			h[i] = NULL;
		} else {
			h[ready++] = h[i];
		}
	}
	for (int i = ready; i < k; i++)
		h[i] = NULL;
	return ready;
}

static void lose_path(struct pyhv_nbd *n, const char *why)
{
	/* under n->mu */
	if (n->dead)
		return;
	n->dead = 1;
	say(n->why, sizeof(n->why), why);
	for (int i = 0; i < n->nconn; i++) {
		if (n->fd[i] < 0)
			continue;
		/* abort, not close: connect(AF_UNSPEC) drops what is still in the
		 * socket's send queue, which TCP would otherwise deliver when the
		 * link comes back, a WRITE landing after the other path wrote the
		 * slot anew.  Then libnbd sees end-of-file and fails what is in
		 * flight. */
		struct sockaddr sa = {.sa_family = AF_UNSPEC};
		if (connect(n->fd[i], &sa, sizeof(sa)) < 0) { /* (TCP only; a unix socket cannot) */
		}
		shutdown(n->fd[i], SHUT_RDWR);
	}
}

/* Errors that say the connection is going, not that the device failed:
 * nbdkit answers ESHUTDOWN to what is in flight while it stops. */
static int path_error(int err)
{
	return err == ENOTCONN || err == ESHUTDOWN || err == ECONNRESET || err == EPIPE ||
	       err == ECONNABORTED || err == ETIMEDOUT;
}

static void *poller(void *arg)
{
	struct pyhv_nbd *n = arg;
	struct pollfd pfd[PYHV_NBD_MAX_CONNS + 1];
	for (;;) {
		pthread_mutex_lock(&n->mu);
		int stop = n->stop;
		uint64_t oldest = n->head ? n->head->t0 : 0;
		if (!n->dead && n->deadline_ns && oldest && now_ns() - oldest > n->deadline_ns) {
			char msg[96];
			snprintf(msg, sizeof(msg), "a command went unanswered for %.1f s",
				 n->deadline_ns / 1e9);
			lose_path(n, msg);
		}
		pthread_mutex_unlock(&n->mu);
		if (stop)
			break;
		int k = 0;
		for (int i = 0; i < n->nconn; i++) {
			unsigned dir = nbd_aio_get_direction(n->h[i]);
			pfd[k].fd = n->fd[i];
			pfd[k].events = (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
					(dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0);
			pfd[k].revents = 0;
			if (nbd_aio_is_dead(n->h[i]) || nbd_aio_is_closed(n->h[i]))
				pfd[k].fd = -1; /* nothing more comes from it */
			k++;
		}
		pfd[k] = (struct pollfd){n->wake, POLLIN, 0};
		/* the deadline is checked a few times within its length */
		int timeout = -1;
		if (n->deadline_ns)
			timeout = (int)(n->deadline_ns / 4000000u) + 1;
		if (timeout > 100 || timeout < 0)
			timeout = n->deadline_ns ? 100 : -1;
		int r = poll(pfd, (nfds_t)k + 1, timeout);
		if (r < 0 && errno != EINTR) { /* (ENOMEM): nothing can be driven any more */
			pthread_mutex_lock(&n->mu);
			lose_path(n, strerror(errno));
			pthread_mutex_unlock(&n->mu);
			usleep(10000);
			continue;
		}
		if (r <= 0)
			continue;
		if (pfd[k].revents & POLLIN) {
			uint64_t v;
			if (read(n->wake, &v, sizeof(v)) < 0 && errno != EAGAIN)
				break;
		}
		for (int i = 0; i < n->nconn; i++) {
			short ev = pfd[i].revents;
			int bad = 0;
			if (pfd[i].fd < 0)
				continue;
			if (ev & (POLLIN | POLLHUP | POLLERR))
				bad |= nbd_aio_notify_read(n->h[i]) == -1;
			else if (ev & POLLOUT)
				bad |= nbd_aio_notify_write(n->h[i]) == -1;
			if (bad || nbd_aio_is_dead(n->h[i]) || nbd_aio_is_closed(n->h[i])) {
				const char *e = nbd_get_error();
				pthread_mutex_lock(&n->mu);
				lose_path(n, e && *e ? e : "the connection closed");
				pthread_mutex_unlock(&n->mu);
			}
		}
	}
	return NULL;
}

struct pyhv_nbd *pyhv_nbd_open(const char *uri, const char *psk_file, int conns, int connect_ms,
			       int deadline_ms, char *why, size_t whylen, int *err)
{
	*err = 0;
	struct pyhv_nbd *n = calloc(1, sizeof(*n));
	if (!n) {
		*err = ENOMEM;
		say(why, whylen, strerror(ENOMEM));
		return NULL;
	}
	for (int i = 0; i < PYHV_NBD_MAX_CONNS; i++)
		n->fd[i] = -1;
	n->wake = -1;
	n->deadline_ns = deadline_ms > 0 ? (uint64_t)deadline_ms * 1000000u : 0;
	pthread_mutex_init(&n->mu, NULL);
	pthread_cond_init(&n->done, NULL);
	if (conns < 1)
		conns = 1;
	if (conns > PYHV_NBD_MAX_CONNS)
		conns = PYHV_NBD_MAX_CONNS;
	/* every connection at once, within connect_ms in all; the server says
	 * only afterwards whether it allows more than one (multi-conn): the
	 * extra ones are closed if not */
	int k = 0;
	for (; k < conns; k++) {
		char spare[64];
		int e2;
		n->h[k] = start_one(uri, psk_file, k ? spare : why, k ? sizeof(spare) : whylen,
				    k ? &e2 : err);
		if (!n->h[k])
			break;
	}
	if (k == 0)
		goto fail;
	n->nconn = connect_all(n->h, k, connect_ms, why, whylen, err);
	if (n->nconn == 0) {
		for (int i = 0; i < k; i++)
			nbd_close(n->h[i]);
		n->h[0] = NULL;
		goto fail;
	}
	struct nbd_handle *h = n->h[0];
	n->info.size = nbd_get_size(h);
	n->info.multi_conn = nbd_can_multi_conn(h) == 1;
	n->info.can_flush = nbd_can_flush(h) == 1;
	n->info.can_trim = nbd_can_trim(h) == 1;
	n->info.read_only = nbd_is_read_only(h) == 1;
	n->info.tls = nbd_get_tls_negotiated(h) == 1;
	n->info.can_fua = nbd_can_fua(h) == 1;
	if (n->info.size < 0) {
		*err = nbd_get_errno() ? nbd_get_errno() : EIO;
		say(why, whylen, nbd_get_error());
		goto fail;
	}
	/* more connections only where each sees the others' writes at once */
	while (n->nconn > 1 && !n->info.multi_conn)
		nbd_close(n->h[--n->nconn]);
	n->info.conns = n->nconn;
	for (int i = 0; i < n->nconn; i++) {
		int fd = nbd_aio_get_fd(n->h[i]);
		n->fd[i] = fd < 0 ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 0);
		if (n->fd[i] < 0) {
			*err = fd < 0 ? EBADF : errno;
			say(why, whylen, strerror(*err));
			goto fail;
		}
		/* a service killed or a path closed aborts its connection: nothing
		 * left in the send queue goes out later */
		struct linger lg = {1, 0};
		setsockopt(n->fd[i], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	n->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (n->wake < 0) {
		say(why, whylen, strerror(errno));
		goto fail;
	}
	if (pthread_create(&n->poller, NULL, poller, n)) {
		say(why, whylen, "cannot start a thread");
		goto fail;
	}
	n->started = 1;
	return n;
fail:
	if (!*err)
		*err = EIO;
	pyhv_nbd_close(n);
	return NULL;
}

void pyhv_nbd_close(struct pyhv_nbd *n)
{
	if (!n)
		return;
	if (n->started) {
		pthread_mutex_lock(&n->mu);
		n->stop = 1;
		pthread_mutex_unlock(&n->mu);
		uint64_t one = 1;
		if (write(n->wake, &one, sizeof(one)) < 0) { /* the poller wakes within 100 ms anyway */
		}
		pthread_join(n->poller, NULL);
	}
	for (int i = 0; i < n->nconn; i++) {
		nbd_close(n->h[i]); /* (nobody calls in any more: the caller's contract) */
		if (n->fd[i] >= 0)
			close(n->fd[i]);
	}
	if (n->wake >= 0)
		close(n->wake);
	pthread_mutex_destroy(&n->mu);
	pthread_cond_destroy(&n->done);
	free(n);
}

void pyhv_nbd_info(struct pyhv_nbd *n, struct pyhv_nbd_info *out)
{
	*out = n->info;
}

int pyhv_nbd_dead(struct pyhv_nbd *n, char *why, size_t len)
{
	pthread_mutex_lock(&n->mu);
	int dead = n->dead;
	if (dead)
		say(why, len, n->why);
	pthread_mutex_unlock(&n->mu);
	return dead;
}

/* --- calls -------------------------------------------------------------------- */

static int completed(void *user, int *error)
{
	struct op *o = user;
	pthread_mutex_lock(&o->n->mu);
	if (*error && !o->err)
		o->err = *error;
	pthread_mutex_unlock(&o->n->mu);
	return 1; /* retire it */
}

static void retired(void *user)
{
	struct op *o = user;
	pthread_mutex_lock(&o->n->mu);
	if (--o->left == 0)
		pthread_cond_broadcast(&o->n->done);
	pthread_mutex_unlock(&o->n->mu);
}

static int begin(struct pyhv_nbd *n, struct op *o)
{
	*o = (struct op){.n = n, .t0 = now_ns()};
	pthread_mutex_lock(&n->mu);
	if (n->dead) {
		pthread_mutex_unlock(&n->mu);
		return -ENOTCONN;
	}
	o->prev = n->tail;
	if (n->tail)
		n->tail->next = o;
	else
		n->head = o;
	n->tail = o;
	pthread_mutex_unlock(&n->mu);
	return 0;
}

/* Before a command is issued: one more to wait for, on this connection. */
static struct nbd_handle *take(struct pyhv_nbd *n, struct op *o)
{
	pthread_mutex_lock(&n->mu);
	o->left++;
	unsigned i = n->rr++ % (unsigned)n->nconn;
	pthread_mutex_unlock(&n->mu);
	return n->h[i];
}

/* After nbd_aio_*: -1 means it was not issued (libnbd ran .free already). */
static void issued(struct pyhv_nbd *n, struct op *o, struct nbd_handle *h, int64_t cookie)
{
	if (cookie == -1) {
		int e = nbd_get_errno();
		/* on a connection that died under us libnbd says EINVAL ("invalid
		 * state: DEAD"): that is the path, not the request */
		int dead = nbd_aio_is_dead(h) || nbd_aio_is_closed(h);
		pthread_mutex_lock(&n->mu);
		if (!o->err)
			o->err = e ? e : EIO;
		if (dead)
			lose_path(n, "the connection closed");
		pthread_mutex_unlock(&n->mu);
		return;
	}
	if (nbd_aio_get_direction(h) & LIBNBD_AIO_DIRECTION_WRITE) {
		uint64_t one = 1; /* not all written out: the poller waits for POLLOUT */
		if (write(n->wake, &one, sizeof(one)) < 0) {
		}
	}
}

static int finish(struct pyhv_nbd *n, struct op *o)
{
	pthread_mutex_lock(&n->mu);
	while (o->left)
		pthread_cond_wait(&n->done, &n->mu);
	if (o->prev)
		o->prev->next = o->next;
	else
		n->head = o->next;
	if (o->next)
		o->next->prev = o->prev;
	else
		n->tail = o->prev;
	int err = o->err;
	if (err && path_error(err))
		lose_path(n, strerror(err)); /* (a server that stops: reconnect, no machine check) */
	int dead = n->dead;
	pthread_mutex_unlock(&n->mu);
	if (!err)
		return 0;
	return dead ? -ENOTCONN : -err; /* a lost path is never the device's error */
}

#define CB(o) ((nbd_completion_callback){.callback = completed, .user_data = (o), .free = retired})

static int pwritev_flags(struct pyhv_nbd *n, const struct iovec *iov, int cnt, uint64_t off,
			 uint32_t flags);

int pyhv_nbd_pread(struct pyhv_nbd *n, void *buf, size_t len, uint64_t off)
{
	struct op o;
	int r = begin(n, &o);
	if (r)
		return r;
	struct nbd_handle *h = take(n, &o);
	issued(n, &o, h, nbd_aio_pread(h, buf, len, off, CB(&o), 0));
	return finish(n, &o);
}

int pyhv_nbd_pwritev(struct pyhv_nbd *n, const struct iovec *iov, int cnt, uint64_t off)
{
	return pwritev_flags(n, iov, cnt, off, 0);
}

static int pwritev_flags(struct pyhv_nbd *n, const struct iovec *iov, int cnt, uint64_t off,
			 uint32_t flags)
{
	struct op o;
	int r = begin(n, &o);
	if (r)
		return r;
	/* one command a run of pages that lie one after another in memory */
	for (int i = 0; i < cnt;) {
		size_t len = iov[i].iov_len;
		int k = i + 1;
		while (k < cnt && (char *)iov[k - 1].iov_base + iov[k - 1].iov_len == iov[k].iov_base)
			len += iov[k++].iov_len;
		struct nbd_handle *h = take(n, &o);
		issued(n, &o, h, nbd_aio_pwrite(h, iov[i].iov_base, len, off, CB(&o), flags));
		off += len;
		i = k;
	}
	return finish(n, &o);
}

int pyhv_nbd_pwrite(struct pyhv_nbd *n, const void *buf, size_t len, uint64_t off, int durable)
{
	struct iovec iov = {(void *)buf, len};
	if (!durable)
		return pwritev_flags(n, &iov, 1, off, 0);
	if (n->info.can_fua) /* on stable storage when answered, without flushing all else */
		return pwritev_flags(n, &iov, 1, off, LIBNBD_CMD_FLAG_FUA);
	int r = pwritev_flags(n, &iov, 1, off, 0);
	return r ? r : pyhv_nbd_flush(n);
}

int pyhv_nbd_flush(struct pyhv_nbd *n)
{
	struct op o;
	int r = begin(n, &o);
	if (r)
		return r;
	if (!n->info.can_flush) { /* nothing to flush: the server writes through */
		return finish(n, &o);
	}
	/* every connection: with multi-conn one would do, without it there is one */
	for (int i = 0; i < n->nconn; i++) {
		pthread_mutex_lock(&n->mu);
		o.left++;
		pthread_mutex_unlock(&n->mu);
		issued(n, &o, n->h[i], nbd_aio_flush(n->h[i], CB(&o), 0));
	}
	return finish(n, &o);
}

int pyhv_nbd_trim(struct pyhv_nbd *n, uint64_t off, uint64_t len)
{
	struct op o;
	int r = begin(n, &o);
	if (r)
		return r;
	if (!n->info.can_trim)
		return finish(n, &o); /* advisory */
	struct nbd_handle *h = take(n, &o);
	issued(n, &o, h, nbd_aio_trim(h, len, off, CB(&o), 0));
	return finish(n, &o);
}

int pyhv_nbd_available(void)
{
	return 1;
}

#else /* built without libnbd-dev: NBD devices are refused */

struct pyhv_nbd *pyhv_nbd_open(const char *uri, const char *psk_file, int conns, int connect_ms,
			       int deadline_ms, char *why, size_t whylen, int *err)
{
	*err = ENOSYS;
	if (why && whylen)
		snprintf(why, whylen, "this pyhv was built without libnbd");
	return NULL;
}
void pyhv_nbd_close(struct pyhv_nbd *n) {}
void pyhv_nbd_info(struct pyhv_nbd *n, struct pyhv_nbd_info *out) {}
int pyhv_nbd_dead(struct pyhv_nbd *n, char *why, size_t len) { return 1; }
int pyhv_nbd_pread(struct pyhv_nbd *n, void *buf, size_t len, uint64_t off) { return -ENOSYS; }
int pyhv_nbd_pwritev(struct pyhv_nbd *n, const struct iovec *iov, int cnt, uint64_t off)
{
	return -ENOSYS;
}
int pyhv_nbd_pwrite(struct pyhv_nbd *n, const void *buf, size_t len, uint64_t off, int durable)
{
	return -ENOSYS;
}
int pyhv_nbd_flush(struct pyhv_nbd *n) { return -ENOSYS; }
int pyhv_nbd_trim(struct pyhv_nbd *n, uint64_t off, uint64_t len) { return -ENOSYS; }
int pyhv_nbd_available(void) { return 0; }

#endif
