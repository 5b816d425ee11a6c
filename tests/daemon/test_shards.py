"""Beyond one machine, on one machine: two capture daemons (shards 1/2 and 2/2) and one chain
daemon share moto's S3 lake and one PostgreSQL, against the simulator with faults.

Every daemon runs on the simulator's accelerated clock (a sim minute per wall second): the
capture hosts stream their share of the pairs for a quarter of an hour, the chain host streams
nothing, loads every part from S3, gap-fills the rest over REST (into the lake first) and
builds silver, gold and completeness. Silver must equal the simulator's truth, every part must
be loaded exactly once, and completeness must be 100%.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from klined.lake import parse_key, read_part
from klined.model import HOUR_MS, shard_of, to_datetime
from klined.sim import SimClock
from klined.warehouse.database import open_database
from tests.fixtures.sim import SIM_PAIRS, SimFactory
from tests.support.scenario import (
    FAULTS,
    H1,
    HOURS,
    START,
    host_config,
    hosts,
    s3_parts,
    until_settled,
)
from tests.support.truth import assert_completeness, assert_gold_is_truth, assert_silver_is_truth

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_two_capture_shards_and_a_chain_host_build_the_truth(
    sim_factory: SimFactory, tmp_path: Path, s3_endpoint: str, s3_bucket: str, pg_dsn: str
) -> None:
    pairs = list(SIM_PAIRS)
    s3 = (s3_endpoint, s3_bucket)
    async with sim_factory(clock=SimClock(START, 60.0), faults=FAULTS) as sim:
        shard1 = host_config(
            tmp_path, "capture1", sim, s3, pg_dsn, 'role = "capture"\nshard = "1/2"'
        )
        shard2 = host_config(
            tmp_path, "capture2", sim, s3, pg_dsn, 'role = "capture"\nshard = "2/2"'
        )
        chain = host_config(tmp_path, "chain", sim, s3, pg_dsn, 'role = "chain"')
        async with hosts([shard1, shard2, chain], sim) as (one, two, host):
            assert not host.streams and host.writer is None
            snaps = [d.snapshot() for d in (one, two, host)]
            assert [(s.role, s.shard) for s in snaps] == [
                ("capture", "1/2"), ("capture", "2/2"), ("chain", "1/1"),
            ]  # fmt: skip
            streamed = [{(p.exchange, p.symbol) for p in s.pairs} for s in snaps[:2]]
            everything = {(ex, p) for ex in ("binance", "kraken") for p in pairs}
            assert streamed[0] | streamed[1] == everything and not streamed[0] & streamed[1]
            for k, share in enumerate(streamed, 1):
                assert all(shard_of(ex, p, 2) == k for ex, p in share)
            assert snaps[2].pairs == [] and snaps[2].configured_pairs == len(everything)

            await until_settled(sim, chain, s3, len(everything))

    # every part of the closed hours that reached S3 was loaded exactly once, and nothing else
    parts = {
        k: v for k, v in s3_parts(*s3).items() if parse_key(k).hour_ms <= H1
    }  # every host's parts, captured and gap-filled
    writers = Counter(k.rsplit("-", 2)[-2].split("_")[0] for k in parts)
    assert {"s1of2", "s2of2", "fill"} <= set(writers), writers
    for key in parts:  # a shard's writer only ever wrote its own pairs
        if "-s1of2_" in key or "-s2of2_" in key:
            pk = parse_key(key)
            assert shard_of(pk.exchange, pk.symbol, 2) == (1 if "-s1of2_" in key else 2)
    async with open_database(chain) as db:
        ledger = {
            r["lake_key"]: r["rows"]
            for r in await db.fetch(
                "SELECT lake_key, rows FROM ops.lake_parts WHERE hour_start <= $1", to_datetime(H1)
            )
        }
        assert ledger == {k: len(read_part(v).records) for k, v in parts.items()}
        per_key = await db.fetch(
            "SELECT lake_key, count(*) AS n FROM bronze.bronze_ohlcv_native"
            " WHERE interval_start < $1 GROUP BY lake_key",
            to_datetime(H1 + HOUR_MS),
        )
        assert None not in {r["lake_key"] for r in per_key}
        assert sum(r["n"] for r in per_key) == sum(ledger.values())
        assert (
            await db.fetchval(
                "SELECT count(*) FROM bronze.bronze_ohlcv_native WHERE lake_key IS NULL"
            )
            == 0
        )
        start, end = HOURS[0], H1 + HOUR_MS
        for ex in ("binance", "kraken"):
            counts = await assert_silver_is_truth(db, sim, ex, pairs, start, end)
            assert counts.get("ws_final", 0) > 0 and counts.get("rest", 0) > 0, counts
            assert await assert_gold_is_truth(db, sim, ex, pairs, start, end) > 0
            await assert_completeness(db, ex, pairs, HOURS)
    fired = {f.kind for f in sim.faults.fired}
    assert {"disconnect", "duplicate", "malformed", "http_5xx", "http_429"} <= fired, fired
