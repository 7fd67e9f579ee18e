"""corrald's control socket: HTTP/1.1 with JSON bodies on a unix socket, served with h11.

Why h11: it is a sans-IO HTTP/1.1 state machine (by trio's authors, well kept, the parser
under hypercorn and httpcore) that never touches a socket itself. corrald feeds it bytes read
from a trio stream and writes what it returns, so the daemon keeps exact control of every
limit below without a web framework, and the same code runs over a `trio.testing` memory
stream in the property tests, which feed it arbitrary bytes. Parsing HTTP by hand is where
request smuggling and hangs come from; h11 does it to the RFC (9110/9112).

Limits (`Limits`), so that no client can crash the daemon or hold up the others:

- at most ``max_connections`` at once; one more is answered ``503`` and closed;
- a request head larger than ``max_header_bytes`` is answered ``431`` (h11's
  ``max_incomplete_event_size``), a body larger than ``max_body_bytes`` ``413``, before it is
  read when ``Content-Length`` says so;
- a client has ``request_timeout`` seconds to send a whole request (and to send the next one
  on a kept-alive connection): a client that connects and stalls, or trickles its headers, is
  answered ``408`` and dropped;
- each write must complete within ``send_timeout`` seconds: a follower that stops reading is
  dropped instead of growing a buffer;
- malformed HTTP is answered ``400`` (h11's hint) and the connection is closed.

Every error is a JSON body ``{"error": MESSAGE, "kind": KIND}``; a handler's bug is a ``500``
logged with its traceback, never a crash of the daemon. Access is decided by the peer's
credentials (SO_PEERCRED, and SO_PEERGROUPS for its supplementary groups): root and members
of the configured group; anyone else gets ``403`` on every request, and the daemon logs who
tried (uid, gid, pid and command). The routes themselves are in `Router`.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import http
import json
import logging
import os
import re
import socket
import struct
import urllib.parse
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import h11
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Collection

    from ._events import EventRing

__all__ = [
    "API_VERSION", "Backend", "Conflict", "HTTPError", "Limits", "NoSuchContainer", "Peer",
    "Request", "Response", "Router", "ServerState", "Unavailable", "bind_socket", "is_allowed",
    "peer_credentials", "resolve_group", "serve_connection", "serve_listener",
]

log = logging.getLogger("corrald")

API_VERSION = "v1"
RECEIVE_SIZE = 64 << 10
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in every Python
ACTIONS = ("start", "stop", "restart", "kill", "pause", "resume")
MAX_TAIL = 100_000
_NUMBER = re.compile(r"[0-9]{1,18}")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@attrs.frozen
class Limits:
    """What one client may take (see the module docstring)."""

    max_connections: int = 64
    max_header_bytes: int = 16 << 10
    max_body_bytes: int = 64 << 10
    request_timeout: float = 10.0
    send_timeout: float = 10.0


@attrs.frozen
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED, at connect time)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"uid {self.uid} gid {self.gid} pid {self.pid}"


ROOT_PEER = Peer(0, 0, 0)


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> Peer:
    """The credentials of a connected unix socket's peer, with its supplementary groups."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    try:
        # Python caps the buffer at 1024 bytes: 256 gids. A peer in more groups (ERANGE) is
        # judged by its primary gid alone, as on a kernel without SO_PEERGROUPS; /proc would
        # tell more, but by a pid that may have been reused since.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:
        pass
    return Peer(pid, uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, tuple(groups))


def resolve_group(group: str | int | None) -> int | None:
    """The gid of corrald.toml's ``socket_group`` (a name or a gid), or None.

    Raises:
        KeyError: for a name that no group has.
    """
    if group is None or isinstance(group, int):
        return group
    return grp.getgrnam(group).gr_gid


def is_allowed(peer: Peer, group: int | None) -> bool:
    """Root always; else a member of `group` (primary or supplementary)."""
    if peer.uid == 0:
        return True
    return group is not None and (peer.gid == group or group in peer.groups)


# --- requests and responses ---------------------------------------------------------------


@attrs.frozen
class Request:
    """One complete request, as the router sees it."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    body: bytes
    peer: Peer
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen
class Response:
    """A whole body, or a `stream` of chunks (sent with chunked encoding, then closed)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    stream: Callable[[], AsyncIterator[bytes]] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False

    @classmethod
    def json(cls, value: object, status: int = 200, **kw: Any) -> Response:
        return cls(status, json.dumps(value, separators=(",", ":")).encode() + b"\n", **kw)


