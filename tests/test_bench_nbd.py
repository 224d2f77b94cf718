"""pyhv bench --only nbd's machinery in a reduced form (pyhv.bench_nbd): the
workloads on the local device and on nbdkit in a network namespace with
usdelay, every page read back and checked; the storage host gone after.
No time is asserted: speed is for the benchmark."""

from __future__ import annotations

import os
import subprocess

import pytest

from pyhv import bench_nbd, benchmark


def test_the_workload_verify_finds_a_wrong_byte():
    npages, offs = 8, [3 * 4096, 3 * 4096, 5 * 4096 + 7, 4096 * 7 + 4095]
    view = bytearray(npages * 4096)
    for p in range(npages):
        view[p * 4096] = (p % 255) + 1
    for off in offs:
        view[off] = (view[off] + 1) & 0xFF
    touched = benchmark._expected(offs, [])
    assert benchmark._verify(view, npages, touched) == (8, 0)
    view[5 * 4096 + 7] = 0
    assert benchmark._verify(view, npages, touched) == (8, 1)


@pytest.mark.skipif(bool(bench_nbd.unavailable()), reason=str(bench_nbd.unavailable()))
def test_the_nbd_rows_page_through_nbdkit_and_verify_every_page(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_nbd, "PLACEMENTS", (("local", None), ("NBD +100 us", 100)))
    monkeypatch.setattr(bench_nbd, "WORKLOADS", ("sequential",))  # read-ahead: READs in flight
    monkeypatch.setattr(bench_nbd, "PROBES", 50)
    p = benchmark.params(True)  # sequential: one pass
    loop = benchmark.LoopDevice(str(tmp_path / "dev.img"), benchmark.DEVICE)
    errors, steps = [], []
    try:
        r = bench_nbd.run_nbd(str(tmp_path), p, loop, errors, steps.append)
    finally:
        loop.close()
    assert errors == []
    assert sum(steps) == 1 + 2 * len(bench_nbd.WORKLOADS)
    assert [(x["device"], x["workload"]) for x in r["rows"]] == [
        ("local", "sequential"), ("NBD +100 us", "sequential")]  # fmt: skip
    for x in r["rows"]:
        assert x["verified"] == benchmark.MEMORY // 4096 and x["mismatches"] == 0, x
        assert x["page_ins"] > 0 and x["reads"] > 0 and x["reads_in_flight"] > 0
        assert x["vs_local"] is not None
    assert set(r["read_probe"]) == {"local", "NBD +100 us"}
    assert r["usdelay"]["100"]["samples"] == 50 and "added_us" in r["usdelay"]["100"]
    text = "\n".join(bench_nbd.format_lines(r))
    assert "NBD +100 us  sequential" in text and "16384 ok" in text
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"pyhv-sh-{os.getpid()}-" not in netns  # the storage host is gone
