"""Storage hosts for tests and benchmarks: real NBD servers (nbdkit, qemu-nbd)
in Linux network namespaces, reached from the caller's namespace over veth
pairs, so that a client talks TCP through a real network stack to a server
that can be slowed down, made to fail, killed, restarted, or cut off.

A :class:`StorageHost` is one namespace ``pyhv-sh-<pid>-<n>`` with ``lo`` up
and ``links`` veth pairs.  Link i is a /24 of its own, 10.X.Y.0/24, chosen at
random among the subnets that overlap no address and no route of this machine
(``ip -4 addr``, ``ip -4 route show table all``, the default route aside) and
no other live host of this process.  The root side of the pair is
``pyhv<pid>-<k>`` with 10.X.Y.1, the namespace side ``veth<i>`` with
10.X.Y.2 (``host.addresses[i]``).  Servers listen on every address of the
namespace, so each server is reachable over every link: a multipath client
gets one path a link.

Each link also gets a *guard* route in the root namespace,
``unreachable 10.X.Y.0/24 metric 4242``.  Why: ``ip link set ROOT down``
removes the link's connected route, and without the guard new connections to
10.X.Y.2 follow the default route out of the machine (here through eth0,
where something even accepted the TCP connection).  With it, while a link is
down (:meth:`StorageHost.link_down`):

* a new ``connect()`` fails at once with EHOSTUNREACH ("No route to host"),
  as on a machine whose only interface to that network went down;
* an established connection stalls: no error, reads block, TCP retransmits
  (it would give up only after tcp_retries2, ~15 min);
* after :meth:`StorageHost.link_up` new connections work at once (< 2 ms,
  the first one pays for ARP) and a stalled connection resumes at its next
  retransmission: measured 0.4 s after a 1 s outage, 1.4 s after 5 s, 3.1 s
  after 10 s.

Servers are started as ``ip netns exec NS CMD``.  ``ip netns exec`` execs CMD
(checked: the Popen pid is nbdkit's own), so the Popen child *is* the server.
They die with the process that started them, even on SIGKILL: a preexec_fn
sets ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, which survives the exec of ``ip``
and of the server (neither is set-uid or has file capabilities; checked for
nbdkit and qemu-nbd by SIGKILLing the parent).  One mechanism for both:
nbdkit's ``--exit-with-parent`` would work through ``ip netns exec`` too, but
qemu-nbd has no such option.  The signal follows the *thread* that started
the server: start servers from a thread that outlives them (the main one).
Each server is in a session of its own (``kill`` and ``stop`` signal the
group: plugins that fork go too) and writes stdout/stderr to
``<host.dir>/<kind>-<port>.log``; startup failures raise :class:`HostError`
with the tail of that log.  A server is ready when an NBD greeting comes back
through the first link that is up; the probe then sends NBD_OPT_ABORT, which
keeps the servers' logs quiet (a bare TCP connect makes qemu-nbd log "option
negotiation failed").

What a run killed by SIGKILL leaves (namespace, veths, guard routes; the
servers die with it) goes with :func:`cleanup_stale`.

Verified on this machine (nbdkit 1.32.5, qemu-nbd 7.2, libnbd/nbdinfo 1.14.2,
kernel 6.18):

* Latency, nbdkit delay filter::

      nbdkit --filter=delay memory 64M rdelay=1ms wdelay=1ms   # or delay-read=, delay-write=

  Up to nbdkit 1.38 a delay is whole seconds or whole milliseconds (1.40
  added "100us", "0.5"...).  ``rdelay=0.1ms`` is *accepted and means 0*
  (4 KiB reads one at a time: p50 94 us, as without the filter; 1204 us
  with ``rdelay=1ms``); "0.0001" and "100us" are refused.  So 100 us of
  added latency cannot be had from nbdkit 1.32, nor from ``tc ... netem``
  (no sch_netem in this kernel: "Specified qdisc kind is unknown").
  :meth:`StorageHost.nbdkit` refuses such a value on nbdkit < 1.40 instead of
  silently serving with no delay.
* Errors, nbdkit error filter (``error-rate`` is needed: without it nothing
  is injected)::

      nbdkit --filter=error file file=IMG error=EIO error-rate=100% error-file=PATH

  Reads and writes fail with EIO while PATH exists (error-pread*=,
  error-pwrite*= for one kind only).
* TLS with a pre-shared key::

      nbdkit --tls=require --tls-psk=FILE memory 64M          # FILE: "pyhv:<64 hex>", mode 0600
      nbdinfo 'nbds://pyhv@ADDR:10809/?tls-psk-file=FILE'    # works
      nbdinfo 'nbd://ADDR:10809/'
          # refused: "handshake: server requires TLS encryption first"
      nbdinfo 'nbds://pyhv@ADDR:10809/?tls-psk-file=WRONG'
          # refused: "gnutls_handshake: The TLS connection was non-properly terminated"

  libnbd wants the username in the URI: without ``pyhv@`` it calls
  getlogin_r() (no tty here: "No such device or address"), and a name not in
  the file fails with "username X was not found in PSK file".
* Multi-conn (nbdinfo ``can_multi_conn``): nbdkit ``memory`` and ``file``:
  true.  qemu-nbd 7.2: false with its default ``--shared=1``, true with
  ``--shared=N`` for N > 1 or 0 (unlimited), read-only or not.
* qemu-nbd: ``--cache=none --aio=native`` (O_DIRECT, no host page cache
  between the client and the file, like a real paging device) works on ext4
  and on tmpfs (O_DIRECT on tmpfs since Linux 6.6).  When the image's
  filesystem refuses O_DIRECT we fall back to ``--cache=writeback
  --aio=threads``; when ``--aio=native`` does not start, to ``--aio=threads``.

* Costs through a veth (median): a host with 2 links 73 ms to make, a server
  ~20-30 ms from start to ready; TCP connect 0.05 ms; 4 KiB read round trip
  (one at a time) ~40 us p50 (nbdkit memory; qemu-nbd O_DIRECT on a sparse
  file); ``nbdinfo --size``: 9-11 ms against nbdkit, ~50 ms against qemu-nbd.
  The 40 ms more are qemu-nbd's handshake: its small option replies wait
  (Nagle) for the client's delayed ACK.  A client that sets TCP_QUICKACK
  before its reads negotiates in 0.4 ms instead of 44 ms.

Example::

    with StorageHost(links=2) as host:
        srv = host.nbdkit(["memory", "size=64M", "rdelay=1ms"], filters=["delay"])
        host.uri(srv, link=1)          # "nbd://10.X.Y.2:10809/"
        host.link_down(0)              # path 0 gone, path 1 still works
        srv.kill(); srv.restart()      # the server dies and comes back (memory: empty)
"""

