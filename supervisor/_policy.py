"""The restart decision and its backoff, as pure logic over times passed in.

Nothing here sleeps or reads a clock: the daemon passes ``trio.current_time()`` to
`RestartState.on_start` and `RestartState.on_exit`, sleeps the delay it gets back with
``trio.sleep`` inside the container's cancel scope (so a stop during backoff takes effect at
once), and tests drive it with ``MockClock(autojump_threshold=0)``. Wall-clock time would
make the backoff jump with NTP and suspend (anti-pattern 8).

The rules, by policy (Docker's names):

- ``no``: never restart.
- ``on-failure``: restart when the exit was not a success (an exit code outside
  ``success_exit_codes``, a signal, or an OOM kill), up to ``max_retries`` restarts in a row
  (0: no limit).
- ``always``: restart after every exit, unless the user stopped the container.
- ``unless-stopped``: the same while corrald runs; it differs across a daemon restart, where a
  container the user stopped stays stopped (`starts_at_boot`, with the persisted
  `RestartState.stopped_by_user`).

The delay of restart n (from 0) is ``min(backoff_initial * backoff_factor**n, backoff_max)``,
moved by up to ``backoff_jitter`` of itself either way and never above ``backoff_max``
(Docker: 100 ms doubling to 1 min). A run of at least ``reset_after`` (Docker: 10 s) starts
the sequence over and clears the ``max_retries`` count: a service that crashes once a day is
not given up on after a week. And as in systemd, more than ``start_limit_burst`` starts within
``start_limit_interval`` (5 in 10 s) is fatal: the restart that would be start number
burst + 1 inside the window is refused. The window slides (systemd's is fixed from its
first start), so the rule reads exactly as written: never more than burst starts in any
interval.
"""

from __future__ import annotations

import collections
import random
import signal as _signal
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._config import RestartSpec

__all__ = ["Decision", "ExitCause", "Fatal", "RestartAfter", "RestartState", "StayExited",
           "starts_at_boot"]


@attrs.frozen
class ExitCause:
    """Why a container's process ended, recorded for every exit.

    Build it with `exited`, `killed`, `oom_killed` or `from_returncode`.

    Attributes:
        kind: ``"exit"`` (it exited with `code`), ``"signal"`` (killed by `signal`),
            ``"oom"`` (the kernel's OOM killer ended it) or ``"unknown"`` (it ended while
            corrald had lost its namespace helper, the only process that could read its
            status: a failure for the policy).
        code: the exit status, 0..255, for ``"exit"``.
        signal: the signal number, for ``"signal"``; for ``"oom"``, the signal the process
            died of when known (SIGKILL).
        oom_level: for ``"oom"``, which limit fired: the cgroup whose ``oom_kill`` count grew,
            in words the user can act on (``"container memory limit (64M)"``,
            ``"/sys/fs/cgroup/corral"``). Users of other runtimes cannot tell (containerd#12133).

    Example:
        >>> ExitCause.killed(9).describe()
        'killed by SIGKILL (signal 9)'
    """

    kind: Literal["exit", "signal", "oom", "unknown"]
    code: int | None = None
    signal: int | None = None
    oom_level: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.kind == "exit" and (self.code is None or not 0 <= self.code <= 255):
            raise ValueError(f"an exit needs a code in 0..255, not {self.code!r}")
        if self.kind == "signal" and (self.signal is None or self.signal <= 0):
            raise ValueError(f"a signal exit needs a signal number, not {self.signal!r}")

    @classmethod
    def exited(cls, code: int) -> ExitCause:
        """The process called exit(code)."""
        return cls("exit", code=code)

    @classmethod
    def killed(cls, signum: int) -> ExitCause:
        """A signal ended the process."""
        return cls("signal", signal=signum)

    @classmethod
    def oom_killed(cls, level: str | None = None, signum: int | None = _signal.SIGKILL
                   ) -> ExitCause:
        """The OOM killer ended the process; `level` says which limit fired."""
        return cls("oom", signal=signum, oom_level=level)

    @classmethod
    def unknown(cls) -> ExitCause:
        """The process ended and nobody could read its status (its parent, the helper, was
        gone): a failure, as on-failure must not give up on it."""
        return cls("unknown")

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitCause:
        """From ``trio.Process.returncode`` / ``subprocess`` style: negative is a signal.

        OOM kills look like SIGKILL here: the daemon's OOM watch must say otherwise.
        """
        return cls.killed(-returncode) if returncode < 0 else cls.exited(returncode)

    def is_success(self, success_exit_codes: Iterable[int] = (0,)) -> bool:
        """True only for an exit with one of `success_exit_codes`: signals and OOM kills
        are always failures."""
        return self.kind == "exit" and self.code in set(success_exit_codes)

    def describe(self) -> str:
        """A phrase for logs and status: ``"exited with code 1"``,
        ``"killed by SIGTERM (signal 15)"``, ``"OOM-killed (container memory limit)"``."""
        if self.kind == "exit":
            return f"exited with code {self.code}"
        if self.kind == "signal":
            return f"killed by {_signal_name(self.signal)}"
        if self.kind == "unknown":
            return "ended while its parent was gone (exit status unknown)"
        return f"OOM-killed ({self.oom_level})" if self.oom_level else "OOM-killed"

    def to_json(self) -> dict[str, Any]:
        """A dict for corrald's records; `from_json` reads it back."""
        return {"kind": self.kind, "code": self.code, "signal": self.signal,
                "oom_level": self.oom_level}

    @classmethod
    def from_json(cls, data: Any) -> ExitCause:
        """Read `to_json`'s dict back.

        Raises:
            ValueError: not such a dict (a damaged record).
        """
        if not isinstance(data, dict) or data.get("kind") not in ("exit", "signal", "oom",
                                                                  "unknown"):
            raise ValueError(f"not an exit cause: {data!r}")
        code, sig, level = data.get("code"), data.get("signal"), data.get("oom_level")
        if not all(v is None or isinstance(v, int) for v in (code, sig)) or not (
                level is None or isinstance(level, str)):
            raise ValueError(f"not an exit cause: {data!r}")
        return cls(data["kind"], code=code, signal=sig, oom_level=level)


