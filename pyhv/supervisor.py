"""The supervisor: a small parent of the hypervisor that outlives it
(``python -m pyhv.supervisor``, or the ``pyhv up`` process itself in the
foreground), with ``[hypervisor] restart = true``.

AMS's hypervisor is firmware and does not die; pyhv's is a process, so it
may.  What must outlive it is kept here, as file descriptors the hypervisor
hands over when it makes them (the keeper socket, SCM_RIGHTS, one message an
fd): every partition's memory, error log and page table (memfds: nothing is
written to disk a fault), every worker's userfaultfd (so a fault in flight
waits in the kernel instead of reading a hole of the memfd), and the locks
on the paging devices.  The config as it is now (with every control-point
change) is in the run directory's config.json.

When the hypervisor dies other than by an orderly stop, the supervisor
SIGKILLs and reaps what it left (its paging services: orphans come here, a
child subreaper, so they are surely gone before anyone reads the memory
again), then starts a new hypervisor with ``--restarts N``, which asks for
everything kept and takes over (pyhv.hypervisor.recovery).  More than
MAX_RESTARTS within RESTART_WINDOW seconds is a hypervisor that cannot run:
the supervisor gives up (its workers exit 70 after recovery_timeout).

Messages (JSON, pyhv.wire's control framing), hypervisor to supervisor:
  {"op": "keep", "key": K, "meta": {...}} + one fd   keep (or replace) K
  {"op": "drop", "key": K} / {"op": "drop", "prefix": P}
  {"op": "ready"}                                    started (a start-up failure is
                                                     not restarted: it would repeat)
  {"op": "stopping"}                                 an orderly stop: no restart
  {"op": "kept"}  answered with one {"op": "item", "key", "meta"} + fd an
                  entry, then {"op": "end", "restarts": N}
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time

from pyhv import wire
from pyhv._spawn import module_command

log = logging.getLogger("pyhv.supervisor")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
PR_SET_CHILD_SUBREAPER = 36
SUPERVISOR_PID_FILE = "supervisor.pid"


class Supervisor:
    def __init__(self, run_dir: str, ready_fd: int = -1):
        self.run_dir = run_dir
        self.ready_fd = ready_fd
        self.kept: dict[str, tuple[int, dict]] = {}
        self.restarts = 0
        self.recent: list[float] = []
        self.stopping = False
        self.was_ready = False  # a hypervisor has started (one that cannot is not restarted)
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.sel = selectors.DefaultSelector()

    # --- the keeper socket ------------------------------------------------------------

    def on_message(self) -> bool:
        """One message from the hypervisor; False at its end-of-file."""
        try:
            msg, fds = wire.recv_control(self.sock)
        except wire.ProtocolError as e:  # one message lost (its fds closed), not the socket
            log.error("supervisor: keeper socket: a message lost: %s", e)
            return True
        except OSError as e:
            log.error("supervisor: keeper socket: %s", e)
            return False
        if msg is None:
            return False
        op = msg.get("op")
        if op == "keep" and len(fds) == 1 and isinstance(msg.get("key"), str):
            old = self.kept.pop(msg["key"], None)
            if old is not None:
                os.close(old[0])
            self.kept[msg["key"]] = (fds.pop(), msg.get("meta") or {})
        elif op == "drop":
            key, prefix = msg.get("key"), msg.get("prefix")
            for k in [k for k in self.kept if k == key or (prefix and k.startswith(prefix))]:
                os.close(self.kept.pop(k)[0])
        elif op == "stopping":
            self.stopping = True
        elif op == "ready":
            self.was_ready = True
        elif op == "kept":
            for key, (fd, meta) in self.kept.items():
                wire.send_control(self.sock, {"op": "item", "key": key, "meta": meta}, [fd],
                                  limit=wire.MAX_REPLY)  # fmt: skip
            wire.send_control(self.sock, {"op": "end", "restarts": self.restarts})
        else:
            log.error("supervisor: unknown message %r from the hypervisor", op)
        wire.close_fds(fds)
        return True

    # --- the hypervisor ---------------------------------------------------------------

    def spawn(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = ["--run-dir", self.run_dir, "--keeper-fd", str(theirs.fileno())]
        pass_fds = [theirs.fileno()]
        if self.ready_fd >= 0:
            args += ["--ready-fd", str(self.ready_fd)]
            pass_fds.append(self.ready_fd)
        if self.restarts:
            args += ["--restarts", str(self.restarts)]
        self.proc = subprocess.Popen(module_command("pyhv.daemon", *args), pass_fds=pass_fds,
                                     stdin=subprocess.DEVNULL, cwd=self.run_dir)  # fmt: skip
        theirs.close()
        if self.ready_fd >= 0:  # (the first hypervisor says whether it started)
            os.close(self.ready_fd)
            self.ready_fd = -1
        self.sock = mine
        self.sel.register(mine, selectors.EVENT_READ, "keeper")

    def wait_hypervisor(self) -> int:
        """Serve the keeper socket until the hypervisor exits; its status."""
        pidfd = os.pidfd_open(self.proc.pid)
        self.sel.register(pidfd, selectors.EVENT_READ, "exit")
        try:
            while True:
                for key, _ in self.sel.select():
                    if key.data == "keeper" and not self.on_message():
                        self.sel.unregister(self.sock)
                        self.sock.close()
                        self.sock = None
                    elif key.data == "exit":
                        while self.sock is not None and self.on_message():
                            pass  # (what it said last)
                        return self.proc.wait()
        finally:
            self.sel.unregister(pidfd)
            os.close(pidfd)
            if self.sock is not None:
                self.sel.unregister(self.sock)
                self.sock.close()
                self.sock = None

    def reap_orphans(self) -> int:
        """SIGKILL and reap every process the dead hypervisor left (they are
        this process's children now); how many."""
        me = os.getpid()
        n = 0
        while True:
            for d in os.listdir("/proc"):
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                            os.kill(int(d), signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    continue
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    n += 1
            except ChildProcessError:
                return n
            time.sleep(0.01)

    def run(self) -> int:
        try:  # the dead hypervisor's paging services come here to be reaped
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._forward)
        with open(os.path.join(self.run_dir, SUPERVISOR_PID_FILE), "w") as f:
            os.fchmod(f.fileno(), 0o644)  # (a worker's attach reads it: a restart under way)
            f.write(f"{os.getpid()}\n")
        try:
            while True:
                try:
                    self.spawn()
                    status = self.wait_hypervisor()
                except OSError as e:  # (out of fds or processes: the workers exit 70)
                    log.error("supervisor: cannot run a hypervisor: %s; giving up", e)
                    return 1
                reaped = self.reap_orphans()
                if self.stopping or status == 0 or not self.was_ready:
                    return status  # (stopped, or it could not start: that would repeat)
                now = time.monotonic()
                self.recent = [t for t in self.recent if now - t < RESTART_WINDOW] + [now]
                if len(self.recent) > MAX_RESTARTS:
                    log.error("supervisor: the hypervisor died %d times within %gs; giving up "
                              "(workers exit 70 after recovery_timeout)", len(self.recent),
                              RESTART_WINDOW)  # fmt: skip
                    return 1
                self.restarts += 1
                log.error("supervisor: the hypervisor (pid %d) died (%s); %d of its processes "
                          "reaped; starting hypervisor #%d", self.proc.pid, _how(status), reaped,
                          self.restarts + 1)  # fmt: skip
        finally:
            for fd, _ in self.kept.values():
                os.close(fd)
            self.kept.clear()
            try:
                os.unlink(os.path.join(self.run_dir, SUPERVISOR_PID_FILE))
            except FileNotFoundError:
                pass

    def _forward(self, signum, frame) -> None:
        """A stop asked of the supervisor is the hypervisor's orderly stop."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)


def _how(status: int) -> str:
    return f"signal {-status}" if status < 0 else f"status {status}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pyhv-supervisor")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--ready-fd", type=int, default=-1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    # it keeps one fd a worker and four a partition, as many as the hypervisor has
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return Supervisor(os.path.abspath(args.run_dir), args.ready_fd).run()


def kept_items(sock: socket.socket) -> tuple[dict[str, tuple[int, dict]], int]:
    """The hypervisor's side of recovery: everything the supervisor keeps,
    and how many times the hypervisor was restarted."""
    wire.send_control(sock, {"op": "kept"})
    items: dict[str, tuple[int, dict]] = {}
    while True:
        msg, fds = wire.recv_control(sock)
        if msg is None:
            wire.close_fds(fds)
            raise OSError("the supervisor closed the keeper socket")
        if msg.get("op") == "end":
            wire.close_fds(fds)
            return items, int(msg.get("restarts", 0))
        if msg.get("op") == "item" and len(fds) == 1:
            items[msg["key"]] = (fds[0], msg.get("meta") or {})
        else:
            wire.close_fds(fds)


if __name__ == "__main__":
    sys.exit(main())
