"""Every byte pyhv puts on a socket is defined here.

Two kinds of connection, both ``AF_UNIX``/``SOCK_SEQPACKET`` so that one
message is one ``recvmsg`` and a peer can never leave half a frame behind:

* **Control** (control point and workers <-> hypervisor): a UTF-8 JSON object
  per message, file descriptors alongside as ``SCM_RIGHTS``; one longer than
  :data:`CHUNK` goes in pieces (:func:`encode_control`, :class:`Assembler`),
  so that replies of any size reach the caller.  A message that does not
  parse, or is larger than the receiver takes, costs the sender its
  connection (after a one-line error reply).
* **Paging stream** (hypervisor <-> paging service): a fixed binary header
  (:data:`HEADER`) followed by the command's payload (:data:`COMMANDS`):
  no page data at all: READ and WRITE name pages of the partition's memory,
  which the service maps from the memfd it was given at OPEN.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import time

#: JSON bytes in one control message.  A longer one (a status of 1,000
#: partitions) goes as several: each starts with MORE but the last, which
#: starts with LAST; a message of one piece is plain JSON.
CHUNK = 1 << 16
MORE, LAST = b"+", b"."
MAX_REQUEST = 1 << 20  # a whole message the hypervisor takes from a client
MAX_REPLY = 1 << 30  # a whole message a client takes from the hypervisor
MAX_FDS = 4


class ProtocolError(Exception):
    """The peer sent something that is not a valid message."""


def seqpacket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def listen(path: str) -> socket.socket:
    """A control socket at path, mode 0600, non-blocking."""
    sock = seqpacket()
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def connect(path: str, timeout: float | None = 10.0) -> socket.socket:
    sock = seqpacket()
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


# --- control messages -------------------------------------------------------


def encode_control(msg: dict, limit: int = MAX_REPLY) -> list[bytes]:
    """The message as the control messages that carry it (one, unless long)."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > limit:
        raise ProtocolError(f"control message of {len(data)} bytes is too large")
    if len(data) <= CHUNK:
        return [data]
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return [MORE + p for p in pieces[:-1]] + [LAST + pieces[-1]]


def decode_control(data: bytes) -> dict:
    try:
        msg = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("message is not JSON") from None
    except RecursionError:  # json's C scanner recurses per nesting level
        raise ProtocolError("message is nested too deeply") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a JSON object")
    return msg


