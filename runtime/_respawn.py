"""Respawn: a new init in a stopped container's kept namespaces (corrald's fast restart).

A restart by the runtime's own verbs is `delete` then `create` then `start`: a new cgroup, new
namespaces, every mount again, pivot_root, a state directory; ~20 ms of Python and kernel
work here. A supervisor that restarts a crashed service wants it back at once, and most of
that work rebuilds exactly what the dead init left: its filesystem view, its hostname, its
network namespace, its cgroup with the same limits.

So while a container runs, its supervisor's namespace helper may *keep* it: hold open its
namespaces (`keep`: /proc/PID/ns/{ipc,uts,net,cgroup,mnt}, which pins them after the init
dies). A respawn then starts the container's process again in them, in two steps:

* `prepare` (run as soon as the old init is reaped, while the supervisor still decides
  whether to restart): forks the new init, which does everything that does not depend on
  the decision, then waits (a *standby*);
* `go` (the restart): hands the standby its stdio; it execs `process.args` at once.
  `abort` (no restart) ends it. Without a standby (it waited too long), both run in a row.

What the new init is and does:

* only the pid namespace is new (it dies with its init, and the kernel has killed every other
  process of the container before the init's exit is reported, so nothing old survives);
* the caller's child: it joins the container's cgroup(s) (still there, with their limits;
  the cgroup migration is the slow part, an RCU grace period, hidden in `prepare`), then the
  kept namespaces, the mount namespace last (which also makes its root the container's
  root), replaces /proc with one of the new pid namespace (and masks and write-protects
  under it again, as `create` did), and then does what the init of `create` does after
  pivot_root: session keyring, rlimits, oom_score_adj, working directory, privilege drop
  (after `go` when there is a seccomp filter, which could refuse the hand-over), seccomp,
  exec;
* `go` writes the new pid into state.json: `state` says `running` again, `kill`, `exec`,
  `ps`, `pause`, `delete` work as on any container. Until then the container is `stopped`
  (a `delete` kills the standby, which is in its cgroup; the respawn then fails).

What it keeps, and so differs from delete+create: files written in the container's own tmpfs
mounts (/dev, /dev/shm, a tmpfs /run) survive a restart, as files in its root filesystem
always did; the cgroup's counters (memory.events' oom_kill, memory.max_usage) continue.

It refuses (`NotRespawnable`; the caller then does delete+create) a container with hooks
(their times belong to create/start/delete), a user namespace, no pid namespace of its own
(its init's children outlive it), a terminal, or whose cgroup still has processes.

The caller must be single-threaded (the helper is): it unshares CLONE_NEWPID for its next
fork only and sets its children's pid namespace back to its own right after. The caller
reaps the standby (it is the caller's child); nothing here waits for it.

Standby protocol, on a SOCK_SEQPACKET pair: standby -> caller b"R" (ready) or b"F" + text
(failed, then it exits); caller -> standby the stdio fds (SCM_RIGHTS) with b"G"; standby ->
caller b"E" just before exec (from then on an exec failure is the process's exit, as after
`start`, and its reason goes to the process's stderr). `abort` kills it.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal

from . import _init, _sys
from . import _linux as L
from ._errors import CorralError
from ._seccomp import load_around
from ._seccomp import prepare as prepare_filter
from ._state import STATE_FILE, Lock, Root, State, proc_stat

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any, NoReturn

STEP_TIMEOUT = 10.0  # seconds a standby may take to get ready, or to exec after `go`

# The namespaces kept, in the order the new init joins them: the mount namespace last, since
# after it the host's paths are out of reach (the fds are open already).
KEPT = (("ipc", L.CLONE_NEWIPC), ("uts", L.CLONE_NEWUTS), ("net", L.CLONE_NEWNET),
        ("cgroup", L.CLONE_NEWCGROUP), ("mnt", L.CLONE_NEWNS))


class NotRespawnable(CorralError):
    """This container cannot be respawned in place (the message says why): recreate it."""


def keep(pid: int) -> list[int]:
    """Open (pin) the namespaces of `pid`, a running init; close them with `release`.

    Raises OSError when the process is gone (its /proc entry or namespaces are)."""
    fds: list[int] = []
    try:
        for name, _flag in KEPT:
            fds.append(os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        release(fds)
        raise
    return fds


def release(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def refusal(cfg: dict[str, Any]) -> str | None:
    """Why the container of config `cfg` cannot be respawned in place, or None."""
    if any((cfg.get("hooks") or {}).values()):
        return "it has hooks"
    lx = cfg.get("linux") or {}
    types = {ns.get("type"): ns for ns in lx.get("namespaces", [])}
    if "user" in types:
        return "it has a user namespace"
    if "pid" not in types or types["pid"].get("path"):
        return "it has no pid namespace of its own"
    if "mount" not in types:
        return "it has no mount namespace"
    if (cfg.get("process") or {}).get("terminal"):
        return "it has a terminal"
    return None


class Standby:
    """A new init made ready ahead of a respawn (see the module docstring)."""

    __slots__ = ("cid", "loaded", "pid", "sock", "start_time", "state")

    def __init__(self, cid: str, pid: int, sock: _sys.Socket,
                 loaded: tuple[State, tuple[int, int]] | None = None) -> None:
        self.cid = cid
        self.pid = pid
        self.sock = sock
        self.state = "preparing"  # -> ready | failed: <why> | gone
        self.start_time = 0  # once `go` returned: as in state.json
        # The state `prepare` read, and its file's (mtime, size): `go` writes it back with
        # the new pid unless the file changed meanwhile (no second parse of its config).
        self.loaded = loaded

    def poll(self, timeout: float = 0.0) -> str:
        """Read what the standby said, waiting up to `timeout` s; returns `state`."""
        if self.state != "preparing":
            return self.state
        if not select.select([self.sock], [], [], timeout)[0]:
            return self.state
        try:
            msg = self.sock.recv(4096)
        except OSError as e:
            msg = b"F" + str(e).encode()
        if msg == b"R":
            self.state = "ready"
        else:
            why = msg[1:].decode(errors="replace") if msg else "it exited"
            self.state = f"failed: {why}"
        return self.state


def prepare(root: Root, cid: str, kept: list[int]) -> Standby:
    """Fork the next init of stopped container `cid` into its `kept` namespaces; it gets
    ready (`Standby.poll`) and waits for `go` or `abort`. The caller reaps it.

    Raises NotRespawnable (nothing was forked) when the container cannot be respawned."""
    from ._cgroups import manager_from_state

    if len(kept) != len(KEPT):
        raise NotRespawnable(f"container {cid!r}: its namespaces were not kept")
    d = root.container_dir(cid)
    if not os.path.isdir(d):
        raise NotRespawnable(f"container {cid!r} does not exist")
    with Lock(d) as lock:
        stamp = _stamp(d)
        st = root.load(cid)
        why = refusal(st.config)
        if why is None and st.status() != "stopped":
            why = f"it is {st.status()}"
        if why is None and st.cgroup:
            try:
                if manager_from_state(st.cgroup).pids():
                    why = "its cgroup still has processes"
            except OSError as e:
                why = f"its cgroup is gone ({e.strerror})"
        if why is not None:
            raise NotRespawnable(f"container {cid!r} cannot be respawned: {why}")
        ours, theirs = _sys.socketpair()
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            L.unshare(L.CLONE_NEWPID)
            try:
                pid = os.fork()
                if pid == 0:
                    # The lock's fd goes with the standby, which holds the lock until it is
                    # in every cgroup: a `delete` then sees it in all of them, or none.
                    ours.close()
                    _standby(st.config, st.cgroup, kept, theirs, cid, lock.fd)
            finally:
                # Our next children belong to our own pid namespace again. Failing that,
                # the caller's every later fork would be pid 1 of a namespace: never go on.
                try:
                    L.setns(own, L.CLONE_NEWPID)
                except OSError:
                    os._exit(70)
        except BaseException:
            ours.close()
            raise
        finally:
            os.close(own)
            theirs.close()
    return Standby(cid, pid, ours, (st, stamp))


def go(root: Root, standby: Standby, stdio: tuple[int, int, int]) -> int:
    """Hand `standby` its stdin, stdout, stderr; once it is about to exec, write its pid
    into state.json and return it. CorralError (the standby is aborted) when it failed."""
    cid = standby.cid
    try:
        state = standby.poll(STEP_TIMEOUT)
        if state != "ready":
            why = state if state != "preparing" else "the new init did not get ready in time"
            raise CorralError(f"container {cid!r}: respawn: {why}")
        _sys.send_fds(standby.sock, b"G", list(stdio))
        if not select.select([standby.sock], [], [], STEP_TIMEOUT)[0]:
            raise CorralError(f"container {cid!r}: respawn: the new init did not exec in time")
        msg = standby.sock.recv(4096)
        if msg != b"E":
            why = msg[1:].decode(errors="replace") if msg else "it exited"
            raise CorralError(f"container {cid!r}: respawn: {why}")
    except BaseException:
        abort(standby)
        raise
    standby.sock.close()
    standby.state = "gone"
    got = proc_stat(standby.pid)
    d = root.container_dir(cid)
    with Lock(d):
        if standby.loaded is not None and standby.loaded[1] == _stamp(d):
            st = standby.loaded[0]
        else:
            st = root.load(cid)
        standby.loaded = None
        # Exec'd and already exited: a start time of 0 says "not running" to `state`; the
        # caller reaps it and reports its exit.
        st.pid, st.start_time = standby.pid, got[1] if got else 0
        st.save()
    standby.start_time = st.start_time
    return standby.pid


def abort(standby: Standby) -> None:
    """No respawn: kill the standby (the caller reaps it).

    Killed rather than told by an end of file: another standby forked later holds a copy of
    this one's socket until it execs, so the end of file could be long in coming."""
    if standby.state == "gone":
        return
    standby.state = "gone"
    try:
        os.kill(standby.pid, signal.SIGKILL)  # our unreaped child: the pid is still its own
    except ProcessLookupError:
        pass
    standby.sock.close()


