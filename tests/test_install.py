"""pyhv as a user installs it: a wheel built from this checkout and installed
(not editable) into an environment of its own, run from inside a source
tree whose ``pyhv/`` has no built C core -- the directory a new user is in
right after ``git clone`` and ``pip install .``."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the installed `pyhv` command, an unbuilt copy of the source tree)."""
    d = tmp_path_factory.mktemp("install")
    # the files of the checkout, as a clone has them (no build/ left over)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (d / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, d / "src" / name)
    r = subprocess.run([PY, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(d / "dist"),
                        str(d / "src")], capture_output=True, text=True, timeout=600)  # fmt: skip
    if r.returncode:
        pytest.fail(f"pip wheel: {r.stderr[-2000:]}")
    (wheel,) = (d / "dist").glob("pyhv-*.whl")
    subprocess.run([PY, "-m", "venv", "--without-pip", str(d / "venv")], check=True)
    r = subprocess.run([PY, "-m", "pip", "--python", str(d / "venv" / "bin" / "python"),
                        "install", "-q", "--no-deps", str(wheel)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    if r.returncode:
        pytest.fail(f"pip install: {r.stderr[-2000:]}")
    # its dependencies (cffi, psutil, matplotlib) come from this environment,
    # after its own site-packages: the installed pyhv is found first
    venv_site = next((d / "venv" / "lib").glob("python3*/site-packages"))
    (venv_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    clone = d / "clone"
    shutil.copytree(ROOT / "pyhv", clone / "pyhv",
                    ignore=shutil.ignore_patterns("_core*", "__pycache__"))  # fmt: skip
    (clone / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    return d / "venv" / "bin" / "pyhv", clone


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYHV_RUN_DIR")}


def test_the_installed_demo_runs_from_inside_an_unbuilt_source_tree(installed):
    pyhv, clone = installed
    r = subprocess.run([str(pyhv), "demo", "--json"], cwd=clone, env=_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    summary = json.loads(r.stdout)
    assert summary["pages_verified"] == 12288 and summary["mismatches"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="pyhv bench sets up loop devices and swap: root")
def test_the_installed_bench_quick_reports_every_workload_from_anywhere(installed, tmp_path):
    """`pyhv bench --quick` from the installed wheel, in the unbuilt source
    tree: the table, and JSON with every workload under pyhv (counters checked
    against the work) and the kernel's swap measured in the same run, or
    skipped with its reason; a row that could not be measured fails the
    command.  No time is asserted: speed is for the benchmarks."""
    pyhv, clone = installed
    out = tmp_path / "bench.json"
    r = subprocess.run([str(pyhv), "bench", "--quick", "--json", str(out)], cwd=clone,
                       env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    assert "workload" in r.stdout and "kernel swap" in r.stdout and "Traceback" not in r.stderr
    result = json.loads(out.read_text())
    assert result["quick"] and result["errors"] == []
    assert list(result["workloads"]) == ["fill", "random", "sequential", "scattered", "zipf",
                                         "dataset"]  # fmt: skip
    assert all(m["verified"] for m in result["dataset"]["modes"].values())
    for name, row in result["workloads"].items():
        y = row["pyhv"]
        assert y["seconds"] > 0 and y["touches"] == row["touches"], name
        assert y["counters"]["io_errors"] == 0 and y["ctxt"] > 0, name
        if name == "fill":  # every page written once: a first touch each
            assert y["counters"]["first_touches"] == y["touches"] and y["counters"]["page_outs"]
        else:
            assert y["counters"]["page_ins"] > 0, name
        swap = result["kernel_swap"]
        if swap["available"]:
            assert row["kernel_swap"]["seconds"] > 0 and row["ratio"] > 0, name
        else:
            assert swap["skipped"], "an unavailable kernel swap says why"
    assert result["c_floor"]["page_in"] and result["c_floor"]["first_touch"]


def test_python_children_are_started_without_the_current_directory_on_their_path():
    from pyhv._spawn import module_command

    cmd = module_command("pyhv.service", "--name", "x")
    assert cmd[:3] == [sys.executable, "-P", "-m"] and cmd[3:] == ["pyhv.service", "--name", "x"]
