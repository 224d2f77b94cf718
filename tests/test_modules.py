"""Each module on its own: config, pool, wire, pattern, paging device, and
the paging service process driven over a real socketpair."""

from __future__ import annotations

import array
import errno
import json
import mmap
import os
import socket
import subprocess
import sys
import zlib

import pytest

from pyhv import uffd, wire
from pyhv.config import ConfigError, load_config_text, parse_size
from pyhv.device import PagingDevice
from pyhv.pattern import page_pattern

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
    assert cfg.poll_us == 300


MINIMAL = '[pool]\nsize = "4MiB"\n[[paging_service]]\nname = "a"\n[[partition]]\nname = "x"\n' \
          'memory = "4MiB"\n[[device]]\nid = "d"\npath = "d.img"\nsize = "4MiB"\n'


@pytest.mark.parametrize("hv,ok", [("poll_us = 0", 0), ("poll_us = 50", 50),
                                   ("poll_us = -1", None), ("poll_us = 1.5", None),
                                   ("poll_us = true", None), ("poll_us = 100001", None),
                                   ("spin = 1", None)])  # fmt: skip
def test_hypervisor_polling_is_configured_and_checked(tmp_path, hv, ok):
    text = MINIMAL + f"[hypervisor]\n{hv}\n"
    if ok is None:
        with pytest.raises(ConfigError, match="hypervisor"):
            load_config_text(text, tmp_path)
    else:
        cfg = load_config_text(text, tmp_path)
        assert cfg.poll_us == ok and type(cfg).from_dict(cfg.to_dict()).poll_us == ok


def test_config_round_trips_through_json(tmp_path):
    from pyhv.config import Config

    cfg = load_config_text(config_text(pool="1MiB", partitions=[("p1", "4MiB")]), tmp_path)
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


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


@pytest.mark.parametrize("direct", [False, True])
def test_device_opens_at_its_size_discards_and_reports(tmp_path, direct):
    path = tmp_path / "dev.img"
    dev = PagingDevice("d0", path, "file", 8 * P, direct)
    dev.open()
    assert path.stat().st_size == 8 * P  # created at its size
    os.pwrite(dev.fd if not direct else os.open(path, os.O_WRONLY), b"x" * P, 3 * P)
    dev.discard(3, 1)
    with open(path, "rb") as f:
        f.seek(3 * P)
        assert f.read(P) == bytes(P)  # punched: zeros
    with pytest.raises(OSError) as e:
        dev.discard(7, 2)
    assert e.value.errno == errno.EINVAL
    q = dev.query()
    assert q["capacity_pages"] == 8 and q["type"] == "file" and q["health"] == "ok"
    assert dev.query(io_errors=2)["health"] == "degraded"
    dev.close()


class ServiceProc:
    """A real paging service process on one end of a socketpair, serving a
    partition memory (a memfd) of `pages` pages."""

    def __init__(self, tmp_path, pages=16):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv.service", "--name", "t", "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stderr=open(tmp_path / "svc.log", "wb"))  # fmt: skip
        theirs.close()
        self.req = 0
        hello = wire.unpack_header(self.sock.recv(wire.MAX_FRAME))
        assert hello[0] == 0 and hello[2] == wire.OP_HELLO  # "ready to serve"
        self.memfd = uffd.memfd("svc-test", pages * P)
        self.mem = mmap.mmap(self.memfd, pages * P)
        self.addr = uffd.address_of(self.mem)

    def send(self, stream, op, slot=0, count=0, payload=b"", fds=(), flags=0):
        self.req += 1
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([wire.pack_header(self.req, stream, op, 0, slot, count, flags=flags),
                           payload], anc)  # fmt: skip
        return self.req

    def recv(self):
        data = self.sock.recv(wire.MAX_FRAME)
        req, st, o, _f, status, _s, _c, _crc = wire.unpack_header(data)
        return req, o, status, data[wire.HEADER.size :]

    def call(self, stream, op, slot=0, count=0, payload=b"", fds=(), flags=0):
        req = self.send(stream, op, slot, count, payload, fds, flags)
        got, o, status, data = self.recv()
        assert (got, o) == (req, op)
        return status, data

    def open(self, tmp_path, stream=0, direct=True, slots=16):
        spec = {"id": "d0", "path": str(tmp_path / "d0.img"), "kind": "file", "size": slots * P,
                "direct": direct, "memory": len(self.mem)}  # fmt: skip
        return self.call(stream, wire.OP_OPEN, payload=json.dumps(spec).encode(),
                         fds=[self.memfd])[0]  # fmt: skip

    def resident(self, page):
        return bool(uffd.in_memory(self.addr + page * P, P)[0] & 1)

    def read(self, stream, slot, count, crcs, into):
        """READ slots into the memory from page `into`: (status, what is there)."""
        status, data = self.call(stream, wire.OP_READ, slot, count, crcs + pages_no(into))
        assert data == b""  # no page data on the socket
        return status, bytes(self.mem[into * P : (into + count) * P]) if status == 0 else None

    def close(self):
        self.sock.close()
        return self.proc.wait(10)


