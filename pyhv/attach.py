"""The worker side: ``pyhv.attach()`` maps the partition's memory into this
process and hands its page faults to the hypervisor.

Steps: connect to the hypervisor's control socket, ask to attach (the reply
carries the partition's memfd), map it shared, open a userfaultfd, register
the mapping for MISSING and WP faults, send the uffd over, and wait for the
acknowledgement before touching anything.  Then a C watchdog thread watches
the connection.  If the hypervisor dies, its supervisor starts a new one
(pyhv.supervisor), which keeps this worker's uffd and the partition's memory
and page table: the watchdog connects to it and rejoins (a fault meanwhile
simply waits).  If none comes within the system's recovery_timeout (or it
runs without restart), this process exits with :data:`EXIT_HYPERVISOR_LOST`
instead of hanging in a fault or reading zeros.

fork() keeps working: the kernel gives the child a userfaultfd of its own
(UFFD_FEATURE_EVENT_FORK), which the hypervisor takes, so the child shares
the memory and faults through the hypervisor like its parent.  The fork
hook here (in the child) touches the child's identity page (a private page
wiped on fork and registered MISSING: its fault tells the hypervisor which
process the new userfaultfd serves), then opens the child's own
connection, watchdog and machine-check reporting.  A worker that is not
root has no fork events (the kernel gives them to CAP_SYS_PTRACE only): its
memory is MADV_DONTFORK, never held by a child unguarded, and the fork hook
maps it again in the child, at the same address, as a worker of its own.
A child that runs no Python fork hook (a fork() in C) has no memory there.

Beyond faults, a worker can give memory back (:func:`discard`, or
``madvise(MADV_REMOVE)`` on the memory), ask for a range to be read ahead
(:func:`prefetch`), and offer to loan pages under pool pressure
(:func:`on_pressure`).  These travel on a second connection (the first is
the watchdog's).

A page the system cannot deliver is a machine check: the access raises
SIGBUS at the page, and the C handler installed here reads the partition's
error log, reports, and stops this worker with SIGBUS (exit status 135).
"""

from __future__ import annotations

import atexit
import json
import mmap
import os
import socket
import sys
import threading
import time

from pyhv import uffd, wire

#: Exit status of a worker whose hypervisor went away.
EXIT_HYPERVISOR_LOST = 70

_sessions: dict[int, "_Session"] = {}


@atexit.register
def _detach_all() -> None:
    # A clean exit must not look like a lost hypervisor: stop the watchdogs
    # before the interpreter unmaps the memory.
    for s in list(_sessions.values()):
        try:
            detach(s.mem)
        except BufferError:  # still viewed: keep it registered, only stand down
            s.watchdog.stop()
        except (OSError, ValueError):
            pass


class AttachError(RuntimeError):
    """The partition's memory cannot be attached."""


