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
the oldest resident page when there is none), fills it with zeros on first
touch or with the page read through the partition's stream, and installs it
atomically with UFFDIO_ZEROPAGE/UFFDIO_COPY.  Pages read from the device are
installed write-protected: the first write is seen (a WP fault) and marks the
page dirty, so clean pages are dropped at eviction with no I/O.  Eviction
write-protects the page in every worker, writes it out if dirty, punches it
out of the memfd, and wakes whoever blocked on it meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import logging
import mmap
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

from pyhv import uffd, wire
from pyhv.config import Config
from pyhv.pool import Pool
from pyhv.uffd import PAGE_SIZE

log = logging.getLogger("pyhv.hypervisor")

# page states, one byte per page
UNTOUCHED, DIRTY, CLEAN, FILLING, PAGING_OUT, ON_DEVICE, POISONED = range(7)
STATE_NAMES = ("untouched", "dirty", "clean", "filling", "paging_out", "on_device", "poisoned")

STREAM_STATES = ("INVALID", "ENABLED", "ABORTED", "SUSPENDING", "SUSPENDED", "RESUMED", "COMPLETED")

CONTROL_SOCKET = "control.sock"
PID_FILE = "hypervisor.pid"
LOG_FILE = "hypervisor.log"
EVICT_AHEAD = 16  # pages paged out ahead of demand once the pool is full


class Worker:
    __slots__ = ("id", "pid", "partition", "conn", "uffd", "base", "alive")

    def __init__(self, wid: int, pid: int, partition: "Partition", conn: socket.socket):
        self.id = wid
        self.pid = pid
        self.partition = partition
        self.conn = conn
        self.uffd = -1
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
        self.table = bytearray(self.pages)
        self.waiters: dict[int, list] = {}  # page -> [(worker, write)] while filling/out
        self.workers: dict[int, Worker] = {}
        self.service: "PagingService | None" = None
        self.stream_state = "INVALID"
        self.stream_transitions = 0
        self.stream_changed = time.time()
        self.resident = 0
        self.counters = collections.Counter()

    def set_stream_state(self, state: str) -> None:
        if state != self.stream_state:
            log.info("partition %s: stream %s -> %s", self.name, self.stream_state, state)
            self.stream_state = state
            self.stream_transitions += 1
            self.stream_changed = time.time()

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
            "clean_drops": c["clean_drops"],
            "wp_faults": c["wp_faults"],
            "io_errors": c["io_errors"],
            "machine_checks": c["machine_checks"],
            "device": self.cfg.device,
            "paging": self.cfg.paging,
            "workers": sorted(w.pid for w in self.workers.values()),
            "pages_by_state": {
                STATE_NAMES[s]: n
                for s in range(len(STATE_NAMES))
                if (n := self.table.count(s))
            },
        }


