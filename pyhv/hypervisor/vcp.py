"""The live control point: the config file's operations on a running system.

Each operation is validated completely before anything changes; a refusal is
a :class:`Refused` with a one-line reason, and the command
line exits 2 on it.  Operations that take time (shrinking the pool, removing
a partition, stopping or switching a paging service) answer when done.

The handlers run in the hypervisor's loop; each takes (hv, conn, msg) and
returns a reply dict, or None when it will answer later through hv.reply.
"""

from __future__ import annotations

import json
import logging
import math
import os

from pyhv.config import ConfigError, DeviceConfig, PartitionConfig, assign_device, \
    available_memory, check_metadata, check_pool_size, format_size, parse_device, parse_pages, \
    parse_partition  # fmt: skip
from pyhv import owners, wire
from pyhv.hypervisor import victims
from pyhv.hypervisor.partition import CLEAN, DIRTY
from pyhv.stream import FLOWING
from pyhv.uffd import PAGE_SIZE

log = logging.getLogger("pyhv.hypervisor.vcp")

def handlers(hv) -> dict:
    ops = {
        "pool_resize": pool_resize,
        "partition_add": partition_add,
        "partition_remove": partition_remove,
        "partition_list": partition_list,
        "partition_suspend": partition_suspend,
        "partition_resume": partition_resume,
        "device_add": device_add,
        "device_remove": device_remove,
        "device_list": device_list,
        "service_start": service_start,
        "service_stop": service_stop,
        "service_list": service_list,
        "service_switch": service_switch,
    }
    return {name: (lambda conn, msg, fds, fn=fn: (fn(hv, conn, msg), ())) for name, fn in ops.items()}


class Refused(Exception):
    """A control-point operation that is not valid now; nothing was changed."""


def _str(msg: dict, key: str) -> str:
    v = msg.get(key)
    if not isinstance(v, str) or not v:
        raise Refused(f"{key} is required")
    return v


def _known(table: dict, key: str, what: str):
    """table[key], or a refusal naming the unknown `what`."""
    item = table.get(key)
    if item is None:
        raise Refused(f"unknown {what} {key!r}")
    return item


def _config_errors(fn, *args):
    try:
        return fn(*args)
    except ConfigError as e:
        raise Refused(str(e)) from None


def named_partition(hv, msg: dict):
    """The partition an operation names, on a system that is not stopping,
    and not held still for a snapshot."""
    _no_stop(hv)
    part = _known(hv.by_name, _str(msg, "name"), "partition")
    if part.saving is not None:
        raise Refused(f"partition {part.name!r}: a snapshot of it is being saved")
    return part


def no_workers(part) -> None:
    if part.workers:
        raise Refused(f"partition {part.name!r} has {len(part.workers)} live worker(s)")


def writable(part) -> None:
    """Its pages can be written out now (suspend, export)."""
    if part.stream.service is None or part.stream.state not in FLOWING:
        raise Refused(f"partition {part.name!r}: its stream is {part.stream.state}: its pages "
                      "cannot be written out now")  # fmt: skip


def _no_stop(hv) -> None:
    if hv.stopping:
        raise Refused("the system is shutting down")


# --- pool ------------------------------------------------------------------------------------


def pool_resize(hv, conn, msg):
    """Grow at once; shrink by evicting down to the new size first."""
    _no_stop(hv)
    new = _config_errors(parse_pages, msg.get("size"), "pool size") // PAGE_SIZE
    pool = hv.engine.pool()
    # growing takes memory (the frames in use now are the machine's already);
    # shrinking never does
    room = available_memory() + pool["used"] * PAGE_SIZE if new > pool["pages"] else math.inf
    _config_errors(check_pool_size, new, "pool size", room)
    if new < pool["used"]:
        # what cannot be evicted now: pages in flight, and dirty pages of
        # partitions whose stream has no service to write them to
        evictable = 0
        for part in hv.partitions:
            counts = hv.engine.state_counts(part.eng)
            evictable += counts[CLEAN] + (counts[DIRTY] if part.stream.service else 0)
        stuck = pool["used"] - evictable
        if new < stuck:
            raise Refused(f"cannot shrink the pool to {new} pages: {stuck} resident pages "
                           "cannot be evicted now (in flight, or dirty with no paging service)")
    old = pool["pages"]
    hv.engine.pool_resize(new, victims.reserve(new))
    log.info("pool: %d -> %d pages", old, new)
    if new >= old:
        return {"ok": True, "pages": new, "old_pages": old}
    hv.replenish()
    hv.after(lambda: hv.engine.pool()["used"] <= new,
             lambda: hv.reply(conn, {"ok": True, "pages": new, "old_pages": old}))  # fmt: skip
    return None


# --- partitions ----------------------------------------------------------------------------------


