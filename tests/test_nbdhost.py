"""Storage hosts (pyhv.nbdhost): real nbdkit and qemu-nbd servers in network
namespaces, reached over veth pairs, checked with libnbd's nbdinfo/nbdcopy."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# The module of this checkout, whatever pyhv the interpreter has installed.
MODULE = Path(__file__).resolve().parents[1] / "pyhv" / "nbdhost.py"
_spec = importlib.util.spec_from_file_location("pyhv_nbdhost_under_test", MODULE)
nbdhost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbdhost)

_why = nbdhost.unavailable() or (None if shutil.which("nbdcopy")
                                 else "nbdcopy is not installed (Debian package libnbd-bin)")
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

MiB = 1 << 20


def nbdinfo(*args, timeout=10) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=timeout)


def export_info(uri: str) -> dict:
    p = nbdinfo("--json", uri)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["exports"][0]


def nbdcopy(src, dst) -> None:
    p = subprocess.run(["nbdcopy", "--flush", str(src), str(dst)], capture_output=True, text=True,
                       timeout=20)  # fmt: skip
    assert p.returncode == 0, p.stderr


def leftovers(host_name: str, veths: list[str], subnets: list[str]) -> list[str]:
    """What of a host is still on this machine."""
    left = []
    if host_name in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                   text=True).stdout.split():  # fmt: skip
        left.append(f"netns {host_name}")
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout)
    left += [f"link {v}" for v in veths if v in {x["ifname"] for x in links}]
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True).stdout  # fmt: skip
    left += [f"route {s}" for s in subnets if s in routes]
    return left


@pytest.fixture
def host2():
    with nbdhost.StorageHost(links=2) as h:
        yield h


def test_two_links_reach_a_memory_server_over_both_addresses(host2):
    h = host2
    assert len(h.addresses) == 2 and len(set(h.subnets)) == 2
    assert [a.rsplit(".", 1)[1] for a in h.addresses] == ["2", "2"]
    assert [a.rsplit(".", 1)[1] for a in h.root_addresses] == ["1", "1"]
    assert all(len(v) <= 15 for v in h.veths)
    srv = h.nbdkit(["memory", "size=64M"])
    for link in (0, 1):
        info = export_info(h.uri(srv, link))
        assert info["export-size"] == 64 * MiB
        assert info["can_multi_conn"] is True
    assert h.uri(srv, 1) == f"nbd://{h.addresses[1]}:10809/"


def test_several_hosts_at_once_get_subnets_of_their_own():
    with nbdhost.StorageHost(links=2) as a, nbdhost.StorageHost(links=1) as b:
        nets = a.subnets + b.subnets
        assert len(set(nets)) == 3
        assert all(n.prefixlen == 24 and str(n).startswith("10.") for n in nets)
        assert a.name != b.name
        # The same port in two namespaces: two servers.
        sa, sb = a.nbdkit(["memory", "size=1M"]), b.nbdkit(["memory", "size=2M"])
        assert nbdinfo("--size", sa.uri()).stdout.strip() == str(MiB)
        assert nbdinfo("--size", sb.uri()).stdout.strip() == str(2 * MiB)


def test_qemu_nbd_serves_a_file_image_read_write(host2, tmp_path):
    img = tmp_path / "pg.img"
    img.write_bytes(b"")
    os.truncate(img, 8 * MiB)
    srv = host2.qemu_nbd(str(img))
    assert "--cache=none" in srv.args and "--aio=native" in srv.args  # ext4 takes O_DIRECT
    info = export_info(srv.uri(1))
    assert info["export-size"] == 8 * MiB and info["is_read_only"] is False
    assert info["can_multi_conn"] is True  # --shared=8
    data = os.urandom(2 * MiB)
    (tmp_path / "src").write_bytes(data)
    nbdcopy(tmp_path / "src", srv.uri(0))
    nbdcopy(srv.uri(1), tmp_path / "back")
    assert (tmp_path / "back").read_bytes()[: len(data)] == data
    assert img.read_bytes()[: len(data)] == data  # written through to the file


def test_link_down_cuts_one_path_and_link_up_brings_it_back(host2):
    h = host2
    srv = h.nbdkit(["memory", "size=4M"])
    h.link_down(0)
    t = time.monotonic()
    p = nbdinfo("--size", srv.uri(0), timeout=5)
    assert p.returncode != 0 and time.monotonic() - t < 2, p
    assert "No route to host" in p.stderr  # the guard route, not the default route
    assert nbdinfo("--size", srv.uri(1)).stdout.strip() == str(4 * MiB)
    h.link_up(0)
    assert nbdinfo("--size", srv.uri(0)).stdout.strip() == str(4 * MiB)


def test_a_server_restarts_while_links_are_down(host2):
    srv = host2.nbdkit(["memory", "size=1M"])
    host2.link_down(0)
    srv.restart()  # ready through link 1
    assert nbdinfo("--size", srv.uri(1)).stdout.strip() == str(MiB)
    host2.link_down(1)
    srv.restart()  # ready once it listens in its namespace
    host2.link_up(1)
    assert nbdinfo("--size", srv.uri(1)).stdout.strip() == str(MiB)


def test_kill_and_restart_keep_the_file_plugin_data(host2, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * MiB)
    srv = host2.nbdkit(["file", f"file={img}"])
    data = os.urandom(MiB)
    (tmp_path / "src").write_bytes(data)
    nbdcopy(tmp_path / "src", srv.uri())
    pid = srv.proc.pid
    srv.kill()
    assert not srv.running and srv.proc.returncode == -signal.SIGKILL
    assert nbdinfo("--size", srv.uri()).returncode != 0  # refused
    srv.restart()
    assert srv.running and srv.proc.pid != pid
    nbdcopy(srv.uri(1), tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_tls_psk_required_refuses_plain_and_a_wrong_key(host2, tmp_path):
    key = nbdhost.make_psk(tmp_path / "key.psk")
    wrong = nbdhost.make_psk(tmp_path / "wrong.psk")
    assert os.stat(key).st_mode & 0o777 == 0o600
    user, hexkey = Path(key).read_text().strip().split(":")
    assert user == "pyhv" and len(bytes.fromhex(hexkey)) == 32
    srv = host2.nbdkit(["memory", "size=1M"], tls_psk=key)
    good = srv.uri(1, tls=True)
    assert good == f"nbds://pyhv@{host2.addresses[1]}:10809/?tls-psk-file={key}"
    p = nbdinfo("--size", good)
    assert p.returncode == 0 and p.stdout.strip() == str(MiB), p.stderr
    plain = nbdinfo("--size", srv.uri(1))
    assert plain.returncode != 0 and "requires TLS" in plain.stderr
    bad = nbdinfo("--size", good.replace(key, wrong))
    assert bad.returncode != 0 and "gnutls_handshake" in bad.stderr


def test_error_filter_fails_io_while_the_trigger_exists(host2, tmp_path):
    img, trigger = tmp_path / "disk.img", tmp_path / "fail"
    img.write_bytes(b"\0" * MiB)
    srv = host2.nbdkit(["file", f"file={img}", "error=EIO", "error-rate=100%",
                        f"error-file={trigger}"], filters=["error"])  # fmt: skip
    trigger.touch()
    p = subprocess.run(["nbdcopy", srv.uri(), "null:"], capture_output=True, text=True, timeout=10)
    assert p.returncode != 0 and "Input/output error" in p.stderr
    trigger.unlink()
    nbdcopy(srv.uri(), "null:")


def test_delay_refuses_what_nbdkit_would_read_as_no_delay(host2):
    if nbdhost._version("nbdkit") >= (1, 40):
        pytest.skip("nbdkit >= 1.40 takes fractions of a millisecond")
    with pytest.raises(ValueError, match="whole milliseconds"):
        host2.nbdkit(["memory", "size=1M", "rdelay=0.1ms"], filters=["delay"])
    assert host2.servers == []


def test_a_server_that_cannot_start_is_one_line_with_its_words(host2):
    with pytest.raises(nbdhost.HostError, match=r"nbdkit on port \d+ exited.*nosuch") as e:
        host2.nbdkit(["nosuch"], port=10900)
    assert "\n" not in str(e.value)
    assert host2.servers == []


def test_close_leaves_nothing_behind_and_can_be_repeated(tmp_path):
    img = tmp_path / "pg.img"
    img.write_bytes(b"")
    os.truncate(img, 4 * MiB)
    h = nbdhost.StorageHost(links=2)
    name, veths, subnets, tmp = h.name, list(h.veths), [str(s) for s in h.subnets], h.dir
    servers = [h.nbdkit(["memory", "size=1M"]), h.qemu_nbd(str(img))]
    assert leftovers(name, veths, subnets) == [f"netns {name}"] + [f"link {v}" for v in veths] + \
        [f"route {s}" for s in subnets]
    t = time.monotonic()
    h.close()
    assert time.monotonic() - t < 3
    assert all(not s.running for s in servers)
    assert leftovers(name, veths, subnets) == []
    assert not os.path.exists(tmp)
    h.close()
    with pytest.raises(nbdhost.HostError, match="closed"):
        h.nbdkit(["memory", "size=1M"])


def test_a_failure_halfway_through_init_leaves_nothing(monkeypatch):
    made = []
    real = nbdhost.StorageHost._add_link

    def add_link(self, i):
        made.append(self)
        if i == 1:
            raise nbdhost.HostError("injected")
        real(self, i)

    monkeypatch.setattr(nbdhost.StorageHost, "_add_link", add_link)
    with pytest.raises(nbdhost.HostError, match="injected"):
        nbdhost.StorageHost(links=2)
    h = made[0]
    assert len(h.veths) == 1
    assert leftovers(h.name, h.veths, [str(s) for s in h.subnets]) == []
    assert not nbdhost._subnets & set(h.subnets)


def test_a_killed_run_leaves_servers_dead_and_cleanup_stale_removes_the_rest(tmp_path):
    """The test process dies with SIGKILL: its servers die with it
    (PR_SET_PDEATHSIG), cleanup_stale() removes its namespace, veth and guard
    route, and leaves live hosts alone."""
    script = textwrap.dedent(f"""
        import importlib.util, json, os, signal, sys
        spec = importlib.util.spec_from_file_location("nbdhost", {str(MODULE)!r})
        nbdhost = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nbdhost)
        h = nbdhost.StorageHost()
        s = h.nbdkit(["memory", "size=1M"])
        print(json.dumps([h.name, h.veths, [str(n) for n in h.subnets], s.proc.pid, h.dir]),
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    with nbdhost.StorageHost() as live:
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=20)  # fmt: skip
        assert p.returncode == -signal.SIGKILL, p.stderr
        name, veths, subnets, server, tmp = json.loads(p.stdout)
        deadline = time.monotonic() + 2
        while nbdhost._alive(server) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not nbdhost._alive(server)
        assert len(leftovers(name, veths, subnets)) == 3
        removed = nbdhost.cleanup_stale()
        assert f"netns {name}" in removed and f"route unreachable {subnets[0]}" in removed
        assert f"dir {tmp}" in removed and not os.path.exists(tmp)
        assert leftovers(name, veths, subnets) == []
        assert os.path.isdir(live.dir)
        assert leftovers(live.name, live.veths, [str(s) for s in live.subnets]) != []
        live_srv = live.nbdkit(["memory", "size=1M"])
        assert nbdinfo("--size", live_srv.uri()).returncode == 0
