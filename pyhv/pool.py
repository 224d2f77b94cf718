"""The shared memory pool: a budget of resident pages (frames) for all
partitions, and the queue of partitions' faults waiting for a frame.  (Each
partition keeps its own resident pages in eviction order; the hypervisor
picks among partitions by weight.)

Invariant: ``used <= pages`` at all times, where a frame is held by every
page that is resident, being filled, or being paged out.
"""

from __future__ import annotations

import collections
from typing import Callable


class Pool:
    def __init__(self, pages: int):
        self.pages = pages
        self.used = 0
        self.high_water = 0
        self.waiters: collections.deque[Callable[[], None]] = collections.deque()

    def try_take(self) -> bool:
        if self.used < self.pages and not self.waiters:
            self._take()
            return True
        return False

    def _take(self) -> None:
        self.used += 1
        if self.used > self.high_water:
            self.high_water = self.used
        assert self.used <= self.pages, "pool invariant broken"

    def release(self, frames: int = 1) -> None:
        """Give frames back and hand them to the oldest waiters, if any."""
        self.used -= frames
        self.serve()

    def serve(self) -> None:
        """Hand free frames to waiting faults, oldest first."""
        while self.waiters and self.used < self.pages:
            self._take()
            self.waiters.popleft()()

    def shortfall(self, reserve: int, evicting: int = 0) -> int:
        """How many more pages must start eviction to serve every waiter
        and keep `reserve` frames coming, when page-outs that will free
        `evicting` frames soon are under way."""
        free = self.pages - self.used
        return len(self.waiters) + reserve - free - evicting
