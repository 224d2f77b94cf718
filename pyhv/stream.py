"""Paging streams and paging service processes, the hypervisor's side.

A :class:`Stream` is one partition's asynchronous request stream.  It has a
state (the VASI states), the paging service that holds it, and every request
that has not been answered yet -- so that when that service dies, is hung,
or is stopped, the same requests can be sent again to the partition's other
service, in their original order, and no fault fails.

A :class:`ServiceLink` is one paging service process: it starts it, carries
request frames to it over a SEQPACKET socket and hands replies back to their
streams.  Page-ins take a second socket, the fast channel, which the
hypervisor's fault engine reads and writes (csrc/engine.c).  Fencing: before a stream leaves a service that failed, that process
is killed and reaped, so it can never complete an old write after the other
service has written a newer one.
"""

from __future__ import annotations

import array
import collections
import errno
import itertools
import logging
import mmap
import os
import selectors
import signal
import socket
import subprocess
import time
from typing import Callable

from pyhv import wire
from pyhv._spawn import module_command

log = logging.getLogger("pyhv.stream")

INVALID = "INVALID"
ENABLED = "ENABLED"
ABORTED = "ABORTED"
SUSPENDING = "SUSPENDING"
SUSPENDED = "SUSPENDED"
RESUMED = "RESUMED"
COMPLETED = "COMPLETED"
STATES = (INVALID, ENABLED, ABORTED, SUSPENDING, SUSPENDED, RESUMED, COMPLETED)
FLOWING = (ENABLED, RESUMED)  # states in which requests go out
_CHAN_IDS = itertools.count(1)  # fast channels, as the engine's events name them


class Request:
    __slots__ = ("op", "slot", "count", "payload", "done", "id", "sent", "control", "fds",
                 "flags")  # fmt: skip

    def __init__(self, op: int, slot: int, count: int, payload, done: Callable,
                 control: bool = False, fds=(), flags: int = 0):  # fmt: skip
        self.op = op
        self.slot = slot
        self.count = count
        self.payload = payload  # bytes-like or a list of them
        self.done = done  # done(status, count, data): data a memoryview of the reply's payload
        self.id = 0
        self.sent = 0.0
        self.fds = fds  # sent with it (OPEN: the partition's memory)
        self.flags = flags  # wire.FLAG_RETRY once it was in flight on a service that failed
        # OPEN and FLUSH belong to one service's tenure of the stream: they
        # are not in the stream's in-flight set and never resent elsewhere
        self.control = control


