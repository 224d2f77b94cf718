"""The fault engine's races (csrc/engine.c), on real processes: a fault on a
page being evicted, two workers faulting one page, a worker killed in the
middle of its fault, and a failover with the engine's page-ins in flight.
Every page is checked against the oracle; the counters are checked against
the work."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time

from conftest import PY, config_text, finish, reports

from pyhv import wire

TWO = ("vios1", "vios2")


def _service_pid(system, name="vios1") -> int:
    return system.service(name)["pid"]


def _quiet_pool_is_consistent(st) -> None:
    """Once nothing is in flight, every frame in use is a resident page."""
    pool = st["pool"]
    assert pool["fault_waiters"] == 0
    assert pool["frames_used"] == pool["resident_pages"], pool


# A worker that reads page N of a partition written with generation 1 and
# checks it (the read blocks while the page is in flight).
READ_PAGE = textwrap.dedent("""
    import sys, pyhv
    from pyhv.pattern import page_pattern
    page = int(sys.argv[1])
    m = pyhv.attach()
    print("attached", flush=True)
    ok = bytes(m[page * 4096:(page + 1) * 4096]) == page_pattern("p1", page, 1)
    print("ok" if ok else "WRONG", flush=True)
""")


def test_a_fault_on_a_page_being_paged_out_waits_for_it_and_reads_it(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    svc = _service_pid(system)
    os.kill(svc, signal.SIGSTOP)  # write-backs stay in flight: their pages stay PAGING_OUT
    try:
        # first touches need no service: the pool fills, eviction starts with
        # the oldest pages, page 0 first, and their WRITEs hang
        writer = system.workload("p1", "write", "--generation", "1")
        system.wait_for(lambda st: st["partitions"][0]["pages_by_state"].get("paging_out"),
                        "page-outs in flight")  # fmt: skip
        # no WRITE has completed: every page with a slot is being paged out
        slots = wire.request(str(system.run_dir / "control.sock"),
                             {"op": "slots", "partition": "p1"})["slots"]  # fmt: skip
        page = slots[0][0]
        reader = system.run("p1", PY, "-c", READ_PAGE, str(page))
        system.wait_for(lambda st: len(st["partitions"][0]["workers"]) == 2, "the reader")
        time.sleep(0.5)
        assert reader.poll() is None  # waiting for the page-out, not reading zeros
    finally:
        os.kill(svc, signal.SIGCONT)
    rc, out, err = finish(reader, timeout=60)
    assert rc == 0 and out.split()[-1] == "ok", (out, err)
    assert finish(writer, timeout=120)[0] == 0
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "1", "--random"))
    assert rc == 0, err
    _quiet_pool_is_consistent(system.status())


def test_two_workers_faulting_the_same_pages_at_once_share_each_page_in(system):
    system.up(config_text(pool="2MiB", partitions=[("p1", "16MiB")]))
    assert finish(system.workload("p1", "write", "--generation", "5"))[0] == 0
    before = system.partition("p1")
    # two workers, same order, started together: mostly the same page at once
    start = system.run_dir / "go"
    procs = [system.run("p1", PY, "-m", "pyhv.workload", "verify", "--generation", "5",
                        "--start-file", str(start)) for _ in range(2)]  # fmt: skip
    time.sleep(1.0)
    start.touch()
    for p in procs:
        rc, out, err = finish(p, timeout=120)
        assert rc == 0, err
        assert reports(out)[0]["mismatches"] == 0
    after = system.partition("p1")
    page_ins = after["page_ins"] - before["page_ins"]
    # each page read once for both (plus what eviction takes meanwhile), never
    # twice for two faults that met: about one page-in per page and worker at
    # most (a page read ahead and evicted before its touch is read again: 1%)
    assert 0 < page_ins <= 2 * 4096 * 1.01
    assert after["minor_faults"] > before["minor_faults"]  # the other mapped what one read
    _quiet_pool_is_consistent(system.status())


def test_a_worker_killed_in_the_middle_of_its_fault_leaves_nothing_behind(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    svc = _service_pid(system)
    os.kill(svc, signal.SIGSTOP)  # its page-in (READ) stays in flight
    try:
        reader = system.run("p1", PY, "-c", READ_PAGE, "0")  # page 0 is on the device
        deadline = time.monotonic() + 30
        while not system.partition("p1")["pages_by_state"].get("filling"):
            assert time.monotonic() < deadline, "the page-in never started"
            time.sleep(0.05)
        (pid,) = system.partition("p1")["workers"]
        os.kill(pid, signal.SIGKILL)  # blocked in the fault
        system.wait_for(lambda st: st["partitions"][0]["workers"] == [], "the worker to go")
    finally:
        os.kill(svc, signal.SIGCONT)
    finish(reader, timeout=60)
    # the READ completes with nobody to map it into: the page stays on the
    # device, its frame goes back
    st = system.wait_for(lambda st: not st["partitions"][0]["pages_by_state"].get("filling"),
                         "the page-in to end")  # fmt: skip
    _quiet_pool_is_consistent(st)
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "1", "--random"))
    assert rc == 0, err


def test_a_failover_with_the_engines_page_ins_in_flight_loses_none(system):
    system.up(config_text(pool="2MiB", partitions=[("p1", "32MiB")], services=TWO, paging=TWO,
                          service_extra="timeout = 1\n"))  # fmt: skip
    assert finish(system.workload("p1", "write", "--generation", "7"))[0] == 0
    hung = _service_pid(system)
    os.kill(hung, signal.SIGSTOP)  # the reader's READs on its fast channel stay unanswered
    reader = system.workload("p1", "verify", "--generation", "7", "--random")
    rc, out, err = finish(reader, timeout=120)
    assert rc == 0, err
    assert reports(out)[0]["mismatches"] == 0
    st = system.status()
    assert system.service("vios1")["state"] == "dead"
    svc2 = next(s for s in st["paging_services"] if s["name"] == "vios2")
    assert svc2["streams"][0]["state"] == "RESUMED"
    assert st["pool"]["engine"]["reads_taken_back"] >= 1  # it had READs in flight, resent
    _quiet_pool_is_consistent(st)


WRITE_PAGES = textwrap.dedent("""
    import sys, pyhv
    from pyhv.pattern import page_pattern
    m = pyhv.attach()
    for page in [50] + list(range(200, 1000)):  # page 50, then enough to evict it
        m[page * 4096:(page + 1) * 4096] = page_pattern("p1", page, 1)
