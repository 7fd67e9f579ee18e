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
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio
from corral.runtime import _container
from corral.runtime._errors import CorralError
from corral.runtime._oom import CONTAINER, OomKill, OomWatcher
from corral.runtime._respawn import settle_unified
from corral.runtime._state import Root, State, process_runs, write_atomic

from . import _faults as faults
from . import _records
from ._config import ContainerSpec, DaemonSpec, ReloadPlan, load_dir, plan_reload, to_oci
from ._events import EventRing
from ._helperclient import ExitInfo, HelperClient, HelperError, HelperGone, spawn_helper
from ._logs import LogFile, pump
from ._network import Attachment, Network, NetworkError, oci_changes
from ._notify import Notifier, watchdog_interval
from ._ops import serve_control
from ._policy import ExitCause, Fatal, RestartAfter, RestartState, starts_at_boot
from ._records import Record, digest

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["STATES", "AlreadyRunning", "ContainerSupervisor", "Context", "Daemon", "Run",
           "recover", "run_daemon"]

log = logging.getLogger("corrald")

STATES = ("stopped", "starting", "running", "paused", "backoff", "stopping", "exited", "fatal")
HELPER_SOCKET_NAME = "corrald-nshelper.sock"
CLEANUP_DEADLINE = 20.0  # seconds for a shielded delete of one container
LOG_DRAIN = 2.0  # seconds to read what is left in the pipes after the container is gone
HELPER_START_TIMEOUT = 30.0
_CLK_TCK = os.sysconf("SC_CLK_TCK") or 100  # the unit of /proc/PID/stat's start time
# Names of the runtime root's entries that are corrald's own, not containers.
RESERVED = {"bundles": "corrald's bundle directory",
            _records.RECORDS_DIR: "corrald's records directory",
            "network": "corrald's network directory"}


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
    network: Network | None = None

    @property
    def bundles(self) -> str:
        return os.path.join(self.root.path, "bundles")


def _write_bundle(spec: ContainerSpec, directory: str, net: Attachment | None = None) -> str:
    """Write ``config.json`` for `spec` into `directory` (blocking); returns the directory.

    A bridge container's config joins the namespace `net` and mounts its hosts files."""
    import json

    base = None
    if spec.bundle is not None:
        with open(os.path.join(spec.bundle, "config.json"), "rb") as f:
            base = json.load(f)
        assert base is not None
        root = base.setdefault("root", {})
        root["path"] = os.path.join(spec.bundle, root.get("path", "rootfs"))
    cfg = to_oci(spec, base)
    if net is not None:
        oci_changes(cfg, net)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # Not synced: it lives under the runtime root (/run), which a reboot empties anyway,
    # and a crash of the process keeps the page cache.
    write_atomic(os.path.join(directory, "config.json"), json.dumps(cfg).encode(), 0o600,
                 durable=False)
    return directory


def _prepare_run(spec: ContainerSpec, bundle: str, net: Attachment | None, log_dir: str,
                 write: bool, root: Root | None) -> None:
    """Before a create (blocking): the log directory, the bundle when `write`, and the
    deletion of a leftover container of the name when `root` is given."""
    os.makedirs(log_dir, 0o755, exist_ok=True)
    if write:
        _write_bundle(spec, bundle, net)
    if root is not None:
        _container.delete(root, spec.name, True)


def _final_oom_reads(watcher: OomWatcher | None, cg: dict[str, Any]
                     ) -> tuple[list[OomKill], int]:
    """After the exit (blocking): the watcher's last check, and the cgroup's ``oom_kill``."""
    return (watcher.final_check() if watcher is not None else []), _fresh_oom_kills(cg)


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


@attrs.define(eq=False)
class Run:
    """One run of a container's process, as the supervisor attends it.

    Attributes:
        pid, start_time: the container's init (the start time guards against a reused pid).
        cgroup: the runtime state's cgroup description (for the OOM watch).
        out, err: the read ends of its stdout and stderr pipes, or -1 (not attached).
        via_helper: the helper is its parent and reports its exit; else (the helper that
            started it is gone) its end is seen through a pidfd, without a status.
        exit: its exit, when the helper kept one for us while no daemon was connected.
        fresh: this daemon started it just now (not adopted): no OOM kill can have gone
            unseen before its watch begins.
    """

    pid: int
    start_time: int
    cgroup: dict[str, Any]
    out: int = -1
    err: int = -1
    via_helper: bool = True
    exit: ExitInfo | None = None
    fresh: bool = False


