"""Whole-system tests: real hypervisor, paging service and worker processes,
real faults, real paging files; page contents checked against the oracle
(pyhv.pattern) and counters checked against the work done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import PY, config_text, finish, pyhv, reports, sample_while

PAGES_64M = (64 << 20) // 4096
POOL_PAGES_16M = (16 << 20) // 4096


def test_two_partitions_share_a_pool_four_times_smaller(system):
    system.up(config_text(pool="16MiB", partitions=[("p1", "64MiB"), ("p2", "64MiB")]))
    st = system.status()
    assert st["pool"]["pages"] == POOL_PAGES_16M
    assert st["pool"]["size_bytes"] == 16 << 20

    def resident():
        pool = system.status()["pool"]
        return pool["resident_pages"], pool["frames_used"]

    writers = [system.workload(p, "write", "--generation", "1") for p in ("p1", "p2")]
    samples = sample_while(writers, resident)
    for w in writers:
        rc, out, err = finish(w)
        assert rc == 0, err
        assert reports(out)[0]["pages"] == PAGES_64M
    mid = {p["name"]: p for p in system.status()["partitions"]}
    for name in ("p1", "p2"):
        assert mid[name]["first_touches"] == PAGES_64M  # every page once, zero-filled
        assert mid[name]["page_outs"] >= PAGES_64M - POOL_PAGES_16M

    # new workers (the memory outlives the first ones), random order
    readers = [system.workload(p, "verify", "--generation", "1", "--random") for p in ("p1", "p2")]
    samples += sample_while(readers, resident)
    for r in readers:
        rc, out, err = finish(r)
        assert rc == 0, err
        rep = reports(out)[0]
        assert rep["mismatches"] == 0 and rep["pages"] == PAGES_64M

    assert samples, "no status sample was taken while the workers ran"
    assert max(r for r, _ in samples) <= POOL_PAGES_16M
    assert max(f for _, f in samples) <= POOL_PAGES_16M
    end = system.status()
    assert end["pool"]["frames_high_water"] <= POOL_PAGES_16M
    for p in end["partitions"]:
        # every page not resident after writing had to come back from the device
        assert p["page_ins"] >= PAGES_64M - POOL_PAGES_16M
        assert p["page_outs"] >= PAGES_64M - POOL_PAGES_16M
        # a fault each, but for pages read or zero-filled ahead of a sequential run
        assert (p["faults"] + p["prefetched"] + p["zeroed_ahead"]
                >= p["first_touches"] + p["page_ins"])  # fmt: skip
        assert p["first_touches"] == PAGES_64M
        assert p["resident_pages"] <= POOL_PAGES_16M
        assert p["io_errors"] == 0


def test_three_workers_share_one_partition(system):
    system.up(config_text(pool="16MiB", partitions=[("p1", "64MiB")]))
    rc, out, err = finish(system.workload("p1", "write", "--stripe", "--generation", "3",
                                          workers=3))  # fmt: skip
    assert rc == 0, err
    reps = reports(out)
    assert sorted(r["worker"] for r in reps) == [0, 1, 2]
    assert sum(r["pages"] for r in reps) == PAGES_64M  # the stripes cover the partition once

    p = system.workload("p1", "verify", "--generation", "3", "--random", workers=3)
    samples = sample_while([p], lambda: system.status()["pool"]["resident_pages"])
    rc, out, err = finish(p)
    assert rc == 0, err
    reps = reports(out)
    assert len(reps) == 3
    for r in reps:  # each worker verified all of it, the others' stripes included
        assert r["pages"] == PAGES_64M and r["mismatches"] == 0
    assert max(samples, default=0) <= POOL_PAGES_16M
    part = system.partition("p1")
    assert part["first_touches"] == PAGES_64M
    assert part["page_ins"] > 0 and part["page_outs"] > 0


def test_a_page_written_after_a_clean_page_in_is_paged_out_again(system):
    """Dirty tracking: a page read back from the device is clean (dropped
    without I/O at eviction); its first write must make it dirty again.  Once
    most page-ins are written, they are installed writable (no WP fault),
    except one in GUESS_PROBE that keeps measuring."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    pages = (8 << 20) // 4096
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    assert finish(system.workload("p1", "verify", "--generation", "1"))[0] == 0
    part = system.partition("p1")
    assert part["clean_drops"] > 0  # read back: clean, dropped without I/O
    assert part["installed_writable"] == 0  # nothing was written after a page-in
    rc, out, err = finish(system.workload("p1", "write", "--read-first", "--generation", "2"))
    assert rc == 0, err
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "2", "--random"))
    assert rc == 0, f"{out}\n{err}"
    part = system.partition("p1")
    # every page paged in, then written: seen by a WP fault, or installed writable
    assert part["wp_faults"] + part["installed_writable"] >= pages - 512
    assert part["installed_writable"] > pages // 2  # the guess took over...
    assert part["wp_faults"] > pages // (2 * 8)  # ...and its probes still measure


