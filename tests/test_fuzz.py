"""Fuzzing the wire (issue 14, part 3): property-based tests (Hypothesis) of
every message the control socket and the paging stream accept, against real
processes: a real system, and a real paging service started as the
hypervisor starts it.  No mocks.

Control socket (one system for the module: pool 2 MiB, partitions p1 (4 MiB,
idle) and p2 (8 MiB), one paging service).  A worker of p2 writes and
verifies patterned pages in a loop the whole time, paging hard through the
small pool.  Three strategies: (a) arbitrary bytes as SEQPACKET messages (one
to three of them: empty, short, invalid UTF-8, JSON that is no object,
nesting past the decoder's limit, pieces that start with wire.MORE/LAST,
exactly-CHUNK pieces, messages of CHUNK+-1 bytes and of 1-2 MiB, larger than
any piece); (b) arbitrary JSON values, and objects whose "op" is each op the
hypervisor knows (read from its handler tables: a new op fails
test_every_op_is_fuzzed until it is listed here) with its own fields and
random ones, of random JSON types and values (NaN, infinities, huge
integers, deep nesting, lone surrogates), sent whole or in pieces; optionally
after a valid `attach` to p1, so that worker-only ops (register, mce,
discard, prefetch, pressure, adopt) are reached past their first check;
(c) the same with 1-4 file descriptors attached (SCM_RIGHTS): pipe ends,
/dev/null, a memfd, a socket, an eventfd, a directory, a bare userfaultfd,
and one that has had the worker features' UFFDIO_API handshake.

After each example: the daemon is alive; the fuzz connection, which also
sends a `status` after its messages (or else ends its side, shutdown
SHUT_WR), gets that status answered or is closed within 10 s (a reply to
the fuzz message itself is optional: prefetch and mce answer nothing by
design); a fresh connection's `status` answers within
5 s and shows the system unchanged (partitions, devices, service, pool, p2's
worker attached); the daemon's fds are back to what they were before the
test (within 3 s: it closes our connection when it sees our end go); its log
holds no traceback.  At the end of the module the p2 worker, which ran
through all of it, stops and must exit 0 with 0 mismatches.

Excluded, and why (each would stop or reshape the system when valid, which
root may ask for; they are tested for themselves elsewhere):
  * shutdown: stops the system.
  * any message naming p2, vios1, pgdev0 or pgdev1 anywhere: a valid
    partition_remove/suspend/resume/export, service_stop/switch or
    device_remove on them stops the worker under test or the paging; and a
    worker of p2 may validly discard p2's pages (zeros, which the verifying
    worker would rightly count as mismatches).
  * p1 only in ops that leave it as it is (status, partition, slots,
    snapshot -- held for the connection only --, attach, register, mce,
    adopt, discard, prefetch, pressure, the lists): p1 has no worker of its
    own, so a discard of its pages hurts nobody.
  * pool_resize with a size that could be valid (parse_pages accepts it, at
    least the minimum pool, at most 4x the machine's memory): a valid resize
    changes the pool the invariants compare against (shrinking to the
    minimum also slows the worker to a crawl, growing takes the machine's
    memory); every other size, of every JSON type, is sent.
  * device_add whose fields parse_device (no NBD probe) accepts: a valid one
    adds a device (a file created, a lock fd held: the fd check would count
    it) and would let partition_add succeed; an NBD URI that parses would
    have the daemon connect to whatever host it names.
  * partition_add is sent as generated: no device is free, so even a valid
    definition is refused (the unchanged-system check would catch otherwise).
  * register never gets a userfaultfd registered over memory this process
    maps (that would be a real worker, whose uffd the engine keeps until the
    pytest process exits).

Paging stream.  A paging service started as ServiceLink.start does
(`python -P -m pyhv.service --name N --fd F --fast-fd G`, SEQPACKET
socketpairs), streams 0 and 1 opened on device files in tmp_path with a real
memfd, then frames: random header fields (op 0-255, stream, flags, status,
slot, count, crc, request id) with payloads shaped like READ's and WRITE's
(CRC32s, page numbers inside and outside the memory and device), random and
oversized ones; OPEN with random JSON, with structured specs of random field
values (paths: new files, the device, a directory, a FIFO, /dev/null, a
missing directory, a symlink loop; kinds file, block, nbd and others; sizes of
every type) and 0-3 fds of every kind above plus memfds of 0, 1 and 64 pages,
a read-only file and the device file; raw garbage; and READ-like frames on
the fast channel.  One to four frames an example, sent one at a time or all
at once on both channels (replies matched by request id).  What "the
service survives" means, per class:
  * a frame of at least a header on the stream socket (any 28 bytes are a
    header): exactly one reply, with the request's id, stream, op, slot and
    count and a status of 0 or -errno; the process lives on; a WRITE of a
    fresh page on stream 0 then answers its CRC32 (zlib.crc32), leaves the
    page punched out of the memory, and a READ of it back, on the stream
    socket and on the fast channel, brings the same bytes; the service's fds
    are what they were (a fuzz OPEN that succeeded is closed again, or
    stream 0/1 opened properly again over it); no traceback in its log.
  * a frame of at least a header on the fast channel: one reply (EINVAL for
    anything but a READ the engine would send); then the same checks.
  * a frame shorter than a header on the stream socket costs the
    connection: the service logs one line, closes, and exits 1; an empty
    frame (fds or not) reads as end-of-file (the hypervisor gone): it exits 0.
  * a frame shorter than a header on the fast channel: the service stops
    serving the fast channel (it is shut down: the hypervisor's engine sees
    it closed and fails the service over) and goes on serving the stream
    socket.
  * none of them: a signal death, a traceback, or a hang (every wait has a
    timeout).

Defects this found are fixed, each with its minimal input as a plain test
at the end of this file: an OPEN whose payload is not JSON or whose spec
lacks a field or has one of the wrong type ended the service with a
traceback; an OPEN that failed after its device was opened kept the fd; an
OPEN naming a FIFO as its snapshot hung the service for good; a short frame
on the fast channel ended one of its threads and left the channel open
(four such frames, and READs on it were never answered); a JSON Infinity
where the daemon takes an integer (mce's page) was logged as an internal
error with a traceback instead of refused as a bad request.

Reproducing: runs are derandomized (the same examples each run; a failure
prints its minimal example and a @reproduce_failure blob).  PYHV_FUZZ_SEED=N
draws another stream of examples; PYHV_FUZZ_SCALE=K multiplies every
example count (the file takes ~30-40 s at 1).
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import subprocess
import textwrap
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, note, seed, settings
from hypothesis import strategies as st

from conftest import PY, System, config_text

from pyhv import uffd, wire
from pyhv._spawn import module_command
from pyhv.config import MIN_POOL_PAGES, ConfigError, parse_device, parse_pages

PAGE = wire.PAGE
SCALE = float(os.environ.get("PYHV_FUZZ_SCALE", "1"))
SEED = os.environ.get("PYHV_FUZZ_SEED")
if SEED is not None:
    print(f"test_fuzz: PYHV_FUZZ_SEED={SEED}")


def fuzz(n: int):
    """Hypothesis settings: n examples (scaled), no deadline (real processes),
    derandomized unless PYHV_FUZZ_SEED is set, no example database."""
    s = settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                 derandomize=SEED is None, print_blob=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])  # fmt: skip

    def wrap(fn):
        fn = s(fn)
        return seed(int(SEED))(fn) if SEED is not None else fn

    return wrap


def fd_table(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return out


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def big_sndbuf(sock: socket.socket, size: int = 8 << 20) -> None:
    """Room for a message of a few MiB (root may force it)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, 32, size)  # SO_SNDBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


