"""More real-container tests: terminal proxying, in-container hooks, cgroup placement and
cleanup, the pid-reuse guard, session keyrings, rootfs propagation, sysctl errors and exit
statuses of `run`."""

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import termios
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

CGROUP_ROOT = Path("/sys/fs/cgroup")
SLEEP = ("sleep", "30")


def read_until(fd, want, timeout=10.0, proc=None):
    """Read fd until `want` (bytes) was seen, EOF/EIO, or the timeout; return all read."""
    buf = b""
    deadline = time.monotonic() + timeout
    while want not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            if proc is not None and proc.poll() is not None:
                # drain what is left, then stop
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    break
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError as e:
            if e.errno == errno.EIO:  # pty: every slave closed
                break
            raise
        if not chunk:
            break
        buf += chunk
    return buf


def state_file(rt, cid):
    return rt.state_root / cid / "state.json"


# -- run with a terminal and no console socket -----------------------------------------------


def _run_under_pty(rt, cf, args, stdin_tty=True, send=None):
    """`corral run` of a terminal container with our own pty as its stdio.

    Returns (exit status, everything read from our pty master)."""
    b = rt.make_bundle(args=args, changes={"process": {"terminal": True}})
    cid = rt.new_id()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 97, 0, 0))
    before = termios.tcgetattr(slave)
    try:
        proc = cf.spawn(
            rt.argv("run", "--bundle", b.path, cid),
            stdin=slave if stdin_tty else subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        slave = -1
        out = b""
        if send is not None:
            wait_for, data = send
            out = read_until(master, wait_for, proc=proc)
            os.write(master, data)
        out += read_until(master, b"\0never\0", timeout=20, proc=proc)
        rc = cf.wait_tracked(proc, 20)
        # On Linux the master reports the slave's settings: corral must have restored them
        # after putting our terminal in raw mode.
        assert termios.tcgetattr(master) == before
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return rc, out.decode(errors="replace")


def test_run_terminal_proxies_pty(rt, cf):
    rc, out = _run_under_pty(
        rt,
        cf,
        ("sh", "-c", 'echo hello-tty; tty; read line; echo "got:$line"; exit 3'),
        send=(b"hello-tty", b"abc\n"),
    )
    assert rc == 3, out
    assert "hello-tty\r\n" in out
    assert "/dev/pts/0" in out or "/dev/console" in out, out
    assert "got:abc" in out


def test_run_terminal_window_size_at_start(rt, cf):
    # The container's terminal must have our window size (33x97) from its first instruction,
    # not only once the proxy loop is running.
    rc, out = _run_under_pty(rt, cf, ("stty", "size"))
    assert rc == 0, out
    assert out == "33 97\r\n"


def test_run_terminal_stdin_not_a_tty(rt, cf):
    rc, out = _run_under_pty(
        rt, cf, ("sh", "-c", "echo hello-tty; tty; exit 5"), stdin_tty=False
    )
    assert rc == 5, out
    assert "hello-tty" in out
    assert "/dev/pts/0" in out or "/dev/console" in out, out


def test_run_terminal_output_to_file(rt):
    # stdin an empty file, stdout a file: nothing of ours is a terminal.
    rc, out, err = rt.run_container(
        {"process": {"terminal": True}}, ("sh", "-c", "echo hello-tty; test -t 0 && echo tty0")
    )
    assert rc == 0, err
    assert out.replace("\r\n", "\n") == "hello-tty\ntty0\n"


# -- createContainer / startContainer hooks --------------------------------------------------


def _hook_script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


HOOK_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]


