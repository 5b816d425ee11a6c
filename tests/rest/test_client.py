"""REST client edge cases against canned responses (respx): 429/418, 5xx, timeouts, bad
requests, and the weight header feeding the shared limiter."""

from __future__ import annotations

import json
import time

import anyio
import httpx
import pytest
import respx

from klined.errors import (
    ExchangeError,
    ExchangeUnreachable,
    RateLimited,
    RequestRejected,
    UnlistedPair,
)
from klined.exchanges import get_adapter
from klined.model import MINUTE_MS, Pair, floor_minute
from klined.rest.client import RestClient, RetryPolicy
from klined.rest.ratelimit import DecayBudget, RateLimiter, WindowBudget

BASE = "http://exchange.test"
PAIR = Pair("BTC", "USD")
FAST = RetryPolicy(attempts=3, initial_s=0.01, max_s=0.02)


def kline_rows(start: int, n: int) -> list[list[object]]:
    return [
        [t, "10", "12", "9", "11", "2", t + MINUTE_MS - 1, "21", 3, "1", "10.5", "0"]
        for t in range(start, start + n * MINUTE_MS, MINUTE_MS)
    ]


def binance_client(http: httpx.AsyncClient, limiter: RateLimiter | None = None) -> RestClient:
    lim = limiter or RateLimiter("binance", WindowBudget(1000, 60))
    return RestClient(get_adapter("binance"), BASE, lim, http, timeout_s=2, retry=FAST)


@pytest.fixture
def start() -> int:
    return floor_minute(int(time.time() * 1000)) - 100 * MINUTE_MS


@pytest.mark.anyio
async def test_429_pauses_the_exchange_and_retries(start: int) -> None:
    async with respx.mock(base_url=BASE) as mock, httpx.AsyncClient() as http:
        route = mock.get("/api/v3/klines").mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "0.2"}, json={"code": -1003}),
                httpx.Response(200, json=kline_rows(start, 5)),
            ]
        )
        client = binance_client(http)
        t0 = time.monotonic()
        page = await client.fetch_candles(PAIR, start, start + 5 * MINUTE_MS)
        assert time.monotonic() - t0 >= 0.15
    assert route.call_count == 2
    assert [c.interval_start for c in page.candles] == [start + i * MINUTE_MS for i in range(5)]
    assert client.limiter.stats.throttled == 1 and client.limiter.stats.banned == 0


@pytest.mark.anyio
async def test_418_stops_the_exchange_and_raises(start: int) -> None:
    async with respx.mock(base_url=BASE) as mock, httpx.AsyncClient() as http:
        mock.get("/api/v3/klines").mock(
            return_value=httpx.Response(418, headers={"Retry-After": "120"}, json={"code": -1003})
        )
        client = binance_client(http)
        with pytest.raises(RateLimited) as err:
            await client.fetch_candles(PAIR, start, start + MINUTE_MS)
    assert err.value.banned
    assert client.limiter.stats.banned == 1
    assert client.limiter.paused_until >= time.time() + 100


@pytest.mark.anyio
async def test_5xx_and_timeouts_are_retried_with_backoff(start: int) -> None:
    async with respx.mock(base_url=BASE) as mock, httpx.AsyncClient() as http:
        mock.get("/api/v3/klines").mock(
            side_effect=[
                httpx.Response(503, text="busy"),
                httpx.ReadTimeout("slow"),
                httpx.Response(200, json=kline_rows(start, 2)),
            ]
        )
        client = binance_client(http)
        page = await client.fetch_candles(PAIR, start, start + 2 * MINUTE_MS)
    assert len(page.candles) == 2
    assert client.limiter.stats.retries == 2


@pytest.mark.anyio
async def test_gives_up_after_the_attempts(start: int) -> None:
    async with respx.mock(base_url=BASE) as mock, httpx.AsyncClient() as http:
        route = mock.get("/api/v3/klines").mock(return_value=httpx.Response(502, text="bad"))
        client = binance_client(http)
        with pytest.raises(ExchangeError):
            await client.fetch_candles(PAIR, start, start + MINUTE_MS)
    assert route.call_count == FAST.attempts
    assert client.errors == 1


@pytest.mark.anyio
async def test_bad_requests_and_unlisted_pairs_are_not_retried(start: int) -> None:
    async with respx.mock(base_url=BASE) as mock, httpx.AsyncClient() as http:
        route = mock.get("/api/v3/klines").mock(
            side_effect=[
                httpx.Response(400, json={"code": -1121, "msg": "Invalid symbol."}),
                httpx.Response(400, json={"code": -1100, "msg": "Illegal characters"}),
            ]
        )
        client = binance_client(http)
        with pytest.raises(UnlistedPair):
            await client.fetch_candles(PAIR, start, start + MINUTE_MS)
        with pytest.raises(RequestRejected):
            await client.fetch_candles(PAIR, start, start + MINUTE_MS)
    assert route.call_count == 2


