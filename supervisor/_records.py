"""What corrald remembers of each container across its own restarts: one JSON file per name.

A restarted (or crashed, or upgraded) corrald must go on where the last one stopped: the
restart counters and the start-limit history, the OOM kills already counted, whether the
user stopped the container, and which run of the container has an exit that was not yet
recorded. The container's processes themselves are found from the runtime's state and the
namespace helper (`_daemon.recover`); this file only says what was *counted*.

Files live in ``<root>/corrald/<name>.json`` (the runtime root, normally /run/corral: a
tmpfs, so a reboot forgets them and every container starts afresh, as it should). A record is
written whole to a temporary file and renamed over the old one: a crash of the daemon at any
point leaves the old or the new record, never a mix. There is no fsync: the page cache
survives the daemon's death, and a machine crash takes /run away anyway.

The writes come in this order around a run, so that nothing is counted twice or lost:

1. after the helper reports the container created: ``starts``, ``init`` = (pid, start time);
2. when its exit arrives: ``last_exit``, ``handled`` = pid, ``init`` = None, the OOM
   counts; only then is the exit acknowledged to the helper (which resends unacknowledged
   exits to the next daemon);
3. at each state change that a restarted daemon must honour (backoff, exited, fatal,
   stopped by the user).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import attrs

from ._config import ContainerSpec

__all__ = ["RECORDS_DIR", "Record", "digest", "load_all", "prune", "remove", "save"]

RECORDS_DIR = "corrald"  # under the runtime root; a reserved container name


def digest(spec: ContainerSpec) -> str:
    """A fingerprint of what the container file says (not where the file is): a record
    whose digest differs belongs to a configuration that changed while corrald was down."""
    # Keys added later are left out at their default, so that a corrald upgrade does not
    # see every container's file as changed (and restart them all at adoption).
    data = attrs.asdict(spec, filter=lambda a, v: a.name != "source" and not (
        a.name == "in_place" and v is True))
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@attrs.define
class Record:
    """One container's counters, as last saved.

    Attributes:
        name: the container's name (its file's stem, and its runtime id).
        digest: `digest` of the spec it ran with.
        state: the supervisor's state when saved (see `_daemon.STATES`).
        reason: why it is in that state, for exited/fatal/stopped.
        starts: how many times corrald has started it.
        oom_kills: OOM kills counted so far (all runs).
        oom_base: the container cgroup's own ``oom_kill`` count already included in
            `oom_kills` (a kill while the daemon was down shows as the difference).
        last_exit: `ExitCause.to_json` of the last exit, or None.
        restart: `RestartState.snapshot`.
        init: (pid, start time) of the run whose exit is not recorded yet, or None.
        handled: the pid of the last run whose exit is recorded (an exit the helper sends
            again for it is a duplicate).
        saved_at: wall-clock time of the save, to shift the restart history's times.
    """

    name: str
    digest: str
    state: str = "stopped"
    reason: str = ""
    starts: int = 0
    oom_kills: int = 0
    oom_base: int = 0
    last_exit: dict[str, Any] | None = None
    restart: dict[str, Any] | None = None
    init: tuple[int, int] | None = None
    handled: int = 0
    saved_at: float = 0.0

    @classmethod
    def from_json(cls, data: Any) -> Record:
        """Check and read a saved record.

        Raises:
            ValueError: the file is damaged (wrong keys or types).
        """
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        fields = {a.name: a for a in attrs.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        for key in ("name", "digest"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{key}: missing or not a string")
        for key in ("starts", "oom_kills", "oom_base", "handled"):
            if not isinstance(data.get(key, 0), int) or data.get(key, 0) < 0:
                raise ValueError(f"{key}: not a count")
        init = data.get("init")
        if init is not None:
            if not (isinstance(init, list) and len(init) == 2
                    and all(isinstance(x, int) for x in init)):
                raise ValueError("init: not [pid, start time]")
            data = {**data, "init": (init[0], init[1])}
        for key in ("last_exit", "restart"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise ValueError(f"{key}: not an object")
        if not isinstance(data.get("state", ""), str) or not isinstance(data.get("reason", ""),
                                                                       str):
            raise ValueError("state/reason: not strings")
        if not isinstance(data.get("saved_at", 0.0), int | float):
            raise ValueError("saved_at: not a number")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _dir(root: str) -> str:
    return os.path.join(root, RECORDS_DIR)


def save(root: str, record: Record) -> None:
    """Write `record` atomically (blocking: call it from a thread)."""
    d = _dir(root)
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = os.path.join(d, f"{record.name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record.to_json(), f)
    os.rename(tmp, path)


def remove(root: str, name: str) -> None:
    """Forget container `name` (blocking)."""
    try:
        os.unlink(os.path.join(_dir(root), f"{name}.json"))
    except FileNotFoundError:
        pass


def load_all(root: str, clean: bool = False) -> tuple[dict[str, Record], list[str]]:
    """Every record under `root`, and a message for each file that could not be read (it is
    left in place for a person to look at, and the container is treated as unknown).

    `clean`: also remove the temporary files of saves that a dead daemon left half done —
    only for the daemon at its start, never while a daemon may be saving."""
    d = _dir(root)
    records: dict[str, Record] = {}
    problems: list[str] = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return records, problems
    for entry in names:
        path = os.path.join(d, entry)
        if entry.endswith(".tmp"):
            if clean:  # a save that the daemon's death interrupted: the old record stands
                os.unlink(path)
            continue
        if not entry.endswith(".json"):
            continue
        try:
            with open(path) as f:
                rec = Record.from_json(json.load(f))
        except (OSError, ValueError) as e:
            problems.append(f"{path}: {e}")
            continue
        if rec.name != entry.removesuffix(".json"):
            problems.append(f"{path}: name: {rec.name!r} does not match the file name")
            continue
        records[rec.name] = rec
    return records, problems


def prune(root: str, keep: set[str]) -> None:
    """Remove the records of every name not in `keep`, and the directory once empty."""
    d = _dir(root)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for entry in names:
        if entry.removesuffix(".json") not in keep:
            try:
                os.unlink(os.path.join(d, entry))
            except FileNotFoundError:
                pass
    try:
        os.rmdir(d)
    except OSError:
        pass
