"""Workloads under 4x overcommit: pyhv against the kernel's own swap, in one run.

Run:  .venv/bin/python -m pytest bench/test_workloads.py --benchmark-only -q

The three workloads of :mod:`pyhv.benchmark` (``random``, ``sequential``,
``zipf``: one-byte read-and-write touches over 64 MiB, every page written once
first), each under

``pyhv``         a fresh system per round: 16 MiB pool, one 64 MiB partition,
                 one paging service, its device a loop device with direct I/O
                 over a file; the workload attached with ``pyhv.attach()`` and
                 started with ``pyhv run``;
``kernel_swap``  anonymous memory in a memory cgroup limited to 16 MiB + 8 MiB
                 (the interpreter), swap on a loop device with direct I/O;
                 skipped, with the reason, when the machine cannot set it up.

Each pedantic round is one workload process.  The time recorded for a round
is the one the workload measured itself, of its touch phase only (the round's
wall time also holds interpreter start, the fill and, for pyhv, ``pyhv up``
and ``shutdown``): the round durations pytest-benchmark took are replaced by
these, as ``test_faults.py`` does for its C rows.  ``extra_info`` holds the
other side's time (its median over its own rounds, or one run of it made for
the purpose when it has not run yet), ``ratio`` = pyhv / kernel swap, the
page-in fault p50/p99 attribution (the slowest K touches, K = the page-ins of
the touch phase) and, for pyhv, the partition's counters of the last round.

Environment: ``PYHV_BENCH_ROUNDS`` (1..3, default 2), ``PYHV_BENCH_QUICK=1``
(5,000 touches, one sequential pass).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile

import pytest

from pyhv import benchmark as B

ROUNDS = max(1, min(3, int(os.environ.get("PYHV_BENCH_ROUNDS", "2"))))
PARAMS = B.params(os.environ.get("PYHV_BENCH_QUICK") == "1")
SIDES = ("pyhv", "kernel_swap")
CASES = [(w, s) for w in B.WORKLOADS for s in SIDES]
IDS = [f"{w}-{s.split('_')[0]}" for w, s in CASES]  # test_workload[sequential-kernel]

_seconds: dict[tuple[str, str], list[float]] = {}  # (workload, side) -> touch-phase seconds


@pytest.fixture(scope="module")
def bench_dir():
    d = tempfile.mkdtemp(prefix="pyhv-bench-", dir=B._disk_tmp())
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def kernel_swap(bench_dir):
    """(KernelSwap or None, reason it is not there); always torn down."""
    try:
        ks = B.KernelSwap(bench_dir)
    except B.BenchError as e:
        yield None, str(e)
        return
    try:
        yield ks, None
    finally:
        ks.close()


@pytest.fixture(scope="module")
def pyhv_device(bench_dir):
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("pyhv on a loop device needs root and losetup")
    try:
        loop = B.LoopDevice(os.path.join(bench_dir, "pyhv-dev.img"), B.DEVICE)
    except B.BenchError as e:
        pytest.skip(f"no loop device: {e}")
    try:
        yield loop
    finally:
        loop.close()


class _Runner:
    """Runs one workload on one side; counts the runs for fresh run dirs."""

    def __init__(self, bench_dir, kernel_swap, pyhv_device):
        self.dir = bench_dir
        self.kswap, self.kswap_reason = kernel_swap
        self.device = pyhv_device
        self.n = 0

    def __call__(self, workload: str, side: str) -> dict:
        self.n += 1
        if side == "pyhv":
            run_dir = os.path.join(self.dir, f"run-{os.getpid()}-{self.n}")
            try:
                return B.run_pyhv_workload(self.device.dev, run_dir, workload, PARAMS)
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
        return self.kswap.run(workload, PARAMS)


@pytest.fixture(scope="module")
def runner(bench_dir, kernel_swap, pyhv_device):
    return _Runner(bench_dir, kernel_swap, pyhv_device)


def _other_seconds(runner: _Runner, workload: str, side: str) -> tuple[float | None, str | None]:
    """The other side's median touch-phase time (one run of it if none yet)."""
    other = "kernel_swap" if side == "pyhv" else "pyhv"
    if other == "kernel_swap" and runner.kswap is None:
        return None, runner.kswap_reason
    if not _seconds.get((workload, other)):
        _seconds.setdefault((workload, other), []).append(runner(workload, other)["seconds"])
    return statistics.median(_seconds[(workload, other)]), None


@pytest.mark.parametrize("workload,side", CASES, ids=IDS)
def test_workload(benchmark, runner, workload, side):
    if side == "kernel_swap" and runner.kswap is None:
        pytest.skip(f"kernel swap baseline: {runner.kswap_reason}")
    benchmark.group = workload
    results: list[dict] = []

    def one_round():
        results.append(runner(workload, side))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    secs = [r["seconds"] for r in results]
    assert all(r["touches"] == results[0]["touches"] for r in results)
    assert all(s > 0 for s in secs)
    _seconds.setdefault((workload, side), []).extend(secs)
    last = results[-1]
    if side == "pyhv":  # a correctness oracle on the counters, never a timing
        c = last["counters"]
        assert c["io_errors"] == c["machine_checks"] == 0, c
        assert c["first_touches"] == 0, c  # every page was written before the touches
        assert c["resident_pages"] <= B.POOL // B.PAGE, c
    if benchmark.enabled:
        data = benchmark.stats.stats.data
        wall = list(data)
        data[:] = secs  # the row becomes the workload's own touch-phase time
        benchmark.extra_info["wall_s_per_round"] = [round(w, 3) for w in wall]

    mine = statistics.median(secs)
    other, reason = _other_seconds(runner, workload, side)
    pyhv_s, kernel_s = (mine, other) if side == "pyhv" else (other, mine)
    benchmark.extra_info.update(
        workload=workload, side=side, touches=last["touches"], rounds=len(secs),
        pyhv_s=round(pyhv_s, 4) if pyhv_s is not None else None,
        kernel_swap_s=round(kernel_s, 4) if kernel_s is not None else None,
        ratio=round(pyhv_s / kernel_s, 3) if pyhv_s and kernel_s else None,
        page_ins=last["page_ins"],
        p50_us=last.get("fault_p50_us"), p99_us=last.get("fault_p99_us"),
        touch_p50_us=last.get("touch_p50_us"), touch_p99_us=last.get("touch_p99_us"),
    )  # fmt: skip
    if reason:
        benchmark.extra_info["kernel_swap_skipped"] = reason
    if side == "pyhv":
        benchmark.extra_info["counters"] = last["counters"]
    else:
        benchmark.extra_info.update(pswpin=last["pswpin"], pswpout=last["pswpout"],
                                    majflt=last["majflt"],
                                    interpreter_charge_bytes=last.get("interpreter_charge_bytes"))
