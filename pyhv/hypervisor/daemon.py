"""The hypervisor daemon: one per system, one selector loop, and the fault
engine's thread beside it.

The Hypervisor is assembled from its rooms, each a file of this package:

* control       the control socket: control-point clients and workers
                (attach, register: the worker's uffd proved, then the engine's)
* engine        the engine's Python side: eviction in batches, write-back,
                the engine's events
* victims       the eviction policy's judgement: each partition's share
* streams       paging services, failover, controlled shutdown
* machine_check pages that cannot be delivered
* workers       forked children adopted, loans (discard, pressure), advice
* suspend       suspend and resume, holding a partition still for a snapshot
* migrate       export and import through a shared paging device
* recovery      surviving a crash: what the supervisor keeps, taking over
* vcp           control-point operations (pool, partitions, devices, services)
* partition     a partition: memory, page table handle, device slots
* daemon        this file: the loop, start and stop, signals, deadlines

The per-fault work is C (csrc/engine.c); here it is never done once a fault.
Each kind of file descriptor has one handler, dispatched from the selector's
``data``: the control socket, a control connection, a paging service's
stream socket, the engine's eventfd, the signal wake-up socket.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import resource
import selectors
import signal
import socket
import sys
import time

from pyhv import uffd, wire
from pyhv.claim import ClaimError, Claims
from pyhv.hypervisor import vcp
from pyhv.config import Config
from pyhv.hypervisor.access import AccessRoom
from pyhv.hypervisor import victims
from pyhv.hypervisor.control import ControlRoom
from pyhv.hypervisor.engine import EngineSide
from pyhv.hypervisor.machine_check import MachineChecks
from pyhv.hypervisor.partition import Partition, Worker
from pyhv.hypervisor.streams import PagingServices
from pyhv.hypervisor.migrate import MigrationRoom
from pyhv.hypervisor.recovery import RecoveryRoom, restart_counts
from pyhv.hypervisor.suspend import SuspendRoom
from pyhv.hypervisor.workers import PROBE_EVERY, WorkerRoom
from pyhv.supervisor import kept_items
from pyhv.stream import ABORTED, COMPLETED, FLOWING, Request, ServiceLink, Stream
from pyhv.uffd import PAGE_SIZE
from pyhv.hypervisor.vcp import Refused

log = logging.getLogger("pyhv.hypervisor")

CONTROL_SOCKET = "control.sock"
PID_FILE = "hypervisor.pid"
LOG_FILE = "hypervisor.log"


class Hypervisor(ControlRoom, EngineSide, PagingServices, MachineChecks, WorkerRoom, SuspendRoom,
                 MigrationRoom, RecoveryRoom, AccessRoom):  # fmt: skip
    def __init__(self, run_dir: str, config: Config, keeper: socket.socket | None = None,
                 kept: dict | None = None, restarts: int = 0):  # fmt: skip
        """keeper: the socket to the supervisor (None: not supervised);
        kept and restarts: what it kept, after a crash (pyhv.hypervisor.recovery)."""
        self.run_dir = run_dir
        self.config = config
        self.keeper = keeper
        self.kept = dict(kept or {})
        self.restarts = restarts
        self.recovered: dict = {}
        self.awaiting_rejoin: set[Worker] = set()
        self.sel = selectors.DefaultSelector()
        self.timers: list = []  # (when, action): run once time.monotonic() passes when
        pool_pages = config.pool_size // PAGE_SIZE
        self.engine = uffd.Engine(pool_pages, victims.reserve(pool_pages), config.poll_us)
        self.devices = {d.id: d for d in config.devices}
        self.services = {s.name: ServiceLink(self, s) for s in config.services}
        self.partitions: list[Partition] = []
        self.by_name: dict[str, Partition] = {}
        self.by_index: dict[int, Partition] = {}  # by stream id, as the engine names them
        self.workers_by_id: dict[int, Worker] = {}
        self.next_index = 0
        self.lost: list[str] = []  # partitions a crash took (not kept whole)
        for p in config.partitions:
            if restarts and not all(f"p/{p.name}/{k}" in self.kept for k in ("mem", "table")):
                self._lose(p.name, "its memory and page table were not kept")
                continue
            try:
                self._new_partition(p, self.devices[p.device])
            except Exception as e:  # (a kept table that is no table: this one, not all)
                if not restarts:
                    raise
                self._lose(p.name, f"its kept page table cannot be used ({e})")
        self.locks: dict[str, int] = {}  # device id -> fd holding its flock
        self.claims = Claims(run_dir)  # devices on NBD servers: their claims (pyhv.claim)
        self.expiring = False  # a partition with io_timeout waits for a path
        self.next_slot_retry = math.inf  # the earliest Partition.slot_retry_at
        self.next_pool_check = 0.0
        self.stopping = False
        self.done = False
        self.failed: str | None = None  # why start-up failed
        self.started = time.time()
        self.next_worker = 1
        self.ready_fd = -1
        self.listener: socket.socket | None = None
        self.conns: dict = {}
        self.partial: set = set()  # connections in the middle of a long request
        self.reply_bytes = 0  # queued in every Control.out together
        self.pending_ops: list = []  # (predicate, action) of operations still under way
        self.unidentified: set[Worker] = set()  # forked children whose pid is not known yet
        self.next_probe = 0.0
        self.pressure_until = 0.0  # eviction waits for loans asked until then
        self.errors: list[dict] = []  # machine-check records, oldest first
        self.control_handlers = self.control_handlers()

    @property
    def pool_pages(self) -> int:
        return self.engine.pool()["pages"]

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
        self.engine.start()
        self.sel.register(self.engine.notify_fd, selectors.EVENT_READ, self.on_engine)
        for part in self.partitions:
            self.keep_partition(part)
        if self.restarts:
            self.recover()
        self.save_config()
        path = os.path.join(self.run_dir, CONTROL_SOCKET)
        if os.path.exists(path):
            os.unlink(path)
        self.listener = wire.listen(path)
        self.share_run_dir()
        self.sel.register(self.listener, selectors.EVENT_READ, self.on_accept)
        with open(os.path.join(self.run_dir, PID_FILE), "w") as f:
            os.fchmod(f.fileno(), 0o644)  # (a pid is no secret; a worker's attach reads it)
            f.write(f"{os.getpid()}\n")
        for svc in self.services.values():
            svc.start()
        for part in self.partitions:
            self.place(part.stream)
        self.after(lambda: all(s.state in FLOWING or self._unopened(s) for s in self.streams()),
                   self._started)  # fmt: skip
        log.info("hypervisor: pid %d, pool %d pages, %d partitions", os.getpid(), self.pool_pages,
                 len(self.partitions))  # fmt: skip

    def lock_device(self, dev) -> None:
        """Hold an exclusive lock on the device for as long as this system
        uses it: a second system cannot page to it.  An export on an NBD
        server is claimed in the export itself (pyhv.claim)."""
        if dev.kind == "nbd":
            try:
                self.claims.acquire(dev)
            except ClaimError as e:
                raise Refused(str(e)) from None
            return
        flags = os.O_RDONLY | os.O_CLOEXEC
        if dev.kind == "file":
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        fd = self.take_kept(f"d/{dev.id}")  # (after a crash: the lock the supervisor held)
        if fd < 0:
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
        self.keep(f"d/{dev.id}", fd)

    def unlock_device(self, dev) -> None:
        if dev.kind == "nbd":
            self.claims.release(dev.id)
        fd = self.locks.pop(dev.id, None)
        if fd is not None:
            self.unkeep(f"d/{dev.id}")
            os.close(fd)

    @staticmethod
    def _unopened(stream: Stream) -> bool:
        """Its device could not be opened, and no service is trying now (one
        ABORTED while its other service opens it, after the first failed or
        hung, is on its way)."""
        return stream.state == ABORTED and stream.service is None

    def _started(self) -> None:
        bad = [s for s in self.streams() if self._unopened(s)]
        if bad and not self.restarts:
            self._not_ready(f"partition {bad[0].name}: its device cannot be opened by "
                            f"{', '.join(bad[0].paging)} (see the service log)")  # fmt: skip
            return
        for s in bad:  # after a crash, stopping would lose every partition: paging waits
            log.error("partition %s: its device cannot be opened by %s now; its paging waits "
                      "for a service (pyhv service start)", s.name, ", ".join(s.paging))  # fmt: skip
        self._ready()

    def _ready(self) -> None:
        self.tell_supervisor("ready")
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

    def later(self, seconds: float, action) -> None:
        """Run action once, `seconds` from now (at the loop's next turn after)."""
        self.timers.append((time.monotonic() + seconds, action))

    def _run_pending(self) -> None:
        now = time.monotonic()
        due = [t for t in self.timers if t[0] <= now]
        if due:
            self.timers = [t for t in self.timers if t[0] > now]
            for _, action in due:
                try:  # (one that fails must not lose the others: someone waits on each)
                    action()
                except Exception:
                    log.exception("hypervisor: a timed operation failed")
        while True:
            ready = [op for op in self.pending_ops if op[0]()]
            if not ready:
                return
            for op in ready:
                self.pending_ops.remove(op)
                op[1]()

    def run(self) -> None:
        """The loop: no fault passes through it (the engine's thread resolves
        them), so it sleeps until something needs Python."""
        while not self.done:
            wait = min((t[0] for t in self.timers), default=math.inf) - time.monotonic()
            tick = 0.05 if self.expiring else 1.0  # io_timeout is kept to this
            events = self.sel.select(max(0.0, min(tick, wait)))
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
        self.save_config()  # (an operation that ended meanwhile may have changed it)
        self._check_partial(now)
        if now >= self.next_slot_retry:  # slots that failed a write are tried again
            for part in self.partitions:
                part.slots.retry(now)
            self.next_slot_retry = min((p.slots.next_retry for p in self.partitions),
                                       default=math.inf)  # fmt: skip
        if self.unidentified and now >= self.next_probe:
            self.next_probe = now + PROBE_EVERY
            self.probe_children()
        self.check_claims()
        self.expiring = False
        for part in self.partitions:  # [[device]] io_timeout: page-ins waiting for a path
            limit = part.device.io_timeout
            if limit and part.eng is not None and part.stream.path_wait:
                self.expiring = True
                if self.engine.expire_reads(part.eng, limit):
                    log.error("partition %s: page-ins waited for a path to device %s longer "
                              "than io_timeout (%gs): machine checks", part.name,
                              part.device.id, limit)  # fmt: skip
        if now >= self.next_pool_check:  # faults waiting for a frame: a full device may have room
            self.next_pool_check = now + 0.1
            self.replenish()
        for svc in self.services.values():  # stopping ones too: a hung stop fails over
            if svc.sock is not None and svc.oldest_age(now) > svc.cfg.timeout:
                self.service_failed(svc, f"no answer within {svc.cfg.timeout:g}s")

    def shutdown(self) -> None:
        """Begin an orderly stop: workers go, then every stream completes its
        paging in flight, is flushed and ends COMPLETED; then the services."""
        if self.stopping:
            return
        log.info("hypervisor: shutting down")
        self.stopping = True
        self.tell_supervisor("stopping")
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
        for part in self.partitions:
            workers = list(part.workers.values())
            for w in workers:
                self._drop_worker(w, "the system is shutting down")
            if part.state != "active":  # stopped workers go on, see the end, and exit 70
                self._signal_workers(workers, signal.SIGCONT)
                part.state = "active"
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
                self.closed_without_answer(svc)
        self.done = True

    def _finish(self) -> None:
        for svc in self.services.values():
            svc.close(kill=False)
        self.engine.close()
        self.claims.close()
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

    # --- partitions ------------------------------------------------------------

    def _lose(self, name: str, why: str) -> None:
        """After a crash, a partition that cannot be taken over: it is not
        made anew (an empty table would read its pages on the device as
        zeros); its workers are refused and exit 70, its device is left as
        it is, and the config no longer has it."""
        log.error("partition %s: lost in the crash: %s; not recovered (its workers exit 70, "
                  "its device is left as it was)", name, why)  # fmt: skip
        self.lost.append(name)

    def _new_partition(self, cfg, dev) -> Partition:
        part = Partition(self.next_index, cfg, dev, self.engine,
                         lambda what: self.take_kept(f"p/{cfg.name}/{what}"))  # fmt: skip
        self.next_index += 1
        self.partitions.append(part)
        self.by_name[part.name] = part
        self.by_index[part.index] = part
        part.stream.changed = self._stream_changed
        if dev.kind == "nbd":  # no request goes to a device this system may not hold
            part.stream.gate = lambda s=part.stream: not self.held_back(s)
        if cfg.snapshot and cfg.prefetch:
            self.warm_from_snapshot(part)
        return part

    def add_partition(self, cfg, dev) -> Partition:
        part = self._new_partition(cfg, dev)
        self.keep_partition(part)
        log.info("partition %s: added (%d pages, device %s, paging %s)", part.name, part.pages,
                 dev.id, ", ".join(cfg.paging))  # fmt: skip
        self.place(part.stream)
        return part

    def remove_partition(self, part: Partition) -> None:
        """Deactivate a partition that has no worker and nothing in flight:
        its frames go back to the pool, its memory and device are let go."""
        svc = part.stream.service
        if svc is not None and svc.sock is not None:
            svc.send(part.stream, Request(wire.OP_CLOSE, 0, 0, None, lambda *a: None))
        part.stream.service = None
        part.stream.set_state(COMPLETED)
        self.partitions.remove(part)
        del self.by_name[part.name]
        del self.by_index[part.index]
        self.unkeep(prefix=f"p/{part.name}/")
        part.close()
        log.info("partition %s: removed", part.name)

    # --- status ---------------------------------------------------------------

    def status(self) -> dict:
        pool = self.engine.pool()
        parts = [p.status() for p in self.partitions]
        return {
            "ok": True,
            "pid": os.getpid(),
            "run_dir": self.run_dir,
            "uptime": time.time() - self.started,
            "state": "stopping" if self.stopping else "running",
            "pool": {
                "size_bytes": pool["pages"] * PAGE_SIZE,
                "page_size": PAGE_SIZE,
                "pages": pool["pages"],
                "resident_pages": sum(p["resident_pages"] for p in parts),
                "frames_used": pool["used"],
                "frames_high_water": pool["high_water"],
                "fault_waiters": pool["waiting"],
                "engine": pool["engine"],
            },
            "partitions": parts,
            "paging_services": [s.status() for s in self.services.values()],
            "devices": [vcp.device_row(self, d) for d in self.devices.values()],
            "hypervisor": restart_counts(self),
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pyhv-hypervisor")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--ready-fd", type=int, default=-1)
    ap.add_argument("--keeper-fd", type=int, default=-1)  # the supervisor's socket
    ap.add_argument("--restarts", type=int, default=0)  # > 0: take over from a crashed one
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    os.umask(0o077)  # what it and its paging services make in the run directory is root's
    # three fds a partition (memory, error log, device lock) and one a worker
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = Config.from_dict(json.load(f))
    keeper, kept, restarts = None, {}, 0
    if args.keeper_fd >= 0:
        keeper = socket.socket(fileno=args.keeper_fd)
        keeper.setblocking(True)
        keeper.set_inheritable(False)  # (a paging service must not hold it open)
        if args.restarts:
            kept, restarts = kept_items(keeper)
    hv = Hypervisor(os.path.abspath(args.run_dir), config, keeper, kept, restarts)
    try:
        hv.start(args.ready_fd)
    except (OSError, Refused) as e:
        msg = f"cannot start: {e}"
        log.error("hypervisor: %s", msg)
        hv.claims.close()  # (the devices claimed before the one refused)
        if args.ready_fd >= 0:
            os.write(args.ready_fd, f"error {msg}\n".encode())
        return 1
    hv.run()
    return 1 if hv.failed else 0
