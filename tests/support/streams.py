"""Shared checks for the stream/daemon integration tests: the lake against the simulator's log.

Every candle event the simulator sent is keyed by what the payload itself carries (exchange,
pair, minute, OHLCV, trade count, the exchange's event time, Binance's final flag); the lake's
captured lines are keyed the same way and the two multisets must be equal: nothing lost,
nothing stored twice (a duplicate the simulator sent on purpose is in both twice). Kraken lines
the runtime added as proven finals are checked separately against the finality rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from klined.lake import iter_local_parts, read_part_file
from klined.model import CandleRecord
from klined.sim import SentEvent, Simulator

Key = tuple[str, str, int, str, str, str, str, str, int, int, bool]


def sent_key(e: SentEvent) -> Key:
    return (
        e.exchange, e.pair, e.minute, e.open, e.high, e.low, e.close, e.volume, e.trades,
        e.event_ms, e.is_final,
    )  # fmt: skip


def lake_key(r: CandleRecord) -> Key:
    return (
        r.exchange, r.symbol, r.interval_start, r.open, r.high, r.low, r.close, r.volume,
        r.trade_count or 0, r.event_ts, r.is_final,
    )  # fmt: skip


def is_derived_final(r: CandleRecord) -> bool:
    """A Kraken final the runtime emitted on evidence (Kraken payloads carry no final flag)."""
    return r.exchange == "kraken" and r.is_final


def lake_records(root: Path, *, include_open: bool = False) -> list[CandleRecord]:
    records: list[CandleRecord] = []
    for part in iter_local_parts(root, closed_only=not include_open):
        contents = read_part_file(part.path)
        assert contents.bad_lines == 0, f"{part.key}: {contents.bad_line_numbers}"
        records.extend(contents.records)
    return records


def assert_exactly_once(
    sent: Iterable[SentEvent], records: Iterable[CandleRecord], exchanges: set[str]
) -> int:
    """Every sent event of ``exchanges`` is in the lake exactly once; returns how many."""
    want = Counter(sent_key(e) for e in sent if e.exchange in exchanges)
    got = Counter(
        lake_key(r) for r in records if r.exchange in exchanges and not is_derived_final(r)
    )
    missing = want - got
    extra = got - want
    assert not missing, f"{sum(missing.values())} sent events not in the lake: {list(missing)[:3]}"
    assert not extra, f"{sum(extra.values())} lake lines never sent: {list(extra)[:3]}"
    return sum(want.values())


def assert_kraken_finality(sim: Simulator, records: list[CandleRecord]) -> int:
    """Each Kraken final is the last update its session captured for that minute, proven by
    evidence stamped at or after the minute's end, equal to the market's truth, and at most one
    per session and minute. Returns how many finals there are."""
    kraken = [r for r in records if r.exchange == "kraken"]
    # parts of one pair and hour are read in the order they were written, so a final's
    # position tells which updates its session had captured before it
    last_update: dict[tuple[str | None, str, int], CandleRecord] = {}
    seen: set[tuple[str | None, str, int]] = set()
    finals = 0
    for f in kraken:
        key = (f.session_id, f.symbol, f.interval_start)
        if not f.is_final:
            if key not in seen:
                last_update[key] = f
            continue
        finals += 1
        assert key not in seen, f"two finals for {key}"
        seen.add(key)
        last = last_update.get(key)
        assert last is not None, f"final without a captured update in its session: {key}"
        values = (f.open, f.high, f.low, f.close, f.volume, f.trade_count)
        assert values == (last.open, last.high, last.low, last.close, last.volume, last.trade_count)
        assert f.event_ts >= f.interval_start + 60_000, f"final without evidence: {key}"
        truth = sim.market.truth("kraken", f.symbol, f.interval_start)
        assert (f.open, f.high, f.low, f.close, f.volume) == (
            truth.open, truth.high, truth.low, truth.close, truth.volume,
        ), f"final is not the whole minute: {key}"  # fmt: skip
    return finals


async def until(pred: Callable[[], bool], limit_s: float = 20.0) -> None:
    """Wait for a condition on the test's data (bounded: a bug fails instead of hanging)."""
    with anyio.fail_after(limit_s):
        while not pred():  # noqa: ASYNC110 - the condition is on plain data, not an event
            await anyio.sleep(0.02)


@asynccontextmanager
async def rest_client(adapter: Any, rest_url: str) -> AsyncIterator[Any]:
    """A REST client for ``adapter`` (the listing check), with its own limiter."""
    from klined.rest.client import RestClient, RetryPolicy
    from klined.rest.ratelimit import RateLimiter

    limiter = RateLimiter.for_limits(adapter.name, adapter.limits.rest_budget, 1.0)
    async with httpx.AsyncClient(timeout=5.0) as http:
        yield RestClient(
            adapter, rest_url, limiter, http, timeout_s=5.0, retry=RetryPolicy(attempts=2)
        )
