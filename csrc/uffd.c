/*
 * Thin wrappers over the userfaultfd ioctls, memfd and hole punching.
 *
 * Runs on whatever thread calls it (the hypervisor's loop, a worker during
 * attach, a test).  Each call is one system call or a short loop of them;
 * results are read from the kernel's structs, errors come back as -errno.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <string.h>

#include "uffd_compat.h"
#include "pyhv.h"

#define NEG_ERRNO() (-(errno ? errno : EIO))

/* A new userfaultfd: the system call first, then /dev/userfaultfd (which
 * works where vm.unprivileged_userfaultfd forbids the call).  flags are
 * O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY.  Returns the fd or -errno. */
int pyhv_uffd_open(int flags)
{
	int fd = (int)syscall(SYS_userfaultfd, flags);
	if (fd >= 0)
		return fd;
	int err = errno;
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return -err;
	fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
	err = errno;
	close(dev);
	return fd >= 0 ? fd : -err;
}

/* fd mapped shared, read-write, at exactly addr, where nothing is mapped
 * now (in the child of a worker whose mapping was not inherited:
 * MADV_DONTFORK).  0, or -errno (-EEXIST: something is there). */
int pyhv_map_fixed(int fd, uint64_t addr, uint64_t len)
{
	void *at = (void *)(uintptr_t)addr;
	void *got = mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0);
	if (got == MAP_FAILED)
		return NEG_ERRNO();
	if (got != at) { /* (a kernel that takes the flag for a hint) */
		munmap(got, len);
		return -EEXIST;
	}
	return 0;
}

/* UFFDIO_API handshake asking for `features`; the kernel's answer (all it
 * supports) goes to *features_out and *ioctls_out.  -EINVAL when a requested
 * feature is missing: probe with features = 0 first on a throwaway fd. */
int pyhv_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return NEG_ERRNO();
	*features_out = api.features;
	*ioctls_out = api.ioctls;
	return 0;
}

int pyhv_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
	struct uffdio_register reg = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return NEG_ERRNO();
	*ioctls_out = reg.ioctls;
	return 0;
}

int pyhv_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { start, len };
	return ioctl(fd, UFFDIO_UNREGISTER, &r) < 0 ? NEG_ERRNO() : 0;
}

/* The mfill ioctls report partial progress in the struct: on error the
 * result field holds -errno, or the bytes done before it stopped. */
int64_t pyhv_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
	struct uffdio_copy c = { .dst = dst, .src = src, .len = len, .mode = mode };
	if (ioctl(fd, UFFDIO_COPY, &c) < 0)
		return c.copy < 0 ? c.copy : NEG_ERRNO();
	return c.copy;
}

int64_t pyhv_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_zeropage z = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_ZEROPAGE, &z) < 0)
		return z.zeropage < 0 ? z.zeropage : NEG_ERRNO();
	return z.zeropage;
}

int pyhv_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { start, len };
	return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? NEG_ERRNO() : 0;
}

int pyhv_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_writeprotect w = { .range = { start, len }, .mode = mode };
	return ioctl(fd, UFFDIO_WRITEPROTECT, &w) < 0 ? NEG_ERRNO() : 0;
}

int64_t pyhv_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_continue c = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_CONTINUE, &c) < 0)
		return c.mapped < 0 ? c.mapped : NEG_ERRNO();
	return c.mapped;
}

int64_t pyhv_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_poison p = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_POISON, &p) < 0)
		return p.updated < 0 ? p.updated : NEG_ERRNO();
	return p.updated;
}

/* Drain up to `max` messages from a non-blocking uffd in as few read()s as
 * the kernel allows.  Returns the count (0: nothing pending) or -errno. */
int pyhv_uffd_read(int fd, struct pyhv_fault *out, int max)
{
	struct uffd_msg msgs[64];
	int n = 0;
	while (n < max) {
		int want = max - n < 64 ? max - n : 64;
		ssize_t got = read(fd, msgs, sizeof(msgs[0]) * (size_t)want);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || n > 0)
				break;
			return NEG_ERRNO();
		}
		int k = (int)(got / (ssize_t)sizeof(msgs[0]));
		for (int i = 0; i < k; i++, n++) {
			struct uffd_msg *m = &msgs[i];
			struct pyhv_fault *f = &out[n];
			memset(f, 0, sizeof(*f));
			f->event = m->event;
			switch (m->event) {
			case UFFD_EVENT_PAGEFAULT:
				f->a = m->arg.pagefault.address;
				f->b = m->arg.pagefault.flags;
				f->tid = m->arg.pagefault.feat.ptid;
				break;
			case UFFD_EVENT_FORK:
				f->a = m->arg.fork.ufd;
				break;
			case UFFD_EVENT_REMAP:
				f->a = m->arg.remap.from;
				f->b = m->arg.remap.to;
				break;
			case UFFD_EVENT_REMOVE:
			case UFFD_EVENT_UNMAP:
				f->a = m->arg.remove.start;
				f->b = m->arg.remove.end;
				break;
			}
		}
		if (k < want)
			break;
	}
	return n;
}

/* A memfd of `size` bytes that nobody can shrink or grow: workers (users
 * that own a partition among them) get it, and a truncated memfd would
 * fault the paging services' writes and pin the pool's frames. */
int pyhv_memfd_new(const char *name, uint64_t size)
{
	int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return NEG_ERRNO();
	if (ftruncate(fd, (off_t)size) < 0 ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
		int err = errno;
		close(fd);
		return -err;
	}
	return fd;
}

/* Drop the pages in [offset, offset+len) of a shmem or regular file: the
 * page cache pages go and every mapping of them is zapped. */
int pyhv_punch_hole(int fd, uint64_t offset, uint64_t len)
{
	if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len) < 0)
		return NEG_ERRNO();
	return 0;
}

/* Size in bytes of a block device (BLKGETSIZE64). */
int64_t pyhv_blkdev_size(int fd)
{
	uint64_t size = 0;
	if (ioctl(fd, BLKGETSIZE64, &size) < 0)
		return NEG_ERRNO();
	return (int64_t)size;
}

/* Which pages of [start, start+len) are in memory: one byte a page in vec,
 * bit 0 set where resident.  On a shared file mapping this is the page
 * cache, whatever the calling process has mapped.  Returns 0 or -errno. */
int pyhv_mincore(uint64_t start, uint64_t len, unsigned char *vec)
{
	return mincore((void *)start, len, vec) < 0 ? NEG_ERRNO() : 0;
}

/* The filesystem type (statfs f_type, a *_SUPER_MAGIC) of the file open on
 * fd, so that a paging device on a pseudo filesystem (proc, sysfs) is
 * refused.  Returns the magic (>= 0) or -errno. */
int64_t pyhv_fs_magic(int fd)
{
	struct statfs st;
	if (fstatfs(fd, &st) < 0)
		return NEG_ERRNO();
	return (int64_t)(uint32_t)st.f_type;
}
