"""corrald's control socket and corralctl against a live daemon, as root.

The daemon runs as in test_daemon.py (conftest's `corrald` harness), with its control
socket at ``tmp/ctl/corrald.sock``. corralctl runs as the console script next to the
interpreter, and as ``nobody`` from a copy of its source file with Debian's /usr/bin/python3
(it needs only the standard library; the venv's interpreter lives under /root, which nobody
cannot enter), with curl for the raw HTTP checks. Every wait is bounded; no assertion is
about time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CTL = str(Path(sys.executable).parent / "corralctl")
CTL_SOURCE = str(REPO / "supervisor" / "_ctl.py")
SYSTEM_PYTHON = "/usr/bin/python3"
TIMEOUT = 20.0
NOBODY = 65534
# The shell is the container's pid 1, which ignores a signal it has no handler for.
LOOP = "trap 'exit 0' TERM; i=0; while :; do echo line $i; i=$((i+1)); sleep 0.05; done"


class Ctl:
    """conftest's corrald harness (`d`, its attributes reachable here), and corralctl."""

    def __init__(self, d: Any) -> None:
        self.d = d
        self.tmp: Path = d.conf.parent
        self.sock = str(d.ctl / "corrald.sock")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.d, name)

    def start_with(self, **settings: str) -> None:
        """Start with a corrald.toml holding `settings` (socket_group...)."""
        self.d.start(daemon_config="".join(f'{k} = "{v}"\n' for k, v in settings.items()))

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        res = self.cf.run_cmd([CTL, "--socket", self.sock, *args], timeout=60)
        if ok:
            assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def entry(self, name: str) -> dict[str, Any]:
        [e] = [e for e in self.json("list") if e["name"] == name]
        return e

    def wait_state(self, name: str, state: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            e = self.entry(name)
            if e["state"] == state:
                return e
            time.sleep(0.05)
        pytest.fail(f"{name} never reached {state}: {self.entry(name)}\n{self.text}")

    def as_user(self, argv: list[str], uid: int, gid: int, groups: tuple[int, ...] = ()
                ) -> subprocess.CompletedProcess[str]:
        """Run `argv` as uid/gid with only `groups` as supplementary groups; output captured."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = self.cf.spawn(argv, user=uid, group=gid, extra_groups=list(groups),
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd="/")
            rc = self.cf.wait_tracked(proc, 30)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(argv, rc, out.read().decode(),
                                               err.read().decode())

    def open_to(self, uid: int) -> str:
        """Let `uid` reach the socket's directory (pytest's tmp dirs are 0700); returns a
        copy of corralctl's source it can read (the checkout may be where it cannot)."""
        assert uid  # root needs no such help
        for d in (self.tmp, self.ctl):
            d.chmod(d.stat().st_mode | 0o111)
        assert os.access(SYSTEM_PYTHON, os.X_OK), f"{SYSTEM_PYTHON} is needed (scripts/setup)"
        copy = self.tmp / "corralctl.py"
        shutil.copyfile(CTL_SOURCE, copy)
        copy.chmod(0o644)
        return str(copy)


@pytest.fixture
def ctl(corrald: Any) -> Iterator[Ctl]:
    c = Ctl(corrald)
    try:
        yield c
    finally:  # then the harness's own cleanup
        with contextlib.suppress(Exception):
            if corrald.proc is not None and corrald.proc.poll() is None:
                corrald.terminate()


def _curl(*args: str) -> list[str]:
    curl = shutil.which("curl")
    assert curl, "curl is needed (scripts/setup installs it)"
    return [curl, "-sS", "--max-time", "20", *args]


# --- reading -------------------------------------------------------------------------------