@pytest.mark.anyio
async def test_weight_header_syncs_the_limiter(start: int) -> None:
    budget = WindowBudget(1000, 60)
    async with respx.mock(base_url=BASE) as mock, httpx.AsyncClient() as http:
        mock.get("/api/v3/klines").mock(
            return_value=httpx.Response(
                200, json=kline_rows(start, 1), headers={"X-MBX-USED-WEIGHT-1M": "640"}
            )
        )
        client = binance_client(http, RateLimiter("binance", budget))
        await client.fetch_candles(PAIR, start, start + MINUTE_MS)
    # the server counted weight we did not send (another process on this IP): believe it,
    # unless the window rolled over between request and answer
    assert budget.used == 640 or budget.used <= 2


@pytest.mark.anyio
async def test_request_timeout_is_enforced(start: int) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(5)
        return httpx.Response(200, json=[])

    async with (
        respx.mock(base_url=BASE, assert_all_called=False) as mock,
        httpx.AsyncClient() as http,
    ):
        mock.get("/api/v3/klines").mock(side_effect=slow)
        lim = RateLimiter("binance", WindowBudget(1000, 60))
        client = RestClient(
            get_adapter("binance"),
            BASE,
            lim,
            http,
            timeout_s=0.1,
            retry=RetryPolicy(attempts=2, initial_s=0.01, max_s=0.01),
        )
        t0 = time.monotonic()
        with pytest.raises(ExchangeError):
            await client.fetch_candles(PAIR, start, start + MINUTE_MS)
        assert time.monotonic() - t0 < 2


@pytest.mark.anyio
async def test_kraken_too_many_requests_and_trades_paging() -> None:
    now_s = int(time.time())
    body_trades = {
        "error": [],
        "result": {
            "XXBTZUSD": [["100.5", "0.25", now_s - 600.5, "b", "l", "", 7]],
            "last": str((now_s - 600) * 1_000_000_000),
        },
    }
    async with respx.mock(base_url=BASE) as mock, httpx.AsyncClient() as http:
        route = mock.get("/0/public/Trades").mock(
            side_effect=[
                httpx.Response(200, json={"error": ["EGeneral:Too many requests"]}),
                httpx.Response(200, content=json.dumps(body_trades).encode()),
            ]
        )
        lim = RateLimiter("kraken", DecayBudget(15, 100.0))
        client = RestClient(get_adapter("kraken"), BASE, lim, http, timeout_s=2, retry=FAST)
        # no Retry-After: the pause is one call's decay of the budget (10 ms here), not 5 s
        page = await client.fetch_trades(PAIR, str((now_s - 700) * 1_000_000_000))
    assert route.call_count == 2
    assert lim.stats.throttled == 1
    assert [t.price for t in page.trades] == ["100.5"]
    assert page.server_last_ms == (now_s - 600) * 1000


@pytest.mark.anyio
async def test_an_unreachable_exchange_fails_fast_then_is_tried_again(start: int) -> None:
    async with respx.mock(base_url=BASE) as mock, httpx.AsyncClient() as http:
        route = mock.get("/api/v3/klines").mock(
            side_effect=[httpx.ConnectError("Name or service not known")] * FAST.attempts
            + [httpx.Response(200, json=kline_rows(start, 2))]
        )
        lim = RateLimiter("binance", WindowBudget(1000, 60))
        client = RestClient(
            get_adapter("binance"), BASE, lim, http, retry=FAST, unreachable_pause_s=0.3
        )
        with pytest.raises(ExchangeError, match="ConnectError"):
            await client.fetch_candles(PAIR, start, start + 2 * MINUTE_MS)
        assert route.call_count == FAST.attempts
        # every other pair's request now fails at once, without a connection attempt
        for _ in range(3):
            with pytest.raises(ExchangeUnreachable, match="binance unreachable"):
                await client.fetch_candles(PAIR, start, start + 2 * MINUTE_MS)
        assert route.call_count == FAST.attempts and client.errors == 4
        # after the pause the exchange is asked again
        await anyio.sleep(0.35)
        page = await client.fetch_candles(PAIR, start, start + 2 * MINUTE_MS)
    assert [c.interval_start for c in page.candles] == [start, start + MINUTE_MS]
    assert route.call_count == FAST.attempts + 1


@pytest.mark.anyio
async def test_concurrent_requests_stop_together_when_nothing_connects(start: int) -> None:
    async with respx.mock(base_url=BASE) as mock, httpx.AsyncClient() as http:
        route = mock.get("/api/v3/klines").mock(side_effect=httpx.ConnectError("refused"))
        client = binance_client(http)
        failures: list[ExchangeError] = []

        async def one() -> None:
            try:
                await client.fetch_candles(PAIR, start, start + MINUTE_MS)
            except ExchangeError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
    # the attempts in a row that one request may make, shared: not 8 x attempts
    assert len(failures) == 8 and route.call_count <= FAST.attempts + 8
    assert sum(isinstance(f, ExchangeUnreachable) for f in failures) >= 8 - 1