def _standby(cfg: dict[str, Any], cg: dict[str, Any], kept: list[int], sock: _sys.Socket,
             cid: str, lock_fd: int) -> NoReturn:
    """Pid 1 of the new pid namespace: join, rebuild /proc, set up, wait for `go`, exec."""
    handed = False
    try:
        # The host's Python until the exec: nothing in the container may open our memory or
        # /proc/PID/exe (nothing else is in this pid namespace yet, but `exec` could join).
        L.prctl(L.PR_SET_DUMPABLE, 0)
        gc.disable()  # a collection would copy the caller's whole heap, page by page
        signal.set_wakeup_fd(-1)  # the caller's: not ours to write to
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        os.umask(0)
        proc = cfg["process"]
        lx = cfg.get("linux") or {}
        nnp = bool(proc.get("noNewPrivileges"))
        # Everything from the host first: after the mount namespace nothing can be imported
        # or loaded (the container has no Python, nor libseccomp).
        filt = prepare_filter(lx["seccomp"]) if lx.get("seccomp") else None
        _join_cgroups(cg)  # before its cgroup namespace is joined
        os.close(lock_fd)
        for fd, (_name, flag) in zip(kept, KEPT, strict=True):
            L.setns(fd, flag)
        os.chdir("/")
        _new_proc(cfg)
        _init.join_keyring(cid)
        path = _init.settle_process(proc)
        done: dict[str, Any] | None = None
        if filt is None:  # no filter that could refuse the hand-over: drop privileges now
            done = load_around(None, nnp, lambda: _init.finalize_process(proc, 0))
        sock.send(b"R")
        got, fds = _sys.recv_fds(sock, 16, 3)
        if got != b"G" or len(fds) != 3:
            os._exit(0)  # the caller went away
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        handed = True
        if done is None:
            done = load_around(filt if not nnp else None, nnp,
                               lambda: _init.finalize_process(proc, 0))
        if filt is not None and nnp:
            filt.load()
        sock.send(b"E")
        _init.exec_process(path, proc["args"], done["env"], 0)
    except BaseException as e:  # anything must end in exec or _exit, never return
        msg = str(e) if isinstance(e, CorralError) else f"{type(e).__name__}: {e}"
        try:
            if handed:  # the process's own stderr: the reason stays in its log
                os.write(2, f"corral: respawn of {cid}: {msg}\n".encode())
            sock.send(b"F" + msg.encode()[:4000])
        finally:
            os._exit(127 if handed else 1)


