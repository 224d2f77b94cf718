"""Real programs in partitions: numpy arrays over the partition's memory,
fork and multiprocessing, loaning pages back (discard, MADV_REMOVE, the
pressure callback) and prefetch advice.  Every program runs as a real
worker under `pyhv run`; page contents are checked against the oracle or
against numpy's own answer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import textwrap
import time

import pytest

from conftest import PY, config_text, finish, reports

np = pytest.importorskip("numpy")


def program(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def last_json(out: str) -> dict:
    return reports(out)[-1]


# --- numpy ------------------------------------------------------------------------------


def test_numpy_sort_of_an_array_four_times_the_pool(system, tmp_path):
    system.up(config_text(pool="8MiB", partitions=[("p1", "32MiB")]))
    prog = program(tmp_path, "sort.py", """
        import json, numpy as np, pyhv
        a = pyhv.array((32 << 20) // 8, "int64")   # the whole memory, 4x the pool
        a[:] = np.random.default_rng(7).permutation(a.size)
        a.sort()                                   # in place, in the partition's memory
        print(json.dumps({"sorted": bool((a == np.arange(a.size)).all()), "n": int(a.size)}))
    """)
    rc, out, err = finish(system.run("p1", PY, prog))
    assert rc == 0, err
    assert last_json(out) == {"sorted": True, "n": 4 << 20}
    p = system.partition("p1")
    assert p["page_ins"] > 8192 and p["page_outs"] > 8192  # it really paged


def test_numpy_array_bad_input_is_a_clear_exception_and_changes_nothing(system, tmp_path):
    system.up(config_text(pool="1MiB", partitions=[("p1", "1MiB")]))
    prog = program(tmp_path, "bad.py", """
        import json, pyhv
        out = {}
        for name, call in [
            ("out_of_bounds", lambda: pyhv.array(1 << 20, "int64")),
            ("past_the_end", lambda: pyhv.array(2, "int64", offset=(1 << 20) - 8)),
            ("misaligned", lambda: pyhv.array(4, "float64", offset=4)),
            ("negative", lambda: pyhv.array(4, "uint8", offset=-4096)),
            ("not_an_int", lambda: pyhv.array(4, "uint8", offset=1.5)),
        ]:
            try:
                call()
                out[name] = "no error"
            except (ValueError, TypeError) as e:
                out[name] = type(e).__name__ + ": " + str(e)
        a = pyhv.array(3, "uint16", offset=4094)   # across a page boundary: fine
        a[:] = [1, 2, 3]
        out["ok"] = a.tolist()
        print(json.dumps(out))
    """)
    rc, out, err = finish(system.run("p1", PY, prog))
    assert rc == 0, err
    r = last_json(out)
    assert r.pop("ok") == [1, 2, 3]
    for name, text in r.items():
        assert text.startswith(("ValueError: pyhv.array", "TypeError: pyhv.array")), (name, text)
        assert "\n" not in text
    assert "do not fit" in r["out_of_bounds"] and "alignment" in r["misaligned"]
    # nothing was touched but the two pages of the good array
    assert system.partition("p1")["faults"] <= 2


# --- fork -------------------------------------------------------------------------------


def test_a_multiprocessing_pool_sums_slices_of_an_array_larger_than_the_pool(system, tmp_path):
    system.up(config_text(pool="4MiB", partitions=[("p1", "32MiB")]))
    prog = program(tmp_path, "pool.py", """
        import json, multiprocessing as mp, numpy as np, pyhv
        N = (32 << 20) // 8
        a = pyhv.array(N, "int64")
        a[:] = np.arange(N) * 3 + 1

        def part(i):   # in a forked child: the same memory, its own faults
            b = pyhv.array(N, "int64")
            k = N // 8
            return int(b[i * k:(i + 1) * k].sum())

        with mp.get_context("fork").Pool(4) as pool:
            total = sum(pool.map(part, range(8)))
        print(json.dumps({"total": total, "want": int(3 * (N * (N - 1) // 2) + N)}))
    """)
    rc, out, err = finish(system.run("p1", PY, prog))
    assert rc == 0, err
    r = last_json(out)
    assert r["total"] == r["want"]
    p = system.partition("p1")
    assert p["forks"] >= 4
    assert p["workers"] == []  # the children that exited were dropped, and so was the parent


def test_a_forked_child_shares_the_memory_both_ways_and_is_dropped_when_it_exits(system,
                                                                                 tmp_path):
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    prog = program(tmp_path, "fork.py", """
        import json, os, sys, time, pyhv
        from pyhv.pattern import page_pattern
        from pyhv.uffd import PAGE_SIZE as P
        mem = pyhv.attach()
        n = len(mem) // P
        for i in range(n):                     # 8x the pool: most pages on the device
            mem[i * P:(i + 1) * P] = page_pattern("p1", i, 1)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                           # the child: reads the parent's pages,
            bad = sum(mem[i * P:(i + 1) * P] != page_pattern("p1", i, 1) for i in range(n))
            for i in range(0, n, 2):           # writes half of them anew
                mem[i * P:(i + 1) * P] = page_pattern("p1", i, 2)
            os.write(w, str(bad).encode())
            time.sleep(float(sys.argv[1]))      # and stays a moment (status shows it)
            os._exit(0)
        os.close(w)
        child_bad = int(os.read(r, 100))
        print(json.dumps({"child": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        bad = sum(mem[i * P:(i + 1) * P] != page_pattern("p1", i, 2 if i % 2 == 0 else 1)
                  for i in range(n))
        print(json.dumps({"child_bad": child_bad, "parent_bad": bad,
                          "child_exit": os.waitstatus_to_exitcode(status)}), flush=True)
        time.sleep(float(sys.argv[1]))
    """)
    p = system.run("p1", PY, prog, "2")
    line = p.stdout.readline()
    child = json.loads(line)["child"]
    st = system.wait_for(lambda s: child in s["partitions"][0]["workers"], "the child listed")
    assert len(st["partitions"][0]["workers"]) == 2
    system.wait_for(lambda s: child not in s["partitions"][0]["workers"], "the child dropped")
    rc, out, err = finish(p)
    assert rc == 0, err
    r = last_json(out)
    assert r == {"child_bad": 0, "parent_bad": 0, "child_exit": 0}, err
    assert system.partition("p1")["forks"] == 1


GENERATIONS = """
    import os, sys, pyhv
    mem = pyhv.attach()
    mem[0:5] = b"hello"

    def family(depth):  # each generation forks the next; the last writes
        if depth == 0:
            mem[4096:4101] = b"there"
            return 0 if mem[0:5] == b"hello" else 3
        pid = os.fork()
        if pid == 0:
            os._exit(family(depth - 1))
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    rc = family(int(sys.argv[1]))
    print("family", rc, bytes(mem[4096:4101]).decode(), flush=True)
"""


@pytest.mark.parametrize("how", ["here", "own pid namespace"])
def test_grandchildren_fault_through_the_hypervisor_in_any_pid_namespace(system, tmp_path, how):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    prefix = ["unshare", "--pid", "--fork", "--mount-proc"] if how != "here" else []
    if prefix and not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) missing")
    rc, out, err = finish(system.run("p1", *prefix, PY, program(tmp_path, "gen.py", GENERATIONS),
                                     "3"))  # fmt: skip
    assert rc == 0, err
    assert "family 0 there" in out, (out, err)
    # every generation was adopted, and dropped when it exited
    st = system.wait_for(lambda s: s["partitions"][0]["workers"] == [], "every worker gone")
    assert st["partitions"][0]["forks"] == 3
    assert system.pyhv("partition", "remove", "p1").returncode == 0


def test_machine_checks_and_hypervisor_loss_work_in_a_forked_child(system, tmp_path):
    # (no restart: the hypervisor's loss is final; tests/test_recovery.py has the other case)
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")],
                          extra="[hypervisor]\nrestart = false\n"))  # fmt: skip
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    p = system.pyhv("inject", "corrupt", "--partition", "p1", "--json")
    assert p.returncode == 0, p.stderr
    lost = sorted(page for page, _ in json.loads(p.stdout)["slots"])
    # the parent lets go of the memory after the fork, so that its own
    # watchdog and handler are out of the way: what happens is the child's
    prog = program(tmp_path, "child.py", """
        import os, sys, time, pyhv
        mem = pyhv.attach()
        pid = os.fork()
        if pid == 0:
            page = int(sys.argv[1])
            if page >= 0:
                mem[page * 4096]               # a lost page: a machine check
            else:
                print("looping", flush=True)
                while True:                    # until the hypervisor goes
                    mem[0] = 1
                    time.sleep(0.01)
            os._exit(0)
        pyhv.detach(mem)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status), flush=True)
    """)
    rc, out, err = finish(system.run("p1", PY, prog, str(lost[0])))
    assert rc == 0, err
    assert f"child exit {-signal.SIGBUS}" in out, (out, err)  # (killed by it)
    assert f"pyhv: machine check: partition p1 page {lost[0]}" in err
    recs = json.loads(system.pyhv("errors", "--json").stdout)["errors"]
    assert any(r["page"] == lost[0] and r["reported_by"] for r in recs)

    p = system.run("p1", PY, prog, "-1")
    assert p.stdout.readline().strip() == "looping"
    os.kill(system.pid, signal.SIGKILL)
    rc, out, err = finish(p, timeout=60)
    assert "child exit 70" in out, (out, err)


# --- loans ------------------------------------------------------------------------------

LOANS = """
    import ctypes, json, mmap, os, sys, time, pyhv
    from pyhv import wire
    from pyhv.pattern import page_pattern
    from pyhv.uffd import PAGE_SIZE as P
    mem = pyhv.attach()
    n = len(mem) // P

    def status():
        return wire.request(os.environ["PYHV_RUN_DIR"] + "/control.sock",
                            {"op": "partition", "name": "p1"})["partition"]

    for i in range(n):                          # 4x the pool: most pages on the device
        mem[i * P:(i + 1) * P] = page_pattern("p1", i, 1)
    before = status()
    out = {"before": before}
    gone = set(range(1024, 2048))               # on the device by now
    out["frames"] = pyhv.discard(1024 * P, 1024 * P)
    out["after_discard"] = status()
    tail = set(range(n - 32, n))                 # resident: written last
    mem.madvise(mmap.MADV_REMOVE, (n - 32) * P, 32 * P)
    gone |= tail
    raw = set(range(n - 128, n - 96))           # a raw madvise, as C code would do it (resident)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.madvise(ctypes.c_void_p(addr + (n - 128) * P), ctypes.c_size_t(32 * P), 9) == 0
    time.sleep(1)
    out["after_remove"] = status()
    errors = []
    for bad in [(P + 1, P), (0, len(mem) + P), (-P, P), (len(mem), P)]:
        try:
            pyhv.discard(*bad)
            errors.append("no error")
        except (ValueError, TypeError) as e:
            errors.append(str(e))
    out["errors"] = errors
    zeros = bytes(P)
    wrong = [i for i in range(n)
             if mem[i * P:(i + 1) * P] != (zeros if i in gone else page_pattern("p1", i, 1))
             and i not in raw]
    out["raw_zero"] = all(mem[i * P:(i + 1) * P] == zeros for i in raw)
    out["wrong"] = wrong[:10]
    out["end"] = status()
    print(json.dumps(out))
"""


def test_discard_and_madv_remove_give_frames_and_slots_back_and_read_zeros(system, tmp_path):
    system.up(config_text(pool="4MiB", partitions=[("p1", "16MiB")]))
    rc, out, err = finish(system.run("p1", PY, program(tmp_path, "loans.py", LOANS)))
    assert rc == 0, err
    r = last_json(out)
    before, after = r["before"], r["after_discard"]
    assert r["wrong"] == [] and r["raw_zero"]  # zeros where given back, nothing else lost
    assert after["loaned_pages"] == 1024
    assert after["free_slots"] - before["free_slots"] >= 1024 - 8  # (a few were resident)
    assert after["frames_loaned"] == r["frames"] and after["resident_pages"] == (
        before["resident_pages"] - r["frames"])  # fmt: skip
    removed = r["after_remove"]
    assert removed["frames_loaned"] - after["frames_loaned"] == 32  # through mem.madvise: at once
    assert removed["loaned_pages"] == 1024 + 32
    # a raw madvise (of resident pages): they read zeros (r["raw_zero"]), their
    # frames come back at their next touch or eviction
    assert len(r["errors"]) == 4 and all(e.startswith("discard: ") for e in r["errors"]), r
    assert r["end"]["machine_checks"] == 0


PRESSURE = """
    import json, os, sys, time, threading, pyhv
    from pyhv.pattern import page_pattern
    from pyhv.uffd import PAGE_SIZE as P
    mem = pyhv.attach()
    cache = list(range(512))                    # 2 MiB of cache it can spare
    for i in range(1024):
        mem[i * P:(i + 1) * P] = page_pattern("p1", i, 1)
    asked, given = [], []
    lock = threading.Lock()

    def spare(pages):
        with lock:  # (one ask at a time; the check below waits for it)
            asked.append(pages)
            for _ in range(min(pages, len(cache))):
                i = cache.pop()
                pyhv.discard(i * P, P)
                given.append(i)

    pyhv.on_pressure(spare)
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    lock.acquire()  # no more loans while it checks
    bad = [i for i in range(1024) if mem[i * P:(i + 1) * P] !=
           (bytes(P) if i in given else page_pattern("p1", i, 1))]
    print(json.dumps({"asked": sum(asked), "given": len(given), "bad": bad[:10]}))
"""


def test_under_pressure_partitions_with_a_callback_are_asked_to_loan_pages(system, tmp_path):
    system.up(config_text(pool="8MiB", partitions=[("p1", "8MiB"), ("p2", "32MiB")]))
    done = tmp_path / "done"
    p1 = system.run("p1", PY, program(tmp_path, "pressure.py", PRESSURE), str(done))
    assert p1.stdout.readline().strip() == "ready"
    # the other partition fills 4x the pool: the pool runs low
    assert finish(system.workload("p2", "write", "--generation", "1"))[0] == 0
    assert finish(system.workload("p2", "verify", "--generation", "1"))[0] == 0
    st = system.wait_for(lambda s: s["partitions"][0]["frames_loaned"] > 0, "loans")
    done.touch()
    rc, out, err = finish(p1)
    assert rc == 0, err
    r = last_json(out)
    assert r["bad"] == [] and r["asked"] > 0 and r["given"] > 0
    p = st["partitions"][0]
    assert p["loans_asked"] > 0 and p["loaned_pages"] >= p["frames_loaned"] > 0


# --- advice -----------------------------------------------------------------------------


def test_prefetch_makes_pages_resident_before_they_are_touched(system, tmp_path):
    system.up(config_text(pool="4MiB", partitions=[("p1", "16MiB")]))
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    prog = program(tmp_path, "advice.py", """
        import json, os, time, pyhv
        from pyhv import wire
        from pyhv.pattern import page_pattern
        from pyhv.uffd import PAGE_SIZE as P
        mem = pyhv.attach()

        def status():
            return wire.request(os.environ["PYHV_RUN_DIR"] + "/control.sock",
                                {"op": "partition", "name": "p1"})["partition"]

        before = status()
        t = time.monotonic()
        pyhv.prefetch(256 * P, 256 * P)          # pages 256..511: on the device
        returned = time.monotonic() - t
        deadline = time.monotonic() + 30
        while status()["advised"] < before["advised"] + 256 and time.monotonic() < deadline:
            time.sleep(0.01)
        mid = status()
        bad = [i for i in range(256, 512) if mem[i * P:(i + 1) * P] != page_pattern("p1", i, 1)]
        after = status()
        errors = []
        for args in [(0, len(mem) + P), (-1, P)]:
            try:
                pyhv.prefetch(*args)
            except ValueError as e:
                errors.append(str(e))
        print(json.dumps({"advised": mid["advised"] - before["advised"], "bad": bad,
                          "page_ins_while_touching": after["page_ins"] - mid["page_ins"],
                          "minor": after["minor_faults"] - mid["minor_faults"],
                          "returned_s": returned, "errors": errors}))
    """)
    rc, out, err = finish(system.run("p1", PY, prog))
    assert rc == 0, err
    r = last_json(out)
    assert r["bad"] == []
    assert r["advised"] == 256  # every page was on the device, and was read on advice
    assert r["page_ins_while_touching"] == 0  # touched, they were resident already
    assert len(r["errors"]) == 2 and all(e.startswith("prefetch: ") for e in r["errors"])


# --- suspend and resume (issue 12) ------------------------------------------------------

MID_LOOP = """
    import json, os, random, sys, pyhv
    from pyhv.pattern import page_pattern
    from pyhv.uffd import PAGE_SIZE as P
    mem = pyhv.attach()
    n = len(mem) // P
    gen = [1] * n
    for i in range(n):
        mem[i * P:(i + 1) * P] = page_pattern("p1", i, 1)
    print("ready", flush=True)
    rng = random.Random(3)
    bad = touches = 0
    while not os.path.exists(sys.argv[1]):      # read, check, write anew: dirty pages
        i = rng.randrange(n)
        bad += mem[i * P:(i + 1) * P] != page_pattern("p1", i, gen[i])
        gen[i] += 1
        mem[i * P:(i + 1) * P] = page_pattern("p1", i, gen[i])
        touches += 1
    bad += sum(mem[i * P:(i + 1) * P] != page_pattern("p1", i, gen[i]) for i in range(n))
    print(json.dumps({"touches": touches, "bad": bad}))
"""


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_suspended_partition_frees_its_frames_and_resumes_where_it_was(system, tmp_path):
    system.up(config_text(pool="8MiB", partitions=[("p1", "16MiB"), ("p2", "32MiB")]))
    stop = tmp_path / "stop"
    w = system.run("p1", PY, program(tmp_path, "loop.py", MID_LOOP), str(stop))
    assert w.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # mid-loop
    r = system.pyhv("partition", "suspend", "p1", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["state"] == "suspended" and s["workers_stopped"] == 1 and s["working_set_pages"] > 0
    assert s["pages_written"] > 0  # its dirty pages went to the device
    p1 = system.partition("p1")
    assert p1["state"] == "suspended" and p1["resident_pages"] == 0
    assert p1["pages_by_state"].keys() <= {"on_device"}  # every page written out
    (pid,) = p1["workers"]
    assert proc_state(pid) == "T"  # stopped, alive
    listed = json.loads(system.pyhv("partition", "list", "--json").stdout)["partitions"]
    assert listed[0]["state"] == "suspended"
    # bad input: one line, exit 2, nothing changed
    for args in (["suspend", "p1"], ["suspend", "nosuch"], ["resume", "p2"], ["resume", "nosuch"]):
        bad = system.pyhv("partition", *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, (args, bad.stderr)
    attach = finish(system.run("p1", PY, "-c", "import pyhv; pyhv.attach()"))
    assert attach[0] != 0 and "suspended" in attach[2]
    # another partition uses the frames meanwhile
    assert finish(system.workload("p2", "write", "--generation", "1"))[0] == 0
    assert system.partition("p2")["resident_pages"] > 1024
    assert system.partition("p1")["resident_pages"] == 0
    r = system.pyhv("partition", "resume", "p1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["read_ahead_pages"] > 0
    system.wait_for(lambda st: st["partitions"][0]["advised"] > 0, "the working set read back")
    time.sleep(0.5)
    stop.touch()
    rc, out, err = finish(w)
    assert rc == 0, err
    r = last_json(out)
    assert r["bad"] == 0 and r["touches"] > 0
    assert finish(system.workload("p2", "verify", "--generation", "1"))[0] == 0
