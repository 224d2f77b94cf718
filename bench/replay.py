"""Replay `pyhv bench`'s touch traces through victim policies, at a given
number of resident pages: how many misses each policy takes, with no machine
in the way (deterministic).

    python bench/replay.py [--pages N ...] [--touches N] [--workloads zipf,random]

Policies (every touch of the benchmark writes its page):

* ``fifo``    evict the oldest page;
* ``2q``      pyhv's queues with refaults only: a page that comes back within
              a pool's worth of evictions of its eviction is active; active
              pages past 3/4 of what is resident go back to the inactive queue;
* ``2q+wp``   the same, plus what a user-space pager can see of hits: a page
              at a queue's head the first time is write-protected and goes
              round once more, and is in use if written meanwhile (pyhv's
              engine, csrc/engine.c);
* ``lru``     least recently used, with every hit seen (what the kernel's
              accessed bits give it; an upper bound for a pager that sees
              faults only);
* ``opt``     Belady's optimum (knows the future).

The resident set at the start is what the benchmark leaves after its fill:
the last N pages written.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyhv.benchmark import MEMORY, PAGE, SEED, _offsets  # noqa: E402

NPAGES = MEMORY // PAGE


def _start(cap: int) -> list[int]:
    return list(range(NPAGES - cap, NPAGES))


def fifo(trace, cap):
    res = collections.OrderedDict.fromkeys(_start(cap))
    misses = 0
    for p in trace:
        if p not in res:
            misses += 1
            res[p] = None
            if len(res) > cap:
                res.popitem(last=False)
    return misses


def lru(trace, cap):
    res = collections.OrderedDict.fromkeys(_start(cap))
    misses = 0
    for p in trace:
        if p in res:
            res.move_to_end(p)
        else:
            misses += 1
            res[p] = None
            if len(res) > cap:
                res.popitem(last=False)
    return misses


def twoq(trace, cap, write_refs=False, arm_per_miss=2):
    inactive, active = collections.deque(_start(cap)), collections.deque()
    where = dict.fromkeys(inactive, "i")
    stamp: dict[int, int] = {}
    ref: dict[int, int] = {}  # 1 tested, 2 seen, 4 armed (csrc/engine.c's REF_*)
    evictions = misses = 0
    for p in trace:
        if p in where:
            if ref.get(p, 0) & 4:
                ref[p] = (ref[p] & ~4) | 2
            continue
        misses += 1
        if len(where) >= cap:
            budget = arm_per_miss
            while True:
                while active and (len(active) > len(where) * 3 // 4 or not inactive):
                    q = active.popleft()
                    r = ref.get(q, 0)
                    if write_refs and (r & 2 or (not r & 1 and budget)):
                        budget -= not r & 1
                        ref[q] = 5
                        active.append(q)
                        continue
                    inactive.append(q)
                    where[q] = "i"
                    break
                v = inactive.popleft()
                r = ref.get(v, 0)
                if write_refs and not r & 1 and budget:
                    budget -= 1
                    ref[v] = 5
                    inactive.append(v)
                    continue
                if write_refs and r & 2:
                    ref[v] = 5
                    active.append(v)
                    where[v] = "a"
                    continue
                break
            del where[v]
            ref.pop(v, None)
            stamp[v] = evictions
            evictions += 1
        ref[p] = 0
        if p in stamp and evictions - stamp[p] < cap:
            active.append(p)
            where[p] = "a"
        else:
            inactive.append(p)
            where[p] = "i"
    return misses


def opt(trace, cap):
    inf = len(trace) + 1
    nxt, later = {}, [0] * len(trace)
    for i in range(len(trace) - 1, -1, -1):
        later[i] = nxt.get(trace[i], inf)
        nxt[trace[i]] = i
    res = set(_start(cap))
    first = {}
    for i, p in enumerate(trace):
        first.setdefault(p, i)
    when = {p: first.get(p, inf) for p in res}
    heap = [(-u, p) for p, u in when.items()]
    heapq.heapify(heap)
    misses = 0
    for i, p in enumerate(trace):
        if p not in res:
            misses += 1
            if len(res) >= cap:
                while True:
                    u, v = heapq.heappop(heap)
                    if v in res and when[v] == -u:
                        break
                res.discard(v)
            res.add(p)
        when[p] = later[i]
        heapq.heappush(heap, (-later[i], p))
    return misses


POLICIES = {"fifo": fifo, "2q": twoq, "2q+wp": lambda t, c: twoq(t, c, write_refs=True),
            "lru": lru, "opt": opt}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, nargs="+", default=[3968, 4864],
                    help="resident pages (default: pyhv's pool less its reserve, and the "
                    "~19 MiB of data the kernel's cgroup holds)")  # fmt: skip
    ap.add_argument("--touches", type=int, default=20000)
    ap.add_argument("--workloads", default="zipf,random")
    args = ap.parse_args(argv)
    names = list(POLICIES)
    print(f"{'workload':<10}{'touches':>8}{'pages':>7}{'distinct':>9}"
          + "".join(f"{n:>8}" for n in names))  # fmt: skip
    for w in args.workloads.split(","):
        trace = [o // PAGE for o in _offsets(w, NPAGES, args.touches, 2, SEED)]
        for cap in args.pages:
            row = [POLICIES[n](trace, cap) for n in names]
            print(f"{w:<10}{len(trace):>8}{cap:>7}{len(set(trace)):>9}"
                  + "".join(f"{m:>8}" for m in row))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
