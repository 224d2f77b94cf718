"""What a hostile or unlucky client, worker or paging service does to a
running system: each case was a real defect once; each test fails without
its fix."""

from __future__ import annotations

import json
import os
import signal
import socket
import textwrap
import time

from conftest import PY, config_text, finish, pyhv

from pyhv import wire


def _service_pid(system) -> int:
    return system.status()["paging_services"][0]["pid"]


WRITE_300 = textwrap.dedent("""
    import pyhv
    m = pyhv.attach()
    for i in range(300):
        m[i * 4096:i * 4096 + 8] = b"AAAAAAAA"
    print("A done", flush=True)
""")

WRITE_PAGE_0 = textwrap.dedent("""
    import pyhv
    m = pyhv.attach()
    m[0:8] = b"BBBBBBBB"
    print("B done", flush=True)
""")

READ_PAGE_0 = "import pyhv; m = pyhv.attach(); print(bytes(m[0:8]).decode())"


def test_a_worker_attaching_during_page_out_cannot_write_behind_it(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "16MiB")]))
    svc = _service_pid(system)
    os.kill(svc, signal.SIGSTOP)  # page-outs stay in flight
    try:
        a = system.run("p1", PY, "-c", WRITE_300)
        deadline = time.monotonic() + 20
        while system.partition("p1")["pages_by_state"].get("paging_out", 0) == 0:
            assert time.monotonic() < deadline, "no page-out in flight"
            time.sleep(0.05)
        assert system.partition("p1")["pages_by_state"].get("paging_out", 0) > 0
        b = system.run("p1", PY, "-c", WRITE_PAGE_0)
        time.sleep(0.5)  # B writes page 0, which is being paged out
    finally:
        os.kill(svc, signal.SIGCONT)
    assert finish(a)[0] == 0 and finish(b)[0] == 0
    rc, out, err = finish(system.run("p1", PY, "-c", READ_PAGE_0))
    assert rc == 0, err
    assert out.strip() == "BBBBBBBB"  # B's write survived the page-out


def test_a_client_that_never_reads_cannot_stall_the_daemon(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hog.connect(str(system.run_dir / "control.sock"))
    hog.setblocking(False)
    sent = 0
    try:
        for _ in range(200):  # status replies are large; it reads none of them
            hog.send(b'{"op":"status"}')
            sent += 1
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    assert sent >= 40
    # workers still attach and fault at once, and other clients are served
    rc, out, err = finish(system.workload("p1", "write"), timeout=60)
    assert rc == 0, err
    assert system.status()["partitions"][0]["first_touches"] == 1024
    hog.close()


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fds(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return out


def test_fds_sent_with_a_request_that_takes_none_are_not_kept(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")]))
    before = _fds(system.pid)
    r, w = os.pipe()
    for _ in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(str(system.run_dir / "control.sock"))
        socket.send_fds(s, [b'{"op":"status"}'], [r, w, r, w])
        reply, fds = wire.recv_control(s)
        assert reply["ok"] is False and "file descriptors" in reply["error"]
        assert s.recv(10) == b""  # and the connection is gone
        s.close()
    os.close(r)
    os.close(w)
    after = _fds(system.pid)
    assert len(after) <= len(before) + 2, {k: v for k, v in after.items() if before.get(k) != v}
    assert system.status()["pid"] == system.pid


REMOVE_AND_TOUCH = textwrap.dedent("""
    import mmap, pyhv
    m = pyhv.attach()
    m[0] = 7
    m[4096] = 9
    m.madvise(mmap.MADV_REMOVE, 0, 4096)  # drops page 0 behind the hypervisor's back
    print("read", m[0], m[4096], flush=True)
""")


def test_a_page_a_worker_removes_reads_as_zeros_without_a_fault_storm(system):
    system.up(config_text(pool="1MiB", partitions=[("p1", "8MiB")]))
    rc, out, err = finish(system.run("p1", PY, "-c", REMOVE_AND_TOUCH), timeout=30)
    assert rc == 0, err
    assert "read 0 9" in out
    part = system.partition("p1")
    assert part["faults"] < 10  # one more fault, not a livelock


def test_up_in_a_run_directory_that_cannot_be_written(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(pool="1MiB", partitions=[("p1", "4MiB")]).replace(
        'path = "pg0.img"', f'path = "{tmp_path}/pg0.img"'))  # fmt: skip
    p = pyhv("up", "-c", cfg, "--run-dir", "/proc/pyhv-run", "--detach")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "cannot use run directory" in p.stderr and "Traceback" not in p.stderr


def test_a_device_in_a_missing_directory_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(pool="1MiB", partitions=[("p1", "4MiB")]).replace(
        'path = "pg0.img"', 'path = "nodir/pg0.img"'))  # fmt: skip
    p = pyhv("up", "-c", cfg, "--run-dir", tmp_path / "run", "--detach")
    assert p.returncode == 2 and "nodir" in p.stderr and "does not exist" in p.stderr


def memfd_pages(pid: int, partition: str = "p1") -> int:
    """Pages really held by a partition's memory memfd (st_blocks): the pool
    bound checked against the kernel, not our own counter. (Not its page
    table's or its error log's memfds, which are not the pool's.)"""
    blocks = {}  # by inode: mmap keeps a second fd of each memfd
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"/memfd:pyhv-{partition} (deleted)":
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                blocks[st.st_ino] = st.st_blocks
        except FileNotFoundError:
            pass
    return sum(blocks.values()) * 512 // 4096


def test_the_kernel_agrees_the_pool_is_never_exceeded(system):
    # one partition: a stat of one memfd is one consistent sample (two memfds
    # sampled one after the other could count a frame that moved twice)
    system.up(config_text(pool="2MiB", partitions=[("p1", "16MiB")]))
    procs = [system.workload("p1", "write", "--read-first", "--stripe", workers=2),
             system.workload("p1", "write", "--random", "--generation", "2")]  # fmt: skip
    samples = []
    while any(p.poll() is None for p in procs):
        samples.append(memfd_pages(system.pid))
    for p in procs:
        assert finish(p)[0] == 0
    pool = system.status()["pool"]["pages"]
    assert len(samples) > 5 and max(samples) <= pool
    assert max(samples) > pool // 2  # it did fill up: the sampling saw real pages
    assert memfd_pages(system.pid) == json.loads(pyhv(
        "status", "--run-dir", system.run_dir, "--json").stdout)["pool"]["resident_pages"]
