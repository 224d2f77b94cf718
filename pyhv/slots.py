"""Device slots that failed a write, and devices that fail every write.

A page-out that fails with EIO leaves the page resident (nothing is lost)
and sets its slot aside.  Whether the slot or the device is at fault is
learned over time, from what a user-space pager can see:

* A slot set aside is tried again after 1, 2, 4 s: the device may have
  recovered (a transient outage is no bad block).
* A slot is retired for good only after SLOT_STRIKES failures that are its
  own: each of them a WRITE of that slot alone (a failed batch is split page
  by page to find out which slot fails), right after a WRITE that was done
  (the device works), with other WRITEs done since its last failure.  A
  slot that is written fine is forgotten.
* When no slot is free at all, retired slots get another chance: a device
  that failed at random for long enough does not end up unusable.
* FAILING_IN_ROW failures with no WRITE done between are the device failing
  (an outage): dirty pages wait before writing is tried again, the wait
  doubling while it lasts (up to MAX_HOLD), and it is logged once when it
  begins and once when it ends, not once a page.
"""

from __future__ import annotations

import math
from typing import Callable

SLOT_BACKOFF = 1.0  # seconds before a slot that failed is tried again, doubling per strike
SLOT_STRIKES = 3  # failures of its own that retire a slot
FAILING_IN_ROW = 4  # failures with no WRITE done between: the device is failing
HOLD = 1.0  # seconds dirty pages wait when the device is full or failing ...
MAX_HOLD = 8.0  # ... doubling while it goes on, up to this


class SlotHealth:
    """The slots of one device that failed a write.  set_free(slot) gives a
    slot back to the allocator (the slot map is the page table's)."""

    def __init__(self, set_free: Callable[[int], None]):
        self.set_free = set_free
        # slot -> [strikes, retry at (0: given back already), WRITEs done at its last failure]
        self.failed_slots: dict[int, list] = {}
        self.retired: set[int] = set()
        self.waiting = 0  # slots set aside now, to be tried again
        self.next_retry = math.inf
        self.writes_done = 0
        self.failing_in_row = 0  # failures with no WRITE done between
        self.suppressed = 0  # failures not logged one by one during an outage
        self.hold = HOLD

    @property
    def unusable(self) -> int:
        """Slots not given out now: waiting for their retry, or retired."""
        return self.waiting + len(self.retired)

    @property
    def failing(self) -> bool:
        """Is the device failing every write (an outage)?"""
        return self.failing_in_row >= FAILING_IN_ROW

    def failed(self, slot: int, now: float, alone: bool) -> bool:
        """A WRITE to the slot failed (alone: of that slot only); it is set
        aside until its retry time, or retired (True)."""
        # its own failure: alone, the WRITE before it was done (the device
        # works), and others were done since this slot last failed
        own = alone and self.failing_in_row == 0
        self.failing_in_row += 1
        entry = self.failed_slots.get(slot)
        if entry is None:
            entry = self.failed_slots[slot] = [0, 0.0, -1]
        elif entry[1]:
            self.waiting -= 1  # (cannot be: a slot set aside is not given out)
        if own and entry[2] != self.writes_done:
            entry[0] += 1
        entry[2] = self.writes_done
        if entry[0] >= SLOT_STRIKES:
            del self.failed_slots[slot]
            self.retired.add(slot)
            return True
        entry[1] = now + SLOT_BACKOFF * 2 ** max(0, entry[0] - 1)
        self.waiting += 1
        self.next_retry = min(self.next_retry, entry[1])
        return False

    def retry(self, now: float) -> None:
        """Slots whose back-off is over are given back."""
        if now < self.next_retry:
            return
        self.next_retry = math.inf
        for slot, entry in self.failed_slots.items():
            at = entry[1]
            if 0 < at <= now:
                entry[1] = 0
                self.waiting -= 1
                self.set_free(slot)
            elif now < at < self.next_retry:
                self.next_retry = at

    def written(self, first: int, n: int) -> int:
        """A WRITE to slots first..first+n-1 was done: they are good.
        Returns how many failures the outage that this ends had (0: none)."""
        self.writes_done += 1
        ended = self.failing_in_row if self.failing else 0
        self.failing_in_row = 0
        self.suppressed = 0
        self.hold = HOLD
        if self.failed_slots:
            for slot in range(first, first + n):
                entry = self.failed_slots.get(slot)
                if entry is not None and not entry[1]:
                    del self.failed_slots[slot]
        return ended

    def unretire(self) -> int:
        """No slot is free: the retired ones get another chance (their
        strikes start again).  Returns how many."""
        n = len(self.retired)
        for slot in self.retired:
            self.set_free(slot)
        self.retired.clear()
        return n

    def next_hold(self) -> float:
        """How long dirty pages wait now (full, or failing): doubles while
        it goes on."""
        hold = self.hold
        self.hold = min(2 * self.hold, MAX_HOLD)
        return hold
