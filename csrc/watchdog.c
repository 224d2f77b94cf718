/*
 * Worker watchdog: one detached-at-birth, joined-at-stop pthread per attached
 * worker.  It waits on the worker's control connection; end-of-file or an
 * error there means the hypervisor is gone.  With no recovery, the thread
 * ends the whole process with _exit(status).  With recovery (a supervisor
 * starts a new hypervisor, pyhv.supervisor), it connects to the control
 * socket again and again until the new hypervisor answers its rejoin
 * message (sent with the worker's uffd, if it has one), then puts the new
 * connection in place of the old one (dup3: same fd number, which the
 * machine-check handler writes to) and watches again; faults meanwhile
 * simply wait in the kernel.  No answer within the recovery time, or a
 * refusal: _exit(status).  It is C because a worker thread blocked in a
 * userfault holds the GIL: no Python code could run to notice.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "pyhv.h"

struct pyhv_watchdog {
	int fd;
	int stopfd;
	int status;
	pthread_t thread;
	/* recovery: where to rejoin, what to say, the uffd to send, for how long */
	struct sockaddr_un addr;
	char *msg;
	int uffd;
	double recovery_s;
	int rejoins;
};

static double mono(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Wait for fd (POLLIN) or the stop eventfd, up to ms; 1 fd ready, 0 not, -1 stop. */
static int wait_in(struct pyhv_watchdog *w, int fd, int ms)
{
	struct pollfd p[2] = {{fd, POLLIN, 0}, {w->stopfd, POLLIN, 0}};
	int r = poll(p, 2, ms);
	if (r > 0 && p[1].revents)
		return -1;
	return r > 0;
}

/* One try at the new hypervisor: 1 rejoined (the new connection is in
 * place), 0 not yet, -1 refused (no waiting helps), -2 stopped. */
static int rejoin_once(struct pyhv_watchdog *w, double deadline)
{
	int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s < 0)
		return 0;
	int out = 0;
	if (connect(s, (struct sockaddr *)&w->addr, sizeof(w->addr)) < 0)
		goto done;
	struct iovec iov = {w->msg, strlen(w->msg)};
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
	if (w->uffd >= 0) {
		m.msg_control = u.buf;
		m.msg_controllen = sizeof(u.buf);
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &w->uffd, sizeof(int));
	}
	if (sendmsg(s, &m, MSG_NOSIGNAL) < 0)
		goto done;
	int left = (int)((deadline - mono()) * 1000);
	int r = wait_in(w, s, left > 0 ? left : 0);
	if (r < 0) {
		out = -2;
		goto done;
	}
	if (r == 0)
		goto done;
	char reply[4096];
	ssize_t n = recv(s, reply, sizeof(reply) - 1, MSG_DONTWAIT);
	if (n <= 0)
		goto done;
	reply[n] = 0;
	if (!strstr(reply, "\"ok\":true")) {
		out = -1;
		goto done;
	}
	if (dup3(s, w->fd, O_CLOEXEC) < 0)
		goto done;
	out = 1;
done:
	close(s);
	return out;
}

/* The hypervisor is gone: wait for the next one (returns when rejoined),
 * or end the process. */
static int rejoin(struct pyhv_watchdog *w)
{
	if (!w->msg || w->recovery_s <= 0)
		_exit(w->status);
	double deadline = mono() + w->recovery_s;
	while (mono() < deadline) {
		int r = rejoin_once(w, deadline);
		if (r == 1) {
			w->rejoins++;
			return 0;
		}
		if (r == -2)
			return -1;
		if (r == -1)
			break;
		if (wait_in(w, -1, 50) < 0) /* (the old socket file, or no listener yet) */
			return -1;
	}
	_exit(w->status);
}

static void *watch(void *arg)
{
	struct pyhv_watchdog *w = arg;
	char buf[512];
	for (;;) {
		struct pollfd p[2] = { { w->fd, POLLIN, 0 }, { w->stopfd, POLLIN, 0 } };
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			_exit(w->status);
		}
		if (p[1].revents)
			return NULL;
		int lost = (p[0].revents & (POLLERR | POLLNVAL)) != 0;
		if (!lost && (p[0].revents & (POLLIN | POLLHUP))) {
			ssize_t n = recv(w->fd, buf, sizeof(buf), MSG_DONTWAIT);
			lost = n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR);
		}
		if (lost && rejoin(w) < 0)
			return NULL; /* stopped meanwhile */
	}
}

/* Start watching fd.  With path (the control socket), msg (the rejoin
 * message) and recovery_s > 0, a lost hypervisor is waited for (see the
 * top); uffd (or -1) goes with msg.  Returns the watchdog (owned by the
 * caller, released by pyhv_watchdog_stop) or NULL with errno set. */
struct pyhv_watchdog *pyhv_watchdog_start(int fd, int status, const char *path, const char *msg,
					  int uffd, double recovery_s)
{
	struct pyhv_watchdog *w = calloc(1, sizeof(*w));
	if (!w)
		return NULL;
	w->fd = fd;
	w->status = status;
	w->uffd = uffd;
	w->recovery_s = recovery_s;
	if (path && msg && recovery_s > 0) {
		if (strlen(path) >= sizeof(w->addr.sun_path) || !(w->msg = strdup(msg))) {
			free(w);
			errno = ENAMETOOLONG;
			return NULL;
		}
		w->addr.sun_family = AF_UNIX;
		strcpy(w->addr.sun_path, path);
	}
	w->stopfd = eventfd(0, EFD_CLOEXEC);
	if (w->stopfd < 0) {
		free(w->msg);
		free(w);
		return NULL;
	}
	int err = pthread_create(&w->thread, NULL, watch, w);
	if (err) {
		close(w->stopfd);
		free(w->msg);
		free(w);
		errno = err;
		return NULL;
	}
	return w;
}

/* How many times it rejoined a new hypervisor. */
int pyhv_watchdog_rejoins(struct pyhv_watchdog *w)
{
	return __atomic_load_n(&w->rejoins, __ATOMIC_RELAXED);
}

/* Stop watching (a clean detach), join the thread and free w.  Returns 0 or
 * -errno. */
int pyhv_watchdog_stop(struct pyhv_watchdog *w)
{
	uint64_t one = 1;
	if (write(w->stopfd, &one, sizeof(one)) != sizeof(one))
		return -errno;
	int err = pthread_join(w->thread, NULL);
	close(w->stopfd);
	free(w->msg);
	free(w);
	return -err;
}
