"""Surviving a crash of the hypervisor: what it hands its supervisor to keep,
and how the next hypervisor takes over (pyhv.supervisor says why and who).

Kept, under keys the next hypervisor finds them by:
  p/NAME/mem, p/NAME/log, p/NAME/table  a partition's memory, error log and
                                        page table (memfds)
  w/ID                                  a worker's uffd; meta: partition,
                                        pid (0: a forked child not named
                                        yet), base, ident
  d/ID                                  the fd holding a device's flock
The config as it is now goes to the run directory's config.json whenever
it changes (control-point operations, imports, restores).

Taking over (Hypervisor.recover, before the paging services start): each
partition's table is made true of its memory again (the engine's
pyhv_eng_part_recover: page-ins half done are read again, page-outs not done
stay resident, done ones are confirmed from the device with a WRITE flagged
RETRY, as after a service's failover); each worker's uffd goes back to the
engine after a UFFDIO_WAKE of its whole range (a fault the dead hypervisor
had read but not resolved faults again); workers rejoin on a new
connection (their watchdog, csrc/watchdog.c); one that has not within
recovery_timeout is let go, as a worker whose connection closed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket

from pyhv import uffd, wire
from pyhv.claim import start_time
from pyhv.hypervisor.partition import Worker
from pyhv.hypervisor.workers import peer_pid

log = logging.getLogger("pyhv.hypervisor")

CONFIG_FILE = "config.json"


class RecoveryRoom:
    """Mixed into the Hypervisor: the keeper socket, taking over, rejoins."""

    keeper: socket.socket | None
    kept: dict  # key -> (fd, meta): what the supervisor kept, until taken
    restarts: int

    # --- what the supervisor keeps --------------------------------------------------------

    def _to_keeper(self, msg: dict, fds=()) -> None:
        if self.keeper is None:
            return
        try:
            wire.send_control(self.keeper, msg, list(fds), limit=wire.MAX_REPLY)
        except OSError as e:  # the supervisor is gone: this hypervisor runs on, unguarded
            log.error("hypervisor: the supervisor cannot be reached (%s): a crash from now on "
                      "loses the partitions", e.strerror or e)  # fmt: skip
            self.keeper.close()
            self.keeper = None

    def keep(self, key: str, fd: int, meta: dict | None = None) -> None:
        self._to_keeper({"op": "keep", "key": key, "meta": meta or {}}, [fd])

    def unkeep(self, key: str | None = None, prefix: str | None = None) -> None:
        self._to_keeper({"op": "drop", "key": key, "prefix": prefix})

    def tell_supervisor(self, op: str) -> None:
        self._to_keeper({"op": op})

    def keep_partition(self, part) -> None:
        self.keep(f"p/{part.name}/mem", part.memfd)
        self.keep(f"p/{part.name}/log", part.mcelog.fd)
        self.keep(f"p/{part.name}/table", self.engine.part_table_fd(part.eng))

    def keep_worker(self, w: Worker) -> None:
        if w.eng is not None:
            self.keep(f"w/{w.id}", self.engine.worker_fd(w.eng),
                      {"partition": w.partition.name, "pid": w.pid, "base": w.base,
                       "ident": w.ident, "start": start_time(w.pid) if w.pid else None})  # fmt: skip

    def take_kept(self, key: str) -> int:
        """A kept fd for this hypervisor to use (-1: none)."""
        fd, _ = self.kept.pop(key, (-1, None))
        return fd

    @property
    def recovery_timeout(self) -> float:
        """How long workers wait for a new hypervisor (0: they exit at once)."""
        return self.config.recovery_timeout if self.keeper is not None else 0.0

    # --- the config as it is now ----------------------------------------------------------

    def _config_now(self) -> dict:
        cfg = self.config
        cfg.pool_size = self.pool_pages * uffd.PAGE_SIZE
        cfg.services = [s.cfg for s in self.services.values()]
        cfg.devices = list(self.devices.values())
        cfg.partitions = [p.cfg for p in self.partitions]
        return cfg.to_dict()

    def save_config(self) -> None:
        """config.json as the system is now, if it changed (atomically: a
        crash leaves the old one or the new one)."""
        mark = (self.pool_pages, tuple(id(p.cfg) for p in self.partitions),
                tuple(self.devices), tuple(self.services))  # fmt: skip
        if mark == getattr(self, "_config_mark", None):
            return
        if self.listener is not None:
            self.share_run_dir()  # (a partition with an owner came or went)
        path = os.path.join(self.run_dir, CONFIG_FILE)
        try:
            with open(path + ".new", "w") as f:  # (0600: the daemon's umask)
                json.dump(self._config_now(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".new", path)
        except OSError as e:
            log.error("hypervisor: cannot write %s: %s", path, e.strerror)
            return
        self._config_mark = mark

    # --- taking over ------------------------------------------------------------------------

    def recover(self) -> None:
        """After a crash: the partitions' tables made true again, the
        workers' uffds back in the engine (partitions exist, services not
        started yet)."""
        totals: dict[str, int] = {}
        for part in [p for p in self.partitions if p.recovered]:
            confirm, done = self.engine.part_recover(part.eng, part.pages)
            for k, v in done.items():
                totals[k] = totals.get(k, 0) + v
            for page in confirm:  # written by the dead one's service: confirmed from the device
                part.evicting += 1
                self._submit_write(part, self.engine.slot_of(part.eng, page), [page],
                                   wire.FLAG_RETRY)  # fmt: skip
            totals["page_outs_confirmed"] = totals.get("page_outs_confirmed", 0) + len(confirm)
        workers = 0
        children = 0
        for key in [k for k in self.kept if k.startswith("w/")]:
            fd, meta = self.kept.pop(key)
            workers += self._recover_worker(int(key[2:]), fd, meta)
            children = max(children, int(key[2:]))
        self.engine.fork_ids_from(children)
        for key in list(self.kept):  # a partition or device no longer in the config
            log.warning("hypervisor: %s kept by the supervisor belongs to nothing now", key)
            os.close(self.kept.pop(key)[0])
            self.unkeep(key)
        self.recovered = {**totals, "workers": workers, "partitions_lost": list(self.lost)}
        log.warning("hypervisor: took over after a crash (restart %d): %s", self.restarts,
                    ", ".join(f"{k} {v}" for k, v in self.recovered.items()))  # fmt: skip
        self.later(self.config.recovery_timeout + 1.0, self._rejoin_deadline)

    def _recover_worker(self, wid: int, fd: int, meta: dict) -> int:
        part = self.by_name.get(meta.get("partition"))
        pid, base, ident = int(meta.get("pid", 0)), int(meta.get("base", 0)), int(meta.get("ident", 0))
        if part is None:
            os.close(fd)
            self.unkeep(f"w/{wid}")
            return 0
        w = Worker(wid, pid, part, None)
        w.base, w.ident = base, ident
        if pid:
            try:
                w.pidfd = os.pidfd_open(pid)
                if meta.get("start") and start_time(pid) != meta["start"]:  # its pid reused
                    raise ProcessLookupError
                # (a partition suspended at the crash is active again: its
                # workers go on, and fault their pages back in)
                signal.pidfd_send_signal(w.pidfd, signal.SIGCONT)
            except OSError:  # gone meanwhile: its uffd goes with it
                os.close(fd)
                if w.pidfd >= 0:
                    os.close(w.pidfd)
                self.unkeep(f"w/{wid}")
                return 0
        try:
            uffd.wake(fd, base, part.cfg.memory)  # faults the dead hypervisor had read
            if ident:  # (and a child's identifying fault)
                try:
                    uffd.wake(fd, ident, uffd.PAGE_SIZE)
                except OSError:
                    pass
            w.eng = self.engine.worker_add(part.eng, fd, base, wid, pid, ident)
        except OSError as e:
            log.error("partition %s: worker %d (pid %d) cannot be taken back: %s", part.name,
                      wid, pid, e.strerror)  # fmt: skip
            os.close(fd)
            if w.pidfd >= 0:
                os.close(w.pidfd)
            self.unkeep(f"w/{wid}")
            return 0
        part.workers[wid] = w
        self.workers_by_id[wid] = w
        if not pid:
            self.unidentified.add(w)
        if wid < uffd.Engine.FORK_IDS:
            self.next_worker = max(self.next_worker, wid + 1)
        self.awaiting_rejoin.add(w)
        return 1

    def _rejoin_deadline(self) -> None:
        for w in list(self.awaiting_rejoin):
            self._drop_worker(w, f"did not rejoin within {self.config.recovery_timeout:g}s")
        self.awaiting_rejoin.clear()

    def op_rejoin(self, conn, msg, fds):
        """A worker of the hypervisor that died: its watchdog's new
        connection (a uffd it sends is the one kept already)."""
        self._close_fds(fds)
        wid = msg.get("worker")
        w = self.workers_by_id.get(wid) if isinstance(wid, int) else None
        pid = peer_pid(conn.sock)
        # Only a worker the crashed hypervisor had, named (a forked child not
        # named yet has no watchdog to rejoin with: it adopts when it first
        # faults), and only from its own process.
        if (w is None or w not in self.awaiting_rejoin or w.partition.name != msg.get("partition")
                or w.conn is not None or conn.worker is not None or not w.pid):  # fmt: skip
            return {"ok": False, "error": f"worker {wid!r} is not awaited here"}, ()
        if w.pid != pid:
            return {"ok": False, "error": f"worker {wid} is process {w.pid}, not {pid}"}, ()
        conn.worker = w
        w.conn = conn
        self.awaiting_rejoin.discard(w)
        log.info("partition %s: worker %d (pid %d) rejoined", w.partition.name, w.id, w.pid)
        return {"ok": True, "worker": w.id}, ()


def restart_counts(hv) -> dict:
    """What status says of crashes survived."""
    return {"restarts": hv.restarts, "recovered": dict(hv.recovered),
            "awaiting_rejoin": len(hv.awaiting_rejoin), "supervised": hv.keeper is not None,
            "recovery_timeout": hv.recovery_timeout}
