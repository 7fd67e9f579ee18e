"""The exec stub (runtime/_stub.py, runtime/_stub.s): its embedded code is its source, it
works on its own (init and exec mode, errors), and in containers the processes that the
container can see are the stub from a sealed memfd, never the host's Python."""

import errno
import json
import os
import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from corral.runtime import _stub

REPO = Path(__file__).resolve().parent.parent
SLEEP = ("sleep", "60")
x86_64 = pytest.mark.skipif(not _stub.SUPPORTED, reason="the stub is x86-64 code")


@pytest.fixture
def corral(is_runc):
    """For tests of corral's own mechanism (runc passes the runtime-neutral ones)."""
    if is_runc:
        pytest.skip("corral's exec stub")


# --------------------------------------------------------------------------------------------
# The embedded code and the image
# --------------------------------------------------------------------------------------------


def test_embedded_code_matches_the_source():
    """scripts/build-stub re-assembles runtime/_stub.s: it must give the bytes in _stub.py."""
    res = subprocess.run([str(REPO / "scripts" / "build-stub"), "--print"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert bytes.fromhex(res.stdout.strip()) == _stub.CODE, (
        "runtime/_stub.py is stale: run scripts/build-stub")


def test_image_layout():
    img = _stub.image(_stub.MODE_EXEC, 5, 0, "/bin/true", "corral-exec", tty=True,
                      bpf=b"\x06\0\0\0\0\0\xff\x7f", seccomp_flags=2)
    magic, e_type, machine, _, entry, phoff = struct.unpack_from("<16sHHIQQ", img)
    assert magic.startswith(b"\x7fELF\x02\x01\x01")  # 64-bit, little-endian, version 1
    assert (e_type, machine, phoff) == (2, 62, 64)  # ET_EXEC, x86-64, right after the header
    load = struct.unpack_from("<IIQQQQQQ", img, 64)
    stack = struct.unpack_from("<IIQQQQQQ", img, 64 + 56)
    assert load[:2] == (1, 5)  # PT_LOAD, read+execute: the data block is read-only too
    assert load[5] == load[6] == len(img)
    assert stack[:2] == (0x6474E551, 6)  # PT_GNU_STACK, read+write: no executable stack
    code = entry - load[3]
    assert img[code:code + len(_stub.CODE)] == _stub.CODE
    head = struct.unpack_from("<12Q16s", img, code + len(_stub.CODE))
    assert head[:6] == (_stub.MODE_EXEC, 5, 0, 1, 2, 1)  # mode, fds, tty, flags, 1 insn
    data = code + len(_stub.CODE)
    assert img[data + head[6]:data + head[6] + 8] == b"\x06\0\0\0\0\0\xff\x7f"
    assert img[data + head[7]:].startswith(b"/bin/true\0")
    assert head[12].rstrip(b"\0") == b"corral-exec"


# --------------------------------------------------------------------------------------------
# The stub on its own, outside any container
# --------------------------------------------------------------------------------------------


def _mapped_files(maps: str) -> set[str]:
    return {fields[5] for line in maps.splitlines()
            if len(fields := line.split(None, 5)) == 6 and not fields[5].startswith("[")}


def _spawn_stub(img: bytes, args: list[str], keep: tuple[int, ...],
                stdout: int = -1, stderr: int = -1) -> int:
    """Fork a child that execs `img` from a sealed memfd, as the runtime does."""
    fd = _stub.memfd()
    _stub.fill(fd, img)
    pid = os.fork()
    if pid == 0:
        try:
            if stdout >= 0:
                os.dup2(stdout, 1)
            if stderr >= 0:
                os.dup2(stderr, 2)
            _stub.exec_stub(fd, args, ["X=from-env"], 0, keep)
        finally:
            os._exit(99)
    os.close(fd)
    return pid


def _drain(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 4096):
        out += chunk
    os.close(fd)
    return out


def _exit_status(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@x86_64
def test_stub_memfd_is_sealed():
    fd = _stub.memfd()
    try:
        _stub.fill(fd, b"\x7fELF")
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert os.fstat(fd).st_mode & 0o777 == 0o111  # exec it, never read it
    finally:
        os.close(fd)


@x86_64
def test_exec_mode_forks_reports_and_execs(tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    script = 'echo "$X $0 $1"; cat /proc/$$/comm'
    img = _stub.image(_stub.MODE_EXEC, theirs.fileno(), 0, "/bin/sh", "corral-exec")
    joiner = _spawn_stub(img, ["sh", "-c", script, "zero", "one"], (theirs.fileno(),), stdout=w)
    theirs.close()
    os.close(w)
    msgs = []
    while raw := ours.recv(64):
        msgs.append(raw)
    ours.close()
    assert _exit_status(joiner) == 0
    assert [len(m) for m in msgs] == [4]  # the child's pid, then end of file: it exec'd
    child = _stub.PID.unpack(msgs[0])[0]
    out = _drain(r).decode()
    # The child was reparented (to our reaper, or init): wait until it is gone.
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.splitlines() == ["from-env zero one", "sh"], out


@x86_64
def test_exec_mode_reports_a_failed_exec(tmp_path):
    bad = tmp_path / "not-an-elf"
    bad.write_bytes(b"\0\1\2 not a program\n")
    bad.chmod(0o755)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    img = _stub.image(_stub.MODE_EXEC, theirs.fileno(), 0, str(bad), "corral-exec")
    joiner = _spawn_stub(img, ["not-an-elf"], (theirs.fileno(),))
    theirs.close()
    msgs = []
    while raw := ours.recv(64):
        msgs.append(raw)
    ours.close()
    assert _exit_status(joiner) == 0
    assert sorted(len(m) for m in msgs) == [4, 8]  # the pid and the failure, in either order
    pid = next(_stub.PID.unpack(m)[0] for m in msgs if len(m) == 4)
    failure = next(_stub.FAILURE.unpack(m) for m in msgs if len(m) == 8)
    assert failure == (_stub.STEP_EXEC, errno.ENOEXEC)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)


@x86_64
@pytest.mark.parametrize("good", [True, False], ids=["execs", "exec-fails"])
def test_init_mode_reports_created_waits_then_execs(tmp_path, good):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fifo_r, fifo_w = os.pipe()  # stands for exec.fifo
    out_r, out_w = os.pipe()
    path = "/bin/echo"
    if not good:
        path = str(tmp_path / "not-an-elf")
        Path(path).write_bytes(b"\0garbage\n")
        Path(path).chmod(0o755)
    img = _stub.image(_stub.MODE_INIT, fifo_r, theirs.fileno(), path, "corral-init",
                      message=b'{"type": "created"}', steps=_stub.init_steps(path))
    pid = _spawn_stub(img, ["echo", "started"], (fifo_r, theirs.fileno()), stdout=out_w,
                      stderr=out_w)
    theirs.close()
    os.close(fifo_r)
    os.close(out_w)
    try:
        assert json.loads(ours.recv(1024)) == {"type": "created"}
        # Waiting for its answer, then for `start`: the stub, from the memfd, non-dumpable.
        assert "memfd:corral-stub" in os.readlink(f"/proc/{pid}/exe")
        ours.send(b'{"type": "ok"}')
        assert ours.recv(64) == b""  # it closed its end of the socket
        with open(f"/proc/{pid}/comm") as f:
            assert f.read() == "corral-init\n"
        with open(f"/proc/{pid}/maps") as f:
            assert _mapped_files(f.read()) == {"/memfd:corral-stub (deleted)"}
        os.write(fifo_w, b"0")  # `start`
    except BaseException:
        os.kill(pid, 9)
        raise
    finally:
        os.close(fifo_w)
        ours.close()
    status = _exit_status(pid)
    out = _drain(out_r).decode()
    if good:
        assert (status, out) == (0, "started\n")
    else:
        assert status == 127
        assert out == f"corral: container init: exec {path}: Exec format error\n"


@x86_64
@pytest.mark.parametrize("gone", ["runtime", "fifo-writer"])
def test_init_mode_gives_up_when_the_other_side_is_gone(gone):
    """End of file from the runtime (before its answer) or on the fifo: exit 1, never spin."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fifo_r, fifo_w = os.pipe()
    img = _stub.image(_stub.MODE_INIT, fifo_r, theirs.fileno(), "/bin/true", "corral-init",
                      message=b'{"type": "created"}', steps=_stub.init_steps("/bin/true"))
    pid = _spawn_stub(img, ["true"], (fifo_r, theirs.fileno()))
    theirs.close()
    os.close(fifo_r)
    try:
        assert ours.recv(1024) == b'{"type": "created"}'
        if gone == "fifo-writer":
            ours.send(b'{"type": "ok"}')
    finally:
        ours.close()
        os.close(fifo_w)
    assert _exit_status(pid) == 1


# --------------------------------------------------------------------------------------------
# In containers
# --------------------------------------------------------------------------------------------


def _ptrace_caps(c):
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SYS_PTRACE"]
    c["process"]["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps,
                                    "ambient": []}


@pytest.mark.root
@x86_64
def test_created_init_is_the_stub_from_a_memfd(corral, rt, make_bundle):
    cid = rt.create(make_bundle(args=("sh", "-c", "exit 3"), changes=_ptrace_caps))
    pid = rt.state(cid)["pid"]
    # Seen from the host...
    assert os.readlink(f"/proc/{pid}/exe") == "/memfd:corral-stub (deleted)"
    with open(f"/proc/{pid}/maps") as f:
        assert _mapped_files(f.read()) == {"/memfd:corral-stub (deleted)"}
    assert not any("memfd" in os.readlink(f"/proc/{pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{pid}/fd"))  # exec closed it
    # ... and from inside, by a process allowed to ptrace it.
    out = rt("exec", cid, "sh", "-c", "readlink /proc/1/exe; cat /proc/1/comm /proc/1/maps"
             ).stdout.splitlines()
    assert out[:2] == ["/memfd:corral-stub (deleted)", "corral-init"], out
    assert _mapped_files("\n".join(out[2:])) == {"/memfd:corral-stub (deleted)"}, out
    rt("start", cid)
    assert rt.wait_status(cid, "stopped") == "stopped"
    rt("delete", cid)


@pytest.mark.root
@x86_64
def test_start_container_hooks_keep_the_python_init(corral, rt, make_bundle):
    """The documented fallback: startContainer hooks run in the init after `start`, so the
    waiting init stays Python (non-dumpable: its exe cannot even be read from inside)."""
    hook = {"path": "/bin/true"}
    cid = rt.create(make_bundle(args=SLEEP, changes={"hooks": {"startContainer": [hook]}}))
    pid = rt.state(cid)["pid"]
    assert "memfd" not in os.readlink(f"/proc/{pid}/exe")
    res = rt("exec", cid, "readlink", "/proc/1/exe", check=False)
    assert res.returncode != 0
    assert res.stdout == ""
    rt("start", cid)
    assert rt.wait_status(cid, "running") == "running"
    rt("delete", "--force", cid)


def _not_an_elf(tmp_path: Path):
    bad = tmp_path / "not-an-elf"
    bad.write_bytes(b"\0\1\2 this is not a program\n")
    bad.chmod(0o755)

    def change(c):
        c["mounts"].append({"destination": "/not-an-elf", "type": "bind", "source": str(bad),
                            "options": ["bind", "ro"]})

    return change


@pytest.mark.root
def test_exec_failure_after_start_is_reported(corral, rt, make_bundle, tmp_path):
    """The file exists and is executable (so create's lookup accepts it), but the kernel
    refuses to run it: the init says so on stderr and the container exits 127."""
    rc, out, err = rt.run_container(_not_an_elf(tmp_path), ["/not-an-elf"])
    assert rc == 127, err
    assert out == ""
    assert "corral: container init: exec /not-an-elf: Exec format error" in err


@pytest.mark.root
def test_exec_failure_in_exec_is_reported(corral, rt, make_bundle, tmp_path):
    cid = rt.new_id()
    rt("run", "--detach", "--bundle", make_bundle(args=SLEEP, changes=_not_an_elf(tmp_path)
                                                  ).path, cid)
    for flags in ([], ["--tty"]):
        res = rt("exec", *flags, cid, "/not-an-elf", check=False)
        assert res.returncode == 1
        assert "exec failed: exec '/not-an-elf': Exec format error" in res.stderr, res.stderr
        # Nothing was left behind in the container.
        assert json.loads(rt("ps", "--format", "json", cid).stdout) == [rt.state(cid)["pid"]]
    assert rt("exec", cid, "echo", "still-fine").stdout == "still-fine\n"
    rt("delete", "--force", cid)


@pytest.mark.root
def test_exec_tty_is_the_controlling_terminal_of_a_session_leader(corral, rt, make_bundle):
    """The stub's child leads the new session and owns the pty: job control works."""
    cid = rt.new_id()
    rt("run", "--detach", "--bundle", make_bundle(args=SLEEP).path, cid)
    res = rt("exec", "--tty", cid, "sh", "-c",
             "tty; cut -d' ' -f1,6,7 /proc/$$/stat; echo $$; exit 4", check=False)
    assert res.returncode == 4, res.stderr
    lines = res.stdout.replace("\r", "").splitlines()
    assert re.fullmatch(r"/dev/pts/\d+", lines[0]), lines
    pid, session, tty_nr = lines[1].split()
    assert session == pid == lines[2]  # a session leader
    assert int(tty_nr) >> 8 == 136  # a controlling terminal: a Unix98 pty slave
    rt("delete", "--force", cid)


@pytest.mark.root
@pytest.mark.parametrize("nnp", [True, False], ids=["noNewPrivileges", "privileged-load"])
def test_exec_seccomp(rt, make_bundle, nnp, writable_tmp):
    """The filter of an exec'd process: loaded by the stub's child (no_new_privs) or by the
    joiner before it drops privileges, and in force after the exec either way."""
    sec = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}

    def change(c):
        c["linux"]["seccomp"] = sec
        c["process"]["noNewPrivileges"] = nnp
        writable_tmp(c)

    cid = rt.new_id()
    rt("run", "--detach", "--bundle", make_bundle(args=SLEEP, changes=change).path, cid)
    res = rt("exec", cid, "sh", "-c",
             "mkdir /tmp/x; echo mkdir=$?; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status")
    assert res.stdout.splitlines() == ["mkdir=1", f"NoNewPrivs:\t{int(nnp)}", "Seccomp:\t2"]
    assert "Operation not permitted" in res.stderr
    rt("delete", "--force", cid)


@pytest.mark.root
def test_python_path_when_execveat_is_refused(corral, rt, make_bundle):
    """A filter loaded without no_new_privs that refuses execveat: the stub cannot be exec'd,
    and both the init and exec take their Python path, which still works."""
    sec = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [{"names": ["execveat"], "action": "SCMP_ACT_ERRNO"}]}
    b = make_bundle(args=SLEEP, changes=lambda c: (
        c["linux"].__setitem__("seccomp", sec),
        c["process"].__setitem__("noNewPrivileges", False)))
    cid = rt.create(b)
    assert "memfd" not in os.readlink(f"/proc/{rt.state(cid)['pid']}/exe")
    rt("start", cid)
    assert rt.wait_status(cid, "running") == "running"
    res = rt("exec", "--tty", cid, "sh", "-c", "tty; exit 5", check=False)
    assert res.returncode == 5, res.stderr
    assert res.stdout.startswith("/dev/pts/"), res.stdout
    assert rt("exec", cid, "grep", "Seccomp:", "/proc/self/status").stdout == "Seccomp:\t2\n"
    rt("delete", "--force", cid)


_ROOT_CAPS = {"bounding": ["CAP_KILL", "CAP_CHOWN", "CAP_NET_RAW"], "effective": ["CAP_KILL"],
              "permitted": ["CAP_KILL"], "inheritable": ["CAP_CHOWN"], "ambient": []}
CAPS_CASES = {
    # root: after exec P' = inheritable | bounding, whatever permitted was before...
    "root": ({"uid": 0, "gid": 0}, _ROOT_CAPS, False, (1 << 0) | (1 << 5) | (1 << 13)),
    # ... but no_new_privs never lets exec add to permitted
    "root-nnp": ({"uid": 0, "gid": 0}, _ROOT_CAPS, True, 1 << 5),
    # another user: P' = ambient
    "user-ambient": ({"uid": 1000, "gid": 1000},
                     {"bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                      "effective": ["CAP_NET_BIND_SERVICE"],
                      "permitted": ["CAP_NET_BIND_SERVICE"],
                      "inheritable": ["CAP_NET_BIND_SERVICE"],
                      "ambient": ["CAP_NET_BIND_SERVICE"]}, True, 1 << 10),
}


@pytest.mark.root
@pytest.mark.parametrize("case", list(CAPS_CASES))
def test_capabilities_are_those_of_one_exec(rt, case):
    """The stub adds an execve; the kernel's capability rules are idempotent, so the process
    ends with what the init's Python path (one execve; taken here because of a
    startContainer hook) gives it, and what the kernel's rules say, for `run` and `exec`."""
    user, caps, nnp, want = CAPS_CASES[case]
    show = ["grep", "-E", "^Cap(Inh|Prm|Eff|Bnd|Amb):", "/proc/self/status"]
    seen = {}
    for path, hooks in (("stub", {}), ("python", {"startContainer": [{"path": "/bin/true"}]})):
        def change(c, hooks=hooks):
            c["process"]["user"] = user
            c["process"]["capabilities"] = caps
            c["process"]["noNewPrivileges"] = nnp
            c["linux"].pop("seccomp", None)
            if hooks:
                c["hooks"] = hooks

        rc, out, err = rt.run_container(change, show)
        assert rc == 0, err
        cid = rt.new_id()
        rt("run", "--detach", "--bundle", rt.make_bundle(("sleep", "60"), change).path, cid)
        seen[path] = (out, rt("exec", cid, *show).stdout)
        rt("delete", "--force", cid)
    assert seen["stub"] == seen["python"], seen
    for out in seen["stub"]:
        fields = dict(line.split(":\t") for line in out.splitlines())
        assert fields["CapPrm"] == fields["CapEff"] == f"{want:016x}", seen
        if case == "user-ambient":
            assert fields["CapAmb"] == f"{want:016x}", seen
