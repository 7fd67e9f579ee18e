"""Per-container state on disk: one directory per container under the runtime root.

Layout of `<root>/<id>/`:
  state.json  what `state` prints plus what later commands need (pid, start time, cgroups,
              config); written whole to a temp file and renamed over the old one, so that a
              reader, or a crash of any process, sees either the old or the new file, never
              half of one. It is not fsync'ed (runc and crun do not sync theirs either): the
              page cache outlives any process, and what a machine crash could lose describes
              containers that the crash killed. The root is meant to be a tmpfs (/run), and
              where it is not (/run on disk) the fsyncs cost ~1.5 ms of every create.
  exec.fifo   present while the container is `created`: the init holds it open and blocks
              reading it; `start` writes one byte and removes it.

The status is never stored: it is derived live from the init's pid, its start time (which
guards against pid reuse) and the fifo, as runc and crun do.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from . import _jsonfast as json
from ._errors import CorralError

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any

OCI_VERSION = "1.0.2"
DEFAULT_ROOT = "/run/corral"
STATE_FILE = "state.json"
FIFO = "exec.fifo"
_MAX_ID = 1024


def validate_id(cid: str) -> str:
    """Refuse ids that could escape the state root or confuse a path.

    Allowed: letters, digits, `_`, `-`, `.`, `+`, `:`, `@` (runc's set plus nothing else),
    not `.`/`..`, at most 1024 characters.

    Raises:
        CorralError: naming the id and what is wrong with it.
    """
    if not cid:
        raise CorralError("container id cannot be empty")
    if len(cid) > _MAX_ID:
        raise CorralError(f"invalid container id {cid[:40]!r}...: longer than {_MAX_ID}")
    if cid in (".", ".."):
        raise CorralError(f"invalid container id {cid!r}")
    for ch in cid:
        if not (ch.isascii() and (ch.isalnum() or ch in "_-.+:@")):
            raise CorralError(
                f"invalid container id {cid!r}: only letters, digits and _ - . + : @ are allowed"
            )
    return cid


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of `pid` from /proc, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = raw[raw.rfind(b")") + 2:].split()
    return rest[0].decode(), int(rest[19])


def process_runs(pid: int, start_time: int) -> bool:
    """Whether process `pid`, started at `start_time` (clock ticks), runs: not a zombie, and
    not another process that reuses the pid."""
    if pid <= 0:
        return False
    st = proc_stat(pid)
    return st is not None and st[0] not in "ZX" and st[1] == start_time


def rfc3339_now() -> str:
    """The current UTC time as RFC 3339 with nanoseconds, as runc prints `created`."""
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + (
        f".{ns % 1_000_000_000:09d}Z"
    )


def write_atomic(path: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Write `path` so that readers and crashes see the old or the new content only.

    The whole content goes to a temporary file beside `path`, which is then renamed over it.
    `durable`: also fsync the file before the rename and the directory after it, so that the
    new content survives a power loss, not only a crash of a process. What lives no longer
    than the machine's uptime (a container's state.json) passes False.
    """
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:  # a regular file takes it all at once; a short write would truncate
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if not durable:
        return
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class State:
    """What corral knows about one container; `status` is computed, never stored."""

    __slots__ = ("annotations", "bundle", "cgroup", "config", "created", "dir", "id",
                 "owner", "pid", "rootfs", "start_time")

    def __init__(self, directory: str, data: dict[str, Any]) -> None:
        self.dir = directory
        self.id: str = data["id"]
        self.pid: int = data.get("pid", 0)
        self.start_time: int = data.get("start_time", 0)
        self.bundle: str = data["bundle"]
        self.rootfs: str = data["rootfs"]
        self.created: str = data["created"]
        self.owner: str = data.get("owner", "")
        self.annotations: dict[str, str] = data.get("annotations") or {}
        self.cgroup: dict[str, Any] = data.get("cgroup") or {}
        self.config: dict[str, Any] = data.get("config") or {}

    @property
    def fifo(self) -> str:
        return os.path.join(self.dir, FIFO)

    def init_alive(self) -> bool:
        """True while the recorded init runs (not a zombie, and not a reused pid)."""
        return process_runs(self.pid, self.start_time)

    def status(self) -> str:
        """created | running | paused | stopped, from the live process and cgroup."""
        if not self.init_alive():
            return "stopped"
        if os.path.exists(self.fifo):
            return "created"
        if self.cgroup:
            from ._cgroups import manager_from_state

            if manager_from_state(self.cgroup).frozen():
                return "paused"
        return "running"

    def oci(self, status: str | None = None) -> dict[str, Any]:
        """The state JSON of the runtime-spec, with runc's extra fields (rootfs, created, owner)."""
        status = status or self.status()
        out: dict[str, Any] = {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": self.pid if status != "stopped" else 0,
            "status": status,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": self.owner,
        }
        if self.annotations:
            out["annotations"] = self.annotations
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "pid": self.pid, "start_time": self.start_time,
            "bundle": self.bundle, "rootfs": self.rootfs, "created": self.created,
            "owner": self.owner, "annotations": self.annotations, "cgroup": self.cgroup,
            "config": self.config,
        }

    def save(self) -> None:
        write_atomic(os.path.join(self.dir, STATE_FILE), json.dumps(self.to_json()).encode(),
                     durable=False)


class Root:
    """The runtime's state root (`--root`, default /run/corral)."""

    __slots__ = ("path",)

    def __init__(self, path: str = DEFAULT_ROOT) -> None:
        self.path = os.path.abspath(path)

    def container_dir(self, cid: str) -> str:
        return os.path.join(self.path, validate_id(cid))

    def make_container_dir(self, cid: str) -> str:
        """Create the container's directory; fails if the id is taken."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        d = self.container_dir(cid)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            raise CorralError(f"container with id {cid!r} already exists") from None
        return d

    def load(self, cid: str) -> State:
        """Load a container's state, or fail naming the id."""
        d = self.container_dir(cid)
        try:
            with open(os.path.join(d, STATE_FILE), "rb") as f:
                return State(d, json.loads(f.read()))
        except FileNotFoundError:
            raise CorralError(f"container {cid!r} does not exist") from None
        except (ValueError, KeyError) as e:
            raise CorralError(f"container {cid!r}: state file is corrupt: {e}") from None

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if os.path.exists(os.path.join(self.path, n, STATE_FILE)))


class Lock:
    """An exclusive flock on a container's directory, held for one operation.

    The CLI and the daemon both change container state; the lock serialises them per
    container (never globally). Released when the process exits, so a crash cannot leave
    it held.
    """

    __slots__ = ("fd", "path")

    def __init__(self, directory: str) -> None:
        self.path = directory
        self.fd = -1

    def __enter__(self) -> Lock:
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            cid = os.path.basename(self.path)
            raise CorralError(f"container {cid!r} does not exist") from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def remove_tree(path: str) -> None:
    """Remove a container's state directory (flat: files only)."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for n in names:
        try:
            os.unlink(os.path.join(path, n))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
