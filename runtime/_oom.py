"""Watch one container's memory cgroup for OOM kills: an fd to wait on, a non-blocking check.

A library piece shared by `corral events` (select.poll) and the trio supervisor (which waits
on `fileno()` with trio's own machinery): nothing here blocks or loops.

What it fixes compared with runc and containerd (see INTERFACES.md, "OOM detection"):
  * It reports the *change* in the kernel's `oom_kill` counter since the previous check,
    never the cumulative value: a later unrelated change of memory.events (or a later
    SIGTERM exit) is not an OOM, and one burst of N kills is one report with count N.
  * The baseline is read when the watcher is built, so kills from before are not reported,
    and `final_check()` reads once more after the container's process has exited, for a
    kill that raced the exit.
  * It says which cgroup's limit fired (`OomKill.level`).

The wake-up source (`fileno()`):
  v1  an eventfd registered on the container's memory.oom_control through
      cgroup.event_control. The kernel signals it when this cgroup *or an ancestor* enters
      OOM, and when the cgroup is removed; but it signals *before* the victim is killed
      (before `oom_kill` grows), and not at all for a system-wide OOM. Hence `recheck_in()`:
      after a notification without a kill yet, the caller checks again shortly, for up to
      `PENDING_GRACE` seconds. The kill count is memory.oom_control's `oom_kill` (kernel
      >= 4.13; on older kernels each notification is taken as one kill).
  v2  inotify IN_MODIFY on the container's memory.events, which the kernel rewrites on every
      event counted there, including `oom_kill` of any process in the container, whatever
      limit (or none) caused it. inotify is called through ctypes: the inotify_simple
      package would add an import to the CLI for two system calls.

The level rule (which limit fired), decided when a kill is seen: per level (the container,
then each parent up to the hierarchy's root, exclusive) a count of the OOMs *that level's own
limit* started is compared with its value at the last check that saw neither a kill nor a
pending OOM notification; the innermost level whose count grew is the level: "container"
for the container itself, else that ancestor's directory (e.g.
"/sys/fs/cgroup/memory/corral"). If none grew, the level is "system": the kernel's global
OOM killer (no cgroup limit), or a cpuset/mempolicy OOM.
  v2  the `oom` count (the OOM killer was invoked for this cgroup's limit): the container's
      hierarchical memory.events (a sub-cgroup of the container still counts as the
      container), and each ancestor's memory.events.local, which counts only that cgroup's
      own limit, so a sibling container's OOM is not charged to the common parent
      (memory.events where .local is missing, kernels < 5.2, with exactly that risk).
  v1  has no such counter: memory.failcnt was the obvious candidate, but it also grows when
      reclaim then succeeds, and this 6.18 kernel leaves it at 0 even when the container's
      own limit kills. Nor does `under_oom` help: the kernel sets it on every descendant of
      the cgroup in OOM, and only while the OOM lasts. Instead each ancestor gets an eventfd
      of its own on its memory.oom_control (only its counter is read; the container's fd
      wakes the caller). An OOM of cgroup X signals X and all its descendants, never its
      parents or siblings, so a level's own count is its notifications minus those of its
      parent. A level whose registration the kernel refuses is not a candidate: its OOMs
      are charged to the level inside it.
  Limits: when several levels' limits fired within one interval, the whole kill count is
  reported once, at the innermost of them; an OOM invocation that killed nothing (the
  victim was already exiting) stays a candidate for `PENDING_GRACE` seconds; v1 counts
  `oom_kill` only on the victim's own cgroup, so kills in sub-cgroups of a v1 container
  are not seen.
"""

from __future__ import annotations

import os
import time

from ._errors import CorralError
from ._stats import controller_dir, memory_root

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any

CONTAINER = "container"
SYSTEM = "system"
PENDING_GRACE = 1.0  # seconds to keep expecting a kill after an OOM notification
RECHECK = 0.02  # how soon to check again while a kill is expected
_IN_MODIFY = 0x2
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