from __future__ import annotations

import atexit
import glob
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from urllib.parse import quote

from pyhv.inject import alive as _alive

#: Namespaces are called NS_PREFIX + "<pid>-<n>".
NS_PREFIX = "pyhv-sh-"
#: Root-side veths are called VETH_PREFIX + "<pid>-<k>" (at most 15 characters).
VETH_PREFIX = "pyhv"
#: Metric of the guard routes (``unreachable 10.X.Y.0/24 metric GUARD_METRIC``).
GUARD_METRIC = 4242
#: How long a server has to accept connections after it is started.
START_TIMEOUT = 10.0
#: How long a server has to exit on SIGTERM before it gets SIGKILL.
STOP_GRACE = 2.0

_NBD_MAGIC = b"NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054
_NBD_OPT_ABORT = 2
_PR_SET_PDEATHSIG = 1
_DELAY_KEYS = re.compile(r"^(rdelay|wdelay|delay-(read|write|zero|trim|extents|cache|open|close))=")

_lock = threading.Lock()
_counter = itertools.count(1)
_subnets: set[ipaddress.IPv4Network] = set()  # in use by live hosts of this process
_veth_numbers: set[int] = set()  # k of the root-side veths of live hosts of this process
_libc = None
_nbdkit_version: tuple[int, ...] | None = None


class HostError(RuntimeError):
    """A host or a server could not be set up or taken down (one line, with
    the words of the tool that failed)."""


