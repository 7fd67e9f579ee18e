"""The daemon's side of the namespace helper (`_nshelper`): start it, talk to it, with trio.

corrald never forks (it keeps trio's worker threads); `spawn_helper` execs the helper as a
new program in its own session, and a `HelperClient` asks it over its Unix socket to create
containers and hears from it when their inits exit.

Example::

    pid = await spawn_helper("/run/corrald/helper.sock", "/run/corral")
    async with HelperClient.open("/run/corrald/helper.sock") as helper:
        init = await helper.create("web", "/var/lib/corrald/bundles/web", out_fd, err_fd)
        info = await helper.wait_exit("web")   # ExitInfo(code=0, signal=None, pid=init, ...)
        ...                                     # record the exit somewhere safe, then
        await helper.ack(info)                  # the helper forgets it

Daemons with a nursery of their own start the reader there instead of using `open`::

    helper = await HelperClient.connect(path)
    await nursery.start(helper.run)
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

MAX_REPLY = 1 << 20
_HELPER_MODULE = "corral.supervisor._nshelper"


@attrs.frozen
class Started:
    """A created (or respawned) init, as the helper reports it.

    Attributes:
        pid, start_time: the init (start time as in state.json: 0 if it is already gone).
        cgroup: state.json's cgroup description, or None (a respawn: the last run's).
        respawned: started again in the namespaces and cgroup its last run kept.
    """

    pid: int
    start_time: int
    cgroup: dict[str, Any] | None
    respawned: bool


class HelperError(Exception):
    """The helper refused or failed a request; the message says why (e.g. a bad bundle)."""


class HelperGone(Exception):
    """The connection to the helper is closed: it exited, or another client replaced us."""


@attrs.frozen
class ExitInfo:
    """How a container's init ended: `code` if it exited, `signal` if a signal killed it.

    `eseq` is the helper's number for the event: `HelperClient.ack` it once handled.
    """

    code: int | None
    signal: int | None
    pid: int = 0
    eseq: int | None = None


@attrs.define(eq=False)
class _Pending:
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: dict[str, Any] | None = None


async def spawn_helper(socket_path: str | os.PathLike[str], root: str | os.PathLike[str], *,
                       stderr: int | None = None) -> int:
    """Start a namespace helper listening on `socket_path`; returns its pid once it answers.

    The helper is exec'd (never forked from this threaded process) in a new session, with
    only stdio inherited, and detaches: the process started here exits once the helper
    listens, so the helper is not our child and outlives us (a daemon restart); its orphaned
    self is reaped by our nearest subreaper or by PID 1.

    Args:
        socket_path: where the helper listens (its directory must exist).
        root: corral's state root, as `corral --root`.
        stderr: an fd for the helper's log; None inherits ours.

    Returns:
        The helper's pid.

    No deadline of its own: wrap it in `trio.fail_after`; cancelled, it kills the process
    it started.

    Raises:
        HelperError: the helper could not start, e.g. another helper answers on the socket
            (the reason is in the helper's log).
    """
    argv = [sys.executable, "-m", _HELPER_MODULE, "--socket", os.fspath(socket_path),
            "--root", os.fspath(root), "--detach"]
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        start_new_session=True, close_fds=True)
    try:
        status = await proc.wait()
    except BaseException:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
            proc.kill()
            await proc.wait()
        raise
    if status != 0:
        raise HelperError(f"the namespace helper for {os.fspath(socket_path)} did not start "
                          f"(exit status {status}); its log says why")
    async with HelperClient.open(socket_path) as client:
        return client.helper_pid


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def _unwrap(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception of a group from our reader nursery, or the group itself."""
    return eg.exceptions[0] if len(eg.exceptions) == 1 else eg


@attrs.define(eq=False)
class HelperClient:
    """One connection to the helper: requests by `seq`, exit events by container id.

    The reader (`run`) must be running for any request to complete; `open` takes care of
    that. A connection that is closed (by `aclose`, by the helper exiting, or by another
    client replacing this one) fails every waiting call with `HelperGone`.
    """

    _sock: trio.socket.SocketType
    helper_pid: int = attrs.field(init=False, default=0)
    _seq: int = attrs.field(init=False, default=0)
    _pending: dict[int, _Pending] = attrs.field(init=False, factory=dict)
    _exits: dict[str, ExitInfo] = attrs.field(init=False, factory=dict)
    _exit_waiters: dict[str, trio.Event] = attrs.field(init=False, factory=dict)
    _send_lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _gone: str | None = attrs.field(init=False, default=None)

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> HelperClient:
        """Connect to the helper's socket; start `run` before making requests.

        Raises:
            OSError: nothing listens there (FileNotFoundError, ConnectionRefusedError).
        """
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            await sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str | os.PathLike[str]) -> AsyncIterator[HelperClient]:
        """`connect`, run the reader in a nursery of its own, close on the way out."""
        client = await cls.connect(path)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                try:
                    yield client
                finally:
                    client._lost("closed by the client")
        except BaseExceptionGroup as eg:
            exc = _unwrap(eg)
            if exc is eg:
                raise
            raise exc from exc.__cause__
        finally:
            client._lost("closed by the client")

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """The reader: claim the connection, then dispatch replies and exit events.

        Started with `nursery.start`; reports started (with the helper's pid) once the helper
        has answered, i.e. once this connection is the helper's client (see `_nshelper`).
        Returns when the connection closes.
        """
        self._seq += 1
        claim = self._seq
        started = False
        try:
            await self._send({"op": "ping", "seq": claim})
            while True:
                fds: list[int] = []
                try:
                    data, anc, _flags, _ = await self._sock.recvmsg(
                        MAX_REPLY, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC)
                    fds = _fds_of(anc)
                except (trio.ClosedResourceError, OSError):
                    data = b""
                try:
                    msg = json.loads(data) if data else None
                except ValueError:
                    msg = None
                if isinstance(msg, dict) and fds:
                    msg["fds"], fds = fds, []
                for fd in fds:  # fds on a datagram we do not understand
                    os.close(fd)
                if not data:
                    break
                if not isinstance(msg, dict):
                    continue
                if not started and msg.get("seq") == claim:
                    self.helper_pid = int(msg.get("pid", 0))
                    task_status.started(self.helper_pid)
                    started = True
                    continue
                await self._dispatch(msg)
        finally:
            self._lost("the helper closed the connection")
        if not started:
            raise HelperGone(self._gone)

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("op") == "exit":
            cid = str(msg.get("id"))
            eseq = msg.get("eseq")
            self._exits[cid] = ExitInfo(msg.get("code"), msg.get("signal"),
                                        int(msg.get("pid", 0)),
                                        eseq if isinstance(eseq, int) else None)
            waiter = self._exit_waiters.pop(cid, None)
            if waiter is not None:
                waiter.set()
            return
        seq = msg.get("seq")
        slot = self._pending.get(seq) if isinstance(seq, int) else None
        if slot is not None:
            slot.reply = msg
            slot.done.set()
        else:
            for fd in msg.get("fds", ()):
                os.close(fd)

    def _lost(self, why: str) -> None:
        """Close the connection (once) and fail everything that waits on it."""
        if self._gone is None:
            self._gone = why
            self._sock.close()
        for slot in self._pending.values():
            slot.done.set()
        for waiter in self._exit_waiters.values():
            waiter.set()
        self._exit_waiters.clear()

    async def _send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if self._gone is not None:
            raise HelperGone(self._gone)
        data = json.dumps(msg).encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        async with self._send_lock:
            try:
                await self._sock.sendmsg([data], anc)
            except (trio.ClosedResourceError, OSError) as e:
                self._lost(f"sending to the helper: {e}")
                raise HelperGone(self._gone) from e

    async def _request(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        self._seq += 1
        seq = self._seq
        slot = self._pending[seq] = _Pending()
        try:
            await self._send({**msg, "seq": seq}, fds)
            await slot.done.wait()
        finally:
            del self._pending[seq]
        if slot.reply is None:
            raise HelperGone(self._gone)
        if slot.reply.get("op") == "error":
            raise HelperError(slot.reply.get("msg") or "the helper refused the request")
        return slot.reply

    async def create(self, cid: str, bundle: str | os.PathLike[str], stdout_fd: int,
                     stderr_fd: int, keep: tuple[int, int] | None = None, *,
                     pin: bool = False, reuse: bool = False) -> int:
        """Create and start container `cid` from `bundle`; returns its init's pid.

        The fds become the container's stdout and stderr (stdin is /dev/null); they are
        passed, not taken: close ours afterwards. An earlier exit kept for `cid` is
        forgotten. Cancelled while waiting, the container may still come up: `list` tells.

        Args:
            cid: the container id.
            bundle: an absolute path to the OCI bundle.
            stdout_fd: the fd for the container's stdout.
            stderr_fd: the fd for the container's stderr.
            keep: the read ends of those pipes, for the helper to hold while the container
                lives (`attach` gives them back to a restarted daemon).
            pin: have the helper pin the container's namespaces, so that after its exit it
                can be respawned in place (`reuse`); `release` unpins them.
            reuse: `cid` is such a stopped container: respawn it when the helper can, else
                delete what is left of it and create it anew.

        Raises:
            HelperError: the create failed; the message is `corral create`'s.
            HelperGone: the connection closed.
        """
        return (await self.start(cid, bundle, stdout_fd, stderr_fd, keep, pin=pin,
                                 reuse=reuse)).pid

    async def start(self, cid: str, bundle: str | os.PathLike[str], stdout_fd: int,
                    stderr_fd: int, keep: tuple[int, int] | None = None, *,
                    pin: bool = False, reuse: bool = False) -> Started:
        """`create`, returning what the daemon needs of the new init (saving it a read of
        state.json) and whether the helper respawned the container in place (its cgroup,
        and so its counters, are the last run's) rather than created it."""
        self._exits.pop(cid, None)
        req: dict[str, Any] = {"op": "create", "id": cid, "bundle": os.fspath(bundle)}
        if pin:
            req["pin"] = True
        if reuse:
            req["reuse"] = True
        reply = await self._request(req, [stdout_fd, stderr_fd, *(keep or ())])
        cgroup = reply.get("cgroup")
        return Started(int(reply["pid"]), int(reply.get("start_time", 0)),
                       cgroup if isinstance(cgroup, dict) else None,
                       reply.get("respawned") is True)

    async def pin(self, cid: str) -> None:
        """Have the helper keep running container `cid`'s namespaces for a respawn (see
        `create`'s `pin`; for a container adopted from a previous daemon)."""
        await self._send({"op": "pin", "id": cid})

    async def release(self, cid: str) -> None:
        """Unpin `cid`'s namespaces (see `create`'s `pin`): it will not be respawned."""
        await self._send({"op": "release", "id": cid})

    async def attach(self, cid: str) -> tuple[int, int] | None:
        """The read ends of `cid`'s stdout and stderr pipes that the helper keeps (new fds,
        ours to close), or None when it keeps none."""
        try:
            reply = await self._request({"op": "attach", "id": cid})
        except HelperError:
            return None
        fds = list(reply.get("fds", ()))
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return None
        return fds[0], fds[1]

    async def ack(self, info: ExitInfo) -> None:
        """The exit `info` is handled (recorded): the helper may forget it."""
        if info.eseq is not None:
            await self._send({"op": "ack", "eseq": info.eseq})

    def exits(self) -> dict[str, ExitInfo]:
        """The exits received and not yet taken by `create` (by container id): at start-up,
        those the helper kept for us while no daemon was connected."""
        return dict(self._exits)

    async def list(self) -> dict[str, int]:
        """Container id -> init pid of every init the helper is parent of and that runs."""
        reply = await self._request({"op": "list"})
        return {str(c["id"]): int(c["pid"]) for c in reply.get("containers", [])}

    async def settled_list(self, poll: float = 0.05) -> dict[str, int]:
        """`list` once no create is in progress: a create that a previous client asked for
        and that is still running would otherwise be missed, then made a second time.
        Bound it with a deadline of your own."""
        while True:
            reply = await self._request({"op": "list"})
            if not reply.get("creating"):
                return {str(c["id"]): int(c["pid"]) for c in reply.get("containers", [])}
            await trio.sleep(poll)

    async def ping(self) -> int:
        """The helper's pid."""
        return int((await self._request({"op": "ping"}))["pid"])

    async def shutdown(self) -> None:
        """Ask the helper to exit once no container runs (at once if none does)."""
        await self._request({"op": "shutdown"})

    async def wait_exit(self, cid: str) -> ExitInfo:
        """Wait for container `cid`'s init to exit; an exit already received is returned.

        Raises:
            HelperGone: the connection closed before the exit arrived.
        """
        while True:
            info = self._exits.get(cid)
            if info is not None:
                return info
            if self._gone is not None:
                raise HelperGone(self._gone)
            waiter = self._exit_waiters.setdefault(cid, trio.Event())
            await waiter.wait()

    async def aclose(self) -> None:
        """Close the connection; the helper keeps running, and keeps unacked exits."""
        self._lost("closed by the client")
        await trio.lowlevel.checkpoint()
