"""The system's configuration: TOML in, validated dataclasses out.

Every check happens here, before anything is started; a failure is one
:class:`ConfigError` whose message is a single line fit for stderr.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import tomllib
from pathlib import Path

from pyhv import owners
from pyhv.uffd import PAGE_SIZE

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ISOLATIONS = ("process", "partition")
#: The smallest pool: enough frames for a fault to find one while others page out.
MIN_POOL_PAGES = 16
#: A paging service's timeout, seconds: long enough for a slow disk's request,
#: short enough that a hung service is noticed (inf would turn that off).
TIMEOUT = (0.1, 3600.0)
#: A config file larger than this is refused unread (``-c /dev/zero``).
MAX_CONFIG_BYTES = 1 << 20
#: What the hypervisor keeps for each page of a partition's memory (state 1,
#: CRC32 4, slot 4, eviction stamp and reference bits 1) and for each slot of its device (the
#: slot map, 1): checked against the machine's memory before anything starts.
METADATA_PER_PAGE = 10
METADATA_PER_SLOT = 1
#: Filesystems whose files are no paging device (statfs f_type): proc, sysfs,
#: debugfs, tracefs, securityfs, cgroup, cgroup2, devpts, configfs, bpf,
#: pstore, efivarfs, selinuxfs, fusectl, binfmt_misc, nsfs.
PSEUDO_FILESYSTEMS = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x73636673: "securityfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0x1CD1: "devpts",
    0x62656570: "configfs", 0xCAFE4A11: "bpf", 0x6165676C: "pstore", 0xDE5E81E4: "efivarfs",
    0xF97CFF8C: "selinuxfs", 0x65735543: "fusectl", 0x42494E4D: "binfmt_misc",
    0x6E736673: "nsfs",
}  # fmt: skip


class ConfigError(ValueError):
    """A configuration or command-line value that cannot be used."""


def parse_size(value, what: str = "size") -> int:
    """Bytes from an integer or a string such as ``"16MiB"``; > 0."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what}: {value!r} is not a size (use e.g. 4096, \"64MiB\", \"1GiB\")")
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ConfigError(f"{what}: {value!r} is not a size")
    if n <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}")
    return n


def parse_pages(value, what: str) -> int:
    """A size that must be a whole number of pages; returns bytes."""
    n = parse_size(value, what)
    if n % PAGE_SIZE:
        raise ConfigError(f"{what}: {value!r} is not a multiple of the page size ({PAGE_SIZE})")
    return n


def format_size(n: int) -> str:
    """Exact, as a config would say it: "64MiB", or bytes."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def human_size(n: int) -> str:
    """Rounded, for people: "22.9GiB"."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return f"{n}B"