def unavailable() -> str | None:
    """Why storage hosts cannot be used here (not root, a tool missing), or
    None.  For tests to skip with."""
    if os.geteuid() != 0:
        return "storage hosts need root (network namespaces, veths)"
    for tool, package in (("ip", "iproute2"), ("nbdkit", "nbdkit"), ("qemu-nbd", "qemu-utils"),
                          ("nbdinfo", "libnbd-bin")):  # fmt: skip
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    return None


def make_psk(path: str | os.PathLike, username: str = "pyhv") -> str:
    """Write a TLS pre-shared key file as nbdkit and libnbd read it (psktool's
    format: one line "username:hexkey", here 32 random bytes), mode 0600, and
    return its path."""
    path = os.fspath(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{username}:{os.urandom(32).hex()}\n".encode())
    finally:
        os.close(fd)
    return path


def _ip(*args: str, ok_missing: bool = False) -> str:
    """Run ``ip ARGS``; its stdout.  Errors raise HostError with ip's words,
    except "does not exist" ones when ok_missing (tearing down)."""
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if p.returncode:
        err = p.stderr.strip().replace("\n", " ")
        if ok_missing and re.search(r"[Cc]annot find|No such|does not exist|not found", err):
            return ""
        raise HostError(f"ip {' '.join(args)}: {err or f'exit status {p.returncode}'}")
    return p.stdout


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address in or a route to,
    the default route aside."""
    nets = []
    for link in json.loads(_ip("-j", "-4", "addr", "show") or "[]"):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for r in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = r.get("dst", "default")
        if dst != "default":
            nets.append(ipaddress.ip_network(dst, strict=False))
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    """A free 10.X.Y.0/24, reserved for the caller (call with _lock held)."""
    used = _networks_in_use()
    for _ in range(2000):
        net = ipaddress.IPv4Network(f"10.{random.randrange(256)}.{random.randrange(256)}.0/24")
        if net not in _subnets and not any(net.overlaps(u) for u in used):
            _subnets.add(net)
            return net
    raise HostError("no free 10.X.Y.0/24 subnet: every one overlaps an address or route")


def _die_with_parent():
    """A preexec_fn: the child gets SIGKILL when the thread that started it
    exits (PR_SET_PDEATHSIG survives exec), and gives up if that happened
    already between fork and prctl."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    prctl, parent = _libc.prctl, os.getpid()

    def setup():
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup


def _nbd_probe(addr: str, port: int, timeout: float) -> None:
    """Connect, read an NBD newstyle greeting, say NBD_OPT_ABORT; raise
    OSError unless a server answered."""
    with socket.create_connection((addr, port), timeout=timeout) as s:
        greeting = b""
        while len(greeting) < 18:
            chunk = s.recv(18 - len(greeting))
            if not chunk:
                raise ConnectionError("closed before the NBD greeting")
            greeting += chunk
        if greeting[:8] != _NBD_MAGIC or struct.unpack(">Q", greeting[8:16])[0] != _IHAVEOPT:
            raise ConnectionError("not an NBD newstyle server")
        s.sendall(struct.pack(">IQII", 1, _IHAVEOPT, _NBD_OPT_ABORT, 0))
        try:
            s.recv(20)  # the server's ack of the abort
        except OSError:
            pass


def _listening(pid: int, port: int) -> bool:
    """Does the network namespace of pid have a TCP socket listening on port?"""
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (OSError, StopIteration, IndexError, ValueError):
            pass
    return False


def _version(tool: str) -> tuple[int, ...]:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else (0,)


def _check_delays(plugin_args) -> None:
    """nbdkit < 1.40 reads a delay as whole seconds or whole milliseconds and
    takes "0.1ms" as 0: refuse what it would not honour."""
    global _nbdkit_version
    if _nbdkit_version is None:
        _nbdkit_version = _version("nbdkit")
    if _nbdkit_version >= (1, 40):
        return
    for arg in plugin_args:
        if _DELAY_KEYS.match(arg) and not re.fullmatch(r"\d+(ms)?", arg.split("=", 1)[1]):
            version = ".".join(map(str, _nbdkit_version))
            raise ValueError(f"{arg}: nbdkit {version} takes whole seconds or whole "
                             "milliseconds (NNms) only: it reads 0.1ms as no delay")


#: An nbdkit filter of our own (nbdkit's delay filter takes whole
#: milliseconds before 1.40, and this kernel has no netem): ``usdelay``
#: holds each read for rdelay-us and each write for wdelay-us microseconds
#: (nanosleep with 1 ns of timer slack), the far-memory latency a benchmark
#: adds.  Built on first use with the machine's compiler against
#: nbdkit-filter.h (Debian's nbdkit-plugin-dev).
USDELAY_SOURCE = r"""
#include <nbdkit-filter.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

static unsigned rdelay_us, wdelay_us;

static void hold(unsigned us)
{
  struct timespec t = { us / 1000000, (long) (us % 1000000) * 1000 };
  if (!us)
    return;
  prctl (PR_SET_TIMERSLACK, 1UL);  /* this thread's sleeps end on time */
  while (nanosleep (&t, &t) == -1)
    ;
}

static int usdelay_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                           const char *key, const char *value)
{
  if (strcmp (key, "rdelay-us") == 0) { rdelay_us = (unsigned) atoi (value); return 0; }
  if (strcmp (key, "wdelay-us") == 0) { wdelay_us = (unsigned) atoi (value); return 0; }
  return next (nxdata, key, value);
}

static int usdelay_pread (nbdkit_next *next, void *handle, void *buf, uint32_t count,
                          uint64_t offset, uint32_t flags, int *err)
{
  hold (rdelay_us);
  return next->pread (next, buf, count, offset, flags, err);
}

static int usdelay_pwrite (nbdkit_next *next, void *handle, const void *buf, uint32_t count,
                           uint64_t offset, uint32_t flags, int *err)
{
  hold (wdelay_us);
  return next->pwrite (next, buf, count, offset, flags, err);
}

static struct nbdkit_filter filter = {
  .name = "usdelay",
  .longname = "pyhv: microseconds of delay on reads and writes",
  .config = usdelay_config,
  .config_help = "rdelay-us=N  wdelay-us=N  microseconds added to each read / write",
  .pread = usdelay_pread,
  .pwrite = usdelay_pwrite,
};

NBDKIT_REGISTER_FILTER (filter)
"""
_usdelay_path: str | None = None


def usdelay_filter() -> str:
    """The path of the usdelay filter (built once a process, in a temporary
    directory removed at exit); HostError if it cannot be built."""
    global _usdelay_path
    if _usdelay_path and os.path.exists(_usdelay_path):
        return _usdelay_path
    if not os.path.exists("/usr/include/nbdkit-filter.h"):
        raise HostError("nbdkit-filter.h missing: install Debian's nbdkit-plugin-dev")
    d = tempfile.mkdtemp(prefix="pyhv-usdelay-")
    atexit.register(shutil.rmtree, d, True)
    src, out = os.path.join(d, "usdelay.c"), os.path.join(d, "nbdkit-usdelay-filter.so")
    with open(src, "w") as f:
        f.write(USDELAY_SOURCE)
    p = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", out, src], capture_output=True,
                       text=True)  # fmt: skip
    if p.returncode != 0:
        raise HostError(f"the usdelay filter did not build: {p.stderr.strip().splitlines()[-1:]}")
    _usdelay_path = out
    return out


