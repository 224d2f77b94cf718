"""Control connections: the control point's clients and every worker's
connection for life, on the hypervisor's control socket.

One request a message (pyhv.wire: JSON, long ones in pieces, fds as
SCM_RIGHTS); replies never block the loop (what a peer does not take waits
in its queue; a peer that leaves too much unread is dropped).  A malformed
message costs its sender the connection, never the daemon.  Workers attach
here (their pid from SO_PEERCRED, never from the message) and register their
userfaultfd, which is proved to be what attach asked for before the engine
takes it (prove_uffd).
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import signal
import socket
import time

from pyhv import uffd, wire
from pyhv.hypervisor import vcp
from pyhv.hypervisor.partition import Partition, Worker, maps_range
from pyhv.uffd import PAGE_SIZE
from pyhv.hypervisor.vcp import Refused
from pyhv.hypervisor.workers import peer_pid, proc_status

log = logging.getLogger("pyhv.hypervisor")

MAX_CONNECTIONS = 512  # control connections, workers' included
MAX_BACKLOG = 32  # replies a client may leave unread before it is dropped
CONN_BACKLOG_BYTES = 16 << 20  # ... and bytes of them, beyond the one it is being sent
TOTAL_BACKLOG_BYTES = 256 << 20  # bytes of replies unread by all clients together
PIECES_TIMEOUT = 5.0  # seconds a long request may take to arrive whole


class Control:
    """A control connection: a control-point client, or a worker's for life."""

    __slots__ = ("sock", "out", "worker", "pieces", "queued", "peer", "counted")

    def __init__(self, sock: socket.socket):
        self.sock: socket.socket | None = sock
        # replies not sent yet: (the pieces of one, not sent yet; its fds)
        self.out: collections.deque[tuple[collections.deque, list]] = collections.deque()
        self.worker: Worker | None = None
        self.pieces = wire.Assembler(wire.MAX_REQUEST)  # a long request coming in
        self.queued = 0  # bytes in out
        self.peer = None  # its credentials (pyhv.hypervisor.access), when first asked
        self.counted = False  # among its user's connections (AccessRoom.admit)


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
    # exactly: an event feature would queue messages nobody reads (a worker
    # without CAP_SYS_PTRACE may not have fork events: its memory is not
    # inherited by its children, pyhv.attach)
    if features not in (want, want & ~uffd.FEATURES["EVENT_FORK"]):
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