class PagingService:
    """The hypervisor's end of one paging service process and its streams."""

    def __init__(self, hv: "Hypervisor", cfg):
        self.hv = hv
        self.cfg = cfg
        self.name = cfg.name
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.state = "stopped"
        self.pending: dict[int, tuple] = {}
        self.outq: collections.deque = collections.deque()
        self.next_req = 1
        self.requests = 0
        self.scratch = mmap.mmap(-1, wire.MAX_FRAME)
        self.scratch_view = memoryview(self.scratch)
        self.scratch_addr = uffd.address_of(self.scratch)
        self.hdr = bytearray(wire.HEADER.size)

    def start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        logf = open(os.path.join(self.hv.run_dir, f"service-{self.name}.log"), "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyhv.service", "--name", self.name,
                 "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            )  # fmt: skip
        finally:
            theirs.close()
            logf.close()
        mine.setblocking(False)
        self.sock = mine
        self.state = "running"
        self.hv.sel.register(mine, selectors.EVENT_READ, self.on_event)
        log.info("paging service %s: started, pid %d", self.name, self.proc.pid)

    def submit(self, stream: int, op: int, slot: int, count: int, payload, callback) -> None:
        """Queue one request; callback(status, count, data_addr, data_len) on reply."""
        req = self.next_req
        self.next_req += 1
        self.requests += 1
        self.pending[req] = (callback, stream, op)
        frame = [wire.pack_header(req, stream, op, 0, slot, count)]
        if payload is not None:
            frame.append(payload)
        if self.outq:
            self.outq.append(frame)
            return
        try:
            self.sock.sendmsg(frame)
        except BlockingIOError:
            self.outq.append(frame)
            self.hv.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                               self.on_event)  # fmt: skip

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_out()
        if mask & selectors.EVENT_READ:
            self._drain()

    def _flush_out(self) -> None:
        while self.outq:
            try:
                self.sock.sendmsg(self.outq[0])
            except BlockingIOError:
                return
            except OSError:
                self.outq.clear()
                return
            self.outq.popleft()
        self.hv.sel.modify(self.sock, selectors.EVENT_READ, self.on_event)

    def _drain(self) -> None:
        while self.sock is not None:
            try:
                n, _, _, _ = self.sock.recvmsg_into([self.hdr, self.scratch_view])
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:
                self.died()
                return
            req, stream, op, _f, status, slot, count, _crc = wire.unpack_header(self.hdr)
            entry = self.pending.pop(req, None)
            if entry is None:
                log.error("paging service %s: reply to unknown request %d", self.name, req)
                continue
            entry[0](status, count, self.scratch_addr, n - wire.HEADER.size)

    def died(self) -> None:
        if self.sock is None:
            return
        self.hv.sel.unregister(self.sock)
        self.sock.close()
        self.sock = None
        self.state = "dead" if not self.hv.stopping else "stopped"
        self.outq.clear()
        if self.pending and not self.hv.stopping:
            log.error("paging service %s: gone with %d requests in flight", self.name,
                      len(self.pending))  # fmt: skip
        for p in self.hv.partitions:
            if p.service is self:
                p.set_stream_state("ABORTED" if not self.hv.stopping else "COMPLETED")

    def status(self) -> dict:
        return {
            "name": self.name,
            "pid": self.proc.pid if self.proc else None,
            "state": self.state,
            "requests": self.requests,
            "in_flight": len(self.pending),
            "streams": [
                {
                    "partition": p.name,
                    "state": p.stream_state,
                    "transitions": p.stream_transitions,
                    "last_transition": p.stream_changed,
                }
                for p in self.hv.partitions
                if p.service is self
            ],
        }