# --- fds of every kind -------------------------------------------------------------------

FD_KINDS = ("pipe_r", "pipe_w", "devnull", "memfd", "socket", "eventfd", "dir", "uffd",
            "uffd_api")  # fmt: skip


def make_fd(kind: str, tmp: Path, extra: list[int]) -> int:
    """A new fd of this kind; fds made along with it go to extra (closed later)."""
    if kind in ("pipe_r", "pipe_w"):
        r, w = os.pipe()
        extra.append(w if kind == "pipe_r" else r)
        return r if kind == "pipe_r" else w
    if kind == "devnull":
        return os.open("/dev/null", os.O_RDWR)
    if kind == "memfd":
        fd = os.memfd_create("fuzz")
        os.ftruncate(fd, PAGE)
        return fd
    if kind == "memfd0":
        return os.memfd_create("fuzz0")
    if kind == "memfd64":
        fd = os.memfd_create("fuzz64")
        os.ftruncate(fd, 64 * PAGE)
        return fd
    if kind == "socket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.append(b.detach())
        return a.detach()
    if kind == "eventfd":
        return os.eventfd(0)
    if kind == "dir":
        return os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    if kind == "rofile":
        return os.open(tmp / "ro.img", os.O_RDONLY)
    if kind == "devfile":
        return os.open(tmp / "dev-fuzz.img", os.O_RDWR)
    if kind in ("uffd", "uffd_api"):
        fd = uffd.open_uffd()
        if kind == "uffd_api":
            uffd.api(fd, uffd.feature_mask(uffd.WORKER_FEATURES))
        return fd
    raise AssertionError(kind)


# --- JSON values ---------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**80), 2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["", "1MiB", "4096", "-4KiB", "1XB", "p1", "nope", "/", "..",
                              "/nonexistent/dir", "nbd://localhost/x", "\ud800", "\x00",
                              "process", "partition", "a" * 300]))  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


def deep(n: int, leaf: bytes = b'"x"') -> bytes:
    """JSON text of a list nested n deep (the decoder's limit is near 1000)."""
    return b"[" * n + leaf + b"]" * n


# field values that look like what a handler wants, and just not
edges = st.sampled_from([PAGE, -PAGE, PAGE + 1, 4 << 20, 8 << 20, 2**63, 2**64, 2**70, 0.5, 1e308,
                         float("inf"), float("-inf"), float("nan"), True, "1", "0x10"])
ints_like = edges | st.integers(-3, 3) | st.integers(0, 2**64).map(lambda n: n - n % PAGE)
names = st.sampled_from(["p1", "nope", "", " p1", "p1 ", "P1", "x" * 200, "a/b", "\ud800",
                         "../p1"]) | st.text(max_size=12)  # fmt: skip
dirs = st.sampled_from(["/", "/nonexistent/x", "relative", "/proc", "/dev/null", "/tmp",
                        "/nonexistent"]) | st.text(max_size=12)  # fmt: skip
FIELD_VALUES = {
    "name": names, "partition": names, "id": names, "as": names,
    "size": ints_like | st.sampled_from(["1MiB", "0", "-1", "1.5MiB", "4097", ""]),
    "memory": ints_like | st.sampled_from(["1MiB", "4KiB", "0"]),
    "paging": st.lists(names, max_size=3) | names,
    "services": st.lists(names, max_size=3) | names,
    "device": names, "snapshot": dirs, "prefetch": json_values, "direct": json_values,
    "path": dirs, "tls_psk": dirs, "io_timeout": ints_like, "dir": dirs,
    "pages": st.lists(ints_like, max_size=5) | ints_like | json_values,
    "page": ints_like, "seq": ints_like, "base": ints_like, "ident": ints_like,
    "offset": ints_like, "length": ints_like, "worker": ints_like,
    "owner": names | st.sampled_from(["root", "nobody", "daemon"]),
    "group": names | st.sampled_from(["root", "nogroup", "daemon"]),
}  # fmt: skip

