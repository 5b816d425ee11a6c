"""Simulated Binance US against plain clients (websockets, httpx): documented shapes, truth."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
import websockets

from klined.model import MINUTE_MS, floor_minute
from klined.sim import Simulator
from tests.fixtures.sim import SIM_START, SimFactory

pytestmark = pytest.mark.anyio

K_STR = ("o", "c", "h", "l", "v", "q", "V", "Q", "B")
K_INT = ("t", "T", "f", "L", "n")


async def collect(ws: Any, until: Any, limit_s: float = 20.0) -> list[dict[str, Any]]:
    """Receive JSON frames until ``until(frames)`` is true."""
    frames: list[dict[str, Any]] = []
    with anyio.fail_after(limit_s):
        while not until(frames):
            frames.append(json.loads(await ws.recv()))
    return frames


def finals_of(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if "k" in f and f["k"]["x"]]


def assert_kline_shape(event: dict[str, Any], symbol: str) -> None:
    assert set(event) == {"e", "E", "s", "k"}
    assert event["e"] == "kline" and event["s"] == symbol and isinstance(event["E"], int)
    k = event["k"]
    assert set(k) == {*K_STR, *K_INT, "s", "i", "x"}
    assert all(isinstance(k[f], str) for f in K_STR)
    assert all(isinstance(k[f], int) and not isinstance(k[f], bool) for f in K_INT)
    assert isinstance(k["x"], bool) and k["i"] == "1m" and k["s"] == symbol
    assert k["T"] == k["t"] + MINUTE_MS - 1
    for f in ("o", "c", "h", "l", "v", "q"):
        assert len(k[f].split(".")[1]) >= 8  # Binance pads to 8 decimals


def assert_equals_truth(sim: Simulator, pair: str, k: dict[str, Any]) -> None:
    truth = sim.market.truth("binance", pair, k["t"])
    assert Decimal(k["o"]) == Decimal(truth.open)
    assert Decimal(k["h"]) == Decimal(truth.high)
    assert Decimal(k["l"]) == Decimal(truth.low)
    assert Decimal(k["c"]) == Decimal(truth.close)
    assert Decimal(k["v"]) == Decimal(truth.volume)
    assert Decimal(k["q"]) == Decimal(truth.quote_volume)
    assert k["n"] == truth.trades


async def test_raw_stream_updates_and_finals_across_an_hour(sim_factory: SimFactory) -> None:
    async with sim_factory() as sim:
        url = sim.binance_ws_url + "/ws/btcusd@kline_1m"
        async with websockets.connect(url, open_timeout=5) as ws:
            frames = await collect(ws, lambda fs: len(finals_of(fs)) >= 2)
        finals = finals_of(frames)
        # the clock started 10 s before 01:00, so the finals cross the hour boundary
        assert [f["k"]["t"] for f in finals] == [SIM_START - 50_000, SIM_START + 10_000]
        assert finals[1]["k"]["t"] % 3_600_000 == 0
        stamps = [f["E"] for f in frames]
        assert stamps == sorted(stamps)
        for f in frames:
            assert_kline_shape(f, "BTCUSD")
            k = f["k"]
            if k["x"]:
                assert_equals_truth(sim, "BTC/USD", k)
                assert f["E"] >= k["T"]
            else:  # a running candle: exactly the trades up to the event time
                data = sim.market.minute("binance", "BTC/USD", k["t"])
                agg = data.until(f["E"])
                assert agg is not None and k["n"] == agg.n and k["L"] == agg.last_id
                assert k["t"] <= f["E"] < k["T"]
        updates = [f for f in frames if not f["k"]["x"] and f["k"]["t"] == SIM_START + 10_000]
        assert len(updates) >= 10  # ~every 2 s of sim time for a liquid pair
        gaps = {b["E"] - a["E"] for a, b in itertools.pairwise(updates)}
        assert gaps and all(gap % 2000 == 0 for gap in gaps)


def _quiet_minute(sim_market: Any, pair: str, start: int) -> int:
    for i in range(1, 200):
        m = floor_minute(start) + i * MINUTE_MS
        if sim_market.truth("binance", pair, m).no_trades:
            return m
    raise AssertionError("no quiet minute")


async def test_combined_stream_sends_finals_for_quiet_minutes(sim_factory: SimFactory) -> None:
    from klined.sim.market import Market

    quiet = _quiet_minute(Market(7), "REKT/USD", SIM_START)
    async with sim_factory(start_ms=quiet - 3_000) as sim:
        url = sim.binance_ws_url + "/stream?streams=rektusd@kline_1m/ksmusd@kline_1m"
        async with websockets.connect(url, open_timeout=5) as ws:
            frames = await collect(ws, lambda fs: len([f for f in fs if f["data"]["k"]["x"]]) >= 4)
    for f in frames:
        assert set(f) == {"stream", "data"}
        symbol = f["data"]["s"]
        assert f["stream"] == f"{symbol.lower()}@kline_1m"
        assert_kline_shape(f["data"], symbol)
    finals = [f["data"]["k"] for f in frames if f["data"]["k"]["x"]]
    rekt = {k["t"]: k for k in finals if k["s"] == "REKTUSD"}
    k = rekt[quiet]
    truth = sim.market.truth("binance", "REKT/USD", quiet)
    assert truth.no_trades
    assert k["n"] == 0 and Decimal(k["v"]) == 0 and Decimal(k["q"]) == 0
    assert k["o"] == k["h"] == k["l"] == k["c"] and Decimal(k["c"]) == Decimal(truth.close)
    assert k["f"] == -1 and k["L"] == -1
    for k in finals:
        assert_equals_truth(sim, "REKT/USD" if k["s"] == "REKTUSD" else "KSM/USD", k)


async def test_live_subscribe_methods_and_errors(sim_factory: SimFactory) -> None:
    async with (
        sim_factory(binance_max_incoming_per_s=0) as sim,
        websockets.connect(sim.binance_ws_url + "/ws", open_timeout=5) as ws,
    ):

        async def ask(request: object) -> dict[str, Any]:
            await ws.send(request if isinstance(request, str) else json.dumps(request))
            frames = await collect(ws, lambda fs: bool(fs) and "k" not in fs[-1])
            return frames[-1]

        sub = {"method": "SUBSCRIBE", "params": ["ethusd@kline_1m", "nopeusd@kline_1m"], "id": 1}
        assert await ask(sub) == {"result": None, "id": 1}
        assert await ask({"method": "LIST_SUBSCRIPTIONS", "id": 2}) == {
            "result": ["ethusd@kline_1m", "nopeusd@kline_1m"],
            "id": 2,
        }
        bad = {"method": "SUBSCRIBE", "params": ["ETHUSD@kline_1m"], "id": 3}
        assert await ask(bad) == {
            "error": {"code": 2, "msg": "Invalid request: invalid stream"},
            "id": 3,
        }
        assert (await ask("{not json"))["error"]["code"] == 3
        wrong_id = await ask({"method": "SUBSCRIBE", "params": [], "id": "x"})
        assert wrong_id["error"]["code"] == 2 and "unsigned integer" in wrong_id["error"]["msg"]
        unknown = await ask({"method": "FOO", "id": 4})
        assert unknown["id"] == 4 and "unknown variant" in unknown["error"]["msg"]
        assert await ask({"method": "GET_PROPERTY", "params": ["combined"], "id": 5}) == {
            "result": False,
            "id": 5,
        }
        assert await ask({"method": "SET_PROPERTY", "params": ["combined", True], "id": 6}) == {
            "result": None,
            "id": 6,
        }
        frames = await collect(ws, lambda fs: any("stream" in f for f in fs))
        wrapped = [f for f in frames if "stream" in f]
        assert {f["stream"] for f in wrapped} == {"ethusd@kline_1m"}  # unknown symbol: silent
        unsub = {"method": "UNSUBSCRIBE", "params": ["ethusd@kline_1m"], "id": 7}
        await ws.send(json.dumps(unsub))
        reply = await collect(ws, lambda fs: bool(fs) and fs[-1].get("id") == 7)
        assert reply[-1] == {"result": None, "id": 7}
        assert await ask({"method": "LIST_SUBSCRIPTIONS", "id": 8}) == {
            "result": ["nopeusd@kline_1m"],
            "id": 8,
        }
        assert sim.stats.open_connections("binance")[0].subscriptions == []


async def test_unknown_symbol_error_policy(sim_factory: SimFactory) -> None:
    async with (
        sim_factory(binance_unknown_symbol="error") as sim,
        websockets.connect(sim.binance_ws_url + "/ws", open_timeout=5) as ws,
    ):
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["nopeusd@kline_1m"], "id": 9}))
        reply = json.loads(await ws.recv())
        assert reply == {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": 9}


async def test_invalid_stream_in_url_is_closed(sim: Simulator) -> None:
    async with websockets.connect(sim.binance_ws_url + "/ws/not-a-stream", open_timeout=5) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            with anyio.fail_after(5):
                await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008


# ---------------------------------------------------------------------------------------------
# REST


def _row_vs_trades(sim: Simulator, pair: str, row: list[Any]) -> None:
    minute = row[0]
    trades = sim.market.trades("binance", pair, minute)
    assert len(row) == 12 and row[6] == minute + MINUTE_MS - 1 and row[11] == "0"
    assert all(isinstance(row[i], str) for i in (1, 2, 3, 4, 5, 7, 9, 10))
    assert isinstance(row[8], int)
    if not trades:  # quiet minute: a zero-volume row at the previous close
        prev = sim.market.last_traded("binance", pair, minute)
        assert prev is not None
        close = Decimal(sim.market.truth("binance", pair, prev.minute).close)
        assert [Decimal(x) for x in row[1:5]] == [close] * 4
        assert Decimal(row[5]) == 0 and row[8] == 0
        return
    prices = [Decimal(t.price) for t in trades]
    vols = [Decimal(t.volume) for t in trades]
    assert Decimal(row[1]) == prices[0] and Decimal(row[4]) == prices[-1]
    assert Decimal(row[2]) == max(prices) and Decimal(row[3]) == min(prices)
    assert Decimal(row[5]) == sum(vols)
    assert Decimal(row[7]) == sum(p * v for p, v in zip(prices, vols, strict=True))
    assert row[8] == len(trades)
    buys = [(p, v) for p, v, t in zip(prices, vols, trades, strict=True) if t.side == "b"]
    assert Decimal(row[9]) == sum((v for _, v in buys), Decimal(0))


async def test_klines_equal_candles_aggregated_from_trades(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.binance_rest_url, timeout=10) as client:
        start = floor_minute(SIM_START) - 90 * MINUTE_MS
        params = {
            "symbol": "REKTUSD",
            "interval": "1m",
            "startTime": start,
            "endTime": start + 59 * MINUTE_MS,
        }
        r = await client.get("/api/v3/klines", params=params)
        assert r.status_code == 200
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "2"
        rows = r.json()
        assert [row[0] for row in rows] == list(range(start, start + 60 * MINUTE_MS, MINUTE_MS))
        assert any(row[8] == 0 for row in rows)  # REKT is illiquid: quiet minutes are rows too
        for row in rows:
            _row_vs_trades(sim, "REKT/USD", row)
        for row in (
            await client.get("/api/v3/klines", params={**params, "symbol": "BTCUSD"})
        ).json():
            _row_vs_trades(sim, "BTC/USD", row)

        before = sim.clock.now_ms()
        latest = (
            await client.get("/api/v3/klines", params={"symbol": "BTCUSD", "interval": "1m"})
        ).json()
        now = sim.clock.now_ms()
        assert len(latest) == 500
        assert floor_minute(before) <= latest[-1][0] <= floor_minute(now)  # the unfinished candle
        truth = sim.market.truth("binance", "BTC/USD", latest[-1][0])
        assert latest[-1][8] <= truth.trades
        limited = await client.get(
            "/api/v3/klines",
            params={"symbol": "BTCUSD", "interval": "1m", "limit": 5000, "endTime": now},
        )
        assert len(limited.json()) == 1000
        future = await client.get(
            "/api/v3/klines",
            params={"symbol": "BTCUSD", "interval": "1m", "startTime": now + 600_000},
        )
        assert future.json() == []

        bad = await client.get("/api/v3/klines", params={"symbol": "NOPEUSD", "interval": "1m"})
        assert bad.status_code == 400 and bad.json() == {"code": -1121, "msg": "Invalid symbol."}
        missing = await client.get("/api/v3/klines", params={"interval": "1m"})
        assert missing.status_code == 400 and missing.json()["code"] == -1102
        backwards = await client.get(
            "/api/v3/klines",
            params={"symbol": "BTCUSD", "interval": "1m", "startTime": 10, "endTime": 5},
        )
        assert backwards.json()["code"] == -1023


async def test_ping_time_and_exchange_info(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.binance_rest_url, timeout=10) as client:
        assert (await client.get("/api/v3/ping")).json() == {}
        server_time = (await client.get("/api/v3/time")).json()["serverTime"]
        assert abs(server_time - sim.clock.now_ms()) < 120_000
        info = (await client.get("/api/v3/exchangeInfo")).json()
        assert info["timezone"] == "UTC"
        assert info["rateLimits"][0] == {
            "rateLimitType": "REQUEST_WEIGHT",
            "interval": "MINUTE",
            "intervalNum": 1,
            "limit": 1200,
        }
        symbols = {s["symbol"]: s for s in info["symbols"]}
        assert {"BTCUSD", "ETHUSD", "REKTUSD", "KSMUSD", "BTCUSDT", "ETHUSDT"} <= set(symbols)
        btc = symbols["BTCUSD"]
        assert (btc["baseAsset"], btc["quoteAsset"], btc["status"]) == ("BTC", "USD", "TRADING")
        assert {f["filterType"] for f in btc["filters"]} >= {"PRICE_FILTER", "LOT_SIZE"}
        one = (await client.get("/api/v3/exchangeInfo", params={"symbol": "ETHUSDT"})).json()
        assert [s["symbol"] for s in one["symbols"]] == ["ETHUSDT"]
        many = await client.get("/api/v3/exchangeInfo", params={"symbols": '["BTCUSD","KSMUSD"]'})
        assert [s["symbol"] for s in many.json()["symbols"]] == ["BTCUSD", "KSMUSD"]
        bad = await client.get("/api/v3/exchangeInfo", params={"symbol": "FOOUSD"})
        assert bad.status_code == 400 and bad.json()["code"] == -1121
        assert sim.stats.requests["binance"] == 6
        assert sim.binance_limiter.used == 1 + 1 + 20 * 4


async def test_listing_is_configurable(sim_factory: SimFactory) -> None:
    async with (
        sim_factory(listed={"binance": ["ETH/USDT", "BTC/USD"]}) as sim,
        httpx.AsyncClient(base_url=sim.binance_rest_url, timeout=10) as client,
    ):
        info = (await client.get("/api/v3/exchangeInfo")).json()
        assert [s["symbol"] for s in info["symbols"]] == ["ETHUSDT", "BTCUSD"]
        r = await client.get("/api/v3/klines", params={"symbol": "ETHUSD", "interval": "1m"})
        assert r.status_code == 400


async def test_replay_emits_a_past_range_fast_then_closes(sim_factory: SimFactory) -> None:
    start = floor_minute(SIM_START) - 120 * MINUTE_MS
    async with sim_factory(
        mode="replay", replay_from=start, replay_to=start + 10 * MINUTE_MS
    ) as sim:
        url = sim.binance_ws_url + "/stream?streams=btcusd@kline_1m/rektusd@kline_1m"
        frames: list[dict[str, Any]] = []
        with anyio.fail_after(20):
            async with websockets.connect(url, open_timeout=5) as ws:
                async for raw in ws:
                    frames.append(json.loads(raw))
            assert ws.close_code == 1000
        events = [f["data"] for f in frames]
        finals = [e for e in events if e["k"]["x"]]
        assert sorted((e["s"], e["k"]["t"]) for e in finals) == sorted(
            (s, start + i * MINUTE_MS) for s in ("BTCUSD", "REKTUSD") for i in range(10)
        )
        assert all(e["E"] < sim.clock.now_ms() - 60 * MINUTE_MS for e in events)  # in the past
        assert [e["E"] for e in events] == sorted(e["E"] for e in events)
        for e in finals:
            assert_equals_truth(sim, "BTC/USD" if e["s"] == "BTCUSD" else "REKT/USD", e["k"])
        # the simulator's log holds exactly what the client received
        logged = [(e.pair, e.minute, e.is_final, e.trades, e.event_ms) for e in sim.log]
        received = [
            (
                "BTC/USD" if e["s"] == "BTCUSD" else "REKT/USD",
                e["k"]["t"],
                e["k"]["x"],
                e["k"]["n"],
                e["E"],
            )
            for e in events
        ]
        assert logged == received
