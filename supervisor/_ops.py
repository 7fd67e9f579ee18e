"""What the control socket does to the daemon: `DaemonBackend` (the routes' `Backend`) and
`serve_control`, the task that listens on corrald's socket.

Everything here reads the supervisors' in-memory state (list, status, events) or calls the
`Daemon`'s user operations (start, stop, restart, reload); anything that touches files or
cgroups (stats, logs, kill, pause, resume through the runtime library) runs in a thread
under the daemon's limiter, so one slow call never holds up the others.

Logs are read from ``<log-dir>/<name>.log`` and its rotated copies (``.1``, ``.2``...);
following a log polls the open file every `FOLLOW_POLL` seconds and, when it has been rotated
(renamed, or unlinked with ``keep = 0``), reads the old file to its end before it opens the
new one, so that no line is lost or shown twice across a rotation.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

import attrs
import trio
from corral.runtime import _container
from corral.runtime._errors import CorralError

from ._control import (
    Conflict,
    HTTPError,
    Limits,
    NoSuchContainer,
    Peer,
    Router,
    Unavailable,
    bind_socket,
    resolve_group,
    serve_listener,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection

    from ._daemon import ContainerSupervisor, Daemon
    from ._events import EventRing

__all__ = ["DaemonBackend", "LogFollower", "serve_control", "tail_lines"]

log = logging.getLogger("corrald")

FOLLOW_POLL = 0.1  # seconds between looks at a followed log file
READ_BLOCK = 64 << 10
FOLLOW_CHUNK = 1 << 20  # at most this much per read while catching up


def _exit_json(sup: ContainerSupervisor) -> dict[str, Any] | None:
    cause = sup.last_exit
    if cause is None:
        return None
    return {**cause.to_json(), "description": cause.describe()}


def _spec_json(sup: ContainerSupervisor) -> dict[str, Any]:
    def convert(_inst: object, _attr: object, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    out = attrs.asdict(sup.spec, value_serializer=convert)
    out["env"] = dict(sup.spec.env)
    stop = out.get("stop") or {}
    if "signal" in stop:
        stop["signal"] = sup.spec.stop.signal.name
    return out


def _stats_of(root: Any, name: str) -> dict[str, Any]:
    """Memory, CPU and pids of a running container's cgroup (blocking: call in a thread)."""
    from corral.runtime._stats import usage

    try:
        st = root.load(name)
    except (CorralError, OSError):
        return {}
    return usage(st.cgroup)


