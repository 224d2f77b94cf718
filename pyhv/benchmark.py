"""The standard comparison of issue 5: pyhv against the kernel's own swap and
against a minimal C uffd handler, all measured in one run on this machine.

``run(quick, json_file, plot_file, progress)`` does, in one temporary
directory (removed at the end):

1. **Workloads**, each one Python process (so a memory limit applies to it)
   over 64 MiB (16,384 pages), started as ``python -m pyhv.benchmark
   workload NAME ...``.  Every page is first written once (not timed), then
   only the touch phase is timed; each touch reads and writes one byte:

   ``random``      20,000 touches of seeded random pages;
   ``sequential``  two in-order passes over every page;
   ``scattered``   the same two passes, after 20,000 random writes (not
                   timed) have scattered the pages over the device's slots;
   ``zipf``        20,000 touches of pages drawn from a bounded Zipf
                   distribution (exponent 1: the hottest 20% of the pages
                   take ~84% of the touches), hot pages scattered (seeded).

   The first write of every page (``fill``) is timed too, in the random
   workload's process; so are the context switches of the whole machine
   (``/proc/stat`` ctxt) during each timed phase, reported per miss.

   ``quick``: 5,000 touches and one sequential pass.

2. **Kernel swap**: a loop device with ``--direct-io=on`` over a file,
   ``mkswap`` + ``swapon``, a memory cgroup limited to 16 MiB + 8 MiB for the
   interpreter (v2 ``memory.max``/``memory.swap.max`` where the memory
   controller is on cgroup2, else v1 ``memory.limit_in_bytes``), the workload
   on anonymous memory (``mmap(-1)``) inside it: the child is a shell that
   writes its own pid to ``cgroup.procs`` and then execs Python, so the whole
   interpreter is charged.  Torn down in ``finally`` (processes left in the
   cgroup killed, cgroup removed, swapoff, loop device detached), with SIGINT
   and SIGTERM held off during the teardown.  Skipped, with the reason in the
   result, when the machine cannot (not root, no memory controller, no
   losetup/mkswap/swapon, swapon refused).

3. **pyhv**: per workload a fresh system (``pyhv up --detach``): a 16 MiB
   pool, one 64 MiB partition, one paging service, its device a loop device
   with ``--direct-io=on`` over a file in the same directory; the workload
   attached with ``pyhv.attach()`` and started with ``pyhv run``; then
   ``pyhv shutdown``.  Nothing is pinned, on either side.

4. **C floor**: ``pyhv.uffd.bench_uffd_touch`` with handler and toucher on
   CPU 0: first touch (UFFDIO_ZEROPAGE) and page-in (pread of the page's
   slot from an O_DIRECT file, then UFFDIO_COPY); median and p99 per fault.
   The table's per-workload "C floor" is an estimate: the page-ins pyhv did
   in the touch phase times the C page-in median (first touches times the
   zeropage median): what the same faults would cost with no policy, no
   paging-service hop and no write-back.

5. **Dataset** (``pyhv.bench_dataset``): a seeded ragged dataset built with
   mmap-ninja's ``RaggedMmap`` (float32 samples of 4-64 KiB, 48 MiB in all;
   quick: 24 MiB), then two epochs of shuffled batches of 32 samples with a
   small computation a sample, checked against the files: under pyhv
   (``pyhv.array``), under pyhv with ``pyhv.prefetch`` of the next batch,
   on anonymous memory in the kernel swap's cgroup, and read straight from
   the files in that cgroup (as they are, and after ``MADV_RANDOM``).  The
   ``dataset`` row is pyhv against kernel swap; the other modes are in
   lines of their own below the table.  It runs last (after ``--scale``):
   its files modes read the most, and disturb what follows.

6. **NBD** (``pyhv.bench_nbd``): the random and sequential workloads with
   the partition's device local (the loop device above) and on nbdkit
   serving its image file from a network namespace, at 0, 100 µs and 1 ms
   of added latency; every page read back and checked.  In full runs and
   ``only``, not in ``quick`` (nor is ``lifecycle``, ``pyhv.bench_lifecycle``).

``only``: the workloads named (of ``NAMES``), the C floor always; the kernel
swap is set up only for workloads that use it.

Every touch is timed on its own as well (``perf_counter_ns`` around it, on
both sides alike; the workload's time is the whole loop, these included).
The CDF plots these per-touch latencies of the random workload.  "Page-in
fault" p50/p99 are the slowest K touches of a run, K = the page-ins of its
touch phase (pyhv: the partition's ``page_ins`` counter; kernel: the
process's major faults, ``ru_majflt``): an attribution, not a per-fault
measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from pyhv._spawn import module_command

PAGE = 4096
MiB = 1 << 20
MEMORY = 64 * MiB  # the workload's memory: 16,384 pages
POOL = 16 * MiB  # pyhv's pool, and the kernel cgroup's share for data
INTERPRETER = 8 * MiB  # the cgroup's allowance for the Python interpreter
DEVICE = 2 * MEMORY  # the paging device, the same size for both: kernel swap and pyhv
WORKLOADS = ("random", "sequential", "scattered", "zipf")
DATASET = 48 * MiB  # the dataset workload's samples in all (quick: half), pyhv.bench_dataset
NAMES = (*WORKLOADS, "dataset", "lifecycle", "nbd")  # what --only may name
NOT_QUICK = ("lifecycle", "nbd")  # in full runs and --only, not in --quick
ROWS = ("fill", *NAMES)  # fill: the random workload's first write of every page
SEED = 5
CGROUP_PREFIX = "pyhv-bench-"
ZIPF_S = 1.0


def params(quick: bool) -> dict:
    """The workload sizes of a run."""
    return {"touches": 5000 if quick else 20000, "passes": 1 if quick else 2,
            "memory": MEMORY, "seed": SEED, "dataset_bytes": DATASET // 2 if quick else DATASET,
            "epochs": 2, "batch": 32}  # fmt: skip


# =====================================================================================
# The workload program (a child process): python -m pyhv.benchmark workload NAME ...
# =====================================================================================


def _offsets(name: str, npages: int, touches: int, passes: int, seed: int) -> list[int]:
    """Byte offsets of the touches, computed before the timed phase."""
    rng = random.Random(seed)
    if name in ("sequential", "scattered"):
        return [p * PAGE + (p % PAGE) for _ in range(passes) for p in range(npages)]
    if name == "random":
        pages = [rng.randrange(npages) for _ in range(touches)]
    elif name == "zipf":
        order = list(range(npages))
        rng.shuffle(order)  # rank r -> page order[r]: hot pages scattered
        cum, acc = [], 0.0
        for r in range(1, npages + 1):
            acc += 1.0 / r**ZIPF_S
            cum.append(acc)
        ranks = rng.choices(range(npages), cum_weights=cum, k=touches)
        pages = [order[r] for r in ranks]
    else:
        raise ValueError(f"unknown workload {name!r}")
    return [p * PAGE + rng.randrange(PAGE) for p in pages]


def _ctxt() -> int:
    """Context switches of the whole machine so far (/proc/stat ctxt)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("ctxt "):
                return int(line.split()[1])
    return 0


