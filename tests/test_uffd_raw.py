"""The raw C layer (``pyhv.uffd`` over ``pyhv._core``) on real userfaultfd faults.

No mocks: every fault here is a real fault on a memfd mapped ``MAP_SHARED``,
delivered through a real userfaultfd and resolved by the real ioctls.

The GIL trap: a fault taken by Python code holds the GIL, so a Python handler
in the same process could never run.  Faults are therefore raised *by the
kernel* on behalf of a worker thread, inside a system call that has released
the GIL: ``os.preadv`` into a slice of the registered mapping (copy_to_user: a
write fault) or ``os.pwrite`` out of it (copy_from_user: a read fault).  Our
uffd is not USER_MODE_ONLY, so those kernel accesses fault through it while
the main thread drains and resolves.  What must die or exit (SIGBUS, the
watchdog, an exited registrant) runs in a forked child.

The main thread never touches a page it has not made resident itself: that
would fault with the GIL held and hang.  Every wait is bounded; closing the
uffd in teardown wakes any worker still blocked, so a broken kernel path
fails a test instead of hanging the run.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import socket
import struct
import termios
import threading
import time

import pytest

from pyhv import uffd
from pyhv._core import lib

PAGE = uffd.PAGE_SIZE
WAIT = 10.0  # upper bound of any wait; a healthy run takes milliseconds

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# helpers


def pattern(seed: int, n: int = PAGE) -> bytes:
    """n recognisable bytes, different for each seed."""
    return bytes((seed * 31 + i * 7 + 1) & 0xFF for i in range(n))


class Source:
    """A page-aligned, resident, unregistered buffer to UFFDIO_COPY from."""

    def __init__(self, data: bytes):
        self.mm = mmap.mmap(-1, max(PAGE, len(data)))
        self.mm[: len(data)] = data
        self.addr = uffd.address_of(self.mm)

    def close(self) -> None:
        self.mm.close()


def fdinfo(fd: int) -> dict[str, str]:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def wait_pending(fd: int, n: int) -> None:
    """Wait until n faults are queued on fd and not yet read (fdinfo 'pending')."""
    deadline = time.monotonic() + WAIT
    while int(fdinfo(fd)["pending"]) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"only {fdinfo(fd)['pending']} of {n} faults arrived on the uffd")
        time.sleep(0.002)


def snapshot(buf: uffd.FaultBuffer, n: int) -> list[tuple[int, int, int, int]]:
    """(event, a, b, tid) of the first n messages (the buffer is reused)."""
    return [(m.event, m.a, m.b, m.tid) for m in (buf.msgs[i] for i in range(n))]


def wait_faults(fd: int, count: int, buf: uffd.FaultBuffer | None = None):
    """Poll and drain fd until `count` messages arrived; returns them."""
    buf = buf or uffd.FaultBuffer()
    got: list[tuple[int, int, int, int]] = []
    p = select.poll()
    p.register(fd, select.POLLIN)
    deadline = time.monotonic() + WAIT
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"{len(got)} of {count} uffd messages arrived: {got}")
        if p.poll(left * 1000):
            got.extend(snapshot(buf, buf.drain(fd)))
    assert len(got) == count, got
    return got


class Toucher(threading.Thread):
    """A worker thread running fn() (a system call that faults in the kernel)."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = None
        self.error: BaseException | None = None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def finish(self):
        self.join(WAIT)
        assert not self.is_alive(), "the toucher is still blocked in a fault"
        if self.error is not None:
            raise self.error
        return self.result


