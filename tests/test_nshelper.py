"""The namespace helper (supervisor/_nshelper.py) through its trio client.

Each test spawns a helper with its socket and the runtime's state root under tmp_path, drives
it with HelperClient, and leaves nothing behind: the `helper` fixture deletes the containers
and shuts the helper down (killing it by pid if it lingers), then conftest's `rt` teardown
looks for state, cgroups, mounts and processes.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import pytest
import trio
from corral.runtime._state import Root
from corral.supervisor._helperclient import (
    ExitInfo,
    HelperClient,
    HelperError,
    HelperGone,
    spawn_helper,
)
from corral.supervisor._nshelper import Helper, _Create

TIMEOUT = 30
Runtime = Any  # conftest's Runtime: with --import-mode=importlib conftest cannot be imported


class HelperProc:
    """A running helper: its socket, pid, a pidfd that pins it, and its log."""

    def __init__(self, sock: Path, pid: int, log: Path) -> None:
        self.sock = sock
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.log = log

    def exited(self, timeout: float) -> bool:
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(int(timeout * 1000)))

    def open(self) -> contextlib.AbstractAsyncContextManager[HelperClient]:
        return HelperClient.open(self.sock)


def _spawn(sock: Path, root: Path, log: IO[bytes]) -> int:
    async def main() -> int:
        with trio.fail_after(TIMEOUT):
            return await spawn_helper(sock, root, stderr=log.fileno())

    return trio.run(main)


async def _shutdown(sock: Path) -> None:
    with trio.fail_after(10):
        async with HelperClient.open(sock) as client:
            await client.shutdown()


@pytest.fixture
def helper(rt: Runtime, tmp_path: Path, cf: Any) -> Iterator[HelperProc]:
    sock = tmp_path / "helper.sock"
    log_path = tmp_path / "helper.log"
    with open(log_path, "wb") as log:
        h = HelperProc(sock, _spawn(sock, rt.state_root, log), log_path)
    try:
        yield h
    finally:
        for cid in rt.ids:
            cf.run_cmd(rt.argv("delete", "--force", cid), timeout=15)
        with contextlib.suppress(Exception):
            trio.run(_shutdown, sock)
        stopped = h.exited(10)
        if not stopped:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(h.pidfd, signal.SIGKILL)
            h.exited(10)
        os.close(h.pidfd)
        problems = []
        if not stopped:
            problems.append(f"the helper (pid {h.pid}) did not exit after shutdown")
        if sock.exists():
            problems.append(f"the helper left its socket {sock}")
        log_text = log_path.read_text()
        if "Traceback" in log_text or "internal error" in log_text:
            problems.append("the helper logged an error")
        if problems:
            pytest.fail("; ".join(problems) + "\n--- helper log ---\n" + log_text)


def _devnull() -> int:
    return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


async def _read_all(fd: int) -> bytes:
    chunks = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some():
            chunks.append(chunk)
    return b"".join(chunks)


async def _create(client: HelperClient, cid: str, bundle: str | Path) -> int:
    """Create with stdout/stderr on /dev/null."""
    out, err = _devnull(), _devnull()
    try:
        return await client.create(cid, bundle, out, err)
    finally:
        os.close(out)
        os.close(err)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


async def _reaped(pid: int) -> None:
    """Wait until /proc/PID is gone: the helper has reaped the init (not our child)."""
    with trio.fail_after(10):
        while await trio.Path(f"/proc/{pid}").exists():  # noqa: ASYNC110 (no event for this)
            await trio.sleep(0.02)


async def _kill(rt: Runtime, cid: str, sig: str = "KILL") -> None:
    await trio.to_thread.run_sync(lambda: rt("kill", cid, sig))


def _plain(info: ExitInfo) -> ExitInfo:
    """`info` without the helper's event number, to compare with an expected one."""
    return attrs.evolve(info, eseq=None)


@pytest.mark.root
def test_output_and_exit_code(rt: Runtime, helper: HelperProc) -> None:
    bundle = rt.make_bundle(args=["sh", "-c", "echo hi; echo oops >&2; exit 3"])
    cid = rt.new_id()

    async def main() -> tuple[int, bytes, bytes, ExitInfo]:
        with trio.fail_after(TIMEOUT):
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            async with helper.open() as client:
                try:
                    pid = await client.create(cid, str(bundle.path), out_w, err_w)
                finally:
                    os.close(out_w)
                    os.close(err_w)
                out = await _read_all(out_r)
                err = await _read_all(err_r)
                return pid, out, err, await client.wait_exit(cid)

    pid, out, err, info = trio.run(main)
    assert out == b"hi\n"
    assert err == b"oops\n"
    assert _plain(info) == ExitInfo(code=3, signal=None, pid=pid)


