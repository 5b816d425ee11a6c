"""Rows that did not come from a stream enter the lake first, then bronze through the ledger.

Everything in bronze must be reproducible from the lake alone (``klined rebuild``, the Spark
job, a lost database): so REST and trades candles, no-trade rows and the rows of the exchanges'
archive files are not inserted into bronze directly. :class:`LakeIngest` writes each batch as
sealed lake parts (same hour folders as the captured events, tagged in the name: ``fill_`` for
gap-fill, ``archive_`` for archive files; each line's ``origin`` saying ``rest``, ``trades``,
``no_trades`` or ``archive``), uploads them to S3 and verifies them when a bucket is
configured (as the flush step does for captured parts), and only then loads them through
``ops.lake_parts``, like any other part: each row is in bronze exactly once, with its
``lake_key``.

A failure after the parts are written (S3 down, the database gone) leaves them sealed in the
local lake: the next chain's flush step uploads them and its bronze step loads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import anyio

from klined.config import Config
from klined.jobs import bronze
from klined.jobs.bronze_rows import validate_record
from klined.lake import LakeStore, LakeUploader, PartRef
from klined.lake.sealed import SealedPartWriter, StagedParts, WrittenPart
from klined.model import Candle, CandleRecord, iso
from klined.warehouse.database import Database


class LakeIngest:
    """Writes rows to the lake as sealed parts, uploads them, loads them into bronze.

    ``tag`` names the writer in every part's key (``fill_`` for gap-fill, ``archive_`` for the
    exchanges' archive files). :meth:`rows` does it all for one batch; a producer whose rows
    must become visible all together or not at all stages them first (:meth:`staging`),
    publishes them, then loads them with :meth:`load`.
    """

    def __init__(
        self, db: Database, lake: LakeStore, *, tag: str = "fill_", level: int = 1
    ) -> None:
        self.db = db
        self.lake = lake
        self.tag = tag
        self.level = level
        self.writer = SealedPartWriter(lake.root, tag=tag, level=level)
        self.parts_written = 0

    async def rows(self, candles: Iterable[Candle | CandleRecord], *, reason: str) -> int:
        """Validate, write, upload, load; returns the rows loaded into bronze.

        An invalid candle raises ``ValueError`` before anything is written.
        """
        items = list(candles)
        for candle in items:
            why = validate_record(candle)
            if why is not None:
                raise ValueError(
                    f"refusing candle {candle.exchange} {candle.symbol}"
                    f" @ {iso(candle.interval_start)}: {why}"
                )
        if not items:
            return 0
        written = await anyio.to_thread.run_sync(self.writer.write, items)
        return await self.load(written, reason=reason)

    def staging(self) -> StagedParts:
        """A group of parts that become visible together (:class:`StagedParts`), under a
        writer of its own (groups staged at once never share a counter)."""
        return StagedParts(SealedPartWriter(self.lake.root, tag=self.tag, level=self.level))

    async def load(
        self,
        written: Sequence[WrittenPart],
        *,
        reason: str,
        hours_per_batch: int = 1,
        finish: bronze.Finish | None = None,
    ) -> int:
        """Upload (when S3 is configured) and load sealed parts into bronze, oldest first,
        ``hours_per_batch`` hours of parts per transaction, each batch in S3 before it is
        loaded; ``finish(conn)`` runs inside the last batch's transaction
        (:func:`klined.jobs.bronze.load_parts`). Returns the rows loaded.

        Raises :class:`klined.errors.LakeError` when S3 refuses a part after its retries; the
        batches before it stay loaded, the parts from it on stay sealed in the local lake.
        """
        self.parts_written += len(written)
        by_hour: dict[int, list[WrittenPart]] = {}
        for part in written:
            by_hour.setdefault(part.hour_ms, []).append(part)
        if not by_hour:
            return await bronze.load_parts(self.db, [], self.lake, reason=reason, finish=finish)
        hours = sorted(by_hour)
        size = max(1, hours_per_batch)
        upload: Any = getattr(self.lake, "upload", None)
        rows = 0
        for i in range(0, len(hours), size):
            batch = [p for hour in hours[i : i + size] for p in by_hour[hour]]
            if self.lake.enabled and upload is not None:
                await upload([(p.key, p.size) for p in batch])
            refs = [
                PartRef(
                    key=p.key,
                    exchange=p.exchange,
                    symbol=p.symbol,
                    hour_ms=p.hour_ms,
                    size=p.size,
                    local_path=p.path,
                )
                for p in batch
            ]
            last = i + size >= len(hours)
            rows += await bronze.load_parts(
                self.db, refs, self.lake, reason=reason, hours_per_batch=size,
                finish=finish if last else None,
            )  # fmt: skip
        return rows


def configured_lake(cfg: Config) -> LakeUploader:
    """The lake of the configuration: the local spool and, when configured, its S3 mirror."""
    return LakeUploader(cfg.lake_root, cfg.lake, cfg.s3)


def ingest_for(db: Database, cfg: Config, lake: Any = None, *, tag: str = "fill_") -> LakeIngest:
    """A :class:`LakeIngest` on ``lake`` (a :class:`LakeStore`), else the configured lake;
    ``tag`` names the writer in the part keys."""
    store = lake if isinstance(lake, LakeStore) else configured_lake(cfg)
    return LakeIngest(db, store, tag=tag, level=cfg.lake.compress_level)
