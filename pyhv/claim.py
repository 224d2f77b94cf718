"""The claim on a device on an NBD server: what flock is for a file.

A file or block device is guarded by an exclusive flock that the hypervisor
holds while it runs (a second system on the machine cannot take it).  An NBD
export has no such thing: any client that reaches it can write it, from any
host, and the NBD protocol has no reservations (SCSI's persistent
reservations are what a VIOS would use).  So a system claims an export in
the export itself, as sanlock's delta leases do: the export's last page
holds a record (the system, its host, run directory, hypervisor pid, and a
beat) that the hypervisor rewrites every BEAT seconds while it runs.

A system takes a device when its record is absent, released (a clean
shutdown, `device remove`, `partition export`), its own, or dead: a system
on this machine (same /etc/machine-id, boot and pid namespace) whose
hypervisor process (pid and start time) is gone, or any other whose beat has not moved for STALE seconds (that
costs the taker STALE seconds of waiting, once).  It writes its record and
reads it back after SETTLE seconds, longer than a write may take (the
connection's deadline): of two systems taking a device at once, the later
write wins and the other refuses.  Every path of the device must show the
record just written: paths that lead to different exports are refused.

Each device beats on a thread of its own, every BEAT seconds, each write on
stable storage when answered (FUA), each call bounded by a deadline, so a
dead server delays no other device's beat.  A system fences itself: a
device whose last beat is older than FRESH is not paged to (its stream
waits, as for a lost path) until a beat succeeds again; one whose record
another system has overwritten (this one stalled longer than STALE) is
never paged to again (`stale()` and `lost()`, which the hypervisor reads).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from pyhv.nbd import NbdDevice, redact
from pyhv.uffd import PAGE_SIZE

log = logging.getLogger("pyhv.claim")

MAGIC = b"PYHV-CLAIM-1\n"
BEAT = 1.0  # seconds between beats
DEADLINE = 1.0  # a claim's read or write unanswered this long fails (the beat is missed)
#: Past this since its last beat, a system stops paging to the device: a beat
#: (BEAT), a read and a write that may each take DEADLINE, a second to spare.
FRESH = BEAT + 2 * DEADLINE + 1.0
#: The longest an NBD command of the paging services may stay unanswered
#: before its path is given up (a service's timeout / 2, capped here), ...
MAX_PATH_DEADLINE = 4.0
#: ... so that a beat that has not moved for STALE means its system is gone:
#: FRESH, a turn of the hypervisor's loop (1 s), the longest a write in
#: flight may still take, and a second to spare.
STALE = FRESH + 1.0 + MAX_PATH_DEADLINE + 1.0
SETTLE = 1.5 * DEADLINE  # between writing a claim and reading it back


class ClaimError(Exception):
    """One line: why the device cannot be taken."""


def _offset(d: NbdDevice) -> int:
    return (d.size // PAGE_SIZE - 1) * PAGE_SIZE


def read_record(d: NbdDevice) -> dict | None:
    data = d.pread(PAGE_SIZE, _offset(d))
    if not data.startswith(MAGIC):
        return None
    try:
        rec = json.loads(data[len(MAGIC) :].rstrip(b"\0"))
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def write_record(d: NbdDevice, rec: dict) -> None:
    data = MAGIC + json.dumps(rec, sort_keys=True).encode()
    d.pwrite(data.ljust(PAGE_SIZE, b"\0"), _offset(d), durable=True)


def _read_id(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


#: This machine, this boot (a hostname is no identity: clones share them).
MACHINE = f"{_read_id('/etc/machine-id')}/{_read_id('/proc/sys/kernel/random/boot_id')}"


def _pid_ns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def start_time(pid) -> str | None:
    """When process pid started (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, ValueError, TypeError, IndexError):
        return None


def _judged_here(rec: dict) -> bool:
    """Can this process tell at once whether the record's hypervisor runs?
    Only on the same machine and boot (a machine-id of its own), in the same
    pid namespace (containers share a kernel's boot id, not its pids)."""
    return (bool(_read_id("/etc/machine-id")) and rec.get("machine") == MACHINE
            and rec.get("pid_ns") == _pid_ns() and rec.get("pid_start") is not None)  # fmt: skip


