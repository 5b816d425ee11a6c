"""``klined export``: silver or gold candles of a time range, streamed into Hive-partitioned files.

Layout under the output (a folder or ``s3://bucket/prefix``)::

    exchange=binance/year=2026/month=11/candles.parquet     (or .csv / .jsonl)
    _manifest.json

``symbol`` is a column; ``exchange``, ``year`` and ``month`` come from the path, as every Hive
reader takes them. Each partition is one exchange's month, written from one consistent
snapshot (a read-only repeatable-read transaction) by a server-side COPY, a block at a time.

Idempotent reruns: a partition is always replaced whole, atomically (see
:mod:`klined.datasets.targets`), and holds one contiguous range of time. An export that
touches a partition already in the manifest writes the union of its old range and the new one,
read afresh from the warehouse, so exporting November day by day into one folder builds the
whole month, and re-exporting a range rewrites it with what the warehouse holds now. An output
belongs to one dataset: the same interval, format, pairs and ``--final-only`` (else the export
refuses, exit 2). The manifest lists every partition with its range, row count, symbols, first
and last candle, bytes and SHA-256; it is rewritten after each partition, so it always
describes the files in place (on S3 a reader may briefly see a new file with the previous
manifest entry: compare the checksum).
"""

from __future__ import annotations

import calendar
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec

from klined.config import Config
from klined.datasets.formats import FORMATS, file_name, open_sink
from klined.datasets.schema import DECIMAL_TEXT, Dataset
from klined.datasets.stream import copy_tables
from klined.datasets.targets import (
    MANIFEST,
    LocalTarget,
    Target,
    decode_json,
    sha256_file,
    target_for,
)
from klined.errors import DatasetError, UsageError
from klined.model import EXCHANGES, iso, parse_time, to_datetime
from klined.warehouse.database import Database

MANIFEST_VERSION = 1


@dataclass(frozen=True, slots=True)
class ExportRequest:
    start_ms: int
    end_ms: int
    out: str
    interval: str = "1m"
    fmt: str = "parquet"
    exchanges: tuple[str, ...] = ()  # empty: every exchange klined knows
    pairs: tuple[str, ...] = ()  # empty: every pair
    final_only: bool = False

    def __post_init__(self) -> None:
        if self.end_ms <= self.start_ms:
            raise UsageError(
                f"empty or reversed range: --from {iso(self.start_ms)} --to {iso(self.end_ms)}"
            )
        if self.fmt not in FORMATS:
            raise UsageError(f"unknown format {self.fmt!r}; use one of {', '.join(FORMATS)}")
        Dataset(self.interval)  # validates
        unknown = [e for e in self.exchanges if e not in EXCHANGES]
        if unknown:
            raise UsageError(
                f"unknown exchange {unknown[0]!r}; klined knows {', '.join(EXCHANGES)}"
            )

    @property
    def dataset(self) -> Dataset:
        return Dataset(self.interval)


def request_from_options(
    start: str,
    end: str,
    out: str,
    *,
    interval: str = "1m",
    fmt: str = "parquet",
    exchanges: tuple[str, ...] = (),
    pairs: tuple[str, ...] = (),
    final_only: bool = False,
) -> ExportRequest:
    """The request the command line describes (bad values are :class:`UsageError`)."""
    from klined.model import Pair

    def when(text: str, what: str) -> int:
        try:
            return parse_time(text)
        except ValueError as exc:
            raise UsageError(f"{what}: {exc}") from None

    try:
        canonical = tuple(sorted({str(Pair.parse(p)) for p in pairs}))
    except ValueError as exc:
        raise UsageError(f"--pair: {exc}") from None
    return ExportRequest(
        start_ms=when(start, "--from"),
        end_ms=when(end, "--to"),
        out=out,
        interval=interval,
        fmt=fmt,
        exchanges=tuple(dict.fromkeys(exchanges)),
        pairs=canonical,
        final_only=final_only,
    )


@dataclass(slots=True)
class Partition:
    """One exchange's month: where it goes and the range it holds."""

    exchange: str
    key: str  # exchange=E/year=YYYY/month=MM
    start_ms: int
    end_ms: int
    rows: int = 0
    bytes: int = 0
    sha256: str = ""
    symbols: int = 0
    removed: bool = False


@dataclass(slots=True)
class ExportResult:
    where: str
    partitions: list[Partition] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.partitions)