def _resident_of(buf) -> int:
    """Bytes of buf resident now (mincore): how much of the data the kernel
    holds in memory."""
    from pyhv import uffd

    addr = uffd.address_of(buf)
    return sum(b & 1 for b in uffd.in_memory(addr, len(buf))) * PAGE


def _pyhv_counters() -> dict:
    from pyhv import wire

    path = os.path.join(os.environ["PYHV_RUN_DIR"], "control.sock")
    st = wire.request(path, {"op": "status"})
    part = next(p for p in st["partitions"] if p["name"] == os.environ["PYHV_PARTITION"])
    keys = ("faults", "first_touches", "page_ins", "page_outs", "clean_drops", "wp_faults",
            "minor_faults", "prefetched", "advised", "io_errors", "machine_checks",
            "resident_pages")  # fmt: skip
    out = {k: part.get(k, 0) for k in keys}
    # the fault engine's, of the whole pool (one partition in the bench's systems): READs sent
    # and answered, their round trips summed, faults that waited for a page-in and how long
    eng = st["pool"].get("engine", {})
    out.update({k: eng.get(k, 0) for k in ENGINE_KEYS})
    return out


ENGINE_KEYS = ("reads_sent", "reads_done", "read_rtt_ns", "page_in_waits", "page_in_wait_ns")


def _expected(offs: list[int], extra: list[int]) -> dict[int, dict[int, int]]:
    """What the touches (and the scattered workload's writes) add to each byte
    they touch, by page: {page: {offset: increments}}."""
    out: dict[int, dict[int, int]] = {}
    for off in (*extra, *offs):
        d = out.setdefault(off // PAGE, {})
        d[off] = d.get(off, 0) + 1
    return out


def _verify(view, npages: int, touched: dict[int, dict[int, int]]) -> tuple[int, int]:
    """Every page read back in page order (not timed): its first byte as the
    fill wrote it and every byte the touches incremented, each incremented as
    often as it was touched.  (pages verified, pages that did not match)"""
    bad = 0
    for p in range(npages):
        want = {p * PAGE: (p % 255) + 1}
        for off, n in touched.get(p, {}).items():
            want[off] = (want.get(off, 0) + n) & 0xFF
        bad += any(view[off] != v for off, v in want.items())
    return npages, bad


def _cgroup_charge() -> int | None:
    """What this process's memory cgroup is charged now (KernelSwap.run names
    the file in PYHV_BENCH_CGROUP_USAGE), or None outside one."""
    with contextlib.suppress(KeyError, OSError, ValueError):
        with open(os.environ["PYHV_BENCH_CGROUP_USAGE"]) as f:
            return int(f.read())
    return None


def workload_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyhv.benchmark workload")
    ap.add_argument("name", choices=NAMES)
    ap.add_argument("--mode", choices=["anon", "pyhv", "prefetch", "files", "files-random"],
                    default="anon", help="anon: mmap(-1) (kernel swap); pyhv: pyhv.attach(); "
                    "dataset only: prefetch (pyhv, and pyhv.prefetch a batch ahead), files, "
                    "files-random (pyhv.bench_dataset)")  # fmt: skip
    ap.add_argument("--memory", type=int, default=MEMORY)
    ap.add_argument("--touches", type=int, default=20000)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--samples", action="store_true", help="print every touch's latency (ns)")
    ap.add_argument("--verify", action="store_true",
                    help="then read every page back and check what the fill and touches wrote")
    ap.add_argument("--data", help="dataset: the directory pyhv.bench_dataset.make filled")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    if args.name == "dataset":
        from pyhv import bench_dataset

        return bench_dataset.main(args)
    if args.mode not in ("anon", "pyhv"):
        ap.error(f"--mode {args.mode} is for the dataset workload")

    import mmap
    import resource

    if args.mode == "pyhv":
        import pyhv

        mem = pyhv.attach()
        size = len(mem)
    else:
        charge = _cgroup_charge()  # what the interpreter is charged before the data exists
        size = args.memory
        mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    npages = size // PAGE
    view = memoryview(mem)
    offs = _offsets(args.name, npages, args.touches, args.passes, args.seed)

    fill0 = _pyhv_counters() if args.mode == "pyhv" else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = _ctxt(), time.perf_counter_ns()
    for p in range(npages):  # write every page once (never zero: the kernel skips zero pages)
        view[p * PAGE] = (p % 255) + 1
    fill = {"seconds": (time.perf_counter_ns() - t0) / 1e9, "touches": npages,
            "ctxt": _ctxt() - c0}  # fmt: skip
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    fill["majflt"] = ru1.ru_majflt - ru0.ru_majflt
    if fill0 is not None:
        fill1 = _pyhv_counters()
        fill["counters"] = {k: fill1[k] - fill0[k] for k in fill1 if k != "resident_pages"}
    scatter = []
    if args.name == "scattered":  # random writes move the pages to scattered slots
        rng = random.Random(args.seed + 1)
        for _ in range(args.touches):
            off = rng.randrange(npages) * PAGE
            view[off] = (view[off] + 1) & 0xFF
            scatter.append(off)

    before = _pyhv_counters() if args.mode == "pyhv" else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    ctxt0 = _ctxt()
    lat = [0] * len(offs)
    clock = time.perf_counter_ns
    t0 = clock()
    for i, off in enumerate(offs):
        s = clock()
        view[off] = (view[off] + 1) & 0xFF
        lat[i] = clock() - s
    seconds = (clock() - t0) / 1e9
    ctxt = _ctxt() - ctxt0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out = {"seconds": seconds, "touches": len(offs), "workload": args.name, "mode": args.mode,
           "pages": npages, "majflt": ru1.ru_majflt - ru0.ru_majflt,
           "minflt": ru1.ru_minflt - ru0.ru_minflt, "ctxt": ctxt, "fill": fill,
           "maxrss_kib": ru1.ru_maxrss}  # fmt: skip
    if args.mode == "anon":
        out["interpreter_charge_bytes"] = charge
        out["data_resident_bytes"] = _resident_of(mem)
    if before is not None:
        after = _pyhv_counters()
        out["counters"] = {k: after[k] - before[k] for k in after if k != "resident_pages"}
        out["counters"]["resident_pages"] = after["resident_pages"]
        out["data_resident_bytes"] = after["resident_pages"] * PAGE
    out["page_ins"] = out["counters"]["page_ins"] if before is not None else out["majflt"]
    out["ctxt_per_miss"] = round(ctxt / out["page_ins"], 2) if out["page_ins"] else None
    out.update(_latency_summary(lat, out["page_ins"]))
    if args.samples:
        out["samples_ns"] = lat
    if args.verify:
        out["verified"], out["mismatches"] = _verify(view, npages, _expected(offs, scatter))
    view.release()
    if args.mode == "pyhv":
        pyhv.detach(mem)
    else:
        mem.close()
    print(json.dumps(out), flush=True)
    return 0


def _pct(sorted_values: list, q: float):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _latency_summary(lat_ns: list[int], page_ins: int) -> dict:
    s = sorted(lat_ns)
    out = {"touch_p50_us": _us(_pct(s, 0.5)), "touch_p99_us": _us(_pct(s, 0.99))}
    k = min(max(0, page_ins), len(s))
    if k:
        slow = s[len(s) - k:]
        out.update(fault_p50_us=_us(_pct(slow, 0.5)), fault_p99_us=_us(_pct(slow, 0.99)),
                   fault_samples=k)  # fmt: skip
    return out


def _us(ns):
    return None if ns is None else round(ns / 1000, 2)


# =====================================================================================
# Helpers of the parent
# =====================================================================================


class BenchError(RuntimeError):
    pass


def _sh(*cmd: str, timeout: float = 60) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout.strip()


@contextlib.contextmanager
def _no_interrupts():
    """Hold SIGINT and SIGTERM off (teardown must finish); delivered after."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (ValueError, OSError):
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt (so every finally runs)."""
    try:
        prev = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _workload_cmd(name: str, mode: str, p: dict, samples: bool) -> list[str]:
    if name == "dataset":
        sizes = ["--data", p["data"], "--epochs", str(p["epochs"]), "--batch", str(p["batch"])]
    else:
        sizes = ["--memory", str(p["memory"]), "--touches", str(p["touches"]),
                 "--passes", str(p["passes"])]  # fmt: skip
    cmd = module_command("pyhv.benchmark", "workload", name, "--mode", mode, *sizes,
                         "--seed", str(p["seed"]))  # fmt: skip
    if samples:
        cmd.append("--samples")
    if p.get("verify"):
        cmd.append("--verify")
    return cmd


def _parse_workload(r: subprocess.CompletedProcess, what: str) -> dict:
    if r.returncode != 0:
        raise BenchError(f"{what}: exit status {r.returncode}: {r.stderr.strip()[-2000:]}")
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"{what}: no JSON result on stdout: {r.stdout[-500:]!r}")


