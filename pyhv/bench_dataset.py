"""The ``dataset`` workload of ``pyhv bench`` (issue 11, items 2 and 6): a
data loader over an mmap-ninja ragged dataset, as a program in a partition
would be one.

The bench generates the dataset (seeded) with
``mmap_ninja.ragged.RaggedMmap.from_generator`` in its temporary directory
on disk: float32 samples of varied 2-D shapes, 4-64 KiB each, several times
the pool in all; then it computes the reference result of every sample from
the files, through mmap-ninja's own ``RaggedMmap[i]``.

The workload program (``python -m pyhv.benchmark workload dataset --mode
MODE --data DIR ...``) reads the small index (starts, ends, shapes) into its
heap, loads the samples' flat data where MODE says (not timed, reported as
``load_seconds``), drops the data file's page cache (``posix_fadvise
DONTNEED``, after the parent's ``fsync``: every mode starts with none of the
file in memory), then runs the timed epochs: each epoch a seeded shuffle of
the samples in batches, and per sample a small computation (the sum of its
squares in float64).  Modes:

``pyhv``      the data copied into the partition's memory (``pyhv.array``);
``prefetch``  the same, and before it computes batch k it calls
              ``pyhv.prefetch`` for the byte range of every sample of batch
              k+1 (the next epoch's first batch too);
``anon``      the data in anonymous memory (``mmap(-1)``), the program in the
              kernel swap's memory cgroup;
``files``     the data read straight from the mmap-ninja files (the
              ``np.memmap`` that ``RaggedMmap`` opens), in the same cgroup:
              the page cache it reads is charged to it;
``files-random``  the same, after ``madvise(MADV_RANDOM)`` on that memmap:
              no read-around (the disk's read-ahead) on a fault, which is
              most of what ``files`` reads.

Every mode reaches a sample the same way, ``flat[start:end].reshape(shape)``
with the index in the heap; only where ``flat`` lives differs.  After the
epochs (not timed) each mode compares every sample's result of every epoch
with the reference, exactly: a mismatch fails the row.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import resource
import time

PAGE = 4096
MiB = 1 << 20
DTYPE = "float32"
SAMPLE_BYTES = (4 << 10, 64 << 10)  # a sample's size, about: 4-64 KiB
ROWS = (8, 128)  # a sample's first dimension
MODES = ("anon", "pyhv", "prefetch", "files-random", "files")  # the order they run in
LABELS = {"pyhv": "pyhv", "prefetch": "pyhv + prefetch", "anon": "kernel swap",
          "files-random": "files + MADV_RANDOM", "files": "mmap-ninja files"}  # fmt: skip
FILES = ("files", "files-random")  # (files last: with the disk's read-ahead it reads most)
COMPUTATION = "sum of squares in float64"


def unavailable() -> str | None:
    """Why this environment cannot run the dataset workload (None: it can)."""
    try:
        import mmap_ninja.ragged  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as e:
        return f"needs numpy and mmap-ninja ({e}): pip install 'pyhv[bench]'"
    return None


def samples_of(directory: str) -> str:
    return os.path.join(directory, "samples")


def reference_of(directory: str) -> str:
    return os.path.join(directory, "reference.npy")


def index_of(directory: str) -> str:
    """The RaggedMmap's index as one int64 array, a row a sample: start, end
    (in elements of the flat data), and the sample's 2-D shape."""
    return os.path.join(directory, "index.npy")


def data_of(directory: str) -> str:
    """The flat data file of the RaggedMmap (raw float32)."""
    return os.path.join(samples_of(directory), "data.ninja")


def sample_result(x) -> float:
    """The per-sample computation: the sum of the sample's squares, in float64."""
    import numpy as np

    return float(np.square(x, dtype=np.float64).sum())


