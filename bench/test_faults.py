"""Fault latency: pyhv against its floors, all measured in one run.

Run:  .venv/bin/python -m pytest bench --benchmark-only -q      (``make bench``)

Two groups in the table, every row **per fault** (one touch of one page):

``first-touch``
    ``kernel``            the kernel's own anonymous first-touch fault (C loop);
    ``c_zeropage[P]``     minimal C uffd handler thread, UFFDIO_ZEROPAGE, on a
                          memfd (shared) mapping: the floor for a first touch;
    ``pyhv_first_touch[P]`` this process attached to a real pyhv system
                          (pool = partition = 64 MiB, no eviction), writing
                          one byte of a never-touched page per round.
``page-in``
    ``c_copy[P]``         C handler, UFFDIO_COPY of a buffer (no I/O);
    ``c_pread_copy[P]``   C handler, pread of one page from an O_DIRECT file,
                          then UFFDIO_COPY: the floor for a page-in;
    ``pyhv_page_in[P]``   pool 4 MiB, partition 64 MiB, device a file opened
                          O_DIRECT; every page written once, then each round
                          *reads* the next page of an in-order cycle, which
                          is on the device (checked with mincore before the
                          round): page-in through the paging service, clean
                          drops only (no page-out during measured rounds);
    ``pyhv_page_in_dirty[P]`` the same with each round *writing* its page:
                          the steady state of cyclic writes, one page-in
                          plus one page-out (of an older page) per fault;
    ``pyhv_page_in_cached`` the device file without O_DIRECT (page cache);
    ``pyhv_page_in_sequential`` in order: read-ahead, mean per page.

Placement ``P`` (see conftest): ``cpu0`` = faulting thread, handler /
hypervisor and paging service all on CPU 0; ``split`` = faulting thread on
CPU 1, handler / hypervisor + service on CPU 0; ``free`` = no pinning.

How each row is timed:

* pyhv rows: ``benchmark.pedantic(touch, setup=..., rounds=N, iterations=1)``:
  one round is exactly one fault; ``setup`` (not timed) picks the next page
  and asserts that it is not in memory (mincore), ``teardown`` (not timed)
  checks what the page holds.  The time includes pytest-benchmark's call of a
  Python function (~0.2-0.5 µs), negligible against tens of µs.
* C rows: the C loop times each touch itself (clock_gettime around one
  store).  Calling it for one page per round would time its set-up, not the
  fault: ``bench_kernel_touch(1)`` costs ~12 µs per call here (mmap + munmap)
  for a ~2 µs fault, and ``bench_uffd_touch(1)`` also creates a memfd, a uffd
  and a thread.  So each pedantic round calls it for ``C_PAGES`` fresh pages,
  and the round durations that pytest-benchmark recorded are then *replaced*
  by the C-measured per-touch durations (``benchmark.stats.stats.data``):
  min/median/mean of these rows are per fault, comparable with the pyhv
  rows.  The wall time per touch of the rounds (set-up included) is kept in
  ``extra_info['wall_us_per_touch']`` as a cross-check of the C clock.

Every row's ``extra_info`` has ``p50_us``/``p99_us`` (and ``mean_us``) of its
per-fault samples; pyhv rows also have the partition's counters from
``pyhv status --json`` before and after the measured rounds, and the test
asserts them against the work done (faults, first touches, page-ins,
page-outs): a correctness oracle, never a timing assertion.
"""

from __future__ import annotations

import os
import struct

import pytest

from .benchlib import PAGE, PLACEMENTS, pins, placements
from pyhv import uffd

C_PAGES = 500  # touches per call of a C baseline
C_CALLS = 6  # calls (pedantic rounds) per C baseline -> 3000 samples
FIRST_TOUCH_ROUNDS = 3000
PAGE_IN_ROUNDS = 3000
STAMP = struct.Struct("<Q")
MAGIC = 0x5059_4856_0000_0000  # "PYHV" << 32


def _c_cpus(placement: str) -> tuple[int, int]:
    """(handler_cpu, toucher_cpu) for the C baselines; -1 = not pinned."""
    toucher, handler = PLACEMENTS[placement]
    return (-1 if handler is None else handler), (-1 if toucher is None else toucher)