class Progress:
    """What an export reports as it goes (the command draws a bar from it)."""

    def start(self, estimated_rows: int) -> None:
        """Called once, before the first partition, with the planner's estimate."""

    def partition(self, key: str) -> None:
        """A partition starts."""

    def advance(self, rows: int) -> None:
        """``rows`` more rows are written."""


def months(start_ms: int, end_ms: int) -> list[tuple[int, int, int, int]]:
    """``(year, month, month start, month end)`` of the UTC months overlapping the range."""
    out: list[tuple[int, int, int, int]] = []
    t = time.gmtime(start_ms // 1000)
    year, month = t.tm_year, t.tm_mon
    while True:
        first = calendar.timegm((year, month, 1, 0, 0, 0)) * 1000
        if first >= end_ms:
            return out
        year2, month2 = (year + 1, 1) if month == 12 else (year, month + 1)
        nxt = calendar.timegm((year2, month2, 1, 0, 0, 0)) * 1000
        out.append((year, month, first, nxt))
        year, month = year2, month2


def _identity(req: ExportRequest) -> dict[str, Any]:
    """What makes an output one dataset: every export into it must agree."""
    return {
        "dataset": req.dataset.name,
        "interval": req.interval,
        "format": req.fmt,
        "pairs": list(req.pairs) or None,
        "final_only": req.final_only,
    }


def _new_manifest(req: ExportRequest) -> dict[str, Any]:
    ds = req.dataset
    return {
        "klined": "export",
        "version": MANIFEST_VERSION,
        **_identity(req),
        "file": file_name(req.fmt),
        "partitioning": ["exchange", "year", "month"],
        "columns": [{"name": f.name, "type": str(f.type)} for f in ds.schema],
        "decimals": (
            f"{DECIMAL_TEXT}: exact; vwap is carried rounded half away from zero to 18 "
            "decimal places (a quotient, not an exchange number)"
        ),
        "partitions": {},
    }


def _check_identity(manifest: dict[str, Any], req: ExportRequest, where: str) -> None:
    if manifest.get("klined") != "export":
        raise UsageError(f"{where} holds a {MANIFEST} that klined did not write; use another --out")
    mine = _identity(req)
    theirs = {k: manifest.get(k) for k in mine}
    if theirs != mine:
        diff = ", ".join(
            f"{k} {theirs[k]!r} (not {mine[k]!r})" for k in mine if theirs[k] != mine[k]
        )
        raise UsageError(
            f"{where} holds another export ({diff}); export into another --out, "
            "or repeat the options it was made with"
        )


def plan(req: ExportRequest, manifest: dict[str, Any]) -> list[Partition]:
    """The partitions the export writes, each widened to cover what it held before."""
    known = manifest.get("partitions", {})
    out = []
    for exchange in req.exchanges or EXCHANGES:
        for year, month, first, nxt in months(req.start_ms, req.end_ms):
            key = f"exchange={exchange}/year={year:04d}/month={month:02d}"
            lo, hi = max(req.start_ms, first), min(req.end_ms, nxt)
            old = known.get(key)
            if old is not None:
                lo = min(lo, parse_time(old["from"]))
                hi = max(hi, parse_time(old["to"]))
            out.append(Partition(exchange, key, lo, hi))
    return out


def _args(req: ExportRequest, part: Partition) -> list[Any]:
    args: list[Any] = [part.exchange, to_datetime(part.start_ms), to_datetime(part.end_ms)]
    if req.pairs:
        args.append(list(req.pairs))
    return args


async def _estimate(db: Database, sql: str, args: list[Any]) -> int:
    """The planner's row estimate (cheap; good enough for a progress bar)."""
    plan_json = await db.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    parsed = msgspec.json.decode(plan_json) if isinstance(plan_json, str | bytes) else plan_json
    return int(parsed[0]["Plan"]["Plan Rows"])


@dataclass(slots=True)
class Written:
    """One file written by :func:`write_partition` (``rows == 0``: removed instead)."""

    rows: int = 0
    bytes: int = 0
    sha256: str = ""
    symbols: int = 0
    first: int | None = None  # interval_start, ms
    last: int | None = None
    replaced: bool = False  # False when nothing changed in place (no rows, or the same bytes)


async def write_partition(
    db: Database,
    target: Target,
    ds: Dataset,
    fmt: str,
    sql: str,
    args: list[Any],
    rel: str,
    *,
    where: str,
    on_rows: Callable[[int], None] | None = None,
    unless_sha256: str | None = None,
) -> Written:
    """Stream one query into one file at ``rel`` of ``target``, replacing it whole.

    With no rows the file is removed instead. With ``unless_sha256``, a new file with that
    checksum, when the file is in place, is dropped: the one in place is the same.
    """
    tmp = target.scratch(rel)
    sink = open_sink(fmt, tmp, ds)
    try:
        async with (
            db.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            await conn.execute("SET LOCAL statement_timeout = 0")  # a month may take minutes
            await copy_tables(
                conn, sql, args, ds, sink.write, where=where, on_rows=on_rows,
                as_text=sink.as_text,
            )  # fmt: skip
        await anyio.to_thread.run_sync(sink.close)
    except BaseException:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):  # the first error is the one to report
                await anyio.to_thread.run_sync(sink.close)
            await anyio.Path(tmp).unlink(missing_ok=True)
        raise
    if not sink.rows:
        await anyio.Path(tmp).unlink(missing_ok=True)
        await target.remove(rel)
        return Written()
    done = Written(
        rows=sink.rows,
        bytes=(await anyio.Path(tmp).stat()).st_size,
        sha256=await anyio.to_thread.run_sync(sha256_file, tmp),
        symbols=len(sink.symbols),
        first=sink.first,
        last=sink.last,
    )
    if unless_sha256 == done.sha256 and isinstance(target, LocalTarget) and target.exists(rel):
        await anyio.Path(tmp).unlink(missing_ok=True)
        return done
    await target.install(rel, tmp)
    done.replaced = True
    return done


async def run_export(
    db: Database, cfg: Config, req: ExportRequest, *, progress: Progress | None = None
) -> ExportResult:
    """Export the request's candles (see the module docstring); :class:`DatasetError` when a
    value does not fit or the output cannot be written, :class:`UsageError` for an output
    holding another dataset."""
    progress = progress or Progress()
    started = time.monotonic()
    target = target_for(req.out, cfg.s3)
    ds = req.dataset
    name = file_name(req.fmt)
    result = ExportResult(where=target.describe())
    with target.lock():
        manifest = decode_json(
            await target.read_bytes(MANIFEST), target.describe(MANIFEST)
        ) or _new_manifest(req)
        _check_identity(manifest, req, target.describe())
        parts = plan(req, manifest)
        sql = ds.select(pairs=bool(req.pairs), final_only=req.final_only)
        progress.start(sum([await _estimate(db, sql, _args(req, p)) for p in parts]))
        for part in parts:
            progress.partition(part.key)
            rel = f"{part.key}/{name}"
            done = await write_partition(
                db, target, ds, req.fmt, sql, _args(req, part), rel,
                where=f"{part.exchange} {ds.name}", on_rows=progress.advance,
            )  # fmt: skip
            part.rows, part.bytes, part.sha256, part.symbols = (
                done.rows, done.bytes, done.sha256, done.symbols,
            )  # fmt: skip
            entries = manifest["partitions"]
            if done.rows:
                entries[part.key] = {
                    "path": rel,
                    "from": iso(part.start_ms),
                    "to": iso(part.end_ms),
                    "rows": done.rows,
                    "symbols": done.symbols,
                    "first_interval_start": None if done.first is None else iso(done.first),
                    "last_interval_start": None if done.last is None else iso(done.last),
                    "bytes": done.bytes,
                    "sha256": done.sha256,
                    "written_at": iso(int(time.time() * 1000)),
                }
            elif part.key in entries:
                del entries[part.key]
                part.removed = True
            else:
                continue  # nothing there, nothing written: not worth a manifest line
            result.partitions.append(part)
            manifest["partitions"] = dict(sorted(entries.items()))
            manifest["updated_at"] = iso(int(time.time() * 1000))
            await target.write_bytes(MANIFEST, msgspec.json.format(msgspec.json.encode(manifest)))
    if not result.partitions and not manifest["partitions"]:
        raise DatasetError(
            f"no {ds.name} candles for {iso(req.start_ms)} .. {iso(req.end_ms)}"
            + (f" of {', '.join(req.pairs)}" if req.pairs else "")
            + " in the warehouse; nothing was written"
        )
    result.seconds = time.monotonic() - started
    return result
