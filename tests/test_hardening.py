"""Defects found by adversarial testing (issue 9): a hostile client, a huge
reply, input that is no config, limits of the machine.  Each test failed
before its fix; all run on real processes and sockets."""

from __future__ import annotations

import json
import os
import socket
import textwrap

import pytest

from conftest import PY, config_text, finish, pyhv

from pyhv import wire

# A client that attaches like a worker, then registers something that is not
# its userfaultfd over the partition's memory.  It prints the reply, and
# whether the hypervisor closed the connection after it.
ROGUE_REGISTER = textwrap.dedent("""
    import mmap, os, socket, sys
    from pyhv import uffd, wire
    kind = sys.argv[1]
    s = wire.connect(os.path.join(os.environ["PYHV_RUN_DIR"], "control.sock"))
    wire.send_control(s, {"op": "attach", "partition": os.environ["PYHV_PARTITION"]})
    reply, (memfd, logfd) = wire.recv_control(s)
    size = reply["size"]
    mem = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    base = uffd.address_of(mem)
    modes = uffd.MODE_MISSING | uffd.MODE_MINOR | uffd.MODE_WP

    def real_uffd(features=reply["features"]):
        fd = uffd.open_uffd()
        uffd.api(fd, features)
        return fd

    if kind == "pipe":
        fd = os.pipe()[0]
    elif kind == "eventfd":
        fd = os.eventfd(0)
    elif kind == "file":
        fd = os.open(sys.executable, os.O_RDONLY)
    elif kind == "devzero":
        fd = os.open("/dev/zero", os.O_RDWR)
    elif kind == "memfd":
        fd = memfd
    elif kind == "uffd-no-features":
        fd = real_uffd(0)
    elif kind == "uffd-wrong-base":  # registered, but the base names other pages
        fd = real_uffd()
        uffd.register(fd, base, size, modes)
        base += 2 * 4096
    elif kind == "uffd-other-memory":  # registered over memory of its own
        other = mmap.mmap(-1, size)
        fd = real_uffd()
        base = uffd.address_of(other)
        uffd.register(fd, base, size, uffd.MODE_MISSING | uffd.MODE_WP)
    elif kind == "uffd-not-the-registered-one":
        uffd.register(real_uffd(), base, size, modes)
        fd = real_uffd()
    wire.send_control(s, {"op": "register", "base": base}, [fd])
    reply, _ = wire.recv_control(s)
    print(reply["ok"], reply.get("error", ""), flush=True)
    print("closed" if wire.recv_control(s)[0] is None else "open", flush=True)
""")

ROGUES = ["pipe", "eventfd", "file", "devzero", "memfd", "uffd-no-features", "uffd-wrong-base",
          "uffd-other-memory", "uffd-not-the-registered-one"]  # fmt: skip


