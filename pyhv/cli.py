"""The ``pyhv`` command line: the control point.

Errors in what the user gave (config, arguments, names) print one line on
stderr and exit 2, before anything is started; a system that is not there or
fails at run time exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from pyhv.config import ConfigError, human_size
from pyhv.hypervisor import ERROR_LOG
from pyhv.system import EXIT_FAIL, EXIT_USAGE, Fail, running_pid, control, spawn_workers, \
    start_system, stop_system, wait_workers  # fmt: skip

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise Fail(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


def _run_dir(args, must_exist: bool = True) -> str:
    run_dir = args.run_dir or os.environ.get("PYHV_RUN_DIR")
    if not run_dir:
        raise Fail("--run-dir is required (or set PYHV_RUN_DIR)", EXIT_USAGE)
    run_dir = os.path.abspath(run_dir)
    if must_exist and not os.path.isdir(run_dir):
        raise Fail(f"run directory {run_dir} does not exist", EXIT_USAGE)
    return run_dir


# --- up ------------------------------------------------------------------------


def cmd_up(args) -> int:
    run_dir = _run_dir(args, must_exist=False)
    return start_system(args.config, run_dir, args.detach)


# --- run -------------------------------------------------------------------------


def cmd_run(args) -> int:
    run_dir = _run_dir(args)
    cmd = args.command
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise Fail("run: no command given (pyhv run ... -- CMD [ARG...])", EXIT_USAGE)
    if args.workers < 1:
        raise Fail("run: --workers must be at least 1", EXIT_USAGE)
    reply = control(run_dir, {"op": "partition", "name": args.partition})
    if not reply.get("ok"):
        raise Fail(reply.get("error", "unknown partition"), EXIT_USAGE)
    procs = spawn_workers(run_dir, args.partition, args.workers, cmd)

    def forward(signum, frame):
        for p in procs:
            if p.returncode is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return wait_workers(procs)


# --- status and shutdown -------------------------------------------------------------------


def format_status(st: dict) -> str:
    if st.get("restricted"):  # (a user's view: its own partitions)
        return "\n".join([
            f"hypervisor pid {st['pid']}  {st['state']}  up {st['uptime']:.0f}s  run dir "
            f"{st['run_dir']}  (your partitions only)", "", *_partition_rows(st["partitions"])])
    pool = st["pool"]
    hv = st.get("hypervisor", {})
    if hv.get("supervised"):
        restarts = (f"supervised, {_count(hv['restarts'], 'restart')} after a crash"
                    + (f", {hv['awaiting_rejoin']} workers awaited" if hv["awaiting_rejoin"]
                       else ""))  # fmt: skip
    else:
        restarts = "not supervised (no restart)"
    lines = [
        f"hypervisor pid {st['pid']}  {st['state']}  up {st['uptime']:.0f}s  run dir {st['run_dir']}"
        f"  {restarts}",
        f"pool {human_size(pool['size_bytes'])}: {pool['resident_pages']}/{pool['pages']} pages "
        f"resident (high water {pool['frames_high_water']}), {pool['fault_waiters']} faults "
        "waiting for a frame",
        "",
        *_partition_rows(st["partitions"]),
        "",
    ]
    lines += format_services(st["paging_services"]).splitlines()
    waiting = [p for p in st["partitions"] if p.get("service") is None]
    for p in waiting:
        lines.append(f"  partition {p['name']}: stream {p['stream']}, no paging service "
                     f"(paging waits for {', '.join(p['paging'])})")
    return "\n".join(lines)


def _partition_rows(partitions: list[dict]) -> list[str]:
    lines = [f"{'PARTITION':<12}{'MEMORY':>9}{'RESIDENT':>10}{'FAULTS':>10}{'PAGE-INS':>10}"
             f"{'PAGE-OUTS':>11}{'DROPS':>8}{'LOANED':>8}{'WORKERS':>9}  DEVICE"]
    for p in partitions:
        lines.append(
            f"{p['name']:<12}{human_size(p['memory_bytes']):>9}{p['resident_pages']:>10}"
            f"{p['faults']:>10}{p['page_ins']:>10}{p['page_outs']:>11}{p['clean_drops']:>8}"
            f"{p['loaned_pages']:>8}{len(p['workers']):>9}  {p['device']}"
        )
    return lines


def format_services(services: list[dict]) -> str:
    lines = [f"{'SERVICE':<12}{'PID':>8}  {'STATE':<9}{'ROLE':<9}{'IN-FLIGHT':>10}{'DEATHS':>8}"]
    for s in services:
        lines.append(f"{s['name']:<12}{s['pid'] or '-':>8}  {s['state']:<9}{s['role'] or '-':<9}"
                     f"{s['in_flight']:>10}{s['deaths']:>8}")
        for x in s["streams"]:
            when = time.strftime("%H:%M:%S", time.localtime(x["last_transition"]))
            lines.append(f"    stream {x['partition']:<12}{x['state']:<11}transitions "
                         f"{x['transition_count']}, last at {when}, {x['in_flight']} in flight"
                         + (f", {len(x['failovers'])} failover(s)" if x["failovers"] else ""))
    return "\n".join(lines)


def cmd_status(args) -> int:
    run_dir = _run_dir(args)
    st = control(run_dir, {"op": "status"})
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def cmd_shutdown(args) -> int:
    run_dir = _run_dir(args)
    r = stop_system(run_dir)
    parts, services = r.get("partitions", []), r.get("paging_services", [])
    names = ", ".join(parts[:8]) + (f", ... ({len(parts) - 8} more)" if len(parts) > 8 else "")
    return _emit(args, r, f"stopped the hypervisor (pid {r.get('pid')}) in {run_dir}: "
                 f"{_count(len(parts), 'partition')} ({names or '-'}), "
                 f"{_count(r.get('workers', 0), 'worker')} detached, paging services "
                 f"{', '.join(services) or '-'} stopped")  # fmt: skip


def _op(args, msg: dict, timeout: float = 120.0) -> dict:
    """A control-point operation: refusals are one line and exit 2."""
    reply = control(_run_dir(args), msg, timeout)
    if not reply.get("ok"):
        raise Fail(reply.get("error", "refused"), EXIT_USAGE)
    return reply


def _emit(args, reply: dict, text: str) -> int:
    print(json.dumps(reply, indent=2) if args.json else text)
    for w in reply.get("warnings", ()):
        print(f"pyhv: warning: {w}", file=sys.stderr)
    return 0


def _page_list(value: str) -> list[int]:
    try:
        pages = [int(p) for p in value.split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of page numbers") from None
    if not pages or min(pages) < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of page numbers")
    return pages


def _above_zero(kind, what: str, most: float = float("inf")):
    """An argument type: a number of this kind (int, float) above 0, at most `most`."""

    def parse(value: str):
        try:
            x = kind(value)
        except ValueError:
            x = 0
        if not 0 < x <= most:  # (nor nan)
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return x

    return parse


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in value.split(",") if v]


def _bench_names(value: str) -> list[str]:
    """An argument type: workloads of pyhv bench, comma-separated."""
    from pyhv.benchmark import NAMES

    names = _names(value)
    if not names or set(names) - set(NAMES):
        raise argparse.ArgumentTypeError(f"{value!r}: choose among {','.join(NAMES)}")
    return names


def cmd_pool_resize(args) -> int:
    r = _op(args, {"op": "pool_resize", "size": args.size})
    return _emit(args, r, f"pool: {r['old_pages']} -> {r['pages']} pages "
                          f"({human_size(r['pages'] * 4096)})")  # fmt: skip


def format_partitions(parts: list[dict]) -> str:
    lines = [f"{'PARTITION':<12}{'STATE':<11}{'MEMORY':>9}{'RESIDENT':>10}  {'DEVICE':<10}"
             f"{'PAGING':<14}{'SERVICE':<10}{'STREAM':<11}WORKERS"]  # fmt: skip
    for p in parts:
        lines.append(f"{p['name']:<12}{p['state']:<11}{human_size(p['memory_bytes']):>9}"
                     f"{p['resident_pages']:>10}  {p['device']:<10}{','.join(p['paging']):<14}"
                     f"{p['service'] or '-':<10}{p['stream']:<11}{len(p['workers'])}")
    return "\n".join(lines)


def cmd_partition(args) -> int:
    if args.action == "list":
        r = _op(args, {"op": "partition_list"})
        return _emit(args, r, format_partitions(r["partitions"]))
    if args.action == "add":
        snap = os.path.abspath(args.from_snapshot) if args.from_snapshot else None
        r = _op(args, {"op": "partition_add", "name": args.name, "memory": args.memory,
                       "paging": _names(args.paging), "device": args.device,
                       "snapshot": snap, "prefetch": not args.no_prefetch,
                       "owner": args.owner, "group": args.group})  # fmt: skip
        return _emit(args, r, format_partitions([r["partition"]]))
    if args.action == "export":
        r = _op(args, {"op": "partition_export", "name": args.name,
                       "dir": os.path.abspath(args.dir)}, timeout=3600)  # fmt: skip
        return _emit(args, r, f"partition {r['exported']}: exported to {r['dir']} "
                     f"({r['pages']} pages; device {r['device']} let go)")  # fmt: skip
    if args.action == "import":
        r = _op(args, {"op": "partition_import", "dir": os.path.abspath(args.dir),
                       "as": args.as_name})  # fmt: skip
        return _emit(args, r, format_partitions([r["partition"]]))
    if args.action == "suspend":
        r = _op(args, {"op": "partition_suspend", "name": args.name}, timeout=3600)
        return _emit(args, r, f"partition {r['partition']}: suspended in {r['seconds']:.3f}s "
                     f"({r['workers_stopped']} worker(s) stopped, {r['pages_written']} pages "
                     f"written out, {r['clean_dropped']} clean pages dropped; working set "
                     f"{r['working_set_pages']} pages)")  # fmt: skip
    if args.action == "resume":
        r = _op(args, {"op": "partition_resume", "name": args.name,
                       "prefetch": not args.no_prefetch})  # fmt: skip
        return _emit(args, r, f"partition {r['partition']}: resumed; {r['read_ahead_pages']} "
                     "pages of its working set being read back")  # fmt: skip
    r = _op(args, {"op": "partition_remove", "name": args.name})
    return _emit(args, r, f"partition {r['removed']}: removed")


def cmd_snapshot(args) -> int:
    from pyhv import snapshot

    r = snapshot.save(_run_dir(args), args.name, args.dir, progress=not args.json)
    return _emit(args, r, f"partition {r['partition']}: {r['pages']} pages saved to {r['dir']} "
                 f"in {r['seconds']:.2f}s (working set {r['working_set_pages']} pages"
                 + (f", {len(r['poisoned'])} lost to machine checks" if r["poisoned"] else "")
                 + ")")  # fmt: skip


def format_devices(devs: list[dict]) -> str:
    lines = [f"{'DEVICE':<10}{'TYPE':<7}{'SIZE':>9}  {'PARTITION':<12}{'SERVICES':<14}"
             f"{'ACTIVE':<10}{'STREAM':<11}{'HEALTH':<10}PATH"]  # fmt: skip
    for d in devs:
        q = d.get("query") or {}
        lines.append(f"{d['id']:<10}{d['type']:<7}{human_size(d['size_bytes']):>9}  "
                     f"{d['partition'] or '-':<12}{','.join(d['services']):<14}"
                     f"{d['active_service'] or '-':<10}{d['stream'] or '-':<11}"
                     f"{q.get('health', '-'):<10}{d['path']}")
    return "\n".join(lines)


def cmd_device(args) -> int:
    if args.action == "list":
        r = _op(args, {"op": "device_list"})
        return _emit(args, r, format_devices(r["devices"]))
    if args.action == "add":
        path = args.path[0] if len(args.path) == 1 else args.path
        r = _op(args, {"op": "device_add", "id": args.id, "path": path, "size": args.size,
                       "services": _names(args.services), "io_timeout": args.io_timeout,
                       "tls_psk": os.path.abspath(args.tls_psk) if args.tls_psk else None})
        return _emit(args, r, format_devices([r["device"]]))
    r = _op(args, {"op": "device_remove", "id": args.id})
    return _emit(args, r, f"device {r['removed']}: removed")


def cmd_service(args) -> int:
    if args.action == "list":
        r = _op(args, {"op": "service_list"})
        return _emit(args, r, format_services(r["services"]))
    if args.action == "start":
        r = _op(args, {"op": "service_start", "name": args.name})
        return _emit(args, r, format_services([r["service"]]))
    if args.action == "stop":
        r = _op(args, {"op": "service_stop", "name": args.name})
        moved = ", ".join(f"{n} {x['state']}" + (f" on {x['service']}" if x["service"] else "")
                          for n, x in r["streams"].items()) or "no streams"  # fmt: skip
        return _emit(args, r, f"paging service {args.name}: stopped; {moved}")
    r = _op(args, {"op": "service_switch", "partition": args.partition})
    return _emit(args, r, f"partition {r['partition']}: {r['from']} -> {r['to']} ({r['state']})")


def format_errors(errors: list[dict]) -> str:
    if not errors:
        return "no machine checks"
    lines = [f"{'TIME':<9}{'PARTITION':<12}{'PAGE':>7}  {'DEVICE':<10}{'ERROR':<10}"
             f"{'ACTION':<16}WORKERS"]  # fmt: skip
    for e in errors:
        when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        lines.append(f"{when:<9}{e['partition']:<12}{e['page']:>7}  {e['device']:<10}"
                     f"{e['error']:<10}{e['action']:<16}"
                     f"{','.join(map(str, e['workers'])) or '-'}")
    return "\n".join(lines)


ERROR_FIELDS = ("partition", "page", "device", "error", "workers", "action", "time")


def read_error_log(path: str) -> list[dict]:
    """The records in a run directory's error log; a torn or foreign line
    (a crash in the middle of a write) is skipped with a warning."""
    errors, bad = [], 0
    try:
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    if isinstance(rec, dict) and all(k in rec for k in ERROR_FIELDS):
                        errors.append(rec)
                        continue
                except ValueError:
                    pass
                bad += line.strip() != ""
    except FileNotFoundError:
        pass
    if bad:
        print(f"pyhv: warning: {path}: {bad} damaged line(s) skipped", file=sys.stderr)
    return errors


def cmd_errors(args) -> int:
    """Machine-check records: from the hypervisor, or its run directory's log."""
    run_dir = _run_dir(args)
    if running_pid(run_dir) is not None:
        errors = _op(args, {"op": "errors"})["errors"]
    else:
        errors = read_error_log(os.path.join(run_dir, ERROR_LOG))
    return _emit(args, {"ok": True, "errors": errors}, format_errors(errors))


