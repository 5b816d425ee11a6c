"""Rows that did not come from a stream enter the lake first, then bronze through the ledger.

Everything in bronze must be reproducible from the lake alone (``klined rebuild``, the Spark
job, a lost database): so REST and trades candles and no-trade rows are not inserted into
bronze directly. :class:`LakeIngest` writes each batch as sealed lake parts (same hour folders
as the captured events, tagged ``fill_`` in the name, each line's ``origin`` saying ``rest``,
``trades`` or ``no_trades``), uploads them to S3 and verifies them when a bucket is configured
(as the flush step does for captured parts), and only then loads them through
``ops.lake_parts``, like any other part: each row is in bronze exactly once, with its
``lake_key``.

A failure after the parts are written (S3 down, the database gone) leaves them sealed in the
local lake: the next chain's flush step uploads them and its bronze step loads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio

from klined.config import Config
from klined.jobs import bronze
from klined.lake import LakeStore, LakeUploader, PartRef
from klined.lake.sealed import SealedPartWriter
from klined.model import Candle, CandleRecord, iso
from klined.warehouse.database import Database


class LakeIngest:
    """Writes rows to the lake as sealed parts, uploads them, loads them into bronze."""

    def __init__(
        self, db: Database, lake: LakeStore, *, tag: str = "fill_", level: int = 1
    ) -> None:
        self.db = db
        self.lake = lake
        self.writer = SealedPartWriter(lake.root, tag=tag, level=level)
        self.parts_written = 0

    async def rows(self, candles: Iterable[Candle | CandleRecord], *, reason: str) -> int:
        """Validate, write, upload, load; returns the rows loaded into bronze.

        An invalid candle raises ``ValueError`` before anything is written.
        """
        items = list(candles)
        for candle in items:
            why = bronze.validate_record(candle)
            if why is not None:
                raise ValueError(
                    f"refusing candle {candle.exchange} {candle.symbol}"
                    f" @ {iso(candle.interval_start)}: {why}"
                )
        if not items:
            return 0
        written = await anyio.to_thread.run_sync(self.writer.write, items)
        self.parts_written += len(written)
        upload: Any = getattr(self.lake, "upload", None)
        if self.lake.enabled and upload is not None:
            await upload([(p.key, p.size) for p in written])
        refs = [
            PartRef(
                key=p.key,
                exchange=p.exchange,
                symbol=p.symbol,
                hour_ms=p.hour_ms,
                size=p.size,
                local_path=p.path,
            )
            for p in written
        ]
        return await bronze.load_parts(self.db, refs, self.lake, reason=reason)


def configured_lake(cfg: Config) -> LakeUploader:
    """The lake of the configuration: the local spool and, when configured, its S3 mirror."""
    return LakeUploader(cfg.lake_root, cfg.lake, cfg.s3)


def ingest_for(db: Database, cfg: Config, lake: Any = None) -> LakeIngest:
    """A :class:`LakeIngest` on ``lake`` (a :class:`LakeStore`), else the configured lake."""
    store = lake if isinstance(lake, LakeStore) else configured_lake(cfg)
    return LakeIngest(db, store, level=cfg.lake.compress_level)
