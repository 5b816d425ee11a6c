"""The demo's closing summary: streams, lake and S3, completeness and gold of the seeded hours.

Collected after the daemon stopped (so every part is sealed and the final upload is counted)
and before the embedded PostgreSQL stops. Completeness comes straight from
``monitoring.hourly_completeness``; printed to stdout, 80 columns wide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from klined.demo.live import LiveLine
from klined.model import HOUR_MS, iso, to_datetime
from klined.status import StatusSnapshot
from klined.warehouse.database import Database

GOLD_TABLES = ("5m", "15m", "30m", "1h", "4h", "1d")
SOURCES = ("ws_final", "rest", "archive", "trades", "no_trades", "ws_partial", "missing")


@dataclass(slots=True)
class StreamLine:
    exchange: str
    connected: bool = False  # reached "connected" at least once during the run
    pairs: int = 0
    events: int = 0
    reconnects: int = 0
    malformed: int = 0
    last_error: str = ""


@dataclass(slots=True)
class CompletenessLine:
    exchange: str
    rows: int = 0  # (pair, hour) rows in monitoring.hourly_completeness
    expected: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> int:
        complete = ("ws_final", "rest", "archive", "trades", "no_trades")
        return sum(self.counts.get(s, 0) for s in complete)

    @property
    def rate(self) -> float:
        return self.complete / self.expected if self.expected else 0.0


@dataclass(slots=True)
class LakeLine:
    parts_written: int = 0
    parts_uploaded: int = 0
    parts_pending: int = 0
    s3: str = ""  # s3://bucket (at endpoint) or "" for a local lake
    s3_objects: int | None = None
    s3_error: str = ""
    root: str = ""


@dataclass(slots=True)
class DatasetsLine:
    """The Parquet day files the chain's publish step wrote (``ops.published``)."""

    files: int = 0
    rows: int = 0
    mirrored: int = 0  # of them in S3
    root: str = ""


@dataclass(slots=True)
class Summary:
    workdir: Path
    ran_s: float
    seed: int
    pairs: int
    hours: list[int]
    streams: list[StreamLine] = field(default_factory=list)
    lake: LakeLine = field(default_factory=LakeLine)
    live: LiveLine = field(default_factory=LiveLine)
    completeness: list[CompletenessLine] = field(default_factory=list)
    gold: dict[str, dict[str, int]] = field(default_factory=dict)  # exchange -> table -> rows
    datasets: DatasetsLine = field(default_factory=DatasetsLine)
    problems: list[str] = field(default_factory=list)
    temporary: bool = False  # the working directory is removed at exit

    @property
    def streams_ok(self) -> bool:
        return bool(self.streams) and all(s.connected and s.events > 0 for s in self.streams)

    @property
    def completeness_ok(self) -> bool:
        want = len(self.hours) * self.pairs
        got = {c.exchange: c for c in self.completeness}
        return bool(self.streams) and all(
            s.exchange in got and got[s.exchange].rows == want for s in self.streams
        )

    @property
    def ok(self) -> bool:
        return self.streams_ok and self.completeness_ok and not self.problems

    def render(self) -> str:
        out = [
            f"klined demo: ran {self.ran_s:.0f} s against the simulator (seed {self.seed}, "
            f"{self.pairs} pairs per exchange)",
            f"data in {self.workdir}" + (" (temporary: removed at exit)" if self.temporary else ""),
            "",
            f"{'streams':<14}{'connected':>9}{'pairs':>7}{'events':>10}{'reconnects':>12}"
            f"{'malformed':>11}",
        ]
        for s in self.streams:
            out.append(
                f"  {s.exchange:<12}{'yes' if s.connected else 'NO':>9}{s.pairs:>7}"
                f"{s.events:>10,}{s.reconnects:>12,}{s.malformed:>11,}"
            )
            if not s.connected and s.last_error:
                out.append(f"    last error: {s.last_error[:70]}")
        out.append("")
        lake = self.lake
        out.append(
            f"lake          {lake.parts_written:,} part(s) written this run under {lake.root}"
        )
        if lake.s3:
            out.append(f"              {lake.parts_uploaded:,} uploaded and verified in {lake.s3}")
            if lake.s3_objects is not None:
                out.append(f"              {lake.s3_objects:,} lake object(s) in the bucket")
            if lake.parts_pending:
                out.append(f"              {lake.parts_pending:,} still waiting for upload")
            if lake.s3_error:
                out.append(f"              S3 listing failed: {lake.s3_error}")
        else:
            out.append("              local only (no --s3-endpoint/--bucket given)")
        out.append("")
        out.extend(self.live.render())
        out.append("")
        if self.hours:
            first, end = self.hours[0], self.hours[-1] + HOUR_MS
            out.append(
                f"completeness  seeded hours {iso(first)} .. {iso(end)} ({len(self.hours)} h)"
            )
            out.append("              (minutes, from monitoring.hourly_completeness)")
        out.append(
            f"  {'':<7}{'expected':>9}{'ws_final':>9}{'rest':>7}{'archive':>8}{'trades':>7}"
            f"{'no_trd':>7}{'partial':>8}{'missing':>8}{'rate':>8}"
        )
        for c in self.completeness:
            k = c.counts
            out.append(
                f"  {c.exchange:<7}{c.expected:>9,}{k.get('ws_final', 0):>9,}"
                f"{k.get('rest', 0):>7,}{k.get('archive', 0):>8,}{k.get('trades', 0):>7,}"
                f"{k.get('no_trades', 0):>7,}{k.get('ws_partial', 0):>8,}{k.get('missing', 0):>8,}"
                f"{c.rate:>8.2%}"
            )
        if not self.completeness:
            out.append("  (none computed)")
        out.append("")
        out.append(f"{'gold rows':<11}" + "".join(f"{t:>8}" for t in GOLD_TABLES))
        for ex, tables in self.gold.items():
            out.append(f"  {ex:<9}" + "".join(f"{tables.get(t, 0):>8,}" for t in GOLD_TABLES))
        out.append("")
        d = self.datasets
        out.append(
            f"datasets      {d.files:,} Parquet day file(s), {d.rows:,} rows, under {d.root}"
        )
        if d.mirrored:
            out.append(f"              {d.mirrored:,} mirrored to S3 under datasets/")
        out.append("")
        out.extend(f"problem: {p}" for p in self.problems)
        if self.ok:
            names = " and ".join(s.exchange for s in self.streams)
            out.append(f"OK: streams connected on {names}")
            out.append(f"OK: completeness computed for {len(self.hours)} seeded hour(s)")
        else:
            why = []
            if not self.streams_ok:
                why.append("not every exchange streamed")
            if not self.completeness_ok:
                why.append("completeness missing for the seeded hours")
            if self.problems:
                why.append("see the problems above")
            out.append("FAILED: " + "; ".join(why))
        return "\n".join(line.rstrip() for line in out)