class Shm:
    """A memfd of npages mapped MAP_SHARED and registered on its own uffd."""

    def __init__(self, npages: int, mode: int, features: int):
        self.npages = npages
        self.fd = uffd.memfd("pyhv-test", npages * PAGE)
        self.mm = mmap.mmap(self.fd, npages * PAGE, mmap.MAP_SHARED)
        self.mv = memoryview(self.mm)
        self.addr = uffd.address_of(self.mm)
        self.uffd = uffd.open_uffd()
        uffd.api(self.uffd, features)
        self.ioctls = uffd.register(self.uffd, self.addr, npages * PAGE, mode) if mode else 0
        self.threads: list[Toucher] = []

    def page(self, i: int) -> int:
        return self.addr + i * PAGE

    def view(self, i: int, off: int = 0, n: int = PAGE) -> memoryview:
        return self.mv[i * PAGE + off : i * PAGE + off + n]

    def resident(self, i: int) -> bytes:
        """Page i read by the main thread: only for pages known to be resident."""
        return bytes(self.mm[i * PAGE : (i + 1) * PAGE])

    def _start(self, fn) -> Toucher:
        t = Toucher(fn)
        self.threads.append(t)
        t.start()
        return t

    def write_async(self, i: int, off: int, data: bytes) -> Toucher:
        """A thread that writes data at page i + off through the kernel
        (preadv from a memfd: copy_to_user into the mapping, a write fault).
        Its result is the byte count."""
        src = os.memfd_create("pyhv-test-src", os.MFD_CLOEXEC)
        os.write(src, data)

        def fn():
            try:
                return os.preadv(src, [self.view(i, off, len(data))], 0)
            finally:
                os.close(src)

        return self._start(fn)

    def read_async(self, i: int, off: int = 0, n: int = PAGE) -> Toucher:
        """A thread that reads page i through the kernel (pwrite of the
        mapping to a memfd: copy_from_user, a read fault).  Its result is
        the bytes it saw."""

        def fn():
            sink = os.memfd_create("pyhv-test-sink", os.MFD_CLOEXEC)
            try:
                assert os.pwrite(sink, self.view(i, off, n), 0) == n
                return os.pread(sink, n, 0)
            finally:
                os.close(sink)

        return self._start(fn)

    def close(self) -> None:
        # Closing the uffd wakes every thread still blocked on it (its fault
        # is then served by shmem); only then can the mapping go.
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        for t in self.threads:
            t.join(WAIT)
        self.mv.release()
        try:
            self.mm.close()
        except BufferError:  # a thread still holds a slice: leak the mapping
            pass
        os.close(self.fd)


@pytest.fixture
def make_shm():
    made: list[Shm] = []

    def make(npages=8, mode=uffd.MODE_MISSING | uffd.MODE_WP, features=None):
        if features is None:
            features = uffd.feature_mask(uffd.WORKER_FEATURES)
        s = Shm(npages, mode, features)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def shm(make_shm):
    return make_shm()


@pytest.fixture
def sources():
    made: list[Source] = []

    def make(data: bytes) -> Source:
        s = Source(data)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def fork_child(body) -> int:
    """Fork; the child runs body() and _exits with its return value (98 on
    an exception, after printing it).  Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 97
        try:
            code = body()
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 98
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int) -> int:
    """The child's wait status, waited for at most WAIT seconds."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], WAIT)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"child {pid} did not exit within {WAIT} s")
    return os.waitpid(pid, 0)[1]


def exit_code(status: int) -> int:
    assert os.WIFEXITED(status), f"child did not exit normally: {status:#x}"
    return os.WEXITSTATUS(status)


# --------------------------------------------------------------------------
# open, API handshake, features


def test_probe_features_offers_missing_shmem_and_wp_on_shmem():
    offered = uffd.probe_features()
    assert offered & uffd.FEATURES["MISSING_SHMEM"]
    assert offered & uffd.FEATURES["WP_HUGETLBFS_SHMEM"]
    assert uffd.missing_features(uffd.WORKER_FEATURES) == []


def test_missing_features_names_exactly_the_bits_not_offered():
    offered = uffd.FEATURES["MISSING_SHMEM"] | uffd.FEATURES["THREAD_ID"]
    names = ["MISSING_SHMEM", "POISON", "THREAD_ID", "MOVE"]
    assert uffd.missing_features(names, offered) == ["POISON", "MOVE"]
    assert uffd.missing_features([], offered) == []
    assert uffd.feature_mask(["POISON", "MOVE"]) == (
        uffd.FEATURES["POISON"] | uffd.FEATURES["MOVE"]
    )


def test_open_uffd_is_cloexec_and_nonblocking_as_asked():
    fd = uffd.open_uffd()
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)
    fd = uffd.open_uffd(nonblock=False)
    try:
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)


def test_api_returns_the_offered_features_and_ioctls():
    fd = uffd.open_uffd()
    try:
        features, ioctls = uffd.api(fd, uffd.feature_mask(uffd.WORKER_FEATURES))
        assert features & uffd.feature_mask(uffd.WORKER_FEATURES)
        for bit in (lib._UFFDIO_API, lib._UFFDIO_REGISTER, lib._UFFDIO_UNREGISTER):
            assert ioctls & (1 << bit)
    finally:
        os.close(fd)


def test_api_with_an_unknown_feature_bit_raises_einval():
    fd = uffd.open_uffd()
    try:
        with pytest.raises(OSError) as e:
            uffd.api(fd, 1 << 62)
        assert e.value.errno == errno.EINVAL
        assert e.value.filename == "UFFDIO_API"
    finally:
        os.close(fd)


