"""The lifecycle rows of ``pyhv bench`` (issue 12): suspend, resume,
snapshot restore, each against a cold start, on one system.

One system: a 16 MiB pool, partition p1 of 64 MiB, its device and four
more for restored partitions, files in the bench's directory on disk.  A
worker fills p1 and makes a hot set (2,048 seeded pages, touched twice) its
working set, then waits; what is timed is its next 1,000 touches of hot
pages (each checks the page's own number, written at fill), from the
moment the control operation starts:

- ``suspend``: ``pyhv partition suspend p1`` (its own time);
- ``resume``, ``resume, no prefetch``: from ``partition resume`` to the
  1,000th touch done (the worker goes on when SIGCONT reaches it);
- ``cold start``: every page on the device, no read-ahead: a fresh worker's
  1,000 touches;
- ``restore``, ``restore, no prefetch``: from ``partition add
  --from-snapshot`` (a snapshot saved of p1 suspended) to the 1,000th touch
  of a fresh worker (its start and attach included);
- ``snapshot reads``: two partitions restored from the snapshot, no
  read-ahead, each touching a tenth of the pages: pages each read from it.

Run alone with ``pyhv bench --only lifecycle``; not part of ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

from pyhv._spawn import module_command

P = 4096
MiB = 1 << 20
MEMORY = 64 * MiB
POOL = 16 * MiB
HOT = 2048
TOUCHES = 1000
SEED = 12


def _hot(pages: int) -> list[int]:
    return random.Random(SEED).sample(range(pages), HOT)


def worker_main(argv: list[str]) -> int:
    """python -m pyhv.bench_lifecycle worker [--fill] [--warm] [--share K] --go FILE"""
    import pyhv

    ap = argparse.ArgumentParser(prog="pyhv-bench-lifecycle worker")
    ap.add_argument("--fill", action="store_true")
    ap.add_argument("--warm", action="store_true", help="touch the hot set, then wait")
    ap.add_argument("--share", type=int, default=-1, help="touch pages K, K+10, ... and exit")
    ap.add_argument("--go", required=True)
    args = ap.parse_args(argv)
    mem = pyhv.attach()
    n = len(mem) // P
    if args.fill:
        for i in range(n):
            mem[i * P : i * P + 8] = i.to_bytes(8, "little")
    hot = _hot(n)
    if args.warm:
        for _ in range(2):
            for i in hot:
                mem[i * P]
    print("ready", flush=True)
    while not os.path.exists(args.go):
        time.sleep(0.0005)
    order = random.Random(SEED + 1).choices(hot, k=TOUCHES) if args.share < 0 else range(
        args.share, n, 10)  # fmt: skip
    bad = 0
    t0 = time.monotonic()
    for i in order:
        bad += mem[i * P : i * P + 8] != i.to_bytes(8, "little")
    t1 = time.monotonic()
    print(json.dumps({"t0": t0, "t1": t1, "touches": len(order), "bad": bad}), flush=True)
    return 0


class _System:
    def __init__(self, tmpdir: str):
        self.run = os.path.join(tmpdir, "run-lifecycle")
        os.makedirs(self.run, exist_ok=True)
        devs = "".join(f'[[device]]\nid = "d{i}"\npath = "d{i}.img"\nsize = {MEMORY}\n'
                       'direct = true\n\n' for i in range(5))  # fmt: skip
        self.cfg = os.path.join(self.run, "cfg.toml")
        with open(self.cfg, "w") as f:
            f.write(f'[pool]\nsize = {POOL}\n\n[[paging_service]]\nname = "vios1"\n\n{devs}'
                    f'[[partition]]\nname = "p1"\nmemory = {MEMORY}\ndevice = "d0"\n')
        self.procs: list[subprocess.Popen] = []

    def pyhv(self, *args: str) -> dict:
        r = subprocess.run([*module_command("pyhv"), *args, "--run-dir", self.run, "--json"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"pyhv {' '.join(args)}: {r.stderr.strip()}")
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def worker(self, partition: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([*module_command("pyhv"), "run", "--run-dir", self.run,
                              "--partition", partition, "--",
                              *module_command("pyhv.bench_lifecycle"), "worker", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.procs.append(p)
        return p


def _ready(p: subprocess.Popen) -> None:
    line = p.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"a worker did not start: {line} {p.stderr.read()[-300:]}")


def _done(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"a worker failed ({p.returncode}): {err.strip()[-300:]}")
    r = json.loads(out.strip().splitlines()[-1])
    if r["bad"]:
        raise RuntimeError(f"{r['bad']} touches read a wrong page")
    return r


def run_lifecycle(tmpdir: str) -> dict:
    s = _System(tmpdir)
    out: dict = {"memory_bytes": MEMORY, "pool_bytes": POOL, "hot_pages": HOT,
                 "touches": TOUCHES}  # fmt: skip
    go = os.path.join(s.run, "go")
    try:
        up = subprocess.run([*module_command("pyhv"), "up", "-c", s.cfg, "--run-dir", s.run,
                             "--detach"], capture_output=True, text=True, timeout=120)  # fmt: skip
        if up.returncode != 0:
            raise RuntimeError(f"pyhv up: {up.stderr.strip()}")
        for prefetch in (True, False):
            w = s.worker("p1", "--go", go, "--warm", *(["--fill"] if prefetch else []))
            _ready(w)
            r = s.pyhv("partition", "suspend", "p1")
            if prefetch:
                out["suspend_s"] = r["seconds"]
                out["suspend_pages_written"] = r["pages_written"]
                out["working_set_pages"] = r["working_set_pages"]
            open(go, "w").close()
            t = time.monotonic()
            s.pyhv("partition", "resume", "p1", *([] if prefetch else ["--no-prefetch"]))
            d = _done(w)
            out["resume" if prefetch else "resume_no_prefetch"] = {
                "to_1000_s": round(d["t1"] - t, 4), "touches_s": round(d["t1"] - d["t0"], 4)}
            os.unlink(go)
        # cold start: every page on the device, nothing read ahead
        s.pyhv("partition", "suspend", "p1")
        s.pyhv("partition", "resume", "p1", "--no-prefetch")
        open(go, "w").close()
        d = _done(s.worker("p1", "--go", go))
        out["cold_start"] = {"touches_s": round(d["t1"] - d["t0"], 4)}
        os.unlink(go)
        # a snapshot of p1 with the hot set as its working set
        w = s.worker("p1", "--go", go, "--warm")
        _ready(w)
        s.pyhv("partition", "suspend", "p1")
        snap = os.path.join(s.run, "snap")
        r = s.pyhv("snapshot", "save", "p1", snap)
        out["snapshot_save_s"] = r["seconds"]
        open(go, "w").close()
        s.pyhv("partition", "resume", "p1")
        _done(w)
        for name, prefetch in (("r1", True), ("r2", False)):
            t = time.monotonic()
            s.pyhv("partition", "add", name, "--memory", str(MEMORY), "--paging", "vios1",
                   "--from-snapshot", snap, *([] if prefetch else ["--no-prefetch"]))  # fmt: skip
            d = _done(s.worker(name, "--go", go))
            out["restore" if prefetch else "restore_no_prefetch"] = {
                "to_1000_s": round(d["t1"] - t, 4), "touches_s": round(d["t1"] - d["t0"], 4)}
        reads = {}
        for k, name in enumerate(("r3", "r4")):
            s.pyhv("partition", "add", name, "--memory", str(MEMORY), "--paging", "vios1",
                   "--from-snapshot", snap, "--no-prefetch")  # fmt: skip
            _done(s.worker(name, "--go", go, "--share", str(k)))
            reads[name] = next(p for p in s.pyhv("status")["partitions"]
                               if p["name"] == name)["snapshot_pages_read"]  # fmt: skip
        out["snapshot_reads"] = {"pages": MEMORY // P, "touched_each": MEMORY // P // 10,
                                 "read": reads}  # fmt: skip
    finally:
        for p in s.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run([*module_command("pyhv"), "shutdown", "--run-dir", s.run],
                       capture_output=True, timeout=120)  # fmt: skip
    return out


def format_lines(r: dict) -> list[str]:
    if "skipped" in r or "error" in r:
        return [f"lifecycle: {r.get('skipped') or r.get('error')}"]
    rows = [("resume", "resume"), ("resume, no prefetch", "resume_no_prefetch"),
            ("restore", "restore"), ("restore, no prefetch", "restore_no_prefetch")]
    lines = [f"lifecycle: a {r['memory_bytes'] // MiB} MiB partition in a "
             f"{r['pool_bytes'] // MiB} MiB pool, a hot set of {r['hot_pages']} pages; "
             f"{r['touches']} touches of it timed",
             f"  suspend {r['suspend_s'] * 1000:.1f} ms ({r['suspend_pages_written']} pages "
             f"written, working set {r['working_set_pages']}); snapshot save "
             f"{r['snapshot_save_s']:.2f} s",
             f"  {'from':<22}{'to 1000th touch':>16}{'touches alone':>15}"]  # fmt: skip
    for label, key in rows:
        x = r[key]
        lines.append(f"  {label:<22}{x['to_1000_s'] * 1000:>13.1f} ms"
                     f"{x['touches_s'] * 1000:>12.1f} ms")  # fmt: skip
    lines.append(f"  {'cold start':<22}{'-':>16}{r['cold_start']['touches_s'] * 1000:>12.1f} ms")
    sr = r["snapshot_reads"]
    lines.append(f"  snapshot reads: two restored partitions touching {sr['touched_each']} of "
                 f"{sr['pages']} pages each read " + " and ".join(
                     str(v) for v in sr["read"].values()) + " pages from it")  # fmt: skip
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    print("\n".join(format_lines(run_lifecycle(sys.argv[1]))))