class Stream:
    def __init__(self, index: int, name: str, device_spec: dict, paging: list[str], memfd: int):
        self.index = index
        self.memfd = memfd  # the partition's memory: each service it binds to gets it at OPEN
        self.name = name  # the partition's
        self.device_spec = device_spec
        self.paging = paging  # service names: primary, then the redundant one
        self.state = INVALID
        self.transitions = collections.Counter()
        self.changed_at = time.time()
        self.service: ServiceLink | None = None
        self.inflight: dict[int, Request] = {}  # sent to self.service, unanswered
        self.queued: collections.deque[Request] = collections.deque()  # not sent yet
        self.requests = 0
        self.failovers: list[dict] = []
        self._failover: dict | None = None  # the one in progress
        self.open_failed: set[str] = set()  # services that could not open the device
        self.path_wait = False  # a path was lost: while none works, SUSPENDED (faults wait)
        self.paths_lost = 0
        self.path_retries = 0  # tries of every path since the last was lost
        self.closing: "ServiceLink | None" = None  # a lost path's service, until it answers CLOSE
        self.fenced = False  # its device's claim was taken by another system: no more paging
        self.changed: Callable[[Stream], None] | None = None  # told of every state change
        self.gate: Callable[[], bool] | None = None  # False: hold every request back now

    # --- state ------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        if state != self.state:
            log.info("partition %s: stream %s -> %s%s", self.name, self.state, state,
                     f" on {self.service.name}" if self.service else "")  # fmt: skip
            self.transitions[f"{self.state}->{state}"] += 1
            self.state = state
            self.changed_at = time.time()
            if self.changed is not None:
                self.changed(self)

    @property
    def busy(self) -> int:
        return len(self.inflight) + len(self.queued)

    # --- requests ------------------------------------------------------------------

    def submit(self, op: int, slot: int, count: int, payload, done: Callable,
               flags: int = 0) -> Request:  # fmt: skip
        self.requests += 1
        req = Request(op, slot, count, payload, done, flags=flags)
        self.queued.append(req)
        self.pump()
        return req

    def pump(self) -> None:
        """Send what is queued, if the stream flows."""
        svc = self.service
        if svc is None or self.state not in FLOWING or (self.gate and not self.gate()):
            return
        while self.queued:
            req = self.queued.popleft()
            svc.send(self, req)
            self.inflight[req.id] = req

    def answered(self, req: Request, status: int, count: int, data) -> None:
        if not req.control:  # the first request served after a failover ends it
            self.failover_done()
        req.done(status, count, data)

    def failover_done(self) -> None:
        """A failover in progress is over (the other service answered, or the
        stream flows there): record how long it took."""
        if self._failover is None:
            return
        fo, self._failover = self._failover, None
        fo["seconds"] = time.monotonic() - fo.pop("t0")
        self.failovers.append(fo)
        log.warning("partition %s: failover %s -> %s took %.1f ms, %d requests were in "
                    "flight", self.name, fo["from"], fo["to"], fo["seconds"] * 1e3,
                    fo["in_flight"])  # fmt: skip

    def take_back(self) -> list[Request]:
        """Unsent again: every in-flight request returns to the queue, oldest
        first, ready to go to another service, marked RETRY.  Except DISCARD:
        advisory, and done again it could wipe a slot that a later WRITE,
        resent with it, reuses (and that WRITE may have to read back)."""
        back = sorted(self.inflight.values(), key=lambda r: r.id)
        for req in back:
            req.flags |= wire.FLAG_RETRY
        self.inflight.clear()
        back = [r for r in back if r.op != wire.OP_DISCARD]
        self.queued.extendleft(reversed(back))
        return back

    def mark_failover(self, old: str, in_flight: int, detected: float) -> None:
        self._failover = {"from": old, "to": None, "in_flight": in_flight,
                          "t0": detected, "at": time.time()}  # fmt: skip

    def bound_to(self, svc: "ServiceLink") -> None:
        if self._failover is not None:
            self._failover["to"] = svc.name

    def status(self) -> dict:
        return {
            "partition": self.name,
            "state": self.state,
            "service": self.service.name if self.service else None,
            "paging": self.paging,
            "in_flight": len(self.inflight),
            "queued": len(self.queued),
            "requests": self.requests,
            "transitions": dict(self.transitions),
            "transition_count": sum(self.transitions.values()),
            "last_transition": self.changed_at,
            "failovers": [dict(f) for f in self.failovers],
            "paths_lost": self.paths_lost,
        }


