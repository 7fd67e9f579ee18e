"""The restart policy and backoff, driven by trio's MockClock: no wall clock, no containers.

Each simulated container run sleeps its duration on the mock clock, reports an exit cause,
and sleeps the decided delay; the tests assert on the trio.current_time() of every start.
"""

from __future__ import annotations

import itertools
import random
import signal

import attrs
import pytest
import trio
import trio.testing
from corral.supervisor import (
    ExitCause,
    Fatal,
    RestartAfter,
    RestartSpec,
    RestartState,
    StayExited,
    starts_at_boot,
)

CRASH = ExitCause.exited(1)
OK = ExitCause.exited(0)
# Jitter off and the start limit off, so that the times are exact and the sequence long.
PLAIN = RestartSpec(policy="always", backoff_jitter=0.0, start_limit_interval=0.0)


def simulate(state, runs):
    """Run `runs` ((duration, cause) pairs) under a MockClock, restarting as decided.

    Returns the start times and the last decision.
    """
    async def main():
        starts = []
        decision = None
        for duration, cause in runs:
            now = trio.current_time()
            state.on_start(now)
            starts.append(now)
            await trio.sleep(duration)
            decision = state.on_exit(trio.current_time(), cause)
            if not isinstance(decision, RestartAfter):
                break
            await trio.sleep(decision.delay)
        return starts, decision

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def gaps(starts):
    return [round(b - a, 9) for a, b in itertools.pairwise(starts)]


# -- the backoff sequence ------------------------------------------------------------------


def test_backoff_doubles_from_100ms_and_caps():
    spec = attrs.evolve(PLAIN, backoff_max=1.0)
    starts, decision = simulate(RestartState(spec), [(0, CRASH)] * 9)
    assert starts[0] == 0
    assert gaps(starts) == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert starts == pytest.approx([0, 0.1, 0.3, 0.7, 1.5, 2.5, 3.5, 4.5, 5.5])
    assert decision == RestartAfter(1.0, 9)


def test_docker_default_backoff_reaches_one_minute():
    starts, _ = simulate(RestartState(PLAIN), [(0, CRASH)] * 13)
    assert gaps(starts) == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 60.0, 60.0]


def test_backoff_counts_from_the_exit_not_the_start():
    starts, _ = simulate(RestartState(PLAIN), [(1.0, CRASH)] * 4)
    assert starts == pytest.approx([0, 1.1, 2.3, 3.7])


def test_a_long_run_resets_the_backoff():
    runs = [(0, CRASH)] * 3 + [(10.0, CRASH)] + [(0, CRASH)] * 2 + [(9.9, CRASH), (0, CRASH)]
    starts, _ = simulate(RestartState(PLAIN), runs)
    # 0.1, 0.2, 0.4; a 10 s run (reset_after) starts over at 0.1; a 9.9 s run does not.
    assert gaps(starts) == [0.1, 0.2, 0.4, 10.1, 0.2, 0.4, 10.7]


def test_reset_after_is_configurable():
    spec = attrs.evolve(PLAIN, reset_after=2.0)
    starts, _ = simulate(RestartState(spec), [(0, CRASH), (0, CRASH), (2.0, CRASH), (0, CRASH)])
    assert gaps(starts) == [0.1, 0.2, 2.1]


def test_factor_one_is_a_fixed_delay():
    spec = attrs.evolve(PLAIN, backoff_initial=0.5, backoff_factor=1.0)
    starts, _ = simulate(RestartState(spec), [(0, CRASH)] * 5)
    assert gaps(starts) == [0.5] * 4


def test_zero_initial_delay_restarts_at_once():
    spec = attrs.evolve(PLAIN, backoff_initial=0.0)
    starts, _ = simulate(RestartState(spec), [(0, CRASH)] * 2000)  # no overflow
    assert set(gaps(starts)) == {0.0}


