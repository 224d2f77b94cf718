"""Redundant paging services and controlled shutdown, on real processes:
SIGKILL, SIGSTOP (a hung service), `service stop/start/switch`, automatic
restart.  Every page is verified against the oracle afterwards."""

from __future__ import annotations

import json
import os
import signal
import time

from conftest import config_text, finish, reports

TWO = ("vios1", "vios2")
PAGES_64M = (64 << 20) // 4096


def redundant(pool="16MiB", mem="64MiB", n=2, service_extra=""):
    return config_text(pool=pool, partitions=[(f"p{i + 1}", mem) for i in range(n)],
                       services=TWO, paging=TWO, service_extra=service_extra)  # fmt: skip


def streams_of(st, service):
    svc = next(s for s in st["paging_services"] if s["name"] == service)
    return {x["partition"]: x for x in svc["streams"]}


def test_sigkill_of_the_active_service_while_partitions_write(system):
    system.up(redundant())
    st = system.status()
    assert set(streams_of(st, "vios1")) == {"p1", "p2"}  # primary holds both
    assert streams_of(st, "vios2") == {}
    writers = [system.workload(p, "write", "--generation", "1") for p in ("p1", "p2")]
    system.wait_for(lambda st: all(p["page_outs"] > 500 for p in st["partitions"]),
                    "page-outs under way")  # fmt: skip
    victim = system.service("vios1")["pid"]
    os.kill(victim, signal.SIGKILL)
    for w in writers:
        rc, out, err = finish(w)
        assert rc == 0, err
    st = system.status()
    assert system.service("vios1")["state"] == "dead"
    moved = streams_of(st, "vios2")
    assert set(moved) == {"p1", "p2"}
    for name, s in moved.items():
        assert s["state"] == "RESUMED"
        assert s["transitions"].get("ENABLED->ABORTED") == 1
        assert s["transitions"].get("ABORTED->RESUMED") == 1
    readers = [system.workload(p, "verify", "--generation", "1", "--random") for p in ("p1", "p2")]
    for r in readers:
        rc, out, err = finish(r)
        assert rc == 0, err
        assert reports(out)[0]["mismatches"] == 0 and reports(out)[0]["pages"] == PAGES_64M
    # a failover is timed up to the first request the other service answers
    # (one in flight at the kill, or the readers' first page-in)
    for name, s in streams_of(system.status(), "vios2").items():
        (fo,) = s["failovers"]
        assert fo["from"] == "vios1" and fo["to"] == "vios2" and fo["seconds"] > 0
        print(f"failover {name}: {fo['seconds'] * 1e3:.2f} ms, {fo['in_flight']} in flight")
    for p in system.status()["partitions"]:
        assert p["io_errors"] == 0 and p["machine_checks"] == 0
    # started again by hand, it comes back as standby: the streams stay where they are
    p = system.pyhv("service", "start", "vios1", "--json")
    assert p.returncode == 0, p.stderr
    svc = json.loads(p.stdout)["service"]
    assert svc["state"] == "running" and svc["role"] == "standby" and svc["pid"] != victim
    assert set(streams_of(system.status(), "vios2")) == {"p1", "p2"}