# the fields each op's handler reads (pyhv/hypervisor: control.py, vcp.py,
# workers.py, machine_check.py, suspend.py, migrate.py, recovery.py)
OP_FIELDS = {
    "status": [], "attach": ["partition"], "register": ["base", "ident"],
    "partition": ["name"], "mce": ["page", "seq"], "errors": [], "slots": ["partition", "pages"],
    "pool_resize": ["size"],
    "partition_add": ["name", "memory", "paging", "device", "snapshot", "prefetch", "owner",
                      "group"],
    "partition_remove": ["name"], "partition_list": [], "partition_suspend": ["name"],
    "partition_resume": ["name", "prefetch"],
    "device_add": ["id", "path", "size", "services", "tls_psk", "io_timeout", "direct"],
    "device_remove": ["id"], "device_list": [],
    "service_start": ["name"], "service_stop": ["name"], "service_list": [],
    "service_switch": ["partition"],
    "adopt": [], "discard": ["partition", "offset", "length"],
    "prefetch": ["partition", "offset", "length"], "pressure": ["partition"],
    "snapshot": ["partition", "dir"], "partition_export": ["name", "dir"],
    "partition_import": ["dir", "as"], "rejoin": ["partition", "worker"],
}  # fmt: skip
EXCLUDED_OPS = {"shutdown"}
FORBIDDEN = {"p2", "vios1", "pgdev0", "pgdev1"}
P1_OK = {"status", "partition", "slots", "snapshot", "attach", "register", "mce", "adopt",
         "discard", "prefetch", "pressure", "partition_list", "device_list", "service_list",
         "errors", "rejoin"}  # fmt: skip


def known_ops() -> set[str]:
    """Every op the hypervisor dispatches, from its own handler tables."""
    from pyhv.hypervisor.daemon import Hypervisor

    return set(Hypervisor.control_handlers(object.__new__(Hypervisor)))


def strings_in(v):
    todo = [v]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, dict):
            todo.extend(v)
            todo.extend(v.values())


RUN_DIR: Path | None = None  # the control system's, for the device_add filter
MEM_TOTAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def allowed(msg) -> bool:
    """The exclusions of the module docstring."""
    if isinstance(msg, bytes):  # JSON text made here (nesting too deep for json.dumps)
        return True
    op = msg.get("op") if isinstance(msg, dict) else None
    op = op if isinstance(op, str) else None
    if op in EXCLUDED_OPS:
        return False
    words = set(strings_in(msg))
    if words & FORBIDDEN or ("p1" in words and op not in P1_OK):
        return False
    if op == "pool_resize":  # only sizes refused before anything changes
        try:
            pages = parse_pages(msg.get("size"), "size") // PAGE
        except ConfigError:
            pass
        else:
            if MIN_POOL_PAGES <= pages and pages * PAGE <= 4 * MEM_TOTAL:
                return False
    if op == "device_add":
        entry = {k: msg[k] for k in ("id", "path", "size", "services", "tls_psk", "io_timeout")
                 if msg.get(k) is not None}  # fmt: skip
        try:
            parse_device(entry, RUN_DIR, ["vios1"], probe=False)
            return False
        except Exception:  # (ConfigError, or another the daemon must survive too)
            pass
    return True


WORKER_OPS = ["attach", "register", "mce", "adopt", "discard", "prefetch", "pressure", "slots",
              "snapshot", "partition", "rejoin"]  # (reached past their first check once attached)


@st.composite
def op_messages(draw, ops=sorted(OP_FIELDS)):
    op = draw(st.sampled_from(ops))
    msg = {"op": op}
    for f in OP_FIELDS[op]:
        if draw(st.integers(0, 9)):  # mostly present
            msg[f] = draw(FIELD_VALUES[f] | json_values)
    extra = draw(st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)) | st.text(max_size=6),
                                 json_values, max_size=2))  # fmt: skip
    for k, v in extra.items():
        msg.setdefault(k, v)
    return msg


control_messages = (
    op_messages()
    | st.dictionaries(st.text(max_size=8), json_values, max_size=4)
    | json_values
    | st.builds(lambda op, key, n: b'{"op":"%s","%s":%s}' % (op.encode(), key.encode(), deep(n)),
                st.sampled_from(sorted(OP_FIELDS)), st.sampled_from(sorted(FIELD_VALUES)),
                st.integers(100, 1000)).filter(lambda b: not any(w.encode() in b for w in
                                                                 ["shutdown", *FORBIDDEN]))
    | st.builds(lambda n: b'{"op":%s}' % deep(n), st.integers(100, 1000))
).filter(allowed)


def encode_any(msg, pieces: bool) -> list[bytes]:
    """msg as the daemon's clients send it (in pieces when long), or as one
    message however long."""
    data = msg if isinstance(msg, bytes) else json.dumps(msg, separators=(",", ":")).encode()
    if pieces and len(data) > wire.CHUNK:
        return [(wire.MORE if i + wire.CHUNK < len(data) else wire.LAST) + data[i : i + wire.CHUNK]
                for i in range(0, len(data), wire.CHUNK)]  # fmt: skip
    return [data]


# raw messages: (a)
blobs = (
    st.binary(max_size=300)
    | st.builds(lambda lead, b: lead + b, st.sampled_from([wire.MORE, wire.LAST]),
                st.binary(max_size=300))
    | st.builds(lambda lead, n, c: lead + bytes([c]) * n,
                st.sampled_from([b"", wire.MORE, wire.LAST]),
                st.sampled_from([wire.CHUNK - 1, wire.CHUNK, wire.CHUNK + 1, wire.CHUNK + 2]),
                st.integers(0, 255))
    | st.builds(lambda n: b"x" * n, st.sampled_from([1 << 20, (1 << 20) + 1, 2 << 20]))
    | st.sampled_from([b"", b"{", b"{}", b"[]", b"null", b'"op"', b"\xff\xfe",
                       b'{"op":"status"', b'{"op":"status"}\x00', b'{"op":"status"}{}',
                       b"[" * 100000, b'{"op":' + b"[" * 50000, b"[" * 990 + b"]" * 990,
                       b'{"op":' + b"[" * 990 + b"]" * 990 + b"}",
                       b'{"op":"partition","name":' + b"[" * 980 + b"]" * 980 + b"}",
                       b'{"op":"mce","page":1e999}', b'{"op":"slots","partition":"x",'
                       b'"pages":Infinity}', b'{"op":"status","x":NaN}',
                       b'{"op":"\\ud800"}', b'{"\\ud800":1,"op":"status"}'])
)
raw_sequences = st.lists(blobs, min_size=1, max_size=3)


# --- the control system --------------------------------------------------------------------

