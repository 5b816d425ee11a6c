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
``30m``, ``1h``, ``4h``, ``1d``) carry their ``vwap``, ``"source": "derived"``, ``minutes``
and ``traded_minutes``. A row
whose JSON would exceed ``ROW_MAX_BYTES`` (only absurdly long numbers could) is announced by
its keys with ``"fetch": true``: read it from ``silver.fact_ohlcv`` or ``gold.ohlcv_<interval>``.
Delivery is PostgreSQL's: at most once per listening session, nothing for a session that was
not connected; a writer that retries a commit whose outcome it never learned may announce a
row again (same values).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import msgspec
from loguru import logger

CHANNEL = "klined_candles"
#: a payload holds rows while their JSON adds up to less than this (plus one row)
CHUNK_BYTES = 6000
#: a row longer than this is announced by its keys only (payload < 8000 bytes, always)
ROW_MAX_BYTES = 1000

_START = "to_char(r.interval_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"


def _text(expr: str) -> str:
    """A nullable numeric as a JSON string (``numeric::text`` is digits, ``-`` and ``.``)."""
    return f"""coalesce('"' || {expr} || '"', 'null')"""


def notify_sql(rows: str, interval: str, *, gold: bool = False) -> str:
    """A ``SELECT`` that announces every row of the CTE ``rows`` (one ``pg_notify`` per chunk).

    ``rows`` must have exchange, symbol, interval_start, open, high, low, close, volume,
    quote_volume, trade_count and, for silver, vwap and source; for gold, minutes and
    traded_minutes. ``interval`` is the label (``1m``, ``5m``...), a fixed string. The JSON is
    concatenated (names through ``to_json`` for escaping): ``json_build_object`` cost the
    hourly merge twice as much.
    """
    if interval not in ("1m", "5m", "15m", "30m", "1h", "4h", "1d"):
        raise ValueError(f"unknown interval label {interval!r}")

    def keys(alias: str) -> str:
        return (
            f"""'{{"interval":"{interval}","exchange":', to_json({alias}.exchange)::text,"""
            f""" ',"symbol":', to_json({alias}.symbol)::text, ',"start":"', """
            f"""{_START.replace("r.", alias + ".")}, '"'"""
        )

    values = (
        """',"open":"', r.open, '","high":"', r.high, '","low":"', r.low,"""
        """ '","close":"', r.close, '","volume":"', r.volume, '","quote_volume":', """
        f"""{_text("r.quote_volume")}, ',"trade_count":', coalesce(r.trade_count::text, 'null')"""
    )
    if gold:
        values += (
            """, ',"vwap":', """ + _text("r.vwap") + """, ',"source":"derived","""
            """"minutes":', r.minutes, ',"traded_minutes":', r.traded_minutes"""
        )
    else:
        values += f""", ',"vwap":', {_text("r.vwap")}, ',"source":', to_json(r.source)::text"""
    return f"""
SELECT pg_notify('{CHANNEL}', '[' || string_agg(j, ',' ORDER BY n) || ']')
FROM (
    SELECT j, n, (sum(octet_length(j) + 1) OVER (ORDER BY n) - 1) / {CHUNK_BYTES} AS chunk
    FROM (
        SELECT CASE WHEN octet_length(whole) <= {ROW_MAX_BYTES} THEN whole
                    ELSE concat({keys("a")}, ',"fetch":true}}') END AS j,
               n
        FROM (
            SELECT r.exchange, r.symbol, r.interval_start,
                   concat({keys("r")}, {values}, '}}') AS whole,
                   row_number() OVER (ORDER BY r.exchange, r.symbol, r.interval_start) AS n
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


# ---------------------------------------------------------------------------------------------
# listening

#: a quiet connection is checked this often (a dead network is otherwise only noticed by TCP)
KEEPALIVE_S = 15.0
#: a lost connection is retried after this long, doubling up to the cap
RETRY_S, RETRY_MAX_S = 0.5, 30.0

_GOLD_TABLES = {i: f"ohlcv_{i}" for i in ("5m", "15m", "30m", "1h", "4h", "1d")}
_FETCH_SILVER = """
SELECT open::text, high::text, low::text, close::text, volume::text, quote_volume::text,
       trade_count, vwap::text, source