def available_memory() -> int:
    """Bytes this machine can give now without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def metadata_bytes(pages: int, slots: int) -> int:
    """What the hypervisor keeps for a partition of `pages` pages on a device
    of `slots` slots."""
    return pages * METADATA_PER_PAGE + slots * METADATA_PER_SLOT


def check_pool_size(pages: int, what: str = "[pool] size", available: int | None = None) -> None:
    """A pool must hold MIN_POOL_PAGES pages and fit in the memory the machine
    can give (`available` bytes; default: MemAvailable now)."""
    if pages < MIN_POOL_PAGES:
        raise ConfigError(f"{what}: the pool cannot be smaller than {MIN_POOL_PAGES} pages "
                          f"({format_size(MIN_POOL_PAGES * PAGE_SIZE)})")  # fmt: skip
    available = available_memory() if available is None else available
    if pages * PAGE_SIZE > available:
        raise ConfigError(f"{what}: {human_size(pages * PAGE_SIZE)} is more memory than this "
                          f"machine can give ({human_size(available)} available)")  # fmt: skip


def check_metadata(name: str, memory: int, device_size: int, available: int | None = None) -> None:
    """A partition's page tables must fit in the memory the machine can give."""
    need = metadata_bytes(memory // PAGE_SIZE, device_size // PAGE_SIZE)
    available = available_memory() if available is None else available
    if need > available:
        raise ConfigError(f"partition {name!r}: {format_size(memory)} of memory on a "
                          f"{format_size(device_size)} device needs {human_size(need)} of "
                          f"hypervisor metadata ({METADATA_PER_PAGE} bytes a page, "
                          f"{METADATA_PER_SLOT} a device slot), more than this machine can "
                          f"give ({human_size(available)} available)")  # fmt: skip


@dataclasses.dataclass
class ServiceConfig:
    name: str
    restart: bool = False  # start it again by itself when it dies
    timeout: float = 10.0  # seconds a request may go unanswered before it counts as dead


@dataclasses.dataclass
class DeviceConfig:
    id: str
    path: Path | str  # a file or block device; for "nbd", its first URI
    size: int  # bytes
    kind: str  # "file", "block" or "nbd"
    services: list[str]
    direct: bool
    uris: list[str] = dataclasses.field(default_factory=list)  # nbd: the i-th service's path
    tls_psk: str | None = None  # nbd: the pre-shared key file (nbds://)
    io_timeout: float | None = None  # a page-in no path serves by then is a machine check

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def path_for(self, service: str) -> str:
        """The path the named service reaches the device by."""
        if self.kind != "nbd":
            return str(self.path)
        if len(self.uris) == 1:
            return self.uris[0]
        return self.uris[self.services.index(service)]

    @property
    def identity(self) -> str:
        """What two devices share when they are one (compared at device add)."""
        return " ".join(self.uris) if self.kind == "nbd" else os.path.realpath(self.path)


@dataclasses.dataclass
class PartitionConfig:
    name: str
    memory: int  # bytes
    paging: list[str]
    device: str
    isolation: str = "process"
    weight: int = 128
    snapshot: str | None = None  # a snapshot directory its pages come from (read-only)
    prefetch: bool = True  # ... with its working set read ahead
    owner: str | None = None  # a user who may run workers in it (besides root)
    group: str | None = None  # ... and a group whose members may

    @property
    def pages(self) -> int:
        return self.memory // PAGE_SIZE


POLL_US = 300  # default [hypervisor] poll_us
RECOVERY_TIMEOUT = 30.0  # default [hypervisor] recovery_timeout, seconds


@dataclasses.dataclass
class Config:
    pool_size: int
    services: list[ServiceConfig]
    devices: list[DeviceConfig]
    partitions: list[PartitionConfig]
    # after an event, the hypervisor and the paging services poll this many
    # microseconds for the next one before they sleep: a fault or reply that
    # arrives meanwhile costs no wake-up of a sleeping CPU (0: never poll)
    poll_us: int = POLL_US
    # a supervisor restarts a hypervisor that crashed (pyhv.supervisor), and
    # its workers wait this long for it before they exit 70
    restart: bool = True
    recovery_timeout: float = RECOVERY_TIMEOUT
    # members of this group may use the control point as root does
    admin_group: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for dev in d["devices"]:
            dev["path"] = str(dev["path"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(
            pool_size=d["pool_size"],
            services=[ServiceConfig(**s) for s in d["services"]],
            devices=[DeviceConfig(**{**x, "path": x["path"] if x.get("kind") == "nbd"
                                     else Path(x["path"])}) for x in d["devices"]],  # fmt: skip
            partitions=[PartitionConfig(**p) for p in d["partitions"]],
            poll_us=d.get("poll_us", POLL_US),
            restart=d.get("restart", True),
            recovery_timeout=d.get("recovery_timeout", RECOVERY_TIMEOUT),
            admin_group=d.get("admin_group"),
        )


def _table_list(doc: dict, key: str) -> list[dict]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"[[{key}]] must be an array of tables")
    return items


def _name(entry: dict, key: str, where: str) -> str:
    v = entry.get(key)
    if not isinstance(v, str) or not _NAME.match(v):
        raise ConfigError(f"{where}: {key} {v!r} must be a name of letters, digits, '_', '.', '-'")
    return v


def _unknown_keys(entry: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(entry) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}")


def _unique(names: list[str], what: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"duplicate {what} name {n!r}")
        seen.add(n)


def parse_device(entry: dict, run_dir: Path, service_names: list[str],
                 probe: bool = True) -> DeviceConfig:  # fmt: skip
    """One [[device]] table, validated (and its size read for a block device;
    an NBD server asked for its export's, unless probe is false)."""
    did = _name(entry, "id", "[[device]]")
    where = f"device {did!r}"
    _unknown_keys(entry, {"id", "path", "size", "services", "direct", "tls_psk", "io_timeout"},
                  where)  # fmt: skip
    raw = entry.get("path")
    io_timeout = entry.get("io_timeout")
    if io_timeout is not None and (
            isinstance(io_timeout, bool) or not isinstance(io_timeout, (int, float))
            or not math.isfinite(io_timeout) or not 0.01 <= io_timeout <= TIMEOUT[1]):  # fmt: skip
        raise ConfigError(f"{where}: io_timeout must be a number of seconds from 0.01 to "
                          f"{TIMEOUT[1]:g} (leave it out to wait)")  # fmt: skip
    io_timeout = float(io_timeout) if io_timeout is not None else None
    services = entry.get("services", list(service_names))
    if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
        raise ConfigError(f"{where}: services must be a list of service names")
    for s in services:
        if s not in service_names:
            raise ConfigError(f"{where}: unknown paging service {s!r}")
    if not services:
        raise ConfigError(f"{where}: no paging service can reach it")
    from pyhv import nbd

    if isinstance(raw, list) or nbd.is_uri(raw):
        return _parse_nbd_device(entry, did, where, raw, run_dir, list(services), io_timeout,
                                 probe)  # fmt: skip
    if "tls_psk" in entry:
        raise ConfigError(f"{where}: tls_psk is for devices on NBD servers (nbds://)")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: path is required")
    path = Path(raw) if os.path.isabs(raw) else Path(run_dir) / raw
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ConfigError(f"{where}: {path}: {e.strerror}") from None
    if st is not None and stat.S_ISBLK(st.st_mode):
        kind = "block"
        try:
            size = _block_size(path)
        except OSError as e:
            raise ConfigError(f"{where}: {path}: {e.strerror}") from None
        if "size" in entry and parse_size(entry["size"], f"{where}: size") > size:
            raise ConfigError(f"{where}: size is larger than the block device {path}")
    else:
        if st is None and str(path).startswith("/dev/"):
            raise ConfigError(f"{where}: block device {path} does not exist")
        if st is None and path.parent != Path(run_dir) and not path.parent.is_dir():
            raise ConfigError(f"{where}: directory {path.parent} does not exist")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{where}: {path} is neither a regular file nor a block device")
        kind = "file"
    _check_usable(path if st is not None else path.parent, where, st is None)
    if kind == "file":
        if "size" in entry:
            size = parse_pages(entry["size"], f"{where}: size")
        elif st is not None:
            size = st.st_size
        else:
            raise ConfigError(f"{where}: {path} does not exist and no size is given")
    size -= size % PAGE_SIZE
    if size <= 0:
        raise ConfigError(f"{where}: {path} is smaller than one page")
    direct = entry.get("direct", kind == "block")
    if not isinstance(direct, bool):
        raise ConfigError(f"{where}: direct must be true or false")
    return DeviceConfig(did, path, size, kind, list(services), direct, io_timeout=io_timeout)


def _parse_nbd_device(entry, did, where, raw, run_dir, services, io_timeout, probe):
    """A device on an NBD server: one URI, or one a service (the i-th the
    path of the i-th of `services`).  With probe, every path is connected
    to: it must answer, with an export large enough; the size is the
    export's less its last page, where the claim lives (pyhv.claim)."""
    from pyhv import nbd

    uris = raw if isinstance(raw, list) else [raw]
    if not uris or not all(isinstance(u, str) and u for u in uris):
        raise ConfigError(f"{where}: path must be a file, a block device, an NBD URI or a list "
                          "of NBD URIs")  # fmt: skip
    for u in uris:
        bad = nbd.check_uri(u) if nbd.is_uri(u) else "not a URI"
        if bad:
            raise ConfigError(f"{where}: {nbd.redact(u)!r} is no NBD URI: {bad}")
    if len(uris) > 1 and len(uris) != len(services):
        raise ConfigError(f"{where}: {len(uris)} paths for {len(services)} services: the i-th "
                          "path is the i-th service's")  # fmt: skip
    if len(set(uris)) != len(uris):
        raise ConfigError(f"{where}: the same path twice")
    if "direct" in entry:
        raise ConfigError(f"{where}: direct is for files and block devices")
    tls = [u.split("://")[0].startswith("nbds") for u in uris]
    psk = entry.get("tls_psk")
    if psk is not None:
        if not isinstance(psk, str) or not psk:
            raise ConfigError(f"{where}: tls_psk must be a file")
        psk = str(Path(psk) if os.path.isabs(psk) else Path(run_dir) / psk)
        try:
            with open(psk, "rb") as f:
                if b":" not in f.read(4096):
                    raise ConfigError(f"{where}: tls_psk {psk} is no PSK file (USER:HEXKEY "
                                      "lines, as psktool writes them)")  # fmt: skip
        except OSError as e:
            raise ConfigError(f"{where}: tls_psk {psk}: {e.strerror}") from None
        if not all(tls):
            raise ConfigError(f"{where}: tls_psk needs nbds:// paths (nbd:// is never encrypted)")
    if any(tls) and not all(tls):
        raise ConfigError(f"{where}: some paths use TLS and some do not")
    if not nbd.available():
        raise ConfigError(f"{where}: this pyhv was built without libnbd (install Debian's "
                          "libnbd-dev, then `make setup`)")  # fmt: skip
    want = parse_pages(entry["size"], f"{where}: size") if "size" in entry else None
    size = want
    if probe:
        for u in uris:
            try:
                with nbd.NbdDevice(u, psk, connect_s=nbd.CONNECT_S) as d:
                    have = (d.size // PAGE_SIZE - 1) * PAGE_SIZE  # (the last page: the claim)
                    read_only = d.read_only
            except OSError as e:
                raise ConfigError(f"{where}: {nbd.redact(u)}: {e.strerror or e}") from None
            if read_only:
                raise ConfigError(f"{where}: {nbd.redact(u)}: the export is read-only")
            if have <= 0:
                raise ConfigError(f"{where}: {nbd.redact(u)}: the export is smaller than two "
                                  "pages")  # fmt: skip
            if want is not None and want > have:
                raise ConfigError(f"{where}: size is larger than the export at "
                                  f"{nbd.redact(u)} ({format_size(have)} usable)")  # fmt: skip
            size = min(size, have) if size is not None else have
    if not size:
        raise ConfigError(f"{where}: the size of its export is not known")
    return DeviceConfig(did, uris[0], size, "nbd", services, False, list(uris), psk, io_timeout)


def _check_usable(path: Path, where: str, directory: bool) -> None:
    """A paging device is read and written at offsets: refuse one that cannot
    be opened for writing, or lives on a pseudo filesystem (``/proc/meminfo``
    is a "regular file"); for a device file not made yet, its directory."""
    from pyhv.uffd import fs_magic

    if directory and not path.is_dir():
        return  # the run directory, made when the system starts
    flags = (os.O_RDONLY | os.O_DIRECTORY if directory else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConfigError(f"{where}: {path} cannot be opened"
                          f"{'' if directory else ' for reading and writing'}: "
                          f"{e.strerror}") from None  # fmt: skip
    try:
        fs = PSEUDO_FILESYSTEMS.get(fs_magic(fd))
        if fs is not None:
            raise ConfigError(f"{where}: {path} is on {fs}, which cannot hold a paging device")
        if not directory:
            try:
                os.pwrite(fd, b"", 0)
            except OSError as e:
                raise ConfigError(f"{where}: {path} cannot be written at an offset: "
                                  f"{e.strerror}") from None  # fmt: skip
    finally:
        os.close(fd)


def _block_size(path: Path) -> int:
    from pyhv.uffd import blkdev_size

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return blkdev_size(fd)
    finally:
        os.close(fd)


def check_snapshot(path: Path, memory: int, where: str) -> str:
    """A snapshot directory (pyhv.snapshot) of `memory` bytes; its absolute path."""
    import json

    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {path} is no pyhv snapshot "
                          f"({getattr(e, 'strerror', None) or e})") from None  # fmt: skip
    if not isinstance(meta, dict) or meta.get("format") != "pyhv-snapshot":
        raise ConfigError(f"{where}: {path} is no pyhv snapshot (meta.json)")
    if meta.get("memory_bytes") != memory:
        raise ConfigError(f"{where}: snapshot {path} holds {meta.get('memory_bytes')} bytes of "
                          f"memory, the partition {memory}")  # fmt: skip
    for part, size in (("memory", memory), ("crc32", memory // PAGE_SIZE * 4)):
        data = path / part / "data.ninja"
        if not data.is_file() or data.stat().st_size != size:
            raise ConfigError(f"{where}: snapshot {path}: {part}/data.ninja is missing or not "
                              f"{size} bytes")  # fmt: skip
    return str(path.resolve())


def parse_partition(entry: dict, service_names: list[str], base: Path | None = None) -> dict:
    """One [[partition]] table, validated on its own; its device is not
    resolved yet.  A relative snapshot path is taken from `base`."""
    name = _name(entry, "name", "[[partition]]")
    where = f"partition {name!r}"
    _unknown_keys(entry, {"name", "memory", "paging", "device", "isolation", "weight", "snapshot",
                          "prefetch", "owner", "group"}, where)  # fmt: skip
    if "memory" not in entry:
        raise ConfigError(f"{where}: memory is required")
    memory = parse_pages(entry["memory"], f"{where}: memory")
    paging = entry.get("paging", service_names[:1])
    if isinstance(paging, str):
        paging = [paging]
    if not isinstance(paging, list) or not all(isinstance(s, str) for s in paging):
        raise ConfigError(f"{where}: paging must be a list of one or two service names")
    if not 1 <= len(paging) <= 2 or len(set(paging)) != len(paging):
        raise ConfigError(f"{where}: paging must name one or two different services")
    for s in paging:
        if s not in service_names:
            raise ConfigError(f"{where}: unknown paging service {s!r}")
    device = entry.get("device")
    if device is not None and not isinstance(device, str):
        raise ConfigError(f"{where}: device must be a device id")
    isolation = entry.get("isolation", "process")
    if isolation not in ISOLATIONS:
        raise ConfigError(f"{where}: isolation must be one of {', '.join(ISOLATIONS)}")
    weight = entry.get("weight", 128)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1024:
        raise ConfigError(f"{where}: weight must be an integer from 1 to 1024")
    snapshot = entry.get("snapshot")
    if snapshot is not None:
        if not isinstance(snapshot, str) or not snapshot:
            raise ConfigError(f"{where}: snapshot must be a directory")
        snapshot = check_snapshot((base or Path.cwd()) / snapshot, memory, where)
    prefetch = entry.get("prefetch", True)
    if not isinstance(prefetch, bool):
        raise ConfigError(f"{where}: prefetch must be true or false")
    owner = _account(entry, "owner", owners.user_id, "user", where)
    group = _account(entry, "group", owners.group_id, "group", where)
    return dict(name=name, memory=memory, paging=list(paging), device=device,
                isolation=isolation, weight=weight, snapshot=snapshot, prefetch=prefetch,
                owner=owner, group=group)


def _account(entry: dict, key: str, lookup, what: str, where: str) -> str | None:
    """A user or group name that exists here, or None if not given."""
    v = entry.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: {key} must be a {what} name")
    if lookup(v) is None:
        raise ConfigError(f"{where}: {key} {v!r} is no {what} on this machine")
    return v


def parse_config(doc: dict, run_dir: Path) -> Config:
    """Validate a parsed TOML document; raises ConfigError on the first problem."""
    _unknown_keys(doc, {"pool", "hypervisor", "paging_service", "device", "partition"}, "config")
    pool = doc.get("pool")
    if not isinstance(pool, dict) or "size" not in pool:
        raise ConfigError("[pool] size is required")
    _unknown_keys(pool, {"size"}, "[pool]")
    pool_size = parse_pages(pool["size"], "[pool] size")
    check_pool_size(pool_size // PAGE_SIZE)
    hv = doc.get("hypervisor", {})
    if not isinstance(hv, dict):
        raise ConfigError("[hypervisor] must be a table")
    _unknown_keys(hv, {"poll_us", "restart", "recovery_timeout", "admin_group"}, "[hypervisor]")
    admin_group = _account(hv, "admin_group", owners.group_id, "group", "[hypervisor]")
    poll_us = hv.get("poll_us", POLL_US)
    if isinstance(poll_us, bool) or not isinstance(poll_us, int) or not 0 <= poll_us <= 100_000:
        raise ConfigError("[hypervisor] poll_us must be a whole number of microseconds, "
                          "0 to 100000")  # fmt: skip
    hv_restart = hv.get("restart", True)
    if not isinstance(hv_restart, bool):
        raise ConfigError("[hypervisor] restart must be true or false")
    recovery = hv.get("recovery_timeout", RECOVERY_TIMEOUT)
    if (isinstance(recovery, bool) or not isinstance(recovery, (int, float))
            or not math.isfinite(recovery) or not 0.5 <= recovery <= 3600):  # fmt: skip
        raise ConfigError("[hypervisor] recovery_timeout must be a number of seconds from 0.5 "
                          "to 3600")  # fmt: skip

    services = []
    for entry in _table_list(doc, "paging_service"):
        name = _name(entry, "name", "[[paging_service]]")
        _unknown_keys(entry, {"name", "restart", "timeout"}, f"paging service {name!r}")
        restart = entry.get("restart", False)
        if not isinstance(restart, bool):
            raise ConfigError(f"paging service {name!r}: restart must be true or false")
        timeout = entry.get("timeout", 10.0)
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not math.isfinite(timeout) or not TIMEOUT[0] <= timeout <= TIMEOUT[1]):
            raise ConfigError(f"paging service {name!r}: timeout must be a number of seconds "
                              f"from {TIMEOUT[0]:g} to {TIMEOUT[1]:g}")  # fmt: skip
        services.append(ServiceConfig(name, restart, float(timeout)))
    if not services:
        raise ConfigError("at least one [[paging_service]] is required")
    service_names = [s.name for s in services]
    _unique(service_names, "paging service")

    raw_devices = _table_list(doc, "device")
    _unique([_name(d, "id", "[[device]]") for d in raw_devices], "device")
    devices = [parse_device(d, run_dir, service_names) for d in raw_devices]
    paths = [d.identity for d in devices]
    for i, p in enumerate(paths):
        if p in paths[:i]:
            raise ConfigError(f"device {devices[i].id!r}: path {devices[i].path} is used twice")

    raw_parts = _table_list(doc, "partition")  # (none: a system that waits for partitions)
    parts = [parse_partition(p, service_names, run_dir) for p in raw_parts]
    _unique([p["name"] for p in parts], "partition")

    by_id = {d.id: d for d in devices}
    taken: dict[str, str] = {}
    # explicit assignments first, then the best fit for the rest
    for p in sorted(parts, key=lambda p: p["device"] is None):
        taken[assign_device(p, by_id, taken).id] = p["name"]
    available = available_memory()
    need = pool_size
    for p in parts:
        check_metadata(p["name"], p["memory"], by_id[p["device"]].size, available)
        need += metadata_bytes(p["memory"] // PAGE_SIZE, by_id[p["device"]].size // PAGE_SIZE)
    if need > available:
        raise ConfigError(f"the pool ({human_size(pool_size)}) and the partitions' metadata "
                          f"({human_size(need - pool_size)}) need more memory than this machine "
                          f"can give ({human_size(available)} available)")  # fmt: skip
    return Config(pool_size, services, devices, [PartitionConfig(**p) for p in parts], poll_us,
                  hv_restart, float(recovery), admin_group)  # fmt: skip


def assign_device(p: dict, devices: dict[str, DeviceConfig], taken: dict[str, str]) -> DeviceConfig:
    """The device for partition p: the one it names, or else the smallest free
    one that fits and that all its paging services reach.  Sets p["device"];
    `taken` maps device ids in use to their partitions."""
    if p["device"] is not None:
        dev = devices.get(p["device"])
        if dev is None:
            raise ConfigError(f"partition {p['name']!r}: unknown device {p['device']!r}")
        if dev.id in taken:
            raise ConfigError(f"partition {p['name']!r}: device {dev.id!r} is already "
                              f"assigned to partition {taken[dev.id]!r}")  # fmt: skip
        _check_fit(p, dev)
        return dev
    fits = [d for d in devices.values() if d.id not in taken and d.size >= p["memory"]
            and all(s in d.services for s in p["paging"])]  # fmt: skip
    if not fits:
        raise ConfigError(f"partition {p['name']!r}: no free device of at least "
                          f"{format_size(p['memory'])} reachable by {', '.join(p['paging'])}")
    dev = min(fits, key=lambda d: d.size)
    p["device"] = dev.id
    return dev


def _check_fit(p: dict, dev: DeviceConfig) -> None:
    if dev.size < p["memory"]:
        raise ConfigError(f"partition {p['name']!r}: device {dev.id!r} ({format_size(dev.size)}) "
                          f"is smaller than its memory ({format_size(p['memory'])})")
    for s in p["paging"]:
        if s not in dev.services:
            raise ConfigError(f"partition {p['name']!r}: paging service {s!r} cannot reach "
                              f"device {dev.id!r}")


def load_config(path: str | os.PathLike, run_dir: Path) -> Config:
    """Read and validate a TOML config file."""
    try:  # (O_NONBLOCK: a FIFO with no writer must not hang the open)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file; not a config file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {format_size(MAX_CONFIG_BYTES)}; not a config file")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); not a config file") from None
    return load_config_text(text, run_dir, str(path))


def load_config_text(text: str, run_dir: Path, source: str = "config") -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid TOML: nested too deeply") from None
    return parse_config(doc, Path(run_dir))


#: The embedded default that ``pyhv demo`` runs: a pool four times smaller
#: than its two partitions' memory together.
DEMO_CONFIG = """
[pool]
size = "8MiB"

[[paging_service]]
name = "vios1"

[[device]]
id = "pgdev0"
path = "pg0.img"
size = "16MiB"

[[device]]
id = "pgdev1"
path = "pg1.img"
size = "16MiB"

[[partition]]
name = "lpar1"
memory = "16MiB"
paging = ["vios1"]

[[partition]]
name = "lpar2"
memory = "16MiB"
paging = ["vios1"]
"""