def _stamp(d: str) -> tuple[int, int]:
    """(mtime in ns, size) of state.json in container directory `d`; (0, 0) when absent."""
    try:
        s = os.stat(os.path.join(d, STATE_FILE))
    except OSError:
        return (0, 0)
    return (s.st_mtime_ns, s.st_size)


def _join_cgroups(cg: dict[str, Any]) -> None:
    """Move this (single-threaded) process into the container's cgroups.

    Each write to a `cgroup.procs` takes the kernel's global cgroup_threadgroup_rwsem for
    writing, and the first after an idle spell waits for an RCU grace period (5-20 ms, on
    these machines up to 20 ms when idle). A v1 `tasks` write of "0" moves only the writing
    thread, which since Linux 6.0 skips that lock; for a single-threaded process it moves the
    whole process. So on v1 that is what is written. cgroup2 takes no thread moves across
    domains: a pure v2 host gets `cgroup.procs` (and its wait). The unified hierarchy of a
    hybrid host, which only tracks processes when no controller is enabled in it, is left to
    `settle_unified` after the exec, unless it has controllers.
    """
    from ._cgroups import _write

    if cg.get("version") == 2:
        _write(os.path.join(cg["path"], "cgroup.procs"), "0")
        return
    unified = cg.get("unified")
    if unified and _has_controllers(unified):
        _write(os.path.join(unified, "cgroup.procs"), "0")
    for d in cg.get("paths", {}).values():
        _write(os.path.join(d, "tasks"), "0")


