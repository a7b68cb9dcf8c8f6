"""Rate is not concurrency; retries share one budget; isolate bisects to what fails."""

from __future__ import annotations

import errno
from collections import Counter

import anyio
import pytest

from harvester.errors import OutageError, RepositoryError, TransientError, UsageError
from harvester.limits import RateLimiter, RetryPolicy, isolate

Unit = tuple[int, ...]

#: Four attempts in all, no waiting: retries cost nothing but calls.
FAST = RetryPolicy(attempts=4, base=0.0, cap=0.0, total=60, jitter=False)
EIGHT: Unit = (0, 1, 2, 3, 4, 5, 6, 7)


class FakeClock:
    """A clock that moves only when the limiter sleeps (anyio.sleep is patched)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def halves(unit: Unit) -> list[Unit]:
    """The two halves of a unit; [] for a single item."""
    if len(unit) <= 1:
        return []
    mid = len(unit) // 2
    return [unit[:mid], unit[mid:]]


# ---- RateLimiter and RetryPolicy -------------------------------------------------------


async def test_rate_limiter_spaces_acquisitions(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(anyio, "sleep", fake_sleep)
    limiter = RateLimiter(rate=50.0, burst=5, clock=clock)
    for _ in range(25):
        await limiter.acquire()
    # The first 5 go at once (the burst); each of the other 20 waits 1/50 s.
    assert len(slept) == 20
    assert abs(sum(slept) - 20 / 50) < 1e-9
    assert abs(clock.now - 0.4) < 1e-9


async def test_zero_rate_means_no_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        called.append(seconds)

    monkeypatch.setattr(anyio, "sleep", fake_sleep)
    limiter = RateLimiter(rate=0)
    for _ in range(100):
        await limiter.acquire()
    assert called == []


def test_retry_policy_decisions() -> None:
    p = RetryPolicy(attempts=4, base=0.5, cap=3.0, jitter=False)
    assert p.retryable(TransientError("503"))
    # An OSError is retried only for an errno in TRANSIENT_ERRNOS: a bare reset is not
    # (the HTTP client turns resets into TransientError itself).
    assert not p.retryable(ConnectionResetError())
    assert p.retryable(OSError(errno.EAGAIN, "try again"))
    assert not p.retryable(UsageError("422 no overlap"))
    assert not p.retryable(RepositoryError("corrupt"))
    assert [p.delay(a) for a in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert p.delay(1, TransientError("429", retry_after=7.5)) == 7.5
    jittery = RetryPolicy(base=1.0, jitter=True)
    assert all(0.5 <= jittery.delay(1) <= 1.0 for _ in range(100))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TransientError("503"), True),
        (UsageError("404"), False),
        (OSError(errno.EMFILE, "x"), True),
        (OSError(errno.ENOENT, "x"), False),
        (OSError("Header missing END card"), False),
        (FileNotFoundError(errno.ENOENT, "gone"), False),
        (FileNotFoundError("gone"), False),
        (ValueError("x"), False),
    ],
    ids=["transient", "usage", "EMFILE", "ENOENT", "no-errno", "FileNotFound", "FNF-bare", "value"],
)
def test_retryable(exc: BaseException, expected: bool) -> None:
    assert RetryPolicy().retryable(exc) is expected


# ---- isolate ---------------------------------------------------------------------------


async def test_all_good_is_one_call() -> None:
    calls: list[Unit] = []

    async def call(unit: Unit) -> Unit:
        calls.append(unit)
        return unit

    out = await isolate(call, EIGHT, FAST, halves)
    assert calls == [EIGHT]
    assert out.results == [EIGHT]
    assert out.result_attempts == [1]
    assert out.attempts == 1
    assert out.failures == []


@pytest.mark.parametrize(
    "error",
    [
        UsageError("no overlap"),
        RepositoryError("corrupt"),
        OSError("corrupt"),
        OSError(errno.ENOENT, "missing"),
    ],
    ids=["usage", "repository", "oserror", "enoent"],
)
async def test_one_bad_item_is_bisected_out(error: Exception) -> None:
    bad = 5
    calls: list[Unit] = []

    async def call(unit: Unit) -> Unit:
        calls.append(unit)
        if bad in unit:
            raise error
        return unit

    out = await isolate(call, EIGHT, FAST, halves)
    # By hand: 8 -> (0-3 ok, 4-7) -> (4,5 | 6,7 ok) -> (4 ok | 5 fails): 7 calls, once each.
    assert Counter(calls) == Counter(
        [EIGHT, (0, 1, 2, 3), (4, 5, 6, 7), (4, 5), (6, 7), (4,), (5,)]
    )
    assert len(calls) == 7
    # Every good item in exactly one result.
    items = [i for unit in out.results for i in unit]
    assert sorted(items) == [0, 1, 2, 3, 4, 6, 7]
    assert len(items) == len(set(items))
    # Results' attempts count the tries of every unit they were split from.
    assert sorted(zip(out.results, out.result_attempts, strict=True)) == [
        ((0, 1, 2, 3), 2),
        ((4,), 4),
        ((6, 7), 3),
    ]
    # One failure, (5,), at depth 4 of the bisection: 1 + 3 tries.
    assert len(out.failures) == 1
    part, exc, attempts = out.failures[0]
    assert part == (bad,)
    assert exc is error
    assert attempts == 4
    assert out.attempts == 1  # the whole unit was tried once, then split


async def test_retryable_error_fails_the_unit_whole_after_the_policy_attempts() -> None:
    calls: list[Unit] = []

    async def call(unit: Unit) -> Unit:
        calls.append(unit)
        raise TransientError("503")

    out = await isolate(call, EIGHT, FAST, halves)
    assert calls == [EIGHT] * 4  # policy.attempts, never split
    assert out.results == []
    assert len(out.failures) == 1
    part, exc, attempts = out.failures[0]
    assert part == EIGHT and isinstance(exc, TransientError) and attempts == 4
    assert out.attempts == 4


@pytest.mark.parametrize(
    "error",
    [TransientError("reset"), OSError(errno.EIO, "I/O error")],
    ids=["transient", "EIO"],
)
async def test_transient_error_that_goes_away_is_retried(error: Exception) -> None:
    calls: list[Unit] = []

    async def call(unit: Unit) -> Unit:
        calls.append(unit)
        if len(calls) <= 2:
            raise error
        return unit

    out = await isolate(call, EIGHT, FAST, halves)
    assert calls == [EIGHT] * 3
    assert out.results == [EIGHT]
    assert out.result_attempts == [3]
    assert out.attempts == 3
    assert out.failures == []


async def test_retries_are_one_pool_shared_by_all_parts() -> None:
    calls: list[Unit] = []

    async def call(unit: Unit) -> Unit:
        calls.append(unit)
        if unit == EIGHT:
            raise UsageError("bad box")  # not retryable: split
        raise TransientError("503")  # every part, every time

    out = await isolate(call, EIGHT, FAST, halves)
    # By hand: 1 call of the whole, 1 first attempt of each half (2), then the pool of
    # policy.attempts - 1 = 3 retries shared by both halves: 1 + 2 + 3 = 6.
    # (Retries per part would make it 1 + 2 * 4 = 9.)
    assert len(calls) == 6
    assert calls[0] == EIGHT
    assert Counter(calls[1:]).keys() == {(0, 1, 2, 3), (4, 5, 6, 7)}
    # The halves fail whole (a transient error does not split further).
    assert sorted(part for part, _, _ in out.failures) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert all(isinstance(exc, TransientError) for _, exc, _ in out.failures)
    # Each failure's attempts: the whole's 1 plus its own tries; own tries sum to 2 + 3.
    assert sum(n - 1 for _, _, n in out.failures) == 5
    assert sum(n for _, _, n in out.failures) == 7
    assert out.results == []
    assert out.attempts == 1


async def test_no_retry_whose_wait_passes_the_deadline() -> None:
    policy = RetryPolicy(attempts=4, base=0.0, cap=0.0, total=0.05, jitter=False)
    calls: list[Unit] = []

    async def call(unit: Unit) -> Unit:
        calls.append(unit)
        raise TransientError("429", retry_after=1.0)

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(anyio, "sleep", sleep)
        out = await isolate(call, EIGHT, policy, halves)
    assert slept == []  # it did not wait the second the server asked for
    assert calls == [EIGHT]
    assert len(out.failures) == 1
    part, exc, attempts = out.failures[0]
    assert part == EIGHT and isinstance(exc, TransientError) and attempts == 1
    assert out.attempts == 1


async def test_a_wait_inside_the_deadline_is_retried() -> None:
    # The counterpart of the test above: a zero wait fits within total=0.05.
    policy = RetryPolicy(attempts=4, base=0.0, cap=0.0, total=0.05, jitter=False)
    calls: list[Unit] = []

    async def call(unit: Unit) -> Unit:
        calls.append(unit)
        if len(calls) == 1:
            raise TransientError("429", retry_after=0.0)
        return unit

    out = await isolate(call, EIGHT, policy, halves)
    assert calls == [EIGHT, EIGHT]
    assert out.results == [EIGHT] and out.failures == [] and out.attempts == 2


@pytest.mark.parametrize(
    "error",
    [OutageError("service down"), KeyError("bug"), ZeroDivisionError("bug")],
    ids=["outage", "KeyError", "ZeroDivisionError"],
)
async def test_outage_and_bugs_propagate(error: Exception) -> None:
    calls: list[Unit] = []

    async def call(unit: Unit) -> Unit:
        calls.append(unit)
        raise error

    with pytest.raises(type(error)) as caught:
        await isolate(call, EIGHT, FAST, halves)
    assert caught.value is error
    assert calls == [EIGHT]  # neither retried nor split


@pytest.mark.parametrize(
    "error",
    [OutageError("service down"), KeyError("bug")],
    ids=["outage", "KeyError"],
)
async def test_outage_and_bugs_propagate_from_a_part(error: Exception) -> None:
    # The run catches `except OutageError` around isolate: an outage met by a part
    # (after a split) must come out as itself, not wrapped in an exception group.
    async def call(unit: Unit) -> Unit:
        if unit == EIGHT:
            raise UsageError("bad box")
        if 5 in unit:
            raise error
        return unit

    with pytest.raises(type(error)):
        await isolate(call, EIGHT, FAST, halves)


async def test_halves_run_concurrently() -> None:
    pair: Unit = (1, 2)
    both = anyio.Event()
    in_flight = 0
    peak = 0

    async def call(unit: Unit) -> Unit:
        nonlocal in_flight, peak
        if unit == pair:
            raise UsageError("split me")
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == 2:
            both.set()
        await both.wait()  # a sequential isolate never gets here twice at once
        in_flight -= 1
        return unit

    with anyio.fail_after(5):
        out = await isolate(call, pair, FAST, halves)
    assert peak == 2
    assert sorted(out.results) == [(1,), (2,)]
    assert out.result_attempts == [2, 2]
    assert out.failures == []


async def test_quota_headers_vouch_for_a_window_and_a_probe_learns_it() -> None:
    """service.quota_burst: one request learns the window, then its room is spent at once."""
    from harvester.sources._client import _Quota

    clock = [1000.0]
    q = _Quota(per_minute=60.0)
    assert await q.wait(lambda: clock[0], burst=True) is False  # the probe: nothing known
    got: list[bool] = []

    async def second() -> None:
        got.append(await q.wait(lambda: clock[0], burst=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.05)
        assert got == []  # waits for the probe's answer instead of going out blind
        headers = {
            "X-RateLimit-Remaining": "3",
            "X-RateLimit-Reset": "1060",
            "X-RateLimit-Limit": "4",
            "X-RateLimit-Used": "1",
        }
        q.done(headers, clock[0])
    assert got == [True]
    assert [await q.wait(lambda: clock[0], burst=True) for _ in range(2)] == [True, True]
    with anyio.move_on_after(0.1) as scope:  # the window is spent: the next one waits
        await q.wait(lambda: clock[0], burst=True)
    assert scope.cancelled_caught
    assert q.inflight == 3


async def test_quota_without_headers_falls_back_to_pacing() -> None:
    """A server that sends no X-RateLimit headers: requests go to the even pacing, all
    at once, after the first answer says so (never one at a time)."""
    from harvester.sources._client import _Quota

    q = _Quota(per_minute=60.0)
    assert await q.wait(lambda: 0.0, burst=True) is False
    q.done({"Content-Type": "text/plain"}, 0.0)
    assert q.headed is False
    assert [await q.wait(lambda: 0.0, burst=True) for _ in range(5)] == [False] * 5
    # Without burst nothing waits for a probe; without a quota neither.
    assert await _Quota(per_minute=60.0).wait(lambda: 0.0) is False
    free = _Quota()
    assert [await free.wait(lambda: 0.0, burst=True) for _ in range(3)] == [False] * 3
