"""The Prometheus endpoint, scraped over real HTTP on loopback."""

from __future__ import annotations

import re
import socket

import anyio
import anyio.lowlevel
import httpx
import pytest

from klined.daemon.metrics import CONTENT_TYPE, MetricsServer, render_metrics
from klined.errors import KlinedError
from klined.status import (
    ChainStatus,
    ConnectionStatus,
    LakeStatus,
    LiveStatus,
    PairStatus,
    StatusSnapshot,
    StreamState,
)

NOW = 1_714_564_800_000

SAMPLE = re.compile(
    r'^([a-z_]+)(\{([a-z]+="(?:[^"\\]|\\.)*"(,[a-z]+="(?:[^"\\]|\\.)*")*)\})? (\S+)$'
)


def snapshot() -> StatusSnapshot:
    return StatusSnapshot(
        pid=7,
        started_ms=NOW - 3_600_000,
        now_ms=NOW,
        uptime_s=3600.0,
        rss_bytes=80_000_000,
        connections=[
            ConnectionStatus(
                exchange="binance",
                conn_id="binance-0",
                state=StreamState.CONNECTED,
                last_message_ms=NOW - 500,
                messages=1000,
                reconnects=1,
            ),
            ConnectionStatus(
                exchange="binance",
                conn_id="binance-1",
                state=StreamState.CONNECTED,
                messages=500,
                reconnects=2,
                malformed=1,
            ),
            ConnectionStatus(
                exchange="kraken",
                conn_id="kraken-0",
                state=StreamState.BACKOFF,
                messages=10,
                reconnects=5,
                malformed=4,
                last_error='reset "by" peer\nagain',
            ),
        ],
        pairs=[
            PairStatus(exchange="binance", symbol="BTC/USD", state=StreamState.CONNECTED),
            PairStatus(exchange="binance", symbol="REKT/USD", state=StreamState.UNLISTED),
            PairStatus(exchange="kraken", symbol="BTC/USD", state=StreamState.STALE),
            PairStatus(exchange="kraken", symbol="ETH/USD", state=StreamState.STALE),
        ],
        lake=LakeStatus(open_parts=4, pending_upload_parts=3, pending_upload_bytes=12345),
        chain=ChainStatus(running=False, last_run_ms=NOW - 600_000),
    )


def parse(text: str) -> dict[str, float]:
    """``name{labels}`` -> value; every non-comment line must be a valid sample."""
    out: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        assert m.group(1) in types, f"{m.group(1)} has no TYPE"
        key = m.group(1) + (m.group(2) or "")
        assert key not in out, f"duplicate sample {key}"
        out[key] = float(m.group(5))
    return out


def test_render_from_snapshot() -> None:
    text = render_metrics(
        snapshot(),
        chain_steps={"bronze": 1.5, "silver": 0.25},
        completeness={"binance": 0.998, "kraken": 1.0},
    )
    m = parse(text)
    assert m['klined_stream_connected{exchange="binance",conn="binance-0"}'] == 1
    assert m['klined_stream_connected{exchange="kraken",conn="kraken-0"}'] == 0
    assert m['klined_stream_last_message_age_seconds{exchange="binance",conn="binance-0"}'] == 0.5
    assert m['klined_messages_total{exchange="binance"}'] == 1500
    assert m['klined_messages_total{exchange="kraken"}'] == 10
    assert m['klined_reconnects_total{exchange="binance"}'] == 3
    assert m['klined_malformed_total{exchange="kraken"}'] == 4
    assert m['klined_pairs{exchange="kraken",state="stale"}'] == 2
    assert m['klined_pairs{exchange="binance",state="unlisted"}'] == 1
    assert m["klined_lake_pending_parts"] == 3
    assert m["klined_lake_pending_bytes"] == 12345
    assert m['klined_chain_step_seconds{step="bronze"}'] == 1.5
    assert m['klined_completeness_ratio{exchange="binance"}'] == 0.998
    assert m["klined_uptime_seconds"] == 3600
    assert m["klined_rss_bytes"] == 80_000_000
    assert m["klined_chain_last_run_timestamp_seconds"] == (NOW - 600_000) / 1000
    assert "# TYPE klined_messages_total counter" in text
    assert text.endswith("\n")


