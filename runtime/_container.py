"""Container operations: one function per CLI command, each "load, check status, act".

`create` and `run` share `create_container`; `run` adds start and wait. The lifecycle guards:
  start   needs created
  kill    needs created, running or paused
  delete  needs stopped (or created); --force kills first
"""

from __future__ import annotations

import errno
import os
import select

from . import _sys
from ._errors import CorralError
from ._log import NULL, Log
from ._state import FIFO, Lock, Root, State, proc_stat, remove_tree, rfc3339_now, write_atomic

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any



def parse_signal(text: str) -> int:
    """A signal from `KILL`, `SIGKILL`, `kill` or `9`.

    Raises:
        CorralError: naming the text when it is no signal this system knows.
    """
    t = text.strip()
    if t.isdigit():
        n = int(t)
        if 0 < n <= 64:
            return n
        raise CorralError(f"invalid signal {text!r}")
    up = t.upper()
    up = up[3:] if up.startswith("SIG") else up
    if up in _sys.SIGNALS and not up.startswith("RT"):
        return _sys.SIGNALS[up]
    if up.startswith("RTMIN") or up.startswith("RTMAX"):
        base = _sys.SIGRTMIN if up.startswith("RTMIN") else _sys.SIGRTMAX
        off = up[5:]
        try:
            n = int(base) + (int(off) if off else 0)
        except ValueError:
            n = -1
        if _sys.SIGRTMIN <= n <= _sys.SIGRTMAX:
            return n
    raise CorralError(f"unknown signal {text!r}")


class CreateOptions:
    """The flags of `create` and `run` that reach the library."""

    __slots__ = ("bundle", "console_socket", "no_new_keyring", "no_pivot", "pid_file",
                 "preserve_fds", "systemd_cgroup")

    def __init__(self, bundle: str = ".", pid_file: str | None = None,
                 console_socket: str | None = None, no_pivot: bool = False,
                 no_new_keyring: bool = False, preserve_fds: int = 0,
                 systemd_cgroup: bool = False) -> None:
        self.bundle = bundle
        self.pid_file = pid_file
        self.console_socket = console_socket
        self.no_pivot = no_pivot
        self.no_new_keyring = no_new_keyring
        self.preserve_fds = preserve_fds
        self.systemd_cgroup = systemd_cgroup


def _write_maps(pid: int, cfg: dict[str, Any]) -> None:
    lx = cfg["linux"]
    for key, name in (("uidMappings", "uid_map"), ("gidMappings", "gid_map")):
        lines = "".join(f"{m['containerID']} {m['hostID']} {m['size']}\n"
                        for m in lx.get(key, []))
        if lines:
            try:
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(lines)
            except OSError as e:
                raise CorralError(f"linux.{key}: cannot write {name}: {e.strerror}") from None


def _reap(pid: int) -> None:
    """Wait for a child of ours; a pid that is not our child is left alone."""
    if pid <= 0:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _kill_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def preload_create() -> None:
    """Import now what a create imports lazily, for a process that forks one create after
    another (the namespace helper).

    Why: a module imported before the fork is shared by every child; one imported after is
    read, unmarshalled and executed again in each creator and each container init (~3 ms of
    CPU per container, and each page it writes is a copy-on-write fault). The CLI keeps its
    lazy imports: one `corral create` pays them once either way.
    """
    from . import _cgroups, _hooks, _init, _jsonfast, _seccomp, _spec, _stub  # noqa: F401

    _stub.errno_table()  # the same 2 KB of text in every init
    _jsonfast.loads(b"{}")  # bytes decode through the utf-8-sig codec, an import of its own