def test_a_bogus_fd_at_registration_is_refused_and_wedges_nobody(system):
    """Every kind of wrong fd is refused with an error and costs only its
    connection; afterwards both partitions page under pressure (a pool of
    a sixteenth of their memory) and verify every page."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB"), ("p2", "8MiB")]))
    for p in ("p1", "p2"):
        assert finish(system.workload(p, "write", "--generation", "1"))[0] == 0
    for kind in ROGUES:
        rc, out, err = finish(system.run("p1", PY, "-c", ROGUE_REGISTER, kind), timeout=60)
        assert rc == 0, (kind, err)
        ok, closed = out.splitlines()
        assert ok.startswith("False") and "bad request" in ok and closed == "closed", (kind, out)
    assert system.partition("p1")["workers"] == []
    procs = [system.workload(p, "write", "--random", "--generation", "2") for p in ("p1", "p2")]
    for p in procs:
        rc, out, err = finish(p, timeout=120)
        assert rc == 0, err
    for p in ("p1", "p2"):
        rc, out, err = finish(system.workload(p, "verify", "--generation", "2"), timeout=120)
        assert rc == 0, err
    log = (system.run_dir / "hypervisor.log").read_text()
    assert "registration refused" in log and "UFFDIO_WRITEPROTECT" not in log


def test_replies_of_any_size_reach_the_caller(system):
    """A status of 80 partitions, an error list, a slot list of every page of
    a 64 MiB partition: each reply is larger than one control message."""
    parts = [(f"p{i}", "1MiB") for i in range(80)] + [("big", "64MiB")]
    system.up(config_text(pool="4MiB", partitions=parts))
    st = system.status()
    assert len(st["partitions"]) == 81
    assert len(json.dumps(st)) > wire.CHUNK
    rc, out, err = finish(system.workload("big", "write"), timeout=120)
    assert rc == 0, err
    r = system.pyhv("inject", "corrupt", "--partition", "big", "--json", "--pages",
                    ",".join(map(str, range(16384))))  # a request of more than one piece too
    assert r.returncode == 0, r.stderr
    slots = json.loads(r.stdout)["slots"]
    assert len(slots) > 15000 and len(r.stdout) > wire.CHUNK
    lst = system.pyhv("partition", "list", "--json")
    assert lst.returncode == 0 and len(json.loads(lst.stdout)["partitions"]) == 81


def test_a_thousand_partitions_list(system):
    parts = [(f"p{i}", "64KiB") for i in range(1000)]
    system.up(config_text(pool="4MiB", partitions=parts))
    r = system.pyhv("partition", "list", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert [p["name"] for p in json.loads(r.stdout)["partitions"]] == [n for n, _ in parts]
    r = system.pyhv("status", timeout=120)
    assert r.returncode == 0 and r.stdout.count("\n") > 1000


def _raw(system) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(str(system.run_dir / "control.sock"))
    return s


@pytest.mark.parametrize("data", [b"[" * 60000, b'{"a":' * 30000 + b"1" + b"}" * 30000,
                                  wire.MORE + b"[" * wire.CHUNK],
                         ids=["lists", "objects", "a-first-piece-never-ended"])  # fmt: skip
def test_deeply_nested_json_gets_an_error_and_the_connection_closes(system, data):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    s = _raw(system)
    s.send(data)
    if data.startswith(wire.MORE):
        s.send(b'{"op":"status"}')  # a whole message where the rest of one was due
    reply, _ = wire.recv_control(s)
    assert reply["ok"] is False and "bad request" in reply["error"]
    assert wire.recv_control(s)[0] is None  # closed
    assert system.status()["pid"] == system.pid


def test_a_request_larger_than_the_daemon_takes_costs_its_connection(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    s = _raw(system)
    with pytest.raises(wire.ProtocolError):
        wire.send_control(s, {"op": "status", "junk": "x" * (2 << 20)})
    pieces = wire.encode_control({"op": "status", "junk": "x" * (2 << 20)}, limit=4 << 20)
    try:
        for piece in pieces:
            s.send(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply, _ = wire.recv_control(s)
    assert reply["ok"] is False and "more than" in reply["error"]
    assert system.status()["pid"] == system.pid


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_fds_sent_with_a_bad_message_are_closed(system):
    """An undecodable message, a piece out of place, a request too large:
    whatever fds came with it are closed, or a client could exhaust the
    daemon's fds and no worker could attach."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    before = _fd_count(system.pid)
    r, w = os.pipe()
    bad = [b"not json", b'{"op":"status"', wire.LAST + b"{}", b"[" * 60000,
           wire.MORE + b"{" + b" " * (wire.CHUNK - 1)]  # fmt: skip
    for data in bad * 20:
        s = _raw(system)
        socket.send_fds(s, [data], [r, w, r, w])
        if data.startswith(wire.MORE):  # fds with a later piece too
            socket.send_fds(s, [wire.LAST + b"}"], [r, w])
        s.close()
    os.close(r)
    os.close(w)
    assert system.status()["pid"] == system.pid  # (and every message has been read)
    assert _fd_count(system.pid) <= before + 2
    rc, out, err = finish(system.workload("p1", "write"))  # workers attach as ever
    assert rc == 0, err


