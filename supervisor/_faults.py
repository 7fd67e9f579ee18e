"""Fault injection for corrald's crash tests: die by SIGKILL at a named point.

``CORRALD_FAULT=POINT`` (or ``POINT:N``, the N-th time the point is reached, default 1) in
corrald's environment makes `hit` kill the daemon there, as a crash or an OOM kill of the
daemon would: no cleanup, no finally blocks. tests/test_reliability.py runs the daemon with
each point of `POINTS` and checks that the next daemon finds every container and counter as
it should. Without the variable, `hit` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "hit"]

POINTS = (
    "recover",   # in the start-up recovery, after the first container is handled
    "create",    # the bundle is written, the helper not asked yet
    "created",   # the helper created the container, nothing recorded yet
    "exit",      # an exit arrived, nothing recorded yet
    "recorded",  # the exit is recorded, not yet acknowledged to the helper
    "acked",     # the exit is acknowledged, the container not yet deleted
    "stopping",  # the stop signal was sent
    "reload",    # a reload's plan is made, nothing applied yet
)

_point, _, _n = os.environ.get("CORRALD_FAULT", "").partition(":")
_left = {_point: int(_n or 1)} if _point else {}


def hit(point: str) -> None:
    """Die here if the environment asked for it (see the module docstring)."""
    if point in _left:
        _left[point] -= 1
        if _left[point] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
