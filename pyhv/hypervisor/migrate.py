"""Migration through a shared paging device (AMS's Live Partition Mobility,
for a partition with no worker): `pyhv partition export NAME DIR` on one
system, `pyhv partition import DIR [--as NAME]` on another.

Export writes every dirty page out (as suspend does), flushes the device,
and writes DIR: meta.json (the partition's definition and its device) and
table.bin (each page's state, slot and CRC32).  Only once DIR is complete
(written beside its name, synced, renamed into place) is the partition
removed and the device let go: its lock (flock) passes to whoever imports.
Import takes the device's lock first (refused while the exporting system
still holds it), then makes the partition with the page table as it was:
the pages stay on the device and come in on first touch.  A partition is
never live on two systems: the lock is on the device itself.
"""

from __future__ import annotations

import array
import json
import logging
import os
import shutil
from pathlib import Path

from pyhv import nbd, wire
from pyhv.config import ConfigError, PartitionConfig, check_metadata, parse_device, parse_partition
from pyhv.hypervisor.partition import Partition
from pyhv.hypervisor.vcp import Refused, named_partition, no_workers, writable
from pyhv.uffd import PAGE_SIZE

log = logging.getLogger("pyhv.hypervisor")

FORMAT = "pyhv-export"
VERSION = 1


