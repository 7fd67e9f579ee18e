"""Respawn in place (runtime/_respawn.py) and corrald's fast restart built on it.

The runtime part runs the library in a child Python (single-threaded, as the namespace
helper is: `prepare` unshares a pid namespace for its next fork) driven over stdin/stdout;
the container is made with the CLI and its init killed, then respawned in the namespaces
the child kept. The daemon part reads corrald's and the helper's log lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from corral.runtime._respawn import refusal

Runtime = Any  # conftest's Runtime (conftest cannot be imported with importlib mode)
Corrald = Any  # conftest's Corrald, the `corrald` fixture
TIMEOUT = 20.0
CTL = str(Path(sys.executable).with_name("corralctl"))

# The driver: keeps the namespaces of init PID, waits for "killed", then respawns (MODE go),
# only prepares and aborts (abort), or expects a failure (fail); prints one JSON line per
# step; kills and reaps what it started before it exits.
DRIVER = r"""
import json, os, signal, sys, time
from corral.runtime._errors import CorralError
from corral.runtime._respawn import abort, go, keep, prepare
from corral.runtime._state import Root

root, cid, pid = Root(sys.argv[1]), sys.argv[2], int(sys.argv[3])
mode, out = sys.argv[4], sys.argv[5]
def ns(p):
    return {n: os.readlink(f"/proc/{p}/ns/{n}") for n in ("mnt", "net", "uts", "ipc", "pid")}
