"""The Spark job's notional / vwap arithmetic (klined.spark.notional) against the warehouse.

Random minutes go through the warehouse's own chain (bronze, silver, gold refresh); every gold
bucket's notional and vwap must be the pure function's to the last digit. Needs no Spark.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from decimal import Decimal
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klined.jobs import bronze, gold, silver
from klined.model import HOUR_MS, MINUTE_MS, from_datetime, to_datetime
from klined.spark import notional
from klined.warehouse.database import open_database
from tests.support.warehouse import H0, candle, config_for, truncate_all, warehouse_dsn

__all__ = ["warehouse_dsn"]


def _text(coefficient: int, scale: int) -> str:
    """``coefficient * 10**-scale`` as plain decimal text (trailing zeros kept, as a lake may)."""
    digits = str(coefficient).rjust(scale + 1, "0")
    return digits if scale == 0 else f"{digits[:-scale]}.{digits[-scale:]}"


def decimals(max_digits: int, max_scale: int, *, zero: bool = True) -> st.SearchStrategy[str]:
    return st.builds(
        _text, st.integers(0 if zero else 1, 10**max_digits - 1), st.integers(0, max_scale)
    )


def below(limit: int, text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Values under ``limit``: a bucket's notional (up to 60 of vwap * volume) must fit the
    warehouse's numeric(38, 18), under 10**20, as any real market's does by far."""
    return text.filter(lambda t: Decimal(t) < limit)


#: one minute: (volume, quote_volume, vwap), as Binance (quote volume), Kraken (a vwap of up to
#: 28 significant digits), a minute without either, or one without volume
minute = st.tuples(
    st.one_of(st.just("0"), below(10**9, decimals(12, 20, zero=False))),
    st.one_of(st.none(), decimals(16, 18)),
    st.one_of(st.none(), below(10**9, decimals(28, 32, zero=False))),
)
#: minute index within the hour -> minute
hour_of_minutes = st.dictionaries(st.integers(0, 59), minute, min_size=1, max_size=40)


def _candles(minutes: dict[int, notional.Minute]) -> list[Any]:
    return [
        candle(
            H0 + i * MINUTE_MS,
            exchange="kraken",
            symbol="ETH/USD",
            price="1",
            volume=v,
            quote_volume=q,
            vwap=w,
            trade_count=0 if v == "0" else 1,
        )
        for i, (v, q, w) in minutes.items()
    ]


async def _check(dsn: str, minutes: dict[int, notional.Minute]) -> None:
    async with open_database(config_for(dsn)) as db:
        await truncate_all(db)
        await bronze.insert_candles(db, _candles(minutes))
        await silver.merge_hour(db, H0)
        await gold.refresh(db, H0)
        for name, seconds in gold.ALL_INTERVALS:
            rows = await db.fetch(
                f"SELECT interval_start, notional, notional::numeric(38, 18) AS rounded, vwap"
                f" FROM gold.ohlcv_{name} WHERE interval_end > $1 AND interval_start < $2",
                to_datetime(H0),
                to_datetime(H0 + HOUR_MS),
            )
            assert rows, name
            for r in rows:
                start = from_datetime(r["interval_start"])
                inside = [
                    m
                    for i, m in minutes.items()
                    if start <= H0 + i * MINUTE_MS < start + seconds * 1000
                ]
                exact, volume = notional.notional_and_volume(inside)
                assert exact == r["notional"], (name, start, inside)
                assert notional.vwap(exact, volume) == r["vwap"], (name, start, inside)
                assert notional.gold_notional_vwap(inside) == (r["rounded"], r["vwap"])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(hour_of_minutes)
@pytest.mark.integration
def test_notional_and_vwap_are_the_warehouses(
    warehouse_dsn: str, minutes: dict[int, notional.Minute]
) -> None:
    anyio.run(_check, warehouse_dsn, minutes)


@pytest.mark.integration
def test_by_hand_against_ops_vwap(warehouse_dsn: str) -> None:
    """Ties at the 19th decimal round half up; a vwap never has more than 18 decimals."""
    cases = [("1", "3"), ("2", "3"), ("0.000000000000000001", "2"), ("5", "0.0000000000000000004")]

    async def run() -> None:
        async with open_database(config_for(warehouse_dsn)) as db:
            for n, v in cases:
                want = await db.fetchval("SELECT ops.vwap($1::numeric, $2::numeric)", n, v)
                assert notional.vwap(Decimal(n), Decimal(v)) == want, (n, v)

    anyio.run(run)
    assert notional.vwap(Decimal(1), Decimal(0)) is None
    assert notional.vwap(None, Decimal(1)) is None


def test_the_udf_needs_no_klined_on_the_executors() -> None:
    """The job's UDF, pickled as PySpark ships it, runs where klined cannot be imported."""
    pytest.importorskip("pyspark", reason="the spark extra is not installed")
    from pyspark import cloudpickle

    from klined.spark import rules  # registers the module for pickling by value

    fn = rules._NOTIONAL_VWAP.func
    data = cloudpickle.dumps(fn)
    script = (
        "import pickle, sys\n"
        "sys.modules['klined'] = None  # importing klined now fails\n"
        "fn = pickle.loads(sys.stdin.buffer.read())\n"
        "print(fn([('2', None, '3.5'), ('1', '4', None)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", script], input=data, capture_output=True, check=True, env=env
    )
    assert out.stdout.decode().strip() == str(
        (Decimal("11.000000000000000000"), Decimal("3.666666666666666667"))
    )
    assert pickle.loads(data)([("2", None, "3.5"), ("1", "4", None)]) == fn(
        [("2", None, "3.5"), ("1", "4", None)]
    )
