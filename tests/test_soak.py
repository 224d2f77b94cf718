"""pyhv soak (issue 14, part 4): a short soak through the command line holds
and its figures agree with what it did; a page corrupted on its device
behind the system's back fails it; the soak's verifier fails on a page that
is not what was written."""

from __future__ import annotations

import json

from conftest import PY, config_text, finish, pyhv

from pyhv.soak import KINDS

# 8 partitions of 512 pages in a 1,024-page pool; an action every 0.5-1.5 s
SHORT = ("soak", "--duration", "20", "--memory", "2MiB", "--interval", "1")


def test_a_short_soak_holds():
    p = pyhv(*SHORT, "--seed", "7", "--json", timeout=600)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)  # (--json alone: the report alone on stdout)
    assert r["ok"] and r["reason"] is None, r
    # every kind of chaos was done, whatever the machine's speed
    assert all(r["chaos"][k] >= 1 for k in KINDS), r["chaos"]
    assert r["hypervisor_restarts"] == r["hypervisor_kills"] == r["chaos"]["hypervisor_kill"]
    assert r["partitions_added"] == r["chaos"]["partition_add"]
    # every page of every partition, the removed ones included, verified once at the end
    assert r["pages"] == (8 + r["partitions_added"]) * 512
    assert r["pages_verified"] == r["pages"] and r["mismatches"] == 0
    assert r["pages_verified_in_rounds"] >= r["pages"]  # (a round at least, every page)
    assert r["machine_checks"] == 0
    assert r["worker_exits"] == {"0": r["workers"]}
    assert r["verifier_exits"] == {"0": 8 + r["partitions_added"]}
    # 4x overcommit: pages went out and came back; a killed service's streams failed over
    assert r["pool_pages"]["start"] == 1024 and r["pool_pages"]["max"] < r["pages"] // 2
    assert r["first_touches"] >= r["pages"] and r["faults"] >= r["first_touches"]
    assert r["page_outs"] > r["pages"] and r["page_ins"] > r["pages"]
    assert r["failovers"] >= 1


def test_a_page_corrupted_on_its_device_fails_the_soak(tmp_path):
    out = tmp_path / "soak.json"
    p = pyhv(*SHORT, "--seed", "7", "--chaos-corrupt", "--json", out, timeout=600)
    assert p.returncode == 1, (p.stdout, p.stderr)
    errors = [line for line in p.stderr.splitlines() if line.startswith("pyhv: error:")]
    assert errors == [p.stderr.strip().splitlines()[-1]], p.stderr  # one line, the last
    assert "machine check" in errors[0], errors
    r = json.loads(out.read_text())
    why = (r["reason"], r["chaos_events"], r["machine_check_records"], r["worker_exits"])
    assert not r["ok"] and r["chaos"]["corrupt"] == 1, why
    assert r["machine_checks"] >= 1, why
    assert r["machine_check_records"][0]["error"] == "checksum", why
    assert "135" in r["worker_exits"], why  # (the workers that read such a page)


VERIFY = (PY, "-m", "pyhv.soak", "verify")


def test_the_verifier_fails_on_a_page_not_written(system, tmp_path):
    """One round of 2 workers writes generation 1; a verifier that expects
    generation 1 passes, one that expects 2 of one stripe fails on every
    page of it."""
    system.up(config_text(pool="1MiB", partitions=[("p1", "2MiB")]))
    stop = tmp_path / "stop"
    stop.touch()  # one round only
    rc, out, err = finish(system.run("p1", PY, "-m", "pyhv.soak", "rounds", "--stop-file",
                                     str(stop), workers=2))  # fmt: skip
    assert rc == 0, err
    gens = [json.loads(line)["generation"] for line in out.splitlines()]
    assert gens == [1, 1]
    rc, out, err = finish(system.run("p1", *VERIFY, "--generations=1,1"))
    assert rc == 0, err
    assert json.loads(out)["verified"] == 512
    rc, out, err = finish(system.run("p1", *VERIFY, "--generations=1,2"))
    assert rc == 1
    r = json.loads(out)
    assert r["mismatches"] == 256 and r["verified"] == 256
    assert all(page % 2 == 1 for page in r["bad_pages"])