def stream_lines(
    snapshot: StatusSnapshot, exchanges: Sequence[str], connected: set[str]
) -> list[StreamLine]:
    """Per exchange: connections' reconnects and malformed frames, pairs' candle events."""
    lines = {ex: StreamLine(ex, connected=ex in connected) for ex in exchanges}
    for c in snapshot.connections:
        line = lines.get(c.exchange)
        if line is None:
            continue
        line.reconnects += c.reconnects
        line.malformed += c.malformed
        if c.last_error:
            line.last_error = c.last_error
    for p in snapshot.pairs:
        line = lines.get(p.exchange)
        if line is None:
            continue
        if p.state != "unlisted":
            line.pairs += 1
        line.events += p.messages
    return list(lines.values())


async def completeness_lines(
    db: Database, hours: Sequence[int], pairs: dict[str, list[str]]
) -> list[CompletenessLine]:
    """Sums of ``monitoring.hourly_completeness`` per exchange over the hours and pairs."""
    if not hours:
        return []
    exchanges = [ex for ex, ps in pairs.items() for _ in ps]
    symbols = [p for ps in pairs.values() for p in ps]
    rows = await db.fetch(
        "SELECT h.exchange, count(*) AS rows, sum(h.expected) AS expected,"
        " sum(h.ws_final) AS ws_final, sum(h.rest) AS rest, sum(h.archive) AS archive,"
        " sum(h.trades) AS trades,"
        " sum(h.no_trades) AS no_trades, sum(h.ws_partial) AS ws_partial,"
        " sum(h.missing) AS missing"
        " FROM monitoring.hourly_completeness h"
        " JOIN unnest($3::text[], $4::text[]) AS c(exchange, symbol)"
        "   ON c.exchange = h.exchange AND c.symbol = h.symbol"
        " WHERE h.hour_start >= $1 AND h.hour_start < $2"
        " GROUP BY h.exchange ORDER BY h.exchange",
        to_datetime(hours[0]),
        to_datetime(hours[-1] + HOUR_MS),
        exchanges,
        symbols,
    )
    return [
        CompletenessLine(
            r["exchange"],
            rows=int(r["rows"]),
            expected=int(r["expected"]),
            counts={s: int(r[s]) for s in SOURCES},
        )
        for r in rows
    ]


async def datasets_line(db: Database, root: str) -> DatasetsLine:
    row = await db.fetchrow(
        "SELECT count(*) AS files, coalesce(sum(rows), 0) AS rows, count(s3_key) AS mirrored"
        " FROM ops.published"
    )
    if row is None:  # pragma: no cover - an aggregate always returns a row
        return DatasetsLine(root=root)
    return DatasetsLine(int(row["files"]), int(row["rows"]), int(row["mirrored"]), root)


async def gold_rows(
    db: Database, hours: Sequence[int], pairs: dict[str, list[str]]
) -> dict[str, dict[str, int]]:
    """Gold rows per exchange and interval whose bucket overlaps the seeded hours."""
    out: dict[str, dict[str, int]] = {ex: {} for ex in pairs}
    if not hours:
        return out
    exchanges = [ex for ex, ps in pairs.items() for _ in ps]
    symbols = [p for ps in pairs.values() for p in ps]
    for table in GOLD_TABLES:
        rows = await db.fetch(
            f"SELECT g.exchange, count(*) AS n FROM gold.ohlcv_{table} g"  # fixed table names
            " JOIN unnest($3::text[], $4::text[]) AS c(exchange, symbol)"
            "   ON c.exchange = g.exchange AND c.symbol = g.symbol"
            " WHERE g.interval_end > $1 AND g.interval_start < $2 GROUP BY g.exchange",
            to_datetime(hours[0]),
            to_datetime(hours[-1] + HOUR_MS),
            exchanges,
            symbols,
        )
        for r in rows:
            out.setdefault(r["exchange"], {})[table] = int(r["n"])
    return out
