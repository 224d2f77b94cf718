"""``pyhv demo``: a whole system on the embedded default config, in a
temporary run directory.

Two partitions of 16 MiB share an 8 MiB pool.  Partition lpar1 runs two
workers that write their own stripes; lpar2 one worker that writes all of
it.  Then every partition's pages are verified in random order by fresh
workers, so most pages come back from the paging device.  Resident pages are
sampled all along and must never exceed the pool.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time

from pyhv import system
from pyhv._spawn import module_command
from pyhv.config import DEMO_CONFIG, load_config_text
from pyhv.progress import Progress
from pyhv.workload import percentile

WORKERS = {"lpar1": 2, "lpar2": 1}
PROGRESS_EVERY = 128


def _phase(run_dir, label, action, config, extra, show, samples) -> list[dict]:
    """Run one phase in every partition at once; returns the workers' reports."""
    procs = []
    pages = 0
    for part in config.partitions:
        n = WORKERS.get(part.name, 1)
        stripe = action == "write" and n > 1
        cmd = module_command("pyhv.workload", action, "--progress", str(PROGRESS_EVERY))
        cmd += (["--stripe"] if stripe else []) + extra
        procs += system.spawn_workers(run_dir, part.name, n, cmd, stdout=subprocess.PIPE)
        pages += part.pages if stripe else part.pages * n
    bar = Progress(label, pages, enabled=show)
    sel = selectors.DefaultSelector()
    for p in procs:
        sel.register(p.stdout, selectors.EVENT_READ, p)
    reports, open_pipes = [], len(procs)
    next_sample = 0.0
    while open_pipes:
        for key, _ in sel.select(0.1):
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                open_pipes -= 1
            elif line.startswith(b"progress "):
                bar.advance(int(line.split()[1]))
            elif line.startswith(b"{"):
                reports.append(json.loads(line))
        if time.monotonic() >= next_sample:
            next_sample = time.monotonic() + 0.05
            samples.append(system.control(run_dir, {"op": "status"})["pool"]["resident_pages"])
    bar.close()
    codes = [p.wait() for p in procs]
    if any(codes):
        raise system.Fail(f"demo: a worker failed in the {action} phase (exit {codes})")
    return reports


def run(json_output: bool = False) -> int:
    started = time.monotonic()
    run_dir = tempfile.mkdtemp(prefix="pyhv-demo-")
    show = not json_output or sys.stderr.isatty()
    os.environ["PYHV_WORKLOAD_LATENCIES"] = "1"
    try:
        config = load_config_text(DEMO_CONFIG, run_dir, "embedded demo config")
        system.start_system(None, run_dir, detach=True, config=config)
        samples: list[int] = []
        writes = _phase(run_dir, "write", "write", config, [], show, samples)
        verifies = _phase(run_dir, "verify (random)", "verify", config, ["--random"], show,
                          samples)  # fmt: skip
        st = system.control(run_dir, {"op": "status"})
        system.stop_system(run_dir)
    except BaseException:
        if system.running_pid(run_dir):
            try:
                system.stop_system(run_dir)
            except system.Fail:
                pass
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)

    lat = sorted(x for r in writes + verifies for x in r["latencies_ns"])
    parts = st["partitions"]
    summary = {
        "pool_bytes": st["pool"]["size_bytes"],
        "memory_bytes": sum(p["memory_bytes"] for p in parts),
        "partitions": len(parts),
        "workers": sum(WORKERS.values()),
        "faults": sum(p["faults"] for p in parts),
        "first_touches": sum(p["first_touches"] for p in parts),
        "page_ins": sum(p["page_ins"] for p in parts),
        "page_outs": sum(p["page_outs"] for p in parts),
        "clean_drops": sum(p["clean_drops"] for p in parts),
        "pages_written": sum(r["pages"] for r in writes),
        "pages_verified": sum(r["pages"] for r in verifies),
        "mismatches": sum(r["mismatches"] for r in verifies),
        "max_resident_sampled": max(samples, default=0),
        "pool_pages": st["pool"]["pages"],
        "fault_latency_p50_us": percentile(lat, 0.5) / 1000,
        "fault_latency_p99_us": percentile(lat, 0.99) / 1000,
        "seconds": round(time.monotonic() - started, 2),
    }
    ok = summary["mismatches"] == 0 and summary["max_resident_sampled"] <= summary["pool_pages"]
    summary["ok"] = ok
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        s = summary
        print(
            f"pyhv demo: {s['partitions']} partitions, {s['memory_bytes'] >> 20} MiB of memory "
            f"in a {s['pool_bytes'] >> 20} MiB pool, {s['workers']} workers\n"
            f"  faults            {s['faults']:>8}  (first touches {s['first_touches']})\n"
            f"  page-ins          {s['page_ins']:>8}\n"
            f"  page-outs         {s['page_outs']:>8}  (+{s['clean_drops']} clean pages dropped "
            "without I/O)\n"
            f"  pages verified    {s['pages_verified']:>8}  mismatches {s['mismatches']}\n"
            f"  resident max      {s['max_resident_sampled']:>8}  of {s['pool_pages']} pool pages "
            "(sampled)\n"
            f"  fault latency     p50 {s['fault_latency_p50_us']:.1f} us, "
            f"p99 {s['fault_latency_p99_us']:.1f} us (worker's view, first access to a page)\n"
            f"  {'OK' if ok else 'FAILED'} in {s['seconds']:.1f} s"
        )
    return 0 if ok else 1