@attrs.define(eq=False)
class ContainerSupervisor:
    """One container's task: its runs, its logs, its OOM watch and its restart state.

    Start `run` with ``nursery.start``; `stop` asks it to stop (at once during backoff);
    `done` is set when the task has ended. `state`, `last_exit`, `starts` and `oom_kills`
    are for status and tests. Set `adopt` before starting the task to take over a run that a
    previous daemon started (`recover`); `restore` brings back the counters of its record,
    and `undecided` an exit that it recorded but did not act on yet.
    """

    spec: ContainerSpec
    ctx: Context
    state: str = attrs.field(init=False, default="stopped")
    last_exit: ExitCause | None = attrs.field(init=False, default=None)
    reason: str = attrs.field(init=False, default="")
    starts: int = attrs.field(init=False, default=0)
    oom_kills: int = attrs.field(init=False, default=0)
    pid: int = attrs.field(init=False, default=0)  # of the run being attended, else 0
    started_at: float | None = attrs.field(init=False, default=None)  # trio.current_time()
    started_wall: str | None = attrs.field(init=False, default=None)  # RFC 3339, for people
    adopt: Run | None = attrs.field(init=False, default=None)
    undecided: ExitCause | None = attrs.field(init=False, default=None)
    undecided_at: float = attrs.field(init=False, default=0.0)  # when it ended, our clock
    done: trio.Event = attrs.field(init=False, factory=trio.Event)
    first_attempt: trio.Event = attrs.field(init=False, factory=trio.Event)
    restart: RestartState = attrs.field(init=False)
    _stop_requested: trio.Event = attrs.field(init=False, factory=trio.Event)
    _stopped_by_user: bool = attrs.field(init=False, default=False)
    _backoff_scope: trio.CancelScope | None = attrs.field(init=False, default=None)
    _logfile: LogFile = attrs.field(init=False)
    _oom_base: int = attrs.field(init=False, default=0)  # cgroup oom_kill already counted
    _init: tuple[int, int] | None = attrs.field(init=False, default=None)  # exit unrecorded
    _handled: int = attrs.field(init=False, default=0)  # pid of the last recorded exit
    _live: bool = attrs.field(init=False, default=False)  # a container exists in the runtime
    _clean: bool = attrs.field(init=False, default=False)  # we deleted it: no leftover to check
    # Its last run ended and it was not deleted: the helper pins its namespaces, so that a
    # restart respawns it in place (runtime/_respawn.py); deleted if no restart follows.
    _kept: bool = attrs.field(init=False, default=False)
    _cgroup: dict[str, Any] | None = attrs.field(init=False, default=None)  # for a respawn
    _settle: bool = attrs.field(init=False, default=False)  # see runtime._respawn.settle_unified
    _bundle_net: tuple[Any, ...] | None = attrs.field(init=False, default=None)  # written for
    _save_lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)

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
    def _respawns(self) -> bool:
        """Whether a restart respawns it in place (runtime/_respawn.py), so that the helper
        must keep its namespaces while it runs."""
        return self.spec.restart.policy != "no" and self.spec.restart.in_place

    @property
    def bundle(self) -> str:
        return os.path.join(self.ctx.bundles, self.name)

    def _set(self, state: str, detail: str = "") -> None:
        old, self.state = self.state, state
        log.info("%s: state %s -> %s%s", self.name, old, state, f" ({detail})" if detail else "")
        self.ctx.events.add("state", self.name, **{"from": old, "to": state, "detail": detail})

    # -- what the control socket shows and does -------------------------------------------------
    def on_running(self, run: Run) -> None:
        """`run` is attended now: its pid and start (an adopted run's real start, from its
        start time since boot) for status and uptime."""
        from corral.runtime._state import rfc3339_now

        age = 0.0
        try:
            with open("/proc/uptime", "rb") as f:
                age = max(0.0, float(f.read().split()[0]) - run.start_time / _CLK_TCK)
        except (OSError, ValueError, IndexError):
            pass
        self.pid, self.started_at = run.pid, trio.current_time() - age
        self.started_wall = rfc3339_now() if age < 1 else time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age))

    def on_exit(self, cause: ExitCause) -> None:
        """The run ended with `cause` (recorded): an ``exit`` event."""
        self.pid, self.started_at = 0, None
        self.ctx.events.add("exit", self.name, cause=cause.to_json(),
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

    def wake(self) -> None:
        """In backoff: restart now instead of after the delay (a user's start)."""
        if self._backoff_scope is not None and not self._stop_requested.is_set():
            self._backoff_scope.cancel()

    # -- records ------------------------------------------------------------------------------
    def record(self) -> Record:
        """What `_records` keeps of this container now."""
        now = trio.current_time()
        return Record(self.name, digest(self.spec), self.state, self.reason, self.starts,
                      self.oom_kills, self._oom_base,
                      self.last_exit.to_json() if self.last_exit else None,
                      self.restart.snapshot(now), self._init, self._handled, time.time())

    def restore(self, rec: Record) -> None:
        """Take the counters of `rec` (a previous daemon's); a damaged part is logged and
        that part starts afresh."""
        self.starts, self.oom_kills, self._oom_base = rec.starts, rec.oom_kills, rec.oom_base
        self._init, self._handled = rec.init, rec.handled
        self.reason = rec.reason
        try:
            self.last_exit = ExitCause.from_json(rec.last_exit) if rec.last_exit else None
            if rec.restart is not None:
                # The snapshot's times are relative to its save: shift them by the time since.
                away = max(0.0, time.time() - rec.saved_at)
                self.restart = RestartState.restore(self.spec.restart, rec.restart,
                                                    trio.current_time() - away)
        except ValueError as e:
            log.error("%s: damaged record, restart counters start afresh: %s", self.name, e)

    def park(self, rec: Record) -> None:
        """Show the state `rec` ended in (exited, fatal, stopped) without running anything:
        a daemon restart does not bring back a container that had stayed down."""
        self.restore(rec)
        self.state = rec.state
        log.info("%s: state %s (%s) kept from before the daemon restart", self.name, rec.state,
                 rec.reason)
        self.first_attempt.set()
        self.done.set()

    async def save(self) -> None:
        """Write the record now (in a thread, one write at a time, the newest last)."""
        async with self._save_lock:
            rec = self.record()
            with trio.CancelScope(shield=True):
                try:
                    await _thread(self.ctx.limiter, _records.save, self.ctx.root.path, rec)
                except OSError as e:
                    log.error("%s: cannot save its record: %s", self.name, e)

    # -- control ------------------------------------------------------------------------------
    def stop(self, by_user: bool = True) -> None:
        """Ask the container to stop: the configured signal, then SIGKILL after the timeout;
        during backoff the sleep ends at once and no restart follows. `by_user` False is the
        daemon's own shutdown: an ``unless-stopped`` container starts again with the daemon."""
        self._stopped_by_user = self._stopped_by_user or by_user
        self._stop_requested.set()
        if self._backoff_scope is not None:
            self._backoff_scope.cancel()

    async def stop_and_wait(self, by_user: bool = True) -> None:
        self.stop(by_user)
        await self.done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The container's whole life under corrald; returns when it stays down.

        Cancelled (the daemon exits for live restore, or lost its helper), it leaves the
        container running and its record as it is: the next daemon adopts it.
        """
        task_status.started()
        left = False
        try:
            cause, self.undecided = self.undecided, None
            ended = self.undecided_at if cause is not None else None
            if self.adopt is not None:
                run, self.adopt = self.adopt, None
                if self._respawns and run.via_helper and run.exit is None:
                    # A new client made the helper release every pin: take this one's again.
                    await self.ctx.helper.pin(self.name)
                cause = await self._attend(run)
            while True:
                if cause is None:
                    if self._stop_requested.is_set():
                        break
                    cause = await self._run_once()
                    if cause is None:  # could not be created: said in the log
                        await self.save()
                        break
                # An exit the last daemon recorded is decided on as of when it happened: the
                # time no daemon ran is not part of the run (reset_after).
                decision = self.restart.on_exit(trio.current_time() if ended is None else ended,
                                                cause,
                                                stopped_by_user=self._stop_requested.is_set())
                ended = None
                if not self._stopped_by_user:
                    self.restart.stopped_by_user = False  # the daemon's shutdown, not the user
                if isinstance(decision, RestartAfter):
                    self._set("backoff", f"{cause.describe()}; restart {decision.attempt} in "
                                         f"{decision.delay:.3g}s")
                    cause = None
                    # Saved before the next start: a start that the daemon's death leaves
                    # unrecorded is counted by its successor, whose retry count must then
                    # already include this decision.
                    await self.save()
                    with trio.CancelScope() as self._backoff_scope:
                        if self._stop_requested.is_set():
                            self._backoff_scope.cancel()
                        await trio.sleep(decision.delay)
                    self._backoff_scope = None
                    continue
                self.reason = decision.reason
                await self._discard()
                if self._stop_requested.is_set():
                    if not self._stopped_by_user:  # the daemon's own shutdown
                        self.reason = f"{cause.describe()}: stopped with the daemon"
                    self._set("stopped", self.reason)
                else:
                    self._set("fatal" if isinstance(decision, Fatal) else "exited",
                              decision.reason)
                await self.save()
                return
            await self._discard()
            if self.state in ("backoff", "stopping", "running", "starting"):
                if self._stopped_by_user:
                    self.restart.on_user_stop()
                self._set("stopped", "stopped by the user" if self._stopped_by_user
                          else "stopped with the daemon")
                await self.save()
        except BaseException:
            left = True  # cancelled (the daemon leaves) or failed: the next daemon takes over
            raise
        finally:
            self.first_attempt.set()
            self._logfile.close()
            if not self._live:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                    await _thread(self.ctx.limiter, shutil.rmtree, self.bundle, True)
                if (self.spec.network.mode == "bridge" and self.ctx.network is not None
                        and not left):
                    with trio.CancelScope(shield=True,
                                          deadline=trio.current_time() + CLEANUP_DEADLINE):
                        await self.ctx.network.down(self.name)
            self.done.set()

    async def _run_once(self) -> ExitCause | None:
        """Create (or respawn a kept container), run, wait once; the exit cause, or None when
        the create failed."""
        ctx = self.ctx
        self._set("starting", f"start {self.starts + 1}")
        out_r = out_w = err_r = err_w = -1
        try:
            reuse, self._kept = self._kept, False
            net = None
            if self.spec.network.mode == "bridge":
                if ctx.network is None:
                    raise NetworkError("network: this corrald has no bridge network")
                net = await ctx.network.up(self.spec)
            write = self._bundle_net != (net,)  # a restart reuses the bundle it wrote
            # A container of this name left over (a daemon crash) is in the way; a kept one
            # is for the helper to respawn (or delete).
            leftover = not self._clean and not reuse
            if write or leftover or not reuse:  # one thread for all three
                await _thread(ctx.limiter, _prepare_run, self.spec, self.bundle, net,
                              ctx.log_dir, write, ctx.root if leftover else None)
            self._bundle_net = (net,)
            self._clean = False
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            faults.hit("create")
            self._live = True
            started = await ctx.helper.start(
                self.name, self.bundle, out_w, err_w, (out_r, err_r),
                pin=self._respawns, reuse=reuse)
            faults.hit("created")
            pid, start_time, respawned = started.pid, started.start_time, started.respawned
            full = started.cgroup
            del started  # this frame lives as long as the run: keep only the memory cgroup's
            if respawned and self._cgroup is not None:
                cgroup = self._cgroup  # the same cgroup as before
            elif full is not None:
                cgroup = _memory_cgroup(full)
            else:
                start_time, cgroup = await _thread(ctx.limiter, _init_of, ctx.root, self.name)
            full = None
            if self._respawns:
                self._cgroup = cgroup
        except (HelperError, CorralError, OSError, ValueError, NetworkError) as e:
            for fd in (out_r, err_r):  # the write ends: below
                if fd >= 0:
                    os.close(fd)
            self._live = False
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
        self._init = (pid, start_time)
        if not respawned:  # a new cgroup; a respawn keeps the old one and its count
            self._oom_base = 0
        self._settle = respawned and bool(cgroup.get("unified"))
        return await self._attend(Run(pid, start_time, cgroup, out_r, err_r, fresh=True))

    async def _attend(self, run: Run) -> ExitCause:
        """Log, watch and stop `run` until its exit; record the exit, then delete it, or keep
        it for a respawn (`run` deletes it if no restart follows)."""
        ctx = self.ctx
        self._live = True
        async with trio.open_nursery() as readers:
            for fd, stream in ((run.out, "stdout"), (run.err, "stderr")):
                if fd >= 0:
                    readers.start_soon(pump, fd, stream, self._logfile, ctx.limiter)
            if self._settle:
                self._settle = False
                readers.start_soon(self._settle_unified, run.cgroup)
            self.on_running(run)
            self._set("running", f"pid {run.pid}")
            await self.save()  # the start (or the adoption, with what it counted)
            self.first_attempt.set()
            cause, info = await self._watch(run)
            faults.hit("exit")
            self.last_exit = cause
            self.on_exit(cause)
            self._init, self._handled = None, run.pid
            log.info("%s: %s", self.name, cause.describe())
            await self.save()
            faults.hit("recorded")
            if info is not None:
                await ctx.helper.ack(info)
            faults.hit("acked")
            if self._respawns and not self._stop_requested.is_set():
                self._kept = True  # for a respawn: `run` deletes it if no restart follows
            else:
                await self._discard()
            readers.cancel_scope.deadline = trio.current_time() + LOG_DRAIN
        return cause

    async def _settle_unified(self, cgroup: dict[str, Any]) -> None:
        """A respawned run joins its hybrid host's unified cgroup after its exec (a grace
        period's wait, kept out of the restart's way: runtime._respawn.settle_unified)."""
        try:
            await _thread(self.ctx.limiter, settle_unified, cgroup)
        except OSError as e:
            log.warning("%s: cannot move it into its unified cgroup: %s", self.name, e)

    async def _discard(self) -> None:
        """Delete the stopped container (unpinning it first when it was kept)."""
        ctx = self.ctx
        if not self._live:
            return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_DEADLINE):
            if self._kept:
                self._kept = False
                try:
                    await ctx.helper.release(self.name)
                except (HelperError, HelperGone):
                    pass  # a lost helper took its pins with it
            try:
                await _thread(ctx.limiter, _container.delete, ctx.root, self.name, True)
                self._live = False
                self._clean = True  # nothing of ours is left under this name
            except (CorralError, OSError) as e:
                log.warning("%s: delete failed: %s", self.name, e)

    async def _count_ooms(self, cgroup: dict[str, Any]) -> int:
        """Add what the container cgroup's ``oom_kill`` grew by since last looked; returns
        the growth."""
        return self._add_ooms(await _thread(self.ctx.limiter, _fresh_oom_kills, cgroup))

    def _add_ooms(self, now: int) -> int:
        """The cgroup's ``oom_kill`` is `now`: count what it grew by; returns the growth."""
        grew = max(0, now - self._oom_base)
        self.oom_kills += grew
        self._oom_base = max(now, self._oom_base)
        return grew

    async def _watch(self, run: Run) -> tuple[ExitCause, ExitInfo | None]:
        """Wait for the exit (from the helper, or a pidfd) while watching OOM and serving a
        stop; the cause, and the helper's event to acknowledge once the cause is recorded."""
        ctx = self.ctx
        watcher: OomWatcher | None = None
        kills: list[OomKill] = []
        if run.cgroup:
            away = 0 if run.fresh else await self._count_ooms(run.cgroup)  # while away
            if away:
                log.warning("%s: %d OOM kill(s) while corrald was away", self.name, away)
                kills.append(OomKill(away, CONTAINER))
                await self.save()
            try:
                watcher = await _thread(ctx.limiter, OomWatcher, run.cgroup)
            except (CorralError, OSError) as e:
                log.warning("%s: no OOM watch: %s", self.name, e)
        info = run.exit
        try:
            if info is None:
                async with trio.open_nursery() as nursery:
                    if watcher is not None:
                        nursery.start_soon(self._watch_oom, watcher, kills, run.cgroup)
                    nursery.start_soon(self._stopper)
                    info = await _wait_end(ctx, self.name, run)
                    nursery.cancel_scope.cancel()
            if run.cgroup:
                # One thread for both reads: this is on the way to a restart.
                found, now = await _thread(ctx.limiter, _final_oom_reads, watcher, run.cgroup)
                kills += found
                grew = self._add_ooms(now)
                if grew and not kills:
                    kills.append(OomKill(grew, CONTAINER))
        finally:
            if watcher is not None:
                watcher.close()
        if kills:
            level = kills[-1].level
            if level == CONTAINER:
                limit = self.spec.resources.memory
                level = ("container memory limit" + (f" ({_show_size(limit)})" if limit else ""))
            return ExitCause.oom_killed(level, info.signal if info else signal.SIGKILL), info
        if info is None:
            return ExitCause.unknown(), None
        if info.signal is not None:
            return ExitCause.killed(info.signal), info
        return ExitCause.exited(info.code if info.code is not None else 255), info

    async def _watch_oom(self, watcher: OomWatcher, kills: list[OomKill],
                         cgroup: dict[str, Any]) -> None:
        while True:
            recheck = watcher.recheck_in()
            with trio.move_on_after(math.inf if recheck is None else recheck):
                await trio.lowlevel.wait_readable(watcher.fileno())
            found = await _thread(self.ctx.limiter, watcher.check)
            for k in found:
                log.warning("%s: OOM kill of %d process(es), level %s", self.name, k.count,
                            k.level)
                self.ctx.events.add("oom", self.name, count=k.count, level=k.level)
            kills.extend(found)
            if found:
                await self._count_ooms(cgroup)
                await self.save()

    async def _stopper(self) -> None:
        """On stop: the configured signal, then SIGKILL to the whole cgroup after the timeout."""
        await self._stop_requested.wait()
        if self.state == "paused":  # a frozen process would not see the signal
            try:
                await _thread(self.ctx.limiter, _container.resume, self.ctx.root, self.name)
            except CorralError as e:
                log.info("%s: %s", self.name, e)
        stop = self.spec.stop
        if self._respawns:
            try:  # no standby for a respawn that will not come (runtime/_respawn.py)
                await self.ctx.helper.release(self.name)
            except (HelperError, HelperGone):
                pass
        self._set("stopping", f"{stop.signal.name}, SIGKILL after {stop.timeout:g}s")
        await _stop_container(self.ctx, self.name, stop.signal, stop.timeout)