def test_create_and_start_container_hooks(rt, make_bundle, tmp_path):
    hooks_dir = tmp_path / "hooks"
    hooks_dir.mkdir()
    created_marker = tmp_path / "created-marker"
    create_hook = _hook_script(
        tmp_path / "create-hook.sh",
        f'cat > "{created_marker}"\nreadlink /proc/self/ns/mnt > "{created_marker}.ns"\n',
    )
    _hook_script(
        hooks_dir / "script.sh",
        "{ cat; echo; hostname; } > /hooks/out.tmp; mv /hooks/out.tmp /hooks/out\n",
    )
    b = make_bundle(
        args=SLEEP,
        changes=lambda c: (
            c["mounts"].append(
                {
                    "destination": "/hooks",
                    "type": "bind",
                    "source": str(hooks_dir),
                    "options": ["rbind", "rw"],
                }
            ),
            c.update(
                hooks={
                    "createContainer": [{"path": create_hook, "env": HOOK_ENV}],
                    "startContainer": [{"path": "/hooks/script.sh", "env": HOOK_ENV}],
                }
            ),
        ),
    )
    cid = rt.create(b)
    state = json.loads(created_marker.read_text())
    assert state["id"] == cid
    assert state["pid"] == rt.state(cid)["pid"]
    # createContainer runs in the container's mount namespace.
    init_ns = os.readlink(f"/proc/{state['pid']}/ns/mnt")
    assert Path(f"{created_marker}.ns").read_text().strip() == init_ns
    assert init_ns != os.readlink("/proc/self/ns/mnt")
    assert not (hooks_dir / "out").exists()  # startContainer waits for start

    rt("start", cid)
    out = hooks_dir / "out"
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.exists(), "startContainer hook did not run"
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["id"] == cid
    assert lines[-1] == "corral"  # ran inside the container's uts namespace
    rt("delete", "--force", cid)


def test_failing_create_container_hook(rt, make_bundle, tmp_path):
    marker = tmp_path / "ran"
    hook = _hook_script(tmp_path / "fail.sh", f'touch "{marker}"\necho hook-said-no >&2\nexit 7\n')
    b = make_bundle(args=SLEEP, changes={"hooks": {"createContainer": [{"path": hook}]}})
    cid = rt.new_id()
    res = rt("create", "--bundle", b.path, cid, check=False)
    assert res.returncode == 1, res.stderr
    assert "hooks.createContainer[0]" in res.stderr
    assert "hook-said-no" in res.stderr
    assert marker.exists()
    assert rt("state", cid, check=False).returncode == 1
    assert rt("list", "-q").stdout.split() == []
    assert rt.leftovers() == []


# -- cgroups ---------------------------------------------------------------------------------


def _v1_or_skip():
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        pytest.skip("cgroup v2 host; these paths are for v1/hybrid")
    if not (CGROUP_ROOT / "memory" / "cgroup.procs").exists():
        pytest.skip("no v1 memory hierarchy")


def _procs(d):
    return [int(x) for x in (Path(d) / "cgroup.procs").read_text().split()]


def test_cgroup_default_path(rt, make_bundle):
    _v1_or_skip()
    b = make_bundle(args=SLEEP)
    cid = rt.create(b)
    rt("start", cid)
    pid = rt.state(cid)["pid"]
    mem = CGROUP_ROOT / "memory" / "corral" / cid
    assert pid in _procs(mem)
    cg = json.loads(state_file(rt, cid).read_text())["cgroup"]
    for key, d in cg["paths"].items():
        assert pid in _procs(d), key
    if cg.get("unified"):
        assert cg["unified"] == str(CGROUP_ROOT / "unified" / "corral" / cid)
        assert pid in _procs(cg["unified"])
    rt("delete", "--force", cid)
    assert not mem.exists()
    for d in [*cg["paths"].values(), cg.get("unified")]:
        if d:
            assert not os.path.exists(d), d