WORKER_LOOP = textwrap.dedent("""
    import json, os, sys
    import pyhv
    from pyhv.pattern import page_pattern
    m = pyhv.attach()
    view = memoryview(m)
    n = len(m) // 4096
    stop = sys.argv[1]
    passes = bad = gen = 0
    while passes == 0 or not os.path.exists(stop):
        gen += 1
        for p in range(n):
            view[p * 4096:(p + 1) * 4096] = page_pattern("p2", p, gen)
        for p in range(n):
            if view[p * 4096:(p + 1) * 4096] != page_pattern("p2", p, gen):
                bad += 1
        passes += 1
    print(json.dumps({"passes": passes, "mismatches": bad}), flush=True)
    sys.exit(1 if bad else 0)
""")


class ControlCtx:
    def __init__(self, system: System, worker: subprocess.Popen, stop: Path):
        self.system = system
        self.worker = worker
        self.stop = stop
        self.sock_path = str(system.run_dir / "control.sock")
        self.pid = system.pid
        self.log = system.run_dir / "hypervisor.log"
        self.log_at = self.log.stat().st_size
        st0 = wire.request(self.sock_path, {"op": "status"}, timeout=5)
        self.shape = self.shape_of(st0)
        self.tmp = system.run_dir / "fuzzfds"
        self.tmp.mkdir(exist_ok=True)
        self.verified = False

    @staticmethod
    def shape_of(st: dict):
        return (sorted(p["name"] for p in st["partitions"]),
                sorted(d["id"] for d in st["devices"]),
                [(s["name"], s["state"]) for s in st["paging_services"]],
                st["pool"]["pages"], st["state"],
                [p["workers"] for p in st["partitions"] if p["name"] == "p2"])  # fmt: skip

    def new_log(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.log_at)
            text = f.read().decode(errors="replace")
            self.log_at = f.tell()
        return text

    def check(self, fds_before: dict[str, str]) -> None:
        """The properties every example must leave true."""
        assert proc_state(self.pid) not in ("gone", "Z", "X"), "the hypervisor died"
        assert self.worker.poll() is None, ("the p2 worker stopped", self.worker.communicate())
        st = wire.request(self.sock_path, {"op": "status"}, timeout=5)
        assert st["ok"] and self.shape_of(st) == self.shape, st
        deadline = time.monotonic() + 3
        while True:
            fds = fd_table(self.pid)
            if len(fds) <= len(fds_before):
                break
            if time.monotonic() > deadline:
                raise AssertionError(("the hypervisor kept fds",
                                      {k: v for k, v in fds.items() if fds_before.get(k) != v}))
            time.sleep(0.01)
        log = self.new_log()
        assert "Traceback" not in log and "Logging error" not in log, log[-3000:]
        assert "internal error" not in log, log[-3000:]

    def finish(self) -> None:
        if self.verified:
            return
        self.verified = True
        self.stop.touch()
        out, err = self.worker.communicate(timeout=120)
        assert self.worker.returncode == 0, (self.worker.returncode, out, err)
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["mismatches"] == 0 and summary["passes"] >= 1, summary


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    global RUN_DIR
    run_dir = tmp_path_factory.mktemp("fuzzsys")
    RUN_DIR = run_dir
    system = System(run_dir)
    system.up(config_text(pool="2MiB", partitions=[("p1", "4MiB"), ("p2", "8MiB")]))
    stop = run_dir / "stop-worker"
    try:
        worker = system.run("p2", PY, "-c", WORKER_LOOP, str(stop))
        system.wait_for(lambda s: any(p["name"] == "p2" and len(p["workers"]) == 1
                                      and p["page_outs"] > 0 for p in s["partitions"]),
                        "the p2 worker paging")  # fmt: skip
        ctx = ControlCtx(system, worker, stop)
        yield ctx
        ctx.finish()
    finally:
        system.down()


@pytest.fixture
def daemon_fds(control):
    """The daemon's fds before the test (every example must give back what it took)."""
    time.sleep(0.05)
    return fd_table(control.pid)


def recv_msgs(sock: socket.socket, until: float):
    """Replies (dicts) as they come, until end-of-file (a malformed reply
    raises ProtocolError: the daemon's own defect)."""
    pieces = wire.Assembler(wire.MAX_REPLY)
    while True:
        left = until - time.monotonic()
        if left <= 0:
            raise AssertionError("the hypervisor neither answered nor closed the connection")
        sock.settimeout(left)
        try:
            data, fds = wire.recv_piece(sock)
        except ConnectionResetError:
            # the daemon closed with messages of ours unread: the kernel
            # reports that first, once; what it sent before is still queued
            continue
        except BrokenPipeError:
            return
        except socket.timeout:
            continue
        wire.close_fds(fds)
        if not data and not fds:
            return
        whole, fds = pieces.feed(data, fds)
        wire.close_fds(fds)
        if whole is not None:
            yield wire.decode_control(whole)


def exchange(ctx: ControlCtx, messages: list[bytes], fds: list[int] = (),
             attach: bool = False, half_close: bool = False) -> list[dict]:  # fmt: skip
    """Send the messages (fds with the first) on a new connection, then a
    status (or, half_close, end-of-file: shutdown(SHUT_WR)); read until the
    status is answered or the connection closes."""
    sock = wire.seqpacket()
    big_sndbuf(sock)
    sock.settimeout(10)
    sock.connect(ctx.sock_path)
    got = []
    try:
        if attach:
            wire.send_control(sock, {"op": "attach", "partition": "p1"})
            reply, rfds = wire.recv_control(sock)
            wire.close_fds(rfds)
            assert reply["ok"], reply
        closed = False
        status = [] if half_close else [json.dumps({"op": "status"}).encode()]
        for i, m in enumerate(messages + status):
            try:
                if i == 0 and fds:
                    socket.send_fds(sock, [m], list(fds))
                else:
                    assert sock.send(m) == len(m)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            except OSError as e:
                if e.errno == errno.EMSGSIZE:  # larger than even a forced buffer: not sent
                    continue
                raise
        if half_close and not closed:
            sock.shutdown(socket.SHUT_WR)
        until = time.monotonic() + 10
        for reply in recv_msgs(sock, until):
            got.append(reply)
            if "pool" in reply and "partitions" in reply:
                break  # the status: the connection still serves
        else:
            closed = True
        assert closed or got
    finally:
        sock.close()
    first = got[0] if got and "pool" not in got[0] else None
    if currently_in_test_context():
        event("closed" if closed and first is None else "no reply, served on" if first is None
              else "ok" if first.get("ok") else "refused" if first.get("refused")
              else " ".join(str(first.get("error", first))[:40].split()[:3]))  # fmt: skip
    return got