FROM silver.fact_ohlcv
WHERE exchange = $1 AND symbol = $2 AND interval_start = $3::text::timestamptz
"""
_FETCH_GOLD = """
SELECT open::text, high::text, low::text, close::text, volume::text, quote_volume::text,
       trade_count, vwap::text, minutes, traded_minutes
FROM gold.{}
WHERE exchange = $1 AND symbol = $2 AND interval_start = $3::text::timestamptz
"""

Handler = Callable[[Announced], Awaitable[None] | None]


class _Lost(Exception):
    """The listening connection went away."""


async def _complete(conn: asyncpg.Connection, row: Announced) -> Announced:
    """A keys-only announcement with its values read from the table (as committed now)."""
    if row.interval == "1m":
        found = await conn.fetchrow(_FETCH_SILVER, row.exchange, row.symbol, row.start)
    elif row.interval in _GOLD_TABLES:
        sql = _FETCH_GOLD.format(_GOLD_TABLES[row.interval])
        found = await conn.fetchrow(sql, row.exchange, row.symbol, row.start)
    else:
        return row
    if found is None:
        return row
    return msgspec.structs.replace(row, fetch=False, **dict(found))


async def listen(
    dsn: str | Callable[[], str],
    handle: Handler,
    *,
    on_state: Callable[[str], None] | None = None,
) -> None:
    """Call ``handle`` for every candle announced on :data:`CHANNEL`, until cancelled.

    ``dsn`` may be a callable (looked up again on every reconnect). The first connection must
    succeed (its error is raised); later losses are retried with a capped backoff, and
    ``on_state`` hears ``"listening"`` / ``"lost: <why>"`` (candles committed while the
    connection was down are not announced again: NOTIFY keeps nothing for absent listeners).
    """
    delay = RETRY_S
    first = True
    while True:
        target = dsn() if callable(dsn) else dsn
        try:
            conn = await asyncpg.connect(
                target, timeout=10, server_settings={"application_name": "klined-tail"}
            )
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if first:
                raise
            if on_state is not None:
                on_state(f"lost: {exc}")
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        first = False
        try:
            await _listen_on(conn, handle, on_state)
            delay = RETRY_S
        except _Lost as exc:
            if on_state is not None:
                on_state(f"lost: {exc}")
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await conn.close()
            conn.terminate()


async def _listen_on(
    conn: asyncpg.Connection, handle: Handler, on_state: Callable[[str], None] | None
) -> None:
    send, receive = anyio.create_memory_object_stream[str | None](10_000)

    def heard(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            send.send_nowait(payload)
        except anyio.WouldBlock:
            logger.warning(
                "tail: falling behind; an announcement of {} bytes dropped", len(payload)
            )
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the listener is stopping

    def gone(_conn: Any) -> None:
        # a full queue: the keepalive notices; a closed one: the listener is stopping
        with contextlib.suppress(
            anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError
        ):
            send.send_nowait(None)

    conn.add_termination_listener(gone)
    await conn.add_listener(CHANNEL, heard)
    if on_state is not None:
        on_state("listening")
    async with receive:
        while True:
            with anyio.move_on_after(KEEPALIVE_S) as quiet:
                payload = await receive.receive()
            if quiet.cancelled_caught:
                try:
                    with anyio.fail_after(10):
                        await conn.execute("SELECT 1")
                except (
                    OSError,
                    TimeoutError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                ) as exc:
                    raise _Lost(str(exc) or type(exc).__name__) from None
                continue
            if payload is None:
                raise _Lost("the server closed the connection")
            try:
                rows = decode_payload(payload)
            except ValueError as exc:
                logger.warning("tail: ignoring a foreign notification on {}: {}", CHANNEL, exc)
                continue
            for row in rows:
                if row.fetch:
                    try:
                        row = await _complete(conn, row)
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        raise _Lost(str(exc)) from None
                result = handle(row)
                if inspect.isawaitable(result):
                    await result
