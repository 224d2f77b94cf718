"""Snapshots (issue 12, part 2): `pyhv snapshot save` writes a partition's
memory as an mmap-ninja array a user opens offline, atomically: a SIGKILL
or a full disk in the middle leaves the previous snapshot as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import zlib

import pytest

from conftest import PY, config_text, finish

from pyhv.inject import remove_small_filesystem, small_filesystem
from pyhv.pattern import page_pattern

ninja = pytest.importorskip("mmap_ninja.numpy")


def check_snapshot(path, partition: str, generation: int) -> dict:
    """Every page of the snapshot is the oracle's, and its CRC32 is right."""
    mem = ninja.open_existing(path / "memory")
    crc = ninja.open_existing(path / "crc32")
    pages = mem.shape[0]
    assert mem.shape == (pages, 4096) and str(mem.dtype) == "uint8"
    bad = [i for i in range(pages) if bytes(mem[i]) != page_pattern(partition, i, generation)]
    assert bad == [], bad[:10]
    assert all(zlib.crc32(bytes(mem[i])) == int(crc[i]) for i in range(pages))
    return json.loads((path / "meta.json").read_text())


def test_a_snapshot_opens_offline_with_every_page_and_its_crc(system, tmp_path):
    system.up(config_text(pool="2MiB", partitions=[("p1", "8MiB")]))
    assert finish(system.workload("p1", "write", "--generation", "4"))[0] == 0
    r = system.pyhv("snapshot", "save", "p1", tmp_path / "snap", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    meta = check_snapshot(tmp_path / "snap", "p1", 4)  # (most pages came from the device)
    assert meta["pages"] == out["pages"] == 2048 and meta["poisoned"] == []
    ws = ninja.open_existing(tmp_path / "snap" / "working_set")
    assert 0 < len(ws) <= 512  # the resident pages (the pool holds 512)
    # the partition goes on: a worker attaches and verifies
    assert finish(system.workload("p1", "verify", "--generation", "4"))[0] == 0


def test_a_suspended_partition_is_saved_with_its_workers_alive(system, tmp_path):
    system.up(config_text(pool="2MiB", partitions=[("p1", "4MiB")]))
    stop = tmp_path / "stop"
    prog = tmp_path / "w.py"
    prog.write_text("import os, sys, time, pyhv\n"
                    "from pyhv.pattern import page_pattern\n"
                    "m = pyhv.attach()\n"
                    "for i in range(len(m) // 4096):\n"
                    "    m[i * 4096:(i + 1) * 4096] = page_pattern('p1', i, 2)\n"
                    "print('ready', flush=True)\n"
                    "while not os.path.exists(sys.argv[1]):\n"
                    "    time.sleep(0.01)\n")  # fmt: skip
    w = system.run("p1", PY, prog, str(stop))
    assert w.stdout.readline().strip() == "ready"
    refused = system.pyhv("snapshot", "save", "p1", tmp_path / "snap")
    assert refused.returncode == 2 and "suspend it first" in refused.stderr
    assert system.pyhv("partition", "suspend", "p1").returncode == 0
    r = system.pyhv("snapshot", "save", "p1", tmp_path / "snap", "--json")
    assert r.returncode == 0, r.stderr
    meta = check_snapshot(tmp_path / "snap", "p1", 2)
    assert meta["state"] == "suspended" and meta["working_set_pages"] > 0
    assert system.pyhv("partition", "resume", "p1").returncode == 0
    stop.touch()
    assert finish(w)[0] == 0


def test_an_interrupted_save_leaves_the_previous_snapshot(system, tmp_path):
    system.up(config_text(pool="4MiB", partitions=[("p1", "64MiB")]))
    assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
    snap = tmp_path / "snap"
    assert system.pyhv("snapshot", "save", "p1", snap).returncode == 0
    assert finish(system.workload("p1", "write", "--generation", "2"))[0] == 0
    # SIGKILL of the CLI in the middle of the next save
    p = subprocess.Popen([PY, "-m", "pyhv", "snapshot", "save", "p1", str(snap), "--run-dir",
                          str(system.run_dir)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    partial = tmp_path / f".snap.partial-{p.pid}"
    deadline = time.monotonic() + 60
    while not (partial / "memory").exists() and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    check_snapshot(snap, "p1", 1)  # the previous one, whole
    # the partition was let go (the connection closed): a worker attaches;
    # a new save replaces the old snapshot and clears what the killed one left
    assert finish(system.workload("p1", "verify", "--generation", "2"))[0] == 0
    assert system.pyhv("snapshot", "save", "p1", snap).returncode == 0
    check_snapshot(snap, "p1", 2)
    assert not partial.exists()


def test_a_full_disk_leaves_the_previous_snapshot(system, tmp_path):
    small = tmp_path / "small"
    try:
        small_filesystem(small, 12 << 20)
    except Exception as e:  # noqa: BLE001 (no tmpfs mounts here)
        pytest.skip(f"cannot mount a small tmpfs: {e}")
    try:
        system.up(config_text(pool="2MiB", partitions=[("p1", "8MiB")]))
        assert finish(system.workload("p1", "write", "--generation", "1"))[0] == 0
        snap = small / "snap"
        assert system.pyhv("snapshot", "save", "p1", snap).returncode == 0
        assert finish(system.workload("p1", "write", "--generation", "2"))[0] == 0
        r = system.pyhv("snapshot", "save", "p1", snap, "--json")  # (--json: no progress lines)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no space left" in r.stderr
        check_snapshot(snap, "p1", 1)
        assert [x.name for x in small.iterdir()] == ["snap"]  # nothing half-written left
    finally:
        system.down()
        remove_small_filesystem(small)


def test_bad_snapshot_requests_are_one_line_and_exit_2(system, tmp_path):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    (tmp_path / "notasnap").mkdir()
    (tmp_path / "notasnap" / "precious").write_text("x")
    for args, text in [(["nosuch", tmp_path / "s"], "unknown partition"),
                       (["p1", tmp_path / "no" / "such" / "dir"], "is not a directory"),
                       (["p1", tmp_path / "notasnap"], "is no snapshot")]:  # fmt: skip
        r = system.pyhv("snapshot", "save", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr
    assert (tmp_path / "notasnap" / "precious").read_text() == "x"


# --- restore (issue 12, part 3) ---------------------------------------------------------

RESTORED = """
    import json, os, sys, pyhv
    from pyhv.pattern import page_pattern
    P = 4096
    name = os.environ["PYHV_PARTITION"]
    mem = pyhv.attach()
    n = len(mem) // P
    touched = range(int(sys.argv[1]), n, 10)          # a tenth of the pages
    bad = [i for i in touched if mem[i * P:(i + 1) * P] != page_pattern("p1", i, 1)]
    for i in touched[::2]:                           # and writes half of those anew
        mem[i * P:(i + 1) * P] = page_pattern(name, i, 5)
    again = [i for i in touched if mem[i * P:(i + 1) * P] != (
        page_pattern(name, i, 5) if (i - touched[0]) % 20 == 0 else page_pattern("p1", i, 1))]
    print(json.dumps({"bad": bad[:5], "again": again[:5], "touched": len(touched)}))
"""


@pytest.fixture
def saved(tmp_path):
    """A snapshot of a 16 MiB partition p1 written with generation 1."""
    from conftest import System

    run = tmp_path / "origin"
    run.mkdir()
    s = System(run)
    try:
        s.up(config_text(pool="2MiB", partitions=[("p1", "16MiB")]))
        assert finish(s.workload("p1", "write", "--generation", "1"))[0] == 0
        r = s.pyhv("snapshot", "save", "p1", tmp_path / "snap")
        assert r.returncode == 0, r.stderr
    finally:
        s.down()
    return tmp_path / "snap"


def restored_config(snap, names, extra="", devices="") -> str:
    text = config_text(pool="2MiB", partitions=[(n, "16MiB") for n in names], extra=devices)
    out = []
    for line in text.splitlines():
        out.append(line)
        if line.startswith("name = ") and line.strip('name = "') in names:
            out.append(f'snapshot = "{snap}"')
            out.append(extra)
    return "\n".join(out)


def test_two_partitions_restore_from_one_snapshot_and_pay_for_what_they_touch(
        system, tmp_path, saved):  # fmt: skip
    system.up(restored_config(saved, ["r1", "r2"], "prefetch = false"))
    prog = tmp_path / "restored.py"
    prog.write_text(__import__("textwrap").dedent(RESTORED))
    procs = [system.run(n, PY, prog, str(k)) for k, n in enumerate(["r1", "r2"])]
    for p in procs:
        rc, out, err = finish(p)
        assert rc == 0, err
        r = json.loads(out.splitlines()[-1])
        assert r["bad"] == [] and r["again"] == [] and r["touched"] > 400
    st = system.status()
    for part in st["partitions"]:
        # each read about the tenth it touched from the snapshot, no more (read-ahead of a
        # run can take a few neighbours): far from all 4096 pages
        assert 400 <= part["snapshot_pages_read"] < 1200, part
        assert part["advised"] == 0 and part["machine_checks"] == 0
    # what one wrote went to its own device: the other, and the snapshot, never see it
    mem = ninja.open_existing(saved / "memory")
    assert bytes(mem[0]) == page_pattern("p1", 0, 1)
    check = tmp_path / "check.py"
    check.write_text("import pyhv\nfrom pyhv.pattern import page_pattern\nm = pyhv.attach()\n"
                     "print(m[0:4096] == page_pattern('r1', 0, 5), "
                     "m[8192:12288] == page_pattern('p1', 2, 1))\n")  # fmt: skip
    rc, out, err = finish(system.run("r1", PY, check))
    assert rc == 0 and out.split() == ["True", "True"], (out, err)
    rc, out, err = finish(system.run("r2", PY, check))
    assert rc == 0 and out.split() == ["False", "True"], (out, err)  # (r2 wrote 1, 21, ...)


def test_restore_reads_the_working_set_ahead_unless_told_not_to(system, tmp_path, saved):
    system.up(restored_config(saved, ["r1"], devices='[[device]]\nid = "spare"\n'
                              'path = "spare.img"\nsize = "16MiB"\n'))  # fmt: skip
    ws = len(ninja.open_existing(saved / "working_set"))
    st = system.wait_for(lambda s: s["partitions"][0]["advised"] > 0, "the working set read")
    assert 0 < ws and st["partitions"][0]["snapshot_pages_read"] > 0
    r = system.pyhv("partition", "add", "r2", "--memory", "16MiB", "--paging", "vios1",
                    "--from-snapshot", saved, "--no-prefetch", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)
    assert system.partition("r2")["advised"] == 0


def test_a_corrupted_snapshot_page_is_a_machine_check(system, tmp_path, saved):
    with open(saved / "memory" / "data.ninja", "r+b") as f:
        f.seek(100 * 4096 + 7)
        f.write(b"\xff\x00\xff")
    system.up(restored_config(saved, ["r1"], "prefetch = false"))
    rc, out, err = finish(system.run("r1", PY, "-c", "import pyhv; m = pyhv.attach(); "
                                     "print(m[99 * 4096]); m[100 * 4096]; print('read')"))
    assert rc == 128 + signal.SIGBUS and "read" not in out.split(), (rc, out, err)
    assert "machine check: partition r1 page 100" in err
    rec = json.loads(system.pyhv("errors", "--json").stdout)["errors"]
    assert rec[0]["page"] == 100 and rec[0]["error"] == "checksum"


def test_bad_restores_are_one_line_and_exit_2(system, tmp_path, saved):
    system.up(config_text(pool="2MiB", partitions=[("p1", "16MiB")], services=("vios1",)))
    for args, text in [(["--memory", "8MiB", "--from-snapshot", saved], "holds 16777216 bytes"),
                       (["--memory", "16MiB", "--from-snapshot", tmp_path / "none"],
                        "is no pyhv snapshot")]:  # fmt: skip
        r = system.pyhv("partition", "add", "x", "--paging", "vios1", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr
    assert [p["name"] for p in system.status()["partitions"]] == ["p1"]


# --- migration (issue 12, part 4) -------------------------------------------------------


def test_a_partition_moves_between_systems_through_its_shared_device(tmp_path):
    from conftest import System

    shared = tmp_path / "shared.img"
    a, b = System(tmp_path / "a"), System(tmp_path / "b")
    for s in (a, b):
        s.run_dir.mkdir()
    try:
        a.up(f'[pool]\nsize = "2MiB"\n[[paging_service]]\nname = "vios1"\n'
             f'[[device]]\nid = "shared"\npath = "{shared}"\nsize = "16MiB"\n'
             f'[[partition]]\nname = "p1"\nmemory = "16MiB"\ndevice = "shared"\n')
        b.up('[pool]\nsize = "2MiB"\n[[paging_service]]\nname = "vios1"\n')  # no partition
        assert b.status()["partitions"] == []
        assert finish(a.workload("p1", "write", "--generation", "7"))[0] == 0
        out = tmp_path / "moving"
        r = b.pyhv("partition", "import", out)
        assert r.returncode == 2 and "no pyhv export" in r.stderr  # nothing exported yet
        r = a.pyhv("partition", "export", "p1", out, "--json")
        assert r.returncode == 0, r.stderr
        assert a.status()["partitions"] == [] and (out / "meta.json").is_file()
        copy = tmp_path / "copy"
        __import__("shutil").copytree(out, copy)
        r = b.pyhv("partition", "import", out, "--json")
        assert r.returncode == 0, r.stderr
        p = b.partition("p1")
        assert p["resident_pages"] == 0 and p["pages_by_state"].get("on_device", 0) > 3000
        rc, o, err = finish(b.workload("p1", "verify", "--generation", "7"))
        assert rc == 0, err  # every page, paged in lazily on the importing side
        # an export is taken once; and never live on both: a copy of it cannot take the
        # partition back to the exporting system while b holds the device
        r = a.pyhv("partition", "import", out, "--as", "again")
        assert r.returncode == 2 and "no pyhv export" in r.stderr, r.stderr
        r = a.pyhv("partition", "import", copy, "--as", "again")
        assert r.returncode == 2 and "in use by another system" in r.stderr, r.stderr
        assert a.status()["partitions"] == []
    finally:
        a.down()
        b.down()


def test_export_refuses_a_partition_with_workers_and_bad_directories(system, tmp_path):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    w = system.run("p1", PY, "-c", "import pyhv, sys; m = pyhv.attach(); print('in', flush=True)"
                   "; sys.stdin.read()", stdin=subprocess.PIPE)  # fmt: skip
    assert w.stdout.readline().strip() == "in"
    for args, text in [(["p1", tmp_path / "x"], "live worker"),
                       (["nosuch", tmp_path / "x"], "unknown partition")]:  # fmt: skip
        r = system.pyhv("partition", "export", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr
    out, err = w.communicate(input="", timeout=60)  # (its stdin closes: it exits)
    assert w.returncode == 0, err
    r = system.pyhv("partition", "export", "p1", tmp_path / "no" / "dir")
    assert r.returncode == 2 and "is not a directory" in r.stderr
    assert [p["name"] for p in system.status()["partitions"]] == ["p1"]  # nothing changed


@pytest.mark.parametrize("damage", ["short table", "pages and memory disagree", "bad weight",
                                    "no device", "slot off the device", "name exists"])  # fmt: skip
def test_a_damaged_export_is_refused_and_the_daemon_lives(system, tmp_path, damage):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    dev = tmp_path / "other.img"
    dev.write_bytes(bytes(4 << 20))
    pages = 1024
    meta = {"format": "pyhv-export", "version": 1, "pages": pages,
            "partition": {"name": "x", "memory": 4 << 20, "paging": ["vios1"], "weight": 128},
            "device": {"id": "other", "path": str(dev), "size": 4 << 20, "direct": False}}
    table = bytes(pages) + b"\xff" * 8 * pages + bytes(4 * pages)  # every page: no slot
    if damage == "short table":
        meta.update(pages=1)
        meta["partition"]["memory"] = 16 << 30
        table = table[:13]
    elif damage == "pages and memory disagree":
        meta["partition"]["memory"] = 8 << 20
    elif damage == "bad weight":
        meta["partition"]["weight"] = "heavy"
    elif damage == "no device":
        meta["device"]["path"] = str(tmp_path / "nowhere.img")
    elif damage == "name exists":
        meta["partition"]["name"] = "p1"
    else:
        table = bytes(pages) + (10**9).to_bytes(8, "little") * pages + bytes(4 * pages)
    d = tmp_path / "export"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "table.bin").write_bytes(table)
    r = system.pyhv("partition", "import", d)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    st = system.status()  # the daemon lives, and nothing changed
    assert [p["name"] for p in st["partitions"]] == ["p1"]
    assert not (tmp_path / "nowhere.img").exists()
    assert finish(system.workload("p1", "write"))[0] == 0


def test_the_lifecycle_bench_measures_what_it_says(tmp_path):
    """pyhv bench --only lifecycle's rows (suspend, resume, restore, cold start,
    snapshot reads), on a real system; every touch checked its page."""
    from pyhv.bench_lifecycle import format_lines, run_lifecycle

    r = run_lifecycle(str(tmp_path))
    assert r["suspend_pages_written"] > 0 and 0 < r["working_set_pages"] <= 4096
    for key in ("resume", "resume_no_prefetch", "restore", "restore_no_prefetch"):
        assert 0 < r[key]["touches_s"] <= r[key]["to_1000_s"]
    reads = r["snapshot_reads"]["read"]
    assert all(1638 <= v < 2 * 1638 for v in reads.values()), reads  # a tenth, not all
    assert len(format_lines(r)) == 9
    assert not list(tmp_path.glob("run-lifecycle/control.sock"))  # shut down
