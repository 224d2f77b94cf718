"""The nbd rows of ``pyhv bench`` (issue 13): the partition's paging device
on an NBD server in another network namespace, at 0, 100 µs and 1 ms of
added latency, against the same device local.

The random and sequential workloads of the main table (``pyhv.benchmark``:
the same program, parameters, fresh system per run, 16 MiB pool, 64 MiB
partition) run with the partition's device, in turn:

``local``         the main table's pyhv device: a loop device with direct
                  I/O over an image file on this machine's disk;
``NBD +0 us``     nbdkit's file plugin serving that same image file
                  (``cache=none fadvise=random``: the page cache keeps none
                  of it and reads nothing around, as close to direct I/O as
                  nbdkit 1.32's file plugin comes) in a network namespace
                  reached over a veth (``pyhv.nbdhost.StorageHost``);
``NBD +100 us``, ``NBD +1 ms``  the same with our ``usdelay`` filter holding
                  every read and every write that long.

The random workload at +1 ms and more runs SLOW_TOUCHES touches instead of
the main table's (each page-in waits a millisecond or more: the full run
would take half a minute); "vs local" compares time per touch.  Every run
reads every page back afterwards (not timed) and checks what the fill and
the touches wrote (``--verify``); a mismatch is an error.

Per row: the touch phase's time; the page-in fault latency as the worker
sees it (its slowest K touches, K = the faults that waited for a page-in,
the fault engine's ``page_in_waits``: the main table takes K = page-ins,
the same for random, but sequential's read-ahead pages are page-ins that no
fault waited for); the READs' mean round trip (engine to paging service to
device and back) and how many were in flight on average (Little's law: the
READs' round trips summed over the phase's time, both the engine's own
counters); pages paged in a second.

Beside the rows, what one 4 KiB read costs, one at a time (PROBES reads at
seeded random offsets of the image, written whole first: a fresh image's
unwritten extents cost no disk I/O): on the local loop device (pread,
O_DIRECT) and on each server through ``pyhv.nbd.NbdDevice``; and the
latency usdelay really adds (nanosleep costs more than it asks for on these
VMs), measured the same way against nbdkit's memory plugin, which has no
disk behind it: p50 with the filter less p50 without.  Every server is up
before the probes, and the probes take the targets in turn, a read each:
what a read costs here varies from second to second, and the differences
are what count.

Everything is torn down (the storage host, with its servers, is closed in a
``finally``, with SIGINT and SIGTERM held off) on errors and Ctrl-C too.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import shutil
import subprocess
import time

from pyhv.benchmark import (MiB, PAGE, BenchError, LoopDevice, _latency_summary, _no_interrupts,
                            _summary_us, run_pyhv_workload)  # fmt: skip

PLACEMENTS = (("local", None), ("NBD +0 us", 0), ("NBD +100 us", 100), ("NBD +1 ms", 1000))
WORKLOADS = ("random", "sequential")
SLOW_US = 1000  # at this much added latency (and more) the random workload runs ...
SLOW_TOUCHES = 5000  # ... this many touches
PROBES = 400  # single 4 KiB reads a probe (after WARMUP more, not counted)
WARMUP = 20
PORT = 10809  # the file servers': PORT + i; the memory servers of the delay probe: PORT + 100 + D
FILE_OPTIONS = ("cache=none", "fadvise=random")
STEPS = 1 + len(PLACEMENTS) * len(WORKLOADS)  # the probes, then a step a run


def unavailable() -> str | None:
    """Why this machine cannot run the nbd rows (None: it can)."""
    from pyhv import nbd, nbdhost

    if os.geteuid() != 0:
        return "needs root (network namespaces, veths, loop devices)"
    if not nbd.available():
        return "this pyhv was built without libnbd (Debian's libnbd-dev, then make setup)"
    for tool, package in (("ip", "iproute2"), ("nbdkit", "nbdkit")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    try:
        nbdhost.usdelay_filter()
    except nbdhost.HostError as e:
        return str(e)
    return None


def _fill(dev: str) -> None:
    """Write every block of the image (O_DIRECT through the loop device): a
    fresh image is all unwritten extents, whose reads cost no disk I/O."""
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
    try:
        buf.write(random.Random(2).randbytes(MiB))
        for off in range(0, os.lseek(fd, 0, os.SEEK_END), MiB):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
    finally:
        buf.close()
        os.close(fd)


def _probe(targets: dict) -> dict:
    """Single 4 KiB reads, one at a time, at seeded random pages of each
    target (name: (read(offset), size)), its last page aside (an NBD
    export's claim); the targets in turn, a read each, so that they see the
    same machine (it varies from second to second on these VMs); WARMUP
    rounds first, not counted.  p50/p99 in µs by name."""
    rngs = {name: random.Random(k) for k, name in enumerate(targets)}
    lat: dict[str, list[int]] = {name: [] for name in targets}
    for i in range(WARMUP + PROBES):
        for name, (read, size) in targets.items():
            off = rngs[name].randrange(size // PAGE - 1) * PAGE
            t = time.perf_counter_ns()
            read(off)
            if i >= WARMUP:
                lat[name].append(time.perf_counter_ns() - t)
    return {name: _summary_us(v) for name, v in lat.items()}


@contextlib.contextmanager
def _readers(local: str, uris: dict):
    """(read, size) of the local device (pread, O_DIRECT) and of each URI
    (pyhv.nbd.NbdDevice, one connection), closed after."""
    from pyhv.nbd import NbdDevice

    fd = os.open(local, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    buf = mmap.mmap(-1, PAGE)
    devs = {}
    try:
        out = {"local": (lambda off: os.preadv(fd, [buf], off), os.lseek(fd, 0, os.SEEK_END))}
        for name, uri in uris.items():
            d = devs[name] = NbdDevice(uri)
            out[name] = (lambda off, d=d: d.pread(PAGE, off), d.size)
        yield out
    finally:
        for d in devs.values():
            d.close()
        buf.close()
        os.close(fd)


def _row(label: str, delay: int | None, r: dict, lat: list[int]) -> dict:
    """One row from a workload's result and its per-touch latencies."""
    c = r["counters"]
    waits, reads, secs = c["page_in_waits"], c["reads_done"], r["seconds"]
    fault = _latency_summary(lat, waits)
    return {
        "device": label, "delay_us": delay, "workload": r["workload"], "touches": r["touches"],
        "seconds": round(secs, 4), "us_per_touch": round(secs / r["touches"] * 1e6, 2),
        "vs_local": None,
        "fault_p50_us": fault.get("fault_p50_us"), "fault_p99_us": fault.get("fault_p99_us"),
        "page_ins": c["page_ins"], "page_in_waits": waits,
        "page_in_wait_us": round(c["page_in_wait_ns"] / waits / 1000, 1) if waits else None,
        "reads": reads, "pages_per_read": round(c["page_ins"] / reads, 2) if reads else None,
        "read_rtt_us": round(c["read_rtt_ns"] / reads / 1000, 1) if reads else None,
        "reads_in_flight": round(c["read_rtt_ns"] / (secs * 1e9), 2) if secs else None,
        "mib_s": round(c["page_ins"] * PAGE / MiB / secs, 1) if secs else None,
        "page_outs": c["page_outs"], "verified": r.get("verified"),
        "mismatches": r.get("mismatches"), "pyhv": r,
    }  # fmt: skip


def run_nbd(tmpdir: str, p: dict, loop: LoopDevice, errors: list, advance) -> dict:
    """The rows: each workload on `loop` (local), then on nbdkit serving
    loop's image file at each added latency.  First (one step) the image
    is written whole, every server started, and the probes run.  A run
    that fails, or whose pages do not verify, is an error in `errors` (its
    row missing or marked); the storage host is always closed."""
    from pyhv.nbdhost import HostError, StorageHost, usdelay_filter

    version = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout
    out: dict = {
        "image": loop.file, "local_device": loop.dev, "local_direct_io": loop.direct_io,
        "server": f"{version.strip() or 'nbdkit'} file plugin, {' '.join(FILE_OPTIONS)}, "
                  "in a network namespace over a veth",
        "touches": p["touches"], "slow_touches": SLOW_TOUCHES, "slow_from_us": SLOW_US,
        "probes": PROBES, "rows": [], "read_probe": {}, "usdelay": {},
    }  # fmt: skip
    q = {**p, "verify": True}
    delays = [d for _, d in PLACEMENTS if d]
    host = None
    left = 1 + len(PLACEMENTS) * len(WORKLOADS)  # (STEPS)

    def step() -> None:
        nonlocal left
        left -= 1
        advance(1)

    def rows(label: str, delay: int | None, device: str) -> None:
        for name in WORKLOADS:
            w = dict(q)
            if name == "random" and delay is not None and delay >= SLOW_US:
                w["touches"] = min(SLOW_TOUCHES, w["touches"])
            run_dir = os.path.join(tmpdir, f"run-nbd-{delay if delay is not None else 'local'}"
                                   f"-{name}")  # fmt: skip
            try:
                r = run_pyhv_workload(device, run_dir, name, w, samples=True)
                row = _row(label, delay, r, r.pop("samples_ns"))
                out["rows"].append(row)
                if row["mismatches"]:
                    errors.append(f"nbd {label} {name}: {row['mismatches']} of "
                                  f"{row['verified']} pages did not verify")  # fmt: skip
            except (BenchError, subprocess.TimeoutExpired) as e:
                errors.append(f"nbd {label} {name}: {e}")
            finally:
                step()
            shutil.rmtree(run_dir, ignore_errors=True)

    def delay_args(d: int) -> list[str]:
        return [f"rdelay-us={d}", f"wdelay-us={d}"] if d else []

    try:
        host = StorageHost(links=1)
        _fill(loop.dev)
        servers = {}  # the file servers, all up from here to the end (idle but one at a time)
        for i, (label, d) in enumerate(PLACEMENTS):
            if d is not None:
                try:
                    servers[label] = host.nbdkit(
                        ["file", f"file={loop.file}", *FILE_OPTIONS, *delay_args(d)],
                        port=PORT + i, filters=[usdelay_filter()] if d else [])  # fmt: skip
                except HostError as e:
                    errors.append(f"nbd {label}: {e}")
        memory = {d: host.nbdkit(["memory", "size=16M", *delay_args(d)], port=PORT + 100 + d,
                                 filters=[usdelay_filter()] if d else [])
                  for d in (0, *delays)}  # what usdelay adds, with no disk behind it  # fmt: skip
        uris = {label: host.uri(s) for label, s in servers.items()}
        uris.update({f"memory +{d}": host.uri(s) for d, s in memory.items()})
        with _readers(loop.dev, uris) as targets:
            probe = _probe(targets)
        for s in memory.values():
            s.stop()
        out["read_probe"] = {k: v for k, v in probe.items() if not k.startswith("memory")}
        out["usdelay"] = {str(d): probe[f"memory +{d}"] for d in (0, *delays)}
        for d in delays:
            out["usdelay"][str(d)]["added_us"] = round(
                probe[f"memory +{d}"]["p50_us"] - probe["memory +0"]["p50_us"], 1)  # fmt: skip
        step()
        for label, d in PLACEMENTS:
            if d is None:
                rows(label, d, loop.dev)
            elif label in servers:
                rows(label, d, uris[label])
    except (HostError, OSError) as e:
        errors.append(f"nbd: {e}")
        out["error"] = str(e).splitlines()[0]
    finally:
        if host is not None:
            with _no_interrupts():
                try:
                    host.close()
                except HostError as e:
                    errors.append(f"nbd: {e}")
        advance(left)  # (the steps of runs that never started)
    local = {r["workload"]: r for r in out["rows"] if r["delay_us"] is None}
    for r in out["rows"]:
        base = local.get(r["workload"])
        if base and base["us_per_touch"]:
            r["vs_local"] = round(r["us_per_touch"] / base["us_per_touch"], 2)
    return out


def _n(v, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"nbd: skipped: {r['skipped']}"]
    lines = [f"nbd: the partition's device local (a loop device, direct I/O, over an image file) "
             f"and on {r['server']},",
             "  serving the same file; usdelay adds the latency to every read and write",
             f"  {'device':<13}{'workload':<11}{'touches':>8}{'time':>10}{'vs local':>9}"
             f"{'waited*':>8}{'page-in p50/p99*':>18}{'READ rtt':>10}{'in flight**':>12}"
             f"{'MiB/s':>7}{'verified':>11}"]  # fmt: skip
    for x in r["rows"]:
        star = "***" if x["workload"] == "random" and x["touches"] < r["touches"] else ""
        pct = f"{_n(x['fault_p50_us'])}/{_n(x['fault_p99_us'])} us"
        ok = "ok" if x["mismatches"] == 0 else f"{x['mismatches']} bad"
        lines.append(f"  {x['device']:<13}{x['workload']:<11}{str(x['touches']) + star:>8}"
                     f"{x['seconds']:>8.3f} s{_n(x['vs_local'], '{:.2f}x'):>9}"
                     f"{x['page_in_waits']:>8}{pct:>18}{_n(x['read_rtt_us']) + ' us':>10}"
                     f"{_n(x['reads_in_flight'], '{:.2f}'):>12}{_n(x['mib_s'], '{:.1f}'):>7}"
                     f"{str(x['verified']) + ' ' + ok:>11}")  # fmt: skip
    probe = r.get("read_probe", {})
    if probe:
        lines.append(f"  one 4 KiB read at a time, p50/p99 of {r['probes']} (local: pread O_DIRECT "
                     "of the loop device; NBD: pyhv.nbd.NbdDevice): " + "; ".join(
                         f"{k} {v['p50_us']:.0f}/{v['p99_us']:.0f} us"
                         for k, v in probe.items()))  # fmt: skip
    u = r.get("usdelay", {})
    if u:
        lines.append("  what usdelay adds, p50 of the same reads from nbdkit's memory plugin: "
                     f"without it {u['0']['p50_us']:.0f} us; " + "; ".join(
                         f"rdelay-us={d} {v['p50_us']:.0f} us (+{v['added_us']:.0f})"
                         for d, v in u.items() if d != "0"))  # fmt: skip
    lines.append("  * faults that waited for a page-in (the engine's count), K; page-in p50/p99: "
                 "the worker's slowest K touches")  # fmt: skip
    lines.append("  ** the fault engine's READs in flight on average: their round trips summed / "
                 "the touch phase's time; MiB/s: pages paged in")  # fmt: skip
    if any(x["touches"] < r["touches"] for x in r["rows"] if x["workload"] == "random"):
        lines.append(f"  *** random at +{r['slow_from_us'] // 1000} ms: {r['slow_touches']} "
                     f"touches, not {r['touches']}; vs local: time per touch")  # fmt: skip
    if "error" in r:
        lines.append(f"  nbd: {r['error']}")
    return lines
