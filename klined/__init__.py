"""klined: trustworthy 1-minute OHLCV capture into a lake and a PostgreSQL warehouse.

For research, :func:`read_candles` returns candles as a ``pyarrow.Table``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow

__version__ = "0.1.0"


def read_candles(
    start: str | datetime | int,
    end: str | datetime | int,
    *,
    exchange: str | Sequence[str] | None = None,
    pair: str | Sequence[str] | None = None,
    interval: str = "1m",
    source: str | os.PathLike[str] | None = None,
) -> pyarrow.Table:
    """Candles whose ``interval_start`` is in ``[start, end)``, as a ``pyarrow.Table``.

    ``start``/``end``: a date or ISO time (UTC unless it says otherwise), an aware
    ``datetime``, or milliseconds since the epoch. ``exchange``/``pair``: one name or a list
    (default: all); pairs are canonical, ``"BTC/USD"``. ``interval``: ``1m`` (silver) or
    ``5m``, ``15m``, ``30m``, ``1h``, ``4h``, ``1d`` (gold). ``source``: a PostgreSQL DSN
    (default: ``KLINED_DSN``), a folder of published datasets or a Parquet export, or an
    ``s3://`` prefix of either.

    Columns: ``exchange``, ``symbol``, ``interval_start``, ``interval_end``, ``open``,
    ``high``, ``low``, ``close``, ``volume``, ``quote_volume``, ``vwap``, ``trade_count``, then
    ``source`` (1m) or ``minutes`` and ``traded_minutes`` (gold), and ``updated_at``. Prices
    and volumes are exact ``decimal128(38, 18)``; times are UTC. Sorted by exchange, symbol,
    time. Examples::

        import klined, polars as pl
        t = klined.read_candles("2026-11-01", "2026-11-02", pair="BTC/USD",
                                source="postgresql://reader@db/klined")
        df = t.to_pandas()                   # Decimal objects, exact
        lf = pl.from_arrow(t)                # Decimal(38, 18) columns
        d1 = klined.read_candles("2026-10-01", "2026-11-01", interval="1d",
                                 exchange="kraken", source="/var/lib/klined/lake")
    """
    from klined.datasets.read import read_candles as read

    return read(start, end, exchange=exchange, pair=pair, interval=interval, source=source)