def _generate(nbytes: int, seed: int):
    """Seeded float32 samples of varied 2-D shapes, at most nbytes in all."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = 0
    while True:
        elements = int(rng.integers(SAMPLE_BYTES[0] // 4, SAMPLE_BYTES[1] // 4 + 1))
        rows = int(rng.integers(ROWS[0], ROWS[1] + 1))
        shape = (rows, max(1, elements // rows))
        size = shape[0] * shape[1] * 4
        if total + size > nbytes:
            return
        total += size
        yield rng.standard_normal(shape, dtype=DTYPE)


def make(directory: str, nbytes: int, seed: int) -> dict:
    """Generate the dataset in directory (RaggedMmap in ``samples/``), write
    every file to disk (fsync: the workloads can then drop the page cache),
    and the reference result of every sample, computed on the files."""
    import numpy as np
    from mmap_ninja.ragged import RaggedMmap

    t0 = time.perf_counter()
    os.makedirs(directory, exist_ok=True)
    RaggedMmap.from_generator(samples_of(directory), _generate(nbytes, seed), batch_size=256)
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    generated = time.perf_counter() - t0
    rm = RaggedMmap(samples_of(directory))
    ref = np.array([sample_result(rm[i]) for i in range(len(rm))], dtype=np.float64)
    np.save(reference_of(directory), ref)
    shapes = np.array([rm.shapes[i] for i in range(len(rm))], dtype=np.int64)
    index = np.column_stack([rm.starts, rm.ends, shapes])
    if rm.memmap.dtype != DTYPE or (shapes.prod(axis=1) != rm.ends - rm.starts).any():
        raise ValueError("the RaggedMmap's index does not describe its samples")
    np.save(index_of(directory), index)
    sizes = (rm.ends - rm.starts) * rm.memmap.dtype.itemsize
    return {"samples": len(rm), "bytes": int(sizes.sum()), "sample_bytes_min": int(sizes.min()),
            "sample_bytes_max": int(sizes.max()), "dtype": rm.memmap.dtype.name, "seed": seed,
            "generate_seconds": round(generated, 3),
            "reference_seconds": round(time.perf_counter() - t0 - generated, 3)}  # fmt: skip


def check(out: dict, info: dict, epochs: int) -> None:
    """A workload's result that was not verified sample by sample against
    the files is no result: ValueError saying what is wrong."""
    want = info["samples"] * epochs
    if out.get("mismatches") or not out.get("verified") or out.get("touches") != want:
        raise ValueError(f"{out.get('mismatches')} of {want} sample results differ from the "
                         f"files' (verified {out.get('verified')}, {out.get('touches')} "
                         "samples read)")  # fmt: skip


# =====================================================================================
# The workload program (a child process)
# =====================================================================================


def _read_bytes() -> int:
    """Bytes this process had read from storage (/proc/self/io)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    return 0


def read_ahead_kb(path: str) -> int | None:
    """The read-ahead of the block device under path (its queue's
    read_ahead_kb), or None where there is none to see."""
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for queue in (os.path.join(dev, "queue"), os.path.join(os.path.realpath(dev), "..", "queue")):
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(queue, "read_ahead_kb")) as f:
                return int(f.read())
    return None


def _cached_pages(fd: int, size: int) -> int:
    """Pages of the file fd in the page cache now (mincore on a mapping of it)."""
    from pyhv import uffd

    if not size:
        return 0
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    try:
        return sum(b & 1 for b in uffd.in_memory(uffd.address_of(m, writable=False), size))
    finally:
        m.close()