@pytest.mark.root
def test_kill_list_and_process_tree(rt: Runtime, helper: HelperProc) -> None:
    bundle = rt.make_bundle(args=["sleep", "1000"])
    cid = rt.new_id()

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with helper.open() as client:
                assert await client.ping() == helper.pid
                pid = await _create(client, cid, bundle.path)
                assert _ppid(pid) == helper.pid  # reparented to the helper, the subreaper
                assert os.getsid(helper.pid) != os.getsid(0)  # a session of its own
                assert rt.state(cid)["status"] == "running"
                assert await client.list() == {cid: pid}
                await _kill(rt, cid)
                assert _plain(await client.wait_exit(cid)) == ExitInfo(code=None, signal=9, pid=pid)
                assert await client.list() == {}

    trio.run(main)


@pytest.mark.root
def test_exit_while_disconnected_is_delivered_on_reconnect(rt: Runtime, helper: HelperProc) -> None:
    bundle = rt.make_bundle(args=["sleep", "1000"])
    cid = rt.new_id()

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with helper.open() as client:
                pid = await _create(client, cid, bundle.path)
            await _kill(rt, cid)
            await _reaped(pid)  # reaped by the helper while no client is connected
            async with helper.open() as client:
                assert _plain(await client.wait_exit(cid)) == ExitInfo(code=None, signal=9, pid=pid)
                assert await client.list() == {}
            # Not acknowledged (as a daemon that died before recording it): told again.
            async with helper.open() as client:
                info = await client.wait_exit(cid)
                assert _plain(info) == ExitInfo(code=None, signal=9, pid=pid)
                await client.ack(info)
            # That client acknowledged it: the next one is not told again.
            async with helper.open() as client:
                with trio.move_on_after(0.3) as scope:
                    await client.wait_exit(cid)
                assert scope.cancelled_caught

    trio.run(main)


@pytest.mark.root
def test_second_connection_replaces_the_first(rt: Runtime, helper: HelperProc) -> None:
    bundle = rt.make_bundle(args=["sleep", "1000"])
    cid = rt.new_id()

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with helper.open() as first:
                # A bare connection that sends nothing (a probe) replaces nobody.
                probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                await probe.connect(str(helper.sock))
                assert await first.ping() == helper.pid
                async with helper.open() as second:
                    with pytest.raises(HelperGone):
                        await first.ping()
                    with pytest.raises(HelperGone):
                        await first.wait_exit(cid)
                    probe.close()
                    assert await second.ping() == helper.pid
                    pid = await _create(second, cid, bundle.path)
                    await _kill(rt, cid)
                    assert _plain(await second.wait_exit(cid)) == ExitInfo(None, 9, pid)

    trio.run(main)


@pytest.mark.root
def test_concurrent_creates(rt: Runtime, helper: HelperProc) -> None:
    bundle = rt.make_bundle(args=["sleep", "1000"])
    cids = [rt.new_id() for _ in range(3)]

    async def main() -> None:
        pids: dict[str, int] = {}

        async def one(client: HelperClient, cid: str) -> None:
            pids[cid] = await _create(client, cid, bundle.path)

        with trio.fail_after(TIMEOUT):
            async with helper.open() as client:
                async with trio.open_nursery() as nursery:
                    for cid in cids:
                        nursery.start_soon(one, client, cid)
                assert await client.list() == pids
                assert len(set(pids.values())) == len(cids)
                for cid in cids:
                    await _kill(rt, cid)
                for cid in cids:
                    assert (await client.wait_exit(cid)).signal == 9

    trio.run(main)


@pytest.mark.root
def test_bad_requests_get_errors_and_leave_nothing(rt: Runtime, helper: HelperProc,
                                                  tmp_path: Path, cf: Any) -> None:
    no_rootfs = rt.make_bundle(changes={"root": {"path": str(tmp_path / "no-such-rootfs")}})
    bad_mount = rt.make_bundle(changes=lambda c: c["mounts"].append(
        {"destination": "/mnt/x", "type": "bind", "source": str(tmp_path / "no-such-source"),
         "options": ["rbind"]}))
    cid = rt.new_id()

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with helper.open() as client:
                with pytest.raises(HelperError, match=r"root\.path.*no-such-rootfs"):
                    await _create(client, cid, no_rootfs.path)
                # Fails in the init, after the state directory and the cgroup were made.
                with pytest.raises(HelperError, match="no-such-source"):
                    await _create(client, cid, bad_mount.path)
                assert os.listdir(rt.state_root) == []
                assert cf.cgroups_named([cid]) == []
                with pytest.raises(HelperError, match="absolute"):
                    await _create(client, cid, "relative/bundle")
                with pytest.raises(HelperError, match=r"invalid container id '\.\./x'"):
                    await _create(client, "../x", no_rootfs.path)
                with pytest.raises(HelperError, match="expected 2 fds"):
                    await client._request({"op": "create", "id": cid,
                                           "bundle": str(bad_mount.path)})
                with pytest.raises(HelperError, match="unknown op"):
                    await client._request({"op": "frobnicate"})
                assert await client.list() == {}
                # Garbage on the socket is answered, not fatal.
                raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                with raw:
                    await raw.connect(str(helper.sock))
                    await raw.send(b"{not json")
                    assert b"invalid JSON" in await raw.recv(65536)
            async with helper.open() as client:
                assert await client.ping() == helper.pid

    trio.run(main)
    assert os.listdir(rt.state_root) == []