def cmd_inject(args) -> int:
    from pyhv import inject

    try:
        if args.action == "corrupt":
            msg = {"op": "slots", "partition": args.partition}
            if args.pages:
                msg["pages"] = args.pages
            r = _op(args, msg)
            n = inject.corrupt(r["device"], [slot for _, slot in r["slots"]])
            return _emit(args, {"ok": True, "device": r["device"], "slots": r["slots"]},
                         f"{n} page(s) of partition {args.partition} overwritten with random "
                         f"bytes in {r['device']}")  # fmt: skip
        if args.action == "faulty-device":
            dev = inject.FaultyDevice(args.dir)
            if args.op == "start":
                from pyhv.config import parse_size

                st = dev.start(parse_size(args.size, "--size"), args.read_error,
                               args.write_error, args.read_rate, args.write_rate)  # fmt: skip
                return _emit(args, {"ok": True, **st}, f"faulty device at {st['path']}; "
                             f"touch {st['read_trigger']} / {st['write_trigger']} to fail "
                             "reads / writes")  # fmt: skip
            if args.op == "stop":
                dev.stop()
            elif args.op == "vanish":
                dev.vanish()
            else:
                on = args.op.endswith("-on")
                dev.fail(**({"reads": on} if args.op.startswith("reads") else {"writes": on}))
            return _emit(args, {"ok": True}, f"{args.dir}: {args.op}")
        if args.remove:
            inject.remove_small_filesystem(args.dir)
            return _emit(args, {"ok": True}, f"{args.dir}: unmounted")
        from pyhv.config import parse_size

        inject.small_filesystem(args.dir, parse_size(args.size or "", "--size"))
        return _emit(args, {"ok": True}, f"tmpfs of {args.size} at {args.dir}")
    except inject.InjectUsage as e:
        raise Fail(str(e), EXIT_USAGE) from None
    except inject.InjectError as e:
        raise Fail(str(e)) from None
    except OSError as e:
        raise Fail(f"inject: {e.strerror}: {e.filename or ''}".rstrip(": ")) from None