def test_api_twice_on_one_fd_raises_einval():
    fd = uffd.open_uffd()
    try:
        uffd.api(fd, 0)
        with pytest.raises(OSError) as e:
            uffd.api(fd, 0)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# register / unregister


def test_register_memfd_shared_mapping_for_missing_and_wp_allows_the_resolving_ioctls(make_shm):
    s = make_shm(mode=uffd.MODE_MISSING | uffd.MODE_WP)
    for bit in (lib._UFFDIO_COPY, lib._UFFDIO_ZEROPAGE, lib._UFFDIO_WAKE,
                lib._UFFDIO_WRITEPROTECT):  # fmt: skip
        assert s.ioctls & (1 << bit), bit
    assert not s.ioctls & (1 << lib._UFFDIO_CONTINUE)  # MINOR mode only
    uffd.unregister(s.uffd, s.addr, s.npages * PAGE)


def test_register_missing_only_does_not_allow_writeprotect(make_shm):
    s = make_shm(mode=uffd.MODE_MISSING)
    assert s.ioctls & (1 << lib._UFFDIO_COPY)
    assert not s.ioctls & (1 << lib._UFFDIO_WRITEPROTECT)


def test_register_on_an_unaligned_range_raises(make_shm):
    s = make_shm(mode=0)
    for start, length in ((s.addr + 1, PAGE), (s.addr, PAGE + 1), (s.addr, 0)):
        with pytest.raises(OSError) as e:
            uffd.register(s.uffd, start, length, uffd.MODE_MISSING)
        assert e.value.errno == errno.EINVAL
        assert e.value.filename == "UFFDIO_REGISTER"


def test_register_a_range_already_registered_on_another_uffd_raises_ebusy(shm):
    other = uffd.open_uffd()
    try:
        uffd.api(other, 0)
        with pytest.raises(OSError) as e:
            uffd.register(other, shm.addr, PAGE, uffd.MODE_MISSING)
        assert e.value.errno == errno.EBUSY
    finally:
        os.close(other)


def test_unregister_on_an_unaligned_range_raises(shm):
    with pytest.raises(OSError) as e:
        uffd.unregister(shm.uffd, shm.addr + 1, PAGE)
    assert e.value.errno == errno.EINVAL


def test_after_unregister_a_touch_of_a_hole_takes_no_uffd_fault(shm):
    uffd.unregister(shm.uffd, shm.addr, shm.npages * PAGE)
    t = shm.read_async(3)
    assert t.finish() == bytes(PAGE)  # shmem filled the hole itself
    assert uffd.FaultBuffer().drain(shm.uffd) == 0


# --------------------------------------------------------------------------
# MISSING faults: delivery, COPY, ZEROPAGE, EXISTS, drain


def test_drain_on_an_empty_nonblocking_uffd_returns_zero(shm):
    assert uffd.FaultBuffer().drain(shm.uffd) == 0


def test_missing_read_fault_is_delivered_and_copy_shows_the_toucher_exactly_those_bytes(
    shm, sources
):
    data = pattern(1)
    t = shm.read_async(2)
    [(event, addr, flags, tid)] = wait_faults(shm.uffd, 1)
    assert event == uffd.EVENT_PAGEFAULT
    assert shm.page(2) <= addr < shm.page(3)
    assert not flags & uffd.FLAG_WRITE
    assert not flags & uffd.FLAG_WP
    assert tid == t.native_id  # THREAD_ID was asked for
    assert t.is_alive()  # still blocked: nothing resolved the fault yet
    assert uffd.copy(shm.uffd, shm.page(2), sources(data).addr, PAGE) == uffd.OK
    assert t.finish() == data
    assert shm.resident(2) == data


def test_missing_write_fault_carries_flag_write_and_the_write_lands_on_the_copied_page(
    shm, sources
):
    base = pattern(2)
    t = shm.write_async(5, 100, b"hello, pyhv")
    [(event, addr, flags, _)] = wait_faults(shm.uffd, 1)
    assert event == uffd.EVENT_PAGEFAULT
    assert shm.page(5) <= addr < shm.page(6)
    assert flags & uffd.FLAG_WRITE
    assert not flags & uffd.FLAG_WP
    assert uffd.copy(shm.uffd, shm.page(5), sources(base).addr, PAGE) == uffd.OK
    assert t.finish() == len(b"hello, pyhv")
    assert shm.resident(5) == base[:100] + b"hello, pyhv" + base[111:]