def pages_no(*pages):
    return b"".join(wire.PAGE_NO.pack(p) for p in pages)


def crcs_of(data):
    return [c for (c,) in wire.CRC.iter_unpack(data)]


@pytest.mark.parametrize("direct", [False, True])
def test_paging_service_writes_from_memory_and_reads_back_checked(tmp_path, direct):
    svc = ServiceProc(tmp_path)
    assert svc.open(tmp_path, direct=direct) == 0
    pages = {p: page_pattern("x", p, 1) for p in (2, 3, 9)}
    for p, data in pages.items():
        svc.mem[p * P : (p + 1) * P] = data
    # three pages of memory to slots 5, 6, 7 in one WRITE; the reply has their CRC32s
    status, data = svc.call(0, wire.OP_WRITE, 5, 3, pages_no(2, 3, 9))
    assert status == 0 and crcs_of(data) == [zlib.crc32(pages[p]) for p in (2, 3, 9)]
    assert not any(svc.resident(p) for p in (2, 3, 9))  # on the device, out of memory
    assert svc.resident(0) is False and svc.mem[0] == 0  # (others untouched)
    crcs = data
    # READ puts the pages straight into the memory, at the pages it names
    assert svc.read(0, 5, 3, crcs, into=10) == (0, pages[2] + pages[3] + pages[9])
    assert svc.read(0, 6, 1, crcs[4:8], into=2) == (0, pages[3])
    assert svc.read(0, 8, 1, crcs[:4], into=14)[0] == -errno.EBADMSG  # zeros there
    assert not svc.resident(14)  # what failed is punched out again
    with open(tmp_path / "d0.img", "r+b") as f:  # a byte changes behind the service's back
        f.seek(6 * P + 100)
        f.write(b"\x00" if pages[3][100] else b"\x01")
    assert svc.read(0, 5, 3, crcs, into=4)[0] == -errno.EBADMSG  # never left in memory
    assert not any(svc.resident(p) for p in (4, 5, 6))
    # malformed paging requests are answered with the error, not served
    assert svc.call(0, wire.OP_WRITE, 5, 2, pages_no(2))[0] == -errno.EINVAL  # 1 page for 2
    assert svc.call(0, wire.OP_READ, 5, 1, pages_no(0))[0] == -errno.EINVAL  # no CRC
    assert svc.read(0, 15, 2, crcs[:8], into=0)[0] == -errno.EINVAL  # past the device's end
    assert svc.read(0, 5, 1, crcs[:4], into=16)[0] == -errno.EINVAL  # past the memory's end
    assert svc.call(0, wire.OP_WRITE, 1, 1, pages_no(16))[0] == -errno.EINVAL  # not memory
    assert svc.call(0, wire.OP_FLUSH)[0] == 0
    status, q = svc.call(0, wire.OP_QUERY)
    q = json.loads(q)
    assert status == 0 and q["capacity_pages"] == 16 and q["health"] == "degraded"
    assert svc.read(1, 0, 1, crcs[:4], into=0)[0] == -errno.EBADF  # stream 1 is not open
    assert svc.call(0, 99)[0] == -errno.EOPNOTSUPP
    assert svc.call(0, wire.OP_DISCARD, 5, 1)[0] == 0
    assert svc.read(0, 5, 1, crcs[:4], into=0)[0] == -errno.EBADMSG
    assert svc.call(0, wire.OP_OPEN, payload=b"{}")[0] == -errno.EINVAL  # no memory given
    # end-of-file: the hypervisor is gone, and the service exits
    assert svc.close() == 0


