"""Users and groups of partitions: names resolved to ids once, and whether
an owner can have the full userfaultfd a worker needs.

A worker that is not root needs a userfaultfd that also takes faults the
kernel makes on its behalf (a read(2) into partition memory): the system call
gives that to unprivileged users only where vm.unprivileged_userfaultfd is 1,
and /dev/userfaultfd to whoever may open it read-write.  What an admin grants
is in the README ("Partitions owned by users").
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

UFFD_DEVICE = "/dev/userfaultfd"
UNPRIVILEGED_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"


def user_id(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def partition_ids(cfg) -> tuple[int | None, int | None]:
    """A partition's owner uid and group gid (None: not set, or not known
    here any more: then nobody but the admins)."""
    uid = user_id(cfg.owner) if cfg.owner else None
    gid = group_id(cfg.group) if cfg.group else None
    return uid, gid


def _sysctl_allows() -> bool:
    try:
        with open(UNPRIVILEGED_SYSCTL) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _may_read_write(st: os.stat_result, uid: int, gids: set[int]) -> bool:
    if uid == 0:
        return True
    if uid == st.st_uid:
        return st.st_mode & 0o600 == 0o600
    if st.st_gid in gids:
        return st.st_mode & 0o060 == 0o060
    return st.st_mode & 0o006 == 0o006


def uffd_problem(owner: str | None, group: str | None) -> str | None:
    """Why the owner (or members of the group) of a partition could not
    open a full userfaultfd here; None if they can."""
    if (owner is None and group is None) or _sysctl_allows():
        return None
    try:
        st = os.stat(UFFD_DEVICE)
    except OSError as e:
        return f"{UFFD_DEVICE}: {e.strerror}, and vm.unprivileged_userfaultfd is 0"
    if not stat.S_ISCHR(st.st_mode):
        return f"{UFFD_DEVICE} is not the userfaultfd device"
    how = f"{UFFD_DEVICE} ({stat.filemode(st.st_mode)} {_name(st.st_uid, st.st_gid)})"
    users = [owner] if owner is not None else []
    if group is not None:  # (its members as the group database lists them)
        try:
            users += [u for u in grp.getgrnam(group).gr_mem if u not in users]
        except KeyError:
            pass
    cannot = []
    for user in users:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            continue
        if not _may_read_write(st, pw.pw_uid, set(os.getgrouplist(user, pw.pw_gid))):
            cannot.append(user)
    if cannot:
        return f"{', '.join(cannot)} cannot open {how}"
    return None


def _name(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"


def uffd_warning(partition: str, owner: str | None, group: str | None) -> str | None:
    """One line for `pyhv up` and `partition add`, or None."""
    why = uffd_problem(owner, group)
    if why is None:
        return None
    return (f"partition {partition}: {why}: its workers will fail to attach (grant read-write "
            f"access, e.g. a group with mode 0660; see the README)")
