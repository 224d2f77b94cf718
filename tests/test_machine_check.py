"""I/O paging errors as machine checks, with faults injected on real backing
files: a corrupted device file, real EIO and ENOSPC from nbdkit's error
filter behind nbdfuse and from a small tmpfs, and a device that disappears.
Every page is checked against the oracle; no worker ever reads wrong data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time

import pytest

from conftest import PY, config_text, finish, pyhv, reports

from pyhv import wire
from pyhv.inject import FaultyDevice, remove_small_filesystem, small_filesystem

SIGBUS_EXIT = 128 + signal.SIGBUS

needs_nbd = pytest.mark.skipif(
    not (shutil.which("nbdkit") and shutil.which("nbdfuse") and os.path.exists("/dev/fuse")),
    reason="nbdkit, nbdfuse (Debian nbdkit, libnbd-bin, fuse3) or /dev/fuse missing")


@pytest.fixture
def faulty(tmp_path):
    devices = []

    def make(size="8MiB", **kw):
        from pyhv.config import parse_size

        dev = FaultyDevice(tmp_path / f"faulty{len(devices)}")
        dev.start(parse_size(size), **kw)
        devices.append(dev)
        return dev

    yield make
    for dev in devices:
        dev.stop()


def faulty_config(dev, pool="1MiB", memory="4MiB", isolation="process", extra=""):
    return textwrap.dedent(f"""
        [pool]
        size = "{pool}"
        [[paging_service]]
        name = "vios1"
        [[device]]
        id = "faulty"
        path = "{dev.path}"
        direct = true
        [[device]]
        id = "good"
        path = "good.img"
        size = "{memory}"
        [[partition]]
        name = "p1"
        memory = "{memory}"
        device = "faulty"
        isolation = "{isolation}"
        [[partition]]
        name = "p2"
        memory = "{memory}"
        device = "good"
    """) + extra


def errors(system) -> list[dict]:
    return json.loads(system.pyhv("errors", "--json").stdout)["errors"]


def test_a_corrupted_device_file_stops_every_worker_that_touches_a_lost_page(system):
    system.up(config_text(pool="2MiB", partitions=[("p1", "8MiB"), ("p2", "8MiB")]))
    for p in ("p1", "p2"):
        assert finish(system.workload(p, "write", "--generation", "1"))[0] == 0
    p = system.pyhv("inject", "corrupt", "--partition", "p1", "--json")
    assert p.returncode == 0, p.stderr
    lost = {page for page, _ in json.loads(p.stdout)["slots"]}
    assert len(lost) > 1000  # everything but the resident pages
    stopped = []
    for i in range(3):  # every reader is stopped at its first lost page, never misled
        rc, out, err = finish(system.workload("p1", "verify", "--generation", "1", "--random",
                                              "--seed", str(i)))  # fmt: skip
        assert rc == SIGBUS_EXIT, (rc, out, err)
        assert reports(out) == []  # it never got to report a mismatch: it read nothing wrong
        assert "pyhv: machine check: partition p1 page" in err and "checksum" in err
        stopped.append(err)
    recs = errors(system)
    assert len(recs) == 3 and all(r["partition"] == "p1" and r["error"] == "checksum"
                                  and r["device"] == "pgdev0" for r in recs)  # fmt: skip
    assert all(len(r["workers"]) == 1 and r["reported_by"] == r["workers"] for r in recs)
    assert {r["page"] for r in recs} <= lost
    assert system.partition("p1")["machine_checks"] == 3
    # a new worker reads a cleared page as zeros, with no SIGBUS
    page = recs[0]["page"]
    rc, out, err = finish(system.run("p1", PY, "-c", f"import pyhv; m = pyhv.attach(); "
                                     f"print(m[{page} * 4096:{page + 1} * 4096] == bytes(4096))"))
    assert rc == 0 and out.strip() == "True", err
    # the other partition, on another device, is whole
    rc, out, err = finish(system.workload("p2", "verify", "--generation", "1", "--random"))
    assert rc == 0, err
    text = system.pyhv("errors").stdout
    assert "checksum" in text and "p1" in text


TWO_WORKERS = textwrap.dedent("""
    import os, sys, time, pyhv
    from pyhv.pattern import page_pattern
    me = int(os.environ["PYHV_WORKER"])
    go = sys.argv[1] + f"/go-{me}"
    mem = pyhv.attach()
    os.write(1, b"ready\\n")  # one write: the two workers share the pipe
    while not os.path.exists(go):
        time.sleep(0.01)
    page = int(sys.argv[2 + me])
    ok = mem[page * 4096:(page + 1) * 4096] == page_pattern("p1", page, 1)
    print(f"worker {me} read page {page}: {ok}", flush=True)