class LoopDevice:
    """A loop device with direct I/O over a preallocated (or sparse) file."""

    def __init__(self, path: str, size: int, sparse: bool = False):
        self.file = path
        self.dev: str | None = None
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if sparse:
                os.ftruncate(fd, size)
            else:
                os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        self.dev = _sh("losetup", "--find", "--show", "--direct-io=on", path)
        info = _sh("losetup", "--list", "--noheadings", "--output", "DIO", self.dev)
        self.direct_io = info.strip() == "1"

    def close(self) -> None:
        if self.dev:
            dev, self.dev = self.dev, None
            for _ in range(50):  # EBUSY for a moment after the last close
                r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise BenchError(f"losetup -d {dev}: {r.stderr.strip()}")
        with contextlib.suppress(OSError):
            os.unlink(self.file)


# --- the kernel swap baseline ---------------------------------------------------------


def _mounts() -> list[tuple[str, str, str]]:
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype, opts = line.split()[:4]
            out.append((mnt, fstype, opts))
    return out


def _memory_cgroup_root() -> tuple[str, str] | None:
    """("v2", path) where cgroup2 has the memory controller, else ("v1", path)."""
    mounts = _mounts()
    for mnt, fstype, _ in mounts:
        if fstype == "cgroup2":
            with contextlib.suppress(OSError):
                with open(os.path.join(mnt, "cgroup.controllers")) as f:
                    if "memory" in f.read().split():
                        return "v2", mnt
    for mnt, fstype, opts in mounts:
        if fstype == "cgroup" and "memory" in opts.split(","):
            return "v1", mnt
    return None


