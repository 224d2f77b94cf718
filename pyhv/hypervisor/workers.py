"""What workers ask of the hypervisor beyond their faults, and the workers
it adopts: children of workers, loans and advice.

Forked children.  A worker's userfaultfd has UFFD_FEATURE_EVENT_FORK: when
it forks, the kernel gives the child a userfaultfd of its own, registered
like the parent's, and the engine takes it at once (WORKER_FORKED): the
child faults through the hypervisor from its first instruction.  Which
process it is: its first fault names its thread (UFFD_FEATURE_THREAD_ID;
pyhv.attach's fork hook touches the child's identity page to make sure
there is one), a number in the child's own pid namespace, so it is taken
only once /proc shows that process mapping the partition's memory where
the child does; else the child's own connection ("adopt", its pid from
SO_PEERCRED, matched through /proc/PID/status NSpid) names it.  From then
on a pidfd tells when it exits.  A child that exits or execs before it is
named is found by probing its userfaultfd (ESRCH); until then its
userfaultfd is never let go (its memory would be unguarded).

Loans (AMS's Collaborative Memory Manager).  "discard" gives a range of the
partition's memory back: frames to the pool and slots to the device at once
(the engine), zeros from then on.  Workers that subscribed ("pressure") are
asked to loan pages when the pool runs low, and eviction waits a moment for
them when no fault waits.

Advice.  "prefetch" reads a range ahead (no reply: the worker does not
wait); what does not fit in the free frames now is read as frames come.

Requests come on connections of their own (a worker's first connection is
its watchdog's), from a process that is a worker of the partition.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import struct
import time

from pyhv import wire
from pyhv.hypervisor.partition import Partition, Worker, maps_range
from pyhv.uffd import PAGE_SIZE

log = logging.getLogger("pyhv.hypervisor")

PROBE_EVERY = 1.0  # seconds between probes of forked children not identified yet
DISCARD_RETRY = 0.002  # pages in flight at a discard: looked at again after this...
DISCARD_PATIENCE = 10.0  # ... for at most this long
ADVICE_RETRY = 0.002  # advice waiting for free frames: tried again after this...
ADVICE_PATIENCE = 5.0  # ... and dropped after this long
ADVICE_CHAINS = 64  # advice being read for one partition at once; more is dropped
PRESSURE_EVERY = 1.0  # a partition is asked to loan pages at most this often
PRESSURE_GRACE = 0.05  # eviction waits this long for loans (when no fault waits)


def peer_pid(sock: socket.socket) -> int:
    pid, _, _ = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))  # fmt: skip
    return pid


def proc_status(pid: int, key: str) -> list[int]:
    """The numbers of a /proc/PID/status line ([] if there is none)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


