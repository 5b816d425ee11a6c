"""Simulated Kraken against plain clients (websockets, httpx): documented shapes, truth."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
import websockets

from klined.model import MINUTE_MS, floor_minute, parse_time
from klined.sim import Simulator
from tests.fixtures.sim import SIM_START, SimFactory

pytestmark = pytest.mark.anyio

ITEM_FIELDS = {
    "symbol", "open", "high", "low", "close", "trades", "volume", "vwap", "interval_begin",
    "interval", "timestamp",
}  # fmt: skip
NANO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
MICRO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def decode(raw: str | bytes) -> dict[str, Any]:
    return json.loads(raw, parse_float=Decimal)


async def collect(ws: Any, until: Any, limit_s: float = 20.0) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with anyio.fail_after(limit_s):
        while not until(frames):
            frames.append(decode(await ws.recv()))
    return frames


def subscribe(symbols: list[str], req_id: int | None = 1, **params: Any) -> str:
    body: dict[str, Any] = {
        "method": "subscribe",
        "params": {"channel": "ohlc", "symbol": symbols, "interval": 1, **params},
    }
    if req_id is not None:
        body["req_id"] = req_id
    return json.dumps(body)


def assert_item(sim: Simulator, item: dict[str, Any], upto_ms: int | None) -> None:
    """An ohlc item is the pair's candle over the trades up to ``upto_ms`` (None: whole)."""
    assert set(item) == ITEM_FIELDS
    assert NANO_RE.match(item["interval_begin"]) and MICRO_RE.match(item["timestamp"])
    for f in ("open", "high", "low", "close", "volume", "vwap"):
        assert isinstance(item[f], Decimal), f  # JSON numbers, not strings
    assert isinstance(item["trades"], int) and item["interval"] == 1
    begin = parse_time(item["interval_begin"])
    assert parse_time(item["timestamp"]) == begin + MINUTE_MS  # the deprecated field: the end
    pair = item["symbol"]
    data = sim.market.minute("kraken", pair, begin)
    agg = data.total if upto_ms is None else data.until(upto_ms)
    assert agg is not None
    truth = sim.market.candle("kraken", pair, begin, agg)
    assert item["trades"] == truth.trades
    for f in ("open", "high", "low", "close", "volume", "vwap"):
        assert item[f] == Decimal(str(getattr(truth, f))), f


async def test_status_acks_snapshot_and_an_update_per_trade(sim: Simulator) -> None:
    async with websockets.connect(sim.kraken_ws_url, open_timeout=5) as ws:
        status = decode(await ws.recv())
        assert status["channel"] == "status" and status["type"] == "update"
        assert status["data"][0]["system"] == "online" and status["data"][0]["api_version"] == "v2"
        assert isinstance(status["data"][0]["connection_id"], int)
        await ws.send(subscribe(["BTC/USD", "FOO/USD", "KSM/USD"], req_id=42))
        frames = await collect(
            ws,
            lambda fs: (
                len({f["data"][0]["interval_begin"] for f in fs if f.get("type") == "update"}) >= 3
            ),
        )
    acks = [f for f in frames if f.get("method") == "subscribe"]
    assert [(a["success"], a.get("symbol") or a["result"]["symbol"]) for a in acks] == [
        (True, "BTC/USD"),
        (False, "FOO/USD"),
        (True, "KSM/USD"),
    ]
    ok = acks[0]
    assert (
        ok["req_id"] == 42 and ok["result"]["channel"] == "ohlc" and ok["result"]["interval"] == 1
    )
    assert ok["result"]["snapshot"] is True
    assert MICRO_RE.match(ok["time_in"]) and MICRO_RE.match(ok["time_out"])
    assert acks[1]["error"] == "Currency pair not supported FOO/USD" and acks[1]["req_id"] == 42

    snapshots = [f for f in frames if f.get("type") == "snapshot"]
    assert [s["data"][0]["symbol"] for s in snapshots] == ["BTC/USD", "KSM/USD"]
    btc_snapshot = snapshots[0]
    stamp = parse_time(btc_snapshot["timestamp"])
    assert NANO_RE.match(btc_snapshot["timestamp"])
    begins = [parse_time(i["interval_begin"]) for i in btc_snapshot["data"]]
    assert len(begins) >= 2 and begins == sorted(begins)  # closed candles and the current one
    for item in btc_snapshot["data"]:
        assert_item(sim, item, stamp)

    updates = [f for f in frames if f.get("type") == "update"]
    assert all(f["channel"] == "ohlc" and len(f["data"]) == 1 for f in updates)
    for f in updates:
        assert_item(sim, f["data"][0], parse_time(f["timestamp"]))
    btc = [f["data"][0] for f in updates if f["data"][0]["symbol"] == "BTC/USD"]
    # one update per trade: the trade count steps by one within a minute
    by_minute: dict[str, list[int]] = defaultdict(list)
    for item in btc:
        by_minute[item["interval_begin"]].append(item["trades"])
    full = [counts for counts in by_minute.values() if counts[0] == 1]
    assert full and all(c == list(range(1, len(c) + 1)) for c in full)
    # the last update before a newer interval_begin is the minute's true candle
    first_minute = parse_time(next(iter(by_minute)))
    last_of_first = [i for i in btc if parse_time(i["interval_begin"]) == first_minute][-1]
    assert_item(sim, last_of_first, None)


