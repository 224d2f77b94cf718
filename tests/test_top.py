"""pyhv stat and pyhv top on a real system: workers paging all along, stat's
lines checked against the counters they come from, top in a real terminal
(tmux: start it, capture the screen, see the numbers move, quit)."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import textwrap
import time

import pytest

from conftest import PY, assert_one_line_error, config_text, finish, pyhv

CONFIG = config_text(pool="1MiB", partitions=[("p1", "8MiB"), ("p2", "8MiB")])

# Writes every page once (most go to the device: the pool is an eighth of
# the memory), says so, then writes random pages (page-ins and page-outs)
# until the file argv[1] exists.
PAGER = textwrap.dedent("""
    import os, random, sys, pyhv
    m = pyhv.attach()
    pages = len(m) // 4096
    for page in range(pages):
        m[page * 4096] = 1
    print("paging", flush=True)
    rnd = random.Random(os.getpid())
    n = 0
    while n % 256 or not os.path.exists(sys.argv[1]):
        page = rnd.randrange(pages)
        m[page * 4096] = (m[page * 4096] + 1) & 0xFF
        n += 1
""")

RATES = ("faults", "page_ins", "page_outs")


class Paging:
    """A pager in each partition, paging until stop()."""

    def __init__(self, system, partitions=("p1", "p2")):
        self.stop_file = system.run_dir / "stop-paging"
        self.procs = [system.run(name, PY, "-c", PAGER, str(self.stop_file)) for name in partitions]
        for p in self.procs:
            assert p.stdout.readline().strip() == "paging", finish(p, 60)

    def stop(self) -> None:
        self.stop_file.touch()
        for p in self.procs:
            rc, out, err = finish(p, 120)
            assert rc == 0, err


def test_stat_json_lines_follow_the_counters_while_workers_page(system):
    system.up(CONFIG)
    paging = Paging(system)
    try:
        p = system.pyhv("stat", "-n", "3", "-i", "0.5", "--json", timeout=120)
        after = system.status()
    finally:
        paging.stop()
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(lines) == 3, p.stdout
    for fig in lines:
        assert fig["interval"] > 0 and fig["hypervisor"] == system.pid
        parts = {x["name"]: x for x in fig["partitions"]}
        assert sorted(parts) == ["p1", "p2"]
        pool = fig["pool"]
        assert pool["pages"] == 256 and 0 <= pool["free"] <= 256
        assert pool["resident"] == sum(x["resident_pages"] for x in parts.values()) <= 256
        assert fig["machine_checks"] == 0
        for name in RATES:  # totals are the partitions' sums
            assert fig[name] == sum(x[name] for x in parts.values())
            assert fig[f"{name}_per_s"] == pytest.approx(
                sum(x[f"{name}_per_s"] for x in parts.values()), abs=0.2)  # (rounding)
    for before, fig in zip(lines, lines[1:]):  # a rate is the counter's rise over the interval
        for x0, x in zip(before["partitions"], fig["partitions"]):
            for name in RATES:
                rise = x[name] - x0[name]
                assert rise >= 0
                assert x[f"{name}_per_s"] * fig["interval"] == pytest.approx(rise, abs=2)
    # the workers were paging: every interval saw faults, some saw page-ins
    # and page-outs, in both partitions
    for name in ("p1", "p2"):
        rates = [next(x for x in fig["partitions"] if x["name"] == name) for fig in lines]
        assert all(x["faults_per_s"] > 0 for x in rates), rates
        assert any(x["page_ins_per_s"] > 0 for x in rates), rates
        assert any(x["page_outs_per_s"] > 0 for x in rates), rates
    # and the counters are those of status, which only go on rising
    for x, y in zip(lines[-1]["partitions"], after["partitions"]):
        assert all(0 < x[name] <= y[name] for name in ("faults", "page_ins", "page_outs"))


def test_stat_lines_with_a_header(system):
    system.up(CONFIG)
    p = system.pyhv("stat", "-n", "2", "-i", "0.2", timeout=60)
    assert p.returncode == 0, p.stderr
    header, *rows = p.stdout.splitlines()
    assert header.split() == ["time", "free", "resident", "faults/s", "page-ins/s",
                              "page-outs/s", "mce", "p1:res", "p1:flt/s", "p2:res", "p2:flt/s"]
    assert len(rows) == 2 and all(len(r.split()) == 11 for r in rows), p.stdout
    assert rows[0].split()[1:3] == ["256", "0"]  # a quiet pool: all free, nothing resident


def test_stat_runs_until_interrupted_and_then_exits_0_quietly(system):
    system.up(CONFIG)
    p = subprocess.Popen([PY, "-m", "pyhv", "stat", "--run-dir", str(system.run_dir), "-i", "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines = [p.stdout.readline() for _ in range(4)]  # the header, then three intervals
        assert lines[0].split()[:2] == ["time", "free"] and all(lines), lines
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and err == "", err


BAD_STAT = [
    (["-i", "0"], ["--interval", "'0'"]),
    (["-i", "-1"], ["--interval", "'-1'"]),
    (["-i", "soon"], ["--interval", "'soon'"]),
    (["-i", "nan"], ["--interval"]),
    (["-n", "0"], ["--count", "'0'"]),
    (["-n", "-2"], ["--count"]),
    (["-n", "three"], ["--count", "'three'"]),
    (["-n", "1.5"], ["--count"]),
    (["--bogus"], ["--bogus"]),
]  # fmt: skip


@pytest.mark.parametrize("args, words", BAD_STAT, ids=[" ".join(a) for a, _ in BAD_STAT])
def test_stat_bad_arguments_are_one_line_exit_2(tmp_path, args, words):
    assert_one_line_error(pyhv("stat", "--run-dir", tmp_path, *args), *words)


def test_stat_without_a_hypervisor_exits_1(tmp_path):
    assert_one_line_error(pyhv("stat", "--run-dir", tmp_path), "no hypervisor", code=1)


def test_top_needs_a_terminal(system):
    system.up(CONFIG)
    assert_one_line_error(system.pyhv("top", stdin=subprocess.DEVNULL), "terminal")


# --- top in a real terminal ---------------------------------------------------------


class Tmux:
    """A tmux server of the test's own (its own socket), its sessions in
    terminals of a given size."""

    def __init__(self, socket):
        self.socket = str(socket)

    def __call__(self, *args) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True, text=True,
                              capture_output=True, timeout=30).stdout  # fmt: skip

    def top(self, run_dir, name: str, width: int = 160, height: int = 50) -> "Top":
        top = Top(self, run_dir, name)
        self("new-session", "-d", "-s", name, "-x", str(width), "-y", str(height),
             f"{shlex.quote(PY)} -m pyhv top --run-dir {shlex.quote(str(run_dir))} "
             f"2>{shlex.quote(str(top.err))}; echo $? >{shlex.quote(str(top.rc))}")  # fmt: skip
        return top


def partition_rows(screen: list[str]) -> dict[str, list[str]]:
    """top's partition table: {name: [resident, faults/s, page-ins/s, ...]}."""
    return {ln.split()[0]: ln.split()[1:] for ln in screen if ln.split()[:1] in (["p1"], ["p2"])}