def _signal_name(signum: int | None) -> str:
    if signum is None:
        return "a signal"
    try:
        return f"{_signal.Signals(signum).name} (signal {signum})"
    except ValueError:
        return f"signal {signum}"


@attrs.frozen
class RestartAfter:
    """Restart once `delay` seconds have passed; this is restart number `attempt` in a row."""

    delay: float
    attempt: int


@attrs.frozen
class StayExited:
    """Do not restart: the container is exited (or stopped), for `reason`."""

    reason: str


@attrs.frozen
class Fatal:
    """Do not restart, and say so loudly: the start limit was hit (state "fatal")."""

    reason: str


Decision: TypeAlias = RestartAfter | StayExited | Fatal


def starts_at_boot(spec: RestartSpec, stopped_by_user: bool) -> bool:
    """Whether corrald starts a configured container when the daemon itself starts.

    Every configured container starts, except an ``unless-stopped`` one that the user had
    stopped before the daemon went down (`stopped_by_user` as persisted from
    `RestartState.stopped_by_user`). That is the one place the policy differs from
    ``always``, as in Docker.
    """
    return not (spec.policy == "unless-stopped" and stopped_by_user)


# trio's times are floats: a run of exactly reset_after, measured as a difference of two
# sums, can come out a few ulps short. A nanosecond is far below anything a user can mean.
_SLACK = 1e-9


def _start_history(self: RestartState) -> collections.deque[float]:
    return collections.deque(maxlen=self.spec.start_limit_burst)