async def test_heartbeat_ping_and_unsubscribe(sim_factory: SimFactory) -> None:
    async with (
        sim_factory(pairs=["REKT/USD"], kraken_heartbeat_s=0.2) as sim,
        websockets.connect(sim.kraken_ws_url, open_timeout=5) as ws,
    ):
        await ws.recv()  # status
        await ws.send(subscribe(["REKT/USD"], req_id=None, snapshot=False))
        ack = decode(await ws.recv())
        assert ack["success"] is True and "req_id" not in ack and ack["result"]["snapshot"] is False
        frames = await collect(ws, lambda fs: sum(f.get("channel") == "heartbeat" for f in fs) >= 2)
        assert {"channel": "heartbeat"} in frames
        assert not any(f.get("type") == "snapshot" for f in frames)
        await ws.send(json.dumps({"method": "ping", "req_id": 101}))
        pong = (await collect(ws, lambda fs: bool(fs) and fs[-1].get("method") == "pong"))[-1]
        assert pong["req_id"] == 101 and MICRO_RE.match(pong["time_in"])
        await ws.send(subscribe(["REKT/USD"], req_id=5))
        again = (await collect(ws, lambda fs: bool(fs) and fs[-1].get("req_id") == 5))[-1]
        assert again["success"] is False and again["error"] == "Already subscribed"
        unsub = {
            "method": "unsubscribe",
            "params": {"channel": "ohlc", "symbol": ["REKT/USD"]},
            "req_id": 6,
        }
        await ws.send(json.dumps(unsub))
        reply = (await collect(ws, lambda fs: bool(fs) and fs[-1].get("req_id") == 6))[-1]
        assert reply["success"] is True and reply["method"] == "unsubscribe"
        await ws.send(json.dumps(unsub | {"req_id": 7}))
        reply = (await collect(ws, lambda fs: bool(fs) and fs[-1].get("req_id") == 7))[-1]
        assert reply["success"] is False and reply["error"] == "Subscription Not Found"
        await ws.send("{oops")
        bad = (await collect(ws, lambda fs: bool(fs) and "error" in fs[-1]))[-1]
        assert bad["success"] is False


# ---------------------------------------------------------------------------------------------
# REST


