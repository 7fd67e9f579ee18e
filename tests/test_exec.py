"""`corral exec`: the args form with runc's flags, --process FILE, terminals, detach, errors."""

import json
import os
import socket
import time

import pytest

pytestmark = pytest.mark.root

SLEEP = ("sleep", "60")


@pytest.fixture
def running(rt, make_bundle):
    """A detached, running container (sleep) and its id."""
    cid = rt.new_id()
    rt("run", "--detach", "--bundle", make_bundle(args=SLEEP).path, cid)
    assert rt.status(cid) == "running"
    return cid


def test_exec_output_and_exit_status(rt, running):
    res = rt("exec", running, "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert res.returncode == 7
    assert res.stdout == "out\n"
    assert "err" in res.stderr


def test_exec_joins_the_containers_namespaces(rt, running, host_ns):
    res = rt("exec", running, "sh", "-c",
             "hostname; readlink /proc/self/ns/net; readlink /proc/self/ns/mnt; echo $$")
    hostname, net, mnt, pid = res.stdout.split()
    assert hostname == "corral"
    assert net != host_ns("net")
    assert mnt != host_ns("mnt")
    assert int(pid) > 1  # in the container's pid namespace, beside its init (pid 1)
    init = rt("exec", running, "cat", "/proc/1/cmdline").stdout
    assert init.split("\0")[0] == "sleep"


def test_exec_in_the_containers_cgroup(rt, running):
    out = rt("exec", running, "cat", "/proc/self/cgroup").stdout
    assert f"/corral/{running}" in out


def test_exec_env_user_cwd_gids(rt, running):
    res = rt("exec", "-e", "FOO=bar", "--env", "PATH=/bin:/usr/bin", "--user", "1000:1001",
             "--additional-gids", "5", "-g", "7", "--cwd", "/tmp", running, "sh", "-c",
             "echo $FOO $PATH; id -u; id -g; id -G; pwd")
    lines = res.stdout.split("\n")
    assert lines[0] == "bar /bin:/usr/bin"
    assert lines[1:3] == ["1000", "1001"]
    assert set(lines[3].split()) == {"1001", "5", "7"}
    assert lines[4] == "/tmp"


def test_exec_cap_and_no_new_privs(rt, running):
    out = rt("exec", "--cap", "CAP_SYS_ADMIN", "--no-new-privs", running, "grep", "-E",
             "CapEff|NoNewPrivs", "/proc/self/status").stdout
    eff = int(out.split("CapEff:")[1].split()[0], 16)
    assert eff & (1 << 21)  # CAP_SYS_ADMIN
    assert "NoNewPrivs:\t1" in out


def test_exec_process_file(rt, running, tmp_path):
    proc = {"args": ["sh", "-c", "echo $X; pwd; id -u"], "cwd": "/proc",
            "env": ["PATH=/bin:/usr/bin", "X=from-file"], "user": {"uid": 123, "gid": 123}}
    path = tmp_path / "process.json"
    path.write_text(json.dumps(proc))
    assert rt("exec", "--process", path, running).stdout.split() == ["from-file", "/proc", "123"]


def test_exec_process_file_bad_field(rt, running, tmp_path):
    path = tmp_path / "process.json"
    path.write_text(json.dumps({"args": "sh", "cwd": "/"}))
    res = rt("exec", "--process", path, running, check=False)
    assert res.returncode == 1
    assert "args" in res.stderr
    assert str(path) in res.stderr


def test_exec_detach_pid_file(rt, running, tmp_path):
    pid_file = tmp_path / "exec.pid"
    rt("exec", "--detach", "--pid-file", pid_file, running, "sleep", "30")
    pid = int(pid_file.read_text())
    pids = json.loads(rt("ps", "--format", "json", running).stdout)
    assert pid in pids


def test_exec_preserve_fds(rt, running, tmp_path):
    data = tmp_path / "data"
    data.write_text("through fd 3\n")
    # The shell opens the file as fd 3 and then execs the runtime.
    argv = ["/bin/sh", "-c", 'exec "$@" 3<"$0"', str(data),
            *rt.argv("exec", "--preserve-fds", "1", running, "sh", "-c",
                     "cat <&3; ls /proc/$$/fd; true")]
    lines = rt.raw(argv).stdout.splitlines()
    assert lines[0] == "through fd 3"
    assert sorted(lines[1:], key=int) == ["0", "1", "2", "3"]


def test_exec_tty_console_socket(rt, running, tmp_path):
    sock_path = str(tmp_path / "console.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)
    try:
        rt("exec", "--tty", "--detach", "--console-socket", sock_path, running, "sh", "-c",
           "tty; echo hello-exec-tty")
        conn, _ = srv.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        conn.close()
        master = fds[0]
        out = b""
        deadline = time.monotonic() + 10
        while b"hello-exec-tty" not in out and time.monotonic() < deadline:
            try:
                chunk = os.read(master, 1024)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
    finally:
        srv.close()
    assert b"hello-exec-tty" in out
    assert b"/dev/pts/" in out


def test_exec_paused_and_stopped_are_errors(rt, running):
    rt("pause", running)
    res = rt("exec", running, "true", check=False)
    assert res.returncode == 1
    assert "paused" in res.stderr
    rt("resume", running)
    rt("kill", running, "KILL")
    assert rt.wait_status(running, "stopped") == "stopped"
    res = rt("exec", running, "true", check=False)
    assert res.returncode == 1
    assert "stopped" in res.stderr


def test_exec_unknown_command_and_flag(rt, running):
    res = rt("exec", running, "no-such-binary", check=False)
    assert res.returncode == 1
    assert "no-such-binary" in res.stderr
    res = rt("exec", "--bogus", running, "true", check=False)
    assert res.returncode == 1
    assert "--bogus" in res.stderr
    # flags after the command belong to the command
    assert rt("exec", running, "echo", "-n", "--bogus").stdout == "--bogus"
