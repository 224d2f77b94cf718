"""Paging devices on NBD servers, the Python side of csrc/nbd.c (libnbd).

An NBD device is named by a URI as libnbd takes it: ``nbd://HOST[:PORT]/EXPORT``,
``nbd+unix:///EXPORT?socket=PATH``, and ``nbds://`` / ``nbds+unix://`` with TLS
(``tls_psk``: a pre-shared key file in psktool's format, ``USER:HEXKEY``; the
user is the URI's, ``nbds://USER@HOST/EXPORT``, else the login name).  Its size
is the server's.  The paging service serves its streams through it; the
hypervisor opens one too, to check the export and to hold the claim on it
(pyhv.claim).

A call that fails because the path is lost (the connection failed, or a
command went unanswered past the deadline) raises :class:`PathLost`
(ENOTCONN); an error the server answered (EIO) raises OSError with it.
"""

from __future__ import annotations

import errno
import os
import re
import urllib.parse

from pyhv._core import ffi, lib

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
CONNECT_S = 5.0  # a server that has not answered the handshake by then is unreachable
_URI = re.compile(r"^[a-z+]+://", re.IGNORECASE)


class PathLost(OSError):
    """The path to the server is lost (ENOTCONN): not the device's error."""


def available() -> bool:
    return bool(lib.pyhv_nbd_available())


def is_uri(path: str) -> bool:
    return isinstance(path, str) and bool(_URI.match(path))


def check_uri(uri: str) -> str | None:
    """Why this is no NBD URI pyhv takes, or None."""
    try:
        u = urllib.parse.urlsplit(uri)
    except ValueError as e:
        return str(e)
    if u.scheme not in SCHEMES:
        return f"scheme {u.scheme + '://'!r} is not one of " + ", ".join(s + "://" for s in SCHEMES)
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    if "+unix" in u.scheme:
        if u.netloc not in ("",):
            return "a unix-socket URI has no host (nbd+unix:///EXPORT?socket=PATH)"
        if not query.get("socket", [""])[0]:
            return "a unix-socket URI needs ?socket=PATH"
    else:
        try:
            host, port = u.hostname, u.port
        except ValueError as e:
            return f"bad port ({e})"
        if not host:
            return "no host"
        if port is not None and not 0 < port < 65536:
            return f"port {port} out of range"
    if "\n" in uri or "\0" in uri:
        return "control characters"
    return None


def redact(uri: str) -> str:
    """The URI as logs and status show it: no password."""
    u = urllib.parse.urlsplit(uri)
    if u.password:
        netloc = u.netloc.replace(f":{u.password}@", ":***@")
        return urllib.parse.urlunsplit(u._replace(netloc=netloc))
    return uri


class NbdDevice:
    """One connection set to one export (csrc/nbd.c); close() when done."""

    def __init__(self, uri: str, tls_psk: str | None = None, conns: int = 1,
                 connect_s: float = CONNECT_S, deadline_s: float = CONNECT_S):  # fmt: skip
        """deadline_s: a command unanswered this long loses the path (0: never)."""
        self.uri = uri
        why = ffi.new("char[]", 512)
        err = ffi.new("int *")
        h = lib.pyhv_nbd_open(uri.encode(), (tls_psk or "").encode(), conns,
                              max(1, int(connect_s * 1000)), int(deadline_s * 1000), why,
                              512, err)  # fmt: skip
        if h == ffi.NULL:
            msg = ffi.string(why).decode(errors="replace")
            if "gnutls" in msg or "TLS" in msg:
                msg = f"TLS refused (a wrong key, or none the server knows): {msg}"
            raise OSError(err[0] or errno.EIO, msg)
        self._h = h
        info = ffi.new("struct pyhv_nbd_info *")
        lib.pyhv_nbd_info(h, info)
        self.size = int(info.size)
        self.conns = int(info.conns)
        self.multi_conn = bool(info.multi_conn)
        self.can_flush = bool(info.can_flush)
        self.can_trim = bool(info.can_trim)
        self.read_only = bool(info.read_only)
        self.tls = bool(info.tls)
        self.can_fua = bool(info.can_fua)

    @property
    def handle(self):
        """For the service engine (pyhv_svc_stream_set)."""
        return self._h

    def _check(self, r: int, what: str) -> None:
        if r == 0:
            return
        if -r == errno.ENOTCONN:
            raise PathLost(errno.ENOTCONN, f"{what}: path lost: {self.why()}")
        raise OSError(-r, f"{what}: {os.strerror(-r)}")

    def why(self) -> str:
        buf = ffi.new("char[]", 256)
        lib.pyhv_nbd_dead(self._h, buf, 256)
        return ffi.string(buf).decode(errors="replace")

    @property
    def dead(self) -> bool:
        return bool(lib.pyhv_nbd_dead(self._h, ffi.NULL, 0))

    def pread(self, n: int, off: int) -> bytes:
        buf = bytearray(n)
        with ffi.from_buffer(buf, require_writable=True) as p:
            self._check(lib.pyhv_nbd_pread(self._h, p, n, off), "read")
        return bytes(buf)

    def pwrite(self, data: bytes, off: int, durable: bool = False) -> None:
        """durable: on stable storage when this returns (FUA, else a flush)."""
        self._check(lib.pyhv_nbd_pwrite(self._h, data, len(data), off, int(durable)), "write")

    def flush(self) -> None:
        self._check(lib.pyhv_nbd_flush(self._h), "flush")

    def trim(self, off: int, n: int) -> None:
        self._check(lib.pyhv_nbd_trim(self._h, off, n), "trim")

    def close(self) -> None:
        if self._h is not None:
            lib.pyhv_nbd_close(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_h", None) is not None:
            self.close()
