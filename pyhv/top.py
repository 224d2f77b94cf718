"""``pyhv top`` and ``pyhv stat``: a running system as it goes.

Both sample the hypervisor's status (the control point's ``status``
request, what ``pyhv status --json`` prints) and turn two samples into
rates in one place, :meth:`Sampler.next`: the difference of a partition's
counters over the time between the samples.  ``stat`` prints those figures
one line an interval (or as JSON Lines); ``top`` draws them full screen with
curses, beside the paging services, their streams, and the CPU and RSS of
the system's processes (psutil).
"""

from __future__ import annotations

import json
import os
import sys
import time

import psutil

from pyhv.cli import format_services
from pyhv.config import human_size
from pyhv.system import EXIT_USAGE, Fail, control

#: a partition's counters that are shown as rates (per second)
RATE_COUNTERS = ("faults", "page_ins", "page_outs")
STATUS_TIMEOUT = 10.0  # seconds a status request may take before the view gives up
GONE_WAIT = 3.0  # seconds a hypervisor that stopped answering has to exit, to count as gone


class Sampler:
    """Status samples of the hypervisor in a run directory, and the rates
    between each and the one before it."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.status: dict | None = None  # the latest status, as the hypervisor gave it
        self._prev: tuple[float, dict] | None = None  # (monotonic time, status)

    def next(self) -> dict:
        """A new sample's figures: the pool, and each partition's resident
        pages and counters with their rates since the previous sample (None
        for the first sample, a partition new since, a counter that went back,
        or a hypervisor started anew).  Raises Fail when there is no
        hypervisor, saying so once it has gone away."""
        try:
            st = control(self.run_dir, {"op": "status"}, STATUS_TIMEOUT)
        except Fail:
            if self.status is not None and _exits(self.status["pid"], GONE_WAIT):
                raise Fail(f"the hypervisor in {self.run_dir} (pid {self.status['pid']}) "
                           "has gone away") from None  # fmt: skip
            raise
        if not st.get("ok"):
            raise Fail(f"hypervisor in {self.run_dir}: {st.get('error', 'status refused')}")
        if st.get("restricted"):  # (a user's view has no pool, services or devices)
            raise Fail("pyhv top and stat show the whole system: they are for root and the "
                       "admin group (pyhv status shows your partitions)", EXIT_USAGE)  # fmt: skip
        now = time.monotonic()
        prev = self._prev if self._prev and self._prev[1]["pid"] == st["pid"] else None
        self._prev, self.status = (now, st), st
        interval = now - prev[0] if prev else None
        before = {p["name"]: p for p in prev[1]["partitions"]} if prev else {}
        parts = [_partition_figures(p, before.get(p["name"]), interval)
                 for p in st["partitions"]]  # fmt: skip
        pool = st["pool"]
        fig = {
            "time": round(time.time(), 3),
            "interval": round(interval, 4) if interval else None,
            "hypervisor": st["pid"],
            "state": st["state"],
            "pool": {"pages": pool["pages"], "resident": pool["resident_pages"],
                     "free": max(0, pool["pages"] - pool["frames_used"]),
                     "fault_waiters": pool["fault_waiters"]},  # fmt: skip
            "machine_checks": sum(p["machine_checks"] for p in parts),
        }
        for name in RATE_COUNTERS:
            fig[name] = sum(p[name] for p in parts)
            rates = [p[f"{name}_per_s"] for p in parts if p[f"{name}_per_s"] is not None]
            fig[f"{name}_per_s"] = round(sum(rates), 1) if interval and rates else None
        fig["partitions"] = parts
        return fig


def _exits(pid: int, timeout: float) -> bool:
    """Does process pid exit (or is it gone already) within timeout seconds?"""
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.TimeoutExpired:
        return False
    except psutil.NoSuchProcess:
        pass
    return True


def _partition_figures(p: dict, before: dict | None, interval: float | None) -> dict:
    fig = {"name": p["name"], "resident_pages": p["resident_pages"], "weight": p["weight"],
           "machine_checks": p["machine_checks"], "stream": p["stream"],
           "service": p["service"], "workers": len(p["workers"])}  # fmt: skip
    for name in RATE_COUNTERS:
        fig[name] = p[name]
        delta = p[name] - before[name] if before is not None and interval else -1
        fig[f"{name}_per_s"] = round(delta / interval, 1) if delta >= 0 else None
    return fig


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


# --- stat ----------------------------------------------------------------------------------

MAX_PARTITION_COLUMNS = 3  # partitions that get columns of their own in stat's lines


def _stat_columns(fig: dict) -> list[tuple[str, str]]:
    """(heading, value) of each column of a stat line."""
    pool = fig["pool"]
    cols = [("time", time.strftime("%H:%M:%S", time.localtime(fig["time"]))),
            ("free", str(pool["free"])), ("resident", str(pool["resident"])),
            ("faults/s", _rate(fig["faults_per_s"])), ("page-ins/s", _rate(fig["page_ins_per_s"])),
            ("page-outs/s", _rate(fig["page_outs_per_s"])), ("mce", str(fig["machine_checks"]))]
    if len(fig["partitions"]) <= MAX_PARTITION_COLUMNS:
        for p in fig["partitions"]:
            cols += [(f"{p['name']}:res", str(p["resident_pages"])),
                     (f"{p['name']}:flt/s", _rate(p["faults_per_s"]))]  # fmt: skip
    return cols


def stat(run_dir: str, interval: float, count: int | None, as_json: bool) -> int:
    """Print the figures every interval seconds, count times (None: until
    interrupted); a header line first (again when the columns change)."""
    sampler = Sampler(run_dir)
    header, done = None, 0
    try:
        sampler.next()
        next_at = time.monotonic()
        while count is None or done < count:
            next_at = max(next_at + interval, time.monotonic())  # (late: no burst to catch up)
            time.sleep(max(0.0, next_at - time.monotonic()))
            fig = sampler.next()
            if as_json:
                print(json.dumps(fig), flush=True)
            else:
                cols = _stat_columns(fig)
                widths = [max(len(h), 8) for h, _ in cols]
                if [h for h, _ in cols] != header:
                    header = [h for h, _ in cols]
                    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
                print(" ".join(f"{v:>{w}}" for (_, v), w in zip(cols, widths)), flush=True)
            done += 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # (stat | head): the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no error at exit)
        return 0
    return 0


# --- top -----------------------------------------------------------------------------------

MIN_COLUMNS, MIN_LINES = 40, 10  # the smallest terminal top draws in


class Processes:
    """CPU share and RSS of processes, by psutil.  The CPU share is over the
    time since the previous look at the same process: a first look has none."""

    def __init__(self):
        self._known: dict[int, psutil.Process] = {}

    def look(self, pids) -> dict[int, dict]:
        """{pid: {"name", "cpu" (percent of one CPU, or None), "rss"}} of the
        pids still there; processes not asked about again are forgotten."""
        seen, known = {}, {}
        for pid in pids:
            proc = self._known.get(pid)
            try:
                if proc is None:
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)  # (the start of its first interval)
                    cpu = None
                else:
                    cpu = proc.cpu_percent(None)
                with proc.oneshot():
                    seen[pid] = {"name": proc.name(), "cpu": cpu, "rss": proc.memory_info().rss}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            known[pid] = proc
        self._known = known
        return seen


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def screen(fig: dict, st: dict, procs: dict[int, dict]) -> list[tuple[str, bool]]:
    """What top shows: (line, is a heading) from top to bottom."""
    pool = fig["pool"]
    lines = [
        (f"pyhv top  {st['run_dir']}  hypervisor pid {st['pid']} {st['state']}, up "
         f"{_duration(st['uptime'])}  {time.strftime('%H:%M:%S')}  (q quits)", True),
        (f"pool {human_size(st['pool']['size_bytes'])}: {pool['pages']} pages, "
         f"{pool['resident']} resident, {pool['free']} free, {pool['fault_waiters']} faults "
         "waiting for a frame", False),
        (f"faults/s {_rate(fig['faults_per_s'])}  page-ins/s {_rate(fig['page_ins_per_s'])}  "
         f"page-outs/s {_rate(fig['page_outs_per_s'])}  machine checks "
         f"{fig['machine_checks']}", False),
        ("", False),
        (f"{'PARTITION':<12}{'RESIDENT':>9}{'FAULTS/S':>10}{'PAGE-INS/S':>12}{'PAGE-OUTS/S':>13}"
         f"{'WEIGHT':>8}{'MCE':>5}  {'STREAM':<11}{'SERVICE':<10}WORKERS", True),
    ]
    for p in fig["partitions"]:
        lines.append((f"{p['name']:<12}{p['resident_pages']:>9}{_rate(p['faults_per_s']):>10}"
                      f"{_rate(p['page_ins_per_s']):>12}{_rate(p['page_outs_per_s']):>13}"
                      f"{p['weight']:>8}{p['machine_checks']:>5}  {p['stream']:<11}"
                      f"{p['service'] or '-':<10}{p['workers']}", False))  # fmt: skip
    lines.append(("", False))
    services = format_services(st["paging_services"]).splitlines()
    lines += [(services[0], True)] + [(s, False) for s in services[1:]]
    lines += [("", False), (f"{'PID':>8}  {'PROCESS':<24}{'CPU%':>7}{'RSS':>10}  COMMAND", True)]
    who = {st["pid"]: "hypervisor"}
    who.update((s["pid"], f"paging service {s['name']}") for s in st["paging_services"] if s["pid"])
    who.update((w, f"worker of {p['name']}") for p in st["partitions"] for w in p["workers"])
    for pid, role in who.items():
        pr = procs.get(pid)
        if pr is not None:
            cpu = "-" if pr["cpu"] is None else f"{pr['cpu']:.1f}"
            lines.append((f"{pid:>8}  {role:<24}{cpu:>7}{human_size(pr['rss']):>10}  "
                          f"{pr['name']}", False))  # fmt: skip
    return lines


def process_ids(st: dict) -> list[int]:
    """The hypervisor's, the running paging services' and the workers' pids."""
    return ([st["pid"]] + [s["pid"] for s in st["paging_services"] if s["pid"]]
            + [w for p in st["partitions"] for w in p["workers"]])  # fmt: skip