def test_a_retried_write_keeps_what_the_failed_service_wrote(tmp_path):
    """A WRITE resent after the service that held it died: a page already
    gone from memory was written by that service (it punches only after a
    complete write); its CRC32 comes from the device, never from zeros."""
    svc = ServiceProc(tmp_path)
    assert svc.open(tmp_path) == 0
    a, b = page_pattern("r", 1, 1), page_pattern("r", 2, 1)
    svc.mem[P : 2 * P] = a
    svc.mem[2 * P : 3 * P] = b
    assert svc.call(0, wire.OP_WRITE, 4, 1, pages_no(1))[0] == 0  # "the failed service"
    assert not svc.resident(1) and svc.resident(2)
    status, data = svc.call(0, wire.OP_WRITE, 4, 2, pages_no(1, 2), flags=wire.FLAG_RETRY)
    assert status == 0 and crcs_of(data) == [zlib.crc32(a), zlib.crc32(b)]
    assert svc.read(0, 4, 2, data, into=8) == (0, a + b)
    assert not svc.resident(1) and not svc.resident(2)
    assert svc.close() == 0


def test_the_service_serves_many_requests_at_once_and_barriers_wait(tmp_path):
    """32 READs and WRITEs in flight at once all come back, each with its own
    data; a FLUSH sent behind them is answered after every one of them."""
    svc = ServiceProc(tmp_path, pages=64)
    assert svc.open(tmp_path, slots=32) == 0
    for p in range(16):
        svc.mem[p * P : (p + 1) * P] = page_pattern("m", p, 3)
    crc = {}
    for p in range(16):  # slots 0..15
        status, data = svc.call(0, wire.OP_WRITE, p, 1, pages_no(p))
        crc[p] = data
    sent = {}
    for p in range(16):
        sent[svc.send(0, wire.OP_READ, p, 1, crc[p] + pages_no(32 + p))] = ("read", p)
    for p in range(16, 32):  # and 16 other pages to slots 16..31 meanwhile
        svc.mem[p * P : (p + 1) * P] = page_pattern("m", p, 3)
        sent[svc.send(0, wire.OP_WRITE, p, 1, pages_no(p))] = ("write", p)
    flush = svc.send(0, wire.OP_FLUSH)
    seen = set()
    for _ in range(33):
        req, op, status, data = svc.recv()
        assert status == 0, (req, op)
        if req == flush:
            assert seen == set(sent)  # the barrier: after everything sent before it
            continue
        kind, p = sent[req]
        if kind == "read":
            assert data == b"" and svc.mem[(32 + p) * P : (33 + p) * P] == page_pattern("m", p, 3)
        else:
            assert crcs_of(data) == [zlib.crc32(page_pattern("m", p, 3))]
        seen.add(req)
    assert seen == set(sent)
    assert svc.close() == 0


def test_every_paging_command_has_one_definition():
    assert wire.MAX_FRAME == uffd.ServiceEngine.MAX_FRAME  # the C engine agrees
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


