"""The one thin layer over pyhv's C core (``pyhv._core``).

Every other module imports this one, never ``ffi``/``lib``.  C returns
``-errno``; here it becomes ``OSError(errno, strerror, what)``, except for the
outcomes of a page-resolving ioctl that are events rather than errors, which
are sorted in one place (:func:`_outcome`), as CRIU's lazy-pages daemon does:
EEXIST/EAGAIN mean someone else already resolved the page (wake it), ESRCH
means the faulting process is gone, and ENOENT that its registered range is
(it is exiting, or unmapped the memory): for us both are the worker leaving.
"""

from __future__ import annotations

import errno
import mmap
import os

from pyhv._core import ffi, lib

PAGE_SIZE = mmap.PAGESIZE

EVENT_PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
EVENT_FORK = lib.UFFD_EVENT_FORK
EVENT_REMAP = lib.UFFD_EVENT_REMAP
EVENT_REMOVE = lib.UFFD_EVENT_REMOVE
EVENT_UNMAP = lib.UFFD_EVENT_UNMAP
FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
FLAG_WP = lib.UFFD_PAGEFAULT_FLAG_WP
FLAG_MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR

MODE_MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
MODE_WP = lib.UFFDIO_REGISTER_MODE_WP
MODE_MINOR = lib.UFFDIO_REGISTER_MODE_MINOR
COPY_DONTWAKE = lib.UFFDIO_COPY_MODE_DONTWAKE
COPY_WP = lib.UFFDIO_COPY_MODE_WP
CONTINUE_WP = lib.UFFDIO_CONTINUE_MODE_WP
WP_PROTECT = lib.UFFDIO_WRITEPROTECT_MODE_WP
WP_DONTWAKE = lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE

USER_MODE_ONLY = lib.UFFD_USER_MODE_ONLY
#: The ioctls the hypervisor needs on a worker's registered range.
RANGE_IOCTLS = sum(1 << n for n in (lib._UFFDIO_WAKE, lib._UFFDIO_ZEROPAGE,
                                    lib._UFFDIO_WRITEPROTECT, lib._UFFDIO_CONTINUE))  # fmt: skip

#: Feature bits by name, for probing and for messages.
FEATURES = {
    "PAGEFAULT_FLAG_WP": lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    "EVENT_FORK": lib.UFFD_FEATURE_EVENT_FORK,
    "EVENT_REMAP": lib.UFFD_FEATURE_EVENT_REMAP,
    "EVENT_REMOVE": lib.UFFD_FEATURE_EVENT_REMOVE,
    "EVENT_UNMAP": lib.UFFD_FEATURE_EVENT_UNMAP,
    "MISSING_SHMEM": lib.UFFD_FEATURE_MISSING_SHMEM,
    "SIGBUS": lib.UFFD_FEATURE_SIGBUS,
    "THREAD_ID": lib.UFFD_FEATURE_THREAD_ID,
    "MINOR_SHMEM": lib.UFFD_FEATURE_MINOR_SHMEM,
    "EXACT_ADDRESS": lib.UFFD_FEATURE_EXACT_ADDRESS,
    "WP_HUGETLBFS_SHMEM": lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    "WP_UNPOPULATED": lib.UFFD_FEATURE_WP_UNPOPULATED,
    "POISON": lib.UFFD_FEATURE_POISON,
    "WP_ASYNC": lib.UFFD_FEATURE_WP_ASYNC,
    "MOVE": lib.UFFD_FEATURE_MOVE,
}

#: What a worker's uffd needs for pyhv: faults on shmem holes, and
#: write-protection of shmem pages (eviction and dirty tracking).
# (EVENT_FORK: a worker's children fault through the hypervisor too.  Not
# EVENT_REMOVE: it does not tell MADV_REMOVE from MADV_DONTNEED, and a worker
# that madvises in a loop would hold its partition's writes-protects off and
# flood the daemon; pyhv.discard and Memory.madvise say what they mean.)
WORKER_FEATURES = ("MISSING_SHMEM", "MINOR_SHMEM", "WP_HUGETLBFS_SHMEM", "PAGEFAULT_FLAG_WP",
                   "THREAD_ID", "EVENT_FORK")  # fmt: skip