async def _stop_container(ctx: Context, cid: str, sig: int, grace: float) -> None:
    """`sig` to the container, then SIGKILL to all of its processes every second after
    `grace` seconds; never returns (cancel it once the exit is seen)."""
    faults.hit("stopping")
    try:
        await _thread(ctx.limiter, _container.kill, ctx.root, cid, int(sig))
    except CorralError as e:
        log.info("%s: %s", cid, e)
    await trio.sleep(grace)
    log.warning("%s: still running %gs after %s: SIGKILL to every process", cid, grace,
                signal.Signals(sig).name)
    while True:
        try:
            await _thread(ctx.limiter, _container.kill, ctx.root, cid, int(signal.SIGKILL),
                          True)
        except CorralError as e:
            log.info("%s: %s", cid, e)
        await trio.sleep(1)


async def _wait_pidfd(pid: int, start_time: int) -> None:
    """Return once process `pid` (started at `start_time`) has ended: through a pidfd, for
    a process that is not the helper's child (the helper that started it is gone)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if process_runs(pid, start_time):  # the pidfd is of this process, not a reused pid
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def _wait_end(ctx: Context, cid: str, run: Run) -> ExitInfo | None:
    """Wait for `run` to end: its exit from the helper when the helper is its parent, else
    (adopted without the helper) through a pidfd, with no status (None)."""
    if run.via_helper:
        return await ctx.helper.wait_exit(cid)
    await _wait_pidfd(run.pid, run.start_time)
    return None


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

    async def start(self, spec: ContainerSpec, adopt: Run | None = None,
                    record: Record | None = None) -> ContainerSupervisor:
        """Start supervising `spec`: from its `record`'s counters if given, taking over the
        running `adopt` if given, else creating the container."""
        sup = ContainerSupervisor(spec, self.ctx)
        if record is not None:
            sup.restore(record)
        sup.adopt = adopt
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
        for name, what in RESERVED.items():
            if name in specs:
                log.error("%s: the name is reserved for %s (skipped)", name, what)
                del specs[name]
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
        faults.hit("reload")
        async with contextlib.AsyncExitStack() as locks:
            for name in sorted({*plan.added, *plan.removed, *plan.changed}):
                await locks.enter_async_context(self.lock(name))
            down = {n for n in plan.changed if self.kept_down(n)}  # before the stops below
            async with trio.open_nursery() as nursery:
                for name in (*plan.removed, *plan.changed):
                    nursery.start_soon(self.supervisors[name].stop_and_wait)
            for name in plan.removed:
                del self.supervisors[name]
                self.user_stopped.discard(name)
                await _thread(self.ctx.limiter, _records.remove, self.ctx.root.path, name)
            for name in (*plan.added, *plan.changed):
                if name in down:
                    self.supervisors[name] = sup = self._parked(new[name])
                    await sup.save()  # its new digest: a daemon restart keeps it down too
                else:
                    await self.start(new[name])
        self.ctx.events.add("reload", added=plan.added, removed=plan.removed,
                            changed=plan.changed, errors=self.load_errors)
        await self.notifier.send("READY=1", f"STATUS={self.status_line()}")
        return plan

    def lock(self, name: str) -> trio.Lock:
        """The lock that orders user operations and reloads on one container."""
        return self._locks.setdefault(name, trio.Lock())

    def kept_down(self, name: str) -> bool:
        """Whether the user stopped `name` (by the control socket, or before a daemon
        restart, by its record) and it has not been started since: a reload leaves it so."""
        sup = self.supervisors.get(name)
        return name in self.user_stopped or (
            sup is not None and sup.done.is_set() and sup.state == "stopped"
            and sup.restart.stopped_by_user)

    def _parked(self, spec: ContainerSpec) -> ContainerSupervisor:
        """A supervisor that is not started: a stopped container's new spec."""
        sup = ContainerSupervisor(spec, self.ctx)
        sup.reason = "stopped by the user"
        sup.restart.stopped_by_user = True
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
        """The daemon's shutdown: stop every container in parallel, then forget the records
        but those of containers the user stopped (``unless-stopped`` keeps them down)."""
        self.closing = True
        async with trio.open_nursery() as nursery:
            for sup in list(self.supervisors.values()):
                nursery.start_soon(sup.stop_and_wait, False)
        keep = {n for n, s in self.supervisors.items() if s.restart.stopped_by_user}
        await _thread(self.ctx.limiter, _records.prune, self.ctx.root.path, keep)


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


