"""podman 4.3 (with conmon) running containers through corral (`podman --runtime corral`)."""

import os
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.clients]

TRAP_TERM = ("sh", "-c", 'trap "exit 7" TERM; trap "exit 10" USR1; while :; do sleep 0.1; done')


def cgroup_file(pid: int, v1_ctrl: str, v1_file: str, v2_file: str) -> Path:
    """The file of process pid's cgroup: v1 controller's if mounted, else the unified one."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if v1_ctrl in ctrls.split(","):
            return Path("/sys/fs/cgroup", v1_ctrl, path.lstrip("/"), v1_file)
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup", line[3:].lstrip("/"), v2_file)
    raise AssertionError(f"no {v1_ctrl} cgroup for {pid}")


def test_run_output_exit_code_and_stdin(podman):
    res = podman(
        "run",
        "--rm",
        *podman.run_opts,
        podman.image,
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
        check=False,
    )
    assert res.returncode == 3, f"{res}\n{podman.describe()}"
    assert "out" in res.stdout
    assert "err" in res.stderr
    res = podman(
        "run",
        "--rm",
        "-i",
        *podman.run_opts,
        podman.image,
        "sh",
        "-c",
        "cat; exit 0",
        input="from stdin\n",
    )
    assert res.stdout == "from stdin\n"
    res = podman("run", "--rm", *podman.run_opts, podman.image, "no-such-command", check=False)
    assert res.returncode == 127, res
    assert "executable file not found" in res.stderr


def test_run_tty(podman):
    rc, out = podman.tty(
        "run",
        "--rm",
        "-t",
        *podman.run_opts,
        podman.image,
        "sh",
        "-c",
        "tty; [ -t 0 ] && [ -t 1 ] && echo both-ttys; exit 5",
    )
    assert rc == 5, f"{out}\n{podman.describe()}"
    assert "/dev/pts/0" in out
    assert "both-ttys" in out
    assert any("--console-socket" in c for c in podman.calls() if c.startswith("create"))


def test_run_detached_and_exec(podman):
    podman.run_detached("c1", "sleep", "1000")
    assert podman.status("c1") == "running"
    res = podman("exec", "c1", "sh", "-c", "echo $((6*7)); echo e >&2; exit 4", check=False)
    assert res.returncode == 4, f"{res}\n{podman.describe()}"
    assert res.stdout == "42\n"
    assert res.stderr == "e\n"
    res = podman("exec", "-i", "c1", "cat", input="piped\n")
    assert res.stdout == "piped\n"
    # The exec'd process is in the container: same pid namespace as its init.
    res = podman("exec", "c1", "sh", "-c", "cat /proc/1/cmdline")
    assert res.stdout.startswith("sleep")
    # podman's default seccomp profile is in force, in the init and in what exec starts.
    res = podman("exec", "c1", "sh", "-c", "grep Seccomp: /proc/1/status /proc/self/status")
    assert [line.split()[-1] for line in res.stdout.splitlines()] == ["2", "2"], res.stdout
    # runc's messages, which podman maps to the shell's codes.
    res = podman("exec", "c1", "no-such-command", check=False)
    assert res.returncode == 127, res
    res = podman("exec", "c1", "/etc/passwd", check=False)
    assert res.returncode == 126, res
    podman("rm", "-f", "-t", "0", "c1")


def test_exec_tty(podman):
    podman.run_detached("c1", "sleep", "1000")
    rc, out = podman.tty("exec", "-t", "c1", "sh", "-c", "tty; [ -t 1 ] && echo is-a-tty; exit 6")
    assert rc == 6, f"{out}\n{podman.describe()}"
    assert "/dev/pts/" in out
    assert "is-a-tty" in out
    assert any(
        "--tty" in c and "--console-socket" in c for c in podman.calls() if c.startswith("exec")
    )
    podman("rm", "-f", "-t", "0", "c1")


def test_stop(podman):
    # A container that handles SIGTERM stops on it, with its own exit code.
    podman.run_detached("term", *TRAP_TERM)
    t0 = time.monotonic()
    podman("stop", "-t", "10", "term", timeout=30)
    assert time.monotonic() - t0 < 5
    assert podman.status("term") == "exited"
    assert podman.inspect("term", "{{.State.ExitCode}}") == "7"
    # One that ignores it (sleep as pid 1) is killed after the timeout.
    podman.run_detached("stubborn", "sleep", "1000")
    t0 = time.monotonic()
    podman("stop", "-t", "1", "stubborn", timeout=30)
    assert time.monotonic() - t0 < 8
    assert podman.status("stubborn") == "exited"
    assert podman.inspect("stubborn", "{{.State.ExitCode}}") == "137"
    # A stopped container starts again.
    podman("start", "term")
    assert podman.status("term") == "running"
    podman("kill", "-s", "USR1", "term")
    assert podman.wait_for(lambda: podman.status("term") == "exited", 10, 0.1)
    assert podman.inspect("term", "{{.State.ExitCode}}") == "10"
    assert any(c.endswith(" 10") for c in podman.calls() if c.startswith("kill ")), (
        podman.describe()
    )
    podman("rm", "term", "stubborn")


def test_pause_unpause(podman):
    podman.run_detached("c1", "sh", "-c", "while :; do date +%s%N > /tmp/tick; sleep 0.05; done")
    podman("pause", "c1")
    assert podman.status("c1") == "paused"
    pid = int(podman.inspect("c1", "{{.State.Pid}}"))
    freezer = cgroup_file(pid, "freezer", "freezer.state", "cgroup.freeze")
    assert freezer.read_text().strip() in ("FROZEN", "1")
    podman("unpause", "c1")
    assert podman.status("c1") == "running"
    assert podman("exec", "c1", "true").returncode == 0
    podman("rm", "-f", "-t", "0", "c1")


def test_update_memory(podman):
    podman.run_detached("c1", "sleep", "1000")
    podman("update", "--memory", "64m", "c1")
    pid = int(podman.inspect("c1", "{{.State.Pid}}"))
    limit = cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max")
    assert limit.read_text().strip() == str(64 << 20)
    assert any(c.startswith("update --resources=") for c in podman.calls()), podman.describe()
    podman("rm", "-f", "-t", "0", "c1")


def test_restart(podman):
    podman.run_detached("c1", *TRAP_TERM)
    pid1 = podman.inspect("c1", "{{.State.Pid}}")
    podman("restart", "-t", "5", "c1", timeout=30)
    assert podman.status("c1") == "running"
    pid2 = podman.inspect("c1", "{{.State.Pid}}")
    assert pid2 != pid1
    assert os.path.exists(f"/proc/{pid2}")
    res = podman("exec", "c1", "echo", "again")
    assert res.stdout == "again\n"
    podman("rm", "-f", "-t", "0", "c1")


def test_rm_force(podman):
    podman.run_detached("c1", "sleep", "1000")
    pid = int(podman.inspect("c1", "{{.State.Pid}}"))
    t0 = time.monotonic()
    podman("rm", "-f", "-t", "0", "c1", timeout=30)
    assert time.monotonic() - t0 < 10
    assert podman.container_ids() == []
    assert podman.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5)
    assert os.listdir(podman.state_root) == []