@pytest.mark.root
def test_list_status_curl_and_the_socket_file(ctl: Ctl) -> None:
    web = ctl.add(LOOP, '[resources]\npids = 50')
    done = ctl.add("echo bye; exit 3")
    ctl.start()
    st = os.stat(ctl.sock)
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == ("0o660", 0, 0)
    ctl.wait_state(done, "exited")
    entries = {e["name"]: e for e in ctl.json("list")}
    assert entries[web]["state"] == "running"
    assert entries[web]["pid"] > 0
    assert entries[web]["restarts"] == 0
    assert entries[done]["last_exit"]["code"] == 3
    assert entries[done]["pid"] is None
    table = ctl.run("list").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "PID", "RESTARTS", "UPTIME", "LAST", "EXIT"]
    assert any(line.split()[:2] == [done, "exited"] and "exited with code 3" in line
               for line in table[1:])

    res = ctl.run("status", web)
    assert f"{web} - running" in res.stdout
    assert re.search(r"Tasks: \d+ \(limit 50\)", res.stdout)
    assert "stdout line" in res.stdout  # the last log lines
    info = ctl.json("status", web)
    assert info["config"]["resources"]["pids"] == 50
    assert info["stats"]["pids"]["limit"] == 50
    assert info["stats"]["memory"]["usage"] > 0
    assert ctl.run("status", done, ok=False).returncode == 3  # not running, as systemctl

    res = ctl.cf.run_cmd(_curl("--unix-socket", ctl.sock, "http://corrald/v1/containers"))
    assert {e["name"] for e in json.loads(res.stdout)} == {web, done}
    res = ctl.cf.run_cmd(_curl("--unix-socket", ctl.sock, "http://corrald/metrics"))
    assert f'corral_container_state{{container="{web}",state="running"}} 1' in res.stdout
    assert f'corral_container_state{{container="{done}",state="exited"}} 1' in res.stdout
    assert re.search(rf'corral_container_memory_bytes{{container="{web}"}} [1-9]', res.stdout)
    assert ctl.terminate() == 0
    assert not os.path.exists(ctl.sock)


@pytest.mark.root
def test_unknown_container_is_exit_4_and_a_missing_daemon_names_the_socket(ctl: Ctl) -> None:
    res = ctl.run("list", ok=False)  # not started yet
    assert res.returncode == 1
    assert f"corrald is not running: no socket at {ctl.sock}" in res.stderr
    ctl.add(LOOP)
    ctl.start()
    for args in (("status", "nope"), ("stop", "nope"), ("logs", "nope"), ("kill", "nope")):
        res = ctl.run(*args, ok=False)
        assert res.returncode == 4, (args, res.stderr)
        assert "no such container: nope" in res.stderr
    res = ctl.run("pause", "nope", ctl.names[0], ok=False)  # one good, one unknown
    assert res.returncode == 4
    ctl.wait_state(ctl.names[0], "paused")
    assert ctl.run("resume", ctl.names[0]).returncode == 0
    res = ctl.run("resume", ctl.names[0], ok=False)
    assert res.returncode == 1
    assert "not paused" in res.stderr
    assert ctl.run("frobnicate", ok=False).returncode == 2


# --- operations ----------------------------------------------------------------------------


@pytest.mark.root
def test_stop_start_restart_and_a_reload_keeps_a_stopped_container_down(ctl: Ctl) -> None:
    name = ctl.add(f"echo first; {LOOP}")
    ctl.start()
    pid = ctl.wait_state(name, "running")["pid"]
    res = ctl.run("stop", name, "--json")
    [after] = json.loads(res.stdout)
    assert after["state"] == "stopped"
    assert ctl.entry(name)["pid"] is None

    ctl.add_as(name, f"echo second; {LOOP}")
    plan = ctl.json("reload", "--dry-run")
    assert plan["changed"] == [name]
    assert plan["stay_stopped"] == [name]
    assert ctl.entry(name)["state"] == "stopped"  # a dry run changes nothing
    plan = ctl.json("reload")
    assert (plan["changed"], plan["dry_run"]) == ([name], False)
    assert ctl.entry(name)["state"] == "stopped"  # the user's stop stands
    assert "second" not in (ctl.logs / f"{name}.log").read_text()

    started = ctl.run("start", name, "--json")
    assert json.loads(started.stdout)[0]["state"] == "running"
    ctl.wait_for(rf"{name}: state starting -> running")
    deadline = time.monotonic() + TIMEOUT
    while "stdout second" not in (ctl.logs / f"{name}.log").read_text():
        assert time.monotonic() < deadline, "the new config never ran"
        time.sleep(0.05)
    pid2 = ctl.entry(name)["pid"]
    assert pid2 not in (None, pid)
    assert ctl.run("start", name).returncode == 0  # running already: nothing to do
    assert ctl.entry(name)["pid"] == pid2

    restarted = json.loads(ctl.run("restart", name, "--json").stdout)[0]
    assert restarted["state"] == "running"
    assert restarted["pid"] not in (None, pid2)
    assert ctl.terminate() == 0