class ControlRoom:
    """Mixed into the Hypervisor: the control socket and its operations."""

    def control_handlers(self) -> dict:
        return {
            "status": self.op_status,
            "shutdown": self.op_shutdown,
            "attach": self.op_attach,
            "register": self.op_register,
            "partition": self.op_partition,
            "mce": self.op_mce,
            "errors": self.op_errors,
            "slots": self.op_slots,
            **vcp.handlers(self),
            **self.worker_handlers(),
            "snapshot": self.op_snapshot,
            **self.migration_handlers(),
            "rejoin": self.op_rejoin,
        }

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
        c = Control(sock)
        why = self.admit(c)  # (a user cannot take every connection from the others)
        if why:
            log.warning("control: refusing a connection: %s", why)
            try:  # (best effort: it says why, instead of looking like a crash)
                sock.setblocking(False)
                sock.send(wire.encode_control({"ok": False, "error": f"too many connections: "
                                               f"{why}"})[0])  # fmt: skip
            except OSError:
                pass
            sock.close()
            return
        sock.setblocking(False)
        self.conns[sock] = c
        self.sel.register(sock, selectors.EVENT_READ, lambda m, c=c: self.on_conn(c, m))

    def _check_partial(self, now: float) -> None:
        """A long request must arrive whole within PIECES_TIMEOUT."""
        for c in [c for c in self.partial if now - c.pieces.started > PIECES_TIMEOUT]:
            self._refuse_conn(c, wire.ProtocolError(
                f"a request did not arrive whole within {PIECES_TIMEOUT:g}s"))  # fmt: skip

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
        self.release(c)
        c.sock.close()
        c.sock = None
        for _, fds in c.out:
            wire.close_fds(fds)
        c.out.clear()
        self.reply_bytes -= c.queued
        c.queued = 0
        c.pieces.reset()
        self.partial.discard(c)
        self.snapshot_gone(c)

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

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        """Close what a request brought and its handler did not take."""
        wire.close_fds(fds)
        fds.clear()

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
            if fds and op not in ("register", "rejoin"):
                raise wire.ProtocolError(f"{op} carries no file descriptors")
            self.authorize(c, op, msg)
            reply, reply_fds = handler(c, msg, fds)
        except Refused as e:
            self._close_fds(fds)
            log.warning("control: %s refused: %s", op, e)
            self.reply(c, {"ok": False, "refused": True, "error": str(e)})
            return
        except (wire.ProtocolError, KeyError, TypeError, ValueError, OverflowError) as e:
            # (OverflowError: int() of a JSON Infinity, or a float too large)
            self._close_fds(fds)  # (before the answer: the sender may count on it)
            log.warning("control: bad request %r: %s", op, e)
            self.reply(c, {"ok": False, "error": f"bad request: {e}"})
            self._drop_conn(c, f"bad request: {e}")
            return
        except Exception as e:  # a bug: answer, so that no client waits forever
            self._close_fds(fds)
            log.exception("control: %s failed", op)
            self.reply(c, {"ok": False, "error": f"internal error in {op}: {e}"})
            return
        if reply is not None:
            self.reply(c, reply, reply_fds)
        self.save_config()  # (if the operation changed it)

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
        st = self.status()
        if self.is_admin(conn):
            return st, ()
        # a user sees the partitions it may use, and nothing of the rest
        mine = self.visible(conn, [p["name"] for p in st["partitions"]])
        return {"ok": True, "pid": st["pid"], "state": st["state"], "uptime": st["uptime"],
                "run_dir": st["run_dir"], "restricted": True,
                "partitions": [p for p in st["partitions"] if p["name"] in mine]}, ()  # fmt: skip

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
        pid = peer_pid(conn.sock)  # from the kernel, never from the message
        part = self.by_name.get(name)
        if part is None:
            return {"ok": False, "error": f"unknown partition {name!r}"}, ()
        if self.stopping:
            return {"ok": False, "error": "the hypervisor is shutting down"}, ()
        if part.state != "active" or part.saving is not None:
            return {"ok": False, "error": f"partition {name!r} is "
                    + (part.state if part.saving is None else "being saved")}, ()  # fmt: skip
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
        # (the pid is the one the peer had when it connected: a process of
        # another user now is not the peer, which passed its socket on and went)
        if (proc_status(pid, "Uid") or [-1, -1])[1] != self.peer(conn).uid:
            os.close(w.pidfd)
            return {"ok": False, "error": "the attaching process is gone"}, ()
        conn.worker = w
        self.next_worker += 1
        part.workers[w.id] = w
        self.workers_by_id[w.id] = w
        return {"ok": True, "worker": w.id, "size": part.cfg.memory, "page_size": PAGE_SIZE,
                "features": uffd.feature_mask(uffd.WORKER_FEATURES),
                "isolation": part.cfg.isolation, "mcelog_size": uffd.MCE_LOG_SIZE,
                "recovery_timeout": self.recovery_timeout,
                }, (part.memfd, part.mcelog.fd)  # fmt: skip

    def op_register(self, conn, msg, fds):
        w = conn.worker
        if w is None or w.eng is not None or len(fds) != 1:
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
        ident = msg.get("ident")  # (the probe of its forked children needs one)
        if isinstance(ident, bool) or not isinstance(ident, int) or ident % PAGE_SIZE or not (
                0 < ident < 1 << 64) or base <= ident < base + w.partition.cfg.memory:  # fmt: skip
            raise wire.ProtocolError(f"ident {ident!r} is no page of its own")
        try:
            w.eng = self.engine.worker_add(w.partition.eng, fds[0], base, w.id, w.pid, ident)
        except OSError as e:
            raise wire.ProtocolError(f"its userfaultfd failed at once: {e.strerror}") from None
        fds.pop()  # the engine's now: it closes it when the worker goes
        w.base = base
        w.ident = ident
        self.keep_worker(w)
        log.info("partition %s: worker %d (pid %d) attached", w.partition.name, w.id, w.pid)
        return {"ok": True}, ()

    def _drop_worker(self, w: Worker, why: str = "gone", kill: bool = False) -> None:
        """The worker is done with (its connection closed, its uffd failed,
        shutdown).  kill: its process lives on with a broken uffd; it is
        killed, for it must not touch the memory unguarded.  The engine keeps
        its uffd registered until the process is gone (its pidfd turns
        readable): a fault of a process still running waits, never reads a
        hole of the memfd or writes a page behind the hypervisor's back."""
        if not w.alive:
            return
        w.alive = False
        part = w.partition
        part.workers.pop(w.id, None)
        self.workers_by_id.pop(w.id, None)
        self.unidentified.discard(w)
        if kill and w.pidfd >= 0:
            try:
                signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)
            except OSError:
                pass
        if w.conn is not None:
            self._close_conn(w.conn)
        log.info("partition %s: worker %d (pid %d) detached: %s", part.name, w.id, w.pid, why)
        if w.eng is not None and w.pidfd >= 0 and maps_range(w.pid, w.base, part.cfg.memory):
            handler = lambda m, w=w: self._worker_gone(w)  # noqa: E731
            try:
                self.sel.register(w.pidfd, selectors.EVENT_READ, handler)
            except KeyError:  # (a forked child's pidfd is watched already)
                self.sel.modify(w.pidfd, selectors.EVENT_READ, handler)
        else:  # gone, or it unmapped the memory (a detach): nothing left to guard
            self._worker_gone(w)

    def _worker_gone(self, w: Worker) -> None:
        """Its process has exited: the engine lets its uffd go."""
        if w.pidfd >= 0:
            try:
                self.sel.unregister(w.pidfd)
            except (KeyError, ValueError):
                pass
            os.close(w.pidfd)
            w.pidfd = -1
        if w.eng is not None:
            self.engine.worker_remove(w.eng)  # (it closes the uffd)
            w.eng = None
            self.unkeep(f"w/{w.id}")

    def op_slots(self, conn, msg, fds):
        """Where a partition's pages are on its device (for fault injection)."""
        part = self.by_name.get(msg["partition"])
        if part is None:
            raise Refused(f"unknown partition {msg['partition']!r}")
        pages = msg.get("pages") or range(part.pages)
        slots = [[p, s] for p in pages
                 if isinstance(p, int) and 0 <= p < part.pages
                 and (s := self.engine.slot_of(part.eng, p)) >= 0]  # fmt: skip
        return {"ok": True, "device": str(part.device.path), "slots": slots}, ()