class Top:
    """pyhv top in a tmux session; its exit status and stderr in files."""

    def __init__(self, tmux: Tmux, run_dir, name: str):
        self.tmux, self.name = tmux, name
        self.rc, self.err = run_dir / f"{name}.rc", run_dir / f"{name}.err"

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", self.name).splitlines()

    def wait_screen(self, predicate, what: str, timeout: float = 60.0) -> list[str]:
        """Capture until predicate(screen); a bound, not a measurement."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline or self.rc.exists():
                raise AssertionError(f"top: no {what} on the screen:\n" + "\n".join(screen) +
                                     f"\nstderr: {self.err.read_text() if self.err.exists() else ''}")
            time.sleep(0.2)

    def wait_exit(self, timeout: float = 60.0) -> tuple[int, str]:
        """top's exit status and its stderr, once it has exited."""
        deadline = time.monotonic() + timeout
        while not (self.rc.exists() and self.rc.read_text().strip()):
            assert time.monotonic() < deadline, "top did not exit:\n" + "\n".join(self.screen())
            time.sleep(0.1)
        return int(self.rc.read_text()), self.err.read_text()


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (tools/debian-deps installs it)")
    t = Tmux(tmp_path / "tmux.sock")
    try:
        yield t
    finally:
        subprocess.run(["tmux", "-S", t.socket, "kill-server"], capture_output=True, timeout=30)


