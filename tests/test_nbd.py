"""Paging devices on NBD servers, on real servers in real network namespaces:
nbdkit (file plugin) and qemu-nbd on a host reached over veth links
(pyhv.nbdhost), every page verified against the oracle; a path taken down
under load, a server killed and started again, TLS with a pre-shared key,
EIO from the server, io_timeout, the claim on an export, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time

import pytest

from conftest import PY, assert_one_line_error, finish, pyhv, reports

from pyhv import nbd

SIGBUS_EXIT = 128 + signal.SIGBUS

pytestmark = pytest.mark.skipif(
    not (nbd.available() and shutil.which("nbdkit") and shutil.which("ip") and os.geteuid() == 0),
    reason="needs pyhv built with libnbd (libnbd-dev), nbdkit, iproute2 and root")


@pytest.fixture
def host(tmp_path):
    from pyhv.nbdhost import StorageHost

    hosts = []

    def make(links=1):
        h = StorageHost(links=links)
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.close()


def image(tmp_path, name="pg.img", size=64 << 20) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def nbd_config(path, pool="4MiB", memory="16MiB", services=("vios1",), extra_dev="",
               service_extra="") -> str:  # fmt: skip
    svc = "".join(f'[[paging_service]]\nname = "{s}"\n{service_extra}\n' for s in services)
    paths = json.dumps(path)
    return textwrap.dedent(f"""
        [pool]
        size = "{pool}"
        """) + svc + textwrap.dedent(f"""
        [[device]]
        id = "remote"
        path = {paths}
        services = {json.dumps(list(services))}
        """) + extra_dev + textwrap.dedent(f"""
        [[partition]]
        name = "p1"
        memory = "{memory}"
        device = "remote"
        paging = {json.dumps(list(services))}
        """)  # fmt: skip


def write_verify(system, generation=1, pages=None):
    rc, out, err = finish(system.workload("p1", "write", "--generation", str(generation)))
    assert rc == 0, err
    rc, out, err = finish(system.workload("p1", "verify", "--generation", str(generation),
                                          "--random"))  # fmt: skip
    assert rc == 0, err
    (rep,) = reports(out)
    assert rep["mismatches"] == 0
    if pages is not None:
        assert rep["pages"] == pages
    return rep


def test_a_partition_paged_to_nbdkit_in_another_namespace(host, system, tmp_path):
    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"])
    system.up(nbd_config(h.uri(srv)))
    write_verify(system, pages=4096)
    st = system.status()
    p = st["partitions"][0]
    assert p["page_outs"] >= 4096 - 1024 and p["page_ins"] > 2000  # 16 MiB through a 4 MiB pool
    (dev,) = st["devices"]
    assert dev["type"] == "nbd" and not dev["claim"]["lost"]
    system.wait_for(lambda st: st["devices"][0]["claim"]["beat"] >= 2, "the claim renewed")
    rows = json.loads(system.pyhv("device", "list", "--json").stdout)["devices"]
    q = rows[0]["query"]
    assert q["type"] == "nbd" and q["nbd"]["connections"] >= 1 and q["health"] == "ok"


def test_a_partition_paged_to_qemu_nbd(host, system, tmp_path):
    if not shutil.which("qemu-nbd"):
        pytest.skip("qemu-nbd (Debian qemu-utils) missing")
    h = host()
    srv = h.qemu_nbd(image(tmp_path))
    system.up(nbd_config(h.uri(srv)))
    write_verify(system, generation=2, pages=4096)


def test_the_active_path_goes_down_under_load_and_nothing_is_lost(host, system, tmp_path):
    h = host(links=2)
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"])
    paths = [h.uri(srv, link=0), h.uri(srv, link=1)]
    system.up(nbd_config(paths, memory="32MiB", services=("vios1", "vios2"),
                         service_extra="timeout = 2"))  # fmt: skip
    assert finish(system.workload("p1", "write", "--generation", "3"))[0] == 0
    reader = system.workload("p1", "verify", "--generation", "3", "--random")
    system.wait_for(lambda st: st["partitions"][0]["page_ins"] > 300, "page-ins under way")
    h.link_down(0)  # vios1's path: packets vanish, nothing is answered
    taken = time.time()
    rc, out, err = finish(reader)
    assert rc == 0, err
    assert reports(out)[0]["mismatches"] == 0
    st = system.status()
    s = next(x for svc in st["paging_services"] for x in svc["streams"] if x["partition"] == "p1")
    assert s["service"] == "vios2" and s["paths_lost"] == 1
    (fo,) = s["failovers"]
    assert fo["from"] == "vios1" and fo["to"] == "vios2"
    assert fo["at"] - taken < 2.0 + 1.0  # within the service's timeout (plus a poll)
    assert next(v for v in st["paging_services"] if v["name"] == "vios1")["state"] == "running"
    assert st["partitions"][0]["machine_checks"] == 0
    # and what it wrote after the failover reads back too
    h.link_up(0)
    write_verify(system, generation=4)


def test_a_server_that_dies_and_comes_back_is_reconnected(host, system, tmp_path):
    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"])
    system.up(nbd_config(h.uri(srv), service_extra="timeout = 2"))
    assert finish(system.workload("p1", "write", "--generation", "5"))[0] == 0
    srv.kill()
    reader = system.workload("p1", "verify", "--generation", "5", "--random")
    system.wait_for(lambda st: st["partitions"][0]["stream"] == "SUSPENDED",
                    "the stream waiting for a path")  # fmt: skip
    time.sleep(1.0)
    assert reader.poll() is None  # its fault waits, it does not fail
    srv.restart()
    rc, out, err = finish(reader)
    assert rc == 0, err
    assert reports(out)[0]["mismatches"] == 0
    p = system.status()["partitions"][0]
    assert p["stream"] in ("RESUMED", "ENABLED") and p["machine_checks"] == 0


def test_io_timeout_makes_a_page_in_with_no_path_a_machine_check(host, system, tmp_path):
    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"])
    system.up(nbd_config(h.uri(srv), extra_dev="io_timeout = 1\n",
                         service_extra="timeout = 2"))  # fmt: skip
    assert finish(system.workload("p1", "write", "--generation", "6"))[0] == 0
    srv.kill()
    t0 = time.monotonic()
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "6", "--random"),
                          timeout=60)  # fmt: skip
    assert rc == SIGBUS_EXIT, (rc, out, err)
    assert "machine check" in err and "ETIMEDOUT" in err
    assert time.monotonic() - t0 < 20
    recs = json.loads(system.pyhv("errors", "--json").stdout)["errors"]
    assert recs and recs[0]["error"] == "ETIMEDOUT" and recs[0]["device"] == "remote"


def test_eio_from_the_server_on_a_page_in_is_a_machine_check(host, system, tmp_path):
    h = host()
    trigger = tmp_path / "reads-fail"
    srv = h.nbdkit(["file", f"file={image(tmp_path)}", "error-pread=EIO",
                    f"error-pread-file={trigger}", "error-pread-rate=100%"],
                   filters=["error"])  # fmt: skip
    system.up(nbd_config(h.uri(srv)))
    assert finish(system.workload("p1", "write", "--generation", "7"))[0] == 0
    trigger.touch()
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "7", "--random"))
    assert rc == SIGBUS_EXIT, (rc, out, err)
    assert "machine check" in err and "EIO" in err
    st = system.status()
    assert st["partitions"][0]["machine_checks"] >= 1
    s = st["paging_services"][0]
    assert s["state"] == "running" and s["streams"][0]["paths_lost"] == 0  # the path is fine
    trigger.unlink()


def test_tls_with_a_pre_shared_key(host, system, tmp_path):
    from pyhv.nbdhost import make_psk

    h = host()
    key = make_psk(tmp_path / "server.psk")
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"], tls_psk=key)
    uri = h.uri(srv, tls=True).split("?")[0]  # (the key: tls_psk, not the URI)
    cfg = nbd_config(uri, extra_dev=f'tls_psk = "{key}"\n')
    # the wrong key, and no TLS at all, are refused at `up` in one line
    wrong = make_psk(tmp_path / "wrong.psk")
    (tmp_path / "bad.toml").write_text(nbd_config(uri, extra_dev=f'tls_psk = "{wrong}"\n'))
    p = pyhv("up", "-c", tmp_path / "bad.toml", "--run-dir", tmp_path / "bad", "--detach")
    assert_one_line_error(p, "remote", "TLS refused")
    (tmp_path / "plain.toml").write_text(nbd_config(h.uri(srv)))
    p = pyhv("up", "-c", tmp_path / "plain.toml", "--run-dir", tmp_path / "plain", "--detach")
    assert_one_line_error(p, "remote", "TLS")
    system.up(cfg)
    write_verify(system, generation=8, pages=4096)
    rows = json.loads(system.pyhv("device", "list", "--json").stdout)["devices"]
    assert rows[0]["query"]["nbd"]["tls"] is True


def test_a_second_system_cannot_take_a_claimed_export(host, system, tmp_path):
    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"])
    system.up(nbd_config(h.uri(srv)))
    other = tmp_path / "other.toml"
    other.write_text(nbd_config(h.uri(srv)))
    p = pyhv("up", "-c", other, "--run-dir", tmp_path / "other", "--detach")
    assert_one_line_error(p, "remote", "in use by", str(system.run_dir))
    # the same export by another name (nbdkit serves it under any): the claim knows it
    p = pyhv("device", "add", "again", h.uri(srv) + "other-name", "--run-dir", system.run_dir)
    assert_one_line_error(p, "again", "device 'remote' already")
    system.down()  # its claim is released: another system may page there now
    p = pyhv("up", "-c", other, "--run-dir", tmp_path / "other", "--detach")
    try:
        assert p.returncode == 0, p.stderr
    finally:
        pyhv("shutdown", "--run-dir", tmp_path / "other")


def test_bad_nbd_devices_are_refused_in_one_line(host, system, tmp_path):
    h = host()
    srv = h.nbdkit(["memory", "size=8M"])
    system.up(nbd_config(h.uri(srv), memory="4MiB", pool="1MiB"))
    run = ["--run-dir", system.run_dir]
    for args, words in [
        (["bad", "nbd://"], ["no NBD URI"]),
        (["bad", "nbd://host:99999/x"], ["no NBD URI"]),
        (["bad", "nbd+unix:///x"], ["socket=PATH"]),
        (["bad", "ftp://host/x"], ["scheme"]),
        (["bad", f"nbd://{h.addresses[0]}:1/x"], ["bad", "refused"]),
        (["bad", h.uri(srv), h.uri(srv)], ["2 paths for 1 services"]),
        (["bad", h.uri(srv), "--tls-psk", "/nonexistent"], ["tls_psk"]),
    ]:
        p = pyhv("device", "add", *args, *run)
        assert_one_line_error(p, *words)
    devs = json.loads(system.pyhv("device", "list", "--json").stdout)["devices"]
    assert [d["id"] for d in devs] == ["remote"]  # nothing changed
    # an export smaller than the partition, at up
    small = h.nbdkit(["memory", "size=1M"], port=10811)
    (tmp_path / "small.toml").write_text(nbd_config(h.uri(small), memory="4MiB", pool="1MiB"))
    p = pyhv("up", "-c", tmp_path / "small.toml", "--run-dir", tmp_path / "small", "--detach")
    assert_one_line_error(p, "smaller than its memory")
    # an unreachable server at up (an address nobody answers on: no hang past the connect timeout)
    h.link_down(0)
    t0 = time.monotonic()
    (tmp_path / "gone.toml").write_text(nbd_config(h.uri(small), memory="512KiB", pool="1MiB"))
    p = pyhv("up", "-c", tmp_path / "gone.toml", "--run-dir", tmp_path / "gone", "--detach")
    assert_one_line_error(p, "remote")
    assert time.monotonic() - t0 < nbd.CONNECT_S + 10
    assert PY  # (the interpreter the tests run pyhv with)


def test_a_server_stopped_gracefully_under_load_is_no_machine_check(host, system, tmp_path):
    """nbdkit answers what is in flight ESHUTDOWN while it stops (systemctl
    restart): that is the path going, not the device failing."""
    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}", "rdelay=5ms"], filters=["delay"])
    system.up(nbd_config(h.uri(srv), service_extra="timeout = 2"))
    assert finish(system.workload("p1", "write", "--generation", "9"))[0] == 0
    reader = system.workload("p1", "verify", "--generation", "9", "--random")
    system.wait_for(lambda st: st["partitions"][0]["page_ins"] > 50, "page-ins under way")
    srv.restart()  # SIGTERM, then the same server again
    rc, out, err = finish(reader)
    assert rc == 0, err
    assert reports(out)[0]["mismatches"] == 0
    p = system.status()["partitions"][0]
    assert p["machine_checks"] == 0


def test_io_timeout_fails_only_the_pages_faults_wait_on(host, system, tmp_path):
    """Read-ahead pages queued when the path went are not machine checks:
    after the server is back, every page but the ones a worker faulted on
    reads back whole."""
    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}", "rdelay=5ms"], filters=["delay"])
    system.up(nbd_config(h.uri(srv), memory="32MiB", extra_dev="io_timeout = 1\n",
                         service_extra="timeout = 2"))  # fmt: skip
    assert finish(system.workload("p1", "write", "--generation", "10"))[0] == 0
    reader = system.workload("p1", "verify", "--generation", "10")  # sequential: read-ahead
    system.wait_for(lambda st: st["partitions"][0]["page_ins"] > 200, "read-ahead under way")
    srv.kill()
    rc, out, err = finish(reader, timeout=60)
    assert rc == SIGBUS_EXIT, (rc, out, err)
    recs = json.loads(system.pyhv("errors", "--json").stdout)["errors"]
    assert 1 <= len(recs) <= 2, recs  # the page the worker waited on (and its neighbour's fault)
    srv.restart()
    system.wait_for(lambda st: st["partitions"][0]["stream"] == "RESUMED", "a path again")
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "10"))
    # a page lost to a machine check reads as zeros to a new worker: those, and no other
    assert reports(out)[0]["mismatches"] == len({r["page"] for r in recs}), (out, recs)
    assert rc == 1, err  # (a verify with mismatches says so)


def test_a_stream_whose_service_died_while_the_server_was_down_comes_back(host, system,
                                                                           tmp_path):
    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"])
    system.up(nbd_config(h.uri(srv), service_extra="timeout = 2\nrestart = true"))
    assert finish(system.workload("p1", "write", "--generation", "11"))[0] == 0
    srv.kill()
    os.kill(system.service("vios1")["pid"], signal.SIGKILL)  # its OPEN again finds no server
    system.wait_for(lambda st: st["paging_services"][0]["starts"] == 2, "the service restarted")
    time.sleep(1.5)
    srv.restart()
    rc, out, err = finish(system.workload("p1", "verify", "--generation", "11", "--random"),
                          timeout=60)  # fmt: skip
    assert rc == 0, err
    assert reports(out)[0]["mismatches"] == 0


def test_an_export_removed_can_be_added_again_under_another_id(host, system, tmp_path):
    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"])
    spare = h.nbdkit(["file", f"file={image(tmp_path, 'spare.img')}"], port=10811)
    system.up(nbd_config(h.uri(srv), extra_dev=f'\n[[device]]\nid = "spare"\n'
                                                f'path = "{h.uri(spare)}"\n'))  # fmt: skip
    assert system.pyhv("device", "remove", "spare").returncode == 0
    p = system.pyhv("device", "add", "spare2", h.uri(spare), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["device"]["claim"]["lost"] is False


def test_a_system_whose_claim_was_taken_never_pages_there_again(host, system, tmp_path):
    """Another system overwrote the claim: the stream is fenced, and stays
    so when its service dies and is started again (restart = true)."""
    from pyhv.claim import read_record, write_record
    from pyhv.nbd import NbdDevice

    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"])
    system.up(nbd_config(h.uri(srv), service_extra="timeout = 2\nrestart = true"))
    assert finish(system.workload("p1", "write", "--generation", "12"))[0] == 0
    with NbdDevice(h.uri(srv)) as d:  # what another system taking the export writes
        write_record(d, {**read_record(d), "system": "intruder", "nonce": "intruder",
                         "machine": "elsewhere/boot", "pid": 1})  # fmt: skip
    st = system.wait_for(lambda st: st["devices"][0]["claim"]["lost"]
                         and st["partitions"][0]["stream"] == "SUSPENDED", "fenced")  # fmt: skip
    outs = st["partitions"][0]["page_outs"]
    writer = system.workload("p1", "write", "--generation", "13")
    time.sleep(1.0)
    os.kill(system.service("vios1")["pid"], signal.SIGKILL)
    system.wait_for(lambda st: st["paging_services"][0]["starts"] == 2, "the service restarted")
    time.sleep(2.0)
    p = system.status()["partitions"][0]
    assert p["page_outs"] == outs and p["stream"] == "SUSPENDED"
    writer.kill()


def test_a_foreground_system_is_known_alive_by_its_process(host, tmp_path):
    """`pyhv up` in the foreground, its run directory from PYHV_RUN_DIR: a
    second system on this machine must still see it runs."""
    h = host()
    srv = h.nbdkit(["file", f"file={image(tmp_path)}"])
    (tmp_path / "cfg.toml").write_text(nbd_config(h.uri(srv)))
    run_a = tmp_path / "a"
    a = subprocess.Popen([PY, "-m", "pyhv", "up", "-c", str(tmp_path / "cfg.toml")],
                         env=dict(os.environ, PYHV_RUN_DIR=str(run_a)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (run_a / "control.sock").exists():
            assert a.poll() is None and time.monotonic() < deadline, "system a did not start"
            time.sleep(0.1)
        p = pyhv("up", "-c", tmp_path / "cfg.toml", "--run-dir", tmp_path / "b", "--detach")
        assert_one_line_error(p, "in use by", str(run_a))
    finally:
        a.send_signal(signal.SIGTERM)
        a.wait(60)