""")

# Attached before page 50 is lost (so it is poisoned there too), then it
# fills pages 48 and 49 for the first time -- a sequential run of first
# touches, which zero-fills ahead -- and reads page 50: a machine check.
BYSTANDER = textwrap.dedent("""
    import os, sys, time, pyhv
    m = pyhv.attach()
    print("attached", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    m[48 * 4096] = 1
    m[49 * 4096] = 1
    print("read", m[50 * 4096], flush=True)
""")


def test_a_lost_page_stays_poisoned_for_workers_attached_before_it_was_lost(system):
    """Zero-fill ahead (or read-ahead) never maps over a poison marker: a
    worker that was attached when the page was lost gets its machine check,
    never zeros."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    assert finish(system.run("p1", PY, "-c", WRITE_PAGES))[0] == 0
    assert system.pyhv("inject", "corrupt", "--partition", "p1", "--pages", "50").returncode == 0
    go = system.run_dir / "go"
    bystander = system.run("p1", PY, "-c", BYSTANDER, str(go))
    assert bystander.stdout.readline().strip() == "attached"
    rc, out, err = finish(system.run("p1", PY, "-c", READ_PAGE, "50"))
    assert rc == 128 + signal.SIGBUS and "machine check" in err, (rc, out, err)
    go.touch()
    rc, out, err = finish(bystander)
    assert rc == 128 + signal.SIGBUS and "read" not in out, (rc, out, err)
    assert system.partition("p1")["pages_by_state"].get("poisoned") == 1
    # a worker attached after the loss reads it as a zero page
    rc, out, err = finish(system.run("p1", PY, "-c", "import pyhv; m = pyhv.attach(); "
                                     "print(m[50 * 4096:51 * 4096] == bytes(4096))"))  # fmt: skip
    assert rc == 0 and out.strip() == "True", err


def test_switches_while_the_active_service_hangs_lose_no_page(system):
    """A switch whose current service hangs meets the failover that fences
    it: the stream is opened once where it goes, no page-in is refused for
    a stream half open, no page becomes a machine check."""
    system.up(config_text(pool="2MiB", partitions=[("p1", "32MiB")], services=TWO, paging=TWO,
                          service_extra="timeout = 1\n"))  # fmt: skip
    assert finish(system.workload("p1", "write", "--generation", "3"))[0] == 0
    readers = [system.workload("p1", "verify", "--generation", "3", "--random", "--seed", str(i))
               for i in range(2)]  # fmt: skip
    for _ in range(4):
        st = system.status()
        active = st["partitions"][0]["service"]
        os.kill(_service_pid(system, active), signal.SIGSTOP)
        r = system.pyhv("service", "switch", "p1", "--json")
        assert r.returncode == 0, r.stderr
        assert system.partition("p1")["stream"] == "RESUMED"
        assert system.pyhv("service", "start", active).returncode == 0
    for p in readers:
        rc, out, err = finish(p, timeout=120)
        assert rc == 0, err
    assert json.loads(system.pyhv("errors", "--json").stdout)["errors"] == []
    _quiet_pool_is_consistent(system.status())


HOT_AND_COLD = textwrap.dedent("""
    import pyhv
    m = pyhv.attach()
    P, HOT = 4096, 64
    for page in range(HOT):                 # the hot set, written once
        m[page * P] = 1
    for i, page in enumerate(range(100, 2048)):
        m[page * P] = 2                     # a stream of cold pages, each touched once
        hot = i % HOT
        m[hot * P] = (m[hot * P] + 1) & 0xFF  # and the hot set, written all along
""")


def test_pages_written_while_resident_are_seen_in_use_and_kept(system):
    """No accessed bit reaches a user-space pager; writes do (a page looked
    at is write-protected, its next write faults).  A hot set written all
    along, among a stream of cold pages in a pool of an eighth of them, is
    seen in use and kept: most of it never leaves (with refaults alone each
    hot page would leave once and come back)."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    rc, out, err = finish(system.run("p1", PY, "-c", HOT_AND_COLD))
    assert rc == 0, err
    p = system.partition("p1")
    assert p["write_refs"] > 0 and p["promoted"] > 0
    # the cold pages are first touches (no page-in): every page-in is a hot
    # page that left; with refaults alone each of the 64 leaves once at least
    assert p["page_ins"] < 64, p