def _init_of(root: Root, cid: str) -> tuple[int, dict[str, Any]]:
    """The start time of container `cid`'s init and its cgroups, from the runtime's state.

    Only these: the whole state holds the container's OCI config (~17 KB of Python objects),
    which a supervisor must not keep alive for as long as its container runs.
    """
    st = root.load(cid)
    return st.start_time, _memory_cgroup(st.cgroup)


def _memory_cgroup(cg: dict[str, Any]) -> dict[str, Any]:
    """The part of a state's cgroup description that the OOM watch reads (the memory
    controller's directory and mount), which is all a supervisor keeps of it."""
    if cg.get("version") == 2:
        return {k: cg[k] for k in ("version", "path") if k in cg}
    keep = [k for k in cg.get("paths") or {} if "memory" in k.split(",")]
    out = {"version": cg.get("version"),
           "paths": {k: cg["paths"][k] for k in keep},
           "mounts": {k: cg["mounts"][k] for k in keep if k in (cg.get("mounts") or {})}}
    if cg.get("unified"):  # a hybrid host's: a respawn settles it (runtime/_respawn.py)
        out["unified"] = cg["unified"]
    return out


def _load_state(root: Root, cid: str) -> State | None:
    try:
        return root.load(cid)
    except (CorralError, OSError, ValueError, KeyError):
        return None