""")


@needs_nbd
@pytest.mark.parametrize("isolation", ["process", "partition"])
def test_eio_on_one_page_stops_whom_the_isolation_policy_says(system, faulty, tmp_path,
                                                              isolation):  # fmt: skip
    dev = faulty()
    system.up(faulty_config(dev, isolation=isolation))
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    run = system.run("p1", PY, "-c", TWO_WORKERS, str(tmp_path), "0", "1", workers=2)
    assert [run.stdout.readline().strip() for _ in range(2)] == ["ready", "ready"]
    dev.fail(reads=True)  # page 0 and 1 were paged out long ago: reading them needs the device
    (tmp_path / "go-0").touch()
    recs = system.wait_for(lambda st: st["partitions"][0]["machine_checks"] == 1, "the check")
    dev.fail(reads=False)
    (tmp_path / "go-1").touch()
    rc, out, err = finish(run)
    assert rc == SIGBUS_EXIT
    assert "worker 0 read page 0" not in out  # it never saw wrong data
    (rec,) = errors(system)
    assert rec["page"] == 0 and rec["error"] == "EIO" and rec["device"] == "faulty"
    if isolation == "process":
        assert "worker 1 read page 1: True" in out  # the other worker went on
        assert len(rec["workers"]) == 1 and rec["action"] == "stop process"
    else:
        assert "worker 1 read page 1" not in out  # stopped with its partition
        assert len(rec["workers"]) == 2 and rec["action"] == "stop partition"
    assert recs["partitions"][1]["machine_checks"] == 0
    rc, out, err = finish(system.workload("p2", "write"))  # the other partition is untouched
    assert rc == 0, err


@needs_nbd
def test_eio_on_page_out_loses_nothing(system, faulty):
    dev = faulty(size="16MiB", write_rate="30%")  # twice the partition: room to go elsewhere
    system.up(faulty_config(dev, memory="8MiB"))
    dev.fail(writes=True)
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    dev.fail(writes=False)
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "1", "--random"))
    assert rc == 0, err
    p1 = system.partition("p1")
    assert p1["page_outs"] > 0 and p1["page_out_errors"] > 0 and p1["machine_checks"] == 0
    # failures at random are no bad slots: hardly any is retired
    assert p1["retired_slots"] <= 64, p1["retired_slots"]
    (row,) = [d for d in system.status()["devices"] if d["id"] == "faulty"]
    assert row["health"] == "degraded"
    rc, out, err = finish(system.workload("p1", "write", "--generation", "2", "--random"))
    assert rc == 0, err  # and the device pages on once it writes again
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "2"))
    assert rc == 0, err


@needs_nbd
def test_a_transient_page_out_failure_leaves_the_device_usable(system, faulty):
    """Every write fails for 4 s on a device no larger than the partition (no
    spare slots): the writer waits, then goes on once writes work again, and
    the slots that failed come back (an outage is no bad block)."""
    dev = faulty(size="4MiB")
    system.up(faulty_config(dev, memory="4MiB"))
    dev.fail(writes=True)
    writer = system.workload("p1", "write", "--generation", "1")
    system.wait_for(lambda st: st["partitions"][0]["page_out_errors"] > 0, "a failed page-out")
    time.sleep(4)
    assert writer.poll() is None  # waiting for frames, not failing
    dev.fail(writes=False)
    rc, out, err = finish(writer, timeout=120)
    assert rc == 0, err
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "1", "--random"))
    assert rc == 0, err
    st = system.wait_for(lambda st: st["partitions"][0]["bad_slots"] == 0, "the slots back")
    p1 = st["partitions"][0]
    assert p1["retired_slots"] == 0 and p1["machine_checks"] == 0


@needs_nbd
def test_enospc_from_the_device_on_page_out_loses_nothing(system, faulty):
    dev = faulty(size="16MiB", write_error="ENOSPC", write_rate="20%")
    system.up(faulty_config(dev, memory="8MiB"))
    dev.fail(writes=True)
    writer = system.workload("p1", "write", "--generation", "2")
    system.wait_for(lambda st: st["partitions"][0]["io_errors"] > 0, "an ENOSPC")
    dev.fail(writes=False)
    assert finish(writer)[0] == 0
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "2", "--random"))
    assert rc == 0, err


@pytest.fixture
def small_fs(tmp_path):
    d = tmp_path / "small"
    try:
        small_filesystem(d, 2 << 20)
    except Exception as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    yield d
    remove_small_filesystem(d)


def test_enospc_from_a_full_filesystem_waits_and_loses_nothing(system, small_fs):
    system.up(config_text(pool="4MiB", partitions=[("p1", "8MiB")]).replace(
        'path = "pg0.img"', f'path = "{small_fs}/pg0.img"'))  # fmt: skip
    writer = system.workload("p1", "write", "--generation", "3")
    system.wait_for(lambda st: st["partitions"][0]["io_errors"] > 0, "ENOSPC on the small fs")
    assert writer.poll() is None  # waiting for frames, not failing
    small_filesystem(small_fs, 32 << 20)  # room again: paging goes on by itself
    rc, out, err = finish(writer)
    assert rc == 0, err
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "3", "--random"))
    assert rc == 0, err
    assert system.partition("p1")["machine_checks"] == 0


@needs_nbd
def test_a_device_that_disappears(system, faulty):
    dev = faulty()
    system.up(faulty_config(dev))
    for p in ("p1", "p2"):
        assert finish(system.workload(p, "write", "--generation", "1"))[0] == 0
    dev.vanish()
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "1"))
    assert rc == SIGBUS_EXIT and "machine check" in err and reports(out) == []
    assert errors(system)[0]["partition"] == "p1"
    rc, out, err = finish(system.workload("p2", "verify", "--generation", "1", "--random"))
    assert rc == 0, err
    assert system.status()["pid"] == system.pid


ROGUE = textwrap.dedent("""
    import importlib, pyhv
    mem = pyhv.attach()
    sessions = importlib.import_module("pyhv.attach")._sessions
    (s,) = [x.sock for x in sessions.values()]
    s.send(b'{"op":"mce","page":3,"pid":1,"seq":0}')      # no such machine check
    s.send(b'{"op":"mce","page":999999,"pid":1}')          # not even a page of it
    print("sent", flush=True)
