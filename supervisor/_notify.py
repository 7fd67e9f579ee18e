"""systemd's notify protocol (sd_notify) without libsystemd: one datagram to $NOTIFY_SOCKET.

``READY=1`` once the configured containers have been started, ``STATUS=`` one line,
``STOPPING=1``, ``RELOADING=1`` and ``WATCHDOG=1`` every WatchdogSec/2 when systemd set
``WATCHDOG_USEC`` (for this process: ``WATCHDOG_PID``, when set, must be ours).
A socket name starting with ``@`` is in the abstract namespace.
"""

from __future__ import annotations

import os
import socket

import attrs
import trio

__all__ = ["Notifier", "watchdog_interval"]


def _address(name: str) -> str | bytes:
    return b"\0" + os.fsencode(name[1:]) if name.startswith("@") else name


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of WatchdogSec), or None when not asked.

    Example:
        >>> watchdog_interval({"WATCHDOG_USEC": "2000000"})
        1.0
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


@attrs.define(eq=False)
class Notifier:
    """Sends notify messages; does nothing when $NOTIFY_SOCKET is unset.

    Args:
        path: the socket (``@name`` for an abstract one), or None for ``$NOTIFY_SOCKET``.
    """

    path: str | None = attrs.field(factory=lambda: os.environ.get("NOTIFY_SOCKET") or None)
    _sock: trio.socket.SocketType | None = attrs.field(init=False, default=None)

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    async def send(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` fields in one datagram; errors are ignored (systemd may be gone).

        Example:
            >>> await Notifier().send("READY=1", "STATUS=3 running")  # doctest: +SKIP
        """
        if not self.path:
            await trio.lowlevel.checkpoint()
            return
        if self._sock is None:
            self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            await self._sock.sendto(data, _address(self.path))
        except OSError:
            pass

    async def watchdog(self, interval: float) -> None:
        """Send ``WATCHDOG=1`` every `interval` seconds, forever (run it as a task)."""
        while True:
            await self.send("WATCHDOG=1")
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
