"""The simulator's rate limits and scripted faults fire as documented."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx
import pytest
import websockets

from klined.model import MINUTE_MS, floor_minute, parse_time
from klined.sim import FaultPlan, FaultRule, SimClock
from klined.sim.faults import FaultEngine
from klined.sim.ratelimit import BinanceWeightLimiter, KrakenCounterLimiter
from tests.fixtures.sim import SIM_START, SimFactory

pytestmark = pytest.mark.anyio

KLINES = {"symbol": "BTCUSD", "interval": "1m"}


def plan(*rules: FaultRule) -> FaultPlan:
    return FaultPlan(rules=list(rules))


async def frames_until_closed(ws: Any, limit_s: float = 20.0) -> tuple[list[str | bytes], Any]:
    """Everything received until the connection ends, and how it ended."""
    out: list[str | bytes] = []
    with anyio.fail_after(limit_s):
        try:
            async for raw in ws:
                out.append(raw)
        except websockets.ConnectionClosed as exc:
            return out, exc
    return out, None


# ---------------------------------------------------------------------------------------------
# rate limits


def test_binance_limiter_429_then_418_then_recovers() -> None:
    now = [1000.0]
    lim = BinanceWeightLimiter(10, 60.0, ban_after=2, ban_s=120.0, time_fn=lambda: now[0])
    assert [lim.check(2).ok for _ in range(5)] == [True] * 5
    first = lim.check(2)
    assert (first.status, first.retry_after_s) == (429, 20)  # until 1020: the window's end
    assert lim.check(2).status == 429  # one more while limited...
    ban = lim.check(2)  # ...and the client is banned
    assert (ban.status, ban.retry_after_s) == (418, 120)
    now[0] = 1030.0  # a new window, but still banned
    assert lim.check(1).status == 418
    now[0] = 1125.0
    assert lim.check(1).ok and lim.used == 1
    assert all(lim.check(1).ok for _ in range(9))
    assert [lim.check(1).status for _ in range(3)] == [429, 429, 418]
    now[0] = 1500.0
    assert lim.check(1).ok
    assert [lim.check(1).status for _ in range(12)][-3:] == [429, 429, 418]
    assert lim.banned_until == 1500.0 + 480  # the ban doubles with every offence


def test_kraken_counter_decays() -> None:
    now = [0.0]
    lim = KrakenCounterLimiter(15, 0.33, time_fn=lambda: now[0])
    assert all(lim.check().ok for _ in range(15))
    refused = lim.check()
    assert not refused.ok and refused.retry_after_s == 4
    now[0] = 3.1  # decayed by ~1.02
    assert lim.check().ok and not lim.check().ok


async def test_binance_rest_429_and_418_over_http(sim_factory: SimFactory) -> None:
    async with (
        sim_factory(rate_limit_scale=0.01, rate_limit_time_scale=0.001) as sim,
        httpx.AsyncClient(base_url=sim.binance_rest_url, timeout=10) as client,
    ):
        statuses = []
        for _ in range(6):
            r = await client.get("/api/v3/klines", params=KLINES)
            statuses.append(r.status_code)
        assert statuses == [200] * 6 and r.headers["X-MBX-USED-WEIGHT-1M"] == "12"
        limited = await client.get("/api/v3/klines", params=KLINES)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
        assert limited.json()["code"] == -1003 and "Too many requests" in limited.json()["msg"]
        await client.get("/api/v3/klines", params=KLINES)
        banned = await client.get("/api/v3/klines", params=KLINES)
        assert banned.status_code == 418 and int(banned.headers["Retry-After"]) >= 120_000 - 1
        assert "banned until" in banned.json()["msg"]
        assert (await client.get("/api/v3/ping")).status_code == 418
        assert (sim.stats.http_429, sim.stats.http_418) == (2, 2)
        assert sim.stats.requests["binance"] == 10


async def test_kraken_rest_call_counter(sim_factory: SimFactory) -> None:
    async with (
        sim_factory(rate_limit_scale=0.2, rate_limit_time_scale=0.001) as sim,
        httpx.AsyncClient(base_url=sim.kraken_rest_url, timeout=10) as client,
    ):
        bodies = [(await client.get("/0/public/Time")).json() for _ in range(4)]
        assert [b["error"] for b in bodies] == [[], [], [], ["EGeneral:Too many requests"]]
        assert sim.stats.kraken_rate_limited == 1


# ---------------------------------------------------------------------------------------------
# WebSocket faults


async def test_disconnect_at_nth_message_then_reconnect(sim_factory: SimFactory) -> None:
    rule = FaultRule(kind="disconnect", exchange="binance", connection=1, message=3)
    async with sim_factory(faults=plan(rule)) as sim:
        url = sim.binance_ws_url + "/ws/btcusd@kline_1m"
        async with websockets.connect(url, open_timeout=5) as ws:
            got, closed = await frames_until_closed(ws)
        assert len(got) == 2  # messages 1 and 2, then a TCP reset instead of message 3
        assert closed is not None and closed.rcvd is None  # no close frame: abrupt
        fired = sim.faults.fired
        assert [(f.kind, f.connection, f.message, f.pair) for f in fired] == [
            ("disconnect", 1, 3, "BTC/USD")
        ]
        assert [e.seq for e in sim.log.query(connection=1)] == [1, 2]
        async with websockets.connect(url, open_timeout=5) as ws:  # connection 2 is healthy
            with anyio.fail_after(10):
                for _ in range(4):
                    assert json.loads(await ws.recv())["e"] == "kline"
        assert sim.stats.connections["binance"] == 2
        assert sim.stats.connection_log[0].close_reason == "fault: disconnect"


async def test_clean_close_mid_minute(sim_factory: SimFactory) -> None:
    rule = FaultRule(kind="close", exchange="kraken", min_second=20)
    async with sim_factory(faults=plan(rule)) as sim:
        async with websockets.connect(sim.kraken_ws_url, open_timeout=5) as ws:
            await ws.send(
                json.dumps(
                    {"method": "subscribe", "params": {"channel": "ohlc", "symbol": ["BTC/USD"]}}
                )
            )
            got, closed = await frames_until_closed(ws)
        assert closed is None and ws.close_code == 1000
        fired = sim.faults.fired[0]
        assert (
            fired.kind == "close"
            and fired.sim_ms is not None
            and fired.sim_ms % MINUTE_MS >= 20_000
        )
        frames = [json.loads(g) for g in got]
        updates = [f for f in frames if f.get("channel") == "ohlc"]
        assert all(parse_time(u["timestamp"]) < fired.sim_ms for u in updates)


async def test_stall_sends_nothing_and_answers_no_pings(sim_factory: SimFactory) -> None:
    rule = FaultRule(kind="stall", exchange="kraken", message=3, duration_s=1.5)
    async with sim_factory(faults=plan(rule)) as sim:
        async with websockets.connect(sim.kraken_ws_url, open_timeout=5, ping_interval=None) as ws:
            await ws.recv()
            await ws.send(
                json.dumps(
                    {
                        "method": "subscribe",
                        "params": {"channel": "ohlc", "symbol": ["BTC/USD"], "snapshot": False},
                    }
                )
            )
            with anyio.fail_after(10):
                while not sim.faults.fired:
                    with anyio.move_on_after(0.02):  # cancelling recv() is safe in websockets
                        await ws.recv()
            pong = await ws.ping()
            await anyio.sleep(0.5)
            assert not pong.done()  # silent: no pong while stalled
            await ws.send(json.dumps({"method": "ping", "req_id": 1}))
            with anyio.fail_after(10):
                await pong  # answered once the stall is over
                while True:  # and the feed resumes
                    frame = json.loads(await ws.recv())
                    if frame.get("channel") == "ohlc" and frame.get("type") == "update":
                        break
        stall_at = sim.faults.fired[0].wall_ms
        after = [e for e in sim.log if e.seq > 2]  # message 3 was the stalled one
        assert after and min(e.sent_ms for e in after) >= stall_at + 1400


async def test_malformed_frames_injected_before_real_ones(sim_factory: SimFactory) -> None:
    variants = [
        "truncated",
        "garbage",
        "binary",
        "empty",
        "wrong_types",
        "nan",
        "negative",
        "high_low",
    ]
    rules = [
        FaultRule(kind="malformed", exchange="kraken", message=i + 1, variant=v)
        for i, v in enumerate(variants)
    ]
    rules.append(
        FaultRule(kind="malformed", exchange="kraken", message=10, replace=True, variant="garbage")
    )
    async with (
        sim_factory(faults=FaultPlan(rules=rules)) as sim,
        websockets.connect(sim.kraken_ws_url, open_timeout=5) as ws,
    ):
        await ws.recv()
        await ws.send(
            json.dumps(
                {
                    "method": "subscribe",
                    "params": {"channel": "ohlc", "symbol": ["BTC/USD"], "snapshot": False},
                }
            )
        )
        got: list[str | bytes] = []
        with anyio.fail_after(10):
            while len(sim.faults.fired) < len(rules) or len(got) < 25:
                got.append(await ws.recv())
    assert [f.detail for f in sim.faults.fired] == [*variants, "garbage"]
    bad: list[str | bytes] = []
    good: list[dict[str, Any]] = []
    for raw in got:
        try:
            frame = json.loads(raw)
        except (ValueError, TypeError):
            bad.append(raw)
            continue
        if frame.get("channel") != "ohlc" or frame.get("type") != "update":
            continue
        item = frame["data"][0]
        ok = (
            isinstance(item["open"], float)
            and item["open"] == item["open"]
            and item["open"] > 0
            and item["high"] >= item["low"]
            and isinstance(item["interval_begin"], str)
        )
        (good if ok else bad).append(frame)
    assert any(isinstance(b, bytes) for b in bad) and "" in bad
    assert len(bad) == len(rules)  # every variant and the replacement
    assert [f.message for f in sim.faults.fired] == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    # the log holds exactly the good updates the client got; the replaced one is in neither
    logged = [(e.minute, e.trades) for e in sim.log][: len(good)]
    assert logged == [
        (parse_time(g["data"][0]["interval_begin"]), g["data"][0]["trades"]) for g in good
    ]
    replaced = sim.faults.fired[-1]
    lost = [e for e in sim.log if e.event_ms == replaced.sim_ms and e.pair == replaced.pair]
    assert lost == []


async def test_out_of_order(sim_factory: SimFactory) -> None:
    rules = plan(FaultRule(kind="out_of_order", exchange="binance", message=2))
    async with sim_factory(faults=rules) as sim:
        url = sim.binance_ws_url + "/ws/btcusd@kline_1m"
        async with websockets.connect(url, open_timeout=5) as ws:
            with anyio.fail_after(10):
                events = [json.loads(await ws.recv()) for _ in range(4)]
    stamps = [e["E"] for e in events]
    assert stamps[1] > stamps[2] and stamps[0] < stamps[2] < stamps[3]  # 2 came after 3
    assert [e.delayed for e in sim.log][:3] == [False, False, True]


async def test_duplicate_and_late_finals(sim_factory: SimFactory) -> None:
    rules = plan(
        FaultRule(kind="duplicate", exchange="binance"),  # the first final, twice
        FaultRule(kind="late_final", exchange="binance", pair="ETH/USD", delay_s=65),
    )
    async with sim_factory(faults=rules) as sim:
        url = sim.binance_ws_url + "/stream?streams=btcusd@kline_1m/ethusd@kline_1m"
        events: list[dict[str, Any]] = []
        async with websockets.connect(url, open_timeout=5) as ws:
            with anyio.fail_after(20):
                while not any(e["s"] == "ETHUSD" and e["k"]["x"] and e.get("late") for e in events):
                    event = json.loads(await ws.recv())["data"]
                    late = [f for f in sim.faults.fired if f.kind == "late_final"]
                    event["late"] = (
                        bool(late) and event["k"]["x"] and event["k"]["t"] == late[0].minute
                    )
                    events.append(event)
    finals = [(e["s"], e["k"]["t"]) for e in events if e["k"]["x"]]
    first = finals[0]
    assert finals.count(first) == 2 and sum(e.duplicate for e in sim.log) == 1
    eth_final = next(e for e in events if e["s"] == "ETHUSD" and e["late"])
    minute = eth_final["k"]["t"]
    later = [e for e in events[: events.index(eth_final)] if e["k"]["t"] >= minute + MINUTE_MS]
    assert later  # the next minute's updates came before this final
    assert eth_final["E"] >= minute + MINUTE_MS + 65_000
    assert {f.kind for f in sim.faults.fired} == {"duplicate", "late_final"}


async def test_late_final_after_the_next_hour_starts(sim_factory: SimFactory) -> None:
    start = floor_minute(SIM_START) - 30_000  # 00:58:30; the hour turns in 90 sim seconds
    rule = FaultRule(kind="late_final", exchange="kraken", until="next_hour")
    async with sim_factory(faults=plan(rule), clock=SimClock(start, 120), pairs=["ETH/USD"]) as sim:
        items: list[dict[str, Any]] = []
        async with websockets.connect(sim.kraken_ws_url, open_timeout=5) as ws:
            await ws.send(
                json.dumps(
                    {
                        "method": "subscribe",
                        "params": {"channel": "ohlc", "symbol": ["ETH/USD"], "snapshot": False},
                    }
                )
            )
            with anyio.fail_after(20):
                while not sim.faults.fired or not any(i.get("_late") for i in items):
                    frame = json.loads(await ws.recv())
                    if frame.get("channel") == "ohlc" and frame.get("type") == "update":
                        item = frame["data"][0] | {"_ts": parse_time(frame["timestamp"])}
                        if items and parse_time(item["interval_begin"]) < parse_time(
                            items[-1]["interval_begin"]
                        ):
                            item["_late"] = True
                        items.append(item)
        late = next(i for i in items if i.get("_late"))
        minute = parse_time(late["interval_begin"])
        assert sim.faults.fired[0].minute == minute
        assert late["_ts"] >= minute - minute % 3_600_000 + 3_600_000  # after the hour turned
        truth = sim.market.truth("kraken", "ETH/USD", minute)
        assert late["trades"] == truth.trades  # it is that minute's final state


async def test_subscription_errors_for_scripted_pairs(sim_factory: SimFactory) -> None:
    rules = plan(
        FaultRule(kind="subscribe_error", exchange="kraken", pair="ETH/USD"),
        FaultRule(kind="subscribe_error", exchange="binance", pair="ETH/USD"),
    )
    async with sim_factory(faults=rules) as sim:
        async with websockets.connect(sim.kraken_ws_url, open_timeout=5) as ws:
            await ws.recv()
            await ws.send(
                json.dumps(
                    {
                        "method": "subscribe",
                        "params": {"channel": "ohlc", "symbol": ["ETH/USD"]},
                        "req_id": 3,
                    }
                )
            )
            reply = json.loads(await ws.recv())
            assert (
                reply["success"] is False
                and reply["error"] == "Currency pair not supported ETH/USD"
            )
        async with websockets.connect(sim.binance_ws_url + "/ws", open_timeout=5) as ws:
            await ws.send(
                json.dumps({"method": "SUBSCRIBE", "params": ["ethusd@kline_1m"], "id": 4})
            )
            assert json.loads(await ws.recv()) == {
                "error": {"code": 2, "msg": "Invalid request: invalid stream"},
                "id": 4,
            }


async def test_connection_lifetime_pong_timeout_and_incoming_limit(sim_factory: SimFactory) -> None:
    async with sim_factory(
        binance_connection_lifetime_s=0.6, binance_ping_interval_s=0.15, binance_pong_timeout_s=0.2
    ) as sim:
        async with websockets.connect(
            sim.binance_ws_url + "/ws/ksmusd@kline_1m", open_timeout=5
        ) as ws:
            _, closed = await frames_until_closed(ws)  # websockets answers the server's pings
        assert closed is None and ws.close_code == 1000
        assert sim.stats.connection_log[0].close_reason == "connection lifetime reached"

        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(sim.binance_ws_url + "/ws/ksmusd@kline_1m", autoping=False) as ws2,
        ):
            kinds = []
            with anyio.fail_after(10):
                async for msg in ws2:
                    kinds.append(msg.type)
        assert aiohttp.WSMsgType.PING in kinds  # the server pings; nobody answers
        assert sim.stats.connection_log[1].close_reason == "pong timeout"

        async with websockets.connect(sim.binance_ws_url + "/ws", open_timeout=5) as ws:
            for i in range(8):
                await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
            _, closed = await frames_until_closed(ws)
        assert closed is not None
        assert sim.stats.connection_log[2].close_reason == "too many incoming messages"


# ---------------------------------------------------------------------------------------------
# REST faults


async def test_rest_faults_5xx_slow_timeout_and_scripted_limits(sim_factory: SimFactory) -> None:
    rules = plan(
        FaultRule(kind="http_5xx", exchange="binance", endpoint="klines", request=2, status=502),
        FaultRule(kind="slow", exchange="binance", endpoint="time", duration_s=0.3),
        FaultRule(kind="timeout", exchange="binance", endpoint="ping", duration_s=5),
        FaultRule(kind="http_418", exchange="binance", endpoint="exchangeInfo", retry_after_s=77),
        FaultRule(kind="http_429", exchange="kraken", endpoint="OHLC", pair="BTC/USD"),
        FaultRule(kind="http_5xx", exchange="kraken", endpoint="Trades"),
    )
    async with sim_factory(faults=rules) as sim:
        async with httpx.AsyncClient(base_url=sim.binance_rest_url, timeout=10) as client:
            assert (await client.get("/api/v3/klines", params=KLINES)).status_code == 200
            failed = await client.get("/api/v3/klines", params=KLINES)
            assert failed.status_code == 502 and failed.json()["code"] == -1001
            assert (await client.get("/api/v3/klines", params=KLINES)).status_code == 200
            assert (await client.get("/api/v3/time")).status_code == 200  # slow, but answers
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/api/v3/ping", timeout=0.5)
            banned = await client.get("/api/v3/exchangeInfo")
            assert banned.status_code == 418 and banned.headers["Retry-After"] == "77"
        async with httpx.AsyncClient(base_url=sim.kraken_rest_url, timeout=10) as client:
            ok = await client.get("/0/public/OHLC", params={"pair": "REKTUSD"})
            assert ok.json()["error"] == []
            limited = await client.get("/0/public/OHLC", params={"pair": "XBTUSD"})
            assert limited.status_code == 200 and limited.json() == {
                "error": ["EGeneral:Too many requests"]
            }
            down = await client.get("/0/public/Trades", params={"pair": "XBTUSD"})
            assert down.status_code == 503 and down.json() == {"error": ["EService:Unavailable"]}
        kinds = [(f.exchange, f.kind) for f in sim.faults.fired]
        assert kinds == [
            ("binance", "http_5xx"),
            ("binance", "slow"),
            ("binance", "timeout"),
            ("binance", "http_418"),
            ("kraken", "http_429"),
            ("kraken", "http_5xx"),
        ]
        assert sim.stats.http_5xx == 2 and sim.stats.http_418 == 1


# ---------------------------------------------------------------------------------------------
# plans


def test_fault_plans_load_from_json_and_toml(tmp_path: Path) -> None:
    js = tmp_path / "plan.json"
    js.write_text(
        json.dumps({"rules": [{"kind": "disconnect", "exchange": "binance", "message": 5}]})
    )
    assert FaultPlan.load(js).rules[0].message == 5
    toml = tmp_path / "plan.toml"
    toml.write_text('seed = 3\n[[rules]]\nkind = "stall"\nduration_s = 2.5\nthen = "close"\n')
    loaded = FaultPlan.load(toml)
    assert loaded.seed == 3 and loaded.rules[0].then == "close"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nkind = "explode"\n')
    with pytest.raises(ValueError, match="unknown fault kind"):
        FaultPlan.load(bad)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"rules": [{"kind": "close", "mesage": 1}]}))
    with pytest.raises(ValueError, match="mesage"):
        FaultPlan.load(typo)


def test_probabilistic_rules_are_seeded() -> None:
    rule = FaultRule(kind="disconnect", probability=0.3, times=0)

    def firing(seed: int) -> list[int]:
        engine = FaultEngine(FaultPlan(rules=[rule]), seed)
        return [n for n in range(1, 200) if engine.on_message("binance", 1, n, "BTC/USD", 0, False)]

    assert firing(1) == firing(1) != firing(2)
    assert 30 < len(firing(1)) < 90


async def test_stopping_closes_clients_and_releases_held_requests(sim_factory: SimFactory) -> None:
    rule = FaultRule(kind="timeout", exchange="kraken", endpoint="Time", duration_s=600)
    outcome: dict[str, Any] = {}

    async def held_request(url: str) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            try:
                await client.get(url + "/0/public/Time")
            except httpx.TransportError as exc:
                outcome["rest"] = type(exc).__name__

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            async with sim_factory(faults=plan(rule)) as sim:
                ws = await websockets.connect(sim.binance_ws_url + "/ws/btcusd@kline_1m")
                await ws.recv()
                tg.start_soon(held_request, sim.kraken_rest_url)
                while not sim.faults.fired:  # noqa: ASYNC110 - polling the simulator's record
                    await anyio.sleep(0.01)
            _, closed = await frames_until_closed(ws)
    assert closed is None and ws.close_code == 1001
    assert outcome["rest"] in ("RemoteProtocolError", "ReadError")