def test_the_largest_read_and_write_fit_in_one_message(tmp_path):
    """MAX_PAGES pages in one WRITE and one READ (a full read-ahead window)."""
    n = wire.MAX_PAGES
    svc = ServiceProc(tmp_path, pages=2 * n)
    assert svc.open(tmp_path, slots=n) == 0
    data = b"".join(page_pattern("big", p, 1) for p in range(n))
    svc.mem[: n * P] = data
    status, crcs = svc.call(0, wire.OP_WRITE, 0, n, pages_no(*range(n)))
    assert status == 0
    assert svc.read(0, 0, n, crcs, into=n) == (0, data)
    assert svc.close() == 0


def test_take_back_resends_in_order_marked_retry_but_never_a_discard():
    """After a service fails, its in-flight requests go to the other one in
    their order, marked RETRY; a DISCARD is left out: done again, it could
    wipe a slot that a later WRITE resent with it reuses."""
    from pyhv.stream import Request, Stream

    s = Stream(0, "p", {}, ["a", "b"], -1)
    for rid, op in ((3, wire.OP_WRITE), (1, wire.OP_READ), (2, wire.OP_DISCARD)):
        req = Request(op, rid, 1, None, lambda *a: None)
        req.id = rid
        s.inflight[rid] = req
    back = s.take_back()
    assert [r.op for r in back] == [wire.OP_READ, wire.OP_WRITE]
    assert [r.op for r in s.queued] == [wire.OP_READ, wire.OP_WRITE] and not s.inflight
    assert all(r.flags & wire.FLAG_RETRY for r in s.queued)


def test_slot_health_tells_an_outage_from_a_bad_slot():
    from pyhv.slots import SLOT_STRIKES, SlotHealth

    freed = []
    h = SlotHealth(freed.append)
    # an outage: every write fails, page by page too; nothing is retired
    for rnd in range(10):
        for slot in range(32):
            assert h.failed(slot, now=rnd * 100.0, alone=True) is False
        h.retry(rnd * 100.0 + 99)
    assert not h.retired and h.failing and h.unusable == 0 and len(freed) == 320
    assert h.written(100, 1) == 320  # the outage ends: its length is told once
    assert not h.failing
    # slot 7 fails alone, again and again, while others are written: retired
    for k in range(SLOT_STRIKES):
        h.written(200 + k, 1)
        retired = h.failed(7, now=1000.0 + k, alone=True)
    assert retired and h.retired == {7}
    # a failed batch strikes nobody; a slot written fine is forgotten
    for _ in range(5):
        h.written(300, 1)
        h.failed(9, now=2000.0, alone=False)
        h.retry(5000.0)
    assert 9 not in h.retired
    h.written(9, 1)
    assert 9 not in h.failed_slots
    # out of free slots: the retired ones get another chance
    assert h.unretire() == 1 and not h.retired and freed[-1] == 7


def test_slot_health_holds_dirty_pages_longer_while_an_outage_lasts():
    from pyhv.slots import HOLD, MAX_HOLD, SlotHealth

    h = SlotHealth(lambda slot: None)
    holds = [h.next_hold() for _ in range(6)]
    assert holds[0] == HOLD and holds == sorted(holds) and holds[-1] == MAX_HOLD
    h.written(0, 1)
    assert h.next_hold() == HOLD


def test_wire_pieces_round_trip_and_out_of_order_pieces_are_refused():
    msg = {"op": "x", "blob": "y" * (3 * wire.CHUNK + 5)}
    pieces = wire.encode_control(msg)
    assert len(pieces) == 4 and all(len(p) == wire.CHUNK + 1 for p in pieces[:-1])
    a = wire.Assembler(1 << 20)
    for p in pieces[:-1]:
        assert a.feed(p, []) == (None, [])
    whole, fds = a.feed(pieces[-1], [])
    assert wire.decode_control(whole) == msg and fds == []
    with pytest.raises(wire.ProtocolError):
        wire.Assembler(1 << 20).feed(wire.LAST + b"{}", [])
    small = wire.Assembler(2 * wire.CHUNK)
    small.feed(pieces[0], [])
    small.feed(pieces[1], [])
    with pytest.raises(wire.ProtocolError):
        small.feed(pieces[2], [])