def _draw(win, lines: list[tuple[str, bool]]) -> None:
    import curses

    rows, cols = win.getmaxyx()
    win.erase()
    if rows < MIN_LINES or cols < MIN_COLUMNS:
        lines = [(f"terminal too small ({cols}x{rows}; top needs {MIN_COLUMNS}x{MIN_LINES})",
                  True)]  # fmt: skip
    for y, (text, heading) in enumerate(lines[:rows]):
        try:  # (writing the bottom right cell moves the cursor out: an "error" after the fact)
            win.addnstr(y, 0, text, cols, curses.A_BOLD if heading else curses.A_NORMAL)
        except curses.error:
            pass
    win.refresh()


def _top_loop(win, sampler: Sampler, fig: dict, interval: float) -> int:
    import curses

    try:
        curses.curs_set(0)
    except curses.error:  # (a terminal that cannot hide its cursor)
        pass
    procs = Processes()
    next_at = time.monotonic()
    while True:
        lines = screen(fig, sampler.status, procs.look(process_ids(sampler.status)))
        _draw(win, lines)
        next_at = max(next_at + interval, time.monotonic())
        while (left := next_at - time.monotonic()) > 0:
            win.timeout(max(1, int(left * 1000)))
            key = win.getch()
            if key in (ord("q"), ord("Q")):
                return 0
            if key == curses.KEY_RESIZE:
                _draw(win, lines)
        fig = sampler.next()


def top(run_dir: str, interval: float) -> int:
    """The full-screen view, until q (or Ctrl-C); Fail when the hypervisor goes."""
    import curses

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise Fail("top needs a terminal (pyhv stat prints lines)", EXIT_USAGE)
    cols, rows = os.get_terminal_size()
    if cols < MIN_COLUMNS or rows < MIN_LINES:
        raise Fail(f"top: the terminal is {cols}x{rows}; top needs at least "
                   f"{MIN_COLUMNS}x{MIN_LINES}", EXIT_USAGE)  # fmt: skip
    for stale in ("LINES", "COLUMNS"):  # curses would believe these over the terminal itself
        os.environ.pop(stale, None)
    sampler = Sampler(run_dir)
    try:
        fig = sampler.next()  # (no hypervisor: one line, before the screen is taken)
        return curses.wrapper(_top_loop, sampler, fig, interval)
    except KeyboardInterrupt:
        return 0
    except curses.error as e:
        raise Fail(f"top: cannot drive this terminal: {e}") from None