def _source_gone(spec: ContainerSpec) -> str | None:
    """The rootfs or bundle directory of `spec` when it no longer exists, else None."""
    path = spec.rootfs or spec.bundle
    return path if path is not None and not os.path.isdir(path) else None


async def _retire(ctx: Context, cid: str, run: Run, why: str) -> None:
    """Stop a container that cannot be adopted (`why`), record nothing, delete it."""
    log.warning("%s: %s: stopping it", cid, why)
    info = run.exit
    if info is None and (run.via_helper or process_runs(run.pid, run.start_time)):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_container, ctx, cid, signal.SIGTERM, 10.0)
            info = await _wait_end(ctx, cid, run)
            nursery.cancel_scope.cancel()
    for fd in (run.out, run.err):
        if fd >= 0:
            os.close(fd)
    if info is not None:
        await ctx.helper.ack(info)
    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_DEADLINE):
        await _thread(ctx.limiter, _container.delete, ctx.root, cid, True)
        await _thread(ctx.limiter, shutil.rmtree, os.path.join(ctx.bundles, cid), True)
        await _thread(ctx.limiter, _records.remove, ctx.root.path, cid)
    log.warning("%s: stopped and removed (%s)", cid, why)


async def _attach(ctx: Context, cid: str, pid: int, kept: bool, alive: bool
                  ) -> tuple[int, int]:
    """The read ends of a container's stdout/stderr: the helper's copies (with what the
    container wrote while no daemon read, even if it has ended since), else reopened through
    /proc while it runs (a pipe can be), else none (-1)."""
    if kept:
        fds = await ctx.helper.attach(cid)
        if fds is not None:
            return fds
    if not alive:
        return -1, -1
    got = []
    for n in (1, 2):
        try:
            if os.readlink(f"/proc/{pid}/fd/{n}").startswith("pipe:"):
                got.append(os.open(f"/proc/{pid}/fd/{n}", os.O_RDONLY | os.O_CLOEXEC))
                continue
        except OSError:
            pass
        got.append(-1)
    if -1 in got:
        log.warning("%s: cannot reattach all of its output", cid)
    return got[0], got[1]


