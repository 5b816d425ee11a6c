"""Announcing committed candles: PostgreSQL ``NOTIFY`` on the channel ``klined_candles``.

Every writer of silver and gold (the live writer, the hourly merge, a backfill's merge, the gold
refresh) announces the rows it changed inside the transaction that changes them, so a listener
hears of a candle exactly when it is committed (PostgreSQL delivers a notification at commit
and drops it on rollback). Any application can subscribe the way ``klined tail`` does:
``LISTEN klined_candles``.

Payload: a JSON array of candle objects, at most ~7 KB (PostgreSQL refuses a payload of 8000
bytes or more), rows ordered by exchange, symbol and start. Each object::

    {"interval": "1m", "exchange": "binance", "symbol": "BTC/USD",
     "start": "2026-01-01T00:59:00Z", "open": "87000.1", "high": ..., "low": ..., "close": ...,
     "volume": "1.25", "quote_volume": "108750.1" | null, "trade_count": 12 | null,
     "source": "ws_final"}

Prices and volumes are decimal strings, exactly as stored. Silver rows (``"interval": "1m"``)
carry their ``source`` (``ws_final``, ``rest``...) and ``vwap``; gold rows (``5m``, ``15m``,
``30m``, ``1h``) carry ``"source": "derived"``, ``minutes`` and ``traded_minutes``. A row
whose JSON would exceed ``ROW_MAX_BYTES`` (only absurdly long numbers could) is announced by
its keys with ``"fetch": true``: read it from ``silver.fact_ohlcv`` or ``gold.ohlcv_<interval>``.
Delivery is PostgreSQL's: at most once per listening session, nothing for a session that was
not connected; a writer that retries a commit whose outcome it never learned may announce a
row again (same values).
"""

from __future__ import annotations

import msgspec

CHANNEL = "klined_candles"
#: a payload holds rows while their JSON adds up to less than this (plus one row)
CHUNK_BYTES = 6000
#: a row longer than this is announced by its keys only (payload < 8000 bytes, always)
ROW_MAX_BYTES = 1000

_START = "to_char(r.interval_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"


def notify_sql(rows: str, interval: str, *, gold: bool = False) -> str:
    """A ``SELECT`` that announces every row of the CTE ``rows`` (one ``pg_notify`` per chunk).

    ``rows`` must have exchange, symbol, interval_start, open, high, low, close, volume,
    quote_volume, trade_count and, for silver, vwap and source; for gold, minutes and
    traded_minutes. ``interval`` is the label (``1m``, ``5m``...), a fixed string.
    """
    if interval not in ("1m", "5m", "15m", "30m", "1h"):
        raise ValueError(f"unknown interval label {interval!r}")
    keys = (
        f"'interval', '{interval}', 'exchange', r.exchange, 'symbol', r.symbol, 'start', {_START}"
    )
    values = (
        "'open', r.open::text, 'high', r.high::text, 'low', r.low::text,"
        " 'close', r.close::text, 'volume', r.volume::text,"
        " 'quote_volume', r.quote_volume::text, 'trade_count', r.trade_count"
    )
    if gold:
        values += ", 'source', 'derived', 'minutes', r.minutes, 'traded_minutes', r.traded_minutes"
    else:
        values += ", 'vwap', r.vwap::text, 'source', r.source"
    return f"""
SELECT pg_notify('{CHANNEL}', '[' || string_agg(j, ',' ORDER BY n) || ']')
FROM (
    SELECT j, n, (sum(octet_length(j) + 1) OVER (ORDER BY n) - 1) / {CHUNK_BYTES} AS chunk
    FROM (
        SELECT CASE WHEN octet_length(whole) <= {ROW_MAX_BYTES} THEN whole ELSE bare END AS j,
               row_number() OVER (ORDER BY exchange, symbol, interval_start) AS n
        FROM (
            SELECT r.exchange, r.symbol, r.interval_start,
                   json_build_object({keys}, {values})::text AS whole,
                   json_build_object({keys}, 'fetch', true)::text AS bare
            FROM {rows} r
        ) a
    ) b
) c
GROUP BY chunk
"""


class Announced(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """One announced candle, as a listener decodes it (``fetch``: values not included)."""

    interval: str
    exchange: str
    symbol: str
    start: str
    open: str | None = None
    high: str | None = None
    low: str | None = None
    close: str | None = None
    volume: str | None = None
    quote_volume: str | None = None
    trade_count: int | None = None
    vwap: str | None = None
    source: str | None = None
    minutes: int | None = None
    traded_minutes: int | None = None
    fetch: bool = False


_DECODER = msgspec.json.Decoder(list[Announced])


def decode_payload(payload: str | bytes) -> list[Announced]:
    """The candles of one notification; :class:`ValueError` for a payload that is not ours."""
    try:
        return _DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not a klined candle announcement: {exc}") from None
