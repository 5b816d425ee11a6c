"""Partition upkeep for the chain: hourly partitions ahead of time, old bronze dropped.

Inserts never depend on this step (every insert path calls ``Database.ensure_partitions``
first); creating partitions ahead just keeps that off the hot path, and dropping old bronze
partitions keeps bronze at its retention (the lake keeps the raw history; silver is kept).
"""

from __future__ import annotations

import time

from klined.jobs.ops import StepResult
from klined.model import floor_hour
from klined.warehouse.database import Database

STEP = "partitions"


async def maintain(
    db: Database,
    now_ms: int | None = None,
    *,
    hours_ahead: int | None = None,
    retention_days: int | None = None,
) -> StepResult:
    """Create partitions up to ``partitions_ahead_hours`` ahead; drop bronze past retention.

    Defaults come from ``DatabaseConfig``. Returns rows = partitions created + dropped;
    details: ``created``, ``dropped`` (hour starts in ms).
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    created = await db.ensure_partitions_ahead(now, hours_ahead)
    dropped = await db.drop_old_bronze(retention_days, now_ms=now)
    return StepResult(
        step=STEP,
        hour_ms=floor_hour(now),
        rows=created + len(dropped),
        details={"created": created, "dropped": dropped},
    )
