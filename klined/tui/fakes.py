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
    LiveStatus,
    PairStatus,
    StatusSnapshot,
    StreamState,
)
from klined.tui.present import STEPS
from klined.tui.sources import ChainResult, HourCompleteness, HourSoFar, JobRun

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

    def __init__(
        self,
        rows: Iterable[HourCompleteness] = (),
        runs: Iterable[JobRun] = (),
        so_far: Iterable[HourSoFar] = (),
    ) -> None:
        self.rows = list(rows)
        self.runs = list(runs)
        self.so_far = list(so_far)
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

    async def hour_so_far(self) -> list[HourSoFar]:
        await anyio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return list(self.so_far)

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
        live=LiveStatus(
            enabled=True,
            state="ok",
            finals=372_611,
            written=372_540,
            committed_batches=41_220,
            lag_window_s=300.0,
            lag_samples=4_870,
            lag_p50_s=0.43,
            lag_p99_s=1.27,
            lag_max_s=1.88,
            last_commit_ms=now_ms - 12_000,
            gold_refreshed_ms=now_ms - 9_000,
        ),
    )


def demo_so_far(now_ms: int = DEMO_NOW_MS) -> list[HourSoFar]:
    """The hour in progress: live finals for nearly every minute so far."""
    hour = now_ms - now_ms % HOUR_MS
    elapsed = (now_ms - 10_000 - hour) // MINUTE_MS
    binance = len(DEFAULT_PAIRS) - 2
    kraken = len(_KRAKEN_PAIRS)
    return [
        HourSoFar("binance", hour, elapsed, binance, final=binance * elapsed - 2, missing=2),
        HourSoFar(
            "kraken", hour, elapsed, kraken, final=kraken * elapsed - 31, ws_partial=3, missing=28
        ),
    ]


def hour_row(exchange: str, symbol: str, hour_ms: int, **counts: int) -> HourCompleteness:
    """An hour whose counts add up to 60: ``ws_final`` takes what the others leave."""
    rest = sum(counts.values())
    return HourCompleteness(
        exchange,
        symbol,
        hour_ms,
        60,
        ws_final=60 - rest,
        rest=counts.get("rest", 0),
        archive=counts.get("archive", 0),
        trades=counts.get("trades", 0),
        no_trades=counts.get("no_trades", 0),
        ws_partial=counts.get("ws_partial", 0),
        missing=counts.get("missing", 0),
    )


def pending_row(exchange: str, symbol: str, hour_ms: int) -> HourCompleteness:
    """An hour the chain has not processed yet: all 60 minutes missing."""
    return HourCompleteness(exchange, symbol, hour_ms, 60, missing=60, pending=True)


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


# -- trouble ------------------------------------------------------------------------------------

#: errors as the streams report them, long ones included (the table must still fit 80 columns)
_ERRORS = (
    "ConnectionClosedError: no close frame received or sent",
    "StaleConnection: no message for 15 s; reconnecting",
    "ConnectionClosedOK: received 1000 (OK); then sent 1000 (OK)",
    "connection reset by peer",
    "TimeoutError: subscribe not acknowledged within 10 s",
    "InvalidStatus: server rejected WebSocket connection: HTTP 503",
)


def error_heavy_snapshot(now_ms: int = DEMO_NOW_MS) -> StatusSnapshot:
    """The demo's simulator after a bad few minutes: every pair has an error, most of them
    long, some pairs down or backing off; the errors are simulated (injected faults)."""
    snap = demo_snapshot(now_ms)
    states = (StreamState.CONNECTED, StreamState.BACKOFF, StreamState.STALE, StreamState.DOWN)
    for i, p in enumerate(snap.pairs):
        if p.state == StreamState.UNLISTED:
            continue
        p.last_error = _ERRORS[i % len(_ERRORS)]
        p.reconnects = 3 + i % 7
        if i % 4:
            p.state = states[i % len(states)]
    for i, c in enumerate(snap.connections):
        c.last_error = _ERRORS[(i + 1) % len(_ERRORS)]
        c.reconnects += 4
    snap.simulated = True
    return snap


def catching_up_completeness(
    now_ms: int = DEMO_NOW_MS, hours: int = 72, pending: int = 6
) -> list[HourCompleteness]:
    """The demo's hours, but the daemon was down: the newest ``pending`` closed hours are not
    processed yet, except the newest one, which the catch-up did first."""
    last = now_ms - now_ms % HOUR_MS - HOUR_MS
    owed = {last - i * HOUR_MS for i in range(1, pending)}
    return [
        pending_row(r.exchange, r.symbol, r.hour_ms) if r.hour_ms in owed else r
        for r in demo_completeness(now_ms, hours)
    ]


def catching_up_snapshot(now_ms: int = DEMO_NOW_MS) -> StatusSnapshot:
    """The daemon's status during that catch-up: the second of six hours waits for the lock,
    held by a backfill's merge, and the 13:05 run is due (its time has passed)."""
    snap = demo_snapshot(now_ms)
    last = now_ms - now_ms % HOUR_MS - HOUR_MS
    snap.chain = ChainStatus(
        running=True,
        trigger="catchup",
        run_done=1,
        run_total=6,
        current_hour_ms=last - HOUR_MS,
        waiting_for="a backfill's merge of 2026-11-20T04:00Z (PostgreSQL backend pid 48213)",
        last_run_ms=now_ms - 3 * HOUR_MS,
        last_result="6 hour(s), 2.1s",
        next_run_ms=now_ms - now_ms % HOUR_MS + 5 * MINUTE_MS,
    )
    return snap


def catching_up_job_runs(now_ms: int = DEMO_NOW_MS) -> list[JobRun]:
    """The demo's runs, then the catch-up's newest hour, whose gap-fill was incomplete."""
    runs = demo_job_runs(now_ms, hours=30)
    last = now_ms - now_ms % HOUR_MS - HOUR_MS
    gap = set(range(last - 5 * HOUR_MS, last + HOUR_MS, HOUR_MS))
    runs = [r for r in runs if r.hour_ms not in gap]
    run_id = max(r.run_id for r in runs) + 1
    t = now_ms - 40_000
    for step in STEPS:
        status, error = "ok", ""
        if step == "gapfill":
            status = "incomplete"
            error = "95 minutes left missing, requests failed: exchange unreachable (95)"
        runs.append(JobRun(run_id, last, step, status, 60, t, t + 900, 900, error, "catchup"))
        run_id += 1
        t += 900
    return runs