@pytest.mark.root
def test_a_user_stop_outlives_a_daemon_restart_and_a_reload(ctl: Ctl) -> None:
    policy = '[restart]\npolicy = "unless-stopped"'
    name = ctl.add(LOOP, policy)
    ctl.start()
    ctl.wait_state(name, "running")
    ctl.run("stop", name)
    assert ctl.terminate() == 0
    ctl.start()
    assert ctl.entry(name)["state"] == "stopped"  # unless-stopped, as in Docker
    res = ctl.run("status", name, "--json", ok=False)
    assert res.returncode == 3
    assert json.loads(res.stdout)["stopped_by_user"] is True
    ctl.add_as(name, f"echo changed; {LOOP}", policy)
    plan = ctl.json("reload")
    assert (plan["changed"], plan["stay_stopped"]) == ([name], [name])
    assert ctl.entry(name)["state"] == "stopped"
    ctl.run("start", name)
    ctl.wait_for(rf"{name}: state starting -> running", source=lambda: ctl.run_text)
    assert ctl.entry(name)["state"] == "running"
    assert ctl.terminate() == 0


@pytest.mark.root
def test_start_during_backoff_restarts_at_once(ctl: Ctl) -> None:
    name = ctl.add("sleep 0.2; exit 1",
                   '[restart]\npolicy = "on-failure"\nbackoff_initial = "1h"\n'
                   'backoff_max = "1h"')
    ctl.start()
    ctl.wait_state(name, "backoff")
    res = json.loads(ctl.run("start", name, "--json").stdout)[0]
    assert res["state"] in ("backoff", "starting", "running")  # woken, not yet restarted
    ctl.wait_for(rf"{name}: state backoff -> starting")  # not an hour later
    assert ctl.text.count(f"{name}: state backoff -> starting") == 1
    ctl.run("stop", name)
    assert ctl.entry(name)["state"] == "stopped"
    assert ctl.terminate() == 0


@pytest.mark.root
def test_pause_resume_and_kill_with_a_signal(ctl: Ctl) -> None:
    name = ctl.add("trap 'echo got USR1' USR1; " + LOOP,
                   '[restart]\npolicy = "always"\nbackoff_initial = "10ms"')
    ctl.start()
    pid = ctl.wait_state(name, "running")["pid"]
    ctl.run("pause", name)
    assert ctl.entry(name)["state"] == "paused"
    assert ctl.rt.state(name)["status"] == "paused"
    ctl.run("resume", name)
    assert ctl.entry(name)["state"] == "running"
    assert ctl.rt.state(name)["status"] == "running"

    ctl.run("kill", "-s", "USR1", name)
    deadline = time.monotonic() + TIMEOUT
    while "got USR1" not in (ctl.logs / f"{name}.log").read_text():
        assert time.monotonic() < deadline, "the signal never arrived"
        time.sleep(0.05)
    assert ctl.entry(name)["pid"] == pid  # a signal is not a stop

    ctl.run("kill", "--signal", "KILL", name)
    ctl.wait_for(rf"{name}: state backoff -> starting")
    e = ctl.wait_state(name, "running")
    assert e["restarts"] == 1
    assert e["last_exit"]["signal"] == signal.SIGKILL
    events = [json.loads(line) for line in ctl.run("events", "--json").stdout.splitlines()]
    kinds = [(ev["type"], ev.get("action") or ev.get("to")) for ev in events
             if ev.get("container") == name]
    for want in [("action", "pause"), ("state", "paused"), ("action", "resume"),
                 ("action", "kill"), ("exit", None), ("state", "backoff")]:
        assert want in kinds, (want, kinds)

    ctl.run("pause", name)  # a paused container still stops (thawed first)
    ctl.run("stop", name)
    assert ctl.entry(name)["state"] == "stopped"
    assert ctl.entry(name)["last_exit"]["code"] == 0  # its TERM trap ran: not SIGKILLed
    assert ctl.terminate() == 0


@pytest.mark.root
def test_an_oom_kill_shows_in_status_events_and_metrics(ctl: Ctl) -> None:
    name = ctl.add("sleep 0.2; tail /dev/zero", memory="16M")
    ctl.start()
    e = ctl.wait_state(name, "exited")
    assert e["last_exit"]["kind"] == "oom"
    assert "container memory limit (16M)" in e["last_exit"]["description"]
    res = ctl.run("status", name, "--json", ok=False)
    assert res.returncode == 3  # not running
    assert json.loads(res.stdout)["oom_kills"] >= 1
    events = [json.loads(x) for x in ctl.run("events", "--json").stdout.splitlines()]
    [ex] = [ev for ev in events if ev["type"] == "exit" and ev.get("container") == name]
    assert ex["cause"]["kind"] == "oom"
    res = ctl.cf.run_cmd(_curl("--unix-socket", ctl.sock, "http://corrald/metrics"))
    m = re.search(rf'corral_container_oom_kills_total{{container="{name}"}} (\d+)', res.stdout)
    assert m
    assert int(m.group(1)) >= 1
    assert ctl.terminate() == 0