""")


def test_a_rogue_worker_cannot_raise_or_poison_anything(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB"), ("p2", "4MiB")]))
    for p in ("p1", "p2"):
        assert finish(system.workload(p, "write"))[0] == 0
    rc, out, err = finish(system.run("p1", PY, "-c", ROGUE))
    assert rc == 0 and "sent" in out, err
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # and from no worker at all
    s.connect(str(system.run_dir / "control.sock"))
    wire.send_control(s, {"op": "mce", "page": 0, "pid": 1})
    assert wire.recv_control(s)[0]["ok"] is False
    s.close()
    assert errors(system) == []
    for p in ("p1", "p2"):
        assert system.partition(p)["machine_checks"] == 0
        rc, out, err = finish(system.workload(p, "verify", "--random"))
        assert rc == 0, err


NOT_A_PAGING_ERROR = textwrap.dedent("""
    import mmap, os, sys, tempfile, pyhv
    mem = pyhv.attach()
    mem[0] = 1
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), 7)          # SIGBUS sent, not raised by an access
    with tempfile.TemporaryFile() as f:  # a real SIGBUS outside partition memory
        f.truncate(8192)
        m = mmap.mmap(f.fileno(), 8192)
        f.truncate(0)
        m[4096]
""")


@pytest.mark.parametrize("how", ["kill", "access"])
def test_a_sigbus_that_is_no_paging_error_keeps_its_meaning(system, how):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    rc, out, err = finish(system.run("p1", PY, "-c", NOT_A_PAGING_ERROR, how))
    assert rc == SIGBUS_EXIT
    assert "machine check" not in err
    assert errors(system) == []


ATTACHED_BEFORE = textwrap.dedent("""
    import os, sys, time, pyhv
    mem = pyhv.attach()
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    print("read", mem[0], flush=True)   # page 0 was lost after this worker attached
""")


def test_a_worker_attached_before_the_loss_is_stopped_too_and_later_ones_read_zeros(
        system, tmp_path):  # fmt: skip
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    early = system.run("p1", PY, "-c", ATTACHED_BEFORE, str(tmp_path / "go"))
    assert early.stdout.readline().strip() == "ready"
    assert system.pyhv("inject", "corrupt", "--partition", "p1", "--pages", "0").returncode == 0
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "1"))
    assert rc == SIGBUS_EXIT and "page 0 " in err  # the first toucher
    (tmp_path / "go").touch()
    rc, out, err = finish(early)
    assert rc == SIGBUS_EXIT and "read" not in out, out  # attached before: stopped, no zeros
    (rec,) = errors(system)
    assert len(rec["workers"]) == 2 and len(set(rec["workers"])) == 2
    rc, out, err = finish(system.run("p1", PY, "-c", "import pyhv; print(pyhv.attach()[0])"))
    assert rc == 0 and out.strip() == "0"  # attached after: the cleared page


SPOOF = textwrap.dedent("""
    import os, pyhv, sys
    os.getpid = lambda: int(sys.argv[1])   # claim to be another process
    mem = pyhv.attach()
    print("attached", flush=True)
    import time; time.sleep(60)
