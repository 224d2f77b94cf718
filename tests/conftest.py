"""Fixtures that start real systems: a hypervisor and paging services as
processes, real files (and loop devices where the test asks), real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PY = sys.executable


def pyhv(*args, check=False, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run the pyhv command line; returns the completed process (text)."""
    p = subprocess.run([PY, "-m", "pyhv", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, **kw)  # fmt: skip
    if check and p.returncode != 0:
        raise AssertionError(f"pyhv {' '.join(map(str, args))} -> {p.returncode}\n{p.stderr}")
    return p


def assert_one_line_error(p: subprocess.CompletedProcess, *words: str, code: int = 2) -> None:
    """One line on stderr, "pyhv: error: ..." with these words, no traceback; exit code."""
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert lines[0].startswith("pyhv: error: ")
    for w in words:
        assert w in lines[0], lines[0]


def config_text(pool="16MiB", partitions=(("p1", "64MiB"),), services=("vios1",),
                device_size=None, extra="", paging=None, service_extra="") -> str:  # fmt: skip
    out = [f'[pool]\nsize = "{pool}"\n']
    for s in services:
        out.append(f'[[paging_service]]\nname = "{s}"\n{service_extra}')
    for i, (name, mem) in enumerate(partitions):
        out.append(f'[[device]]\nid = "pgdev{i}"\npath = "pg{i}.img"\n'
                   f'size = "{device_size or mem}"\n')  # fmt: skip
        out.append(f'[[partition]]\nname = "{name}"\nmemory = "{mem}"\ndevice = "pgdev{i}"\n')
        if paging:
            out.append("paging = [" + ", ".join(f'"{x}"' for x in paging) + "]\n")
    out.append(extra)
    return "\n".join(out)


class System:
    """A running pyhv system in a run directory of its own."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.procs: list[subprocess.Popen] = []

    def up(self, text: str) -> None:
        cfg = self.run_dir / "pyhv.toml"
        cfg.write_text(textwrap.dedent(text))
        pyhv("up", "-c", cfg, "--run-dir", self.run_dir, "--detach", check=True)

    def status(self) -> dict:
        return json.loads(pyhv("status", "--run-dir", self.run_dir, "--json", check=True).stdout)

    def status_now(self) -> dict:
        """Status straight from the control socket: cheap enough to sample
        often (no pyhv process started)."""
        from pyhv import wire

        return wire.request(str(self.run_dir / "control.sock"), {"op": "status"})

    def partition(self, name: str) -> dict:
        return next(p for p in self.status()["partitions"] if p["name"] == name)

    def service(self, name: str) -> dict:
        return next(s for s in self.status()["paging_services"] if s["name"] == name)

    def pyhv(self, *args, **kw) -> subprocess.CompletedProcess:
        """A pyhv subcommand on this system (--run-dir added)."""
        return pyhv(*args, "--run-dir", self.run_dir, **kw)

    def wait_for(self, predicate, what: str, timeout: float = 30.0):
        """Poll status until predicate(status) is true; a bound, not a measurement."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {st}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return int((self.run_dir / "hypervisor.pid").read_text())

    def run(self, partition: str, *cmd, workers: int = 1, **kw) -> subprocess.Popen:
        """Start `pyhv run` in the background (stdout captured as text)."""
        p = subprocess.Popen(
            [PY, "-m", "pyhv", "run", "--run-dir", str(self.run_dir), "--partition", partition,
             "--workers", str(workers), "--", *cmd],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
        )  # fmt: skip
        self.procs.append(p)
        return p

    def workload(self, partition: str, *args, workers: int = 1) -> subprocess.Popen:
        return self.run(partition, PY, "-m", "pyhv.workload", *args, workers=workers)

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if (self.run_dir / "control.sock").exists():
            pyhv("shutdown", "--run-dir", self.run_dir, timeout=60)
        # shutdown failed or the daemon was killed: leave nothing behind (the
        # supervisor first, or it starts another hypervisor)
        for name in ("supervisor.pid", "hypervisor.pid"):
            pidfile = self.run_dir / name
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass


@pytest.fixture
def system(tmp_path):
    s = System(tmp_path)
    yield s
    s.down()


def reports(out: str) -> list[dict]:
    """The JSON summary lines printed by pyhv.workload."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def sample_while(procs, fn, interval: float = 0.05) -> list:
    """Call fn() repeatedly while any of procs runs; the values it returned."""
    values = []
    while any(p.poll() is None for p in procs):
        values.append(fn())
        time.sleep(interval)
    return values