def test_cgroup_explicit_path_keeps_foreign_parent(rt, make_bundle):
    _v1_or_skip()
    parent_name = f"corraltest-{uuid.uuid4().hex[:8]}"
    foreign_parent = CGROUP_ROOT / "pids" / parent_name
    foreign_parent.mkdir()
    try:
        cid = rt.new_id()
        b = make_bundle(args=SLEEP, changes={"linux": {"cgroupsPath": f"/{parent_name}/{cid}"}})
        rt.create(b, cid=cid)
        rt("start", cid)
        pid = rt.state(cid)["pid"]
        assert pid in _procs(CGROUP_ROOT / "memory" / parent_name / cid)
        assert pid in _procs(foreign_parent / cid)
        assert not (CGROUP_ROOT / "memory" / "corral" / cid).exists()
        cg = json.loads(state_file(rt, cid).read_text())["cgroup"]
        assert str(foreign_parent) not in cg["created"]
        rt("delete", cid, check=False)  # running: refused
        assert rt.status(cid) == "running"
        rt("kill", cid, "KILL")
        assert rt.wait_status(cid, "stopped") == "stopped"
        rt("delete", cid)
        assert foreign_parent.is_dir(), "corral removed a cgroup it did not create"
        assert not (foreign_parent / cid).exists()
        for ctrl in ("memory", "cpu", "freezer", "unified"):
            made = CGROUP_ROOT / ctrl / parent_name
            if (CGROUP_ROOT / ctrl).is_dir():
                assert not made.exists(), f"corral left {made} behind"
    finally:
        for ctrl in CGROUP_ROOT.iterdir():
            d = ctrl / parent_name
            if d.is_dir() and not ctrl.is_symlink():
                for sub in sorted(d.glob("*/"), reverse=True):
                    with contextlib.suppress(OSError):
                        sub.rmdir()
                with contextlib.suppress(OSError):
                    d.rmdir()


# -- the pid-reuse guard ---------------------------------------------------------------------


def test_pid_reuse_guard(rt, make_bundle):
    cid = rt.create(make_bundle(args=SLEEP))
    path = state_file(rt, cid)
    original = path.read_text()
    data = json.loads(original)
    pid = data["pid"]
    data["start_time"] += 12345
    path.write_text(json.dumps(data))
    try:
        st = rt.state(cid)
        assert st["status"] == "stopped"
        assert st["pid"] == 0
        res = rt("kill", cid, "KILL", check=False)
        assert res.returncode == 1
        assert cid in res.stderr
        assert rt("start", cid, check=False).returncode == 1
        assert os.path.exists(f"/proc/{pid}")  # the real init was never signalled
    finally:
        path.write_text(original)
    assert rt.status(cid) == "created"
    rt("delete", cid)
    assert rt("list", "-q").stdout.split() == []


# -- session keyring -------------------------------------------------------------------------


def _no_masks(c):
    c["linux"]["maskedPaths"] = []


@pytest.mark.skipif(not os.path.exists("/proc/keys"), reason="kernel without /proc/keys")
def test_session_keyring(rt, make_bundle):
    b = make_bundle(args=("cat", "/proc/keys"), changes=_no_masks)
    cid = rt.new_id()
    res = rt("run", "--bundle", b.path, cid)
    assert f"_ses.{cid}" in res.stdout, res.stdout

    cid2 = rt.new_id()
    res = rt("run", "--no-new-keyring", "--bundle", b.path, cid2)
    assert f"_ses.{cid2}" not in res.stdout, res.stdout


# -- rootfs propagation ----------------------------------------------------------------------


def _mount(*args):
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.mark.parametrize(("propagation", "propagates"), [("rslave", True), ("rprivate", False)])
def test_rootfs_propagation(rt, make_bundle, tmp_path, propagation, propagates):
    shared = tmp_path / "shared"
    shared.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(shared))
    try:
        _mount("--make-shared", str(shared))
        b = make_bundle(
            args=SLEEP,
            changes=lambda c: (
                c["linux"].update(rootfsPropagation=propagation),
                c["mounts"].append(
                    {
                        "destination": "/run",
                        "type": "bind",
                        "source": str(shared),
                        "options": ["rbind"],
                    }
                ),
            ),
        )
        cid = rt.create(b)
        rt("start", cid)
        pid = rt.state(cid)["pid"]
        (shared / "sub").mkdir()
        _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(shared / "sub"))
        points = [
            line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        ]
        assert "/run" in points
        assert ("/run/sub" in points) == propagates, points
        rt("delete", "--force", cid)
    finally:
        for p in (shared / "sub", shared):
            subprocess.run(["umount", "-l", str(p)], capture_output=True, check=False)


