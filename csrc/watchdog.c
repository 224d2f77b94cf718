/*
 * Worker watchdog: one detached-at-birth, joined-at-stop pthread per attached
 * worker.  It waits on the worker's control connection; end-of-file or an
 * error there means the hypervisor is gone, and the thread ends the whole
 * process with _exit(status).  It is C because a worker thread blocked in a
 * userfault holds the GIL: no Python code could run to notice.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pyhv.h"

struct pyhv_watchdog {
	int fd;
	int stopfd;
	int status;
	pthread_t thread;
};

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
		if (p[0].revents & (POLLERR | POLLNVAL))
			_exit(w->status);
		if (p[0].revents & (POLLIN | POLLHUP)) {
			ssize_t n = recv(w->fd, buf, sizeof(buf), MSG_DONTWAIT);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				_exit(w->status);
		}
	}
}

/* Start watching fd.  Returns the watchdog (owned by the caller, released by
 * pyhv_watchdog_stop) or NULL with errno set. */
struct pyhv_watchdog *pyhv_watchdog_start(int fd, int status)
{
	struct pyhv_watchdog *w = calloc(1, sizeof(*w));
	if (!w)
		return NULL;
	w->fd = fd;
	w->status = status;
	w->stopfd = eventfd(0, EFD_CLOEXEC);
	if (w->stopfd < 0) {
		free(w);
		return NULL;
	}
	int err = pthread_create(&w->thread, NULL, watch, w);
	if (err) {
		close(w->stopfd);
		free(w);
		errno = err;
		return NULL;
	}
	return w;
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
	free(w);
	return -err;
}