@pytest.mark.root
def test_an_adopted_container_keeps_its_pid_and_uptime_and_a_stale_socket_is_replaced(
        ctl: Ctl) -> None:
    name = ctl.add(LOOP)
    ctl.start()
    before = ctl.wait_state(name, "running")
    ctl.kill9()  # a crash: the socket file stays behind
    assert os.path.exists(ctl.sock)
    res = ctl.run("list", ok=False)
    assert res.returncode == 1
    assert f"corrald is not running: nothing listens on {ctl.sock}" in res.stderr
    ctl.start()
    after = ctl.wait_state(name, "running")
    assert after["pid"] == before["pid"]  # adopted, not restarted
    assert after["uptime"] >= before["uptime"]  # counted from the process's own start
    assert ctl.json("status", name)["stats"]["pids"]["current"] >= 1
    assert ctl.terminate() == 0


# --- logs and events ----------------------------------------------------------------------


@pytest.mark.root
def test_logs_last_lines_and_follow_across_rotations(ctl: Ctl) -> None:
    name = ctl.add(LOOP, '[logs]\nmax_size = "2K"\nkeep = 1')
    ctl.start()
    log = ctl.logs / f"{name}.log"
    deadline = time.monotonic() + TIMEOUT
    while not Path(f"{log}.1").exists():  # rotated at least once
        assert time.monotonic() < deadline
        time.sleep(0.05)
    res = ctl.run("logs", "-n", "3", name)
    lines = res.stdout.splitlines()
    assert len(lines) == 3
    nums = [int(x.rsplit(" ", 1)[1]) for x in lines]
    assert nums == [nums[0], nums[0] + 1, nums[0] + 2]

    with tempfile.TemporaryFile() as out:
        proc = ctl.cf.spawn([CTL, "--socket", ctl.sock, "logs", "-f", "-n", "1", name],
                            stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            rotations = 0
            ino = log.stat().st_ino
            while rotations < 2:  # follow through two more rotations
                assert time.monotonic() < deadline, "no rotation"
                with contextlib.suppress(FileNotFoundError):
                    if log.stat().st_ino != ino:
                        ino, rotations = log.stat().st_ino, rotations + 1
                time.sleep(0.02)
            time.sleep(0.5)  # let the follower read past the last rotation
        finally:
            proc.send_signal(signal.SIGINT)
            ctl.cf.wait_tracked(proc, 10)
        out.seek(0)
        got = [int(x.rsplit(" ", 1)[1]) for x in out.read().decode().splitlines()
               if " stdout line " in x]
    assert len(got) > 10
    assert got == list(range(got[0], got[0] + len(got)))  # every line once, in order
    assert ctl.terminate() == 0


@pytest.mark.root
def test_events_resume_from_a_sequence_number_and_follow(ctl: Ctl) -> None:
    name = ctl.add(LOOP)
    ctl.start()
    ctl.wait_state(name, "running")
    events = [json.loads(x) for x in ctl.run("events", "--json").stdout.splitlines()]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    last = seqs[-1]
    with tempfile.TemporaryFile() as out:
        proc = ctl.cf.spawn([CTL, "--socket", ctl.sock, "events", "-f", "--json",
                             "--since", str(last)], stdout=out, stderr=subprocess.STDOUT)
        try:
            ctl.run("restart", name)
            deadline = time.monotonic() + TIMEOUT
            while True:
                out.seek(0)
                text = out.read().decode()
                if '"to":"running"' in text:
                    break
                assert time.monotonic() < deadline, text
                assert proc.poll() is None, text
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGINT)
            ctl.cf.wait_tracked(proc, 10)
    followed = [json.loads(x) for x in text.splitlines()]
    assert followed[0]["seq"] == last + 1
    assert [e["seq"] for e in followed] == list(range(last + 1, last + 1 + len(followed)))
    assert [e.get("to") for e in followed if e["type"] == "state"][:3] == [
        "stopping", "stopped", "starting"]
    human = ctl.run("events", "--since", str(last)).stdout
    assert f"{name} action: restart by uid 0" in human
    assert ctl.terminate() == 0


# --- access --------------------------------------------------------------------------------


