"""Paging devices as a paging service sees them.

A device has an identifier, a type (``file`` or ``block``) and a capacity in
pages; the paging commands of :mod:`pyhv.wire` become its own operations
here: pread/pwrite (O_DIRECT where configured, always for block devices),
fdatasync, and fallocate(PUNCH_HOLE) or BLKDISCARD (the table is
``wire.COMMANDS``).  Every page travels with its CRC32: a WRITE whose page
does not match it is refused, and a READ checks what the device returned
against the CRC32 the hypervisor expects, so that a page that changed on the
device behind our back is an error (EBADMSG), never returned.  The service
keeps no state per slot: a redundant service can take over a stream at any
moment.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zlib

from pyhv.uffd import PAGE_SIZE, blkdev_size, punch_hole

BLKDISCARD = 0x1277


class PagingDevice:
    def __init__(self, id: str, path: str, kind: str, size: int, direct: bool):
        self.id = id
        self.path = str(path)
        self.kind = kind
        self.direct = direct or kind == "block"
        self.pages = size // PAGE_SIZE
        self.errors = 0
        self.fd = -1

    def open(self) -> None:
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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _check_range(self, slot: int, count: int) -> None:
        if count < 1 or slot + count > self.pages:
            raise OSError(errno.EINVAL, f"slots {slot}+{count} outside device of {self.pages}")

    @staticmethod
    def _check_crcs(slot: int, buf: memoryview, crcs: list[int]) -> None:
        for i, want in enumerate(crcs):
            if zlib.crc32(buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) != want:
                raise OSError(errno.EBADMSG, f"checksum mismatch at slot {slot + i}")

    def read(self, slot: int, count: int, buf: memoryview, crcs: list[int]) -> None:
        """Read count pages from slot into buf (page-aligned for O_DIRECT) and
        check each against the CRC32 expected of it."""
        self._check_range(slot, count)
        n = count * PAGE_SIZE
        got = os.preadv(self.fd, [buf[:n]], slot * PAGE_SIZE)
        if got != n:
            raise OSError(errno.EIO, f"short read: {got} of {n} bytes")
        self._check_crcs(slot, buf, crcs)

    def write(self, slot: int, count: int, buf: memoryview, crcs: list[int]) -> None:
        """Write count pages from buf to slot, each checked against its CRC32."""
        self._check_range(slot, count)
        self._check_crcs(slot, buf, crcs)
        n = count * PAGE_SIZE
        put = os.pwritev(self.fd, [buf[:n]], slot * PAGE_SIZE)
        if put != n:
            raise OSError(errno.ENOSPC, f"short write: {put} of {n} bytes")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, slot: int, count: int) -> None:
        self._check_range(slot, count)
        if self.kind == "block":
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", slot * PAGE_SIZE, count * PAGE_SIZE))
        else:
            punch_hole(self.fd, slot * PAGE_SIZE, count * PAGE_SIZE)

    def query(self) -> dict:
        return {
            "id": self.id,
            "type": self.kind,
            "path": self.path,
            "capacity_pages": self.pages,
            "direct": self.direct,
            "errors": self.errors,
            "health": "ok" if not self.errors else "degraded",
        }
