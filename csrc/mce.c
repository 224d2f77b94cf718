/*
 * The machine-check handler of a worker: a SIGBUS handler, installed once per
 * process by pyhv.attach(), that runs on the thread whose access hit a
 * poisoned partition page.
 *
 * Contract: the hypervisor could not deliver a page (I/O error, checksum) and
 * poisoned it (UFFDIO_POISON) after writing an error record into the
 * partition's error log, which every worker maps read-only.  The handler
 * finds the partition and page from si_addr, fetches the record, reports it
 * on stderr and to the hypervisor (one message on the worker's control
 * connection), and ends this process with SIGBUS (exit status 128+7).  The
 * partition's isolation policy is the hypervisor's to apply to the other
 * workers.  A SIGBUS that is not at a partition page (or was sent by a
 * process) keeps its usual meaning: the previous disposition is restored and
 * the signal delivered again.
 *
 * State: a signal handler gets no user pointer, so the attached ranges are
 * this file's one static table.  A slot is filled before it is published
 * (its len written last) and is read only by the handler.  Everything the
 * handler calls is async-signal-safe (write, send, sigaction, sigprocmask,
 * raise, getpid).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pyhv.h"

#define MAX_RANGES 16
#define PAGE 4096UL

struct range {
	uint64_t start;
	volatile uint64_t len; /* 0: free slot */
	int sockfd;
	int isolation_partition;
	const struct pyhv_mce_log *log;
	char partition[64];
};

static struct range ranges[MAX_RANGES];
static struct sigaction previous;
static volatile sig_atomic_t installed;

struct line {
	char buf[512];
	size_t n;
};

static void put(struct line *l, const char *s)
{
	while (*s && l->n < sizeof(l->buf) - 1)
		l->buf[l->n++] = *s++;
}

static void put_u64(struct line *l, uint64_t v)
{
	char tmp[24];
	int i = 0;
	do {
		tmp[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i && l->n < sizeof(l->buf) - 1)
		l->buf[l->n++] = tmp[--i];
}

/* The newest record for page, or NULL. */
static const struct pyhv_mce_record *find(const struct pyhv_mce_log *log, uint64_t page)
{
	const struct pyhv_mce_record *best = NULL;
	for (int i = 0; i < PYHV_MCE_RECORDS; i++) {
		const struct pyhv_mce_record *r = &log->rec[i];
		if (r->seq && r->page == page && (!best || r->seq > best->seq))
			best = r;
	}
	return best;
}

static void die_of(int sig, int reraise)
{
	struct sigaction dfl;
	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigaction(sig, &dfl, NULL);
	if (reraise) {
		sigset_t set;
		sigemptyset(&set);
		sigaddset(&set, sig);
		sigprocmask(SIG_UNBLOCK, &set, NULL);
		raise(sig);
	}
}

static void on_sigbus(int sig, siginfo_t *si, void *ctx)
{
	uint64_t addr = (uint64_t)si->si_addr;
	struct range *r = NULL;
	if (si->si_code > 0) { /* raised by the kernel for an access, not sent */
		for (int i = 0; i < MAX_RANGES; i++) {
			uint64_t len = ranges[i].len;
			if (len && addr >= ranges[i].start && addr < ranges[i].start + len) {
				r = &ranges[i];
				break;
			}
		}
	}
	if (!r) { /* not a paging error: its usual meaning */
		sigaction(SIGBUS, &previous, NULL);
		if (si->si_code <= 0 || previous.sa_handler == SIG_IGN)
			die_of(sig, 1);
		return; /* the access runs again, under the previous disposition */
	}
	uint64_t page = (addr - r->start) / PAGE;
	const struct pyhv_mce_record *rec = r->log ? find(r->log, page) : NULL;
	char error[17] = "unknown", device[49] = "unknown";
	if (rec) {
		memcpy(error, rec->error, 16);
		error[16] = 0;
		memcpy(device, rec->device, 48);
		device[48] = 0;
	}
	uint64_t pid = (uint64_t)getpid();

	struct line l = { .n = 0 };
	put(&l, "pyhv: machine check: partition ");
	put(&l, r->partition);
	put(&l, " page ");
	put_u64(&l, page);
	put(&l, " could not be paged in (");
	put(&l, error);
	put(&l, " on device ");
	put(&l, device);
	put(&l, "); stopping worker ");
	put_u64(&l, pid);
	put(&l, r->isolation_partition ? " and its partition's other workers\n" : "\n");
	ssize_t ignored = write(2, l.buf, l.n);
	(void)ignored;

	struct line m = { .n = 0 };
	put(&m, "{\"op\":\"mce\",\"page\":");
	put_u64(&m, page);
	put(&m, ",\"pid\":");
	put_u64(&m, pid);
	put(&m, ",\"seq\":");
	put_u64(&m, rec ? rec->seq : 0);
	put(&m, "}");
	send(r->sockfd, m.buf, m.n, MSG_DONTWAIT | MSG_NOSIGNAL);

	die_of(sig, 1);
	(void)ctx;
}

/* Install the handler for this process (once).  Returns 0 or -errno. */
int pyhv_mce_install(void)
{
	if (installed)
		return 0;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGBUS, &sa, &previous) < 0)
		return -errno;
	installed = 1;
	return 0;
}

/* Watch [start, start+len) as a partition's memory.  Returns the slot or
 * -ENOSPC when MAX_RANGES partitions are attached already. */
int pyhv_mce_add(uint64_t start, uint64_t len, int sockfd, const struct pyhv_mce_log *log,
		 const char *partition, int isolation_partition)
{
	for (int i = 0; i < MAX_RANGES; i++) {
		if (ranges[i].len)
			continue;
		ranges[i].start = start;
		ranges[i].sockfd = sockfd;
		ranges[i].log = log;
		ranges[i].isolation_partition = isolation_partition;
		strncpy(ranges[i].partition, partition, sizeof(ranges[i].partition) - 1);
		ranges[i].partition[sizeof(ranges[i].partition) - 1] = 0;
		__atomic_store_n(&ranges[i].len, len, __ATOMIC_RELEASE);
		return i;
	}
	return -ENOSPC;
}

/* Stop watching the range that starts at start.  Returns 0 or -ENOENT. */
int pyhv_mce_remove(uint64_t start)
{
	for (int i = 0; i < MAX_RANGES; i++) {
		if (ranges[i].len && ranges[i].start == start) {
			__atomic_store_n(&ranges[i].len, 0, __ATOMIC_RELEASE);
			return 0;
		}
	}
	return -ENOENT;
}
