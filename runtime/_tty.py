"""`corral run` with a terminal and no console socket: copy between a pty master and stdio."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
import termios
import tty

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

TIOCGWINSZ = 0x5413
TIOCSWINSZ = 0x5414


def _copy_winsize(master: int) -> None:
    try:
        size = fcntl.ioctl(0, TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, TIOCSWINSZ, size)
    except OSError:
        pass


def prepare(master: int) -> list[Any] | None:
    """Before `start`: give the container's terminal our window size and make ours raw.

    Done before the user's process runs, so that its first `stty size` sees the real size.
    Returns the saved settings of our terminal (None when stdin is no terminal).
    """
    if not os.isatty(0):
        return None
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    _copy_winsize(master)
    return saved


def proxy(master: int, saved: list[Any] | None) -> None:
    """Copy stdin to the container's terminal and its output to stdout until it closes.

    Our own terminal (if stdin is one) stays raw for the duration, so that keys like ^C
    reach the container's line discipline instead of signalling us; `saved` is restored on
    the way out.
    """
    if saved is not None:
        signal.signal(signal.SIGWINCH, lambda *_: _copy_winsize(master))
    out = sys.stdout.fileno()
    watch = [master, 0]
    try:
        while True:
            try:
                ready, _, _ = select.select(watch, [], [])
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave fd is closed, the container is done
                    break
                if not data:
                    break
                os.write(out, data)
            if 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    watch = [master]
                else:
                    os.write(master, data)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        with contextlib.suppress(OSError):
            os.close(master)
