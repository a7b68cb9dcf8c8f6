"""Rate is not concurrency: the token bucket spaces acquisitions by 1/rate."""

import anyio

from harvester.limits import RateLimiter


class FakeClock:
    """A clock that moves only when the limiter sleeps (anyio.sleep is patched)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_rate_limiter_spaces_acquisitions(monkeypatch) -> None:  # type: ignore[no-untyped-def]
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


async def test_zero_rate_means_no_limit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    called = []

    async def fake_sleep(seconds: float) -> None:
        called.append(seconds)

    monkeypatch.setattr(anyio, "sleep", fake_sleep)
    limiter = RateLimiter(rate=0)
    for _ in range(100):
        await limiter.acquire()
    assert called == []


def test_retry_policy_decisions() -> None:
    from harvester.errors import RepositoryError, TransientError, UsageError
    from harvester.limits import RetryPolicy

    p = RetryPolicy(attempts=4, base=0.5, cap=3.0, jitter=False)
    assert p.retryable(TransientError("503"))
    assert p.retryable(ConnectionResetError())
    assert not p.retryable(UsageError("422 no overlap"))
    assert not p.retryable(RepositoryError("corrupt"))
    assert [p.delay(a) for a in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert p.delay(1, TransientError("429", retry_after=7.5)) == 7.5
    jittery = RetryPolicy(base=1.0, jitter=True)
    assert all(0.5 <= jittery.delay(1) <= 1.0 for _ in range(100))