def _holder(rec: dict) -> str:
    return (f"the system in {rec.get('run_dir')} on {rec.get('host')} "
            f"(hypervisor pid {rec.get('pid')})")  # fmt: skip


def live_holder(d: NbdDevice, rec: dict | None, me: dict | None) -> str | None:
    """Who holds the device, if a live system other than `me` does."""
    if not rec or rec.get("state") != "held":
        return None
    if me is not None and rec.get("system") == me["system"]:
        return None
    if _judged_here(rec):  # its hypervisor runs if that very process does
        return _holder(rec) if start_time(rec.get("pid")) == rec["pid_start"] else None
    beat = rec.get("beat")
    time.sleep(STALE)  # another host: is it beating?
    again = read_record(d)
    if again and again.get("system") == rec.get("system") and again.get("beat") == beat:
        log.warning("device at %s: the claim of %s has not moved for %.1f s: taken over",
                    redact(d.uri), _holder(rec), STALE)  # fmt: skip
        return None
    return _holder(again or rec)


def probe(dev) -> None:
    """Raise ClaimError if a live system holds the device (nothing is written)."""
    for uri in dev.uris[:1]:
        try:
            with NbdDevice(uri, dev.tls_psk, deadline_s=DEADLINE) as d:
                who = live_holder(d, read_record(d), None)
        except OSError as e:
            raise ClaimError(f"device {dev.id!r}: {redact(uri)}: {e.strerror or e}") from None
        if who:
            raise ClaimError(f"device {dev.id!r} ({redact(uri)}) is in use by {who}")


class _Held:
    def __init__(self, dev, conn: NbdDevice, rec: dict):
        self.dev = dev
        self.conn: NbdDevice | None = conn
        self.rec = rec
        self.lock = threading.Lock()
        self.lost = False  # another system's record is there now
        self.last_ok = time.monotonic()  # the last beat written
        self.stop = threading.Event()