def kernel_swap_unavailable() -> str | None:
    """Why this machine cannot run the kernel swap baseline (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (swapon, losetup and a memory cgroup)"
    for tool in ("losetup", "mkswap", "swapon", "swapoff", "sh"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    root = _memory_cgroup_root()
    if root is None:
        return "no cgroup memory controller is mounted (neither cgroup2 with memory nor v1)"
    if not os.access(root[1], os.W_OK):
        return f"cannot create a cgroup under {root[1]}"
    return None


class KernelSwap:
    """Swap on a loop device (direct I/O) plus a memory cgroup; ``close()``
    undoes everything it did, in reverse."""

    def __init__(self, tmpdir: str, data_limit: int = POOL, interpreter: int = INTERPRETER):
        self.loop: LoopDevice | None = None
        self.swap_on = False
        self.cgroup: str | None = None
        self.info: dict = {}
        reason = kernel_swap_unavailable()
        if reason:
            raise BenchError(reason)
        version, root = _memory_cgroup_root()
        other = _sh("swapon", "--show=NAME", "--noheadings")
        try:
            self.loop = LoopDevice(os.path.join(tmpdir, "swap.img"), DEVICE)
            _sh("mkswap", self.loop.dev)
            _sh("swapon", self.loop.dev)
            self.swap_on = True
            self.cgroup = tempfile.mkdtemp(prefix=CGROUP_PREFIX, dir=root)
            limit = data_limit + interpreter
            if version == "v2":
                self._write("memory.max", str(limit))
                self._write("memory.swap.max", "max")
            else:
                self._write("memory.limit_in_bytes", str(limit))
            self.info = {
                "cgroup": self.cgroup, "cgroup_version": version, "limit_bytes": limit,
                "swap_device": self.loop.dev, "direct_io": self.loop.direct_io,
                "swap_size_bytes": DEVICE, "other_swap": other.split() if other else [],
                "page_cluster": _read_int("/proc/sys/vm/page-cluster"),
                "swappiness": _read_int(os.path.join(self.cgroup, "memory.swappiness"))
                if version == "v1" else _read_int("/proc/sys/vm/swappiness"),
            }  # fmt: skip
        except BaseException:
            with _no_interrupts():
                self.close()
            raise

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.cgroup, name), "w") as f:
            f.write(value)

    def run(self, name: str, p: dict, samples: bool = False, timeout: float = 600,
            mode: str = "anon") -> dict:  # fmt: skip
        procs = os.path.join(self.cgroup, "cgroup.procs")
        # The shell joins the cgroup, then becomes Python: the interpreter is charged too.
        cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs,
               *_workload_cmd(name, mode, p, samples)]  # fmt: skip
        usage = "memory.usage_in_bytes" if self.info["cgroup_version"] == "v1" else "memory.current"
        env = dict(os.environ, PYHV_BENCH_CGROUP_USAGE=os.path.join(self.cgroup, usage))
        oom_kills = 0
        while True:
            vm0 = _vmstat()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            vm1 = _vmstat()
            # The memory cgroup's OOM killer now and then ends a workload that
            # swaps hard (reclaim not keeping up with the slow swap device):
            # the kernel's failure, tried once more, and said.
            if r.returncode != -signal.SIGKILL or oom_kills:
                break
            oom_kills += 1
        out = _parse_workload(r, f"kernel swap workload {name}"
                              + (" (OOM-killed in its memory cgroup, twice)" if oom_kills
                                 and r.returncode == -signal.SIGKILL else ""))  # fmt: skip
        out["oom_kills"] = oom_kills
        out["pswpin"] = vm1.get("pswpin", 0) - vm0.get("pswpin", 0)
        out["pswpout"] = vm1.get("pswpout", 0) - vm0.get("pswpout", 0)
        peak = "memory.max_usage_in_bytes" if self.info["cgroup_version"] == "v1" else "memory.peak"
        out["cgroup_peak_bytes"] = _read_int(os.path.join(self.cgroup, peak))
        if self.info["cgroup_version"] == "v1":
            with contextlib.suppress(OSError):
                self._write("memory.max_usage_in_bytes", "0")  # reset for the next run
        return out

    def close(self) -> None:
        """Undo everything; every step is tried, the first error is raised."""
        errors = []
        if self.cgroup:
            try:
                _kill_cgroup(self.cgroup)
                self.cgroup = None
            except OSError as e:
                errors.append(e)
        if self.swap_on:
            try:
                _sh("swapoff", self.loop.dev, timeout=120)
                self.swap_on = False
            except (BenchError, subprocess.TimeoutExpired) as e:
                errors.append(e)
        if self.loop and not self.swap_on:
            try:
                self.loop.close()
                self.loop = None
            except BenchError as e:
                errors.append(e)
        if errors:
            raise BenchError(f"kernel swap teardown: {errors[0]}")


def _kill_cgroup(path: str) -> None:
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            with contextlib.suppress(OSError):
                with open(os.path.join(path, "cgroup.procs")) as f:
                    for pid in f.read().split():  # only our workload can be in there
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.05)
    os.rmdir(path)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _vmstat() -> dict:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            out[k] = int(v)
    return out


# --- pyhv ----------------------------------------------------------------------------


def _pyhv(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(module_command("pyhv", *args), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def alive(pid: int) -> bool:
    """pid runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def shutdown_or_kill(run_dir: str, pids: list[int], timeout: float = 60,
                     grace: float = 10) -> bool:  # fmt: skip
    """`pyhv shutdown`, then wait up to `grace` for pids to end; SIGKILL any
    left (or all, when shutdown failed).  True when shutdown was clean."""
    try:
        ok = _pyhv("shutdown", "--run-dir", run_dir, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    deadline = time.monotonic() + (grace if ok else 0)
    for pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            ok = False
    return ok


class PyhvSystem:
    """A pyhv system on a block device: one pool, one service, one partition p1."""

    def __init__(self, run_dir: str, device: str, pool: int = POOL, memory: int = MEMORY):
        self.run_dir = run_dir
        self.pids: list[int] = []
        os.makedirs(run_dir, exist_ok=True)
        self.config = os.path.join(run_dir, "cfg.toml")
        with open(self.config, "w") as f:
            f.write(f'[pool]\nsize = {pool}\n\n[[paging_service]]\nname = "vios1"\n\n'
                    f'[[device]]\nid = "loop"\npath = "{device}"\n\n'
                    f'[[partition]]\nname = "p1"\nmemory = {memory}\npaging = ["vios1"]\n'
                    'device = "loop"\n')  # fmt: skip

    def up(self) -> None:
        r = _pyhv("up", "-c", self.config, "--run-dir", self.run_dir, "--detach")
        self._collect_pids()
        if r.returncode != 0:
            raise BenchError(f"pyhv up failed ({r.returncode}): {r.stderr.strip()}\n{self.log()}")

    def _collect_pids(self) -> None:
        r = _pyhv("status", "--run-dir", self.run_dir, "--json")
        if r.returncode == 0:
            st = json.loads(r.stdout)
            self.pids = [st["pid"]] + [s["pid"] for s in st["paging_services"] if s.get("pid")]
        else:
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(self.run_dir, "hypervisor.pid")) as f:
                    self.pids = [int(f.read())]

    def log(self) -> str:
        try:
            with open(os.path.join(self.run_dir, "hypervisor.log")) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def hypervisor_rss(self) -> int | None:
        """The hypervisor's resident memory now (its page tables; the
        partitions' memory is a memfd it never touches), bytes."""
        try:
            with open(os.path.join(self.run_dir, "hypervisor.pid")) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return None

    def run(self, name: str, p: dict, samples: bool = False, timeout: float = 600,
            mode: str = "pyhv") -> dict:  # fmt: skip
        cmd = ["run", "--run-dir", self.run_dir, "--partition", "p1", "--",
               *_workload_cmd(name, mode, p, samples)]  # fmt: skip
        r = _pyhv(*cmd, timeout=timeout)
        return _parse_workload(r, f"pyhv workload {name}")

    def shutdown(self) -> None:
        """Stop the system; SIGKILL its processes (by pid) if shutdown fails."""
        if not self.pids:
            self._collect_pids()
        if not shutdown_or_kill(self.run_dir, self.pids):
            raise BenchError(f"pyhv shutdown failed; killed {self.pids}\n{self.log()}")