before = ns(pid)
kept = keep(pid)
print(json.dumps({"kept": len(kept)}), flush=True)
sys.stdin.readline()  # the test killed the init and saw it stopped
standby = prepare(root, cid, kept)
res = {"before": before}
try:
    if mode == "abort":
        res["state"] = standby.poll(10)
        abort(standby)
        _, status = os.waitpid(standby.pid, 0)
        res["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    elif mode == "fail":
        try:
            go(root, standby, (0, 1, 2))
        except CorralError as e:
            res["error"] = str(e)
        os.waitpid(standby.pid, 0)
    else:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        new = go(root, standby, (null, fd, fd))
        res.update(pid=new, after=ns(new))
    print(json.dumps(res), flush=True)
    sys.stdin.readline()  # the test has looked
finally:
    if mode == "go":
        os.kill(standby.pid, signal.SIGKILL)
        os.waitpid(standby.pid, 0)
"""


class Driver:
    """The driver child: one JSON line per step, a line on stdin to go on."""

    def __init__(self, rt: Runtime, cf: Any, cid: str, pid: int, mode: str, out: Path) -> None:
        argv = [sys.executable, "-c", DRIVER, str(rt.state_root), cid, str(pid), mode, str(out)]
        self.cf = cf
        self.proc = cf.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            pytest.fail(f"the driver failed: {self.proc.stderr.read()}")
        data: dict[str, Any] = json.loads(line)
        return data

    def next(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        if self.proc.poll() is None:
            try:
                self.next()
            except BrokenPipeError:
                pass
        assert self.cf.wait_tracked(self.proc, TIMEOUT) == 0


def _created_and_killed(rt: Runtime, cf: Any, args: list[str], mode: str, out: Path,
                        changes: dict[str, Any] | None = None) -> tuple[str, Driver]:
    """A started container whose namespaces the driver keeps; its init killed (stopped)."""
    bundle = rt.make_bundle(args=args, changes=changes)
    cid = rt.create(bundle)
    rt("start", cid)
    pid = rt.state(cid)["pid"]
    drv = Driver(rt, cf, cid, pid, mode, out)
    assert drv.read() == {"kept": 5}
    rt("kill", cid, "KILL")
    assert rt.wait_status(cid, "stopped") == "stopped"
    drv.next()
    return cid, drv


@pytest.mark.root
@pytest.mark.cgroup
def test_respawn_keeps_the_namespaces_and_makes_a_new_pid_namespace_and_proc(
        rt: Runtime, cf: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = ("echo pid=$$; hostname; wc -c < /proc/timer_list; "
              "(echo x > /proc/sys/kernel/domainname) 2>/dev/null && echo sys-rw || echo sys-ro;"
              " ls /proc | grep -c '^[0-9]'; sleep 60")
    cid, drv = _created_and_killed(rt, cf, ["sh", "-c", script], "go", out,
                                   {"hostname": "respawned"})
    try:
        res = drv.read()
        before, after = res["before"], res["after"]
        for name in ("mnt", "net", "uts", "ipc"):
            assert after[name] == before[name], name
        assert after["pid"] != before["pid"]
        st = rt.state(cid)
        assert (st["status"], st["pid"]) == ("running", res["pid"])
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and out.read_text().count("\n") < 5:
            time.sleep(0.05)
        # pid 1 of a new pid namespace, the same hostname, /proc of this namespace (sh, ls
        # and grep at most), still masked (timer_list is /dev/null) and read-only under it
        lines = out.read_text().split()
        assert lines[:4] == ["pid=1", "respawned", "0", "sys-ro"], lines
        assert 1 <= int(lines[4]) <= 3, lines
        ps = rt("ps", "--format", "json", cid).stdout
        assert res["pid"] in json.loads(ps)
    finally:
        drv.finish()
    assert rt.wait_status(cid, "stopped") == "stopped"
    rt("delete", cid)


@pytest.mark.root
def test_an_aborted_standby_is_killed_and_the_container_stays_stopped(
        rt: Runtime, cf: Any, tmp_path: Path) -> None:
    cid, drv = _created_and_killed(rt, cf, ["sleep", "60"], "abort", tmp_path / "out")
    try:
        res = drv.read()
        assert res["state"] == "ready"
        assert res["signal"] == signal.SIGKILL
        assert rt.status(cid) == "stopped"
    finally:
        drv.finish()
    rt("delete", cid)


@pytest.mark.root
def test_a_respawn_that_cannot_exec_says_why_and_leaves_it_stopped(
        rt: Runtime, cf: Any, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    prog = extra / "prog"
    prog.write_text("#!/bin/sh\nexec sleep 60\n")
    prog.chmod(0o755)
    mount = {"destination": "/extra", "type": "bind", "source": str(extra),
             "options": ["rbind", "ro"]}

    def changes(cfg: dict[str, Any]) -> None:
        cfg["mounts"].append(mount)

    bundle = rt.make_bundle(args=["/extra/prog"], changes=changes)
    cid = rt.create(bundle)
    rt("start", cid)
    drv = Driver(rt, cf, cid, rt.state(cid)["pid"], "fail", tmp_path / "out")
    try:
        assert drv.read() == {"kept": 5}
        rt("kill", cid, "KILL")
        assert rt.wait_status(cid, "stopped") == "stopped"
        prog.unlink()
        drv.next()
        res = drv.read()
        assert "/extra/prog" in res["error"], res
        assert "respawn" in res["error"], res
        assert rt.status(cid) == "stopped"
    finally:
        drv.finish()
    rt("delete", cid)


def test_refusal_names_what_a_respawn_cannot_keep() -> None:
    base = {"process": {"args": ["sh"]},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}
    assert refusal(base) is None
    hooks = {**base, "hooks": {"poststop": [{"path": "/bin/true"}]}}
    assert refusal(hooks) == "it has hooks"
    assert refusal({**base, "hooks": {"prestart": []}}) is None
    user = {**base, "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"},
                                             {"type": "user"}]}}
    assert refusal(user) == "it has a user namespace"
    shared = {**base, "linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"},
                                               {"type": "mount"}]}}
    assert refusal(shared) == "it has no pid namespace of its own"
    assert refusal({**base, "linux": {"namespaces": [{"type": "mount"}]}}) == (
        "it has no pid namespace of its own")
    tty = {**base, "process": {"args": ["sh"], "terminal": True}}
    assert refusal(tty) == "it has a terminal"


# --- corrald ------------------------------------------------------------------------------


def _ctl(d: Corrald, *args: str) -> Any:
    res = d.cf.run_cmd([CTL, "--socket", str(d.ctl / "corrald.sock"), *args], timeout=60)
    assert res.returncode in (0, 3), (args, res.stdout, res.stderr)  # 3: not running
    return json.loads(res.stdout)


def _helper_ns_links(d: Corrald) -> set[str]:
    """The namespaces the (single) helper holds open, as /proc/PID/fd link texts."""
    out: set[str] = set()
    for pid in d.helper_pids():
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if re.match(r"(mnt|net|uts|ipc|cgroup):\[", link):
                    out.add(link)
        except OSError:
            continue
    return out


@pytest.mark.root
def test_corrald_respawns_a_crash_loop_in_place(corrald: Corrald) -> None:
    name = corrald.add("hostname; sleep 0.1; exit 3",
                       '[restart]\npolicy = "on-failure"\nmax_retries = 3\n'
                       'backoff_initial = "0s"\nbackoff_max = "0s"\nbackoff_jitter = 0.0\n'
                       'start_limit_interval = "0s"')
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> exited \(exited with code 3: gave up after 3")
    assert corrald.text.count(f"respawned {name}, init pid") == 3
    assert corrald.text.count(f"{name}: state backoff -> starting") == 3
    assert corrald.log_of(name).count(name) == 4  # every run's output: the same hostname
    # Given up: deleted, and the helper unpinned its namespaces.
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and name in corrald.rt("list", "-q").stdout.split():
        time.sleep(0.05)
    assert name not in corrald.rt("list", "-q").stdout.split()
    assert corrald.terminate() == 0


@pytest.mark.root
@pytest.mark.cgroup
def test_corrald_counts_each_oom_kill_of_a_respawned_container_once(corrald: Corrald) -> None:
    name = corrald.add("sleep 0.2; tail /dev/zero",
                       '[restart]\npolicy = "on-failure"\nmax_retries = 2\n'
                       'backoff_initial = "10ms"', memory="16M")
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> exited \(OOM-killed")
    assert corrald.text.count(f"respawned {name}, init pid") == 2
    causes = re.findall(rf"{name}: state running -> (?:backoff|exited) \((OOM-killed[^;:]*)",
                        corrald.text)
    assert causes == ["OOM-killed (container memory limit (16M))"] * 3
    assert _ctl(corrald, "status", name, "--json")["oom_kills"] == 3
    assert corrald.terminate() == 0


@pytest.mark.root
def test_corrald_respawns_after_a_backoff_longer_than_a_standby_lives(corrald: Corrald
                                                                      ) -> None:
    name = corrald.add("sleep 0.1; exit 1",
                       '[restart]\npolicy = "on-failure"\nmax_retries = 1\n'
                       'backoff_initial = "2500ms"\nbackoff_jitter = 0.0')
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> exited", timeout=30)
    assert corrald.text.count(f"respawned {name}, init pid") == 1
    assert corrald.terminate() == 0


@pytest.mark.root
def test_a_stop_during_backoff_deletes_the_kept_container_and_unpins_it(corrald: Corrald
                                                                        ) -> None:
    name = corrald.add("sleep 0.1; exit 1",
                       '[restart]\npolicy = "on-failure"\nbackoff_initial = "1h"\n'
                       'backoff_max = "1h"')
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> backoff")
    pinned = _helper_ns_links(corrald)
    assert any(link.startswith("mnt:") for link in pinned)  # kept while it waits
    assert corrald.rt.status(name) == "stopped"
    _ctl(corrald, "stop", name, "--json")
    corrald.wait_for(rf"{name}: state backoff -> stopped")
    assert corrald.rt.status(name) is None  # deleted
    assert not any(link.startswith("mnt:") for link in _helper_ns_links(corrald))
    assert corrald.terminate() == 0


@pytest.mark.root
@pytest.mark.cgroup
def test_a_respawned_container_keeps_its_tmpfs_and_is_in_all_its_cgroups(corrald: Corrald
                                                                         ) -> None:
    name = corrald.add("[ -e /dev/shm/again ] && exec sleep 60; touch /dev/shm/again; exit 1",
                       '[restart]\npolicy = "on-failure"\nbackoff_initial = "0s"\n'
                       'backoff_jitter = 0.0', memory="32M")
    corrald.start()
    m = corrald.wait_for(rf"{name}: state starting -> running \(pid (\d+)\)\n(?:.*\n)*?"
                         rf".*{name}: state starting -> running \(pid (\d+)\)")
    pid = int(m.group(2))
    assert corrald.text.count(f"respawned {name}, init pid {pid}") == 1, corrald.text
    cgroup = json.loads((corrald.rt.state_root / name / "state.json").read_text())["cgroup"]
    dirs = [cgroup["path"]] if cgroup["version"] == 2 else [
        *cgroup["paths"].values(), *([cgroup["unified"]] if cgroup.get("unified") else [])]
    # The v1 hierarchies at once; a hybrid host's unified one a moment later (settle_unified).
    deadline = time.monotonic() + TIMEOUT
    missing = dirs
    while missing and time.monotonic() < deadline:
        missing = [d for d in dirs
                   if str(pid) not in Path(d, "cgroup.procs").read_text().split()]
        time.sleep(0.05)
    assert not missing
    assert corrald.rt.state(name)["pid"] == pid
    assert corrald.terminate() == 0


@pytest.mark.root
def test_in_place_false_recreates_each_time_with_a_fresh_tmpfs(corrald: Corrald) -> None:
    name = corrald.add("[ -e /dev/shm/again ] && exec sleep 60; touch /dev/shm/again; exit 1",
                       '[restart]\npolicy = "on-failure"\nmax_retries = 2\n'
                       'backoff_initial = "0s"\nbackoff_jitter = 0.0\nin_place = false')
    corrald.start()
    corrald.wait_for(rf"{name}: state running -> exited \(exited with code 1: gave up after 2")
    assert corrald.text.count(f"created {name}, init pid") == 3  # the marker never survived
    assert f"respawned {name}" not in corrald.text
    assert corrald.terminate() == 0


@pytest.mark.root
def test_a_container_adopted_by_a_new_corrald_is_respawned_too(corrald: Corrald) -> None:
    name = corrald.add("sleep 2; exit 1",
                       '[restart]\npolicy = "on-failure"\nmax_retries = 1\n'
                       'backoff_initial = "0s"\nbackoff_jitter = 0.0')
    corrald.start()
    corrald.wait_for(rf"{name}: state starting -> running")
    corrald.kill9()
    corrald.start()  # adopts it; the helper released its pins when this daemon connected
    corrald.wait_for(rf"{name}: state running -> exited \(exited with code 1: gave up after 1")
    assert corrald.text.count(f"respawned {name}, init pid") == 1
    assert corrald.terminate() == 0
