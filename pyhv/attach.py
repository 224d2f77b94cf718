"""The worker side: ``pyhv.attach()`` maps the partition's memory into this
process and hands its page faults to the hypervisor.

Steps: connect to the hypervisor's control socket, ask to attach (the reply
carries the partition's memfd), map it shared, open a userfaultfd, register
the mapping for MISSING and WP faults, send the uffd over, and wait for the
acknowledgement before touching anything.  Then a C watchdog thread watches
the connection: if the hypervisor dies, this process exits with
:data:`EXIT_HYPERVISOR_LOST` instead of hanging in a fault or reading zeros.
The mapping is not inherited by fork() (MADV_DONTFORK): a child could not
fault through the hypervisor, so it must not see the memory at all.

A page the system cannot deliver is a machine check: the access raises
SIGBUS at the page, and the C handler installed here reads the partition's
error log, reports, and stops this worker with SIGBUS (exit status 135).
"""

from __future__ import annotations

import atexit
import mmap
import os

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


class _Session:
    mcelog: mmap.mmap
    base: int

    def __init__(self, sock, mem, uffd_fd, watchdog, worker, partition):
        self.sock = sock
        self.mem = mem
        self.uffd = uffd_fd
        self.watchdog = watchdog
        self.worker = worker
        self.partition = partition


def _run_dir(run_dir: str | None) -> str:
    run_dir = run_dir or os.environ.get("PYHV_RUN_DIR")
    if not run_dir:
        raise AttachError("no run directory: pass run_dir or set PYHV_RUN_DIR")
    return run_dir


def attach(partition: str | None = None, run_dir: str | None = None) -> mmap.mmap:
    """Map the partition's memory; returns a writable buffer of its size.

    ``partition`` and ``run_dir`` default to ``PYHV_PARTITION`` and
    ``PYHV_RUN_DIR``, which ``pyhv run`` sets."""
    run_dir = _run_dir(run_dir)
    partition = partition or os.environ.get("PYHV_PARTITION")
    if not partition:
        raise AttachError("no partition: pass partition or set PYHV_PARTITION")
    path = os.path.join(run_dir, "control.sock")
    try:
        sock = wire.connect(path, timeout=30)
    except OSError as e:
        raise AttachError(f"no hypervisor at {path}: {e.strerror or e}") from None
    ok = False
    uffd_fd = -1
    mem = None
    try:
        wire.send_control(sock, {"op": "attach", "partition": partition})
        reply, fds = wire.recv_control(sock)
        if not reply or not reply.get("ok") or len(fds) != 2:
            wire.close_fds(fds)
            raise AttachError((reply or {}).get("error", "the hypervisor refused to attach"))
        memfd, logfd = fds
        try:
            mem = mmap.mmap(memfd, reply["size"], mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
            mcelog = mmap.mmap(logfd, reply["mcelog_size"], mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            wire.close_fds(fds)
        mem.madvise(mmap.MADV_DONTFORK)
        base = uffd.address_of(mem)
        uffd_fd = uffd.open_uffd(nonblock=True)
        features = reply["features"]
        offered, _ = uffd.api(uffd_fd, features)
        missing = [n for n in uffd.WORKER_FEATURES if not offered & uffd.FEATURES[n]]
        if missing:
            raise AttachError(f"this kernel's userfaultfd lacks {', '.join(missing)}")
        uffd.register(uffd_fd, base, len(mem), uffd.MODE_MISSING | uffd.MODE_MINOR | uffd.MODE_WP)
        wire.send_control(sock, {"op": "register", "base": base}, [uffd_fd])
        reply, fds = wire.recv_control(sock)
        wire.close_fds(fds)
        if not reply or not reply.get("ok"):
            raise AttachError((reply or {}).get("error", "the hypervisor refused the uffd"))
        sock.setblocking(True)
        # the machine-check handler: a poisoned page stops this worker with SIGBUS
        uffd.mce_install()
        uffd.mce_add(base, len(mem), sock.fileno(), mcelog, partition,
                     isolation_partition=reply.get("isolation") == "partition")  # fmt: skip
        watchdog = uffd.Watchdog(sock.fileno(), EXIT_HYPERVISOR_LOST)
        session = _Session(sock, mem, uffd_fd, watchdog, reply.get("worker"), partition)
        session.mcelog = mcelog
        session.base = base
        _sessions[id(mem)] = session
        ok = True
        return mem
    except OSError as e:
        raise AttachError(f"attach to partition {partition!r}: {e}") from None
    finally:
        if not ok:
            sock.close()
            if uffd_fd >= 0:
                os.close(uffd_fd)
            if mem is not None:
                mem.close()


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
        s.watchdog = uffd.Watchdog(s.sock.fileno(), EXIT_HYPERVISOR_LOST)
        raise BufferError("detach: release every memoryview of the partition's memory "
                          "first") from None  # fmt: skip
    del _sessions[id(mem)]
    uffd.mce_remove(s.base)
    s.mcelog.close()
    os.close(s.uffd)
    s.sock.close()