def test_zeropage_resolves_a_missing_fault_with_zeros(shm):
    t = shm.read_async(1)
    [(_, addr, _, _)] = wait_faults(shm.uffd, 1)
    assert shm.page(1) <= addr < shm.page(2)
    assert uffd.zeropage(shm.uffd, shm.page(1), PAGE) == uffd.OK
    assert t.finish() == bytes(PAGE)


def test_copy_and_zeropage_on_an_already_present_page_return_exists(shm, sources):
    src = sources(pattern(3))
    assert uffd.copy(shm.uffd, shm.page(0), src.addr, PAGE) == uffd.OK
    assert uffd.copy(shm.uffd, shm.page(0), sources(pattern(4)).addr, PAGE) == uffd.EXISTS
    assert uffd.zeropage(shm.uffd, shm.page(0), PAGE) == uffd.EXISTS
    assert shm.resident(0) == pattern(3)  # the first copy stands


def test_copy_of_several_pages_in_one_call_resolves_them_all(shm, sources):
    data = pattern(5, 3 * PAGE)
    assert uffd.copy(shm.uffd, shm.page(1), sources(data).addr, 3 * PAGE) == uffd.OK
    for i in range(3):
        assert shm.resident(1 + i) == data[i * PAGE : (i + 1) * PAGE]


def test_copy_of_several_pages_stopped_by_a_present_page_is_not_ok_and_leaves_the_rest_missing(
    shm, sources
):
    """The kernel copies page 0, stops at the present page 1 and answers
    EAGAIN with the bytes done in the struct; page 2 is left missing."""
    assert uffd.copy(shm.uffd, shm.page(1), sources(pattern(8)).addr, PAGE) == uffd.OK
    data = pattern(9, 3 * PAGE)
    assert uffd.copy(shm.uffd, shm.page(0), sources(data).addr, 3 * PAGE) != uffd.OK
    assert shm.resident(0) == data[:PAGE]
    assert shm.resident(1) == pattern(8)
    t = shm.read_async(2)
    [(_, addr, _, _)] = wait_faults(shm.uffd, 1)
    assert shm.page(2) <= addr < shm.page(3)
    assert uffd.zeropage(shm.uffd, shm.page(2), PAGE) == uffd.OK
    assert t.finish() == bytes(PAGE)


def test_copy_with_dontwake_leaves_the_faulter_asleep_until_wake(shm, sources):
    t = shm.read_async(4)
    wait_faults(shm.uffd, 1)
    assert int(fdinfo(shm.uffd)["total"]) == 1  # read, waiting
    rc = uffd.copy(shm.uffd, shm.page(4), sources(pattern(6)).addr, PAGE, uffd.COPY_DONTWAKE)
    assert rc == uffd.OK
    assert int(fdinfo(shm.uffd)["total"]) == 1  # installed, but nobody woke it
    assert t.is_alive()
    assert uffd.wake(shm.uffd, shm.page(4), PAGE) == uffd.OK
    assert t.finish() == pattern(6)
    assert int(fdinfo(shm.uffd)["total"]) == 0


def test_copy_with_unaligned_destination_raises_einval(shm, sources):
    with pytest.raises(OSError) as e:
        uffd.copy(shm.uffd, shm.page(0) + 8, sources(pattern(7)).addr, PAGE)
    assert e.value.errno == errno.EINVAL
    assert e.value.filename == "UFFDIO_COPY"


