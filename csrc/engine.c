/*
 * The hypervisor's fault engine: every worker's page faults, resolved in C.
 *
 * One thread (started by pyhv_eng_start) waits in epoll on every worker's
 * userfaultfd and on each paging service's fast channel, a SEQPACKET socket
 * that carries page-ins (READ) only.  It resolves the common cases without
 * Python and without the GIL: a MINOR fault on a resident page, a WP fault
 * (the page becomes dirty), a first touch (UFFDIO_ZEROPAGE) and a page-in
 * (READ to the paging service, which preads straight into the partition's
 * memory; the reply is mapped with UFFDIO_CONTINUE), with read-ahead along a
 * sequential run, waking every waiter.  A fault that finds no free frame
 * waits here until one is released.
 *
 * Python (pyhv/hypervisor) keeps what needs judgement and what is rare, and
 * meets the engine in batches: it is woken through an eventfd when the pool
 * runs low (it chooses how many pages each partition gives up, by weight,
 * and calls pyhv_eng_evict, which takes them from the partition's victim
 * queues and write-protects them), it writes dirty pages back through its
 * own stream socket and reports the outcome (pyhv_eng_written,
 * pyhv_eng_write_failed), and it handles the events queued for it: a page
 * that could not be read (a machine check: pyhv_eng_poison), a worker that
 * is gone, a fast channel at end-of-file.
 *
 * Locking: one mutex, e->mu, guards everything here.  The engine thread
 * holds it while it handles a batch of events (never while it waits);
 * every pyhv_eng_* call takes it.  Python's calls do not hold the GIL
 * (cffi releases it), so neither waits for the other's lock while holding
 * its own.
 *
 * Who owns what (said once): the page table arrays (state, slot, crc, age,
 * slot_map) are written here only, under the lock; Python reads them
 * through pyhv_eng_* calls.  A worker's uffd belongs to the engine from
 * pyhv_eng_worker_add until it is removed (it closes it).  A fast channel's
 * socket stays Python's (it closes it after pyhv_eng_chan_remove).
 *
 * Page states (pyhv/hypervisor/pagetable.py names them):
 *   UNTOUCHED  never written: a fault fills it with zeros
 *   DIRTY      resident, changed since it was last on the device (or never there)
 *   CLEAN      resident, identical to its copy in slot[page]; mapped write-protected
 *   FILLING    being filled (zero page, or READ in flight): faults wait
 *   PAGING_OUT being written back by Python's WRITE: faults wait
 *   ON_DEVICE  in slot[page] only
 *   POISONED   lost (a machine check): every worker attached then has it
 *              poisoned; a fault (a worker attached later) fills it with
 *              zeros, but nothing fills or maps it ahead of a fault: a
 *              poison marker would be overwritten
 *   LOANED     given back by the partition (pyhv.discard, MADV_REMOVE): no
 *              frame, no slot; a fault fills it with zeros, as UNTOUCHED
 *   SNAPSHOT   in the snapshot the partition was restored from (read-only,
 *              at its page number), never written since: a fault reads it
 *              from there (a READ flagged PYHV_SVC_SNAP); CLEAN with no slot
 *              once read, and back to SNAPSHOT when evicted clean
 * Every page in FILLING or PAGING_OUT has a `pending` record with its
 * waiters; every resident page (DIRTY, CLEAN) is in exactly one of its
 * partition's victim queues, and holds one frame of the pool, as does every
 * FILLING and PAGING_OUT page.
 *
 * Errors: functions return >= 0 or -errno; nothing here prints or exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "uffd_compat.h"
#include "pyhv.h"

#define PG 4096u
#define HDR 28u		   /* wire.HEADER.size */
#define OP_READ 3	   /* wire.OP_READ */
#define EPOCHS 4	   /* eviction epochs in a pool-full of evictions */
/* Reference tracking by writes (a user-space pager sees no accessed bit):
 * a page at the head of a queue the first time is armed (write-protected:
 * its next write faults) and goes round once more; written meanwhile, it is
 * in use (SEEN). */
#define REF_TESTED 1 /* it has been armed once since it was installed */
#define REF_SEEN 2   /* written since it was armed */
#define REF_ARMED 4  /* write-protected for this: its next write is a WP fault */
#define REF_MASK 7
/* While a page is FILLING, its REF_* bits (which mean nothing off the
 * queues) hold what it was before (PRIOR_*): what recovery after a crash
 * gives it back. */
enum { PRIOR_UNTOUCHED, PRIOR_LOANED, PRIOR_POISONED, PRIOR_ON_DEVICE, PRIOR_SNAPSHOT };
#define STAMP_SHIFT 3
#define STAMPS 31 /* eviction epochs told apart (5 bits) */
#define PREFETCH_MIN 8	   /* read-ahead window: first */
#define PREFETCH_MAX 64	   /* ... and largest */
#define GUESS_WRITTEN 0.5  /* past this share of page-ins written soon after, install writable */
#define GUESS_PROBE 8	   /* ... but one page-in in this many, which keeps measuring */
#define BUCKETS 16384u	   /* pending pages hash (pages in flight are bounded by the pool) */
#define EVENTS 256	   /* room for events queued for Python, to begin with (it grows) */

enum { UNTOUCHED, DIRTY, CLEAN, FILLING, PAGING_OUT, ON_DEVICE, POISONED, LOANED, SNAPSHOT,
       NSTATES };
enum { SLOT_FREE, SLOT_USED, SLOT_BAD };
enum { SRC_UFFD = 1, SRC_CHAN, SRC_STOP };
/* outcome of an ioctl on a worker's uffd; IO_AGAIN: its process is forking
 * or removing memory (the kernel's mmap_changing) until the engine has read
 * that event: nothing was done */
enum { IO_OK, IO_EXISTS, IO_GONE, IO_AGAIN };

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
_Static_assert(NSTATES == PYHV_ENG_STATES, "page states");

struct eng_worker {
	int kind; /* SRC_UFFD: first, for epoll dispatch */
	int uffd;
	uint64_t base;
	uint64_t id;
	struct pyhv_eng_part *part;
	int alive;
	int refs; /* Python's, and waiter records that name it; buried when dead and 0 */
	struct eng_worker *grave_next;
	int pid;	     /* 0: a forked child not identified yet (its first fault tells) */
	uint64_t ident;	     /* its identity page (private, wiped on fork), or 0 */
	struct eng_worker *unclaimed_next; /* forked, Python has not taken it yet */
};

struct waiter {
	struct waiter *next;
	struct eng_worker *w;
	int write;
};

struct pending { /* a page FILLING or PAGING_OUT, and who waits for it */
	struct pending *next;
	struct pyhv_eng_part *part;
	uint64_t page;
	struct waiter *head, **tail;
	int fill_kind; /* while it waits for a frame: 0 zero fill, 1 page-in */
	int no_frame;  /* it waits for a frame (in the pool's queue) */
	int poisoned;  /* a zero fill of a POISONED page: for its waiters only */
	uint64_t t0;   /* when it began (a fault, a read-ahead or an eviction) */
	struct pending *wait_next; /* in the pool's queue of faults waiting for a frame */
};

struct ring { /* FIFO of page numbers, grown as needed */
	uint32_t *v;
	uint64_t head, count, cap;
};

struct rreq { /* one READ of the engine */
	struct rreq *next, *prev;
	uint64_t id;
	struct pyhv_eng_part *part;
	uint32_t first, n, slot;
	int snap; /* from the snapshot (slot: the page there) */
	uint64_t sent_ns;
	uint64_t born_ns; /* when it was asked for (io_timeout counts from here) */
	struct pyhv_eng_chan *chan; /* NULL while queued on its partition */
};

struct pyhv_eng_chan {
	int kind; /* SRC_CHAN */
	int sock;
	uint64_t id; /* Python's name for it, in PYHV_EV_CHAN_CLOSED */
	int dead;
	int want_out; /* EPOLLOUT armed: a frame did not fit */
	struct rreq *head, *tail; /* in flight, oldest first */
	uint64_t inflight;
	struct pyhv_eng_chan *next; /* every channel, for teardown */
};

struct pyhv_eng_part {
	uint32_t stream;
	uint64_t pages, slots;
	uint8_t *state;
	uint32_t *slot; /* slot + 1; 0: none (so that calloc'd memory stays untouched) */
	uint32_t *crc;
	/* A byte a page: its eviction stamp (high 5 bits: 1 + eviction epoch
	 * % STAMPS at its last eviction; 0: never evicted) and, while it is
	 * resident, its REF_* bits (low 3 bits). */
	uint8_t *age;
	uint8_t *slot_map;
	uint64_t slot_cursor;
	int memfd;
	uint64_t hv_base; /* the hypervisor's read-only mapping of the memory (mincore) */
	struct eng_worker **workers;
	int nworkers, capworkers;
	struct pyhv_eng_chan *chan;
	int flowing;
	struct rreq *qhead, *qtail; /* READs not sent yet */
	uint64_t queued, reads_inflight;
	struct ring inactive, active;
	uint64_t resident, pending;
	struct pyhv_eng_part *next; /* every partition, for teardown and EPOLLOUT */
	int64_t last_page_in, readahead_end;
	uint32_t readahead;
	int64_t last_first_touch, zero_ahead_end; /* the same, for a run of first touches */
	uint32_t zero_ahead;
	double written_share;
	uint64_t page_in_count;
	struct pyhv_eng_counters *c; /* in the table's header: they outlive a crash too */
	int table_fd; /* the memfd the page table lives in (see struct table_hdr) */
	void *table;
	size_t table_size;
};

struct pyhv_eng {
	pthread_mutex_t mu;
	int ep, stop_fd, notify_fd;
	int stop_kind; /* SRC_STOP, the epoll data of stop_fd */
	pthread_t thread;
	int started, stopping;
	uint64_t pool_pages, used, high_water, reserve;
	struct pending *wait_head, *wait_tail; /* faults waiting for a frame, oldest first */
	uint64_t waiting;
	struct pending **buckets;
	uint64_t pending_count;
	uint64_t next_id;
	uint64_t epoch, evictions;
	uint64_t spin_ns;
	int want_evict; /* Python was told the pool runs low and has not asked since */
	int notified;	/* notify_fd written since Python last read events */
	struct pyhv_eng_event *events;
	int nevents, cap_events;
	uint64_t events_lost;
	struct pyhv_eng_chan *chans;
	struct pyhv_eng_part *parts;
	/* Workers no one refers to any more, freed by the engine thread after
	 * its current batch: an event it took from epoll before the worker's
	 * uffd was removed may still name it. */
	struct eng_worker *grave;
	struct eng_worker *unclaimed; /* forked children Python has not claimed yet */
	uint64_t forks;
	struct pyhv_eng_stats_global g;
};

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* --- small containers ------------------------------------------------------- */

