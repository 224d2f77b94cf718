"""The hypervisor daemon: one per system, one selector loop.

It owns the pool, every partition's memory (a memfd) and page table, the
fault path of every worker, and one paging stream per partition to a paging
service process.  Each kind of file descriptor has one handler, dispatched
from the selector's ``data``:

* the control socket (accepts control point and worker connections),
* a control connection (JSON requests; workers keep theirs open for life),
* a worker's userfaultfd (page faults),
* a paging service's socket (stream replies),
* the signal wake-up socket (SIGCHLD, SIGTERM, SIGINT).

A fault on a page that is not resident takes a frame from the pool (evicting
victims, 2Q, when there is none), fills it with zeros on first touch
(UFFDIO_ZEROPAGE), or has the paging service read it through the
partition's stream straight into the memfd and maps it with UFFDIO_CONTINUE
(workers register MINOR faults too, so none sees it before).  Pages read
from the device are mapped write-protected: the first write is seen (a WP
fault) and marks the page dirty, so clean pages are dropped at eviction with
no I/O (unless most page-ins are written soon after: then they are mapped
writable).  Eviction write-protects the victims in every worker and drops
the clean ones; the service writes the dirty ones, many to neighbouring
slots in one WRITE, and punches them out of the memfd; whoever blocked on
them meanwhile is woken and faults again.
"""

from __future__ import annotations

import argparse
import array
import collections
import errno
import fcntl
import itertools
import json
import logging
import math
import mmap
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time

from pyhv import uffd, vcp, wire
from pyhv.vcp import Refused
from pyhv.config import Config
from pyhv.pool import Pool
from pyhv.slots import SlotHealth
from pyhv.stream import ABORTED, COMPLETED, ENABLED, FLOWING, INVALID, RESUMED, SUSPENDED, \
    SUSPENDING, Request, ServiceLink, Stream  # fmt: skip
from pyhv.uffd import PAGE_SIZE

log = logging.getLogger("pyhv.hypervisor")

# page states, one byte per page
UNTOUCHED, DIRTY, CLEAN, FILLING, PAGING_OUT, ON_DEVICE = range(6)
NO_SLOT = 0xFFFFFFFF
STATE_NAMES = ("untouched", "dirty", "clean", "filling", "paging_out", "on_device")
# (a page that could not be paged in is poisoned in the workers' page tables
# and cleared here at once: see _page_in_failed)


CONTROL_SOCKET = "control.sock"
PID_FILE = "hypervisor.pid"
LOG_FILE = "hypervisor.log"
ERROR_LOG = "errors.jsonl"  # one machine-check record a line
EVICT_AHEAD = 64  # frames kept free ahead of demand once the pool is full (read-ahead takes them)
MAX_CONNECTIONS = 512  # control connections, workers' included
MAX_BACKLOG = 32  # replies a client may leave unread before it is dropped
CONN_BACKLOG_BYTES = 16 << 20  # ... and bytes of them, beyond the one it is being sent
TOTAL_BACKLOG_BYTES = 256 << 20  # bytes of replies unread by all clients together
PIECES_TIMEOUT = 5.0  # seconds a long request may take to arrive whole
PREFETCH = 8, 64  # pages read ahead of a sequential run of page-ins: first, at most
GUESS_WRITTEN = 0.5  # past this share of page-ins written soon after, install them writable
GUESS_PROBE = 8  # ...except one page-in in this many, which keeps measuring the share
WRITE_BATCH = 32  # dirty pages written back together, to neighbouring slots, in one WRITE
SLOT_FREE, SLOT_USED, SLOT_BAD = 0, 1, 2
EPOCHS = 4  # eviction epochs in a pool-full of evictions (see Hypervisor._enqueue)


class Control:
    """A control connection: a control-point client, or a worker's for life."""

    __slots__ = ("sock", "out", "worker", "pieces", "queued")

    def __init__(self, sock: socket.socket):
        self.sock: socket.socket | None = sock
        # replies not sent yet: (the pieces of one, not sent yet; its fds)
        self.out: collections.deque[tuple[collections.deque, list]] = collections.deque()
        self.worker: Worker | None = None
        self.pieces = wire.Assembler(wire.MAX_REQUEST)  # a long request coming in
        self.queued = 0  # bytes in out


class Worker:
    __slots__ = ("id", "pid", "pidfd", "partition", "conn", "uffd", "base", "alive")

    def __init__(self, wid: int, pid: int, partition: "Partition", conn: Control):
        self.id = wid
        self.pid = pid
        self.partition = partition
        self.conn = conn
        self.uffd = -1
        self.pidfd = -1
        self.base = 0
        self.alive = True


