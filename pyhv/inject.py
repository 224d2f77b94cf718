"""Fault injection on real backing files: errors come from the real I/O path
of a paging service, never from an `if` in pyhv.

* :class:`FaultyDevice` -- nbdkit serves an image file through its error
  filter, and nbdfuse mounts the export as a plain local file: a paging
  device whose reads and writes fail with a real errno (EIO, ENOSPC, ...)
  while a trigger file exists, at a chosen rate; killing nbdkit makes the
  device disappear under the running system.  Use it with ``direct = true``:
  FUSE caches reads otherwise, and readahead would hide the error.
* :func:`small_filesystem` -- a tmpfs of a chosen size: a paging file on it
  that is larger than the filesystem fails writes with a real ENOSPC; grow it
  with :func:`small_filesystem` again.
* :func:`corrupt` -- random bytes over the slots of a partition's pages in
  its device file, under the running system.

State of a faulty device lives in its directory (``faulty.json``) so that
``pyhv inject`` calls from different processes find it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pyhv.uffd import PAGE_SIZE

STATE = "faulty.json"
#: The errors an NBD server can return (nbdkit's error filter offers these).
NBD_ERRORS = ("EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "ESHUTDOWN")


class InjectError(RuntimeError):
    """A fault could not be set up (tool missing, mount failed, ...)."""


class InjectUsage(InjectError):
    """What was asked is not valid (an unknown errno, a rate over 100%)."""


def check_error(value: str, what: str) -> str:
    """An errno name the NBD protocol can carry."""
    if value.upper() not in NBD_ERRORS:
        raise InjectUsage(f"{what}: {value!r} is not one of {', '.join(NBD_ERRORS)}")
    return value.upper()


_RATE = re.compile(r"^(?:(\d+(?:\.\d+)?)%|(\d*\.?\d+)|(\d+)/(\d+))$")


def check_rate(value: str, what: str) -> str:
    """A rate as nbdkit takes it: "N%" from 0 to 100, a probability 0..1,
    or a fraction "N/M"."""
    text = value.strip()
    m = _RATE.match(text)
    rate = -1.0
    if m and m.group(1) is not None:
        rate = float(m.group(1)) / 100
    elif m and m.group(2) is not None:
        rate = float(m.group(2))
    elif m and int(m.group(4)):
        rate = int(m.group(3)) / int(m.group(4))
    if not 0.0 <= rate <= 1.0:
        raise InjectUsage(f"{what}: {value!r} is not a rate from 0% to 100% (or 0 to 1)")
    return text


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise InjectError(f"{tool} is not installed (Debian package {package})")
    return path


def _wait(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise InjectError(f"timed out waiting for {what}")
        time.sleep(0.02)


class FaultyDevice:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory).resolve()
        self.image = self.dir / "image.img"
        self.socket = self.dir / "nbd.sock"
        self.mountpoint = self.dir / "mnt"
        self.path = self.mountpoint / "device"  # what a [[device]] path names
        self.read_trigger = self.dir / "fail-reads"
        self.write_trigger = self.dir / "fail-writes"

    def start(self, size: int, read_error: str = "EIO", write_error: str = "EIO",
              read_rate: str = "100%", write_rate: str = "100%") -> dict:  # fmt: skip
        read_error = check_error(read_error, "--read-error")
        write_error = check_error(write_error, "--write-error")
        read_rate = check_rate(read_rate, "--read-rate")
        write_rate = check_rate(write_rate, "--write-rate")
        nbdkit = _need("nbdkit", "nbdkit")
        nbdfuse = _need("nbdfuse", "libnbd-bin")
        if (self.dir / STATE).exists():
            raise InjectError(f"a faulty device is set up in {self.dir} already "
                              "(stop it first)")  # fmt: skip
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)  # left by an nbdkit that died (vanish)
        self.mountpoint.mkdir(exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(size)
        pidfile = self.dir / "nbdkit.pid"
        p = subprocess.run(
            [nbdkit, "-U", str(self.socket), "-P", str(pidfile), "--filter=error", "file",
             str(self.image), f"error-pread={read_error}", f"error-pread-rate={read_rate}",
             f"error-pread-file={self.read_trigger}", f"error-pwrite={write_error}",
             f"error-pwrite-rate={write_rate}", f"error-pwrite-file={self.write_trigger}"],
            capture_output=True, text=True,
        )  # fmt: skip
        if p.returncode:
            last = (p.stderr.strip().splitlines() or ["failed"])[-1]
            raise InjectError(f"nbdkit: {last}")
        _wait(lambda: pidfile.exists() and self.socket.exists(), "nbdkit")
        fuse = subprocess.Popen([nbdfuse, str(self.path), "--unix", str(self.socket)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(self.dir / "nbdfuse.log", "ab"),
                                start_new_session=True)  # fmt: skip
        _wait(lambda: self.path.exists() and self.path.stat().st_size == size, "nbdfuse")
        state = {"nbdkit": int(pidfile.read_text()), "nbdfuse": fuse.pid, "size": size,
                 "path": str(self.path), "read_trigger": str(self.read_trigger),
                 "write_trigger": str(self.write_trigger)}  # fmt: skip
        (self.dir / STATE).write_text(json.dumps(state))
        return state

    def state(self) -> dict:
        try:
            return json.loads((self.dir / STATE).read_text())
        except (OSError, ValueError):
            raise InjectError(f"no faulty device in {self.dir}") from None

    def fail(self, reads: bool | None = None, writes: bool | None = None) -> None:
        """Turn failing reads and writes on or off (None: leave as is)."""
        self.state()
        for on, trigger in ((reads, self.read_trigger), (writes, self.write_trigger)):
            if on is True:
                trigger.touch()
            elif on is False:
                trigger.unlink(missing_ok=True)

    def vanish(self) -> None:
        """The device disappears under the running system (nbdkit dies)."""
        _kill(self.state()["nbdkit"], signal.SIGKILL)

    def stop(self) -> None:
        """Unmount, stop nbdfuse and nbdkit, and leave nothing behind that
        would stop the next start (the socket, the state, the triggers)."""
        st = self.state()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        for pid in (st["nbdfuse"], st["nbdkit"]):
            _kill(pid, signal.SIGTERM)
        for pid in (st["nbdfuse"], st["nbdkit"]):
            _wait(lambda pid=pid: not alive(pid), f"process {pid} to exit", timeout=5)
        for path in (self.dir / STATE, self.socket, self.read_trigger, self.write_trigger,
                     self.dir / "nbdkit.pid"):  # fmt: skip
            path.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Is pid a live process (not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def small_filesystem(directory: str | os.PathLike, size: int) -> None:
    """Mount a tmpfs of `size` bytes at directory, or resize the one there."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    mounted = os.path.ismount(d)
    opts = f"{'remount,' if mounted else ''}size={size}"
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "pyhv-small", str(d)],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode:
        raise InjectError(f"mount tmpfs at {d}: {p.stderr.strip()}")


def remove_small_filesystem(directory: str | os.PathLike) -> None:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def corrupt(device_path: str, slots: list[int]) -> int:
    """Random bytes over each slot of a device file; returns how many."""
    fd = os.open(device_path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for slot in slots:
            os.pwrite(fd, os.urandom(PAGE_SIZE), slot * PAGE_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(slots)
