"""Security boundaries, tried from INSIDE the container and seen refused.

* CVE-2019-5736 class: the host binary that runs corral (the Python interpreter and the
  libpython it maps) must never be readable or writable through /proc/PID/exe or
  /proc/PID/map_files from a container, neither while `exec`s start processes in it nor
  while the init waits in `created` for `start`.
* No fd of the runtime's reaches a container process (only stdio and --preserve-fds).
* The default capability set, masked paths, read-only paths and read-only root hold, also
  for processes started by `exec`.
* `exec` refuses paused and stopped containers without touching them.

What makes the first point hold in corral: from stage 1 on, the processes of the runtime that
are in the container's namespaces are non-dumpable, and the ones that can be seen in its pid
namespace never run the host's code there: the created init execs the exec stub (a static
program in a sealed memfd, runtime/_stub.py) before it reports `created`, and an exec joiner
(Python, but in the host's pid namespace, invisible from inside) execs the stub, which forks
the process that appears in the container. So even a container with CAP_SYS_PTRACE (and
CAP_SYS_ADMIN for map_files) only ever reaches the memfd, which is sealed and executing.
(Where there is no stub, startContainer hooks or a machine other than x86-64, the created init
stays Python, non-dumpable: docs/runtime.md.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

SLEEP = ("sleep", "60")
ATTACK_SECONDS = 1.5  # how long the test keeps starting joiners while the attacker loops
DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


# --------------------------------------------------------------------------------------------
# The host's binaries
# --------------------------------------------------------------------------------------------


def _interpreter_of(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    return head[2:].split(b"\n", 1)[0].split()[0].decode()


def host_binaries(runtime: str) -> list[str]:
    """The host files whose code runs in the runtime's processes: the interpreter of the
    runtime under test (or the runtime binary itself) and every libpython it maps."""
    interp = _interpreter_of(runtime)
    exe = os.path.realpath(interp or runtime)
    paths = {exe}
    if interp:
        res = subprocess.run([exe, "-c", "print(open('/proc/self/maps').read())"],
                             capture_output=True, text=True, timeout=30, check=True)
        for line in res.stdout.splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and "libpython" in fields[5]:
                paths.add(os.path.realpath(fields[5].strip()))
    return sorted(paths)


def fingerprint(paths: list[str]) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in paths:
        st = os.stat(p)
        with open(p, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        out[p] = (st.st_mtime_ns, st.st_size, digest)
    return out


def md5_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


# --------------------------------------------------------------------------------------------
# The attacker: a busybox sh loop over every process of the container's pid namespace
# --------------------------------------------------------------------------------------------

# For every process: try to open /proc/PID/exe and each /proc/PID/map_files/* for writing
# (`true >> f`: O_APPEND|O_CREAT, never truncates nor writes a byte) and for reading, hashing
# what that very open reached (the process may exec or exit meanwhile). Exes hashing as the
# container's busybox are not tried again. A process whose comm is the runtime's ("corral-init"
# or "corral-exec": the exec stub, until its exec) is reported SEEN, so that the test knows
# what it looked at.
ATTACKER = r"""
bb=$(md5sum < /bin/busybox); bb=${bb%% *}
ok=" "
n=0
while [ ! -e /out/stop ]; do
  n=$((n+1))
  for p in /proc/[0-9]*; do
    [ "$p" = "/proc/$$" ] && continue
    c=
    { read -r c < $p/comm; } 2>/dev/null
    case "$c" in corral*|python*) echo "SEEN $p $c";; esac
    for f in $p/exe $p/map_files/*; do
      if { true >> "$f"; } 2>/dev/null; then
        echo "WROTE $f -> $(readlink "$f" 2>/dev/null) comm=$c"
      fi
      case "$ok" in *" $f "*) continue;; esac
      # Hash through the very open under test (the process may exec or exit meanwhile).
      h=$(md5sum < "$f" 2>/dev/null) || continue
      h=${h%% *}
      case "$h:$c" in
        "$bb:corral"*|"$bb:python"*) ;;  # caught just after its exec: busybox, but say so
        "$bb:"*) ok="$ok$f "; continue;;
      esac
      echo "READ $f md5=$h -> $(readlink "$f" 2>/dev/null) comm=$c"
    done
  done
done
echo "DONE $n"
"""


def _with_caps(extra: list[str], out: Path):
    """The default spec's capabilities plus `extra`, and `out` bound read-write at /out."""

    def change(c):
        caps = DEFAULT_CAPS + extra
        c["process"]["capabilities"] = {
            "bounding": caps, "effective": caps, "permitted": caps, "ambient": []}
        c["mounts"].append({"destination": "/out", "type": "bind", "source": str(out),
                            "options": ["rbind", "rw"]})

    return change


def breaches(log: str, busybox_md5: str, host: list[str]) -> list[str]:
    """Lines of the attacker's log that reached a host binary."""
    host_md5 = {md5_of(p) for p in host}
    found: list[str] = []
    for line in log.splitlines():
        if line.startswith("WROTE "):
            found.append(line)  # nothing in the container may be opened for writing
        elif line.startswith("READ "):
            m = re.match(r"READ (\S+) md5=(\S*) -> (.*) comm=(.*)$", line)
            assert m, line
            md5, target, comm = m.group(2), m.group(3), m.group(4)
            named_host = any(p in target for p in host) or "python" in target
            # The container holds nothing but busybox; runc's memfd copy is not the host's,
            # nor is corral's exec stub (named corral-init or corral-exec), also when it
            # exec'd between the hash and the readlink (then read as the new binary's path).
            stub = target.startswith("/memfd:") or comm.startswith(("corral-init",
                                                                    "corral-exec"))
            foreign = md5 != busybox_md5 and not stub
            if named_host or md5 in host_md5 or foreign:
                found.append(line)
    # One line per (kind, what it reached), writes first: the log repeats itself.
    unique = {(line.split()[0], line.split(" -> ")[-1]): line for line in found}
    return sorted(unique.values(), key=lambda line: not line.startswith("WROTE"))


def attack(rt, make_bundle, tmp_path, state: str, extra_caps: list[str]) -> tuple[str, list]:
    """Let ATTACKER loop inside a container (`created` or `running`) while the test keeps
    running `corral exec ID true`; return the attacker's log and the host binaries."""
    out = tmp_path / "out"
    out.mkdir()
    host = host_binaries(rt.binary)
    before = fingerprint(host)

    b = make_bundle(args=SLEEP, changes=_with_caps(extra_caps, out))
    cid = rt.new_id()
    if state == "created":
        rt("create", "--bundle", b.path, cid)
        # A sleeping exec'd process beside the waiting (Python, non-dumpable) init.
        rt("exec", "--detach", cid, "sleep", "30")
    else:
        rt("run", "--detach", "--bundle", b.path, cid)
    assert rt.status(cid) == state
    rt("exec", "--detach", cid, "sh", "-c", f"exec > /out/log 2>&1\n{ATTACKER}")
    deadline = time.monotonic() + ATTACK_SECONDS
    while time.monotonic() < deadline:
        rt("exec", cid, "true")
    (out / "stop").touch()
    log_path = out / "log"
    deadline = time.monotonic() + 20
    while "DONE" not in (log_path.read_text() if log_path.exists() else ""):
        assert time.monotonic() < deadline, "the attacker loop did not finish"
        time.sleep(0.05)
    rt("delete", "--force", cid)
    assert fingerprint(host) == before, "a host binary of the runtime changed"
    return log_path.read_text(), host


CAP_CASES = [
    pytest.param([], id="default-caps"),
    pytest.param(["CAP_SYS_PTRACE"], id="cap-sys-ptrace"),
    pytest.param(["CAP_SYS_PTRACE", "CAP_SYS_ADMIN"], id="cap-sys-ptrace-sys-admin"),
]

@pytest.mark.parametrize("extra_caps", CAP_CASES)
def test_host_binary_unreachable_from_created_container(
    rt, make_bundle, tmp_path, rootfs, is_runc, extra_caps
):
    """While the init waits for `start` (and joiners come and go), nothing in the container
    may open the host's interpreter or libpython through /proc."""
    log, host = attack(rt, make_bundle, tmp_path, "created", extra_caps)
    assert re.search(r"^DONE [1-9]", log, re.M), log
    if not is_runc:
        # The deterministic part: the waiting init, pid 1, is the runtime's (the exec stub).
        assert re.search(r"^SEEN /proc/1 corral-init", log, re.M), log[-3000:]
    found = breaches(log, md5_of(str(rootfs / "bin" / "busybox")), host)
    assert not found, "host binaries reached from the container:\n" + "\n".join(found[:20])


@pytest.mark.parametrize("extra_caps", CAP_CASES)
def test_host_binary_unreachable_during_exec(
    rt, make_bundle, tmp_path, rootfs, is_runc, extra_caps
):
    """In a running container, the runtime's processes in its pid namespace are the children
    that the exec stub forks (between the fork and the exec): none may reach the host."""
    if is_runc and extra_caps:
        pytest.skip("runc's exec init (a memfd copy of runc) can be read with CAP_SYS_PTRACE; "
                    "having the host runc's bytes, it counts as the host binary here")
    log, host = attack(rt, make_bundle, tmp_path, "running", extra_caps)
    assert re.search(r"^DONE [1-9]", log, re.M), log
    found = breaches(log, md5_of(str(rootfs / "bin" / "busybox")), host)
    assert not found, "host binaries reached from the container:\n" + "\n".join(found[:20])
    if not re.search(r"^SEEN ", log, re.M):
        # Not a failure (it depends on scheduling), but then this run proved little.
        warnings.warn("the attacker never caught an exec's child before its exec",
                      stacklevel=1)


# Holding an exec in its Python phase, deterministically: without HOME in the process's env
# the exec joiner reads the container's /etc/passwd (to set HOME) after dropping privileges
# and before it execs the stub, and a container can make that file a fifo. The joiner then
# blocks, still the host's Python and already in the container's mount namespace, until
# someone opens the fifo for writing. It is in the HOST's pid namespace (it only sets the
# container's for its children): the probe below, run meanwhile, must find nothing of the
# runtime's among the container's processes, then lets it go. (The probe's own exec passes
# HOME, so it never blocks.)
HELD_PROBE = r"""
bb=$(md5sum < /bin/busybox); bb=${bb%% *}
for p in /proc/[0-9]*; do
  [ "$p" = "/proc/$$" ] && continue
  c=
  { read -r c < $p/comm; } 2>/dev/null || continue
  echo "PROC $p $c"
  for f in $p/exe $p/map_files/*; do
    { true >> "$f"; } 2>/dev/null && echo "WROTE $f -> $(readlink "$f" 2>/dev/null) comm=$c"
    h=$(md5sum < "$f" 2>/dev/null) || continue
    h=${h%% *}
    [ "$h" = "$bb" ] || echo "READ $f md5=$h -> $(readlink "$f" 2>/dev/null) comm=$c"
  done
done
echo DONE
true > /etc/passwd
"""


def _ns_pids(pid: int) -> list[str]:
    """The NSpid line of /proc/PID/status: the pid in each pid namespace, outermost first."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return line.split()[1:]
    return []


def _held_joiner(init: int, deadline: float) -> int:
    """The host pid of the process that joined the container's mount namespace from outside
    its pid namespace and now blocks in openat (of the fifo /etc/passwd)."""
    mnt = os.readlink(f"/proc/{init}/ns/mnt")
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") != mnt:
                    continue
                if len(_ns_pids(int(entry))) != 1:
                    continue  # one of the container's own processes
                with open(f"/proc/{entry}/syscall") as f:
                    if f.read().split()[0] == "257":  # openat, blocked
                        return int(entry)
            except (OSError, IndexError):
                continue
        time.sleep(0.02)
    raise AssertionError("the held exec joiner was not found")


@pytest.mark.parametrize("extra_caps", CAP_CASES[:2])
def test_exec_held_before_its_exec_is_invisible(
    rt, make_bundle, tmp_path, rootfs, is_runc, extra_caps
):
    """An exec held (by the container) in its Python phase: nothing of the host's Python is
    among the container's processes, and nothing of it may be opened from inside."""
    if is_runc:
        pytest.skip("runc's exec reads /etc/passwd in its memfd-cloned init: nothing to see")
    host = host_binaries(rt.binary)
    before = fingerprint(host)
    out, etc = tmp_path / "out", tmp_path / "etc"
    out.mkdir()
    etc.mkdir()
    for name in ("passwd", "group"):
        (etc / name).write_bytes((rootfs / "etc" / name).read_bytes())

    def change(c):
        _with_caps(extra_caps, out)(c)
        c["mounts"].append({"destination": "/etc", "type": "bind", "source": str(etc),
                            "options": ["rbind", "rw"]})

    cid = rt.new_id()
    rt("run", "--detach", "--bundle", make_bundle(args=SLEEP, changes=change).path, cid)
    # What an attacker with a writable /etc does; the runtime cannot tell.
    rt("exec", "-e", "HOME=/", cid, "sh", "-c", "rm /etc/passwd && mkfifo /etc/passwd")
    held: list = []
    t = threading.Thread(target=lambda: held.append(rt("exec", cid, "true", check=False)))
    t.start()
    try:
        joiner = _held_joiner(rt.state(cid)["pid"], time.monotonic() + 30)
        with open(f"/proc/{joiner}/comm") as f:
            assert f.read().strip() == "corral"  # the runtime's Python, held
        assert len(_ns_pids(joiner)) == 1  # not in the container's pid namespace
        # Only the probe's last line releases the held exec: all it saw, it saw held.
        probe = rt("exec", "-e", "HOME=/", cid, "sh", "-c", HELD_PROBE)
    finally:
        t.join(5)
        if t.is_alive():  # release it whatever happened to the probe: open the fifo to write
            with contextlib.suppress(OSError):  # ENXIO: nobody reads it (any more)
                os.close(os.open(etc / "passwd", os.O_WRONLY | os.O_NONBLOCK))
        t.join(30)
    assert held, "the held exec did not finish"
    assert held[0].returncode == 0, held[0].stderr
    lines = probe.stdout.splitlines()
    assert lines[-1] == "DONE", probe.stdout
    procs = [line.split() for line in lines if line.startswith("PROC ")]
    assert ["PROC", "/proc/1", "sleep"] in procs, probe.stdout
    runtime = [p for p in procs if len(p) > 2 and p[2].startswith(("corral", "python"))]
    assert not runtime, probe.stdout
    found = breaches("\n".join(line for line in lines if line.startswith(("READ", "WROTE"))),
                     md5_of(str(rootfs / "bin" / "busybox")), host)
    assert not found, "the runtime's code was reached from the container:\n" + "\n".join(
        found[:20])
    rt("delete", "--force", cid)
    assert fingerprint(host) == before


def test_created_init_has_the_process_capabilities(rt, make_bundle):
    """runc's init drops to the process's capabilities before it blocks on exec.fifo; a
    process exec'd into a `created` container must not find a fully privileged pid 1."""
    cid = rt.create(make_bundle(args=SLEEP))
    out = rt("exec", cid, "grep", "-E", "^Cap(Eff|Bnd):", "/proc/1/status").stdout
    fields = {line.split(":")[0]: int(line.split()[1], 16) for line in out.splitlines()}
    want = (1 << 29) | (1 << 5) | (1 << 10)  # AUDIT_WRITE, KILL, NET_BIND_SERVICE
    assert fields == {"CapEff": want, "CapBnd": want}, out
    rt("delete", "--force", cid)


# --------------------------------------------------------------------------------------------
# File descriptors
# --------------------------------------------------------------------------------------------


def fd_table(listing: str) -> dict[int, str]:
    """{fd: target} from busybox `ls -l /proc/PID/fd`."""
    table = {}
    for line in listing.splitlines():
        if not line.startswith("l"):
            continue
        left, sep, target = line.partition(" -> ")
        assert sep, f"fd without a readable target: {line!r}"
        table[int(left.split()[-1])] = target
    return table


def assert_no_runtime_fds(table: dict[int, str], rt, allowed: set[int]) -> None:
    assert set(table) == allowed, table
    for fd, target in table.items():
        bad = (
            str(rt.state_root) in target
            or "exec.fifo" in target
            or "state.json" in target
            or target.startswith(("socket:", "pipe:", "anon_inode:"))
        )
        assert not bad, f"fd {fd} -> {target} is the runtime's"


def with_fds(rt, files: list[Path], argv: list[str]) -> list[str]:
    """argv run by a shell that first opens files as fds 3, 4, ..."""
    redirs = " ".join(f'{3 + i}<"${{F{i}}}"' for i in range(len(files)))
    sets = "; ".join(f'F{i}=$1; shift' for i in range(len(files)))
    script = f'{sets}; exec "$@" {redirs}' if files else 'exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *map(str, files), *argv]


@pytest.mark.parametrize("preserve", [0, 2])
@pytest.mark.parametrize("mode", ["run", "run-detach", "create-start", "exec"])
def test_no_runtime_fd_reaches_the_container(rt, make_bundle, tmp_path, mode, preserve):
    files = []
    for i in range(preserve):
        f = tmp_path / f"preserved{i}"
        f.write_text(f"content-{i}\n")
        files.append(f)
    flags = ["--preserve-fds", str(preserve)] if preserve else []
    show = "ls -l /proc/$$/fd; " + "".join(f"cat <&{3 + i}; " for i in range(preserve)) + "true"
    cid = rt.new_id()
    if mode == "run":
        b = make_bundle(args=("sh", "-c", show))
        out = rt.raw(with_fds(rt, files, rt.argv("run", *flags, "--bundle", b.path, cid))).stdout
    else:
        b = make_bundle(args=SLEEP)
        if mode == "run-detach":
            rt.raw(with_fds(rt, files, rt.argv("run", "--detach", *flags, "--bundle", b.path,
                                               cid)))
        elif mode == "create-start":
            rt.raw(with_fds(rt, files, rt.argv("create", *flags, "--bundle", b.path, cid)))
            # Before `start` pid 1 is the runtime's (non-dumpable) init, holding exec.fifo:
            # its fd table must not be reachable from inside.
            res = rt("exec", cid, "sh", "-c", "ls -l /proc/1/fd; cat /proc/1/fd/*", check=False)
            assert res.returncode != 0
            assert "Permission denied" in res.stderr, res.stderr
            assert "->" not in res.stdout, res.stdout
            rt("start", cid)
        else:
            rt("run", "--detach", "--bundle", b.path, cid)
        if mode == "exec":
            out = rt.raw(with_fds(rt, files, rt.argv("exec", *flags, cid, "sh", "-c",
                                                     show))).stdout
        else:
            show1 = "ls -l /proc/1/fd; " + "".join(
                f"cat /proc/1/fd/{3 + i}; " for i in range(preserve)) + "true"
            out = rt("exec", cid, "sh", "-c", show1).stdout
    table = fd_table(out)
    assert_no_runtime_fds(table, rt, set(range(3 + preserve)))
    for i, f in enumerate(files):
        assert table[3 + i].endswith(f.name), table
        assert f"content-{i}" in out.splitlines()
    if mode != "run":
        rt("delete", "--force", cid)


# --------------------------------------------------------------------------------------------
# Capabilities
# --------------------------------------------------------------------------------------------

# Each operation needs a capability the default set lacks: CAP_CHOWN, CAP_MKNOD,
# CAP_SYS_ADMIN (sethostname, mount). /tmp is a tmpfs, so EROFS cannot hide EPERM.
PRIVILEGED_OPS = r"""
try() { if "$@"; then echo "ALLOWED $1"; else echo "REFUSED $1"; fi; }
touch /tmp/f && mkdir -p /tmp/m
try chown 1 /tmp/f
try mknod /tmp/n c 1 3
try hostname evil
try mount -t tmpfs t /tmp/m
hostname
"""
OP_ERRORS = {
    "chown": "chown: /tmp/f: Operation not permitted",
    "mknod": "mknod: /tmp/n: Operation not permitted",
    "hostname": "hostname: sethostname: Operation not permitted",
    # busybox mount words EPERM its own way
    "mount": "mount: permission denied (are you root?)",
}


@pytest.fixture
def caps_only(writable_tmp):
    """The default spec's capabilities with a writable /tmp and no seccomp filter, so that
    a refusal can only come from the missing capability."""

    def change(c):
        c["linux"].pop("seccomp", None)
        writable_tmp(c)

    return change


@pytest.mark.parametrize("how", ["run", "exec"])
def test_default_capabilities_refuse_privileged_ops(rt, make_bundle, how, caps_only):
    if how == "run":
        rc, out, err = rt.run_container(caps_only, ["sh", "-c", PRIVILEGED_OPS])
        assert rc == 0, err
    else:
        cid = rt.create(make_bundle(args=SLEEP, changes=caps_only))
        rt("start", cid)
        res = rt("exec", cid, "sh", "-c", PRIVILEGED_OPS)
        out, err = res.stdout, res.stderr
        rt("delete", "--force", cid)
    lines = out.splitlines()
    for op, message in OP_ERRORS.items():
        assert f"REFUSED {op}" in lines, out
        assert message in err, err
    assert lines[-1] == "corral"  # the hostname is unchanged


def test_exec_cap_sys_admin_grants_mount(rt, make_bundle, caps_only):
    cid = rt.new_id()
    rt("run", "--detach", "--bundle", make_bundle(args=SLEEP, changes=caps_only).path, cid)
    rt("exec", cid, "mkdir", "/tmp/m")
    res = rt("exec", cid, "mount", "-t", "tmpfs", "t", "/tmp/m", check=False)
    assert res.returncode != 0
    assert "permission denied" in res.stderr
    rt("exec", "--cap", "CAP_SYS_ADMIN", cid, "mount", "-t", "tmpfs", "t", "/tmp/m")
    # The mount is in the container's mount namespace; a plain exec sees it and, without
    # the capability, can neither undo it nor chown in it.
    out = rt("exec", cid, "sh", "-c",
             "grep ' /tmp/m ' /proc/mounts; touch /tmp/m/x; umount /tmp/m; chown 1 /tmp/m/x; "
             "true", check=False)
    assert out.stdout.split()[1:3] == ["/tmp/m", "tmpfs"], out.stdout
    assert "umount: can't unmount /tmp/m: Operation not permitted" in out.stderr
    assert "chown: /tmp/m/x: Operation not permitted" in out.stderr
    rt("delete", "--force", cid)


# --------------------------------------------------------------------------------------------
# Masked paths, read-only paths, read-only root, no_new_privs: through exec
# --------------------------------------------------------------------------------------------


@pytest.fixture
def running(rt, make_bundle):
    cid = rt.new_id()
    rt("run", "--detach", "--bundle", make_bundle(args=SLEEP).path, cid)
    yield cid
    rt("delete", "--force", cid, check=False)


MASKED_FILES = ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"]


def test_masked_paths_through_exec(rt, running):
    present = [p for p in MASKED_FILES if os.path.exists(p)]
    assert "/proc/keys" in present  # always there on a kernel with keys (the host's is)
    script = "".join(
        f"echo {p} $(stat -c '%F %t:%T' {p}) $(head -c 64 {p} | wc -c); "
        f"echo x 2>/dev/null > {p}; echo after $(head -c 64 {p} | wc -c); "
        for p in present
    ) + (
        "echo firmware $(ls -A /sys/firmware | wc -l); "
        "if touch /sys/firmware/x 2>/dev/null || mkdir /sys/firmware/d 2>/dev/null; "
        "then echo firmware-writable; else echo firmware-refused; fi"
    )
    out = rt("exec", running, "sh", "-c", script).stdout.splitlines()
    for i, p in enumerate(present):
        # Masked by /dev/null (as runc does): reads give nothing, writes go nowhere.
        assert out[2 * i] == f"{p} character special file 1:3 0", out
        assert out[2 * i + 1] == "after 0", out
    assert out[-2:] == ["firmware 0", "firmware-refused"]


def test_readonly_paths_and_root_through_exec(rt, running):
    script = (
        "echo 1 > /proc/sys/vm/drop_caches && echo drop-caches-written; "
        # never write a byte to sysrq-trigger: opening it for writing is what is refused
        "true >> /proc/sysrq-trigger && echo sysrq-opened; "
        "touch /newfile && echo root-written; mkdir /newdir && echo root-mkdir; "
        "grep -E ' /proc/(sys|sysrq-trigger) ' /proc/mounts; true"
    )
    res = rt("exec", running, "sh", "-c", script)
    assert res.stdout.count("\n") == len(re.findall(r"^proc ", res.stdout, re.M)), res.stdout
    assert "can't create /proc/sys/vm/drop_caches: Read-only file system" in res.stderr
    assert "touch: /newfile: Read-only file system" in res.stderr
    mounts = {line.split()[1]: line.split()[3].split(",") for line in
              res.stdout.splitlines()}
    assert "ro" in mounts["/proc/sys"]
    if os.path.exists("/proc/sysrq-trigger"):
        assert "ro" in mounts["/proc/sysrq-trigger"], res.stdout
        assert "Read-only file system" in res.stderr


@pytest.mark.parametrize(
    ("config_nnp", "flag", "want"),
    [(False, False, "0"), (False, True, "1"), (True, False, "1")],
    ids=["neither", "exec-flag", "config-inherited"],
)
def test_exec_no_new_privs(rt, make_bundle, config_nnp, flag, want):
    cid = rt.new_id()
    b = make_bundle(args=SLEEP, changes={"process": {"noNewPrivileges": config_nnp}})
    rt("run", "--detach", "--bundle", b.path, cid)
    flags = ["--no-new-privs"] if flag else []
    out = rt("exec", *flags, cid, "grep", "NoNewPrivs", "/proc/self/status").stdout
    assert out.split() == ["NoNewPrivs:", want]
    rt("delete", "--force", cid)


# --------------------------------------------------------------------------------------------
# exec into paused and stopped containers
# --------------------------------------------------------------------------------------------


def _container_pids(rt, cid):
    return sorted(json.loads(rt("ps", "--format", "json", cid).stdout))


def test_exec_into_paused_container_is_refused_cleanly(rt, running, is_runc):
    pids = _container_pids(rt, running)
    rt("pause", running)
    res = rt("exec", running, "sh", "-c", "echo ran", check=False)
    assert res.returncode == 1
    assert res.stdout == ""
    assert "paused" in res.stderr
    if not is_runc:
        assert running in res.stderr
    # Nothing was started or left frozen in the container's cgroup.
    assert rt.status(running) == "paused"
    assert _container_pids(rt, running) == pids
    rt("resume", running)
    assert rt("exec", running, "echo", "ran").stdout == "ran\n"


def test_exec_into_exited_container_is_refused(rt, make_bundle, is_runc):
    cid = rt.create(make_bundle(args=("true",)))
    rt("start", cid)
    assert rt.wait_status(cid, "stopped") == "stopped"
    res = rt("exec", cid, "sh", "-c", "echo ran", check=False)
    assert res.returncode == 1
    assert res.stdout == ""
    assert "stopped" in res.stderr
    if not is_runc:
        assert cid in res.stderr
    assert rt.status(cid) == "stopped"
    rt("delete", cid)
