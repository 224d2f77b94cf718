"""Partitions that survive a crash of their hypervisor (issue 14): kill -9
of the hypervisor under a worker that writes and verifies every page; a
supervisor starts a new one, which takes over the partitions' memory, page
tables, devices and workers (pyhv.supervisor, pyhv.hypervisor.recovery)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import PY, config_text, finish

# A worker that goes round after round: every page of its stripe written
# with (partition, page, round), in a shuffled order, then every page
# verified; it prints each round and exits 1 at the first page that is not
# what it wrote.
ROUNDS = """
import os, random, sys, pyhv
from pyhv.pattern import page_pattern
from pyhv.uffd import PAGE_SIZE as P
rounds = int(sys.argv[1])
mem = pyhv.attach()
view = memoryview(mem)
me, n = int(os.environ["PYHV_WORKER"]), int(os.environ["PYHV_WORKERS"])
pages = list(range(me, len(mem) // P, n))
rng = random.Random(me)
for r in range(1, rounds + 1):
    rng.shuffle(pages)
    for page in pages:
        view[page * P:(page + 1) * P] = page_pattern("p1", page, r)
    rng.shuffle(pages)
    for page in pages:
        if view[page * P:(page + 1) * P] != page_pattern("p1", page, r):
            print("MISMATCH round", r, "page", page, flush=True)
            sys.exit(1)
    print("round", r, flush=True)
print("verified", len(pages) * rounds, flush=True)
"""


def hypervisor_back(system, pid_before: int, timeout: float = 60.0) -> dict:
    """Wait for a new hypervisor (another pid) to answer; its status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if system.pid != pid_before:
                st = system.status_now()
                if st.get("ok"):
                    return st
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("no new hypervisor came")


def hold_page_outs(system) -> tuple[int, subprocess.Popen]:
    """Stop the paging service at a moment the 2 MiB pool is mostly dirty,
    and shrink the pool to 1 MiB: page-outs queue at the stopped service.
    Its pid, and the resize under way."""
    svc = system.status()["paging_services"][0]["pid"]
    deadline = time.monotonic() + 60  # a moment most of the pool is dirty (the worker writes)
    while system.status_now()["partitions"][0]["pages_by_state"].get("dirty", 0) < 384:
        assert time.monotonic() < deadline, "the pool was never mostly dirty"
        time.sleep(0.01)
    os.kill(svc, signal.SIGSTOP)
    # a smaller pool: dirty pages are written out (to the stopped service)
    shrink = subprocess.Popen([PY, "-m", "pyhv", "pool", "resize", "1MiB", "--run-dir",
                               str(system.run_dir)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    return svc, shrink


def wait_line(p: subprocess.Popen, prefix: str) -> str:
    while True:
        line = p.stdout.readline()
        assert line, f"worker ended before {prefix!r}: {p.stderr.read() if p.poll() is not None else ''}"
        if line.startswith(prefix):
            return line


def test_three_kills_under_verifying_workers(system):
    system.up(config_text(pool="2MiB", partitions=[("p1", "16MiB")],
                          extra="[hypervisor]\nrecovery_timeout = 60\n"))  # fmt: skip
    p = system.run("p1", PY, "-c", ROUNDS, "6", workers=2)
    for k in range(1, 4):
        wait_line(p, f"round {k}")  # (the other worker is somewhere in its round too)
        time.sleep(0.2 * k)  # a different moment of a round each time
        old = system.pid
        os.kill(old, signal.SIGKILL)
        st = hypervisor_back(system, old)
        assert st["hypervisor"]["restarts"] == k
    rc, out, err = finish(p, timeout=300)
    assert rc == 0, (out, err)
    assert "MISMATCH" not in out
    verified = [int(line.split()[1]) for line in out.splitlines() if line.startswith("verified")]
    assert sum(verified) == 4096 * 6, out  # every page of 16 MiB, six rounds
    st = system.status()
    part = st["partitions"][0]
    assert st["hypervisor"]["restarts"] == 3
    assert part["machine_checks"] == 0
    assert part["page_outs"] > 4096 and part["page_ins"] > 0  # (the engine's counters live on)


def test_page_in_and_page_out_in_flight_at_the_kill(system):
    """The paging service is stopped while a worker pages: READs and WRITEs
    wait in flight; the hypervisor is killed then.  The new one reads again
    what was being read and keeps (or confirms from the device) what was
    being written; every page verifies."""
    system.up(config_text(pool="2MiB", partitions=[("p1", "16MiB")],
                          extra="[hypervisor]\nrecovery_timeout = 60\n"))  # fmt: skip
    p = system.run("p1", PY, "-c", ROUNDS, "3")
    wait_line(p, "round 1")
    svc, shrink = hold_page_outs(system)
    deadline = time.monotonic() + 30  # until a page-in and a page-out are in flight
    while time.monotonic() < deadline:
        part = system.status_now()["partitions"][0]
        counts = part["pages_by_state"]
        if counts.get("filling") and counts.get("paging_out"):
            break
        time.sleep(0.02)
    assert counts.get("filling") and counts.get("paging_out"), counts
    old = system.pid
    os.kill(old, signal.SIGKILL)
    shrink.wait(30)
    st = hypervisor_back(system, old)
    rec = st["hypervisor"]["recovered"]
    assert rec["read_again"] >= 1, rec
    assert rec["page_outs_kept"] + rec["page_outs_confirmed"] >= 1, rec
    assert rec["workers"] == 1 and rec["lost"] == 0, rec
    rc, out, err = finish(p, timeout=300)
    assert rc == 0, (out, err)
    assert "verified 12288" in out
    assert not os.path.exists(f"/proc/{svc}")  # the stopped service was reaped, not left


def test_no_hypervisor_within_recovery_timeout_is_exit_70(system):
    system.up(config_text(pool="2MiB", partitions=[("p1", "8MiB")],
                          extra="[hypervisor]\nrecovery_timeout = 1\n"))  # fmt: skip
    p = system.run("p1", PY, "-c", ROUNDS, "1000")
    wait_line(p, "round 1")
    sup = int((system.run_dir / "supervisor.pid").read_text())
    os.kill(sup, signal.SIGKILL)  # nobody to start a new one
    t0 = time.monotonic()
    os.kill(system.pid, signal.SIGKILL)
    rc, out, err = finish(p, timeout=30)
    assert rc == 70, (out, err)
    assert "MISMATCH" not in out
    assert time.monotonic() - t0 >= 0.9  # it waited (about) recovery_timeout first


def test_page_outs_done_but_unanswered_are_confirmed_from_the_device(system):
    """Page-outs queue at a stopped paging service; the hypervisor is
    stopped (SIGSTOP) and the service let go: it writes the pages out and
    punches them, and its answers wait unread; then the hypervisor is
    killed.  Those pages are in no memory: the new hypervisor confirms them
    from the device (their CRC32 read back, as after a failover), and every
    page verifies."""
    system.up(config_text(pool="2MiB", partitions=[("p1", "16MiB")],
                          extra="[hypervisor]\nrecovery_timeout = 60\n"))  # fmt: skip
    p = system.run("p1", PY, "-c", ROUNDS, "6")
    wait_line(p, "round 1")
    svc, shrink = hold_page_outs(system)
    deadline = time.monotonic() + 30  # until page-outs wait at the service
    while not system.status_now()["partitions"][0]["pages_by_state"].get("paging_out"):
        assert time.monotonic() < deadline, "no page-out went to the stopped service"
        time.sleep(0.02)
    old = system.pid
    os.kill(old, signal.SIGSTOP)
    os.kill(svc, signal.SIGCONT)
    time.sleep(0.5)  # (the service writes what it has, and punches it)
    os.kill(old, signal.SIGKILL)
    shrink.wait(30)
    rec = hypervisor_back(system, old)["hypervisor"]["recovered"]
    assert rec["lost"] == 0 and rec["page_outs_confirmed"] >= 1, rec
    rc, out, err = finish(p, timeout=600)
    assert rc == 0, (out, err)
    assert "verified 24576" in out
    assert system.status()["partitions"][0]["machine_checks"] == 0


FORKS = """
import os, sys, pyhv
from pyhv.pattern import page_pattern
from pyhv.uffd import PAGE_SIZE as P
mem = pyhv.attach()
view = memoryview(mem)
n = len(mem) // P
pid = os.fork()
if pid == 0:  # the child pages the whole memory, round after round
    for r in range(1, 7):
        for page in range(n):
            view[page * P:(page + 1) * P] = page_pattern("p1", page, r)
        for page in range(n):
            if view[page * P:(page + 1) * P] != page_pattern("p1", page, r):
                print("MISMATCH", r, page, flush=True)
                os._exit(1)
        print("round", r, flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_a_forked_child_survives_a_kill(system):
    """A worker's child faults through a uffd only the hypervisor had (it
    came with the fork event): the supervisor kept it, the child waits and
    rejoins, and its pages verify."""
    system.up(config_text(pool="2MiB", partitions=[("p1", "8MiB")],
                          extra="[hypervisor]\nrecovery_timeout = 60\n"))  # fmt: skip
    p = system.run("p1", PY, "-c", FORKS)
    wait_line(p, "round 2")
    old = system.pid
    os.kill(old, signal.SIGKILL)
    assert hypervisor_back(system, old)["hypervisor"]["recovered"]["workers"] == 2
    rc, out, err = finish(p, timeout=300)
    assert rc == 0 and "child exit 0" in out, (out, err)
    assert "MISMATCH" not in out


# a child writes every page once, then reads them all back, round after round
CHILD_READS = """
import os, sys, pyhv
from pyhv.pattern import page_pattern
from pyhv.uffd import PAGE_SIZE as P
mem = pyhv.attach()
view = memoryview(mem)
n = len(mem) // P
if os.fork() == 0:
    for page in range(n):
        view[page * P:(page + 1) * P] = page_pattern("p1", page, 1)
    r = 0
    while True:
        r += 1
        for page in range(n):
            if view[page * P:(page + 1) * P] != page_pattern("p1", page, 1):
                print("MISMATCH", r, page, flush=True)
                os._exit(1)
        print("read", r, flush=True)
os.wait()
"""


def test_a_forked_child_with_no_hypervisor_exits_70_and_reads_no_zeros(system):
    """With no supervisor to keep its uffd, a child's faults still wait (it
    holds its own copy, from adopt) and its watchdog stops it with 70:
    never a page on the device read as zeros."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")],
                          extra="[hypervisor]\nrecovery_timeout = 2\n"))  # fmt: skip
    p = system.run("p1", PY, "-c", CHILD_READS)
    wait_line(p, "read 1")
    os.kill(int((system.run_dir / "supervisor.pid").read_text()), signal.SIGKILL)
    os.kill(system.pid, signal.SIGKILL)
    rc, out, err = finish(p, timeout=60)  # (its output closed: the child is gone too)
    assert "MISMATCH" not in out, out  # (a page read as zeros would be one)
    assert rc == 70, (out, err)  # (the parent's watchdog, before it hears of the child)


