"""A fetcher's write of rows is all or nothing under cancellation: a Ctrl-C that lands just
after the rows commit must not make the final flush write them a second time (bronze then
held duplicate REST rows after an interrupted backfill)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from klined.exchanges import get_adapter
from klined.jobs.fetcher import PairFetcher
from klined.model import MINUTE_MS, Candle, Origin, Pair

pytestmark = pytest.mark.anyio

MINUTE0 = 1_790_000_040_000 - 1_790_000_040_000 % MINUTE_MS
PAIR = Pair("BTC", "USD")


class CommitThenSlowSink:
    """Rows "commit" at once; the call then lingers (as a write's bookkeeping does)."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.committed = anyio.Event()

    async def rows(self, candles: list[Candle]) -> None:
        self.written.extend(c.interval_start for c in candles)
        self.committed.set()
        await anyio.sleep(0.2)

    async def attempt(self, *args: Any) -> None:
        return None

    async def progress(self, through_ms: int) -> None:
        return None


def candle(minute: int) -> Candle:
    return Candle(
        exchange="binance", symbol="BTC/USD", native_symbol="BTCUSD", interval_start=minute,
        open="1", high="1", low="1", close="1", volume="0", trade_count=1, is_final=True,
        origin=Origin.REST, event_ts=minute + MINUTE_MS, ingestion_ts=minute + MINUTE_MS,
    )  # fmt: skip


def fetcher(sink: CommitThenSlowSink) -> PairFetcher:
    client: Any = SimpleNamespace(
        adapter=get_adapter("binance", {}), exchange="binance", clock_ms=lambda: 0
    )

    async def no_close(minute: int) -> str | None:
        return None

    return PairFetcher(client, PAIR, sink, prev_close=no_close)


async def test_cancel_after_commit_writes_each_row_once() -> None:
    sink = CommitThenSlowSink()
    f = fetcher(sink)
    minutes = [MINUTE0 + i * MINUTE_MS for i in range(3)]
    f._wanted = set()
    f._buffer = [candle(m) for m in minutes]

    async with anyio.create_task_group() as tg:

        async def interrupt() -> None:
            await sink.committed.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(interrupt)
        await f._flush()
    # what run()'s shielded final flush does after the cancellation
    await f._flush()
    assert sink.written == minutes