def partition_add(hv, conn, msg):
    _no_stop(hv)
    entry = {k: msg[k] for k in ("name", "memory", "paging", "device", "snapshot", "prefetch",
                                 "owner", "group") if msg.get(k) is not None}  # fmt: skip
    p = _config_errors(parse_partition, entry, list(hv.services))
    if p["name"] in hv.by_name:
        raise Refused(f"partition {p['name']!r} exists already")
    taken = {part.device.id: part.name for part in hv.partitions}
    dev = _config_errors(assign_device, p, hv.devices, taken)
    _config_errors(check_metadata, p["name"], p["memory"], dev.size)
    if not any(hv.services[n].running for n in p["paging"]):
        raise Refused(f"partition {p['name']!r}: no paging service of {', '.join(p['paging'])} "
                       "is running")  # fmt: skip
    part = hv.add_partition(PartitionConfig(**p), dev)

    def opened():
        s = part.stream
        if s.service is None:
            hv.remove_partition(part)
            hv.reply(conn, {"ok": False, "refused": True, "error": f"partition {part.name!r}: "
                            f"device {dev.id!r} cannot be opened by {', '.join(s.paging)}"})
        else:
            warning = owners.uffd_warning(part.name, part.cfg.owner, part.cfg.group)
            hv.reply(conn, {"ok": True, "partition": part.status(),
                            **({"warnings": [warning]} if warning else {})})  # fmt: skip

    hv.after(lambda: part.stream.state in ("ENABLED", "RESUMED") or part.stream.service is None,
             opened)  # fmt: skip
    return None


def partition_remove(hv, conn, msg):
    part = named_partition(hv, msg)
    if part.state in ("suspending", "exporting"):
        raise Refused(f"partition {part.name!r} is {part.state}")
    no_workers(part)
    def busy() -> bool:  # paging in flight or waiting: Python's requests, the engine's pages
        return bool(part.stream.busy or hv.engine.stream_busy(part.eng)
                    or hv.engine.stats(part.eng)["pending"])  # fmt: skip

    if part.stream.service is None and busy():
        raise Refused(f"partition {part.name!r} has paging waiting for a paging service; "
                       f"start one of {', '.join(part.stream.paging)} first")  # fmt: skip
    hv.after(lambda: not busy(),
             lambda: (hv.remove_partition(part),
                      hv.reply(conn, {"ok": True, "removed": part.name})))  # fmt: skip
    return None


def partition_suspend(hv, conn, msg):
    """Stop the workers, write every page out, free every frame; answers once done."""
    part = named_partition(hv, msg)
    if part.state != "active":
        raise Refused(f"partition {part.name!r} is {part.state} already")
    writable(part)
    unnamed = [w for w in part.workers.values() if not w.pid]
    if unnamed:
        raise Refused(f"partition {part.name!r}: {len(unnamed)} child(ren) of its workers not "
                      "known by pid yet (they cannot be stopped); try again")  # fmt: skip
    hv.suspend_partition(part, lambda reply: hv.reply(conn, reply))
    return None


def partition_resume(hv, conn, msg):
    part = named_partition(hv, msg)
    if part.state in ("active", "exporting"):
        raise Refused(f"partition {part.name!r} is {part.state}, not suspended")
    return hv.resume_partition(part, prefetch=msg.get("prefetch", True) is not False)


def partition_list(hv, conn, msg):
    mine = hv.visible(conn, [p.name for p in hv.partitions])
    return {"ok": True, "partitions": [p.status() for p in hv.partitions if p.name in mine]}


# --- devices -----------------------------------------------------------------------------------


def device_add(hv, conn, msg):
    _no_stop(hv)
    entry = {k: msg[k] for k in ("id", "path", "size", "services", "tls_psk", "io_timeout")
             if msg.get(k) is not None}  # fmt: skip
    if msg.get("id") in hv.devices:  # (before an NBD server is asked anything)
        raise Refused(f"device {msg['id']!r} exists already")
    dev: DeviceConfig = _config_errors(parse_device, entry, hv.run_dir, list(hv.services))
    for other in hv.devices.values():
        if other.identity == dev.identity:
            raise Refused(f"device {dev.id!r}: {dev.path} is device {other.id!r} already")
    hv.lock_device(dev)  # refuses a device another system uses
    hv.devices[dev.id] = dev
    log.info("device %s: added (%s %s, %s, services %s)", dev.id, dev.kind, dev.path,
             format_size(dev.size), ", ".join(dev.services))  # fmt: skip
    return {"ok": True, "device": device_row(hv, dev)}


def device_remove(hv, conn, msg):
    _no_stop(hv)
    dev = _known(hv.devices, _str(msg, "id"), "device")
    user = next((p.name for p in hv.partitions if p.device is dev), None)
    if user is not None:
        raise Refused(f"device {dev.id!r} serves partition {user!r}")
    hv.unlock_device(dev)
    del hv.devices[dev.id]
    log.info("device %s: removed", dev.id)
    return {"ok": True, "removed": dev.id}


