"""``monitoring.current_hour_completeness``: the hour in progress, minutes final out of minutes
elapsed, per configured pair (one transaction: ``now()`` stands still while the test runs)."""

from __future__ import annotations

from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest

from klined.jobs import bronze, silver
from klined.model import MINUTE_MS, Pair, from_datetime
from klined.warehouse.database import Database, sync_pairs
from tests.support.warehouse import candle, warehouse_dsn, wdb

__all__ = ["warehouse_dsn", "wdb"]

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

VIEW = "SELECT * FROM monitoring.current_hour_completeness ORDER BY exchange, symbol"


async def test_so_far_counts_final_minutes_out_of_the_elapsed_ones(wdb: Database) -> None:
    await sync_pairs(
        wdb,
        {
            "binance": [(Pair.parse("BTC/USD"), "BTCUSD"), (Pair.parse("ETH/USD"), "ETHUSD")],
            "kraken": [(Pair.parse("BTC/USD"), "BTC/USD")],
        },
    )
    await wdb.execute(
        "UPDATE ops.pairs SET listed = false WHERE exchange = 'kraken'"  # not expected
    )
    async with wdb.transaction() as conn:
        first = await conn.fetchrow(VIEW)
        assert first is not None
        hour, as_of = from_datetime(first["hour_start"]), from_datetime(first["as_of"])
        elapsed = first["minutes_elapsed"]
        assert as_of - hour == elapsed * MINUTE_MS and 0 <= elapsed < 60
        now = await conn.fetchval("SELECT now()")
        assert first["as_of"] <= now - timedelta(seconds=10) < first["as_of"] + timedelta(minutes=1)
        # BTC/USD: every elapsed minute but the last final, the last only partial; one minute
        # after as_of (not elapsed yet) is not counted
        rows = [candle(hour + i * MINUTE_MS, final=i != elapsed - 1) for i in range(elapsed + 1)]
        rows.append(candle(hour, symbol="ETH/USD", origin="rest"))
        await bronze.insert_candles(wdb, rows)
    await silver.merge_hour(wdb, hour)
    async with wdb.transaction() as conn:
        got = await conn.fetch(VIEW)
        if from_datetime(got[0]["hour_start"]) != hour:
            pytest.skip("the hour turned during the test")
    assert [(r["exchange"], r["symbol"]) for r in got] == [
        ("binance", "BTC/USD"), ("binance", "ETH/USD"),
    ]  # fmt: skip
    btc, eth = got
    elapsed = btc["minutes_elapsed"]
    if elapsed == 0:
        assert btc["completion_rate"] is None and btc["missing"] == 0
        return
    assert btc["ws_final"] + btc["ws_partial"] >= elapsed - 1
    assert btc["missing"] == elapsed - btc["ws_final"] - btc["ws_partial"]
    assert eth["rest"] == 1 and eth["missing"] == elapsed - 1
    # numeric's round() takes halves away from zero (1/32 = 0.03125 -> 0.0313), Python's to even
    rate = (Decimal(1) / elapsed).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)
    assert eth["completion_rate"] == rate
