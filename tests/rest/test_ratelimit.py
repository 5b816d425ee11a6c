"""The limiter's pure maths never exceeds a budget, whatever the timing; the async face pauses
the whole exchange on a 429 and believes the server's weight header."""

from __future__ import annotations

import heapq
import random
from collections import defaultdict

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klined.exchanges.base import RestBudget
from klined.rest.ratelimit import (
    DecayBudget,
    RateLimiter,
    WindowBudget,
    backoff_delay,
    make_budget,
    shared_limiter,
)

requests_st = st.lists(
    st.tuples(
        st.floats(0, 3, allow_nan=False),  # gap before the request arrives
        st.integers(1, 10),  # cost
        st.floats(0, 2.5, allow_nan=False),  # latency
        st.floats(0, 1, allow_nan=False),  # where in the latency the server counts it
    ),
    min_size=1,
    max_size=150,
)


@settings(max_examples=300, deadline=None)
@given(
    reqs=requests_st,
    capacity=st.integers(10, 60),
    window=st.sampled_from([1.0, 2.5, 6.0, 60.0]),
    start=st.floats(0, 1000, allow_nan=False),
)
def test_window_budget_never_exceeded_in_any_server_window(
    reqs: list[tuple[float, int, float, float]], capacity: int, window: float, start: float
) -> None:
    """Requests are granted FIFO; the server counts each one at some moment between grant and
    answer, in the fixed window of that moment. No window ever holds more than the budget."""
    b = WindowBudget(capacity, window)
    server: dict[int, float] = defaultdict(float)
    pending: list[tuple[float, int, int, float, float]] = []  # (done_at, seq, ticket, cost, p)
    t = start
    arrival = start
    for seq, (gap, cost, latency, frac) in enumerate(reqs):
        arrival += gap
        t = max(t, arrival)
        while True:
            while pending and pending[0][0] <= t:
                done_at, _, ticket, c, processed = heapq.heappop(pending)
                header = server[int(processed // window)]
                b.done(ticket, c, header, done_at)
            wait = b.reserve(cost, t)
            if wait <= 0:
                break
            assert wait < window + 1e-6
            t += wait
        processed = t + latency * frac
        server[int(processed // window)] += cost
        heapq.heappush(pending, (t + latency, seq, b.ticket(), cost, processed))
    for k, total in server.items():
        assert total <= capacity + 1e-9, f"window {k}: {total} > {capacity}"


@settings(max_examples=300, deadline=None)
@given(
    reqs=requests_st,
    capacity=st.integers(5, 30),
    decay=st.floats(0.2, 5, allow_nan=False),
)
def test_decay_budget_never_exceeds_the_counter(
    reqs: list[tuple[float, int, float, float]], capacity: int, decay: float
) -> None:
    """Kraken's server counter (same capacity and decay) never goes over capacity."""
    b = DecayBudget(capacity, decay)
    level, at, t, arrival = 0.0, 0.0, 0.0, 0.0
    for gap, cost, _, _ in reqs:
        cost = min(cost, capacity)
        arrival += gap
        t = max(t, arrival)
        while (wait := b.reserve(cost, t)) > 0:
            t += wait
        level = max(0.0, level - (t - at) * decay) + cost
        at = t
        assert level <= capacity + 1e-6


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 400), capacity=st.integers(10, 100), cost=st.integers(1, 10))
def test_window_budget_uses_the_whole_budget(n: int, capacity: int, cost: int) -> None:
    """Back-to-back requests get exactly floor(capacity / cost) per window: no waste."""
    b = WindowBudget(capacity, 10.0)
    t = 0.0
    grants: dict[int, int] = defaultdict(int)
    for _ in range(n):
        while (wait := b.reserve(cost, t)) > 0:
            t += wait
        grants[int(t // 10)] += 1
        b.done(b.ticket(), cost, None, t)
    full = [k for k in grants if k < max(grants)]
    assert all(grants[k] == capacity // cost for k in full)


def test_server_header_is_believed_only_when_higher() -> None:
    b = WindowBudget(100, 60)
    assert b.reserve(10, 0.0) == 0
    b.done(b.ticket(), 10, 95, 1.0)  # someone else used weight on our IP
    assert b.used == 95
    assert b.reserve(10, 2.0) == pytest.approx(58.0)
    b.done(b.ticket(), 10, 3, 2.0)  # lower than we think: ignored
    assert b.used == 95


def test_a_header_from_the_previous_window_is_ignored() -> None:
    b = WindowBudget(100, 60)
    assert b.reserve(10, 59.9) == 0
    ticket = b.ticket()
    b.done(ticket, 10, 100, 60.1)  # answered after the roll: cannot tell which window it means
    assert b.used == 10  # carried once (the server may have counted it now), not 100


def test_dearer_than_the_budget_goes_into_an_empty_window() -> None:
    b = WindowBudget(5, 1)
    assert b.reserve(8, 0.0) == 0
    assert b.reserve(1, 0.5) == pytest.approx(0.5)


def test_make_budget_takes_the_configured_share() -> None:
    w = make_budget(RestBudget("weight", 1200, 60), 0.8)
    assert isinstance(w, WindowBudget) and w.capacity == pytest.approx(960)
    d = make_budget(RestBudget("decay", 15, decay_per_s=0.33), 0.5)
    assert isinstance(d, DecayBudget)
    assert (d.capacity, d.decay_per_s) == pytest.approx((7.5, 0.165))
    with pytest.raises(ValueError):
        make_budget(RestBudget("weight", 1, 1), 0)


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, 0.5, 8.0, rng) for n in range(12)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert all(d >= 4.0 for d in delays[5:])  # capped at 8, at least half of it
    assert len({round(d, 6) for d in delays}) == len(delays)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s
        await anyio.lowlevel.checkpoint()


@pytest.mark.anyio
async def test_limiter_pauses_the_whole_exchange_on_429() -> None:
    clock = FakeClock()
    lim = RateLimiter("binance", WindowBudget(100, 60), clock=clock, sleep=clock.sleep)
    async with lim.slot(1):
        pass
    lim.throttle(7.0, why="test")
    before = clock.now
    async with lim.slot(1):
        pass  # waits the Retry-After
    assert clock.now >= before + 7.0
    assert lim.stats.throttled == 1 and lim.stats.banned == 0
    lim.throttle(None, banned=True)
    assert lim.stats.banned == 1 and lim.paused_until > clock.now


@pytest.mark.anyio
async def test_limiter_is_fifo_and_within_budget_under_concurrency() -> None:
    clock = FakeClock()
    lim = RateLimiter("kraken", DecayBudget(4, 1.0), clock=clock, sleep=clock.sleep)
    order: list[int] = []

    async def worker(i: int) -> None:
        async with lim.slot(1):
            order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(worker, i)
            await anyio.lowlevel.checkpoint()
    assert order == list(range(12))
    assert lim.stats.requests == 12 and lim.stats.cost == 12
    # 4 at once, then one per second
    assert clock.now - 1000.0 == pytest.approx(8.0, abs=1e-3)


def test_shared_limiter_is_one_per_exchange_endpoint() -> None:
    budget = RestBudget("weight", 1200, 60)
    a = shared_limiter("binance", "http://x.test", budget, 0.8)
    assert shared_limiter("binance", "http://x.test", budget, 0.8) is a
    assert shared_limiter("binance", "http://y.test", budget, 0.8) is not a
