"""Paging-service failover under load: SIGKILL of the service that holds a
partition's stream, while a worker pages in and out, measured round after round.

Run:  .venv/bin/python -m pytest bench/test_failover.py --benchmark-only -q
      (also part of ``make bench``; not part of ``make test``)

Set-up: a system (``pyhv up --detach``, its own run directory) with two
paging services ``vios1``, ``vios2``, a 4 MiB pool and one 16 MiB partition
``p1`` with ``paging = ["vios1", "vios2"]`` on a 16 MiB device file that both
services reach (the default).  One writer (``pyhv run -- python -m
bench.test_failover writer``, see :func:`writer_main`) cycles through every
page of ``p1`` forever: in cycle ``g`` it reads each page, checks that it
holds generation ``g - 1`` (``pyhv.pattern``), and writes generation ``g``.
The partition is 4x the pool, so every page it touches is a page-in and, a
while later, a page-out: both flow all the time.

One benchmark round (``benchmark.pedantic``, ``ROUNDS`` rounds, 1 iteration):

* set-up (not timed): the standby service runs and the stream has served new
  requests on its current service since the last round;
* timed: ``os.kill(pid, SIGKILL)`` of the service that holds the stream
  (``pyhv status --json`` -> ``paging_services[i].streams``), then poll status
  until the stream shows one more entry in its ``failovers`` list, on the
  other service;
* teardown (not timed): ``pyhv service start <killed>``; it comes back as
  standby, the stream stays on the survivor, and the next round kills the
  survivor and fails over back.  The teardown also waits until the new
  process logs that it serves (``service-NAME.log``): ``service start``
  returns, and status says running/standby, as soon as the process is
  spawned, ~100-200 ms before its interpreter is ready; a kill meanwhile
  would time the standby's start-up, not the failover
  (``extra_info['standby_ready_p50_ms']``: that wait).

**Which figure is the failover time.**  The row's times in the
pytest-benchmark table (min/max/mean/median) are *wall* times from the
``kill()`` to the moment a status poll first shows the new failover entry:
they include detection, fencing, re-opening the device on the other service,
the first request served there **and the status polling** (a status request
on the control socket every ``POLL`` seconds, the same request and JSON as
``pyhv status --json`` without starting a CLI process each time).  The
failover time proper is the hypervisor's own figure, the entry's ``seconds``
(from the detection of the death to the first request served by the other
service): its p50/p99 are ``extra_info['failover_p50_ms'/'failover_p99_ms']``
(also ``p50_us``/``p99_us``/``mean_us`` for the summary at the end of the
run), with ``in_flight`` (requests the dead service had in flight, resent to
the other one) as ``in_flight_p50``/``in_flight_p99``; ``wall_p50_ms`` /
``wall_p99_ms`` repeat the table's wall figure.

Oracles (never timing): one failover entry per round, from the killed service
to the other one, ``failovers`` count == rounds, no io_errors or
machine_checks, the writer found every page it read as last written (any
page lost in a failover fails it), and at the end, with the writer stopped at
the end of a cycle, ``python -m pyhv.workload verify --generation G`` (G =
the writer's last complete generation) exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .benchlib import PAGE, PyhvSystem, pyhv_cli

ROUNDS = 15
POLL = 0.002  # seconds between two status polls while waiting for the failover
TRAFFIC = 64  # requests the stream must have served on its service before a kill
TIMEOUT = 30.0  # bound on any wait (failover, traffic, writer); never a measurement
ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("vios1", "vios2")


class RedundantSystem(PyhvSystem):
    """Two paging services, one partition ``p1`` paged through both."""

    def __init__(self, run_dir: str, *, pool: str, memory: str):
        super().__init__(run_dir, pool=pool, memory=memory, direct=False)
        with open(self.config, "w") as f:
            f.write(
                f'[pool]\nsize = "{pool}"\n\n'
                + "".join(f'[[paging_service]]\nname = "{s}"\n\n' for s in SERVICES)
                + f'[[device]]\nid = "pgdev0"\npath = "pg0.img"\nsize = "{memory}"\n\n'
                f'[[partition]]\nname = "p1"\nmemory = "{memory}"\n'
                f'paging = ["{SERVICES[0]}", "{SERVICES[1]}"]\n'
            )

    def status_now(self) -> dict:
        """``pyhv status --json`` without the CLI process: the same request
        on the control socket, for polling at a fine grain."""
        from pyhv import wire
        from pyhv.hypervisor import CONTROL_SOCKET

        return wire.request(os.path.join(self.run_dir, CONTROL_SOCKET), {"op": "status"}, 10)

    def holder(self, st: dict) -> tuple[dict, dict]:
        """(service holding p1's stream, p1's stream) in a status."""
        for svc in st["paging_services"]:
            for s in svc["streams"]:
                if s["partition"] == "p1":
                    return svc, s
        raise AssertionError(f"no service holds p1's stream: {st['paging_services']}")

    def service(self, st: dict, name: str) -> dict:
        return next(s for s in st["paging_services"] if s["name"] == name)

    def wait_serving(self, name: str, pid: int) -> None:
        """Wait until paging service `name` (process pid) logs that it serves
        its socket: ``pyhv service start`` returns, and status shows it
        running, as soon as the process is spawned, before its interpreter
        has started."""
        line = f"paging service {name}: serving (pid {pid})"
        path = os.path.join(self.run_dir, f"service-{name}.log")
        deadline = time.monotonic() + TIMEOUT
        while True:
            with open(path, errors="replace") as f:
                if line in f.read():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} (pid {pid}) never logged {line!r}")
            time.sleep(POLL)

    def wait_for(self, predicate, what: str, fast: bool = False) -> dict:
        """Poll status until predicate(status); a bound, not a measurement."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            st = self.status_now() if fast else self.status()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.log()}")
            time.sleep(POLL if fast else 0.05)


