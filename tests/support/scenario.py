"""A lake and a warehouse made the way production makes them: daemons against the simulator
with faults, on its accelerated clock (shared by the shard, rebuild and Spark tests).

The simulator starts at :data:`START`, a quarter of an hour before hour 02:00 closes; the chain
builds hour 01 once it closes (its first three quarters from REST, the rest from the streams). Every
daemon writes to S3 (moto) and, when it runs the chain, to one PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import boto3

from klined.config import Config, load_config
from klined.daemon.process import Daemon
from klined.lake import parse_key
from klined.model import HOUR_MS, MINUTE_MS, floor_hour, to_datetime
from klined.sim import FaultPlan, FaultRule, Simulator
from klined.warehouse.database import open_database
from tests.daemon.test_run import write_config

#: 2026-01-01T01:44:50Z: a quarter of an hour streamed before hour 01 closes
START = 1_767_231_890_000
H1 = floor_hour(START)
#: the hours the scenario completes: the streamed one (the pairs' coverage starts with the
#: capture, so the catch-up does not reach back before it)
HOURS = [H1]

FAULTS = FaultPlan(
    rules=[
        FaultRule(kind="disconnect", exchange="binance", connection=1, message=25),
        FaultRule(kind="close", exchange="kraken", connection=2, min_second=20, message=10),
        FaultRule(kind="duplicate", exchange="binance", times=3),
        FaultRule(kind="malformed", exchange="kraken", message=15, variant="garbage"),
        FaultRule(kind="out_of_order", exchange="binance", message=30),
        FaultRule(kind="late_final", exchange="binance", pair="ETH/USD", delay_s=65),
        FaultRule(kind="http_5xx", exchange="binance", endpoint="klines", request=1),
        FaultRule(kind="http_429", exchange="kraken", endpoint="OHLC", request=2),
    ]
)


def host_config(
    tmp_path: Path, name: str, sim: Simulator, s3: tuple[str, str], dsn: str, daemon: str = ""
) -> Config:
    """The same settings on every host (a host's own data folder aside); ``daemon`` adds lines
    to ``[daemon]`` (role, shard)."""
    folder = tmp_path / name
    folder.mkdir()
    path = write_config(folder, sim, s3=s3, chain=True, dsn=dsn)
    text = path.read_text().replace("[daemon]\n", f"[daemon]\n{daemon}\n")
    text = text.replace("catchup_hours = 0", "catchup_hours = 2")
    text = text.replace("rest_retry_hours = 0", 'rest_retry_hours = 2\nschedule = "*/5 * * * *"')
    text = text.replace("[lake]\n", "[lake]\nhour_grace_s = 30\n")
    # the chain alone builds silver here: the live path would add the next hour's first finals
    # too, which no closed-hour comparison (rebuild, Spark) covers
    text += "[live]\nenabled = false\n"
    path.write_text(text)
    return load_config(path)


@asynccontextmanager
async def hosts(configs: list[Config], sim: Simulator) -> AsyncIterator[list[Daemon]]:
    """Daemons in this process on the simulator's clock, stopped gracefully in order."""
    daemons = [
        Daemon(
            cfg,
            handle_signals=False,
            clock_ms=sim.clock.now_ms,
            chain_options={"nap_s": 0.2, "lock_wait_s": 30},
            uploader_options={"backoff_initial_s": 0.1, "backoff_max_s": 0.5},
        )
        for cfg in configs
    ]
    async with anyio.create_task_group() as tg:
        for daemon in daemons:
            await tg.start(daemon.run)
        try:
            yield daemons
        finally:
            for daemon in daemons:  # capture hosts first: their last parts reach S3
                daemon.request_stop()


def s3_parts(endpoint: str, bucket: str, prefix: str = "raw/") -> dict[str, bytes]:
    """Every lake part in the bucket: lake key -> bytes (the published datasets left out)."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"].removeprefix(prefix)
            if not key.startswith("exchange="):
                continue  # the published datasets live beside the lake (datasets/...)
            out[key] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


async def until_settled(
    sim: Simulator, chain: Config, s3: tuple[str, str], pairs: int, limit_s: float = 150.0
) -> None:
    """Until hour 01 is closed, complete for ``pairs`` pairs, and every part of the hours up to
    it that reached S3 is in ``ops.lake_parts``."""

    async def settled() -> bool:
        if sim.clock.now_ms() < H1 + HOUR_MS + 10 * MINUTE_MS:
            return False
        parts = await anyio.to_thread.run_sync(s3_parts, *s3)
        keys = {k for k in parts if parse_key(k).hour_ms <= H1}
        async with open_database(chain) as db:
            rows = await db.fetch("SELECT lake_key FROM ops.lake_parts")
            complete = await db.fetchval(
                "SELECT count(*) FROM monitoring.hourly_completeness"
                " WHERE hour_start = $1 AND completion_rate = 1",
                to_datetime(H1),
            )
        return keys <= {r["lake_key"] for r in rows} and complete == pairs

    with anyio.fail_after(limit_s):
        while not await settled():  # noqa: ASYNC110 - polling the warehouse and S3
            await anyio.sleep(1.0)