class HTTPError(Exception):
    """An error that becomes a JSON error response."""

    def __init__(self, status: int, message: str, kind: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or http.HTTPStatus(status).phrase.lower().replace(" ", "_")
        self.headers = headers

    def response(self, close: bool = False) -> Response:
        return Response.json({"error": self.message, "kind": self.kind}, self.status,
                             headers=self.headers, close=close)


class NoSuchContainer(HTTPError):
    def __init__(self, name: str) -> None:
        super().__init__(404, f"no such container: {name}", "no_such_container")


class Conflict(HTTPError):
    """The operation does not fit the container's state (pause a stopped one...)."""

    def __init__(self, message: str) -> None:
        super().__init__(409, message, "conflict")


class Unavailable(HTTPError):
    def __init__(self, message: str) -> None:
        super().__init__(503, message, "unavailable")


class Backend(Protocol):
    """What the routes need from the daemon (`corral.supervisor._ops.DaemonBackend`)."""

    @property
    def events(self) -> EventRing: ...

    def names(self) -> Collection[str]: ...

    def list(self) -> list[dict[str, Any]]: ...

    async def inspect(self, name: str) -> dict[str, Any]: ...

    async def act(self, name: str, action: str, signum: int | None, peer: Peer
                  ) -> dict[str, Any]: ...

    async def log_tail(self, name: str, lines: int) -> bytes: ...

    def log_follow(self, name: str, lines: int) -> AsyncIterator[bytes]: ...

    async def reload(self, dry_run: bool, peer: Peer) -> dict[str, Any]: ...

    async def metrics(self) -> str: ...


# --- routing ------------------------------------------------------------------------------


def _params(req: Request, allowed: Collection[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in req.query:
        if key not in allowed:
            raise HTTPError(400, f"unknown query parameter {key!r} (known: "
                            f"{', '.join(sorted(allowed)) or 'none'})", "bad_parameter")
        if key in out:
            raise HTTPError(400, f"query parameter {key!r} given twice", "bad_parameter")
        out[key] = value
    return out


def _flag(params: dict[str, str], key: str) -> bool:
    value = params.get(key)
    if value is None:
        return False
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise HTTPError(400, f"{key}: {value!r} is not a boolean (1/0, true/false)",
                    "bad_parameter")


def _number(value: object, key: str, maximum: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum:
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value) and int(value) <= maximum:
        return int(value)
    raise HTTPError(400, f"{key}: {value!r} is not a number from 0 to {maximum}",
                    "bad_parameter")


def _json_body(req: Request, allowed: Collection[str]) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``); unknown keys are refused."""
    if not req.body.strip():
        return {}
    try:
        value = json.loads(req.body)
    except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"the body is not JSON: {e}", "bad_json") from None
    if not isinstance(value, dict):
        raise HTTPError(400, "the body must be a JSON object", "bad_json")
    for key in value:
        if key not in allowed:
            raise HTTPError(400, f"unknown key {key!r} in the body (known: "
                            f"{', '.join(sorted(allowed)) or 'none'})", "bad_json")
    return value


def _signal(value: object) -> int:
    from corral.runtime._container import parse_signal
    from corral.runtime._errors import CorralError

    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise HTTPError(400, f"signal: {value!r} is not a signal name or number",
                        "bad_parameter")
    try:
        return parse_signal(value)
    except CorralError as e:
        raise HTTPError(400, f"signal: {e}", "bad_parameter") from None


@attrs.define(eq=False)
class Router:
    """Maps a `Request` to a `Response` over a `Backend`; never raises but for cancellation.

    Routes (all JSON unless said)::

        GET  /v1/ping                         {"ok": true, "api": "v1"}
        GET  /v1/containers                   the list
        GET  /v1/containers/NAME              inspect: config, state, stats
        POST /v1/containers/NAME/ACTION       start stop restart pause resume kill
                                              (kill: {"signal": "TERM"} or ?signal=TERM)
        GET  /v1/containers/NAME/logs         ?tail=N&follow=1 (text/plain)
        GET  /v1/events                       ?since=SEQ&follow=1 (JSON lines)
        POST /v1/reload                       {"dry_run": true} or ?dry_run=1
        GET  /metrics  (and /v1/metrics)      Prometheus text format
    """

    backend: Backend

    async def __call__(self, req: Request) -> Response:
        try:
            return await self._route(req)
        except HTTPError as e:
            return e.response()
        except Exception:  # a bug in a handler: answered and logged, the daemon goes on
            log.exception("control: %s %s failed", req.method, req.path)
            return HTTPError(500, "internal error (logged by corrald)").response()

    def _method(self, req: Request, *allowed: str) -> None:
        if req.method not in allowed:
            raise HTTPError(405, f"{req.method} is not allowed on {req.path} (allowed: "
                            f"{', '.join(allowed)})", headers=(("allow", ", ".join(allowed)),))

    async def _route(self, req: Request) -> Response:
        parts = req.path.split("/")
        if parts[0] != "" or len(parts) < 2:
            raise HTTPError(404, f"no such path: {req.path}", "no_such_path")
        parts = parts[1:]
        if parts == ["metrics"] or parts == [API_VERSION, "metrics"]:
            self._method(req, "GET")
            _params(req, ())
            text = await self.backend.metrics()
            return Response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        if not parts or parts[0] != API_VERSION:
            raise HTTPError(404, f"no such path: {req.path} (the API is under "
                            f"/{API_VERSION})", "no_such_path")
        rest = parts[1:]
        if rest == ["ping"]:
            self._method(req, "GET")
            _params(req, ())
            return Response.json({"ok": True, "api": API_VERSION})
        if rest == ["containers"]:
            self._method(req, "GET")
            _params(req, ())
            return Response.json(self.backend.list())
        if rest == ["events"]:
            self._method(req, "GET")
            return self._events(req)
        if rest == ["reload"]:
            self._method(req, "POST")
            params = _params(req, ("dry_run",))
            body = _json_body(req, ("dry_run",))
            dry = body.get("dry_run", _flag(params, "dry_run"))
            if not isinstance(dry, bool):
                raise HTTPError(400, f"dry_run: {dry!r} is not true or false", "bad_json")
            return Response.json(await self.backend.reload(dry, req.peer))
        if len(rest) in (2, 3) and rest[0] == "containers":
            name = rest[1]
            if name not in self.backend.names():
                raise NoSuchContainer(name)
            if len(rest) == 2:
                self._method(req, "GET")
                _params(req, ())
                return Response.json(await self.backend.inspect(name))
            verb = rest[2]
            if verb == "logs":
                self._method(req, "GET")
                return await self._logs(req, name)
            if verb in ACTIONS:
                self._method(req, "POST")
                return await self._act(req, name, verb)
        raise HTTPError(404, f"no such path: {req.path}", "no_such_path")

    async def _act(self, req: Request, name: str, verb: str) -> Response:
        keys = ("signal",) if verb == "kill" else ()
        params = _params(req, keys)
        body = _json_body(req, keys)
        signum = None
        if verb == "kill":
            signum = _signal(body.get("signal", params.get("signal", "KILL")))
        return Response.json(await self.backend.act(name, verb, signum, req.peer))

    async def _logs(self, req: Request, name: str) -> Response:
        params = _params(req, ("tail", "follow"))
        lines = _number(params.get("tail", "100"), "tail", MAX_TAIL)
        if _flag(params, "follow"):
            backend = self.backend

            def stream() -> AsyncIterator[bytes]:
                return backend.log_follow(name, lines)

            return Response(200, content_type="text/plain; charset=utf-8", stream=stream)
        return Response(200, await self.backend.log_tail(name, lines),
                        "text/plain; charset=utf-8")

    def _events(self, req: Request) -> Response:
        params = _params(req, ("since", "follow"))
        ring = self.backend.events
        since = (_number(params["since"], "since", 2**62) if "since" in params else None)
        last = ("corral-last-seq", str(ring.last_seq))
        if not _flag(params, "follow"):
            events, gap = ring.since(since or 0)
            head = [json.dumps(gap.as_event()).encode() + b"\n"] if gap else []
            return Response(200, b"".join(head + [e.line for e in events]),
                            "application/x-ndjson", headers=(last,))

        async def stream() -> AsyncIterator[bytes]:
            seq = ring.last_seq if since is None else since
            while True:
                events, gap = ring.since(seq)
                if gap is not None:
                    yield json.dumps(gap.as_event()).encode() + b"\n"
                if events:
                    yield b"".join(e.line for e in events)
                    seq = events[-1].seq
                elif gap is not None:
                    seq = gap.oldest - 1
                await ring.wait_after(seq)

        return Response(200, content_type="application/x-ndjson", stream=stream,
                        headers=(last,))


# --- one connection -----------------------------------------------------------------------


class _Closed(Exception):
    """The client went away."""


async def _send(stream: trio.abc.Stream, data: bytes | None, limits: Limits) -> None:
    if not data:
        return
    try:
        with trio.fail_after(limits.send_timeout):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as e:
        raise _Closed(f"send: {e!r}") from None


def _head(conn: h11.Connection, resp: Response, length: int | None) -> bytes | None:
    headers = [("content-type", resp.content_type), *resp.headers]
    if length is not None:
        headers.append(("content-length", str(length)))
    if resp.close or resp.stream is not None:
        headers.append(("connection", "close"))
    try:
        phrase = http.HTTPStatus(resp.status).phrase
    except ValueError:
        phrase = ""
    return conn.send(h11.Response(status_code=resp.status, headers=headers, reason=phrase))


async def _respond(stream: trio.abc.Stream, conn: h11.Connection, resp: Response,
                   limits: Limits) -> None:
    if resp.stream is None:  # one write: one syscall, one timeout scope
        data = _head(conn, resp, len(resp.body)) or b""
        if resp.body:
            data += conn.send(h11.Data(data=resp.body)) or b""
        await _send(stream, data + (conn.send(h11.EndOfMessage()) or b""), limits)
        return
    await _send(stream, _head(conn, resp, None), limits)
    ended: list[str] = []  # why the stream ended early, if it did
    make = resp.stream

    async def watch_client(scope: trio.CancelScope) -> None:
        # The request has been read: the client only sends again to go away (EOF).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        ended.append("the client closed a stream")
        scope.cancel()

    async def pump(scope: trio.CancelScope) -> None:
        # Errors are caught here, in the task: out of a nursery they would come wrapped in
        # an exception group, past the handlers of serve_connection.
        try:
            async with contextlib.aclosing(make()) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    await _send(stream, conn.send(h11.Data(data=chunk)), limits)
            await _send(stream, conn.send(h11.EndOfMessage()), limits)
        except _Closed as e:
            ended.append(str(e))
        except Exception:
            log.exception("control: a streamed response failed")
            ended.append("the stream failed")
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_client, nursery.cancel_scope)
        nursery.start_soon(pump, nursery.cancel_scope)
    if ended:
        raise _Closed(ended[0])


async def _receive_request(stream: trio.abc.Stream, conn: h11.Connection, limits: Limits,
                           peer: Peer) -> Request | None:
    """Read one whole request; None when the client closed the connection between requests."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            head = event
            # h11 bounds what it buffers of an incomplete head; a whole one that came in a
            # single read is bounded here.
            size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > limits.max_header_bytes:
                raise HTTPError(431, f"the request head is larger than "
                                f"{limits.max_header_bytes} bytes", "header_too_large")
            length = h11_content_length(event)
            if length is not None and length > limits.max_body_bytes:
                raise HTTPError(413, f"the body ({length} bytes) is larger than "
                                f"{limits.max_body_bytes} bytes", "body_too_large")
            if conn.they_are_waiting_for_100_continue:
                await _send(stream, conn.send(h11.InformationalResponse(
                    status_code=100, headers=[])), limits)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > limits.max_body_bytes:
                raise HTTPError(413, f"the body is larger than {limits.max_body_bytes} bytes",
                                "body_too_large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return _request(head, bytes(body), peer)
        else:  # ConnectionClosed, or PAUSED (cannot happen before we respond)
            return None


def h11_content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is digits
    return None


def _request(head: h11.Request, body: bytes, peer: Peer) -> Request:
    # Origin form, PATH?QUERY, split by hand: urlsplit would read "//x/y" as a host and
    # raise on "//[x".
    raw_path, _, raw_query = head.target.decode("ascii", "replace").partition("?")
    try:
        query = urllib.parse.parse_qsl(raw_query, keep_blank_values=True,
                                       strict_parsing=False, max_num_fields=32,
                                       errors="strict")
    except ValueError as e:
        raise HTTPError(400, f"bad query string: {e}", "bad_parameter") from None
    try:
        path = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the path is not UTF-8", "no_such_path") from None
    return Request(head.method.decode("ascii", "replace"), path, tuple(query), body, peer,
                   tuple(head.headers))


async def _try_error(stream: trio.abc.Stream, conn: h11.Connection, err: HTTPError,
                     limits: Limits) -> None:
    """Answer an error if the protocol still lets us, then the connection is closed."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    with contextlib.suppress(h11.LocalProtocolError, _Closed):
        await _respond(stream, conn, err.response(close=True), limits)


async def serve_connection(stream: trio.abc.Stream,
                           handler: Callable[[Request], Awaitable[Response]],
                           limits: Limits, peer: Peer) -> None:
    """Serve requests on `stream` until the client closes, errs or stalls; closes `stream`.

    Never raises for anything the client does; cancellation ends it.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    try:
        while True:
            try:
                with trio.fail_after(limits.request_timeout):
                    req = await _receive_request(stream, conn, limits, peer)
            except trio.TooSlowError:
                if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                    await _try_error(stream, conn, HTTPError(
                        408, f"no complete request within {limits.request_timeout:g}s"), limits)
                return
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint
                if status == 400 and "exceeded" in str(e):  # h11's max_incomplete_event_size
                    status = 431
                await _try_error(stream, conn, HTTPError(status, f"bad request: {e}"), limits)
                return
            except HTTPError as e:
                await _try_error(stream, conn, e, limits)
                return
            if req is None:
                return
            resp = await handler(req)
            await _respond(stream, conn, resp, limits)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except _Closed:
        return
    except h11.LocalProtocolError as e:  # a bug of ours: log it, drop the client
        log.error("control: protocol error on our side: %s", e)
    finally:
        await trio.aclose_forcefully(stream)


# --- the listener -------------------------------------------------------------------------


@attrs.define(eq=False)
class ServerState:
    """Counts for the connection limit (and for tests)."""

    active: int = 0
    refused: int = 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode(errors="replace")
    except OSError:
        return "?"


async def _busy(stream: trio.abc.Stream, limits: Limits) -> None:
    """Answer 503 at once (h11 lets a server answer before the request) and close."""
    err = HTTPError(503, f"too many connections (at most {limits.max_connections})",
                    "too_many_connections")
    short = attrs.evolve(limits, send_timeout=min(limits.send_timeout, 1.0))
    try:
        await _respond(stream, h11.Connection(h11.SERVER), err.response(close=True), short)
    except (_Closed, h11.LocalProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _forbidden(req: Request) -> Response:
    return HTTPError(403, f"permission denied: uid {req.peer.uid} is neither root nor in "
                     "corrald's socket group", "forbidden").response(close=True)


async def serve_listener(listener: trio.SocketListener,
                         handler: Callable[[Request], Awaitable[Response]], limits: Limits,
                         group: int | None, state: ServerState | None = None) -> None:
    """Accept forever; each connection in its own task, refused by credentials or by count."""
    state = state or ServerState()

    async def one(stream: trio.SocketStream, peer: Peer) -> None:
        try:
            ok = is_allowed(peer, group)
            if not ok:
                state.refused += 1
                log.warning("control: refused %s (%s): not root and not in the socket's group",
                            peer.describe(), _comm(peer.pid))
            await serve_connection(stream, handler if ok else _forbidden, limits, peer)
        except Exception:  # a bug of ours: one client loses its connection, nobody else
            log.exception("control: the connection of %s failed", peer.describe())
        finally:
            state.active -= 1

    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("control: accept: %s; pausing 100 ms", e)
                    await trio.sleep(0.1)
                    continue
                raise
            if state.active >= limits.max_connections:
                nursery.start_soon(_busy, stream, limits)
                continue
            try:
                peer = peer_credentials(stream.socket)
            except OSError as e:
                log.warning("control: no peer credentials: %s", e)
                await trio.aclose_forcefully(stream)
                continue
            state.active += 1
            nursery.start_soon(one, stream, peer)


def bind_socket(path: str, group: int | None, mode: int = 0o660) -> socket.socket:
    """A listening unix socket at `path`, mode `mode`, group `group` (root's when None).

    It is bound under a temporary name, given its mode and owner, then renamed into place,
    so that there is never a moment when the path accepts a client it should not, whatever
    the umask. (When the temporary name would pass the 107-byte limit of a socket address,
    it is bound in place: until the chmod just after, the umask's mode applies, which under
    the usual 022 lets only root connect.) A socket left at `path` (a crash) is replaced:
    the caller holds the lock beside it.
    """
    tmp = os.path.join(os.path.dirname(path), f".corrald-{os.getpid()}.tmp")
    if len(os.fsencode(tmp)) > 107:
        tmp = path
    for stale in {tmp, path}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        os.chown(tmp, 0 if os.geteuid() == 0 else -1, -1 if group is None else group)
        if tmp != path:
            os.rename(tmp, path)
        sock.listen(128)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return sock