class OomKill:
    """One observed increase of the kernel's `oom_kill` counter: immutable.

    count: processes killed in this increase (>= 1).
    level: "container", an ancestor cgroup's directory, or "system" (see the module's rule).
    """

    __slots__ = ("count", "level")
    count: int
    level: str

    def __init__(self, count: int, level: str) -> None:
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "level", level)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"OomKill is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"OomKill is immutable (cannot delete {name!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OomKill):
            return NotImplemented
        return self.count == other.count and self.level == other.level

    def __hash__(self) -> int:
        return hash((self.count, self.level))

    def __repr__(self) -> str:
        return f"OomKill(count={self.count!r}, level={self.level!r})"

    def to_json(self) -> dict[str, Any]:
        """The `data` of an `oom` event line."""
        return {"count": self.count, "level": self.level}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # gone (ENOENT, or ENODEV once the cgroup is removed)
        return None


def _keyed(path: str) -> dict[str, int] | None:
    text = _read(path)
    if text is None:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def _ancestors(d: str, root: str, marker: str) -> list[str]:
    """The parents of `d` below the hierarchy's root, nearest first.

    The walk also stops at the first parent without `marker` (a memory file): the v2 root
    has no memory.events, and a directory outside any cgroup tree has none either.
    """
    out: list[str] = []
    root = os.path.normpath(root)
    p = os.path.dirname(os.path.normpath(d))
    while p not in (root, "/") and os.path.exists(os.path.join(p, marker)):
        out.append(p)
        p = os.path.dirname(p)
    return out


def _inotify_modify(path: str) -> int:
    """inotify_init1 + inotify_add_watch(IN_MODIFY) through libc."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"inotify_init1: {os.strerror(e)}")
    if libc.inotify_add_watch(fd, os.fsencode(path), ctypes.c_uint32(_IN_MODIFY)) < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"inotify_add_watch: {os.strerror(e)}", path)
    return fd


def _eventfd_oom(d: str) -> int:
    """An eventfd the kernel signals on OOM of cgroup `d` (v1 cgroup.event_control)."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        ofd = os.open(os.path.join(d, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(os.path.join(d, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {ofd}")
        finally:
            # The registration holds what it needs; the kernel drops it with the eventfd.
            os.close(ofd)
    except BaseException:
        os.close(efd)
        raise
    return efd