def create_container(root: Root, cid: str, opts: CreateOptions, log: Log = NULL,
                     for_run: bool = False, console_sock: _sys.Socket | None = None,
                     ) -> State:
    """Build the container up to `created`: the path both `create` and `run` take.

    `console_sock`: where the init sends the pty master when there is no --console-socket
    (`run` without one proxies the terminal itself).

    On any failure everything made so far (init, cgroup, state directory) is removed before
    the error propagates.
    """
    from ._cgroups import MigrationWarmup, new_manager

    warmup = MigrationWarmup()
    from . import _init
    from . import _linux as L
    from ._hooks import run_hooks
    from ._spec import load_bundle

    bundle, cfg, rootfs = load_bundle(opts.bundle)
    cfg.setdefault("linux", {})
    proc = cfg["process"]
    if not any(n.get("type") == "mount" for n in cfg["linux"].get("namespaces", [])):
        raise CorralError(f"{bundle}/config.json: linux.namespaces: a mount namespace is required")
    if proc.get("terminal") and not opts.console_socket and console_sock is None:
        raise CorralError("process.terminal is true but no --console-socket was given: "
                          "a detached container's terminal needs a console socket")
    if opts.preserve_fds < 0:
        raise CorralError("--preserve-fds must not be negative")
    for fd in range(3, 3 + opts.preserve_fds):
        try:
            os.fstat(fd)
        except OSError:
            raise CorralError(f"--preserve-fds {opts.preserve_fds}: fd {fd} is not open") from None

    d = root.make_container_dir(cid)
    lock = Lock(d).__enter__()
    mgr = None
    stage1 = init = 0
    console: _sys.Socket | None = console_sock
    fifo = -1
    parent, child = _sys.socketpair()
    state = State(d, {"id": cid, "bundle": bundle, "rootfs": rootfs, "created": rfc3339_now(),
                      "annotations": cfg.get("annotations") or {}, "config": cfg})
    try:
        os.mkfifo(os.path.join(d, FIFO), 0o600)
        fifo = os.open(os.path.join(d, FIFO), os.O_RDWR | os.O_CLOEXEC)
        mgr = new_manager(cfg["linux"].get("cgroupsPath"), cid, opts.systemd_cgroup)
        try:
            mgr.create()
        except OSError as e:
            raise CorralError(f"linux.cgroupsPath: cannot create cgroup: {e}") from None
        state.cgroup = mgr.to_state()
        res = cfg["linux"].get("resources") or {}
        if res:
            mgr.apply(res, cfg["linux"].get("devices"))
        if opts.console_socket:
            try:
                console = _sys.connect_unix(opts.console_socket)
            except OSError as e:
                raise CorralError(f"--console-socket {opts.console_socket}: {e.strerror}") from None
        # The init is forked by stage 1, which exits: as a subreaper we become its parent,
        # so that `run` can wait for it; after we exit it passes to our own nearest
        # subreaper (conmon, containerd's shim), as runc's init does.
        L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
        warmup.wait()
        stage1 = os.fork()
        if stage1 == 0:
            try:
                parent.close()
                os.close(lock.fd)
            finally:
                _init.stage1(child)
        child.close()
        _init.send(parent, {
            "type": "bootstrap", "config": cfg, "rootfs": rootfs, "bundle": bundle,
            "id": cid, "no_new_keyring": opts.no_new_keyring, "fifo_fd": fifo,
            "no_pivot": opts.no_pivot,
            "preserve_fds": opts.preserve_fds, "cgroup": state.cgroup,
            "console_fd": console.fileno() if console else -1,
        })
        while True:
            msg = _init.recv(parent)
            if msg is None:
                raise CorralError("container init exited before the container was created")
            kind = msg.get("type")
            if kind == "error":
                raise CorralError(msg.get("msg", "container init failed"))
            if kind == "usermap":
                _write_maps(stage1, cfg)
                _init.send(parent, {"type": "ok"})
            elif kind == "pid":
                init = int(msg["pid"])
                _reap(stage1)
                st = proc_stat(init)
                if st is None:
                    raise CorralError("container init exited before the container was created")
                state.pid, state.start_time = init, st[1]
                # Placed while the init builds its rootfs (see _init._CgroupWait).
                mgr.add_pid(init)
                _init.send(parent, {"type": "cgroup"})
            elif kind == "hooks":
                if (cfg.get("hooks") or {}).get("prestart") or (
                        cfg.get("hooks") or {}).get("createRuntime"):
                    state.save()  # a hook may ask `corral state`
                oci = state.oci("creating")
                run_hooks(cfg, "prestart", oci)
                run_hooks(cfg, "createRuntime", oci)
                _init.send(parent, {"type": "ok", "state": state.oci("created")})
            elif kind == "created":
                state.save()
                if opts.pid_file:
                    write_atomic(os.path.abspath(opts.pid_file), f"{init}".encode(), 0o644)
                _init.send(parent, {"type": "ok"})
                break
        log.debug(f"container {cid} created, init pid {init}")
        return state
    except BaseException:
        for pid in (stage1, init):
            _kill_pid(pid, _sys.SIGKILL) if pid > 0 else None
        _reap(stage1)
        _reap(init)
        if mgr is not None:
            _kill_cgroup(mgr.pids())
            mgr.destroy()
        remove_tree(d)
        raise
    finally:
        parent.close()
        child.close()
        if console is not None and console is not console_sock:
            console.close()
        if fifo >= 0:
            os.close(fifo)
        lock.__exit__()


def _kill_cgroup(pids: list[int]) -> None:
    for pid in pids:
        _kill_pid(pid, _sys.SIGKILL)


