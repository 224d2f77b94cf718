"""A partition as the hypervisor holds it, and its workers.

A partition is a named logical memory (a memfd every worker maps shared),
its page table (kept by the fault engine, csrc/engine.c: state, slot, CRC32
and eviction stamp a page, a slot map of its device), its paging stream,
its error log, and what Python decides about its device: which slots that
failed a write are tried again when (pyhv.slots), and when dirty pages must
wait.
"""

from __future__ import annotations

import array
import collections
import errno
import mmap
import os

from pyhv import owners, uffd
from pyhv.slots import SlotHealth
from pyhv.stream import Stream
from pyhv.uffd import PAGE_SIZE

# Page states, as the engine keeps them (csrc/engine.c says what each means).
UNTOUCHED, DIRTY, CLEAN, FILLING, PAGING_OUT, ON_DEVICE, POISONED = range(7)
STATE_NAMES = ("untouched", "dirty", "clean", "filling", "paging_out", "on_device", "poisoned",
               "loaned", "snapshot")  # fmt: skip
SLOT_FREE, SLOT_USED, SLOT_BAD = 0, 1, 2  # the engine's slot map



def maps_range(pid: int, base: int, size: int) -> bool:
    """Does process pid map anything in [base, base+size)?  (False if it is gone.)"""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
                if lo >= base + size:
                    return False
                if hi > base:
                    return True
    except (OSError, ValueError):
        pass
    return False


def snapshot_crcs(path: str, pages: int) -> array.array:
    """A snapshot's CRC32s; a page lost to a machine check before it was
    saved gets one no page can match (a machine check again when touched)."""
    import json

    crcs = array.array("I")
    with open(os.path.join(path, "crc32", "data.ninja"), "rb") as f:
        crcs.frombytes(f.read(4 * pages))
    if len(crcs) != pages:
        raise OSError(errno.EINVAL, f"snapshot {path}: {len(crcs)} CRC32s for {pages} pages")
    with open(os.path.join(path, "meta.json")) as f:
        for page in json.load(f).get("poisoned", []):
            if isinstance(page, int) and 0 <= page < pages:
                crcs[page] ^= 1
    return crcs


class Worker:
    """A worker process attached to a partition: its pid (from SO_PEERCRED),
    a pidfd for signals, its control connection, and once it registered its
    userfaultfd, the engine's handle of it (the engine owns the uffd)."""

    __slots__ = ("id", "pid", "pidfd", "partition", "conn", "eng", "alive", "base", "tid", "ident")

    def __init__(self, wid: int, pid: int, partition: "Partition", conn):
        self.id = wid
        self.pid = pid
        self.partition = partition
        self.conn = conn
        self.pidfd = -1
        self.eng = None
        self.alive = True
        self.base = 0  # where it maps the memory
        self.tid = 0  # a forked child's first faulting thread, in its own pid namespace
        self.ident = 0  # its identity page (pyhv.attach)


def device_spec(dev) -> dict:
    """What a paging service needs to open a device for a stream ("paths":
    each service's own, streams.bind picks it)."""
    return {"id": dev.id, "path": str(dev.path), "kind": dev.kind, "size": dev.size,
            "direct": dev.direct, "tls_psk": dev.tls_psk,
            "paths": {s: dev.path_for(s) for s in dev.services}}  # fmt: skip


