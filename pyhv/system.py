"""Starting and stopping a system, and talking to it: what the command line,
the demo and the benchmarks share (``pyhv.cli`` is only the command line).

Errors are :class:`Fail`: one line, and the exit status it calls for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pyhv import owners, wire
from pyhv._spawn import module_command
from pyhv.config import load_config
from pyhv.hypervisor import CONTROL_SOCKET, LOG_FILE, PID_FILE

EXIT_USAGE = 2
EXIT_FAIL = 1


class Fail(Exception):
    """A one-line error; code is the exit status."""

    def __init__(self, msg: str, code: int = EXIT_FAIL):
        super().__init__(msg)
        self.code = code


def live_pid(path: str) -> int | None:
    """The pid in a pid file, if that process lives."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _private(path: str, mode: str):
    """open(path, mode) ("w" or "ab"), a new file made 0600 (the run
    directory's files are root's; this process has no umask of its own)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return open(os.open(path, flags, 0o600), mode)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def running_pid(run_dir: str) -> int | None:
    """The pid of a live hypervisor in run_dir, or None."""
    pid = live_pid(os.path.join(run_dir, PID_FILE))
    return pid if pid and os.path.exists(os.path.join(run_dir, CONTROL_SOCKET)) else None


def control(run_dir: str, msg: dict, timeout: float = 30.0) -> dict:
    path = os.path.join(run_dir, CONTROL_SOCKET)
    try:
        return wire.request(path, msg, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise Fail(f"no hypervisor is running in {run_dir}") from None
    except (OSError, wire.ProtocolError) as e:
        raise Fail(f"hypervisor in {run_dir}: {e}") from None


def start_system(config_path: str | None, run_dir: str, detach: bool, config=None) -> int:
    """Validate, then start the hypervisor (and through it the paging services)."""
    if config is None:
        config = load_config(config_path, run_dir)
    check_kernel()
    pid = running_pid(run_dir)
    if pid is not None:
        raise Fail(f"a hypervisor is already running in {run_dir} (pid {pid})", EXIT_USAGE)
    from pyhv.supervisor import SUPERVISOR_PID_FILE

    pid = live_pid(os.path.join(run_dir, SUPERVISOR_PID_FILE))
    if pid is not None and b"pyhv" in _cmdline(pid):  # (between a crash and the next hypervisor)
        raise Fail(f"a supervisor is running in {run_dir} (pid {pid}): its hypervisor is being "
                   "restarted", EXIT_USAGE)  # fmt: skip
    check_locks(config)
    for part in config.partitions:  # (they can attach once an admin grants it)
        warning = owners.uffd_warning(part.name, part.owner, part.group)
        if warning:
            print(f"pyhv: warning: {warning}", file=sys.stderr)
    try:  # root's: the hypervisor opens the way to its socket as far as owners need
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        st = os.stat(run_dir)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:  # (another could swap its files)
            raise Fail(f"run directory {run_dir} is not this user's alone (owner uid "
                       f"{st.st_uid}, mode {st.st_mode & 0o7777:04o}): use a directory of "
                       "its own", EXIT_USAGE)  # fmt: skip
        with _private(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1)
    except OSError as e:
        raise Fail(f"cannot use run directory {run_dir}: {e.strerror}", EXIT_USAGE) from None
    # with restart, a supervisor (this process in the foreground) runs the
    # hypervisor and starts a new one if it crashes (pyhv.supervisor)
    if not detach:
        if config.restart:
            from pyhv import supervisor

            return supervisor.main(["--run-dir", run_dir])
        from pyhv import hypervisor

        return hypervisor.main(["--run-dir", run_dir])
    r, w = os.pipe()
    entry = "pyhv.supervisor" if config.restart else "pyhv.daemon"
    with _private(os.path.join(run_dir, LOG_FILE), "ab") as logf:
        proc = subprocess.Popen(
            module_command(entry, "--run-dir", run_dir, "--ready-fd", str(w)),
            pass_fds=[w], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            start_new_session=True, cwd=run_dir,
        )  # fmt: skip
    os.close(w)
    with os.fdopen(r) as ready:
        line = ready.readline().strip()
    if line != "ready":
        proc.wait(10)
        why = line[len("error ") :] if line.startswith("error ") else "exited during start-up"
        raise Fail(f"the hypervisor did not start: {why} (see {os.path.join(run_dir, LOG_FILE)})")
    return 0


def check_locks(config) -> None:
    """Refuse devices that another running system holds (the hypervisor
    takes the same locks for real when it starts)."""
    import fcntl

    from pyhv import claim

    for dev in config.devices:
        if dev.kind == "nbd":
            try:
                claim.probe(dev)
            except claim.ClaimError as e:
                raise Fail(str(e), EXIT_USAGE) from None
            continue
        try:
            fd = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Fail(f"device {dev.id!r} ({dev.path}) is in use by another system",
                       EXIT_USAGE) from None  # fmt: skip
        finally:
            os.close(fd)


def check_kernel() -> None:
    """Refuse to start where workers could not fault through the hypervisor."""
    from pyhv import uffd

    try:
        missing = uffd.missing_features(uffd.WORKER_FEATURES)
    except OSError as e:
        raise Fail(f"userfaultfd is not available here: {e.strerror} (pyhv needs root, or "
                   "read-write access to /dev/userfaultfd)") from None  # fmt: skip
    if missing:
        raise Fail(f"this kernel's userfaultfd lacks {', '.join(missing)} (pyhv needs Linux 6.1+)")


def spawn_workers(run_dir: str, partition: str, n: int, cmd: list[str], **popen) -> list:
    procs = []
    for i in range(n):
        env = dict(os.environ, PYHV_RUN_DIR=run_dir, PYHV_PARTITION=partition,
                   PYHV_WORKER=str(i), PYHV_WORKERS=str(n))  # fmt: skip
        try:
            procs.append(subprocess.Popen(cmd, env=env, **popen))
        except OSError as e:
            for p in procs:
                p.kill()
            raise Fail(f"cannot run {cmd[0]}: {e.strerror}", EXIT_USAGE) from None
    return procs


def wait_workers(procs: list) -> int:
    """Wait for all; 0 if all exited 0, else the first failure's status
    (128+N for a worker killed by signal N)."""
    first = 0
    left = {p.pid: p for p in procs}
    while left:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        p = left.pop(pid, None)
        if p is None:
            continue
        p.returncode = os.waitstatus_to_exitcode(status)
        code = p.returncode if p.returncode >= 0 else 128 - p.returncode
        if code and not first:
            first = code
    return first


def stop_system(run_dir: str, timeout: float = 30.0) -> dict:
    """Shut the system down in order; returns what the hypervisor stopped
    (once it and its supervisor, which holds the devices' locks, are gone)."""
    from pyhv.supervisor import SUPERVISOR_PID_FILE

    try:
        with open(os.path.join(run_dir, SUPERVISOR_PID_FILE)) as f:
            supervisor = int(f.read().strip())
    except (OSError, ValueError):
        supervisor = None
    reply = control(run_dir, {"op": "shutdown"})
    if not reply.get("ok"):
        raise Fail(reply.get("error", "refused"), EXIT_USAGE)
    deadline = time.monotonic() + timeout
    for pid in (reply.get("pid"), supervisor):
        if pid and not _wait_gone(pid, deadline):
            raise Fail(f"the hypervisor (pid {pid}) did not stop within {timeout:.0f}s")
    return reply


def _wait_gone(pid: int, deadline: float) -> bool:
    """Wait until process pid has exited (or is a zombie); False at the deadline."""
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if "State:\tZ" in f.read():
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
