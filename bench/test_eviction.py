"""Eviction throughput: how fast pyhv frees frames, dirty pages and clean.

Run:  .venv/bin/python -m pytest bench/test_eviction.py --benchmark-only -q

A partition of 64 MiB is resident in a 64 MiB pool; a round shrinks the
pool to 4 MiB through the control socket (``pool_resize`` answers once the
pool fits), which evicts 15,360 pages at once:

``dirty``  every page was written since it was paged in: each is written
           back to the device (O_DIRECT file), in WRITEs of up to 32 pages
           to neighbouring slots, and punched out of memory by the service;
``clean``  every page was paged in and only read: dropped without I/O.

Between rounds (not timed) the pool grows back and every page is touched
again.  ``extra_info`` has pages evicted and pages per second; the test
checks the counters against the work (page-outs or clean drops), never a
time.
"""

from __future__ import annotations

import os

import pytest

from pyhv import wire

from .benchlib import PAGE

ROUNDS = 3


@pytest.mark.benchmark(group="eviction")
@pytest.mark.parametrize("kind", ["dirty", "clean"])
def test_eviction_throughput(benchmark, pyhv_system, attach_to, kind):
    system = pyhv_system(pool="64MiB", memory="64MiB", direct=True)
    a = attach_to(system)
    view = a.view
    sock = os.path.join(system.run_dir, "control.sock")

    def resize(size: str) -> None:
        r = wire.request(sock, {"op": "pool_resize", "size": size}, timeout=120)
        assert r.get("ok"), r

    for page in range(a.pages):  # first touches: every page resident and dirty
        view[page * PAGE] = 1
    resize("4MiB")  # all of them written out once: every page has its copy

    def setup():
        resize("64MiB")
        for page in range(a.pages):
            if kind == "dirty":
                view[page * PAGE] = (view[page * PAGE] + 1) & 0xFF or 1
            else:
                assert view[page * PAGE] != 0
        return (), {}

    before = []

    def shrink():
        before.append(system.partition())
        resize("4MiB")

    benchmark.pedantic(shrink, setup=setup, rounds=ROUNDS, iterations=1)
    after = system.partition()
    first = before[-1]
    evicted = (after["page_outs"] - first["page_outs"]) + (after["clean_drops"] - first["clean_drops"])
    assert after["pool"]["frames_used"] <= after["pool"]["pages"]
    assert evicted >= a.pages - after["pool"]["pages"] - 64, (first, after)
    if kind == "dirty":
        assert after["page_outs"] - first["page_outs"] >= evicted * 0.9
    else:
        assert after["clean_drops"] - first["clean_drops"] >= evicted * 0.9
    assert after["io_errors"] == 0
    if benchmark.enabled:
        secs = sorted(benchmark.stats.stats.data)
        median = secs[len(secs) // 2]
        benchmark.extra_info.update(pages_evicted=evicted,
                                    pages_per_s=round(evicted / median),
                                    p50_us=round(median * 1e6 / evicted, 2),
                                    p99_us=round(secs[-1] * 1e6 / evicted, 2),
                                    mean_us=round(sum(secs) / len(secs) * 1e6 / evicted, 2))