class _Locked:
    """`with _Locked(root, cid) as st:` a container's state, loaded under its lock.

    Every operation that checks a status and then acts holds the lock for both.
    """

    __slots__ = ("cid", "lock", "root")

    def __init__(self, root: Root, cid: str) -> None:
        self.root = root
        self.cid = cid
        self.lock = Lock(root.container_dir(cid))

    def __enter__(self) -> State:
        self.lock.__enter__()
        try:
            return self.root.load(self.cid)
        except BaseException:
            self.lock.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        self.lock.__exit__()


def start(root: Root, cid: str, log: Log = NULL) -> None:
    """Let a created container's init exec the user's process."""
    from ._hooks import run_hooks

    with _Locked(root, cid) as st:
        status = st.status()
        if status != "created":
            raise CorralError(f"cannot start container {cid!r}: it is {status}, not created")
        try:
            fd = os.open(st.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ENXIO, errno.ENOENT):
                raise CorralError(f"cannot start container {cid!r}: its init is gone") from None
            raise
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
        os.unlink(st.fifo)
    try:
        run_hooks(st.config, "poststart", st.oci("running"))
    except CorralError as e:
        log.warning(str(e))


def signal_init(st: State, sig: int) -> None:
    """Signal the init through a pidfd, after checking it is still the process we started."""
    try:
        pidfd = os.pidfd_open(st.pid)
    except ProcessLookupError:
        raise CorralError(f"container {st.id!r} is not running") from None
    try:
        if not st.init_alive():  # checked after opening: the pidfd now pins this process
            raise CorralError(f"container {st.id!r} is not running")
        try:
            _sys.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            raise CorralError(f"container {st.id!r} is not running") from None
    finally:
        os.close(pidfd)


def kill(root: Root, cid: str, sig: int, all_processes: bool = False) -> None:
    """Send `sig` to the init, or with `all_processes` to every process in its cgroup."""
    from ._cgroups import manager_from_state

    with _Locked(root, cid) as st:
        status = st.status()
        if status == "stopped" and not all_processes:
            raise CorralError(f"cannot kill container {cid!r}: it is not running")
        if all_processes:
            for pid in manager_from_state(st.cgroup).pids():
                _kill_pid(pid, sig)
            return
        signal_init(st, sig)


def _wait_gone(st: State, timeout: float) -> bool:
    """Wait until the init has exited (pidfd readable), up to `timeout` seconds."""
    try:
        pidfd = os.pidfd_open(st.pid)
    except ProcessLookupError:
        return True
    try:
        if not st.init_alive():
            return True
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        return bool(p.poll(int(timeout * 1000)))
    finally:
        os.close(pidfd)


def destroy(st: State, log: Log = NULL) -> None:
    """Remove what corral made for a stopped container: cgroups, state; run poststop hooks."""
    from ._cgroups import manager_from_state
    from ._hooks import run_hooks

    if st.cgroup:
        mgr = manager_from_state(st.cgroup)
        leftovers = mgr.pids()
        if leftovers:  # no pid namespace: the init's children outlive it
            _kill_cgroup(leftovers)
        mgr.destroy()
    try:
        run_hooks(st.config, "poststop", st.oci("stopped"))
    except CorralError as e:
        log.warning(str(e))
    remove_tree(st.dir)


def delete(root: Root, cid: str, force: bool = False, log: Log = NULL) -> None:
    """Delete a stopped (or created) container; with `force`, kill a running one first."""
    d = root.container_dir(cid)
    if not os.path.isdir(d):
        if force:
            return
        raise CorralError(f"container {cid!r} does not exist")
    with Lock(d):
        try:
            st = root.load(cid)
        except CorralError as e:
            if not os.path.exists(os.path.join(d, "state.json")):
                # An aborted create left only the directory: nothing runs, remove it.
                remove_tree(d)
                if force:
                    return
            elif force:
                # A torn state.json: it is written without fsync (it lives no longer than
                # the machine's uptime), so only a power loss with /run on disk tears it, and
                # then nothing of the container runs. Its cgroups cannot be known: say so.
                log.warning(f"{e}; removing its state directory (its cgroups, if any, stay)")
                remove_tree(d)
                return
            raise
        status = st.status()
        if status in ("running", "paused") and not force:
            raise CorralError(f"cannot delete container {cid!r} that is not stopped: {status}")
        if status != "stopped":
            from ._cgroups import manager_from_state

            mgr = manager_from_state(st.cgroup) if st.cgroup else None
            if status == "paused" and mgr is not None:
                mgr.thaw()
            try:
                signal_init(st, _sys.SIGKILL)
            except CorralError:
                pass
            if mgr is not None:
                _kill_cgroup(mgr.pids())
            if not _wait_gone(st, 10.0):
                raise CorralError(f"container {cid!r} did not stop within 10 s of SIGKILL")
        destroy(st, log)