def test_pieces_that_encode_control_would_not_make_are_refused(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    for pieces in ([wire.MORE + b"{}"],  # a first piece that is not whole
                   [wire.MORE + b"{" * wire.CHUNK, wire.MORE + b""]):  # an empty piece
        s = _raw(system)
        for piece in pieces:
            s.send(piece)
        reply, _ = wire.recv_control(s)
        assert reply["ok"] is False and "bad request" in reply["error"]
        assert wire.recv_control(s)[0] is None


def test_a_request_left_unfinished_costs_its_connection(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    s = _raw(system)
    s.settimeout(30)
    s.send(wire.MORE + b"{" + b" " * (wire.CHUNK - 1))  # and nothing more
    reply, _ = wire.recv_control(s)
    assert reply["ok"] is False and "did not arrive whole" in reply["error"]
    assert wire.recv_control(s)[0] is None


def test_pool_resize_beyond_the_machine_is_refused(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    for size in ("1TiB", "4096"):
        r = system.pyhv("pool", "resize", size)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "more memory than this machine can give" in system.pyhv("pool", "resize",
                                                                   "1TiB").stderr
    assert system.status()["pool"]["pages"] == 256


def test_a_partition_whose_metadata_does_not_fit_is_refused_live(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    r = system.pyhv("device", "add", "huge", str(system.run_dir / "huge.img"), "--size", "64TiB")
    assert r.returncode == 0, r.stderr
    r = system.pyhv("partition", "add", "p2", "--memory", "64TiB", "--paging", "vios1")
    assert r.returncode == 2 and "metadata" in r.stderr and "Traceback" not in r.stderr
    assert [p["name"] for p in system.status()["partitions"]] == ["p1"]


def test_a_config_that_is_no_text_file_is_one_line(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)) * 8)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # nobody writes it: reading it would wait forever
    for cfg, words in (("/dev/zero", "not a regular file"), (binary, "not UTF-8"),
                       (fifo, "not a regular file"), (tmp_path, "not a regular file")):
        p = pyhv("up", "-c", cfg, "--run-dir", tmp_path / "run", "--detach", timeout=30)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert words in p.stderr and "Traceback" not in p.stderr


def test_shutdown_says_what_it_stopped(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    pid = system.pid
    r = system.pyhv("shutdown")
    assert r.returncode == 0
    assert f"pid {pid}" in r.stdout and "1 partition" in r.stdout and "vios1" in r.stdout
    assert not (system.run_dir / "control.sock").exists()


def test_inject_rates_are_what_nbdkit_takes():
    from pyhv.inject import InjectUsage, check_rate

    for ok in ("0%", "100%", "12.5%", "0", "1", "0.25", ".5", "1/2", "0/3"):
        assert check_rate(ok, "--read-rate") == ok
    for bad in ("200%", "50 %", "1_0%", "x", "-1", "1.5", "3/2", "1/0", "", "%"):
        with pytest.raises(InjectUsage):
            check_rate(bad, "--read-rate")


def test_inject_faulty_device_validates_before_it_starts(tmp_path):
    for args, words in ((["--read-rate", "200%"], "--read-rate"),
                        (["--write-rate", "x"], "--write-rate"),
                        (["--read-error", "EFOO"], "--read-error")):  # fmt: skip
        p = pyhv("inject", "faulty-device", "start", tmp_path / "fd", *args)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert words in p.stderr
    assert not (tmp_path / "fd" / "nbd.sock").exists()


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_inject_faulty_device_stop_leaves_nothing_behind(tmp_path):
    import shutil

    if not (shutil.which("nbdkit") and shutil.which("nbdfuse")):
        pytest.skip("nbdkit, nbdfuse (Debian nbdkit, libnbd-bin) missing")
    d = tmp_path / "fd"
    for _ in range(2):  # a second start in the same directory works
        p = pyhv("inject", "faulty-device", "start", d, "--size", "1MiB")
        assert p.returncode == 0, p.stderr
        p = pyhv("inject", "faulty-device", "stop", d)
        assert p.returncode == 0, p.stderr
        assert not (d / "nbd.sock").exists() and not (d / "faulty.json").exists()
    p = pyhv("inject", "faulty-device", "stop", d)
    assert p.returncode == 1 and "no faulty device" in p.stderr
