"""`exec`: run another process in a running container.

The runtime forks a joiner, puts it in the container's cgroup(s), and sends it the process
to run. The joiner (non-dumpable from its first instruction: it is the host's Python) opens
the init's namespaces, prepares what must be loaded from the host (the seccomp filter, the
memfd for the exec stub), joins the user namespace first and the mount namespace last, and
sets the process up: terminal, working directory, rlimits, privileges, the seccomp filter
when it must be loaded before the drop. Joining a pid namespace only applies to children,
so the joiner itself is never visible inside. It then execs the exec stub
(runtime/_stub.py), which forks: the child, born in the container's pid namespace, makes a
session (and the terminal its controlling one), loads the filter with no_new_privs and
execs; so what the container can see is never the host's Python (the CVE-2019-5736 class).
The end of file on the shared socket (close-on-exec in the child) tells the runtime the
exec happened. Where there is no stub, a Python child does the stub's part.

Messages (JSON, one per datagram, as in _init):
  runtime -> joiner: {"type": "exec", ...}       the process and the namespaces to join
  joiner  -> runtime: {"type": "pid", "pid": N}  the pid of the process that will exec
  any     -> runtime: {"type": "error", "msg": ...}
and from the stub, binary datagrams (runtime/_stub.py: PID, FAILURE):
  stub parent -> runtime: int32 pid               the child's pid, in the host's namespace
  stub child  -> runtime: int32 step, int32 errno what failed; it exits 127
"""

from __future__ import annotations

import fcntl
import os

from . import _jsonfast as json
from . import _linux as L
from . import _stub, _sys
from ._errors import ConfigError, CorralError
from ._init import (
    TIOCSCTTY,
    _apply_rlimits,
    _die,
    _lookup,
    exec_process,
    finalize_process,
    recv,
    send,
    setup_terminal,
)
from ._seccomp import kernel_flags, load_around, prepare  # light: ctypes only in prepare()
from ._spec import CAP_BITS, CAP_SETS, NAMESPACES, _validate_process
from ._state import Root, proc_stat

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from ._log import Log


class ExecOptions:
    """The flags of `exec` that reach the library."""

    __slots__ = ("additional_gids", "caps", "console_socket", "cwd", "detach", "env",
                 "ignore_paused", "no_new_privs", "pid_file", "preserve_fds", "process_file",
                 "tty", "user")

    def __init__(self) -> None:
        self.process_file: str | None = None
        self.console_socket: str | None = None
        self.pid_file: str | None = None
        self.detach = False
        self.tty = False
        self.user: str | None = None
        self.additional_gids: list[str] = []
        self.cwd: str | None = None
        self.env: list[str] = []
        self.caps: list[str] = []
        self.no_new_privs = False
        self.preserve_fds = 0
        self.ignore_paused = False


def build_process(config: dict[str, Any], args: list[str], opts: ExecOptions) -> dict[str, Any]:
    """The OCI process to exec: --process FILE, or the container's process with overrides.

    Raises:
        CorralError: naming the flag or the field of the process file that is wrong.
    """
    if opts.process_file:
        from . import _jsonfast as json

        try:
            with open(opts.process_file, "rb") as f:
                proc: dict[str, Any] = json.loads(f.read())
        except OSError as e:
            raise CorralError(f"--process {opts.process_file}: {e.strerror}") from None
        except ValueError as e:
            raise CorralError(f"--process {opts.process_file}: invalid JSON: {e}") from None
        source = opts.process_file
    else:
        if not args:
            raise CorralError("exec: give the command to run, or --process FILE")
        base = config.get("process") or {}
        proc = {k: v for k, v in base.items() if k not in ("args", "terminal", "consoleSize")}
        proc["args"] = list(args)
        proc["terminal"] = opts.tty
        source = "exec"
        user = dict(proc.get("user") or {"uid": 0, "gid": 0})
        if opts.user is not None:
            uid, _, gid = opts.user.partition(":")
            try:
                user["uid"] = int(uid)
                user["gid"] = int(gid) if gid else user.get("gid", 0)
            except ValueError:
                raise CorralError(f"--user {opts.user!r}: expected uid[:gid] as numbers"
                                  ) from None
            user.pop("additionalGids", None)
        if opts.additional_gids:
            try:
                user["additionalGids"] = [int(g) for opt in opts.additional_gids
                                          for g in opt.split(",") if g]
            except ValueError:
                raise CorralError(f"--additional-gids {opts.additional_gids!r}: expected "
                                  "numbers") from None
        proc["user"] = user
        if opts.cwd:
            proc["cwd"] = opts.cwd
        env = list(proc.get("env") or [])
        for pair in opts.env:
            key = pair.split("=", 1)[0]
            env = [x for x in env if x.split("=", 1)[0] != key] + [pair]
        proc["env"] = env
        if opts.caps:
            caps = {k: list(v) for k, v in (proc.get("capabilities") or {}).items()}
            for c in opts.caps:
                name = c.upper() if c.upper().startswith("CAP_") else "CAP_" + c.upper()
                if name not in CAP_BITS:
                    raise CorralError(f"--cap {c!r}: unknown capability")
                for s in CAP_SETS:
                    if s != "inheritable" and name not in caps.setdefault(s, []):
                        caps[s].append(name)
            proc["capabilities"] = caps
        if opts.no_new_privs:
            proc["noNewPrivileges"] = True
    if opts.tty:
        proc["terminal"] = True
    try:
        _validate_process(proc, False)
    except ConfigError as e:
        raise CorralError(f"{source}: {e.field.replace('process.', '', 1)}: {e.problem}"
                          ) from None
    return proc