def _eventfd_take(fd: int) -> int:
    """Read and reset an eventfd's count without blocking (0 when unsignalled or -1)."""
    if fd < 0:
        return 0
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class OomWatcher:
    """OOM kills of one container, from its saved cgroup state (`State.cgroup`).

    Use: wait until `fileno()` is readable, or until `recheck_in()` seconds have passed when
    that is not None, then call `check()`; calling `check()` at other times (e.g. on a timer)
    is harmless and catches system-wide OOM kills, which v1 does not signal. After the
    container's process has exited, call `final_check()`; then `close()`.

    Raises:
        CorralError: the container has no memory cgroup directory.
        OSError: the kernel refused the eventfd or inotify registration on the container.
    """

    __slots__ = ("_base_hits", "_base_kills", "_dir", "_fd", "_level_fds", "_levels",
                 "_notes", "_pending_since", "_v2")

    def __init__(self, cg: dict[str, Any]) -> None:
        self._fd = -1
        self._level_fds: list[int] = []  # v1: the ancestors' eventfds (-1: refused)
        self._v2 = cg.get("version") == 2
        d = controller_dir(cg, "memory")
        if not d or not os.path.isdir(d):
            raise CorralError(f"no memory cgroup to watch for OOM kills (state: {d or 'none'})")
        self._dir = d
        marker = "memory.events" if self._v2 else "memory.oom_control"
        self._levels = [d, *_ancestors(d, memory_root(cg), marker)]
        self._notes = [0] * len(self._levels)  # v1: notifications seen per level, cumulative
        self._pending_since: float | None = None
        try:
            if self._v2:
                self._fd = _inotify_modify(os.path.join(d, "memory.events"))
            else:
                self._fd = _eventfd_oom(d)
                for a in self._levels[1:]:
                    try:
                        self._level_fds.append(_eventfd_oom(a))
                    except OSError:
                        self._level_fds.append(-1)
            self._base_kills = self._kills() or 0
            self._drain()  # nothing from before the baseline
            self._base_hits = self._hits()
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        """The container's memory cgroup directory."""
        return self._dir

    def fileno(self) -> int:
        """The fd that becomes readable when an OOM may have happened (-1 once closed)."""
        return self._fd

    def __enter__(self) -> OomWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- counters --------------------------------------------------------------------------

    def _kills(self) -> int | None:
        """The container's cumulative `oom_kill`, or None (gone, or a v1 kernel < 4.13)."""
        name = "memory.events" if self._v2 else "memory.oom_control"
        counters = _keyed(os.path.join(self._dir, name))
        return None if counters is None else counters.get("oom_kill")

    def _hits(self) -> list[int]:
        """Per level (container first), a cumulative count of OOMs started by its own limit.

        v1: the levels' notification counts as drained so far; `_own` subtracts the parent's.
        """
        if not self._v2:
            return list(self._notes)
        out: list[int] = []
        for i, d in enumerate(self._levels):
            c = None if i == 0 else _keyed(os.path.join(d, "memory.events.local"))
            if c is None:
                c = _keyed(os.path.join(d, "memory.events")) or {}
            out.append(c.get("oom", 0))
        return out

    def _own(self, hits: list[int]) -> list[int]:
        """Per level, how many OOMs its own limit started since the baseline."""
        grown = [max(0, n - b) for n, b in zip(hits, self._base_hits, strict=False)]
        if self._v2:
            return grown
        # v1: an OOM of a level also notifies every level inside it.
        return [g - (grown[i + 1] if i + 1 < len(grown) else 0) for i, g in enumerate(grown)]

    def _drain(self) -> int:
        """Empty the fds; how many notifications the container's fd held (v2: 1 if any)."""
        if self._fd < 0:
            return 0
        if not self._v2:
            # Outer levels first: the kernel signals an OOM's cgroup before its descendants,
            # so a notification counted outside is never missing inside.
            for i in range(len(self._level_fds) - 1, -1, -1):
                self._notes[i + 1] += _eventfd_take(self._level_fds[i])
            n = _eventfd_take(self._fd)
            self._notes[0] += n
            return n
        n = 0
        while True:
            try:
                if not os.read(self._fd, 4096):
                    return n
            except BlockingIOError:
                return n
            n = 1

    # -- the API ---------------------------------------------------------------------------

    def check(self) -> list[OomKill]:
        """Drain the fd and report the kills since the previous check (never blocks).

        Returns [] or one OomKill whose count is the growth of `oom_kill`.
        """
        if self._fd < 0:
            return []
        notified = self._drain()
        kills = self._kills()  # read before the limit counters, which the kernel bumps first
        hits = self._hits()
        now = time.monotonic()
        if kills is None:
            if self._v2 or _read(os.path.join(self._dir, "memory.oom_control")) is None:
                return []  # the cgroup is gone: nothing more will happen
            # A v1 kernel without the counter: each OOM notification stands for one kill.
            delta = notified
        else:
            if kills < self._base_kills:  # cannot happen for one cgroup; re-baseline
                self._base_kills = kills
            delta = kills - self._base_kills
            self._base_kills = kills
        own = self._own(hits)
        if delta > 0:
            level = next((CONTAINER if i == 0 else self._levels[i]
                          for i, n in enumerate(own) if n > 0), SYSTEM)
            self._base_hits = hits
            self._pending_since = None
            return [OomKill(delta, level)]
        expecting = notified > 0 and kills is not None if not self._v2 else any(own)
        if expecting and self._pending_since is None:
            self._pending_since = now  # keep the baselines: the kill should follow
        elif self._pending_since is None or now - self._pending_since >= PENDING_GRACE:
            # Nothing under way: move the baselines on, so that an OOM that killed nothing
            # is not blamed for a later kill.
            self._pending_since = None
            self._base_hits = hits
        return []

    def recheck_in(self) -> float | None:
        """Seconds until `check()` should run even if the fd stays quiet; None: no need.

        Not None only after an OOM notification that no kill has followed yet (v1 signals
        before the kill and not after it).
        """
        if self._pending_since is None or self._fd < 0:
            return None
        now = time.monotonic()
        left = self._pending_since + PENDING_GRACE - now
        # The kill usually follows the notification within a millisecond: look again soon,
        # then less and less often (0.5 ms, doubling, up to RECHECK).
        step = min(RECHECK, max(0.0005, now - self._pending_since))
        return max(0.0, min(step, left))

    def final_check(self) -> list[OomKill]:
        """`check()` once more after the container's process exited (kills racing the exit).

        The kernel counts a kill before the victim dies, so by the time the exit is seen
        the count is final; nothing is left pending afterwards.
        """
        out = self.check()
        self._pending_since = None
        return out

    def close(self) -> None:
        """Release the fds (idempotent)."""
        for fd in self._level_fds:
            if fd >= 0:
                os.close(fd)
        self._level_fds = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
