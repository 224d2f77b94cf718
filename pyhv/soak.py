"""``pyhv soak``: a bounded run of a whole system under chaos (issue 14, part 4).

It starts a system of its own (a temporary run directory, its own device
files): 8 partitions of 2-4 workers each, a pool a quarter of their memory
together, two paging services a device (vios1/vios2 and vios3/vios4, each
the primary of some streams; ``restart = true``, ``timeout = 3``).  Every
worker writes its stripe of pages with the oracle (pyhv.pattern: partition,
page, generation), verifies them, and goes round again with the next
generation, while a chaos thread, at random intervals drawn from --seed:

* ``service_kill``: SIGKILL of a paging service whose partner runs (its
  streams fail over; it starts again by itself);
* ``service_stop``: SIGSTOP of one, SIGCONT 0.2-4 s later (past its timeout
  it is fenced and its streams fail over);
* ``hypervisor_kill``: SIGKILL of the hypervisor (the supervisor starts a
  new one, the workers rejoin); at most one every 13 s, under the
  supervisor's limit of 5 a minute;
* ``pool_resize``: a pool between 1/8 and 1/3 of the partitions' memory;
* ``partition_add``: an extra partition, on a device of its own, with 2-3
  workers; ``partition_remove``: an extra one: its workers finish their
  round, a fresh verifier reads every page, then it and its device go;
* ``service_switch``: a partition's stream moved to its other service.

Every kind is done at least once (the first ones are owed, in an order from
the seed) even if that takes longer than --duration.  Then the workers
finish their round and fresh verifiers read every page of every partition
(each page's last generation).  The run holds if every worker and verifier
exited 0, every page verified, no machine check was recorded (none of the
chaos may cause one: a page-in always finds a service) and the hypervisor
restarted exactly as often as it was killed.

``python -m pyhv.soak rounds|verify`` are the worker programs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from pyhv import system
from pyhv._spawn import module_command
from pyhv.config import MIN_POOL_PAGES, format_size, load_config_text
from pyhv.hypervisor import ERROR_LOG
from pyhv.pattern import page_pattern
from pyhv.progress import Progress
from pyhv.uffd import PAGE_SIZE

KINDS = ("service_kill", "service_stop", "hypervisor_kill", "pool_resize", "partition_add",
         "partition_remove", "service_switch")  # fmt: skip
#: Two paging services a device; partition i pages through PAIRS[i % 2].
PAIRS = (("vios1", "vios2"), ("vios3", "vios4"))
SERVICE_TIMEOUT = 3  # seconds: a SIGSTOP longer than this is a hung service, fenced
HYPERVISOR_KILL_GAP = 13.0  # seconds between kills (the supervisor gives up at 6 in 60 s)
MAX_EXTRAS = 2  # extra partitions alive at once
COUNTERS = ("faults", "first_touches", "page_ins", "page_outs", "clean_drops")
PATIENCE = 120.0  # seconds a step of the chaos or the end may take before it is a failure
PROGRESS_EVERY = 256


WHY = {70: " (hypervisor lost)", 135: " (machine check)"}


class SoakFailure(Exception):
    """Something that should hold did not; the run ends and says this."""


def partner(service: str) -> str:
    return next(b if a == service else a for a, b in PAIRS if service in (a, b))


def exit_status(code: int) -> int:
    """As a shell says it: 128+N for a process killed by signal N."""
    return 128 - code if code < 0 else code


@dataclasses.dataclass
class Part:
    """A partition of the soak and its workers."""

    name: str
    pages: int
    extra: bool
    stop_file: str
    workers: list = dataclasses.field(default_factory=list)  # Proc, "rounds"
    verified: int = 0  # pages its final pass verified
    mismatches: int = 0
    verifier: "Proc | None" = None
    done: bool = False  # its end: workers finished, final pass run


class Proc:
    """A worker or verifier process; a thread reads its stdout."""

    def __init__(self, popen: subprocess.Popen, on_progress):
        self.popen = popen
        self.report: dict | None = None
        self.code: int | None = None
        self._on_progress = on_progress
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            if line.startswith(b"progress "):
                self._on_progress(int(line.split()[1]))
            elif line.startswith(b"{"):
                try:
                    self.report = json.loads(line)
                except ValueError:
                    pass
        self.code = exit_status(self.popen.wait())

    def wait(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass


def config_text(partitions: int, memory: int, pool: int) -> str:
    out = [f"[pool]\nsize = {pool}\n", "[hypervisor]\nrecovery_timeout = 60\n"]
    for pair in PAIRS:
        for name in pair:
            out.append(f'[[paging_service]]\nname = "{name}"\nrestart = true\n'
                       f"timeout = {SERVICE_TIMEOUT}\n")  # fmt: skip
    for i in range(partitions):
        pair = PAIRS[i % 2]
        paging = pair if (i // 2) % 2 == 0 else pair[::-1]  # each service a primary
        out.append(f'[[device]]\nid = "dev{i}"\npath = "p{i}.img"\nsize = {memory}\n'
                   f'services = ["{pair[0]}", "{pair[1]}"]\n')  # fmt: skip
        out.append(f'[[partition]]\nname = "p{i}"\nmemory = {memory}\ndevice = "dev{i}"\n'
                   f'paging = ["{paging[0]}", "{paging[1]}"]\n')  # fmt: skip
    return "\n".join(out)


class Soak:
    def __init__(self, duration: float, seed: int, partitions: int, memory: int,
                 interval: float, corrupt: bool = False, show: bool = True):  # fmt: skip
        self.duration = duration
        self.seed = seed
        self.nparts = partitions
        self.memory = memory
        self.interval = interval
        self.show = show
        self.rng = random.Random(seed)  # the chaos schedule's, and the workers' counts
        self.kinds = KINDS + (("corrupt",) if corrupt else ())
        self.run_dir = tempfile.mkdtemp(prefix="pyhv-soak-")
        self.parts: dict[str, Part] = {}
        self.lock = threading.Lock()
        self.counters: dict[str, dict] = {}  # partition -> its engine counters, last seen
        self.failovers: set = set()  # (partition, from, at) of every failover seen
        self.actions = collections.Counter()
        self.skipped = collections.Counter()  # refused or not possible when drawn
        self.events: list[dict] = []
        self.hypervisor_kills = 0
        self.hypervisor_back: list[float] = []  # seconds from a kill to a new one answering
        self.fenced = 0  # SIGSTOPs past the timeout: the service was fenced
        self.last_kill = -HYPERVISOR_KILL_GAP
        self.extras = 0
        self.pool_pages: list[int] = []
        self.verified_progress = 0
        self.failure: str | None = None
        self.stopping = threading.Event()
        self.started = time.monotonic()

    # --- the system --------------------------------------------------------------------

    def control(self, msg: dict, timeout: float = PATIENCE) -> dict:
        return system.control(self.run_dir, msg, timeout)

    def status(self) -> dict | None:
        """Status now, its counters and failovers noted; None while the
        hypervisor is away (a kill)."""
        try:
            st = self.control({"op": "status"}, timeout=15)
        except system.Fail:
            return None
        if not st.get("ok"):
            return None
        with self.lock:
            for p in st["partitions"]:
                self.counters[p["name"]] = {k: p[k] for k in COUNTERS}
            for svc in st["paging_services"]:
                for x in svc["streams"]:
                    for f in x["failovers"]:
                        self.failovers.add((x["partition"], f["from"], f["at"]))
        return st

    def start(self) -> None:
        pool = self.nparts * self.memory // 4 // PAGE_SIZE * PAGE_SIZE
        text = config_text(self.nparts, self.memory, pool)
        config = load_config_text(text, self.run_dir, "soak config")
        system.start_system(None, self.run_dir, detach=True, config=config)
        self.pool_pages.append(pool // PAGE_SIZE)
        for i in range(self.nparts):
            self.add_part(f"p{i}", extra=False, workers=self.rng.randint(2, 4))

    def add_part(self, name: str, extra: bool, workers: int) -> Part:
        part = Part(name, self.memory // PAGE_SIZE, extra,
                    os.path.join(self.run_dir, f"{name}.stop"))  # fmt: skip
        cmd = module_command("pyhv.soak", "rounds", "--stop-file", part.stop_file,
                             "--seed", str(self.seed))  # fmt: skip
        with open(os.path.join(self.run_dir, f"{name}.workers.log"), "ab") as log:
            procs = system.spawn_workers(self.run_dir, name, workers, cmd,
                                         stdout=subprocess.PIPE, stderr=log)  # fmt: skip
        part.workers = [Proc(p, lambda n: None) for p in procs]
        with self.lock:
            self.parts[name] = part
        return part

    def end_part(self, part: Part) -> None:
        """Its workers finish their round; a fresh verifier reads every page."""
        with open(part.stop_file, "w"):
            pass
        for w in part.workers:
            if not w.wait(PATIENCE * 2):
                w.kill()
                w.wait(10)
                self.fail(f"a worker of {part.name} did not finish its round")
        self.verify(part)

    def verify(self, part: Part) -> None:
        gens = []
        for w in part.workers:  # (in worker order: stripe i is worker i's)
            ok = w.code == 0 and w.report and "generation" in w.report
            gens.append(str(w.report["generation"]) if ok else "-")
        cmd = module_command("pyhv.soak", "verify", f"--generations={','.join(gens)}", "--seed",
                             str(self.seed), "--progress", str(PROGRESS_EVERY))  # fmt: skip
        with open(os.path.join(self.run_dir, f"{part.name}.verify.log"), "ab") as log:
            (p,) = system.spawn_workers(self.run_dir, part.name, 1, cmd,
                                        stdout=subprocess.PIPE, stderr=log)  # fmt: skip
        v = Proc(p, self._verified)
        if not v.wait(PATIENCE * 2):
            v.kill()
            v.wait(10)
        part.verifier = v
        if v.report:
            part.verified = v.report["verified"]
            part.mismatches = v.report["mismatches"]
        part.done = True

    def _verified(self, n: int) -> None:
        with self.lock:
            self.verified_progress += n

    def fail(self, why: str) -> None:
        with self.lock:
            if self.failure is None:
                self.failure = why
        self.stopping.set()

    def check_workers(self) -> None:
        """A worker that ended before its partition was told to stop failed."""
        for part in list(self.parts.values()):
            if os.path.exists(part.stop_file):
                continue
            for w in part.workers:
                if w.code is not None:
                    why = (f"worker {w.report.get('worker')} of {part.name}: page "
                           f"{w.report['bad_pages'][0]} did not verify"
                           if w.report and w.report.get("bad_pages") else
                           f"a worker of {part.name} (pid {w.popen.pid}) exited {w.code}"
                           + WHY.get(w.code, self.last_words(part)))
                    self.fail(why)  # fmt: skip
                    return

    def last_words(self, part: Part) -> str:
        """The last line its workers wrote on stderr (a traceback's), if any."""
        try:
            with open(os.path.join(self.run_dir, f"{part.name}.workers.log"), "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1][:200]}" if lines else ""

    # --- chaos -----------------------------------------------------------------------------

    def chaos(self) -> None:
        """The chaos thread: an action at random intervals until the
        duration is over and every kind was done once."""
        owed = list(self.rng.sample(self.kinds, len(self.kinds)))
        owed.remove("partition_add")
        owed.insert(0, "partition_add")  # (something to remove later)
        if "corrupt" in owed:  # (test only: soon, the run fails then)
            owed.remove("corrupt")
            owed.insert(1, "corrupt")
        deadline = self.started + self.duration
        try:
            while not self.stopping.wait(self.rng.uniform(0.5, 1.5) * self.interval):
                if time.monotonic() >= deadline and not owed:
                    break
                for kind in owed + self.rng.sample(self.kinds, len(self.kinds)):
                    if kind == "corrupt" and kind not in owed:
                        continue  # (once)
                    t0 = time.monotonic()
                    detail = getattr(self, f"act_{kind}")()
                    if detail is None:
                        self.skipped[kind] += 1
                        continue
                    self.actions[kind] += 1
                    self.events.append({"t": round(t0 - self.started, 2), "kind": kind,
                                        "what": detail,
                                        "seconds": round(time.monotonic() - t0, 2)})  # fmt: skip
                    if kind in owed:
                        owed.remove(kind)
                    break
        except SoakFailure as e:
            self.fail(str(e))
        except Exception as e:  # a defect of the soak itself: say it, end the run
            self.fail(f"chaos: {type(e).__name__}: {e}")

    def _running_services(self, st: dict) -> dict:
        return {s["name"]: s for s in st["paging_services"] if s["state"] == "running" and s["pid"]}

    def _pick_service(self) -> tuple[str, int] | None:
        """A running paging service whose partner runs too (so a page-in
        finds one), one that holds streams if there is one."""
        st = self.status()
        if st is None:
            return None
        running = self._running_services(st)
        names = sorted(n for n in running if partner(n) in running)
        names = [n for n in names if running[n]["streams"]] or names  # (one that pages)
        if not names:
            return None
        name = self.rng.choice(names)
        return name, running[name]["pid"]

    def _pairs_whole(self, what: str) -> None:
        """Wait until every paging service runs again."""
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            st = self.status()
            if st and len(self._running_services(st)) == len(st["paging_services"]):
                return
            time.sleep(0.05)
        raise SoakFailure(f"after {what}: the paging services did not all run again")

    def act_service_kill(self) -> str | None:
        picked = self._pick_service()
        if picked is None:
            return None
        name, pid = picked
        os.kill(pid, signal.SIGKILL)
        self._pairs_whole(f"a SIGKILL of {name}")
        return f"{name} (pid {pid})"

    def act_service_stop(self) -> str | None:
        picked = self._pick_service()
        if picked is None:
            return None
        name, pid = picked
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        hold = self.rng.uniform(0.2, SERVICE_TIMEOUT + 1.0)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
            time.sleep(hold)
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
                fenced = False
            except ProcessLookupError:
                fenced = True  # (hung past its timeout: killed and reaped)
                self.fenced += 1
        finally:
            os.close(pidfd)
        self._pairs_whole(f"a SIGSTOP of {name}")
        return f"{name} (pid {pid}) for {hold:.1f}s" + (", fenced" if fenced else "")

    def act_hypervisor_kill(self) -> str | None:
        if time.monotonic() - self.last_kill < HYPERVISOR_KILL_GAP:
            return None
        st = self.status()  # (what it counted until now)
        if st is None:
            return None
        pid, restarts = st["pid"], st["hypervisor"]["restarts"]
        os.kill(pid, signal.SIGKILL)
        t0 = self.last_kill = time.monotonic()
        self.hypervisor_kills += 1
        back = None
        while time.monotonic() < t0 + PATIENCE:
            st = self.status()
            if st and st["pid"] != pid and st["hypervisor"]["restarts"] > restarts:
                back = back or time.monotonic()
                if not st["hypervisor"]["awaiting_rejoin"]:
                    break
            time.sleep(0.05)
        else:
            raise SoakFailure(f"no new hypervisor took the workers back within {PATIENCE:.0f}s "
                              f"of the kill of pid {pid}")  # fmt: skip
        self._pairs_whole("a hypervisor kill")
        self.hypervisor_back.append(round(back - t0, 3))
        return f"pid {pid}, a new one answered in {back - t0:.2f}s"

    def act_pool_resize(self) -> str | None:
        st = self.status()
        if st is None:
            return None
        memory = sum(p["pages"] for p in st["partitions"])
        lo, hi = max(4 * MIN_POOL_PAGES, memory // 8), memory // 3
        new = self.rng.randint(lo, hi)
        r = self.control({"op": "pool_resize", "size": new * PAGE_SIZE})
        if not r.get("ok"):
            return None
        with self.lock:
            self.pool_pages.append(new)
        return f"{r['old_pages']} -> {new} pages ({memory / new:.1f}x overcommit)"

    def act_partition_add(self) -> str | None:
        with self.lock:
            live = [p for p in self.parts.values() if p.extra and not p.done]
        if len(live) >= MAX_EXTRAS:
            return None
        n = self.extras + 1
        name, dev = f"x{n}", f"xdev{n}"
        pair = list(PAIRS[n % 2])
        self.rng.shuffle(pair)
        r = self.control({"op": "device_add", "id": dev, "size": self.memory,
                          "path": os.path.join(self.run_dir, f"{name}.img"),
                          "services": sorted(pair)})  # fmt: skip
        if not r.get("ok"):
            raise SoakFailure(f"device {dev} could not be added: {r.get('error')}")
        r = self.control({"op": "partition_add", "name": name, "memory": self.memory,
                          "paging": pair, "device": dev})  # fmt: skip
        if not r.get("ok"):
            raise SoakFailure(f"partition {name} could not be added: {r.get('error')}")
        self.extras = n
        workers = self.rng.randint(2, 3)
        self.add_part(name, extra=True, workers=workers)
        return f"{name} ({workers} workers, paging {','.join(pair)})"

    def act_partition_remove(self) -> str | None:
        with self.lock:
            live = sorted(p.name for p in self.parts.values() if p.extra and not p.done)
        if not live:
            return None
        part = self.parts[self.rng.choice(live)]
        self.end_part(part)
        self.status()  # its last counters
        deadline = time.monotonic() + PATIENCE
        while True:  # (refused while paging of it waits for a service)
            r = self.control({"op": "partition_remove", "name": part.name})
            if r.get("ok") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not r.get("ok"):
            raise SoakFailure(f"partition {part.name} could not be removed: {r.get('error')}")
        dev = f"xdev{part.name[1:]}"
        r = self.control({"op": "device_remove", "id": dev})
        if not r.get("ok"):
            raise SoakFailure(f"device {dev} could not be removed: {r.get('error')}")
        os.unlink(os.path.join(self.run_dir, f"{part.name}.img"))
        return f"{part.name} ({part.verified} pages verified first)"

    def act_service_switch(self) -> str | None:
        st = self.status()
        if st is None:
            return None
        running = self._running_services(st)
        names = sorted(p["name"] for p in st["partitions"]
                       if p["stream"] in ("ENABLED", "RESUMED") and p["service"]
                       and partner(p["service"]) in running)  # fmt: skip
        if not names:
            return None
        name = self.rng.choice(names)
        r = self.control({"op": "service_switch", "partition": name})
        if not r.get("ok"):
            return None
        return f"{name}: {r['from']} -> {r['to']}"

    def act_corrupt(self) -> str | None:
        """Test only (--chaos-corrupt): random bytes over the device slots of
        a partition's pages that are out, behind the system's back."""
        from pyhv import inject

        best = None
        for name in sorted(p for p in self.parts if not self.parts[p].extra):
            r = self.control({"op": "slots", "partition": name})
            if r.get("ok") and (best is None or len(r["slots"]) > len(best["slots"])):
                best = dict(r, partition=name)
        if best is None or not best["slots"]:
            return None
        n = inject.corrupt(best["device"], [s for _, s in best["slots"]])
        return f"{n} pages of {best['partition']} overwritten on {os.path.basename(best['device'])}"

    # --- the run --------------------------------------------------------------------------

    def run(self) -> dict:
        self.start()
        chaos = threading.Thread(target=self.chaos, name="chaos", daemon=True)
        chaos.start()
        bar = Progress("soak", int(self.duration * 10), enabled=self.show)
        while chaos.is_alive():
            chaos.join(0.5)
            self.status()
            self.check_workers()
            bar.advance(int((time.monotonic() - self.started) * 10) - bar.done)
        bar.advance(bar.total)
        bar.close()
        # the end: every partition's workers finish their round, then every page is verified
        live = [p for p in self.parts.values() if not p.done]
        for part in live:
            with open(part.stop_file, "w"):
                pass
        vbar = Progress("final verify", sum(p.pages for p in live), enabled=self.show)
        with self.lock:
            self.verified_progress = 0
        threads = [threading.Thread(target=self.end_part, args=(p,)) for p in live]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            with self.lock:
                vbar.advance(self.verified_progress - vbar.done)
        vbar.close()
        return self.report()

    def report(self) -> dict:
        st = self.status()
        parts = list(self.parts.values())
        errors = []
        try:
            with open(os.path.join(self.run_dir, ERROR_LOG)) as f:
                errors = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError):
            pass
        workers = collections.Counter(str(w.code) for p in parts for w in p.workers)
        verifiers = collections.Counter(str(p.verifier.code) for p in parts if p.verifier)
        rounds = [w.report for p in parts for w in p.workers if w.report]
        restarts = st["hypervisor"]["restarts"] if st else None
        r = {
            "seed": self.seed,
            "duration": self.duration,
            "partitions": self.nparts,
            "partitions_added": self.extras,
            "partition_memory_bytes": self.memory,
            "memory_bytes": self.nparts * self.memory,
            "pool_pages": {"start": self.pool_pages[0], "min": min(self.pool_pages),
                           "max": max(self.pool_pages)},  # fmt: skip
            "workers": sum(len(p.workers) for p in parts),
            **{k: sum(c[k] for c in self.counters.values()) for k in COUNTERS},
            "failovers": len(self.failovers),
            "hypervisor_kills": self.hypervisor_kills,
            "hypervisor_restarts": restarts,
            "hypervisor_back_seconds": self.hypervisor_back,
            "service_stops_fenced": self.fenced,
            "machine_checks": len(errors),
            "machine_check_records": errors[:10],
            "pages": sum(p.pages for p in parts),
            "pages_verified": sum(p.verified for p in parts),
            "mismatches": sum(p.mismatches for p in parts),
            "rounds": sum(x["rounds"] for x in rounds),
            "pages_verified_in_rounds": sum(x["verified"] for x in rounds),
            "chaos": {k: self.actions[k] for k in self.kinds},
            "chaos_skipped": {k: self.skipped[k] for k in self.kinds if self.skipped[k]},
            "chaos_events": self.events,
            "worker_exits": dict(sorted(workers.items())),
            "verifier_exits": dict(sorted(verifiers.items())),
            "seconds": round(time.monotonic() - self.started, 1),
        }
        r["reason"] = self.judge(r, self.failure)
        r["ok"] = r["reason"] is None
        return r

    @staticmethod
    def judge(r: dict, failure: str | None) -> str | None:
        """What did not hold, in one line (a machine check first: it says
        the most); None if everything did."""
        if r["machine_checks"]:
            e = r["machine_check_records"][0]
            return (f"{r['machine_checks']} machine check(s), the first: partition "
                    f"{e['partition']} page {e['page']} ({e['error']})")
        if failure:
            return failure
        bad = {k: n for k, n in r["worker_exits"].items() if k != "0"}
        if bad:
            return f"workers exited {', '.join(f'{k} ({n}x)' for k, n in bad.items())}"
        bad = {k: n for k, n in r["verifier_exits"].items() if k != "0"}
        if bad:
            return f"verifiers exited {', '.join(f'{k} ({n}x)' for k, n in bad.items())}"
        if r["mismatches"] or r["pages_verified"] != r["pages"]:
            return (f"{r['pages_verified']} of {r['pages']} pages verified, "
                    f"{r['mismatches']} mismatches")
        if r["hypervisor_restarts"] != r["hypervisor_kills"]:
            return (f"the hypervisor restarted {r['hypervisor_restarts']} times for "
                    f"{r['hypervisor_kills']} kills")
        return None

    def close(self, keep: bool) -> None:
        """Everything this soak started goes; the run directory too unless kept."""
        self.stopping.set()
        for part in self.parts.values():
            for w in part.workers + ([part.verifier] if part.verifier else []):
                w.kill()
        try:
            if system.running_pid(self.run_dir):
                system.stop_system(self.run_dir, timeout=60)
        except system.Fail:
            pass
        finally:
            from pyhv.supervisor import SUPERVISOR_PID_FILE

            for name in (SUPERVISOR_PID_FILE, "hypervisor.pid"):  # (a stop that failed)
                try:
                    with open(os.path.join(self.run_dir, name)) as f:
                        os.kill(int(f.read().strip()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        if not keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def run(duration: float, seed: int | None = None, partitions: int = 8, memory: int = 8 << 20,
        interval: float = 2.0, corrupt: bool = False, keep: bool = False,
        show: bool = True) -> dict:  # fmt: skip
    """A whole soak; its report (``ok``, ``reason`` and the figures)."""
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    soak = Soak(duration, seed, partitions, memory, interval, corrupt, show)
    try:
        r = soak.run()
    finally:
        soak.close(keep)
    r["run_dir"] = soak.run_dir if keep else None
    return r


def format_report(r: dict) -> str:
    chaos = ", ".join(f"{k} {n}" for k, n in r["chaos"].items())
    pool = r["pool_pages"]
    exits = lambda d: ", ".join(f"{k}: {n}" for k, n in d.items()) or "-"  # noqa: E731
    return "\n".join([
        f"pyhv soak: {r['partitions']} partitions (+{r['partitions_added']} added under way), "
        f"{format_size(r['memory_bytes'])} of memory in a "
        f"{format_size(pool['start'] * PAGE_SIZE)} pool, {r['workers']} workers, "
        f"seed {r['seed']}, {r['duration']:g} s",
        f"  chaos             {chaos}",
        f"  pool              {pool['min']}..{pool['max']} pages (resized)",
        f"  faults            {r['faults']:>9}  (first touches {r['first_touches']})",
        f"  page-ins          {r['page_ins']:>9}",
        f"  page-outs         {r['page_outs']:>9}  (+{r['clean_drops']} clean pages dropped)",
        f"  failovers         {r['failovers']:>9}  ({r['service_stops_fenced']} service(s) "
        "fenced after a SIGSTOP past their timeout)",
        f"  hypervisor        {r['hypervisor_kills']:>9}  kills, "
        f"{r['hypervisor_restarts']} restarts"
        + (f", a new one answered within {max(r['hypervisor_back_seconds']):.2f} s"
           if r["hypervisor_back_seconds"] else ""),
        f"  machine checks    {r['machine_checks']:>9}",
        f"  pages verified    {r['pages_verified']:>9}  of {r['pages']} (final pass), "
        f"mismatches {r['mismatches']}; {r['pages_verified_in_rounds']} in {r['rounds']} rounds",
        f"  exit statuses     workers {exits(r['worker_exits'])}; "
        f"verifiers {exits(r['verifier_exits'])}",
        f"  {'OK' if r['ok'] else 'FAILED: ' + r['reason']} in {r['seconds']:.1f} s",
    ])  # fmt: skip


# --- the worker programs ------------------------------------------------------------------


def worker_main(argv=None) -> int:
    """``rounds``: this worker's stripe (pages i, i+N, ...) written with
    generation g and verified, g = 1, 2, ... until the stop file appears;
    prints one JSON line (its last generation).  ``verify``: every page of
    the partition, page p against generation G[p % N]; prints one JSON line.
    Exit 1 at a page that does not verify."""
    import pyhv

    ap = argparse.ArgumentParser(prog="pyhv.soak")
    ap.add_argument("action", choices=["rounds", "verify"])
    ap.add_argument("--stop-file")
    ap.add_argument("--generations", help="verify: each stripe's generation, '-': unknown")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", type=int, default=0)
    args = ap.parse_args(argv)

    mem = pyhv.attach()
    view = memoryview(mem)
    name = os.environ["PYHV_PARTITION"]
    worker, nworkers = int(os.environ["PYHV_WORKER"]), int(os.environ["PYHV_WORKERS"])
    npages = len(mem) // PAGE_SIZE
    rng = random.Random(f"{args.seed}/{name}/{worker}")

    def bad(page: int, gen: int, **more) -> int:
        print(json.dumps({"partition": name, "worker": worker, "pid": os.getpid(),
                          "bad_pages": [page], "generation": gen, **more}), flush=True)
        return 1

    if args.action == "rounds":
        pages = list(range(worker, npages, nworkers))
        gen = 0
        while gen == 0 or not os.path.exists(args.stop_file):
            gen += 1
            rng.shuffle(pages)
            for page in pages:
                view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = page_pattern(name, page, gen)
            rng.shuffle(pages)
            for page in pages:
                if view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] != page_pattern(name, page, gen):
                    return bad(page, gen, rounds=gen - 1)
        print(json.dumps({"partition": name, "worker": worker, "pid": os.getpid(),
                          "generation": gen, "rounds": gen, "verified": gen * len(pages),
                          "bad_pages": []}), flush=True)  # fmt: skip
        return 0

    gens = [None if g == "-" else int(g) for g in args.generations.split(",")]
    pages = [p for p in range(npages) if gens[p % len(gens)] is not None]
    rng.shuffle(pages)
    mismatches = []
    for done, page in enumerate(pages, 1):
        want = page_pattern(name, page, gens[page % len(gens)])
        if view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] != want:
            mismatches.append(page)
        if args.progress and done % args.progress == 0:
            print(f"progress {args.progress}", flush=True)
    print(json.dumps({"partition": name, "pid": os.getpid(), "verified": len(pages) -
                      len(mismatches), "mismatches": len(mismatches),
                      "bad_pages": mismatches[:16]}), flush=True)  # fmt: skip
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(worker_main())