def run_pyhv_workload(device: str, run_dir: str, name: str, p: dict,
                      samples: bool = False, mode: str = "pyhv") -> dict:  # fmt: skip
    """One workload on a fresh pyhv system on device; always shut down."""
    system = PyhvSystem(run_dir, device)
    try:
        system.up()
        out = system.run(name, p, samples, mode=mode)
    finally:
        with _no_interrupts():
            system.shutdown()
    return out


SCALE_MEMORY = 16 << 30  # the scale run: a 16 GiB partition ...
SCALE_POOL = 1 << 30  # ... in a 1 GiB pool, on a sparse device


def run_scale(tmpdir: str, p: dict, memory: int = SCALE_MEMORY, pool: int = SCALE_POOL) -> dict:
    """pyhv alone at scale: the fill and random workloads of a partition of
    `memory` in a pool of `pool`, its device a loop device over a sparse
    file; per-page costs, and what the hypervisor holds (metadata and RSS)."""
    loop = LoopDevice(os.path.join(tmpdir, "scale.img"), memory, sparse=True)
    run_dir = os.path.join(tmpdir, "run-scale")
    system = PyhvSystem(run_dir, loop.dev, pool=pool, memory=memory)
    try:
        system.up()
        r = system.run("random", {**p, "memory": memory}, timeout=3600)
        st = json.loads(_pyhv("status", "--run-dir", run_dir, "--json").stdout)
        part = st["partitions"][0]
        r["hypervisor_rss_bytes"] = system.hypervisor_rss()
        r["metadata_bytes_per_page"] = part["metadata_bytes_per_page"]
    finally:
        with _no_interrupts():
            try:
                system.shutdown()
            finally:
                loop.close()
    pages = memory // PAGE
    return {"memory_bytes": memory, "pool_bytes": pool, "pages": pages,
            "fill_us_per_page": round(r["fill"]["seconds"] / pages * 1e6, 2),
            "random_us_per_touch": round(r["seconds"] / r["touches"] * 1e6, 2),
            "hypervisor_rss_bytes": r["hypervisor_rss_bytes"],
            "hypervisor_rss_bytes_per_page": round((r["hypervisor_rss_bytes"] or 0) / pages, 2),
            "metadata_bytes_per_page": r["metadata_bytes_per_page"], "pyhv": r}  # fmt: skip


# --- the C floor -------------------------------------------------------------------------


def c_floor(tmpdir: str, npages: int = 3000, cpu: int = 0) -> dict:
    """Per-fault ns of a minimal C uffd handler: zeropage, and pread (O_DIRECT) + COPY."""
    from pyhv import uffd

    if cpu >= (os.cpu_count() or 1):
        cpu = -1
    path = os.path.join(tmpdir, "c-floor.img")
    with open(path, "wb") as f:
        f.write(os.urandom(16 * MiB))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        kw = {"shared": True, "handler_cpu": cpu, "toucher_cpu": cpu}
        uffd.bench_uffd_touch(200, zeropage=True, **kw)  # warm-ups, discarded
        zero = uffd.bench_uffd_touch(npages, zeropage=True, **kw)
        uffd.bench_uffd_touch(200, zeropage=False, devfd=fd, **kw)
        page_in = uffd.bench_uffd_touch(npages, zeropage=False, devfd=fd, **kw)
    finally:
        os.close(fd)
        os.unlink(path)
    return {"cpu": cpu, "first_touch_ns": zero, "page_in_ns": page_in}


def _summary_us(ns: list[int]) -> dict:
    s = sorted(ns)
    return {"p50_us": _us(_pct(s, 0.5)), "p99_us": _us(_pct(s, 0.99)), "samples": len(s)}


def _downsample(values_ns: list[int], points: int = 2000) -> list[float]:
    """Sorted values in µs, at most ``points`` quantiles (for the CDF)."""
    s = sorted(values_ns)
    if len(s) > points:
        s = [s[int(i * (len(s) - 1) / (points - 1))] for i in range(points)]
    return [round(v / 1000, 3) for v in s]


# =====================================================================================
# The standard comparison
# =====================================================================================