def test_a_rejoin_outside_a_takeover_is_refused(system):
    """Only a worker the crashed hypervisor had, and not yet back, may
    rejoin, from its own process: a rejoin naming a live worker, or a
    forked child's id, is refused, and the workers go on."""
    from pyhv import wire

    system.up(config_text(pool="2MiB", partitions=[("p1", "8MiB")]))
    p = system.run("p1", PY, "-c", FORKS)
    wait_line(p, "round 1")
    for wid in [1, 2, 3, 1 << 40, (1 << 40) + 1, (1 << 40) + 2]:  # (the worker, its child)
        r = wire.request(str(system.run_dir / "control.sock"),
                         {"op": "rejoin", "partition": "p1", "worker": wid})  # fmt: skip
        assert not r["ok"] and "not awaited" in r["error"], (wid, r)
    rc, out, err = finish(p, timeout=300)
    assert rc == 0 and "child exit 0" in out and "MISMATCH" not in out, (out, err)


def test_a_worker_that_attaches_while_the_hypervisor_is_down_waits_for_the_next(system):
    """attach() finds no hypervisor (killed; its supervisor held back so
    that the new one comes late): it waits for the new one, as a worker's
    watchdog would, instead of failing."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")],
                          extra="[hypervisor]\nrecovery_timeout = 60\n"))  # fmt: skip
    sup = int((system.run_dir / "supervisor.pid").read_text())
    old = system.pid
    os.kill(sup, signal.SIGSTOP)
    try:
        os.kill(old, signal.SIGKILL)
        env = dict(os.environ, PYHV_RUN_DIR=str(system.run_dir), PYHV_PARTITION="p1",
                   PYHV_WORKER="0", PYHV_WORKERS="1")  # fmt: skip
        p = subprocess.Popen([PY, "-c", ROUNDS, "2"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        system.procs.append(p)
        time.sleep(1.0)  # (it tries meanwhile; before the fix it failed at once)
    finally:
        os.kill(sup, signal.SIGCONT)
    hypervisor_back(system, old)
    rc, out, err = finish(p, timeout=120)
    assert rc == 0, (out, err)
    assert "verified 2048" in out


def _service_process(name: str, parent: int) -> int | None:
    """The pid of paging service `name` started by process `parent`, if any."""
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"pyhv.service" in argv and name.encode() in argv:
            return int(d)
    return None


def test_a_service_that_hangs_while_the_new_hypervisor_starts_fails_over(system):
    """The new hypervisor's primary service hangs before it opens the
    device (stopped as soon as it exists): it is fenced after its timeout
    and the stream opens on the other service.  The ABORTED stream meanwhile
    is on its way, not a start-up failure: the system goes on (before, the
    new hypervisor shut everything down and the workers exited 70)."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")], services=("vios1", "vios2"),
                          paging=("vios1", "vios2"), service_extra="timeout = 1\n",
                          extra="[hypervisor]\nrecovery_timeout = 60\n"))  # fmt: skip
    p = system.run("p1", PY, "-c", ROUNDS, "4")
    wait_line(p, "round 1")
    sup = int((system.run_dir / "supervisor.pid").read_text())
    old = system.pid
    os.kill(sup, signal.SIGSTOP)
    os.kill(old, signal.SIGKILL)
    os.kill(sup, signal.SIGCONT)
    deadline = time.monotonic() + 30
    svc = None
    while svc is None and time.monotonic() < deadline:
        new = int((system.run_dir / "hypervisor.pid").read_text() or 0)
        svc = _service_process("vios1", new) if new != old else None
    assert svc, "the new hypervisor started no vios1"
    os.kill(svc, signal.SIGSTOP)  # (fenced with SIGKILL after its timeout)
    hypervisor_back(system, old)
    rc, out, err = finish(p, timeout=300)
    assert rc == 0, (out, err)
    assert "verified 4096" in out
    st = system.status()
    assert st["state"] == "running" and st["partitions"][0]["service"] == "vios2"
    assert system.service("vios1")["deaths"] == 1  # (the path was taken: it hung and was fenced)