TWO_VIEWS = textwrap.dedent("""
    import pyhv
    from pyhv.pattern import page_pattern
    a = memoryview(pyhv.attach())
    P = 4096
    n = len(a) // P
    for page in range(n):           # most pages end up on the device
        a[page * P:(page + 1) * P] = page_pattern("p1", page, 1)
    for page in range(n):           # read back: the pages are clean now
        a[page * P]
    b = memoryview(pyhv.attach())   # a second mapping with its own uffd, as a
                                    # second worker has; it never saw those pages
    for page in range(n):           # paged in clean through a, written through b
        assert a[page * P] == page_pattern("p1", page, 1)[0]
        b[page * P:(page + 1) * P] = page_pattern("p1", page, 2)
    bad = [p for p in range(n) if bytes(a[p * P:(p + 1) * P]) != page_pattern("p1", p, 2)]
    print("bad", len(bad))
""")


def test_a_write_through_another_mapping_dirties_a_clean_page(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    rc, out, err = finish(system.run("p1", PY, "-c", TWO_VIEWS))
    assert rc == 0, err
    assert "bad 0" in out
    assert system.partition("p1")["wp_faults"] > 0


WORKER_READS_FOREVER = textwrap.dedent("""
    import random, sys, pyhv
    from pyhv.pattern import page_pattern
    mem = pyhv.attach()
    view = memoryview(mem)
    pages = len(mem) // 4096
    rng = random.Random(1)
    n = 0
    while True:
        page = rng.randrange(pages)
        if view[page * 4096:(page + 1) * 4096] != page_pattern("p1", page, 1):
            print("MISMATCH", page, flush=True)
            sys.exit(1)
        n += 1
        if n == 500:
            print("reading", flush=True)
""")


def test_worker_stops_when_the_hypervisor_is_killed(system):
    """With no restart (tests/test_recovery.py has the supervised case)."""
    system.up(config_text(pool="2MiB", partitions=[("p1", "16MiB")],
                          extra="[hypervisor]\nrestart = false\n"))  # fmt: skip
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    services = [s["pid"] for s in system.status()["paging_services"]]
    reader = system.run("p1", PY, "-c", WORKER_READS_FOREVER)
    assert reader.stdout.readline().strip() == "reading"  # it is paging in now
    os.kill(system.pid, signal.SIGKILL)
    rc, out, err = finish(reader, timeout=15)  # a bound, not a measurement
    assert "MISMATCH" not in out
    assert rc == pyhv_exit_lost()
    for pid in services:  # the paging service notices too
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid)


