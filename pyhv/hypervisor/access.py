"""Who may do what on the control socket.  Always from the credentials the
kernel took when the peer connected (SO_PEERCRED, SO_PEERGROUPS), never from
anything a client says.

- root, and members of ``[hypervisor] admin_group``: everything (the
  control point);
- a partition's ``owner``, and members of its ``group``: its workers
  (attach, register, adopt, rejoin and their requests), its status and
  slots;
- anyone: ``status``, ``errors`` and ``partition_list``, showing the
  partitions they may use and nothing else.

The control socket and the run directory are opened to others only as far
as that needs (:meth:`AccessRoom.share_run_dir`).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import struct

from pyhv import owners
from pyhv.hypervisor.control import MAX_CONNECTIONS
from pyhv.hypervisor.vcp import Refused

log = logging.getLogger("pyhv.hypervisor")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # (Linux 4.13)
MAX_PEER_GROUPS = 256  # what one getsockopt reads (CPython's 1024-byte limit)
USER_CONNECTIONS = 256  # connections one user who is no admin may hold (two a worker)
ADMIN_RESERVE = 64  # ... and of control.MAX_CONNECTIONS, what users together leave

# op -> the field naming the partition it acts on
# (not snapshot: it holds the partition still, against the admins too)
PARTITION_OPS = {"attach": "partition", "rejoin": "partition", "partition": "name",
                 "slots": "partition", "discard": "partition", "prefetch": "partition",
                 "pressure": "partition"}  # fmt: skip
# ops on the connection's own worker, which attach let in (adopt checks the
# child's partition itself: op_adopt)
WORKER_OPS = {"register", "mce", "adopt"}
# read-only ops that anyone may send: their answers show what the peer may use
OPEN_OPS = {"status", "errors", "partition_list"}


class Peer:
    """A control connection's credentials, as the kernel took them at connect."""

    __slots__ = ("uid", "gid", "groups")

    def __init__(self, sock: socket.socket):
        _, self.uid, self.gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))  # fmt: skip
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
            groups = struct.unpack(f"{len(raw) // 4}I", raw)
        except OSError as e:  # (ERANGE: more groups than one read holds)
            log.warning("control: a peer's groups cannot be read (%s): its own group only",
                        e.strerror)  # fmt: skip
            groups = ()
        self.groups = frozenset(groups) | {self.gid}

    def __repr__(self) -> str:
        return f"uid {self.uid}"


class AccessRoom:
    """Mixed into the Hypervisor: the check before every control operation."""

    def admit(self, conn) -> str | None:
        """Why a new connection is refused, or None: a user who is not an
        admin holds at most USER_CONNECTIONS, and all of them together
        leave ADMIN_RESERVE of MAX_CONNECTIONS to the admins."""
        if self.is_admin(conn):
            return None
        uid = self.peer(conn).uid
        held = getattr(self, "_held", None)
        if held is None:
            held = self._held = collections.Counter()
        if held[uid] >= USER_CONNECTIONS:
            return f"uid {uid} holds {held[uid]} connections already"
        if sum(held.values()) >= MAX_CONNECTIONS - ADMIN_RESERVE:
            return "the connections left are the admins'"
        held[uid] += 1
        conn.counted = True
        return None

    def release(self, conn) -> None:
        if conn.counted:
            conn.counted = False
            self._held[conn.peer.uid] -= 1

    def admin_gid(self) -> int | None:
        g = self.config.admin_group
        if g is None:
            return None
        if getattr(self, "_admin", (None, None))[0] != g:
            self._admin = (g, owners.group_id(g))
        return self._admin[1]

    def peer(self, conn) -> Peer:
        if conn.peer is None:
            conn.peer = Peer(conn.sock)
        return conn.peer

    def is_admin(self, conn) -> bool:
        p = self.peer(conn)
        gid = self.admin_gid()
        return p.uid == 0 or (gid is not None and gid in p.groups)

    def may_use(self, conn, part) -> bool:
        """The peer may run workers in part (and see it)."""
        if self.is_admin(conn):
            return True
        p = self.peer(conn)
        return (part.owner_uid is not None and p.uid == part.owner_uid) or (
            part.group_gid is not None and part.group_gid in p.groups)

    def visible(self, conn, names) -> set:
        """Which of these partition names the peer may see."""
        if self.is_admin(conn):
            return set(names)
        return {n for n in names if n in self.by_name and self.may_use(conn, self.by_name[n])}

    def authorize(self, conn, op: str, msg: dict) -> None:
        """Refused unless the peer may send this op."""
        if op in OPEN_OPS or op in WORKER_OPS or self.is_admin(conn):
            return
        field = PARTITION_OPS.get(op)
        if field is None:
            raise Refused(f"permission denied: {op} is for root"
                          + (f" and group {self.config.admin_group}"
                             if self.config.admin_group else ""))  # fmt: skip
        name = msg.get(field)
        part = self.by_name.get(name) if isinstance(name, str) else None
        if part is not None and not self.may_use(conn, part):
            raise Refused(f"permission denied: partition {name!r} is not yours "
                          f"({self.peer(conn)!r})")  # fmt: skip
        # (an unknown partition: the handler says so)

    # --- the run directory ---------------------------------------------------------------

    def share_run_dir(self) -> None:
        """Open the control socket (and the way to it) as far as the config
        needs, and no further: to everyone if a partition has an owner or a
        group (the hypervisor checks every request itself), to the admin
        group if there is one, else to root alone.  The run directory is
        opened for passage (x), never for listing, and only ever widened:
        the files in it stay root's (0600)."""
        shared = any(p.cfg.owner or p.cfg.group for p in self.partitions)
        gid = self.admin_gid()
        want = (shared, gid)
        if want == getattr(self, "_shared", None):
            return
        sock = os.path.join(self.run_dir, "control.sock")
        try:
            if shared:
                os.chmod(sock, 0o666)
            elif gid is not None:
                os.chown(sock, -1, gid)
                os.chmod(sock, 0o660)
            else:
                os.chmod(sock, 0o600)
            st = os.stat(self.run_dir)
            if shared and st.st_mode & 0o011 != 0o011:
                os.chmod(self.run_dir, st.st_mode & 0o7777 | 0o011)
            elif gid is not None and not shared and st.st_mode & 0o010 == 0:
                if st.st_gid != gid:
                    os.chown(self.run_dir, -1, gid)
                os.chmod(self.run_dir, st.st_mode & 0o7777 | 0o010)
        except OSError as e:
            log.error("hypervisor: cannot open the control socket to its users: %s", e)
            return
        self._shared = want
