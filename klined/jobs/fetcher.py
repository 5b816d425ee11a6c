"""Fetch one pair's wanted minutes over REST and turn every answer into bronze rows.

:class:`PairFetcher` knows nothing about the database: it gets the minutes to fetch, a way to
look up a settled close before a minute, and a sink for rows and attempts. It walks the plan
oldest first (so each minute's previous close is known when a quiet minute needs it) and
turns what the exchange proves into rows:

* a candle of a closed minute -> ``rest`` (or ``no_trades`` when the exchange says 0 trades);
* a minute inside ``CandlePage.covered`` without a candle -> ``no_trades``, flat at the
  previous close, zero volume, ``trade_count = 0``;
* Kraken minutes beyond the OHLC window -> ``trades`` candles rebuilt from the Trades endpoint
  (paged by its cursor), quiet minutes there -> ``no_trades`` as well;
* anything else stays missing, with a reason, and is tried again by a later run.

Rows are only ever produced for wanted minutes: a final WS candle is never duplicated.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import msgspec
from loguru import logger

from klined.errors import ExchangeError, ExchangeUnreachable, RateLimited, UnlistedPair
from klined.exchanges.base import CandlePage, Trade
from klined.jobs.gapplan import Window, ohlc_oldest, plan_windows, runs, trade_windows
from klined.model import MINUTE_MS, Candle, Origin, Pair, floor_minute, iso
from klined.rest.client import RestClient

#: How far back the Trades endpoint is searched for the close before a quiet first minute
#: (minutes; tried in turn until a trade is found).
TRADES_LOOKBACK_MINUTES = (30, 360)
#: Trades pages one lookback step may read.
LOOKBACK_PAGES = 5

#: Rows are written (and progress checkpointed) at least this often during a long pass.
FLUSH_EVERY_S = 1.0
#: The longest one write of rows may hold off a cancellation.
WRITE_TIMEOUT_S = 30.0

#: Why a minute stays missing -> the ``ops.gapfill_attempts`` outcome recorded for it.
NO_PREVIOUS_CLOSE = "no previous close"
NOT_YET = "not yet available at the exchange"
LOOKBACK_FAILED = "previous close unknown (lookback failed)"
UNREACHABLE = "exchange unreachable"
#: Reasons that mean a request failed (not that the exchange has no data): minutes missing for
#: them make a chain's gap-fill ``incomplete`` and ``chain`` / ``backfill`` exit 1; a later run
#: may fill them.
REQUEST_FAILED = frozenset(
    {"rate limited", "exchange error", "exchange ban (418)", UNREACHABLE, LOOKBACK_FAILED}
)
#: A trade is assumed visible on the Trades endpoint this long after it happened.
PUBLISH_LAG_MS = 2_000


class Sink(Protocol):
    """Where a fetcher's results go (the database in production, a list in unit tests)."""

    async def rows(self, candles: list[Candle]) -> None: ...

    async def attempt(
        self, pair: Pair, start_ms: int, end_ms: int, outcome: str, rows: int, detail: str
    ) -> None: ...

    async def progress(self, through_ms: int) -> None:
        """Every wanted minute before ``through_ms`` is written (or given up on)."""


@dataclass(slots=True)
class PairReport:
    """What happened to one pair: the backfill summary and progress line read it."""

    exchange: str
    symbol: str
    wanted: int = 0
    fetched: int = 0  # rows with trades written (rest / trades)
    no_trades: int = 0  # zero-trade rows written
    requests: int = 0
    missing: Counter[str] = field(default_factory=Counter)  # reason -> minutes
    done: int = 0  # wanted minutes resolved (written or given up on)
    hours: set[int] = field(default_factory=set)  # hours that received rows
    through: int = 0  # every wanted minute before this is in bronze (or given up on)
    error: str = ""  # the run for this pair failed outright (not an exchange refusal)
    archive: int = 0  # rows loaded from the exchange's archive files (backfill)
    archive_files: int = 0

    @property
    def still_missing(self) -> int:
        return sum(self.missing.values())


PrevClose = Callable[[int], Awaitable[str | None]]


class _Closes:
    """Closes of minutes this fetcher has seen or written, for quiet minutes that follow."""

    def __init__(self) -> None:
        self._minutes: list[int] = []
        self._close: dict[int, str] = {}

    def put(self, minute: int, close: str) -> None:
        if minute not in self._close:
            bisect.insort(self._minutes, minute)
        self._close[minute] = close

    def at(self, minute: int) -> str | None:
        return self._close.get(minute)