def pyhv_exit_lost() -> int:
    import pyhv

    return pyhv.EXIT_HYPERVISOR_LOST


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_run_passes_on_the_first_failing_status(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    rc, _, _ = finish(system.run("p1", PY, "-c", "import pyhv, sys; pyhv.attach(); sys.exit(3)"))
    assert rc == 3
    env_check = ("import os, sys; sys.exit(0 if os.environ['PYHV_PARTITION'] == 'p1' and "
                 "os.environ['PYHV_WORKERS'] == '2' and os.environ['PYHV_WORKER'] in '01' "
                 "and os.environ['PYHV_RUN_DIR'] else 9)")  # fmt: skip
    rc, _, err = finish(system.run("p1", PY, "-c", env_check, workers=2))
    assert rc == 0, err


def test_shutdown_stops_everything(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    pids = [system.pid] + [s["pid"] for s in system.status()["paging_services"]]
    p = pyhv("shutdown", "--run-dir", system.run_dir)
    assert p.returncode == 0, p.stderr
    for pid in pids:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid)
    assert not (system.run_dir / "control.sock").exists()
    assert pyhv("status", "--run-dir", system.run_dir).returncode == 1


def test_status_json_has_the_documented_fields(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    st = system.status()
    assert st["pid"] == system.pid
    assert set(st["pool"]) >= {"size_bytes", "page_size", "resident_pages"}
    part = st["partitions"][0]
    assert set(part) >= {"name", "memory_bytes", "resident_pages", "faults", "page_ins",
                         "page_outs"}  # fmt: skip
    assert part["memory_bytes"] == 4 << 20
    svc = st["paging_services"][0]
    assert set(svc) >= {"name", "pid", "state", "streams"}
    (stream,) = svc["streams"]
    assert stream["partition"] == "p1" and stream["state"] == "ENABLED"
    assert stream["transitions"] == {"INVALID->ENABLED": 1} and stream["last_transition"] > 0
    text = pyhv("status", "--run-dir", system.run_dir, check=True).stdout
    assert "p1" in text and "vios1" in text


def test_run_dir_from_the_environment(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    env = dict(os.environ, PYHV_RUN_DIR=str(system.run_dir))
    p = pyhv("status", "--json", env=env)
    assert p.returncode == 0 and '"p1"' in p.stdout


@pytest.fixture
def loop_device(tmp_path):
    if subprocess.run(["which", "losetup"], capture_output=True).returncode:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(32 << 20)
    p = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", str(backing)],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode:
        pytest.skip(f"cannot set up a loop device: {p.stderr.strip()}")
    dev = p.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev])


def test_paging_to_a_loop_block_device_with_direct_io(system, loop_device):
    system.up(f"""
        [pool]
        size = "2MiB"
        [[paging_service]]
        name = "vios1"
        [[device]]
        id = "blk0"
        path = "{loop_device}"
        [[partition]]
        name = "p1"
        memory = "16MiB"
    """)
    st = system.status()
    assert st["devices"][0]["type"] == "block" and st["devices"][0]["size_bytes"] == 32 << 20
    assert finish(system.workload("p1", "write", "--generation", "5"))[0] == 0
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "5", "--random"))
    assert rc == 0, err
    part = system.partition("p1")
    assert part["page_ins"] > 0 and part["page_outs"] > 0


def test_demo_runs_and_verifies(tmp_path):
    p = pyhv("demo", "--json", timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    import json

    s = json.loads(p.stdout)
    assert s["ok"] and s["mismatches"] == 0
    assert s["pages_verified"] > 0 and s["page_ins"] > 0 and s["page_outs"] > 0
    assert s["max_resident_sampled"] <= s["pool_pages"]
    assert s["memory_bytes"] >= 2 * s["pool_bytes"]
    assert not any(n.startswith("pyhv-demo-") for n in os.listdir(os.environ.get("TMPDIR", "/tmp"))
                   if os.path.exists(os.path.join("/tmp", n, "control.sock")))  # fmt: skip
    assert sys.executable


DETACH_WHILE_VIEWED = textwrap.dedent("""
    import pyhv
    mem = pyhv.attach()
    view = memoryview(mem)
    n = len(mem) // 4096
    for page in range(n):
        view[page * 4096] = page % 251 + 1
    try:
        pyhv.detach(mem)
    except BufferError as e:
        print("refused:", e)
    # still attached: paged-out pages come back, never as zeros
    bad = [p for p in range(n) if view[p * 4096] != p % 251 + 1]
    print("bad", len(bad))
    view.release()
    pyhv.detach(mem)
    print("detached")
""")


def test_detach_while_a_view_is_alive_changes_nothing(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    rc, out, err = finish(system.run("p1", PY, "-c", DETACH_WHILE_VIEWED))
    assert rc == 0, err
    assert "refused: detach: release every memoryview" in out
    assert "bad 0" in out and "detached" in out
    assert system.partition("p1")["workers"] == []


def test_a_sequential_run_of_page_ins_is_read_ahead(system):
    system.up(config_text(pool="2MiB", partitions=[("p1", "16MiB")]))
    assert finish(system.workload("p1", "write", "--generation", "6"))[0] == 0
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "6"))  # in order
    assert rc == 0, err
    part = system.partition("p1")
    assert part["prefetched"] > 1000  # most page-ins were read ahead of the fault
    assert part["page_ins"] >= (16 << 20) // 4096 - 512
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "6", "--random"))
    assert rc == 0, err


