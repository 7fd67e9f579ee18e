"""corrald (supervisor/_daemon.py) end to end, and its log and notify pieces.

The integration tests run ``python -m corral.supervisor._main`` as a subprocess with its
config dir, state root, log dir and sockets under tmp_path, on the session's busybox rootfs,
and read what it does from its stderr (``NAME: state OLD -> NEW (detail)`` lines), its log
files and the systemd notify datagrams it sends to a socket of the test. The `corrald`
fixture stops the daemon with SIGTERM (it must exit 0), and whatever happens kills it, force
deletes the containers, kills the helper by pid and removes the bundles; conftest's `rt`
teardown then looks for leftover state, cgroups, mounts and processes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from corral.supervisor._config import LogSpec, load_dir
from corral.supervisor._logs import LogFile, format_lines
from corral.supervisor._notify import Notifier, watchdog_interval

Runtime = Any  # conftest's Runtime (conftest cannot be imported with importlib mode)
Corrald = Any  # conftest's Corrald, the `corrald` fixture
TIMEOUT = 20.0
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z"


def _states(d: Corrald, name: str) -> list[str]:
    return re.findall(rf"{name}: state \w+ -> (\w+)", d.text)


# --- integration, as root -----------------------------------------------------------------


@pytest.mark.root
def test_output_lands_in_log_with_prefixes_and_sigterm_exits_0(corrald: Corrald) -> None:
    name = corrald.add("echo hello; echo oops >&2; trap 'exit 3' TERM; "
                       "while :; do sleep 0.1; done")
    corrald.start()
    log = corrald.logs / f"{name}.log"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if "hello" in text and "oops" in text:
            break
        time.sleep(0.02)
    assert re.search(rf"^{STAMP} stdout hello$", text, re.M), text
    assert re.search(rf"^{STAMP} stderr oops$", text, re.M), text
    assert corrald.terminate() == 0
    assert f"{name}: state stopping -> stopped (exited with code 3" in corrald.text
    assert "SIGKILL to every process" not in corrald.text
    assert not (corrald.rt.state_root / "bundles").exists()


@pytest.mark.root
def test_crash_loop_restarts_max_retries_then_exited(corrald: Corrald) -> None:
    name = corrald.add("exit 1", '[restart]\npolicy = "on-failure"\nmax_retries = 3\n'
                                 'backoff_initial = "50ms"')
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> exited \(exited with code 1: gave up after 3")
    time.sleep(0.3)  # no further start
    assert corrald.text.count(f"{name}: state stopped -> starting") == 1
    assert corrald.text.count(f"{name}: state backoff -> starting") == 3
    assert _states(corrald, name)[-1] == "exited"
    assert corrald.terminate() == 0


@pytest.mark.root
def test_crash_loop_follows_the_configured_backoff(corrald: Corrald) -> None:
    """The delays decided between restarts double from backoff_initial up to backoff_max.

    (The delays themselves are timed by trio and checked with MockClock in
    test_supervisor_policy.py; here the daemon's decisions are read from its log.)
    """
    name = corrald.add("exit 2", '[restart]\npolicy = "on-failure"\nmax_retries = 4\n'
                                 'backoff_initial = "20ms"\nbackoff_factor = 2.0\n'
                                 'backoff_max = "50ms"\nbackoff_jitter = 0.0')
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> exited \(exited with code 2: gave up after 4")
    delays = re.findall(rf"{name}: state running -> backoff \(exited with code 2; "
                        r"restart (\d+) in ([\d.]+)s\)", corrald.text)
    assert [(int(n), float(d)) for n, d in delays] == [(1, 0.02), (2, 0.04), (3, 0.05),
                                                       (4, 0.05)]
    assert corrald.terminate() == 0


@pytest.mark.root
def test_oom_killed_container_is_restarted_and_reported(corrald: Corrald) -> None:
    name = corrald.add("sleep 0.2; tail /dev/zero",
                       '[restart]\npolicy = "on-failure"\nmax_retries = 1\n'
                       'backoff_initial = "10ms"', memory="16M")
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> exited \(OOM-killed")
    backoff = re.findall(rf"{name}: state running -> backoff \((OOM-killed[^;]*); restart 1",
                         corrald.text)
    assert backoff == ["OOM-killed (container memory limit (16M))"]
    assert corrald.text.count(f"{name}: state backoff -> starting") == 1
    assert corrald.terminate() == 0


@pytest.mark.root
def test_sighup_restarts_a_changed_container(corrald: Corrald) -> None:
    name = corrald.add("echo first-version; while :; do sleep 0.1; done",
                       '[stop]\ntimeout = "200ms"')
    corrald.start()
    corrald.wait_for(rf"{name}: state starting -> running")
    corrald.add_as(name, "echo second-version; while :; do sleep 0.1; done",
                   '[stop]\ntimeout = "200ms"')
    assert corrald.proc is not None
    corrald.proc.send_signal(signal.SIGHUP)
    corrald.wait_for(rf"reload: restart {name}")
    corrald.wait_for(rf"{name}: state stopping -> stopped")
    log = corrald.logs / f"{name}.log"
    deadline = time.monotonic() + 10
    while "second-version" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the changed container did not start again"
        time.sleep(0.05)
    assert "first-version" in log.read_text()
    assert corrald.terminate() == 0


@pytest.mark.root
def test_bad_containers_do_not_stop_the_others_and_one_daemon_per_socket(
        corrald: Corrald) -> None:
    good = corrald.add("while :; do sleep 0.1; done", '[stop]\ntimeout = "200ms"')
    bad = corrald.add("true")
    text = (corrald.conf / f"{bad}.toml").read_text()
    (corrald.conf / f"{bad}.toml").write_text(text.replace(str(corrald.rt.rootfs), "/nonexistent"))
    (corrald.conf / "typo.toml").write_text('[container]\nrootfs = "/"\ncommand = ["x"]\nfoo = 1\n')
    corrald.start()
    corrald.wait_for(rf"{bad}: state starting -> fatal \(cannot create: ")
    corrald.wait_for(r"typo.toml: container.foo: unknown key .*\(skipped\)")
    corrald.wait_for(rf"{good}: state starting -> running")
    second = corrald.cf.run_cmd(
        [sys.executable, "-m", "corral.supervisor._main", "--config-dir", str(corrald.conf),
         "--root", str(corrald.rt.state_root), "--socket", str(corrald.ctl / "corrald.sock"),
         "--log-dir", str(corrald.logs)], timeout=TIMEOUT)
    assert second.returncode == 1, second.stderr
    assert "another corrald runs" in second.stderr
    assert corrald.terminate() == 0
    assert f"{good}: state stopping -> stopped" in corrald.text


@pytest.mark.root
def test_start_limit_makes_it_fatal(corrald: Corrald) -> None:
    name = corrald.add("exit 0", '[restart]\npolicy = "always"\nbackoff_initial = "10ms"\n'
                                 'start_limit_burst = 3\nstart_limit_interval = "10s"')
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> fatal \(exited with code 0: start limit hit")
    assert corrald.text.count(f"{name}: state starting -> running") == 3
    assert corrald.terminate() == 0


@pytest.mark.root
def test_stop_during_backoff_is_immediate(corrald: Corrald) -> None:
    name = corrald.add("exit 2", '[restart]\npolicy = "always"\nbackoff_initial = "30s"\n'
                                 'backoff_jitter = 0.0')
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> backoff \(exited with code 2; restart 1 in 30s")
    started = time.monotonic()
    assert corrald.terminate() == 0
    assert time.monotonic() - started < 5
    assert f"{name}: state backoff -> stopped (stopped with the daemon)" in corrald.text


@pytest.mark.root
def test_oom_kill_is_recorded(corrald: Corrald) -> None:
    name = corrald.add("sleep 0.3; tail /dev/zero", memory="16M")
    corrald.start()
    m = corrald.wait_for(rf"{name}: state running -> exited \((OOM-killed[^:]*)")
    assert m.group(1) == "OOM-killed (container memory limit (16M))"
    assert corrald.terminate() == 0


@pytest.mark.root
def test_stop_escalates_to_sigkill(corrald: Corrald) -> None:
    name = corrald.add("trap '' TERM; while :; do sleep 1; done",
                       '[stop]\ntimeout = "500ms"')
    corrald.start()
    started = time.monotonic()
    assert corrald.terminate() == 0
    assert time.monotonic() - started < 5
    text = corrald.text
    assert f"{name}: still running 0.5s after SIGTERM: SIGKILL to every process" in text
    assert f"{name}: state stopping -> stopped (killed by SIGKILL" in text


@pytest.mark.root
def test_sighup_reload_adds_removes_and_keeps(corrald: Corrald) -> None:
    keep = corrald.add("while :; do sleep 0.1; done", '[stop]\ntimeout = "200ms"')
    gone = corrald.add("while :; do sleep 0.1; done", '[stop]\ntimeout = "200ms"')
    corrald.start()
    (corrald.conf / f"{gone}.toml").unlink()
    new = corrald.add("while :; do sleep 0.1; done", '[stop]\ntimeout = "200ms"')
    assert corrald.proc is not None
    corrald.proc.send_signal(signal.SIGHUP)
    corrald.wait_for(rf"reload: start {new}; stop {gone}; keep {keep}")
    corrald.wait_for(rf"{new}: state starting -> running")
    corrald.wait_for(rf"{gone}: state stopping -> stopped")
    assert corrald.text.count(f"{keep}: state starting -> running") == 1
    assert corrald.terminate() == 0


@pytest.mark.root
def test_sighup_with_a_broken_edit_keeps_the_container(corrald: Corrald) -> None:
    name = corrald.add("while :; do sleep 0.1; done", '[stop]\ntimeout = "200ms"')
    corrald.start()
    corrald.wait_for(rf"{name}: state starting -> running")
    (corrald.conf / f"{name}.toml").write_text("[container\nbroken = ")
    assert corrald.proc is not None
    corrald.proc.send_signal(signal.SIGHUP)
    corrald.wait_for(rf"{name}.toml.*kept running with its previous configuration")
    corrald.wait_for(rf"reload: .*keep {name}")
    assert f"{name}: state running -> stopping" not in corrald.text
    assert corrald.terminate() == 0


# --- pieces, no root ----------------------------------------------------------------------


def test_example_configs_load() -> None:
    specs, errors = load_dir(Path(__file__).resolve().parent.parent / "configs" / "examples")
    assert not errors
    assert len(specs) >= 2
    assert all(s.rootfs == "/var/lib/corral/rootfs" for s in specs.values())


def test_format_lines() -> None:
    assert format_lines("stderr", [b"a", b""], now="T") == b"T stderr a\nT stderr \n"


def test_log_rotation_keeps_n(tmp_path: Path) -> None:
    log = LogFile(str(tmp_path / "c.log"), LogSpec(max_size=10, keep=2))
    for i in range(5):
        log.write(b"%d23456789\n" % i)  # 10 bytes: one write per file
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.log", "c.log.1", "c.log.2"]
    assert (tmp_path / "c.log").read_bytes() == b"423456789\n"
    assert (tmp_path / "c.log.1").read_bytes() == b"323456789\n"
    assert (tmp_path / "c.log.2").read_bytes() == b"223456789\n"


def test_log_rotation_keep_0_drops(tmp_path: Path) -> None:
    log = LogFile(str(tmp_path / "c.log"), LogSpec(max_size=10, keep=0))
    log.write(b"123456789\n")
    log.write(b"abc\n")
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["c.log"]
    assert (tmp_path / "c.log").read_bytes() == b"abc\n"


def test_notify_datagram_and_abstract_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0corrald-test-%d" % os.getpid())
        s.settimeout(5)

        async def main() -> None:
            n = Notifier(f"@corrald-test-{os.getpid()}")
            await n.send("READY=1", "STATUS=two\nlines")
            n.close()

        trio.run(main)
        assert s.recv(100) == b"READY=1\nSTATUS=two lines"


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000",
                              "WATCHDOG_PID": str(os.getpid())}) == 1.5
