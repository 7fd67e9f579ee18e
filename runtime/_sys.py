"""Signals and Unix sockets from the C modules, without `signal`'s and `socket`'s enums.

Why: `import signal` and `import socket` build IntEnum classes at import time (~4 ms and
~9 ms, with `enum` itself); the runtime CLI needs a handful of constants and calls that the C
modules `_signal` and `_socket` provide directly. `_signal` has no type stubs, hence the
`Any` below; the functions here give it types.
"""

from __future__ import annotations

import _socket
import struct

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_signal: Any = __import__("_signal")

SIGNALS: dict[str, int] = {
    name[3:]: value for name, value in vars(_signal).items()
    if name.startswith("SIG") and not name.startswith("SIG_") and isinstance(value, int)
}
SIGKILL: int = _signal.SIGKILL
SIGTERM: int = _signal.SIGTERM
SIGINT: int = _signal.SIGINT
SIGPIPE: int = _signal.SIGPIPE
SIGXFSZ: int = _signal.SIGXFSZ
SIGRTMIN: int = _signal.SIGRTMIN
SIGRTMAX: int = _signal.SIGRTMAX
SIG_DFL: int = _signal.SIG_DFL
FORWARDED = tuple(SIGNALS[n] for n in ("INT", "TERM", "HUP", "QUIT", "USR1", "USR2", "WINCH"))

Socket = _socket.socket
SOCK_STREAM: int = _socket.SOCK_STREAM


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _signal.pidfd_send_signal(pidfd, sig)


def set_handler(sig: int, handler: Callable[[int, object], None] | int) -> None:
    _signal.signal(sig, handler)


def unblock_all() -> None:
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])


def socketpair(kind: int = _socket.SOCK_SEQPACKET) -> tuple[Socket, Socket]:
    """A connected pair of AF_UNIX sockets, close-on-exec (fork still shares them)."""
    a, b = _socket.socketpair(_socket.AF_UNIX, kind | _socket.SOCK_CLOEXEC)
    return a, b


def connect_unix(path: str) -> Socket:
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


def send_fds(sock: Socket, data: bytes, fds: list[int]) -> None:
    """sendmsg with SCM_RIGHTS, as socket.send_fds does."""
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                           struct.pack(f"{len(fds)}i", *fds))])


def recv_fds(sock: Socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """recvmsg with SCM_RIGHTS, as socket.recv_fds does."""
    data, ancdata, _, _ = sock.recvmsg(bufsize, _socket.CMSG_SPACE(maxfds * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds.extend(struct.unpack(f"{n}i", payload[: n * 4]))
    return data, fds


def inet_dgram() -> Socket:
    return _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)


def from_fd(fd: int) -> Socket:
    return _socket.socket(fileno=fd)