def test_a_partition_with_twice_the_weight_keeps_about_twice_the_pages(system):
    system.up(config_text(pool="4MiB", partitions=[("heavy", "16MiB"), ("light", "16MiB")])
              .replace('name = "heavy"\n', 'name = "heavy"\nweight = 256\n'))  # fmt: skip
    st = system.status()
    assert [p["weight"] for p in st["partitions"]] == [256, 128]
    # equal pressure: both write all their pages, twice over, at the same time
    procs = [system.workload(p, "write", "--random", "--seed", str(g), "--generation", str(g))
             for p in ("heavy", "light") for g in (1,)]  # fmt: skip
    for p in procs:
        assert finish(p)[0] == 0
    procs = [system.workload(p, "write", "--random", "--seed", "2", "--generation", "2")
             for p in ("heavy", "light")]  # fmt: skip
    ratios = []
    while any(p.poll() is None for p in procs):
        parts = system.status_now()["partitions"]
        if parts[1]["resident_pages"] > 50:
            ratios.append(parts[0]["resident_pages"] / parts[1]["resident_pages"])
        time.sleep(0.01)
    for p in procs:
        assert finish(p)[0] == 0
    assert len(ratios) > 5
    ratios.sort()
    median = ratios[len(ratios) // 2]
    assert 1.6 <= median <= 2.5, ratios
    for p, g in (("heavy", 2), ("light", 2)):
        rc, out, err = finish(system.workload(p, "verify", "--generation", str(g), "--random"))
        assert rc == 0, err


def test_per_page_metadata_of_a_1_gib_partition_is_at_most_16_bytes(system):
    system.up(config_text(pool="4MiB", partitions=[("big", "1GiB")]))
    part = system.partition("big")
    assert part["pages"] == 262144
    assert part["metadata_bytes_per_page"] <= 16, part["metadata_bytes_per_page"]
    print("metadata bytes per page (1 GiB partition):", part["metadata_bytes_per_page"])


HOT_AND_COLD = textwrap.dedent("""
    import random, sys, pyhv
    from pyhv import wire
    import os
    mem = pyhv.attach()
    P, HOT, COLD, ROUNDS = 4096, 32, 128, 30
    n = len(mem) // P
    for page in range(n):
        mem[page * P] = 1
    def page_ins():
        st = wire.request(os.path.join(os.environ["PYHV_RUN_DIR"], "control.sock"),
                          {"op": "status"})
        return st["partitions"][0]["page_ins"]
    rng = random.Random(3)
    hot = range(HOT)
    before = page_ins()
    for _ in range(ROUNDS):
        for page in hot:             # the hot set, every round
            mem[page * P]
        for page in rng.sample(range(HOT, n), COLD):  # cold pages, scattered
            mem[page * P]
    print("page_ins", page_ins() - before, "cold", ROUNDS * COLD)
""")


def test_pages_in_use_outlive_a_stream_of_cold_ones(system):
    """Victim policy (2Q): the hot set refaults once, is then kept active, and
    a stream of cold pages four times its size per round cannot push it out
    (FIFO would evict it every time the pool turns over)."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    rc, out, err = finish(system.run("p1", PY, "-c", HOT_AND_COLD))
    assert rc == 0, err
    _, page_ins, _, cold = out.split()
    # every cold touch may page in; the 32 hot pages twice while they warm up
    # (measured: +67; FIFO evicts them as the pool turns over: +494)
    assert int(page_ins) <= int(cold) + 4 * 32, out
    part = system.partition("p1")
    assert part["refaults"] >= 32 and part["active_pages"] > 0
