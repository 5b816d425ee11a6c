"""Stand-in sources and deterministic demo data for tests, snapshots and screenshots.

The data is made from fixed rules (no randomness, no clock), so an SVG of the dashboard is the
same on every machine and every run.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import anyio
import anyio.lowlevel

from klined.config import DEFAULT_PAIRS
from klined.errors import DatabaseError, StatusError
from klined.model import HOUR_MS, MINUTE_MS, parse_time
from klined.status import (
    ChainStatus,
    ConnectionStatus,
    LakeStatus,
    PairStatus,
    StatusSnapshot,
    StreamState,
)
from klined.tui.present import STEPS
from klined.tui.sources import ChainResult, HourCompleteness, JobRun

#: the frozen "now" of every demo picture: 13:47:12 UTC, so the last closed hour is 12:00
DEMO_NOW_MS = parse_time("2026-11-26T13:47:12Z")


def _h(*parts: object) -> int:
    """A stable pseudo-random number from its arguments."""
    return zlib.crc32("|".join(map(str, parts)).encode())


class FakeStatusSource:
    """Returns ``snapshot``, or raises ``error`` when it is set; counts calls."""

    def __init__(self, snapshot: StatusSnapshot | None = None) -> None:
        self.snapshot = snapshot
        self.error: Exception | None = None if snapshot else StatusError("no snapshot")
        self.calls = 0

    async def fetch(self) -> StatusSnapshot:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        assert self.snapshot is not None
        return self.snapshot


class FakeWarehouseSource:
    """Serves the given rows and runs, or raises ``error`` when it is set."""

    def __init__(self, rows: Iterable[HourCompleteness] = (), runs: Iterable[JobRun] = ()) -> None:
        self.rows = list(rows)
        self.runs = list(runs)
        self.error: Exception | None = None
        self.ranges: list[tuple[int, int]] = []

    async def completeness(self, since_ms: int, until_ms: int) -> list[HourCompleteness]:
        await anyio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        self.ranges.append((since_ms, until_ms))
        return [r for r in self.rows if since_ms <= r.hour_ms < until_ms]

    async def job_runs(self, limit: int = 500) -> list[JobRun]:
        await anyio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return sorted(self.runs, key=lambda r: r.run_id, reverse=True)[:limit]

    async def aclose(self) -> None:
        return None


class FakeChainRunner:
    """Records the hours it was asked to run; waits for ``release`` when one is given."""

    def __init__(self, returncode: int = 0, tail: tuple[str, ...] = ()) -> None:
        self.hours: list[int] = []
        self.returncode = returncode
        self.tail = tail
        self.release: anyio.Event | None = None

    async def run(self, hour_ms: int) -> ChainResult:
        self.hours.append(hour_ms)
        if self.release is not None:
            await self.release.wait()
        return ChainResult(hour_ms, self.returncode, 4.2, "", self.tail)


def unreachable_database() -> DatabaseError:
    return DatabaseError(
        "database unreachable: postgresql://klined@127.0.0.1:5432/klined: Connection refused"
    )


# -- demo data ------------------------------------------------------------------------------------

_KRAKEN_PAIRS = [p for p in DEFAULT_PAIRS if p not in ("PUMP/USD", "REKT/USD")]


def demo_snapshot(now_ms: int = DEMO_NOW_MS) -> StatusSnapshot:
    """Two exchanges, most pairs healthy, one of every kind of trouble."""
    last_final = now_ms - now_ms % MINUTE_MS - MINUTE_MS
    pairs: list[PairStatus] = []
    trouble: dict[tuple[str, str], tuple[StreamState, str]] = {
        ("binance", "PUMP/USD"): (StreamState.UNLISTED, "not listed on binance; try PUMP/USDT"),
        ("binance", "REKT/USD"): (StreamState.UNLISTED, "not listed on binance; try REKT/USDT"),
        ("binance", "KSM/USD"): (StreamState.STALE, "no data for 47s (stale_after_s=30)"),
        ("kraken", "TRUMP/USD"): (StreamState.BACKOFF, "connection reset by peer"),
        ("kraken", "PENGU/USD"): (StreamState.BACKOFF, "connection reset by peer"),
        ("kraken", "FARTCOIN/USD"): (StreamState.DOWN, "subscribe failed: pair not supported"),
    }
    for exchange, names in (("binance", DEFAULT_PAIRS), ("kraken", _KRAKEN_PAIRS)):
        for symbol in names:
            state, error = trouble.get((exchange, symbol), (StreamState.CONNECTED, ""))
            seed = _h(exchange, symbol)
            healthy = state == StreamState.CONNECTED
            age = 200 + seed % 2500 if healthy else 47_000 + seed % 90_000
            pairs.append(
                PairStatus(
                    exchange=exchange,
                    symbol=symbol,
                    state=state,
                    last_message_ms=None if state == StreamState.UNLISTED else now_ms - age,
                    messages=0 if state == StreamState.UNLISTED else 20_000 + seed % 90_000,
                    messages_per_s=(0.4 + (seed % 30) / 10) if healthy else 0.0,
                    reconnects=(seed % 3 if healthy else 2 + seed % 5)
                    if state != StreamState.UNLISTED
                    else 0,
                    last_final_minute_ms=None
                    if state == StreamState.UNLISTED
                    else last_final - (0 if healthy else (3 + seed % 20) * MINUTE_MS),
                    last_error=error,
                )
            )
    connections = [
        ConnectionStatus(
            exchange="binance",
            conn_id="binance-0",
            state=StreamState.CONNECTED,
            pairs=13,
            session_id="b0-7f3a",
            connected_since_ms=now_ms - 3 * HOUR_MS - 754_000,
            last_message_ms=now_ms - 180,
            messages=1_204_330,
            messages_per_s=24.6,
            reconnects=1,
        ),
        ConnectionStatus(
            exchange="kraken",
            conn_id="kraken-0",
            state=StreamState.CONNECTED,
            pairs=8,
            session_id="k0-19c2",
            connected_since_ms=now_ms - 47 * MINUTE_MS,
            last_message_ms=now_ms - 420,
            messages=411_877,
            messages_per_s=9.1,
            reconnects=3,
        ),
        ConnectionStatus(
            exchange="kraken",
            conn_id="kraken-1",
            state=StreamState.BACKOFF,
            pairs=5,
            reconnects=6,
            next_retry_ms=now_ms + 12_000,
            last_error="connection reset by peer",
        ),
    ]
    return StatusSnapshot(
        pid=4242,
        started_ms=now_ms - 3 * HOUR_MS - 754_000,
        now_ms=now_ms,
        uptime_s=(3 * HOUR_MS + 754_000) / 1000,
        rss_bytes=88_604_672,
        connections=connections,
        pairs=pairs,
        lake=LakeStatus(
            open_parts=26,
            pending_upload_parts=2,
            pending_upload_bytes=1_048_576,
            uploaded_parts=1_311,
            events_written=2_416_904,
            s3_enabled=True,
        ),
        chain=ChainStatus(
            running=False,
            last_run_ms=now_ms - now_ms % HOUR_MS + 5 * MINUTE_MS + 31_000,
            last_result="ok",
            next_run_ms=now_ms - now_ms % HOUR_MS + HOUR_MS + 5 * MINUTE_MS,
        ),
    )


def hour_row(exchange: str, symbol: str, hour_ms: int, **counts: int) -> HourCompleteness:
    """An hour whose counts add up to 60: ``ws_final`` takes what the others leave."""
    rest = sum(counts.values())
    return HourCompleteness(exchange, symbol, hour_ms, 60, ws_final=60 - rest, **counts)


def demo_completeness(
    now_ms: int = DEMO_NOW_MS, hours: int = 72, pairs: Iterable[tuple[str, str]] | None = None
) -> list[HourCompleteness]:
    """Mostly complete hours, with REST repairs, quiet minutes, partials and real gaps; the
    oldest Binance hours came from its archive."""
    if pairs is None:
        pairs = [("binance", p) for p in DEFAULT_PAIRS if p not in ("PUMP/USD", "REKT/USD")]
        pairs += [("kraken", p) for p in _KRAKEN_PAIRS]
    last = now_ms - now_ms % HOUR_MS - HOUR_MS
    rows: list[HourCompleteness] = []
    for exchange, symbol in pairs:
        for i in range(hours):
            hour = last - i * HOUR_MS
            seed = _h(exchange, symbol, hour)
            counts: dict[str, int] = {}
            if seed % 5 == 0:
                counts["rest"] = 1 + seed % 4
            if symbol in ("PEPE/USD", "FARTCOIN/USD", "KSM/USD") and seed % 3 == 0:
                counts["no_trades"] = 2 + seed % 9
            if exchange == "kraken" and hour < last - 24 * HOUR_MS and seed % 7 == 0:
                counts["trades"] = 5 + seed % 20
            if i == 0 and seed % 4 == 0:
                counts["ws_partial"] = 1 + seed % 3
            if seed % 23 == 0:
                counts["missing"] = 1 + seed % 3
            if (exchange, symbol) == ("kraken", "TRUMP/USD") and 2 <= i <= 4:
                counts = {"rest": 10, "missing": 30 - 10 * (i - 2)}
            if (exchange, symbol) == ("binance", "KSM/USD") and i == 0:
                counts = {"ws_partial": 12, "missing": 9}
            if exchange == "binance" and i >= hours - 6:  # seeded from the archive
                quiet = counts.get("no_trades", 0)
                counts = {"archive": 60 - quiet, "no_trades": quiet} if quiet else {"archive": 60}
            rows.append(hour_row(exchange, symbol, hour, **counts))
    return rows


def many_pairs_completeness(
    n_pairs: int, hours: int = 24, now_ms: int = DEMO_NOW_MS
) -> list[HourCompleteness]:
    """``n_pairs`` synthetic pairs (``C000/USD``...) on one exchange, for scale tests."""
    last = now_ms - now_ms % HOUR_MS - HOUR_MS
    rows = []
    for n in range(n_pairs):
        symbol = f"C{n:03d}/USD"
        for i in range(hours):
            hour = last - i * HOUR_MS
            missing = (n + i) % 60 if (n * 7 + i) % 31 == 0 else 0
            rows.append(hour_row("binance", symbol, hour, missing=missing))
    return rows


def demo_job_runs(now_ms: int = DEMO_NOW_MS, hours: int = 30) -> list[JobRun]:
    """One chain per hour, failed gap-fills (one retried an hour later), skipped flushes."""
    last = now_ms - now_ms % HOUR_MS - HOUR_MS
    runs: list[JobRun] = []
    run_id = 1
    for i in range(hours - 1, -1, -1):
        hour = last - i * HOUR_MS
        t = hour + HOUR_MS + 5 * MINUTE_MS
        for step in STEPS:
            seed = _h(hour, step)
            duration = 40 + seed % 900 if step != "gapfill" else 1_500 + seed % 9_000
            status, error, rows = "ok", "", 60 + seed % 1_800
            if step == "flush" and i % 11 == 5:
                status, rows = "skipped", 0
            if step == "gapfill" and i in (1, 3):
                status, rows = "failed", 0
                error = "kraken REST: EGeneral:Too many requests; 4 minutes left unfilled"
            end, trigger = t + duration, "schedule"
            runs.append(JobRun(run_id, hour, step, status, rows, t, end, duration, error, trigger))
            run_id += 1
            t += duration
        if i == 3:
            for step in ("gapfill", "silver", "gold", "completeness"):
                t2 = hour + 2 * HOUR_MS + 5 * MINUTE_MS
                runs.append(JobRun(run_id, hour, step, "ok", 240, t2, t2 + 800, 800, "", "dirty"))
                run_id += 1
    return runs
