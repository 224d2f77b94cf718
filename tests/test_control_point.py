"""The live control point: pool, partitions, devices and paging services
changed on a running system through `pyhv` subcommands; every invalid
operation is one line, exit 2, and changes nothing."""

from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest

from conftest import PY, config_text, finish, pyhv

TWO = ("vios1", "vios2")


def refused(p, *words):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyhv: error: "), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def snapshot(system) -> dict:
    """What an invalid operation must leave as it was."""
    st = system.status()
    return {
        "pool": st["pool"]["pages"],
        "partitions": sorted((p["name"], p["device"], tuple(p["paging"]), p["stream"],
                              p["service"]) for p in st["partitions"]),
        "devices": sorted((d["id"], d["path"], d["partition"]) for d in st["devices"]),
        "services": sorted((s["name"], s["state"], s["pid"]) for s in st["paging_services"]),
    }  # fmt: skip


def test_pool_resize_grows_and_shrinks_by_evicting(system):
    system.up(config_text(pool="4MiB", partitions=[("p1", "16MiB")]))
    assert finish(system.workload("p1", "write"))[0] == 0
    assert system.status()["pool"]["resident_pages"] > 1024 * 3 // 4  # (128 kept free)
    p = system.pyhv("pool", "resize", "1MiB", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"ok": True, "pages": 256, "old_pages": 1024}
    pool = system.status()["pool"]
    assert pool["pages"] == 256 and pool["resident_pages"] <= 256 and pool["frames_used"] <= 256
    assert system.pyhv("pool", "resize", "8MiB").returncode == 0
    assert system.status()["pool"]["pages"] == 2048
    rc, out, err = finish(system.workload("p1", "verify", "--random"))
    assert rc == 0, err


def test_pool_cannot_shrink_below_what_cannot_be_evicted(system):
    system.up(config_text(pool="4MiB", partitions=[("p1", "16MiB")]))
    assert finish(system.workload("p1", "write"))[0] == 0
    assert system.pyhv("service", "stop", "vios1").returncode == 0  # dirty pages are stuck
    before = snapshot(system)
    refused(system.pyhv("pool", "resize", "1MiB"), "cannot be evicted")
    refused(system.pyhv("pool", "resize", "8KiB"), "smaller than")
    refused(system.pyhv("pool", "resize", "lots"), "not a size")
    assert snapshot(system) == before


HOLD = textwrap.dedent("""
    import time, pyhv
    m = pyhv.attach()
    m[0] = 1
    print("attached", flush=True)
    time.sleep(300)
""")