def test_jitter_stays_within_its_share_and_under_the_cap():
    spec = attrs.evolve(PLAIN, backoff_jitter=0.1, backoff_max=1.0)
    state = RestartState(spec, rng=random.Random(42))
    starts, _ = simulate(state, [(0, CRASH)] * 40)
    nominal = [min(0.1 * 2**n, 1.0) for n in range(39)]
    for gap, want in zip(gaps(starts), nominal, strict=True):
        assert want * 0.9 - 1e-9 <= gap <= min(want * 1.1, 1.0) + 1e-9
    assert len(set(gaps(starts)[6:])) > 1  # it does move
    again, _ = simulate(RestartState(spec, rng=random.Random(42)), [(0, CRASH)] * 40)
    assert again == starts  # a seeded rng makes it reproducible


# -- policies ------------------------------------------------------------------------------


def test_no_never_restarts():
    state = RestartState(attrs.evolve(PLAIN, policy="no"))
    for cause in (OK, CRASH, ExitCause.killed(9), ExitCause.oom_killed("container")):
        state.on_start(0.0)
        decision = state.on_exit(1.0, cause)
        assert isinstance(decision, StayExited)
        assert '"no"' in decision.reason


def test_on_failure_stops_after_max_retries():
    spec = attrs.evolve(PLAIN, policy="on-failure", max_retries=3)
    starts, decision = simulate(RestartState(spec), [(0, CRASH)] * 10)
    assert len(starts) == 4  # the first start and 3 restarts
    assert gaps(starts) == [0.1, 0.2, 0.4]
    assert isinstance(decision, StayExited)
    assert "gave up after 3 restarts" in decision.reason
    assert "exited with code 1" in decision.reason


def test_on_failure_retry_count_resets_after_a_long_run():
    spec = attrs.evolve(PLAIN, policy="on-failure", max_retries=2)
    state = RestartState(spec)
    runs = [(0, CRASH), (0, CRASH), (10.0, CRASH), (0, CRASH), (0, CRASH), (0, CRASH)]
    starts, decision = simulate(state, runs)
    assert len(starts) == 5
    assert isinstance(decision, StayExited)
    assert state.restarts == 2


def test_on_failure_unlimited_when_max_retries_is_0():
    spec = attrs.evolve(PLAIN, policy="on-failure")
    starts, decision = simulate(RestartState(spec), [(0, CRASH)] * 50)
    assert len(starts) == 50
    assert decision == RestartAfter(60.0, 50)


def test_on_failure_success_codes():
    spec = attrs.evolve(PLAIN, policy="on-failure", success_exit_codes=(0, 3))
    state = RestartState(spec)
    for cause, restarts in [(OK, False), (ExitCause.exited(3), False), (CRASH, True),
                            (ExitCause.exited(255), True), (ExitCause.killed(15), True),
                            (ExitCause.killed(9), True)]:
        state.on_start(0.0)
        decision = state.on_exit(0.5, cause)
        assert isinstance(decision, RestartAfter) == restarts, cause
    state.on_start(0.0)
    decision = state.on_exit(0.0, ExitCause.exited(3))
    assert decision == StayExited(
        'exited with code 3: a success, and restart policy is "on-failure"')


def test_on_failure_empty_success_codes_restart_even_exit_0():
    spec = attrs.evolve(PLAIN, policy="on-failure", success_exit_codes=())
    state = RestartState(spec)
    state.on_start(0.0)
    assert isinstance(state.on_exit(0.0, OK), RestartAfter)


def test_oom_is_a_failure_and_counts_toward_max_retries():
    spec = attrs.evolve(PLAIN, policy="on-failure", max_retries=2)
    oom = ExitCause.oom_killed("container memory limit (64M)")
    starts, decision = simulate(RestartState(spec), [(0, oom)] * 5)
    assert len(starts) == 3
    assert isinstance(decision, StayExited)
    assert "OOM-killed (container memory limit (64M))" in decision.reason


@pytest.mark.parametrize("policy", ["always", "unless-stopped"])
def test_always_restarts_after_success_but_not_after_a_user_stop(policy):
    state = RestartState(attrs.evolve(PLAIN, policy=policy))
    state.on_start(0.0)
    assert state.on_exit(1.0, OK) == RestartAfter(0.1, 1)
    state.on_start(1.1)
    decision = state.on_exit(2.0, ExitCause.killed(signal.SIGTERM), stopped_by_user=True)
    assert decision == StayExited("killed by SIGTERM (signal 15): stopped by the user")
    assert state.stopped_by_user
    state.on_start(5.0)  # the user starts it again
    assert not state.stopped_by_user