# Outcomes of an ioctl that resolves or wakes a range.
OK = 0
EXISTS = 1  # already resolved by someone else: wake the range
GONE = 2  # the process behind the uffd has exited or dropped the range


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret), what)
    return ret


def _outcome(ret: int, what: str) -> int:
    if ret >= 0:
        return OK
    if ret in (-errno.EEXIST, -errno.EAGAIN):
        return EXISTS
    if ret in (-errno.ESRCH, -errno.ENOENT):
        return GONE
    raise OSError(-ret, os.strerror(-ret), what)


def open_uffd(nonblock: bool = True, user_mode_only: bool = False) -> int:
    """A new userfaultfd (close-on-exec), by the system call or /dev/userfaultfd."""
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    if user_mode_only:
        flags |= USER_MODE_ONLY
    return _check(lib.pyhv_uffd_open(flags), "userfaultfd")


def map_fixed(fd: int, addr: int, length: int) -> None:
    """fd mapped shared and writable at exactly addr (nothing may be there)."""
    _check(lib.pyhv_map_fixed(fd, addr, length), "mmap")


def api(fd: int, features: int = 0) -> tuple[int, int]:
    """UFFDIO_API handshake; returns the kernel's (features, ioctls) masks."""
    f = ffi.new("uint64_t *")
    i = ffi.new("uint64_t *")
    _check(lib.pyhv_uffd_api(fd, features, f, i), "UFFDIO_API")
    return f[0], i[0]


def probe_features() -> int:
    """Every feature bit this kernel offers (a throwaway fd, no request)."""
    fd = open_uffd()
    try:
        return api(fd, 0)[0]
    finally:
        os.close(fd)


def feature_mask(names) -> int:
    mask = 0
    for name in names:
        mask |= FEATURES[name]
    return mask


def missing_features(names, offered: int | None = None) -> list[str]:
    """The named features this kernel lacks (empty when all are there)."""
    offered = probe_features() if offered is None else offered
    return [n for n in names if not offered & FEATURES[n]]


def register(fd: int, start: int, length: int, mode: int) -> int:
    """UFFDIO_REGISTER; returns the mask of ioctls allowed on the range."""
    i = ffi.new("uint64_t *")
    _check(lib.pyhv_uffd_register(fd, start, length, mode, i), "UFFDIO_REGISTER")
    return i[0]


def unregister(fd: int, start: int, length: int) -> None:
    _check(lib.pyhv_uffd_unregister(fd, start, length), "UFFDIO_UNREGISTER")


