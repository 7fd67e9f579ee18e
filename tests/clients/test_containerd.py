"""containerd 1.6 (its io.containerd.runc.v2 shim, driven with `ctr`) running tasks through
corral (`ctr run --runc-binary corral`)."""

import os
import re

import pytest

pytestmark = [pytest.mark.root, pytest.mark.clients]

TRAP_TERM = ("sh", "-c", 'trap "exit 7" TERM; while :; do sleep 0.1; done')


def exit_code_of_delete(res) -> int:
    """`ctr task delete` reports a non-zero exit status as a warning on stderr."""
    m = re.search(r"exit with non-zero exit code (\d+)", res.stderr)
    return int(m.group(1)) if m else 0


def test_run_output_and_exit_code(containerd):
    cd = containerd
    res = cd(
        "run",
        "--rm",
        *cd.run_opts,
        cd.image,
        "r1",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
        check=False,
    )
    assert res.returncode == 3, f"{res}\n{cd.describe()}"
    assert res.stdout == "out\n"
    assert res.stderr == "err\n"
    res = cd("run", "--rm", *cd.run_opts, cd.image, "r2", "true")
    assert res.returncode == 0
    # The shim gives corral runc's global flags: a state root of its own and a JSON log.
    create = next(c for c in cd.calls() if " create " in f" {c} ")
    assert "--log-format json" in create
    assert f"--root {cd.runc_root / cd.namespace}" in create


def test_run_tty(containerd):
    cd = containerd
    rc, out = cd.tty(
        "run",
        "--rm",
        "-t",
        *cd.run_opts,
        cd.image,
        "r1",
        "sh",
        "-c",
        "tty; [ -t 0 ] && [ -t 1 ] && echo both-ttys; exit 5",
    )
    assert rc == 5, f"{out}\n{cd.describe()}"
    assert "/dev/pts/0" in out
    assert "both-ttys" in out
    assert any("--console-socket" in c for c in cd.calls() if " create " in f" {c} ")


def test_exec_ps_pause_kill_delete(containerd):
    cd = containerd
    cd("run", "-d", *cd.run_opts, cd.image, "c1", *TRAP_TERM)
    assert cd.task_status("c1") == "RUNNING"
    pid = int(cd("task", "ls").stdout.split("c1", 1)[1].split()[0])

    res = cd(
        "task",
        "exec",
        "--exec-id",
        "x1",
        "--fifo-dir",
        str(cd.fifo_dir),
        "c1",
        "sh",
        "-c",
        "echo $((6*7)); echo e >&2; exit 4",
        check=False,
    )
    assert res.returncode == 4, f"{res}\n{cd.describe()}"
    assert res.stdout == "42\n"
    assert res.stderr == "e\n"
    rc, out = cd.tty(
        "task",
        "exec",
        "-t",
        "--exec-id",
        "x2",
        "--fifo-dir",
        str(cd.fifo_dir),
        "c1",
        "sh",
        "-c",
        "tty; exit 6",
    )
    assert rc == 6, f"{out}\n{cd.describe()}"
    assert "/dev/pts/" in out

    res = cd("task", "ps", "c1")
    assert str(pid) in res.stdout.split()

    cd("task", "pause", "c1")
    assert cd.task_status("c1") == "PAUSED"
    cd("task", "resume", "c1")
    assert cd.task_status("c1") == "RUNNING"

    cd("task", "kill", "c1")  # SIGTERM: the trap exits 7
    assert cd.wait_for(lambda: cd.task_status("c1") == "STOPPED", 10, 0.1), cd.describe()
    res = cd("task", "delete", "c1")
    assert exit_code_of_delete(res) == 7
    cd("container", "delete", "c1")
    assert not os.path.exists(f"/proc/{pid}")
    calls = cd.calls()
    for want in (
        "exec --process",
        "ps --format json c1",
        "pause c1",
        "resume c1",
        "kill c1 15",
        "delete c1",
    ):
        assert any(want in c for c in calls), f"no '{want}' in\n{cd.describe()}"


def test_kill_all_and_force_delete(containerd):
    cd = containerd
    cd("run", "-d", *cd.run_opts, cd.image, "c1", "sh", "-c", "sleep 1000 & sleep 1000")
    cd("task", "kill", "--all", "-s", "KILL", "c1")
    assert cd.wait_for(lambda: cd.task_status("c1") == "STOPPED", 10, 0.1), cd.describe()
    assert exit_code_of_delete(cd("task", "delete", "c1")) == 137
    cd("container", "delete", "c1")
    assert any(c.endswith(" kill --all c1 9") for c in cd.calls()), cd.describe()

    # A running task deleted with --force: the shim kills it through corral.
    cd("run", "-d", *cd.run_opts, cd.image, "c2", "sleep", "1000")
    cd("task", "delete", "--force", "c2", timeout=30)
    cd("container", "delete", "c2")
    assert cd.task_status("c2") is None
