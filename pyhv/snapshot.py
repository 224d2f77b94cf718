"""``pyhv snapshot save NAME DIR``: a partition's memory and metadata as
mmap-ninja directories, written atomically.

The hypervisor holds the partition still while this runs (it must be
suspended, or have no worker; nobody attaches or resumes it until this
process's connection closes) and hands over its page table and memfd.
This process reads every page where it is: resident pages from the memfd,
pages on the device from their slot (checked against their CRC32: a page
whose copy does not match is never saved as if it were good), zeros for
pages never written or given back.  DIR holds:

    memory/        mmap-ninja numpy array, shape (pages, 4096), uint8
    crc32/         mmap-ninja numpy array, shape (pages,), uint32
    working_set/   the pages resident when it was suspended, least recently
                   used first (uint32)
    meta.json      partition, sizes, pages lost to machine checks, when

Everything is written into a hidden directory beside DIR and synced, then
swapped into DIR's place in one rename (renameat2 RENAME_EXCHANGE over an
older snapshot): a crash, a SIGKILL or a full disk leaves DIR as it was.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import shutil
import time
import zlib
from pathlib import Path

from pyhv import wire
from pyhv.hypervisor import CONTROL_SOCKET
from pyhv.system import EXIT_USAGE, Fail
from pyhv.uffd import PAGE_SIZE

FORMAT = "pyhv-snapshot"
VERSION = 1
# the engine's page states (csrc/engine.c)
UNTOUCHED, DIRTY, CLEAN, FILLING, PAGING_OUT, ON_DEVICE, POISONED, LOANED, SNAPSHOT = range(9)
RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    if libc.renameat2(AT_FDCWD, bytes(a), AT_FDCWD, bytes(b), RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(b))


def _fsync_tree(d: Path) -> None:
    for root, dirs, files in os.walk(d):
        for name in files + dirs:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clear_partials(parent: Path, name: str) -> None:
    """Partial saves left by processes that are gone (a SIGKILL)."""
    for p in parent.glob(f".{name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def save(run_dir: str, partition: str, out_dir: str, progress: bool = True) -> dict:
    try:
        import numpy as np
        import mmap_ninja.numpy as ninja
    except ImportError as e:  # (the optional extra)
        raise Fail(f"snapshot: needs numpy and mmap-ninja ({e})", EXIT_USAGE) from None

    from pyhv.progress import Progress

    out = Path(out_dir).absolute()
    if not out.parent.is_dir():
        raise Fail(f"snapshot: {out.parent} is not a directory", EXIT_USAGE)
    if out.exists() and not (out / "meta.json").is_file():
        raise Fail(f"snapshot: {out} exists and is no snapshot; not replaced", EXIT_USAGE)
    started = time.monotonic()
    try:
        sock = wire.connect(os.path.join(run_dir, CONTROL_SOCKET), timeout=None)
        wire.send_control(sock, {"op": "snapshot", "partition": partition, "dir": str(out)})
        reply, fds = wire.recv_control(sock)
    except OSError as e:
        raise Fail(f"snapshot: no hypervisor in {run_dir}: {e.strerror or e}") from None
    if not reply or not reply.get("ok") or len(fds) != 1:
        wire.close_fds(fds)
        sock.close()
        raise Fail(f"snapshot: {(reply or {}).get('error', 'refused')}", EXIT_USAGE)
    memfd = fds[0]
    pages = reply["pages"]
    raw = zlib.decompress(base64.b64decode(reply["table"]))
    states = np.frombuffer(raw, np.uint8, pages, 0)
    slots = np.frombuffer(raw, np.int64, pages, pages)
    crcs = np.frombuffer(raw, np.uint32, pages, pages * 9)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    _clear_partials(out.parent, out.name)
    devfd = srcfd = -1
    nbd = None
    poisoned: list[int] = []
    bar = Progress(f"snapshot {partition}", pages, enabled=progress)
    try:
        if reply.get("nbd"):  # a device on an NBD server: read through a connection of our own
            from pyhv.nbd import NbdDevice

            for i, uri in enumerate(reply["nbd"]["uris"]):  # the first path that works
                try:
                    nbd = NbdDevice(uri, reply["nbd"].get("tls_psk"))
                    break
                except OSError:
                    if i == len(reply["nbd"]["uris"]) - 1:
                        raise
        else:
            devfd = os.open(reply["device"], os.O_RDONLY)
        if reply.get("snapshot"):  # (restored from one: pages never touched are still there)
            srcfd = os.open(os.path.join(reply["snapshot"], "memory", "data.ninja"), os.O_RDONLY)
        partial.mkdir()
        new_crc = np.zeros(pages, np.uint32)
        zeros = bytes(PAGE_SIZE)
        zero_crc = zlib.crc32(zeros)

        def checked(fd: int, at: int, i: int, where: str) -> bytes:
            """A page at rest, which must match the CRC32 its table holds."""
            if fd == devfd and nbd is not None:
                data = nbd.pread(PAGE_SIZE, at * PAGE_SIZE)
            else:
                data = os.pread(fd, PAGE_SIZE, at * PAGE_SIZE)
            if len(data) != PAGE_SIZE or zlib.crc32(data) != crcs[i]:
                raise Fail(f"snapshot: page {i} of {partition} fails its CRC32 {where}; "
                           "nothing saved")  # fmt: skip
            new_crc[i] = crcs[i]
            return data

        def page_rows():
            for i in range(pages):
                st = states[i]
                if st in (DIRTY, CLEAN):
                    data = os.pread(memfd, PAGE_SIZE, i * PAGE_SIZE)
                    new_crc[i] = zlib.crc32(data)
                elif st == ON_DEVICE:
                    data = checked(devfd, int(slots[i]), i, f"on the device (slot {slots[i]})")
                elif st == SNAPSHOT and srcfd >= 0:
                    data = checked(srcfd, i, i, "in the snapshot it was restored from")
                elif st in (UNTOUCHED, LOANED, POISONED):
                    data = zeros
                    new_crc[i] = zero_crc
                    if st == POISONED:
                        poisoned.append(i)
                else:
                    raise Fail(f"snapshot: page {i} of {partition} is in flight; try again")
                if i % 1024 == 1023:
                    bar.advance(1024)
                yield np.frombuffer(data, np.uint8)

        ninja.from_generator(partial / "memory", page_rows(), batch_size=256)
        ninja.from_ndarray(partial / "crc32", new_crc)
        ninja.from_ndarray(partial / "working_set", np.asarray(reply["working_set"], np.uint32))
        meta = {"format": FORMAT, "version": VERSION, "partition": partition,
                "memory_bytes": reply["memory"], "page_size": PAGE_SIZE, "pages": pages,
                "poisoned": poisoned, "state": reply["state"], "saved": time.time(),
                "working_set_pages": len(reply["working_set"])}  # fmt: skip
        (partial / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _fsync_tree(partial)
        if out.exists():
            _exchange(partial, out)  # the old one is now at `partial`
            shutil.rmtree(partial)
        else:
            os.rename(partial, out)
        fd = os.open(out.parent, os.O_RDONLY)  # (the rename, durable)
        os.fsync(fd)
        os.close(fd)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        what = "no space left" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise Fail(f"snapshot: {partition} not saved to {out}: {what}"
                   + (f" ({e.filename})" if e.filename else "")) from None  # fmt: skip
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        bar.close()
        if nbd is not None:
            nbd.close()
        for fd in (devfd, srcfd):
            if fd >= 0:
                os.close(fd)
        os.close(memfd)
        sock.close()  # (the hypervisor lets the partition go)
    return {"ok": True, **meta, "dir": str(out), "seconds": round(time.monotonic() - started, 3)}