def device_row(hv, dev) -> dict:
    part = next((p for p in hv.partitions if p.device is dev), None)
    active = part.stream.service.name if part and part.stream.service else None
    from pyhv.nbd import redact

    return {"id": dev.id, "path": redact(str(dev.path)), "type": dev.kind, "size_bytes": dev.size,
            "direct": dev.direct, "services": dev.services,
            "paths": {s: redact(dev.path_for(s)) for s in dev.services},
            "io_timeout": dev.io_timeout, "claim": hv.claims.status(dev.id),
            "partition": part.name if part else None,
            "paging": part.stream.paging if part else [],
            "active_service": active,
            "stream": part.stream.state if part else None,
            "bad_slots": part.slots.unusable if part else 0,
            "machine_checks": part.counters["machine_checks"] if part else 0,
            "health": "degraded" if part and (part.slots.unusable or part.counters["io_errors"])
                      else "ok"}  # fmt: skip


def device_list(hv, conn, msg):
    """Every device, with what its paging service reports of it (QUERY) where
    a stream to it flows now."""
    rows = [device_row(hv, d) for d in hv.devices.values()]
    asked = []
    for row in rows:
        part = hv.by_name.get(row["partition"] or "")
        if part is None or part.stream.state not in ("ENABLED", "RESUMED"):
            row["query"] = None
            continue

        def answered(status, count, data, row=row):
            row["query"] = json.loads(bytes(data)) if status == 0 else {
                "error": os.strerror(-status)}  # fmt: skip
            asked.remove(row["id"])

        asked.append(row["id"])
        part.stream.submit(wire.OP_QUERY, 0, 0, None, answered)
    hv.after(lambda: not asked, lambda: hv.reply(conn, {"ok": True, "devices": rows}))
    return None


# --- paging services -------------------------------------------------------------------------------


def service_start(hv, conn, msg):
    _no_stop(hv)
    svc = _known(hv.services, _str(msg, "name"), "paging service")
    if svc.state in ("starting", "running", "stopping"):
        raise Refused(f"paging service {svc.name!r} is {svc.state} already")
    hv.start_service(svc)
    hv.after(lambda: svc.state != "starting",  # answer once it serves (or died)
             lambda: hv.reply(conn, {"ok": svc.state != "dead", "service": svc.status(),
                                     **({} if svc.state != "dead" else
                                        {"error": f"paging service {svc.name!r} did not start"})}))
    return None


def service_stop(hv, conn, msg):
    _no_stop(hv)
    svc = _known(hv.services, _str(msg, "name"), "paging service")
    if not svc.running:
        raise Refused(f"paging service {svc.name!r} is {svc.state}")
    moved = {s.name: s for s in svc.streams()}
    hv.stop_service(svc, then=lambda: hv.reply(conn, {
        "ok": True, "service": svc.status(),
        "streams": {n: {"state": s.state, "service": s.service.name if s.service else None}
                    for n, s in moved.items()}}))  # fmt: skip
    return None


def service_list(hv, conn, msg):
    return {"ok": True, "services": [s.status() for s in hv.services.values()]}


def service_switch(hv, conn, msg):
    _no_stop(hv)
    part = _known(hv.by_name, _str(msg, "partition"), "partition")
    stream = part.stream
    if len(stream.paging) < 2:
        raise Refused(f"partition {part.name!r} has no redundant paging service")
    current = stream.service
    if current is None or current.state != "running" or stream.state not in ("ENABLED", "RESUMED"):
        raise Refused(f"partition {part.name!r}: its stream is {stream.state}"
                       + (f" on {current.name} ({current.state})" if current else ""))
    other = hv.services[next(n for n in stream.paging if n != current.name)]
    if other.state != "running":
        raise Refused(f"paging service {other.name!r} is {other.state}")

    def moved():
        if stream.service is None:  # suspended on `current`: it goes to `other` now
            if not other.running:  # it went away meanwhile: the stream goes where it can
                hv.place(stream)
                hv.reply(conn, {"ok": False, "refused": True, "error": f"paging service "
                                f"{other.name!r} went away during the switch"})  # fmt: skip
                return
            hv.bind(stream, other)
        # (else `current` failed during the switch, and the stream failed over
        # already: it is bound, and opens, where the failover put it)

        def settled() -> bool:  # open and flowing, or with nowhere to go
            return stream.state == "RESUMED" or (stream.state == "ABORTED"
                                                 and stream.service is None)  # fmt: skip

        hv.after(settled, lambda: hv.reply(conn, {
            "ok": stream.state == "RESUMED", "partition": part.name, "from": current.name,
            "to": stream.service.name if stream.service else other.name,
            "state": stream.state,
            **({} if stream.state == "RESUMED" else
               {"error": f"partition {part.name!r}: no paging service could take its stream"})}))


    hv.suspend(stream, "SUSPENDED", moved)
    return None