def _ohlc_vs_trades(sim: Simulator, pair: str, row: list[Any], upto: int | None = None) -> None:
    minute = row[0] * 1000
    trades = [
        t for t in sim.market.trades("kraken", pair, minute) if upto is None or t.ts_ms <= upto
    ]
    assert len(row) == 8 and isinstance(row[0], int) and isinstance(row[7], int)
    assert all(isinstance(x, str) for x in row[1:7])
    assert len(row[6].split(".")[1]) == 8  # volume with 8 decimals
    if not trades:
        assert Decimal(row[6]) == 0 and row[7] == 0 and Decimal(row[5]) == 0
        assert row[1] == row[2] == row[3] == row[4]
        return
    prices = [Decimal(t.price) for t in trades]
    vols = [Decimal(t.volume) for t in trades]
    assert [Decimal(x) for x in row[1:5]] == [prices[0], max(prices), min(prices), prices[-1]]
    assert Decimal(row[6]) == sum(vols) and row[7] == len(trades)
    vwap = sum(p * v for p, v in zip(prices, vols, strict=True)) / sum(vols)
    assert abs(Decimal(row[5]) - vwap) <= Decimal(1).scaleb(-sim.market.spec(pair).price_dp)


async def test_ohlc_window_last_and_since(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.kraken_rest_url, timeout=10) as client:
        before = sim.clock.now_ms()
        body = (await client.get("/0/public/OHLC", params={"pair": "XBTUSD", "interval": 1})).json()
        after = sim.clock.now_ms()
        assert body["error"] == [] and set(body["result"]) == {"XXBTZUSD", "last"}
        rows = body["result"]["XXBTZUSD"]
        cur = rows[-1][0] * 1000  # the current, uncommitted candle is always the last entry
        assert floor_minute(before) <= cur <= floor_minute(after)
        assert body["result"]["last"] == rows[-1][0] - 60
        assert rows[0][0] * 1000 >= cur - 719 * MINUTE_MS and len(rows) <= 720
        assert len(rows) > 700  # BTC trades nearly every minute
        for row in rows[:-1]:
            _ohlc_vs_trades(sim, "BTC/USD", row)

        rekt = (await client.get("/0/public/OHLC", params={"pair": "REKTUSD"})).json()["result"]
        rekt_rows = rekt["REKTUSD"]
        times = [r[0] for r in rekt_rows]
        assert times == sorted(times) and len(times) < 600  # quiet minutes are omitted
        for row in rekt_rows[:-1]:
            assert row[7] > 0
            _ohlc_vs_trades(sim, "REKT/USD", row)

        since = rows[-5][0]
        recent = (
            await client.get("/0/public/OHLC", params={"pair": "XXBTZUSD", "since": since})
        ).json()
        recent_rows = recent["result"]["XXBTZUSD"]
        assert recent_rows[0][0] > since  # since is exclusive
        assert recent_rows[0][0] == rows[-4][0]
        future = (
            await client.get(
                "/0/public/OHLC", params={"pair": "XBTUSD", "since": cur // 1000 + 999}
            )
        ).json()
        assert len(future["result"]["XXBTZUSD"]) == 1  # only the current candle, always present

        unknown = await client.get("/0/public/OHLC", params={"pair": "NOPEUSD"})
        assert unknown.status_code == 200 and unknown.json() == {
            "error": ["EQuery:Unknown asset pair"]
        }
        missing = await client.get("/0/public/OHLC")
        assert missing.json() == {"error": ["EGeneral:Invalid arguments"]}


async def test_ohlc_flat_quiet_minutes_option(sim_factory: SimFactory) -> None:
    async with (
        sim_factory(kraken_ohlc_quiet="flat") as sim,
        httpx.AsyncClient(base_url=sim.kraken_rest_url, timeout=10) as client,
    ):
        rows = (await client.get("/0/public/OHLC", params={"pair": "REKTUSD"})).json()["result"][
            "REKTUSD"
        ]
        assert len(rows) == 720
        quiet = [r for r in rows[:-1] if r[7] == 0]
        assert quiet
        for row in quiet:
            _ohlc_vs_trades(sim, "REKT/USD", row)
            truth = sim.market.truth("kraken", "REKT/USD", row[0] * 1000)
            assert truth.no_trades and Decimal(row[4]) == Decimal(truth.close)


async def test_trades_pages_rebuild_candles_beyond_the_ohlc_window(sim: Simulator) -> None:
    """Page Trades from before the 720-minute window; aggregated, they equal the truth."""
    start = floor_minute(SIM_START) - 800 * MINUTE_MS
    end = start + 15 * MINUTE_MS
    async with httpx.AsyncClient(base_url=sim.kraken_rest_url, timeout=10) as client:
        for pair, rest, count in (("BTC/USD", "XBTUSD", 100), ("REKT/USD", "REKTUSD", 1000)):
            since = str(start * 1_000_000 - 1)
            seen: list[list[Any]] = []
            pages = 0
            while True:
                r = await client.get(
                    "/0/public/Trades", params={"pair": rest, "since": since, "count": count}
                )
                result = r.json()["result"]
                key = next(k for k in result if k != "last")
                page = result[key]
                pages += 1
                assert isinstance(result["last"], str) and int(result["last"]) > int(since)
                for t in page:
                    assert (
                        isinstance(t[0], str) and isinstance(t[1], str) and isinstance(t[2], float)
                    )
                    assert t[3] in ("b", "s") and t[4] in ("m", "l") and isinstance(t[6], int)
                seen.extend(page)
                since = result["last"]
                if not page or int(since) >= end * 1_000_000:
                    break
            ids = [t[6] for t in seen]
            assert len(ids) == len(set(ids)) and ids == sorted(ids)  # no loss, no duplicate
            per_minute: dict[int, list[list[Any]]] = defaultdict(list)
            for t in seen:
                per_minute[floor_minute(round(t[2] * 1000))].append(t)
            for m in range(start, end, MINUTE_MS):
                truth = sim.market.truth("kraken", pair, m)
                got = per_minute.get(m, [])
                assert len(got) == truth.trades, (pair, m)
                if got:
                    prices = [Decimal(t[0]) for t in got]
                    assert Decimal(truth.open) == prices[0] and Decimal(truth.close) == prices[-1]
                    assert Decimal(truth.high) == max(prices) and Decimal(truth.low) == min(prices)
                    assert Decimal(truth.volume) == sum(Decimal(t[1]) for t in got)
            if pair == "BTC/USD":
                assert pages >= 4  # pages ended mid-minute and resumed exactly
        recent = (
            await client.get("/0/public/Trades", params={"pair": "XBTUSD", "count": 10})
        ).json()
        trades = recent["result"]["XXBTZUSD"]
        assert len(trades) == 10 and trades[-1][2] * 1000 <= sim.clock.now_ms()
        bad = (await client.get("/0/public/Trades", params={"pair": "FOO"})).json()
        assert bad == {"error": ["EQuery:Unknown asset pair"]}


async def test_asset_pairs_time_and_status(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.kraken_rest_url, timeout=10) as client:
        pairs = (await client.get("/0/public/AssetPairs")).json()["result"]
        assert set(pairs) == {"XXBTZUSD", "XETHZUSD", "REKTUSD", "KSMUSD"}
        btc = pairs["XXBTZUSD"]
        assert (btc["altname"], btc["wsname"], btc["base"], btc["quote"], btc["status"]) == (
            "XBTUSD",
            "XBT/USD",
            "XXBT",
            "ZUSD",
            "online",
        )
        assert pairs["REKTUSD"]["base"] == "REKT" and pairs["REKTUSD"]["wsname"] == "REKT/USD"
        some = (await client.get("/0/public/AssetPairs", params={"pair": "XBTUSD,ETHUSD"})).json()
        assert set(some["result"]) == {"XXBTZUSD", "XETHZUSD"}
        bad = (await client.get("/0/public/AssetPairs", params={"pair": "XBTUSD,NOPE"})).json()
        assert bad == {"error": ["EQuery:Unknown asset pair"]}
        t = (await client.get("/0/public/Time")).json()["result"]
        assert abs(t["unixtime"] * 1000 - sim.clock.now_ms()) < 120_000 and "+0000" in t["rfc1123"]
        status = (await client.get("/0/public/SystemStatus")).json()
        assert status["result"]["status"] == "online"
        posted = await client.post("/0/public/Time")
        assert posted.json()["error"] == []


async def test_replay_updates_then_idle(sim_factory: SimFactory) -> None:
    start = floor_minute(SIM_START) - 30 * MINUTE_MS
    async with sim_factory(
        mode="replay", replay_from=start, replay_to=start + 5 * MINUTE_MS, replay_end="idle",
        kraken_heartbeat_s=0.1,
    ) as sim:  # fmt: skip
        async with websockets.connect(sim.kraken_ws_url, open_timeout=5) as ws:
            await ws.recv()
            await ws.send(subscribe(["ETH/USD"], snapshot=False))
            frames = await collect(ws, lambda fs: bool(fs) and fs[-1].get("channel") == "heartbeat")
        updates = [f["data"][0] for f in frames if f.get("type") == "update"]
        expected = sum(
            sim.market.truth("kraken", "ETH/USD", start + i * MINUTE_MS).trades for i in range(5)
        )
        assert len(updates) == expected  # every trade of the range, then silence but heartbeats
        last: dict[str, dict[str, Any]] = {}
        for item in updates:
            last[item["interval_begin"]] = item
        assert len(last) == 5
        for item in last.values():
            assert_item(sim, item, None)


async def test_staggered_subscriptions_keep_one_ordered_feed(sim_factory: SimFactory) -> None:
    """Pairs subscribed one message at a time while the feed runs (as klined's rate-limited
    subscribing does), on a fast clock: the connection's ohlc timestamps never go back, and
    for every pair the last update of a minute before a newer ``interval_begin`` is the
    minute's whole candle (klined's finality rule needs both; a snapshot taken ahead of a
    lagging feed, or a feed starting after the first snapshot, broke them)."""
    pairs = ["BTC/USD", "ETH/USD", "REKT/USD", "KSM/USD"]

    def minutes_seen(fs: list[dict[str, Any]]) -> int:
        return len(
            {i["interval_begin"] for f in fs if f.get("channel") == "ohlc" for i in f["data"]}
        )

    async with (
        sim_factory(speed=600.0) as sim,
        websockets.connect(sim.kraken_ws_url, open_timeout=5) as ws,
    ):
        await ws.recv()  # status
        for k, pair in enumerate(pairs):
            await ws.send(subscribe([pair], req_id=k))
            await anyio.sleep(0.02)  # 12 sim seconds apart
        frames = await collect(ws, lambda fs: minutes_seen(fs) >= 8)
    stamps = [parse_time(f["timestamp"]) for f in frames if f.get("channel") == "ohlc"]
    assert stamps == sorted(stamps)
    last: dict[str, dict[str, Any]] = {}
    proven = 0
    for f in frames:
        if f.get("channel") != "ohlc":
            continue
        for item in sorted(f["data"], key=lambda i: i["interval_begin"]):
            held = last.get(item["symbol"])
            if held is not None and item["interval_begin"] > held["interval_begin"]:
                # proven final: it must be the whole minute
                begin = parse_time(held["interval_begin"])
                data = sim.market.minute("kraken", held["symbol"], begin)
                assert data.total is not None
                truth = sim.market.candle("kraken", held["symbol"], begin, data.total)
                assert held["trades"] == truth.trades, (held, truth)
                for f in ("open", "high", "low", "close", "volume"):
                    assert Decimal(str(held[f])) == Decimal(str(getattr(truth, f))), f
                proven += 1
            last[item["symbol"]] = item
    assert proven >= len(pairs)