def _joiner(sock: _sys.Socket) -> NoReturn:
    """Forked by the runtime: join the container, set the process up, exec the stub."""
    try:
        L.prctl(L.PR_SET_DUMPABLE, 0)  # first: from here on this is inside the container
        msg = recv(sock)
        if msg is None:
            os._exit(1)
        init = msg["init_pid"]
        proc = msg["process"]
        fds = [(t, os.open(f"/proc/{init}/ns/{NAMESPACES[t][1]}", os.O_RDONLY | os.O_CLOEXEC))
               for t in msg["namespaces"]]
        # The init must still be the process the state names: the fds now pin its namespaces.
        st = proc_stat(init)
        if st is None or st[1] != msg["start_time"]:
            raise CorralError("the container's init exited")
        filt = None
        if msg.get("seccomp"):
            filt = prepare(msg["seccomp"])  # loads libseccomp while host paths still resolve
        stub = -1
        if _stub.SUPPORTED:
            try:
                # Made before joining: in a user namespace its owner (the host's root) is
                # unmapped, so nothing in there may ever read it.
                stub = _stub.memfd()
            except OSError:
                pass  # the kernel refuses executable memfds: the Python path
        order = sorted(fds, key=lambda f: {"user": 0, "mount": 2}.get(f[0], 1))
        for typ, fd in order:
            L.setns(fd, NAMESPACES[typ][0])
            os.close(fd)
        if any(t == "user" for t, _ in fds):
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        _setup_and_exec(sock, msg, proc, filt, stub)
    except BaseException as e:  # must end in _exit, never return
        _die(sock, e)


def _setup_and_exec(sock: _sys.Socket, msg: dict[str, Any], proc: dict[str, Any],
                    filt: Any, stub: int) -> NoReturn:
    """In every namespace of the container but its pid namespace (it only applies to
    children): set the process up, then exec the stub, which forks the process that appears
    in the container. Only where there is no stub does Python fork that process itself."""
    tty = bool(proc.get("terminal"))
    if tty:
        # The controlling terminal is set by the forked child, the new session's leader.
        setup_terminal(proc, msg["console_fd"], bind_console=False, ctty=False)
    cwd = proc.get("cwd") or "/"
    try:
        os.chdir(cwd)
    except OSError as e:
        raise CorralError(f"cwd {cwd}: {e.strerror}") from None
    _apply_rlimits(proc)
    path = _lookup(proc["args"][0], proc.get("env") or [], cwd)
    nnp = bool(proc.get("noNewPrivileges"))
    if stub >= 0:
        _stub.fill(stub, _stub.image(
            _stub.MODE_EXEC, sock.fileno(), 0, path, "corral-exec", tty=tty,
            bpf=filt.bpf() if filt is not None and nnp else b"",
            seccomp_flags=kernel_flags(msg["seccomp"]) if filt is not None else 0))
    # Without no_new_privs, loading the filter needs CAP_SYS_ADMIN: before the drop, here;
    # with it, in the child just before its execve (the stub's, or Python's below).
    done = load_around(filt if not nnp else None, nnp,
                       lambda: finalize_process(proc, msg["preserve_fds"]))
    if stub >= 0:
        try:
            _stub.exec_stub(stub, proc["args"], done["env"], msg["preserve_fds"],
                            (sock.fileno(),))
        except OSError:
            pass  # e.g. a filter refusing execveat: the Python path below still works
        os.close(stub)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if tty:
                fcntl.ioctl(0, TIOCSCTTY, 0)
            if filt is not None and nnp:
                filt.load()
            # The socket is close-on-exec: its end of file tells the runtime the exec
            # happened.
            exec_process(path, proc["args"], done["env"], msg["preserve_fds"])
        except BaseException as e:
            _die(sock, e)
    send(sock, {"type": "pid", "pid": pid})
    os._exit(0)