class Server:
    """One NBD server process in a host's namespace.  ``args`` is its command
    line (without ``ip netns exec``), ``proc`` its Popen, ``kind`` "nbdkit"
    or "qemu-nbd"; ``export`` the name clients ask for ("" for nbdkit, which
    serves any name), ``tls_psk`` the PSK file when it requires TLS."""

    def __init__(self, host: StorageHost, kind: str, args: list[str], port: int, export: str,
                 tls_psk: str | None = None):  # fmt: skip
        self.host, self.kind, self.args, self.port = host, kind, list(args), port
        self.export, self.tls_psk = export, tls_psk
        self.log = os.path.join(host.dir, f"{kind}-{port}.log")
        self.proc: subprocess.Popen | None = None
        self._log_start = 0  # where the output of the latest start begins

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Server {self.kind} {self.host.name}:{self.port} {state}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def uri(self, link: int = 0, tls: bool = False) -> str:
        return self.host.uri(self, link, tls)

    def log_tail(self, lines: int = 5) -> str:
        """The last lines the server wrote (stdout and stderr) since it was
        last started, for error messages."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(self._log_start, os.fstat(f.fileno()).st_size - 8192))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _tail_line(self) -> str:
        return " | ".join(self.log_tail(3).splitlines()) or "no output"

    def start(self) -> None:
        """Start the command; return once it answers NBD through the first
        link that is up (with every link down: once it listens)."""
        if self.running:
            raise HostError(f"{self.kind} on port {self.port} is running already")
        if self.host.closed:
            raise HostError(f"{self.host.name} is closed")
        with open(self.log, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(self.args)}\n".encode())
            log.flush()
            self._log_start = log.tell()
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.host.name, *self.args], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, preexec_fn=_die_with_parent(), start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise HostError(f"{self.kind} on port {self.port} exited with status "
                                f"{self.proc.returncode}: {self._tail_line()}")  # fmt: skip
            up = [a for i, a in enumerate(self.host.addresses) if i not in self.host.down]
            try:
                if up:
                    _nbd_probe(up[0], self.port, timeout=1.0)
                    return
                if _listening(self.proc.pid, self.port):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                where = f"{up[0]}:{self.port}" if up else f"port {self.port}"
                raise HostError(f"{self.kind} did not accept connections on {where} within "
                                f"{START_TIMEOUT:g} s: {self._tail_line()}")  # fmt: skip
            time.sleep(0.01)

    def _signal(self, sig: int) -> None:
        if self.running:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL and reap: a server that dies."""
        if self.proc is not None:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after STOP_GRACE seconds), reap."""
        if self.proc is not None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        """The same command again (same port, same backing file or memory
        size: an nbdkit memory plugin comes back empty); returns once it
        accepts connections.  A running server is stopped first."""
        self.stop()
        self.start()


class StorageHost:
    """A network namespace holding NBD servers, reached over `links` veth
    pairs, each a 10.X.Y.0/24 of its own chosen free by the host (no overlap
    with any address or route on this machine, nor with another live host of
    this process).  ``addresses[i]`` is the servers' address on link i
    (10.X.Y.2), ``root_addresses[i]`` this side's (10.X.Y.1), ``veths[i]`` the
    root-side interface, ``dir`` a temporary directory for the servers' logs.
    A context manager; close() tears everything down, also after failures,
    and may be called again."""

    def __init__(self, links: int = 1, name: str | None = None):
        if links < 1:
            raise ValueError("a storage host needs at least one link")
        self.name = name or f"{NS_PREFIX}{os.getpid()}-{next(_counter)}"
        self.addresses: list[str] = []
        self.root_addresses: list[str] = []
        self.subnets: list[ipaddress.IPv4Network] = []
        self.veths: list[str] = []
        self.servers: list[Server] = []
        self.down: set[int] = set()
        self._numbers: list[int] = []
        self._guards: list[str] = []
        self._ns = False
        self.closed = False
        self.dir = tempfile.mkdtemp(prefix=self.name + "-")
        atexit.register(self.close)
        try:
            _ip("netns", "add", self.name)
            self._ns = True
            _ip("-n", self.name, "link", "set", "lo", "up")
            for i in range(links):
                self._add_link(i)
        except BaseException:
            try:
                self.close()
            except HostError:
                pass
            raise

    def _add_link(self, i: int) -> None:
        with _lock:
            net = _pick_subnet()
            self.subnets.append(net)
            k = next(n for n in itertools.count() if n not in _veth_numbers)
            _veth_numbers.add(k)
            self._numbers.append(k)
        root, peer = f"{VETH_PREFIX}{os.getpid()}-{k}", f"veth{i}"
        if len(root) > 15:
            raise HostError(f"veth name {root} is longer than 15 characters")
        here, there = str(net[1]), str(net[2])
        _ip("link", "add", root, "type", "veth", "peer", "name", peer, "netns", self.name)
        self.veths.append(root)
        _ip("addr", "add", f"{here}/24", "dev", root)
        _ip("-n", self.name, "addr", "add", f"{there}/24", "dev", peer)
        _ip("-n", self.name, "link", "set", peer, "up")
        _ip("link", "set", root, "up")
        _ip("route", "add", "unreachable", str(net), "metric", str(GUARD_METRIC))
        self._guards.append(str(net))
        self.addresses.append(there)
        self.root_addresses.append(here)

    def __enter__(self) -> StorageHost:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except HostError:
            if exc_type is None:
                raise

    def __repr__(self) -> str:
        return f"<StorageHost {self.name} {self.addresses}{' closed' if self.closed else ''}>"

    def nbdkit(self, plugin_args: list[str], port: int = 10809, filters: list[str] = (),
               tls_psk: str | None = None, export: str | None = None,
               extra: list[str] = ()) -> Server:  # fmt: skip
        """nbdkit in the namespace, listening on every link:
        ``nbdkit -f -p PORT --filter=F... [--tls=require --tls-psk=FILE]
        EXTRA... PLUGIN_ARGS...`` (plugin_args: the plugin then its and the
        filters' key=value parameters, e.g. ["memory", "size=64M",
        "rdelay=1ms"]).  Returns once it accepts connections.  nbdkit serves
        whatever export name a client asks for; `export` is the name
        :meth:`uri` puts in URIs."""
        plugin_args = [os.fspath(a) for a in plugin_args]
        if not plugin_args:
            raise ValueError("nbdkit needs a plugin")
        if "delay" in filters:
            _check_delays(plugin_args)
        args = ["nbdkit", "-f", "-p", str(port), *(f"--filter={f}" for f in filters)]
        if tls_psk is not None:
            tls_psk = os.path.abspath(tls_psk)
            args += ["--tls=require", f"--tls-psk={tls_psk}"]
        return self._start("nbdkit", [*args, *extra, *plugin_args], port, export or "", tls_psk)

    def qemu_nbd(self, image: str, port: int = 10810, export: str = "pg", fmt: str = "raw",
                 shared: int = 8, extra: list[str] = ()) -> Server:  # fmt: skip
        """qemu-nbd serving `image` in the namespace, listening on every link:
        ``-t`` (persistent: outlives its clients), ``--shared=N`` (N clients
        at once; N > 1 also makes qemu-nbd advertise multi-conn),
        ``--cache=none --aio=native`` when the image's filesystem takes
        O_DIRECT (else ``--cache=writeback --aio=threads``; --cache/--aio in
        `extra` replace ours).  Returns once it accepts connections."""
        image = os.path.abspath(image)
        base = ["qemu-nbd", "-t", f"--shared={shared}", "-f", fmt, "-x", export, "-p", str(port)]
        if any(a.startswith(("--cache", "--aio", "-n", "--nocache")) for a in extra):
            choices = [[]]
        elif _takes_o_direct(image):
            choices = [["--cache=none", "--aio=native"], ["--cache=none", "--aio=threads"]]
        else:
            choices = [["--cache=writeback", "--aio=threads"]]
        for n, cache in enumerate(choices):
            try:
                return self._start("qemu-nbd", [*base, *cache, *extra, image], port, export)
            except HostError:
                if n == len(choices) - 1:
                    raise

    def _start(self, kind, args, port, export, tls_psk=None) -> Server:
        if self.closed:
            raise HostError(f"{self.name} is closed")
        if any(s.port == port and s.running for s in self.servers):
            raise HostError(f"port {port} of {self.name} is taken by another server")
        server = Server(self, kind, args, port, export, tls_psk)
        self.servers.append(server)  # before it runs: close() must find it
        try:
            server.start()
        except BaseException:
            server.kill()
            self.servers.remove(server)
            raise
        return server

    def uri(self, server: Server, link: int = 0, tls: bool = False) -> str:
        """``nbd://ADDR:PORT/EXPORT`` of the server on link `link`; with tls,
        ``nbds://USER@ADDR:PORT/EXPORT?tls-psk-file=FILE`` as libnbd wants it
        (the username, from the PSK file, must be in the URI).  tls=False on
        a TLS server gives the plain URI it refuses."""
        base = f"{self.addresses[link]}:{server.port}/{quote(server.export, safe='')}"
        if not tls:
            return f"nbd://{base}"
        if server.tls_psk is None:
            raise ValueError(f"{server!r} does not use TLS")
        with open(server.tls_psk) as f:
            user = f.readline().split(":", 1)[0]
        return f"nbds://{quote(user, safe='')}@{base}?tls-psk-file={quote(server.tls_psk)}"

    def link_down(self, i: int) -> None:
        """Take link i down (``ip link set`` on the root side): new
        connections over it fail with EHOSTUNREACH, established ones stall."""
        _ip("link", "set", self.veths[i], "down")
        self.down.add(i)

    def link_up(self, i: int) -> None:
        """Bring link i back: new connections work at once, stalled ones
        resume at their next TCP retransmission."""
        _ip("link", "set", self.veths[i], "up")
        self.down.discard(i)

    def close(self) -> None:
        """Stop the servers (SIGTERM, SIGKILL after STOP_GRACE s), kill
        anything else left in the namespace, delete the guard routes, the
        veths, the namespace and the temporary directory.  Tries everything;
        raises HostError at the end if something could not be removed."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        errors = []
        for s in self.servers:
            s._signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for s in self.servers:
            if s.proc is not None:
                try:
                    s.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    s.kill()
        steps = [("route", "del", "unreachable", net, "metric", str(GUARD_METRIC))
                 for net in self._guards]  # fmt: skip
        steps += [("link", "del", veth) for veth in self.veths]
        if self._ns:
            _kill_namespace_processes(self.name)
            steps.append(("netns", "del", self.name))
        for step in steps:
            try:
                _ip(*step, ok_missing=True)
            except HostError as e:
                errors.append(str(e))
        with _lock:
            _subnets.difference_update(self.subnets)
            _veth_numbers.difference_update(self._numbers)
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise HostError(f"closing {self.name}: {'; '.join(errors)}")