def test_top_shows_the_system_and_its_numbers_move_then_q_quits(system, tmux):
    system.up(CONFIG)
    paging = Paging(system)
    try:
        top = tmux.top(system.run_dir, "top")
        # rates need two samples: wait until both partitions show a faults/s figure
        first = top.wait_screen(lambda s: len(partition_rows(s)) == 2 and all(
            r[1] != "-" for r in partition_rows(s).values()), "rates")  # fmt: skip
        text = "\n".join(first)
        for word in ("pyhv top", f"hypervisor pid {system.pid}", "PARTITION", "vios1",
                     "stream p1", "stream p2", "worker of p1", "worker of p2", "hypervisor",
                     "paging service vios1"):  # fmt: skip
            assert word in text, text
        # the numbers move while the workers page; faults are seen in both
        seen = {"p1": set(), "p2": set()}

        def moved(screen):
            for name, row in partition_rows(screen).items():
                seen[name].add(tuple(row[:4]))
            return all(len(v) > 2 for v in seen.values())

        top.wait_screen(moved, "moving numbers")
        assert all(any(int(r[1]) > 0 for r in v if r[1] != "-") for v in seen.values()), seen
        tmux("send-keys", "-t", "top", "q")
        rc, err = top.wait_exit()
        assert rc == 0 and err == "", err
    finally:
        paging.stop()


def test_top_quits_on_ctrl_c_and_refuses_a_small_terminal(system, tmux):
    system.up(CONFIG)
    top = tmux.top(system.run_dir, "ctrlc")
    top.wait_screen(lambda s: any(ln.startswith("p2 ") for ln in s), "partitions")
    tmux("send-keys", "-t", "ctrlc", "C-c")
    assert top.wait_exit() == (0, "")
    small = tmux.top(system.run_dir, "small", width=30, height=6)
    rc, err = small.wait_exit()
    assert rc == 2 and err.startswith("pyhv: error: top: the terminal is 30x6") \
        and len(err.splitlines()) == 1, err  # fmt: skip
    # shrunk below that while it runs: it says so, and is back when there is room
    top = tmux.top(system.run_dir, "shrunk", width=100, height=30)
    top.wait_screen(lambda s: any(ln.startswith("p2 ") for ln in s), "partitions")
    tmux("resize-window", "-t", "shrunk", "-x", "30", "-y", "5")
    top.wait_screen(lambda s: any("terminal too small" in ln for ln in s), "too small")
    tmux("resize-window", "-t", "shrunk", "-x", "100", "-y", "30")
    top.wait_screen(lambda s: any(ln.startswith("p2 ") for ln in s), "partitions")
    tmux("send-keys", "-t", "shrunk", "q")
    assert top.wait_exit() == (0, "")


def test_top_says_when_the_hypervisor_goes_away(system, tmux):
    system.up(CONFIG)
    pid = system.pid
    top = tmux.top(system.run_dir, "gone")
    top.wait_screen(lambda s: any(ln.startswith("p2 ") for ln in s), "partitions")
    assert system.pyhv("shutdown").returncode == 0
    rc, err = top.wait_exit()
    assert rc == 1 and "Traceback" not in err, err
    assert err.strip() == f"pyhv: error: the hypervisor in {system.run_dir} (pid {pid}) " \
                          "has gone away"  # fmt: skip


def test_top_without_a_hypervisor_exits_1(tmp_path, tmux):
    top = tmux.top(tmp_path, "none")
    rc, err = top.wait_exit()
    assert rc == 1 and err.strip() == f"pyhv: error: no hypervisor is running in {tmp_path}", err
