"""Container logs: the pipes of one run read with trio, written as prefixed lines to a file
that rotates by size.

Each line is ``<RFC 3339 UTC time> <stream> <text>``, e.g.
``2026-11-27T22:50:01.123456789Z stdout hello``. The file is ``<log-dir>/<name>.log``; when a
write would take it past ``max_size`` it becomes ``<name>.log.1`` (``.1`` becomes ``.2`` ...,
up to ``keep``; with ``keep = 0`` the old content is dropped).

File writes leave the trio thread (`trio.to_thread.run_sync` under a shared limiter), one
call per chunk read from the pipe, not per line.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import attrs
import trio
from corral.runtime._state import rfc3339_now

if TYPE_CHECKING:
    from ._config import LogSpec

__all__ = ["LogFile", "format_lines", "pump"]

MAX_LINE = 16 << 10  # a longer line is split, so that a newline-less stream cannot grow memory
READ_SIZE = 64 << 10


def format_lines(stream: str, lines: list[bytes], now: str | None = None) -> bytes:
    """The lines (without their newlines) as prefixed log lines.

    Example:
        >>> format_lines("stdout", [b"hi"], now="T")
        b'T stdout hi\\n'
    """
    stamp = (now or rfc3339_now()).encode()
    tag = stream.encode()
    return b"".join(b"%s %s %s\n" % (stamp, tag, line) for line in lines)


@attrs.define(eq=False)
class LogFile:
    """One container's log file with size-based rotation; `write` blocks (call it in a thread).

    Args:
        path: the live file, ``<log-dir>/<name>.log``.
        spec: ``max_size`` and ``keep``.
    """

    path: str
    spec: LogSpec
    _fd: int = attrs.field(init=False, default=-1)
    _size: int = attrs.field(init=False, default=0)
    lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)

    def _open(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                               0o640)
            self._size = os.fstat(self._fd).st_size

    def rotate(self) -> None:
        """Move the live file to ``.1`` (and each ``.i`` to ``.i+1``, dropping ``.keep``)."""
        self.close()
        keep = self.spec.keep
        if keep == 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        for i in range(keep - 1, 0, -1):
            try:
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            except FileNotFoundError:
                pass
        try:
            os.replace(self.path, f"{self.path}.1")
        except FileNotFoundError:
            pass

    def write(self, data: bytes) -> None:
        """Append `data` (whole lines), rotating first when it would pass ``max_size``."""
        self._open()
        if self._size > 0 and self._size + len(data) > self.spec.max_size:
            self.rotate()
            self._open()
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._size += n

    def close(self) -> None:
        """Close the file (idempotent); the next write reopens it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def pump(fd: int, stream: str, log: LogFile, limiter: trio.CapacityLimiter) -> None:
    """Read `fd` (a pipe's read end, taken over and closed here) until EOF into `log`.

    A last line without a newline is written at EOF, or when the task is cancelled.
    """
    pending = b""

    async def flush(lines: list[bytes]) -> None:
        data = format_lines(stream, lines)
        async with log.lock:
            await trio.to_thread.run_sync(log.write, data, limiter=limiter)

    try:
        async with trio.lowlevel.FdStream(fd) as pipe:
            while True:
                chunk = await pipe.receive_some(READ_SIZE)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                while len(pending) > MAX_LINE:
                    lines.append(pending[:MAX_LINE])
                    pending = pending[MAX_LINE:]
                if lines:
                    await flush(lines)
    finally:
        if pending:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                await flush([pending])