def test_a_user_stop_beats_every_policy():
    for policy in ("no", "on-failure", "always", "unless-stopped"):
        state = RestartState(attrs.evolve(PLAIN, policy=policy))
        state.on_start(0.0)
        assert isinstance(state.on_exit(0.0, CRASH, stopped_by_user=True), StayExited)


def test_unless_stopped_differs_from_always_only_at_boot():
    always = RestartSpec(policy="always")
    unless = RestartSpec(policy="unless-stopped")
    assert starts_at_boot(always, stopped_by_user=True)
    assert starts_at_boot(always, stopped_by_user=False)
    assert starts_at_boot(unless, stopped_by_user=False)
    assert not starts_at_boot(unless, stopped_by_user=True)
    restored = RestartState(unless, stopped_by_user=True)  # from the persisted flag
    assert restored.stopped_by_user


def test_stop_during_backoff_takes_effect_at_once():
    async def main():
        state = RestartState(attrs.evolve(PLAIN, backoff_initial=30.0, backoff_max=60.0))
        state.on_start(trio.current_time())
        decision = state.on_exit(trio.current_time(), CRASH)
        assert decision == RestartAfter(30.0, 1)
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def backoff():
                with scope:
                    await trio.sleep(decision.delay)
                    state.on_start(trio.current_time())

            nursery.start_soon(backoff)
            await trio.sleep(2.0)
            scope.cancel()  # the user's stop
            state.on_user_stop()
        assert trio.current_time() == 2.0
        assert state.started_at is None
        assert state.stopped_by_user

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# -- the start limit -----------------------------------------------------------------------


def test_start_limit_default_is_fatal_at_the_sixth_start_in_10s():
    spec = RestartSpec(policy="always", backoff_jitter=0.0)  # systemd: 5 in 10 s
    starts, decision = simulate(RestartState(spec), [(0, CRASH)] * 10)
    assert starts == pytest.approx([0, 0.1, 0.3, 0.7, 1.5])  # five starts allowed
    assert isinstance(decision, Fatal)
    assert "start limit hit: more than 5 starts within 10s" in decision.reason


def test_start_limit_small_burst():
    spec = attrs.evolve(PLAIN, start_limit_burst=2, start_limit_interval=10.0)
    starts, decision = simulate(RestartState(spec), [(0, CRASH)] * 10)
    assert starts == pytest.approx([0, 0.1])
    assert isinstance(decision, Fatal)


def test_start_limit_counts_the_window_only():
    # Starts 3 s apart: never more than 4 of them inside any 10 s window.
    spec = attrs.evolve(PLAIN, backoff_initial=3.0, backoff_factor=1.0,
                        start_limit_interval=10.0)
    starts, decision = simulate(RestartState(spec), [(0, CRASH)] * 20)
    assert len(starts) == 20
    assert isinstance(decision, RestartAfter)


def test_start_limit_window_edge():
    # The sixth start lands exactly 10 s after the first: outside the window, allowed.
    spec = attrs.evolve(PLAIN, backoff_initial=2.0, backoff_factor=1.0,
                        start_limit_interval=10.0)
    starts, decision = simulate(RestartState(spec), [(0, CRASH)] * 6)
    assert starts == [0, 2.0, 4.0, 6.0, 8.0, 10.0]
    spec = attrs.evolve(spec, start_limit_interval=10.5)
    starts, decision = simulate(RestartState(spec), [(0, CRASH)] * 6)
    assert len(starts) == 5
    assert isinstance(decision, Fatal)


def test_start_limit_zero_interval_is_off():
    starts, _ = simulate(RestartState(attrs.evolve(PLAIN, backoff_initial=0.0)),
                         [(0, CRASH)] * 100)
    assert len(starts) == 100


def test_reset_clears_a_fatal_state():
    spec = attrs.evolve(PLAIN, start_limit_burst=1, start_limit_interval=10.0)
    state = RestartState(spec)
    state.on_start(0.0)
    assert isinstance(state.on_exit(0.0, CRASH), Fatal)
    assert state.start_limit_hit(1.0)
    state.reset()
    assert not state.start_limit_hit(1.0)
    state.on_start(1.0)
    assert isinstance(state.on_exit(1.0, CRASH), Fatal)
    assert not state.start_limit_hit(11.0)


