"""The live path's pure parts: the bounded batch queue, the lag window, batch cutting."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from klined.config import LiveConfig
from klined.live.batches import Batch, BatchQueue, compact
from klined.live.lag import LagWindow, percentile
from klined.live.writer import LiveWriter, live_sink
from klined.model import MINUTE_MS, Candle, CandleRecord
from tests.support.warehouse import H0, candle


def batch(n: int, tag: int = 0) -> Batch:
    return Batch([compact(candle(H0 + i * MINUTE_MS)) for i in range(n)], lake_mark=tag)


def test_queue_drops_the_oldest_batches_and_counts_them() -> None:
    q = BatchQueue(max_batches=3)
    for i in range(3):
        assert q.put(batch(2, i)).batches == 0
    dropped = q.put(batch(5, 3))
    assert (dropped.batches, dropped.candles) == (1, 2)
    assert [b.lake_mark for b in q._items] == [1, 2, 3]
    assert len(q) == 3 and q.candles == 9


def test_take_coalesces_up_to_the_limit_and_put_back_keeps_the_order() -> None:
    q = BatchQueue(max_batches=10)
    for i, n in enumerate([3, 3, 3, 8]):
        q.put(batch(n, i))
    taken = q.take(max_candles=7)
    assert [b.lake_mark for b in taken] == [0, 1]
    assert [b.lake_mark for b in q.take(max_candles=1)] == [2]  # at least one, even if larger
    q.put_back(taken)
    assert [b.lake_mark for b in q._items] == [0, 1, 3]
    # putting back past the bound drops the oldest: the ones that failed first
    small = BatchQueue(max_batches=2)
    small.put(batch(1, 9))
    assert small.put_back([batch(1, 7), batch(1, 8)]).batches == 1
    assert [b.lake_mark for b in small._items] == [8, 9]


def test_compact_keeps_every_value_silver_needs_but_not_the_frame() -> None:
    c = candle(H0, origin="ws", final=True, quote_volume="12.5")
    r = compact(c)
    assert type(r) is CandleRecord
    for name in (
        "exchange", "symbol", "interval_start", "open", "high", "low", "close", "volume",
        "quote_volume", "vwap", "trade_count", "is_final", "origin", "session_id", "event_ts",
        "ingestion_ts", "interval_seconds",
    ):  # fmt: skip
        assert getattr(r, name) == getattr(c, name), name


@given(st.lists(st.integers(-1000, 10**7), min_size=1, max_size=300))
def test_percentiles_are_nearest_rank(lags: list[int]) -> None:
    window = LagWindow(60.0, clock=lambda: 0.0)
    window.add(lags)
    s = window.summary()
    clamped = sorted(max(0, x) for x in lags)
    assert s.samples == len(lags)
    assert s.p50_s == percentile(clamped, 0.5) / 1000
    assert s.p99_s == percentile(clamped, 0.99) / 1000
    assert s.max_s == clamped[-1] / 1000
    assert s.p50_s is not None and s.p99_s is not None and s.p50_s <= s.p99_s <= s.max_s
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile([1, 2, 3, 4], 0.99) == 4


def test_lag_window_forgets_old_commits() -> None:
    now = [0.0]
    window = LagWindow(10.0, clock=lambda: now[0])
    window.add([5000, 6000])
    now[0] = 5.0
    window.add([100])
    assert window.summary().samples == 3
    now[0] = 12.0
    s = window.summary()
    assert (s.samples, s.max_s) == (1, 0.1)
    now[0] = 30.0
    assert window.summary().samples == 0 and window.summary().p99_s is None


def test_the_sink_writes_the_lake_first_and_offers_finals_only() -> None:
    seen: list[tuple[str, int]] = []
    sink = live_sink(lambda c: seen.append(("lake", c.interval_start)),
                     lambda c: seen.append(("live", c.interval_start)))  # fmt: skip
    sink(candle(H0, final=False))
    sink(candle(H0 + MINUTE_MS, final=True))
    assert seen == [("lake", H0), ("lake", H0 + MINUTE_MS), ("live", H0 + MINUTE_MS)]


@pytest.mark.anyio
async def test_a_burst_is_cut_once_quiet_and_never_later_than_the_flush_interval() -> None:
    marks = iter(range(1, 1000))
    live = LiveWriter(LiveConfig(flush_interval_s=0.5), lake_mark=lambda: next(marks))
    async with anyio.create_task_group() as tg:
        await tg.start(live.run_batcher)
        for i in range(20):  # a burst: one batch
            live.offer(candle(H0 + i * MINUTE_MS))
        await anyio.sleep(0.3)
        assert [len(b) for b in live.queue._items] == [20]
        # a steady trickle (never quiet for long): cut by the flush interval
        for i in range(30):
            live.offer(candle(H0 + i * MINUTE_MS, symbol="ETH/USD"))
            await anyio.sleep(0.03)
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    sizes = [len(b) for b in live.queue._items]
    assert sizes[0] == 20 and sum(sizes) == 50 and len(sizes) >= 3
    assert live.status.finals == 50 and live.status.queued_finals == 50


def test_an_invalid_final_is_refused_and_counted() -> None:
    live = LiveWriter(LiveConfig())
    good = candle(H0)
    bad = Candle(**{**{f: getattr(good, f) for f in good.__struct_fields__}, "close": "NaN"})
    live.offer(good)
    live.offer(bad)
    b = live.cut()
    assert b is not None and len(b) == 1
    assert live.status.rejected == 1 and live.status.finals == 2


@pytest.mark.anyio
async def test_an_idle_committer_gets_a_batch_without_waiting_for_the_burst_to_end() -> None:
    live = LiveWriter(LiveConfig(flush_interval_s=5.0))
    live._idle = True  # what the committer sets while it waits for work
    async with anyio.create_task_group() as tg:
        await tg.start(live.run_batcher)
        for i in range(40):  # a burst that never goes quiet for 50 ms
            live.offer(candle(H0 + i * MINUTE_MS))
            await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    sizes = [len(b) for b in live.queue._items]
    assert sum(sizes) == 40 and len(sizes) >= 3  # cut every QUIET_S, not after 5 s