class Hypervisor:
    def __init__(self, run_dir: str, config: Config):
        self.run_dir = run_dir
        self.config = config
        self.sel = selectors.DefaultSelector()
        self.pool = Pool(config.pool_size // PAGE_SIZE)
        # frames kept free (or being freed) ahead of demand once the pool is full
        self.reserve = min(EVICT_AHEAD, max(1, self.pool.pages // 8))
        self.devices = {d.id: d for d in config.devices}
        self.services = {s.name: PagingService(self, s) for s in config.services}
        self.partitions = [
            Partition(i, p, self.devices[p.device]) for i, p in enumerate(config.partitions)
        ]
        self.by_name = {p.name: p for p in self.partitions}
        self.faults = uffd.FaultBuffer(256)
        self.stopping = False
        self.done = False
        self.started = time.time()
        self.next_worker = 1
        self.ready_fd = -1
        self.opening = 0
        self.listener: socket.socket | None = None
        self.control_handlers = {
            "status": self.op_status,
            "shutdown": self.op_shutdown,
            "attach": self.op_attach,
            "register": self.op_register,
            "partition": self.op_partition,
        }

    # --- start and stop ---------------------------------------------------

    def start(self, ready_fd: int = -1) -> None:
        self.ready_fd = ready_fd
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
            self.open_stream(part, self.services[part.cfg.paging[0]])
        log.info("hypervisor: pid %d, pool %d pages, %d partitions", os.getpid(), self.pool.pages,
                 len(self.partitions))  # fmt: skip

    def open_stream(self, part: Partition, svc: PagingService) -> None:
        dev = part.device
        spec = {"id": dev.id, "path": str(dev.path), "kind": dev.kind, "size": dev.size,
                "direct": dev.direct}  # fmt: skip
        part.service = svc
        self.opening += 1

        def opened(status, count, addr, n):
            self.opening -= 1
            if status:
                msg = f"partition {part.name}: device {dev.id} ({dev.path}): {os.strerror(-status)}"
                log.error("%s", msg)
                part.set_stream_state("ABORTED")
                self._not_ready(msg)
                return
            part.set_stream_state("ENABLED")
            if self.opening == 0:
                self._ready()

        svc.submit(part.index, wire.OP_OPEN, 0, 0, json.dumps(spec).encode(), opened)

    def _ready(self) -> None:
        if self.ready_fd >= 0:
            os.write(self.ready_fd, b"ready\n")
            os.close(self.ready_fd)
            self.ready_fd = -1
        log.info("hypervisor: ready")

    def _not_ready(self, msg: str) -> None:
        if self.ready_fd >= 0:
            os.write(self.ready_fd, f"error {msg}\n".encode())
            os.close(self.ready_fd)
            self.ready_fd = -1
        self.shutdown()

    def run(self) -> None:
        while not self.done:
            timeout = 0.5 if self.stopping else None
            for key, mask in self.sel.select(timeout):
                try:
                    key.data(mask)
                except Exception:  # a bug must not take every partition down
                    log.exception("hypervisor: handler for fd %d failed", key.fd)
            if self.stopping:
                self._stop_progress()
        self._finish()

    def shutdown(self) -> None:
        """Begin an orderly stop: workers go, streams flush and complete."""
        if self.stopping:
            return
        log.info("hypervisor: shutting down")
        self.stopping = True
        self.stop_deadline = time.monotonic() + 15
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
        for part in self.partitions:
            for w in list(part.workers.values()):
                self._drop_worker(w, "its memory is gone")
        for part in self.partitions:
            svc = part.service
            if svc is not None and svc.sock is not None and part.stream_state == "ENABLED":
                part.set_stream_state("SUSPENDING")
                svc.submit(part.index, wire.OP_FLUSH, 0, 0, None,
                           lambda st, c, a, n, part=part: part.set_stream_state("COMPLETED"))  # fmt: skip

    def _stop_progress(self) -> None:
        busy = any(s.pending for s in self.services.values() if s.sock is not None)
        if busy and time.monotonic() < self.stop_deadline:
            return
        for svc in self.services.values():
            if svc.sock is not None:
                svc.died()
        self.done = True

    def _finish(self) -> None:
        for svc in self.services.values():
            if svc.proc is not None:
                try:
                    svc.proc.wait(5)
                except subprocess.TimeoutExpired:
                    svc.proc.kill()
                    svc.proc.wait()
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
                    if svc.proc is not None and svc.proc.poll() is not None and svc.state == "running":
                        log.error("paging service %s: exited with %s", svc.name, svc.proc.returncode)
                        svc.died()
            else:
                log.info("hypervisor: signal %d", signum)
                self.shutdown()

    # --- control connections ----------------------------------------------

    def on_accept(self, mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, OSError):
            return
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, lambda m, c=conn: self.on_control(c))

    def _close_conn(self, conn: socket.socket) -> None:
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def on_control(self, conn: socket.socket) -> None:
        try:
            msg, fds = wire.recv_control(conn)
        except BlockingIOError:
            return
        except (wire.ProtocolError, OSError) as e:
            log.warning("control: dropping a connection: %s", e)
            self._drop_conn(conn, f"protocol error: {e}")
            return
        if msg is None:
            self._drop_conn(conn, "connection closed")
            return
        op = msg.get("op")
        handler = self.control_handlers.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                raise wire.ProtocolError(f"unknown op {op!r}")
            reply, reply_fds = handler(conn, msg, fds)
        except (wire.ProtocolError, KeyError, TypeError, ValueError) as e:
            wire.close_fds(fds)
            log.warning("control: bad request %r: %s", op, e)
            self._reply(conn, {"ok": False, "error": str(e)})
            self._drop_conn(conn)
            return
        if reply is not None:
            self._reply(conn, reply, reply_fds)

    def _reply(self, conn: socket.socket, reply: dict, fds=()) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(2)
            wire.send_control(conn, reply, fds)
            conn.setblocking(False)
        except OSError as e:
            log.warning("control: reply lost: %s", e)

    def _drop_conn(self, conn: socket.socket, why: str = "connection dropped") -> None:
        for part in self.partitions:
            for w in list(part.workers.values()):
                if w.conn is conn:
                    self._drop_worker(w, why)
                    return
        self._close_conn(conn)

    def op_status(self, conn, msg, fds):
        return self.status(), ()

    def op_shutdown(self, conn, msg, fds):
        self.shutdown()
        return {"ok": True, "pid": os.getpid()}, ()

    def op_partition(self, conn, msg, fds):
        part = self.by_name.get(msg["name"])
        if part is None:
            return {"ok": False, "error": f"unknown partition {msg['name']!r}"}, ()
        return {"ok": True, "partition": part.status()}, ()

    def op_attach(self, conn, msg, fds):
        wire.close_fds(fds)
        name = msg["partition"]
        pid = int(msg["pid"])
        part = self.by_name.get(name)
        if part is None:
            return {"ok": False, "error": f"unknown partition {name!r}"}, ()
        if self.stopping:
            return {"ok": False, "error": "the hypervisor is shutting down"}, ()
        if any(w.conn is conn for p in self.partitions for w in p.workers.values()):
            raise wire.ProtocolError("this connection is attached already")
        w = Worker(self.next_worker, pid, part, conn)
        self.next_worker += 1
        part.workers[w.id] = w
        return {"ok": True, "worker": w.id, "size": part.cfg.memory, "page_size": PAGE_SIZE,
                "features": uffd.feature_mask(uffd.WORKER_FEATURES)}, (part.memfd,)  # fmt: skip

    def op_register(self, conn, msg, fds):
        w = next((w for p in self.partitions for w in p.workers.values() if w.conn is conn), None)
        if w is None or w.uffd >= 0 or len(fds) != 1:
            wire.close_fds(fds)
            raise wire.ProtocolError("register without attach, twice, or without one uffd")
        w.uffd = fds[0]
        w.base = int(msg["base"])
        os.set_blocking(w.uffd, False)
        part = w.partition
        # Clean pages must fault on this worker's first write too.
        page = 0
        while (page := part.table.find(CLEAN, page)) >= 0:
            uffd.writeprotect(w.uffd, w.base + page * PAGE_SIZE, PAGE_SIZE, True)
            page += 1
        self.sel.register(w.uffd, selectors.EVENT_READ, lambda m, w=w: self.on_uffd(w))
        log.info("partition %s: worker %d (pid %d) attached", part.name, w.id, w.pid)
        return {"ok": True}, ()

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
        self._close_conn(w.conn)
        log.info("partition %s: worker %d (pid %d) detached: %s", part.name, w.id, w.pid, why)

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
            if m.event == uffd.EVENT_PAGEFAULT:
                self.fault(w, m.a, m.b)
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
        start = w.base + page * PAGE_SIZE
        st = part.table[page]
        if flags & uffd.FLAG_WP:
            part.counters["wp_faults"] += 1
            if st == CLEAN or st == DIRTY:
                part.table[page] = DIRTY
                if uffd.writeprotect(w.uffd, start, PAGE_SIZE, False) == uffd.GONE:
                    self._drop_worker(w, "its memory is gone")
            elif st == PAGING_OUT or st == FILLING:
                part.waiters[page].append((w, True))
            elif uffd.wake(w.uffd, start, PAGE_SIZE) == uffd.GONE:
                self._drop_worker(w, "its memory is gone")
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
                if pool.pages - pool.used < self.reserve:
                    self._replenish()
            else:
                pool.waiters.append(lambda: fill(part, page))
                self._replenish()
        elif st == FILLING or st == PAGING_OUT:
            part.waiters[page].append((w, bool(flags & uffd.FLAG_WRITE)))
        elif st == POISONED:
            if uffd.poison(w.uffd, start, PAGE_SIZE) == uffd.GONE:
                self._drop_worker(w, "its memory is gone")
        elif uffd.wake(w.uffd, start, PAGE_SIZE) == uffd.GONE:  # raced with an install
            self._drop_worker(w, "its memory is gone")

    def _zero_fill(self, part: Partition, page: int) -> None:
        self._install(part, page, None)

    def _page_in(self, part: Partition, page: int) -> None:
        def done(status, count, addr, n):
            if status == 0 and n == PAGE_SIZE:
                part.counters["page_ins"] += 1
                self._install(part, page, addr)
            else:
                self._page_in_failed(part, page, -status if status else errno.EIO)

        self._submit(part, wire.OP_READ, page, 1, None, done)

    def _submit(self, part: Partition, op: int, slot: int, count: int, payload, done) -> None:
        part.service.submit(part.index, op, slot, count, payload, done)

    def _install(self, part: Partition, page: int, src: int | None) -> None:
        """Map the page (zeros if src is None, else PAGE_SIZE bytes at src) and
        wake everyone waiting for it.  A frame is held for it already."""
        waiters = part.waiters.pop(page)
        off = page * PAGE_SIZE
        clean = src is not None and not any(write for _, write in waiters)
        first = waiters[0][0]
        if clean:  # before the page appears, so no worker can write it unseen
            for w in list(part.workers.values()):
                if w is not first and w.uffd >= 0:
                    if uffd.writeprotect(w.uffd, w.base + off, PAGE_SIZE, True) == uffd.GONE:
                        self._drop_worker(w, "its memory is gone")
        installer = None
        candidates = [w for w, _ in waiters if w.alive] + list(part.workers.values())
        for w in candidates:
            if not w.alive or w.uffd < 0:
                continue
            dst = w.base + off
            if src is None:
                r = uffd.zeropage(w.uffd, dst, PAGE_SIZE)
            else:
                r = uffd.copy(w.uffd, dst, src, PAGE_SIZE, uffd.COPY_WP if clean else 0)
            if r == uffd.GONE:
                self._drop_worker(w, "its memory is gone")
                continue
            installer = w
            break
        if installer is None:  # nobody left to map it into: the page stays where it was
            part.table[page] = UNTOUCHED if src is None else ON_DEVICE
            self.pool.release()
            return
        part.table[page] = CLEAN if clean else DIRTY
        part.resident += 1
        self.pool.victims.append((part, page))
        for w, _ in waiters:
            if w is not installer and w.alive:
                if uffd.wake(w.uffd, w.base + off, PAGE_SIZE) == uffd.GONE:
                    self._drop_worker(w, "its memory is gone")

    def _page_in_failed(self, part: Partition, page: int, err: int) -> None:
        """The device cannot deliver the page: never hand out zeros.  The
        page is poisoned, so its next access is a machine check (SIGBUS)."""
        part.counters["io_errors"] += 1
        part.counters["machine_checks"] += 1
        log.error("partition %s: page %d: page-in failed: %s", part.name, page,
                  errno.errorcode.get(err, err))  # fmt: skip
        waiters = part.waiters.pop(page, [])
        part.table[page] = POISONED
        self.pool.release()
        for w, _ in waiters:
            if w.alive and uffd.poison(w.uffd, w.base + page * PAGE_SIZE, PAGE_SIZE) == uffd.GONE:
                self._drop_worker(w, "its memory is gone")

    def _replenish(self) -> None:
        """Start evicting the oldest resident pages until every waiting fault
        and `reserve` more will have a frame."""
        pool = self.pool
        want = pool.shortfall(self.reserve)
        while want > 0 and pool.victims:
            part, page = pool.victims.popleft()
            self._evict(part, page)
            want -= 1

    def _evict(self, part: Partition, page: int) -> None:
        off = page * PAGE_SIZE
        for w in list(part.workers.values()):
            if w.uffd >= 0 and uffd.writeprotect(w.uffd, w.base + off, PAGE_SIZE, True) == uffd.GONE:
                self._drop_worker(w, "its memory is gone")
        part.resident -= 1
        if part.table[page] == CLEAN:
            uffd.punch_hole(part.memfd, off, PAGE_SIZE)
            part.table[page] = ON_DEVICE
            part.counters["clean_drops"] += 1
            self.pool.release()
            return
        part.table[page] = PAGING_OUT
        part.waiters[page] = []
        self.pool.evicting += 1

        def done(status, count, addr, n):
            self.pool.evicting -= 1
            if status:
                self._page_out_failed(part, page, -status)
                return
            uffd.punch_hole(part.memfd, off, PAGE_SIZE)
            part.table[page] = ON_DEVICE
            part.counters["page_outs"] += 1
            for w, _ in part.waiters.pop(page, []):
                if w.alive and uffd.wake(w.uffd, w.base + off, PAGE_SIZE) == uffd.GONE:
                    self._drop_worker(w, "its memory is gone")
            self.pool.release()
            self._replenish()

        self._submit(part, wire.OP_WRITE, page, 1, part.view[off : off + PAGE_SIZE], done)

    def _page_out_failed(self, part: Partition, page: int, err: int) -> None:
        """Nothing is lost: the page stays resident (dirty) and goes to the
        back of the victim queue; another page is evicted instead."""
        part.counters["io_errors"] += 1
        log.error("partition %s: page %d: page-out failed: %s; page stays resident", part.name,
                  page, errno.errorcode.get(err, err))  # fmt: skip
        part.table[page] = DIRTY
        part.resident += 1
        self.pool.victims.append((part, page))
        off = page * PAGE_SIZE
        for w, _ in part.waiters.pop(page, []):
            if w.alive and uffd.wake(w.uffd, w.base + off, PAGE_SIZE) == uffd.GONE:
                self._drop_worker(w, "its memory is gone")
        self._replenish()

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
            "devices": [
                {"id": d.id, "path": str(d.path), "type": d.kind, "size_bytes": d.size,
                 "services": d.services,
                 "partition": next((p.name for p in self.partitions if p.device is d), None)}
                for d in self.devices.values()
            ],  # fmt: skip
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pyhv-hypervisor")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--ready-fd", type=int, default=-1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = Config.from_dict(json.load(f))
    hv = Hypervisor(os.path.abspath(args.run_dir), config)
    try:
        hv.start(args.ready_fd)
    except OSError as e:
        msg = f"cannot start: {e}"
        log.error("hypervisor: %s", msg)
        if args.ready_fd >= 0:
            os.write(args.ready_fd, f"error {msg}\n".encode())
        return 1
    hv.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