# -- exit causes ---------------------------------------------------------------------------


def test_exit_cause_describe_and_constructors():
    assert ExitCause.exited(3).describe() == "exited with code 3"
    assert ExitCause.killed(9).describe() == "killed by SIGKILL (signal 9)"
    assert ExitCause.killed(99).describe() == "killed by signal 99"
    assert ExitCause.oom_killed().describe() == "OOM-killed"
    oom = ExitCause.oom_killed("memory.max of /corral/web")
    assert oom.describe() == "OOM-killed (memory.max of /corral/web)"
    assert (oom.kind, oom.signal, oom.oom_level) == ("oom", signal.SIGKILL,
                                                    "memory.max of /corral/web")
    assert ExitCause.from_returncode(-15) == ExitCause("signal", signal=15)
    assert ExitCause.from_returncode(2) == ExitCause("exit", code=2)
    assert not ExitCause.killed(15).is_success([0, 15])
    assert not oom.is_success()
    assert ExitCause.exited(0).is_success()


@pytest.mark.parametrize(("kind", "code", "sig"), [
    ("exit", None, None), ("exit", 256, None), ("exit", -1, None), ("signal", None, None),
    ("signal", None, 0),
])
def test_exit_cause_refuses_impossible_values(kind, code, sig):
    with pytest.raises(ValueError, match="needs"):
        ExitCause(kind, code=code, signal=sig)


# --- persistence across a daemon restart (issue 7) -----------------------------------------


def test_snapshot_and_restore_keep_retries_backoff_and_the_start_limit() -> None:
    spec = RestartSpec(policy="on-failure", max_retries=3, backoff_jitter=0.0,
                       start_limit_burst=3, start_limit_interval=10.0)
    before = RestartState(spec)
    t = 100.0
    for _ in range(2):
        before.on_start(t)
        t += 1
        assert isinstance(before.on_exit(t, ExitCause.exited(1)), RestartAfter)
    before.on_start(t)
    snap = before.snapshot(t + 0.5)  # saved half a second into the third run
    # A new daemon whose clock reads 5000 when the snapshot's moment was 2 s ago.
    after = RestartState.restore(spec, snap, 5000.0 - 2.0)
    assert after.restarts == before.restarts == 2
    assert after.started_at == pytest.approx(5000.0 - 2.5)
    # The third exit: one retry left by count, but the start limit (3 in 10 s) already
    # holds three starts, the earliest 2 + 2.5 s before now: fatal, as without the restart.
    assert isinstance(after.on_exit(5000.0, ExitCause.exited(1)), Fatal)
    same = RestartState(spec)
    for s in (100.0, 101.0, 102.0):
        same.on_start(s)
        if s < 102.0:
            same.on_exit(s + 1, ExitCause.exited(1))
    assert isinstance(same.on_exit(102.0 + 2.5, ExitCause.exited(1)), Fatal)


@pytest.mark.parametrize("bad", [None, [], {}, {"starts_ago": "x"},
                                 {"starts_ago": [], "running_for": None, "step": -1,
                                  "retries": 0, "stopped_by_user": False},
                                 {"starts_ago": [1.0], "running_for": "long", "step": 0,
                                  "retries": 0, "stopped_by_user": False},
                                 {"starts_ago": [], "running_for": None, "step": 0,
                                  "retries": 0, "stopped_by_user": "yes"}])
def test_restore_refuses_a_damaged_snapshot(bad: object) -> None:
    with pytest.raises(ValueError, match="not a restart state"):
        RestartState.restore(PLAIN, bad, 0.0)


def test_exit_cause_round_trips_and_unknown_is_a_failure() -> None:
    for cause in (ExitCause.exited(3), ExitCause.killed(9), ExitCause.oom_killed("x"),
                  ExitCause.unknown()):
        assert ExitCause.from_json(cause.to_json()) == cause
    assert not ExitCause.unknown().is_success()
    assert "status unknown" in ExitCause.unknown().describe()
    with pytest.raises(ValueError, match="not an exit cause"):
        ExitCause.from_json({"kind": "exit", "code": "3"})