def cmd_bench(args) -> int:
    """The standard comparison with the kernel's swap (see pyhv.benchmark)."""
    from pyhv import benchmark

    try:
        r = benchmark.run(args.quick, args.json, args.plot, progress=True, scale=args.scale,
                          only=args.only)  # fmt: skip
    except benchmark.BenchError as e:
        raise Fail(f"bench: {e}") from None
    print(benchmark.format_table(r))
    if r["errors"]:  # a row that could not be measured is no result
        print(f"pyhv: error: bench: {len(r['errors'])} measurement(s) failed (above)",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAIL
    return 0


def cmd_stat(args) -> int:
    """One line of figures an interval (see pyhv.top)."""
    from pyhv import top

    return top.stat(_run_dir(args), args.interval, args.count, args.json)


def cmd_top(args) -> int:
    """The full-screen view (see pyhv.top)."""
    from pyhv import top

    return top.top(_run_dir(args), args.interval)


def cmd_demo(args) -> int:
    from pyhv import demo

    return demo.run(json_output=args.json)


def cmd_soak(args) -> int:
    """A bounded run under chaos (see pyhv.soak)."""
    from pyhv import soak
    from pyhv.config import parse_size

    to_stdout = args.json == "-"
    r = soak.run(args.duration, args.seed, args.partitions,
                 parse_size(args.memory, "--memory"), args.interval, args.chaos_corrupt,
                 args.keep, show=not to_stdout or sys.stderr.isatty())  # fmt: skip
    if to_stdout:
        print(json.dumps(r, indent=2))
    else:
        print(soak.format_report(r))
        if args.json:
            try:
                with open(args.json, "w") as f:
                    json.dump(r, f, indent=2)
            except OSError as e:
                raise Fail(f"soak: cannot write {args.json}: {e.strerror}") from None
    if r["run_dir"]:
        print(f"pyhv: soak: run directory kept: {r['run_dir']}", file=sys.stderr)
    if not r["ok"]:
        raise Fail(f"soak: {r['reason']}")
    return 0


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> Parser:
    ap = Parser(prog="pyhv", description="Paging of Linux process memory by a user-space hypervisor.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    def run_dir_opt(p):
        p.add_argument("--run-dir", help="the system's run directory (or PYHV_RUN_DIR)")

    p = sub.add_parser("up", help="start the hypervisor and its paging services")
    p.add_argument("-c", "--config", required=True, help="TOML config file")
    run_dir_opt(p)
    p.add_argument("--detach", action="store_true", help="return once the system accepts work")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("run", help="run worker processes in a partition")
    run_dir_opt(p)
    p.add_argument("--partition", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="show the pool, partitions and paging services")
    run_dir_opt(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    def interval_opt(p):
        run_dir_opt(p)
        p.add_argument("-i", "--interval", default=1.0, metavar="SECONDS",
                       type=_above_zero(float, "a number of seconds above 0, at most 86400", 86400),
                       help="seconds between samples (default 1)")  # fmt: skip

    p = sub.add_parser("stat", help="pool and paging figures, one line an interval (like vmstat)")
    interval_opt(p)
    p.add_argument("-n", "--count", type=_above_zero(int, "a count of 1 or more"), metavar="COUNT",
                   help="lines to print (default: until interrupted)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser("top", help="full-screen live view: pool, partitions, services, processes")
    interval_opt(p)
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("shutdown", help="stop everything in order")
    run_dir_opt(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_shutdown)

    def json_opt(p):
        run_dir_opt(p)
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("pool", help="the shared memory pool")
    psub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    q = psub.add_parser("resize", help="grow, or shrink after evicting down to the new size")
    q.add_argument("size")
    json_opt(q)
    q.set_defaults(func=cmd_pool_resize)

    p = sub.add_parser("partition", help="add, remove, list, suspend and resume partitions")
    psub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    q = psub.add_parser("add", help="define and activate a partition")
    q.add_argument("name")
    q.add_argument("--memory", required=True)
    q.add_argument("--paging", required=True, help="A[,B]: primary, then a redundant service")
    q.add_argument("--device", help="device id (default: the best-fitting free one)")
    q.add_argument("--from-snapshot", metavar="DIR",
                   help="its pages come from this snapshot (pyhv snapshot save) on first touch")
    q.add_argument("--no-prefetch", action="store_true",
                   help="with --from-snapshot: do not read its working set ahead")
    q.add_argument("--owner", metavar="USER", help="a user who may run workers in it")
    q.add_argument("--group", metavar="GROUP", help="a group whose members may run workers in it")
    json_opt(q)
    q = psub.add_parser("remove", help="deactivate a partition with no live worker")
    q.add_argument("name")
    json_opt(q)
    q = psub.add_parser("export", help="move a partition with no worker out, into DIR (its "
                        "pages stay on its device)")  # fmt: skip
    q.add_argument("name")
    q.add_argument("dir")
    json_opt(q)
    q = psub.add_parser("import", help="take a partition exported into DIR (its device must be "
                        "reachable here)")  # fmt: skip
    q.add_argument("dir")
    q.add_argument("--as", dest="as_name", metavar="NAME", help="under another name")
    json_opt(q)
    q = psub.add_parser("suspend", help="stop its workers, write its pages out, free its frames")
    q.add_argument("name")
    json_opt(q)
    q = psub.add_parser("resume", help="let its workers go on; its working set is read back")
    q.add_argument("name")
    q.add_argument("--no-prefetch", action="store_true", help="do not read its working set back")
    json_opt(q)
    q = psub.add_parser("list")
    json_opt(q)
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("device", help="add, remove and list paging devices")
    psub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    q = psub.add_parser("add", help="assign a paging device")
    q.add_argument("id")
    q.add_argument("path", nargs="+", help="a file, a block device, or an NBD URI (nbd://HOST"
                   "[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds:// with TLS); "
                   "several NBD URIs: one path to the same export a service, in --services order")
    q.add_argument("--size", help="for a file (block devices and NBD exports have their own)")
    q.add_argument("--services", help="A,B: who can reach it (default: every service)")
    q.add_argument("--tls-psk", metavar="FILE", help="NBD over TLS: the pre-shared key file")
    q.add_argument("--io-timeout", type=float, metavar="SECONDS",
                   help="a page-in no path can serve within this is a machine check "
                        "(default: it waits)")
    json_opt(q)
    q = psub.add_parser("remove", help="remove a device that serves no partition")
    q.add_argument("id")
    json_opt(q)
    q = psub.add_parser("list", help="devices, their partitions and services (like lsmap -ams)")
    json_opt(q)
    p.set_defaults(func=cmd_device)

    p = sub.add_parser("service", help="start, stop, list paging services; switch streams")
    psub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    for action, help_ in (("start", "start a paging service (standby if others hold the streams)"),
                          ("stop", "controlled shutdown: complete or move its streams, then exit")):
        q = psub.add_parser(action, help=help_)
        q.add_argument("name")
        json_opt(q)
    q = psub.add_parser("list")
    json_opt(q)
    q = psub.add_parser("switch", help="move a partition's stream to its other paging service")
    q.add_argument("partition")
    json_opt(q)
    p.set_defaults(func=cmd_service)

    p = sub.add_parser("errors", help="machine-check records (pages that could not be paged in)")
    json_opt(p)
    p.set_defaults(func=cmd_errors)

    p = sub.add_parser("inject", help="fault injection on real backing files")
    psub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    q = psub.add_parser("corrupt", help="random bytes over a partition's pages on its device")
    q.add_argument("--partition", required=True)
    q.add_argument("--pages", type=_page_list,
                   help="N,M,...: these pages (default: every page on the device)")
    json_opt(q)
    q = psub.add_parser("faulty-device", help="a device (nbdkit error filter + nbdfuse) that "
                        "fails on demand")  # fmt: skip
    q.add_argument("op", choices=["start", "stop", "reads-on", "reads-off", "writes-on",
                                  "writes-off", "vanish"])  # fmt: skip
    q.add_argument("dir", help="its directory: image, socket, mount point, trigger files")
    q.add_argument("--size", default="64MiB")
    q.add_argument("--read-error", default="EIO")
    q.add_argument("--write-error", default="EIO")
    q.add_argument("--read-rate", default="100%")
    q.add_argument("--write-rate", default="100%")
    q.add_argument("--json", action="store_true")
    q = psub.add_parser("small-fs", help="a tmpfs of a given size (ENOSPC when full)")
    q.add_argument("dir")
    q.add_argument("--size", help="mount, or resize, with this size")
    q.add_argument("--remove", action="store_true")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inject)

    p = sub.add_parser("snapshot", help="save a partition's memory and metadata (mmap-ninja)")
    psub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    q = psub.add_parser("save", help="a suspended partition, or one with no worker, into DIR")
    q.add_argument("name")
    q.add_argument("dir")
    json_opt(q)
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("bench", help="pyhv beside the kernel's swap and a C floor, one run")
    p.add_argument("--quick", action="store_true", help="smaller workloads (well under a minute)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="latency CDFs and workload times")
    p.add_argument("--scale", action="store_true", help="add the scale run: a 16 GiB partition "
                   "in a 1 GiB pool on a sparse device (minutes, ~16 GiB of disk)")  # fmt: skip
    p.add_argument("--only", metavar="NAMES", type=_bench_names,
                   help="these workloads alone, comma-separated: random, sequential, "
                   "scattered, zipf, dataset, lifecycle (suspend, resume, snapshots), nbd "
                   "(the device on an NBD server; these two not in --quick)")  # fmt: skip
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("soak", help="a bounded run of a whole system under chaos, every page "
                       "verified at the end")  # fmt: skip
    p.add_argument("--duration", type=_above_zero(float, "a number of seconds above 0"),
                   default=120.0, metavar="SECONDS", help="how long the chaos goes on "
                   "(default 120; longer if not every kind of action was done yet)")
    p.add_argument("--seed", type=int, help="the chaos schedule's (default: a random one, "
                   "printed)")  # fmt: skip
    p.add_argument("--partitions", type=_above_zero(int, "a count of 1 or more"), default=8,
                   help="partitions of 2-4 workers each (default 8)")  # fmt: skip
    p.add_argument("--memory", default="8MiB", help="each partition's (default 8MiB); the pool "
                   "is a quarter of them together")  # fmt: skip
    p.add_argument("--interval", type=_above_zero(float, "a number of seconds above 0"),
                   default=2.0, metavar="SECONDS",
                   help="mean time between chaos actions (default 2)")  # fmt: skip
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="the report as JSON: into FILE, or alone on stdout")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the run directory (its logs)")
    p.add_argument("--chaos-corrupt", action="store_true", help=argparse.SUPPRESS)  # tests:
    # random bytes over a partition's paged-out pages on its device: the soak must fail
    p.set_defaults(func=cmd_soak)

    p = sub.add_parser("demo", help="run a small system on an embedded config")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except Fail as e:
        print(f"pyhv: error: {e}", file=sys.stderr)
        return e.code
    except ConfigError as e:
        print(f"pyhv: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pyhv: interrupted", file=sys.stderr)
        return 130