class Partition:
    def __init__(self, index: int, cfg, device, engine: uffd.Engine, kept=None):
        """kept(what): the fd a crashed hypervisor left for this partition's
        "mem", "log" or "table" (-1: none; pyhv.hypervisor.recovery)."""
        self.index = index  # its stream's id on the wire, and the engine's name for it
        self.cfg = cfg
        self.name = cfg.name
        self.pages = cfg.pages
        self.owner_uid, self.group_gid = owners.partition_ids(cfg)  # who else may use it
        self.device = device
        self.engine = engine
        fds = {k: kept(k) if kept else -1 for k in ("mem", "log", "table")}
        if fds["mem"] < 0:  # (a table without its memory means nothing)
            for fd in (fds["log"], fds["table"]):
                if fd >= 0:
                    os.close(fd)
            fds["log"] = fds["table"] = -1
        self.recovered = fds["mem"] >= 0
        self.memfd = fds["mem"] if self.recovered else uffd.memfd(f"pyhv-{cfg.name}", cfg.memory)
        # The hypervisor's own view, read-only, never touched: mincore() on it
        # tells whether a page is in the memfd (reading a hole would fill it).
        self.mem = mmap.mmap(self.memfd, cfg.memory, mmap.MAP_SHARED, mmap.PROT_READ)
        self.base = uffd.address_of(self.mem, writable=False)
        self.eng = engine.part_new(index, self.pages, device.pages, self.memfd, self.base,
                                   fds["table"])  # fmt: skip
        spec = {**device_spec(device), "memory": cfg.memory}
        if cfg.snapshot:
            spec["snapshot"] = os.path.join(cfg.snapshot, "memory", "data.ninja")
            if fds["table"] < 0:  # (a table kept knows already)
                engine.part_snapshot(self.eng, snapshot_crcs(cfg.snapshot, self.pages))
        self.mcelog = uffd.MceLog(cfg.name, fds["log"])
        self.workers: dict[int, Worker] = {}
        self.stream = Stream(index, cfg.name, spec, list(cfg.paging), self.memfd)
        self.evicting = 0  # page-outs of this partition in flight or queued
        self.counters = collections.Counter()  # what Python counts: errors
        self.slots = SlotHealth(self._slot_free)  # slots that failed a write
        self.full_until = 0.0  # no new dirty page-outs until then (full, or failing)
        self.pressure: set = set()  # connections of workers that loan pages when asked
        self.last_ask = 0.0  # when they were last asked
        self.advising = 0  # prefetch advice being read
        self.state = "active"  # or "suspending", "suspended" (pyhv.hypervisor.suspend)
        self.working_set: list[int] | None = None  # its resident pages when it was suspended
        self.warming = 0  # the working-set read-ahead under way (its generation)
        self.saving = None  # the connection of a snapshot being saved (it holds the partition)

    def in_memory(self, page: int) -> bool:
        """Is the page in the memfd's page cache (mincore: no fault, no fill)?"""
        return bool(uffd.in_memory(self.base + page * PAGE_SIZE, PAGE_SIZE)[0] & 1)

    def close(self) -> None:
        self.engine.part_free(self.eng)
        self.eng = None
        self.mem.close()
        os.close(self.memfd)
        self.mcelog.close()

    def _slot_free(self, slot: int) -> None:
        self.engine.slot_set(self.eng, slot, SLOT_FREE)

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict:
        s = self.engine.stats(self.eng)
        c = self.counters
        counts = self.engine.state_counts(self.eng)
        return {
            "name": self.name,
            "state": self.state,
            "memory_bytes": self.cfg.memory,
            "pages": self.pages,
            "resident_pages": s["resident"],
            "faults": s["faults"],
            "first_touches": s["first_touches"],
            "zeroed_ahead": s["zeroed_ahead"],
            "page_ins": s["page_ins"],
            "page_outs": s["page_outs"],
            "prefetched": s["prefetched"],
            "clean_drops": s["clean_drops"],
            "refaults": s["refaults"],
            "active_pages": s["active"],
            "armed": s["armed"],  # pages write-protected to see whether they are in use
            "write_refs": s["write_refs"],  # ... seen written so
            "promoted": s["promoted"],  # ... and kept for it (to the active queue)
            "wp_faults": s["wp_faults"],
            "minor_faults": s["minor_faults"],
            "installed_writable": s["installed_writable"],
            "written_share": round(s["written_share"], 3),
            "removed_by_worker": s["removed_by_worker"],
            "loaned_pages": counts[7],  # given back (discard, MADV_REMOVE), not touched since
            "frames_loaned": s["loaned"],  # frames given back so, in all
            "loans_asked": c["loans_asked"],  # pages asked for under pool pressure
            "discards": c["discards"],
            "advised": s["advised"],  # pages read ahead on advice (pyhv.prefetch)
            "snapshot": self.cfg.snapshot,  # restored from (pages read from it on first touch)
            "snapshot_pages_read": s["snapshot_reads"],
            "forks": c["forks"],  # workers' children adopted
            "io_errors": c["io_errors"],
            "page_out_errors": c["page_out_errors"],
            "machine_checks": c["machine_checks"],
            "isolation": self.cfg.isolation,
            "weight": self.cfg.weight,
            "metadata_bytes_per_page": round(s["metadata_bytes"] / self.pages, 2),
            "bad_slots": self.slots.unusable,  # waiting for a retry, or retired
            "retired_slots": len(self.slots.retired),
            "free_slots": self.engine.slot_count(self.eng, SLOT_FREE),
            "device": self.cfg.device,
            "paging": self.cfg.paging,
            "stream": self.stream.state,
            "stream_in_flight": len(self.stream.inflight) + s["reads_inflight"],
            "stream_queued": len(self.stream.queued) + s["reads_queued"],
            "service": self.stream.service.name if self.stream.service else None,
            "workers": sorted(w.pid for w in self.workers.values() if w.pid),
            "pages_by_state": {STATE_NAMES[i]: n for i, n in enumerate(counts) if n},
        }