def _stub_failure(raw: bytes, proc: dict[str, Any]) -> str:
    """The error of the stub's {step, errno} datagram, naming the command."""
    step, err = _stub.FAILURE.unpack(raw)
    what = _stub.STEPS.get(step, f"step {step}")
    if step == _stub.STEP_EXEC:
        what = f"exec {proc['args'][0]!r}"
    return f"exec failed: {what}: {os.strerror(err)}"


def exec_container(root: Root, cid: str, args: list[str], opts: ExecOptions,
                   log: Log) -> int:
    """Run a process in container `cid`; its exit status, or 0 with --detach."""
    from ._cgroups import manager_from_state
    from ._container import _reap, wait_forwarding
    from ._state import State, write_atomic

    st = root.load(cid)
    status = st.status()
    if status == "stopped":
        raise CorralError(f"cannot exec in container {cid!r}: it is stopped")
    if status == "paused" and not opts.ignore_paused:
        raise CorralError(f"cannot exec in container {cid!r}: it is paused (resume it first)")
    proc = build_process(st.config, args, opts)
    if proc.get("terminal") and not opts.console_socket and opts.detach:
        raise CorralError("exec --tty --detach needs --console-socket")
    for fd in range(3, 3 + opts.preserve_fds):
        try:
            os.fstat(fd)
        except OSError:
            raise CorralError(f"--preserve-fds {opts.preserve_fds}: fd {fd} is not open"
                              ) from None
    lx = st.config.get("linux") or {}
    namespaces = [n["type"] for n in lx.get("namespaces", [])]
    seccomp = proc.get("seccomp") if opts.process_file else None
    seccomp = seccomp or lx.get("seccomp")

    console: _sys.Socket | None = None
    ours: _sys.Socket | None = None
    if proc.get("terminal"):
        if opts.console_socket:
            try:
                console = _sys.connect_unix(opts.console_socket)
            except OSError as e:
                raise CorralError(f"--console-socket {opts.console_socket}: {e.strerror}"
                                  ) from None
        else:
            ours, console = _sys.socketpair(_sys.SOCK_STREAM)
    parent, child = _sys.socketpair()
    L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
    joiner = os.fork()
    if joiner == 0:
        try:
            parent.close()
        finally:
            _joiner(child)
    child.close()
    target = 0
    master = -1
    try:
        if st.cgroup:
            manager_from_state(st.cgroup).add_pid(joiner)
        send(parent, {"type": "exec", "init_pid": st.pid, "start_time": st.start_time,
                      "process": proc, "namespaces": namespaces, "seccomp": seccomp,
                      "preserve_fds": opts.preserve_fds,
                      "console_fd": console.fileno() if console else -1})
        failure = ""
        while True:
            raw = parent.recv(1 << 20)
            if not raw:
                break  # the socket closed: the process exec'd (or gave up)
            if len(raw) == _stub.PID.size:  # the stub's parent: the child's pid
                target = _stub.PID.unpack(raw)[0]
                _reap(joiner)
                continue
            if len(raw) == _stub.FAILURE.size:  # the stub's child: what failed; it exits
                failure = failure or _stub_failure(raw, proc)
                continue
            msg = json.loads(raw)
            if msg["type"] == "error":
                raise CorralError(f"exec failed: {msg.get('msg')}")
            if msg["type"] == "pid":
                target = int(msg["pid"])
                _reap(joiner)
        if failure:
            raise CorralError(failure)
        if target <= 0:
            raise CorralError("exec failed: the process did not start")
        if ours is not None and console is not None:
            console.close()
            console = None
            _, fds = _sys.recv_fds(ours, 1024, 1)
            master = fds[0] if fds else -1
    except BaseException:
        for pid in (joiner, target):
            if pid > 0:
                try:
                    os.kill(pid, _sys.SIGKILL)
                except ProcessLookupError:
                    pass
        _reap(joiner)
        _reap(target)
        raise
    finally:
        parent.close()
        for s in (console, ours):
            if s is not None:
                s.close()
    if opts.pid_file:
        write_atomic(os.path.abspath(opts.pid_file), str(target).encode(), 0o644)
    log.debug(f"exec in {cid}: pid {target}")
    if opts.detach:
        return 0
    ps = proc_stat(target)
    me = State(st.dir, {"id": cid, "bundle": st.bundle, "rootfs": st.rootfs,
                        "created": st.created, "pid": target,
                        "start_time": ps[1] if ps else -1})
    saved = None
    if master >= 0:
        from ._tty import prepare

        saved = prepare(master)
    return wait_forwarding(me, master, saved)
