/*
 * pyhv C core: the declarations shared by the C sources and the cffi cdef.
 *
 * Every function returns a value >= 0 on success or -errno on failure; none
 * exits (except the watchdog, whose job it is) or keeps global state; only
 * the service engine prints (a line to the service log per failed request).
 */
#ifndef PYHV_H
#define PYHV_H

#include <stdint.h>
#include <stddef.h>

/* One userfaultfd message, flattened.  For PAGEFAULT: a = address,
 * b = fault flags, tid = faulting thread.  For REMOVE/UNMAP: a = start,
 * b = end.  For FORK: a = the child's new uffd.  For REMAP: a = from, b = to. */
struct pyhv_fault {
	uint8_t event;
	uint8_t pad[3];
	uint32_t tid;
	uint64_t a;
	uint64_t b;
};

int pyhv_uffd_open(int flags);
int pyhv_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int pyhv_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int pyhv_uffd_unregister(int fd, uint64_t start, uint64_t len);
int64_t pyhv_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
int64_t pyhv_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode);
int pyhv_uffd_wake(int fd, uint64_t start, uint64_t len);
int pyhv_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t pyhv_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t pyhv_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode);
int pyhv_uffd_read(int fd, struct pyhv_fault *out, int max);

int pyhv_memfd_new(const char *name, uint64_t size);
int pyhv_punch_hole(int fd, uint64_t offset, uint64_t len);
int64_t pyhv_blkdev_size(int fd);
int pyhv_mincore(uint64_t start, uint64_t len, unsigned char *vec);
int64_t pyhv_fs_magic(int fd);

/* Worker watchdog: a thread that ends the process with _exit(status) when
 * fd reports end-of-file or an error (the hypervisor is gone). */
struct pyhv_watchdog;
struct pyhv_watchdog *pyhv_watchdog_start(int fd, int status);
int pyhv_watchdog_stop(struct pyhv_watchdog *w);

/* Machine checks (csrc/mce.c).  The hypervisor writes a record for every
 * page it could not deliver into the partition's error log (a small shared
 * memfd) before it poisons the page; a worker's SIGBUS handler reads it. */
#define PYHV_MCE_RECORDS 48
struct pyhv_mce_record {
	uint64_t seq; /* 0: empty; records are numbered from 1 */
	uint64_t page;
	char error[16]; /* errno name, or "checksum" */
	char device[48];
};
struct pyhv_mce_log {
	uint64_t count; /* records written so far; record n is rec[(n - 1) % PYHV_MCE_RECORDS] */
	struct pyhv_mce_record rec[PYHV_MCE_RECORDS];
};
int pyhv_mce_install(void);
int pyhv_mce_add(uint64_t start, uint64_t len, int sockfd, const struct pyhv_mce_log *log,
		 const char *partition, int isolation_partition);
int pyhv_mce_remove(uint64_t start);

/* The paging service's I/O engine (csrc/service.c): READ and WRITE served
 * by threads, everything else handed back to Python as a barrier. */
#define PYHV_SVC_MAX_PAGES 64
#define PYHV_SVC_MAX_STREAMS 65536
#define PYHV_SVC_MAX_FRAME 65564 /* wire.MAX_FRAME: header + 64 KiB (no page data) */
#define PYHV_SVC_RETRY 1 /* header flag: resent after the service holding it failed */
struct pyhv_svc;
struct pyhv_svc *pyhv_svc_new(int sock, int threads, int spin_us);
int pyhv_svc_stream_set(struct pyhv_svc *s, unsigned stream, int fd, uint64_t pages, int memfd,
			uint64_t mem_size);
void pyhv_svc_stream_clear(struct pyhv_svc *s, unsigned stream);
uint64_t pyhv_svc_stream_errors(struct pyhv_svc *s, unsigned stream);
long pyhv_svc_serve(struct pyhv_svc *s, uint8_t *buf, size_t cap, int *flags_out, int *fds,
		    int maxfds, int *nfds);

/* Benchmark-only baselines (csrc/bench.c). */
int pyhv_bench_kernel_touch(uint64_t npages, uint64_t *ns_out);
int pyhv_bench_uffd_touch(uint64_t npages, int shared, int zeropage, int devfd,
			  int handler_cpu, int toucher_cpu, uint64_t *ns_out);

#endif