def run(quick: bool = False, json_file: str | None = None, plot_file: str | None = None,
        progress: bool = True, scale: bool = False,
        only: list[str] | None = None) -> dict:  # fmt: skip
    """Run the whole comparison (or the workloads `only` names, of NAMES);
    returns the result dict (see format_table)."""
    from pyhv import bench_dataset, bench_nbd
    from pyhv.progress import Progress

    if plot_file:
        _need_matplotlib()  # fail before minutes of measuring, not after
    names = [n for n in NAMES if (n in only if only else not (quick and n in NOT_QUICK))]
    if only and (set(only) - set(NAMES) or not names):
        raise BenchError(f"--only: choose among {', '.join(NAMES)}")
    no_dataset = bench_dataset.unavailable() if "dataset" in names else None
    if no_dataset and only:
        raise BenchError(f"the dataset workload {no_dataset}")
    no_nbd = bench_nbd.unavailable() if "nbd" in names else None
    if no_nbd and only:
        raise BenchError(f"the nbd rows: {no_nbd}")
    workloads = [n for n in names if n in WORKLOADS]
    p = params(quick)
    steps = (2 + 2 * len(workloads) + 1 + (1 if plot_file else 0) + (1 if scale else 0)
             + (1 + len(bench_dataset.MODES) if "dataset" in names else 0)
             + (1 if "lifecycle" in names else 0)
             + (bench_nbd.STEPS if "nbd" in names and not no_nbd else 0))  # fmt: skip
    bar = Progress("pyhv bench", steps, enabled=progress)
    started = time.time()
    result: dict = {
        "quick": quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "params": {**p, "pool_bytes": POOL, "cgroup_limit_bytes": POOL + INTERPRETER,
                   "zipf_exponent": ZIPF_S},
        "placement": "workloads unpinned on both sides; C floor handler and toucher on CPU 0",
        "workloads": {},
        "kernel_swap": {"available": False, "skipped": None},
        "errors": [],
    }  # fmt: skip
    samples: dict[str, list[int]] = {}
    tmpdir = tempfile.mkdtemp(prefix="pyhv-bench-", dir=_disk_tmp())
    kswap: KernelSwap | None = None
    loop: LoopDevice | None = None
    try:
        with _sigterm_as_interrupt():
            # C floor first: a quiet machine, no other system running.
            fl = c_floor(tmpdir, 1000 if quick else 3000)
            result["c_floor"] = {
                "cpu": fl["cpu"],
                "first_touch": _summary_us(fl["first_touch_ns"]),
                "page_in": _summary_us(fl["page_in_ns"]),
                "page_in_source": "pread of the page's slot from an O_DIRECT file on "
                                  f"{_fs_of(tmpdir)}, then UFFDIO_COPY",
            }  # fmt: skip
            samples["C floor page-in (pread O_DIRECT + COPY)"] = fl["page_in_ns"]
            samples["C floor first touch (ZEROPAGE)"] = fl["first_touch_ns"]
            bar.advance(1)

            if not workloads and "dataset" not in names:
                result["kernel_swap"] = {"available": False, "skipped": "not used by "
                                         + ", ".join(names)}  # fmt: skip
            else:
                try:
                    kswap = KernelSwap(tmpdir)
                    result["kernel_swap"] = {"available": True, "skipped": None, **kswap.info}
                except BenchError as e:
                    result["kernel_swap"] = {"available": False, "skipped": str(e)}
            loop = LoopDevice(os.path.join(tmpdir, "pyhv-dev.img"), DEVICE)
            result["pyhv_device"] = {"device": loop.dev, "direct_io": loop.direct_io,
                                     "size_bytes": DEVICE}  # fmt: skip
            bar.advance(1)

            for i, name in enumerate(workloads):
                row: dict = {"touches": None}
                want = name == "random"  # per-touch samples for the CDF
                if kswap:
                    try:
                        k = kswap.run(name, p, samples=want)
                        if want:
                            samples["kernel swap, random workload (per touch)"] = \
                                k.pop("samples_ns")
                        row["kernel_swap"] = k
                        row["touches"] = k["touches"]
                    except (BenchError, subprocess.TimeoutExpired) as e:
                        result["errors"].append(f"kernel swap {name}: {e}")
                bar.advance(1)
                try:
                    y = run_pyhv_workload(loop.dev, os.path.join(tmpdir, f"run-{i}"), name, p,
                                          samples=want)  # fmt: skip
                    if want:
                        samples["pyhv, random workload (per touch)"] = y.pop("samples_ns")
                    row["pyhv"] = y
                    row["touches"] = y["touches"]
                except (BenchError, subprocess.TimeoutExpired) as e:
                    result["errors"].append(f"pyhv {name}: {e}")
                bar.advance(1)
                result["workloads"][name] = _row(row, result["c_floor"])
                if name == "random":  # its first writes of every page: the fill row
                    fill = {side: row[side]["fill"] for side in ("pyhv", "kernel_swap")
                            if row.get(side)}  # fmt: skip
                    fill["touches"] = next((f["touches"] for f in fill.values()), None)
                    result["workloads"]["fill"] = _row(fill, result["c_floor"])
            if "nbd" in names and no_nbd:
                result["nbd"] = {"skipped": no_nbd}
            elif "nbd" in names:  # the device on an NBD server (pyhv.bench_nbd); before the
                # scale and dataset runs, which leave the disk busy behind them
                result["nbd"] = bench_nbd.run_nbd(tmpdir, p, loop, result["errors"], bar.advance)
            if scale:
                try:
                    sc = run_scale(tmpdir, p)
                    base = result["workloads"].get("random", {}).get("pyhv")
                    if base:  # against the 64 MiB run of the same bench
                        sc["fill_vs_small"] = round(sc["fill_us_per_page"] / (
                            base["fill"]["seconds"] / base["fill"]["touches"] * 1e6), 3)
                        sc["random_vs_small"] = round(sc["random_us_per_touch"] / (
                            base["seconds"] / base["touches"] * 1e6), 3)  # fmt: skip
                    result["scale"] = sc
                except (BenchError, subprocess.TimeoutExpired) as e:
                    result["errors"].append(f"pyhv scale: {e}")
                bar.advance(1)
            # the dataset last: its files modes read the most, and disturb what follows
            if "dataset" in names and no_dataset:
                result["dataset"] = {"skipped": no_dataset}
            elif "dataset" in names:
                result["dataset"] = run_dataset(tmpdir, p, kswap, loop.dev, result["errors"],
                                                bar.advance)  # fmt: skip
                modes = result["dataset"].get("modes", {})
                result["workloads"]["dataset"] = _row(
                    {"pyhv": modes.get("pyhv"), "kernel_swap": modes.get("anon"),
                     "touches": next((m["touches"] for m in modes.values()), None)},
                    result["c_floor"])  # fmt: skip
            result["workloads"] = {k: result["workloads"][k] for k in ROWS
                                   if k in result["workloads"]}  # fmt: skip
            if "lifecycle" in names:  # (suspend, resume, snapshots: pyhv.bench_lifecycle)
                from pyhv.bench_lifecycle import run_lifecycle

                try:
                    result["lifecycle"] = run_lifecycle(tmpdir)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                    result["lifecycle"] = {"error": str(e).splitlines()[0]}
                    result["errors"].append(f"lifecycle: {e}")
                bar.advance(1)

            result["fault_latency"] = {
                label: _summary_us(v) for label, v in samples.items()
            }
            result["cdf_us"] = {label: _downsample(v) for label, v in samples.items()}
    finally:
        with _no_interrupts():
            errors = []
            for thing in (kswap, loop):
                if thing is not None:
                    try:
                        thing.close()
                    except BenchError as e:
                        errors.append(str(e))
            shutil.rmtree(tmpdir, ignore_errors=True)
            result["errors"].extend(errors)
    bar.advance(1)
    result["elapsed_s"] = round(time.time() - started, 1)
    if plot_file:
        plot(result, plot_file)
        result["plot_file"] = plot_file
        bar.advance(1)
    bar.close()
    if json_file:
        with open(json_file, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


def run_dataset(tmpdir: str, p: dict, kswap: KernelSwap | None, device: str, errors: list,
                advance) -> dict:  # fmt: skip
    """The dataset workload (pyhv.bench_dataset): generate the dataset and
    its reference results, then run it on kernel swap and on the files in
    the memory cgroup, and on pyhv without and with prefetch; a mode that
    fails, or whose results differ from the files', is an error."""
    from pyhv import bench_dataset as ds

    data = os.path.join(tmpdir, "dataset")
    try:
        info = ds.make(data, p["dataset_bytes"], p["seed"])
    except (OSError, ValueError) as e:
        errors.append(f"dataset: generating it: {e}")
        advance(1 + len(ds.MODES))
        return {"skipped": f"could not be generated: {e}"}
    advance(1)
    q = {**p, "data": data}
    out = {"info": info, "epochs": p["epochs"], "batch": p["batch"],
           "computation": ds.COMPUTATION, "modes": {}, "failed": {}}  # fmt: skip
    for mode in ds.MODES:
        what = f"dataset {ds.LABELS[mode]}"
        try:
            if mode in ("anon", *ds.FILES):
                if kswap is None:  # (the reason is in result["kernel_swap"])
                    continue
                r = kswap.run("dataset", q, mode=mode)
            else:
                r = run_pyhv_workload(device, os.path.join(tmpdir, f"run-dataset-{mode}"),
                                      "dataset", q, mode=mode)  # fmt: skip
        except (BenchError, subprocess.TimeoutExpired) as e:
            errors.append(f"{what}: {e}")
            continue
        finally:
            advance(1)
        try:
            ds.check(r, info, p["epochs"])
            out["modes"][mode] = r
        except ValueError as e:  # an error row, shown with its mismatches
            out["failed"][mode] = r
            errors.append(f"{what}: {e}")
    out.update(ds.summary(out["modes"]))
    shutil.rmtree(data, ignore_errors=True)
    return out


def _row(row: dict, floor: dict) -> dict:
    y, k = row.get("pyhv"), row.get("kernel_swap")
    out = {
        "touches": row["touches"],
        "pyhv_s": round(y["seconds"], 4) if y else None,
        "kernel_swap_s": round(k["seconds"], 4) if k else None,
        "ratio": round(y["seconds"] / k["seconds"], 3) if y and k and k["seconds"] else None,
        "c_floor_s": None,
        "pyhv": y,
        "kernel_swap": k,
    }
    for side, s in (("pyhv", y), ("kernel_swap", k)):
        if s and s.get("ctxt") is not None:
            misses = s.get("page_ins") or s.get("majflt") or 0
            if "page_ins" not in s:  # the fill: every page is a fault
                misses = s["touches"]
            out[f"{side}_ctxt_per_miss"] = round(s["ctxt"] / misses, 2) if misses else None
    if y and "counters" in y:
        c = y["counters"]
        est = (c["page_ins"] * floor["page_in"]["p50_us"]
               + c["first_touches"] * floor["first_touch"]["p50_us"]) / 1e6  # fmt: skip
        out["c_floor_s"] = round(est, 4)
    return out


def _disk_tmp() -> str | None:
    """A temp dir on a real disk (loop direct I/O and O_DIRECT want one, not tmpfs)."""
    base = tempfile.gettempdir()
    if _fs_of(base) == "tmpfs" and os.path.isdir("/var/tmp") and _fs_of("/var/tmp") != "tmpfs":
        return "/var/tmp"
    return base


def _fs_of(path: str) -> str:
    path = os.path.realpath(path)
    best, fstype = "", "?"
    for mnt, fs, _ in _mounts():
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, fs
    return fstype


# --- output ---------------------------------------------------------------------------


def _fmt_s(v) -> str:
    return "-" if v is None else f"{v:.3f} s"


def format_table(result: dict) -> str:
    """The table: workload, pyhv, kernel swap, ratio, C floor; then fault figures."""
    p = result["params"]
    sizes = (f"{p['memory'] // MiB} MiB per workload" if set(result["workloads"]) - {"dataset"}
             else "the dataset workload")  # fmt: skip
    table = bool(result["workloads"])  # (not with --only lifecycle or nbd alone)
    lines = [
        f"pyhv bench{' --quick' if result['quick'] else ''}: {sizes}, pyhv pool "
        f"{p['pool_bytes'] // MiB} MiB vs kernel swap in a {p['cgroup_limit_bytes'] // MiB} MiB "
        "memory cgroup; loop devices, direct I/O",
        "",
        f"{'workload':<12}{'touches':>9}{'pyhv':>11}{'kernel swap':>13}{'ratio':>8}"
        f"{'C floor*':>11}{'ctxt/miss**':>14}",
    ] if table else [f"pyhv bench{' --quick' if result['quick'] else ''}: "
                     + ", ".join(n for n in ("nbd", "lifecycle") if n in result)]  # fmt: skip
    for name, w in result["workloads"].items():
        ratio = "-" if w["ratio"] is None else f"{w['ratio']:.2f}x"
        cs = "/".join("-" if w.get(f"{side}_ctxt_per_miss") is None
                      else f"{w[f'{side}_ctxt_per_miss']:.1f}"
                      for side in ("pyhv", "kernel_swap"))  # fmt: skip
        lines.append(f"{name:<12}{w['touches'] or '-':>9}{_fmt_s(w['pyhv_s']):>11}"
                     f"{_fmt_s(w['kernel_swap_s']):>13}{ratio:>8}{_fmt_s(w['c_floor_s']):>11}"
                     f"{cs:>14}")
    lines.append("")
    fl = result.get("c_floor")
    if fl:
        lines.append(f"C floor per fault (CPU {fl['cpu']}): first touch (ZEROPAGE) p50 "
                     f"{fl['first_touch']['p50_us']} us, p99 {fl['first_touch']['p99_us']} us;"
                     f" page-in (pread O_DIRECT + COPY) p50 {fl['page_in']['p50_us']} us, "
                     f"p99 {fl['page_in']['p99_us']} us")  # fmt: skip
    for side, label in (("pyhv", "pyhv"), ("kernel_swap", "kernel swap")):
        w = result["workloads"].get("random", {}).get(side)
        if w and w.get("fault_p50_us") is not None:
            lines.append(f"{label} page-in fault (random, slowest {w['fault_samples']} touches "
                         f"= page-ins): p50 {w['fault_p50_us']} us, p99 {w['fault_p99_us']} us")
    if table:
        lines.append("* C floor: the touch phase's page-ins (and first touches) under pyhv "
                     "times the C handler's median; no write-back.")  # fmt: skip
        lines.append("** context switches of the whole machine per page-in (fill: per page), "
                     "pyhv/kernel swap")  # fmt: skip
    ks = result["kernel_swap"]
    k = result["workloads"].get("random", {}).get("kernel_swap") or {}
    if k.get("interpreter_charge_bytes") is not None:
        lim = ks["limit_bytes"]
        lines.append(f"kernel cgroup: limit {lim / MiB:.0f} MiB, of which the interpreter was "
                     f"charged {k['interpreter_charge_bytes'] / MiB:.1f} MiB before the data: "
                     f"~{(lim - k['interpreter_charge_bytes']) / MiB:.1f} MiB for data "
                     f"(pyhv: {p['pool_bytes'] // MiB} MiB pool)")  # fmt: skip
    y = result["workloads"].get("random", {}).get("pyhv") or {}
    if k.get("data_resident_bytes") and y.get("data_resident_bytes"):
        lines.append(f"data in memory at the end of random: kernel swap "
                     f"{k['data_resident_bytes'] / MiB:.1f} MiB (it swaps the interpreter's "
                     f"cold pages out too), pyhv {y['data_resident_bytes'] / MiB:.1f} MiB")
    sc = result.get("scale")
    if sc:
        lines.append(f"scale: {sc['memory_bytes'] >> 30} GiB partition, {sc['pool_bytes'] >> 20} "
                     f"MiB pool, sparse device: fill {sc['fill_us_per_page']} us a page "
                     f"({sc.get('fill_vs_small', '-')}x the 64 MiB run), random "
                     f"{sc['random_us_per_touch']} us a touch ({sc.get('random_vs_small', '-')}x);"
                     f" hypervisor RSS {sc['hypervisor_rss_bytes_per_page']} B a page, "
                     f"page tables {sc['metadata_bytes_per_page']} B a page")  # fmt: skip
    if "dataset" in result:
        from pyhv import bench_dataset

        lines.extend(bench_dataset.format_block(result["dataset"], ks.get("limit_bytes")))
    if "nbd" in result:
        from pyhv import bench_nbd

        lines.extend(bench_nbd.format_lines(result["nbd"]))
    if "lifecycle" in result:
        from pyhv.bench_lifecycle import format_lines

        lines.extend(format_lines(result["lifecycle"]))
    if not ks.get("available") and table:
        lines.append(f"kernel swap skipped: {ks.get('skipped')}")
    for e in result.get("errors", []):
        lines.append(f"error: {e.splitlines()[0] if e else e}")
    if "elapsed_s" in result:
        lines.append(f"total {result['elapsed_s']} s")
    return "\n".join(lines)


def _need_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise BenchError("the plot needs matplotlib: pip install matplotlib "
                         "(or pip install 'pyhv[bench]')") from None  # fmt: skip
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour(label: str) -> str:
    if label.startswith("pyhv"):
        return "tab:blue"
    if label.startswith("kernel"):
        return "tab:orange"
    if "first touch" in label:
        return "tab:olive"
    return "tab:green"  # the C floor (page-in)


def plot(result: dict, path: str) -> None:
    """A PNG: CDF of fault latency (left), workload times side by side (right)."""
    plt = _need_matplotlib()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for label, xs in result.get("cdf_us", {}).items():
        if not xs:
            continue
        n = len(xs)
        ax1.plot(xs, [(i + 1) / n for i in range(n)], label=label, color=_colour(label),
                 linestyle="--" if label.startswith("C floor") else "-")  # fmt: skip
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (µs, log)")
    ax1.set_ylabel("fraction of touches / faults ≤ x")
    ax1.set_title("Fault latency CDF")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")

    names = list(result["workloads"])
    sides = [("pyhv_s", "pyhv"), ("kernel_swap_s", "kernel swap"), ("c_floor_s", "C floor (est.)")]
    width = 0.27
    for j, (key, label) in enumerate(sides):
        vals = [result["workloads"][n][key] or 0 for n in names]
        xs = [i + (j - 1) * width for i in range(len(names))]
        bars = ax2.bar(xs, vals, width, label=label, color=_colour(label))
        for b, v in zip(bars, vals):
            if v:
                ax2.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                             va="bottom", fontsize=7)  # fmt: skip
    for i, n in enumerate(names):
        r = result["workloads"][n]["ratio"]
        if r is not None:
            ax2.annotate(f"{r:.2f}x", (i, 0), xytext=(0, -28), textcoords="offset points",
                         ha="center", fontsize=8, color="dimgray")  # fmt: skip
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names)
    ax2.set_ylabel("touch phase (s)")
    ax2.set_title("Workload time (ratio = pyhv / kernel swap)")
    ax2.legend(fontsize=8)
    ax2.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"pyhv bench{' --quick' if result['quick'] else ''} — "
                 f"{result['machine']['kernel']}, {result['machine']['cpus']} CPUs, "
                 f"{result.get('started', '')}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "workload":
        return workload_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m pyhv.benchmark")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", dest="json_file")
    ap.add_argument("--plot", dest="plot_file")
    ap.add_argument("--scale", action="store_true")
    ap.add_argument("--only", type=lambda v: v.split(","), help=f"of {','.join(NAMES)}")
    args = ap.parse_args(argv)
    try:
        r = run(args.quick, args.json_file, args.plot_file, progress=True, scale=args.scale,
                only=args.only)  # fmt: skip
    except BenchError as e:
        print(f"pyhv bench: {e}", file=sys.stderr)
        return 1
    print(format_table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