def _write_dir(out: Path, meta: dict, table: bytes) -> None:
    """DIR whole or not at all: written beside it, synced, renamed."""
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        for name, data in (("table.bin", table), ("meta.json", json.dumps(meta, indent=1)
                                                   .encode() + b"\n")):  # fmt: skip
            with open(partial / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.rename(partial, out)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


class MigrationRoom:
    """Mixed into the Hypervisor: exporting and importing partitions."""

    def migration_handlers(self) -> dict:
        return {"partition_export": self.op_export, "partition_import": self.op_import}

    def op_export(self, conn, msg, fds):
        part = named_partition(self, msg)
        no_workers(part)
        if part.state in ("suspending", "exporting"):
            raise Refused(f"partition {part.name!r} is {part.state}")
        writable(part)
        d = msg.get("dir")
        if not isinstance(d, str) or not os.path.isabs(d):
            raise wire.ProtocolError("dir must be an absolute path")
        out = Path(d)
        if not out.parent.is_dir():
            raise Refused(f"{out.parent} is not a directory")
        if out.exists():
            raise Refused(f"{out} exists already")

        before = part.state

        def suspended(reply: dict) -> None:
            if not reply.get("ok"):
                self.reply(conn, reply)
                return
            part.state = "exporting"  # (no resume, attach, removal or save from now on)
            part.stream.submit(wire.OP_FLUSH, 0, 0, None,
                               lambda status, *a: flushed(status))  # fmt: skip

        def flushed(status: int) -> None:
            if part.eng is None or part.workers:
                self._undo_export(part, before)
                self.reply(conn, {"ok": False, "error": f"partition {part.name!r} not exported: "
                                  "it was removed or attached meanwhile"})  # fmt: skip
                return
            if status:
                self._undo_export(part, before)
                self.reply(conn, {"ok": False, "error": f"partition {part.name!r} not "
                                  f"exported: the device's flush failed ({os.strerror(-status)})"})
                return
            state, slot, crc = self.engine.table(part.eng, part.pages)
            dev = part.device
            meta = {"format": FORMAT, "version": VERSION,
                    "partition": {"name": part.name, "memory": part.cfg.memory,
                                  "paging": part.cfg.paging, "isolation": part.cfg.isolation,
                                  "weight": part.cfg.weight, "snapshot": part.cfg.snapshot,
                                  "owner": part.cfg.owner, "group": part.cfg.group},
                    "device": {"id": dev.id, "size": dev.size, "direct": dev.direct,
                               "path": (dev.uris if len(dev.uris) > 1 else dev.uris[0])
                               if dev.kind == "nbd" else str(Path(dev.path).resolve()),
                               "tls_psk": dev.tls_psk, "io_timeout": dev.io_timeout},
                    "pages": part.pages, "working_set": part.working_set or []}  # fmt: skip
            try:
                _write_dir(out, meta, state + slot + crc)
            except OSError as e:
                self._undo_export(part, before)
                self.reply(conn, {"ok": False, "error": f"partition {part.name!r} not "
                                  f"exported: {out}: {e.strerror}"})  # fmt: skip
                return
            # DIR is complete: only now does the partition go, and the device with it
            self.remove_partition(part)
            self.unlock_device(dev)
            self.devices.pop(dev.id, None)
            log.info("partition %s: exported to %s (device %s let go)", part.name, out, dev.id)
            self.reply(conn, {"ok": True, "exported": part.name, "dir": str(out),
                              "device": str(dev.path), "pages": part.pages})  # fmt: skip

        self.suspend_partition(part, suspended)
        return None, ()

    def _undo_export(self, part: Partition, before: str) -> None:
        if part.eng is not None:  # as it was: suspended, or active with no worker
            part.state = "suspended" if before == "suspended" else "active"
            if part.state == "active":
                part.working_set = None

    def op_import(self, conn, msg, fds):
        if self.stopping:
            raise Refused("the system is shutting down")
        d = msg.get("dir")
        if not isinstance(d, str) or not os.path.isabs(d):
            raise wire.ProtocolError("dir must be an absolute path")
        try:
            meta = json.loads((Path(d) / "meta.json").read_text())
            table = (Path(d) / "table.bin").read_bytes()
            p, dv, pages = meta["partition"], meta["device"], meta["pages"]
            if meta.get("format") != FORMAT or not isinstance(pages, int) or (
                    len(table) != 13 * pages):  # fmt: skip
                raise ValueError("not a complete export")
            nbd_dev = isinstance(dv["path"], list) or nbd.is_uri(dv["path"])
            if not nbd_dev and (not isinstance(dv["path"], str) or not os.path.isabs(dv["path"])):
                raise ValueError("no device path")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Refused(f"{d} is no pyhv export ({getattr(e, 'strerror', None) or e})") from None
        name = msg.get("as") or p.get("name")
        if name in self.by_name:
            raise Refused(f"partition {name!r} exists already")
        services = [s for s in p.get("paging", []) if s in self.services] or [
            next(iter(self.services))]  # fmt: skip
        if not nbd_dev and not os.path.exists(dv["path"]):
            raise Refused(f"import of {d}: its device {dv['path']} cannot be reached from here")
        try:  # (every field as `partition add` would check it)
            entry = {k: p.get(k) for k in ("memory", "isolation", "weight", "snapshot", "owner",
                                           "group")
                     if p.get(k) is not None}  # fmt: skip
            pc = parse_partition({**entry, "name": name, "paging": services, "prefetch": False},
                                 list(self.services), Path("/"))  # fmt: skip
            if pc["memory"] != pages * PAGE_SIZE:
                raise ConfigError(f"its page table has {pages} pages, its memory "
                                  f"{pc['memory']} bytes")  # fmt: skip
            dev_id = dv.get("id") if dv.get("id") not in self.devices else f"{name}-dev"
            extra = {k: dv[k] for k in ("tls_psk", "io_timeout") if dv.get(k) is not None}
            dev = parse_device({"id": dev_id, "path": dv["path"], "size": dv["size"],
                                "services": services, **extra}, self.run_dir,
                               list(self.services))  # fmt: skip
            check_metadata(name, pc["memory"], dev.size)
        except (ConfigError, KeyError, TypeError, AttributeError) as e:
            raise Refused(f"import of {d}: {e}") from None
        if any(x.identity == dev.identity for x in self.devices.values()):
            raise Refused(f"device {dev.path} is this system's already")
        self.lock_device(dev)  # refused while the exporting system holds it
        self.devices[dev.id] = dev
        part = None
        try:
            part = self.add_partition(PartitionConfig(**{**pc, "device": dev.id}), dev)
            state = array.array("B", table[:pages])
            slot = array.array("q", table[pages : 9 * pages])
            crc = array.array("I", table[9 * pages :])
            if self.engine.part_import(part.eng, state, slot, crc):
                raise Refused(f"import of {d}: its page table does not fit device {dev.path}")
        except BaseException:
            if part is not None:
                self.remove_partition(part)
            self.unlock_device(dev)
            del self.devices[dev.id]
            raise
        try:  # an export is taken once: its page table is stale as soon as pages are written
            os.rename(Path(d) / "meta.json", Path(d) / "meta.imported.json")
        except OSError as e:
            log.warning("partition %s: %s could not be marked imported: %s", name, d, e.strerror)

        def opened():
            if part.stream.service is None:
                self.reply(conn, {"ok": False, "error": f"partition {name!r}: its device cannot "
                                  f"be opened by {', '.join(services)}"})  # fmt: skip
            else:
                log.info("partition %s: imported from %s", name, d)
                self.reply(conn, {"ok": True, "imported": name, "partition": part.status()})

        self.after(lambda: part.stream.state in ("ENABLED", "RESUMED")
                   or part.stream.service is None, opened)  # fmt: skip
        return None, ()