def _manager(st: State) -> Any:
    from ._cgroups import manager_from_state

    if not st.cgroup:
        raise CorralError(f"container {st.id!r} has no cgroup")
    return manager_from_state(st.cgroup)


def pause(root: Root, cid: str) -> None:
    """Freeze every process of a running container (returns once really frozen)."""
    with _Locked(root, cid) as st:
        status = st.status()
        if status != "running":
            raise CorralError(f"cannot pause container {cid!r}: it is {status}, not running")
        _manager(st).freeze()


def resume(root: Root, cid: str) -> None:
    """Thaw a paused container."""
    with _Locked(root, cid) as st:
        status = st.status()
        if status != "paused":
            raise CorralError(f"cannot resume container {cid!r}: it is {status}, not paused")
        _manager(st).thaw()


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def update(root: Root, cid: str, patch: dict[str, Any]) -> None:
    """Change a created, running or paused container's resources; all or nothing.

    `patch` is OCI LinuxResources: the fields given replace the container's (objects merge,
    arrays are replaced); the result is applied and kept in the container's state.
    """
    with _Locked(root, cid) as st:
        status = st.status()
        if status == "stopped":
            raise CorralError(f"cannot update container {cid!r}: it is stopped")
        lx = st.config.setdefault("linux", {})
        merged = _merge(lx.get("resources") or {}, patch)
        from ._errors import ConfigError

        try:
            _manager(st).apply(merged, lx.get("devices"), with_devices="devices" in patch)
        except ConfigError as e:
            raise CorralError(f"update: {e.field}: {e.problem}") from None
        lx["resources"] = merged
        st.save()


def processes(root: Root, cid: str) -> list[int]:
    """The pids of every process in the container's cgroup."""
    st = root.load(cid)
    if st.status() == "stopped":
        return []
    return sorted(_manager(st).pids())


def wait_exit(st: State) -> int:
    """Wait for the init (our child, thanks to the subreaper) and return a shell-style status."""
    try:
        _, status = os.waitpid(st.pid, 0)
    except ChildProcessError:
        _wait_gone(st, 1e9)
        return 0
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def wait_forwarding(st: State, master: int = -1, saved: list[Any] | None = None) -> int:
    """Wait for `st`'s process, forwarding our signals to it; proxy its pty if `master`.

    Shared by `run` and `exec`, which both stand in the foreground for a container process.
    """
    def forward(signum: int, _frame: object) -> None:
        try:
            signal_init(st, signum)
        except CorralError:
            pass

    for sig in _sys.FORWARDED:
        _sys.set_handler(sig, forward)
    try:
        if master >= 0:
            from ._tty import proxy

            proxy(master, saved)
        return wait_exit(st)
    finally:
        for sig in _sys.FORWARDED:
            _sys.set_handler(sig, _sys.SIG_DFL)


def run(root: Root, cid: str, opts: CreateOptions, detach: bool = False, keep: bool = False,
        log: Log = NULL) -> int:
    """create + start, then (unless `detach`) wait and return the container's exit status.

    With `process.terminal` and no --console-socket, `run` (not detached) keeps the pty
    master itself and copies between it and its own stdio, as `runc run -t` does.
    """
    ours = theirs = None
    if not detach and not opts.console_socket and _wants_terminal(opts.bundle):
        ours, theirs = _sys.socketpair(_sys.SOCK_STREAM)
    master = -1
    try:
        st = create_container(root, cid, opts, log, for_run=True, console_sock=theirs)
        if theirs is not None and ours is not None:
            theirs.close()
            _, fds = _sys.recv_fds(ours, 1024, 1)
            master = fds[0]
    finally:
        for end in (ours, theirs):
            if end is not None:
                end.close()
    saved = None
    try:
        if master >= 0:
            from ._tty import prepare

            saved = prepare(master)
        start(root, cid, log)
    except BaseException:
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        delete(root, cid, force=True, log=log)
        raise
    if detach:
        return 0
    code = wait_forwarding(st, master, saved)
    if not keep:
        delete(root, cid, force=True, log=log)
    return code


def _wants_terminal(bundle: str) -> bool:
    from ._spec import load_bundle

    try:
        return bool(load_bundle(bundle)[1]["process"].get("terminal"))
    except CorralError:
        return False  # create_container reports the bad bundle


def list_states(root: Root) -> list[dict[str, Any]]:
    """The OCI state of every container under `root` (unreadable ones skipped)."""
    out = []
    for cid in root.ids():
        try:
            out.append(root.load(cid).oci())
        except CorralError:
            continue
    return out