@pytest.fixture
def redundant_system(tmp_path):
    """A running :class:`RedundantSystem`; shut down at teardown whatever
    happened (SIGKILL of its own processes, by pid, only if that fails)."""
    run_dir = tmp_path / "run0"
    run_dir.mkdir()
    s = RedundantSystem(run_dir, pool="4MiB", memory="16MiB")
    try:
        s.up()
        yield s
    finally:
        s.shutdown()


class Writer:
    """``pyhv run`` of :func:`writer_main`, in a session of its own (so that
    it and its worker can be killed by their process group if they hang)."""

    def __init__(self, system: RedundantSystem):
        self.out = open(os.path.join(system.run_dir, "writer.out"), "w+")
        self.err = open(os.path.join(system.run_dir, "writer.err"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv", "run", "--run-dir", system.run_dir,
             "--partition", "p1", "--", sys.executable, "-m", "bench.test_failover", "writer"],
            stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip

    def stop(self) -> tuple[int, dict | None, str]:
        """SIGTERM: the writer ends at the end of its current cycle.
        Returns (exit status, its report, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # pyhv run forwards it
        try:
            rc = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait()
        self.out.seek(0)
        self.err.seek(0)
        lines = [ln for ln in self.out.read().splitlines() if ln.startswith("{")]
        return rc, (json.loads(lines[-1]) if lines else None), self.err.read()[-4000:]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: pyhv run + worker

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop()
        self.out.close()
        self.err.close()


@pytest.fixture
def writer(redundant_system):
    """Starts the writer; it depends on ``redundant_system``, so it is
    stopped before the system is shut down."""
    w = Writer(redundant_system)
    try:
        yield w
    finally:
        w.close()


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


@pytest.mark.benchmark(group="failover")
def test_failover(benchmark, redundant_system, writer):
    """SIGKILL of the service holding the stream, round after round.

    The table's times are wall times kill() -> a status poll shows the
    failover (polling included); the failover time is the hypervisor's own
    ``seconds`` figure, in ``extra_info`` (see the module docstring)."""
    system = redundant_system
    st = system.status()
    svc, stream = system.holder(st)
    assert svc["name"] == SERVICES[0] and stream["state"] == "ENABLED", stream
    assert system.service(st, SERVICES[1])["role"] == "standby"
    # both directions flowing: the writer is past the first cycle's fill
    system.wait_for(lambda st: st["partitions"][0]["page_outs"] > 0
                    and st["partitions"][0]["page_ins"] > 0, "page-ins and page-outs")  # fmt: skip
    assert writer.proc.poll() is None, writer.stop()

    rounds: list[dict] = []  # one per timed round
    ready: list[float] = []  # per restart: `service start` returned -> the service serves
    seen = [0]  # requests the stream had served at the previous kill

    def setup():
        # the stream flows on its service and the other one is standby
        def ready(st):
            svc, s = system.holder(st)
            other = system.service(st, next(n for n in SERVICES if n != svc["name"]))
            return (s["state"] in ("ENABLED", "RESUMED") and other["state"] == "running"
                    and other["role"] == "standby" and s["requests"] >= seen[0] + TRAFFIC)

        st = system.wait_for(ready, "traffic on the stream and a standby", fast=True)
        svc, s = system.holder(st)
        seen[0] = s["requests"]
        assert writer.proc.poll() is None, writer.stop()
        return (svc["name"], svc["pid"], len(s["failovers"])), {}

    def fail_over(name, pid, before):
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while True:
            st = system.status_now()
            svc, s = system.holder(st)
            if len(s["failovers"]) > before:
                wall = time.perf_counter() - t0
                break
            if time.perf_counter() - t0 > TIMEOUT:
                raise AssertionError(f"no failover from {name} within {TIMEOUT}s\n{system.log()}")
            time.sleep(POLL)
        rounds.append({"killed": name, "pid": pid, "wall": wall, "holder": svc["name"],
                       "state": s["state"], "failover": s["failovers"][-1],
                       "failovers": len(s["failovers"]), "before": before})  # fmt: skip

    def restart(name, pid, before):
        with contextlib.suppress(ValueError):
            system.pids.remove(pid)  # reaped by the hypervisor (fencing)
        r = pyhv_cli("service", "start", name, "--run-dir", system.run_dir, "--json")
        assert r.returncode == 0, r.stderr
        svc = json.loads(r.stdout)["service"]
        system.pids.append(svc["pid"])  # shutdown's SIGKILL fallback knows it
        assert svc["state"] == "running" and svc["role"] == "standby", svc
        assert svc["pid"] != pid
        # "running" is what status says from the moment the process is spawned;
        # wait until it serves, or the next round would time its start-up
        t0 = time.perf_counter()
        system.wait_serving(name, svc["pid"])
        ready.append(time.perf_counter() - t0)

    benchmark.pedantic(fail_over, setup=setup, teardown=restart, rounds=ROUNDS, iterations=1)
    n = len(rounds)
    assert n == (ROUNDS if benchmark.enabled else 1)

    st = system.status()
    svc, s = system.holder(st)
    part = st["partitions"][0]
    seconds = [r["failover"]["seconds"] for r in rounds]
    in_flight = [r["failover"]["in_flight"] for r in rounds]
    walls = [r["wall"] for r in rounds]
    benchmark.extra_info.update(
        rounds=n,
        failover_p50_ms=round(_percentile(seconds, 0.50) * 1e3, 3),
        failover_p99_ms=round(_percentile(seconds, 0.99) * 1e3, 3),
        failover_max_ms=round(max(seconds) * 1e3, 3),
        in_flight_p50=_percentile(in_flight, 0.50),
        in_flight_p99=_percentile(in_flight, 0.99),
        in_flight_max=max(in_flight),
        wall_p50_ms=round(_percentile(walls, 0.50) * 1e3, 3),
        wall_p99_ms=round(_percentile(walls, 0.99) * 1e3, 3),
        standby_ready_p50_ms=round(_percentile(ready, 0.50) * 1e3, 1) if ready else None,
        # the conftest summary shows these: the hypervisor's figure, per failover
        p50_us=round(_percentile(seconds, 0.50) * 1e6, 1),
        p99_us=round(_percentile(seconds, 0.99) * 1e6, 1),
        mean_us=round(sum(seconds) / n * 1e6, 1),
        per_round=[{"from": r["failover"]["from"], "to": r["failover"]["to"],
                    "seconds": round(r["failover"]["seconds"], 6),
                    "in_flight": r["failover"]["in_flight"], "wall": round(r["wall"], 6)}
                   for r in rounds],  # fmt: skip
        stream={"service": svc["name"], "state": s["state"], "requests": s["requests"],
                "transitions": s["transitions"]},
        partition={k: part[k] for k in ("faults", "page_ins", "page_outs", "clean_drops",
                                        "io_errors", "machine_checks")},  # fmt: skip
        pool_pages=st["pool"]["pages"],
        partition_pages=part["memory_bytes"] // PAGE,
    )

    # every round: one new failover entry, from the killed service to the other one
    for i, r in enumerate(rounds):
        other = next(x for x in SERVICES if x != r["killed"])
        fo = r["failover"]
        assert r["failovers"] == r["before"] + 1 == i + 1, r
        assert fo["from"] == r["killed"] and fo["to"] == other, r
        assert r["holder"] == other, r
        assert fo["seconds"] > 0 and fo["in_flight"] >= 0, r
    # alternating: vios1 -> vios2 -> vios1 ...
    assert [r["killed"] for r in rounds] == [SERVICES[i % 2] for i in range(n)]
    assert len(s["failovers"]) == n, s["failovers"]
    assert s["transitions"].get("ENABLED->ABORTED", 0) == 1, s["transitions"]
    assert s["transitions"].get("RESUMED->ABORTED", 0) == n - 1, s["transitions"]
    assert s["transitions"].get("ABORTED->RESUMED", 0) == n, s["transitions"]
    deaths = {x["name"]: x["deaths"] for x in st["paging_services"]}
    assert sum(deaths.values()) == n, deaths
    assert part["io_errors"] == 0 and part["machine_checks"] == 0, part

    # nothing lost: the writer saw every page as last written, then a full verify
    rc, report, err = writer.stop()
    assert rc == 0 and report is not None, (rc, report, err)
    assert report["mismatches"] == 0 and report["cycles"] >= 2, report
    gen = report["generation"]
    r = subprocess.run(
        [sys.executable, "-m", "pyhv", "run", "--run-dir", system.run_dir, "--partition", "p1",
         "--", sys.executable, "-m", "pyhv.workload", "verify", "--generation", str(gen)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    verified = json.loads(r.stdout.strip().splitlines()[-1])
    assert verified["mismatches"] == 0 and verified["pages"] == part["memory_bytes"] // PAGE
    benchmark.extra_info.update(writer=report, verified_generation=gen)
    part = system.partition()
    assert part["io_errors"] == 0 and part["machine_checks"] == 0, part


# --- the writer (a worker of p1, started by ``pyhv run``) ---------------------------------


def writer_main() -> int:
    """Cycle g = 1, 2, ...: for every page in order, read it and check that it
    holds generation g - 1 (zeros in cycle 1), then write generation g.
    SIGTERM: stop at the end of the current cycle and print one JSON line
    (the last complete generation, cycles, mismatches).  Exit 1 on any
    mismatch."""
    import pyhv
    from pyhv.pattern import page_pattern

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    name = os.environ["PYHV_PARTITION"]
    mem = pyhv.attach()
    view = memoryview(mem)
    npages = len(mem) // PAGE
    zero = bytes(PAGE)
    bad: list[tuple[int, int]] = []
    gen = 0
    while not stop:
        gen += 1
        for page in range(npages):
            off = page * PAGE
            want = zero if gen == 1 else page_pattern(name, page, gen - 1)
            if view[off : off + PAGE] != want:  # a page-in (or a zero page) first
                bad.append((gen, page))
            view[off : off + PAGE] = page_pattern(name, page, gen)  # then a WP fault
        print(f"cycle {gen}", flush=True)
    view.release()
    pyhv.detach(mem)
    print(json.dumps({"pid": os.getpid(), "generation": gen, "cycles": gen,
                      "mismatches": len(bad), "bad": bad[:16]}), flush=True)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__" and sys.argv[1:] == ["writer"]:
    sys.exit(writer_main())
