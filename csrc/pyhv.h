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
int pyhv_map_fixed(int fd, uint64_t addr, uint64_t len);
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
 * fd reports end-of-file or an error (the hypervisor is gone), unless a new
 * hypervisor takes it back within recovery_s (csrc/watchdog.c). */
struct pyhv_watchdog;
struct pyhv_watchdog *pyhv_watchdog_start(int fd, int status, const char *path, const char *msg,
					  int uffd, double recovery_s);
int pyhv_watchdog_rejoins(struct pyhv_watchdog *w);
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
#define PYHV_SVC_SNAP 2	 /* header flag: a READ of the stream's snapshot (slot: the page) */
struct pyhv_svc;
struct pyhv_svc *pyhv_svc_new(int sock, int threads, int spin_us);
struct pyhv_nbd;
int pyhv_svc_stream_set(struct pyhv_svc *s, unsigned stream, int fd, struct pyhv_nbd *nbd,
			uint64_t pages, int memfd, uint64_t mem_size, int snapfd, uint64_t snap_pages);
void pyhv_svc_stream_clear(struct pyhv_svc *s, unsigned stream);
uint64_t pyhv_svc_stream_errors(struct pyhv_svc *s, unsigned stream);
int pyhv_svc_fast(struct pyhv_svc *s, int sock);
long pyhv_svc_serve(struct pyhv_svc *s, uint8_t *buf, size_t cap, int *flags_out, int *fds,
		    int maxfds, int *nfds);

/* Paging devices on NBD servers (csrc/nbd.c, libnbd).  A device is one
 * export over one path; every call may run on any thread and returns 0 or
 * -errno, -ENOTCONN once the path is lost (a connection failed, or a
 * command went unanswered past the deadline): never the device's error. */
#define PYHV_NBD_MAX_CONNS 4
struct pyhv_nbd_info {
	int64_t size;
	int conns, multi_conn, can_flush, can_trim, can_fua, read_only, tls;
};
int pyhv_nbd_available(void); /* 0: built without libnbd-dev */
struct pyhv_nbd *pyhv_nbd_open(const char *uri, const char *psk_file, int conns, int connect_ms,
			       int deadline_ms, char *why, size_t whylen, int *err);
void pyhv_nbd_close(struct pyhv_nbd *n);
void pyhv_nbd_info(struct pyhv_nbd *n, struct pyhv_nbd_info *out);
int pyhv_nbd_dead(struct pyhv_nbd *n, char *why, size_t len);
int pyhv_nbd_pread(struct pyhv_nbd *n, void *buf, size_t len, uint64_t off);
int pyhv_nbd_pwrite(struct pyhv_nbd *n, const void *buf, size_t len, uint64_t off, int durable);
int pyhv_nbd_flush(struct pyhv_nbd *n);
int pyhv_nbd_trim(struct pyhv_nbd *n, uint64_t off, uint64_t len);

/* The hypervisor's fault engine (csrc/engine.c): a thread that resolves
 * page faults without Python; Python meets it in batches. */
struct pyhv_eng;
struct pyhv_eng_part;
struct pyhv_eng_worker;
struct pyhv_eng_chan;
#define PYHV_EV_READ_FAILED 1 /* page of stream could not be read (err): a machine check */
#define PYHV_EV_WORKER_GONE 2 /* worker's uffd failed (err) or its process is gone */
#define PYHV_EV_CHAN_CLOSED 3 /* a fast channel reached end-of-file (worker: its id) */
#define PYHV_EV_WORKER_FORKED 4 /* worker page forked: its child is worker (0: lost, err) */
#define PYHV_EV_WORKER_PID 5 /* forked worker's first fault came from thread page */
#define PYHV_EV_PATH_LOST 6 /* stream's service lost its path to the device (worker: the
			     * fast channel's id): its READs wait until it is bound again */
#define PYHV_ENG_STATES 9 /* page states (csrc/engine.c), pyhv_eng_state_counts' out[] */
struct pyhv_eng_event {
	uint32_t type;
	int32_t err;
	uint32_t stream;
	uint32_t pad;
	uint64_t page;
	uint64_t worker;
};
struct pyhv_eng_counters { /* per partition, counted by the engine */
	uint64_t faults, first_touches, page_ins, page_outs, prefetched, clean_drops, refaults;
	uint64_t wp_faults, minor_faults, installed_writable, removed_by_worker, read_errors;
	uint64_t zeroed_ahead; /* first touches filled ahead of a sequential run (no fault) */
	uint64_t armed, write_refs, promoted; /* reference tracking: pages armed, seen written,
						 and moved to the active queue for it */
	uint64_t loaned;  /* frames given back (pyhv.discard, MADV_REMOVE) */
	uint64_t advised; /* pages read on advice (pyhv.prefetch) */
	uint64_t snapshot_reads; /* pages read from the snapshot it was restored from */
};
struct pyhv_eng_stats {
	struct pyhv_eng_counters c;
	uint64_t resident, active, inactive, reads_inflight, reads_queued, pending;
	uint64_t metadata_bytes;
	double written_share;
};
struct pyhv_eng_stats_global {
	uint64_t sleeps, evict_requests, enomem, send_errors, reads_sent, reads_done;
	uint64_t reads_taken_back, stray_replies, stray_faults, fault_reads;
	uint64_t read_rtt_ns;		       /* READs sent to answered, summed (reads_done of them) */
	uint64_t page_in_waits, page_in_wait_ns; /* faults that waited for a page-in, and how long */
	uint64_t reads_refused; /* READs a service refused (EINVAL...): failed over, not lost */
	uint64_t forks, forks_lost; /* workers' children adopted, and not (no memory) */
	uint64_t evict_again;	    /* evictions put off: a worker was forking */
	uint64_t reads_path_lost;   /* READs answered ENOTCONN (NBD path lost): sent again */
	uint64_t reads_expired;	    /* READs that waited past io_timeout: machine checks */
};
struct pyhv_eng_pool {
	uint64_t pages, used, high_water, waiting, reserve, pending, events_lost;
	struct pyhv_eng_stats_global g;
};
struct pyhv_eng *pyhv_eng_new(uint64_t pool_pages, uint64_t reserve, int spin_us, int *err);
int pyhv_eng_start(struct pyhv_eng *e);
void pyhv_eng_free(struct pyhv_eng *e);
int pyhv_eng_notify_fd(struct pyhv_eng *e);
int pyhv_eng_events(struct pyhv_eng *e, struct pyhv_eng_event *out, int max);
int64_t pyhv_eng_shortfall(struct pyhv_eng *e, uint64_t coming);
void pyhv_eng_pool(struct pyhv_eng *e, struct pyhv_eng_pool *out);
void pyhv_eng_pool_resize(struct pyhv_eng *e, uint64_t pages, uint64_t reserve);
struct pyhv_eng_part *pyhv_eng_part_new(struct pyhv_eng *e, uint32_t stream, uint64_t pages,
					uint64_t slots, int memfd, uint64_t hv_base, int table_fd,
					int *err);