def drop_cache(path: str) -> dict:
    """Drop the file's pages from the page cache (posix_fadvise DONTNEED);
    its pages in the cache before and after."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        before = _cached_pages(fd, size)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return {"before_drop": before, "after_drop": _cached_pages(fd, size),
                "file_pages": -(-size // PAGE), "read_ahead_kb": read_ahead_kb(path)}  # fmt: skip
    finally:
        os.close(fd)


def _index(mode: str, directory: str):
    """(starts, ends, shapes) in the heap, and the files' flat data: in the
    files modes from mmap-ninja's RaggedMmap; else from the same index saved
    by `make` (mmap-ninja's import alone is ~8 MiB, charged in the cgroup)."""
    import numpy as np

    if mode in FILES:
        from mmap_ninja.ragged import RaggedMmap

        rm = RaggedMmap(samples_of(directory))
        if mode == "files-random":
            rm.memmap._mmap.madvise(mmap.MADV_RANDOM)  # (np.memmap keeps its mmap there)
        shapes = [tuple(int(d) for d in rm.shapes[i]) for i in range(len(rm))]
        return rm.starts.tolist(), rm.ends.tolist(), shapes, rm.memmap
    index = np.load(index_of(directory))
    return (index[:, 0].tolist(), index[:, 1].tolist(),
            [tuple(s) for s in index[:, 2:].tolist()], None)  # fmt: skip


def _load(mode: str, path: str, total: int):
    """The flat data copied from the file where mode says: (array, what
    keeps its memory).  pread, not a mapping: a page mapped in this process
    would stay in the page cache when it is dropped."""
    import numpy as np

    itemsize = np.dtype(DTYPE).itemsize
    if mode == "anon":
        mem = mmap.mmap(-1, -(-total * itemsize // PAGE) * PAGE,
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # fmt: skip
        flat = np.frombuffer(mem, dtype=DTYPE, count=total)
    else:
        import pyhv

        mem = None
        flat = pyhv.array(total, DTYPE)
    step = MiB // itemsize
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in range(0, total, step):  # a MiB at a time: no copy of the whole in the heap
            chunk = os.pread(fd, min(step, total - i) * itemsize, i * itemsize)
            flat[i:i + step] = np.frombuffer(chunk, dtype=DTYPE)
    finally:
        os.close(fd)
    return flat, mem


def _batches(n: int, epochs: int, batch: int, seed: int) -> list[tuple[int, list[int]]]:
    """(epoch, sample indices) of every batch, in order: a seeded shuffle an epoch."""
    import numpy as np

    out = []
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(n).tolist()
        out.extend((e, order[i:i + batch]) for i in range(0, n, batch))
    return out


def main(args) -> int:
    """The dataset workload; prints one JSON line (see the module's docstring)."""
    import numpy as np

    from pyhv.benchmark import _cgroup_charge, _ctxt, _pyhv_counters, _resident_of, _summary_us

    starts, ends, shapes, files = _index(args.mode, args.data)
    n, itemsize = len(starts), np.dtype(DTYPE).itemsize
    batches = _batches(n, args.epochs, args.batch, args.seed)
    charge = _cgroup_charge()  # the interpreter, numpy and the index: before the data
    pyhv_mode = args.mode in ("pyhv", "prefetch")

    t0 = time.perf_counter()
    load0 = _pyhv_counters() if pyhv_mode else None
    flat, keep = (files, None) if files is not None else _load(args.mode, data_of(args.data),
                                                               ends[-1])  # fmt: skip
    load_s = time.perf_counter() - t0
    load1 = _pyhv_counters() if pyhv_mode else None
    cache = drop_cache(data_of(args.data))

    prefetch = None
    if args.mode == "prefetch":
        import pyhv

        prefetch = pyhv.prefetch
    ranges = [(s * itemsize, (e - s) * itemsize) for s, e in zip(starts, ends)]
    results = np.empty((args.epochs, n), dtype=np.float64)
    lat, calls = [], 0
    square, f64, clock = np.square, np.float64, time.perf_counter_ns
    before = _pyhv_counters() if pyhv_mode else None
    ru0, rb0 = resource.getrusage(resource.RUSAGE_SELF), _read_bytes()
    ctxt0 = _ctxt()
    t0 = clock()
    for k, (epoch, batch) in enumerate(batches):
        if prefetch and k + 1 < len(batches):
            for i in batches[k + 1][1]:
                prefetch(*ranges[i])
            calls += len(batches[k + 1][1])
        row = results[epoch]
        for i in batch:
            s = clock()
            row[i] = float(square(flat[starts[i]:ends[i]].reshape(shapes[i]), dtype=f64).sum())
            lat.append(clock() - s)
    seconds = (clock() - t0) / 1e9
    ctxt = _ctxt() - ctxt0
    ru1, rb1 = resource.getrusage(resource.RUSAGE_SELF), _read_bytes()

    out = {"workload": "dataset", "mode": args.mode, "seconds": seconds, "touches": len(lat),
           "samples": n, "epochs": args.epochs, "batch": args.batch,
           "bytes": ends[-1] * itemsize, "load_seconds": round(load_s, 4),
           "majflt": ru1.ru_majflt - ru0.ru_majflt, "minflt": ru1.ru_minflt - ru0.ru_minflt,
           "read_bytes": rb1 - rb0, "ctxt": ctxt, "maxrss_kib": ru1.ru_maxrss,
           "file_cache_pages": cache, "prefetch_calls": calls}  # fmt: skip
    out["sample_latency"] = _summary_us(lat)
    if pyhv_mode:
        after = _pyhv_counters()
        c = {k: after[k] - before[k] for k in after if k != "resident_pages"}
        c["resident_pages"] = after["resident_pages"]
        out["counters"] = c
        out["load_counters"] = {k: load1[k] - load0[k] for k in load1 if k != "resident_pages"}
        out["page_ins"] = c["page_ins"]
        # faults that found the page not in memory: each waited for a READ
        # (its own, or one on the way: read ahead or advised too late)
        out["waits"] = c["faults"] - c["minor_faults"] - c["wp_faults"] - c["first_touches"]
        out["data_resident_bytes"] = after["resident_pages"] * PAGE
    else:
        out["interpreter_charge_bytes"] = charge
        out["page_ins"] = out["waits"] = out["majflt"]  # faults that waited for I/O
        out["data_resident_bytes"] = _resident_of(keep) if keep is not None else (
            _cached_pages_of(data_of(args.data)))  # fmt: skip
    out["ctxt_per_miss"] = round(ctxt / out["waits"], 2) if out["waits"] else None

    # the check, not timed: every sample of every epoch against the files
    ref = np.load(reference_of(args.data))
    bad = int((results != ref[None, :]).sum()) if ref.shape == (n,) else args.epochs * n
    out.update(mismatches=bad, verified=bad == 0, checksum=float(results.sum()))
    print(json.dumps(out), flush=True)
    return 0


def _cached_pages_of(path: str) -> int:
    """Bytes of the file in the page cache now."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _cached_pages(fd, os.fstat(fd).st_size) * PAGE
    finally:
        os.close(fd)


# =====================================================================================
# The parent: the four modes, and what they show
# =====================================================================================


def summary(modes: dict) -> dict:
    """What prefetch saved against plain pyhv, and each mode against kernel swap."""
    out = {}
    y, pf, k = modes.get("pyhv"), modes.get("prefetch"), modes.get("anon")
    if y and pf:
        out["prefetch_saved"] = {
            "seconds": round(y["seconds"] - pf["seconds"], 4),
            "fraction": round(1 - pf["seconds"] / y["seconds"], 3) if y["seconds"] else None,
            "waits": y["waits"] - pf["waits"], "waits_without": y["waits"],
            "waits_with": pf["waits"], "advised": pf["counters"]["advised"],
        }  # fmt: skip
    if k and k["seconds"]:
        out["vs_kernel_swap"] = {m: round(r["seconds"] / k["seconds"], 3)
                                 for m, r in modes.items()}  # fmt: skip
    return out


def format_block(d: dict, cgroup_limit: int | None = None) -> list[str]:
    """The dataset lines of the table."""
    if d.get("skipped"):
        return [f"dataset skipped: {d['skipped']}"]
    info, modes = d["info"], {**d["modes"], **d.get("failed", {})}
    lines = [
        f"dataset: {info['samples']} samples of {info['sample_bytes_min'] / 1024:.0f}-"
        f"{info['sample_bytes_max'] / 1024:.0f} KiB ({info['dtype']}, 2-D), "
        f"{info['bytes'] / MiB:.1f} MiB (mmap-ninja RaggedMmap); {d['epochs']} epochs of "
        f"shuffled batches of {d['batch']}, {COMPUTATION} a sample, every result checked",
        f"  {'mode':<20}{'epochs':>10}{'vs swap':>9}{'pages read':>12}{'waited*':>9}"
        f"{'sample p50/p99':>18}{'load':>9}  verified",
    ]  # fmt: skip
    ratios = d.get("vs_kernel_swap", {})
    for mode in MODES:
        r = modes.get(mode)
        if not r:
            continue
        read = r["counters"]["page_ins"] if "counters" in r else (
            r.get("pswpin") if mode == "anon" else r["read_bytes"] // PAGE)  # fmt: skip
        ratio = f"{ratios[mode]:.2f}x" if mode in ratios else "-"
        lat = f"{r['sample_latency']['p50_us']:.0f}/{r['sample_latency']['p99_us']:.0f} us"
        ok = f"{r['touches']} ok" if r["verified"] else f"{r['mismatches']} BAD"
        load = "-" if mode in FILES else f"{r['load_seconds']:.3f} s"
        lines.append(f"  {LABELS[mode]:<20}{r['seconds']:>8.3f} s{ratio:>9}{read:>12}"
                     f"{r['waits']:>9}{lat:>18}{load:>9}  {ok}")  # fmt: skip
    saved = d.get("prefetch_saved")
    if saved:
        lines.append(f"  prefetch saved {saved['seconds']:.3f} s ({saved['fraction'] * 100:.0f}%)"
                     f" and {saved['waits']} of {saved['waits_without']} waits for a page-in; "
                     f"{saved['advised']} pages read on advice")  # fmt: skip
    lines.append("  * pyhv: faults that found their page not in memory (each waited for a "
                 "READ); kernel: major faults. pages read: pyhv page-ins, kernel swap "
                 "pswpin, files read_bytes")  # fmt: skip
    charged = [
        f"{LABELS[m]} {modes[m]['interpreter_charge_bytes'] / MiB:.1f} MiB"
        for m in ("anon", *FILES)
        if m in modes and modes[m].get("interpreter_charge_bytes") is not None
    ]
    if charged and cgroup_limit:
        lines.append(f"  kernel cgroup: limit {cgroup_limit / MiB:.0f} MiB, charged before the "
                     f"data: {', '.join(charged)} (interpreter, numpy, index; files: and "
                     "mmap-ninja)")  # fmt: skip
    held = [
        f"{LABELS[m]} {modes[m]['data_resident_bytes'] / MiB:.1f} MiB"
        for m in MODES
        if m in modes and modes[m].get("data_resident_bytes") is not None
    ]
    if held:
        lines.append(f"  data in memory at the end: {', '.join(held)}")
    f = modes.get("files") or modes.get("files-random")
    if f:
        c = f["file_cache_pages"]
        lines.append(f"  files: page cache dropped first (fsync, posix_fadvise DONTNEED): "
                     f"{c['before_drop']} -> {c['after_drop']} of {c['file_pages']} pages "
                     f"cached; the disk's read-ahead {c['read_ahead_kb']} KiB")  # fmt: skip
    return lines