@pytest.mark.parametrize("propagation", ["rprivate", "rslave", "private", "slave"])
def test_rootfs_propagation_runs(rt, propagation):
    rc, out, err = rt.run_container(
        {"linux": {"rootfsPropagation": propagation}}, ("sh", "-c", "echo ok")
    )
    assert (rc, out) == (0, "ok\n"), err


# -- sysctl ----------------------------------------------------------------------------------


def test_bad_sysctl_value(rt, make_bundle):
    b = make_bundle(args=SLEEP, changes={"linux": {"sysctl": {"net.ipv4.ip_forward": "banana"}}})
    cid = rt.new_id()
    res = rt("create", "--bundle", b.path, cid, check=False)
    assert res.returncode == 1
    assert "linux.sysctl.net.ipv4.ip_forward" in res.stderr
    assert rt("state", cid, check=False).returncode == 1
    assert rt.leftovers() == []


# -- run: signals and exit statuses ----------------------------------------------------------


def test_run_forwards_sigterm(rt, make_bundle, cf, tmp_path):
    script = 'trap "exit 42" TERM; echo ready; while :; do sleep 0.1; done'
    b = make_bundle(args=("sh", "-c", script))
    cid = rt.new_id()
    r, w = os.pipe()
    with open(tmp_path / "stderr", "wb") as err:
        proc = cf.spawn(
            rt.argv("run", "--bundle", b.path, cid), stdin=subprocess.DEVNULL, stdout=w, stderr=err
        )
    os.close(w)
    try:
        assert rt.wait_status(cid, "running") == "running"
        # the trap is set once "ready" is printed (before that SIGTERM would be ignored by pid 1)
        assert b"ready" in read_until(r, b"ready\n", proc=proc)
        os.kill(proc.pid, signal.SIGTERM)
        rc = cf.wait_tracked(proc, 20)
    finally:
        os.close(r)
    assert rc == 42, (tmp_path / "stderr").read_text()
    assert rt("state", cid, check=False).returncode == 1  # run deleted it


def test_run_exit_by_signal(rt):
    # Without a pid namespace the shell is not pid 1, so it can SIGKILL itself.
    def no_pidns(c):
        c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "pid"]

    rc, _, err = rt.run_container(no_pidns, ("sh", "-c", "kill -KILL $$"))
    assert rc == 137, err


def test_run_killed_from_outside(rt, make_bundle, cf, tmp_path):
    b = make_bundle(args=("sh", "-c", "echo ready; sleep 30"))
    cid = rt.new_id()
    r, w = os.pipe()
    proc = cf.spawn(
        rt.argv("run", "--bundle", b.path, cid),
        stdin=subprocess.DEVNULL,
        stdout=w,
        stderr=subprocess.DEVNULL,
    )
    os.close(w)
    try:
        assert b"ready" in read_until(r, b"ready\n", proc=proc)
        rt("kill", cid, "KILL")
        rc = cf.wait_tracked(proc, 20)
    finally:
        os.close(r)
    assert rc == 137


@pytest.mark.root
def test_delete_force_removes_a_container_whose_state_file_is_torn(rt, make_bundle):
    """state.json is written without fsync: after a power loss (with /run on disk) it can be
    empty. `delete` says it is corrupt; `delete --force` removes it, saying so."""
    cid = rt.create(make_bundle(args=["true"]))
    rt("delete", "--force", cid)  # nothing runs any more, as after a reboot
    d = rt.state_root / cid
    d.mkdir()
    (d / "state.json").write_bytes(b"")
    res = rt("delete", cid, check=False)
    assert res.returncode != 0
    assert f"container {cid!r}: state file is corrupt" in res.stderr
    res = rt("delete", "--force", cid)
    assert "removing its state directory" in res.stderr
    assert not d.exists()