def test_several_faults_are_drained_in_one_drain_call_and_each_resolved(shm, sources):
    writes = {0: b"W0", 2: b"W2", 6: b"W6"}
    threads = {}
    for i in (0, 1, 2, 3, 6):
        threads[i] = shm.write_async(i, 10, writes[i]) if i in writes else shm.read_async(i)
    wait_pending(shm.uffd, len(threads))
    buf = uffd.FaultBuffer()
    n = buf.drain(shm.uffd)
    assert n == len(threads)
    msgs = snapshot(buf, n)
    by_page = {(a - shm.addr) // PAGE: (ev, a, b, tid) for ev, a, b, tid in msgs}
    assert sorted(by_page) == sorted(threads)
    for i, (ev, _, flags, tid) in by_page.items():
        assert ev == uffd.EVENT_PAGEFAULT
        assert bool(flags & uffd.FLAG_WRITE) == (i in writes)
        assert tid == threads[i].native_id
    for i in threads:
        assert uffd.copy(shm.uffd, shm.page(i), sources(pattern(10 + i)).addr, PAGE) == uffd.OK
    for i, t in threads.items():
        if i in writes:
            assert t.finish() == 2
            expect = bytearray(pattern(10 + i))
            expect[10:12] = writes[i]
            assert shm.resident(i) == bytes(expect)
        else:
            assert t.finish() == pattern(10 + i)
    assert buf.drain(shm.uffd) == 0


def test_drain_stops_at_capacity_and_leaves_the_rest_pending(shm):
    threads = [shm.read_async(i) for i in range(3)]
    wait_pending(shm.uffd, 3)
    buf = uffd.FaultBuffer(capacity=2)
    assert buf.drain(shm.uffd) == 2
    assert int(fdinfo(shm.uffd)["pending"]) == 1
    assert buf.drain(shm.uffd) == 1
    assert buf.drain(shm.uffd) == 0
    assert uffd.zeropage(shm.uffd, shm.addr, 3 * PAGE) == uffd.OK
    for t in threads:
        assert t.finish() == bytes(PAGE)


def test_drain_of_more_than_64_faults_reads_them_all_in_one_call(make_shm):
    n = 70  # more than the C side's 64-message read batch
    s = make_shm(npages=n)
    threads = [s.read_async(i, 0, 8) for i in range(n)]
    wait_pending(s.uffd, n)
    buf = uffd.FaultBuffer(capacity=256)
    assert buf.drain(s.uffd) == n
    pages = sorted((a - s.addr) // PAGE for _, a, _, _ in snapshot(buf, n))
    assert pages == list(range(n))
    assert uffd.zeropage(s.uffd, s.addr, n * PAGE) == uffd.OK
    for t in threads:
        assert t.finish() == bytes(8)


# --------------------------------------------------------------------------
# write protection, punch hole, eviction


def test_writeprotect_blocks_a_write_as_a_wp_fault_and_unprotect_lets_it_land(shm, sources):
    base = pattern(20)
    assert uffd.copy(shm.uffd, shm.page(3), sources(base).addr, PAGE) == uffd.OK
    assert uffd.writeprotect(shm.uffd, shm.page(3), PAGE, True) == uffd.OK
    t = shm.write_async(3, 64, b"protected?")
    [(event, addr, flags, tid)] = wait_faults(shm.uffd, 1)
    assert event == uffd.EVENT_PAGEFAULT
    assert shm.page(3) <= addr < shm.page(4)
    assert flags & uffd.FLAG_WP
    assert flags & uffd.FLAG_WRITE
    assert tid == t.native_id
    assert shm.resident(3) == base  # the write has not happened
    assert t.is_alive()
    assert uffd.writeprotect(shm.uffd, shm.page(3), PAGE, False) == uffd.OK
    assert t.finish() == len(b"protected?")
    assert shm.resident(3) == base[:64] + b"protected?" + base[74:]


def test_writeprotect_lets_reads_through_without_a_fault(shm, sources):
    base = pattern(21)
    assert uffd.copy(shm.uffd, shm.page(1), sources(base).addr, PAGE) == uffd.OK
    assert uffd.writeprotect(shm.uffd, shm.page(1), PAGE, True) == uffd.OK
    assert shm.read_async(1).finish() == base
    assert uffd.FaultBuffer().drain(shm.uffd) == 0


def test_unprotect_without_wake_leaves_the_writer_blocked_until_wake(shm, sources):
    base = pattern(22)
    assert uffd.copy(shm.uffd, shm.page(0), sources(base).addr, PAGE) == uffd.OK
    assert uffd.writeprotect(shm.uffd, shm.page(0), PAGE, True) == uffd.OK
    t = shm.write_async(0, 0, b"late")
    wait_faults(shm.uffd, 1)
    assert uffd.writeprotect(shm.uffd, shm.page(0), PAGE, False, wake=False) == uffd.OK
    assert int(fdinfo(shm.uffd)["total"]) == 1
    assert t.is_alive()
    assert uffd.wake(shm.uffd, shm.page(0), PAGE) == uffd.OK
    assert t.finish() == 4
    assert shm.resident(0) == b"late" + base[4:]


def test_writeprotect_on_a_range_not_registered_for_wp_reports_gone_like_an_unmapped_range(
    make_shm,
):
    """The kernel answers ENOENT both when the range is not mapped any more
    and when it is mapped but not registered with MODE_WP; the wrapper maps
    ENOENT to GONE, so this misuse reads as "the worker left"."""
    s = make_shm(mode=uffd.MODE_MISSING)
    assert uffd.writeprotect(s.uffd, s.addr, PAGE, True) == uffd.GONE
    assert lib.pyhv_uffd_writeprotect(s.uffd, s.addr, PAGE, uffd.WP_PROTECT) == -errno.ENOENT


def test_punch_hole_drops_the_content_of_a_memfd_file_range():
    fd = uffd.memfd("pyhv-test-punch", 3 * PAGE)
    try:
        data = pattern(30, 3 * PAGE)
        assert os.pwrite(fd, data, 0) == 3 * PAGE
        uffd.punch_hole(fd, PAGE, PAGE)
        assert os.fstat(fd).st_size == 3 * PAGE  # KEEP_SIZE
        assert os.pread(fd, PAGE, 0) == data[:PAGE]
        assert os.pread(fd, PAGE, PAGE) == bytes(PAGE)
        assert os.pread(fd, PAGE, 2 * PAGE) == data[2 * PAGE :]
    finally:
        os.close(fd)


def test_punch_hole_on_a_bad_fd_raises():
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as e:
            uffd.punch_hole(w, 0, PAGE)
        assert e.value.errno == errno.ESPIPE
        assert e.value.filename == "fallocate(PUNCH_HOLE)"
    finally:
        os.close(r)
        os.close(w)


def test_after_punch_hole_a_resident_page_faults_as_missing_again(shm, sources):
    assert uffd.copy(shm.uffd, shm.page(2), sources(pattern(31)).addr, PAGE) == uffd.OK
    assert shm.read_async(2).finish() == pattern(31)  # resident: no fault
    uffd.punch_hole(shm.fd, 2 * PAGE, PAGE)
    t = shm.read_async(2)
    [(event, addr, flags, _)] = wait_faults(shm.uffd, 1)
    assert event == uffd.EVENT_PAGEFAULT
    assert shm.page(2) <= addr < shm.page(3)
    assert not flags & uffd.FLAG_WP
    assert uffd.zeropage(shm.uffd, shm.page(2), PAGE) == uffd.OK
    assert t.finish() == bytes(PAGE)  # the old content is gone


def test_eviction_writer_blocked_on_wp_comes_back_missing_after_punch_and_writes_on_saved_data(
    shm, sources
):
    """DESIGN.md section 2, page-out: WP -> writer blocks -> save -> punch ->
    wake -> the writer faults MISSING -> COPY the saved page -> the write lands."""
    base = pattern(40)
    assert uffd.copy(shm.uffd, shm.page(6), sources(base).addr, PAGE) == uffd.OK
    assert uffd.writeprotect(shm.uffd, shm.page(6), PAGE, True) == uffd.OK
    t = shm.write_async(6, 1000, b"written during page-out")
    [(_, addr, flags, tid)] = wait_faults(shm.uffd, 1)
    assert shm.page(6) <= addr < shm.page(7)
    assert flags & uffd.FLAG_WP and flags & uffd.FLAG_WRITE
    saved = shm.resident(6)  # "written to the paging device"
    assert saved == base
    uffd.punch_hole(shm.fd, 6 * PAGE, PAGE)
    assert os.pread(shm.fd, PAGE, 6 * PAGE) == bytes(PAGE)  # dropped from the file
    assert uffd.wake(shm.uffd, shm.page(6), PAGE) == uffd.OK
    [(event, addr, flags, tid2)] = wait_faults(shm.uffd, 1)
    assert event == uffd.EVENT_PAGEFAULT
    assert shm.page(6) <= addr < shm.page(7)
    assert flags & uffd.FLAG_WRITE
    assert not flags & uffd.FLAG_WP  # a MISSING fault now
    assert tid2 == tid == t.native_id
    assert t.is_alive()
    assert uffd.copy(shm.uffd, shm.page(6), sources(saved).addr, PAGE) == uffd.OK
    assert t.finish() == len(b"written during page-out")
    expect = base[:1000] + b"written during page-out" + base[1023:]
    assert shm.resident(6) == expect
    assert os.pread(shm.fd, PAGE, 6 * PAGE) == expect
    assert uffd.FaultBuffer().drain(shm.uffd) == 0


# --------------------------------------------------------------------------
# poison


def test_poison_fails_a_kernel_access_with_efault_and_the_next_user_access_with_sigbus():
    if uffd.missing_features(["POISON"]):
        pytest.skip("this kernel lacks UFFD_FEATURE_POISON (UFFDIO_POISON)")

    def child():
        import faulthandler

        faulthandler.disable()  # die of the SIGBUS itself, quietly
        signal.signal(signal.SIGBUS, signal.SIG_DFL)
        fd = uffd.memfd("pyhv-test-poison", 2 * PAGE)
        mm = mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED)
        addr = uffd.address_of(mm)
        u = uffd.open_uffd()
        uffd.api(u, uffd.FEATURES["POISON"])
        ioctls = uffd.register(u, addr, 2 * PAGE, uffd.MODE_MISSING)
        if not ioctls & (1 << lib._UFFDIO_POISON):
            return 10
        if uffd.poison(u, addr, PAGE) != uffd.OK:
            return 11
        if uffd.poison(u, addr, PAGE) != uffd.EXISTS:
            return 12
        # A kernel access to the poisoned page fails with EFAULT, no fault
        # message, no SIGBUS.
        src = os.memfd_create("src", os.MFD_CLOEXEC)
        os.write(src, b"x" * 16)
        try:
            os.preadv(src, [memoryview(mm)[:16]], 0)
            return 13
        except OSError as e:
            if e.errno != errno.EFAULT:
                return 14
        if uffd.FaultBuffer().drain(u) != 0:
            return 15
        mm[PAGE - 1]  # a user access: SIGBUS
        return 16

    status = wait_child(fork_child(child))
    assert not os.WIFEXITED(status), f"child exited with {os.WEXITSTATUS(status)}, no SIGBUS"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS


# --------------------------------------------------------------------------
# the process behind a uffd is gone


def test_ioctls_on_the_uffd_of_an_exited_process_return_gone(sources):
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def child():
        parent_end.close()
        fd = uffd.memfd("pyhv-test-gone", 2 * PAGE)
        mm = mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED)
        addr = uffd.address_of(mm)
        u = uffd.open_uffd()
        uffd.api(u, uffd.feature_mask(uffd.WORKER_FEATURES))
        uffd.register(u, addr, 2 * PAGE, uffd.MODE_MISSING | uffd.MODE_WP)
        socket.send_fds(child_end, [struct.pack("Q", addr)], [u])
        return 0

    pid = fork_child(child)
    child_end.close()
    try:
        parent_end.settimeout(WAIT)
        msg, fds, _, _ = socket.recv_fds(parent_end, 8, 1)
        assert len(fds) == 1, "the child did not send its uffd"
        [u] = fds
        (addr,) = struct.unpack("Q", msg)
        assert exit_code(wait_child(pid)) == 0
        src = sources(pattern(50))
        try:
            assert uffd.copy(u, addr, src.addr, PAGE) == uffd.GONE
            assert uffd.zeropage(u, addr, PAGE) == uffd.GONE
            assert uffd.writeprotect(u, addr, PAGE, True) == uffd.GONE
            assert uffd.writeprotect(u, addr, PAGE, False) == uffd.GONE
            if not uffd.missing_features(["POISON"]):
                assert uffd.poison(u, addr, PAGE) == uffd.GONE
            assert uffd.FaultBuffer().drain(u) == 0
            # UFFDIO_WAKE does not look at the process at all: on this kernel
            # it succeeds on a dead one, so wake() never reports GONE here.
            assert uffd.wake(u, addr, PAGE) == uffd.OK
        finally:
            os.close(u)
    finally:
        parent_end.close()


