"""corrald's core: one trio nursery, one `ContainerSupervisor` task per container.

Each supervisor owns its container: it writes the OCI bundle under ``<root>/bundles/<name>``,
has the namespace helper create the container (id = name) with stdout/stderr on pipes that
it reads into the log file, waits for the helper's exit report while watching the cgroup for
OOM kills, records the exit cause, deletes the container, and restarts it as its
`RestartState` decides, sleeping the backoff in a scope that a stop cancels at once.

The daemon (`run_daemon`) starts the helper (or reconnects to one that runs), a supervisor
per configured container, and handles SIGTERM/SIGINT (stop everything in parallel, exit 0)
and SIGHUP (reload the directory: `plan_reload`). The daemon never forks, never reaps:
exits come from the helper, which is their parent.

State changes are logged as ``corrald: NAME: state OLD -> NEW (detail)``, and recorded, with
exits, OOM kills and reloads, in the event ring (`EventRing`) that the control socket
(`corral.supervisor._control`, `_ops`) serves; the operations a user asks for there (start
a stopped container, pause, a stop that a reload must not undo) are `Daemon` methods below.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import shutil
import signal
from typing import TYPE_CHECKING, Any

import attrs
import trio
from corral.runtime import _container
from corral.runtime._errors import CorralError
from corral.runtime._oom import CONTAINER, OomKill, OomWatcher
from corral.runtime._state import Root, write_atomic

from ._config import ContainerSpec, DaemonSpec, ReloadPlan, load_dir, plan_reload, to_oci
from ._events import EventRing
from ._helperclient import HelperClient, HelperError, HelperGone, spawn_helper
from ._logs import LogFile, pump
from ._notify import Notifier, watchdog_interval
from ._ops import serve_control
from ._policy import ExitCause, Fatal, RestartAfter, RestartState

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["STATES", "AlreadyRunning", "ContainerSupervisor", "Context", "Daemon", "run_daemon"]

log = logging.getLogger("corrald")

STATES = ("stopped", "starting", "running", "paused", "backoff", "stopping", "exited", "fatal")
HELPER_SOCKET_NAME = "corrald-nshelper.sock"
CLEANUP_DEADLINE = 20.0  # seconds for a shielded delete of one container
LOG_DRAIN = 2.0  # seconds to read what is left in the pipes after the container is gone
HELPER_START_TIMEOUT = 30.0


async def _thread(limiter: trio.CapacityLimiter, fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


@attrs.define(eq=False)
class Context:
    """What every supervisor shares: the runtime root, the helper, where files go."""

    root: Root
    helper: HelperClient
    log_dir: str
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(8))
    events: EventRing = attrs.field(factory=EventRing)

    @property
    def bundles(self) -> str:
        return os.path.join(self.root.path, "bundles")


def _write_bundle(spec: ContainerSpec, directory: str) -> str:
    """Write ``config.json`` for `spec` into `directory` (blocking); returns the directory."""
    import json

    base = None
    if spec.bundle is not None:
        with open(os.path.join(spec.bundle, "config.json"), "rb") as f:
            base = json.load(f)
        assert base is not None
        root = base.setdefault("root", {})
        root["path"] = os.path.join(spec.bundle, root.get("path", "rootfs"))
    cfg = to_oci(spec, base)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    write_atomic(os.path.join(directory, "config.json"), json.dumps(cfg).encode(), 0o600)
    return directory


def _show_size(n: int) -> str:
    """``16M`` for 16 MiB: the largest unit that divides `n`."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


def _fresh_oom_kills(cg: dict[str, Any]) -> int:
    """The container cgroup's cumulative ``oom_kill`` (a fresh cgroup: all are this run's)."""
    from corral.runtime._stats import controller_dir

    d = controller_dir(cg, "memory")
    if not d:
        return 0
    name = "memory.events" if cg.get("version") == 2 else "memory.oom_control"
    try:
        with open(os.path.join(d, name)) as f:
            text = f.read()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def _exit_recorded(sup: ContainerSupervisor, _attr: object, cause: ExitCause | None
                   ) -> ExitCause | None:
    """`ContainerSupervisor.last_exit`'s setter hook: every exit becomes an event."""
    if cause is not None:
        sup.on_exit(cause)
    return cause