class Memory(mmap.mmap):
    """The partition's memory, as :func:`attach` returns it: an mmap whose
    ``madvise(MADV_REMOVE, ...)`` gives the range back through the
    hypervisor (:func:`discard`)."""

    def madvise(self, option, start=0, length=None):
        if option == getattr(mmap, "MADV_REMOVE", None):
            length = len(self) - start if length is None else length
            if length > 0:  # (the kernel rounds the length up to whole pages too)
                length = min(-(-length // uffd.PAGE_SIZE) * uffd.PAGE_SIZE, len(self) - start)
            discard(start, length, mem=self)
            return None
        return super().madvise(option, start, *(() if length is None else (length,)))


class _Session:
    mcelog: mmap.mmap
    base: int
    ident: mmap.mmap  # the identity page (see the module's docstring)
    isolation: str
    path: str  # the control socket

    def __init__(self, sock, mem, uffd_fd, watchdog, worker, partition):
        self.sock = sock
        self.mem = mem
        self.uffd = uffd_fd
        self.watchdog = watchdog
        self.worker = worker
        self.partition = partition
        self.requests: "socket.socket | None" = None  # discard, prefetch (opened when needed)
        self.lock = threading.Lock()  # ... one request at a time on it

    def request(self, msg: dict, answer: bool = True) -> dict | None:
        """Send a request on the second connection; its answer, if it has
        one.  If the hypervisor went away meanwhile, the request goes once
        more to the one that takes this worker back (each of these requests
        may be done twice)."""
        with self.lock:
            rejoins = self.watchdog.rejoins if self.watchdog else 0
            try:
                return self._request(msg, answer)
            except AttachError:
                deadline = time.monotonic() + self.recovery
                while self.watchdog and self.watchdog.rejoins == rejoins:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
                return self._request(msg, answer)

    def _request(self, msg: dict, answer: bool) -> dict | None:
        try:
            if self.requests is None:
                self.requests = wire.connect(self.path, timeout=None)
            wire.send_control(self.requests, msg)
            if not answer:
                return None
            reply, fds = wire.recv_control(self.requests)
        except OSError as e:
            self._close_requests()
            raise AttachError(f"{msg['op']}: the hypervisor cannot be reached: {e}") from None
        wire.close_fds(fds)
        if reply is None:
            self._close_requests()
            raise AttachError(f"{msg['op']}: the hypervisor closed the connection")
        return reply

    def _close_requests(self) -> None:
        if self.requests is not None:
            self.requests.close()
            self.requests = None

    recovery: float = 0.0  # seconds a new hypervisor may take to come (0: exit at once)

    def watch(self) -> None:
        """(Re)start the watchdog on the connection."""
        msg = json.dumps({"op": "rejoin", "partition": self.partition, "worker": self.worker})
        self.watchdog = uffd.Watchdog(self.sock.fileno(), EXIT_HYPERVISOR_LOST,
                                      (self.path, msg, self.uffd, self.recovery))  # fmt: skip

    forks: bool = True  # its uffd has fork events (else: MADV_DONTFORK, see _worker_uffd)

    def adopt(self) -> None:
        """In a forked child: become a worker of the partition of its own."""
        if self.forks:
            self.ident[0]  # (its fault names this process to the hypervisor)
        if self.uffd >= 0:  # the parent's: the child's own is the hypervisor's
            os.close(self.uffd)
            self.uffd = -1
        if self.watchdog is not None:
            self.watchdog.abandon()  # its thread stayed in the parent
        self.lock = threading.Lock()
        if self.requests is not None:
            self.requests.close()  # (the parent's connection: its copy here only)
            self.requests = None
        sock = wire.connect(self.path, timeout=30)
        if not self.forks:  # the memory is not here (MADV_DONTFORK): attach anew
            try:
                reply, self.uffd, _ = _join(sock, self.partition, self)
            except BaseException:
                sock.close()
                raise
        else:
            wire.send_control(sock, {"op": "adopt", "partition": self.partition})
            reply, fds = wire.recv_control(sock)
            if not reply or not reply.get("ok") or len(fds) != 1:
                wire.close_fds(fds)
                sock.close()
                raise AttachError((reply or {}).get("error", "the hypervisor refused the child"))
            self.uffd = fds[0]  # its own (held: its faults wait on it if the hypervisor dies)
        sock.setblocking(True)
        self.sock.close()  # the parent's connection: its copy here only
        self.sock = sock
        self.worker = reply.get("worker")
        uffd.mce_remove(self.base)
        uffd.mce_add(self.base, len(self.mem), sock.fileno(), self.mcelog, self.partition,
                     isolation_partition=self.isolation == "partition")  # fmt: skip
        self.watch()


def _after_fork_in_child() -> None:
    for s in list(_sessions.values()):
        try:
            s.adopt()
        except Exception as e:  # it cannot be guarded: it must not run on
            print(f"pyhv: a child of a worker of partition {s.partition} cannot join it: {e}",
                  file=sys.stderr, flush=True)  # fmt: skip
            os._exit(EXIT_HYPERVISOR_LOST)
    for sock in _pressure:  # (their threads stayed in the parent; the child
        sock.close()  # must not hold the subscription open behind them)
    _pressure.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _run_dir(run_dir: str | None) -> str:
    run_dir = run_dir or os.environ.get("PYHV_RUN_DIR")
    if not run_dir:
        raise AttachError("no run directory: pass run_dir or set PYHV_RUN_DIR")
    return run_dir


class _HypervisorGone(Exception):
    """The hypervisor went away before the attach was done (or is not there)."""


def _worker_uffd(features: int) -> tuple[int, bool]:
    """A userfaultfd with the worker features, and whether it has fork
    events: the kernel gives those to CAP_SYS_PTRACE only, so a worker that
    is not root has none (its memory is then not inherited: MADV_DONTFORK,
    and its children attach on their own, in the fork hook)."""
    fork = uffd.FEATURES["EVENT_FORK"]
    for want in (features, features & ~fork):
        try:
            fd = uffd.open_uffd(nonblock=True)
        except PermissionError:
            raise AttachError("this user may not open a userfaultfd (it needs read-write access "
                              "to /dev/userfaultfd, which an admin grants: see the README)"
                              ) from None  # fmt: skip
        try:
            offered, _ = uffd.api(fd, want)
        except PermissionError:
            os.close(fd)
            if want & fork:
                continue
            raise
        except BaseException:
            os.close(fd)
            raise
        missing = [n for n in uffd.WORKER_FEATURES if not offered & uffd.FEATURES[n]]
        if missing:
            os.close(fd)
            raise AttachError(f"this kernel's userfaultfd lacks {', '.join(missing)}")
        return fd, bool(want & fork)
    raise AttachError("no userfaultfd with the worker features")  # (not reached)


def _join(sock, partition: str, child: "_Session | None" = None) -> tuple[dict, int, bool]:
    """Attach on sock and register a new userfaultfd over the partition's
    memory: the attach reply (with "mem", "mcelog", "ident" mapped here),
    the uffd, and whether it has fork events.  A forked child (child: its
    session) maps the memory again where the session has it."""
    wire.send_control(sock, {"op": "attach", "partition": partition})
    reply, fds = wire.recv_control(sock)
    if reply is None:
        wire.close_fds(fds)
        raise _HypervisorGone("it closed the connection")
    if not reply.get("ok") or len(fds) != 2:
        wire.close_fds(fds)
        raise AttachError(reply.get("error", "the hypervisor refused to attach"))
    memfd, logfd = fds
    made: list = []  # what to close if it fails
    uffd_fd = -1
    try:
        if child is None:
            mem = Memory(memfd, reply["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            made.append(mem)
            made.append(mmap.mmap(logfd, reply["mcelog_size"], mmap.MAP_SHARED, mmap.PROT_READ))
            ident = mmap.mmap(-1, uffd.PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            made.append(ident)
            ident.madvise(getattr(mmap, "MADV_WIPEONFORK", 18))  # (Linux: 18)
            reply["mem"], reply["mcelog"], reply["ident"] = made
        else:
            mem, ident = child.mem, child.ident
            uffd.map_fixed(memfd, child.base, len(mem))
        base = uffd.address_of(mem)
        uffd_fd, forks = _worker_uffd(reply["features"])
        if not forks:  # no child may hold the memory unguarded
            mmap.mmap.madvise(mem, mmap.MADV_DONTFORK)
        uffd.register(uffd_fd, base, len(mem), uffd.MODE_MISSING | uffd.MODE_MINOR | uffd.MODE_WP)
        ident_at = uffd.address_of(ident)
        uffd.register(uffd_fd, ident_at, uffd.PAGE_SIZE, uffd.MODE_MISSING)
        wire.send_control(sock, {"op": "register", "base": base, "ident": ident_at}, [uffd_fd])
        answer, got = wire.recv_control(sock)
        wire.close_fds(got)
        if answer is None:  # (a new one may keep this uffd: it waits for a rejoin that
            raise _HypervisorGone("it closed the connection")  # never comes, then drops it)
        if not answer.get("ok"):
            raise AttachError(answer.get("error", "the hypervisor refused the uffd"))
    except BaseException:
        if uffd_fd >= 0:
            os.close(uffd_fd)
        for m in made:
            m.close()
        raise
    finally:
        wire.close_fds(fds)
    return reply, uffd_fd, forks


def attach(partition: str | None = None, run_dir: str | None = None) -> mmap.mmap:
    """Map the partition's memory; returns a writable buffer of its size.

    ``partition`` and ``run_dir`` default to ``PYHV_PARTITION`` and
    ``PYHV_RUN_DIR``, which ``pyhv run`` sets.  A hypervisor that dies
    during the attach (or is dead when it begins) is waited for, like a
    worker's watchdog waits, while its supervisor lives: up to the
    system's recovery_timeout."""
    run_dir = _run_dir(run_dir)
    partition = partition or os.environ.get("PYHV_PARTITION")
    if not partition:
        raise AttachError("no partition: pass partition or set PYHV_PARTITION")
    path = os.path.join(run_dir, "control.sock")
    deadline = None
    while True:
        try:
            return _attach(partition, path)
        except _HypervisorGone as e:
            if deadline is None:
                deadline = time.monotonic() + _recovery_timeout(run_dir)
            if time.monotonic() >= deadline or not _supervised(run_dir):
                raise AttachError(f"no hypervisor at {path}: {e}") from None
            time.sleep(0.05)


def _supervised(run_dir: str) -> bool:
    """A supervisor runs there (it will start a new hypervisor)."""
    from pyhv.supervisor import SUPERVISOR_PID_FILE
    from pyhv.system import live_pid

    return live_pid(os.path.join(run_dir, SUPERVISOR_PID_FILE)) is not None


def _recovery_timeout(run_dir: str) -> float:
    """The system's recovery_timeout (config.json; the default where this
    user may not read it), else 0."""
    from pyhv.config import RECOVERY_TIMEOUT

    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return float(json.load(f).get("recovery_timeout", 0.0))
    except PermissionError:
        return RECOVERY_TIMEOUT
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def _attach(partition: str, path: str) -> mmap.mmap:
    """One attempt; _HypervisorGone if the hypervisor is not there or goes."""
    try:
        sock = wire.connect(path, timeout=30)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise _HypervisorGone(e.strerror) from None
    except OSError as e:
        raise AttachError(f"no hypervisor at {path}: {e.strerror or e}") from None
    ok = False
    uffd_fd = -1
    mem = ident = mcelog = None
    try:
        granted, uffd_fd, forks = _join(sock, partition)
        mem, mcelog, ident = granted["mem"], granted["mcelog"], granted["ident"]
        base = uffd.address_of(mem)
        sock.setblocking(True)
        # the machine-check handler: a poisoned page stops this worker with SIGBUS
        uffd.mce_install()
        isolation = granted.get("isolation", "process")
        uffd.mce_add(base, len(mem), sock.fileno(), mcelog, partition,
                     isolation_partition=isolation == "partition")  # fmt: skip
        session = _Session(sock, mem, uffd_fd, None, granted.get("worker"), partition)
        session.mcelog = mcelog
        session.base = base
        session.ident = ident
        session.isolation = isolation
        session.path = path
        session.recovery = float(granted.get("recovery_timeout", 0.0))
        session.forks = forks
        session.watch()
        _sessions[id(mem)] = session
        ok = True
        return mem
    except (ConnectionResetError, BrokenPipeError) as e:
        raise _HypervisorGone(e.strerror) from None
    except OSError as e:
        raise AttachError(f"attach to partition {partition!r}: {e}") from None
    finally:
        if not ok:
            sock.close()
            if uffd_fd >= 0:
                os.close(uffd_fd)
            if mem is not None:
                mem.close()
            if ident is not None:
                ident.close()
            if mcelog is not None:
                mcelog.close()


def detach(mem: mmap.mmap) -> None:
    """Let go of an attached partition's memory (the partition keeps it).

    Raises BufferError, and changes nothing, while a memoryview of `mem` is
    alive: the mapping must go before its registration does, or a touch in
    between would read a paged-out page as zeros."""
    s = _sessions.get(id(mem))
    if s is None:
        raise ValueError("not an attached partition memory")
    # The watchdog stands down first: once the mapping is gone the
    # hypervisor may drop this connection, which is no hypervisor death.
    s.watchdog.stop()
    try:
        mem.close()  # munmap: the registration goes with the mapping
    except BufferError:
        s.watch()
        raise BufferError("detach: release every memoryview of the partition's memory "
                          "first") from None  # fmt: skip
    del _sessions[id(mem)]
    uffd.mce_remove(s.base)
    s.mcelog.close()
    s.ident.close()
    if s.uffd >= 0:
        os.close(s.uffd)
    s._close_requests()
    s.sock.close()


# --- beyond faults: loans, advice, numpy views ------------------------------------------


def memory(partition: str | None = None, run_dir: str | None = None) -> Memory:
    """The partition's memory in this process: attached already, or now."""
    partition = partition or os.environ.get("PYHV_PARTITION")
    for s in _sessions.values():
        if partition is None or s.partition == partition:
            return s.mem
    return attach(partition, run_dir)


def _range(mem: Memory | None, offset, length, what: str) -> tuple["_Session", int, int]:
    """The session and the whole pages [offset, offset+length) cover;
    ValueError (nothing done) if they are not within the memory."""
    s = _sessions.get(id(mem if mem is not None else memory()))
    if s is None:
        raise ValueError(f"{what}: not an attached partition memory")
    size = len(s.mem)
    for name, v in (("offset", offset), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{what}: {name} must be an int, not {type(v).__name__}")
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"{what}: range {offset}+{length} is outside the partition's memory "
                         f"({size} bytes)")  # fmt: skip
    first = offset // uffd.PAGE_SIZE * uffd.PAGE_SIZE
    end = -(-(offset + length) // uffd.PAGE_SIZE) * uffd.PAGE_SIZE
    return s, first, end - first


def discard(offset: int, length: int, *, mem: Memory | None = None) -> int:
    """Give [offset, offset+length) back to the pool (AMS's loaning): the
    frames and device slots of the pages it covers are freed at once, and
    they read as zeros afterwards.  Both ends must be page-aligned (as for
    MADV_REMOVE).  Returns the frames freed."""
    s, first, n = _range(mem, offset, length, "discard")
    if offset % uffd.PAGE_SIZE or length % uffd.PAGE_SIZE:
        raise ValueError(f"discard: offset {offset} and length {length} must be multiples "
                         f"of the page size ({uffd.PAGE_SIZE})")  # fmt: skip
    if not n:
        return 0
    reply = s.request({"op": "discard", "partition": s.partition, "offset": first, "length": n})
    if not reply.get("ok"):
        raise AttachError(f"discard: {reply.get('error', 'refused')}")
    return reply["frames"]


def prefetch(offset: int, length: int, *, mem: Memory | None = None) -> None:
    """Ask for the pages covering [offset, offset+length) to be read ahead;
    returns at once (like madvise(MADV_WILLNEED)).  At most half the pool
    is read for one call."""
    s, first, n = _range(mem, offset, length, "prefetch")
    if n:
        s.request({"op": "prefetch", "partition": s.partition, "offset": first, "length": n},
                  answer=False)  # fmt: skip


_pressure: list[socket.socket] = []  # this process's pressure subscriptions


def on_pressure(fn, *, mem: Memory | None = None) -> None:
    """Offer to loan pages: when the pool runs low, the hypervisor calls
    ``fn(pages)`` (on a thread of this process) before it evicts; fn gives
    back what it can spare with :func:`discard`.  Exceptions it raises are
    printed and otherwise ignored."""
    s = _sessions.get(id(mem if mem is not None else memory()))
    if s is None:
        raise ValueError("on_pressure: not an attached partition memory")
    sock = wire.connect(s.path, timeout=30)
    try:
        wire.send_control(sock, {"op": "pressure", "partition": s.partition})
        reply, fds = wire.recv_control(sock)
        wire.close_fds(fds)
    except OSError as e:
        sock.close()
        raise AttachError(f"on_pressure: the hypervisor cannot be reached: {e}") from None
    if not reply or not reply.get("ok"):
        sock.close()
        raise AttachError(f"on_pressure: {(reply or {}).get('error', 'refused')}")
    sock.settimeout(None)

    def listen() -> None:
        while True:
            try:
                msg, fds = wire.recv_control(sock)
            except (OSError, wire.ProtocolError):
                return
            wire.close_fds(fds)
            if msg is None:
                return
            if msg.get("op") == "pressure":
                try:
                    fn(int(msg["pages"]))
                except Exception as e:  # a callback's bug must not end the listening
                    print(f"pyhv: on_pressure callback failed: {e!r}", file=sys.stderr)

    threading.Thread(target=listen, name="pyhv-pressure", daemon=True).start()
    _pressure.append(sock)