@pytest.mark.root
def test_shutdown_waits_for_running_containers(rt: Runtime, helper: HelperProc) -> None:
    bundle = rt.make_bundle(args=["sleep", "1000"])
    cid = rt.new_id()

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with helper.open() as client:
                pid = await _create(client, cid, bundle.path)
                await client.shutdown()
                with pytest.raises(HelperError, match="shutting down"):
                    await _create(client, rt.new_id(), bundle.path)
                await trio.sleep(0.3)
                assert not helper.exited(0)
                await _kill(rt, cid)
                assert _plain(await client.wait_exit(cid)) == ExitInfo(None, 9, pid)
        # The last exit is delivered, then the helper exits and removes its socket.
        assert helper.exited(10)
        assert not helper.sock.exists()

    trio.run(main)


@pytest.mark.root
def test_stale_socket_is_replaced_and_a_live_one_is_not(rt: Runtime, helper: HelperProc,
                                                       tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(stale))
    dead.close()  # the file stays, nothing answers
    log_path = tmp_path / "second.log"

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with helper.open() as client:
                with (
                    open(log_path, "wb") as log,  # noqa: ASYNC230 (a test, a local file)
                    pytest.raises(HelperError, match="did not start"),
                ):
                    await spawn_helper(helper.sock, rt.state_root, stderr=log.fileno())
                # The failed helper's probe did not take the connection from us.
                assert await client.ping() == helper.pid
            assert "another helper answers" in log_path.read_text()
            with open(log_path, "wb") as log:  # noqa: ASYNC230
                pid = await spawn_helper(stale, rt.state_root, stderr=log.fileno())
            pidfd = os.pidfd_open(pid)
            try:
                assert oct(stale.stat().st_mode & 0o777) == oct(0o600)
                async with HelperClient.open(stale) as client:
                    assert await client.ping() == pid
                    await client.shutdown()
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            assert not stale.exists()

    trio.run(main)


@pytest.mark.root
def test_helper_logs_are_readable(helper: HelperProc) -> None:
    """The helper says where it listens; a daemon points its log somewhere useful."""
    deadline = time.monotonic() + 5
    while "listening on" not in helper.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"listening on {helper.sock}" in helper.log.read_text()


@pytest.mark.root
def test_quick_exits_are_all_reported(rt: Runtime, helper: HelperProc) -> None:
    """Inits that exit before their creator is reaped (the stash in `reap`) are not lost."""
    bundle = rt.make_bundle(args=["true"])
    cids = [rt.new_id() for _ in range(6)]

    async def main() -> None:
        pids: dict[str, int] = {}

        async def one(client: HelperClient, cid: str) -> None:
            pids[cid] = await _create(client, cid, bundle.path)
            assert _plain(await client.wait_exit(cid)) == ExitInfo(0, None, pids[cid])

        with trio.fail_after(TIMEOUT):
            async with helper.open() as client, trio.open_nursery() as nursery:
                for cid in cids:
                    nursery.start_soon(one, client, cid)

    trio.run(main)


@pytest.mark.root
def test_create_outlives_its_client(rt: Runtime, helper: HelperProc) -> None:
    """A daemon that dies mid-create finds the container with `list` after reconnecting."""
    bundle = rt.make_bundle(args=["sleep", "1000"])
    cid = rt.new_id()

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            out = _devnull()
            with raw:
                await raw.connect(str(helper.sock))
                msg = {"op": "create", "seq": 1, "id": cid, "bundle": str(bundle.path)}
                await raw.sendmsg([json.dumps(msg).encode()],
                                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [out, out]))])
            os.close(out)
            async with helper.open() as client:
                while not (running := await client.list()):  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert list(running) == [cid]
                assert _ppid(running[cid]) == helper.pid
                await _kill(rt, cid)
                assert (await client.wait_exit(cid)).signal == 9

    trio.run(main)


def test_init_reaped_before_its_creator(tmp_path: Path) -> None:
    """The kernel reparents an exiting creator's children before the creator is waitable: an
    init may be reaped first. Its exit is kept, and reported right after `created`."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(5)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    h = Helper(listener, (0, 0), str(tmp_path / "sock"), Root(str(tmp_path / "state")))
    h.client = theirs
    creator, init = 999_001, 999_002
    c = _Create(creator, 7, "c1", -1, theirs, None)
    c.buf = json.dumps({"ok": True, "pid": init}).encode() + b"\n"
    h.creates[creator] = c
    h.on_exits([(init, 9)])  # killed by SIGKILL, reaped before its creator
    assert h.early == {init: 9}
    h.on_exits([(creator, 0)])
    replies = [json.loads(ours.recv(65536)) for _ in range(2)]
    assert replies == [
        {"op": "created", "seq": 7, "id": "c1", "pid": init, "start_time": 0, "cgroup": {}},
        {"op": "exit", "eseq": 1, "id": "c1", "pid": init, "code": None, "signal": 9},
    ]
    assert (h.inits, h.early, h.creates) == ({}, {}, {})
    for s in (ours, theirs, listener):
        s.close()
