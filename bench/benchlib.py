"""Helpers of pyhv's fault benchmarks (the fixtures in conftest.py use them).

* :class:`PyhvSystem` starts a real system with the command line
  (``pyhv up --detach``), in its own temporary run directory, and always
  stops it (``pyhv shutdown``; SIGKILL of the processes it started, by pid,
  only if that fails).
* :func:`attached` attaches *this* process as a worker of a partition and
  always detaches it (memoryview released first, then ``pyhv.detach``)
  before the system is shut down: a worker whose hypervisor goes away is
  ended by its watchdog (exit 70), which would take pytest with it.
* Placements (where the faulting thread, the hypervisor and the paging
  service run; DESIGN.md §3: a cross-CPU wake-up costs ~20 µs here, so
  placement matters more than anything else):

  - ``cpu0``:  everything pinned to CPU 0;
  - ``split``: the faulting process on CPU 1, hypervisor and service on CPU 0;
  - ``free``:  no pinning, the scheduler decides.

* Oracles used by the benchmarks (never timing): ``mincore`` says whether a
  page of the partition's memfd is in memory (a page that is not must fault);
  :meth:`PyhvSystem.partition` reads the counters of ``pyhv status --json``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys

import pytest

import pyhv
from pyhv import uffd
from pyhv.benchmark import shutdown_or_kill

PAGE = uffd.PAGE_SIZE
NCPU = os.cpu_count() or 1

#: name -> (cpu of the faulting process, cpu of hypervisor + paging service)
PLACEMENTS = {"cpu0": (0, 0), "split": (1, 0), "free": (None, None)}


def placements() -> list:
    """The placements this machine can do (``split`` needs two CPUs)."""
    return [
        pytest.param(name, marks=pytest.mark.skipif(NCPU < 2, reason="needs 2 CPUs"))
        if name == "split"
        else name
        for name in PLACEMENTS
    ]


def pin_process(pid: int, cpu: int | None) -> None:
    """Pin every thread of pid to cpu (None: all CPUs)."""
    cpus = set(range(NCPU)) if cpu is None else {cpu}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def pins(pid: int) -> list[list[int]]:
    """The CPU sets of pid's threads (to record what was measured)."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        with contextlib.suppress(ProcessLookupError):
            out.append(sorted(os.sched_getaffinity(int(tid))))
    return out


# --- mincore: is a page of a mapping in memory? -------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_libc.mincore.restype = ctypes.c_int


def resident(addr: int) -> bool:
    """True if the page at addr (page-aligned, in a shared mapping) is in memory.
    For a memfd mapping this is the page cache of the memfd: after pyhv's
    eviction (punch hole) or before a first touch it is False.  No fault."""
    vec = ctypes.c_ubyte(0)
    if _libc.mincore(ctypes.c_void_p(addr), PAGE, ctypes.byref(vec)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), "mincore")
    return bool(vec.value & 1)


# --- a running pyhv system ------------------------------------------------------------


def pyhv_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyhv", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


class PyhvSystem:
    """One pyhv system: one pool, one paging service, one file device, one
    partition ``p1``."""

    def __init__(self, run_dir: str, *, pool: str, memory: str, direct: bool):
        self.run_dir = str(run_dir)
        self.config = os.path.join(self.run_dir, "cfg.toml")
        with open(self.config, "w") as f:
            f.write(
                f'[pool]\nsize = "{pool}"\n\n'
                '[[paging_service]]\nname = "vios1"\n\n'
                f'[[device]]\nid = "pgdev0"\npath = "pg0.img"\nsize = "{memory}"\n'
                f"direct = {'true' if direct else 'false'}\n\n"
                f'[[partition]]\nname = "p1"\nmemory = "{memory}"\n'
            )
        self.pids: list[int] = []  # processes of this system (hypervisor first)

    def up(self) -> None:
        r = pyhv_cli("up", "-c", self.config, "--run-dir", self.run_dir, "--detach")
        if r.returncode != 0:
            raise RuntimeError(f"pyhv up failed ({r.returncode}): {r.stderr.strip()}\n"
                               f"{self.log()}")  # fmt: skip
        st = self.status()
        self.pids = [st["pid"]] + [s["pid"] for s in st["paging_services"] if s["pid"]]

    def log(self) -> str:
        try:
            with open(os.path.join(self.run_dir, "hypervisor.log")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def status(self) -> dict:
        r = pyhv_cli("status", "--run-dir", self.run_dir, "--json")
        if r.returncode != 0:
            raise RuntimeError(f"pyhv status failed ({r.returncode}): {r.stderr.strip()}")
        return json.loads(r.stdout)

    def partition(self, name: str = "p1") -> dict:
        st = self.status()
        part = next(p for p in st["partitions"] if p["name"] == name)
        return {"pool": st["pool"], **part}

    def pin(self, cpu: int | None) -> None:
        for pid in self.pids:
            pin_process(pid, cpu)

    def shutdown(self) -> None:
        """Stop the system; never leaves a process of it running."""
        if not self.pids:  # up did not get as far as status
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(self.run_dir, "hypervisor.pid")) as f:
                    self.pids = [int(f.read())]
        ok = shutdown_or_kill(self.run_dir, self.pids, timeout=45, grace=5)
        with contextlib.suppress(OSError):  # 64 MiB each; tmp_path keeps 3 runs
            os.unlink(os.path.join(self.run_dir, "pg0.img"))
        if not ok:
            raise RuntimeError(f"pyhv shutdown failed; killed {self.pids}\n{self.log()}")


class Attached:
    """This process attached to a partition: ``mem`` (the mmap), ``view`` (a
    memoryview; index it, never slice it), ``base`` (its address)."""

    def __init__(self, mem):
        self.mem = mem
        self.view = memoryview(mem)
        self.base = uffd.address_of(mem)
        self.pages = len(mem) // PAGE

    def resident(self, page: int) -> bool:
        return resident(self.base + page * PAGE)


@contextlib.contextmanager
def attached(system: PyhvSystem, partition: str = "p1", cpu: int | None = None):
    """Attach this process (all its threads pinned to cpu, if given) to a
    partition; detach and unpin on the way out, before anyone shuts the
    system down."""
    me = os.getpid()
    saved = {int(t): os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{me}/task")}
    a = Attached(pyhv.attach(partition=partition, run_dir=system.run_dir))
    try:
        if cpu is not None:
            pin_process(me, cpu)  # after attach: the watchdog thread too
        yield a
    finally:
        try:
            a.view.release()  # an exported buffer would make mmap.close() fail
        finally:
            try:
                pyhv.detach(a.mem)  # stops the watchdog first, whatever follows
            finally:
                for tid, cpus in saved.items():
                    with contextlib.suppress(ProcessLookupError, OSError):
                        os.sched_setaffinity(tid, cpus)
                # threads started meanwhile (the watchdog) are gone after detach