def test_service_stop_moves_streams_while_a_worker_reads(system):
    system.up(redundant(pool="4MiB", mem="16MiB", n=1))
    assert finish(system.workload("p1", "write", "--generation", "2"))[0] == 0
    reader = system.workload("p1", "verify", "--generation", "2", "--random")
    system.wait_for(lambda st: st["partitions"][0]["page_ins"] > 200, "page-ins under way")
    p = system.pyhv("service", "stop", "vios1", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["streams"]["p1"] == {"state": "RESUMED", "service": "vios2"}
    rc, out, err = finish(reader)
    assert rc == 0, err
    st = system.status()
    assert system.service("vios1")["state"] == "stopped"
    s = streams_of(st, "vios2")["p1"]
    assert s["transitions"].get("ENABLED->SUSPENDING") == 1
    assert s["transitions"].get("SUSPENDING->SUSPENDED") == 1
    assert s["transitions"].get("SUSPENDED->RESUMED") == 1
    assert s["failovers"] == []  # a controlled move, not a failover


def test_stopping_the_last_service_suspends_paging_until_one_starts(system):
    system.up(redundant(pool="4MiB", mem="16MiB", n=1))
    assert finish(system.workload("p1", "write", "--generation", "3"))[0] == 0
    assert system.pyhv("service", "stop", "vios1").returncode == 0
    p = system.pyhv("service", "stop", "vios2", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["streams"]["p1"] == {"state": "SUSPENDED", "service": None}
    assert system.partition("p1")["stream"] == "SUSPENDED"
    reader = system.workload("p1", "verify", "--generation", "3", "--random")
    # it runs on resident pages, then a fault that needs the device waits
    system.wait_for(lambda st: st["partitions"][0]["stream_queued"] > 0,
                    "a fault waiting for the device")  # fmt: skip
    time.sleep(0.5)
    assert reader.poll() is None  # still waiting, not failed
    assert system.partition("p1")["stream_queued"] > 0
    p = system.pyhv("service", "start", "vios2")
    assert p.returncode == 0, p.stderr
    rc, out, err = finish(reader)
    assert rc == 0, err
    assert reports(out)[0]["mismatches"] == 0
    s = streams_of(system.status(), "vios2")["p1"]
    # moved to vios2 when vios1 stopped, then back on vios2 when it started again
    assert s["state"] == "RESUMED" and s["transitions"].get("SUSPENDED->RESUMED") == 2


def test_a_hung_service_is_fenced_and_its_streams_fail_over(system):
    system.up(redundant(pool="4MiB", mem="64MiB", n=1, service_extra="timeout = 1\n"))
    hung = system.service("vios1")["pid"]
    os.kill(hung, signal.SIGSTOP)  # alive, but answers nothing: the writer's page-outs hang
    writer = system.workload("p1", "write", "--generation", "4")
    rc, out, err = finish(writer)
    assert rc == 0, err
    st = system.status()
    assert system.service("vios1")["state"] == "dead"
    assert streams_of(st, "vios2")["p1"]["state"] == "RESUMED"
    deadline = time.monotonic() + 10  # fenced: killed, not left to write later
    while os.path.exists(f"/proc/{hung}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{hung}")
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "4", "--random"))
    assert rc == 0, err


def test_a_service_with_restart_comes_back_as_standby(system):
    system.up(redundant(pool="4MiB", mem="8MiB", n=1, service_extra="restart = true\n"))
    first = system.service("vios1")["pid"]
    os.kill(first, signal.SIGKILL)
    st = system.wait_for(lambda st: next(s for s in st["paging_services"]
                                         if s["name"] == "vios1")["starts"] == 2,
                         "vios1 restarted")  # fmt: skip
    svc = next(s for s in st["paging_services"] if s["name"] == "vios1")
    assert svc["state"] == "running" and svc["role"] == "standby" and svc["pid"] != first
    assert svc["deaths"] == 1
    assert streams_of(st, "vios2")["p1"]["state"] == "RESUMED"
    assert finish(system.workload("p1", "write"))[0] == 0


def test_switch_moves_a_stream_by_hand(system):
    system.up(redundant(pool="4MiB", mem="8MiB", n=2))
    assert finish(system.workload("p1", "write", "--generation", "5"))[0] == 0
    p = system.pyhv("service", "switch", "p1")
    assert p.returncode == 0, p.stderr
    assert "vios1 -> vios2 (RESUMED)" in p.stdout
    st = system.status()
    assert set(streams_of(st, "vios2")) == {"p1"} and set(streams_of(st, "vios1")) == {"p2"}
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "5", "--random"))
    assert rc == 0, err


def _two_partitions_on_their_own_services():
    return config_text(pool="4MiB", partitions=[("p1", "16MiB"), ("p2", "16MiB")], services=TWO
                       ).replace('device = "pgdev0"\n', 'device = "pgdev0"\npaging = ["vios1"]\n'
                       ).replace('device = "pgdev1"\n', 'device = "pgdev1"\npaging = ["vios2"]\n')


def test_a_suspended_partition_does_not_stall_the_others(system):
    system.up(_two_partitions_on_their_own_services())
    assert finish(system.workload("p1", "write"))[0] == 0  # the pool is full of p1's dirty pages
    assert system.pyhv("service", "stop", "vios1").returncode == 0
    assert system.partition("p1")["stream"] == "SUSPENDED"
    rc, out, err = finish(system.workload("p2", "write", "--generation", "2"), timeout=120)
    assert rc == 0, err  # p1's pages cannot be written, p2's can: p2 pages on
    p1 = system.partition("p1")  # and no frame was spent on a page-out that cannot go out
    assert p1["pages_by_state"].get("paging_out", 0) == 0 and p1["stream_queued"] == 0
    rc, out, err = finish(system.workload("p2", "verify", "--generation", "2", "--random"))
    assert rc == 0, err
    # p1 still runs on its resident pages, and is whole once its service is back
    assert system.pyhv("service", "start", "vios1").returncode == 0
    rc, out, err = finish(system.workload("p1", "verify", "--random"))
    assert rc == 0, err


