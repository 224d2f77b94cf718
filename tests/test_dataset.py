"""The dataset workload of `pyhv bench` (issue 11, items 2 and 6): an
mmap-ninja ragged dataset read in shuffled batches under pyhv (with and
without prefetch), on kernel swap and from its files, every sample's result
checked against the files.  Real processes, a real partition, the kernel's
swap and memory cgroup where the machine has them.  No time is asserted."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import PY, assert_one_line_error, pyhv
from pyhv import bench_dataset as ds
from pyhv.benchmark import POOL


@pytest.mark.skipif(os.geteuid() != 0, reason="pyhv bench sets up loop devices and swap: root")
def test_bench_quick_dataset_alone_verifies_every_mode(tmp_path):
    out = tmp_path / "bench.json"
    r = pyhv("bench", "--quick", "--only", "dataset", "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    assert "Traceback" not in r.stderr
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert list(result["workloads"]) == ["dataset"]  # --only: no other workload ran
    d = result["dataset"]
    info, modes = d["info"], d["modes"]
    assert info["bytes"] > POOL and info["samples"] > d["batch"]
    assert 3 << 10 < info["sample_bytes_min"] < info["sample_bytes_max"] <= 64 << 10
    swap = result["kernel_swap"]
    want = list(ds.MODES) if swap["available"] else ["pyhv", "prefetch"]
    if not swap["available"]:
        assert swap["skipped"], "an unavailable kernel swap says why"
    assert list(modes) == want and d["failed"] == {}
    reads = info["samples"] * d["epochs"]
    checksums = {m["checksum"] for m in modes.values()}
    assert len(checksums) == 1  # the same results, wherever the data lived
    for name, m in modes.items():
        assert m["verified"] and m["mismatches"] == 0, name
        assert m["touches"] == reads and m["seconds"] > 0, name
        assert m["file_cache_pages"]["after_drop"] == 0, name  # the epochs start cold
    for name in ("pyhv", "prefetch"):
        c = modes[name]["counters"]
        assert c["page_ins"] > 0 and c["io_errors"] == 0 and c["first_touches"] == 0, name
        assert modes[name]["load_counters"]["first_touches"] > 0, name  # the load wrote it
    assert modes["pyhv"]["counters"]["advised"] == modes["pyhv"]["prefetch_calls"] == 0
    # every sample prefetched a batch ahead, but those of the very first batch
    assert modes["prefetch"]["prefetch_calls"] == reads - min(d["batch"], info["samples"])
    assert modes["prefetch"]["counters"]["advised"] > 0
    assert set(d["prefetch_saved"]) >= {"seconds", "waits", "advised"}
    row = result["workloads"]["dataset"]
    assert row["touches"] == reads and row["pyhv_s"] == round(modes["pyhv"]["seconds"], 4)
    if swap["available"]:
        assert row["ratio"] > 0 and modes["files"]["majflt"] > 0
        # no read-around: a page read a major fault (give or take the index's)
        rnd = modes["files-random"]
        assert rnd["read_bytes"] // 4096 <= 1.1 * rnd["majflt"] + 64
        assert modes["anon"]["interpreter_charge_bytes"] > 0
    assert "dataset:" in r.stdout and "pyhv + prefetch" in r.stdout and "prefetch saved" in r.stdout


def _workload(data, mode: str) -> dict:
    r = subprocess.run([PY, "-P", "-m", "pyhv.benchmark", "workload", "dataset", "--mode", mode,
                        "--data", str(data), "--epochs", "2", "--batch", "8"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_a_sample_that_differs_from_the_files_fails_its_mode(tmp_path):
    """The workload checks every sample of every epoch against the files
    (here outside any cgroup: anonymous memory, and the files); one wrong
    reference value is two mismatches (two epochs), and no result."""
    info = ds.make(str(tmp_path), 1 << 20, seed=3)
    assert info["samples"] > 8 and info["bytes"] <= 1 << 20
    for mode in ("anon", "files"):
        good = _workload(tmp_path, mode)
        assert good["verified"] and good["touches"] == 2 * info["samples"], mode
        ds.check(good, info, 2)
    ref = np.load(ds.reference_of(str(tmp_path)))
    ref[5] = np.nextafter(ref[5], np.inf)  # one ulp off
    np.save(ds.reference_of(str(tmp_path)), ref)
    for mode in ("anon", "files"):
        bad = _workload(tmp_path, mode)
        assert bad["mismatches"] == 2 and not bad["verified"], mode
        with pytest.raises(ValueError, match="2 of .* differ from the files"):
            ds.check(bad, info, 2)


def test_bench_only_takes_workload_names():
    assert_one_line_error(pyhv("bench", "--only", "random,nope"), "--only", "dataset")
