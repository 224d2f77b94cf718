/*
 * Benchmark-only baselines, built with the core so that pyhv's fault path is
 * compared with the floor on the same machine in the same run:
 *   - the kernel's own first-touch fault on anonymous memory;
 *   - a minimal C userfaultfd handler thread (no policy, no pool) that
 *     resolves each fault with UFFDIO_ZEROPAGE, or with UFFDIO_COPY of a page
 *     read from a device with pread, optionally pinned to a chosen CPU.
 * The calling thread touches each page once and records the latency of each
 * touch in ns_out[i].  Nothing here is used by the hypervisor.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "uffd_compat.h"
#include "pyhv.h"

#define PAGE 4096UL

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void pin(int cpu)
{
	if (cpu < 0)
		return;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void touch_all(volatile char *mem, uint64_t npages, uint64_t *ns_out)
{
	for (uint64_t i = 0; i < npages; i++) {
		uint64_t t0 = now_ns();
		mem[i * PAGE] = 1;
		ns_out[i] = now_ns() - t0;
	}
}

/* Kernel anonymous first-touch faults.  Returns 0 or -errno. */
int pyhv_bench_kernel_touch(uint64_t npages, uint64_t *ns_out)
{
	char *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return -errno;
	touch_all(mem, npages, ns_out);
	munmap(mem, npages * PAGE);
	return 0;
}

struct handler {
	int uffd;
	int zeropage;
	int devfd;
	uint64_t dev_pages;
	uint64_t base;
	int cpu;
	int stopfd[2];
	char *page;
	int err;
};

static void *serve(void *arg)
{
	struct handler *h = arg;
	pin(h->cpu);
	for (;;) {
		struct pollfd p[2] = { { h->uffd, POLLIN, 0 }, { h->stopfd[0], POLLIN, 0 } };
		if (poll(p, 2, -1) < 0 && errno != EINTR) {
			h->err = -errno;
			return NULL;
		}
		if (p[1].revents)
			return NULL;
		struct uffd_msg m;
		if (!(p[0].revents & POLLIN) || read(h->uffd, &m, sizeof(m)) != sizeof(m))
			continue;
		if (m.event != UFFD_EVENT_PAGEFAULT)
			continue;
		uint64_t addr = m.arg.pagefault.address & ~(PAGE - 1);
		int64_t r;
		if (h->zeropage) {
			r = pyhv_uffd_zeropage(h->uffd, addr, PAGE, 0);
		} else {
			/* page i of the mapping reads slot i of the device (mod its size),
			 * as a paging device does: not one cached block over and over */
			off_t off = (off_t)(((addr - h->base) / PAGE) % h->dev_pages * PAGE);
			if (h->devfd >= 0 && pread(h->devfd, h->page, PAGE, off) != (ssize_t)PAGE) {
				h->err = -EIO;
				return NULL;
			}
			r = pyhv_uffd_copy(h->uffd, addr, (uint64_t)h->page, PAGE, 0);
		}
		if (r < 0 && r != -EEXIST) {
			h->err = (int)r;
			return NULL;
		}
	}
}

/* First touches served by a minimal handler thread.  shared: a memfd mapped
 * MAP_SHARED (what pyhv partitions are) instead of private anonymous memory.
 * devfd >= 0: each COPY first preads the page's own slot from it (mod its
 * size; use O_DIRECT for a device read that reaches the disk).  CPUs < 0 leave placement to the
 * scheduler.  Returns 0 or -errno. */
int pyhv_bench_uffd_touch(uint64_t npages, int shared, int zeropage, int devfd,
			  int handler_cpu, int toucher_cpu, uint64_t *ns_out)
{
	struct handler h = { .zeropage = zeropage, .devfd = devfd, .cpu = handler_cpu };
	int ret = 0, memfd = -1;
	uint64_t feats = 0, ioctls = 0;
	char *mem = MAP_FAILED;
	size_t len = npages * PAGE;

	h.uffd = pyhv_uffd_open(O_CLOEXEC | O_NONBLOCK);
	if (h.uffd < 0)
		return h.uffd;
	if (posix_memalign((void **)&h.page, PAGE, PAGE)) {
		close(h.uffd);
		return -ENOMEM;
	}
	memset(h.page, 0x5a, PAGE);
	if (pipe2(h.stopfd, O_CLOEXEC) < 0) {
		ret = -errno;
		goto out_page;
	}
	ret = pyhv_uffd_api(h.uffd, shared ? UFFD_FEATURE_MISSING_SHMEM : 0, &feats, &ioctls);
	if (ret < 0)
		goto out_pipe;
	if (shared) {
		memfd = pyhv_memfd_new("pyhv-bench", len);
		if (memfd < 0) {
			ret = memfd;
			goto out_pipe;
		}
		mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	} else {
		mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	}
	if (mem == MAP_FAILED) {
		ret = -errno;
		goto out_memfd;
	}
	h.base = (uint64_t)mem;
	if (devfd >= 0) {
		struct stat st;
		if (fstat(devfd, &st) < 0 || st.st_size < (off_t)PAGE) {
			ret = -EINVAL;
			goto out_map;
		}
		h.dev_pages = (uint64_t)st.st_size / PAGE;
	}
	ret = pyhv_uffd_register(h.uffd, (uint64_t)mem, len, UFFDIO_REGISTER_MODE_MISSING, &ioctls);
	if (ret < 0)
		goto out_map;

	pthread_t thr;
	ret = -pthread_create(&thr, NULL, serve, &h);
	if (ret < 0)
		goto out_map;
	cpu_set_t saved;
	sched_getaffinity(0, sizeof(saved), &saved);
	pin(toucher_cpu);
	touch_all(mem, npages, ns_out);
	pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
	if (write(h.stopfd[1], "x", 1) != 1)
		ret = -errno;
	pthread_join(thr, NULL);
	if (h.err)
		ret = h.err;
out_map:
	munmap(mem, len);
out_memfd:
	if (memfd >= 0)
		close(memfd);
out_pipe:
	close(h.stopfd[0]);
	close(h.stopfd[1]);
out_page:
	free(h.page);
	close(h.uffd);
	return ret;
}