@attrs.define(eq=False)
class ContainerSupervisor:
    """One container's task: its runs, its logs, its OOM watch and its restart state.

    Start `run` with ``nursery.start``; `stop` asks it to stop (at once during backoff);
    `done` is set when the task has ended. `state`, `last_exit` and `starts` are for
    status and tests.
    """

    spec: ContainerSpec
    ctx: Context
    state: str = attrs.field(init=False, default="stopped")
    last_exit: ExitCause | None = attrs.field(init=False, default=None,
                                              on_setattr=_exit_recorded)
    reason: str = attrs.field(init=False, default="")
    starts: int = attrs.field(init=False, default=0)
    pid: int = attrs.field(init=False, default=0)
    started_at: float | None = attrs.field(init=False, default=None)  # trio.current_time()
    started_wall: str | None = attrs.field(init=False, default=None)  # RFC 3339, for people
    oom_kills: int = attrs.field(init=False, default=0)
    _oom_this_run: int = attrs.field(init=False, default=0)
    done: trio.Event = attrs.field(init=False, factory=trio.Event)
    first_attempt: trio.Event = attrs.field(init=False, factory=trio.Event)
    restart: RestartState = attrs.field(init=False)
    _stop_requested: trio.Event = attrs.field(init=False, factory=trio.Event)
    _backoff_scope: trio.CancelScope | None = attrs.field(init=False, default=None)
    _logfile: LogFile = attrs.field(init=False)

    @restart.default
    def _restart_default(self) -> RestartState:
        return RestartState(self.spec.restart)

    @_logfile.default
    def _logfile_default(self) -> LogFile:
        return LogFile(os.path.join(self.ctx.log_dir, f"{self.spec.name}.log"), self.spec.logs)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def bundle(self) -> str:
        return os.path.join(self.ctx.bundles, self.name)

    def _set(self, state: str, detail: str = "") -> None:
        old, self.state = self.state, state
        log.info("%s: state %s -> %s%s", self.name, old, state, f" ({detail})" if detail else "")
        self.ctx.events.add("state", self.name, **{"from": old, "to": state, "detail": detail})

    def on_running(self, pid: int) -> None:
        """The run's process is `pid` (for status and uptime)."""
        from corral.runtime._state import rfc3339_now

        self.pid, self.started_at, self.started_wall = pid, trio.current_time(), rfc3339_now()
        self._oom_this_run = 0

    def on_exit(self, cause: ExitCause) -> None:
        """The run ended: an ``exit`` event; an OOM kill not seen live still counts once."""
        if cause.kind == "oom" and self._oom_this_run == 0:
            self.oom_kills += 1
        self.pid, self.started_at = 0, None
        self.ctx.events.add("exit", self.name, cause=attrs.asdict(cause),
                            description=cause.describe())

    async def pause(self) -> None:
        """Freeze the running container (the runtime's pause, in a thread)."""
        await _thread(self.ctx.limiter, _container.pause, self.ctx.root, self.name)
        if self.state == "running":  # not if it exited meanwhile
            self._set("paused", "paused by the user")

    async def resume(self) -> None:
        """Thaw the paused container."""
        await _thread(self.ctx.limiter, _container.resume, self.ctx.root, self.name)
        if self.state == "paused":
            self._set("running", f"pid {self.pid}, resumed by the user")

    def stop(self) -> None:
        """Ask the container to stop: the configured signal, then SIGKILL after the timeout;
        during backoff the sleep ends at once and no restart follows."""
        self._stop_requested.set()
        if self._backoff_scope is not None:
            self._backoff_scope.cancel()

    def wake(self) -> None:
        """In backoff: restart now instead of after the delay (a user's start)."""
        if self._backoff_scope is not None and not self._stop_requested.is_set():
            self._backoff_scope.cancel()

    async def stop_and_wait(self) -> None:
        self.stop()
        await self.done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The container's whole life under corrald; returns when it stays down."""
        task_status.started()
        try:
            while not self._stop_requested.is_set():
                cause = await self._run_once()
                if cause is None:  # could not be created: said in the log
                    break
                decision = self.restart.on_exit(trio.current_time(), cause,
                                                stopped_by_user=self._stop_requested.is_set())
                if isinstance(decision, RestartAfter):
                    self._set("backoff", f"{cause.describe()}; restart {decision.attempt} in "
                                         f"{decision.delay:.3g}s")
                    with trio.CancelScope() as self._backoff_scope:
                        if self._stop_requested.is_set():
                            self._backoff_scope.cancel()
                        await trio.sleep(decision.delay)
                    self._backoff_scope = None
                    continue
                self.reason = decision.reason
                if self._stop_requested.is_set():
                    self._set("stopped", decision.reason)
                else:
                    self._set("fatal" if isinstance(decision, Fatal) else "exited",
                              decision.reason)
                return
            if self.state in ("backoff", "stopping", "running", "starting"):
                self.restart.on_user_stop()
                self._set("stopped", "stopped by the user")
        finally:
            self.first_attempt.set()
            self._logfile.close()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                await _thread(self.ctx.limiter, shutil.rmtree, self.bundle, True)
            self.done.set()

    async def _run_once(self) -> ExitCause | None:
        """Create, run, wait and delete once; the exit cause, or None when the create failed."""
        ctx = self.ctx
        self._set("starting", f"start {self.starts + 1}")
        out_r = out_w = err_r = err_w = -1
        try:
            await _thread(ctx.limiter, os.makedirs, ctx.log_dir, 0o755, True)
            await _thread(ctx.limiter, _write_bundle, self.spec, self.bundle)
            # A container of this name left over (a daemon crash) is in the way.
            await _thread(ctx.limiter, _container.delete, ctx.root, self.name, True)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            pid = await ctx.helper.create(self.name, self.bundle, out_w, err_w)
        except (HelperError, CorralError, OSError, ValueError) as e:
            for fd in (out_r, err_r):  # the write ends: below
                if fd >= 0:
                    os.close(fd)
            self.reason = f"cannot create: {e}"
            self._set("fatal", self.reason)
            self.first_attempt.set()
            return None
        finally:
            for fd in (out_w, err_w):
                if fd >= 0:
                    os.close(fd)
        self.starts += 1
        self.restart.on_start(trio.current_time())
        async with trio.open_nursery() as readers:
            readers.start_soon(pump, out_r, "stdout", self._logfile, ctx.limiter)
            readers.start_soon(pump, err_r, "stderr", self._logfile, ctx.limiter)
            try:
                self._set("running", f"pid {pid}")
                self.first_attempt.set()
                cause = await self._watch(pid)
            finally:
                with trio.CancelScope(shield=True,
                                      deadline=trio.current_time() + CLEANUP_DEADLINE):
                    try:
                        await _thread(ctx.limiter, _container.delete, ctx.root, self.name, True)
                    except (CorralError, OSError) as e:
                        log.warning("%s: delete failed: %s", self.name, e)
                readers.cancel_scope.deadline = trio.current_time() + LOG_DRAIN
        self.last_exit = cause
        log.info("%s: %s", self.name, cause.describe())
        return cause

    async def _watch(self, pid: int) -> ExitCause:
        """Wait for the exit (from the helper) while watching OOM and serving a stop."""
        ctx = self.ctx
        self.on_running(pid)
        cgroup: dict[str, Any] = {}
        watcher: OomWatcher | None = None
        try:
            st = await _thread(ctx.limiter, ctx.root.load, self.name)
            cgroup = st.cgroup
            watcher = await _thread(ctx.limiter, OomWatcher, cgroup)
        except (CorralError, OSError) as e:
            log.warning("%s: no OOM watch: %s", self.name, e)
        kills: list[OomKill] = []
        info = None
        try:
            async with trio.open_nursery() as nursery:
                if watcher is not None:
                    nursery.start_soon(self._watch_oom, watcher, kills)
                nursery.start_soon(self._stopper)
                info = await ctx.helper.wait_exit(self.name)
                nursery.cancel_scope.cancel()
            if watcher is not None:
                kills += await _thread(ctx.limiter, watcher.final_check)
            if not kills and cgroup:
                n = await _thread(ctx.limiter, _fresh_oom_kills, cgroup)
                if n:
                    kills.append(OomKill(n, CONTAINER))
        finally:
            if watcher is not None:
                watcher.close()
        if kills:
            level = kills[-1].level
            if level == CONTAINER:
                limit = self.spec.resources.memory
                level = ("container memory limit" + (f" ({_show_size(limit)})" if limit else ""))
            return ExitCause.oom_killed(level, info.signal if info else signal.SIGKILL)
        assert info is not None
        if info.signal is not None:
            return ExitCause.killed(info.signal)
        return ExitCause.exited(info.code if info.code is not None else 255)

    async def _watch_oom(self, watcher: OomWatcher, kills: list[OomKill]) -> None:
        while True:
            recheck = watcher.recheck_in()
            with trio.move_on_after(math.inf if recheck is None else recheck):
                await trio.lowlevel.wait_readable(watcher.fileno())
            found = await _thread(self.ctx.limiter, watcher.check)
            for k in found:
                log.warning("%s: OOM kill of %d process(es), level %s", self.name, k.count,
                            k.level)
                self.oom_kills += k.count
                self._oom_this_run += k.count
                self.ctx.events.add("oom", self.name, count=k.count, level=k.level)
            kills.extend(found)

    async def _stopper(self) -> None:
        """On stop: the configured signal, then SIGKILL to the whole cgroup after the timeout."""
        await self._stop_requested.wait()
        if self.state == "paused":  # a frozen process would not see the signal
            try:
                await _thread(self.ctx.limiter, _container.resume, self.ctx.root, self.name)
            except CorralError as e:
                log.info("%s: %s", self.name, e)
        stop = self.spec.stop
        self._set("stopping", f"{stop.signal.name}, SIGKILL after {stop.timeout:g}s")
        try:
            await _thread(self.ctx.limiter, _container.kill, self.ctx.root, self.name,
                          int(stop.signal))
        except CorralError as e:
            log.info("%s: %s", self.name, e)
        await trio.sleep(stop.timeout)
        log.warning("%s: still running %gs after %s: SIGKILL to every process", self.name,
                    stop.timeout, stop.signal.name)
        while True:
            try:
                await _thread(self.ctx.limiter, _container.kill, self.ctx.root, self.name,
                              int(signal.SIGKILL), True)
            except CorralError as e:
                log.info("%s: %s", self.name, e)
            await trio.sleep(1)