def test_copy_into_a_range_that_was_unmapped_returns_gone(sources):
    fd = uffd.memfd("pyhv-test-unmapped", 2 * PAGE)
    u = uffd.open_uffd()
    try:
        uffd.api(u, uffd.feature_mask(uffd.WORKER_FEATURES))
        mm = mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED)
        addr = uffd.address_of(mm)
        uffd.register(u, addr, 2 * PAGE, uffd.MODE_MISSING | uffd.MODE_WP)
        mm.close()  # the worker unmapped its memory (or is exiting)
        assert uffd.copy(u, addr, sources(pattern(51)).addr, PAGE) == uffd.GONE
        assert uffd.zeropage(u, addr, PAGE) == uffd.GONE
    finally:
        os.close(u)
        os.close(fd)


# --------------------------------------------------------------------------
# watchdog


def _watchdog_child(body):
    """Fork a child that runs body(child_sock); returns (pid, parent_sock)
    once the child reported ready (one byte)."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def child():
        parent_end.close()
        return body(child_end)

    pid = fork_child(child)
    child_end.close()
    parent_end.settimeout(WAIT)
    try:
        assert parent_end.recv(1) == b"r", "the child did not get ready"
    except BaseException:
        parent_end.close()
        wait_child(pid)
        raise
    return pid, parent_end


def test_watchdog_exits_the_process_with_its_status_when_the_peer_closes():
    def body(sock):
        uffd.Watchdog(sock.fileno(), 70)
        sock.send(b"r")
        time.sleep(3 * WAIT)  # only the watchdog ends this early
        return 0

    pid, parent_end = _watchdog_child(body)
    parent_end.close()
    assert exit_code(wait_child(pid)) == 70


def test_watchdog_stopped_does_not_kill_the_process_when_the_peer_closes():
    def body(sock):
        w = uffd.Watchdog(sock.fileno(), 70)
        w.stop()
        w.stop()  # a second stop is a no-op
        sock.send(b"r")
        sock.settimeout(WAIT)
        if sock.recv(1) != b"":  # the parent closed: EOF seen here
            return 3
        time.sleep(0.2)  # room for a watchdog that wrongly still runs
        return 0

    pid, parent_end = _watchdog_child(body)
    parent_end.close()
    assert exit_code(wait_child(pid)) == 0


def test_watchdog_takes_data_on_the_connection_for_life_not_for_hangup():
    go_r, go_w = os.pipe()

    def body(sock):
        os.close(go_w)
        w = uffd.Watchdog(sock.fileno(), 70)
        sock.send(b"r")
        os.read(go_r, 1)  # the parent sent data and saw it consumed
        w.stop()
        return 0

    try:
        pid, parent_end = _watchdog_child(body)
    finally:
        os.close(go_r)
    try:
        parent_end.sendall(b"ping" * 300)  # more than the watchdog's 512-byte buffer
        deadline = time.monotonic() + WAIT
        # SIOCOUTQ on a unix stream socket: bytes the peer has not read yet.
        while struct.unpack("i", fcntl.ioctl(parent_end, termios.TIOCOUTQ, b"\0" * 4))[0]:
            assert time.monotonic() < deadline, "the watchdog never read the data"
            time.sleep(0.005)
        os.write(go_w, b"g")
    finally:
        os.close(go_w)
    status = wait_child(pid)
    parent_end.close()
    assert exit_code(status) == 0


def test_watchdog_on_an_invalid_fd_exits_with_its_status():
    def body(sock):
        sock.send(b"r")
        bad = 1000  # not open (a just-closed number would be reused by the
        while True:  # watchdog's own eventfd)
            try:
                os.fstat(bad)
                bad += 1
            except OSError:
                break
        uffd.Watchdog(bad, 71)  # POLLNVAL: treated as a lost hypervisor
        time.sleep(3 * WAIT)
        return 0

    pid, parent_end = _watchdog_child(body)
    parent_end.close()
    assert exit_code(wait_child(pid)) == 71


# --------------------------------------------------------------------------
# memfd, blkdev_size, address_of


def test_memfd_has_the_asked_size_is_zero_filled_and_cloexec():
    fd = uffd.memfd("pyhv-test-size", 5 * PAGE + 17)
    try:
        assert os.fstat(fd).st_size == 5 * PAGE + 17
        assert os.pread(fd, 64, 3 * PAGE) == bytes(64)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pyhv-test-size")
    finally:
        os.close(fd)


def test_blkdev_size_on_a_non_block_fd_raises_enotty():
    fd = uffd.memfd("pyhv-test-blk", PAGE)
    try:
        with pytest.raises(OSError) as e:
            uffd.blkdev_size(fd)
        assert e.value.errno == errno.ENOTTY
        assert e.value.filename == "BLKGETSIZE64"
    finally:
        os.close(fd)


def test_address_of_returns_the_buffer_address_and_keeps_no_export():
    mm = mmap.mmap(-1, 2 * PAGE)
    try:
        c = ctypes.c_char.from_buffer(mm)
        expect = ctypes.addressof(c)
        del c
        assert uffd.address_of(mm) == expect
        assert uffd.address_of(mm) % PAGE == 0
        ba = bytearray(100)
        c = (ctypes.c_char * 100).from_buffer(ba)
        assert uffd.address_of(ba) == ctypes.addressof(c)
        del c
    finally:
        mm.close()  # no BufferError: address_of released its export


def test_address_of_refuses_a_read_only_buffer():
    with pytest.raises((BufferError, TypeError)):
        uffd.address_of(b"read only")