def tail_lines(path: str, n: int) -> bytes:
    """The last `n` lines of `path` and, when it has fewer, of ``path.1``, ``path.2``...

    Blocking. A missing file gives ``b""``.
    """
    chunks: list[bytes] = []
    want = n
    i = 0
    while want > 0:
        name = path if i == 0 else f"{path}.{i}"
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            break
        try:
            data, got = _tail_fd(fd, want, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        chunks.append(data)
        want -= got
        i += 1
    return b"".join(reversed(chunks))


def _tail_fd(fd: int, n: int, end: int) -> tuple[bytes, int]:
    """The last `n` lines of the first `end` bytes of `fd`, and how many lines that is.

    Reads back from `end` a block at a time until `n` line ends are in hand; lines end at
    ``\n`` only (a ``\r`` of a progress bar is part of its line).
    """
    if n <= 0 or end <= 0:
        return b"", 0
    blocks: list[bytes] = []
    breaks = 0  # newlines read, but for the file's last byte
    pos = end
    while pos > 0 and breaks < n:
        step = min(READ_BLOCK, pos)
        pos -= step
        block = os.pread(fd, step, pos)
        breaks += block.count(b"\n", 0, len(block) - 1 if not blocks else len(block))
        blocks.append(block)
    data = b"".join(reversed(blocks))
    final = data.endswith(b"\n")
    lines = (data[:-1] if final else data).split(b"\n")[-n:]  # the first may be partial
    return b"\n".join(lines) + (b"\n" if final else b""), len(lines)


@attrs.define(eq=False)
class LogFollower:
    """Reads what is appended to a log file across rotations (every call blocks: threads).

    `start` returns the last lines; each `poll` returns what has been written since
    (``b""`` when nothing), switching to the new file once the old one is read to its end.
    """

    path: str
    _fd: int = attrs.field(init=False, default=-1)
    _ino: tuple[int, int] = attrs.field(init=False, default=(0, 0))
    _pos: int = attrs.field(init=False, default=0)

    def _open(self) -> bool:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        st = os.fstat(self._fd)
        self._ino, self._pos = (st.st_dev, st.st_ino), 0
        return True

    def start(self, lines: int) -> bytes:
        """Open the file; the last `lines` lines (from the rotated copies too)."""
        if not self._open():
            return tail_lines(self.path, lines)
        end = os.fstat(self._fd).st_size
        data, got = _tail_fd(self._fd, lines, end)
        self._pos = end
        if got < lines:
            older = tail_lines(f"{self.path}.1", lines - got) if os.path.exists(
                f"{self.path}.1") else b""
            data = older + data
        return data

    def poll(self) -> bytes:
        if self._fd < 0 and not self._open():
            return b""
        data = os.pread(self._fd, FOLLOW_CHUNK, self._pos)
        if data:
            self._pos += len(data)
            return data
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return b""  # rotated away with keep = 0; the new file comes with the next line
        if (st.st_dev, st.st_ino) != self._ino:
            # Rotated. Lines may have reached the old file between our read and the stat:
            # it is complete now (the writer closes it before the rename), so drain it.
            rest = b""
            while chunk := os.pread(self._fd, FOLLOW_CHUNK, self._pos + len(rest)):
                rest += chunk
            self.close()
            if rest:  # the new file is opened at the next poll
                return rest
            return self.poll() if self._open() else b""
        if st.st_size < self._pos:  # truncated in place
            self._pos = 0
        return b""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@attrs.define(eq=False)
class DaemonBackend:
    """The control routes' view of a running `Daemon`."""

    daemon: Daemon

    @property
    def events(self) -> EventRing:
        return self.daemon.ctx.events

    def names(self) -> Collection[str]:
        return self.daemon.supervisors.keys()

    def _sup(self, name: str) -> ContainerSupervisor:
        sup = self.daemon.supervisors.get(name)
        if sup is None:
            raise NoSuchContainer(name)
        return sup

    def _entry(self, sup: ContainerSupervisor) -> dict[str, Any]:
        uptime = (trio.current_time() - sup.started_at) if sup.started_at is not None else None
        return {
            "name": sup.name,
            "state": sup.state,
            "pid": sup.pid or None,
            "restarts": max(sup.starts - 1, 0),
            "uptime": round(uptime, 3) if uptime is not None else None,
            "started": sup.started_wall if sup.pid else None,
            "last_exit": _exit_json(sup),
            "reason": sup.reason,
        }

    def list(self) -> list[dict[str, Any]]:
        sups = self.daemon.supervisors
        return [self._entry(sups[name]) for name in sorted(sups)]

    async def inspect(self, name: str) -> dict[str, Any]:
        sup = self._sup(name)
        out = self._entry(sup)
        out.update(
            config=_spec_json(sup),
            source=sup.spec.source,
            oom_kills=sup.oom_kills,
            restarts_in_a_row=sup.restart.restarts,
            stopped_by_user=self.daemon.kept_down(sup.name),
            log=os.path.join(self.daemon.ctx.log_dir, f"{sup.name}.log"),
            stats=None,
        )
        if sup.pid:
            ctx = self.daemon.ctx
            out["stats"] = await trio.to_thread.run_sync(_stats_of, ctx.root, name,
                                                         limiter=ctx.limiter) or None
        return out

    async def act(self, name: str, action: str, signum: int | None, peer: Peer
                  ) -> dict[str, Any]:
        daemon = self.daemon
        sup = self._sup(name)
        if daemon.closing:
            raise Unavailable("corrald is stopping")
        detail = f" {signum}" if signum is not None else ""
        log.info("control: %s%s %s by %s", action, detail, name, peer.describe())
        daemon.ctx.events.add("action", name, action=action, signal=signum, uid=peer.uid,
                              pid=peer.pid)
        ops = {"start": daemon.user_start, "stop": daemon.user_stop,
               "restart": daemon.user_restart}
        if action in ops:
            try:
                sup = await ops[action](name)
            except KeyError:  # a reload removed it while we waited for its lock
                raise NoSuchContainer(name) from None
        elif action in ("kill", "pause", "resume"):
            await self._runtime_op(sup, action, signum)
        else:  # the router only sends the actions above
            raise HTTPError(404, f"no such action: {action}")
        return self._entry(sup)

    async def _runtime_op(self, sup: ContainerSupervisor, action: str, signum: int | None
                          ) -> None:
        need = {"kill": ("running", "paused", "stopping"), "pause": ("running",),
                "resume": ("paused",)}[action]
        if sup.state not in need or not sup.pid:
            raise Conflict(f"cannot {action} {sup.name}: it is {sup.state}, not "
                           f"{' or '.join(need)}")
        ctx = self.daemon.ctx
        try:
            if action == "kill":
                assert signum is not None
                await trio.to_thread.run_sync(_container.kill, ctx.root, sup.name, signum,
                                              limiter=ctx.limiter)
            elif action == "pause":
                await sup.pause()
            else:
                await sup.resume()
        except CorralError as e:
            raise Conflict(str(e)) from None

    async def log_tail(self, name: str, lines: int) -> bytes:
        path = os.path.join(self.daemon.ctx.log_dir, f"{self._sup(name).name}.log")
        return await trio.to_thread.run_sync(tail_lines, path, lines,
                                             limiter=self.daemon.ctx.limiter)

    async def log_follow(self, name: str, lines: int) -> AsyncIterator[bytes]:
        limiter = self.daemon.ctx.limiter
        follower = LogFollower(os.path.join(self.daemon.ctx.log_dir,
                                            f"{self._sup(name).name}.log"))
        try:
            data = await trio.to_thread.run_sync(follower.start, lines, limiter=limiter)
            while True:
                if data:
                    yield data
                else:
                    await trio.sleep(FOLLOW_POLL)
                data = await trio.to_thread.run_sync(follower.poll, limiter=limiter)
        finally:
            follower.close()

    async def reload(self, dry_run: bool, peer: Peer) -> dict[str, Any]:
        daemon = self.daemon
        if daemon.closing:
            raise Unavailable("corrald is stopping")
        log.info("control: reload%s by %s", " (dry run)" if dry_run else "", peer.describe())
        plan = await daemon.reload(dry_run)
        if plan is None:
            raise HTTPError(500, "reload failed, nothing changed: "
                            + "; ".join(daemon.load_errors), "reload_failed")
        return {
            "dry_run": dry_run,
            "added": plan.added, "removed": plan.removed, "changed": plan.changed,
            "unchanged": plan.unchanged,
            "stay_stopped": sorted(n for n in plan.changed if daemon.kept_down(n)),
            "errors": daemon.load_errors,
        }

    async def metrics(self) -> str:
        sups = dict(sorted(self.daemon.supervisors.items()))
        ctx = self.daemon.ctx
        running = [n for n, s in sups.items() if s.pid]

        def read_all() -> dict[str, dict[str, Any]]:
            return {n: _stats_of(ctx.root, n) for n in running}

        stats = await trio.to_thread.run_sync(read_all, limiter=ctx.limiter) if running else {}
        return render_metrics(sups, stats, ctx.events.last_seq)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(sups: dict[str, ContainerSupervisor], stats: dict[str, dict[str, Any]],
                   last_seq: int) -> str:
    """The Prometheus text exposition (format 0.0.4) of every container."""
    from ._daemon import STATES

    out: list[str] = []

    def family(name: str, kind: str, help: str) -> None:
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} {kind}")

    family("corral_container_state", "gauge",
           "1 for the state the container is in, 0 for the others.")
    for n, sup in sups.items():
        for state in STATES:
            out.append(f'corral_container_state{{container="{_label(n)}",state="{state}"}} '
                       f"{int(sup.state == state)}")
    family("corral_container_restarts_total", "counter",
           "Starts after the first since the container's supervisor began.")
    for n, sup in sups.items():
        out.append(f'corral_container_restarts_total{{container="{_label(n)}"}} '
                   f"{max(sup.starts - 1, 0)}")
    family("corral_container_oom_kills_total", "counter",
           "Processes of the container killed by the OOM killer.")
    for n, sup in sups.items():
        out.append(f'corral_container_oom_kills_total{{container="{_label(n)}"}} '
                   f"{sup.oom_kills}")
    for name, kind, help, key, scale in (
        ("corral_container_memory_bytes", "gauge", "Memory in use by the container's cgroup.",
         ("memory", "usage"), 1),
        ("corral_container_memory_limit_bytes", "gauge",
         "The memory limit of the container's cgroup (0: none).", ("memory", "limit"), 1),
        ("corral_container_cpu_seconds_total", "counter",
         "CPU time used by the container's cgroup in its current run.", ("cpu", "usage_ns"),
         1e-9),
        ("corral_container_pids", "gauge", "Processes in the container's cgroup.",
         ("pids", "current"), 1),
    ):
        family(name, kind, help)
        for n, s in stats.items():
            if s:
                value = s[key[0]][key[1]] * scale
                limit_none = key == ("memory", "limit") and value >= 2**62
                out.append(f'{name}{{container="{_label(n)}"}} '
                           f"{0 if limit_none else (round(value, 9) if scale != 1 else value)}")
    family("corral_events_last_seq", "gauge", "The sequence number of the newest event.")
    out.append(f"corral_events_last_seq {last_seq}")
    return "\n".join(out) + "\n"


async def serve_control(daemon: Daemon, limits: Limits | None = None, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on the daemon's control socket until cancelled; removes the socket after."""
    spec = daemon.spec
    group = resolve_group(spec.socket_group)
    sock = bind_socket(spec.socket, group)
    ino = os.stat(spec.socket).st_ino
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        log.info("control socket %s (mode 0660, group %s)", spec.socket,
                 spec.socket_group if spec.socket_group is not None else "root")
        task_status.started()
        await serve_listener(listener, Router(DaemonBackend(daemon)), limits or Limits(), group)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(spec.socket).st_ino == ino:
                os.unlink(spec.socket)
        sock.close()