@attrs.define(eq=False)
class RestartState:
    """One container's restart bookkeeping: call `on_start` at each start and `on_exit` at
    each exit; `on_exit` says what to do next.

    Args:
        spec: the container's ``[restart]`` section.
        rng: the source of jitter; pass ``random.Random(seed)`` in tests.
        stopped_by_user: the persisted flag, when the daemon restores a container.

    Example::

        state = RestartState(spec.restart)
        while True:
            state.on_start(trio.current_time())
            cause = await run_container()
            decision = state.on_exit(trio.current_time(), cause, stopped_by_user=False)
            if not isinstance(decision, RestartAfter):
                break  # exited, or fatal: report decision.reason
            await trio.sleep(decision.delay)  # in the container's cancel scope
    """

    spec: RestartSpec
    rng: random.Random = attrs.field(factory=random.Random)
    stopped_by_user: bool = False
    _starts: collections.deque[float] = attrs.field(
        init=False, default=attrs.Factory(_start_history, takes_self=True))
    _started_at: float | None = attrs.field(init=False, default=None)
    _step: int = attrs.field(init=False, default=0)
    _retries: int = attrs.field(init=False, default=0)

    @property
    def restarts(self) -> int:
        """Restarts in a row since the last reset (by a long run or `reset`)."""
        return self._retries

    @property
    def started_at(self) -> float | None:
        """When the running process started, or None when it is not running."""
        return self._started_at

    def on_start(self, now: float) -> None:
        """Record a start at `now` (``trio.current_time()``); clears `stopped_by_user`."""
        self._starts.append(now)
        self._started_at = now
        self.stopped_by_user = False

    def on_user_stop(self) -> None:
        """The user stopped the container while it was not running (say, during backoff):
        remember it, for ``unless-stopped`` across a daemon restart."""
        self.stopped_by_user = True
        self._started_at = None

    def reset(self) -> None:
        """Forget the history: for an explicit start by the user after exited or fatal
        (as ``systemctl reset-failed``)."""
        self._starts.clear()
        self._started_at = None
        self._step = 0
        self._retries = 0
        self.stopped_by_user = False

    def snapshot(self, now: float) -> dict[str, Any]:
        """What a restarted daemon needs to go on counting (`restore`), with every time as
        seconds before `now`: the clock (``trio.current_time()``) does not survive a
        restart, durations do."""
        return {"starts_ago": [now - t for t in self._starts],
                "running_for": None if self._started_at is None else now - self._started_at,
                "step": self._step, "retries": self._retries,
                "stopped_by_user": self.stopped_by_user}

    @classmethod
    def restore(cls, spec: RestartSpec, data: Any, now: float,
                rng: random.Random | None = None) -> RestartState:
        """A state from `snapshot`'s dict, taken `now` on this daemon's clock (the time of
        the snapshot, shifted by how long ago it was written).

        Raises:
            ValueError: not such a dict (a damaged record).
        """
        try:
            ago = [float(t) for t in data["starts_ago"]]
            running = data["running_for"]
            step, retries = int(data["step"]), int(data["retries"])
            stopped = data["stopped_by_user"]
            if running is not None:
                running = float(running)
            if not isinstance(stopped, bool) or step < 0 or retries < 0:
                raise ValueError("bad values")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a restart state: {data!r} ({e})") from None
        state = cls(spec, rng or random.Random(), stopped)
        state._starts.extend(now - t for t in ago)
        state._started_at = None if running is None else now - running
        state._step, state._retries = step, retries
        return state

    def start_limit_hit(self, at: float) -> bool:
        """Whether a start at time `at` would be more than ``start_limit_burst`` starts within
        ``start_limit_interval`` (always False when the interval is 0)."""
        interval, burst = self.spec.start_limit_interval, self.spec.start_limit_burst
        return (interval > 0 and 0 < burst <= len(self._starts)
                and at - self._starts[-burst] < interval)

    def on_exit(self, now: float, cause: ExitCause, stopped_by_user: bool = False
                ) -> Decision:
        """Decide what follows an exit at `now`.

        Args:
            now: ``trio.current_time()`` at the exit.
            cause: why the process ended.
            stopped_by_user: the exit came from a stop the user asked for.

        Returns:
            `RestartAfter` (sleep the delay, then start), `StayExited` (with the reason), or
            `Fatal` when the restart would break the start limit.
        """
        spec = self.spec
        ran = now - self._started_at if self._started_at is not None else 0.0
        self._started_at = None
        if ran >= spec.reset_after - _SLACK:
            self._step = 0
            self._retries = 0
        what = cause.describe()
        if stopped_by_user:
            self.stopped_by_user = True
            return StayExited(f"{what}: stopped by the user")
        if spec.policy == "no":
            return StayExited(f"{what}: restart policy is \"no\"")
        if spec.policy == "on-failure":
            if cause.is_success(spec.success_exit_codes):
                return StayExited(f"{what}: a success, and restart policy is \"on-failure\"")
            if spec.max_retries and self._retries >= spec.max_retries:
                return StayExited(f"{what}: gave up after {spec.max_retries} restarts in a row")
        delay = self._next_delay()
        if self.start_limit_hit(now + delay):
            return Fatal(f"{what}: start limit hit: more than {spec.start_limit_burst} starts "
                         f"within {spec.start_limit_interval:g}s")
        self._retries += 1
        return RestartAfter(delay, self._retries)

    def _next_delay(self) -> float:
        spec = self.spec
        try:
            delay = min(spec.backoff_initial * spec.backoff_factor**self._step, spec.backoff_max)
        except OverflowError:
            delay = spec.backoff_max
        if delay < spec.backoff_max and spec.backoff_initial > 0 and spec.backoff_factor > 1:
            self._step += 1  # stops growing at the cap, so the power never overflows
        if spec.backoff_jitter:
            delay *= 1 + self.rng.uniform(-spec.backoff_jitter, spec.backoff_jitter)
        return max(0.0, min(delay, spec.backoff_max))
