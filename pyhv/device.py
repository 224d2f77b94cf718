"""Paging devices as a paging service sees them.

A device has an identifier, a type (``file``, ``block``, or ``nbd``: an export
on an NBD server, reached through libnbd, pyhv.nbd) and a capacity in pages; the paging commands of :mod:`pyhv.wire` become its own operations
(the table is ``wire.COMMANDS``): opening (O_DIRECT where configured, always
for block devices), fdatasync, and fallocate(PUNCH_HOLE) or BLKDISCARD here;
READ and WRITE, preadv/pwritev, in the service's C engine (csrc/service.c),
which checks every page read against the CRC32 the hypervisor expects, so
that a page that changed on the device behind our back is an error
(EBADMSG), never returned.  The service keeps no state per slot: a redundant
service can take over a stream at any moment.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from pyhv.uffd import PAGE_SIZE, blkdev_size, punch_hole

NBD_CONNS = 4  # connections to an export that allows several (multi-conn), else 1

BLKDISCARD = 0x1277


class PagingDevice:
    def __init__(self, id: str, path: str, kind: str, size: int, direct: bool,
                 tls_psk: str | None = None, deadline: float = 0.0):  # fmt: skip
        self.id = id
        self.path = str(path)  # for NBD: the URI of this service's path
        self.kind = kind
        self.direct = (direct or kind == "block") and kind != "nbd"
        self.tls_psk = tls_psk
        self.deadline = deadline  # NBD: a command unanswered this long loses the path
        self.nbd = None
        self.pages = size // PAGE_SIZE
        self.errors = 0
        self.fd = -1
        self.snapfd = -1  # a snapshot the stream's first page-ins read (read-only), or -1
        self.snap_pages = 0

    @property
    def nbd_handle(self):
        return self.nbd.handle if self.nbd is not None else None

    def open(self) -> None:
        if self.kind == "nbd":
            from pyhv.nbd import CONNECT_S, NbdDevice

            # (connecting runs in the service's loop: a quarter of its timeout at most)
            self.nbd = NbdDevice(self.path, self.tls_psk, NBD_CONNS,
                                 connect_s=self.deadline / 2 if self.deadline else CONNECT_S,
                                 deadline_s=self.deadline or CONNECT_S)  # fmt: skip
            have = self.nbd.size // PAGE_SIZE
            if have < self.pages:
                self.close()
                raise OSError(errno.ENOSPC, f"export has {have} pages, {self.pages} needed")
            return
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        if self.kind == "file":
            self.fd = os.open(self.path, flags | os.O_CREAT, 0o600)
            if os.fstat(self.fd).st_size < self.pages * PAGE_SIZE:
                os.ftruncate(self.fd, self.pages * PAGE_SIZE)
        else:
            self.fd = os.open(self.path, flags)
            have = blkdev_size(self.fd) // PAGE_SIZE
            if have < self.pages:
                raise OSError(errno.ENOSPC, f"block device has {have} pages, {self.pages} needed")

    def open_snapshot(self, path: str) -> None:
        """The snapshot's memory file (pyhv.snapshot), O_DIRECT where the
        filesystem allows it.  A regular file: opened O_NONBLOCK, for a FIFO
        there would hold the service in open() until someone wrote to it."""
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            self.snapfd = os.open(path, flags | os.O_DIRECT)
        except OSError:
            self.snapfd = os.open(path, flags)
        st = os.fstat(self.snapfd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.snapfd)
            self.snapfd = -1
            raise OSError(errno.EINVAL, f"snapshot {path} is not a regular file")
        os.set_blocking(self.snapfd, True)
        self.snap_pages = st.st_size // PAGE_SIZE

    def close(self) -> None:
        if self.nbd is not None:
            self.nbd.close()
            self.nbd = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.snapfd >= 0:
            os.close(self.snapfd)
            self.snapfd = -1

    def _check_range(self, slot: int, count: int) -> None:
        if count < 1 or slot + count > self.pages:
            raise OSError(errno.EINVAL, f"slots {slot}+{count} outside device of {self.pages}")

    def flush(self) -> None:
        if self.nbd is not None:
            self.nbd.flush()
        else:
            os.fdatasync(self.fd)

    def discard(self, slot: int, count: int) -> None:
        self._check_range(slot, count)
        if self.nbd is not None:
            self.nbd.trim(slot * PAGE_SIZE, count * PAGE_SIZE)
        elif self.kind == "block":
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", slot * PAGE_SIZE, count * PAGE_SIZE))
        else:
            punch_hole(self.fd, slot * PAGE_SIZE, count * PAGE_SIZE)

    def query(self, io_errors: int = 0) -> dict:
        """What QUERY answers; io_errors: failed READs and WRITEs (the engine's)."""
        errors = self.errors + io_errors
        out = {
            "id": self.id,
            "type": self.kind,
            "path": self.path,
            "capacity_pages": self.pages,
            "direct": self.direct,
            "errors": errors,
            "health": "ok" if not errors else "degraded",
        }
        if self.nbd is not None:
            from pyhv.nbd import redact

            out["path"] = redact(self.path)
            out["nbd"] = {"connections": self.nbd.conns, "multi_conn": self.nbd.multi_conn,
                          "tls": self.nbd.tls, "can_trim": self.nbd.can_trim,
                          "can_flush": self.nbd.can_flush, "size": self.nbd.size}  # fmt: skip
            if self.nbd.dead:
                out["health"] = "path lost: " + self.nbd.why()
        return out
