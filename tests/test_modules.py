"""Each module on its own: config, pool, wire, pattern, paging device, and
the paging service process driven over a real socketpair."""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import subprocess
import sys
import zlib

import pytest

from pyhv import wire
from pyhv.config import ConfigError, load_config_text, parse_size
from pyhv.device import PagingDevice
from pyhv.pattern import page_pattern
from pyhv.pool import Pool

from conftest import config_text

P = 4096


@pytest.mark.parametrize("text,n", [(4096, 4096), ("4096", 4096), ("16MiB", 16 << 20),
                                    ("16 MiB", 16 << 20), ("1G", 1 << 30), ("2kib", 2048),
                                    ("1GiB", 1 << 30), ("3M", 3 << 20)])  # fmt: skip
def test_parse_size_units(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "MiB", "1.5MiB", "12 parsecs", -1, 0, True, None, [1]])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_config_picks_the_best_fitting_free_device(tmp_path):
    text = """
        [pool]
        size = "4MiB"
        [[paging_service]]
        name = "a"
        [[device]]
        id = "big"
        path = "big.img"
        size = "64MiB"
        [[device]]
        id = "small"
        path = "small.img"
        size = "8MiB"
        [[device]]
        id = "mid"
        path = "mid.img"
        size = "16MiB"
        [[partition]]
        name = "x"
        memory = "8MiB"
        [[partition]]
        name = "y"
        memory = "8MiB"
        [[partition]]
        name = "z"
        memory = "8MiB"
        device = "small"
    """
    cfg = load_config_text(text.replace("        ", ""), tmp_path)
    assert {p.name: p.device for p in cfg.partitions} == {"z": "small", "x": "mid", "y": "big"}
    assert cfg.devices[0].path == tmp_path / "big.img"  # relative to the run directory
    assert cfg.partitions[0].paging == ["a"] and cfg.partitions[0].weight == 128


def test_config_round_trips_through_json(tmp_path):
    from pyhv.config import Config

    cfg = load_config_text(config_text(pool="1MiB", partitions=[("p1", "4MiB")]), tmp_path)
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_pool_hands_frames_to_waiters_in_order():
    pool = Pool(2)
    assert pool.try_take() and pool.try_take()
    assert not pool.try_take()
    served = []
    pool.waiters.append(lambda: served.append("a"))
    pool.waiters.append(lambda: served.append("b"))
    assert pool.shortfall(reserve=1) == 3
    assert pool.shortfall(reserve=1, evicting=2) == 1
    pool.release()
    assert served == ["a"] and pool.used == 2
    pool.release()
    pool.release()
    assert served == ["a", "b"] and pool.used == 1
    assert pool.high_water == 2
    assert not pool.waiters and pool.try_take()  # no one waits: a free frame is taken at once


def test_pattern_depends_on_partition_page_and_generation():
    base = page_pattern("p1", 7, 1)
    assert len(base) == P
    assert base == page_pattern("p1", 7, 1)
    others = {page_pattern("p2", 7, 1), page_pattern("p1", 8, 1), page_pattern("p1", 7, 2)}
    assert base not in others and len(others) == 3
    assert base != bytes(P)


def test_wire_control_round_trip_with_fds():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    wire.send_control(a, {"op": "x", "n": 1}, [r])
    msg, fds = wire.recv_control(b)
    assert msg == {"op": "x", "n": 1} and len(fds) == 1
    os.write(w, b"hi")
    assert os.read(fds[0], 2) == b"hi"
    wire.close_fds(fds + [r, w])
    a.sendall(b"not json")
    with pytest.raises(wire.ProtocolError):
        wire.recv_control(b)
    a.close()
    assert wire.recv_control(b) == (None, [])


def test_wire_header_round_trip_and_short_frame():
    h = wire.pack_header(7, 3, wire.OP_WRITE, -5, 11, 2, 99)
    assert len(h) == wire.HEADER.size
    assert wire.unpack_header(h) == (7, 3, wire.OP_WRITE, 0, -5, 11, 2, 99)
    with pytest.raises(wire.ProtocolError):
        wire.unpack_header(h[:10])


def _aligned(n_pages: int) -> memoryview:
    return memoryview(mmap.mmap(-1, n_pages * P))