class ServiceLink:
    """One paging service process and the socket to it."""

    def __init__(self, hv, cfg):
        self.hv = hv
        self.cfg = cfg
        self.name = cfg.name
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.fast: socket.socket | None = None  # the fast channel: the engine's READs
        self.chan = None  # the engine's handle of it
        self.chan_id = 0  # its name in the engine's events (unique: fds are reused)
        self.state = "stopped"  # starting, running, stopping, stopped, dead
        self.outq: collections.deque = collections.deque()
        self.sent: dict[int, tuple[Stream, Request]] = {}
        self.next_id = 1
        self.requests = 0
        self.starts = 0
        self.deaths = 0
        self.scratch = mmap.mmap(-1, wire.MAX_FRAME)
        self.scratch_view = memoryview(self.scratch)
        self.hdr = bytearray(wire.HEADER.size)

    @property
    def running(self) -> bool:
        """Up, or coming up: requests sent now are served once it is ready."""
        return self.state in ("starting", "running")

    def streams(self) -> list[Stream]:
        return [s for s in self.hv.streams() if s.service is self]

    def start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fast, fast_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        logf = open(os.path.join(self.hv.run_dir, f"service-{self.name}.log"), "ab")
        try:
            self.proc = subprocess.Popen(
                module_command("pyhv.service", "--name", self.name, "--fd",
                               str(theirs.fileno()), "--fast-fd", str(fast_theirs.fileno()),
                               "--poll-us", str(self.hv.config.poll_us)),
                pass_fds=[theirs.fileno(), fast_theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=logf, stderr=logf,
            )  # fmt: skip
        finally:
            theirs.close()
            fast_theirs.close()
            logf.close()
        mine.setblocking(False)
        fast.setblocking(False)
        self.sock = mine
        self.fast = fast
        self.chan_id = next(_CHAN_IDS)
        self.chan = self.hv.engine.chan_add(fast.fileno(), self.chan_id)
        self.state = "starting"  # until its HELLO
        self.starts += 1
        self.outq.clear()
        self.sent.clear()  # anything left from an earlier process is not this one's
        self.hv.sel.register(mine, selectors.EVENT_READ, self.on_event)
        log.info("paging service %s: started, pid %d", self.name, self.proc.pid)

    def send(self, stream: Stream, req: Request) -> None:
        req.id = self.next_id
        self.next_id += 1
        req.sent = time.monotonic()
        self.requests += 1
        self.sent[req.id] = (stream, req)
        frame = [wire.pack_header(req.id, stream.index, req.op, 0, req.slot, req.count,
                                  flags=req.flags)]  # fmt: skip
        if isinstance(req.payload, list):
            frame += req.payload
        elif req.payload is not None:
            frame.append(req.payload)
        if req.fds:
            frame = (frame, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", req.fds))])
        else:
            frame = (frame, [])
        if self.outq or self.sock is None:
            self.outq.append(frame)
            return
        try:
            self.sock.sendmsg(*frame)
        except BlockingIOError:
            self.outq.append(frame)
            self.hv.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                               self.on_event)  # fmt: skip
        except OSError:
            self.outq.append(frame)  # the death shows up as EOF; the request is resent

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_out()
        if mask & selectors.EVENT_READ:
            self._drain()

    def _flush_out(self) -> None:
        while self.outq and self.sock is not None:
            try:
                self.sock.sendmsg(*self.outq[0])
            except BlockingIOError:
                return
            except OSError:
                return
            self.outq.popleft()
        if self.sock is not None:
            self.hv.sel.modify(self.sock, selectors.EVENT_READ, self.on_event)

    def _drain(self) -> None:
        while self.sock is not None:
            try:
                n, _, _, _ = self.sock.recvmsg_into([self.hdr, self.scratch_view])
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n < wire.HEADER.size:
                self.hv.service_failed(self, "connection closed" if n == 0 else "short frame")
                return
            rid, _stream, op, _f, status, _slot, count, _crc = wire.unpack_header(self.hdr)
            if rid == 0 and op == wire.OP_HELLO:
                if self.state == "starting":
                    self.state = "running"
                    log.info("paging service %s: ready", self.name)
                continue
            entry = self.sent.pop(rid, None)
            if entry is None:
                log.error("paging service %s: reply to unknown request %d", self.name, rid)
                continue
            stream, req = entry
            if stream.inflight.pop(rid, None) is None and not req.control:
                continue  # taken back from this service meanwhile: answered elsewhere
            if (status == -errno.ENOTCONN and req.op != wire.OP_OPEN and stream.service is self
                    and not self.hv.stopping):  # (stopping: it ends as it is)
                if not req.control:  # sent again with the rest, on the next path
                    stream.inflight[rid] = req
                self.hv.path_lost(stream, self, f"{wire.OP_NAMES.get(req.op, req.op)} "
                                  "answered ENOTCONN")  # fmt: skip
                continue
            stream.answered(req, status, count, self.scratch_view[: n - wire.HEADER.size])

    def oldest_age(self, now: float) -> float:
        """Age of the oldest unanswered request, Python's (`sent` is in
        sending order) or the engine's."""
        age = self.hv.engine.chan_oldest(self.chan) if self.chan is not None else 0.0
        for _, req in self.sent.values():
            return max(age, now - req.sent)
        return age

    def close(self, kill: bool) -> None:
        """Close the sockets; with kill, fence: SIGKILL and reap the process.
        The engine takes back the READs in flight on the fast channel."""
        if self.chan is not None:
            self.hv.engine.chan_remove(self.chan)
            self.chan = None
        if self.fast is not None:
            self.fast.close()
            self.fast = None
        if self.sock is not None:
            try:
                self.hv.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        self.outq.clear()
        self.sent.clear()
        if self.proc is not None:
            if kill and self.proc.poll() is None:
                try:
                    self.proc.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def status(self) -> dict:
        streams = self.streams()
        return {
            "name": self.name,
            "pid": self.proc.pid if self.proc and self.state != "stopped" else None,
            "state": self.state,
            "role": ("active" if streams else "standby") if self.state == "running" else None,
            "restart": self.cfg.restart,
            "starts": self.starts,
            "deaths": self.deaths,
            "requests": self.requests,
            "in_flight": len(self.sent),
            "streams": [s.status() for s in streams],
        }