def test_every_op_is_fuzzed():
    assert known_ops() - EXCLUDED_OPS == set(OP_FIELDS)


@fuzz(150)
@given(raw=raw_sequences, half_close=st.booleans())
def test_control_survives_arbitrary_bytes(control, daemon_fds, raw, half_close):
    exchange(control, raw, half_close=half_close)
    control.check(daemon_fds)


@fuzz(250)
@given(msgs=st.lists(control_messages, min_size=1, max_size=3), pieces=st.booleans(),
       attach=st.booleans(), half_close=st.booleans())
def test_control_survives_arbitrary_json(control, daemon_fds, msgs, pieces, attach, half_close):
    data = [p for m in msgs for p in encode_any(m, pieces)]
    exchange(control, data, attach=attach, half_close=half_close)
    control.check(daemon_fds)


@fuzz(250)
@given(msgs=st.lists(op_messages(WORKER_OPS).filter(allowed), min_size=1, max_size=3),
       pieces=st.booleans())
def test_control_survives_a_worker_s_requests(control, daemon_fds, msgs, pieces):
    """As a worker of p1 (attached first), which the worker-only ops check."""
    data = [p for m in msgs for p in encode_any(m, pieces)]
    exchange(control, data, attach=True)
    control.check(daemon_fds)


@fuzz(150)
@given(msg=control_messages | st.sampled_from([{"op": "register", "base": 0, "ident": PAGE},
                                                {"op": "register"},
                                                {"op": "rejoin", "partition": "p1", "worker": 1}]),
       raw=st.none() | blobs, kinds=st.lists(st.sampled_from(FD_KINDS), min_size=1, max_size=4),
       attach=st.booleans())
def test_control_survives_fds(control, daemon_fds, msg, raw, kinds, attach):
    data = [raw] if raw is not None else encode_any(msg, True)
    extra: list[int] = []
    fds = [make_fd(k, control.tmp, extra) for k in kinds]
    try:
        exchange(control, data, fds, attach=attach)
    finally:
        wire.close_fds(fds + extra)
    control.check(daemon_fds)


# --- the paging stream ---------------------------------------------------------------------

MEM_PAGES = 64
DEV_PAGES = 64
PROBE = 1 << 63  # request ids of the probes (a fuzz frame's reply never matches one)


