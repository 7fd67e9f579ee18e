"""The namespace helper: the process that forks container inits for corrald.

corrald is a trio daemon and keeps worker threads, so it must never fork (STYLE.md,
anti-pattern 2). It execs this small program instead (`spawn_helper` in `_helperclient`),
which is single-threaded and blocking, and which:

* creates and starts containers with exactly the library code of `corral create` and
  `corral start` (`create_container`, `start`), each in a forked "creator" child so that a
  slow create never blocks the others;
* is a child subreaper: when a creator exits, the container's init is reparented to the
  helper, which is from then on its parent, reaps it and reports its exit;
* listens on a Unix socket (SOCK_SEQPACKET, mode 0600) so that a restarted daemon can
  reconnect, ask what runs (`list`) and receive the exits it missed.

Protocol: one JSON object per datagram, in both directions. Requests carry a `seq` that the
reply repeats:

    {"op":"create","seq":N,"id":ID,"bundle":ABSDIR[,"pin":true][,"reuse":true]}
            + SCM_RIGHTS [stdout, stderr] or [stdout, stderr, stdout-read, stderr-read]
        -> {"op":"created","seq":N,"id":ID,"pid":PID,"start_time":T[,"cgroup":{..}]
            [,"respawned":true]}  (start_time as in state.json; cgroup: state.json's, for a
            create; a respawn keeps the last run's)
         | {"op":"error","seq":N,"id":ID,"msg":TEXT}
            pin: once created, pin the init's namespaces (runtime/_respawn.py) so that the
            container can be respawned in place after its exit; reuse: this id is a stopped
            container kept so: respawn it (in the helper itself, a few ms) when it is
            pinned and can be, else delete what is left of it and create it anew.
    {"op":"release","id":ID}   (no reply) unpin ID: it will not be respawned. A new client
                               releases every pin (it decides afresh what to restart).
    {"op":"pin","id":ID}       (no reply) pin running container ID's namespaces, as a
                               create's "pin" does (for a container a new client adopts)
    {"op":"list","seq":N}      -> {"op":"list","seq":N,"containers":[{"id":ID,"pid":PID}],
                                   "creating":[ID]}  (creates in progress)
    {"op":"attach","seq":N,"id":ID}
        -> {"op":"attached","seq":N,"id":ID} + SCM_RIGHTS [stdout-read, stderr-read]
         | {"op":"error",...}  (the helper holds no read ends for ID)
    {"op":"ping","seq":N}      -> {"op":"pong","seq":N,"pid":HELPER_PID}
    {"op":"shutdown","seq":N}  -> {"op":"ok","seq":N}; the helper exits once nothing runs
    {"op":"ack","eseq":E}      (no reply) the client has handled event E (and saved what it
                               learnt): the helper forgets it

Events (no `seq`):

    {"op":"exit","eseq":E,"id":ID,"pid":PID,"code":INT|null,"signal":INT|null}

`created` is sent once the creator child has exited, so that the init is by then the
helper's child: its exit cannot go unseen. Events are kept until acknowledged, and sent
again, in order, to the next client when the connection is lost before the ack: an exit is
not lost because the daemon was restarting. Acks name one event each (a daemon handles its
containers' exits in any order, and acks an exit only once it has recorded it).

When the client passes the read ends of the container's stdout/stderr pipes too, the helper
keeps them (it never reads them) until the container's exit event is acked: a restarting
daemon does not close the last reader, so the container gets no SIGPIPE, and the new daemon
takes the pipes back with `attach` (what was written meanwhile waits in the pipe, up to its
capacity; then the writer blocks until a daemon reads again).

Replies are for the connection that asked; a reply whose connection is gone is dropped (a new
client finds the container with `list`).

One client at a time: a connection becomes *the* client with its first datagram, which closes
the previous client. Connecting alone replaces nobody, so that probing the socket (a second
helper checking whether this one still answers) cannot cut off the daemon.

Usage: python -m corral.supervisor._nshelper --socket PATH --root STATE_ROOT [--detach]
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

from corral.runtime import _linux
from corral.runtime._container import CreateOptions, create_container, delete, preload_create, start
from corral.runtime._errors import CorralError
from corral.runtime._respawn import KEPT, NotRespawnable, Standby, abort, go, keep, prepare
from corral.runtime._respawn import release as release_fds
from corral.runtime._state import Root, validate_id

if TYPE_CHECKING:
    from collections.abc import Callable

preload_create()  # before any creator is forked: each would import these again

MAX_MSG = 65536  # a request
MAX_REPLY = 200_000  # under the default socket send buffer; a list of ~5000 containers
MAX_FDS = 8
MAX_PENDING_CONNECTIONS = 4
MAX_UNACKED_EVENTS = 100_000
SHUTDOWN_FLUSH_SECONDS = 2.0
# How long a standby (a respawn's new init, prepared when a kept container's init exits) waits
# for the daemon's restart before it is killed: zero and short backoffs find it ready; a
# longer one respawns without it (a few ms more), rather than keep a process per crashed
# container around.
STANDBY_SECONDS = 2.0
_PEERCRED = struct.Struct("3i")


class StartError(Exception):
    """The helper cannot start (its socket path is taken or unusable)."""


def _log(msg: str) -> None:
    try:
        sys.stderr.write(f"corral-nshelper[{os.getpid()}]: {msg}\n")
        sys.stderr.flush()
    except Exception:  # a closed stderr must not kill the helper
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


# ------------------------------------------------------------------------------------------
# The listening socket
# ------------------------------------------------------------------------------------------


def listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen on `path`; returns the socket and the (st_dev, st_ino) of its file.

    A file already at `path` is replaced only if it is a socket on which nothing answers
    (left behind by a helper that died); a socket that answers means another helper runs.

    Raises:
        StartError: naming the path and the problem.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartError(f"{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.settimeout(2.0)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        except OSError as e:
            raise StartError(f"{path}: in use and not a helper's socket ({e.strerror})") from None
        else:
            raise StartError(f"{path}: another helper answers on this socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)  # born 0600: no window in which others may connect
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise StartError(f"{path}: cannot listen: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.setblocking(False)
    st = os.stat(path)
    return sock, (st.st_dev, st.st_ino)


# ------------------------------------------------------------------------------------------
# The creator child
# ------------------------------------------------------------------------------------------


def _create_and_start(root: Root, cid: str, bundle: str, replace: bool = False,
                      pin: list[int] | None = None) -> dict[str, Any]:
    """What `corral create` then `corral start` do; the result to report. `replace`: what
    is left of a stopped container of this id (kept for a respawn) is deleted first. `pin`:
    a list to fill with the init's namespace fds (runtime._respawn.keep), taken between
    create and start, while the init surely lives."""
    try:
        if replace:
            delete(root, cid, force=True)
        st = create_container(root, cid, CreateOptions(bundle=bundle))
    except CorralError as e:
        return {"ok": False, "msg": str(e)}
    except OSError as e:
        return {"ok": False,
                "msg": f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")}
    except Exception as e:  # create_container has removed what it made
        return {"ok": False, "msg": f"{type(e).__name__}: {e}"}
    note = None
    if pin is not None:
        try:
            pin.extend(keep(st.pid))
        except OSError as e:  # out of fds, say: no respawn, that is all
            note = f"cannot keep the namespaces of {cid}: {e}"
    try:
        start(root, cid)
    except Exception as e:
        msg = str(e) if isinstance(e, CorralError) else f"{type(e).__name__}: {e}"
        try:
            delete(root, cid, force=True)
        except Exception as e2:
            msg += f" (and deleting it failed: {e2})"
        return {"ok": False, "msg": f"start: {msg}"}
    return {"ok": True, "pid": st.pid, "start_time": st.start_time, "cgroup": st.cgroup,
            **({"note": note} if note else {})}


class _Create:
    """One create in progress: its creator child and the read end of its result pipe."""

    __slots__ = ("buf", "cid", "conn", "creator", "fds", "keep", "logs", "rfd", "seq")

    def __init__(self, creator: int, seq: Any, cid: str, rfd: int, conn: socket.socket,
                 logs: tuple[int, int] | None, keep: bool = False) -> None:
        self.creator = creator
        self.keep = keep  # pin the init's namespaces once created, for a respawn
        self.seq = seq
        self.cid = cid
        self.rfd = rfd
        self.conn = conn
        self.logs = logs  # our copies of the pipes' read ends, kept if the create succeeds
        self.buf = b""
        self.fds: list[int] = []  # the init's namespaces, when `keep` (sent with the result)


# ------------------------------------------------------------------------------------------
# The helper
# ------------------------------------------------------------------------------------------


class Helper:
    """The helper's state and its poll loop; see the module docstring."""

    def __init__(self, listener: socket.socket, ident: tuple[int, int], path: str,
                 root: Root) -> None:
        self.listener = listener
        self.ident = ident
        self.path = path
        self.root = root
        self.client: socket.socket | None = None
        self.pending: list[socket.socket] = []  # connected, not yet the client
        # what to send to the client: a datagram, or a datagram and the fds that go with it
        self.outbox: collections.deque[bytes | tuple[bytes, list[int]]] = collections.deque()
        self.events: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self.event_ids: dict[int, str] = {}  # eseq of an exit event -> container id
        self.logs: dict[str, tuple[int, int]] = {}  # id -> read ends of stdout, stderr
        self.kept: dict[str, list[int]] = {}  # id -> its pinned namespaces (runtime._respawn)
        self.standbys: dict[str, tuple[Standby, float]] = {}  # id -> standby, its deadline
        self.eseq = 0
        self.creates: dict[int, _Create] = {}  # by creator pid
        self.inits: dict[str, int] = {}  # id -> init pid
        self.init_ids: dict[int, str] = {}  # init pid -> id
        self.jobs: set[int] = set()  # cleanup children, reaped silently
        self.early: dict[int, int] = {}  # unknown pid -> status, while creates are pending
        self.shutting_down = False
        self.flush_deadline: float | None = None
        self.wake_r = self.wake_w = -1

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        _linux.prctl(_linux.PR_SET_CHILD_SUBREAPER, 1)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # the wakeup fd does the work
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        _log(f"listening on {self.path}, state root {self.root.path}")
        self.reap()  # anything that exited before the handler was in place
        while not self.finished():
            try:
                self.poll_once()
            except Exception:
                _log("internal error in the poll loop:\n" + traceback.format_exc())
                time.sleep(0.01)  # no hot loop if the error repeats
        self.close()
        _log("shut down")
        return 0

    def finished(self) -> bool:
        if not self.shutting_down or self.inits or self.creates or self.jobs:
            return False
        if self.client is None or not self.outbox:
            return True
        if self.flush_deadline is None:
            self.flush_deadline = time.monotonic() + SHUTDOWN_FLUSH_SECONDS
        return time.monotonic() >= self.flush_deadline

    def poll_once(self) -> None:
        poller = select.poll()
        handlers: dict[int, Callable[[int], None]] = {}

        def watch(fd: int, mask: int, fn: Callable[[int], None]) -> None:
            poller.register(fd, mask)
            handlers[fd] = fn

        watch(self.wake_r, select.POLLIN, lambda _ev: self.on_wake())
        watch(self.listener.fileno(), select.POLLIN, lambda _ev: self.on_accept())
        for conn in [*self.pending, *([self.client] if self.client else [])]:
            mask = select.POLLIN
            if conn is self.client and self.outbox:
                mask |= select.POLLOUT
            watch(conn.fileno(), mask, functools.partial(self.on_conn, conn))
        for c in self.creates.values():
            if c.rfd >= 0:
                watch(c.rfd, select.POLLIN, functools.partial(self.on_result, c))
        timeout = -1
        deadlines = [d for _s, d in self.standbys.values()]
        if self.flush_deadline is not None:
            deadlines.append(self.flush_deadline)
        if deadlines:
            timeout = max(0, int((min(deadlines) - time.monotonic()) * 1000)) + 1
        for fd, ev in poller.poll(timeout):
            try:
                handlers[fd](ev)
            except Exception:
                _log(f"internal error handling fd {fd}:\n" + traceback.format_exc())
        now = time.monotonic()
        for cid, (_s, deadline) in list(self.standbys.items()):
            if now >= deadline:
                self.drop_standby(cid)

    def close(self) -> None:
        for conn in [*self.pending, *([self.client] if self.client else [])]:
            conn.close()
        self.pending.clear()
        self.client = None
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.ident:  # still ours, not a successor's
                os.unlink(self.path)
        except OSError:
            pass
        self.listener.close()

    # -- connections -------------------------------------------------------------------------
    def on_accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                _log(f"accept: {e}")
                return
            try:
                _pid, uid, _gid = _PEERCRED.unpack(
                    conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            except OSError as e:
                _log(f"SO_PEERCRED: {e}")
                conn.close()
                continue
            if uid not in (0, os.geteuid()):
                _log(f"refused a connection from uid {uid}")
                conn.close()
                continue
            conn.setblocking(False)
            self.pending.append(conn)
            if len(self.pending) > MAX_PENDING_CONNECTIONS:
                self.pending.pop(0).close()

    def promote(self, conn: socket.socket) -> None:
        """`conn` becomes the client: the previous one is closed, unacked events resent."""
        self.pending.remove(conn)
        if self.client is not None:
            _log("a new client replaces the previous one")
            self.client.close()
        self.client = conn
        self.outbox = collections.deque(self.events.values())
        # A new daemon decides afresh what to restart: a kept container of the old one is
        # created anew, or deleted, never respawned, so nothing would ever release its pins;
        # it pins again (op "pin") the running containers it adopts.
        for cid in list(self.kept):
            self.release(cid)

    def drop_client(self, why: str) -> None:
        if self.client is not None:
            _log(f"client gone: {why}")
            self.client.close()
        self.client = None
        self.outbox.clear()  # replies are lost with their connection; events stay unacked

    def on_conn(self, conn: socket.socket, ev: int) -> None:
        if conn is not self.client and conn not in self.pending:
            return  # closed earlier in this round
        if ev & select.POLLOUT and conn is self.client:
            self.flush()
        if not ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            return
        while conn is self.client or conn in self.pending:
            try:
                data, anc, flags, _ = conn.recvmsg(
                    MAX_MSG, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                data, anc, flags = b"", [], 0
                _log(f"receive: {e}")
            fds = _fds_of(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                if conn is self.client:
                    self.drop_client("connection closed")
                else:
                    self.pending.remove(conn)
                    conn.close()
                return
            if conn is not self.client:
                self.promote(conn)
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    self.reply(conn, {"op": "error", "seq": None,
                                      "msg": f"request truncated (more than {MAX_MSG} bytes "
                                             f"or {MAX_FDS} fds)"})
                else:
                    self.request(conn, data, fds)
            except Exception:
                _log("internal error handling a request:\n" + traceback.format_exc())
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def send(self, data: bytes) -> None:
        if self.client is not None:
            self.outbox.append(data)
            self.flush()

    def flush(self) -> None:
        while self.client is not None and self.outbox:
            item = self.outbox[0]
            try:
                if isinstance(item, bytes):
                    self.client.send(item)
                else:
                    self.client.sendmsg([item[0]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                     struct.pack(f"{len(item[1])}i", *item[1]))])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.drop_client(f"send: {e}")
                return
            self.outbox.popleft()

    def reply(self, conn: socket.socket, msg: dict[str, Any], fds: list[int] | None = None
              ) -> None:
        """Reply to `conn` (if it is still the client), with `fds` passed along if given."""
        if conn is not self.client:
            _log(f"dropped a reply for a closed connection: {msg}")
            return
        data = json.dumps(msg).encode()
        if len(data) > MAX_REPLY:
            data = json.dumps({"op": "error", "seq": msg.get("seq"),
                               "msg": f"reply too large ({len(data)} bytes)"}).encode()
            fds = None
        if self.client is not None:
            self.outbox.append((data, fds) if fds else data)
            self.flush()

    def event(self, msg: dict[str, Any]) -> None:
        self.eseq += 1
        data = json.dumps({"op": msg["op"], "eseq": self.eseq, **msg}).encode()
        self.events[self.eseq] = data
        if msg["op"] == "exit":
            self.event_ids[self.eseq] = msg["id"]
        while len(self.events) > MAX_UNACKED_EVENTS:
            eseq, lost = self.events.popitem(last=False)
            self.forget_event(eseq)
            _log(f"too many unacknowledged events; dropped {lost.decode()}")
        self.send(data)

    def forget_event(self, eseq: int) -> None:
        """Event `eseq` is handled: once a container's exit is, its pipes are not ours."""
        cid = self.event_ids.pop(eseq, None)
        if cid is not None and cid not in self.inits:
            self.close_logs(cid)

    def close_logs(self, cid: str) -> None:
        for fd in self.logs.pop(cid, ()):
            os.close(fd)

    def release(self, cid: str) -> None:
        """Unpin `cid`'s namespaces: the container is not going to be respawned."""
        self.drop_standby(cid)
        release_fds(self.kept.pop(cid, []))

    def drop_standby(self, cid: str) -> None:
        got = self.standbys.pop(cid, None)
        if got is not None:
            abort(got[0])  # reaped as a job

    def prepare_standby(self, cid: str) -> None:
        """Kept container `cid`'s init exited: make its next init ready (runtime._respawn)
        while the daemon decides; `respawn` uses it, else it is killed."""
        if self.shutting_down or cid not in self.kept:
            return
        try:
            standby = prepare(self.root, cid, self.kept[cid])
        except CorralError as e:
            _log(f"no standby for {cid}: {e}")
            if isinstance(e, NotRespawnable):
                self.release(cid)
            return
        except OSError as e:
            _log(f"no standby for {cid}: {e}")
            return
        self.jobs.add(standby.pid)
        self.standbys[cid] = (standby, time.monotonic() + STANDBY_SECONDS)

    # -- requests ----------------------------------------------------------------------------
    def request(self, conn: socket.socket, data: bytes, fds: list[int]) -> None:
        try:
            msg = json.loads(data)
        except ValueError as e:
            self.reply(conn, {"op": "error", "seq": None, "msg": f"invalid JSON: {e}"})
            return
        if not isinstance(msg, dict):
            self.reply(conn, {"op": "error", "seq": None, "msg": "a request is a JSON object"})
            return
        op, seq = msg.get("op"), msg.get("seq")
        if op == "ack":
            eseq = msg.get("eseq")
            if isinstance(eseq, int) and self.events.pop(eseq, None) is not None:
                self.forget_event(eseq)
        elif op == "attach":
            cid = msg.get("id")
            logs = self.logs.get(cid) if isinstance(cid, str) else None
            if logs is None:
                self.reply(conn, {"op": "error", "seq": seq, "id": cid,
                                  "msg": f"no pipes kept for container {cid!r}"})
            else:
                self.reply(conn, {"op": "attached", "seq": seq, "id": cid}, list(logs))
        elif op == "pin":
            cid = msg.get("id")
            if isinstance(cid, str) and cid in self.inits and cid not in self.kept:
                try:
                    self.kept[cid] = keep(self.inits[cid])
                except OSError as e:
                    _log(f"cannot keep the namespaces of {cid}: {e}")
        elif op == "release":
            cid = msg.get("id")
            if isinstance(cid, str):
                self.release(cid)
        elif op == "ping":
            self.reply(conn, {"op": "pong", "seq": seq, "pid": os.getpid()})
        elif op == "list":
            self.reply(conn, {"op": "list", "seq": seq, "containers": [
                {"id": cid, "pid": pid} for cid, pid in self.inits.items()],
                "creating": [c.cid for c in self.creates.values()]})
        elif op == "shutdown":
            self.shutting_down = True
            _log("shutdown requested")
            for cid in list(self.standbys):  # nothing more is restarted
                self.drop_standby(cid)
            self.reply(conn, {"op": "ok", "seq": seq})
        elif op == "create":
            problem = self.create(conn, msg, fds)
            if problem:
                self.reply(conn, {"op": "error", "seq": seq, "id": msg.get("id"),
                                  "msg": problem})
        else:
            self.reply(conn, {"op": "error", "seq": seq, "msg": f"unknown op {op!r}"})

    def create(self, conn: socket.socket, msg: dict[str, Any], fds: list[int]) -> str | None:
        """Fork a creator for `msg`; returns a problem to reply with, or None."""
        cid, bundle = msg.get("id"), msg.get("bundle")
        if not isinstance(cid, str):
            return "create: id must be a string"
        try:
            validate_id(cid)
        except CorralError as e:
            return str(e)
        if not isinstance(bundle, str) or not os.path.isabs(bundle):
            return f"create {cid}: bundle must be an absolute path, not {bundle!r}"
        if len(fds) not in (2, 4):
            return (f"create {cid}: expected 2 fds (stdout, stderr) or 4 (and their pipes' "
                    f"read ends), got {len(fds)}")
        if self.shutting_down:
            return f"create {cid}: the helper is shutting down"
        if cid in self.inits or any(c.cid == cid for c in self.creates.values()):
            return f"container {cid!r} is already running or being created by this helper"
        reuse = msg.get("reuse") is True
        if reuse and cid in self.kept and self.respawn(conn, msg, fds):
            return None
        self.release(cid)
        # A datagram socket, not a pipe: the result may carry the init's namespaces.
        rsock, wsock = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        rfd, wfd = rsock.detach(), wsock.detach()
        try:
            sys.stderr.flush()
            pid = os.fork()
        except OSError as e:
            os.close(rfd)
            os.close(wfd)
            return f"create {cid}: fork: {e.strerror}"
        if pid == 0:
            self.creator(cid, bundle, fds, rfd, wfd, replace=reuse, pin=msg.get("pin") is True)
        os.close(wfd)
        os.set_blocking(rfd, False)
        logs = (os.dup(fds[2]), os.dup(fds[3])) if len(fds) == 4 else None  # close-on-exec
        self.creates[pid] = _Create(pid, msg.get("seq"), cid, rfd, conn, logs,
                                    keep=msg.get("pin") is True)
        return None

    def respawn(self, conn: socket.socket, msg: dict[str, Any], fds: list[int]) -> bool:
        """Start kept container `msg["id"]` again in place (runtime._respawn): through its
        standby when there is one, else preparing one now (a few ms in this process);
        False when it cannot be (said in the log): create it anew."""
        cid = msg["id"]
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        got = self.standbys.pop(cid, None)
        try:
            if got is not None:
                standby = got[0]
            else:
                standby = prepare(self.root, cid, self.kept[cid])
                self.jobs.add(standby.pid)
            pid = go(self.root, standby, (null, fds[0], fds[1]))
        except (CorralError, OSError) as e:
            _log(f"{e}; creating it anew" if isinstance(e, NotRespawnable)
                 else f"respawn of {cid} failed ({e}); creating it anew")
            self.release(cid)
            return False
        finally:
            os.close(null)
        self.jobs.discard(pid)
        self.close_logs(cid)  # the last run's, if its exit is still unacked
        if len(fds) == 4:
            self.logs[cid] = (os.dup(fds[2]), os.dup(fds[3]))
        self.inits[cid] = pid
        self.init_ids[pid] = cid
        _log(f"respawned {cid}, init pid {pid}")
        self.reply(conn, {"op": "created", "seq": msg.get("seq"), "id": cid, "pid": pid,
                          "respawned": True, "start_time": standby.start_time})
        return True

    def creator(self, cid: str, bundle: str, fds: list[int], rfd: int, wfd: int,
                replace: bool = False, pin: bool = False) -> NoReturn:
        """The forked child: stdio, create, start, report, exit. Never returns."""
        result: dict[str, Any] = {"ok": False, "msg": "creator failed before creating"}
        kept: list[int] = []
        # No garbage collection in this short-lived child or the stage 1 and init it forks:
        # a collection would walk (and so copy, page by page) the helper's whole heap, and
        # what a create allocates is freed by its exit or exec.
        gc.disable()
        if self.creates:
            # Others are creating now: the kernel's cgroup migration lock is already in the
            # mode that a warm-up would prepare (see MigrationWarmup); skip its thread.
            from corral.runtime._cgroups import MigrationWarmup

            MigrationWarmup.wanted = False
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (rfd, self.wake_r, self.wake_w,
                       *(c.rfd for c in self.creates.values() if c.rfd >= 0)):
                os.close(fd)
            for other in self.kept.values():
                release_fds(other)
            for standby, _deadline in self.standbys.values():
                standby.sock.close()
            for s in (self.listener, *self.pending, *([self.client] if self.client else [])):
                s.close()  # only this process's fd: close() does no shutdown()
            # The received fds are >= 3 (main() keeps 0-2 open), so the dup2s cannot clash.
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            os.dup2(null, 0)
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            for fd in {null, *fds} - {0, 1, 2}:
                os.close(fd)
            result = _create_and_start(self.root, cid, bundle, replace,
                                       kept if pin else None)
        except BaseException as e:
            result = {"ok": False, "msg": f"creator: {type(e).__name__}: {e}"}
        finally:
            code = 0
            try:
                data = json.dumps(result).encode() + b"\n"
                if kept and result.get("ok"):
                    socket.send_fds(socket.socket(fileno=wfd), [data], kept)
                else:
                    os.write(wfd, data)
            except BaseException:
                code = 1
            os._exit(code)

    # -- create results ----------------------------------------------------------------------
    def on_result(self, c: _Create, _ev: int) -> None:
        """Collect what the creator reports; the reply waits for the creator's exit."""
        self.drain(c)

    def drain(self, c: _Create) -> None:
        while c.rfd >= 0:
            sock = socket.socket(fileno=c.rfd)
            try:
                chunk, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, len(KEPT))
            except (BlockingIOError, InterruptedError):
                return
            finally:
                sock.detach()
            c.fds += fds
            c.buf += chunk
            if not chunk or b"\n" in c.buf:  # EOF, or the whole (one-line) result
                os.close(c.rfd)
                c.rfd = -1

    def finish(self, c: _Create, creator_status: int) -> None:
        """Reply to a create once its creator is reaped: from its result, else its status.

        Replying only then means that a `created` init is already the helper's child (it was
        reparented when the creator exited), so its exit cannot go unseen.
        """
        if c.rfd >= 0:
            os.close(c.rfd)
            c.rfd = -1
        result: dict[str, Any] = {}
        if b"\n" in c.buf:
            try:
                result = json.loads(c.buf.partition(b"\n")[0])
            except ValueError:
                result = {"ok": False, "msg": f"unreadable result {c.buf[:200]!r}"}
        if result.get("ok"):
            pid = int(result["pid"])
            if c.logs is not None:
                self.close_logs(c.cid)  # an earlier run's, if its exit is still unacked
                self.logs[c.cid] = c.logs
            self.inits[c.cid] = pid
            self.init_ids[pid] = c.cid
            if result.get("note"):
                _log(str(result["note"]))
            if c.keep and len(c.fds) == len(KEPT):
                self.kept[c.cid], c.fds = c.fds, []
            release_fds(c.fds)
            _log(f"created {c.cid}, init pid {pid}")
            self.reply(c.conn, {"op": "created", "seq": c.seq, "id": c.cid, "pid": pid,
                                "start_time": result.get("start_time", 0),
                                "cgroup": result.get("cgroup") or {}})
            if pid in self.early:  # reaped before its creator (see reap)
                self.init_exited(pid, self.early.pop(pid))
            return
        for fd in c.logs or ():
            os.close(fd)
        release_fds(c.fds)
        if result:
            msg = str(result.get("msg") or "create failed")
        else:
            msg = (f"create {c.cid}: the creator process {_describe(creator_status)} "
                   "without a result")
            self.cleanup(c.cid)
        _log(f"create {c.cid} failed: {msg}")
        self.reply(c.conn, {"op": "error", "seq": c.seq, "id": c.cid, "msg": msg})

    def cleanup(self, cid: str) -> None:
        """`delete --force` in a child: what a creator that died midway may have left."""
        try:
            pid = os.fork()
        except OSError as e:
            _log(f"cannot fork to clean up {cid}: {e}")
            return
        if pid == 0:
            code = 0
            try:
                signal.set_wakeup_fd(-1)
                delete(self.root, cid, force=True)
            except BaseException as e:
                _log(f"cleanup of {cid}: {e}")
                code = 1
            finally:
                os._exit(code)
        self.jobs.add(pid)

    # -- children ----------------------------------------------------------------------------
    def on_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self.reap()

    def reap(self) -> None:
        """Reap every exited child; creators first, so that their inits' pids are known."""
        exited: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exited.append((pid, status))
        self.on_exits(exited)

    def on_exits(self, exited: list[tuple[int, int]]) -> None:
        """Handle a batch of reaped children: (pid, wait status) in any order."""
        for pid, status in exited:
            c = self.creates.pop(pid, None)
            if c is not None:
                self.drain(c)
                self.finish(c, status)
        for pid, status in exited:
            if pid in self.init_ids:
                self.init_exited(pid, status)
            elif pid in self.jobs:
                self.jobs.discard(pid)
            elif self.creates:
                # Possibly the init of a creator not reaped yet: the kernel reparents the
                # children of an exiting process before that process becomes waitable.
                self.early[pid] = status
        if not self.creates:
            self.early.clear()

    def init_exited(self, pid: int, status: int) -> None:
        cid = self.init_ids.pop(pid)
        self.inits.pop(cid, None)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        _log(f"container {cid} (pid {pid}) {_describe(status)}")
        self.event({"op": "exit", "id": cid, "pid": pid, "code": code, "signal": sig})
        self.prepare_standby(cid)


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds.extend(struct.unpack(f"{n}i", payload[: n * 4]))
    return fds


def _std_fds_open() -> None:
    """Open /dev/null on any of 0, 1, 2 that is closed, so that no received fd lands there."""
    for fd in range(3):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: list[str] | None = None) -> int:
    """Run the helper until a `shutdown` request finds nothing running; returns the status."""
    p = argparse.ArgumentParser(prog="corral-nshelper", description=__doc__.split("\n")[0])
    p.add_argument("--socket", required=True, help="the Unix socket to listen on")
    p.add_argument("--root", required=True, help="corral's state root (as `corral --root`)")
    p.add_argument("--detach", action="store_true",
                   help="once listening, fork: the parent exits, so that the helper is not "
                        "the starter's child and outlives it")
    args = p.parse_args(argv)
    _std_fds_open()
    path = os.path.abspath(args.socket)
    root = Root(args.root)  # absolute from here on
    try:
        listener, ident = listen(path)
    except StartError as e:
        _log(str(e))
        return 2
    if args.detach:
        sys.stderr.flush()
        if os.fork() != 0:
            os._exit(0)
        os.chdir("/")
    return Helper(listener, ident, path, root).run()


if __name__ == "__main__":
    sys.exit(main())
