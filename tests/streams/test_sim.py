"""Streams against the simulator's real WebSocket servers, with faults: nothing lost, nothing
stored twice, finality exactly as the rules say."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from klined.config import LakeConfig
from klined.exchanges import get_adapter
from klined.lake import LakeWriter
from klined.model import Pair
from klined.sim import FaultPlan, FaultRule
from klined.status import StreamState
from klined.streams import ExchangeStreams, StreamSettings
from tests.fixtures.sim import SIM_PAIRS, SimFactory
from tests.support.streams import (
    assert_exactly_once,
    assert_kraken_finality,
    lake_records,
    rest_client,
    until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SETTINGS = StreamSettings(
    stale_after_s=1.0,
    connect_timeout_s=3.0,
    subscribe_timeout_s=3.0,
    backoff_initial_s=0.05,
    backoff_max_s=0.3,
    healthy_after_s=0.5,
    close_timeout_s=1.0,
)

FAULTS = FaultPlan(
    rules=[
        # Binance: bad frames, a clean close, an abrupt reset, a silent stall, duplicate finals
        FaultRule(kind="malformed", exchange="binance", connection=1, message=5, variant="garbage"),
        FaultRule(kind="malformed", exchange="binance", connection=1, message=8,
                  variant="wrong_types", replace=True),
        FaultRule(kind="close", exchange="binance", connection=1, message=25),
        FaultRule(kind="disconnect", exchange="binance", connection=2, message=15),
        FaultRule(kind="stall", exchange="binance", connection=3, message=10, duration_s=2.0),
        FaultRule(kind="duplicate", exchange="binance", connection=4, times=3),
        # Kraken: bad frames, a reset mid-minute, a stall, a clean close
        FaultRule(kind="malformed", exchange="kraken", connection=1, message=6,
                  variant="truncated"),
        FaultRule(kind="malformed", exchange="kraken", connection=1, message=9, variant="nan",
                  replace=True),
        FaultRule(kind="disconnect", exchange="kraken", connection=1, message=40, min_second=20),
        FaultRule(kind="stall", exchange="kraken", connection=2, message=20, duration_s=2.0,
                  then="disconnect"),
        FaultRule(kind="close", exchange="kraken", connection=3, message=30),
    ]
)  # fmt: skip


async def test_every_sent_event_reaches_the_lake_exactly_once_through_faults(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    root = tmp_path / "lake"
    writer = LakeWriter(root, LakeConfig(flush_interval_s=0.2))
    pairs = [Pair.parse(p) for p in SIM_PAIRS]
    async with (
        sim_factory(faults=FAULTS) as sim,
        rest_client(get_adapter("binance"), sim.binance_rest_url) as binance,
        rest_client(get_adapter("kraken"), sim.kraken_rest_url) as kraken,
        anyio.create_task_group() as tg,
    ):
        await tg.start(writer.run)
        streams = [
            ExchangeStreams(
                client.adapter,
                sim.urls(client.exchange)[0],
                pairs,
                SETTINGS,
                writer.append,
                fetch_listing=client.fetch_listing,
            )
            for client in (binance, kraken)
        ]
        for es in streams:
            await tg.start(es.run)
        conns = [c for es in streams for c in es.connections]
        # every fault fired and each exchange is streaming again on its fourth connection
        await until(lambda: len(sim.faults.fired) >= 12, 40)
        await until(lambda: all(c.status.state == StreamState.CONNECTED for c in conns))
        await anyio.sleep(1.0)
        # stop the exchanges first, so every event they sent has been received
        await sim.stop()
        await until(lambda: all(c.status.state != StreamState.CONNECTED for c in conns))
        for es in streams:
            es.refresh(1.0)
        tg.cancel_scope.cancel()
    await writer.aclose()

    records = lake_records(root)
    n = assert_exactly_once(sim.log, records, {"binance", "kraken"})
    assert n > 200
    assert sum(e.duplicate for e in sim.log) == 3
    finals = assert_kraken_finality(sim, records)
    assert finals >= 8
    binance_finals = [r for r in records if r.exchange == "binance" and r.is_final]
    assert len(binance_finals) >= 8

    by_id = {c.status.conn_id: c.status for es in streams for c in es.connections}
    assert by_id["binance-0"].reconnects >= 3 and by_id["kraken-0"].reconnects >= 3
    assert by_id["binance-0"].malformed >= 1 and by_id["kraken-0"].malformed >= 1
    # the Kraken session the reset cut mid-minute left that minute without a final
    kraken = sorted((r for r in records if r.exchange == "kraken"), key=lambda r: r.ingestion_ts)
    cut = [r for r in kraken if r.session_id == kraken[0].session_id]
    newest = max(r.interval_start for r in cut)
    assert [r for r in cut if r.interval_start == newest and r.is_final] == []
    for es in streams:
        for ps in es.pair_statuses():
            assert ps.messages > 0 and ps.last_final_minute_ms is not None