@pytest.mark.parametrize("direct", [False, True])
def test_device_write_read_and_checksum(tmp_path, direct):
    path = tmp_path / "dev.img"
    dev = PagingDevice("d0", path, "file", 8 * P, direct)
    dev.open()
    assert path.stat().st_size == 8 * P  # created at its size
    pages = [page_pattern("p", 3, 1), page_pattern("p", 4, 1)]
    crcs = [zlib.crc32(x) for x in pages]
    buf = _aligned(2)
    buf[:] = b"".join(pages)
    with pytest.raises(OSError) as e:  # a page that does not match its CRC is not written
        dev.write(3, 2, buf, [crcs[0], crcs[1] ^ 1])
    assert e.value.errno == errno.EBADMSG
    dev.write(3, 2, buf, crcs)
    out = _aligned(2)
    dev.read(3, 2, out, crcs)
    assert out[:P] == pages[0] and out[P:] == pages[1]
    with pytest.raises(OSError) as e:  # never written: zeros do not match, never returned
        dev.read(5, 1, out, [crcs[0]])
    assert e.value.errno == errno.EBADMSG
    with open(path, "r+b") as f:  # a byte changes behind the service's back
        f.seek(4 * P + 100)
        f.write(b"\x00" if pages[1][100] else b"\x01")
    with pytest.raises(OSError) as e:
        dev.read(3, 2, out, crcs)
    assert e.value.errno == errno.EBADMSG
    with pytest.raises(OSError) as e:
        dev.read(7, 2, out, crcs)
    assert e.value.errno == errno.EINVAL
    dev.discard(3, 1)
    with pytest.raises(OSError):
        dev.read(3, 1, out, crcs[:1])
    q = dev.query()
    assert q["capacity_pages"] == 8 and q["type"] == "file" and q["health"] == "ok"
    dev.close()


class ServiceProc:
    """A real paging service process on one end of a socketpair."""

    def __init__(self, tmp_path):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv.service", "--name", "t", "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stderr=open(tmp_path / "svc.log", "wb"))  # fmt: skip
        theirs.close()
        self.req = 0
        hello = wire.unpack_header(self.sock.recv(wire.MAX_FRAME))
        assert hello[0] == 0 and hello[2] == wire.OP_HELLO  # "ready to serve"

    def call(self, stream, op, slot=0, count=0, payload=b""):
        self.req += 1
        self.sock.sendmsg([wire.pack_header(self.req, stream, op, 0, slot, count), payload])
        data = self.sock.recv(wire.MAX_FRAME)
        req, st, o, _f, status, _s, _c, _crc = wire.unpack_header(data)
        assert (req, st, o) == (self.req, stream, op)
        return status, data[wire.HEADER.size :]

    def close(self):
        self.sock.close()
        return self.proc.wait(10)


def test_paging_service_executes_commands(tmp_path):
    svc = ServiceProc(tmp_path)
    spec = {"id": "d0", "path": str(tmp_path / "d0.img"), "kind": "file", "size": 16 * P,
            "direct": True}  # fmt: skip
    assert svc.call(0, wire.OP_OPEN, payload=json.dumps(spec).encode())[0] == 0
    page = page_pattern("x", 1, 1)
    crc = wire.CRC.pack(zlib.crc32(page))
    assert svc.call(0, wire.OP_WRITE, 5, 1, page + crc) == (0, b"")
    assert svc.call(0, wire.OP_READ, 5, 1, crc) == (0, page)
    assert svc.call(0, wire.OP_READ, 6, 1, crc)[0] == -errno.EBADMSG  # zeros there
    assert svc.call(0, wire.OP_WRITE, 5, 2, page + crc)[0] == -errno.EINVAL  # 1 page for 2
    assert svc.call(0, wire.OP_READ, 5, 1)[0] == -errno.EINVAL  # no CRC to check against
    assert svc.call(0, wire.OP_FLUSH)[0] == 0
    status, q = svc.call(0, wire.OP_QUERY)
    q = json.loads(q)
    assert status == 0 and q["capacity_pages"] == 16 and q["health"] == "degraded"
    assert svc.call(1, wire.OP_READ, 0, 1, crc)[0] == -errno.EBADF  # stream 1 is not open
    assert svc.call(0, 99)[0] == -errno.EOPNOTSUPP
    assert svc.call(0, wire.OP_DISCARD, 5, 1)[0] == 0
    assert svc.call(0, wire.OP_READ, 5, 1, crc)[0] == -errno.EBADMSG
    # end-of-file: the hypervisor is gone, and the service exits
    assert svc.close() == 0


def test_every_paging_command_has_one_definition():
    assert sorted(c.name for c in wire.COMMANDS) == sorted(wire.OP_NAMES.values())
    assert len({c.op for c in wire.COMMANDS}) == len(wire.COMMANDS)
    for c in wire.COMMANDS:
        assert set(c.device) == {"file", "block"}


def test_a_malformed_frame_costs_the_sender_its_connection(tmp_path):
    svc = ServiceProc(tmp_path)
    svc.sock.send(b"\x01\x02")
    assert svc.sock.recv(100) == b""  # closed, no reply to a frame without a request id
    assert svc.proc.wait(10) == 1
    log = (tmp_path / "svc.log").read_text()
    assert "shorter than a header" in log and "Traceback" not in log
    svc.sock.close()
