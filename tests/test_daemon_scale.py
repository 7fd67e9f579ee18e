"""corrald at scale: 100 containers at once, all running, then one SIGTERM stops them all.

corrald runs as a subprocess (``python -m corral.supervisor._main``) with its config dir, log
dir and sockets under tmp_path and the test's state root, as in test_daemon.py. The test
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

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

Runtime = Any  # conftest's Runtime (conftest cannot be imported with importlib mode)
COUNT = 100
MEMORY = "8M"
STOP_TIMEOUT = "1s"
START_TIMEOUT = 60.0  # all COUNT running, from the spawn of corrald
EXIT_TIMEOUT = 45.0  # corrald's exit after SIGTERM (parallel stop: ~1 s plus the deletes)


class Daemon:
    """A corrald subprocess over COUNT container files, and its cleanup."""

    def __init__(self, rt: Runtime, tmp: Path, cf: Any) -> None:
        self.rt, self.cf = rt, cf
        self.conf = tmp / "containers.d"
        self.logs = tmp / "logs"
        self.ctl = tmp / "ctl"
        self.err = tmp / "corrald.err"
        self.conf.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.names: list[str] = []

    def write_configs(self, count: int) -> None:
        for _ in range(count):
            name = self.rt.new_id()
            self.names.append(name)
            (self.conf / f"{name}.toml").write_text(
                f'[container]\nrootfs = "{self.rt.rootfs}"\ncommand = ["sleep", "3600"]\n'
                f'[resources]\nmemory = "{MEMORY}"\n'
                f'[stop]\ntimeout = "{STOP_TIMEOUT}"\n')

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS")}
        with open(self.err, "wb") as err:
            self.proc = self.cf.spawn(
                [sys.executable, "-m", "corral.supervisor._main", "--config-dir", str(self.conf),
                 "--root", str(self.rt.state_root), "--log-dir", str(self.logs),
                 "--socket", str(self.ctl / "corrald.sock")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                cwd="/")

    @property
    def text(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def helper_pid(self) -> int | None:
        m = re.search(r"namespace helper pid (\d+)", self.text)
        return int(m.group(1)) if m else None

    def statuses(self) -> dict[str, str]:
        res = self.cf.run_cmd(self.rt.argv("list", "--format", "json"), timeout=30)
        assert res.returncode == 0, res.stderr
        return {c["id"]: c["status"] for c in json.loads(res.stdout or "[]")}

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.cf.wait_tracked(self.proc, 0.01)  # kills it on the timeout
        for name in self.names:
            if (self.rt.state_root / name).exists():
                with contextlib.suppress(Exception):
                    self.cf.run_cmd(self.rt.argv("delete", "--force", name), timeout=15)
        helper = self.helper_pid()
        if helper is not None:
            with contextlib.suppress(OSError):
                os.kill(helper, signal.SIGKILL)
        bundles = self.rt.state_root / "bundles"
        if bundles.exists():
            subprocess.run(["rm", "-rf", str(bundles)], check=False)


@pytest.fixture
def daemon(rt: Runtime, tmp_path: Path, cf: Any) -> Iterator[Daemon]:
    d = Daemon(rt, tmp_path, cf)
    try:
        yield d
    finally:
        d.cleanup()


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for the reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.mark.root
def test_hundred_containers_start_and_one_sigterm_stops_them_all(daemon: Daemon) -> None:
    daemon.write_configs(COUNT)
    daemon.start()
    assert daemon.proc is not None
    deadline = time.monotonic() + START_TIMEOUT
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        statuses = daemon.statuses()
        if sum(s == "running" for s in statuses.values()) == COUNT:
            break
        assert daemon.proc.poll() is None, f"corrald exited:\n{daemon.text}"
        time.sleep(0.25)
    running = sorted(n for n, s in statuses.items() if s == "running")
    assert running == sorted(daemon.names), (
        f"{len(running)}/{COUNT} running after {START_TIMEOUT:g}s: {statuses}\n{daemon.text}")
    assert daemon.text.count(": state starting -> running") == COUNT
    helper = daemon.helper_pid()
    assert helper is not None, daemon.text

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