class PairFetcher:
    """Fills one pair's wanted minutes; one instance per pair per run."""

    def __init__(
        self,
        client: RestClient,
        pair: Pair,
        sink: Sink,
        *,
        prev_close: PrevClose,
        report: PairReport | None = None,
        flush_rows: int = 2000,
    ) -> None:
        self.client = client
        self.adapter = client.adapter
        self.exchange = client.exchange
        self.pair = pair
        self.sink = sink
        self.db_prev_close = prev_close
        self.report = report or PairReport(self.exchange, str(pair))
        self.flush_rows = flush_rows
        self.closes = _Closes()
        self._buffer: list[Candle] = []
        self._wanted: set[int] = set()
        self._native = self._rest_native()
        self._stopped = ""  # set when nothing more can be fetched for this pair in this run
        self._stop_outcome = "error"
        self._lookback_error = ""
        self._looked_back = False
        self._emitted = 0
        self._end = 0
        self._flush_due = time.monotonic() + FLUSH_EVERY_S
        self._per_page = self._trades_per_page()

    def _trades_per_page(self) -> int:
        """A full Trades page means "more after this"; a shorter one reached the present."""
        if not hasattr(self.adapter, "trades_request"):
            return 0
        return int(self.adapter.trades_request(self.pair, "0").params.get("count", 1000))

    def _rest_native(self) -> str:
        rest_native = getattr(self.adapter, "rest_native", None)
        return str(rest_native(self.pair) if rest_native else self.adapter.native(self.pair))

    # ------------------------------------------------------------------------------- driver

    async def run(self, wanted: list[int], now_ms: int, end_ms: int | None = None) -> PairReport:
        """Fetch every wanted minute (sorted minute starts) the exchange can supply now.

        ``end_ms`` is the end of the range the minutes came from: the progress frontier
        reaches it when everything is done.
        """
        self._end = end_ms if end_ms is not None else (wanted[-1] + MINUTE_MS if wanted else 0)
        self._wanted = set(wanted)
        self.report.wanted += len(wanted)
        limits = self.client.limits
        windows = plan_windows(
            wanted, now_ms, limits.max_candles_per_request, limits.ohlc_window_candles
        )
        try:
            for w in windows:
                if self._stopped:
                    await self._give_up(w.start_ms, w.end_ms, self._stopped, self._stop_outcome)
                    continue
                self._looked_back = False
                if w.kind == "trades":
                    await self._trades_window(w)
                else:
                    await self._candles_window(w)
                await self._flush()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                try:
                    await self._flush()
                except Exception as exc:  # never mask the original outcome
                    logger.error(
                        "{} {}: {} rows not written: {}",
                        self.exchange,
                        self.pair,
                        len(self._buffer),
                        exc,
                    )
        return self.report

    # ------------------------------------------------------------------------------- helpers

    def _clock(self) -> int:
        return self.client.clock_ms()

    async def _emit(self, candle: Candle) -> None:
        m = candle.interval_start
        if m not in self._wanted:
            return
        self._wanted.discard(m)
        self._buffer.append(candle)
        self._emitted += 1
        self.report.done += 1
        self.report.hours.add(m - m % 3_600_000)
        if candle.trade_count == 0 or candle.origin == Origin.NO_TRADES:
            self.report.no_trades += 1
        else:
            self.report.fetched += 1
        if len(self._buffer) >= self.flush_rows or time.monotonic() >= self._flush_due:
            await self._flush()

    async def _flush(self) -> None:
        self._flush_due = time.monotonic() + FLUSH_EVERY_S
        if self._buffer:
            # Cleared only once written, so a failed write is retried by the final flush and
            # the progress frontier never passes rows not in bronze. The write is shielded: a
            # cancellation landing after its commit (before the buffer is cleared) made that
            # final flush write the same rows twice. Bounded, so a hung database still lets
            # Ctrl-C through.
            with anyio.fail_after(WRITE_TIMEOUT_S, shield=True):
                await self.sink.rows(self._buffer)
            self._buffer = []
        through = min(self._wanted) if self._wanted else self._end
        if through > self.report.through:
            # the checkpoint first: what the report says is done is what a resumed run skips
            await self.sink.progress(through)
            self.report.through = through

    async def _give_up(
        self, start: int, end: int, reason: str, outcome: str | None = None, detail: str = ""
    ) -> int:
        """Mark the wanted minutes of ``[start, end)`` missing for ``reason``; with ``outcome``,
        record one ``ops.gapfill_attempts`` row per run of them."""
        gone = sorted(m for m in self._wanted if start <= m < end)
        for m in gone:
            self._wanted.discard(m)
        if gone:
            self.report.missing[reason] += len(gone)
            self.report.done += len(gone)
            if outcome is not None:
                for s, e in runs(gone):
                    await self.sink.attempt(self.pair, s, e, outcome, 0, detail or reason)
        return len(gone)

    async def _give_up_unsettled(self, start: int, end: int) -> None:
        """Covered minutes we could not turn into rows: no close before them is known."""
        if self._lookback_error:
            await self._give_up(start, end, LOOKBACK_FAILED, "error", self._lookback_error)
        else:
            await self._give_up(start, end, NO_PREVIOUS_CLOSE, "unavailable")

    def _wanted_in(self, start: int, end: int) -> list[int]:
        return sorted(m for m in self._wanted if start <= m < end)

    def _no_trades_row(self, minute: int, close: str, evidence: str) -> Candle:
        now = self._clock()
        return Candle(
            exchange=self.exchange,
            symbol=str(self.pair),
            native_symbol=self._native,
            interval_start=minute,
            open=close,
            high=close,
            low=close,
            close=close,
            volume="0",
            quote_volume="0",
            vwap=None,
            trade_count=0,
            is_final=True,
            origin=Origin.NO_TRADES,
            event_ts=now,
            ingestion_ts=now,
            raw=msgspec.Raw(msgspec.json.encode({"no_trades": evidence})),
        )

    async def _close_before(self, minute: int, *, lookback: bool = True) -> str | None:
        """Close of ``minute - 1``: from this run, the warehouse, or one lookback request."""
        prev = minute - MINUTE_MS
        close = self.closes.at(prev)
        if close is not None:
            return close
        close = await self.db_prev_close(minute)
        if close is not None:
            self.closes.put(prev, close)
            return close
        if lookback and not self._looked_back:
            self._looked_back = True  # at most one per window: a failed one will fail again
            await self._lookback(minute)
            return self.closes.at(prev)
        return None

    async def _lookback(self, minute: int) -> None:
        """A bounded look at the exchange before ``minute`` to learn the previous close."""
        limits = self.client.limits
        window = limits.ohlc_window_candles
        start = minute - limits.max_candles_per_request * MINUTE_MS
        try:
            if window is None:
                page = await self.client.fetch_candles(self.pair, start, minute)
                self.report.requests += 1
                self._learn_page(page, minute)
                return
            oldest = ohlc_oldest(self._clock(), window)
            if minute - MINUTE_MS >= oldest:
                page = await self.client.fetch_candles(self.pair, max(start, oldest), minute)
                self.report.requests += 1
                self._learn_page(page, minute)
                if self.closes.at(minute - MINUTE_MS) is not None:
                    return
            for span in TRADES_LOOKBACK_MINUTES:
                await self._trades_pass(minute - span * MINUTE_MS, minute, learn_only=True)
                if self.closes.at(minute - MINUTE_MS) is not None:
                    return
        except ExchangeError as exc:
            self._lookback_error = str(exc)[:300]
            logger.debug(
                "{} {}: lookback before {} failed: {}", self.exchange, self.pair, minute, exc
            )

    def _learn_page(self, page: CandlePage, until: int) -> None:
        """Closes of every minute ``page`` proves, up to ``until`` (quiet minutes carry)."""
        by_minute = {c.interval_start: c for c in page.candles}
        start, end = page.covered
        last: str | None = None
        for m in range(start, min(end, until), MINUTE_MS):
            c = by_minute.get(m)
            if c is not None:
                last = c.close
            elif last is None:
                last = self.closes.at(m - MINUTE_MS)
            if last is not None:
                self.closes.put(m, last)
        for c in page.candles:
            self.closes.put(c.interval_start, c.close)

    # ------------------------------------------------------------------------------- candles

    async def _candles_window(self, w: Window) -> None:
        pos = w.start_ms
        trades_fallback: set[int] = set()
        while pos < w.end_ms and self._wanted_in(pos, w.end_ms):
            try:
                page = await self.client.fetch_candles(self.pair, pos, w.end_ms)
            except ExchangeError as exc:
                self.report.requests += 1
                await self._failed(pos, w.end_ms, exc)
                return
            self.report.requests += 1
            cov_start, cov_end = page.covered
            by_minute = {c.interval_start: c for c in page.candles}
            rows_before = self._emitted
            for c in page.candles:
                self.closes.put(c.interval_start, c.close)
            for m in self._wanted_in(pos, w.end_ms):
                if m < cov_start:
                    trades_fallback.add(m)  # Kraken: the OHLC window moved past it
                    continue
                if m >= cov_end:
                    break
                got = by_minute.get(m)
                if got is not None:
                    await self._emit(got)
                    continue
                close = await self._close_before(m)
                if close is None:
                    continue  # reported below as missing
                self.closes.put(m, close)
                await self._emit(self._no_trades_row(m, close, f"covered {cov_start}-{cov_end}"))
            written = self._emitted - rows_before
            outcome = "filled" if written else "empty"
            await self.sink.attempt(
                self.pair, pos, max(pos, cov_end), outcome, written, f"{len(page.candles)} candles"
            )
            # minutes the exchange covered but we could not settle (no previous close known)
            await self._give_up_unsettled(max(pos, cov_start), cov_end)
            if page.next_since is None or int(page.next_since) <= pos:
                break  # one answer is all this endpoint has for the window right now
            pos = int(page.next_since)
        for tw in trade_windows(sorted(trades_fallback)):
            await self._trades_window(tw)
        await self._give_up(w.start_ms, w.end_ms, NOT_YET, "partial")

    async def _failed(self, start: int, end: int, exc: ExchangeError) -> None:
        if isinstance(exc, RateLimited) and exc.banned:
            reason, outcome = "exchange ban (418)", "rate_limited"
            self._stopped, self._stop_outcome = reason, outcome
        elif isinstance(exc, RateLimited):
            reason, outcome = "rate limited", "rate_limited"
        elif isinstance(exc, UnlistedPair):
            reason, outcome = "pair not listed", "error"
            self._stopped, self._stop_outcome = reason, outcome
        elif isinstance(exc, ExchangeUnreachable):
            reason, outcome = UNREACHABLE, "error"
        else:
            reason, outcome = "exchange error", "error"
        n = await self._give_up(start, end, reason, outcome, str(exc)[:500])
        # an unreachable exchange was reported once by its client, not once per pair and window
        logger.log(
            "DEBUG" if isinstance(exc, ExchangeUnreachable) else "WARNING",
            "{} {}: {} minutes from {} left missing: {}",
            self.exchange,
            self.pair,
            n,
            iso(start),
            exc,
        )

    # ------------------------------------------------------------------------------- trades

    async def _trades_window(self, w: Window) -> None:
        try:
            await self._trades_pass(w.start_ms, w.end_ms)
        except ExchangeError as exc:
            await self._failed(w.start_ms, w.end_ms, exc)
            return
        await self._give_up(w.start_ms, w.end_ms, NOT_YET, "partial")

    async def _trades_pass(self, start: int, end: int, *, learn_only: bool = False) -> None:
        """Page Trades from ``start`` until every minute before ``end`` is complete."""
        since = str(max(0, start * 1_000_000 - 1))
        pending: list[Trade] = []  # trades of minutes not yet complete
        done_to = start  # minutes before this are emitted
        pages = 0
        attempt_from, attempt_rows = start, self._emitted
        while done_to < end:
            page = await self.client.fetch_trades(self.pair, since)
            self.report.requests += 1
            pages += 1
            now = self._clock()
            pending.extend(t for t in page.trades if t.ts_ms >= done_to)
            if page.trades and len(page.trades) >= self._per_page:
                complete_to = floor_minute(page.trades[-1].ts_ms)
            else:
                # a short page reached the present: every minute closed a moment ago is complete
                complete_to = floor_minute(now - PUBLISH_LAG_MS)
            complete_to = min(complete_to, end)
            if complete_to > done_to:
                ready = [t for t in pending if t.ts_ms < complete_to]
                pending = [t for t in pending if t.ts_ms >= complete_to]
                await self._trades_minutes(ready, done_to, complete_to, now, learn_only)
                done_to = complete_to
            if learn_only and pages >= LOOKBACK_PAGES:
                return
            if page.next_since is None or page.next_since == since or not page.trades:
                break
            since = page.next_since
            if not learn_only and self._emitted - attempt_rows >= 5000:
                await self.sink.attempt(
                    self.pair, attempt_from, done_to, "filled", self._emitted - attempt_rows,
                    "trades",
                )  # fmt: skip
                attempt_from, attempt_rows = done_to, self._emitted
        if not learn_only and done_to > attempt_from:
            written = self._emitted - attempt_rows
            await self.sink.attempt(
                self.pair, attempt_from, done_to, "filled" if written else "empty", written,
                f"trades, {pages} pages",
            )  # fmt: skip

    async def _trades_minutes(
        self, trades: list[Trade], start: int, end: int, now: int, learn_only: bool
    ) -> None:
        """Rows for the complete minutes ``[start, end)`` from their trades."""
        candles = self.adapter.aggregate_trades(self.pair, trades, start, end, now)
        by_minute = {c.interval_start: c for c in candles}
        for m in range(start, end, MINUTE_MS):
            c = by_minute.get(m)
            if c is not None:
                self.closes.put(m, c.close)
                if not learn_only:
                    await self._emit(c)
                continue
            if learn_only:
                prev = self.closes.at(m - MINUTE_MS)
                if prev is not None:
                    self.closes.put(m, prev)
                continue
            if m not in self._wanted and self.closes.at(m - MINUTE_MS) is None:
                continue  # a settled minute we have no close for: learn it only if needed
            close = await self._close_before(m, lookback=m in self._wanted)
            if close is None:
                continue
            self.closes.put(m, close)
            if m in self._wanted:
                await self._emit(self._no_trades_row(m, close, "trades"))
        if not learn_only:  # wanted minutes we could not settle (no previous close at all)
            await self._give_up_unsettled(start, end)
