"""Paging devices as a paging service sees them.

A device has an identifier, a type (``file`` or ``block``) and a capacity in
pages; the paging commands of :mod:`pyhv.wire` become its own operations
here: pread/pwrite (O_DIRECT where configured, always for block devices),
fdatasync, and fallocate(PUNCH_HOLE) or BLKDISCARD.  Each slot written keeps a
CRC32, so that a page that changed on the device behind our back is reported
as an error (EBADMSG), never returned.
"""

from __future__ import annotations

import array
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
        self.crc = array.array("I", bytes(4 * self.pages))
        self.written = bytearray(self.pages)  # 1 where the slot holds a page
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

    def read(self, slot: int, count: int, buf: memoryview) -> None:
        """Read count pages from slot into buf (page-aligned for O_DIRECT)."""
        self._check_range(slot, count)
        n = count * PAGE_SIZE
        for i in range(slot, slot + count):
            if not self.written[i]:
                raise OSError(errno.ENODATA, f"slot {i} was never written")
        got = os.preadv(self.fd, [buf[:n]], slot * PAGE_SIZE)
        if got != n:
            raise OSError(errno.EIO, f"short read: {got} of {n} bytes")
        for i in range(count):
            if zlib.crc32(buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) != self.crc[slot + i]:
                raise OSError(errno.EBADMSG, f"checksum mismatch at slot {slot + i}")

    def write(self, slot: int, count: int, buf: memoryview) -> None:
        """Write count pages from buf to slot."""
        self._check_range(slot, count)
        n = count * PAGE_SIZE
        for i in range(count):  # invalid until the write is known complete
            self.written[slot + i] = 0
        put = os.pwritev(self.fd, [buf[:n]], slot * PAGE_SIZE)
        if put != n:
            raise OSError(errno.ENOSPC, f"short write: {put} of {n} bytes")
        for i in range(count):
            self.crc[slot + i] = zlib.crc32(buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            self.written[slot + i] = 1

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, slot: int, count: int) -> None:
        self._check_range(slot, count)
        for i in range(slot, slot + count):
            self.written[i] = 0
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
            "used_pages": self.pages - self.written.count(0),
            "direct": self.direct,
            "errors": self.errors,
            "health": "ok" if not self.errors else "degraded",
        }
