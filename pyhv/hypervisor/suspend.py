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

import array
import base64
import logging
import os
import signal
import time
import zlib

from pyhv.hypervisor.partition import Partition

log = logging.getLogger("pyhv.hypervisor")

STOP_PATIENCE = 10.0  # seconds for every worker to be seen stopped
SUSPEND_PATIENCE = 60.0  # seconds for its pages to be written out, else it is given up
WARM_WINDOW = 32  # working-set pages read ahead at once
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
        into = msg.get("dir")
        users = [p.name for p in self.partitions if isinstance(into, str) and p.cfg.snapshot
                 and os.path.realpath(into) == os.path.realpath(p.cfg.snapshot)]  # fmt: skip
        if users:  # (they read their pages from there)
            return {"ok": False, "error": f"{into}: partition(s) {', '.join(users)} were "
                    "restored from it and read it still"}, ()  # fmt: skip
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
                              "nbd": {"uris": part.device.uris, "tls_psk": part.device.tls_psk}
                              if part.device.kind == "nbd" else None,
                              "snapshot": part.cfg.snapshot,
                              "table": base64.b64encode(zlib.compress(state + slot + crc, 1))
                              .decode()}, (part.memfd,))  # fmt: skip

        self.after(quiet, answer)
        return None, ()

    def snapshot_gone(self, conn) -> None:
        """A snapshot's connection closed: its partition goes on."""
        for part in self.partitions:
            if part.saving is conn:
                part.saving = None

    def _signal_workers(self, workers, sig: int) -> None:
        for w in workers:
            try:
                if w.pidfd >= 0:
                    signal.pidfd_send_signal(w.pidfd, sig)
                elif w.pid > 0:
                    os.kill(w.pid, sig)
            except OSError:
                pass

    def suspend_partition(self, part: Partition, done) -> None:
        """Stop its workers, write out its pages, free its frames; then
        done(reply).  It gives up (the workers go on) when its pages cannot
        be written within SUSPEND_PATIENCE, or it is resumed meanwhile."""
        began = time.monotonic()
        part.state = "suspending"
        self._signal_workers(part.workers.values(), signal.SIGSTOP)
        before = self.engine.stats(part.eng)

        def all_stopped() -> bool:  # (a child not named yet cannot be seen stopped)
            return all(w.pid and stopped(w.pid) for w in part.workers.values())

        def give_up(why: str) -> None:
            if part.eng is not None and part.state == "suspending":
                part.state = "active"
                self._signal_workers(part.workers.values(), signal.SIGCONT)
            log.warning("partition %s: not suspended: %s", part.name, why)
            done({"ok": False, "error": f"partition {part.name!r} not suspended: {why}"})

        def evict_all() -> None:
            now = time.monotonic()
            if part.eng is None:
                return give_up("it was removed")
            if part.state != "suspending":
                return give_up("it was resumed first")
            if now - began > SUSPEND_PATIENCE:
                return give_up(f"its pages could not be written out within "
                               f"{SUSPEND_PATIENCE:g}s")  # fmt: skip
            if part.stream.service is None:
                return give_up("its stream lost its paging service")
            if not all_stopped() and now - began < STOP_PATIENCE:
                self._signal_workers(part.workers.values(), signal.SIGSTOP)  # (children too)
                self.later(0.005, evict_all)
                return
            if part.working_set is None:
                part.working_set = self.engine.resident(part.eng)
            resident, _ = self.engine.load(part.eng)
            if resident and part.full_until <= now:  # (a device that failed: a moment first)
                dirty, _ = self.engine.evict(part.eng, resident, 2)
                if dirty:
                    part.evicting += len(dirty)
                    self._write_back(part, dirty)
            s = self.engine.stats(part.eng)
            if s["resident"] or s["pending"] or part.evicting:
                self.later(0.002, evict_all)  # (read-aheads landing, write-backs in flight)
                return
            part.state = "suspended"
            after = s
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

    def resume_partition(self, part: Partition, prefetch: bool = True) -> dict:
        """Let its workers go on; read its working set back in the background
        (a suspend still under way is given up)."""
        part.state = "active"
        self._signal_workers(part.workers.values(), signal.SIGCONT)
        ws, part.working_set = part.working_set or [], None
        pages = self._warm_set(part, ws if prefetch else [],
                               lambda p: self.engine.slot_of(part.eng, p))  # fmt: skip
        log.info("partition %s: resumed; reading %d pages of its working set back",
                 part.name, len(pages))  # fmt: skip
        return {"ok": True, "partition": part.name, "state": part.state,
                "working_set_pages": len(ws), "read_ahead_pages": len(pages)}  # fmt: skip

    def _warm_set(self, part: Partition, ws, where) -> list[int]:
        """Read back the most recently used pages of a working set (least
        recently used first) that fit in the pool beside its reserve, in
        device order (`where`: a page's place on it, < 0: none)."""
        pool = self.engine.pool()
        room = max(0, pool["pages"] - pool["reserve"])
        recent = [p for p in ws[len(ws) - room:] if 0 <= p < part.pages] if room else []
        places = {p: where(p) for p in recent}
        pages = sorted((p for p in recent if places[p] >= 0), key=places.__getitem__)
        part.warming += 1
        self._warm(part, pages, time.monotonic(), part.warming)
        return pages

    def warm_from_snapshot(self, part: Partition) -> None:
        """A partition restored from a snapshot: its working set then is read
        ahead, in the snapshot's order (its pages are there by number)."""
        ws = array.array("I")
        try:
            with open(os.path.join(part.cfg.snapshot, "working_set", "data.ninja"), "rb") as f:
                ws.frombytes(f.read())
        except (OSError, ValueError) as e:
            log.warning("partition %s: no working set to read ahead: %s", part.name, e)
            return
        self._warm_set(part, list(ws), lambda p: p)  # (the snapshot holds pages by number)

    def _warm(self, part: Partition, pages: list[int], began: float, generation: int) -> None:
        """A few READs at a time (WARM_WINDOW pages in flight at most): a
        demand fault's READ never waits behind more than those."""
        if (not pages or part.eng is None or part.state != "active"
                or part.warming != generation or time.monotonic() - began > WARM_PATIENCE):
            return  # fmt: skip
        went = 0
        if self.engine.stream_busy(part.eng) < WARM_WINDOW:
            try:
                went = self.engine.prefetch_pages(part.eng, pages[:WARM_WINDOW])
            except BlockingIOError:  # its stream does not flow now
                self.later(0.05, lambda: self._warm(part, pages, began, generation))
                return
        rest = pages[went:]
        if rest:  # (in flight still, or out of free frames: a moment)
            self.later(WARM_RETRY, lambda: self._warm(part, rest, began, generation))