def _has_controllers(cgroup2_dir: str) -> bool:
    from ._cgroups import _slurp

    try:
        return bool(_slurp(os.path.join(cgroup2_dir, "cgroup.controllers")).split())
    except OSError:
        return True  # unknown: do it the safe way


def settle_unified(cg: dict[str, Any]) -> int:
    """Move every process of a respawned container (on a hybrid host) into its cgroup of the
    unified hierarchy; returns how many were moved. Blocking (a grace period): a thread's.

    The new init joined the v1 hierarchies itself and exec'd at once (see _join_cgroups):
    what it forked meanwhile inherited the caller's unified cgroup. Processes are listed from
    a v1 cgroup of the container and moved until a pass finds them all in place."""
    from ._cgroups import CGROUP_ROOT, _read_pids, _slurp, _write

    unified = cg.get("unified")
    paths = list((cg.get("paths") or {}).values())
    if cg.get("version") == 2 or not unified or not paths:
        return 0
    want = "0::" + unified[len(os.path.join(CGROUP_ROOT, "unified")):] + "\n"
    moved = 0
    for _pass in range(10):
        todo = []
        for pid in _read_pids(paths[0]):  # [] once deleted meanwhile
            try:
                if want not in _slurp(f"/proc/{pid}/cgroup"):
                    todo.append(pid)
            except OSError:
                continue  # gone
        if not todo:
            return moved
        for pid in todo:
            try:
                _write(os.path.join(unified, "cgroup.procs"), str(pid))
                moved += 1
            except OSError:
                continue  # gone meanwhile
    return moved


def _new_proc(cfg: dict[str, Any]) -> None:
    """Replace the dead pid namespace's /proc (and what masked it) with this one's."""
    lx = cfg.get("linux") or {}
    for m in cfg.get("mounts") or []:
        if m.get("type") == "proc" and m.get("destination", "").rstrip("/") == "/proc":
            flags = _init.parse_mount_options(m.get("options") or [])[0]
            break
    else:
        return  # no /proc of its own: nothing shows the old namespace
    try:
        L.umount2("/proc", L.MNT_DETACH)  # with the masks stacked on it
    except OSError as e:
        if e.errno != errno.EINVAL:  # not a mount point: nothing to replace
            raise
    L.mount("proc", "/proc", "proc", flags)
    under = {k: [p for p in lx.get(k, []) if p == "/proc" or p.startswith("/proc/")]
             for k in ("readonlyPaths", "maskedPaths")}
    _init._mask_and_readonly(under)
