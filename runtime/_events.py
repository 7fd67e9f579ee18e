"""`corral events`: a container's stats and OOM kills as a stream of JSON lines.

The format is runc's, which containerd (go-runc) reads line by line from a pipe:
  {"type": "stats", "id": ID, "data": {...runc's types.Stats...}}   every --interval
  {"type": "oom", "id": ID, "data": {"count": N, "level": "container"|PATH|"system"}}
runc sends `oom` events without data; corral adds the count and the level (which limit
fired, see _oom.py). go-runc decodes every event's `data` as stats, so to containerd these
are unknown fields, ignored; it only looks at the type of an `oom` event.

Like runc: the first stats event comes one interval after the start, `--stats` prints one
and exits, a stopped container is refused at the start ("is not running"), and the stream
ends, exit status 0, when the container stops. Unlike runc, the end is seen at once (a
pidfd on the init wakes the loop) and the OOM counter is read once more after the exit, so
that a kill racing the exit is still reported before the stream ends.
"""

from __future__ import annotations

import os
import select
import time

from . import _jsonfast as json
from ._errors import CorralError
from ._stats import stats

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ._oom import OomWatcher
    from ._state import Root, State

DEFAULT_INTERVAL = 5.0

_NS = {"ns": 1, "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000, "ms": 1_000_000,
       "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
_DIGITS = "0123456789"
_MAX_NS = (1 << 63) - 1


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string ("5s", "100ms", "1m30s", "1.5h", "-2us", "0").

    The grammar is Go's time.ParseDuration, which runc's `--interval` flag uses: an
    optional sign, then one or more decimal numbers each with a unit (ns, us, µs, ms, s,
    m, h); a bare "0" needs no unit.

    Raises:
        CorralError: naming the text and what is wrong with it.
    """
    s = text
    neg = s[:1] == "-"
    if s[:1] in ("-", "+"):
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise CorralError(f"invalid duration {text!r}")
    total = 0
    i, n = 0, len(s)
    while i < n:
        start = i
        while i < n and s[i] in _DIGITS:
            i += 1
        whole = s[start:i]
        frac = ""
        if i < n and s[i] == ".":
            i += 1
            fstart = i
            while i < n and s[i] in _DIGITS:
                i += 1
            frac = s[fstart:i]
        if not whole and not frac:
            raise CorralError(f"invalid duration {text!r}")
        ustart = i
        while i < n and s[i] not in _DIGITS and s[i] != ".":
            i += 1
        unit = s[ustart:i]
        if not unit:
            raise CorralError(f"invalid duration {text!r}: missing unit")
        scale = _NS.get(unit)
        if scale is None:
            raise CorralError(f"invalid duration {text!r}: unknown unit {unit!r}")
        total += int(whole or "0") * scale
        if frac:
            total += int(frac) * scale // 10 ** len(frac)
        if total > _MAX_NS:
            raise CorralError(f"invalid duration {text!r}: out of range")
    return (-total if neg else total) / 1e9


def write_stdout(line: str) -> None:
    """Write `line` to fd 1 at once, unbuffered: a pipe reader sees each event as it happens.

    sys.stdout would hold lines in its buffer when stdout is a pipe, as it is for containerd.
    """
    data = line.encode()
    while data:
        data = data[os.write(1, data):]


def _emit(write: Callable[[str], None], kind: str, cid: str, data: dict[str, Any]) -> None:
    write(json.dumps({"type": kind, "id": cid, "data": data}) + "\n")


def _stopped(root: Root, cid: str) -> bool:
    try:
        return root.load(cid).status() == "stopped"
    except CorralError:  # deleted meanwhile
        return True


def _pidfd(st: State) -> int:
    """A pidfd for the container's init (readable once it exits), or -1 if it is gone."""
    try:
        fd = os.pidfd_open(st.pid)
    except OSError:
        return -1
    if not st.init_alive():  # the pid was reused before we opened it: not our init
        os.close(fd)
        return -1
    return fd


def _watcher(st: State) -> OomWatcher | None:
    from ._oom import OomWatcher

    try:
        return OomWatcher(st.cgroup)
    except (CorralError, OSError):
        return None  # no memory cgroup or no notification: stats only, as far as we can


def events(root: Root, cid: str, *, stats_only: bool, interval: float,
           write: Callable[[str], None]) -> int:
    """Print a container's events as JSON lines through `write`; the exit status.

    `write` gets one complete line per call and must pass it on at once (flush), e.g.
    `write_stdout`. With `stats_only`, one stats event; otherwise stats every `interval`
    seconds and an oom event per kill, until the container stops.

    Raises:
        CorralError: unknown or stopped container, or interval <= 0.
    """
    if interval <= 0:
        raise CorralError("duration interval must be greater than 0")
    st = root.load(cid)
    if st.status() == "stopped":
        raise CorralError(f"container {cid!r} is not running")
    try:
        if stats_only:
            _emit(write, "stats", st.id, stats(st.cgroup))
            return 0
        return _loop(root, st, interval, write)
    except BrokenPipeError:
        return 0  # the reader has gone: nobody left to tell


def _loop(root: Root, st: State, interval: float, write: Callable[[str], None]) -> int:
    watcher = _watcher(st)
    pidfd = _pidfd(st)
    poller = select.poll()
    if watcher is not None:
        poller.register(watcher.fileno(), select.POLLIN)
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    next_stats = time.monotonic() + interval
    try:
        while True:
            if watcher is not None:
                for kill in watcher.check():
                    _emit(write, "oom", st.id, kill.to_json())
            if _stopped(root, st.id):
                if watcher is not None:
                    for kill in watcher.final_check():
                        _emit(write, "oom", st.id, kill.to_json())
                return 0
            now = time.monotonic()
            if now >= next_stats:
                _emit(write, "stats", st.id, stats(st.cgroup))
                next_stats += interval
                if next_stats <= now:  # fell behind (suspended, slow reader): no burst
                    next_stats = now + interval
            timeout = next_stats - time.monotonic()
            again = watcher.recheck_in() if watcher is not None else None
            if again is not None:
                timeout = min(timeout, again)
            poller.poll(max(0, int(timeout * 1000 + 0.999)))
    finally:
        if watcher is not None:
            watcher.close()
        if pidfd >= 0:
            os.close(pidfd)