def _stays_down(spec: ContainerSpec, rec: Record) -> bool:
    """Whether a container that no daemon runs now had stayed down by its own record."""
    if rec.state in ("exited", "fatal"):
        return True
    by_user = bool((rec.restart or {}).get("stopped_by_user"))
    return rec.state == "stopped" and not starts_at_boot(spec.restart, by_user)


async def recover(daemon: Daemon, specs: dict[str, ContainerSpec]) -> None:
    """Start-up: take over what a previous corrald left, then start what is configured.

    A container found running (in the runtime root, and as the helper's child if the helper
    survived) is adopted with its record's counters; one that ended while no daemon was
    there has its exit (kept by the helper, or "unknown" if the helper died too) recorded
    and acted on by policy; one that is no longer configured, or whose rootfs or bundle is
    gone, or whose configuration changed meanwhile, is stopped (and the last started anew).
    A configured container with no run is started, unless its record says it had stayed
    down (exited, fatal, or stopped by the user with ``unless-stopped``).
    """
    ctx = daemon.ctx
    records, problems = await _thread(ctx.limiter, _records.load_all, ctx.root.path, True)
    for p in problems:
        log.error("unreadable record (ignored): %s", p)
    with trio.fail_after(HELPER_START_TIMEOUT):
        running = await ctx.helper.settled_list()  # after the creates still in progress
    kept = ctx.helper.exits()
    ids = set(await _thread(ctx.limiter, ctx.root.ids)) | set(running) | set(kept)
    adopted: dict[str, Run] = {}
    retiring: list[tuple[str, Run, str]] = []
    for cid in sorted(ids - set(RESERVED)):
        spec, rec, info = specs.get(cid), records.get(cid), kept.get(cid)
        if info is not None and rec is not None and info.pid == rec.handled:
            await ctx.helper.ack(info)  # recorded just before the last daemon died
            info = None
        st = await _thread(ctx.limiter, _load_state, ctx.root, cid)
        alive = st is not None and st.init_alive()
        unrecorded = (info is not None or (st is not None and rec is not None
                                           and rec.init == (st.pid, st.start_time)))
        if st is None or not (alive or unrecorded):
            # Ended, and its exit is counted: the last daemon died before deleting it.
            if info is not None:
                await ctx.helper.ack(info)
            await _thread(ctx.limiter, _container.delete, ctx.root, cid, True)
            continue
        via_helper = cid in running or info is not None
        out, err = await _attach(ctx, cid, st.pid, via_helper, alive)
        run = Run(st.pid, st.start_time, _memory_cgroup(st.cgroup), out, err, via_helper, info)
        gone = _source_gone(spec) if spec is not None else None
        if spec is None:
            retiring.append((cid, run, "left by the previous corrald, no longer configured"))
        elif gone is not None:
            retiring.append((cid, run, f"its {'rootfs' if spec.rootfs else 'bundle'} {gone} "
                                       "is gone"))
        elif rec is not None and rec.digest != digest(spec):
            retiring.append((cid, run, "its configuration changed while corrald was down"))
            del records[cid]  # starts anew below, as a reload would
        else:
            adopted[cid] = run
            if rec is None or rec.init != (st.pid, st.start_time):
                log.info("%s: its start was not recorded: counted now", cid)
                rec = rec or Record(cid, digest(spec))
                rec.starts += 1
                rec.init = (st.pid, st.start_time)
                rec.oom_base = 0
                records[cid] = rec
        faults.hit("recover")
    if retiring:
        async with trio.open_nursery() as nursery:
            for cid, run, why in retiring:
                nursery.start_soon(_retire, ctx, cid, run, why)
    if ctx.network is not None:
        # Networks of containers not adopted (stopped above, or gone with a crash) go; the
        # adopted keep their namespace and address, and their names in the others' hosts.
        await ctx.network.cleanup(set(adopted))
        for name in adopted:
            spec = specs[name]
            if spec.network.mode == "bridge":
                await ctx.network.adopt(name, spec.hostname)
    for name, spec in specs.items():
        rec = records.get(name)
        if rec is not None and rec.digest != digest(spec):
            rec = None
        if name in adopted:
            run = adopted[name]
            log.info("%s: adopted (pid %d%s)", name, run.pid,
                     "" if run.exit is None else ", ended while corrald was away")
            await daemon.start(spec, run, rec)
        elif rec is not None and _stays_down(spec, rec):
            sup = ContainerSupervisor(spec, ctx)
            sup.park(rec)
            daemon.supervisors[name] = sup
        else:
            sup = ContainerSupervisor(spec, ctx)
            if rec is not None:
                sup.restore(rec)
                if rec.init is None and rec.state in ("running", "stopping"):
                    sup.undecided = sup.last_exit  # recorded; the daemon died before acting
                    sup.undecided_at = trio.current_time() - max(0.0,
                                                                 time.time() - rec.saved_at)
                    sup.state = rec.state
            daemon.supervisors[name] = sup
            await daemon.nursery.start(daemon._supervise, sup)
    stale = set(records) - set(specs)
    for name in stale:
        await _thread(ctx.limiter, _records.remove, ctx.root.path, name)


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
        stopping = leaving = False

        async def keep_helper(task_status: trio.TaskStatus[int]) -> None:
            await helper.run(task_status=task_status)
            if not stopping:
                raise HelperGone("the namespace helper closed the connection")

        async with trio.open_nursery() as outer:
            helper_pid = await outer.start(keep_helper)
            log.info("connected to the namespace helper (pid %d)", helper_pid)
            ctx = Context(Root(spec.root), helper, spec.log_dir)
            ctx.network = Network(spec.network, spec.root, ctx.limiter)
            try:
                async with trio.open_nursery() as nursery:
                    daemon = Daemon(spec, ctx, nursery)
                    await nursery.start(serve_control, daemon)
                    specs = await _thread(ctx.limiter, daemon.load)
                    await recover(daemon, specs)
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
                        await daemon.notifier.send("STOPPING=1")
                        if spec.live_restore:
                            leaving = True
                            log.info("%s: live restore: leaving %d container(s) running for "
                                     "the next corrald", signal.Signals(signum).name,
                                     sum(s._live for s in daemon.supervisors.values()))
                        else:
                            log.info("%s: stopping every container",
                                     signal.Signals(signum).name)
                            await daemon.stop_all()
                        nursery.cancel_scope.cancel()
                        break
                stopping = True
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
                    if not leaving:
                        try:
                            await helper.shutdown()
                        except (HelperError, HelperGone) as e:
                            log.warning("namespace helper shutdown: %s", e)
                        try:
                            os.rmdir(ctx.bundles)
                        except OSError:
                            pass
                    await ctx.network.close()
                    daemon.notifier.close()
            finally:
                await helper.aclose()
                outer.cancel_scope.cancel()
    log.info("stopped")
    return 0
