"""The per-host circuit breaker, on a clock the test moves."""

from __future__ import annotations

import anyio
import pytest

from harvester.errors import OutageError
from harvester.limits import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_closed_breaker_admits_everything_and_an_answer_ends_a_streak() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, seconds=10.0, clock=clock)
    for _ in range(2):
        await b.admit("h")
        b.failed("h", "reset")
    assert not b.is_open("h")
    await b.admit("h")
    b.answered("h")
    for _ in range(2):
        await b.admit("h")
        b.failed("h", "reset")
    assert not b.is_open("h") and b.held == 0  # the streak started over at 0


async def test_open_breaker_holds_requests_behind_one_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=2, seconds=10.0, probe_interval=0.01, clock=clock)
    for _ in range(2):
        b.failed("h", "reset")
    assert b.is_open("h")
    clock.now += 0.02  # past the probe interval
    with anyio.fail_after(5):
        await b.admit("h")  # the probe
    admitted: list[int] = []

    async def other(k: int) -> None:
        await b.admit("h")
        admitted.append(k)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for k in range(3):
                tg.start_soon(other, k)
            await anyio.sleep(0.05)
            assert admitted == [] and b.held == 3  # all wait while the probe is out
            b.answered("h")  # the probe got an answer: the breaker closes
    assert sorted(admitted) == [0, 1, 2]
    assert not b.is_open("h")
    await b.admit("other")


async def test_a_long_streak_is_an_outage() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=2, seconds=10.0, probe_interval=0.0, clock=clock)
    b.failed("h", "reset")
    b.failed("h", "reset")
    clock.now += 9.0
    await b.admit("h")
    b.failed("h", "refused")  # 3 in a row, but over 9 s: not yet
    assert b.down() == {}
    clock.now += 1.5
    await b.admit("h")
    b.failed("h", "refused")
    assert "h is down: 4 requests in a row" in b.down()["h"] and "refused" in b.down()["h"]
    with pytest.raises(OutageError, match="h is down"):
        await b.admit("h")
    with pytest.raises(OutageError):
        b.check("h")
    await b.admit("other")  # per host


async def test_failures_zero_turns_it_off() -> None:
    b = CircuitBreaker(failures=0, seconds=0.0)
    for _ in range(100):
        await b.admit("h")
        b.failed("h", "reset")
    assert not b.is_open("h") and b.down() == {}


async def test_a_cancelled_probe_releases_its_turn() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, seconds=10.0, probe_interval=0.0, clock=clock)
    b.failed("h", "reset")
    await b.admit("h")  # the probe...
    b.release("h")  # ... was cancelled before it got an outcome
    with anyio.fail_after(5):
        await b.admit("h")  # the next one may probe