@attrs.define(eq=False)
class Daemon:
    """The running daemon: its settings, the shared context, the supervisors by name."""

    spec: DaemonSpec
    ctx: Context
    nursery: trio.Nursery
    notifier: Notifier = attrs.field(factory=Notifier)
    supervisors: dict[str, ContainerSupervisor] = attrs.field(init=False, factory=dict)
    user_stopped: set[str] = attrs.field(init=False, factory=set)  # a reload keeps them down
    closing: bool = attrs.field(init=False, default=False)
    load_errors: list[str] = attrs.field(init=False, factory=list)  # of the last load
    _locks: dict[str, trio.Lock] = attrs.field(init=False, factory=dict)
    _reload_lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)

    def status_line(self) -> str:
        """One line for systemd's STATUS=: the count of containers in each state."""
        counts: dict[str, int] = {}
        for sup in self.supervisors.values():
            counts[sup.state] = counts.get(sup.state, 0) + 1
        parts = [f"{counts[s]} {s}" for s in STATES if s in counts]
        return f"{len(self.supervisors)} containers: " + (", ".join(parts) or "none")

    async def start(self, spec: ContainerSpec) -> ContainerSupervisor:
        sup = ContainerSupervisor(spec, self.ctx)
        self.supervisors[spec.name] = sup
        await self.nursery.start(self._supervise, sup)
        return sup

    async def _supervise(self, sup: ContainerSupervisor,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await sup.run(task_status=task_status)
        except* HelperGone:
            raise  # the daemon cannot go on without its helper: run_daemon exits with 1
        except* Exception as eg:
            # A bug in one supervisor must not take the others down: log it, mark it fatal.
            log.error("%s: supervisor failed", sup.name, exc_info=eg)
            sup.state, sup.reason = "fatal", f"internal error: {eg!r}"

    def load(self) -> dict[str, ContainerSpec]:
        """The container files, the bad ones logged and skipped.

        A file that is now bad but was good before keeps its running container as it is: a
        typo in an edit must not stop a container on reload.
        """
        specs, errors = load_dir(self.spec.config_dir)
        self.load_errors = [str(e) for e in errors]
        for e in errors:
            name = os.path.basename(str(e.file)).removesuffix(".toml")
            sup = getattr(self, "supervisors", {}).get(name)
            if sup is not None and name not in specs:
                specs[name] = sup.spec
                log.error("%s (kept running with its previous configuration)", e)
            else:
                log.error("%s (skipped)", e)
        if "bundles" in specs:
            log.error("bundles: the name is reserved for corrald's bundle directory (skipped)")
            del specs["bundles"]
        return specs

    async def reload(self, dry_run: bool = False) -> ReloadPlan | None:
        """SIGHUP: stop removed containers, start added ones, restart changed ones.

        A changed container that the user stopped takes its new spec and stays stopped.

        Args:
            dry_run: only read the files and return the plan (the control socket's
                ``dry_run``).

        Returns:
            The plan, or None when the config directory could not be read (logged, and in
            `load_errors`; nothing changed).
        """
        async with self._reload_lock:
            return await self._reload(dry_run)

    async def _reload(self, dry_run: bool) -> ReloadPlan | None:
        if not dry_run:
            await self.notifier.send("RELOADING=1")
        try:
            new = await _thread(self.ctx.limiter, self.load)
        except CorralError as e:
            log.error("reload failed, nothing changed: %s", e)
            self.load_errors = [str(e)]
            if not dry_run:
                await self.notifier.send("READY=1")
            return None
        current = {name: sup.spec for name, sup in self.supervisors.items()}
        plan = plan_reload(current, new)
        if dry_run:
            return plan
        log.info("reload: %s", plan.describe())
        async with contextlib.AsyncExitStack() as locks:
            for name in sorted({*plan.added, *plan.removed, *plan.changed}):
                await locks.enter_async_context(self.lock(name))
            async with trio.open_nursery() as nursery:
                for name in (*plan.removed, *plan.changed):
                    nursery.start_soon(self.supervisors[name].stop_and_wait)
            for name in plan.removed:
                del self.supervisors[name]
                self.user_stopped.discard(name)
            for name in (*plan.added, *plan.changed):
                if name in self.user_stopped:
                    self.supervisors[name] = self._parked(new[name])
                else:
                    await self.start(new[name])
        self.ctx.events.add("reload", added=plan.added, removed=plan.removed,
                            changed=plan.changed, errors=self.load_errors)
        await self.notifier.send("READY=1", f"STATUS={self.status_line()}")
        return plan

    def lock(self, name: str) -> trio.Lock:
        """The lock that orders user operations and reloads on one container."""
        return self._locks.setdefault(name, trio.Lock())

    def _parked(self, spec: ContainerSpec) -> ContainerSupervisor:
        """A supervisor that is not started: a stopped container's new spec."""
        sup = ContainerSupervisor(spec, self.ctx)
        sup.reason = "stopped by the user"
        sup.first_attempt.set()
        sup.done.set()
        return sup

    async def user_start(self, name: str) -> ContainerSupervisor:
        """Start `name` for the user: a new task when its last one has ended (stopped,
        exited, fatal), at once when it waits in backoff, nothing when it is up; returns once
        the first attempt is made."""
        async with self.lock(name):
            sup = self.supervisors[name]
            self.user_stopped.discard(name)
            if sup.done.is_set():
                sup = await self.start(sup.spec)
            elif sup.state == "backoff":
                sup.wake()
        await sup.first_attempt.wait()
        return sup

    async def user_stop(self, name: str) -> ContainerSupervisor:
        """Stop `name` for the user and wait until it is down; no reload starts it again."""
        async with self.lock(name):
            sup = self.supervisors[name]
            self.user_stopped.add(name)
            await sup.stop_and_wait()
        return sup

    async def user_restart(self, name: str) -> ContainerSupervisor:
        """Stop `name` (when up), then start it with a new task."""
        async with self.lock(name):
            await self.supervisors[name].stop_and_wait()
            self.user_stopped.discard(name)
            sup = await self.start(self.supervisors[name].spec)
        await sup.first_attempt.wait()
        return sup

    async def stop_all(self) -> None:
        self.closing = True
        async with trio.open_nursery() as nursery:
            for sup in list(self.supervisors.values()):
                nursery.start_soon(sup.stop_and_wait)


class AlreadyRunning(Exception):
    """Another corrald holds the lock beside our socket."""


def _lock(spec: DaemonSpec) -> int:
    """flock ``SOCKET.lock``: one corrald per socket (and so per helper); returns the fd."""
    path = spec.socket + ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another corrald runs with {path} locked") from None
    return fd


async def _connect_helper(spec: DaemonSpec) -> HelperClient:
    """Reconnect to a helper that answers on our socket, or start one."""
    path = os.path.join(os.path.dirname(spec.socket), HELPER_SOCKET_NAME)
    try:
        return await HelperClient.connect(path)
    except OSError:
        pass
    with trio.fail_after(HELPER_START_TIMEOUT):
        pid = await spawn_helper(path, spec.root)
    log.info("namespace helper pid %d on %s", pid, path)
    return await HelperClient.connect(path)


async def _clear_leftovers(ctx: Context) -> None:
    """Kill and delete the containers a previous corrald left running in the helper.

    Adopting them is a later step; until then a restarted corrald starts from a clean slate,
    and waits for each exit report so that a stale one cannot be taken for a new run's.
    """
    running = await ctx.helper.list()
    if running:
        log.warning("deleting %d container(s) left running by a previous corrald: %s",
                    len(running), ", ".join(sorted(running)))
    for cid in running:
        with trio.move_on_after(CLEANUP_DEADLINE):
            await _thread(ctx.limiter, _container.delete, ctx.root, cid, True)
            await ctx.helper.wait_exit(cid)


async def run_daemon(spec: DaemonSpec, *,
                     task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> int:
    """Run corrald until SIGTERM or SIGINT; returns the exit status (0 after a clean stop).

    Args:
        spec: the daemon's settings (`load_daemon`).

    Returns:
        0 once every container has been stopped.
    """
    for d in (spec.root, spec.log_dir, os.path.dirname(spec.socket)):
        os.makedirs(d, mode=0o755, exist_ok=True)
    lock = _lock(spec)
    try:
        return await _run_locked(spec, task_status)
    finally:
        os.close(lock)


async def _run_locked(spec: DaemonSpec, task_status: trio.TaskStatus[Daemon]) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        helper = await _connect_helper(spec)
        stopping = False

        async def keep_helper(task_status: trio.TaskStatus[int]) -> None:
            await helper.run(task_status=task_status)
            if not stopping:
                raise HelperGone("the namespace helper closed the connection")

        async with trio.open_nursery() as outer:
            helper_pid = await outer.start(keep_helper)
            log.info("connected to the namespace helper (pid %d)", helper_pid)
            ctx = Context(Root(spec.root), helper, spec.log_dir)
            try:
                async with trio.open_nursery() as nursery:
                    daemon = Daemon(spec, ctx, nursery)
                    await nursery.start(serve_control, daemon)
                    await _clear_leftovers(ctx)
                    specs = await _thread(ctx.limiter, daemon.load)
                    for s in specs.values():
                        await daemon.start(s)
                    for sup in list(daemon.supervisors.values()):
                        await sup.first_attempt.wait()
                    log.info("ready: %s", daemon.status_line())
                    await daemon.notifier.send("READY=1", f"STATUS={daemon.status_line()}")
                    interval = watchdog_interval()
                    if interval is not None:
                        nursery.start_soon(daemon.notifier.watchdog, interval)
                    task_status.started(daemon)
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            log.info("SIGHUP: reloading %s", spec.config_dir)
                            await daemon.reload()
                            continue
                        log.info("%s: stopping every container", signal.Signals(signum).name)
                        await daemon.notifier.send("STOPPING=1")
                        await daemon.stop_all()
                        nursery.cancel_scope.cancel()
                        break
                stopping = True
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
                    try:
                        await helper.shutdown()
                    except (HelperError, HelperGone) as e:
                        log.warning("namespace helper shutdown: %s", e)
                    try:
                        os.rmdir(ctx.bundles)
                    except OSError:
                        pass
                    daemon.notifier.close()
            finally:
                await helper.aclose()
                outer.cancel_scope.cancel()
    log.info("stopped")
    return 0
