"""The paging service: a separate process that owns paging devices.

Started by the hypervisor with one end of a SEQPACKET socketpair.  READ and
WRITE, the paging itself, are served by the C I/O engine's threads
(csrc/service.c), several at once and page-ins first; every other command
(OPEN, CLOSE, FLUSH, DISCARD, QUERY, or a malformed frame) comes back here
once everything before it has been answered, and is answered here.  The
hypervisor keeps many requests in flight and matches replies by request id.
End-of-file on the socket means the hypervisor is gone, and the service exits.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import resource
import signal
import socket
import sys

from pyhv import wire
from pyhv.device import PagingDevice
from pyhv.uffd import ServiceEngine

log = logging.getLogger("pyhv.service")


class PagingService:
    IO_THREADS = 4

    def __init__(self, name: str, sock: socket.socket, poll_us: int = 0):
        self.name = name
        self.sock = sock
        self.engine = ServiceEngine(sock.fileno(), self.IO_THREADS, poll_us)
        self.streams: dict[int, PagingDevice] = {}
        self.frame = bytearray(ServiceEngine.MAX_FRAME)
        self.view = memoryview(self.frame)[wire.HEADER.size :]
        # the device interface definition, command by command; READ and WRITE
        # reach Python only when the engine would not take them (malformed)
        self.handlers = {c.op: getattr(self, f"op_{c.name.lower()}") for c in wire.COMMANDS}

    def serve(self) -> int:
        """Serve until the hypervisor goes; 0, or 1 if it sent a malformed frame
        (which costs it the connection)."""
        log.info("paging service %s: serving (pid %d), %d I/O threads", self.name, os.getpid(),
                 self.IO_THREADS)  # fmt: skip
        self.sock.sendmsg([wire.pack_header(0, 0, wire.OP_HELLO)])
        code = 0
        while True:
            try:
                n, flags, fds = self.engine.serve(self.frame)
            except OSError as e:
                log.info("paging service %s: stream socket: %s; exiting", self.name, e.strerror)
                break
            if n == 0:
                log.info("paging service %s: hypervisor gone, exiting", self.name)
                break
            if n < wire.HEADER.size:
                wire.close_fds(fds)
                log.error("paging service %s: a %d-byte frame is shorter than a header; "
                          "closing the connection", self.name, n)  # fmt: skip
                code = 1
                break
            self.handle(n, flags, fds)
        self.sock.close()
        for stream, dev in self.streams.items():
            self.engine.stream_clear(stream)
            dev.close()
        return code

    def handle(self, n: int, flags: int, fds: list[int]) -> None:
        req, stream, op, _fl, _st, slot, count, _crc = wire.unpack_header(self.frame)
        payload = n - wire.HEADER.size
        status, reply = 0, b""
        try:
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise OSError(errno.EMSGSIZE, "request too large")
                handler = self.handlers.get(op)
                if handler is None:
                    raise OSError(errno.EOPNOTSUPP, f"unknown op {op}")
                if fds and op != wire.OP_OPEN:
                    raise OSError(errno.EINVAL, "only OPEN carries a file descriptor")
                reply = handler(stream, slot, count, payload, fds) or b""
            finally:
                wire.close_fds(fds)
        except OSError as e:
            status = -(e.errno or errno.EIO)
            dev = self.streams.get(stream)
            if dev is not None:
                dev.errors += 1
            log.warning("paging service %s: stream %d %s slot %d+%d: %s", self.name, stream,
                        wire.OP_NAMES.get(op, op), slot, count, e)  # fmt: skip
        header = wire.pack_header(req, stream, op, status, slot, count)
        self.sock.sendmsg([header, reply] if reply else [header])

    def device(self, stream: int) -> PagingDevice:
        dev = self.streams.get(stream)
        if dev is None:
            raise OSError(errno.EBADF, f"stream {stream} is not open")
        return dev

    def op_open(self, stream, slot, count, payload, fds):
        """The device, and (SCM_RIGHTS) the partition's memory: WRITE takes
        its pages from there."""
        if len(fds) != 1:
            raise OSError(errno.EINVAL, "OPEN carries the partition's memory as one fd")
        spec = open_spec(bytes(self.view[:payload]))
        dev = PagingDevice(spec["id"], spec["path"], spec["kind"], spec["size"], spec["direct"],
                           tls_psk=spec.get("tls_psk"), deadline=spec.get("path_timeout", 0.0))
        try:  # (a stream opened again is replaced at once: a READ never finds it closed)
            dev.open()
            if spec.get("snapshot"):
                dev.open_snapshot(spec["snapshot"])
            self.engine.stream_set(stream, dev.fd, dev.pages, fds[0], int(spec["memory"]),
                                   dev.snapfd, dev.snap_pages, dev.nbd_handle)  # fmt: skip
        except OSError:
            dev.close()
            raise
        old = self.streams.pop(stream, None)
        if old is not None:
            old.close()
        self.streams[stream] = dev
        log.info("paging service %s: stream %d opened device %s (%s %s, %d pages)", self.name,
                 stream, dev.id, dev.kind, dev.path, dev.pages)  # fmt: skip

    def op_close(self, stream, slot, count, payload, fds):
        dev = self.streams.pop(stream, None)
        self.engine.stream_clear(stream)
        if dev is not None:
            dev.close()

    def op_read(self, stream, slot, count, payload, fds):
        """Only what the engine refused comes here: say why."""
        want = count * wire.CRC.size + wire.PAGE_NO.size  # CRC32s, then the first page
        self._paging_refused(stream, slot, count, payload, want)

    def op_write(self, stream, slot, count, payload, fds):
        self._paging_refused(stream, slot, count, payload, count * wire.PAGE_NO.size)

    def _paging_refused(self, stream, slot, count, payload, want):
        dev = self.device(stream)
        if not 1 <= count <= wire.MAX_PAGES or payload != want:
            raise OSError(errno.EINVAL, f"{count} pages with {payload} bytes of payload")
        raise OSError(errno.EINVAL, f"slots {slot}+{count} outside device of {dev.pages}")

    def op_flush(self, stream, slot, count, payload, fds):
        self.device(stream).flush()

    def op_discard(self, stream, slot, count, payload, fds):
        self.device(stream).discard(slot, count)

    def op_query(self, stream, slot, count, payload, fds):
        dev = self.device(stream)
        return json.dumps(dev.query(self.engine.stream_errors(stream))).encode()


def open_spec(data: bytes) -> dict:
    """OPEN's payload, checked: an OSError (EINVAL) for anything the device
    cannot be opened from, never another exception (which would end the
    service, and with it every stream it serves)."""
    def bad(why: str):
        return OSError(errno.EINVAL, f"OPEN: {why}")

    try:
        spec = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("the payload is not JSON") from None
    if not isinstance(spec, dict):
        raise bad("the payload is not a JSON object")
    for key, types in (("id", str), ("path", str), ("kind", str), ("size", int),
                       ("direct", bool), ("memory", int)):  # fmt: skip
        v = spec.get(key)
        if not isinstance(v, types) or (types is int and (isinstance(v, bool) or v <= 0)):
            raise bad(f"{key} {v!r:.80} is missing or not a {types.__name__}"
                      + (" > 0" if types is int else ""))  # fmt: skip
    if spec["kind"] not in ("file", "block", "nbd"):
        raise bad(f"kind {spec['kind']!r:.80} is no device type")
    for key in ("snapshot", "tls_psk"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise bad(f"{key} {spec[key]!r:.80} is not a path")
    for key in ("path", "snapshot", "tls_psk"):
        if "\0" in (spec.get(key) or ""):
            raise bad(f"{key} holds a NUL byte")
    t = spec.get("path_timeout", 0.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
        raise bad(f"path_timeout {t!r:.80} is not a number of seconds")
    if spec["size"] >= 1 << 63 or spec["memory"] >= 1 << 63:
        raise bad("size or memory is too large")
    return spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pyhv-service")
    ap.add_argument("--name", required=True)
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--fast-fd", type=int, default=-1, help="the fast channel: READs only")
    ap.add_argument("--poll-us", type=int, default=0, help="poll this long for the next request")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the hypervisor decides when we stop
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # two fds a stream: device, memory
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sock = socket.socket(fileno=args.fd)
    service = PagingService(args.name, sock, args.poll_us)
    if args.fast_fd >= 0:
        service.engine.serve_fast(args.fast_fd)
    return service.serve()


if __name__ == "__main__":
    sys.exit(main())
