"""The paging service: a separate process that owns paging devices.

Started by the hypervisor with one end of a SEQPACKET socketpair.  It runs
one loop: take a request frame, convert it into the device's own operation,
answer with the status (0 or -errno) and, for READ, the pages.  Requests of
every stream arrive on the one socket and are answered in arrival order;
the hypervisor keeps many in flight.  End-of-file on the socket means the
hypervisor is gone, and the service exits.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import mmap
import os
import signal
import socket
import sys

from pyhv import wire
from pyhv.device import PagingDevice
from pyhv.uffd import PAGE_SIZE

log = logging.getLogger("pyhv.service")


class PagingService:
    def __init__(self, name: str, sock: socket.socket):
        self.name = name
        self.sock = sock
        self.streams: dict[int, PagingDevice] = {}
        # page-aligned, as O_DIRECT wants
        self.buf = mmap.mmap(-1, wire.MAX_PAGES * PAGE_SIZE)
        self.view = memoryview(self.buf)
        self.hdr = bytearray(wire.HEADER.size)
        # the device interface definition, command by command
        self.handlers = {c.op: getattr(self, f"op_{c.name.lower()}") for c in wire.COMMANDS}

    def serve(self) -> int:
        """Serve until the hypervisor goes; 0, or 1 if it sent a malformed frame
        (which costs it the connection)."""
        log.info("paging service %s: serving (pid %d)", self.name, os.getpid())
        self.sock.sendmsg([wire.pack_header(0, 0, wire.OP_HELLO)])
        code = 0
        while True:
            try:
                n, _, flags, _ = self.sock.recvmsg_into([self.hdr, self.view])
            except InterruptedError:
                continue
            except ConnectionError:
                break
            if n == 0:
                log.info("paging service %s: hypervisor gone, exiting", self.name)
                break
            if n < wire.HEADER.size:
                log.error("paging service %s: a %d-byte frame is shorter than a header; "
                          "closing the connection", self.name, n)  # fmt: skip
                code = 1
                break
            self.handle(n, flags)
        self.sock.close()
        for dev in self.streams.values():
            dev.close()
        return code

    def handle(self, n: int, flags: int) -> None:
        req, stream, op, _fl, _st, slot, count, _crc = wire.unpack_header(self.hdr)
        payload = n - wire.HEADER.size
        status, reply = 0, b""
        try:
            if flags & socket.MSG_TRUNC:
                raise OSError(errno.EMSGSIZE, "request too large")
            handler = self.handlers.get(op)
            if handler is None:
                raise OSError(errno.EOPNOTSUPP, f"unknown op {op}")
            reply = handler(stream, slot, count, payload) or b""
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

    def op_open(self, stream, slot, count, payload):
        spec = json.loads(bytes(self.view[:payload]))
        old = self.streams.pop(stream, None)
        if old is not None:
            old.close()
        dev = PagingDevice(spec["id"], spec["path"], spec["kind"], spec["size"], spec["direct"])
        dev.open()
        self.streams[stream] = dev
        log.info("paging service %s: stream %d opened device %s (%s %s, %d pages)", self.name,
                 stream, dev.id, dev.kind, dev.path, dev.pages)  # fmt: skip

    def op_close(self, stream, slot, count, payload):
        dev = self.streams.pop(stream, None)
        if dev is not None:
            dev.close()

    def _crcs(self, at: int, count: int) -> list[int]:
        return [wire.CRC.unpack_from(self.view, at + i * wire.CRC.size)[0] for i in range(count)]

    def op_read(self, stream, slot, count, payload):
        if not 1 <= count <= wire.MAX_PAGES or payload != count * wire.CRC.size:
            raise OSError(errno.EINVAL, f"READ of {count} pages carries {payload} bytes")
        crcs = self._crcs(0, count)
        self.device(stream).read(slot, count, self.view, crcs)
        return self.view[: count * PAGE_SIZE]

    def op_write(self, stream, slot, count, payload):
        if not 1 <= count <= wire.MAX_PAGES or payload != count * (PAGE_SIZE + wire.CRC.size):
            raise OSError(errno.EINVAL, f"WRITE of {count} pages carries {payload} bytes")
        crcs = self._crcs(count * PAGE_SIZE, count)
        self.device(stream).write(slot, count, self.view, crcs)

    def op_flush(self, stream, slot, count, payload):
        self.device(stream).flush()

    def op_discard(self, stream, slot, count, payload):
        self.device(stream).discard(slot, count)

    def op_query(self, stream, slot, count, payload):
        return json.dumps(self.device(stream).query()).encode()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pyhv-service")
    ap.add_argument("--name", required=True)
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the hypervisor decides when we stop
    sock = socket.socket(fileno=args.fd)
    return PagingService(args.name, sock).serve()


if __name__ == "__main__":
    sys.exit(main())
