"""The fault engine's Python side: what the C engine (csrc/engine.c) hands
to Python, in batches.

The engine resolves every fault by itself.  Python is woken (its eventfd)
when the pool runs low, and then chooses how many pages each partition
gives up (pyhv.hypervisor.victims) and has the engine take them; it writes
the dirty ones back through the partition's paging stream, many pages to
neighbouring slots in one WRITE, and reports each WRITE's outcome to the
engine.  It also takes the engine's events: a page that could not be read
(a machine check), a worker the engine dropped, a fast channel at
end-of-file.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import time

from pyhv import uffd, wire
from pyhv.hypervisor import victims
from pyhv.hypervisor.partition import Partition
from pyhv.stream import FLOWING

log = logging.getLogger("pyhv.hypervisor")



class EngineSide:
    """Mixed into the Hypervisor: eviction, write-back, engine events."""

    def on_engine(self, mask: int) -> None:
        try:
            os.read(self.engine.notify_fd, 8)
        except BlockingIOError:
            pass
        for kind, err, stream, page, worker in self.engine.events():
            if kind == uffd.Engine.READ_FAILED:
                part = self.by_index.get(stream)
                if part is not None:
                    self._page_in_failed(part, page, err or errno.EIO)
            elif kind == uffd.Engine.WORKER_GONE:
                w = self.workers_by_id.get(worker)
                if w is not None:  # ESRCH, ENOENT: it exits, or unmapped the memory
                    self._drop_worker(w, f"its uffd failed ({errno.errorcode.get(err, err)})",
                                      kill=err not in (errno.ESRCH, errno.ENOENT))  # fmt: skip
            elif kind == uffd.Engine.CHAN_CLOSED:
                for svc in self.services.values():
                    if svc.chan is not None and svc.chan_id == worker:
                        self.service_failed(svc, "its fast channel closed")
            elif kind == uffd.Engine.PATH_LOST:
                part = self.by_index.get(stream)
                for svc in self.services.values():
                    if part is not None and svc.chan is not None and svc.chan_id == worker:
                        self.path_lost(part.stream, svc, "a page-in answered ENOTCONN")
            elif kind == uffd.Engine.WORKER_FORKED:
                self.on_forked(self.by_index.get(stream), page, worker, err)
            elif kind == uffd.Engine.WORKER_PID:
                self.on_worker_pid(worker, page)

        self.replenish()

    # --- eviction -----------------------------------------------------------------------

    def replenish(self) -> None:
        """Start evicting until every waiting fault and `reserve` more will
        have a frame; once it must, a batch more (see victims)."""
        # page-outs queued on a stream that does not flow free nothing soon
        coming = sum(p.evicting for p in self.partitions if p.stream.state in FLOWING)
        want = self.engine.shortfall(coming)
        if want <= 0:
            return
        if (self.ask_loans(want) or time.monotonic() < self.pressure_until) and not (
                self.engine.pool()["waiting"]):  # fmt: skip
            return  # a moment for the loans first (then this runs again)
        want += victims.batch(self.pool_pages)
        now = time.monotonic()
        candidates = {}
        for part in self.partitions:
            resident, queued = self.engine.load(part.eng)
            if queued:
                candidates[part] = (resident, queued)
        while want > 0 and candidates:
            rows = [(p, r, q, p.cfg.weight) for p, (r, q) in candidates.items()]
            shares = victims.shares(rows, want)
            if not shares:
                return
            for part, n in shares.items():
                # a dirty victim must be written, which cannot be now when no
                # service flows for it or its device was full a moment ago
                allow_dirty = part.stream.state in FLOWING and part.full_until <= now
                dirty, clean = self.engine.evict(part.eng, n, allow_dirty)
                want -= len(dirty) + clean
                if dirty:
                    part.evicting += len(dirty)
                    self._write_back(part, dirty)
                resident, queued = candidates[part]
                if len(dirty) + clean < n or queued <= n:  # it has nothing more to give now
                    del candidates[part]
                else:
                    candidates[part] = (resident - n, queued - n)

    # --- write-back ---------------------------------------------------------------------

    def _write_back(self, part: Partition, pages: list[int]) -> None:
        """Write PAGING_OUT pages to new slots, neighbouring ones where the
        device has them, one WRITE a run.  The service writes them from the
        partition's memory and punches them out of it."""
        i = 0
        while i < len(pages):
            chunk = pages[i : i + victims.WRITE_BATCH]
            first, n = self.engine.write_slots(part.eng, chunk)
            if n == 0 and part.slots.retired:  # only retired slots left: another chance
                log.warning("partition %s: device %s has no free slot; its %d retired slots "
                            "are tried again", part.name, part.device.id,
                            part.slots.unretire())  # fmt: skip
                first, n = self.engine.write_slots(part.eng, chunk)
            if n == 0:  # no free slot left (all set aside or in use)
                for page in pages[i:]:
                    part.evicting -= 1
                    self._page_out_failed(part, page, errno.ENOSPC, wrote=False)
                return
            self._submit_write(part, first, chunk[:n])
            i += n

    def _submit_write(self, part: Partition, first: int, pages: list[int], flags: int = 0) -> None:
        def done(status, count, data):
            retried = req.flags & wire.FLAG_RETRY
            if status and len(pages) > 1 and status != -errno.ENOSPC:
                for k, page in enumerate(pages):  # which page's slot failed: one by one
                    self._submit_write(part, first + k, [page], retried)
                return
            part.evicting -= len(pages)
            if status:
                for page in pages:
                    if retried and not part.in_memory(page):
                        # the service that died wrote it, then punched it;
                        # its copy on the device could not be confirmed: a
                        # page the system cannot deliver, never zeros
                        self._page_in_failed(part, page, -status)
                    else:
                        self._page_out_failed(part, page, -status, alone=len(pages) == 1)
                return
            self.engine.written(part.eng, pages, data[: 4 * len(pages)])
            ended = part.slots.written(first, len(pages))
            if ended:
                log.warning("partition %s: device %s writes again, after %d failed page-outs",
                            part.name, part.device.id, ended)  # fmt: skip
            self.replenish()

        req = part.stream.submit(wire.OP_WRITE, first, len(pages),
                                 array.array("I", pages).tobytes(), done, flags)  # fmt: skip

    def _page_out_failed(self, part: Partition, page: int, err: int, wrote: bool = True,
                         alone: bool = False) -> None:  # fmt: skip
        """Nothing is lost: the page stays resident (dirty) at the back of
        the victim queue, and another page is evicted now instead.

        An I/O error sets the slot aside (pyhv.slots: tried again after a
        back-off, or retired): the page's next page-out goes to another slot.
        ENOSPC is the device being full, not the slot being bad; failures in
        a row with no page-out done between are the device failing: either
        way, for a while (growing while it lasts) no dirty page of the
        partition is chosen (clean pages still are), then writing is tried
        again.  An outage is logged when it begins and ends, not a page."""
        part.counters["io_errors"] += 1
        now = time.monotonic()
        if not wrote or err == errno.ENOSPC:
            part.counters["page_out_errors"] += wrote
            self.engine.write_failed(part.eng, page, bad=False)
            if part.full_until <= now:  # (once a hold, not once a page)
                hold = part.slots.next_hold()
                part.full_until = now + hold
                log.error("partition %s: page %d: device %s is full (%s); dirty pages stay "
                          "resident, retrying in %gs", part.name, page, part.device.id,
                          "ENOSPC" if wrote else "no usable slot", hold)  # fmt: skip
        else:
            slot = self.engine.write_failed(part.eng, page, bad=True)
            retired = part.slots.failed(slot, now, alone) if slot >= 0 else False
            self.next_slot_retry = min(self.next_slot_retry, part.slots.next_retry)
            part.counters["page_out_errors"] += 1
            if retired or not part.slots.failing:
                log.error("partition %s: page %d: page-out to device %s slot %d failed: %s; page "
                          "stays resident, slot %s", part.name, page, part.device.id, slot,
                          errno.errorcode.get(err, err),
                          "retired" if retired else "tried again later")  # fmt: skip
            if part.slots.failing and part.full_until <= now:
                hold = part.slots.next_hold()
                part.full_until = now + hold
                log.error("partition %s: device %s failed %d page-outs in a row (%s); dirty "
                          "pages wait %gs before it is tried again", part.name, part.device.id,
                          part.slots.failing_in_row, errno.errorcode.get(err, err),
                          hold)  # fmt: skip
        self.replenish()
