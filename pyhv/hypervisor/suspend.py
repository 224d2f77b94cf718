"""Suspend and resume (AMS's hibernation of a shared-memory partition).

Suspend: every worker of the partition is stopped (SIGSTOP through its
pidfd; they stay alive) and seen stopped in /proc; the pages resident then
are noted, in the order eviction would take them (least recently used
first): the working set; then every resident page is evicted whatever its
references (dirty ones written back through the partition's stream, clean
ones dropped), and the partition holds no frame until it is resumed.
While it is suspended no worker attaches to it and no advice reads for it.

Resume: the workers go on (SIGCONT); their pages come back on demand, and
the working set that is on the device is read ahead in the background, in
device order, with free frames only: a demand fault that waits for a frame
always goes first.
"""

from __future__ import annotations

import base64
import logging
import signal
import time
import zlib

from pyhv.hypervisor.partition import Partition

log = logging.getLogger("pyhv.hypervisor")

STOP_PATIENCE = 10.0  # seconds for every worker to be seen stopped
WARM_RETRY = 0.002  # working-set read-ahead waiting for free frames: again after this
WARM_PATIENCE = 60.0  # ... for at most this long


def stopped(pid: int) -> bool:
    """Is the process stopped (or gone)?  /proc/PID/stat's state."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("T", "t", "Z", "X")


class SuspendRoom:
    """Mixed into the Hypervisor: suspending and resuming partitions, and
    holding one still while a snapshot of it is saved (pyhv.snapshot)."""

    def op_snapshot(self, conn, msg, fds):
        """The page table and memfd of a partition that is suspended or has
        no worker, for `pyhv snapshot save`; it stays as it is (no attach,
        no resume, no suspend, no removal) until this connection closes."""
        part = self.by_name.get(msg["partition"])
        if part is None:
            return {"ok": False, "error": f"unknown partition {msg['partition']!r}"}, ()
        if part.saving is not None:
            return {"ok": False, "error": f"partition {part.name!r}: a snapshot of it is being "
                    "saved already"}, ()  # fmt: skip
        if part.state != "suspended" and (part.state != "active" or part.workers):
            return {"ok": False, "error": f"partition {part.name!r} is {part.state} with "
                    f"{len(part.workers)} worker(s): suspend it first"}, ()  # fmt: skip
        part.saving = conn

        def quiet() -> bool:  # nothing in flight (a partition with no worker may still write back)
            return part.eng is None or part.saving is not conn or not (
                part.evicting or self.engine.stats(part.eng)["pending"])  # fmt: skip

        def answer() -> None:
            if part.eng is None or part.saving is not conn:
                return
            state, slot, crc = self.engine.table(part.eng, part.pages)
            ws = part.working_set if part.working_set is not None else self.engine.resident(
                part.eng)  # fmt: skip
            self.reply(conn, {"ok": True, "partition": part.name, "pages": part.pages,
                              "memory": part.cfg.memory, "state": part.state,
                              "device": str(part.device.path), "working_set": ws,
                              "table": base64.b64encode(zlib.compress(state + slot + crc, 1))
                              .decode()}, (part.memfd,))  # fmt: skip

        self.after(quiet, answer)
        return None, ()

    def snapshot_gone(self, conn) -> None:
        """A snapshot's connection closed: its partition goes on."""
        for part in self.partitions:
            if part.saving is conn:
                part.saving = None

    def _signal_workers(self, part: Partition, sig: int) -> None:
        for w in list(part.workers.values()):
            if w.pidfd >= 0:
                try:
                    signal.pidfd_send_signal(w.pidfd, sig)
                except OSError:
                    pass

    def suspend_partition(self, part: Partition, done) -> None:
        """Stop its workers, write out its pages, free its frames; then done(reply)."""
        began = time.monotonic()
        part.state = "suspending"
        self._signal_workers(part, signal.SIGSTOP)
        before = self.engine.stats(part.eng)

        def all_stopped() -> bool:
            return all(stopped(w.pid) for w in part.workers.values() if w.pid)

        def evict_all() -> None:
            if part.eng is None:
                return
            if not all_stopped() and time.monotonic() - began < STOP_PATIENCE:
                self.later(0.005, evict_all)
                return
            if part.working_set is None:
                part.working_set = self.engine.resident(part.eng)
            resident, _ = self.engine.load(part.eng)
            if resident:
                dirty, _ = self.engine.evict(part.eng, resident, 2)
                if dirty:
                    part.evicting += len(dirty)
                    self._write_back(part, dirty)
            s = self.engine.stats(part.eng)
            if s["resident"] or s["pending"] or part.evicting:
                self.later(0.002, evict_all)  # (read-aheads landing, write-backs in flight)
                return
            part.state = "suspended"
            after = self.engine.stats(part.eng)
            secs = time.monotonic() - began
            log.info("partition %s: suspended in %.3fs (%d pages written out, working set %d "
                     "pages)", part.name, secs, after["page_outs"] - before["page_outs"],
                     len(part.working_set))  # fmt: skip
            done({"ok": True, "partition": part.name, "state": part.state,
                  "seconds": round(secs, 4), "working_set_pages": len(part.working_set),
                  "pages_written": after["page_outs"] - before["page_outs"],
                  "clean_dropped": after["clean_drops"] - before["clean_drops"],
                  "workers_stopped": len(part.workers)})  # fmt: skip

        evict_all()

    def resume_partition(self, part: Partition) -> dict:
        """Let its workers go on; read its working set back in the background."""
        part.state = "active"
        self._signal_workers(part, signal.SIGCONT)
        ws, part.working_set = part.working_set or [], None
        slots = {p: self.engine.slot_of(part.eng, p) for p in ws}
        pages = sorted((p for p in ws if slots[p] >= 0), key=slots.__getitem__)  # device order
        part.warming += 1
        self._warm(part, pages, time.monotonic(), part.warming)
        log.info("partition %s: resumed; reading %d pages of its working set back",
                 part.name, len(pages))  # fmt: skip
        return {"ok": True, "partition": part.name, "state": part.state,
                "working_set_pages": len(ws), "read_ahead_pages": len(pages)}  # fmt: skip

    def _warm(self, part: Partition, pages: list[int], began: float, generation: int) -> None:
        if (not pages or part.eng is None or part.state != "active"
                or part.warming != generation or time.monotonic() - began > WARM_PATIENCE):
            return  # fmt: skip
        try:
            went = self.engine.prefetch_pages(part.eng, pages)
        except BlockingIOError:  # its stream does not flow now
            self.later(0.05, lambda: self._warm(part, pages, began, generation))
            return
        if went < len(pages):  # out of free frames (or a fault waits): more later
            rest = pages[went:]
            self.later(WARM_RETRY, lambda: self._warm(part, rest, began, generation))