@pytest.mark.root
def test_a_non_root_peer_is_refused_by_credentials_and_logged(ctl: Ctl) -> None:
    ctl.add(LOOP)
    ctl.start()
    source = ctl.open_to(NOBODY)
    # The file mode alone keeps nobody out ...
    res = ctl.as_user([SYSTEM_PYTHON, "-I", source, "--socket", ctl.sock, "list"],
                      NOBODY, NOBODY)
    assert res.returncode == 1
    assert f"permission denied on {ctl.sock}" in res.stderr
    # ... and with the file open to all, the peer's credentials still do.
    os.chmod(ctl.sock, 0o666)
    res = ctl.as_user(_curl("--unix-socket", ctl.sock, "-w", "\n%{http_code}",
                            "http://corrald/v1/containers"), NOBODY, NOBODY)
    body, code = res.stdout.rsplit("\n", 1)
    assert code == "403"
    assert json.loads(body)["kind"] == "forbidden"
    res = ctl.as_user([SYSTEM_PYTHON, "-I", source, "--socket", ctl.sock, "stop",
                       ctl.names[0]], NOBODY, NOBODY)
    assert res.returncode == 1
    assert "uid 65534 is neither root nor in corrald's socket group" in res.stderr
    m = ctl.wait_for(r"control: refused uid 65534 gid 65534 pid (\d+) \(([^)]*)\)")
    assert int(m.group(1)) > 0
    assert ctl.entry(ctl.names[0])["state"] == "running"  # the refused stop did nothing
    assert ctl.terminate() == 0


@pytest.mark.root
def test_a_member_of_the_socket_group_is_allowed(ctl: Ctl) -> None:
    ctl.add(LOOP)
    ctl.start_with(socket_group="nogroup")
    st = os.stat(ctl.sock)
    assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o660", NOBODY)
    source = ctl.open_to(NOBODY)
    argv = [SYSTEM_PYTHON, "-I", source, "--socket", ctl.sock, "--json", "list"]
    res = ctl.as_user(argv, NOBODY, NOBODY)  # the group as primary group
    assert res.returncode == 0, res.stderr
    assert [e["name"] for e in json.loads(res.stdout)] == ctl.names
    os.chmod(ctl.sock, 0o666)  # past the file's group check: the credentials decide
    res = ctl.as_user(argv, NOBODY, 4242, (NOBODY,))  # as a supplementary group only
    assert res.returncode == 0, res.stderr
    assert "refused" not in ctl.text
    res = ctl.as_user(argv, NOBODY, 4242)  # in neither way
    assert res.returncode == 1
    assert "uid 65534 is neither root nor in corrald's socket group" in res.stderr
    ctl.wait_for(r"control: refused uid 65534 gid 4242 pid \d+")
    assert ctl.terminate() == 0


@pytest.mark.root
def test_an_unknown_socket_group_is_a_config_error(ctl: Ctl, tmp_path: Path) -> None:
    conf = tmp_path / "corrald.toml"
    conf.write_text('socket_group = "no-such-group-here"\n')
    res = ctl.cf.run_cmd([sys.executable, "-m", "corral.supervisor._main", "--config",
                          str(conf), "--config-dir", str(ctl.conf), "--root",
                          str(ctl.rt.state_root), "--socket", ctl.sock], timeout=30)
    assert res.returncode == 2
    assert f"{conf}: socket_group: no group is named 'no-such-group-here'" in res.stderr


# --- bad clients ---------------------------------------------------------------------------


@pytest.mark.root
def test_bad_and_stalled_clients_do_not_hold_up_the_others(ctl: Ctl) -> None:
    name = ctl.add(LOOP)
    ctl.start()
    stalled = []
    try:
        for _ in range(5):  # connected, half a request, then silence
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(ctl.sock)
            s.sendall(b"GET /v1/contai")
            stalled.append(s)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(ctl.sock)
            s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
        big = "x" * 100_000
        res = ctl.cf.run_cmd(_curl("--unix-socket", ctl.sock, "-X", "POST", "-d",
                                   json.dumps({"signal": big}), "-w", "\n%{http_code}",
                                   f"http://corrald/v1/containers/{name}/kill"))
        assert res.stdout.rsplit("\n", 1)[1] == "413"
        for path, code in (("/v1/nothing", "404"), (f"/v1/containers/{name}/start?x=1", "405"),
                           ("/v2/containers", "404")):
            res = ctl.cf.run_cmd(_curl("--unix-socket", ctl.sock, "-w", "\n%{http_code}",
                                       f"http://corrald{path}"))
            body, got = res.stdout.rsplit("\n", 1)
            assert got == code, (path, res.stdout)
            assert json.loads(body)["error"]
        assert ctl.entry(name)["state"] == "running"  # served while five clients stall
    finally:
        for s in stalled:
            s.close()
    assert ctl.proc is not None
    assert ctl.proc.poll() is None
    assert ctl.terminate() == 0