class Service:
    """A paging service process, as ServiceLink.start starts it, with
    streams 0 and 1 open on files in tmp."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.memfd = os.memfd_create("fuzz-mem")
        os.ftruncate(self.memfd, MEM_PAGES * PAGE)
        self.n = 0
        self.proc = None
        self.probes = 0
        self.healthy = False
        for name in ("dev0.img", "dev1.img", "dev-fuzz.img", "ro.img"):
            (tmp / name).write_bytes(b"")
            os.truncate(tmp / name, DEV_PAGES * PAGE)
        if not (tmp / "fifo").exists():
            os.mkfifo(tmp / "fifo")
        if not (tmp / "loop").is_symlink():
            os.symlink(tmp / "loop", tmp / "loop")
        (tmp / "adir").mkdir(exist_ok=True)

    def spec(self, stream: int) -> dict:
        return {"id": f"dev{stream}", "path": str(self.tmp / f"dev{stream}.img"),
                "kind": "file", "size": DEV_PAGES * PAGE, "direct": False, "tls_psk": None,
                "memory": MEM_PAGES * PAGE}  # fmt: skip

    def start(self) -> None:
        self.n += 1
        self.log = self.tmp / f"service-{self.n}.log"
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fast, fast_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                module_command("pyhv.service", "--name", "fuzz", "--fd", str(theirs.fileno()),
                               "--fast-fd", str(fast_theirs.fileno())),
                pass_fds=[theirs.fileno(), fast_theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=logf, stderr=logf, cwd=self.tmp)  # fmt: skip
        theirs.close()
        fast_theirs.close()
        self.sock, self.fast = mine, fast
        for s in (mine, fast):
            big_sndbuf(s)
        hello = self.recv(self.sock)
        assert wire.unpack_header(hello)[2] == wire.OP_HELLO
        for stream in (0, 1):
            self.open(stream)
        self.fds = sorted(fd_table(self.proc.pid).values())
        self.healthy = True

    def recv(self, sock: socket.socket, timeout: float = 5.0) -> bytes:
        """One frame; b"" at end-of-file; AssertionError after timeout (a hang)."""
        r, _, _ = select.select([sock], [], [], timeout)
        assert r, f"no reply within {timeout}s: the service hangs ({self.tail()})"
        try:
            return sock.recv(wire.MAX_FRAME + 100)
        except ConnectionResetError:
            return b""

    def send(self, sock: socket.socket, frame: bytes, fds=()) -> None:
        if fds:
            socket.send_fds(sock, [frame], list(fds))
        else:
            sock.send(frame)

    def request(self, frame: bytes, fds=(), fast: bool = False) -> tuple[tuple, bytes]:
        sock = self.fast if fast else self.sock
        self.send(sock, frame, fds)
        reply = self.recv(sock)
        assert len(reply) >= wire.HEADER.size, (f"no reply (service {self.proc.poll()})",
                                                self.tail())  # fmt: skip
        return wire.unpack_header(reply), reply[wire.HEADER.size :]

    def open(self, stream: int) -> None:
        h, _ = self.request(wire.pack_header(PROBE, stream, wire.OP_OPEN)
                            + json.dumps(self.spec(stream)).encode(), [self.memfd])  # fmt: skip
        assert h[4] == 0, (h, self.tail())

    def close_stream(self, stream: int) -> None:
        h, _ = self.request(wire.pack_header(PROBE, stream, wire.OP_CLOSE))
        assert h[4] == 0, h

    def probe(self) -> None:
        """A WRITE of a fresh page and READs of it back, on both channels."""
        self.probes += 1
        data = os.urandom(PAGE)
        page, slot = self.probes % 32, (self.probes * 7) % DEV_PAGES
        os.pwrite(self.memfd, data, page * PAGE)
        crc = zlib.crc32(data)
        h, payload = self.request(wire.pack_header(PROBE + 1, 0, wire.OP_WRITE, slot=slot, count=1)
                                  + wire.PAGE_NO.pack(page))  # fmt: skip
        assert h[0] == PROBE + 1 and h[4] == 0, (h, self.tail())
        assert wire.CRC.unpack(payload)[0] == crc
        assert os.pread(self.memfd, PAGE, page * PAGE) == bytes(PAGE)  # punched out
        for fast, into in ((False, 32 + page % 16), (True, 48 + page % 16)):
            h, _ = self.request(wire.pack_header(PROBE + 2, 0, wire.OP_READ, slot=slot, count=1)
                                + wire.CRC.pack(crc) + wire.PAGE_NO.pack(into), fast=fast)
            assert h[0] == PROBE + 2 and h[4] == 0, (fast, h, self.tail())
            assert os.pread(self.memfd, PAGE, into * PAGE) == data

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def assert_no_traceback(self) -> None:
        text = self.log.read_text(errors="replace")
        assert "Traceback" not in text and "Logging error" not in text, text[-3000:]

    def check(self) -> None:
        """Alive, serving, no fd kept, no traceback."""
        assert self.proc.poll() is None, (self.proc.returncode, self.tail())
        self.probe()
        fds = sorted(fd_table(self.proc.pid).values())  # (numbers change with a reopen)
        assert fds == self.fds, (fds, self.fds)
        self.assert_no_traceback()
        self.healthy = True

    def ensure(self) -> None:
        """Running, with streams 0 and 1 open.  A service that an example
        left dead, hung or unchecked (it failed already) is replaced: each
        example fails alone, and shrinks to its own minimal input."""
        if self.proc is not None and (self.proc.poll() is not None or not self.healthy):
            self.kill()
        if self.proc is None:
            self.start()
        self.healthy = False  # until check() passes

    def kill(self) -> None:
        self.sock.close()
        self.fast.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def stop(self) -> int:
        """Close the stream socket (the hypervisor gone): it exits 0."""
        if self.proc is None:
            return 0
        self.sock.close()
        self.fast.close()
        try:
            code = self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        return code


@pytest.fixture
def service(tmp_path):
    s = Service(tmp_path)
    s.start()
    yield s
    code = s.stop()
    assert code == 0, (code, s.tail())
    s.assert_no_traceback()


u32 = st.integers(0, 2**32 - 1)
headers = st.fixed_dictionaries({
    "req": st.integers(0, PROBE - 1),
    "stream": st.sampled_from([0, 1, 2, 65535]) | st.integers(0, 65535),
    "op": st.sampled_from([wire.OP_HELLO, *wire.BY_OP]) | st.integers(0, 255),
    "flags": st.sampled_from([0, wire.FLAG_RETRY, 2, 3]) | st.integers(0, 255),
    "status": st.sampled_from([0, -5]) | st.integers(-(2**31), 2**31 - 1),
    "slot": st.sampled_from([0, 1, DEV_PAGES - 1, DEV_PAGES, 2**32 - 1, 2**32 - 64]) | u32,
    "count": st.sampled_from([0, 1, 2, 63, 64, 65, 2**32 - 1]) | u32,
    "crc": u32,
})  # fmt: skip
page_numbers = st.sampled_from([0, 1, 31, MEM_PAGES - 1, MEM_PAGES, 2**32 - 1]) | u32


@st.composite
def payloads(draw, count: int):
    kind = draw(st.sampled_from(["none", "bytes", "write", "read", "big", "huge"]))
    n = min(count, 70) if count <= 70 else draw(st.integers(0, 70))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "write":  # page numbers, maybe one too many or few
        k = max(0, n + draw(st.sampled_from([0, 0, 0, -1, 1])))
        return b"".join(wire.PAGE_NO.pack(draw(page_numbers)) for _ in range(k))
    if kind == "read":  # CRC32s, then the first page
        k = max(0, n + draw(st.sampled_from([0, 0, 0, -1, 1])))
        return b"".join(wire.CRC.pack(draw(u32)) for _ in range(k)) + wire.PAGE_NO.pack(
            draw(page_numbers))
    if kind == "big":  # at the frame limit, and just past it
        return b"\0" * (wire.MAX_FRAME - wire.HEADER.size + draw(st.sampled_from([-1, 0, 1])))
    if kind == "huge":
        return b"\1" * draw(st.sampled_from([100_000, 200_000]))
    return b""


@st.composite
def frames(draw):
    h = draw(headers)
    return wire.pack_header(**h) + draw(payloads(h["count"]))


ZERO_CRC = zlib.crc32(bytes(PAGE))  # what a slot never written holds
SVC_FD_KINDS = FD_KINDS + ("memfd0", "memfd64", "rofile", "devfile")


@st.composite
def plausible_frames(draw, ops=(wire.OP_READ, wire.OP_WRITE, wire.OP_DISCARD, wire.OP_FLUSH,
                                wire.OP_QUERY, wire.OP_CLOSE)):  # fmt: skip
    """Close to what the hypervisor sends, on streams that are open (or
    were just opened by the example), a little off."""
    op = draw(st.sampled_from(ops))
    stream = draw(st.sampled_from([0, 1, 2, 3]))
    slot = draw(st.integers(0, DEV_PAGES - 4) | st.integers(0, DEV_PAGES + 6))
    count = draw(st.sampled_from([1, 1, 2, 4]) | st.integers(0, wire.MAX_PAGES + 1))
    flags = draw(st.sampled_from([0, 0, 0, wire.FLAG_RETRY, 2]))
    n = min(count, wire.MAX_PAGES + 1)
    pages = st.integers(0, MEM_PAGES - 4) | st.integers(0, MEM_PAGES + 6)
    if op == wire.OP_WRITE:
        payload = b"".join(wire.PAGE_NO.pack(draw(pages)) for _ in range(n))
    elif op == wire.OP_READ:
        crcs = st.sampled_from([ZERO_CRC, ZERO_CRC]) | u32
        payload = b"".join(wire.CRC.pack(draw(crcs)) for _ in range(n)) + wire.PAGE_NO.pack(
            draw(pages))  # fmt: skip
    else:
        payload = b""
    if draw(st.integers(0, 9)) == 0:  # a byte short or long
        payload = payload[:-1] if payload and draw(st.booleans()) else payload + b"\0"
    return wire.pack_header(draw(st.integers(0, 1000)), stream, op, slot=slot, count=count,
                            flags=flags) + payload  # fmt: skip


@st.composite
def open_specs(draw, tmp_names):
    """OPEN's payload: the right spec of a new stream with a field or two
    changed, or fields of random values, or random JSON."""
    how = draw(st.sampled_from(["mutated", "mutated", "fields", "json"]))
    if how == "json":
        return draw(json_values)
    fields = {
        "id": names,
        "path": st.sampled_from(tmp_names) | st.sampled_from(["/dev/null", "", "rel.img"])
        | st.text(alphabet="abcdefgh.-_", max_size=8),
        "kind": st.sampled_from(["file", "block", "nbd", "", "FILE"]) | json_values,
        "size": ints_like | st.sampled_from([DEV_PAGES * PAGE, 2**40, "64"]),
        "direct": st.booleans() | json_values,
        "memory": ints_like | st.sampled_from([MEM_PAGES * PAGE, 2 * PAGE, PAGE // 2, 2**40]),
        "snapshot": st.none() | st.sampled_from(tmp_names),
        "tls_psk": st.none() | st.sampled_from(tmp_names),
        "path_timeout": st.sampled_from([0, 0.2, -1, "x"]),
    }
    if how == "mutated":
        spec = {"id": "fz", "path": tmp_names[0], "kind": "file", "size": DEV_PAGES * PAGE,
                "direct": False, "tls_psk": None, "memory": MEM_PAGES * PAGE}  # fmt: skip
        for k in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2)):
            if draw(st.integers(0, 5)):
                spec[k] = draw(fields[k])
            else:
                spec.pop(k, None)
    else:
        spec = {}
        for k, strat in fields.items():
            if draw(st.integers(0, 9)):
                spec[k] = draw(strat)
    if spec.get("kind") == "nbd" and draw(st.booleans()):
        spec["path"] = f"nbd+unix:///x?socket={tmp_names[0]}.sock"
    return spec


@st.composite
def service_steps(draw, tmp_names):
    """One frame to send: (what, frame, kinds of fds with it, fast channel?)."""
    what = draw(st.sampled_from(["frame", "plausible", "plausible", "open", "open", "raw",
                                 "fast", "fast"]))  # fmt: skip
    kinds: list[str] = []
    if what == "open":
        h = draw(headers)
        stream = draw(st.sampled_from([0, 1, 2, 2, 3]) | st.just(h["stream"]))
        spec = draw(open_specs(tmp_names))
        body = json.dumps(spec).encode() if draw(st.integers(0, 9)) else draw(
            st.binary(max_size=100))  # fmt: skip
        frame = wire.pack_header(**{**h, "op": wire.OP_OPEN, "stream": stream}) + body
        kinds = draw(st.just(["memfd64"]) | st.lists(st.sampled_from(SVC_FD_KINDS), max_size=3))
    elif what == "raw":
        frame = draw(st.binary(min_size=wire.HEADER.size, max_size=400))
    elif what == "fast":
        frame = draw(plausible_frames(ops=(wire.OP_READ,)) | frames())
    else:
        frame = draw(frames() if what == "frame" else plausible_frames())
        if draw(st.integers(0, 7)) == 0:
            kinds = draw(st.lists(st.sampled_from(SVC_FD_KINDS), min_size=1, max_size=2))
    return what, frame, kinds, what == "fast"


@fuzz(250)
@given(data=st.data())
def test_service_answers_every_frame(service, data):
    service.ensure()
    tmp = service.tmp
    tmp_names = [str(tmp / n) for n in ("new.img", "dev-fuzz.img", "adir", "fifo", "loop",
                                        "nodir/x.img", "ro.img")]  # fmt: skip
    steps = data.draw(st.lists(service_steps(tmp_names), min_size=1, max_size=4), label="steps")
    burst = len(steps) > 1 and data.draw(st.booleans(), label="burst")
    if burst:  # all sent at once, replies in any order: request ids tell them apart
        steps = [(w, struct.pack("<Q", i) + f[8:], k, fast) for i, (w, f, k, fast) in
                 enumerate(steps)]  # fmt: skip
    replies = []
    for what, frame, kinds, fast in steps:
        note(f"{what}{' (fast)' if fast else ''}: header {wire.unpack_header(frame)}, "
             f"{len(frame) - wire.HEADER.size} bytes of payload "
             f"{frame[wire.HEADER.size:wire.HEADER.size + 300]!r}, fds {kinds}"
             + (" (burst)" if burst else ""))  # fmt: skip
        extra: list[int] = []
        fds = [make_fd(k, tmp, extra) for k in kinds]
        try:
            if burst:
                service.send(service.fast if fast else service.sock, frame, fds)
            else:
                replies.append(service.request(frame, fds, fast)[0])
        finally:
            wire.close_fds(fds + extra)
    if burst:
        by_req = {}
        for fast in (False, True):
            for _ in range(sum(1 for st_ in steps if st_[3] == fast)):
                reply = service.recv(service.fast if fast else service.sock)
                assert len(reply) >= wire.HEADER.size, (reply, service.tail())
                h = wire.unpack_header(reply)
                assert h[0] not in by_req and h[0] < len(steps), h
                by_req[h[0]] = h
        replies = [by_req[i] for i in range(len(steps))]
    opened: set[int] = set()
    for (what, frame, kinds, fast), reply in zip(steps, replies):
        req, stream, op, _fl, status, slot, count, _crc = reply
        want = wire.unpack_header(frame)
        event(f"{what}: {wire.OP_NAMES.get(op, op)} "
              f"{errno.errorcode.get(-status, status) if status else 'ok'}")
        assert (req, stream, op, slot, count) == (want[0], want[1], want[2], want[5], want[6])
        assert status == 0 or -status in errno.errorcode, status
        if fast:
            assert op == wire.OP_READ or status == -errno.EINVAL, status
        elif op == wire.OP_OPEN and status == 0:
            opened.add(stream)
        elif op == wire.OP_CLOSE:
            opened.discard(stream)
            if stream in (0, 1):
                opened.add(stream)  # (to open as it was)
    for stream in opened:  # as it was: streams 0 and 1 as the fixture opened them, no other
        if stream in (0, 1):
            service.open(stream)
        else:
            service.close_stream(stream)
    service.check()


@fuzz(12)
@given(frame=st.binary(max_size=wire.HEADER.size - 1),
       kinds=st.lists(st.sampled_from(FD_KINDS), max_size=2))
def test_service_short_frame_costs_the_connection(service, frame, kinds):
    service.ensure()
    service.probe()
    extra: list[int] = []
    fds = [make_fd(k, service.tmp, extra) for k in kinds]
    try:
        service.send(service.sock, frame, fds)
    finally:
        wire.close_fds(fds + extra)
    assert service.recv(service.sock) == b""  # closed, no reply
    code = service.proc.wait(timeout=10)
    assert code == (1 if frame else 0), (code, service.tail())  # (empty: end-of-file)
    if frame:
        assert "shorter than a header" in service.tail()
    service.assert_no_traceback()
    service.sock.close()
    service.fast.close()
    service.proc = None


@fuzz(12)
@given(frame=st.binary(max_size=wire.HEADER.size - 1))
def test_service_short_frame_on_the_fast_channel_stops_it(service, frame):
    service.ensure()
    service.probe()
    service.send(service.fast, frame)
    assert service.recv(service.fast) == b""  # the fast channel is shut down, not hung
    assert service.proc.poll() is None
    # the stream socket still serves: a WRITE and a READ on it
    data = os.urandom(PAGE)
    os.pwrite(service.memfd, data, 5 * PAGE)
    h, payload = service.request(wire.pack_header(PROBE, 0, wire.OP_WRITE, slot=9, count=1)
                                 + wire.PAGE_NO.pack(5))  # fmt: skip
    assert h[4] == 0 and wire.CRC.unpack(payload)[0] == zlib.crc32(data)
    h, _ = service.request(wire.pack_header(PROBE, 0, wire.OP_READ, slot=9, count=1)
                           + wire.CRC.pack(zlib.crc32(data)) + wire.PAGE_NO.pack(6))
    assert h[4] == 0 and os.pread(service.memfd, PAGE, 6 * PAGE) == data
    service.assert_no_traceback()
    assert service.stop() == 0


# --- what the fuzzing found, each as its minimal input -----------------------------------------


def test_control_an_int_field_of_infinity_is_a_bad_request(control, daemon_fds):
    """mce's page as JSON Infinity: int() raised OverflowError, which the
    daemon took for a bug of its own (a traceback in its log, "internal
    error", the connection kept) instead of a bad request."""
    replies = exchange(control, [b'{"op":"mce","page":Infinity}'], attach=True)
    assert replies and replies[0]["ok"] is False and "bad request" in replies[0]["error"]
    assert len(replies) == 1  # and the connection went: no status after it
    control.check(daemon_fds)


def _open(service: Service, stream: int, body: bytes, kinds=("memfd64",)) -> int:
    extra: list[int] = []
    fds = [make_fd(k, service.tmp, extra) for k in kinds]
    try:
        h, _ = service.request(wire.pack_header(7, stream, wire.OP_OPEN) + body, fds)
    finally:
        wire.close_fds(fds + extra)
    return h[4]


@pytest.mark.parametrize("body", [
    b"garbage", b"[]", b'{"kind":"file"}', b"\xff",
    b'{"id":"x","path":"new.img","kind":"file","size":262144,"direct":false,"memory":Infinity}',
    b'{"id":"x","path":"new.img","kind":"file","size":"64","direct":false,"memory":262144}',
    b'{"id":"x","path":"a\\u0000b","kind":"file","size":262144,"direct":false,"memory":262144}',
])  # fmt: skip
def test_service_open_of_a_bad_spec_is_einval(service, body):
    """A payload that is not JSON, or a spec with a field missing or of the
    wrong type, ended the service with a traceback (json, KeyError,
    TypeError, OverflowError, ValueError out of op_open)."""
    service.ensure()
    assert _open(service, 2, body) == -errno.EINVAL
    service.check()


def test_service_open_that_fails_keeps_no_fd(service):
    """An OPEN whose device opened and then failed its check (a "block"
    device that is a regular file, a file that cannot be sized) left the
    device's fd open in the service."""
    service.ensure()
    for spec in ({"kind": "block", "path": str(service.tmp / "dev-fuzz.img")},
                 {"kind": "file", "path": "/dev/null"},
                 {"kind": "file", "size": 1 << 62}):  # fmt: skip
        body = json.dumps({**service.spec(2), **spec}).encode()
        assert _open(service, 2, body) < 0
    service.check()  # (its fds are what they were)


def test_service_open_of_a_fifo_as_snapshot_does_not_hang(service):
    """A snapshot path that names a FIFO: open(O_RDONLY) waited for a writer
    for ever, and the service answered nothing again, not even end-of-file."""
    service.ensure()
    body = json.dumps({**service.spec(2), "path": str(service.tmp / "new.img"),
                       "snapshot": str(service.tmp / "fifo")}).encode()  # fmt: skip
    assert _open(service, 2, body) == -errno.EINVAL
    service.check()


def test_zz_the_worker_verified_through_all_of_it(control):
    """(Last in the file: the p2 worker ran through every control test.)"""
    control.finish()
