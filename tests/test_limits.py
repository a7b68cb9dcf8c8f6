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
