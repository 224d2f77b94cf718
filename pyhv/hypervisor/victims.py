"""Which partitions give up frames, and how many: the eviction policy's
judgement, taken in batches.

The engine keeps each partition's victim queues (two queues, 2Q, with
refault distance from a one-byte eviction stamp a page: a page that comes
back within a pool's worth of evictions of its eviction is in use and goes
to the active queue) and takes the victims from them; what is decided here
is the share of each partition: under equal pressure, resident pages in
proportion to `weight`.  Eviction starts when the pool runs low (fewer than
`reserve` frames free, or a fault waiting for one) and then takes a batch
more than the shortfall (a low and a high watermark), so that write-back
goes out in WRITEs of many pages.
"""

from __future__ import annotations

import heapq

EVICT_AHEAD = 128  # frames kept free ahead of demand once the pool is full (read-ahead takes them)
WRITE_BATCH = 64  # dirty pages written back together, to neighbouring slots, in one WRITE


def reserve(pool_pages: int) -> int:
    """Frames kept free (or being freed) ahead of demand once the pool is full."""
    return min(EVICT_AHEAD, max(1, pool_pages // 8))


def batch(pool_pages: int) -> int:
    """Pages evicted beyond the shortfall once eviction must start."""
    return min(WRITE_BATCH, max(1, pool_pages // 8))


def shares(parts: list[tuple[object, int, int, int]], want: int) -> dict[object, int]:
    """How many pages each partition gives up so that `want` are freed:
    each next page from the partition with the most resident pages per unit
    of weight.  parts: (partition, resident, evictable, weight)."""
    if len(parts) == 1:
        part, _, evictable, _ = parts[0]
        return {part: min(want, evictable)} if evictable else {}
    heap = [(-resident / weight, i, resident, evictable, weight)
            for i, (_, resident, evictable, weight) in enumerate(parts) if evictable]  # fmt: skip
    heapq.heapify(heap)
    out: dict[object, int] = {}
    while want > 0 and heap:
        _, i, resident, evictable, weight = heapq.heappop(heap)
        part = parts[i][0]
        out[part] = out.get(part, 0) + 1
        want -= 1
        if evictable > 1:
            heapq.heappush(heap, (-(resident - 1) / weight, i, resident - 1, evictable - 1,
                                  weight))  # fmt: skip
    return out