def copy(fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
    """UFFDIO_COPY from address src; returns OK, EXISTS or GONE."""
    return _outcome(lib.pyhv_uffd_copy(fd, dst, src, length, mode), "UFFDIO_COPY")


def zeropage(fd: int, start: int, length: int, mode: int = 0) -> int:
    """UFFDIO_ZEROPAGE; returns OK, EXISTS or GONE."""
    return _outcome(lib.pyhv_uffd_zeropage(fd, start, length, mode), "UFFDIO_ZEROPAGE")


def wake(fd: int, start: int, length: int) -> int:
    """UFFDIO_WAKE; returns OK (the kernel accepts a wake for a range or a
    process that is gone, so this never reports GONE)."""
    return _outcome(lib.pyhv_uffd_wake(fd, start, length), "UFFDIO_WAKE")


def writeprotect(fd: int, start: int, length: int, protect: bool, wake: bool = True) -> int:
    """UFFDIO_WRITEPROTECT on or off; returns OK or GONE.  `wake` applies to
    removing protection only (protecting never wakes, and the kernel refuses
    WP with DONTWAKE)."""
    mode = WP_PROTECT if protect else (0 if wake else WP_DONTWAKE)
    return _outcome(lib.pyhv_uffd_writeprotect(fd, start, length, mode), "UFFDIO_WRITEPROTECT")


def continue_(fd: int, start: int, length: int, mode: int = 0) -> int:
    """UFFDIO_CONTINUE; returns OK, EXISTS or GONE."""
    return _outcome(lib.pyhv_uffd_continue(fd, start, length, mode), "UFFDIO_CONTINUE")


def poison(fd: int, start: int, length: int, mode: int = 0) -> int:
    """UFFDIO_POISON (a later access raises SIGBUS); returns OK, EXISTS or GONE."""
    return _outcome(lib.pyhv_uffd_poison(fd, start, length, mode), "UFFDIO_POISON")


class FaultBuffer:
    """A reusable array of flattened uffd messages, filled by :meth:`drain`."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.msgs = ffi.new("struct pyhv_fault[]", capacity)

    def drain(self, fd: int) -> int:
        """Read all pending messages (up to capacity); returns how many."""
        return _check(lib.pyhv_uffd_read(fd, self.msgs, self.capacity), "read(uffd)")


def memfd(name: str, size: int) -> int:
    """A close-on-exec memfd of `size` bytes."""
    return _check(lib.pyhv_memfd_new(name.encode(), size), "memfd_create")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Drop [offset, offset+length) from a memfd or file (all mappings zapped)."""
    _check(lib.pyhv_punch_hole(fd, offset, length), "fallocate(PUNCH_HOLE)")


def blkdev_size(fd: int) -> int:
    """Size in bytes of the block device open on fd."""
    return _check(lib.pyhv_blkdev_size(fd), "BLKGETSIZE64")


def fs_magic(fd: int) -> int:
    """The filesystem type (statfs f_type) of the file open on fd."""
    return _check(lib.pyhv_fs_magic(fd), "fstatfs")


def in_memory(start: int, length: int) -> bytes:
    """mincore(): a byte a page, bit 0 set where the page is in memory (for
    a shared mapping of a memfd: in its page cache)."""
    vec = ffi.new("unsigned char[]", (length + PAGE_SIZE - 1) // PAGE_SIZE)
    _check(lib.pyhv_mincore(start, length, vec), "mincore")
    return ffi.buffer(vec)[:]


def address_of(buf, writable: bool = True) -> int:
    """Start address of a buffer (an mmap), without keeping it exported."""
    p = ffi.from_buffer(buf, require_writable=writable)
    try:
        return int(ffi.cast("uintptr_t", p))
    finally:
        ffi.release(p)


class Watchdog:
    """A C thread that ends this process with ``_exit(status)`` when fd hits
    EOF, or with `rejoin` (control socket path, message, uffd or -1, seconds)
    first waits that long for a new hypervisor to take the worker back."""

    def __init__(self, fd: int, status: int, rejoin: tuple | None = None):
        path, msg, ufd, seconds = rejoin or (None, None, -1, 0.0)
        w = lib.pyhv_watchdog_start(fd, status, path.encode() if path else ffi.NULL,
                                    msg.encode() if msg else ffi.NULL, ufd, seconds)  # fmt: skip
        if w == ffi.NULL:
            e = ffi.errno
            raise OSError(e, os.strerror(e), "watchdog")
        self._w = w

    def stop(self) -> None:
        if self._w is not None:
            w, self._w = self._w, None
            _check(lib.pyhv_watchdog_stop(w), "watchdog stop")

    def abandon(self) -> None:
        """In a forked child: the thread stayed in the parent; forget it."""
        self._w = None

    @property
    def rejoins(self) -> int:
        """How many times a new hypervisor took this worker back."""
        return lib.pyhv_watchdog_rejoins(self._w) if self._w is not None else 0


class ServiceEngine:
    """The paging service's C I/O engine (csrc/service.c): READ and WRITE
    served by `threads` threads; :meth:`serve` returns every other frame."""

    MAX_FRAME = lib.PYHV_SVC_MAX_FRAME

    def __init__(self, sock_fd: int, threads: int = 4, spin_us: int = 0):
        s = lib.pyhv_svc_new(sock_fd, threads, spin_us)
        if s == ffi.NULL:
            raise OSError(errno.ENOMEM, "cannot start the I/O engine")
        self._s = s
        self._flags = ffi.new("int *")
        self._nfds = ffi.new("int *")
        self._fds = ffi.new("int[]", 8)

    def serve(self, buf) -> tuple[int, int, list[int]]:
        """Serve READ and WRITE until another frame comes; returns (its length,
        recvmsg flags, fds that came with it), with nothing in flight.
        Length 0 is end-of-file."""
        with ffi.from_buffer(buf, require_writable=True) as p:
            n = lib.pyhv_svc_serve(self._s, p, len(buf), self._flags, self._fds, 8, self._nfds)
        fds = [self._fds[i] for i in range(self._nfds[0])]
        if n < 0:
            raise OSError(-n, os.strerror(-n), "recvmsg(stream)")
        return n, self._flags[0], fds

    def stream_set(self, stream: int, fd: int, pages: int, memfd: int, mem_size: int,
                   snapfd: int = -1, snap_pages: int = 0, nbd=None) -> None:  # fmt: skip
        """Serve a stream: device fd of `pages` slots (or the NBD device's
        handle, pyhv.nbd), the partition's memory, and the snapshot it was
        restored from (-1: none)."""
        _check(lib.pyhv_svc_stream_set(self._s, stream, fd, nbd if nbd is not None else ffi.NULL,
                                       pages, memfd, mem_size, snapfd, snap_pages),
               "mmap(partition memory)")  # fmt: skip

    def stream_clear(self, stream: int) -> None:
        lib.pyhv_svc_stream_clear(self._s, stream)

    def stream_errors(self, stream: int) -> int:
        return lib.pyhv_svc_stream_errors(self._s, stream)

    def serve_fast(self, sock_fd: int) -> None:
        """Serve READs on the fast channel too, on a thread of their own."""
        _check(lib.pyhv_svc_fast(self._s, sock_fd), "fast channel")


class Engine:
    """The hypervisor's fault engine (csrc/engine.c): a C thread that
    resolves page faults without Python.  Handles (partitions, workers,
    fast channels) are opaque; every call takes the engine's lock."""

    READ_FAILED = lib.PYHV_EV_READ_FAILED
    WORKER_GONE = lib.PYHV_EV_WORKER_GONE
    CHAN_CLOSED = lib.PYHV_EV_CHAN_CLOSED
    WORKER_FORKED = lib.PYHV_EV_WORKER_FORKED
    PATH_LOST = lib.PYHV_EV_PATH_LOST
    WORKER_PID = lib.PYHV_EV_WORKER_PID
    COUNTERS = ("faults", "first_touches", "page_ins", "page_outs", "prefetched", "clean_drops",
                "refaults", "wp_faults", "minor_faults", "installed_writable",
                "removed_by_worker", "read_errors", "zeroed_ahead", "armed", "write_refs",
                "promoted", "loaned", "advised", "snapshot_reads")  # fmt: skip
    GLOBAL = ("sleeps", "evict_requests", "enomem", "send_errors", "reads_sent", "reads_done",
              "reads_taken_back", "stray_replies", "stray_faults", "fault_reads", "read_rtt_ns",
              "page_in_waits", "page_in_wait_ns", "reads_refused", "forks", "forks_lost",
              "evict_again", "reads_path_lost", "reads_expired")  # fmt: skip

    def __init__(self, pool_pages: int, reserve: int, spin_us: int):
        err = ffi.new("int *")
        e = lib.pyhv_eng_new(pool_pages, reserve, spin_us, err)
        if e == ffi.NULL:
            raise OSError(err[0], os.strerror(err[0]), "fault engine")
        self._e = e
        self._err = err
        self._events = ffi.new("struct pyhv_eng_event[]", 256)
        self._pool = ffi.new("struct pyhv_eng_pool *")
        self._stats = ffi.new("struct pyhv_eng_stats *")
        self._counts = ffi.new("uint64_t[]", lib.PYHV_ENG_STATES)
        self._first = ffi.new("uint32_t *")
        self._nclean = ffi.new("uint32_t *")
        self._touched = ffi.new("uint64_t[]", 64)
        self._ntouched = ffi.new("int *")
        self.notify_fd = lib.pyhv_eng_notify_fd(e)

    def start(self) -> None:
        _check(lib.pyhv_eng_start(self._e), "fault engine thread")

    def close(self) -> None:
        """Stop the thread and free everything (workers' uffds are closed)."""
        if self._e is not None:
            e, self._e = self._e, None
            lib.pyhv_eng_free(e)

    def events(self) -> list[tuple[int, int, int, int, int]]:
        """Events for Python: (type, errno, stream, page, worker), oldest first."""
        out = []
        while True:
            n = lib.pyhv_eng_events(self._e, self._events, 256)
            out += [(v.type, v.err, v.stream, v.page, v.worker)
                    for v in (self._events[i] for i in range(n))]  # fmt: skip
            if n < 256:
                return out

    def shortfall(self, coming: int) -> int:
        """Frames wanted beyond those free and `coming` (see csrc/engine.c)."""
        return lib.pyhv_eng_shortfall(self._e, coming)

    def pool(self) -> dict:
        lib.pyhv_eng_pool(self._e, self._pool)
        p = self._pool
        return {"pages": p.pages, "used": p.used, "high_water": p.high_water,
                "waiting": p.waiting, "reserve": p.reserve, "pending": p.pending,
                "events_lost": p.events_lost,
                "engine": {k: getattr(p.g, k) for k in self.GLOBAL}}  # fmt: skip

    def pool_resize(self, pages: int, reserve: int) -> None:
        lib.pyhv_eng_pool_resize(self._e, pages, reserve)

    # --- partitions -----------------------------------------------------------------

    def part_new(self, stream: int, pages: int, slots: int, memfd: int, hv_base: int,
                 table_fd: int = -1):  # fmt: skip
        """A partition's page table: new, or (table_fd) the one a crashed
        hypervisor left, which part_recover then makes true again."""
        h = lib.pyhv_eng_part_new(self._e, stream, pages, slots, memfd, hv_base, table_fd,
                                  self._err)  # fmt: skip
        if h == ffi.NULL:
            e = self._err[0]
            raise OSError(e, f"the page table: {os.strerror(e)}"
                          + (" (not this partition's)" if e == errno.EINVAL else ""))  # fmt: skip
        return h

    def part_table_fd(self, h) -> int:
        """The memfd the page table lives in (the partition's, not to close)."""
        return lib.pyhv_eng_part_table_fd(h)

    RECOVERED = ("kept_resident", "read_again", "page_outs_kept", "stale_dropped", "lost")

    def part_recover(self, h, pages: int) -> tuple[list[int], dict]:
        """After a crash (csrc/engine.c says how): the pages whose page-out
        must be confirmed from the device, and counts of what was done."""
        confirm = ffi.new("uint32_t[]", max(pages, 1))
        out = ffi.new("uint64_t[5]")
        n = lib.pyhv_eng_part_recover(self._e, h, confirm, out)
        if n < 0:
            raise OSError(-n, os.strerror(-n), "page table recovery")
        return list(confirm[0:n]), dict(zip(self.RECOVERED, out))

    def part_snapshot(self, h, crcs) -> None:
        """Every page of a fresh partition is in its snapshot, with these CRC32s."""
        lib.pyhv_eng_part_snapshot(self._e, h, ffi.from_buffer("uint32_t[]", crcs))

    def part_import(self, h, state, slot, crc) -> int:
        """A fresh partition's page table from an export; 0, or -EINVAL
        (nothing changed) when a slot is off the device or given twice."""
        n = len(state)
        if len(slot) != n or len(crc) != n:
            return -errno.EINVAL
        return lib.pyhv_eng_part_import(self._e, h, ffi.from_buffer("uint8_t[]", state),
                                        ffi.from_buffer("int64_t[]", slot),
                                        ffi.from_buffer("uint32_t[]", crc), n)  # fmt: skip

    def part_free(self, h) -> None:
        lib.pyhv_eng_part_free(self._e, h)

    def stats(self, h) -> dict:
        lib.pyhv_eng_part_stats(self._e, h, self._stats)
        s = self._stats
        out = {k: getattr(s.c, k) for k in self.COUNTERS}
        out.update(resident=s.resident, active=s.active, inactive=s.inactive,
                   reads_inflight=s.reads_inflight, reads_queued=s.reads_queued,
                   pending=s.pending, metadata_bytes=s.metadata_bytes,
                   written_share=s.written_share)  # fmt: skip
        return out

    def load(self, h) -> tuple[int, int]:
        """(resident pages, of them in a victim queue)."""
        lib.pyhv_eng_part_load(self._e, h, self._counts)
        return self._counts[0], self._counts[1]

    def state_counts(self, h) -> list[int]:
        lib.pyhv_eng_state_counts(self._e, h, self._counts)
        return list(self._counts)

    def page_state(self, h, page: int) -> int:
        return _check(lib.pyhv_eng_page_state(self._e, h, page), "page state")

    def slot_of(self, h, page: int) -> int:
        """The slot holding the page's device copy, or -1."""
        return lib.pyhv_eng_slot_of(self._e, h, page)

    def slot_set(self, h, slot: int, state: int) -> None:
        lib.pyhv_eng_slot_set(self._e, h, slot, state)

    def slot_count(self, h, state: int) -> int:
        return lib.pyhv_eng_slot_count(self._e, h, state)

    # --- workers and channels -------------------------------------------------------

    def worker_add(self, h, uffd: int, base: int, wid: int, pid: int, ident: int = 0):
        """The engine takes the uffd (and closes it at worker_remove).
        ident: the worker's identity page (see pyhv.attach), or 0."""
        w = lib.pyhv_eng_worker_add(self._e, h, uffd, base, wid, pid, ident, self._err)
        if w == ffi.NULL:
            raise OSError(self._err[0], os.strerror(self._err[0]), "worker")
        return w

    def table(self, h, pages: int) -> tuple[bytes, bytes, bytes]:
        """The page table's raw arrays: states (uint8), slots (int64, -1:
        none), CRC32s (uint32), native byte order."""
        state = ffi.new("uint8_t[]", pages)
        slot = ffi.new("int64_t[]", pages)
        crc = ffi.new("uint32_t[]", pages)
        lib.pyhv_eng_table(self._e, h, state, slot, crc)
        return bytes(ffi.buffer(state)), bytes(ffi.buffer(slot)), bytes(ffi.buffer(crc))

    def resident(self, h) -> list[int]:
        """The resident pages, in the order eviction would take them."""
        n = self.stats(h)["resident"] + 64
        out = ffi.new("uint32_t[]", n)
        k = lib.pyhv_eng_resident(self._e, h, out, n)
        return list(out[0:k])

    def prefetch_pages(self, h, pages: list[int]) -> int:
        """Read ahead listed pages on the device (in the list's order, with
        free frames only); how many of the list it went through.  Raises
        BlockingIOError while the stream does not flow."""
        arr = ffi.new("uint32_t[]", pages)
        return _check(lib.pyhv_eng_prefetch_pages(self._e, h, arr, len(pages)), "prefetch")

    def worker_claim(self, wid: int):
        """(handle, base) of a forked worker (WORKER_FORKED), or (None, 0)."""
        base = ffi.new("uint64_t *")
        w = lib.pyhv_eng_worker_claim(self._e, wid, base)
        return (None, 0) if w == ffi.NULL else (w, base[0])

    def worker_alive(self, w) -> bool:
        """False once the worker's memory is gone (a child that exited)."""
        return lib.pyhv_eng_worker_probe(self._e, w) == 0

    def discard(self, h, first: int, n: int) -> tuple[int, int, int]:
        """Give pages back: (frames freed, slots freed, pages in flight left alone)."""
        out = ffi.new("uint64_t[3]")
        _check(lib.pyhv_eng_discard(self._e, h, first, n, out), "discard")
        return out[0], out[1], out[2]

    def prefetch(self, h, first: int, n: int) -> tuple[int, int]:
        """Read pages ahead on advice: (pages started, where it stopped);
        raises BlockingIOError while the stream does not flow."""
        nxt = ffi.new("uint64_t *")
        started = _check(lib.pyhv_eng_prefetch(self._e, h, first, n, nxt), "prefetch")
        return started, nxt[0]

    def worker_fd(self, w) -> int:
        """The worker's uffd (the engine's: not to close)."""
        return lib.pyhv_eng_worker_fd(w)

    FORK_IDS = 1 << 40  # forked children's ids start past this

    def fork_ids_from(self, last: int) -> None:
        """Name forked children past `last` (after a crash: past the old ones)."""
        lib.pyhv_eng_fork_ids_from(self._e, max(0, last - self.FORK_IDS))

    def worker_remove(self, w) -> None:
        lib.pyhv_eng_worker_remove(self._e, w)

    def chan_add(self, sock: int, cid: int):
        """A fast channel; its end-of-file comes as CHAN_CLOSED naming cid."""
        ch = lib.pyhv_eng_chan_add(self._e, sock, cid, self._err)
        if ch == ffi.NULL:
            raise OSError(self._err[0], os.strerror(self._err[0]), "fast channel")
        return ch

    def chan_remove(self, ch) -> int:
        """No more READs on ch; its streams take theirs back (returned)."""
        return lib.pyhv_eng_chan_remove(self._e, ch)

    def stream_bind(self, h, ch, flowing: bool) -> None:
        lib.pyhv_eng_stream_bind(self._e, h, ch if ch is not None else ffi.NULL, int(flowing))

    def stream_busy(self, h) -> int:
        return lib.pyhv_eng_stream_busy(self._e, h)

    def expire_reads(self, h, max_age: float) -> int:
        """Page-ins waiting for a path longer than max_age seconds fail
        (READ_FAILED, ETIMEDOUT); how many pages."""
        return lib.pyhv_eng_expire_reads(self._e, h, int(max_age * 1e9))

    def chan_oldest(self, ch) -> float:
        """Seconds the oldest READ on ch has gone unanswered (0: none)."""
        return lib.pyhv_eng_chan_oldest_ns(self._e, ch) / 1e9

    # --- eviction and write-back ----------------------------------------------------

    def evict(self, h, n: int, allow_dirty: bool) -> tuple[list[int], int]:
        """(dirty pages to write back, clean pages dropped)."""
        out = ffi.new("uint32_t[]", max(n, 1))
        nd = _check(lib.pyhv_eng_evict(self._e, h, n, int(allow_dirty), out, self._nclean),
                    "evict")  # fmt: skip
        return list(out[0:nd]), self._nclean[0]

    def write_slots(self, h, pages: list[int]) -> tuple[int, int]:
        """(first slot, how many of pages got slots from it); 0 pages: no free slot."""
        arr = ffi.new("uint32_t[]", pages)
        n = lib.pyhv_eng_write_slots(self._e, h, arr, len(pages), self._first)
        return self._first[0], n

    def written(self, h, pages: list[int], crcs) -> None:
        """crcs: the WRITE reply's payload, a CRC32 (u32) a page."""
        arr = ffi.new("uint32_t[]", pages)
        with ffi.from_buffer(crcs) as c:
            lib.pyhv_eng_written(self._e, h, arr, ffi.cast("uint32_t *", c), len(pages))

    def write_failed(self, h, page: int, bad: bool) -> int:
        return lib.pyhv_eng_write_failed(self._e, h, page, int(bad))

    def poison(self, h, page: int) -> tuple[int, list[int]]:
        """(the slot the page had or -1, ids of the workers that waited on it)."""
        slot = lib.pyhv_eng_poison(self._e, h, page, self._touched, 64, self._ntouched)
        return slot, list(self._touched[0 : self._ntouched[0]])


def bench_kernel_touch(npages: int) -> list[int]:
    """Per-touch ns of kernel anonymous first-touch faults (benchmark baseline)."""
    out = ffi.new("uint64_t[]", npages)
    _check(lib.pyhv_bench_kernel_touch(npages, out), "bench kernel touch")
    return list(out)


def bench_uffd_touch(
    npages: int,
    *,
    shared: bool = True,
    zeropage: bool = True,
    devfd: int = -1,
    handler_cpu: int = -1,
    toucher_cpu: int = -1,
) -> list[int]:
    """Per-touch ns with a minimal C uffd handler thread (benchmark baseline)."""
    out = ffi.new("uint64_t[]", npages)
    ret = lib.pyhv_bench_uffd_touch(
        npages, int(shared), int(zeropage), devfd, handler_cpu, toucher_cpu, out
    )
    _check(ret, "bench uffd touch")
    return list(out)


# --- machine checks ----------------------------------------------------------------------------

MCE_RECORDS = lib.PYHV_MCE_RECORDS
MCE_LOG_SIZE = (ffi.sizeof("struct pyhv_mce_log") + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


class MceLog:
    """The hypervisor's side of a partition's error log: a memfd that every
    worker maps read-only, holding the newest MCE_RECORDS records."""

    def __init__(self, name: str, fd: int = -1):
        """A new log, or (fd) the one a crashed hypervisor left."""
        self.fd = fd if fd >= 0 else memfd(f"pyhv-mcelog-{name}", MCE_LOG_SIZE)
        self.map = mmap.mmap(self.fd, MCE_LOG_SIZE, mmap.MAP_SHARED)
        self.log = ffi.cast("struct pyhv_mce_log *", address_of(self.map))

    def write(self, page: int, error: str, device: str) -> int:
        """Add a record (before the page is poisoned); returns its number."""
        seq = self.log.count + 1
        rec = self.log.rec[(seq - 1) % MCE_RECORDS]
        rec.seq = 0  # invalid while it is rewritten
        rec.page = page
        rec.error = error.encode()[:15]
        rec.device = device.encode()[:47]
        rec.seq = seq
        self.log.count = seq
        return seq

    def close(self) -> None:
        self.log = None
        self.map.close()
        os.close(self.fd)


def mce_install() -> None:
    """Install the worker's machine-check (SIGBUS) handler, once per process."""
    _check(lib.pyhv_mce_install(), "sigaction(SIGBUS)")


def mce_add(start: int, length: int, sockfd: int, log_map, partition: str,
            isolation_partition: bool) -> None:  # fmt: skip
    """Let the handler know a partition's memory, its connection and error log."""
    log = ffi.cast("struct pyhv_mce_log *", address_of(log_map, writable=False))
    _check(lib.pyhv_mce_add(start, length, sockfd, log, partition.encode(),
                            int(isolation_partition)), "machine-check handler")  # fmt: skip


def mce_remove(start: int) -> None:
    _check(lib.pyhv_mce_remove(start), "machine-check handler")
