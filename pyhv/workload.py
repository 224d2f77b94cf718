"""A worker program that writes and verifies patterned pages, for the demo,
the tests and the benchmarks: ``python -m pyhv.workload write|verify``.

It attaches to its partition (``PYHV_*`` from ``pyhv run``), handles every
page or its own stripe (pages i, i+N, ... for worker i of N), in order or in
a seeded random order, times the first access to each page, prints
``progress N`` lines while it runs and one JSON summary line at the end.
Exit status: 0, or 1 when any page did not verify.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import pyhv
from pyhv.pattern import page_pattern
from pyhv.uffd import PAGE_SIZE


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    i = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[i]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pyhv-workload")
    ap.add_argument("action", choices=["write", "verify"])
    ap.add_argument("--generation", type=int, default=1)
    ap.add_argument("--stripe", action="store_true", help="only this worker's stripe of pages")
    ap.add_argument("--random", action="store_true", help="visit pages in random order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", type=int, default=0, help="print progress every N pages")
    ap.add_argument("--read-first", action="store_true",
                    help="write: read each page before writing it (a clean page-in, then a "
                    "write-protect fault)")  # fmt: skip
    ap.add_argument("--start-file", help="attach, then wait for this file before the first page "
                    "(several workers start together)")  # fmt: skip
    args = ap.parse_args(argv)

    mem = pyhv.attach()
    while args.start_file and not os.path.exists(args.start_file):
        time.sleep(0.001)
    view = memoryview(mem)
    name = os.environ["PYHV_PARTITION"]
    worker = int(os.environ.get("PYHV_WORKER", "0"))
    nworkers = int(os.environ.get("PYHV_WORKERS", "1"))
    npages = len(mem) // PAGE_SIZE
    pages = list(range(worker, npages, nworkers)) if args.stripe else list(range(npages))
    if args.random:
        random.Random(args.seed * 1000 + worker).shuffle(pages)

    lat: list[int] = []
    bad: list[int] = []
    clock = time.perf_counter_ns
    started = time.monotonic()  # (system-wide: comparable between workers)
    for done, page in enumerate(pages, 1):
        off = page * PAGE_SIZE
        want = page_pattern(name, page, args.generation)
        if args.action == "write":
            t0 = clock()
            if args.read_first:
                view[off]
            view[off] = want[0]  # the faulting access, timed alone
            lat.append(clock() - t0)
            view[off : off + PAGE_SIZE] = want
        else:
            t0 = clock()
            view[off]
            lat.append(clock() - t0)
            if view[off : off + PAGE_SIZE] != want:
                bad.append(page)
        if args.progress and done % args.progress == 0:
            print(f"progress {args.progress}", flush=True)
    ended = time.monotonic()
    lat.sort()
    print(json.dumps({
        "partition": name, "worker": worker, "pid": os.getpid(), "action": args.action,
        "pages": len(pages), "mismatches": len(bad), "bad_pages": bad[:16],
        "p50_ns": percentile(lat, 0.50), "p99_ns": percentile(lat, 0.99),
        "started": started, "ended": ended,
        "latencies_ns": lat if os.environ.get("PYHV_WORKLOAD_LATENCIES") else None,
    }), flush=True)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