def _percentiles(seconds: list[float]) -> dict:
    s = sorted(seconds)
    n = len(s)
    return {
        "samples": n,
        "p50_us": round(s[n // 2] * 1e6, 2),
        "p99_us": round(s[min(n - 1, int(n * 0.99))] * 1e6, 2),
        "mean_us": round(sum(s) / n * 1e6, 2),
    }


def _run_c(benchmark, fn) -> None:
    """Benchmark a C baseline fn(npages) -> per-touch ns; see the module doc."""
    fn(C_PAGES)  # warm-up, discarded
    samples: list[int] = []

    def one_call():
        samples.extend(fn(C_PAGES))

    benchmark.pedantic(one_call, rounds=C_CALLS, iterations=1)
    if not benchmark.enabled:  # --benchmark-disable: one call, a smoke test
        assert len(samples) == C_PAGES
        return
    assert len(samples) == C_PAGES * C_CALLS
    assert all(ns > 0 for ns in samples), "a C touch took no time: the clock is broken"
    data = benchmark.stats.stats.data
    wall = sum(data)
    data[:] = [ns / 1e9 for ns in samples]  # the row becomes per touch
    benchmark.extra_info.update(_percentiles(data))
    benchmark.extra_info["wall_us_per_touch"] = round(wall / len(samples) * 1e6, 2)


# --- C floors ---------------------------------------------------------------------------


@pytest.mark.benchmark(group="first-touch")
def test_kernel(benchmark):
    _run_c(benchmark, uffd.bench_kernel_touch)


@pytest.mark.benchmark(group="first-touch")
@pytest.mark.parametrize("placement", placements())
def test_c_zeropage(benchmark, placement):
    handler, toucher = _c_cpus(placement)
    benchmark.extra_info.update(handler_cpu=handler, toucher_cpu=toucher)
    _run_c(benchmark, lambda n: uffd.bench_uffd_touch(
        n, shared=True, zeropage=True, handler_cpu=handler, toucher_cpu=toucher))  # fmt: skip


@pytest.mark.benchmark(group="page-in")
@pytest.mark.parametrize("placement", placements())
def test_c_copy(benchmark, placement):
    handler, toucher = _c_cpus(placement)
    benchmark.extra_info.update(handler_cpu=handler, toucher_cpu=toucher)
    _run_c(benchmark, lambda n: uffd.bench_uffd_touch(
        n, shared=True, zeropage=False, handler_cpu=handler, toucher_cpu=toucher))  # fmt: skip


@pytest.mark.benchmark(group="page-in")
@pytest.mark.parametrize("placement", placements())
def test_c_pread_copy(benchmark, placement, direct_file):
    handler, toucher = _c_cpus(placement)
    benchmark.extra_info.update(handler_cpu=handler, toucher_cpu=toucher, o_direct=True)
    _run_c(benchmark, lambda n: uffd.bench_uffd_touch(
        n, shared=True, zeropage=False, devfd=direct_file, handler_cpu=handler,
        toucher_cpu=toucher))  # fmt: skip


# --- pyhv ---------------------------------------------------------------------------------

COUNTERS = ("faults", "first_touches", "page_ins", "page_outs", "clean_drops", "wp_faults",
            "io_errors", "machine_checks", "resident_pages", "prefetched")  # fmt: skip


def _counters(system) -> dict:
    p = system.partition()
    return {k: p[k] for k in COUNTERS} | {"frames_used": p["pool"]["frames_used"]}


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in COUNTERS}


def _start(pyhv_system, attach_to, placement, *, pool: str, memory: str, direct: bool = True):
    worker_cpu, daemon_cpu = PLACEMENTS[placement]
    system = pyhv_system(pool=pool, memory=memory, direct=direct)
    system.pin(daemon_cpu)
    a = attach_to(system, cpu=worker_cpu)
    return system, a


def _record(benchmark, system, placement, before, after, rounds) -> dict:
    d = _delta(before, after)
    if benchmark.enabled:
        benchmark.extra_info.update(_percentiles(benchmark.stats.stats.data))
    benchmark.extra_info.update(
        placement=placement, rounds=rounds, delta=d, after=after,
        cpus={"worker": pins(os.getpid()), "hypervisor": pins(system.pids[0]),
              "service": pins(system.pids[1])},
    )  # fmt: skip
    return d


@pytest.mark.benchmark(group="first-touch")
@pytest.mark.parametrize("placement", placements())
def test_pyhv_first_touch(benchmark, pyhv_system, attach_to, placement):
    system, a = _start(pyhv_system, attach_to, placement, pool="64MiB", memory="64MiB")
    view = a.view
    # every other page: a run in order would be zero-filled ahead, with no fault to time
    pages = iter(range(0, a.pages, 2))
    touched: list[int] = []

    def setup():
        page = next(pages)
        assert not a.resident(page), f"page {page} is in memory before its first touch"
        touched.append(page)
        return (page * PAGE,), {}

    def touch(off):
        view[off] = 1

    def check(off):
        assert view[off] == 1

    for _ in range(200):  # warm-up (not timed, not counted below)
        off = setup()[0][0]
        touch(off)
    before = _counters(system)
    n0 = len(touched)
    benchmark.pedantic(touch, setup=setup, teardown=check, rounds=FIRST_TOUCH_ROUNDS,
                       iterations=1)  # fmt: skip
    after = _counters(system)
    n = len(touched) - n0
    d = _record(benchmark, system, placement, before, after, n)
    assert n == (FIRST_TOUCH_ROUNDS if benchmark.enabled else 1)
    assert d["first_touches"] == n, d
    assert d["faults"] >= n, d
    assert d["page_ins"] == d["page_outs"] == d["clean_drops"] == 0, d
    assert d["io_errors"] == d["machine_checks"] == 0, d
    assert after["resident_pages"] == len(touched), after
    assert all(a.resident(p) for p in touched)


@pytest.mark.benchmark(group="page-in")
@pytest.mark.parametrize("placement", placements())
def test_pyhv_page_in(benchmark, pyhv_system, attach_to, placement):
    _page_in(benchmark, pyhv_system, attach_to, placement, dirty=False)


@pytest.mark.benchmark(group="page-in")
def test_pyhv_page_in_cached(benchmark, pyhv_system, attach_to):
    """The device file without O_DIRECT: its pages are in the page cache, so
    the device costs a memory copy, and what is left is pyhv's own path."""
    _page_in(benchmark, pyhv_system, attach_to, "free", dirty=False, direct=False)


@pytest.mark.benchmark(group="page-in")
def test_pyhv_page_in_sequential(benchmark, pyhv_system, attach_to):
    """Pages read in order: the hypervisor reads ahead of the faults, so a
    round is often no fault at all; the mean is the cost per page of a scan."""
    _page_in(benchmark, pyhv_system, attach_to, "cpu0", dirty=False, sequential=True)


@pytest.mark.benchmark(group="page-in")
@pytest.mark.parametrize("placement", placements())
def test_pyhv_page_in_dirty(benchmark, pyhv_system, attach_to, placement):
    _page_in(benchmark, pyhv_system, attach_to, placement, dirty=True)


def _page_in(benchmark, pyhv_system, attach_to, placement, dirty: bool,
             sequential: bool = False, direct: bool = True) -> None:  # fmt: skip
    system, a = _start(pyhv_system, attach_to, placement, pool="4MiB", memory="64MiB",
                       direct=direct)  # fmt: skip
    view = a.view
    pool_pages = system.partition()["pool"]["pages"]
    assert a.pages >= 8 * pool_pages

    # Write every page once: first touches, then page-outs of the oldest.
    for page in range(a.pages):
        STAMP.pack_into(view, page * PAGE, MAGIC | page)
    filled = _counters(system)
    assert filled["first_touches"] == a.pages, filled
    assert filled["page_outs"] >= a.pages - pool_pages, filled

    # Then cycle through the pages, every other one first (no run of
    # consecutive pages, so no read-ahead): the next one in the cycle was
    # evicted long ago (FIFO over a pool 1/16 of the partition).  In
    # sequential mode, in order: read-ahead makes many rounds fault-free.
    gen = 1 if dirty else 0
    order = range(a.pages) if sequential else [*range(0, a.pages, 2), *range(1, a.pages, 2)]
    cycle = iter(order)
    pages_done: list[int] = []

    def setup():
        page = next(cycle)
        if not sequential:
            assert not a.resident(page), f"page {page} is resident: this round would not page in"
        pages_done.append(page)
        return (page,), {}

    if dirty:

        def touch(page):
            STAMP.pack_into(view, page * PAGE, MAGIC | gen << 24 | page)

    else:

        def touch(page):
            return view[page * PAGE]

    def check(page):
        (got,) = STAMP.unpack_from(view, page * PAGE)  # resident now: no fault
        want = MAGIC | gen << 24 | page
        assert got == want, f"page {page}: read {got:#x}, want {want:#x}"

    # Warm-up past the pool: the pages still resident from the fill (dirty)
    # are all evicted, so a read round is a pure page-in (clean drops only).
    for _ in range(pool_pages + 128):
        page = setup()[0][0]
        touch(page)
        check(page)
    before = _counters(system)
    n0 = len(pages_done)
    rounds = min(PAGE_IN_ROUNDS, a.pages - n0)
    benchmark.pedantic(touch, setup=setup, teardown=check, rounds=rounds, iterations=1)
    after = _counters(system)
    n = len(pages_done) - n0
    d = _record(benchmark, system, placement, before, after, n)
    benchmark.extra_info.update(pool_pages=pool_pages, partition_pages=a.pages,
                                access="write" if dirty else "read")  # fmt: skip
    assert n == (rounds if benchmark.enabled else 1)
    # (in order, the window read ahead of the first measured page may have
    # come in before the counters were read: up to 64 pages)
    assert d["page_ins"] >= n - (64 if sequential else 0), d
    assert d["faults"] + d["prefetched"] >= n, d  # read ahead: no fault for that page
    assert sequential or d["prefetched"] == 0, d
    assert d["first_touches"] == 0, d
    assert all(not a.resident(p) for p in range(pages_done[0], pages_done[0] + 64)), \
        "pages paged in long ago are still resident: the pool leaks"
    assert d["io_errors"] == d["machine_checks"] == 0, d
    if dirty:  # each fault evicts one older dirty page, written out
        assert d["page_outs"] >= n - pool_pages, d
    else:  # evictions of clean pages are drops, no I/O
        assert d["page_outs"] == 0, d
        assert d["clean_drops"] >= n - pool_pages, d
    assert after["resident_pages"] <= pool_pages, after