def _takes_o_direct(path: str) -> bool:
    """Can path be opened with O_DIRECT (qemu-nbd --cache=none)?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == 22:  # EINVAL: the filesystem has no O_DIRECT
            return False
        raise HostError(f"qemu-nbd image {path}: {e.strerror}") from None
    os.close(fd)
    return True


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL every process in the namespace (``ip netns pids``) and give
    them a moment to go."""
    pids = [int(p) for p in _ip("netns", "pids", ns, ok_missing=True).split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def cleanup_stale() -> list[str]:
    """Remove what hosts of processes that are gone left behind (a test run
    killed with SIGKILL): namespaces ``pyhv-sh-<pid>-*`` (and any process
    still in them), root-side veths ``pyhv<pid>-*``, guard routes whose
    subnet no address of this machine is in any more, and the temporary
    directories ``$TMPDIR/pyhv-sh-<pid>-*``.  Returns what it removed.  Hosts
    of live processes are left alone."""
    removed = []
    for d in glob.glob(os.path.join(tempfile.gettempdir(), NS_PREFIX + "*")):
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)-\d+-\w+", os.path.basename(d))
        if m and os.path.isdir(d) and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"dir {d}")
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)-\d+", name)
        if m and not _alive(int(m.group(1))):
            _kill_namespace_processes(name)
            _ip("netns", "del", name, ok_missing=True)
            removed.append(f"netns {name}")
    for link in json.loads(_ip("-j", "link", "show") or "[]"):
        m = re.fullmatch(re.escape(VETH_PREFIX) + r"(\d+)-\d+", link["ifname"])
        if m and not _alive(int(m.group(1))):
            _ip("link", "del", link["ifname"], ok_missing=True)
            removed.append(f"link {link['ifname']}")
    # Routes first, then addresses: a host adds its address before its guard
    # and deletes its guard before its address, so a live host's guard is
    # never taken for an orphan.
    guards = [r["dst"] for r in json.loads(_ip("-j", "-4", "route", "show") or "[]")
              if r.get("type") == "unreachable" and r.get("metric") == GUARD_METRIC]  # fmt: skip
    addrs = [ipaddress.ip_address(a["local"])
             for link in json.loads(_ip("-j", "-4", "addr") or "[]")
             for a in link.get("addr_info", [])]  # fmt: skip
    for dst in guards:
        net = ipaddress.ip_network(dst, strict=False)
        if not any(a in net for a in addrs):
            _ip("route", "del", "unreachable", dst, "metric", str(GUARD_METRIC), ok_missing=True)
            removed.append(f"route unreachable {dst}")
    return removed
