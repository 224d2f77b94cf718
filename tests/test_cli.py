"""Bad config and bad command lines: one clear line on stderr, exit 2, no
traceback, nothing started.  Garbage on the control socket costs the sender
its connection, not the daemon its life."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from conftest import PY, assert_one_line_error, config_text, pyhv

GOOD = config_text(pool="1MiB", partitions=[("p1", "4MiB")])


def bad_config(tmp_path, text: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    run_dir = tmp_path / "run"
    p = pyhv("up", "-c", cfg, "--run-dir", run_dir, "--detach", timeout=30)
    started = (run_dir / "control.sock").exists()
    if started:
        pyhv("shutdown", "--run-dir", run_dir)
    assert not started, "a bad config started a system"
    assert not (run_dir / "hypervisor.pid").exists()
    return p


BAD_CONFIGS = {
    "size_not_a_size": (GOOD.replace('size = "1MiB"', 'size = "lots"'), ["'lots'", "not a size"]),
    "size_negative": (GOOD.replace('size = "1MiB"', "size = -4096"), ["positive"]),
    "size_not_page_multiple": (GOOD.replace('size = "1MiB"', "size = 1000"), ["page size"]),
    "unknown_service": (GOOD.replace('memory = "4MiB"', 'memory = "4MiB"\npaging = ["vios9"]'),
                        ["vios9"]),
    "unknown_device": (GOOD.replace('device = "pgdev0"', 'device = "nosuch"'), ["nosuch"]),
    "device_smaller_than_partition": (
        config_text(pool="1MiB", partitions=[("p1", "8MiB")], device_size="4MiB"),
        ["smaller than its memory"]),
    "missing_block_device": (
        GOOD.replace('path = "pg0.img"\nsize = "4MiB"', 'path = "/dev/pyhv-no-such-disk"'),
        ["/dev/pyhv-no-such-disk", "does not exist"]),
    "missing_file_without_size": (GOOD.replace('size = "4MiB"\n\n[[partition]]', "[[partition]]"),
                                  ["no size"]),
    "duplicate_partition": (config_text(pool="1MiB", partitions=[("p1", "4MiB"), ("p1", "4MiB")]),
                            ["duplicate partition", "'p1'"]),
    "duplicate_service": (config_text(pool="1MiB", partitions=[("p1", "4MiB")],
                                      services=("vios1", "vios1")), ["duplicate paging service"]),
    "duplicate_device": (GOOD + '[[device]]\nid = "pgdev0"\npath = "x.img"\nsize = "4MiB"\n',
                         ["duplicate device"]),
    "device_assigned_twice": (
        GOOD + '[[partition]]\nname = "p2"\nmemory = "4MiB"\ndevice = "pgdev0"\n',
        ["already assigned"]),
    "no_free_device": (GOOD + '[[partition]]\nname = "p2"\nmemory = "4MiB"\n', ["no free device"]),
    "not_toml": ("[pool\nsize=", ["not valid TOML"]),
    "unknown_key": (GOOD.replace("[pool]", "[pool]\ncolour = 3"), ["colour"]),
    "no_pool": ('[[paging_service]]\nname = "a"\n', ["[pool]"]),
    "bad_name": (GOOD.replace('name = "p1"', 'name = "p 1"'), ["name"]),
    "unreachable_device": (
        config_text(pool="1MiB", partitions=[("p1", "4MiB")], services=("vios1", "vios2"))
        .replace('device = "pgdev0"', 'device = "pgdev0"\npaging = ["vios2"]')
        .replace('size = "4MiB"\n\n[[partition]]', 'size = "4MiB"\nservices = ["vios1"]\n[[partition]]'),
        ["cannot reach"]),
    "pool_larger_than_the_machine": (GOOD.replace('size = "1MiB"', 'size = "1048576GiB"'),
                                     ["[pool] size", "more memory than this machine can give"]),
    "pool_of_one_page": (GOOD.replace('size = "1MiB"', "size = 4096"), ["16 pages"]),
    "metadata_larger_than_the_machine": (
        config_text(pool="1MiB", partitions=[("p1", "64TiB")]), ["'p1'", "metadata", "64TiB"]),
    "device_on_proc": (GOOD.replace('path = "pg0.img"', 'path = "/proc/meminfo"'),
                       ["/proc/meminfo", "proc"]),
    "device_on_sysfs": (GOOD.replace('path = "pg0.img"', 'path = "/sys/kernel/mm/ksm/run"'),
                        ["sysfs"]),
    "device_a_character_device": (GOOD.replace('path = "pg0.img"', 'path = "/dev/zero"'),
                                  ["neither a regular file nor a block device"]),
    "timeout_nan": (config_text(pool="1MiB", partitions=[("p1", "4MiB")],
                                service_extra="timeout = nan\n"), ["timeout", "3600"]),
    "timeout_inf": (config_text(pool="1MiB", partitions=[("p1", "4MiB")],
                                service_extra="timeout = inf\n"), ["timeout", "3600"]),
    "timeout_huge": (config_text(pool="1MiB", partitions=[("p1", "4MiB")],
                                 service_extra="timeout = 1e300\n"), ["timeout", "3600"]),
    "timeout_tiny": (config_text(pool="1MiB", partitions=[("p1", "4MiB")],
                                 service_extra="timeout = 1e-9\n"), ["timeout", "0.1"]),
    "toml_nested_too_deeply": ("x = " + "[" * 3000, ["not valid TOML"]),
    "toml_tables_nested_too_deeply": ("x = " + "{a=" * 3000, ["not valid TOML"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_exit_2_and_starts_nothing(tmp_path, case):
    text, words = BAD_CONFIGS[case]
    assert_one_line_error(bad_config(tmp_path, text), *words)


def test_missing_config_file(tmp_path):
    p = pyhv("up", "-c", tmp_path / "nope.toml", "--run-dir", tmp_path / "r", "--detach")
    assert_one_line_error(p, "nope.toml")


BAD_COMMAND_LINES = [
    [],
    ["frobnicate"],
    ["up", "--run-dir", "/tmp/x"],
    ["run", "--run-dir", "/tmp", "--", "true"],
    ["run", "--run-dir", "/tmp", "--partition", "p1", "--workers", "many", "--", "true"],
    ["status", "--json", "--bogus"],
    ["status"],
    ["shutdown"],
    ["status", "--run-dir", "/nonexistent/pyhv-run-dir"],
]


@pytest.mark.parametrize("argv", BAD_COMMAND_LINES, ids=lambda a: " ".join(a) or "nothing")
def test_bad_command_line_is_one_line_exit_2(argv):
    env = {k: v for k, v in os.environ.items() if k != "PYHV_RUN_DIR"}
    assert_one_line_error(pyhv(*argv, env=env))


def test_run_errors_on_a_running_system(system):
    system.up(GOOD)
    assert_one_line_error(pyhv("run", "--run-dir", system.run_dir, "--partition", "nope", "--",
                               PY, "-c", "pass"), "nope")  # fmt: skip
    assert_one_line_error(pyhv("run", "--run-dir", system.run_dir, "--partition", "p1", "--workers",
                               "0", "--", PY, "-c", "pass"), "--workers")  # fmt: skip
    assert_one_line_error(pyhv("run", "--run-dir", system.run_dir, "--partition", "p1"), "command")
    assert_one_line_error(pyhv("run", "--run-dir", system.run_dir, "--partition", "p1", "--",
                               "/nonexistent/prog"), "/nonexistent/prog")  # fmt: skip
    # a second system in the same run directory is refused
    p = pyhv("up", "-c", system.run_dir / "pyhv.toml", "--run-dir", system.run_dir, "--detach")
    assert_one_line_error(p, "already running")
    assert system.status()["partitions"][0]["name"] == "p1"


def _control(system) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(str(system.run_dir / "control.sock"))
    return s


@pytest.mark.parametrize("garbage", [
    os.urandom(512),
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'{"op": "no-such-op"}',
    b'{"op": "attach"}',
    b'{"op": "attach", "partition": ["p1"], "pid": "x"}',
    b'{"op": "register", "base": 4096}',
    b"{" + b" " * 70000 + b"}",
], ids=["random", "binary", "json-list", "unknown-op", "attach-no-partition", "attach-bad-types",
        "register-without-attach", "too-large"])  # fmt: skip
def test_garbage_on_the_control_socket_costs_only_that_connection(system, garbage):
    system.up(GOOD)
    other = _control(system)  # an innocent bystander connection
    s = _control(system)
    s.sendall(garbage)
    got = []
    while True:  # an error reply may come first; then the connection is closed
        data = s.recv(1 << 17)
        if not data:
            break
        got.append(data)
    assert all(b'"ok":false' in g for g in got)
    s.close()
    # the daemon lives on, and so does the other connection
    assert system.status()["pid"] == system.pid
    from pyhv import wire

    wire.send_control(other, {"op": "status"})
    reply, _ = wire.recv_control(other)
    assert reply["ok"] and reply["pid"] == system.pid


def test_a_stream_socket_client_is_refused_harmlessly(system):
    system.up(GOOD)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(OSError):
        s.connect(str(system.run_dir / "control.sock"))
    assert system.status()["pid"] == system.pid


def test_control_socket_is_private(system):
    system.up(GOOD)
    assert (os.stat(system.run_dir / "control.sock").st_mode & 0o777) == 0o600