class Claims:
    """The claims of one hypervisor, and the thread that beats them."""

    def __init__(self, run_dir: str):
        self.me = {"system": uuid.uuid4().hex, "host": socket.gethostname(), "machine": MACHINE,
                   "run_dir": os.path.abspath(run_dir), "pid": os.getpid(),
                   "pid_start": start_time(os.getpid()), "pid_ns": _pid_ns()}  # fmt: skip
        self.held: dict[str, _Held] = {}
        self.mu = threading.Lock()

    def acquire(self, dev) -> None:
        """Claim the device, or raise ClaimError with why not."""
        where = f"device {dev.id!r}"
        try:
            conn = NbdDevice(dev.uris[0], dev.tls_psk, deadline_s=DEADLINE)
        except OSError as e:
            raise ClaimError(f"{where}: {redact(dev.uris[0])}: {e.strerror or e}") from None
        try:
            rec = read_record(conn)
            who = live_holder(conn, rec, self.me)
            if who:
                raise ClaimError(f"{where} ({redact(dev.uris[0])}) is in use by {who}")
            if (rec and rec.get("system") == self.me["system"] and rec.get("state") == "held"
                    and rec.get("device") != dev.id):  # fmt: skip
                raise ClaimError(f"{where}: its export is device {rec.get('device')!r} "
                                 "already")  # fmt: skip
            mine = {**self.me, "device": dev.id, "state": "held", "beat": 1,
                    "nonce": uuid.uuid4().hex, "time": time.time()}  # fmt: skip
            write_record(conn, mine)
            time.sleep(SETTLE)
            back = read_record(conn)
            if not back or back.get("nonce") != mine["nonce"]:
                raise ClaimError(f"{where}: {_holder(back or {})} took it at the same moment")
            for uri in dev.uris[1:]:  # every path to the same export
                try:
                    with NbdDevice(uri, dev.tls_psk, deadline_s=DEADLINE) as other:
                        seen = read_record(other)
                except OSError as e:
                    raise ClaimError(f"{where}: {redact(uri)}: {e.strerror or e}") from None
                if not seen or seen.get("nonce") != mine["nonce"]:
                    raise ClaimError(f"{where}: {redact(uri)} does not lead to the export at "
                                     f"{redact(dev.uris[0])}")  # fmt: skip
        except ClaimError:
            conn.close()
            raise
        except OSError as e:
            conn.close()
            raise ClaimError(f"{where}: {redact(dev.uris[0])}: {e.strerror or e}") from None
        h = _Held(dev, conn, mine)
        with self.mu:
            self.held[dev.id] = h
        threading.Thread(target=self._beat, args=(h,), name=f"pyhv-claim-{dev.id}",
                         daemon=True).start()  # fmt: skip
        log.info("device %s: claimed (%s)", dev.id, redact(dev.uris[0]))

    def release(self, dev_id: str) -> None:
        """Let the device go: its record says released (best effort: a server
        that cannot be reached keeps the record, which goes stale)."""
        with self.mu:
            h = self.held.pop(dev_id, None)
        if h is None:
            return
        h.stop.set()
        with h.lock:
            try:
                if h.conn is None or h.conn.dead:
                    self._reconnect(h)
                if not h.lost and h.conn is not None:
                    write_record(h.conn, {**h.rec, "state": "released", "time": time.time()})
            except OSError as e:
                log.warning("device %s: claim not released (%s): it goes stale in %.0f s",
                            dev_id, e, STALE)  # fmt: skip
            if h.conn is not None:
                h.conn.close()
                h.conn = None

    def close(self) -> None:
        for dev_id in list(self.held):
            self.release(dev_id)

    def status(self, dev_id: str) -> dict | None:
        h = self.held.get(dev_id)
        if h is None:
            return None
        return {"beat": h.rec["beat"], "lost": h.lost,
                "age": round(time.monotonic() - h.last_ok, 3)}  # fmt: skip

    def lost(self) -> list[str]:
        """Devices another system has claimed since: never page to them again."""
        return [i for i, h in list(self.held.items()) if h.lost]

    def stale(self) -> list[str]:
        """Devices whose claim has not been renewed for FRESH seconds: another
        system may soon take them; page to them only once a beat succeeds."""
        now = time.monotonic()
        return [i for i, h in list(self.held.items()) if now - h.last_ok > FRESH]

    def _reconnect(self, h: _Held) -> None:
        failed = h.conn.uri if h.conn is not None else None
        if h.conn is not None:
            h.conn.close()
            h.conn = None
        # the path that failed last (a dead link costs a whole connect timeout)
        for uri in sorted(h.dev.uris, key=lambda u: u == failed):
            try:
                h.conn = NbdDevice(uri, h.dev.tls_psk, connect_s=DEADLINE, deadline_s=DEADLINE)
                return
            except OSError:
                continue

    def _beat(self, h: _Held) -> None:
        """One device's beats, until it is released or lost."""
        while not h.stop.wait(BEAT):
            with h.lock:
                if h.lost or self.held.get(h.dev.id) is not h:
                    return
                for attempt in (1, 2):  # a path that failed: at once through another
                    try:
                        if h.conn is None or h.conn.dead:
                            self._reconnect(h)
                        if h.conn is None:
                            break  # no path now: the next beat tries again
                        if not self._renew(h):
                            return
                        break
                    except OSError as e:
                        log.info("device %s: claim beat missed: %s", h.dev.id, e)

    def _renew(self, h: _Held) -> bool:
        """One beat: False if the record is another system's now."""
        rec = read_record(h.conn)
        if not rec or rec.get("nonce") != h.rec["nonce"]:
            h.lost = True
            log.error("device %s: its claim was taken by %s: this system no longer pages "
                      "to it", h.dev.id, _holder(rec or {}))  # fmt: skip
            return False
        h.rec = {**h.rec, "beat": h.rec["beat"] + 1, "time": time.time()}
        write_record(h.conn, h.rec)
        h.last_ok = time.monotonic()
        return True
