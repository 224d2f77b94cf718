"""Partitions owned by users (issue 14): real unprivileged users, created
here and removed after, run workers in the partitions they own and are
refused everything else, by the hypervisor from their credentials
(SO_PEERCRED), whatever they send.

The users need a way to the interpreter, the package and the run
directory (made here under /tmp: pytest's own are 0700): directories on
the way that others cannot pass (an interpreter under /root) are opened for passage (o+x) for the module's
run and closed again after; /dev/userfaultfd is granted to a group for as
long, as the README tells an admin to."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import pyhv
from conftest import PY, System, config_text, finish, pyhv as pyhv_cmd, reports
from test_recovery import ROUNDS, hypervisor_back, wait_line

PREFIX = "pyhvt"
GROUPS = ["uffd", "team", "admins"]
USERS = {  # who, and the groups they are in
    "alice": ["uffd"],  # owns p1
    "bob": ["uffd", "team"],  # in p2's group
    "carol": ["admins"],  # an admin, no partition
    "dave": [],  # owns p3, and has no userfaultfd
}
SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"


def _name(short: str) -> str:
    return f"{PREFIX}-{short}"


def _remove_accounts() -> None:
    for u in USERS:
        subprocess.run(["userdel", _name(u)], capture_output=True)
    for g in [*GROUPS, *USERS]:
        subprocess.run(["groupdel", _name(g)], capture_output=True)


def _open_for_passage(path: Path, opened: list) -> None:
    """o+x on path and every directory above it that lacks it."""
    for d in [path, *path.parents]:
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            opened.append((d, mode & 0o7777))
            os.chmod(d, mode & 0o7777 | stat.S_IXOTH)


@pytest.fixture(scope="module")
def accounts():
    _remove_accounts()  # (what a run that was killed left)
    for g in GROUPS:
        subprocess.run(["groupadd", "--system", _name(g)], check=True)
    for u, groups in USERS.items():
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell",
                        "/usr/sbin/nologin", *(["--groups", ",".join(_name(g) for g in groups)]
                                               if groups else []), _name(u)], check=True)  # fmt: skip
    dev = os.stat("/dev/userfaultfd")
    sysctl = Path(SYSCTL).read_text()
    opened: list = []
    try:
        # what the README tells an admin to grant: the device to a group, 0660
        os.chown("/dev/userfaultfd", 0, grp.getgrnam(_name("uffd")).gr_gid)
        os.chmod("/dev/userfaultfd", 0o660)
        Path(SYSCTL).write_text("0\n")  # (the call alone must not do)
        for p in (Path(PY).parent, Path(os.path.realpath(PY)).parent, Path(sys.base_prefix),
                  Path(pyhv.__file__).parent):  # fmt: skip
            _open_for_passage(p, opened)
        yield {u: pwd.getpwnam(_name(u)) for u in USERS}
    finally:
        for d, mode in reversed(opened):
            os.chmod(d, mode)
        os.chown("/dev/userfaultfd", dev.st_uid, dev.st_gid)
        os.chmod("/dev/userfaultfd", dev.st_mode & 0o7777)
        Path(SYSCTL).write_text(sysctl)
        _remove_accounts()


@pytest.fixture
def system():
    """A system in a run directory of its own under /tmp (pytest's own
    temporary directories are root's, 0700, and so are their parents)."""
    run_dir = Path(tempfile.mkdtemp(prefix="pyhv-owners-"))  # (0700: the hypervisor opens it)
    s = System(run_dir)
    yield s
    s.down()
    shutil.rmtree(run_dir, ignore_errors=True)


def as_user(pw) -> dict:
    """Popen arguments that run a process as this user, with its groups."""
    return {"user": pw.pw_uid, "group": pw.pw_gid,
            "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid), "cwd": "/",
            "env": {**os.environ, "HOME": "/", "PYTHONDONTWRITEBYTECODE": "1"}}  # fmt: skip


def run_as(pw, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=timeout,
                          **as_user(pw))  # fmt: skip


def cli_as(pw, system, *args) -> subprocess.CompletedProcess:
    """pyhv ARGS --run-dir DIR (before a "--": a command to run)."""
    args = list(args)
    at = args.index("--") if "--" in args else len(args)
    return run_as(pw, PY, "-m", "pyhv", *args[:at], "--run-dir", system.run_dir, *args[at:])


RAW = """
import json, sys
from pyhv import wire
print(json.dumps(wire.request(sys.argv[1], json.loads(sys.argv[2]))))
"""


def raw_as(pw, system, msg: dict) -> dict:
    """One request on the control socket, sent by this user's process."""
    p = run_as(pw, PY, "-c", RAW, system.run_dir / "control.sock", json.dumps(msg))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# connections held open at once, then each asked for status: how many answer
HOG = """
import sys, time
from pyhv import wire

def connect():
    while True:
        try:
            return wire.connect(sys.argv[1])
        except BlockingIOError:  # (the backlog is full until the hypervisor accepts)
            time.sleep(0.01)

socks = [connect() for _ in range(int(sys.argv[2]))]
answered = refused = 0
for s in socks:
    try:
        wire.send_control(s, {"op": "status"})
    except OSError:  # (refused: closed, its one answer waiting)
        pass
    try:
        reply = wire.recv_control(s)[0]
        answered += bool(reply and reply.get("ok"))
        refused += bool(reply and "too many connections" in reply.get("error", ""))
    except OSError:
        pass
print("answered", answered, "refused", refused)
"""

ATTACH = """
import sys, pyhv
try:
    mem = pyhv.attach(sys.argv[1], sys.argv[2])
except pyhv.AttachError as e:
    print("refused:", e)
    sys.exit(3)
mem[0:5] = b"hello"
print("attached", bytes(mem[0:5]))
"""


def owned_config(extra: str = "") -> str:
    text = config_text(pool="1MiB", partitions=[("p1", "8MiB"), ("p2", "4MiB"), ("p3", "4MiB")],
                       extra=extra)  # fmt: skip
    return (text.replace('name = "p1"\n', f'name = "p1"\nowner = "{_name("alice")}"\n')
            .replace('name = "p2"\n', f'name = "p2"\ngroup = "{_name("team")}"\n')
            .replace('name = "p3"\n', f'name = "p3"\nowner = "{_name("dave")}"\n'))  # fmt: skip


def up_owned(system, extra: str = "") -> subprocess.CompletedProcess:
    cfg = system.run_dir / "pyhv.toml"
    cfg.write_text(owned_config(extra))
    return pyhv_cmd("up", "-c", cfg, "--run-dir", system.run_dir, "--detach", check=True)


def test_owners_run_workers_and_nobody_else_does(system, accounts):
    alice, bob, carol, dave = (accounts[u] for u in ("alice", "bob", "carol", "dave"))
    up = up_owned(system, f'[hypervisor]\nadmin_group = "{_name("admins")}"\n')
    # dave cannot open /dev/userfaultfd: `pyhv up` says so in one line
    warnings = [ln for ln in up.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "p3" in warnings[0] and _name("dave") in warnings[0], up.stderr
    # the socket is everyone's (every request is checked); the run directory
    # lets them pass, not list; the files in it stay root's
    assert stat.S_IMODE(os.stat(system.run_dir / "control.sock").st_mode) == 0o666
    assert stat.S_IMODE(os.stat(system.run_dir).st_mode) & 0o005 == 0o001
    for f in ("config.json", "hypervisor.log"):
        assert stat.S_IMODE(os.stat(system.run_dir / f).st_mode) == 0o600, f

    # alice's workers page p1 (8 MiB through a 1 MiB pool), then verify it all
    for action in ("write", "verify"):
        p = subprocess.Popen([PY, "-m", "pyhv", "run", "--run-dir", str(system.run_dir),
                              "--partition", "p1", "--workers", "2", "--", PY, "-m",
                              "pyhv.workload", action, "--stripe", "--random"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             **as_user(alice))  # fmt: skip
        rc, out, err = finish(p)
        assert rc == 0, err
        done = reports(out)
        assert sum(r["pages"] for r in done) == 2048 and not any(r["mismatches"] for r in done)
    part = system.partition("p1")
    assert part["page_outs"] > 0 and part["page_ins"] > 0 and part["machine_checks"] == 0
    # bob, in p2's group, attaches to p2; dave's worker is told what it lacks
    p = run_as(bob, PY, "-c", ATTACH, "p2", system.run_dir)
    assert p.returncode == 0 and "attached b'hello'" in p.stdout, p.stderr
    p = run_as(dave, PY, "-c", ATTACH, "p3", system.run_dir)
    assert p.returncode == 3 and "/dev/userfaultfd" in p.stdout, (p.stdout, p.stderr)

    # bob may not use p1: not by pyhv run, not by attach, not on the raw socket
    p = cli_as(bob, system, "run", "--partition", "p1", "--", "true")
    assert p.returncode == 2 and "permission denied" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = run_as(bob, PY, "-c", ATTACH, "p1", system.run_dir)
    assert p.returncode == 3 and "permission denied" in p.stdout, (p.stdout, p.stderr)
    for msg in ({"op": "attach", "partition": "p1"}, {"op": "partition", "name": "p1"},
                {"op": "slots", "partition": "p1"}, {"op": "snapshot", "partition": "p1"},
                {"op": "rejoin", "partition": "p1", "worker": 0},
                {"op": "prefetch", "partition": "p1", "offset": 0, "length": 4096}):
        r = raw_as(bob, system, msg)
        assert not r["ok"] and "permission denied" in r["error"], (msg, r)
    assert not raw_as(alice, system, {"op": "attach", "partition": "p2"})["ok"]

    # the control point is root's and the admins': alice may not resize the
    # pool, nor shut the system down, nor add a partition, even her own
    for args in (["pool", "resize", "2MiB"], ["shutdown"], ["service", "stop", "vios1"],
                 ["partition", "add", "px", "--memory", "1MiB", "--paging", "vios1",
                  "--owner", _name("alice")]):  # fmt: skip
        p = cli_as(alice, system, *args)
        assert p.returncode != 0 and "permission denied" in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert system.status()["pool"]["pages"] == 256  # (nothing changed)
    # carol, an admin, may; and sees everything
    p = cli_as(carol, system, "pool", "resize", "2MiB")
    assert p.returncode == 0, p.stderr
    assert system.status()["pool"]["pages"] == 512
    st = json.loads(cli_as(carol, system, "status", "--json").stdout)
    assert {x["name"] for x in st["partitions"]} == {"p1", "p2", "p3"} and "pool" in st

    # a user's status shows its own partitions, and nothing else
    st = json.loads(cli_as(alice, system, "status", "--json").stdout)
    assert [x["name"] for x in st["partitions"]] == ["p1"]
    assert "pool" not in st and "paging_services" not in st and "devices" not in st
    assert "your partitions only" in cli_as(alice, system, "status").stdout
    p = cli_as(alice, system, "stat", "-n", "1")
    assert p.returncode == 2 and "for root" in p.stderr and "Traceback" not in p.stderr
    assert raw_as(bob, system, {"op": "status"})["partitions"][0]["name"] == "p2"
    nobody = pwd.getpwnam("nobody")
    assert raw_as(nobody, system, {"op": "status"})["partitions"] == []
    assert raw_as(nobody, system, {"op": "partition_list"})["partitions"] == []
    # one user cannot take every connection: it holds 256 at most, root goes on
    p = run_as(nobody, PY, "-c", HOG, system.run_dir / "control.sock", "300")
    assert p.returncode == 0 and p.stdout.split() == ["answered", "256", "refused", "44"], (p.stdout, p.stderr)


def test_an_owners_worker_survives_a_hypervisor_kill(system, accounts):
    """Its watchdog rejoins the new hypervisor: as its owner, whose
    credentials the new one checks again."""
    up_owned(system, "[hypervisor]\nrecovery_timeout = 60\n")
    p = subprocess.Popen([PY, "-m", "pyhv", "run", "--run-dir", str(system.run_dir),
                          "--partition", "p1", "--", PY, "-c", ROUNDS, "3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         **as_user(accounts["alice"]))  # fmt: skip
    system.procs.append(p)
    wait_line(p, "round 1")
    old = system.pid
    os.kill(old, signal.SIGKILL)
    hypervisor_back(system, old)
    rc, out, err = finish(p)
    assert rc == 0, (out, err)
    assert "verified 6144" in out  # 2048 pages, three rounds
    st = system.status()
    assert st["hypervisor"]["restarts"] == 1 and st["hypervisor"]["awaiting_rejoin"] == 0


def test_owners_in_the_config_and_partition_add(system, accounts, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(owned_config().replace(_name("alice"), "pyhvt-nosuchuser"))
    p = pyhv_cmd("up", "-c", cfg, "--run-dir", tmp_path / "run2", "--detach")
    assert p.returncode == 2 and "pyhvt-nosuchuser" in p.stderr and "no user" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    system.up(config_text(pool="1MiB", partitions=[("p1", "4MiB")],
                          extra=f'[[device]]\nid = "spare"\npath = "spare.img"\nsize = "4MiB"\n'
                                f'[hypervisor]\nadmin_group = "{_name("admins")}"\n'))  # fmt: skip
    # no owner yet: the socket is root's and the admins' only
    sock = os.stat(system.run_dir / "control.sock")
    assert stat.S_IMODE(sock.st_mode) == 0o660
    assert sock.st_gid == grp.getgrnam(_name("admins")).gr_gid
    p = system.pyhv("partition", "add", "px", "--memory", "1MiB", "--paging", "vios1",
                    "--owner", "pyhvt-nosuchuser")
    assert p.returncode == 2 and "no user" in p.stderr
    p = system.pyhv("partition", "add", "px", "--memory", "1MiB", "--paging", "vios1",
                    "--owner", _name("dave"))
    assert p.returncode == 0, p.stderr
    assert "warning" in p.stderr and "/dev/userfaultfd" in p.stderr  # dave has none
    # an owned partition opens the socket to its owner (the hypervisor checks)
    deadline = time.monotonic() + 10
    while stat.S_IMODE(os.stat(system.run_dir / "control.sock").st_mode) != 0o666:
        assert time.monotonic() < deadline, "the socket stayed closed to the owner"
        time.sleep(0.05)
    st = raw_as(accounts["dave"], system, {"op": "status"})
    assert [x["name"] for x in st["partitions"]] == ["px"]


FORKS = """
import os, pyhv
from pyhv.pattern import page_pattern
from pyhv.uffd import PAGE_SIZE as P
mem = pyhv.attach()
view = memoryview(mem)
n = len(mem) // P
for i in range(0, n, 2):
    view[i * P:(i + 1) * P] = page_pattern("p1", i, 7)
pid = os.fork()
if pid == 0:  # it reads its parent's pages and writes the others
    bad = sum(view[i * P:(i + 1) * P] != page_pattern("p1", i, 7) for i in range(0, n, 2))
    for i in range(1, n, 2):
        view[i * P:(i + 1) * P] = page_pattern("p1", i, 7)
    os._exit(1 if bad else 0)
_, status = os.waitpid(pid, 0)
bad = sum(view[i * P:(i + 1) * P] != page_pattern("p1", i, 7) for i in range(n))
print("child", os.waitstatus_to_exitcode(status), "bad", bad)
"""


def test_an_owners_worker_forks(system, accounts):
    """An unprivileged worker has no fork events (CAP_SYS_PTRACE): its memory
    is not inherited unguarded; the fork hook maps it again in the child,
    which attaches as a worker of its own and pages it (8 MiB, 1 MiB pool)."""
    up_owned(system)
    p = subprocess.Popen([PY, "-m", "pyhv", "run", "--run-dir", str(system.run_dir),
                          "--partition", "p1", "--", PY, "-c", FORKS], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, **as_user(accounts["alice"]))  # fmt: skip
    rc, out, err = finish(p)
    assert rc == 0 and out.split() == ["child", "0", "bad", "0"], (out, err)
    part = system.partition("p1")
    assert part["page_outs"] > 0 and part["machine_checks"] == 0