class Partition:
    def __init__(self, index: int, cfg, device):
        self.index = index
        self.cfg = cfg
        self.name = cfg.name
        self.pages = cfg.pages
        self.device = device
        self.memfd = uffd.memfd(f"pyhv-{cfg.name}", cfg.memory)
        # The hypervisor's own view, read-only: it reads a page only while
        # the page is resident (reading a hole would silently fill it).
        self.mem = mmap.mmap(self.memfd, cfg.memory, mmap.MAP_SHARED, mmap.PROT_READ)
        self.view = memoryview(self.mem)
        self.base = uffd.address_of(self.mem, writable=False)
        self.table = bytearray(self.pages)  # page state, one byte a page
        self.crc = array.array("I", [0]) * self.pages  # CRC32 of each page on the device
        # Where each page lives on the device.  Every page-out writes the page
        # to a new slot, so that the dirty pages evicted together go to
        # neighbouring slots in one WRITE, as the kernel's swap clusters do;
        # its old slot is freed then.  A slot that failed a write is set aside
        # (pyhv.slots).  slot_map: one byte a slot, SLOT_FREE/USED/BAD.
        self.slot = array.array("I", [NO_SLOT]) * self.pages
        self.slot_map = bytearray(device.pages)
        self.slot_cursor = 0  # where the next run of free slots is looked for
        self.slots = SlotHealth(self._slot_free)  # slots that failed a write
        self.full_until = 0.0  # no new dirty page-outs until then (full, or failing)
        self.evicting = 0  # page-outs of this partition in flight or queued
        self.last_page_in = -2  # for spotting a sequential run of page-ins
        self.readahead_end = -1  # the page after the last window read ahead
        self.readahead = PREFETCH[0]  # the next window, doubled while the run goes on
        # Share of pages installed clean after a page-in that were written
        # before their eviction (a WP fault each), decayed: once most are, a
        # page-in is installed writable, and the WP fault that would follow
        # it is saved (such a page is written back even if it was not written).
        self.written_share = 0.0
        self.page_in_count = 0
        self.mcelog = uffd.MceLog(cfg.name)
        self.waiters: dict[int, list] = {}  # page -> [(worker, write)] while filling/out
        self.workers: dict[int, Worker] = {}
        self.stream = Stream(index, cfg.name, {**device_spec(device), "memory": cfg.memory},
                             list(cfg.paging), self.memfd)  # fmt: skip
        self.resident = 0
        # Victim policy, two queues (2Q): a page enters `victims` (inactive)
        # when it is installed; a page that comes back soon after its
        # eviction -- within a pool's worth of evictions, so a pool twice
        # the size would have kept it -- is in use and enters `active`
        # instead.  Eviction takes the oldest inactive page; the oldest
        # active pages go back to the inactive queue, for a second round,
        # whenever they are more than 3/4 of what is resident (as 2Q's
        # authors advise: with half, a zipf workload on a system that had
        # run it once paged in 25% more: 3,244 pages against 2,595).
        self.victims: collections.deque[int] = collections.deque()  # inactive, oldest first
        self.active: collections.deque[int] = collections.deque()
        self.evicted_epoch = bytearray(self.pages)  # 1 + epoch % 255 at eviction; 0: never
        self.counters = collections.Counter()

    def metadata_bytes(self) -> int:
        """What the per-page tables take (waiters and victims come on top:
        they hold in-flight and resident pages only, bounded by the pool)."""
        return sum(sys.getsizeof(t) for t in (self.table, self.crc, self.slot, self.slot_map,
                                              self.evicted_epoch))  # fmt: skip

    def note_written(self, written: bool, pages: int = 1) -> None:
        """A page installed clean was written (WP fault), or `pages` were
        evicted clean."""
        if written:
            self.written_share = self.written_share * 0.97 + 0.03
        else:
            self.written_share *= 0.97**pages

    def install_clean(self, pages: int = 1) -> int:
        """How many pages of this page-in (a run of `pages`) to install clean,
        write-protected: all, unless most page-ins are written soon after;
        then none, but for one page of one page-in in GUESS_PROBE, which
        keeps measuring."""
        self.page_in_count += 1
        if self.written_share <= GUESS_WRITTEN:
            return pages
        clean = 1 if self.page_in_count % GUESS_PROBE == 0 else 0
        self.counters["installed_writable"] += pages - clean
        return clean

    def next_victim(self) -> int:
        """The page to evict next (there is one resident: see `looks`)."""
        if len(self.active) > self.resident * 3 // 4 or not self.victims:
            self.victims.append(self.active.popleft())  # demoted: a second round
        return self.victims.popleft()

    def queued(self) -> int:
        return len(self.victims) + len(self.active)

    def in_memory(self, page: int) -> bool:
        """Is the page in the memfd's page cache (mincore: no fault, no fill)?"""
        return bool(uffd.in_memory(self.base + page * PAGE_SIZE, PAGE_SIZE)[0] & 1)

    def close(self) -> None:
        self.view.release()
        self.mem.close()
        os.close(self.memfd)
        self.mcelog.close()

    def release_slot(self, page: int) -> int:
        """The page no longer needs its device copy; returns the slot (or NO_SLOT)."""
        slot = self.slot[page]
        if slot != NO_SLOT:
            self.slot[page] = NO_SLOT
            if self.slot_map[slot] == SLOT_USED:
                self.slot_map[slot] = SLOT_FREE
        return slot

    def _slot_free(self, slot: int) -> None:
        self.slot_map[slot] = SLOT_FREE

    def slot_failed(self, page: int, now: float, alone: bool) -> tuple[int, bool]:
        """A write of the page to its slot failed (alone: the page alone);
        the slot is set aside (pyhv.slots).  Returns (the slot, retired)."""
        slot = self.slot[page]
        self.slot[page] = NO_SLOT
        self.slot_map[slot] = SLOT_BAD
        return slot, self.slots.failed(slot, now, alone)

    def alloc_slots(self, n: int) -> tuple[int, int] | None:
        """Up to n free neighbouring slots, as (first, count); None when the
        device has no free slot.  Looks on from where the last run ended, so
        that the device fills like a log and runs stay long."""
        used = self.slot_map
        first = used.find(SLOT_FREE, self.slot_cursor)
        if first < 0:
            first = used.find(SLOT_FREE)
            if first < 0:
                return None
        end, limit = first + 1, min(first + n, len(used))
        while end < limit and used[end] == SLOT_FREE:
            end += 1
        used[first:end] = b"\x01" * (end - first)
        self.slot_cursor = end
        return first, end - first

    def status(self) -> dict:
        c = self.counters
        return {
            "name": self.name,
            "memory_bytes": self.cfg.memory,
            "pages": self.pages,
            "resident_pages": self.resident,
            "faults": c["faults"],
            "first_touches": c["first_touches"],
            "page_ins": c["page_ins"],
            "page_outs": c["page_outs"],
            "prefetched": c["prefetched"],
            "clean_drops": c["clean_drops"],
            "refaults": c["refaults"],
            "active_pages": len(self.active),
            "wp_faults": c["wp_faults"],
            "installed_writable": c["installed_writable"],
            "written_share": round(self.written_share, 3),
            "io_errors": c["io_errors"],
            "page_out_errors": c["page_out_errors"],
            "machine_checks": c["machine_checks"],
            "isolation": self.cfg.isolation,
            "weight": self.cfg.weight,
            "metadata_bytes_per_page": round(self.metadata_bytes() / self.pages, 2),
            "bad_slots": self.slots.unusable,  # waiting for a retry, or retired
            "retired_slots": len(self.slots.retired),
            "free_slots": self.slot_map.count(SLOT_FREE),
            "device": self.cfg.device,
            "paging": self.cfg.paging,
            "stream": self.stream.state,
            "stream_in_flight": len(self.stream.inflight),
            "stream_queued": len(self.stream.queued),
            "service": self.stream.service.name if self.stream.service else None,
            "workers": sorted(w.pid for w in self.workers.values()),
            "pages_by_state": {
                STATE_NAMES[s]: n
                for s in range(len(STATE_NAMES))
                if (n := self.table.count(s))
            },
        }


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted pages as runs of neighbours: [(first, count)]."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


UFFD_LINK = "anon_inode:[userfaultfd]"  # what /proc/self/fd/N reads for a userfaultfd
UFFD_INITIALIZED = 1 << 31  # the kernel's own feature bit, shown in fdinfo