class Assembler:
    """Puts a long control message back together from its pieces, one
    received message at a time (the hypervisor's sockets do not block).

    Only what encode_control makes is taken: every piece but the last is
    exactly MORE + CHUNK bytes, fds come with the first piece only, and the
    whole stays within the limit; `started` says since when a message has
    been incomplete (the hypervisor drops a sender that leaves one so)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.fds: list[int] = []
        self.started = 0.0  # time.monotonic() of the first piece of an incomplete message

    def feed(self, data: bytes, fds: list[int]) -> tuple[bytes | None, list[int]]:
        """One received message; returns (the whole message, the fds that
        came with it) once it is complete, else (None, []).  Raises
        ProtocolError (every fd closed) if it grows past the limit or a
        piece is out of place."""
        lead = data[:1]
        if self.parts and fds:
            close_fds(fds)
            self.reset()
            raise ProtocolError("file descriptors come with the first piece of a message")
        if lead == MORE or lead == LAST:
            if lead == LAST and not self.parts:
                close_fds(fds)
                raise ProtocolError("the last piece of a message came first")
            data = data[1:]
        elif self.parts:
            close_fds(fds)
            self.reset()
            raise ProtocolError("a control message broke off in the middle")
        if lead == MORE and len(data) != CHUNK:
            close_fds(fds)
            self.reset()
            raise ProtocolError("a piece of a control message is not whole")
        self.size += len(data)
        if self.size > self.limit:
            close_fds(fds)
            self.reset()
            raise ProtocolError(f"control message of more than {self.limit} bytes")
        if lead != MORE:
            whole = b"".join(self.parts) + data if self.parts else data
            fds, self.fds = self.fds + fds, []
            self.parts, self.size = [], 0
            return whole, fds
        if not self.parts:
            self.started = time.monotonic()
        self.parts.append(data)
        self.fds += fds
        return None, []

    def reset(self) -> None:
        close_fds(self.fds)
        self.parts, self.size, self.fds = [], 0, []


def send_control(sock: socket.socket, msg: dict, fds: list[int] = (),
                 limit: int = MAX_REQUEST) -> None:  # fmt: skip
    """Send a message (a client's: at most `limit` bytes); fds go with its first piece."""
    for i, piece in enumerate(encode_control(msg, limit)):
        if fds and i == 0:
            socket.send_fds(sock, [piece], list(fds))
        else:
            sock.sendall(piece)


def recv_piece(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One control message as it came, and its fds; ProtocolError if it is
    longer than a piece can be (its fds are closed)."""
    data, fds, flags, _ = socket.recv_fds(sock, CHUNK + 2, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > CHUNK + 1:
        close_fds(fds)
        raise ProtocolError("message too large")
    return data, fds


def recv_control(sock: socket.socket, limit: int = MAX_REPLY) -> tuple[dict | None, list[int]]:
    """One message and the fds that came with it; (None, []) at end-of-file.

    Raises ProtocolError on a malformed message (its fds are closed)."""
    pieces = Assembler(limit)
    while True:
        data, fds = recv_piece(sock)
        if not data and not fds:
            pieces.reset()
            return None, []
        whole, fds = pieces.feed(data, fds)
        if whole is not None:
            break
    try:
        return decode_control(whole), fds
    except ProtocolError:
        close_fds(fds)
        raise


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def request(path: str, msg: dict, timeout: float = 30.0) -> dict:
    """One request/reply exchange with the hypervisor's control socket."""
    with connect(path, timeout) as sock:
        send_control(sock, msg)
        reply, fds = recv_control(sock)
        close_fds(fds)
    if reply is None:
        raise ProtocolError("the hypervisor closed the connection")
    return reply


# --- paging stream frames ---------------------------------------------------

#: request id, stream id, op, flags, status (-errno or 0), slot, page count, crc32
HEADER = struct.Struct("<QHBBiIII")

@dataclasses.dataclass(frozen=True)
class Command:
    """One paging command of the device interface definition."""

    op: int
    name: str
    request: str  # what the header's slot and count, and the payload, carry
    reply: str  # what a reply carries besides its status (0 or -errno)
    device: dict  # what the paging service turns it into, per device type


#: The device interface definition: every paging command, its arguments and
#: its reply, and the device operation it becomes.  The paging service
#: dispatches from this table; the README prints it.
COMMANDS = (
    Command(1, "OPEN", "payload: JSON {id, path, kind, size, direct, memory}; SCM_RIGHTS: "
            "the partition's memory (memfd)", "-",
            {"file": "open(O_CREAT), ftruncate to size", "block": "open(O_DIRECT), size check"}),
    Command(2, "CLOSE", "-", "-", {"file": "close", "block": "close"}),
    Command(3, "READ", "slot, count; payload: count expected CRC32s, then the first page (u32) "
            "of the partition's memory they are read into",
            "-; EBADMSG if a page does not match its CRC32, EIO on a short read (the pages are "
            "punched out of the memory again)",
            {"file": "pread into the memory", "block": "pread (O_DIRECT) into the memory"}),
    Command(4, "WRITE", "slot, count; payload: count page numbers (u32) of the partition's "
            "memory, written to slots slot..slot+count-1, then punched out of the memory; "
            "flag RETRY: a page gone from memory was written already (by the failed service)",
            "count CRC32s of the pages written; ENOSPC on a short write",
            {"file": "pwritev from the memory, fallocate(PUNCH_HOLE) on the memfd",
             "block": "pwritev (O_DIRECT) from the memory, fallocate(PUNCH_HOLE) on the memfd"}),
    Command(5, "FLUSH", "-", "-", {"file": "fdatasync", "block": "fdatasync"}),
    Command(6, "DISCARD", "slot, count", "-",
            {"file": "fallocate(PUNCH_HOLE)", "block": "ioctl(BLKDISCARD)"}),
    Command(7, "QUERY", "-", "JSON {id, type, path, capacity_pages, health, errors}",
            {"file": "fstat", "block": "ioctl(BLKGETSIZE64)"}),
)  # fmt: skip
BY_OP = {c.op: c for c in COMMANDS}
OP_OPEN, OP_CLOSE, OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_QUERY = (c.op for c in COMMANDS)
OP_NAMES = {c.op: c.name for c in COMMANDS}
OP_HELLO = 0  # not a command: the service's first frame (request id 0), "ready to serve"

MAX_PAGES = 64  # pages in one READ or WRITE
PAGE = 4096
CRC = struct.Struct("<I")  # one page's CRC32, as READ requests and WRITE replies carry them
PAGE_NO = struct.Struct("<I")  # a page of the partition's memory, as READ and WRITE name them
MAX_FRAME = HEADER.size + 65536  # no page data: CRC32s and page numbers, or JSON
FLAG_RETRY = 1  # header flag: the request was in flight on a service that failed


def pack_header(req: int, stream: int, op: int, status: int = 0, slot: int = 0,
                count: int = 0, crc: int = 0, flags: int = 0) -> bytes:  # fmt: skip
    return HEADER.pack(req, stream, op, flags, status, slot, count, crc)


def unpack_header(data) -> tuple:
    """(req, stream, op, flags, status, slot, count, crc); ProtocolError if short."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"stream frame of {len(data)} bytes is shorter than its header")
    return HEADER.unpack_from(data)
