"""corrald at scale: 100 containers at once, all running, then one SIGTERM stops them all.

corrald runs as a subprocess through conftest's `corrald` fixture (config dir, log dir and
sockets under tmp_path, the test's state root), as in test_daemon.py. The test
polls the state root with ``corral --root R list --format json`` until every container is
running, sends SIGTERM and checks that corrald exits 0 within a generous bound and leaves
nothing behind: an empty state root, no cgroup named after an id, no process of the
containers, the namespace helper gone.

``sleep`` as a container's PID 1 has no SIGTERM handler, so the kernel drops the stop signal
and every container is SIGKILLed at its ``[stop] timeout`` (1 s here): the stop takes about
that long only because corrald stops the containers in parallel (one after the other it
would take 100 s, past the bound).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

Runtime = Any  # conftest's Runtime (conftest cannot be imported with importlib mode)
COUNT = 100
MEMORY = "8M"
STOP_TIMEOUT = "1s"
START_TIMEOUT = 60.0  # all COUNT running, from the spawn of corrald
EXIT_TIMEOUT = 45.0  # corrald's exit after SIGTERM (parallel stop: ~1 s plus the deletes)


def _write_configs(corrald: Any, count: int) -> None:
    for _ in range(count):
        name = corrald.rt.new_id()
        corrald.names.append(name)
        (corrald.conf / f"{name}.toml").write_text(
            f'[container]\nrootfs = "{corrald.rt.rootfs}"\ncommand = ["sleep", "3600"]\n'
            f'[resources]\nmemory = "{MEMORY}"\n'
            f'[stop]\ntimeout = "{STOP_TIMEOUT}"\n')


def _statuses(corrald: Any) -> dict[str, str]:
    res = corrald.cf.run_cmd(corrald.rt.argv("list", "--format", "json"), timeout=30)
    assert res.returncode == 0, res.stderr
    return {c["id"]: c["status"] for c in json.loads(res.stdout or "[]")}


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for the reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.mark.root
def test_hundred_containers_start_and_one_sigterm_stops_them_all(corrald: Any) -> None:
    daemon = corrald  # conftest's harness
    _write_configs(daemon, COUNT)
    daemon.start(wait_ready=False)
    assert daemon.proc is not None
    deadline = time.monotonic() + START_TIMEOUT
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        statuses = _statuses(daemon)
        if sum(s == "running" for s in statuses.values()) == COUNT:
            break
        assert daemon.proc.poll() is None, f"corrald exited:\n{daemon.text}"
        time.sleep(0.25)
    running = sorted(n for n, s in statuses.items() if s == "running")
    assert running == sorted(daemon.names), (
        f"{len(running)}/{COUNT} running after {START_TIMEOUT:g}s: {statuses}\n{daemon.text}")
    assert daemon.text.count(": state starting -> running") == COUNT
    helpers = daemon.helper_pids()
    assert len(helpers) == 1, daemon.text
    helper = helpers[0]

    daemon.proc.send_signal(signal.SIGTERM)
    try:
        rc = daemon.cf.wait_tracked(daemon.proc, EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"corrald still running {EXIT_TIMEOUT:g}s after SIGTERM:\n{daemon.text}")
    text = daemon.text
    assert rc == 0, text
    assert text.count(": state stopping -> stopped (killed by SIGKILL") == COUNT, text
    assert "stopped" in text.splitlines()[-1], text

    # Nothing left: state root, cgroups, processes, the helper.
    assert sorted(os.listdir(daemon.rt.state_root)) == []
    assert daemon.cf.cgroups_named(daemon.names) == []
    assert daemon.cf.processes_of(daemon.names, daemon.rt.rootfs) == {}
    deadline = time.monotonic() + 10
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(helper), f"the namespace helper (pid {helper}) is still running"
    assert not (daemon.ctl / "corrald-nshelper.sock").exists()