""")


def test_a_worker_cannot_claim_another_process_as_its_pid(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]).replace(
        'device = "pgdev0"\n', 'device = "pgdev0"\nisolation = "partition"\n'))  # fmt: skip
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        rogue = system.run("p1", PY, "-c", SPOOF, str(bystander.pid))
        assert rogue.stdout.readline().strip() == "attached"
        assert bystander.pid not in system.partition("p1")["workers"]
        assert system.pyhv("inject", "corrupt", "--partition", "p1", "--pages", "0").returncode == 0
        rc, _, _ = finish(system.workload("p1", "verify", "--generation", "1"))
        assert rc == SIGBUS_EXIT
        assert finish(rogue)[0] == SIGBUS_EXIT  # the partition's real workers are stopped
        assert bystander.poll() is None  # and nobody else
    finally:
        bystander.kill()
        bystander.wait()


def test_inject_errors_are_one_line(system, tmp_path):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    p = system.pyhv("inject", "corrupt", "--partition", "p1", "--pages", "a,b")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    log = tmp_path / "run-errors"
    log.mkdir()
    (log / "errors.jsonl").write_text('{"seq": 1}\n{"seq": 2, "partit\n')
    p = pyhv("errors", "--run-dir", log)
    assert p.returncode == 0 and "no machine checks" in p.stdout
    assert "2 damaged line(s) skipped" in p.stderr and "Traceback" not in p.stderr


@needs_nbd
def test_a_second_start_on_a_faulty_device_is_refused(faulty):
    dev = faulty()
    with open(dev.path, "r+b") as f:
        f.write(b"XXXX")
    p = pyhv("inject", "faulty-device", "start", dev.dir)
    assert p.returncode == 1 and "already" in p.stderr and "Traceback" not in p.stderr
    assert dev.image.read_bytes()[:4] == b"XXXX"