class WorkerRoom:
    """Mixed into the Hypervisor: forked children, loans and advice."""

    def worker_handlers(self) -> dict:
        return {
            "adopt": self.op_adopt,
            "discard": self.op_discard,
            "prefetch": self.op_prefetch,
            "pressure": self.op_pressure,
        }

    # --- forked children ----------------------------------------------------------

    def on_forked(self, part: Partition | None, parent_id: int, child_id: int, err: int) -> None:
        if part is None:
            return
        if err or not child_id:
            log.error("partition %s: a child of worker %d cannot be served (%s): its faults "
                      "will wait", part.name, parent_id, os.strerror(err))  # fmt: skip
            return
        handle, base = self.engine.worker_claim(child_id)
        if handle is None:
            return
        w = Worker(child_id, 0, part, None)
        w.eng = handle
        w.base = base
        parent = self.workers_by_id.get(parent_id)
        w.ident = parent.ident if parent is not None else 0
        self.keep_worker(w)  # (a crash now must not close its uffd: its faults would read holes)
        part.workers[w.id] = w
        self.workers_by_id[w.id] = w
        part.counters["forks"] += 1
        self.unidentified.add(w)
        # (a child of a suspended partition's worker is stopped once it is named)

    def on_worker_pid(self, child_id: int, tid: int) -> None:
        """The child's first fault came from thread tid (in its namespace)."""
        w = self.workers_by_id.get(child_id)
        if w is None or w.pid:
            return
        w.tid = tid
        pid = (proc_status(tid, "Tgid") or [0])[0]
        if pid > 0 and maps_range(pid, w.base, w.partition.cfg.memory):
            self._identified(w, pid)
        # else: another pid namespace, or gone: its adopt, or the probe, tells

    def _identified(self, w: Worker, pid: int) -> None:
        try:
            w.pidfd = os.pidfd_open(pid)
        except OSError:
            return  # (gone: the probe finds it)
        self.unidentified.discard(w)
        w.pid = pid
        self.keep_worker(w)  # (named now)
        if w.partition.state != "active":  # born while its partition is being suspended
            try:
                signal.pidfd_send_signal(w.pidfd, signal.SIGSTOP)
            except OSError:
                pass
        log.info("partition %s: worker %d (pid %d), a child of a worker, attached",
                 w.partition.name, w.id, pid)  # fmt: skip
        self.sel.register(w.pidfd, selectors.EVENT_READ,
                          lambda m, w=w: self._drop_worker(w, "exited"))  # fmt: skip

    def probe_children(self) -> None:
        """Children that exited (or exec'd) before their first fault."""
        for w in list(self.unidentified):
            if w.eng is None or not self.engine.worker_alive(w.eng):
                self.unidentified.discard(w)
                self._drop_worker(w, "exited before its first fault")

    def op_adopt(self, conn, msg, fds):
        """A forked child's own connection (its watchdog's)."""
        pid = peer_pid(conn.sock)
        if conn.worker is not None:
            raise wire.ProtocolError("this connection is a worker's already")
        self.on_engine(0)  # (its identifying fault may be in the queue still)
        w = next((w for w in self.workers_by_id.values()
                  if pid > 0 and w.pid == pid and w.conn is None and w.alive), None)  # fmt: skip
        # named in its own pid namespace only (an admin's: anyone may make a
        # namespace of their own, and name a tid there)
        if w is None and pid > 0 and self.is_admin(conn):
            inner = (proc_status(pid, "NSpid") or [0])[-1]
            w = next((w for w in self.unidentified if w.tid == inner and w.alive
                      and maps_range(pid, w.base, w.partition.cfg.memory)), None)  # fmt: skip
            if w is not None:
                self._identified(w, pid)
        if w is None or not w.pid:
            return {"ok": False, "error": f"process {pid} is no forked worker"}, ()
        if not self.may_use(conn, w.partition):
            return {"ok": False, "refused": True, "error": "permission denied: partition "
                    f"{w.partition.name!r} is not yours"}, ()  # fmt: skip
        w.conn = conn
        conn.worker = w
        self.awaiting_rejoin.discard(w)  # (a child a crashed hypervisor had not named)
        # its own copy of its uffd (the engine's): while no hypervisor runs
        # its faults wait on it, and its watchdog rejoins with it, never
        # left to read a hole of the memfd when the last other copy closes
        return {"ok": True, "worker": w.id, "partition": w.partition.name,
                "isolation": w.partition.cfg.isolation}, (
                    (self.engine.worker_fd(w.eng),) if w.eng is not None else ())  # fmt: skip

    # --- requests from workers ----------------------------------------------------------

    def _asking(self, conn, msg) -> Partition:
        """The partition a request is for; only a worker of it may ask."""
        part = self.by_name.get(msg["partition"])
        if part is None:
            raise wire.ProtocolError(f"unknown partition {msg['partition']!r}")
        pid = peer_pid(conn.sock)
        if pid <= 0 or not any(w.pid == pid for w in part.workers.values()):
            raise wire.ProtocolError(f"process {pid} is no worker of partition {part.name}")
        return part

    def _requesting(self, conn, msg) -> tuple[Partition, int, int]:
        """The partition, first page and page count of a worker's request
        over a range."""
        part = self._asking(conn, msg)
        offset, length = msg["offset"], msg["length"]
        for v in (offset, length):
            if isinstance(v, bool) or not isinstance(v, int):
                raise wire.ProtocolError(f"{v!r} is not a byte count")
        if (offset < 0 or length <= 0 or offset % PAGE_SIZE or length % PAGE_SIZE
                or offset + length > part.cfg.memory):  # fmt: skip
            raise wire.ProtocolError(f"range {offset}+{length} is not whole pages of the "
                                     f"partition's {part.cfg.memory} bytes")  # fmt: skip
        return part, offset // PAGE_SIZE, length // PAGE_SIZE

    def op_discard(self, conn, msg, fds):
        part, first, n = self._requesting(conn, msg)
        self._discard(conn, part, first, n, time.monotonic(), [0, 0])
        return None, ()  # (answered once done)

    def _discard(self, conn, part, first, n, began, done) -> None:
        if part.eng is None:
            self.reply(conn, {"ok": False, "error": "the partition was removed"})
            return
        frames, slots, busy = self.engine.discard(part.eng, first, n)
        done[0] += frames
        done[1] += slots
        if busy and time.monotonic() - began < DISCARD_PATIENCE:
            self.later(DISCARD_RETRY, lambda: self._discard(conn, part, first, n, began, done))
            return
        part.counters["discards"] += 1
        self.reply(conn, {"ok": busy == 0, "frames": done[0], "slots": done[1],
                          **({"error": f"{busy} pages stayed in flight"} if busy else {})})

    def op_prefetch(self, conn, msg, fds):
        part, first, n = self._requesting(conn, msg)
        n = min(n, max(1, self.pool_pages // 2))  # (more would evict what it read first)
        if part.advising < ADVICE_CHAINS:
            part.advising += 1
            self._advise(part, first, first + n, time.monotonic())
        return None, ()  # no answer: the worker goes on at once

    def _advise(self, part: Partition, first: int, end: int, began: float) -> None:
        if (part.eng is None or part.state != "active"
                or time.monotonic() - began > ADVICE_PATIENCE):  # fmt: skip
            part.advising -= 1
            return
        try:
            _, nxt = self.engine.prefetch(part.eng, first, end - first)
        except BlockingIOError:  # its stream does not flow now
            self.later(0.05, lambda: self._advise(part, first, end, began))
            return
        if nxt < end:  # out of free frames: more as eviction frees them
            self.later(ADVICE_RETRY, lambda: self._advise(part, nxt, end, began))
        else:
            part.advising -= 1

    # --- pressure: asking partitions to loan pages ---------------------------------------

    def op_pressure(self, conn, msg, fds):
        """Subscribe: this connection gets {"op": "pressure", "pages": N}
        when the pool runs low."""
        part = self._asking(conn, msg)
        part.pressure.add(conn)
        return {"ok": True}, ()

    def ask_loans(self, want: int) -> bool:
        """Ask subscribed partitions for `want` pages in all (shared by
        weight); True if any was asked now (eviction may wait a moment)."""
        now = time.monotonic()
        asked = [p for p in self.partitions if p.pressure and p.state == "active"
                 and now - p.last_ask >= PRESSURE_EVERY]  # fmt: skip
        total = sum(p.cfg.weight for p in asked)
        for part in asked:
            part.last_ask = now
            pages = max(1, want * part.cfg.weight // total)
            part.counters["loans_asked"] += pages
            for conn in list(part.pressure):
                if conn.sock is None:
                    part.pressure.discard(conn)
                else:
                    self.reply(conn, {"op": "pressure", "pages": pages})
        if asked:
            self.pressure_until = now + PRESSURE_GRACE
            self.later(PRESSURE_GRACE, self.replenish)
        return bool(asked)