def prove_uffd(fd: int, pid: int, base: int, part: Partition) -> None:
    """What a worker hands over at registration must be what attach asked
    for: a userfaultfd with the worker features, registered (MISSING, MINOR
    and WP) over the partition's memory where process pid (the peer, from
    SO_PEERCRED) maps it shared at `base`.  Raises ProtocolError saying what
    is wrong; a pipe, an eventfd, a file or a uffd over other memory would
    otherwise fail every ioctl later, in the middle of someone's eviction."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
        with open(f"/proc/self/fdinfo/{fd}") as f:
            info = f.read()
    except OSError as e:
        raise wire.ProtocolError(f"its fd cannot be examined: {e.strerror}") from None
    if link != UFFD_LINK:
        raise wire.ProtocolError(f"its fd is not a userfaultfd but {link}")
    api = next((ln.split()[1] for ln in info.splitlines() if ln.startswith("API:")), "")
    try:
        features = int(api.split(":")[1], 16) & ~UFFD_INITIALIZED
    except (IndexError, ValueError):
        raise wire.ProtocolError("its userfaultfd has had no UFFDIO_API handshake") from None
    want = uffd.feature_mask(uffd.WORKER_FEATURES)
    if features != want:  # exactly: an event feature would queue messages nobody reads
        raise wire.ProtocolError(f"its userfaultfd has features {features:#x}, attach asked for "
                                 f"{want:#x}")  # fmt: skip
    size = part.cfg.memory
    st = os.fstat(part.memfd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    end, at = base + size, base  # the next VMA of the mapping must start at `at`
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                span, perms, offset, dev, inode = line.split()[:5]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo >= end:
                    break  # (the file is in address order)
                if hi <= base:
                    continue
                if (lo != at or int(inode) != st.st_ino or dev != device
                        or perms[:2] != "rw" or perms[3] != "s" or int(offset, 16) != lo - base):
                    break  # fmt: skip
                at = hi
    except (OSError, ValueError) as e:
        raise wire.ProtocolError(f"the memory of process {pid} cannot be read: {e}") from None
    if at < end:
        raise wire.ProtocolError(f"process {pid} does not map the partition's memory shared and "
                                 f"writable at {base:#x}")  # fmt: skip
    # Registering again with the same modes changes nothing for the uffd that
    # holds the range, and fails (EBUSY) for any other: the proof that faults
    # on this memory come to this fd.  (Not that the uffd is the peer's own:
    # another process that maps the memory at the same address could lend
    # its uffd; it holds the partition's memory already, and can do no more.)
    try:
        ioctls = uffd.register(fd, base, size, uffd.MODE_MISSING | uffd.MODE_MINOR | uffd.MODE_WP)
    except OSError as e:
        raise wire.ProtocolError(f"its userfaultfd does not hold the partition's memory at "
                                 f"{base:#x}: {e.strerror}") from None  # fmt: skip
    if ioctls & uffd.RANGE_IOCTLS != uffd.RANGE_IOCTLS:
        raise wire.ProtocolError("its userfaultfd cannot resolve faults on the partition's memory")


def device_spec(dev) -> dict:
    """What a paging service needs to open a device for a stream."""
    return {"id": dev.id, "path": str(dev.path), "kind": dev.kind, "size": dev.size,
            "direct": dev.direct}  # fmt: skip


class Hypervisor:
    def __init__(self, run_dir: str, config: Config):
        self.run_dir = run_dir
        self.config = config
        self.sel = selectors.DefaultSelector()
        self.pool = Pool(config.pool_size // PAGE_SIZE)
        self.devices = {d.id: d for d in config.devices}
        self.services = {s.name: ServiceLink(self, s) for s in config.services}
        self.partitions = [
            Partition(i, p, self.devices[p.device]) for i, p in enumerate(config.partitions)
        ]
        self.by_name = {p.name: p for p in self.partitions}
        self.next_index = len(self.partitions)
        self.locks: dict[str, int] = {}  # device id -> fd holding its flock
        self.faults = uffd.FaultBuffer(256)
        self.evictions = 0
        self.next_slot_retry = math.inf  # the earliest Partition.slot_retry_at
        self.epoch = 0  # advances every pool.pages / EPOCHS evictions, modulo 255
        self.stopping = False
        self.done = False
        self.failed: str | None = None  # why start-up failed
        self.started = time.time()
        self.next_worker = 1
        self.ready_fd = -1
        self.listener: socket.socket | None = None
        self.conns: dict[socket.socket, Control] = {}
        self.partial: set[Control] = set()  # connections in the middle of a long request
        self.reply_bytes = 0  # queued in every Control.out together
        self.pending_ops: list = []  # (predicate, action) of operations still under way
        self.errors: list[dict] = []  # machine-check records, oldest first
        self.control_handlers = {
            "status": self.op_status,
            "shutdown": self.op_shutdown,
            "attach": self.op_attach,
            "register": self.op_register,
            "partition": self.op_partition,
            "mce": self.op_mce,
            "errors": self.op_errors,
            "slots": self.op_slots,
            **vcp.handlers(self),
        }

    @property
    def reserve(self) -> int:
        """Frames kept free (or being freed) ahead of demand once the pool is full."""
        return min(EVICT_AHEAD, max(1, self.pool.pages // 8))

    def streams(self) -> list[Stream]:
        return [p.stream for p in self.partitions]

    # --- start and stop ---------------------------------------------------

    def start(self, ready_fd: int = -1) -> None:
        self.ready_fd = ready_fd
        for dev in self.devices.values():
            self.lock_device(dev)
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *a: None)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self.on_signal)
        path = os.path.join(self.run_dir, CONTROL_SOCKET)
        if os.path.exists(path):
            os.unlink(path)
        self.listener = wire.listen(path)
        self.sel.register(self.listener, selectors.EVENT_READ, self.on_accept)
        with open(os.path.join(self.run_dir, PID_FILE), "w") as f:
            f.write(f"{os.getpid()}\n")
        for svc in self.services.values():
            svc.start()
        for part in self.partitions:
            self.place(part.stream)
        self.after(lambda: all(s.state in FLOWING or s.state == ABORTED for s in self.streams()),
                   self._started)  # fmt: skip
        log.info("hypervisor: pid %d, pool %d pages, %d partitions", os.getpid(), self.pool.pages,
                 len(self.partitions))  # fmt: skip

    def lock_device(self, dev) -> None:
        """Hold an exclusive lock on the device for as long as this system
        uses it: a second system cannot page to it."""
        flags = os.O_RDONLY | os.O_CLOEXEC
        if dev.kind == "file":
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(dev.path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Refused(f"device {dev.id!r} ({dev.path}) is in use by another system") from None
        except OSError as e:  # a filesystem without flock (some FUSE ones)
            log.warning("device %s: %s cannot be locked (%s); not guarded against another "
                        "system", dev.id, dev.path, e.strerror)  # fmt: skip
        self.locks[dev.id] = fd

    def unlock_device(self, dev) -> None:
        fd = self.locks.pop(dev.id, None)
        if fd is not None:
            os.close(fd)

    def _started(self) -> None:
        bad = [s for s in self.streams() if s.state == ABORTED]
        if bad:
            self._not_ready(f"partition {bad[0].name}: its device cannot be opened by "
                            f"{', '.join(bad[0].paging)} (see the service log)")  # fmt: skip
        else:
            self._ready()

    def _ready(self) -> None:
        if self.ready_fd >= 0:
            os.write(self.ready_fd, b"ready\n")
            os.close(self.ready_fd)
            self.ready_fd = -1
        log.info("hypervisor: ready")

    def _not_ready(self, msg: str) -> None:
        log.error("hypervisor: %s", msg)
        self.failed = msg
        if self.ready_fd >= 0:
            os.write(self.ready_fd, f"error {msg}\n".encode())
            os.close(self.ready_fd)
            self.ready_fd = -1
        self.shutdown()

    def after(self, predicate, action) -> None:
        """Run action once predicate() holds (checked after every event)."""
        if predicate():
            action()
        else:
            self.pending_ops.append((predicate, action))

    def _run_pending(self) -> None:
        while True:
            ready = [op for op in self.pending_ops if op[0]()]
            if not ready:
                return
            for op in ready:
                self.pending_ops.remove(op)
                op[1]()

    def run(self) -> None:
        spin = self.config.poll_us / 1e6  # see Config.poll_us
        busy_until = 0.0
        yield_ = os.sched_yield
        while not self.done:
            now = time.monotonic()
            if now < busy_until:  # polling: whoever else wants this CPU has it first
                yield_()  # (the worker just woken, if it waits for this CPU)
                events = self.sel.select(0)
                if not events:
                    continue
            else:
                events = self.sel.select(1.0)
            if events:
                busy_until = now + spin
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception:  # a bug must not take every partition down
                    log.exception("hypervisor: handler for fd %d failed", key.fd)
            self._check_deadlines()
            try:
                self._run_pending()
            except Exception:
                log.exception("hypervisor: a pending operation failed")
        self._finish()

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.partial if now - c.pieces.started > PIECES_TIMEOUT]:
            self._refuse_conn(c, wire.ProtocolError(
                f"a request did not arrive whole within {PIECES_TIMEOUT:g}s"))  # fmt: skip
        if now >= self.next_slot_retry:  # slots that failed a write are tried again
            for part in self.partitions:
                part.slots.retry(now)
            self.next_slot_retry = min((p.slots.next_retry for p in self.partitions),
                                       default=math.inf)  # fmt: skip
        if self.pool.waiters:  # faults waiting for a frame: a full device may have room now
            self.replenish()
        for svc in self.services.values():  # stopping ones too: a hung stop fails over
            if svc.sock is not None and svc.sent and svc.oldest_age(now) > svc.cfg.timeout:
                self.service_failed(svc, f"no answer within {svc.cfg.timeout:g}s")

    def shutdown(self) -> None:
        """Begin an orderly stop: workers go, then every stream completes its
        paging in flight, is flushed and ends COMPLETED; then the services."""
        if self.stopping:
            return
        log.info("hypervisor: shutting down")
        self.stopping = True
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
        for part in self.partitions:
            for w in list(part.workers.values()):
                self._drop_worker(w, "the system is shutting down")
        deadline = time.monotonic() + 15
        for svc in self.services.values():
            if svc.running:
                self.stop_service(svc, final=True)
        self.after(lambda: time.monotonic() > deadline or not any(
            s.state == "stopping" for s in self.services.values()), self._stopped)  # fmt: skip

    def _stopped(self) -> None:
        for svc in self.services.values():
            if svc.sock is not None:
                svc.close(kill=True)
                svc.state = "stopped"
        self.done = True

    def _finish(self) -> None:
        for svc in self.services.values():
            svc.close(kill=False)
        for name in (CONTROL_SOCKET, PID_FILE):
            try:
                os.unlink(os.path.join(self.run_dir, name))
            except FileNotFoundError:
                pass
        log.info("hypervisor: stopped")

    def on_signal(self, mask: int) -> None:
        try:
            data = self._wake_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                for svc in self.services.values():
                    if svc.proc is not None and svc.proc.poll() is not None and svc.sock:
                        self.service_failed(svc, f"exited with status {svc.proc.returncode}")
            else:
                log.info("hypervisor: signal %d", signum)
                self.shutdown()

    # --- paging services and streams ------------------------------------------

    def place(self, stream: Stream, avoid: ServiceLink | None = None) -> None:
        """Give a stream without a service the first running one it may use."""
        if stream.service is not None or self.stopping:
            return
        for name in stream.paging:
            svc = self.services[name]
            if svc.running and svc is not avoid and name not in stream.open_failed:
                self.bind(stream, svc)
                return
        log.warning("partition %s: no paging service of %s is running; paging waits",
                    stream.name, ", ".join(stream.paging))  # fmt: skip

    def bind(self, stream: Stream, svc: ServiceLink) -> None:
        """Open the partition's device on svc; the stream flows once it is open."""
        if not svc.running:
            self.place(stream, avoid=svc)
            return
        stream.service = svc
        stream.bound_to(svc)

        def opened(status, count, data):
            if stream.service is not svc:
                return
            if status:
                log.error("partition %s: paging service %s cannot open device %s: %s",
                          stream.name, svc.name, stream.device_spec["id"],
                          os.strerror(-status))  # fmt: skip
                stream.service = None
                stream.set_state(ABORTED)
                stream.open_failed.add(svc.name)
                self.place(stream)
                return
            stream.open_failed.clear()
            if stream.state == SUSPENDING:  # stopped while it opened: it stays stopped
                return
            stream.set_state(ENABLED if stream.state == INVALID else RESUMED)
            stream.pump()

        svc.send(stream, Request(wire.OP_OPEN, 0, 0, json.dumps(stream.device_spec).encode(),
                                 opened, control=True, fds=[stream.memfd]))  # fmt: skip

    def service_failed(self, svc: ServiceLink, why: str) -> None:
        """A service died, closed its socket or stopped answering: fence it,
        move its streams, with every request they had in flight, to their
        other service, and restart it if its config says so."""
        if svc.sock is None:
            return
        log.error("paging service %s: failed: %s", svc.name, why)
        detected = time.monotonic()  # failover time counts from here, fencing included
        streams = svc.streams()
        svc.close(kill=True)  # fencing: it can never complete an old write later
        if svc.state == "stopping" or self.stopping:
            svc.state = "stopped"
        else:
            svc.state = "dead"
            svc.deaths += 1
        for stream in streams:
            n = len(stream.take_back())
            stream.service = None
            stream.set_state(ABORTED)
            stream.mark_failover(svc.name, n, detected)
            self.place(stream)
        if svc.state == "dead" and svc.cfg.restart and not self.stopping:
            log.info("paging service %s: restarting (restart = true)", svc.name)
            self.start_service(svc)

    def start_service(self, svc: ServiceLink) -> None:
        svc.start()
        for stream in self.streams():
            if stream.service is None and svc.name in stream.paging:
                self.bind(stream, svc)

    def suspend(self, stream: Stream, final_state: str, then) -> None:
        """Controlled end of a stream on its service: no new request goes
        out, the ones in flight complete, writes are flushed and synced; then
        the stream is `final_state` (SUSPENDED or COMPLETED), holds no
        service, and then() runs.  If the service fails meanwhile, the
        stream has failed over already, and then() just runs."""
        svc = stream.service
        stream.set_state(SUSPENDING)
        flushed = [False]

        def on_flush(status, count, data):
            if status:
                log.error("partition %s: flush on %s failed: %s", stream.name, svc.name,
                          os.strerror(-status))  # fmt: skip
            flushed[0] = True

        def finish():
            if stream.service is svc:
                stream.take_back()  # nothing is in flight; never strand a request
                stream.service = None
                stream.set_state(final_state)
            then()

        def drained():
            if stream.service is svc:  # FLUSH is not resent elsewhere: it is this service's
                svc.send(stream, Request(wire.OP_FLUSH, 0, 0, None, on_flush, control=True))
            self.after(lambda: flushed[0] or stream.service is not svc, finish)

        self.after(lambda: not stream.inflight or stream.service is not svc, drained)

    def stop_service(self, svc: ServiceLink, final: bool = False, then=None) -> None:
        """Controlled shutdown of a paging service (see `suspend`); each of
        its streams moves to the partition's other service if one runs, and
        only then does the service exit."""
        svc.state = "stopping"
        streams = svc.streams()
        left = [len(streams)]

        def one_done(stream=None):
            if stream is not None and not final:
                self.place(stream, avoid=svc)
            left[0] -= 1
            if left[0] <= 0:
                if svc.sock is not None:
                    svc.close(kill=False)
                svc.state = "stopped"
                log.info("paging service %s: stopped", svc.name)
                if then:  # once the streams that moved flow again on their other service
                    self.after(lambda: all(s.service is None or s.state in FLOWING
                                           or s.state == ABORTED for s in streams), then)

        if not streams:
            one_done()
        for stream in streams:
            self.suspend(stream, COMPLETED if final else SUSPENDED,
                         lambda stream=stream: one_done(stream))  # fmt: skip

    # --- control connections ----------------------------------------------

    def on_accept(self, mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError as e:  # out of fds or memory: back off rather than spin
            log.error("control: accept: %s; not accepting for a second", e.strerror)
            self.sel.unregister(self.listener)
            until = time.monotonic() + 1
            self.after(lambda: time.monotonic() > until, self._accept_again)
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            log.warning("control: %d connections open already; refusing one", len(self.conns))
            sock.close()
            return
        sock.setblocking(False)
        c = Control(sock)
        self.conns[sock] = c
        self.sel.register(sock, selectors.EVENT_READ, lambda m, c=c: self.on_conn(c, m))

    def _accept_again(self) -> None:
        if self.listener is not None:
            self.sel.register(self.listener, selectors.EVENT_READ, self.on_accept)

    def on_conn(self, c: "Control", mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_replies(c)
        if mask & selectors.EVENT_READ and c.sock is not None:
            self.on_control(c)

    def _close_conn(self, c: "Control") -> None:
        if c.sock is None:
            return
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(c.sock, None)
        c.sock.close()
        c.sock = None
        for _, fds in c.out:
            wire.close_fds(fds)
        c.out.clear()
        self.reply_bytes -= c.queued
        c.queued = 0
        c.pieces.reset()
        self.partial.discard(c)

    def on_control(self, c: "Control") -> None:
        """One message from a connection: a request, or a piece of a long
        one (the next waits for the next event).  Every fd that came with a
        message is closed unless its handler took it (and cleared the list)."""
        try:
            data, fds = wire.recv_piece(c.sock)
        except BlockingIOError:
            return
        except wire.ProtocolError as e:
            self._refuse_conn(c, e)
            return
        except OSError as e:
            log.warning("control: dropping a connection: %s", e)
            self._drop_conn(c, f"connection broken: {e}")
            return
        if not data and not fds:
            self._drop_conn(c, "connection closed")
            return
        try:
            whole, fds = c.pieces.feed(data, fds)  # (it closes what it refuses)
        except wire.ProtocolError as e:
            self._refuse_conn(c, e)
            return
        if whole is None:
            self.partial.add(c)
            return  # more of it to come
        self.partial.discard(c)
        try:
            msg = wire.decode_control(whole)
        except wire.ProtocolError as e:
            wire.close_fds(fds)
            self._refuse_conn(c, e)
            return
        try:
            self._handle(c, msg, fds)
        finally:
            wire.close_fds(fds)

    def _refuse_conn(self, c: "Control", e: Exception) -> None:
        """A malformed message: a one-line error, and the connection goes."""
        log.warning("control: dropping a connection: %s", e)
        self.reply(c, {"ok": False, "error": f"bad request: {e}"})
        self._drop_conn(c, f"protocol error: {e}")

    def _handle(self, c: "Control", msg: dict, fds: list[int]) -> None:
        op = msg.get("op")
        handler = self.control_handlers.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                raise wire.ProtocolError(f"unknown op {op!r}")
            if fds and op != "register":
                raise wire.ProtocolError(f"{op} carries no file descriptors")
            reply, reply_fds = handler(c, msg, fds)
        except Refused as e:
            log.warning("control: %s refused: %s", op, e)
            self.reply(c, {"ok": False, "refused": True, "error": str(e)})
            return
        except (wire.ProtocolError, KeyError, TypeError, ValueError) as e:
            log.warning("control: bad request %r: %s", op, e)
            self.reply(c, {"ok": False, "error": f"bad request: {e}"})
            self._drop_conn(c, f"bad request: {e}")
            return
        except Exception as e:  # a bug: answer, so that no client waits forever
            log.exception("control: %s failed", op)
            self.reply(c, {"ok": False, "error": f"internal error in {op}: {e}"})
            return
        if reply is not None:
            self.reply(c, reply, reply_fds)

    def reply(self, c: "Control", reply: dict, fds=()) -> None:
        """Answer without ever blocking the loop: what the peer does not take
        now waits in its queue; a peer that leaves too much unread is dropped."""
        if c.sock is None:
            return
        pieces = wire.encode_control(reply)
        size = sum(map(len, pieces))
        if c.out and (len(c.out) >= MAX_BACKLOG or c.queued + size > CONN_BACKLOG_BYTES
                      or self.reply_bytes + size > TOTAL_BACKLOG_BYTES):  # fmt: skip
            log.warning("control: a client left %d replies (%d bytes) unread; dropping it",
                        len(c.out), c.queued)  # fmt: skip
            self._drop_conn(c, "not reading its replies")
            return
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except OSError as e:  # out of fds: an answer all the same, and no fds
            wire.close_fds(dups)
            log.error("control: cannot pass file descriptors: %s", e.strerror)
            pieces = wire.encode_control({"ok": False, "error": "the hypervisor cannot pass "
                                          f"file descriptors now: {e.strerror}"})  # fmt: skip
            size, dups = sum(map(len, pieces)), []
        c.out.append((collections.deque(pieces), dups))
        c.queued += size
        self.reply_bytes += size
        self._flush_replies(c)

    def _flush_replies(self, c: "Control") -> None:
        while c.out and c.sock is not None:
            pieces, fds = c.out[0]
            try:
                if fds:  # with the first piece
                    socket.send_fds(c.sock, [pieces[0]], fds)
                    wire.close_fds(fds)
                    fds.clear()
                else:
                    c.sock.send(pieces[0])
            except BlockingIOError:
                self.sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                lambda m, c=c: self.on_conn(c, m))  # fmt: skip
                return
            except OSError as e:
                log.warning("control: reply lost: %s", e)
                self._drop_conn(c, "connection broken")
                return
            sent = pieces.popleft()
            c.queued -= len(sent)
            self.reply_bytes -= len(sent)
            if not pieces:
                c.out.popleft()
        if c.sock is not None:
            self.sel.modify(c.sock, selectors.EVENT_READ, lambda m, c=c: self.on_conn(c, m))

    def _drop_conn(self, c: "Control", why: str = "connection dropped") -> None:
        if c.worker is not None:
            self._drop_worker(c.worker, why)
        self._close_conn(c)

    def op_status(self, conn, msg, fds):
        return self.status(), ()

    def op_shutdown(self, conn, msg, fds):
        reply = {"ok": True, "pid": os.getpid(), "partitions": [p.name for p in self.partitions],
                 "paging_services": [s.name for s in self.services.values() if s.running],
                 "workers": sum(len(p.workers) for p in self.partitions)}  # fmt: skip
        self.shutdown()
        return reply, ()

    def op_partition(self, conn, msg, fds):
        part = self.by_name.get(msg["name"])
        if part is None:
            return {"ok": False, "error": f"unknown partition {msg['name']!r}"}, ()
        return {"ok": True, "partition": part.status()}, ()

    def op_attach(self, conn, msg, fds):
        name = msg["partition"]
        # who it is comes from the kernel (SO_PEERCRED), never from the message
        pid, _, _ = struct.unpack("3i", conn.sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))  # fmt: skip
        part = self.by_name.get(name)
        if part is None:
            return {"ok": False, "error": f"unknown partition {name!r}"}, ()
        if self.stopping:
            return {"ok": False, "error": "the hypervisor is shutting down"}, ()
        if conn.worker is not None:
            raise wire.ProtocolError("this connection is attached already")
        w = Worker(self.next_worker, pid, part, conn)
        try:  # signals go to this process, even if its pid is reused later
            w.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return {"ok": False, "error": "the attaching process is gone"}, ()
        except OSError as e:
            log.error("partition %s: cannot attach pid %d: pidfd_open: %s", name, pid, e.strerror)
            return {"ok": False, "error": f"the hypervisor cannot attach now: {e.strerror}"}, ()
        conn.worker = w
        self.next_worker += 1
        part.workers[w.id] = w
        return {"ok": True, "worker": w.id, "size": part.cfg.memory, "page_size": PAGE_SIZE,
                "features": uffd.feature_mask(uffd.WORKER_FEATURES),
                "isolation": part.cfg.isolation, "mcelog_size": uffd.MCE_LOG_SIZE,
                }, (part.memfd, part.mcelog.fd)  # fmt: skip

    def op_register(self, conn, msg, fds):
        w = conn.worker
        if w is None or w.uffd >= 0 or len(fds) != 1:
            raise wire.ProtocolError("register without attach, twice, or without one uffd")
        base = msg.get("base")
        try:
            if isinstance(base, bool) or not isinstance(base, int):
                raise wire.ProtocolError(f"base {base!r} is not an address")
            prove_uffd(fds[0], w.pid, base, w.partition)
        except wire.ProtocolError as e:
            log.warning("partition %s: worker pid %d: registration refused: %s",
                        w.partition.name, w.pid, e)  # fmt: skip
            raise
        w.uffd = fds.pop()  # the worker's now: closed when it goes
        w.base = base
        os.set_blocking(w.uffd, False)
        part = w.partition
        # Clean pages must fault on this worker's first write too, and pages
        # being paged out must not be written behind the page-out's back.
        for state in (CLEAN, PAGING_OUT):
            page = 0
            while (page := part.table.find(state, page)) >= 0:
                if self._ioctl(w, uffd.writeprotect, page, 1, True) == uffd.GONE:
                    raise wire.ProtocolError("its userfaultfd failed at once")
                page += 1
        self.sel.register(w.uffd, selectors.EVENT_READ, lambda m, w=w: self.on_uffd(w))
        log.info("partition %s: worker %d (pid %d) attached", part.name, w.id, w.pid)
        return {"ok": True}, ()

    def _ioctl(self, w: Worker, op, page: int, n: int, *args) -> int:
        """One uffd ioctl (uffd.writeprotect, zeropage, wake, continue_,
        poison) on pages [page, page+n) of worker w: OK, EXISTS or GONE.
        Any failure but EXISTS drops w, so that one worker's broken fd (or
        its exit) never stops eviction or the faults of anyone else."""
        try:
            r = op(w.uffd, w.base + page * PAGE_SIZE, n * PAGE_SIZE, *args)
        except OSError as e:
            log.error("partition %s: worker %d (pid %d): %s on page %d: %s; dropping the "
                      "worker", w.partition.name, w.id, w.pid, e.filename, page,
                      errno.errorcode.get(e.errno, e.errno))  # fmt: skip
            r = uffd.GONE
        if r == uffd.GONE:
            self._drop_worker(w, "its memory is gone")
        return r

    def _drop_worker(self, w: Worker, why: str = "gone") -> None:
        if not w.alive:
            return
        w.alive = False
        part = w.partition
        part.workers.pop(w.id, None)
        if w.uffd >= 0:
            try:
                self.sel.unregister(w.uffd)
            except (KeyError, ValueError):
                pass
            os.close(w.uffd)
        if w.pidfd >= 0:
            os.close(w.pidfd)
            w.pidfd = -1
        self._close_conn(w.conn)
        log.info("partition %s: worker %d (pid %d) detached: %s", part.name, w.id, w.pid, why)

    # --- partitions ------------------------------------------------------------

    def add_partition(self, cfg, dev) -> Partition:
        part = Partition(self.next_index, cfg, dev)
        self.next_index += 1
        self.partitions.append(part)
        self.by_name[part.name] = part
        log.info("partition %s: added (%d pages, device %s, paging %s)", part.name, part.pages,
                 dev.id, ", ".join(cfg.paging))  # fmt: skip
        self.place(part.stream)
        return part

    def remove_partition(self, part: Partition) -> None:
        """Deactivate a partition that has no worker and nothing in flight:
        its frames go back to the pool, its memory and device are let go."""
        pool = self.pool
        for page in range(part.pages):
            if part.table[page] in (DIRTY, CLEAN):
                pool.release()
        svc = part.stream.service
        if svc is not None and svc.sock is not None:
            svc.send(part.stream, Request(wire.OP_CLOSE, 0, 0, None, lambda *a: None))
        part.stream.service = None
        part.stream.set_state(COMPLETED)
        self.partitions.remove(part)
        del self.by_name[part.name]
        part.close()
        log.info("partition %s: removed", part.name)

    # --- the fault path -----------------------------------------------------

    def on_uffd(self, w: Worker) -> None:
        try:
            n = self.faults.drain(w.uffd)
        except OSError as e:
            log.warning("partition %s: worker %d: uffd read: %s", w.partition.name, w.pid, e)
            self._drop_worker(w, "its memory is gone")
            return
        msgs = self.faults.msgs
        for i in range(n):
            m = msgs[i]
            if m.event != uffd.EVENT_PAGEFAULT:
                continue
            try:
                self.fault(w, m.a, m.b)
            except Exception:  # one bad fault must not strand the rest of the batch
                log.exception("partition %s: worker %d: fault at %#x failed", w.partition.name,
                              w.pid, m.a)  # fmt: skip
            if not w.alive:
                return

    def fault(self, w: Worker, addr: int, flags: int) -> None:
        part = w.partition
        page = (addr - w.base) // PAGE_SIZE
        if not 0 <= page < part.pages:
            log.error("partition %s: worker %d faulted outside its memory at %#x", part.name,
                      w.pid, addr)  # fmt: skip
            return
        part.counters["faults"] += 1
        st = part.table[page]
        if flags & uffd.FLAG_WP:
            part.counters["wp_faults"] += 1
            if st == CLEAN or st == DIRTY:
                if st == CLEAN:  # its copy on the device is stale from now on
                    part.release_slot(page)
                    part.note_written(True)
                part.table[page] = DIRTY
                self._ioctl(w, uffd.writeprotect, page, 1, False)
            elif st == PAGING_OUT or st == FILLING:
                part.waiters[page].append((w, True))
            else:
                self._ioctl(w, uffd.wake, page, 1)
            return
        if st == UNTOUCHED or st == ON_DEVICE:
            part.table[page] = FILLING
            part.waiters[page] = [(w, bool(flags & uffd.FLAG_WRITE))]
            if st == UNTOUCHED:
                part.counters["first_touches"] += 1
            fill = self._zero_fill if st == UNTOUCHED else self._page_in
            pool = self.pool
            if pool.try_take():
                fill(part, page)  # the worker runs on while eviction keeps frames free
                if st == ON_DEVICE:
                    if page == part.last_page_in + 1 or page == part.readahead_end:
                        self._prefetch(part, page + 1)
                    else:
                        part.readahead = PREFETCH[0]
                if pool.pages - pool.used < self.reserve:
                    self.replenish()
            else:
                pool.waiters.append(lambda: fill(part, page))
                self.replenish()
            if st == ON_DEVICE:
                part.last_page_in = page
        elif st == FILLING or st == PAGING_OUT:
            part.waiters[page].append((w, bool(flags & uffd.FLAG_WRITE)))
        elif flags & uffd.FLAG_MINOR or part.in_memory(page):
            # resident, not mapped by this worker yet (a MINOR fault), or
            # mapped meanwhile (an install raced with the fault): map it here
            self._map(w, page, 1, st == CLEAN)
        else:  # resident by the table, gone from the memfd: a worker removed it
            part.counters["removed_by_worker"] += 1  # (MADV_REMOVE): it reads zeros now
            log.info("partition %s: page %d was removed by a worker; it is a zero page now",
                     part.name, page)  # fmt: skip
            part.table[page] = DIRTY
            self._ioctl(w, uffd.zeropage, page, 1)

    def _prefetch(self, part: Partition, first: int) -> None:
        """A sequential run of page-ins: read the next pages on the device
        too, while the worker handles this one, in one READ where their
        slots follow each other.  The window doubles each time the run
        reaches its end (up to PREFETCH[1] pages).  Only with free frames
        (never ahead of a waiting fault) and a stream that flows."""
        if part.stream.state not in FLOWING:
            return
        run: list[int] = []
        end = min(first + part.readahead, part.pages)
        part.readahead = min(2 * part.readahead, PREFETCH[1])
        part.readahead_end = first  # where the next window starts: after what is read now
        for page in range(first, end):
            if part.table[page] != ON_DEVICE or not self.pool.try_take():
                break
            part.readahead_end = page + 1
            if run and part.slot[page] != part.slot[run[-1]] + 1:
                self._page_in_run(part, run)
                run = []
            part.table[page] = FILLING
            part.waiters[page] = []
            part.counters["prefetched"] += 1
            run.append(page)
        if run:
            self._page_in_run(part, run)

    def _zero_fill(self, part: Partition, page: int) -> None:
        self._install(part, page, False)

    def _page_in(self, part: Partition, page: int) -> None:
        self._page_in_run(part, [page])

    def _page_in_run(self, part: Partition, pages: list[int]) -> None:
        """Read neighbouring pages whose slots follow each other with one READ.  If it
        fails, each page is read again on its own, so that an error costs
        only the page that has it."""
        n = len(pages)

        def done(status, count, data):
            if status == 0:
                part.counters["page_ins"] += n
                self._install_read(part, pages)
            elif n > 1:
                for page in pages:
                    self._page_in_run(part, [page])
            else:
                self._page_in_failed(part, pages[0], -status if status else errno.EIO)

        first = pages[0]  # (the pages of a run are neighbours)
        payload = part.crc[first : first + n].tobytes() + wire.PAGE_NO.pack(first)
        part.stream.submit(wire.OP_READ, part.slot[pages[0]], n, payload, done)

    def _install_read(self, part: Partition, pages: list[int]) -> None:
        """Map what one READ put into the memory: clean or writable as
        Partition.install_clean says, neighbours with one UFFDIO_CONTINUE."""
        n = len(pages)
        k = part.install_clean(n)  # n, none, or the first page (a probe)
        if n == 1:
            self._install(part, pages[0], True, clean=k == 1)
            return
        first = 0
        if k == 1:
            self._install(part, pages[0], True, clean=True)
            first = 1
        self._install_run(part, pages[first:], k == n)

    def _map(self, w: Worker, page: int, n: int, clean: bool) -> int:
        """UFFDIO_CONTINUE: map n pages that are in the memory into worker w
        (write-protected if clean); OK, EXISTS (mapped already: woken) or
        GONE (the worker is dropped)."""
        r = self._ioctl(w, uffd.continue_, page, n, uffd.CONTINUE_WP if clean else 0)
        if r == uffd.EXISTS:
            r = self._ioctl(w, uffd.wake, page, n)
            r = uffd.EXISTS if r == uffd.OK else r
        return r

    def _install(self, part: Partition, page: int, read: bool,
                 clean: bool | None = None) -> None:  # fmt: skip
        """Map the page into its waiters (the first, else any worker) and
        wake them: zeros (read False, UFFDIO_ZEROPAGE), or what a READ put
        into the memory (UFFDIO_CONTINUE; no worker maps a page of the memory
        until then, for they register MINOR faults too).  A frame is held
        for it already."""
        waiters = part.waiters.pop(page)
        off = page * PAGE_SIZE
        if not read or any(write for _, write in waiters):
            clean = False
        elif clean is None:
            clean = part.install_clean() == 1
        installer = None
        for w in itertools.chain((w for w, _ in waiters), list(part.workers.values())):
            if not w.alive or w.uffd < 0:
                continue
            if read:
                r = self._map(w, page, 1, clean)
            else:
                r = self._ioctl(w, uffd.zeropage, page, 1)
            if r == uffd.GONE:
                continue
            installer = w
            break
        if installer is None:  # nobody left to map it into: the page stays where it was
            part.table[page] = UNTOUCHED if not read else ON_DEVICE
            if read:
                uffd.punch_hole(part.memfd, off, PAGE_SIZE)
            self.pool.release()
            return
        if read and not clean:  # written at once: its device copy is stale
            part.release_slot(page)
        part.table[page] = CLEAN if clean else DIRTY
        part.resident += 1
        self._enqueue(part, page)
        self._map_waiters(waiters, page, clean, skip=installer)

    def _map_waiters(self, waiters: list, page: int, clean: bool, skip: Worker | None) -> None:
        """Map a page now resident into every other worker blocked on it."""
        if len(waiters) == 1 and waiters[0][0] is skip:
            return
        done = {skip}
        for w, _ in waiters:
            if w not in done and w.alive:
                done.add(w)
                self._map(w, page, 1, clean)

    def _install_run(self, part: Partition, pages: list[int], clean: bool) -> None:
        """Map neighbouring pages one READ put into the memory with one
        UFFDIO_CONTINUE into one worker, then into whoever else waits on
        them; other workers map them when they touch them (a MINOR fault).
        Clean ones are mapped write-protected: a waiter that writes takes a
        WP fault and makes its page dirty."""
        first, n = pages[0], len(pages)
        installer = None
        for w in list(part.workers.values()):
            if not w.alive or w.uffd < 0:
                continue
            r = self._map(w, first, n, clean)
            if r == uffd.GONE:
                continue
            if r == uffd.EXISTS:  # cannot be (they are FILLING): page by page, to be sure
                for page in pages:
                    self._install(part, page, True, clean=clean)
                return
            installer = w
            break
        if installer is None:  # nobody left to map them into
            uffd.punch_hole(part.memfd, first * PAGE_SIZE, n * PAGE_SIZE)
            for page in pages:
                part.waiters.pop(page, None)
                part.table[page] = ON_DEVICE
            self.pool.release(n)
            return
        state = CLEAN if clean else DIRTY
        for page in pages:
            if not clean:
                part.release_slot(page)
            part.table[page] = state
            if waiters := part.waiters.pop(page):
                self._map_waiters(waiters, page, clean, skip=installer)
        part.resident += n
        for page in pages:
            self._enqueue(part, page)

    def _enqueue(self, part: Partition, page: int) -> None:
        """A page just installed joins the victim queues: `active` if it was
        evicted no more than a pool's worth of evictions ago (in use), else
        `victims`."""
        stamp = part.evicted_epoch[page]
        if stamp and (self.epoch - (stamp - 1)) % 255 < EPOCHS:
            part.active.append(page)
            part.counters["refaults"] += 1
        else:
            part.victims.append(page)

    def _wake(self, waiters: list, off: int) -> None:
        """Let every worker blocked on the page at `off` retry its access."""
        page = off // PAGE_SIZE
        for w, _ in waiters:
            if w.alive:
                self._ioctl(w, uffd.wake, page, 1)

    def _page_in_failed(self, part: Partition, page: int, err: int) -> None:
        """The device cannot deliver the page: a machine check, never zeros.

        The error record goes into the partition's error log first; then the
        page is poisoned in every worker attached now, so that the access of
        any of them raises SIGBUS at the page and their handler stops them.
        With isolation = "partition" every other worker of the partition is
        stopped too.  Then the page is cleared: its slot is released, and in
        a worker that attaches later it reads as a zero page."""
        error = "checksum" if err == errno.EBADMSG else errno.errorcode.get(err, str(err))
        slot = part.slot[page]
        seq = part.mcelog.write(page, error, part.device.id)
        waiters = part.waiters.pop(page, [])
        part.counters["io_errors"] += 1
        part.counters["machine_checks"] += 1
        record = {
            "seq": seq, "partition": part.name, "page": page, "slot": slot,
            "device": part.device.id, "error": error, "workers": [], "reported_by": [],
            "action": "stop " + ("partition" if part.cfg.isolation == "partition" else "process"),
            "time": time.time(),
        }  # fmt: skip
        self.errors.append(record)
        log.error("partition %s: page %d (device %s slot %d): page-in failed: %s; machine check",
                  part.name, page, part.device.id, slot, error)  # fmt: skip
        touched = {w.id for w, _ in waiters if w.alive}
        for w in list(part.workers.values()):
            # every worker attached now has the page poisoned: whoever touches
            # it is stopped; only workers that attach later see it cleared
            if w.uffd < 0:
                continue
            # no WP marker in the way of the poison
            if (self._ioctl(w, uffd.writeprotect, page, 1, False, False) == uffd.GONE
                    or self._ioctl(w, uffd.poison, page, 1) == uffd.GONE):  # fmt: skip
                continue
            if w.id in touched and w.pid not in record["workers"]:
                record["workers"].append(w.pid)
        if part.cfg.isolation == "partition":
            for w in list(part.workers.values()):
                if w.pid not in record["workers"]:
                    record["workers"].append(w.pid)
                try:
                    signal.pidfd_send_signal(w.pidfd, signal.SIGBUS)
                except OSError:
                    pass
        # clearing: the page starts again as a zero page, its slot is free
        part.table[page] = UNTOUCHED
        if part.release_slot(page) != NO_SLOT and part.stream.service is not None:
            part.stream.submit(wire.OP_DISCARD, slot, 1, None, lambda *a: None)
        self.pool.release()
        self._save_error(record)

    def _save_error(self, record: dict) -> None:
        try:
            with open(os.path.join(self.run_dir, ERROR_LOG), "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            log.error("hypervisor: cannot append to the error log: %s", e.strerror)

    def op_mce(self, conn, msg, fds):
        """A worker's machine-check handler reports (its last words).  Only
        what the hypervisor recorded itself is believed: a report names a
        record of this worker's own partition, or is ignored."""
        w = conn.worker
        if w is None:
            raise wire.ProtocolError("mce from a connection that is no worker")
        page, seq = int(msg["page"]), int(msg.get("seq", 0))
        for record in reversed(self.errors):
            if record["partition"] == w.partition.name and record["page"] == page and (
                    not seq or record["seq"] == seq):  # fmt: skip
                for key in ("reported_by", "workers"):
                    if w.pid not in record[key]:
                        record[key].append(w.pid)
                log.warning("partition %s: worker %d stopped by the machine check at page %d",
                            w.partition.name, w.pid, page)  # fmt: skip
                break
        else:
            log.warning("partition %s: worker %d reports a machine check at page %d that was "
                        "never raised; ignored", w.partition.name, w.pid, page)  # fmt: skip
        return None, ()

    def op_errors(self, conn, msg, fds):
        return {"ok": True, "errors": self.errors}, ()

    def op_slots(self, conn, msg, fds):
        """Where a partition's pages are on its device (for fault injection)."""
        part = self.by_name.get(msg["partition"])
        if part is None:
            raise Refused(f"unknown partition {msg['partition']!r}")
        pages = msg.get("pages") or range(part.pages)
        slots = [[p, part.slot[p]] for p in pages
                 if 0 <= p < part.pages and part.slot[p] != NO_SLOT]  # fmt: skip
        return {"ok": True, "device": str(part.device.path), "slots": slots}, ()

    def replenish(self) -> None:
        """Start evicting until every waiting fault and `reserve` more will
        have a frame; once it must, it evicts a batch more (a low and a high
        watermark), so that write-back goes out in WRITEs of many pages.
        Each victim is the oldest resident page of the partition most over
        its share of the pool: resident pages over weight, so that under
        equal pressure a partition keeps pages in proportion to its weight."""
        pool = self.pool
        # page-outs queued on a stream that does not flow free nothing soon
        coming = sum(p.evicting for p in self.partitions if p.stream.state in FLOWING)
        want = pool.shortfall(self.reserve, coming)
        if want <= 0:
            return
        want += self.batch
        now = time.monotonic()
        looks = {p: p.queued() for p in self.partitions if p.queued()}  # each page once
        chosen: dict[Partition, list[int]] = {}
        while want > 0 and looks:
            if len(looks) == 1:
                part = next(iter(looks))
            else:
                part = max(looks, key=lambda p: p.resident / p.cfg.weight)
            looks[part] -= 1
            if not looks[part]:
                del looks[part]
            page = part.next_victim()
            if part.table[page] == DIRTY and (part.stream.state not in FLOWING
                                              or part.full_until > now):  # fmt: skip
                # it would have to be written, and cannot be now (no service
                # flows for it, or its device was full a moment ago): later
                part.victims.append(page)
                continue
            part.resident -= 1  # (counted now: the next choice sees it)
            chosen.setdefault(part, []).append(page)
            want -= 1
        for part, pages in chosen.items():
            self._evict(part, pages)

    @property
    def batch(self) -> int:
        """Pages evicted beyond the shortfall once eviction must start."""
        return min(WRITE_BATCH, max(1, self.pool.pages // 8))

    def _evict(self, part: Partition, pages: list[int]) -> None:
        """Take the pages from every worker (write-protect them: one ioctl
        for each run of neighbours); clean ones are dropped now, dirty ones
        are PAGING_OUT and written back."""
        pages.sort()
        runs = _runs(pages)
        for w in list(part.workers.values()):
            if w.uffd < 0:
                continue
            for first, n in runs:
                if self._ioctl(w, uffd.writeprotect, first, n, True) == uffd.GONE:
                    break
        span = max(1, self.pool.pages // EPOCHS)  # evictions an epoch
        self.epoch = (self.epoch + (self.evictions + len(pages)) // span
                      - self.evictions // span) % 255  # fmt: skip
        self.evictions += len(pages)
        stamp = 1 + self.epoch
        clean, dirty = [], []
        table, stamps, waiters = part.table, part.evicted_epoch, part.waiters
        for page in pages:
            stamps[page] = stamp
            if table[page] == CLEAN:
                table[page] = ON_DEVICE
                clean.append(page)
            else:
                table[page] = PAGING_OUT
                waiters[page] = []
                dirty.append(page)
        for first, n in _runs(clean):
            uffd.punch_hole(part.memfd, first * PAGE_SIZE, n * PAGE_SIZE)
        if clean:
            part.note_written(False, len(clean))
            part.counters["clean_drops"] += len(clean)
        part.evicting += len(dirty)
        if dirty:
            self._write_back(part, dirty)
        if clean:
            self.pool.release(len(clean))

    def _write_back(self, part: Partition, pages: list[int]) -> None:
        """Write PAGING_OUT pages to new slots, neighbouring ones where the
        device has them, one WRITE a run.  The service writes them from the
        partition's memory and punches them out of it."""
        i = 0
        for page in pages:  # (a dirty page's old copy is stale; normally freed already)
            part.release_slot(page)
        while i < len(pages):
            run = part.alloc_slots(min(WRITE_BATCH, len(pages) - i))
            if run is None and part.slots.retired:  # only retired slots left: another chance
                log.warning("partition %s: device %s has no free slot; its %d retired slots "
                            "are tried again", part.name, part.device.id,
                            part.slots.unretire())  # fmt: skip
                run = part.alloc_slots(min(WRITE_BATCH, len(pages) - i))
            if run is None:  # no free slot left (all set aside or in use)
                for page in pages[i:]:
                    part.evicting -= 1
                    self._page_out_failed(part, page, errno.ENOSPC, wrote=False)
                return
            first, n = run
            chunk = pages[i : i + n]
            i += n
            for k, page in enumerate(chunk):
                part.slot[page] = first + k
            self._submit_write(part, first, chunk)

    def _submit_write(self, part: Partition, first: int, pages: list[int], flags: int = 0) -> None:
        def done(status, count, data):
            retried = req.flags & wire.FLAG_RETRY
            if status and len(pages) > 1 and status != -errno.ENOSPC:
                for k, page in enumerate(pages):  # which page's slot failed: one by one
                    self._submit_write(part, first + k, [page], retried)
                return
            part.evicting -= len(pages)
            if status:
                for page in pages:
                    if retried and not part.in_memory(page):
                        # the service that died wrote it, then punched it;
                        # its copy on the device could not be confirmed: a
                        # page the system cannot deliver, never zeros
                        self._page_in_failed(part, page, -status)
                    else:
                        self._page_out_failed(part, page, -status, alone=len(pages) == 1)
                return
            ended = part.slots.written(first, len(pages))
            if ended:
                log.warning("partition %s: device %s writes again, after %d failed page-outs",
                            part.name, part.device.id, ended)  # fmt: skip
            crcs = data.cast("I")
            crc, table, waiters = part.crc, part.table, part.waiters
            for k, page in enumerate(pages):  # on the device, and gone from memory
                crc[page] = crcs[k]
                table[page] = ON_DEVICE
                if w := waiters.pop(page, None):
                    self._wake(w, page * PAGE_SIZE)
            crcs.release()
            self.pool.release(len(pages))
            part.counters["page_outs"] += len(pages)
            self.replenish()

        req = part.stream.submit(wire.OP_WRITE, first, len(pages),
                                 array.array("I", pages).tobytes(), done, flags)  # fmt: skip

    def _page_out_failed(self, part: Partition, page: int, err: int, wrote: bool = True,
                         alone: bool = False) -> None:  # fmt: skip
        """Nothing is lost: the page stays resident (dirty) and goes to the
        back of the victim queue, and another page is evicted now instead.

        An I/O error sets the slot aside (pyhv.slots: tried again after a
        back-off, or retired): the page's next page-out goes to another slot.
        ENOSPC is the device being full, not the slot being bad; failures in
        a row with no page-out done between are the device failing: either
        way, for a while (growing while it lasts) no dirty page of the
        partition is chosen (clean pages still are), then writing is tried
        again.  An outage is logged when it begins and ends, not a page."""
        part.counters["io_errors"] += 1
        now = time.monotonic()
        if not wrote or err == errno.ENOSPC:
            part.counters["page_out_errors"] += wrote
            part.release_slot(page)
            if part.full_until <= now:  # (once a hold, not once a page)
                hold = part.slots.next_hold()
                part.full_until = now + hold
                log.error("partition %s: page %d: device %s is full (%s); dirty pages stay "
                          "resident, retrying in %gs", part.name, page, part.device.id,
                          "ENOSPC" if wrote else "no usable slot", hold)  # fmt: skip
        else:
            slot, retired = part.slot_failed(page, now, alone)
            self.next_slot_retry = min(self.next_slot_retry, part.slots.next_retry)
            part.counters["page_out_errors"] += 1
            if retired or not part.slots.failing:
                log.error("partition %s: page %d: page-out to device %s slot %d failed: %s; page "
                          "stays resident, slot %s", part.name, page, part.device.id, slot,
                          errno.errorcode.get(err, err),
                          "retired" if retired else "tried again later")  # fmt: skip
            if part.slots.failing and part.full_until <= now:
                hold = part.slots.next_hold()
                part.full_until = now + hold
                log.error("partition %s: device %s failed %d page-outs in a row (%s); dirty "
                          "pages wait %gs before it is tried again", part.name, part.device.id,
                          part.slots.failing_in_row, errno.errorcode.get(err, err),
                          hold)  # fmt: skip
        part.table[page] = DIRTY
        part.resident += 1
        part.victims.append(page)
        off = page * PAGE_SIZE
        self._wake(part.waiters.pop(page, []), off)
        self.replenish()

    # --- status ---------------------------------------------------------------

    def status(self) -> dict:
        resident = sum(p.resident for p in self.partitions)
        return {
            "ok": True,
            "pid": os.getpid(),
            "run_dir": self.run_dir,
            "uptime": time.time() - self.started,
            "state": "stopping" if self.stopping else "running",
            "pool": {
                "size_bytes": self.pool.pages * PAGE_SIZE,
                "page_size": PAGE_SIZE,
                "pages": self.pool.pages,
                "resident_pages": resident,
                "frames_used": self.pool.used,
                "frames_high_water": self.pool.high_water,
                "fault_waiters": len(self.pool.waiters),
            },
            "partitions": [p.status() for p in self.partitions],
            "paging_services": [s.status() for s in self.services.values()],
            "devices": [vcp.device_row(self, d) for d in self.devices.values()],
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pyhv-hypervisor")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--ready-fd", type=int, default=-1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    # three fds a partition (memory, error log, device lock) and one a worker
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = Config.from_dict(json.load(f))
    hv = Hypervisor(os.path.abspath(args.run_dir), config)
    try:
        hv.start(args.ready_fd)
    except (OSError, Refused) as e:
        msg = f"cannot start: {e}"
        log.error("hypervisor: %s", msg)
        if args.ready_fd >= 0:
            os.write(args.ready_fd, f"error {msg}\n".encode())
        return 1
    hv.run()
    return 1 if hv.failed else 0
