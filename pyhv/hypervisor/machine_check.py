"""Machine checks: a page the system cannot deliver is never zeros.

When a page-in fails (EIO, a short read, a CRC32 mismatch), or a WRITE
resent after a failover cannot be confirmed, the error record goes into the
partition's error log (a memfd every worker maps read-only) first; then the
engine poisons the page in every worker attached now, so that the access of
any of them raises SIGBUS at the page and their handler (csrc/mce.c) stops
them.  With isolation = "partition" every other worker of the partition is
stopped too.  Then the page is cleared: its slot is released (DISCARD), and
in a worker that attaches later it reads as a zero page.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import time

from pyhv import wire
from pyhv.hypervisor.partition import Partition

log = logging.getLogger("pyhv.hypervisor")

ERROR_LOG = "errors.jsonl"  # one machine-check record a line, in the run directory


class MachineChecks:
    """Mixed into the Hypervisor: raising, recording and reporting machine checks."""

    def _page_in_failed(self, part: Partition, page: int, err: int) -> None:
        error = "checksum" if err == errno.EBADMSG else errno.errorcode.get(err, str(err))
        slot = self.engine.slot_of(part.eng, page)
        seq = part.mcelog.write(page, error, part.device.id)  # before any worker can look
        part.counters["io_errors"] += 1
        part.counters["machine_checks"] += 1
        record = {
            "seq": seq, "partition": part.name, "page": page, "slot": slot,
            "device": part.device.id, "error": error, "workers": [], "reported_by": [],
            "action": "stop " + ("partition" if part.cfg.isolation == "partition" else "process"),
            "time": time.time(),
        }  # fmt: skip
        self.errors.append(record)
        log.error("partition %s: page %d (device %s slot %d): page-in failed: %s; machine check",
                  part.name, page, part.device.id, slot, error)  # fmt: skip
        self._poison(part, page, record)

    def _poison(self, part: Partition, page: int, record: dict) -> None:
        if part.eng is None:  # removed meanwhile
            return
        slot, touched = self.engine.poison(part.eng, page)
        if slot == -2:  # a worker of the partition forks right now: in a moment
            self.later(0.005, lambda: self._poison(part, page, record))
            return
        for wid in touched:
            w = part.workers.get(wid)
            if w is not None and w.pid not in record["workers"]:
                record["workers"].append(w.pid)
        if part.cfg.isolation == "partition":
            for w in list(part.workers.values()):
                if w.pid not in record["workers"]:
                    record["workers"].append(w.pid)
                try:
                    signal.pidfd_send_signal(w.pidfd, signal.SIGBUS)
                except OSError:
                    pass
        # clearing: the page starts again as a zero page, its slot is free
        if slot >= 0 and part.stream.service is not None:
            part.stream.submit(wire.OP_DISCARD, slot, 1, None, lambda *a: None)
        self._save_error(record)

    def _save_error(self, record: dict) -> None:
        try:
            with open(os.path.join(self.run_dir, ERROR_LOG), "a") as f:  # (0600: the umask)
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            log.error("hypervisor: cannot append to the error log: %s", e.strerror)

    def op_mce(self, conn, msg, fds):
        """A worker's machine-check handler reports (its last words).  Only
        what the hypervisor recorded itself is believed: a report names a
        record of this worker's own partition, or is ignored."""
        w = conn.worker
        if w is None:
            raise wire.ProtocolError("mce from a connection that is no worker")
        page, seq = int(msg["page"]), int(msg.get("seq", 0))
        for record in reversed(self.errors):
            if record["partition"] == w.partition.name and record["page"] == page and (
                    not seq or record["seq"] == seq):  # fmt: skip
                for key in ("reported_by", "workers"):
                    if w.pid not in record[key]:
                        record[key].append(w.pid)
                log.warning("partition %s: worker %d stopped by the machine check at page %d",
                            w.partition.name, w.pid, page)  # fmt: skip
                break
        else:
            log.warning("partition %s: worker %d reports a machine check at page %d that was "
                        "never raised; ignored", w.partition.name, w.pid, page)  # fmt: skip
        return None, ()

    def op_errors(self, conn, msg, fds):
        mine = self.visible(conn, {r["partition"] for r in self.errors})
        return {"ok": True, "errors": [r for r in self.errors if r["partition"] in mine]}, ()