static int ring_push(struct ring *r, uint32_t page)
{
	if (r->count == r->cap) {
		uint64_t cap = r->cap ? 2 * r->cap : 64;
		uint32_t *v = malloc(cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		for (uint64_t i = 0; i < r->count; i++)
			v[i] = r->v[(r->head + i) % r->cap];
		free(r->v);
		r->v = v;
		r->cap = cap;
		r->head = 0;
	}
	r->v[(r->head + r->count) % r->cap] = page;
	r->count++;
	return 0;
}

static uint32_t ring_pop(struct ring *r)
{
	uint32_t page = r->v[r->head];
	r->head = (r->head + 1) % r->cap;
	r->count--;
	return page;
}

static void ring_free(struct ring *r)
{
	free(r->v);
	memset(r, 0, sizeof(*r));
}

static uint64_t bucket_of(struct pyhv_eng_part *p, uint64_t page)
{
	uint64_t h = ((uint64_t)(uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ull ^ page * 0xBF58476D1CE4E5B9ull;
	return (h >> 20) % BUCKETS;
}

static struct pending *pending_find(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page)
{
	for (struct pending *x = e->buckets[bucket_of(p, page)]; x; x = x->next)
		if (x->part == p && x->page == page)
			return x;
	return NULL;
}

static struct pending *pending_new(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page)
{
	struct pending *x = calloc(1, sizeof(*x));
	if (!x)
		return NULL;
	x->part = p;
	x->page = page;
	x->tail = &x->head;
	x->t0 = now_ns();
	uint64_t b = bucket_of(p, page);
	x->next = e->buckets[b];
	e->buckets[b] = x;
	e->pending_count++;
	p->pending++;
	return x;
}

static void worker_put(struct pyhv_eng *e, struct eng_worker *w)
{
	if (--w->refs == 0 && !w->alive) {
		w->grave_next = e->grave;
		e->grave = w;
	}
}

static void bury(struct pyhv_eng *e)
{
	while (e->grave) {
		struct eng_worker *w = e->grave;
		e->grave = w->grave_next;
		free(w);
	}
}

static int add_waiter(struct pending *x, struct eng_worker *w, int write)
{
	struct waiter *q = malloc(sizeof(*q));
	if (!q)
		return -ENOMEM;
	q->next = NULL;
	q->w = w;
	q->write = write;
	w->refs++;
	*x->tail = q;
	x->tail = &q->next;
	return 0;
}

/* Take the pending record of a page out of the table; the caller owns it
 * (and its waiters) and frees it with pending_free. */
static struct pending *pending_take(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page)
{
	struct pending **at = &e->buckets[bucket_of(p, page)];
	for (; *at; at = &(*at)->next)
		if ((*at)->part == p && (*at)->page == page) {
			struct pending *x = *at;
			*at = x->next;
			e->pending_count--;
			p->pending--;
			return x;
		}
	return NULL;
}

static void pending_free(struct pyhv_eng *e, struct pending *x)
{
	if (!x)
		return;
	for (struct waiter *q = x->head, *next; q; q = next) {
		next = q->next;
		worker_put(e, q->w);
		free(q);
	}
	free(x);
}

/* --- events for Python ---------------------------------------------------------- */

static void notify(struct pyhv_eng *e)
{
	if (!e->notified) {
		uint64_t one = 1;
		if (write(e->notify_fd, &one, sizeof(one)) == sizeof(one))
			e->notified = 1;
	}
}

static void post(struct pyhv_eng *e, uint32_t type, int err, struct pyhv_eng_part *p,
		 uint64_t page, uint64_t worker)
{
	if (e->nevents == e->cap_events) { /* Python is behind: more room, never a lost event */
		struct pyhv_eng_event *v = realloc(e->events, 2 * (size_t)e->cap_events * sizeof(*v));
		if (!v) {
			e->events_lost++;
			return;
		}
		e->events = v;
		e->cap_events *= 2;
	}
	struct pyhv_eng_event *ev = &e->events[e->nevents++];
	ev->type = type;
	ev->err = err;
	ev->stream = p ? p->stream : 0;
	ev->pad = 0;
	ev->page = page;
	ev->worker = worker;
	notify(e);
}

/* The pool runs low (a fault waits, or fewer than `reserve` frames are
 * free): Python evicts, in a batch.  Told once until it asks again. */
static void want_frames(struct pyhv_eng *e)
{
	if (!e->want_evict) {
		e->want_evict = 1;
		e->g.evict_requests++;
		notify(e);
	}
}

/* --- ioctls on a worker's uffd ---------------------------------------------------- */

static void drop_worker(struct pyhv_eng *e, struct eng_worker *w, int err);
static void wake_pending(struct pyhv_eng *e, struct pending *x);

/* Every ioctl on a worker's range goes through here: EEXIST/EAGAIN are
 * benign (someone resolved it: IO_EXISTS), anything else means the worker is
 * gone or its fd broken: it is dropped (Python is told) and never stops
 * anyone else. */
static int uffd_op(struct pyhv_eng *e, struct eng_worker *w, unsigned long req, void *arg,
		   __s64 *result)
{
	if (!w->alive)
		return IO_GONE;
	int r = ioctl(w->uffd, req, arg);
	int err = r < 0 ? errno : 0;
	if (result && *result < 0)
		err = (int)-*result;
	if (!err)
		return IO_OK;
	if (err == EEXIST)
		return IO_EXISTS;
	/* EFAULT from UFFDIO_CONTINUE: the page is not in the memory (a
	 * worker's own MADV_REMOVE took it): not mapped, its fault comes again */
	if (err == EAGAIN || (err == EFAULT && req == UFFDIO_CONTINUE))
		return IO_AGAIN;
	drop_worker(e, w, err);
	return IO_GONE;
}

static int op_wake(struct pyhv_eng *e, struct eng_worker *w, uint64_t page, uint64_t n)
{
	struct uffdio_range r = {w->base + page * PG, n * PG};
	return uffd_op(e, w, UFFDIO_WAKE, &r, NULL);
}

static int op_wp(struct pyhv_eng *e, struct eng_worker *w, uint64_t page, uint64_t n, int on,
		 int wake)
{
	struct uffdio_writeprotect wp = {{w->base + page * PG, n * PG},
					 on ? UFFDIO_WRITEPROTECT_MODE_WP
					    : (wake ? 0 : UFFDIO_WRITEPROTECT_MODE_DONTWAKE)};
	int r = uffd_op(e, w, UFFDIO_WRITEPROTECT, &wp, NULL);
	if (r == IO_AGAIN && !on && wake) /* not now: it faults again */
		r = op_wake(e, w, page, n) == IO_OK ? IO_AGAIN : IO_GONE;
	return r;
}

/* Map a zero page into w; present already: woken (IO_EXISTS). */
static int op_zero(struct pyhv_eng *e, struct eng_worker *w, uint64_t page)
{
	struct uffdio_zeropage z = {{w->base + page * PG, PG}, 0, 0};
	int r = uffd_op(e, w, UFFDIO_ZEROPAGE, &z, &z.zeropage);
	if (r == IO_EXISTS || r == IO_AGAIN) /* (again: nothing mapped; it faults again) */
		r = op_wake(e, w, page, 1) == IO_OK ? r : IO_GONE;
	return r;
}

/* Map n pages that are in the memory into w (write-protected if clean);
 * mapped already: woken (IO_EXISTS). */
static int op_map(struct pyhv_eng *e, struct eng_worker *w, uint64_t page, uint64_t n, int clean)
{
	struct uffdio_continue c = {{w->base + page * PG, n * PG},
				    clean ? UFFDIO_CONTINUE_MODE_WP : 0, 0};
	int r = uffd_op(e, w, UFFDIO_CONTINUE, &c, &c.mapped);
	if (r == IO_EXISTS || r == IO_AGAIN) /* (again: nothing mapped; it faults again) */
		r = op_wake(e, w, page, n) == IO_OK ? r : IO_GONE;
	return r;
}

static int op_poison(struct pyhv_eng *e, struct eng_worker *w, uint64_t page)
{
	struct uffdio_poison ps = {{w->base + page * PG, PG}, 0, 0};
	return uffd_op(e, w, UFFDIO_POISON, &ps, &ps.updated);
}

/* --- the page table ------------------------------------------------------------------ */

static void release_slot(struct pyhv_eng_part *p, uint64_t page)
{
	uint32_t s = p->slot[page];
	if (s) {
		p->slot[page] = 0;
		if (p->slot_map[s - 1] == SLOT_USED)
			p->slot_map[s - 1] = SLOT_FREE;
	}
}

static void note_written(struct pyhv_eng_part *p, int written, uint64_t pages)
{
	if (written) {
		p->written_share = p->written_share * 0.97 + 0.03;
	} else {
		for (uint64_t i = 0; i < pages && p->written_share > 1e-9; i++)
			p->written_share *= 0.97;
	}
}

/* How many pages of this page-in (a run of n) to install clean: all, unless
 * most page-ins are written soon after; then none, but one page of one
 * page-in in GUESS_PROBE, which keeps measuring. */
static uint32_t install_clean(struct pyhv_eng_part *p, uint32_t n)
{
	p->page_in_count++;
	if (p->written_share <= GUESS_WRITTEN)
		return n;
	uint32_t clean = p->page_in_count % GUESS_PROBE == 0;
	p->c->installed_writable += n - clean;
	return clean;
}

/* A page just installed joins a victim queue: active if it was evicted no
 * more than a pool's worth of evictions ago (it is in use), else inactive. */
static void enqueue(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page)
{
	uint8_t st = p->age[page] >> STAMP_SHIFT;
	p->age[page] &= ~REF_MASK;
	if (st && (e->epoch + STAMPS - (st - 1)) % STAMPS < EPOCHS) {
		p->c->refaults++;
		if (ring_push(&p->active, (uint32_t)page) == 0)
			return;
	}
	if (ring_push(&p->inactive, (uint32_t)page))
		e->g.enomem++; /* the page stays resident, never a victim: no loss */
}

static int in_memory(struct pyhv_eng_part *p, uint64_t page)
{
	unsigned char v = 0;
	if (mincore((void *)(uintptr_t)(p->hv_base + page * PG), PG, &v) < 0)
		return 0;
	return v & 1;
}

/* Where a page at rest is: its slot on the device, or the snapshot. */
static uint8_t at_rest(struct pyhv_eng_part *p, uint64_t page)
{
	return p->slot[page] ? ON_DEVICE : SNAPSHOT;
}

/* The page (at rest) is being filled: FILLING, its prior state noted
 * first (see PRIOR_*). */
static void set_filling(struct pyhv_eng_part *p, uint64_t page)
{
	static const uint8_t prior[NSTATES] = {[LOANED] = PRIOR_LOANED, [POISONED] = PRIOR_POISONED,
					       [ON_DEVICE] = PRIOR_ON_DEVICE,
					       [SNAPSHOT] = PRIOR_SNAPSHOT};
	p->age[page] = (uint8_t)((p->age[page] & ~REF_MASK) | prior[p->state[page]]);
	p->state[page] = FILLING;
}

/* Does page follow prev in one READ (both on the device in neighbouring
 * slots, or both in the snapshot; pages next to each other)? */
static int same_run(struct pyhv_eng_part *p, uint64_t prev, uint64_t page)
{
	return p->slot[page] ? p->slot[prev] && p->slot[page] == p->slot[prev] + 1 : !p->slot[prev];
}

/* --- the pool ------------------------------------------------------------------------ */

static int try_take(struct pyhv_eng *e)
{
	if (e->used < e->pool_pages && !e->wait_head) {
		e->used++;
		if (e->used > e->high_water)
			e->high_water = e->used;
		if (e->used + e->reserve > e->pool_pages)
			want_frames(e);
		return 1;
	}
	return 0;
}

static void fill(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page, int read);

/* Hand free frames to waiting faults, oldest first. */
static void serve_waiters(struct pyhv_eng *e)
{
	while (e->wait_head && e->used < e->pool_pages) {
		struct pending *x = e->wait_head;
		e->wait_head = x->wait_next;
		if (!e->wait_head)
			e->wait_tail = NULL;
		e->waiting--;
		e->used++;
		if (e->used > e->high_water)
			e->high_water = e->used;
		x->no_frame = 0;
		fill(e, x->part, x->page, x->fill_kind);
	}
	if (e->wait_head || e->used + e->reserve > e->pool_pages)
		want_frames(e);
}

static void release_frames(struct pyhv_eng *e, uint64_t n)
{
	e->used -= n;
	serve_waiters(e);
}

/* --- installing pages -------------------------------------------------------------- */

/* Map a page now resident into every waiter but skip. */
static void map_waiters(struct pyhv_eng *e, struct pending *x, uint64_t page, int clean,
			struct eng_worker *skip)
{
	for (struct waiter *q = x->head; q; q = q->next) {
		if (q->w == skip || !q->w->alive)
			continue;
		int seen = 0;
		for (struct waiter *o = x->head; o != q; o = o->next)
			seen |= o->w == q->w;
		if (!seen)
			op_map(e, q->w, page, 1, clean);
	}
}

/* Map one page into its waiters (the first, else any worker) and wake
 * them: zeros (read 0, UFFDIO_ZEROPAGE) or what a READ put into the memory
 * (UFFDIO_CONTINUE).  clean: -1 to decide here.  A frame is held for it. */
static void install(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page, int read,
		    int clean)
{
	struct pending *x = pending_take(e, p, page);
	int any_write = 0;
	if (x)
		for (struct waiter *q = x->head; q; q = q->next)
			any_write |= q->write;
	if (!read || any_write)
		clean = 0;
	else if (clean < 0)
		clean = install_clean(p, 1) == 1;
	/* The installer is a worker the page was really mapped into (or
	 * found mapped, IO_EXISTS); a worker forking right now (IO_AGAIN) is
	 * woken and faults again, and the next one is tried. */
	struct eng_worker *installer = NULL;
	/* The table calls it resident before any worker can see it: a crash in
	 * between leaves a page the table calls resident (kept if it is in the
	 * memory), never one mapped that the table calls FILLING (which
	 * recovery reads again over what a worker may have written). */
	p->state[page] = clean ? CLEAN : DIRTY;
	for (struct waiter *q = x ? x->head : NULL; q && !installer; q = q->next) {
		int r = read ? op_map(e, q->w, page, 1, clean) : op_zero(e, q->w, page);
		if (r == IO_OK || r == IO_EXISTS)
			installer = q->w;
	}
	/* any other worker (all of them attached after it was lost, or they
	 * would have been poisoned: their marker must stay) */
	for (int i = 0; i < p->nworkers && !installer && !(x && x->poisoned);) {
		struct eng_worker *w = p->workers[i];
		int r = read ? op_map(e, w, page, 1, clean) : op_zero(e, w, page);
		if (r == IO_OK || r == IO_EXISTS)
			installer = w;
		else if (r == IO_AGAIN || (i < p->nworkers && p->workers[i] == w))
			i++; /* (a dropped worker's place is taken by the last) */
	}
	if (!installer) { /* nobody to map it into now: it stays where it was (its
			   * waiters were woken: their faults come again) */
		p->state[page] = read ? at_rest(p, page) : x && x->poisoned ? POISONED : UNTOUCHED;
		if (read)
			fallocate(p->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				  (off_t)(page * PG), PG);
		pending_free(e, x);
		release_frames(e, 1);
		return;
	}
	if (read && !clean) /* written at once: its device copy is stale */
		release_slot(p, page);
	if (read && x && x->head) { /* a fault waited for this page-in */
		e->g.page_in_waits++;
		e->g.page_in_wait_ns += now_ns() - x->t0;
	}
	p->state[page] = clean ? CLEAN : DIRTY;
	p->resident++;
	enqueue(e, p, page);
	if (x)
		map_waiters(e, x, page, clean, installer);
	pending_free(e, x);
}

/* Map neighbouring pages one READ put into the memory with one
 * UFFDIO_CONTINUE into one worker, then into whoever else waits on them. */
static void install_run(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t first,
			uint32_t n, int clean)
{
	struct eng_worker *installer = NULL;
	for (uint32_t k = 0; k < n; k++) /* (resident in the table first: see install) */
		p->state[first + k] = clean ? CLEAN : DIRTY;
	for (int i = 0; i < p->nworkers && !installer;) {
		struct eng_worker *w = p->workers[i];
		int r = op_map(e, w, first, n, clean);
		if (r == IO_GONE || r == IO_AGAIN) {
			if (r == IO_AGAIN || (i < p->nworkers && p->workers[i] == w))
				i++;
			continue;
		}
		if (r == IO_EXISTS) { /* cannot be (they are FILLING): page by page, to be sure */
			for (uint32_t k = 0; k < n; k++)
				install(e, p, first + k, 1, clean);
			return;
		}
		installer = w;
	}
	if (!installer) { /* back at rest in the table before the memory is
			   * punched: a crash in between reads them again */
		for (uint32_t k = 0; k < n; k++)
			p->state[first + k] = at_rest(p, first + k);
		fallocate(p->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(first * PG),
			  (off_t)n * PG);
		for (uint32_t k = 0; k < n; k++)
			pending_free(e, pending_take(e, p, first + k));
		release_frames(e, n);
		return;
	}
	for (uint32_t k = 0; k < n; k++) {
		uint64_t page = first + k;
		if (!clean)
			release_slot(p, page);
		p->state[page] = clean ? CLEAN : DIRTY;
		struct pending *x = pending_take(e, p, page);
		if (x)
			map_waiters(e, x, page, clean, installer);
		pending_free(e, x);
		p->resident++;
		enqueue(e, p, page);
	}
}

static void install_read(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t first, uint32_t n)
{
	uint32_t k = install_clean(p, n); /* n, none, or the first page (a probe) */
	if (n == 1) {
		install(e, p, first, 1, k == 1);
		return;
	}
	uint32_t skip = 0;
	if (k == 1) {
		install(e, p, first, 1, 1);
		skip = 1;
	}
	install_run(e, p, first + skip, n - skip, k == n);
}

/* --- page-ins: READs on the fast channel --------------------------------------------- */

static int send_read(struct pyhv_eng *e, struct pyhv_eng_chan *ch, struct rreq *r)
{
	struct frame_hdr h = {r->id, (uint16_t)r->part->stream, OP_READ,
			      r->snap ? PYHV_SVC_SNAP : 0, 0, r->slot, r->n, 0};
	uint8_t payload[4 * PYHV_SVC_MAX_PAGES + 4];
	memcpy(payload, &r->part->crc[r->first], 4 * (size_t)r->n);
	memcpy(payload + 4 * (size_t)r->n, &r->first, 4);
	struct iovec iov[2] = {{&h, HDR}, {payload, 4 * (size_t)r->n + 4}};
	struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
	for (;;) {
		if (sendmsg(ch->sock, &m, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0)
			return 0;
		if (errno == EINTR)
			continue;
		return -errno;
	}
}

static void arm_out(struct pyhv_eng *e, struct pyhv_eng_chan *ch, int on)
{
	if (ch->want_out == on)
		return;
	struct epoll_event ev = {EPOLLIN | (on ? EPOLLOUT : 0), {.ptr = ch}};
	epoll_ctl(e->ep, EPOLL_CTL_MOD, ch->sock, &ev);
	ch->want_out = on;
}

/* Send what is queued on the partition's stream, if it flows. */
static void pump(struct pyhv_eng *e, struct pyhv_eng_part *p)
{
	struct pyhv_eng_chan *ch = p->chan;
	if (!ch || ch->dead || !p->flowing)
		return;
	while (p->qhead) {
		struct rreq *r = p->qhead;
		r->sent_ns = now_ns();
		int err = send_read(e, ch, r);
		if (err == -EAGAIN) {
			arm_out(e, ch, 1);
			return;
		}
		p->qhead = r->next;
		if (!p->qhead)
			p->qtail = NULL;
		p->queued--;
		if (err) {
			/* the channel is broken: its end-of-file reaches Python,
			 * which takes every READ back; keep this one in flight */
			e->g.send_errors++;
		}
		r->chan = ch;
		r->next = NULL;
		r->prev = ch->tail;
		if (ch->tail)
			ch->tail->next = r;
		else
			ch->head = r;
		ch->tail = r;
		ch->inflight++;
		p->reads_inflight++;
		e->g.reads_sent++;
	}
}

static void page_in_run(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t first, uint32_t n)
{
	struct rreq *r = calloc(1, sizeof(*r));
	if (!r) { /* no memory to ask for them: they stay on the device, their faults retry */
		e->g.enomem++;
		for (uint32_t k = 0; k < n; k++) {
			p->state[first + k] = at_rest(p, first + k);
			wake_pending(e, pending_take(e, p, first + k));
		}
		release_frames(e, n);
		return;
	}
	r->id = ++e->next_id;
	r->born_ns = now_ns();
	r->part = p;
	r->first = (uint32_t)first;
	r->n = n;
	r->snap = !p->slot[first]; /* (a page read with no slot of its own: the snapshot's) */
	r->slot = r->snap ? (uint32_t)first : p->slot[first] - 1;
	if (p->qtail)
		p->qtail->next = r;
	else
		p->qhead = r;
	p->qtail = r;
	p->queued++;
	pump(e, p);
}

/* Pages at rest gathered into READs: one a run of pages next to each
 * other in both page number and place (same_run), up to the largest READ. */
struct gather {
	uint64_t run;
	uint32_t k;
};

static int at_rest_state(uint8_t st)
{
	return st == ON_DEVICE || st == SNAPSHOT;
}

static void gather_send(struct pyhv_eng *e, struct pyhv_eng_part *p, struct gather *g)
{
	if (g->k)
		page_in_run(e, p, g->run, g->k);
	g->k = 0;
}

/* Read a page at rest ahead of any fault: a free frame (never ahead of a
 * waiting fault), FILLING with its pending record, in the READ being
 * gathered (a page that does not follow it sends that one first).  0, or -1
 * (nothing changed) when there is no frame or no memory for it. */
static int gather_add(struct pyhv_eng *e, struct pyhv_eng_part *p, struct gather *g, uint64_t page)
{
	if (!try_take(e))
		return -1;
	if (g->k && (page != g->run + g->k || !same_run(p, g->run + g->k - 1, page) ||
		     g->k == PYHV_SVC_MAX_PAGES))
		gather_send(e, p, g);
	if (!pending_new(e, p, page)) {
		release_frames(e, 1);
		return -1;
	}
	set_filling(p, page);
	if (!g->k)
		g->run = page;
	g->k++;
	return 0;
}

/* A window ahead must be used before eviction takes it back: at most a
 * sixteenth of the pool. */
static uint32_t ahead_window(struct pyhv_eng *e, uint32_t want)
{
	uint64_t most = e->pool_pages / 16 ? e->pool_pages / 16 : 1;
	return want < most ? want : (uint32_t)most;
}

/* A sequential run of page-ins: read the next pages on the device too,
 * while the worker handles this one, in one READ per run of slots that
 * follow each other (several in flight when they are scattered).  The
 * window doubles each time the run reaches its end.  Only with free frames
 * (never ahead of a waiting fault) and a stream that flows. */
static void prefetch(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t first)
{
	if (!p->chan || !p->flowing)
		return;
	uint64_t end = first + ahead_window(e, p->readahead);
	if (end > p->pages)
		end = p->pages;
	p->readahead = p->readahead * 2 > PREFETCH_MAX ? PREFETCH_MAX : p->readahead * 2;
	p->readahead_end = (int64_t)first;
	struct gather g = {0, 0};
	for (uint64_t page = first; page < end; page++) {
		if (!at_rest_state(p->state[page]) || gather_add(e, p, &g, page))
			break;
		p->readahead_end = (int64_t)page + 1;
		p->c->prefetched++;
	}
	gather_send(e, p, &g);
}

/* A sequential run of first touches (a program filling its memory): the
 * next pages that were never written are filled with zeros too, in one
 * UFFDIO_ZEROPAGE into the worker that faults, so that its next touches do
 * not fault at all; the window doubles along the run.  Each takes a free
 * frame (never ahead of a waiting fault); they are resident and dirty, as
 * a first touch would have left them. */
static void zero_ahead(struct pyhv_eng *e, struct pyhv_eng_part *p, struct eng_worker *w,
		       uint64_t first)
{
	uint64_t end = first + ahead_window(e, p->zero_ahead), n = 0;
	if (end > p->pages)
		end = p->pages;
	p->zero_ahead = p->zero_ahead * 2 > PREFETCH_MAX ? PREFETCH_MAX : p->zero_ahead * 2;
	while (first + n < end && (p->state[first + n] == UNTOUCHED || p->state[first + n] == LOANED) &&
	       try_take(e))
		n++;
	p->zero_ahead_end = (int64_t)(first + n);
	if (!n)
		return;
	struct uffdio_zeropage z = {{w->base + first * PG, n * PG}, UFFDIO_ZEROPAGE_MODE_DONTWAKE, 0};
	int r = uffd_op(e, w, UFFDIO_ZEROPAGE, &z, &z.zeropage);
	uint64_t done = r == IO_OK ? n : 0;
	if (r != IO_OK && z.zeropage > 0) /* as far as it got (EEXIST: someone mapped one) */
		done = (uint64_t)z.zeropage / PG;
	for (uint64_t k = 0; k < done; k++) {
		p->state[first + k] = DIRTY;
		p->resident++;
		enqueue(e, p, first + k);
	}
	p->c->first_touches += done;
	p->c->zeroed_ahead += done;
	p->zero_ahead_end = (int64_t)(first + done);
	if (done < n)
		release_frames(e, n - done);
}

/* A frame is held for the page (FILLING, with its pending record). */
static void fill(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page, int read)
{
	if (read)
		page_in_run(e, p, page, 1);
	else
		install(e, p, page, 0, 0);
}

/* The service refused a READ it should have served (the stream is not open
 * there, the request malformed): that is the service failing, not the page.
 * The READ goes back to the front of its queue, the channel is no longer
 * used, and Python fails the service over (the other READs in flight there
 * come back with pyhv_eng_chan_remove). */
static int service_fault(int status)
{
	return status == -EINVAL || status == -EBADF || status == -EOPNOTSUPP ||
	       status == -EMSGSIZE || status == -EPROTO;
}

static void chan_failed(struct pyhv_eng *e, struct pyhv_eng_chan *ch, int err)
{
	if (ch->dead)
		return;
	ch->dead = 1;
	epoll_ctl(e->ep, EPOLL_CTL_DEL, ch->sock, NULL);
	post(e, PYHV_EV_CHAN_CLOSED, err, NULL, 0, ch->id);
}

static void take_back(struct pyhv_eng *e, struct pyhv_eng_part *p, struct pyhv_eng_chan *ch);

static void requeue(struct pyhv_eng_part *p, struct rreq *r)
{
	r->next = p->qhead;
	p->qhead = r;
	if (!p->qtail)
		p->qtail = r;
	p->queued++;
}

static void read_done(struct pyhv_eng *e, struct pyhv_eng_chan *ch, struct rreq *r, int status)
{
	struct pyhv_eng_part *p = r->part;
	if (status == -ENOTCONN) {
		/* the service lost its path to the device (NBD): nothing is
		 * wrong with the page.  The partition's READs wait, and Python
		 * moves its stream to another path (or waits for one). */
		e->g.reads_path_lost++;
		requeue(p, r);
		if (p->chan == ch) {
			take_back(e, p, ch);
			if (p->flowing)
				post(e, PYHV_EV_PATH_LOST, ENOTCONN, p, 0, ch->id);
			p->flowing = 0;
		}
		return;
	}
	if (service_fault(status)) {
		e->g.reads_refused++;
		r->next = p->qhead;
		p->qhead = r;
		if (!p->qtail)
			p->qtail = r;
		p->queued++;
		chan_failed(e, ch, -status);
		return;
	}
	if (status == 0) {
		p->c->page_ins += r->n;
		if (r->snap)
			p->c->snapshot_reads += r->n;
		install_read(e, p, r->first, r->n);
	} else if (r->n > 1) { /* which page has the error: one by one */
		for (uint32_t k = 0; k < r->n; k++)
			page_in_run(e, p, r->first + k, 1);
	} else { /* a machine check: Python records it, then pyhv_eng_poison */
		p->c->read_errors++;
		post(e, PYHV_EV_READ_FAILED, -status, p, r->first, 0);
	}
	free(r);
}

static void unlink_inflight(struct rreq *r)
{
	struct pyhv_eng_chan *ch = r->chan;
	if (r->prev)
		r->prev->next = r->next;
	else
		ch->head = r->next;
	if (r->next)
		r->next->prev = r->prev;
	else
		ch->tail = r->prev;
	ch->inflight--;
	r->part->reads_inflight--;
	r->chan = NULL;
	r->next = r->prev = NULL;
}

static void chan_readable(struct pyhv_eng *e, struct pyhv_eng_chan *ch)
{
	for (;;) {
		struct frame_hdr h;
		uint8_t spare[64];
		struct iovec iov[2] = {{&h, HDR}, {spare, sizeof(spare)}};
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
		ssize_t n = recvmsg(ch->sock, &m, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		if (n < (ssize_t)HDR) { /* end-of-file, or garbage: the service failed */
			chan_failed(e, ch, n < 0 ? errno : 0);
			return;
		}
		struct rreq *r = ch->head;
		while (r && r->id != h.req)
			r = r->next;
		if (!r) {
			e->g.stray_replies++;
			continue;
		}
		unlink_inflight(r);
		e->g.reads_done++;
		e->g.read_rtt_ns += now_ns() - r->sent_ns;
		read_done(e, ch, r, h.status);
		if (ch->dead)
			return;
	}
}

/* --- the fault path ------------------------------------------------------------------- */

/* The kernel names the thread of each fault: a forked child's first fault
 * tells which process it is (Python then watches it with a pidfd). */
static void identify(struct pyhv_eng *e, struct eng_worker *w, uint32_t tid)
{
	if (w->pid || !tid)
		return;
	w->pid = (int)tid;
	post(e, PYHV_EV_WORKER_PID, 0, w->part, tid, w->id);
}

static void fault(struct pyhv_eng *e, struct eng_worker *w, uint64_t addr, uint64_t flags,
		  uint32_t tid)
{
	struct pyhv_eng_part *p = w->part;
	identify(e, w, tid);
	if (w->ident && addr == w->ident) { /* its identity page: zeros, private to it */
		struct uffdio_zeropage z = {{w->ident, PG}, 0, 0};
		struct uffdio_range r = {w->ident, PG};
		int io = uffd_op(e, w, UFFDIO_ZEROPAGE, &z, &z.zeropage);
		if (io == IO_EXISTS || io == IO_AGAIN) /* (filled already, or it faults again) */
			uffd_op(e, w, UFFDIO_WAKE, &r, NULL);
		return;
	}
	if (addr < w->base || (addr - w->base) / PG >= p->pages) {
		e->g.stray_faults++;
		return;
	}
	uint64_t page = (addr - w->base) / PG;
	uint8_t st = p->state[page];
	p->c->faults++;
	if (flags & UFFD_PAGEFAULT_FLAG_WP) {
		p->c->wp_faults++;
		if ((st == CLEAN || st == DIRTY) && (p->age[page] & REF_ARMED)) {
			p->age[page] = (p->age[page] & ~REF_ARMED) | REF_SEEN; /* in use */
			p->c->write_refs++;
		}
		if (st == CLEAN || st == DIRTY) {
			if (st == CLEAN) { /* its copy on the device is stale from now on */
				release_slot(p, page);
				note_written(p, 1, 1);
			}
			p->state[page] = DIRTY;
			op_wp(e, w, page, 1, 0, 1);
		} else if (st == PAGING_OUT || st == FILLING) {
			struct pending *x = pending_find(e, p, page);
			if (!x || add_waiter(x, w, 1))
				op_wake(e, w, page, 1); /* it faults again */
		} else {
			op_wake(e, w, page, 1);
		}
		return;
	}
	int write = (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
	if (st == UNTOUCHED || st == LOANED || st == ON_DEVICE || st == SNAPSHOT || st == POISONED) {
		struct pending *x = pending_new(e, p, page);
		if (!x || add_waiter(x, w, write)) {
			pending_free(e, x ? pending_take(e, p, page) : NULL);
			e->g.enomem++;
			op_wake(e, w, page, 1); /* it faults again: no state changed */
			return;
		}
		x->poisoned = st == POISONED;
		set_filling(p, page);
		int read = at_rest_state(st);
		if (!read)
			p->c->first_touches++;
		if (try_take(e)) {
			fill(e, p, page, read);
			if (read) {
				if ((int64_t)page == p->last_page_in + 1 || (int64_t)page == p->readahead_end)
					prefetch(e, p, page + 1);
				else
					p->readahead = PREFETCH_MIN;
			} else if (w->alive && (st == UNTOUCHED || st == LOANED)) {
				if ((int64_t)page == p->last_first_touch + 1 ||
				    (int64_t)page == p->zero_ahead_end)
					zero_ahead(e, p, w, page + 1);
				else
					p->zero_ahead = PREFETCH_MIN;
			}
		} else {
			x->fill_kind = read;
			x->no_frame = 1;
			x->wait_next = NULL;
			if (e->wait_tail)
				e->wait_tail->wait_next = x;
			else
				e->wait_head = x;
			e->wait_tail = x;
			e->waiting++;
			want_frames(e);
		}
		if (read)
			p->last_page_in = (int64_t)page;
		else
			p->last_first_touch = (int64_t)page;
	} else if (st == FILLING || st == PAGING_OUT) {
		struct pending *x = pending_find(e, p, page);
		if (!x || add_waiter(x, w, write))
			op_wake(e, w, page, 1);
	} else if ((flags & UFFD_PAGEFAULT_FLAG_MINOR) || in_memory(p, page)) {
		/* resident, not mapped by this worker yet (MINOR), or mapped
		 * meanwhile (an install raced with the fault): map it here */
		p->c->minor_faults++;
		op_map(e, w, page, 1, st == CLEAN);
	} else { /* resident by the table, gone from the memfd: a worker removed it
		  * (MADV_REMOVE): it reads zeros now */
		p->c->removed_by_worker++;
		p->state[page] = DIRTY;
		op_zero(e, w, page);
	}
}

static void forked(struct pyhv_eng *e, struct eng_worker *parent, int fd);

static void uffd_readable(struct pyhv_eng *e, struct eng_worker *w)
{
	struct uffd_msg msgs[64];
	while (w->alive) {
		ssize_t got = read(w->uffd, msgs, sizeof(msgs));
		if (got < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				drop_worker(e, w, errno);
			return;
		}
		int k = (int)(got / (ssize_t)sizeof(msgs[0]));
		for (int i = 0; i < k; i++) {
			struct uffd_msg *m = &msgs[i];
			/* (a child's fd is in this process once read: it is
			 * adopted even if its parent was dropped meanwhile) */
			if (m->event == UFFD_EVENT_FORK)
				forked(e, w, (int)m->arg.fork.ufd);
			else if (m->event == UFFD_EVENT_PAGEFAULT && w->alive)
				fault(e, w, m->arg.pagefault.address, m->arg.pagefault.flags,
				      m->arg.pagefault.feat.ptid);
		}
		e->g.fault_reads++;
		if (k < 64)
			return;
	}
}

/* --- workers ------------------------------------------------------------------------- */

/* The engine stops serving the worker.  Its uffd stays open (and its
 * memory registered): a process that lives on cannot touch the memory
 * unguarded, its faults just wait, until Python has it gone and removes it
 * (pyhv_eng_worker_remove closes the uffd). */
static void forget_worker(struct pyhv_eng *e, struct eng_worker *w)
{
	struct pyhv_eng_part *p = w->part;
	for (int i = 0; i < p->nworkers; i++)
		if (p->workers[i] == w) {
			p->workers[i] = p->workers[--p->nworkers];
			break;
		}
	if (w->alive)
		epoll_ctl(e->ep, EPOLL_CTL_DEL, w->uffd, NULL);
	w->alive = 0;
}

static void drop_worker(struct pyhv_eng *e, struct eng_worker *w, int err)
{
	if (!w->alive)
		return;
	forget_worker(e, w); /* (Python's reference keeps it until it removes it too) */
	post(e, PYHV_EV_WORKER_GONE, err, w->part, 0, w->id);
}

/* Clean pages must fault on a new worker's first write too, and pages
 * being paged out must not be written behind the page-out's back.  Returns
 * 0 or an errno. */
static int protect_all(struct pyhv_eng_part *p, int uffd, uint64_t base)
{
	for (uint64_t page = 0; page < p->pages; page++) {
		uint8_t st = p->state[page];
		if (st != CLEAN && st != PAGING_OUT)
			continue;
		uint64_t n = 1;
		while (page + n < p->pages &&
		       (p->state[page + n] == CLEAN || p->state[page + n] == PAGING_OUT))
			n++;
		struct uffdio_writeprotect wp = {{base + page * PG, n * PG}, UFFDIO_WRITEPROTECT_MODE_WP};
		if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
			return errno;
		page += n - 1;
	}
	return 0;
}

static int add_to_part(struct pyhv_eng_part *p, struct eng_worker *w)
{
	if (p->nworkers == p->capworkers) {
		int cap = p->capworkers ? 2 * p->capworkers : 4;
		struct eng_worker **ws = realloc(p->workers, (size_t)cap * sizeof(*ws));
		if (!ws)
			return ENOMEM;
		p->workers = ws;
		p->capworkers = cap;
	}
	p->workers[p->nworkers++] = w;
	return 0;
}

/* A worker forked: the kernel made its child a userfaultfd of its own
 * (UFFD_FEATURE_EVENT_FORK), registered as the parent's, and put it into
 * this process as fd.  The child is a worker of the same partition at the
 * same address from now on; Python is told and claims it
 * (pyhv_eng_worker_claim), and learns its pid from its first fault.  With
 * no memory to serve it, the fd is kept open all the same (closing it would
 * unregister the child's memory, whose holes would then read as zeros): the
 * child's faults wait for ever, and Python logs the failure. */
static void forked(struct pyhv_eng *e, struct eng_worker *parent, int fd)
{
	struct pyhv_eng_part *p = parent->part;
	struct eng_worker *w = calloc(1, sizeof(*w));
	int err = w ? 0 : ENOMEM;
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	if (!err) {
		w->kind = SRC_UFFD;
		w->uffd = fd;
		w->base = parent->base;
		w->ident = parent->ident;
		w->id = (1ull << 40) + ++e->forks;
		w->part = p;
		w->alive = 1;
		w->refs = 1; /* Python's, once it claims it */
		/* (pages protected in the parent are in the child's copy of its
		 * page table already; this is for what changed since the copy) */
		err = protect_all(p, fd, w->base);
	}
	struct epoll_event ev = {EPOLLIN, {.ptr = w}};
	if (!err && epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) < 0)
		err = errno;
	if (!err && (err = add_to_part(p, w)) != 0)
		epoll_ctl(e->ep, EPOLL_CTL_DEL, fd, NULL);
	if (err) {
		e->g.forks_lost++;
		free(w);
		post(e, PYHV_EV_WORKER_FORKED, err, p, parent->id, 0);
		return;
	}
	w->unclaimed_next = e->unclaimed;
	e->unclaimed = w;
	e->g.forks++;
	post(e, PYHV_EV_WORKER_FORKED, 0, p, parent->id, w->id);
}

/* Python takes a forked worker: its handle (NULL: no such one), and where
 * it maps the memory (*base_out). */
struct pyhv_eng_worker *pyhv_eng_worker_claim(struct pyhv_eng *e, uint64_t id, uint64_t *base_out)
{
	pthread_mutex_lock(&e->mu);
	struct eng_worker *w = NULL;
	for (struct eng_worker **at = &e->unclaimed; *at; at = &(*at)->unclaimed_next)
		if ((*at)->id == id) {
			w = *at;
			*at = w->unclaimed_next;
			*base_out = w->base;
			break;
		}
	pthread_mutex_unlock(&e->mu);
	return (struct pyhv_eng_worker *)w;
}

/* The worker's uffd (the engine's: for the supervisor to keep a copy of). */
int pyhv_eng_worker_fd(struct pyhv_eng_worker *handle)
{
	return ((struct eng_worker *)handle)->uffd;
}

/* Forked children are named from (1 << 40) + last + 1 on: after a crash, past
 * the ones the last hypervisor named. */
void pyhv_eng_fork_ids_from(struct pyhv_eng *e, uint64_t last)
{
	pthread_mutex_lock(&e->mu);
	if (last > e->forks)
		e->forks = last;
	pthread_mutex_unlock(&e->mu);
}

/* Is the worker's process still there?  0 yes, ESRCH no (its memory is
 * gone: a forked child that exited, or exec'd, before its first fault). */
int pyhv_eng_worker_probe(struct pyhv_eng *e, struct pyhv_eng_worker *handle)
{
	struct eng_worker *w = (struct eng_worker *)handle;
	pthread_mutex_lock(&e->mu);
	int r = 0;
	if (w->uffd >= 0) {
		/* changes nothing: the identity page is not registered for WP
		 * (ENOENT); with the process gone, the kernel says ESRCH first */
		struct uffdio_writeprotect wp = {{w->ident ? w->ident : w->base, PG},
						 UFFDIO_WRITEPROTECT_MODE_DONTWAKE};
		if (w->ident && ioctl(w->uffd, UFFDIO_WRITEPROTECT, &wp) < 0 && errno == ESRCH)
			r = ESRCH;
	}
	pthread_mutex_unlock(&e->mu);
	return r;
}

struct pyhv_eng_worker *pyhv_eng_worker_add(struct pyhv_eng *e, struct pyhv_eng_part *p, int uffd,
					    uint64_t base, uint64_t id, int pid, uint64_t ident,
					    int *err)
{
	struct eng_worker *w = calloc(1, sizeof(*w));
	*err = 0;
	if (!w) {
		*err = ENOMEM;
		return NULL;
	}
	w->kind = SRC_UFFD;
	w->uffd = uffd;
	w->base = base;
	w->id = id;
	w->part = p;
	w->alive = 1;
	w->pid = pid;
	w->ident = ident;
	w->refs = 1; /* Python's, until pyhv_eng_worker_remove */
	pthread_mutex_lock(&e->mu);
	if ((*err = protect_all(p, uffd, base)) != 0)
		goto fail;
	struct epoll_event ev = {EPOLLIN, {.ptr = w}};
	if (epoll_ctl(e->ep, EPOLL_CTL_ADD, uffd, &ev) < 0) {
		*err = errno;
		goto fail;
	}
	if ((*err = add_to_part(p, w)) != 0) {
		epoll_ctl(e->ep, EPOLL_CTL_DEL, uffd, NULL);
		goto fail;
	}
	pthread_mutex_unlock(&e->mu);
	return (struct pyhv_eng_worker *)w;
fail:
	pthread_mutex_unlock(&e->mu);
	free(w);
	return NULL; /* the uffd stays the caller's */
}

/* The worker is gone (Python saw its connection close): the engine closes
 * its uffd; its waits are dropped as they come up. */
void pyhv_eng_worker_remove(struct pyhv_eng *e, struct pyhv_eng_worker *handle)
{
	struct eng_worker *w = (struct eng_worker *)handle;
	pthread_mutex_lock(&e->mu);
	forget_worker(e, w);
	if (w->uffd >= 0) {
		close(w->uffd);
		w->uffd = -1;
	}
	worker_put(e, w);
	pthread_mutex_unlock(&e->mu);
}

/* --- the engine thread ---------------------------------------------------------------- */

static void *engine_thread(void *arg)
{
	struct pyhv_eng *e = arg;
	struct epoll_event evs[64];
	uint64_t busy_until = 0;
	for (;;) {
		int n;
		if (e->spin_ns && now_ns() < busy_until) {
			/* polling: a fault or reply that comes meanwhile costs no
			 * wake-up of a sleeping CPU; whoever else wants this CPU
			 * (the worker just woken) has it first */
			n = epoll_wait(e->ep, evs, 64, 0);
			if (n == 0) {
				sched_yield();
				continue;
			}
		} else {
			n = epoll_wait(e->ep, evs, 64, -1);
			if (n > 0)
				e->g.sleeps++;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return NULL;
		}
		busy_until = now_ns() + e->spin_ns;
		pthread_mutex_lock(&e->mu);
		for (int i = 0; i < n && !e->stopping; i++) {
			int kind = *(int *)evs[i].data.ptr;
			if (kind == SRC_UFFD) {
				uffd_readable(e, evs[i].data.ptr);
			} else if (kind == SRC_CHAN) {
				struct pyhv_eng_chan *ch = evs[i].data.ptr;
				if (ch->dead)
					continue;
				if (evs[i].events & EPOLLOUT) { /* room again: send what waited */
					arm_out(e, ch, 0);
					for (struct pyhv_eng_part *p = e->parts; p; p = p->next)
						if (p->chan == ch)
							pump(e, p);
				}
				chan_readable(e, ch);
			} else {
				e->stopping = 1;
			}
		}
		bury(e);
		int stop = e->stopping;
		pthread_mutex_unlock(&e->mu);
		if (stop)
			return NULL;
	}
}

/* --- Python's side: the engine ------------------------------------------------------ */

struct pyhv_eng *pyhv_eng_new(uint64_t pool_pages, uint64_t reserve, int spin_us, int *err)
{
	struct pyhv_eng *e = calloc(1, sizeof(*e));
	*err = ENOMEM;
	if (!e)
		return NULL;
	e->ep = e->stop_fd = e->notify_fd = -1;
	e->buckets = calloc(BUCKETS, sizeof(*e->buckets));
	e->events = calloc(EVENTS, sizeof(*e->events));
	e->cap_events = EVENTS;
	if (!e->buckets || !e->events)
		goto fail;
	e->ep = epoll_create1(EPOLL_CLOEXEC);
	e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	e->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (e->ep < 0 || e->stop_fd < 0 || e->notify_fd < 0) {
		*err = errno;
		goto fail;
	}
	e->stop_kind = SRC_STOP;
	struct epoll_event ev = {EPOLLIN, {.ptr = &e->stop_kind}};
	if (epoll_ctl(e->ep, EPOLL_CTL_ADD, e->stop_fd, &ev) < 0) {
		*err = errno;
		goto fail;
	}
	pthread_mutex_init(&e->mu, NULL);
	e->pool_pages = pool_pages;
	e->reserve = reserve;
	e->spin_ns = spin_us > 0 ? (uint64_t)spin_us * 1000u : 0;
	*err = 0;
	return e;
fail:
	if (e->ep >= 0)
		close(e->ep);
	if (e->stop_fd >= 0)
		close(e->stop_fd);
	if (e->notify_fd >= 0)
		close(e->notify_fd);
	free(e->buckets);
	free(e->events);
	free(e);
	return NULL;
}

int pyhv_eng_start(struct pyhv_eng *e)
{
	int r = pthread_create(&e->thread, NULL, engine_thread, e);
	if (r)
		return -r;
	e->started = 1;
	return 0;
}

static void part_release(struct pyhv_eng *e, struct pyhv_eng_part *p);

/* Stop the thread and free everything (workers' uffds are closed; fast
 * channels' sockets are Python's). */
void pyhv_eng_free(struct pyhv_eng *e)
{
	if (e->started) {
		uint64_t one = 1;
		if (write(e->stop_fd, &one, sizeof(one)) != sizeof(one))
			pthread_cancel(e->thread);
		pthread_join(e->thread, NULL);
	}
	while (e->parts) {
		struct pyhv_eng_part *p = e->parts;
		while (p->nworkers) { /* (their structs are Python's to remove, or leak at exit) */
			struct eng_worker *w = p->workers[0];
			forget_worker(e, w);
			close(w->uffd);
			w->uffd = -1;
		}
		part_release(e, p);
	}
	bury(e);
	while (e->chans) {
		struct pyhv_eng_chan *ch = e->chans;
		e->chans = ch->next;
		free(ch);
	}
	close(e->ep);
	close(e->stop_fd);
	close(e->notify_fd);
	free(e->buckets);
	free(e->events);
	free(e);
}

int pyhv_eng_notify_fd(struct pyhv_eng *e)
{
	return e->notify_fd;
}

/* Events queued for Python, oldest first (up to max); returns how many. */
int pyhv_eng_events(struct pyhv_eng *e, struct pyhv_eng_event *out, int max)
{
	pthread_mutex_lock(&e->mu);
	int n = e->nevents < max ? e->nevents : max;
	memcpy(out, e->events, (size_t)n * sizeof(*out));
	memmove(e->events, e->events + n, (size_t)(e->nevents - n) * sizeof(*out));
	e->nevents -= n;
	e->notified = 0;
	if (e->nevents)
		notify(e);
	pthread_mutex_unlock(&e->mu);
	return n;
}

/* How many more pages must start eviction to serve every fault waiting for
 * a frame and keep `reserve` frames coming, when page-outs that will free
 * `coming` frames are under way.  Python asks when it is told the pool runs
 * low; asking lets the engine tell it again. */
int64_t pyhv_eng_shortfall(struct pyhv_eng *e, uint64_t coming)
{
	pthread_mutex_lock(&e->mu);
	e->want_evict = 0;
	int64_t free_ = (int64_t)e->pool_pages - (int64_t)e->used;
	int64_t r = (int64_t)e->waiting + (int64_t)e->reserve - free_ - (int64_t)coming;
	pthread_mutex_unlock(&e->mu);
	return r;
}

void pyhv_eng_pool(struct pyhv_eng *e, struct pyhv_eng_pool *out)
{
	pthread_mutex_lock(&e->mu);
	out->pages = e->pool_pages;
	out->used = e->used;
	out->high_water = e->high_water;
	out->waiting = e->waiting;
	out->reserve = e->reserve;
	out->pending = e->pending_count;
	out->events_lost = e->events_lost;
	out->g = e->g;
	pthread_mutex_unlock(&e->mu);
}

void pyhv_eng_pool_resize(struct pyhv_eng *e, uint64_t pages, uint64_t reserve)
{
	pthread_mutex_lock(&e->mu);
	e->pool_pages = pages;
	e->reserve = reserve;
	serve_waiters(e);
	pthread_mutex_unlock(&e->mu);
}

/* --- partitions --------------------------------------------------------------------- */

/* The page table lives in a memfd of its own, mapped shared: the
 * supervisor keeps a copy of the fd (pyhv.supervisor), so a hypervisor that
 * crashes leaves its partitions' tables behind for the next one, with no I/O
 * a fault.  Pages of it never written cost no memory (as calloc's did). */
#define TABLE_MAGIC 0x316c627476687970ull /* "pyhvtbl1" */
struct table_hdr {
	uint64_t magic, pages, slots;
	uint64_t off_state, off_slot, off_crc, off_age, off_map, size;
	struct pyhv_eng_counters c;
};
#define ALIGN_PG(x) (((x) + PG - 1) / PG * PG)

static void table_layout(struct table_hdr *h, uint64_t pages, uint64_t slots)
{
	h->magic = TABLE_MAGIC;
	h->pages = pages;
	h->slots = slots;
	h->off_state = ALIGN_PG(sizeof(*h));
	h->off_slot = h->off_state + ALIGN_PG(pages);
	h->off_crc = h->off_slot + ALIGN_PG(4 * pages);
	h->off_age = h->off_crc + ALIGN_PG(4 * pages);
	h->off_map = h->off_age + ALIGN_PG(pages);
	h->size = h->off_map + ALIGN_PG(slots ? slots : 1);
}

/* Map the table: a new memfd (fd < 0), or one a crashed hypervisor left
 * (its layout must be this partition's).  0 or -errno. */
static int table_map(struct pyhv_eng_part *p, int fd, uint64_t pages, uint64_t slots)
{
	struct table_hdr want;
	table_layout(&want, pages, slots);
	int own = fd < 0;
	if (own) {
		fd = memfd_create("pyhv-table", MFD_CLOEXEC);
		if (fd < 0)
			return -errno;
		if (ftruncate(fd, (off_t)want.size) < 0) {
			int r = -errno;
			close(fd);
			return r;
		}
	} else {
		struct table_hdr have;
		if (pread(fd, &have, sizeof(have), 0) != (ssize_t)sizeof(have))
			return -EINVAL;
		if (have.magic != TABLE_MAGIC || have.pages != pages || have.slots != slots ||
		    have.size != want.size || have.off_map != want.off_map)
			return -EINVAL; /* another partition's, or another layout */
	}
	void *t = mmap(NULL, want.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (t == MAP_FAILED) {
		int r = -errno;
		if (own)
			close(fd);
		return r;
	}
	struct table_hdr *h = t;
	if (own)
		*h = want;
	p->table = t;
	p->table_size = want.size;
	p->table_fd = fd;
	p->c = &h->c;
	p->state = (uint8_t *)t + h->off_state;
	p->slot = (uint32_t *)((uint8_t *)t + h->off_slot);
	p->crc = (uint32_t *)((uint8_t *)t + h->off_crc);
	p->age = (uint8_t *)t + h->off_age;
	p->slot_map = (uint8_t *)t + h->off_map;
	return 0;
}

struct pyhv_eng_part *pyhv_eng_part_new(struct pyhv_eng *e, uint32_t stream, uint64_t pages,
					uint64_t slots, int memfd, uint64_t hv_base, int table_fd,
					int *err)
{
	struct pyhv_eng_part *p = calloc(1, sizeof(*p));
	*err = ENOMEM;
	if (!p)
		return NULL;
	int r = table_map(p, table_fd, pages, slots);
	if (r) {
		*err = -r;
		free(p);
		return NULL;
	}
	*err = 0;
	p->stream = stream;
	p->pages = pages;
	p->slots = slots;
	p->memfd = memfd;
	p->hv_base = hv_base;
	p->last_page_in = -2;
	p->readahead_end = -1;
	p->readahead = PREFETCH_MIN;
	p->last_first_touch = -2;
	p->zero_ahead_end = -1;
	p->zero_ahead = PREFETCH_MIN;
	pthread_mutex_lock(&e->mu);
	p->next = e->parts;
	e->parts = p;
	pthread_mutex_unlock(&e->mu);
	return p;
}

int pyhv_eng_part_table_fd(struct pyhv_eng_part *p)
{
	return p->table_fd;
}

/* Which pages the memfd holds (swapped out ones too): present[page] = 1. */
static int memfd_pages(int fd, uint64_t pages, uint8_t *present)
{
	off_t end = (off_t)(pages * PG), at = 0;
	while (at < end) {
		off_t data = lseek(fd, at, SEEK_DATA);
		if (data < 0)
			return errno == ENXIO ? 0 : -errno;
		off_t hole = lseek(fd, data, SEEK_HOLE);
		if (hole < 0)
			return -errno;
		for (off_t q = data / PG; q < (hole + PG - 1) / PG && q < (off_t)pages; q++)
			present[q] = 1;
		at = hole;
	}
	return 0;
}

static void punch_page(struct pyhv_eng_part *p, uint64_t page)
{
	fallocate(p->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(page * PG), PG);
}

/* After a crash: the table a dead hypervisor left (mapped by
 * pyhv_eng_part_new) is made true of the memory again, page by page, from
 * what the memfd holds now (nobody else writes it: the paging services of
 * the dead hypervisor are gone).  The rules, by the state the table says:
 *   resident (DIRTY, CLEAN): kept if in the memory; else a worker removed it
 *     (MADV_REMOVE), or a zero fill was not mapped yet: zeros (UNTOUCHED)
 *   FILLING a zero fill: what is in the memory is the page (zeros, or what
 *     the worker wrote since): kept (DIRTY); else back to what it was
 *   FILLING a page-in: no worker maps it yet (the table says resident
 *     before any may: see install), its READ may be half done: punched and
 *     back at rest, read again at the next fault
 *   PAGING_OUT in the memory: its WRITE was not done (the service punches
 *     only after a whole write): kept, dirty, its slot freed
 *   PAGING_OUT gone from the memory: written, but the CRC32 went with the
 *     reply: it stays PAGING_OUT (faults wait) and goes to confirm[] for
 *     Python to confirm from the device (a WRITE flagged RETRY); with no
 *     slot it cannot be found: a machine check (POISONED)
 *   at rest (ON_DEVICE, SNAPSHOT) but in the memory: a stale copy, punched
 *   UNTOUCHED, LOANED in the memory: zeros filled ahead, maybe written: kept
 * The slot map is rebuilt from the slots pages hold (bad slots get another
 * chance), the victim queues from the resident pages, the pool's frames
 * taken for them.  Returns how many pages went to confirm (room for every
 * page), or -errno; out[]: kept resident, read again, page-outs kept, stale
 * copies dropped, lost. */
int64_t pyhv_eng_part_recover(struct pyhv_eng *e, struct pyhv_eng_part *p, uint32_t *confirm,
			      uint64_t *out)
{
	memset(out, 0, 5 * sizeof(*out));
	uint8_t *present = calloc(p->pages ? p->pages : 1, 1);
	if (!present)
		return -ENOMEM;
	int r = memfd_pages(p->memfd, p->pages, present);
	if (r) {
		free(present);
		return r;
	}
	static const uint8_t was[] = {[PRIOR_UNTOUCHED] = UNTOUCHED, [PRIOR_LOANED] = LOANED,
				      [PRIOR_POISONED] = POISONED, [PRIOR_ON_DEVICE] = ON_DEVICE,
				      [PRIOR_SNAPSHOT] = SNAPSHOT};
	pthread_mutex_lock(&e->mu);
	int64_t nconfirm = 0;
	for (uint64_t page = 0; page < p->pages; page++) {
		uint8_t st = p->state[page], in = present[page];
		uint8_t prior = p->age[page] & REF_MASK;
		switch (st) {
		case DIRTY:
			release_slot(p, page);
			/* fallthrough */
		case CLEAN:
			if (!in) {
				release_slot(p, page);
				p->state[page] = UNTOUCHED;
			}
			break;
		case UNTOUCHED:
		case LOANED:
			if (in)
				p->state[page] = DIRTY;
			break;
		case FILLING:
			if (prior >= sizeof(was))
				prior = PRIOR_UNTOUCHED; /* (cannot be) */
			if (prior == PRIOR_ON_DEVICE || prior == PRIOR_SNAPSHOT) {
				if (in)
					punch_page(p, page);
				p->state[page] = prior == PRIOR_ON_DEVICE && !p->slot[page] ? POISONED
											    : was[prior];
				out[1]++;
			} else {
				p->state[page] = in ? DIRTY : was[prior];
			}
			break;
		case PAGING_OUT:
			if (in) {
				release_slot(p, page);
				p->state[page] = DIRTY;
				out[2]++;
			} else if (p->slot[page]) {
				confirm[nconfirm++] = (uint32_t)page;
			} else {
				p->state[page] = POISONED;
			}
			break;
		case ON_DEVICE:
		case SNAPSHOT:
			if (in) {
				punch_page(p, page);
				out[3]++;
			}
			if (st == ON_DEVICE && !p->slot[page])
				p->state[page] = POISONED; /* (cannot be) */
			break;
		default:
			break;
		}
		uint8_t now = p->state[page];
		out[4] += now == POISONED && st != POISONED;
		if (now == CLEAN || now == DIRTY) {
			p->age[page] &= ~REF_MASK;
			p->resident++;
			out[0]++;
			if (ring_push(&p->inactive, (uint32_t)page))
				e->g.enomem++;
		} else if (now != ON_DEVICE && now != PAGING_OUT) {
			release_slot(p, page); /* (nothing else at rest holds a slot) */
		}
	}
	memset(p->slot_map, SLOT_FREE, p->slots);
	for (uint64_t page = 0; page < p->pages; page++) {
		uint32_t sl = p->slot[page];
		if (sl && sl - 1 < p->slots)
			p->slot_map[sl - 1] = SLOT_USED;
		else if (sl)
			p->slot[page] = 0;
	}
	for (int64_t i = 0; i < nconfirm; i++)
		if (!pending_new(e, p, confirm[i]))
			e->g.enomem++; /* (its faults wake and fault again) */
	e->used += p->resident + (uint64_t)nconfirm;
	if (e->used > e->high_water)
		e->high_water = e->used;
	if (e->used + e->reserve > e->pool_pages)
		want_frames(e);
	pthread_mutex_unlock(&e->mu);
	free(present);
	return nconfirm;
}

static void take_back(struct pyhv_eng *e, struct pyhv_eng_part *p, struct pyhv_eng_chan *ch);

static void part_release(struct pyhv_eng *e, struct pyhv_eng_part *p)
{
	for (struct pyhv_eng_part **at = &e->parts; *at; at = &(*at)->next)
		if (*at == p) {
			*at = p->next;
			break;
		}
	if (p->chan)
		take_back(e, p, p->chan);
	while (p->qhead) {
		struct rreq *r = p->qhead;
		p->qhead = r->next;
		free(r);
	}
	for (struct pending **at = &e->wait_head; *at;) { /* (Python waits for none to be left) */
		if ((*at)->part == p) {
			*at = (*at)->wait_next;
			e->waiting--;
		} else {
			at = &(*at)->wait_next;
		}
	}
	e->wait_tail = NULL;
	for (struct pending *x = e->wait_head; x; x = x->wait_next)
		e->wait_tail = x;
	for (uint64_t b = 0; b < BUCKETS && p->pending; b++)
		for (struct pending **at = &e->buckets[b]; *at;) {
			struct pending *x = *at;
			if (x->part != p) {
				at = &x->next;
				continue;
			}
			*at = x->next;
			e->pending_count--;
			p->pending--;
			if (!x->no_frame)
				e->used--; /* its frame */
			pending_free(e, x);
		}
	e->used -= p->resident;
	ring_free(&p->inactive);
	ring_free(&p->active);
	free(p->workers);
	munmap(p->table, p->table_size);
	close(p->table_fd);
	free(p);
}

/* A partition with no worker and nothing in flight goes: its frames return
 * to the pool. */
void pyhv_eng_part_free(struct pyhv_eng *e, struct pyhv_eng_part *p)
{
	pthread_mutex_lock(&e->mu);
	part_release(e, p);
	serve_waiters(e);
	pthread_mutex_unlock(&e->mu);
}

void pyhv_eng_part_stats(struct pyhv_eng *e, struct pyhv_eng_part *p, struct pyhv_eng_stats *out)
{
	pthread_mutex_lock(&e->mu);
	out->c = *p->c;
	out->resident = p->resident;
	out->active = p->active.count;
	out->inactive = p->inactive.count;
	out->reads_inflight = p->reads_inflight;
	out->reads_queued = p->queued;
	out->pending = p->pending;
	out->written_share = p->written_share;
	out->metadata_bytes = p->pages * (1 + 4 + 4 + 1) + p->slots;
	pthread_mutex_unlock(&e->mu);
}

/* What the eviction policy weighs: out[0] resident pages, out[1] of them in
 * a victim queue (all, but for pages the engine had no memory to queue). */
void pyhv_eng_part_load(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t *out)
{
	pthread_mutex_lock(&e->mu);
	out[0] = p->resident;
	out[1] = p->inactive.count + p->active.count;
	pthread_mutex_unlock(&e->mu);
}

/* How many pages are in each state (out[PYHV_ENG_STATES], by state number). */
void pyhv_eng_state_counts(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t *out)
{
	memset(out, 0, NSTATES * sizeof(*out));
	pthread_mutex_lock(&e->mu);
	for (uint64_t i = 0; i < p->pages; i++)
		out[p->state[i] < NSTATES ? p->state[i] : 0]++;
	pthread_mutex_unlock(&e->mu);
}

int pyhv_eng_page_state(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page)
{
	if (page >= p->pages)
		return -EINVAL;
	pthread_mutex_lock(&e->mu);
	int st = p->state[page];
	pthread_mutex_unlock(&e->mu);
	return st;
}

/* The slot holding the page's device copy, or -1. */
int64_t pyhv_eng_slot_of(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page)
{
	if (page >= p->pages)
		return -1;
	pthread_mutex_lock(&e->mu);
	int64_t s = (int64_t)p->slot[page] - 1;
	pthread_mutex_unlock(&e->mu);
	return s;
}

void pyhv_eng_slot_set(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t slot, int state)
{
	pthread_mutex_lock(&e->mu);
	if (slot < p->slots)
		p->slot_map[slot] = (uint8_t)state;
	pthread_mutex_unlock(&e->mu);
}

uint64_t pyhv_eng_slot_count(struct pyhv_eng *e, struct pyhv_eng_part *p, int state)
{
	uint64_t n = 0;
	pthread_mutex_lock(&e->mu);
	for (uint64_t i = 0; i < p->slots; i++)
		n += p->slot_map[i] == state;
	pthread_mutex_unlock(&e->mu);
	return n;
}

/* --- streams and fast channels --------------------------------------------------------- */

struct pyhv_eng_chan *pyhv_eng_chan_add(struct pyhv_eng *e, int sock, uint64_t id, int *err)
{
	struct pyhv_eng_chan *ch = calloc(1, sizeof(*ch));
	*err = ENOMEM;
	if (!ch)
		return NULL;
	ch->kind = SRC_CHAN;
	ch->sock = sock;
	ch->id = id;
	pthread_mutex_lock(&e->mu);
	struct epoll_event ev = {EPOLLIN, {.ptr = ch}};
	if (epoll_ctl(e->ep, EPOLL_CTL_ADD, sock, &ev) < 0) {
		*err = errno;
		pthread_mutex_unlock(&e->mu);
		free(ch);
		return NULL;
	}
	ch->next = e->chans;
	e->chans = ch;
	*err = 0;
	pthread_mutex_unlock(&e->mu);
	return ch;
}

/* The READs of partition p in flight on ch go back to the front of its
 * queue, in their order, to be sent again where the stream goes next. */
static void take_back(struct pyhv_eng *e, struct pyhv_eng_part *p, struct pyhv_eng_chan *ch)
{
	for (struct rreq *r = ch->tail, *prev; r; r = prev) {
		prev = r->prev;
		if (r->part != p)
			continue;
		unlink_inflight(r);
		requeue(p, r);
		e->g.reads_taken_back++;
	}
}

/* [[device]] io_timeout: page-ins of the partition that have waited for a
 * path (queued, not on any service) longer than max_age_ns end.  A page a
 * fault waits on becomes a READ_FAILED event (ETIMEDOUT), which Python turns
 * into a machine check; a page read ahead, which nobody waits on, only goes
 * back to rest (on the device, its frame to the pool): it is not lost, a
 * later fault reads it.  Returns how many pages failed. */
int64_t pyhv_eng_expire_reads(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t max_age_ns)
{
	pthread_mutex_lock(&e->mu);
	uint64_t now = now_ns();
	int64_t pages = 0;
	uint64_t rested = 0;
	struct rreq **at = &p->qhead, *last = NULL;
	while (*at) {
		struct rreq *r = *at;
		if (now - r->born_ns <= max_age_ns) {
			last = r;
			at = &r->next;
			continue;
		}
		*at = r->next;
		p->queued--;
		for (uint32_t k = 0; k < r->n; k++) {
			uint64_t page = r->first + k;
			struct pending *x = pending_find(e, p, page);
			if (x && x->head) {
				p->c->read_errors++;
				post(e, PYHV_EV_READ_FAILED, ETIMEDOUT, p, page, 0);
				pages++;
			} else {
				/* (a READ failed by a lost path may have left part of
				 * it in memory: nothing of it stays) */
				fallocate(p->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					  (off_t)(page * PG), PG);
				pending_free(e, pending_take(e, p, page));
				p->state[page] = at_rest(p, page);
				rested++;
			}
		}
		e->g.reads_expired++;
		free(r);
	}
	p->qtail = last;
	/* only now, with the queue whole again: a fault waiting for a frame
	 * may be given one here and queue a READ of its own */
	release_frames(e, rested);
	pthread_mutex_unlock(&e->mu);
	return pages;
}

/* The service behind ch failed or stopped: no more READs on it, and every
 * stream on it takes its READs back (it is then unbound and stopped).
 * Python closes the socket afterwards.  Returns the READs taken back. */
uint64_t pyhv_eng_chan_remove(struct pyhv_eng *e, struct pyhv_eng_chan *ch)
{
	pthread_mutex_lock(&e->mu);
	uint64_t before = e->g.reads_taken_back;
	if (!ch->dead) {
		ch->dead = 1;
		epoll_ctl(e->ep, EPOLL_CTL_DEL, ch->sock, NULL);
	}
	for (struct pyhv_eng_part *p = e->parts; p; p = p->next)
		if (p->chan == ch) {
			take_back(e, p, ch);
			p->chan = NULL;
			p->flowing = 0;
		}
	uint64_t n = e->g.reads_taken_back - before;
	pthread_mutex_unlock(&e->mu);
	return n;
}

/* Where the partition's READs go (ch NULL: nowhere, they queue) and whether
 * they may go now (the stream flows). */
void pyhv_eng_stream_bind(struct pyhv_eng *e, struct pyhv_eng_part *p, struct pyhv_eng_chan *ch,
			  int flowing)
{
	pthread_mutex_lock(&e->mu);
	if (p->chan && p->chan != ch)
		take_back(e, p, p->chan);
	p->chan = ch;
	p->flowing = ch && !ch->dead && flowing;
	pump(e, p);
	pthread_mutex_unlock(&e->mu);
}

/* READs of the partition in flight or queued. */
uint64_t pyhv_eng_stream_busy(struct pyhv_eng *e, struct pyhv_eng_part *p)
{
	pthread_mutex_lock(&e->mu);
	uint64_t n = p->reads_inflight + p->queued;
	pthread_mutex_unlock(&e->mu);
	return n;
}

/* Age in ns of the oldest READ unanswered on ch (0: none). */
uint64_t pyhv_eng_chan_oldest_ns(struct pyhv_eng *e, struct pyhv_eng_chan *ch)
{
	pthread_mutex_lock(&e->mu);
	uint64_t age = ch->head ? now_ns() - ch->head->sent_ns : 0;
	pthread_mutex_unlock(&e->mu);
	return age;
}

/* --- eviction and write-back ------------------------------------------------------------ */

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

/* Look at a page for reference tracking: its next write will be seen.  A
 * clean page is write-protected already; a dirty one is collected, and
 * arm_pages write-protects them all. */
static void arm_page(struct pyhv_eng_part *p, struct ring *arm, uint32_t page)
{
	int was_armed = p->age[page] & REF_ARMED;
	p->age[page] = (p->age[page] & ~REF_MASK) | REF_TESTED | REF_ARMED;
	if (p->state[page] == DIRTY && !was_armed)
		ring_push(arm, page); /* (no memory: it just is not seen) */
}

static void arm_pages(struct pyhv_eng *e, struct pyhv_eng_part *p, struct ring *arm)
{
	if (arm->count) {
		uint32_t *v = arm->v; /* (pushed into a fresh ring: head 0, in order) */
		qsort(v, arm->count, sizeof(*v), cmp_u32);
		for (int i = 0; i < p->nworkers;) {
			struct eng_worker *w = p->workers[i];
			for (uint64_t a = 0; a < arm->count && w->alive;) {
				uint64_t b = a + 1;
				while (b < arm->count && v[b] == v[b - 1] + 1)
					b++;
				op_wp(e, w, v[a], b - a, 1, 0);
				a = b;
			}
			if (w->alive)
				i++;
		}
		p->c->armed += arm->count;
	}
	ring_free(arm);
}

/* Up to n victims of the partition (2Q: the oldest inactive page; the
 * oldest active pages go back to the inactive queue, for a second round,
 * whenever they are more than 3/4 of what is resident), write-protected in
 * every worker (one ioctl a run of neighbours); clean ones are dropped (their
 * frames are free at once), dirty ones become PAGING_OUT and are returned in
 * dirty_out (room for n) for Python to write back.  With allow_dirty 0 a
 * dirty victim stays (at the back of the inactive queue).  Returns the
 * number of dirty pages; *clean_out the number dropped. */
int pyhv_eng_evict(struct pyhv_eng *e, struct pyhv_eng_part *p, uint32_t n, int allow_dirty,
		   uint32_t *dirty_out, uint32_t *clean_out)
{
	/* allow_dirty == 2: every page goes as it comes, whatever its
	 * references (a partition being suspended) */
	int force = allow_dirty == 2;
	*clean_out = 0;
	uint32_t *chosen = malloc((size_t)(n ? n : 1) * sizeof(*chosen));
	if (!chosen)
		return -ENOMEM;
	pthread_mutex_lock(&e->mu);
	uint32_t k = 0;
	uint64_t queued = p->inactive.count + p->active.count;
	uint64_t looks = 3 * queued + n; /* a page is looked at up to three times */
	/* Pages armed for the first time in one call: twice the victims wanted.
	 * Past that, the pages at the head go as they come: a sweep of the whole
	 * queue would arm pages not used yet at all (filled ahead of a
	 * sequential run), whose first use would then look like a reuse. */
	uint64_t first_looks = 2 * (uint64_t)n;
	struct ring arm = {0}; /* dirty pages to write-protect for reference tracking */
	if (force) {
		while (p->active.count)
			if (ring_push(&p->inactive, ring_pop(&p->active)))
				break; /* (no memory: the rest goes next call) */
		first_looks = 0;
	}
	while (k < n && looks) {
		/* active pages go back to the inactive queue when more than 3/4 of
		 * what is resident, but for those written since last looked at */
		while (looks && p->active.count &&
		       (p->active.count > p->resident * 3 / 4 || !p->inactive.count)) {
			looks--;
			uint32_t q = ring_pop(&p->active);
			if ((p->age[q] & REF_SEEN) || (!(p->age[q] & REF_TESTED) && first_looks)) {
				if (!(p->age[q] & REF_TESTED))
					first_looks--;
				arm_page(p, &arm, q);
				ring_push(&p->active, q);
				continue;
			}
			ring_push(&p->inactive, q); /* demoted: a second round (it is armed) */
			break;
		}
		if (!p->inactive.count || !looks)
			break;
		looks--;
		uint32_t page = ring_pop(&p->inactive);
		uint8_t st = p->state[page];
		if (st != CLEAN && st != DIRTY)
			continue; /* (cannot be: a resident page is in one queue) */
		if (!(p->age[page] & REF_TESTED) && first_looks) { /* armed, one more round */
			first_looks--;
			arm_page(p, &arm, page);
			ring_push(&p->inactive, page);
			continue;
		}
		if ((p->age[page] & REF_SEEN) && !force) { /* written since: in use, to the active queue */
			arm_page(p, &arm, page);
			ring_push(&p->active, page);
			p->c->promoted++;
			continue;
		}
		if (st == DIRTY && !allow_dirty) {
			ring_push(&p->inactive, page);
			continue;
		}
		p->resident--;
		chosen[k++] = page;
	}
	arm_pages(e, p, &arm);
	qsort(chosen, k, sizeof(*chosen), cmp_u32);
	int again = 0;
	for (int i = 0; i < p->nworkers && !again;) {
		struct eng_worker *w = p->workers[i];
		for (uint32_t a = 0; a < k && w->alive && !again;) {
			uint32_t b = a + 1;
			while (b < k && chosen[b] == chosen[b - 1] + 1)
				b++;
			again = op_wp(e, w, chosen[a], b - a, 1, 0) == IO_AGAIN;
			a = b;
		}
		if (w->alive)
			i++;
	}
	if (again) {
		/* A worker forks (or removes memory): until the engine has read
		 * that event its pages cannot be write-protected, and a page-out
		 * behind a writable mapping (the child's copy of it included)
		 * would lose writes.  None goes now; Python asks again. */
		for (uint32_t i = 0; i < k; i++) {
			p->resident++;
			if (ring_push(&p->inactive, chosen[i]))
				e->g.enomem++;
		}
		e->g.evict_again++; /* (Python's next look at the pool, within 0.1 s) */
		k = 0;
	}
	uint64_t span = e->pool_pages / EPOCHS ? e->pool_pages / EPOCHS : 1;
	e->epoch = (e->epoch + (e->evictions + k) / span - e->evictions / span) % STAMPS;
	e->evictions += k;
	uint8_t stamp = (uint8_t)((1 + e->epoch) << STAMP_SHIFT);
	uint32_t nd = 0, nc = 0;
	for (uint32_t i = 0; i < k; i++) {
		uint32_t page = chosen[i];
		p->age[page] = stamp; /* (its REF_* bits mean nothing off the queues) */
		if (p->state[page] == CLEAN) {
			p->state[page] = at_rest(p, page);
			chosen[nc++] = page; /* (in place: nc <= i) */
		} else {
			p->state[page] = PAGING_OUT;
			if (!pending_new(e, p, page))
				e->g.enomem++; /* faults on it wake and fault again */
			dirty_out[nd++] = page;
		}
	}
	for (uint32_t a = 0; a < nc;) {
		uint32_t b = a + 1;
		while (b < nc && chosen[b] == chosen[b - 1] + 1)
			b++;
		fallocate(p->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			  (off_t)chosen[a] * PG, (off_t)(b - a) * PG);
		a = b;
	}
	if (nc) {
		note_written(p, 0, nc);
		p->c->clean_drops += nc;
		release_frames(e, nc);
	}
	pthread_mutex_unlock(&e->mu);
	free(chosen);
	*clean_out = nc;
	return (int)nd;
}

/* --- loans and advice ---------------------------------------------------------------- */

/* Only resident pages are in the victim queues: after pages left them other
 * than through eviction, the queues are swept. */
static void queues_sweep(struct pyhv_eng_part *p)
{
	struct ring *rings[2] = {&p->inactive, &p->active};
	for (int r = 0; r < 2; r++)
		for (uint64_t i = 0, n = rings[r]->count; i < n; i++) {
			uint32_t q = ring_pop(rings[r]);
			if (p->state[q] == CLEAN || p->state[q] == DIRTY)
				ring_push(rings[r], q); /* (no growth: never fails) */
		}
}

/* A page given back: its frame and its slot are free, it reads as zeros. */
static int loan(struct pyhv_eng_part *p, uint64_t page, uint64_t *out)
{
	uint8_t st = p->state[page];
	if (st == FILLING || st == PAGING_OUT || st == POISONED)
		return 0;
	if (st == DIRTY || st == CLEAN) {
		p->resident--;
		out[0]++;
	}
	if (p->slot[page])
		out[1]++;
	release_slot(p, page);
	p->age[page] = 0; /* (no refault when it is touched again) */
	p->state[page] = LOANED;
	return 1;
}

/* The partition gives pages [first, first+n) back (pyhv.discard): their
 * frames return to the pool and their slots to the device at once; they
 * read as zeros from now on.  Pages in flight (being read or written) are
 * left as they are: out[2] counts them, and Python asks again for them in
 * a moment; poisoned pages stay poisoned.  out[0]: frames freed, out[1]:
 * slots freed. */
int pyhv_eng_discard(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t first, uint64_t n,
		     uint64_t *out)
{
	out[0] = out[1] = out[2] = 0;
	if (first > p->pages || n > p->pages - first)
		return -EINVAL;
	pthread_mutex_lock(&e->mu);
	uint64_t run = first, k = 0;
	for (uint64_t page = first; page <= first + n; page++) {
		int done = page < first + n;
		if (done) {
			uint8_t st = p->state[page];
			done = loan(p, page, out);
			out[2] += st == FILLING || st == PAGING_OUT;
		}
		if (done) {
			if (!k)
				run = page;
			k++;
			continue;
		}
		if (k) /* the memory of a run given back: every mapping of it zapped */
			fallocate(p->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				  (off_t)(run * PG), (off_t)(k * PG));
		k = 0;
	}
	p->c->loaned += out[0];
	if (out[0]) {
		queues_sweep(p);
		release_frames(e, out[0]);
	}
	pthread_mutex_unlock(&e->mu);
	return 0;
}

/* A partition restored from a snapshot: every page is there, with its
 * CRC32 (a page read from it that does not match is a machine check). */
void pyhv_eng_part_snapshot(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint32_t *crc)
{
	pthread_mutex_lock(&e->mu);
	for (uint64_t i = 0; i < p->pages; i++)
		if (p->state[i] == UNTOUCHED && !p->slot[i]) {
			p->state[i] = SNAPSHOT;
			p->crc[i] = crc[i];
		}
	pthread_mutex_unlock(&e->mu);
}

/* A partition imported from another system (pyhv partition import): each
 * page ON_DEVICE in its slot (slot >= 0), in the snapshot it was restored
 * from (state SNAPSHOT), or never written.  A fresh partition only; nothing
 * changes (-EINVAL) if a slot is outside the device or given twice. */
int pyhv_eng_part_import(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint8_t *state,
			 const int64_t *slot, const uint32_t *crc, uint64_t n)
{
	if (n != p->pages)
		return -EINVAL;
	pthread_mutex_lock(&e->mu);
	int r = 0;
	for (uint64_t i = 0; i < p->pages && !r; i++) {
		if (slot[i] < 0)
			continue;
		if ((uint64_t)slot[i] >= p->slots || p->slot_map[slot[i]] != SLOT_FREE)
			r = -EINVAL;
		else
			p->slot_map[slot[i]] = SLOT_USED; /* (undone below on failure) */
	}
	for (uint64_t i = 0; i < p->pages; i++) {
		if (slot[i] < 0 || (uint64_t)slot[i] >= p->slots)
			continue;
		if (r) {
			p->slot_map[slot[i]] = SLOT_FREE;
			continue;
		}
		p->slot[i] = (uint32_t)slot[i] + 1;
		p->crc[i] = crc[i];
		p->state[i] = ON_DEVICE;
	}
	for (uint64_t i = 0; i < p->pages && !r; i++) {
		if (slot[i] >= 0)
			continue;
		/* in the snapshot (if it was restored from one), lost, given back,
		 * or never written; nothing else is at rest without a slot */
		uint8_t st = state[i];
		p->state[i] = st == SNAPSHOT || st == POISONED || st == LOANED ? st : UNTOUCHED;
		p->crc[i] = crc[i];
	}
	pthread_mutex_unlock(&e->mu);
	return r;
}

/* A copy of the page table: each page's state, slot (-1: none) and CRC32. */
void pyhv_eng_table(struct pyhv_eng *e, struct pyhv_eng_part *p, uint8_t *state, int64_t *slot,
		    uint32_t *crc)
{
	pthread_mutex_lock(&e->mu);
	memcpy(state, p->state, p->pages);
	memcpy(crc, p->crc, 4 * p->pages);
	for (uint64_t i = 0; i < p->pages; i++)
		slot[i] = (int64_t)p->slot[i] - 1;
	pthread_mutex_unlock(&e->mu);
}

/* The resident pages in the order they would be evicted (the least
 * recently installed or used first), up to max; returns how many. */
uint32_t pyhv_eng_resident(struct pyhv_eng *e, struct pyhv_eng_part *p, uint32_t *out, uint32_t max)
{
	pthread_mutex_lock(&e->mu);
	uint32_t k = 0;
	struct ring *rings[2] = {&p->inactive, &p->active};
	for (int r = 0; r < 2; r++)
		for (uint64_t i = 0; i < rings[r]->count && k < max; i++) {
			uint32_t q = rings[r]->v[(rings[r]->head + i) % rings[r]->cap];
			if (p->state[q] == CLEAN || p->state[q] == DIRTY)
				out[k++] = q;
		}
	pthread_mutex_unlock(&e->mu);
	return k;
}

/* Read ahead the listed pages that are on the device (a suspended
 * partition's working set, in device order): one READ a run of neighbours
 * in both page and slot, with free frames only (never ahead of a waiting
 * fault).  Returns how many of the list it went through (n: all), or
 * -EAGAIN when the stream does not flow. */
int64_t pyhv_eng_prefetch_pages(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint32_t *pages,
				uint32_t n)
{
	pthread_mutex_lock(&e->mu);
	if (!p->chan || !p->flowing) {
		pthread_mutex_unlock(&e->mu);
		return -EAGAIN;
	}
	struct gather g = {0, 0};
	uint32_t i;
	for (i = 0; i < n; i++) {
		uint32_t page = pages[i];
		if (page >= p->pages || !at_rest_state(p->state[page]))
			continue;
		if (gather_add(e, p, &g, page))
			break;
		p->c->advised++;
	}
	gather_send(e, p, &g);
	pthread_mutex_unlock(&e->mu);
	return i;
}

/* Advice (pyhv.prefetch): read pages [first, first+n) that are on the
 * device, one READ a run of neighbouring slots, with free frames only
 * (never ahead of a waiting fault).  Returns how many READs of pages it
 * started; *next_out is where it stopped (first + n: all of it), -EAGAIN
 * if the stream does not flow now. */
int64_t pyhv_eng_prefetch(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t first, uint64_t n,
			  uint64_t *next_out)
{
	*next_out = first;
	if (first > p->pages || n > p->pages - first)
		return -EINVAL;
	pthread_mutex_lock(&e->mu);
	if (!p->chan || !p->flowing) {
		pthread_mutex_unlock(&e->mu);
		return -EAGAIN;
	}
	int64_t started = 0;
	struct gather g = {0, 0};
	uint64_t page;
	for (page = first; page < first + n; page++) {
		if (!at_rest_state(p->state[page]))
			continue; /* (the READ gathered so far goes at the next page, or the end) */
		if (gather_add(e, p, &g, page))
			break;
		p->c->advised++;
		started++;
	}
	gather_send(e, p, &g);
	*next_out = page;
	pthread_mutex_unlock(&e->mu);
	return started;
}

/* New slots for the next of `pages` (PAGING_OUT, n of them) to be written:
 * every page's old slot is freed, then up to n free neighbouring slots are
 * taken, looking on from where the last run ended (the device fills like a
 * log and runs stay long), and given to pages[0..count-1].  Returns count
 * (0: no free slot); *first_out the first slot. */
int pyhv_eng_write_slots(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint32_t *pages,
			 uint32_t n, uint32_t *first_out)
{
	pthread_mutex_lock(&e->mu);
	for (uint32_t i = 0; i < n; i++)
		release_slot(p, pages[i]);
	uint8_t *map = p->slot_map;
	uint64_t first = p->slot_cursor;
	while (first < p->slots && map[first] != SLOT_FREE)
		first++;
	if (first >= p->slots)
		for (first = 0; first < p->slots && map[first] != SLOT_FREE; first++)
			;
	uint32_t count = 0;
	if (first < p->slots) {
		while (count < n && first + count < p->slots && map[first + count] == SLOT_FREE) {
			map[first + count] = SLOT_USED;
			p->slot[pages[count]] = (uint32_t)(first + count + 1);
			count++;
		}
		p->slot_cursor = first + count;
		*first_out = (uint32_t)first;
	}
	pthread_mutex_unlock(&e->mu);
	return (int)count;
}

static void wake_pending(struct pyhv_eng *e, struct pending *x)
{
	if (!x)
		return;
	for (struct waiter *q = x->head; q; q = q->next)
		if (q->w->alive)
			op_wake(e, q->w, x->page, 1);
	pending_free(e, x);
}

/* Python's WRITE of these pages is done: they are on the device (and gone
 * from memory); whoever waited faults again and pages them in. */
void pyhv_eng_written(struct pyhv_eng *e, struct pyhv_eng_part *p, const uint32_t *pages,
		      const uint32_t *crcs, uint32_t n)
{
	pthread_mutex_lock(&e->mu);
	for (uint32_t i = 0; i < n; i++) {
		uint32_t page = pages[i];
		p->crc[page] = crcs[i];
		p->state[page] = ON_DEVICE;
		wake_pending(e, pending_take(e, p, page));
	}
	p->c->page_outs += n;
	release_frames(e, n);
	pthread_mutex_unlock(&e->mu);
}

/* A page's WRITE failed: it stays resident (dirty, at the back of the
 * inactive queue) and whoever waited goes on.  Its slot is marked bad
 * (bad 1) or given back (bad 0: the device was full).  Returns the slot,
 * or -1. */
int64_t pyhv_eng_write_failed(struct pyhv_eng *e, struct pyhv_eng_part *p, uint32_t page, int bad)
{
	pthread_mutex_lock(&e->mu);
	int64_t slot = (int64_t)p->slot[page] - 1;
	if (slot >= 0) {
		p->slot[page] = 0;
		if (bad)
			p->slot_map[slot] = SLOT_BAD;
		else if (p->slot_map[slot] == SLOT_USED)
			p->slot_map[slot] = SLOT_FREE;
	}
	p->state[page] = DIRTY;
	p->resident++;
	p->age[page] &= ~REF_MASK;
	if (ring_push(&p->inactive, page))
		e->g.enomem++;
	wake_pending(e, pending_take(e, p, page));
	pthread_mutex_unlock(&e->mu);
	return slot;
}

/* A machine check: the page (FILLING after a failed READ, or PAGING_OUT
 * when a retried WRITE cannot be confirmed) cannot be delivered.  Every
 * worker attached now gets it poisoned (its access raises SIGBUS; the
 * faults waiting on it are woken into it), then the page starts again as a
 * zero page and its frame returns to the pool.  The ids of the workers that
 * waited on it go to touched (room for max), their count to *ntouched.
 * Returns the slot it had (for DISCARD), or -1. */
int64_t pyhv_eng_poison(struct pyhv_eng *e, struct pyhv_eng_part *p, uint64_t page,
			uint64_t *touched, int max, int *ntouched)
{
	*ntouched = 0;
	if (page >= p->pages)
		return -1;
	pthread_mutex_lock(&e->mu);
	for (int i = 0; i < p->nworkers;) {
		struct eng_worker *w = p->workers[i];
		/* no WP marker in the way of the poison */
		int r = op_wp(e, w, page, 1, 0, 0);
		if (r != IO_GONE)
			r = op_poison(e, w, page);
		if (r == IO_AGAIN) { /* a worker forks: all again later (poisoned twice: EEXIST) */
			pthread_mutex_unlock(&e->mu);
			return -2;
		}
		if (w->alive)
			i++;
	}
	struct pending *x = pending_take(e, p, page);
	for (struct waiter *q = x ? x->head : NULL; q; q = q->next) {
		int seen = 0;
		for (int i = 0; i < *ntouched; i++)
			seen |= touched[i] == q->w->id;
		if (q->w->alive && !seen && *ntouched < max)
			touched[(*ntouched)++] = q->w->id;
	}
	pending_free(e, x);
	p->state[page] = POISONED;
	int64_t slot = (int64_t)p->slot[page] - 1;
	release_slot(p, page);
	release_frames(e, 1);
	pthread_mutex_unlock(&e->mu);
	return slot;
}
