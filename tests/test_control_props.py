"""The control socket's request handling, in process: properties checked with hypothesis.

`serve_connection` runs over a `trio.testing` memory stream with a fake backend, under
``MockClock(autojump_threshold=0)``, so that a client that stalls reaches the server's
timeouts at once and no test waits on the wall clock. What must hold for any input:

- arbitrary bytes never escape as an exception and never reach a 500: the answer is nothing
  (the client closed first) or HTTP responses with JSON error bodies, and the connection ends;
- any request h11 can send is answered with a status the route table explains (200, 400,
  404, 405, 409, 413), JSON where it says so;
- limits: a head or a body too large is 431/413, a stalled client is 408 and dropped, and a
  listener over its connection limit answers 503 while the others are served;
- the event ring and the log readers return exactly what they should.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from corral.supervisor._config import LogSpec
from corral.supervisor._control import (
    ROOT_PEER,
    Conflict,
    Limits,
    Peer,
    Request,
    Response,
    Router,
    ServerState,
    bind_socket,
    is_allowed,
    serve_connection,
    serve_listener,
)
from corral.supervisor._events import EventRing
from corral.supervisor._logs import LogFile
from corral.supervisor._ops import LogFollower, tail_lines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LIMITS = Limits(max_connections=4, max_header_bytes=2048, max_body_bytes=1024,
                request_timeout=5.0, send_timeout=5.0)
ALLOWED = {200, 400, 404, 405, 408, 409, 413, 431}
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class FakeBackend:
    """Two containers, an event ring; records what it is asked."""

    def __init__(self) -> None:
        self.events = EventRing(capacity=8)
        self.states = {"web": "running", "db": "stopped"}
        self.calls: list[tuple[Any, ...]] = []
        for i in range(12):
            self.events.add("state", "web", to=str(i))

    def names(self) -> Any:
        return self.states.keys()

    def list(self) -> list[dict[str, Any]]:
        return [{"name": n, "state": s} for n, s in sorted(self.states.items())]

    async def inspect(self, name: str) -> dict[str, Any]:
        return {"name": name, "state": self.states[name]}

    async def act(self, name: str, action: str, signum: int | None, peer: Peer
                  ) -> dict[str, Any]:
        self.calls.append((name, action, signum, peer.uid))
        if action in ("pause", "kill") and self.states[name] != "running":
            raise Conflict(f"cannot {action} {name}: it is {self.states[name]}")
        return {"name": name, "state": self.states[name]}

    async def log_tail(self, name: str, lines: int) -> bytes:
        return b"".join(b"%s line %d\n" % (name.encode(), i) for i in range(min(lines, 3)))

    async def log_follow(self, name: str, lines: int) -> AsyncIterator[bytes]:
        yield b"first\n"
        await trio.sleep(1)
        yield b"second\n"

    async def reload(self, dry_run: bool, peer: Peer) -> dict[str, Any]:
        self.calls.append(("reload", dry_run))
        return {"dry_run": dry_run, "added": [], "removed": [], "changed": [],
                "unchanged": ["db", "web"], "stay_stopped": [], "errors": []}

    async def metrics(self) -> str:
        return "corral_events_last_seq 12\n"


async def _exchange(data: bytes, *, eof: bool = True, limits: Limits = LIMITS,
                    backend: FakeBackend | None = None) -> bytes:
    """Send `data` to one server connection; everything it answered until it closed."""
    client, server = trio.testing.memory_stream_pair()
    router = Router(backend or FakeBackend())  # type: ignore[arg-type]
    out = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, router, limits, ROOT_PEER)
        try:
            await client.send_all(data)
            if eof:
                await client.send_stream.aclose()
        except trio.BrokenResourceError:
            pass  # the server closed before taking everything: fine
        with trio.fail_after(limits.request_timeout * 3 + limits.send_timeout * 3):
            while chunk := await client.receive_some(65536):
                out += chunk
    return bytes(out)


def _run(fn: Any, *args: Any, **kw: Any) -> Any:
    async def main() -> Any:
        return await fn(*args, **kw)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a server's output into responses (status, headers, body); asserts the framing."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"an unterminated response head: {raw[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        m = re.fullmatch(r"HTTP/1\.1 (\d{3}) .*", lines[0])
        assert m, lines[0]
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        status = int(m.group(1))
        if status == 100:
            raw = rest
            continue
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, raw = rest[:n], rest[n:]
            assert len(body) == n
        else:  # a stream: chunked to the end of the connection
            body, raw = rest, b""
        out.append((status, headers, body))
    return out


def _check_error_body(status: int, headers: dict[str, str], body: bytes) -> None:
    if status >= 400:
        assert headers["content-type"] == "application/json"
        doc = json.loads(body)
        assert isinstance(doc["error"], str)
        assert doc["error"]
        assert isinstance(doc["kind"], str)


# --- arbitrary bytes ----------------------------------------------------------------------


REQUEST_LIKE = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda m, p, rest: m + b" " + p + rest,
              st.sampled_from([b"GET", b"POST", b"PUT", b"get", b"", b"G\x00T"]),
              st.sampled_from([b"/v1/containers", b"/v1/containers/web/stop", b"/metrics",
                               b"/v1/events?since=1", b"*", b"/", b"/v1/../etc", b"//[x",
                               b"http://x/v1/ping", b"/v1/ping?a=%zz&", b"/%ff"]),
              st.binary(max_size=600)),
    st.builds(lambda a, b: a + b,
              st.sampled_from([b"GET /v1/containers HTTP/1.1\r\nHost: x\r\n\r\n",
                               b"POST /v1/reload HTTP/1.1\r\nHost: x\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n",
                               b"GET /v1/ping HTTP/1.0\r\n\r\n"]),
              st.binary(max_size=600)),
)


@SETTINGS
@given(data=REQUEST_LIKE, eof=st.booleans())
def test_arbitrary_bytes_get_http_errors_never_a_crash(data: bytes, eof: bool) -> None:
    raw = _run(_exchange, data, eof=eof)
    for status, headers, body in _responses(raw):
        assert status in ALLOWED, (status, body)
        _check_error_body(status, headers, body)
    if not eof and raw == b"" and data:
        pytest.fail("a client that stalls must be answered 408 (or an error) and dropped")


# --- well-formed requests -----------------------------------------------------------------


SEGMENT = st.one_of(
    st.sampled_from(["v1", "containers", "web", "db", "nope", "events", "reload", "metrics",
                     "ping", "logs", "start", "stop", "restart", "kill", "pause", "resume",
                     "", "..", "%2F", "%ff"]),
    st.text(min_size=1, max_size=12).map(lambda t: urllib.parse.quote(t, safe="")),
)
QUERY = st.lists(st.tuples(
    st.sampled_from(["since", "follow", "tail", "dry_run", "signal", "x"]),
    st.one_of(st.sampled_from(["1", "0", "true", "no", "TERM", "9", "-1", "", "abc",
                               "99999999999999999999"]), st.text(max_size=8))),
    max_size=3)
BODY = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["signal", "dry_run", "other"]),
                    st.one_of(st.booleans(), st.integers(), st.text(max_size=6), st.none()),
                    max_size=2).map(lambda d: json.dumps(d).encode()),
    st.recursive(st.none() | st.integers(), lambda c: st.lists(c, max_size=3),
                 max_leaves=6).map(lambda v: json.dumps(v).encode()),
)


def _h11_request(method: str, path: str, body: bytes) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "corrald"), ("content-length", str(len(body)))]
    out = conn.send(h11.Request(method=method, target=path, headers=headers))
    out += conn.send(h11.Data(data=body)) if body else b""
    return out + conn.send(h11.EndOfMessage())


@SETTINGS
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       segments=st.lists(SEGMENT, max_size=4), query=QUERY, body=BODY)
def test_any_request_gets_a_meaningful_answer(method: str, segments: list[str],
                                              query: list[tuple[str, str]], body: bytes
                                              ) -> None:
    path = "/" + "/".join(segments)
    if query:
        path += "?" + urllib.parse.urlencode(query)
    backend = FakeBackend()
    raw = _run(_exchange, _h11_request(method, path, body), backend=backend)
    responses = _responses(raw)
    assert len(responses) == 1, raw
    status, headers, rbody = responses[0]
    assert status in ALLOWED - {408}, (status, path, rbody)
    _check_error_body(status, headers, rbody)
    if status == 405:
        assert headers["allow"]
    if status == 200 and headers["content-type"] == "application/json":
        json.loads(rbody)
    if status == 200 and segments[-1:] in (["stop"], ["start"], ["restart"], ["kill"]):
        assert backend.calls
        assert backend.calls[-1][1] == segments[-1]
    if status != 200:  # a refused request changes nothing
        assert all(c[0] == "reload" or c[1] in ("pause", "kill") for c in backend.calls)


def test_routes_answer_what_the_docs_say() -> None:
    async def main() -> None:
        backend = FakeBackend()

        async def ask(method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
            [(status, headers, raw)] = _responses(
                await _exchange(_h11_request(method, path, body), backend=backend))
            if headers["content-type"] == "application/json":
                return status, json.loads(raw)
            return status, raw

        assert await ask("GET", "/v1/ping") == (200, {"ok": True, "api": "v1"})
        assert (await ask("GET", "/v1/containers"))[1][0]["name"] == "db"
        assert (await ask("GET", "/v1/containers/nope"))[1]["kind"] == "no_such_container"
        assert (await ask("GET", "/v1/containers/nope/logs"))[0] == 404
        assert (await ask("POST", "/v1/containers/web/kill", b'{"signal": "HUP"}'))[0] == 200
        assert backend.calls[-1] == ("web", "kill", 1, 0)
        assert (await ask("POST", "/v1/containers/web/kill?signal=USR1"))[0] == 200
        assert backend.calls[-1] == ("web", "kill", 10, 0)
        status, err = await ask("POST", "/v1/containers/db/pause")
        assert (status, err["kind"]) == (409, "conflict")
        status, err = await ask("POST", "/v1/containers/web/kill", b'{"signal": "NOPE"}')
        assert status == 400
        assert "NOPE" in err["error"]
        status, err = await ask("POST", "/v1/containers/web/stop", b'{"force": 1}')
        assert status == 400
        assert "force" in err["error"]
        assert (await ask("POST", "/v1/reload?dry_run=1"))[1]["dry_run"] is True
        assert (await ask("POST", "/v1/reload", b'{"dry_run": false}'))[1]["dry_run"] is False
        assert (await ask("POST", "/v1/reload", b'{"dry_run": "yes"}'))[0] == 400
        assert (await ask("GET", "/v1/containers/web/logs?tail=2"))[1] == (
            b"web line 0\nweb line 1\n")
        assert (await ask("GET", "/metrics"))[1].startswith(b"corral_events_last_seq")
        status, text = await ask("GET", "/v1/events?since=9")
        assert [json.loads(x)["seq"] for x in text.splitlines()] == [10, 11, 12]
        status, text = await ask("GET", "/v1/events?since=2")
        lines = [json.loads(x) for x in text.splitlines()]
        assert lines[0] == {"seq": None, "type": "gap", "since": 2, "oldest": 5, "missed": 2,
                            "reset": False}
        assert [e["seq"] for e in lines[1:]] == list(range(5, 13))
        status, text = await ask("GET", "/v1/events?since=50")
        assert json.loads(text.splitlines()[0])["reset"] is True
        assert (await ask("DELETE", "/v1/containers/web"))[0] == 405
        assert (await ask("GET", "/v2/containers"))[0] == 404
        assert (await ask("GET", "//[x"))[0] == 404
        assert (await ask("GET", "//v1/ping"))[0] == 404
        assert (await ask("GET", "/v1/ping?x=%ff"))[0] == 400

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_keep_alive_serves_several_requests_then_a_streamed_follow() -> None:
    data = (_h11_request("GET", "/v1/ping", b"") + _h11_request("GET", "/v1/containers", b"")
            + _h11_request("GET", "/v1/containers/web/logs?follow=1&tail=1", b""))
    raw = _run(_exchange, data, eof=False)
    (s1, _, _), (s2, _, _), (s3, h3, body) = _responses(raw)
    assert (s1, s2, s3) == (200, 200, 200)
    assert h3["transfer-encoding"] == "chunked"
    assert h3["connection"] == "close"
    assert body == b"6\r\nfirst\n\r\n7\r\nsecond\n\r\n0\r\n\r\n"


def test_events_follow_waits_for_new_events_and_reports_a_gap() -> None:
    async def main() -> bytes:
        backend = FakeBackend()
        client, server = trio.testing.memory_stream_pair()
        out = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server, Router(backend), LIMITS, ROOT_PEER)
            await client.send_all(_h11_request("GET", "/v1/events?follow=1&since=11", b""))
            while b"\r\n\r\n" not in out or b'"seq":12' not in out:
                out += await client.receive_some(65536)
            for i in range(20):  # more than the ring holds, before the follower reads
                backend.events.add("state", "db", to=str(i))
            while b'"seq":32' not in out:
                out += await client.receive_some(65536)
            await client.aclose()  # the follower goes away: the server's stream ends
        return bytes(out)

    raw = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    seqs = [json.loads(x)["seq"] for x in re.findall(rb"\{[^\n]*\}", raw)]
    assert seqs[0] == 12
    assert seqs[1] is None  # the gap: 13..24 fell out of the 8-event ring
    assert seqs[2:] == list(range(25, 33))


# --- limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "status"), [
    (b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
    (b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000, 431),
    (b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
    (b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"200\r\n" + b"a" * 512 + b"\r\n" + b"200\r\n" + b"a" * 512 + b"\r\n"
     + b"200\r\n" + b"a" * 512 + b"\r\n0\r\n\r\n", 413),
    (b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
     400),
    (b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
])
def test_limits_and_smuggling_shapes(data: bytes, status: int) -> None:
    [(got, headers, body)] = _responses(_run(_exchange, data, eof=False))
    assert got == status
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]


@pytest.mark.parametrize("data", [b"", b"GET /v1/pi", b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n"])
def test_a_stalled_client_is_dropped_after_the_timeout(data: bytes) -> None:
    async def main() -> tuple[bytes, float]:
        start = trio.current_time()
        raw = await _exchange(data, eof=False)
        return raw, trio.current_time() - start

    raw, took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert took >= LIMITS.request_timeout  # virtual time: MockClock
    if data:
        [(status, _, _)] = _responses(raw)
        assert status == 408
    else:
        assert raw == b""  # nothing asked, nothing said: just closed


def test_a_listener_over_its_connection_limit_answers_503_and_serves_the_others() -> None:
    async def main(path: str) -> None:
        limits = attrs_evolve(LIMITS, max_connections=2)
        sock = bind_socket(path, None)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        state = ServerState()

        async def ping(stream: trio.abc.Stream) -> int:
            await stream.send_all(_h11_request("GET", "/v1/ping", b""))
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(4096)
            return int(buf.split(b" ")[1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_listener, listener, Router(FakeBackend()), limits, None,
                               state)
            stalled = [await trio.open_unix_socket(path) for _ in range(2)]
            await stalled[0].send_all(b"GET /v1/pi")  # a slow client holds a slot
            await _until(lambda: state.active == 2)
            third = await trio.open_unix_socket(path)
            assert await ping(third) == 503
            await stalled[1].aclose()
            await _until(lambda: state.active == 1)
            fourth = await trio.open_unix_socket(path)
            assert await ping(fourth) == 200  # while the first one still stalls
            for s in (stalled[0], third, fourth):
                await s.aclose()
            nursery.cancel_scope.cancel()
        assert oct(os.stat(path).st_mode & 0o777) == "0o660"

    with tempfile.TemporaryDirectory() as d:
        trio.run(main, os.path.join(d, "s.sock"))


async def _until(cond: Any) -> None:
    """Poll a plain counter (ServerState has no event to wait on), for at most 10 s."""
    for _ in range(1000):
        if cond():
            return
        await trio.sleep(0.01)
    raise AssertionError("the condition never held")


def attrs_evolve(limits: Limits, **changes: Any) -> Limits:
    import attrs

    return attrs.evolve(limits, **changes)


def test_forbidden_peers_get_403_on_every_request() -> None:
    from corral.supervisor._control import _forbidden

    async def main() -> bytes:
        client, server = trio.testing.memory_stream_pair()
        peer = Peer(123, 65534, 65534)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server, _forbidden, LIMITS, peer)
            await client.send_all(_h11_request("GET", "/v1/containers", b""))
            out = b""
            while chunk := await client.receive_some(4096):
                out += chunk
        return out

    [(status, headers, body)] = _responses(trio.run(main))
    assert status == 403
    assert headers["connection"] == "close"
    assert "uid 65534" in json.loads(body)["error"]


@given(uid=st.integers(0, 2**32 - 1), gid=st.integers(0, 2**32 - 1),
       groups=st.lists(st.integers(0, 2**32 - 1), max_size=4),
       group=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_access_rule(uid: int, gid: int, groups: list[int], group: int | None) -> None:
    allowed = is_allowed(Peer(1, uid, gid, tuple(groups)), group)
    assert allowed == (uid == 0 or (group is not None and group in (gid, *groups)))


@pytest.mark.root
def test_peer_credentials_carry_the_supplementary_groups() -> None:
    from corral.supervisor._control import peer_credentials

    saved = os.getgroups()
    os.setgroups([4242, 4343])  # the credentials are taken when the socket is made
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    finally:
        os.setgroups(saved)
    with a, b:
        peer = peer_credentials(a)
    assert set(peer.groups) == {4242, 4343}
    assert is_allowed(attrs_evolve(peer, uid=1000), 4343)
    assert not is_allowed(attrs_evolve(peer, uid=1000), 4444)


def test_peer_credentials_of_a_socketpair_are_ours() -> None:
    from corral.supervisor._control import peer_credentials

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_credentials(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(os.getgroups()) <= set(peer.groups) | {os.getgid()}


# --- the event ring -----------------------------------------------------------------------


@given(capacity=st.integers(1, 20), count=st.integers(0, 60), since=st.integers(-3, 80))
def test_event_ring_since(capacity: int, count: int, since: int) -> None:
    ring = EventRing(capacity=capacity)
    for i in range(count):
        ring.add("state", "c", n=i)
    events, gap = ring.since(since)
    oldest = max(count - capacity + 1, 1)
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert all(json.loads(e.line)["seq"] == e.seq for e in events)
    if since > count:
        assert gap is not None
        assert gap.reset
        assert seqs == list(range(oldest, count + 1))
    else:
        assert seqs == list(range(max(since + 1, oldest), count + 1))
        if max(since, 0) < oldest - 1:
            assert gap is not None
            assert gap.missed == oldest - max(since, 0) - 1
        else:
            assert gap is None


# --- logs ---------------------------------------------------------------------------------


LINES = st.lists(st.one_of(st.binary(max_size=30), st.sampled_from([b"a\rb", b"\r", b""])
                           ).map(lambda b: b.replace(b"\n", b"_")), max_size=40)


@settings(deadline=None)
@given(files=st.lists(LINES, min_size=1, max_size=4), n=st.integers(0, 200),
       block=st.sampled_from([1, 2, 7, 65536]))
def test_tail_reads_the_last_lines_across_rotated_files(files: list[list[bytes]], n: int,
                                                        block: int) -> None:
    import corral.supervisor._ops as ops

    saved, ops.READ_BLOCK = ops.READ_BLOCK, block  # small blocks: lines across block edges
    with contextlib.ExitStack() as undo, tempfile.TemporaryDirectory() as d:
        undo.callback(setattr, ops, "READ_BLOCK", saved)
        path = os.path.join(d, "c.log")
        every: list[bytes] = []
        for i, lines in reversed(list(enumerate(files))):  # oldest (.3) first
            name = path if i == 0 else f"{path}.{i}"
            Path(name).write_bytes(b"".join(line + b"\n" for line in lines))
            every += lines
        want = b"".join(line + b"\n" for line in (every[-n:] if n else []))
        assert tail_lines(path, n) == want


@settings(deadline=None, max_examples=50)
@given(batches=st.lists(st.lists(st.integers(0, 999), min_size=1, max_size=5), max_size=8),
       keep=st.integers(0, 2), max_size=st.integers(20, 120))
def test_follow_sees_every_line_once_across_rotations(batches: list[list[int]], keep: int,
                                                      max_size: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.log")
        log = LogFile(path, LogSpec(max_size=max_size, keep=keep))
        log.write(b"old 1\nold 2\n")
        follower = LogFollower(path)
        seen = follower.start(1)
        written = [b"old 2\n"]
        try:
            for batch in batches:
                data = b"".join(b"line %d\n" % v for v in batch)
                log.write(data)  # may rotate first
                written.append(data)
                while chunk := follower.poll():
                    seen += chunk
        finally:
            follower.close()
            log.close()
        assert seen == b"".join(written)


def test_handler_bug_is_a_500_and_the_connection_goes_on() -> None:
    class Broken(FakeBackend):
        def list(self) -> list[dict[str, Any]]:
            raise RuntimeError("a bug")

    data = _h11_request("GET", "/v1/containers", b"") + _h11_request("GET", "/v1/ping", b"")
    (s1, _, b1), (s2, _, _) = _responses(_run(_exchange, data, backend=Broken()))
    assert (s1, s2) == (500, 200)
    assert json.loads(b1)["kind"] == "internal_server_error"


def test_request_and_response_values() -> None:
    req = Request("GET", "/", (), b"", ROOT_PEER)
    assert req.peer.describe() == "uid 0 gid 0 pid 0"
    assert Response.json({"a": 1}).body == b'{"a":1}\n'


def test_metrics_are_prometheus_text() -> None:
    from types import SimpleNamespace

    from corral.supervisor._ops import render_metrics

    sups = {"web": SimpleNamespace(state="running", starts=3, oom_kills=2),
            'odd"name': SimpleNamespace(state="fatal", starts=0, oom_kills=0)}
    stats = {"web": {"memory": {"usage": 4096, "limit": 2**63}, "cpu": {"usage_ns": 1_500_000},
                     "pids": {"current": 3}}}
    text = render_metrics(sups, stats, 42)  # type: ignore[arg-type]
    sample = re.compile(r'[a-z_]+(\{([a-z_]+="([^"\\\n]|\\.)*",?)+\})? -?[0-9.e+-]+')
    families = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.add(line.split()[2])
        elif not line.startswith("# HELP "):
            assert sample.fullmatch(line), line
            assert line.split("{")[0].split(" ")[0] in families
    assert 'corral_container_state{container="web",state="running"} 1' in text
    assert 'corral_container_state{container="odd\\"name",state="fatal"} 1' in text
    assert 'corral_container_restarts_total{container="web"} 2' in text
    assert 'corral_container_oom_kills_total{container="web"} 2' in text
    assert 'corral_container_memory_limit_bytes{container="web"} 0' in text  # unlimited
    assert 'corral_container_cpu_seconds_total{container="web"} 0.0015' in text
    assert text.endswith("corral_events_last_seq 42\n")


@pytest.mark.parametrize("failure", ["stops reading", "stream raises"])
def test_a_failing_stream_ends_its_connection_only(failure: str) -> None:
    class Failing(FakeBackend):
        async def log_follow(self, name: str, lines: int) -> AsyncIterator[bytes]:
            yield b"x" * 1000
            if failure == "stream raises":
                raise OSError("the log directory went away")
            while True:
                yield b"y" * 65536

    async def main() -> bytes:
        # lockstep: a send blocks until the client receives, as on a full socket buffer
        client, server = trio.testing.lockstep_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server, Router(Failing()), LIMITS, ROOT_PEER)
            await client.send_all(_h11_request("GET", "/v1/containers/web/logs?follow=1", b""))
            got = await client.receive_some(65536)  # the head and a little, then no more
            if failure == "stream raises":
                while chunk := await client.receive_some(65536):
                    got += chunk
        return bytes(got)  # serve_connection returned (or the nursery would raise)

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("long_dir", [False, True])
def test_bind_socket_replaces_a_stale_one_with_mode_0660(long_dir: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        base = d
        if long_dir:  # a socket path near the 107-byte limit: no room for a temporary name
            base = os.path.join(d, "x" * (100 - len(d) - 4))
            os.mkdir(base)
        path = os.path.join(base, "s.sk")
        Path(path).write_text("stale")
        sock = bind_socket(path, os.getgid())
        with sock:
            st = os.stat(path)
            assert oct(st.st_mode & 0o777) == "0o660"
            assert st.st_gid == os.getgid()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(path)
        assert sorted(os.listdir(base)) == ["s.sk"]


# --- the cgroup numbers the socket serves ---------------------------------------------------


VALUE = st.one_of(st.integers(0, 2**40), st.just("max"))


@settings(deadline=None, max_examples=60)
@given(v2=st.booleans(), mem=st.lists(VALUE, min_size=4, max_size=4),
       cpu=st.lists(st.integers(0, 2**40), min_size=3, max_size=3),
       pids=st.lists(VALUE, min_size=2, max_size=2))
def test_usage_agrees_with_the_runtimes_full_stats(v2: bool, mem: list[Any], cpu: list[int],
                                                   pids: list[Any]) -> None:
    """`usage` (5-8 files) gives the same numbers as `stats` (runc's ~40) on one cgroup."""
    from corral.runtime._stats import stats, usage

    with tempfile.TemporaryDirectory() as d:
        usage_, peak, limit, fails = mem
        if v2:
            files = {"memory.current": usage_, "memory.peak": peak, "memory.max": limit,
                     "memory.events": f"low 0\nhigh 0\nmax {0 if fails == 'max' else fails}\n"
                                      "oom 0\noom_kill 0\n",
                     "cpu.stat": f"usage_usec {cpu[0]}\nuser_usec {cpu[1]}\n"
                                 f"system_usec {cpu[2]}\n",
                     "pids.current": pids[0], "pids.max": pids[1]}
            for name, value in files.items():
                Path(d, name).write_text(f"{value}\n")
            cg: dict[str, Any] = {"version": 2, "path": d}
        else:
            for sub, files in {
                "memory": {"memory.usage_in_bytes": usage_, "memory.max_usage_in_bytes": peak,
                           "memory.limit_in_bytes": limit, "memory.failcnt": fails},
                "cpuacct": {"cpuacct.usage": cpu[0],
                            "cpuacct.stat": f"user {cpu[1]}\nsystem {cpu[2]}"},
                "pids": {"pids.current": pids[0], "pids.max": pids[1]},
            }.items():
                os.mkdir(os.path.join(d, sub))
                for name, value in files.items():
                    Path(d, sub, name).write_text(f"{value}\n")
            cg = {"version": 1, "paths": {"memory": f"{d}/memory", "cpu,cpuacct":
                                          f"{d}/cpuacct", "pids": f"{d}/pids"}}
        full, quick = stats(cg), usage(cg)
    m = full["memory"]["usage"]
    assert quick["memory"] == {k: m.get(k, 0) for k in ("usage", "max", "limit", "failcnt")}
    c = full["cpu"]["usage"]
    assert quick["cpu"] == {"usage_ns": c.get("total", 0), "user_ns": c["user"],
                            "kernel_ns": c["kernel"]}
    assert quick["pids"] == {"current": full["pids"].get("current", 0),
                             "limit": full["pids"].get("limit", 0)}
