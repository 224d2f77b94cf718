"""Fixtures for pyhv's fault benchmarks (``make bench``; not part of ``make test``).

Run:  .venv/bin/python -m pytest bench --benchmark-only -q

* ``pyhv_system``: factory of running systems (:class:`benchlib.PyhvSystem`),
  each in its own run directory under tmp_path, every one shut down at
  teardown whatever happened (SIGKILL of its own processes, by pid, only if
  ``pyhv shutdown`` fails).
* ``attach_to``: attaches this process to a partition; it depends on
  ``pyhv_system`` so pytest tears it down first: the view is released and
  ``pyhv.detach`` called before any shutdown (a worker whose hypervisor goes
  away is ended by its watchdog, exit 70, which would take pytest with it).
* ``direct_file``: an fd open O_DIRECT on a small page-aligned file.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from .benchlib import Attached, PyhvSystem, attached


@pytest.fixture
def pyhv_system(tmp_path):
    """Factory: ``pyhv_system(pool=..., memory=..., direct=...)`` starts a
    system in a fresh run directory; every system started is shut down at
    teardown, whatever happened."""
    systems: list[PyhvSystem] = []

    def start(pool: str, memory: str, direct: bool = True) -> PyhvSystem:
        run_dir = tmp_path / f"run{len(systems)}"
        run_dir.mkdir()
        s = PyhvSystem(run_dir, pool=pool, memory=memory, direct=direct)
        systems.append(s)
        s.up()
        return s

    yield start
    errors = []
    for s in reversed(systems):
        try:
            s.shutdown()
        except Exception as e:  # noqa: BLE001 - report all, stop all
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def attach_to(pyhv_system):
    """Factory: ``attach_to(system, cpu=...)`` -> :class:`Attached`; detached at
    teardown.  It depends on ``pyhv_system``, so pytest tears it down first:
    detach always happens before shutdown."""
    stack = contextlib.ExitStack()

    def attach(system: PyhvSystem, partition: str = "p1", cpu: int | None = None) -> Attached:
        return stack.enter_context(attached(system, partition, cpu))

    with stack:
        yield attach


@pytest.fixture
def direct_file(tmp_path):
    """An fd open O_DIRECT on a page-aligned 16 MiB file of non-zero bytes
    (each faulting page reads its own slot, as from a paging device)."""
    path = tmp_path / "page-in.img"
    path.write_bytes(os.urandom(16 << 20))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    yield fd
    os.close(fd)


# --- a summary of every row's extra_info at the end of the run -----------------------------

_ROWS: list[tuple[str, str, dict]] = []


@pytest.fixture(autouse=True)
def _keep_extra_info(request):
    yield
    bm = request.node.funcargs.get("benchmark")
    if bm is not None and getattr(bm, "stats", None) and bm.extra_info:
        _ROWS.append((bm.group or "", request.node.name, dict(bm.extra_info)))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("per-fault p50 / p99 (µs), from extra_info")
    tr.write_line(f"{'group':<12}{'row':<34}{'p50':>9}{'p99':>9}{'mean':>9}  notes")
    for group, name, x in sorted(_ROWS, key=lambda r: (r[0], r[2].get("p50_us", 0))):
        if "delta" in x:
            d = x["delta"]
            notes = ("faults +{faults} first_touches +{first_touches} page_ins +{page_ins} "
                     "page_outs +{page_outs} clean_drops +{clean_drops}").format(**d)  # fmt: skip
        elif "wall_us_per_touch" in x:
            notes = f"wall/touch incl. set-up {x['wall_us_per_touch']}"
        else:
            notes = ""
        tr.write_line(f"{group:<12}{name:<34}{x.get('p50_us', '-'):>9}{x.get('p99_us', '-'):>9}"
                      f"{x.get('mean_us', '-'):>9}  {notes}")  # fmt: skip