int pyhv_eng_part_table_fd(struct pyhv_eng_part *p);
int64_t pyhv_eng_part_recover(struct pyhv_eng *e, struct pyhv_eng_part *p, uint32_t *confirm,
			      uint64_t *out);
void pyhv_eng_part_free(struct pyhv_eng *e, struct pyhv_eng_part *p);
void pyhv_eng_part_stats(struct pyhv_eng *e, struct pyhv_eng_part *p, struct pyhv_eng_stats *out);
void pyhv_eng_part_load(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t *out);
void pyhv_eng_state_counts(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t *out);
int pyhv_eng_page_state(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page);
int64_t pyhv_eng_slot_of(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page);
void pyhv_eng_slot_set(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t slot, int state);
uint64_t pyhv_eng_slot_count(struct pyhv_eng *e, struct pyhv_eng_part *p, int state);
struct pyhv_eng_worker *pyhv_eng_worker_add(struct pyhv_eng *e, struct pyhv_eng_part *p, int uffd,
					    uint64_t base, uint64_t id, int pid, uint64_t ident,
					    int *err);
struct pyhv_eng_worker *pyhv_eng_worker_claim(struct pyhv_eng *e, uint64_t id, uint64_t *base_out);
int pyhv_eng_worker_probe(struct pyhv_eng *e, struct pyhv_eng_worker *w);
int pyhv_eng_worker_fd(struct pyhv_eng_worker *w);
void pyhv_eng_fork_ids_from(struct pyhv_eng *e, uint64_t last);
int pyhv_eng_discard(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t first, uint64_t n,
		     uint64_t *out);
int64_t pyhv_eng_prefetch(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t first, uint64_t n,
			  uint64_t *next_out);
uint32_t pyhv_eng_resident(struct pyhv_eng *e, struct pyhv_eng_part *p, uint32_t *out, uint32_t max);
void pyhv_eng_part_snapshot(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint32_t *crc);
int pyhv_eng_part_import(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint8_t *state,
			 const int64_t *slot, const uint32_t *crc, uint64_t n);
void pyhv_eng_table(struct pyhv_eng *e, struct pyhv_eng_part *p, uint8_t *state, int64_t *slot,
		    uint32_t *crc);
int64_t pyhv_eng_prefetch_pages(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint32_t *pages,
				uint32_t n);
void pyhv_eng_worker_remove(struct pyhv_eng *e, struct pyhv_eng_worker *w);
struct pyhv_eng_chan *pyhv_eng_chan_add(struct pyhv_eng *e, int sock, uint64_t id, int *err);
uint64_t pyhv_eng_chan_remove(struct pyhv_eng *e, struct pyhv_eng_chan *ch);
void pyhv_eng_stream_bind(struct pyhv_eng *e, struct pyhv_eng_part *p, struct pyhv_eng_chan *ch,
			  int flowing);
uint64_t pyhv_eng_stream_busy(struct pyhv_eng *e, struct pyhv_eng_part *p);
uint64_t pyhv_eng_chan_oldest_ns(struct pyhv_eng *e, struct pyhv_eng_chan *ch);
int64_t pyhv_eng_expire_reads(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t max_age_ns);
int pyhv_eng_evict(struct pyhv_eng *e, struct pyhv_eng_part *p, uint32_t n, int allow_dirty,
		   uint32_t *dirty_out, uint32_t *clean_out);
int pyhv_eng_write_slots(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint32_t *pages,
			 uint32_t n, uint32_t *first_out);
void pyhv_eng_written(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint32_t *pages,
		      const uint32_t *crcs, uint32_t n);
int64_t pyhv_eng_write_failed(struct pyhv_eng *e, struct pyhv_eng_part *p, uint32_t page, int bad);
int64_t pyhv_eng_poison(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page,
			uint64_t *touched, int max, int *ntouched);

/* Benchmark-only baselines (csrc/bench.c). */
int pyhv_bench_kernel_touch(uint64_t npages, uint64_t *ns_out);
int pyhv_bench_uffd_touch(uint64_t npages, int shared, int zeropage, int devfd,
			  int handler_cpu, int toucher_cpu, uint64_t *ns_out);

#endif