def test_partition_and_device_lifecycle(system, tmp_path):
    system.up(config_text(pool="4MiB", partitions=[("p1", "8MiB")], services=TWO))
    p = system.pyhv("device", "add", "extra", str(tmp_path / "extra.img"), "--size", "16MiB",
                    "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["device"]["partition"] is None
    p = system.pyhv("partition", "add", "p2", "--memory", "16MiB", "--paging", "vios2,vios1",
                    "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    part = json.loads(p.stdout)["partition"]
    assert part["device"] == "extra" and part["service"] == "vios2" and part["stream"] == "ENABLED"
    assert finish(system.workload("p2", "write", "--generation", "7"))[0] == 0
    rc, out, err = finish(system.workload("p2", "verify", "--generation", "7", "--random"))
    assert rc == 0, err
    listing = system.pyhv("device", "list").stdout
    assert "extra" in listing and "p2" in listing and "vios2" in listing
    rows = {d["id"]: d for d in json.loads(system.pyhv("device", "list", "--json").stdout)[
        "devices"]}  # fmt: skip
    q = rows["extra"]["query"]  # what the paging service reports (QUERY)
    assert q["capacity_pages"] == 4096 and q["type"] == "file" and q["health"] == "ok"
    assert rows["pgdev0"]["query"]["capacity_pages"] == 2048
    assert json.loads(system.pyhv("partition", "list", "--json").stdout)["partitions"][1][
        "name"] == "p2"  # fmt: skip

    holder = system.run("p2", PY, "-c", HOLD)
    assert holder.stdout.readline().strip() == "attached"
    before = snapshot(system)
    refused(system.pyhv("partition", "remove", "p2"), "live worker")
    refused(system.pyhv("device", "remove", "extra"), "serves partition 'p2'")
    assert snapshot(system) == before
    (worker,) = system.partition("p2")["workers"]
    os.kill(worker, signal.SIGKILL)
    holder.wait()
    system.wait_for(lambda st: st["partitions"][1]["workers"] == [], "the worker to go")
    used = system.status()["pool"]["frames_used"]
    p = system.pyhv("partition", "remove", "p2")
    assert p.returncode == 0, p.stderr
    st = system.status()
    assert [x["name"] for x in st["partitions"]] == ["p1"]
    assert st["pool"]["frames_used"] < used  # its frames went back to the pool
    assert system.pyhv("device", "remove", "extra").returncode == 0
    assert [d["id"] for d in system.status()["devices"]] == ["pgdev0"]


def test_invalid_operations_are_refused_and_change_nothing(system, tmp_path):
    system.up(config_text(pool="4MiB", partitions=[("p1", "8MiB")], services=TWO,
                          extra=f'[[device]]\nid = "only1"\npath = "{tmp_path}/only1.img"\n'
                                'size = "8MiB"\nservices = ["vios1"]\n'))  # fmt: skip
    before = snapshot(system)
    cases = [
        (["partition", "add", "p9", "--memory", "8MiB", "--paging", "vios1,vios2", "--device",
          "only1"], ["cannot reach"]),
        (["partition", "add", "p1", "--memory", "8MiB", "--paging", "vios1"], ["exists"]),
        (["partition", "add", "p9", "--memory", "8MiB", "--paging", "nope"], ["nope"]),
        (["partition", "add", "p9", "--memory", "64MiB", "--paging", "vios1"], ["no free device"]),
        (["partition", "add", "p9", "--memory", "big", "--paging", "vios1"], ["not a size"]),
        (["partition", "add", "p9", "--memory", "8MiB", "--paging", "vios1", "--device",
          "pgdev0"], ["already assigned"]),
        (["partition", "remove", "nope"], ["nope"]),
        (["device", "remove", "nope"], ["nope"]),
        (["device", "remove", "pgdev0"], ["serves partition"]),
        (["device", "add", "pgdev0", str(tmp_path / "x.img"), "--size", "8MiB"], ["exists"]),
        (["device", "add", "dup", str(system.run_dir / "pg0.img")], ["pgdev0"]),
        (["device", "add", "d9", "/dev/pyhv-none"], ["does not exist"]),
        (["device", "add", "d9", str(tmp_path / "y.img"), "--services", "nope"], ["nope"]),
        (["service", "stop", "nope"], ["nope"]),
        (["service", "start", "vios1"], ["running already"]),
        (["service", "switch", "nope"], ["nope"]),
        (["service", "switch", "p1"], ["no redundant"]),
        (["pool", "resize", "-5"], ["size"]),
    ]  # fmt: skip
    for argv, words in cases:
        refused(system.pyhv(*argv), *words)
        assert snapshot(system) == before, argv


def test_a_device_in_use_by_another_system_is_refused(system, tmp_path):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    taken = system.run_dir / "pg0.img"
    other = tmp_path / "other"
    other.mkdir()
    cfg = other / "c.toml"
    cfg.write_text(config_text(pool="1MiB", partitions=[("q1", "4MiB")]).replace(
        'path = "pg0.img"', f'path = "{taken}"'))  # fmt: skip
    p = pyhv("up", "-c", cfg, "--run-dir", other / "run", "--detach")
    refused(p, "in use by another system")
    assert not (other / "run" / "control.sock").exists()
    # and live: a second system may not add it as a device either
    cfg.write_text(config_text(pool="1MiB", partitions=[("q1", "4MiB")]))
    pyhv("up", "-c", cfg, "--run-dir", other / "run", "--detach", check=True)
    try:
        refused(pyhv("device", "add", "stolen", taken, "--run-dir", other / "run"),
                "in use by another system")  # fmt: skip
    finally:
        pyhv("shutdown", "--run-dir", other / "run")


@pytest.mark.parametrize("argv", [
    ["pool", "resize"], ["partition", "add", "x"], ["device", "add", "x"],
    ["service", "frob", "x"], ["partition"],
], ids=lambda a: " ".join(a))  # fmt: skip
def test_bad_control_point_command_lines(system, argv):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    refused(system.pyhv(*argv))