def test_providers_left_out_when_absent() -> None:
    text = render_metrics(snapshot())
    assert "klined_chain_step_seconds" not in text
    assert "klined_completeness_ratio" not in text
    parse(text)


def test_label_values_are_escaped() -> None:
    text = render_metrics(StatusSnapshot(), chain_steps={'we"ird\\step\nx': 1.0})
    assert 'klined_chain_step_seconds{step="we\\"ird\\\\step\\nx"} 1.0' in text
    parse(text)


def test_refuses_non_loopback_host() -> None:
    with pytest.raises(ValueError, match="loopback only"):
        MetricsServer(9100, snapshot, host="0.0.0.0")


@pytest.mark.anyio
async def test_scrape_over_http() -> None:
    calls = {"completeness": 0}

    async def completeness() -> dict[str, float]:
        calls["completeness"] += 1
        await anyio.lowlevel.checkpoint()
        return {"binance": 0.5}

    server = MetricsServer(
        0, snapshot, chain_steps=lambda: {"gold": 2.0}, completeness=completeness
    )
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        assert port == server.bound_port and port > 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            r = await client.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"] == CONTENT_TYPE
            m = parse(r.text)
            assert m['klined_completeness_ratio{exchange="binance"}'] == 0.5
            assert m['klined_chain_step_seconds{step="gold"}'] == 2.0
            assert m['klined_stream_connected{exchange="binance",conn="binance-1"}'] == 1
            assert (await client.get("/metrics")).status_code == 200
            assert (await client.get("/nothing")).status_code == 404
            assert (await client.get("/")).text.startswith("klined metrics")
        tg.cancel_scope.cancel()
    assert calls["completeness"] == 2  # computed per scrape
    # the port is released on exit
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.anyio
async def test_failing_provider_drops_only_its_family() -> None:
    def broken() -> dict[str, float]:
        raise RuntimeError("database down")

    server = MetricsServer(0, snapshot, completeness=broken, chain_steps=lambda: {"flush": 0.1})
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"http://127.0.0.1:{port}/metrics")
        tg.cancel_scope.cancel()
    assert r.status_code == 200
    assert "klined_completeness_ratio" not in r.text
    assert 'klined_chain_step_seconds{step="flush"} 0.1' in r.text


@pytest.mark.anyio
async def test_broken_snapshot_is_a_500() -> None:
    def broken() -> StatusSnapshot:
        raise RuntimeError("board gone")

    async with anyio.create_task_group() as tg:
        port = await tg.start(MetricsServer(0, broken).serve)
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"http://127.0.0.1:{port}/metrics")
        tg.cancel_scope.cancel()
    assert r.status_code == 500


@pytest.mark.anyio
async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(KlinedError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await MetricsServer(port, snapshot).serve()


def test_live_lag_and_drops_are_exported() -> None:
    snap = snapshot()
    assert "klined_live" not in render_metrics(snap)  # the live path is off
    snap.live = LiveStatus(
        enabled=True, state="ok", finals=4000, written=3990, dropped_batches=2,
        dropped_finals=70, queued_batches=1, lag_window_s=300.0, lag_samples=3990,
        lag_p50_s=0.41, lag_p99_s=0.93, lag_max_s=1.2, last_commit_ms=NOW - 2000,
    )  # fmt: skip
    m = parse(render_metrics(snap))
    assert m['klined_live_lag_seconds{quantile="0.5"}'] == 0.41
    assert m['klined_live_lag_seconds{quantile="0.99"}'] == 0.93
    assert m['klined_live_lag_seconds{quantile="1"}'] == 1.2
    assert m["klined_live_up"] == 1 and m["klined_live_queued_batches"] == 1
    assert m["klined_live_finals_total"] == 4000 and m["klined_live_written_total"] == 3990
    assert m["klined_live_dropped_batches_total"] == 2
    assert m["klined_live_dropped_finals_total"] == 70
    assert m["klined_live_last_commit_timestamp_seconds"] == (NOW - 2000) / 1000
    # no commit in the window: no quantiles, the rest stays
    snap.live = LiveStatus(enabled=True, state="failing")
    m = parse(render_metrics(snap))
    assert m["klined_live_up"] == 0 and not any(k.startswith("klined_live_lag") for k in m)