def test_remove_of_a_partition_whose_paging_waits_is_refused(system):
    system.up(_two_partitions_on_their_own_services())
    assert finish(system.workload("p1", "write"))[0] == 0
    assert system.pyhv("service", "stop", "vios1").returncode == 0
    reader = system.workload("p1", "verify", "--random")  # its faults queue on the stream
    system.wait_for(lambda st: st["partitions"][0]["stream_queued"] > 0, "queued paging")
    reader.kill()  # the `pyhv run`; the worker itself goes with the shutdown
    (worker,) = system.partition("p1")["workers"]
    os.kill(worker, signal.SIGKILL)
    system.wait_for(lambda st: st["partitions"][0]["workers"] == [], "the worker to go")
    p = system.pyhv("partition", "remove", "p1")
    assert p.returncode == 2 and "start one of vios1 first" in p.stderr, p.stderr
    assert system.pyhv("service", "start", "vios1").returncode == 0
    p = system.pyhv("partition", "remove", "p1")
    assert p.returncode == 0, p.stderr


def test_stop_right_after_start_strands_nothing(system):
    system.up(redundant(pool="4MiB", mem="16MiB", n=1).replace(
        'paging = ["vios1", "vios2"]', 'paging = ["vios1"]'))  # fmt: skip
    assert finish(system.workload("p1", "write", "--generation", "3"))[0] == 0
    assert system.pyhv("service", "stop", "vios1").returncode == 0
    reader = system.workload("p1", "verify", "--generation", "3", "--random")
    system.wait_for(lambda st: st["partitions"][0]["stream_queued"] > 0, "queued paging")
    # start and stop back to back on one connection: the stop meets the OPEN in flight
    from pyhv import wire

    with wire.connect(str(system.run_dir / "control.sock")) as s:
        wire.send_control(s, {"op": "service_start", "name": "vios1"})
        wire.send_control(s, {"op": "service_stop", "name": "vios1"})
        replies = [wire.recv_control(s)[0] for _ in range(2)]
    assert all(r["ok"] for r in replies), replies
    p1 = system.partition("p1")
    assert p1["stream"] == "SUSPENDED" and p1["stream_in_flight"] == 0
    assert "SUSPENDING->RESUMED" not in str(system.status())  # a stop is never undone
    assert reader.poll() is None
    assert system.pyhv("service", "start", "vios1").returncode == 0
    rc, out, err = finish(reader, timeout=60)
    assert rc == 0, err


def test_stop_of_a_hung_service_fails_over_at_its_deadline(system):
    # (64 MiB: the writer must still be writing when the service hangs)
    system.up(redundant(pool="4MiB", mem="64MiB", n=1, service_extra="timeout = 1\n"))
    writer = system.workload("p1", "write", "--generation", "4")
    system.wait_for(lambda st: st["partitions"][0]["page_outs"] > 100, "page-outs under way")
    hung = system.service("vios1")["pid"]
    os.kill(hung, signal.SIGSTOP)
    try:
        p = system.pyhv("service", "stop", "vios1", timeout=60)
    finally:
        if os.path.exists(f"/proc/{hung}"):
            os.kill(hung, signal.SIGCONT)
    assert p.returncode == 0, p.stderr
    assert finish(writer)[0] == 0
    assert streams_of(system.status(), "vios2")["p1"]["state"] == "RESUMED"
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "4", "--random"))
    assert rc == 0, err


def test_switch_is_refused_while_the_stream_is_not_flowing(system):
    system.up(redundant(pool="4MiB", mem="8MiB", n=1))
    assert system.pyhv("service", "stop", "vios1").returncode == 0  # p1 now on vios2
    assert system.pyhv("service", "stop", "vios2").returncode == 0  # and suspended
    p = system.pyhv("service", "switch", "p1")
    assert p.returncode == 2 and "SUSPENDED" in p.stderr, p.stderr
