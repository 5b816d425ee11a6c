"""What every simulated REST request goes through: counting, scripted faults, rate limits."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from aiohttp import web
from loguru import logger

from klined.sim.clock import wall_ms
from klined.sim.conn import abort_transport
from klined.sim.ratelimit import rate_limit_body

if TYPE_CHECKING:
    from klined.sim.faults import FaultRule
    from klined.sim.server import Simulator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ENC = msgspec.json.Encoder()


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_ENC.encode(body), status=status, headers=headers, content_type="application/json"
    )


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def _retry(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def rest_middleware(
    sim: Simulator,
    exchange: str,
    weight: Callable[[web.Request], int],
    pair_of: Callable[[Simulator, web.Request], str | None],
) -> Any:
    """Faults first (they model the network and the exchange's front end), then the limiter."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_websocket(request):
            return await handler(request)
        stats = sim.stats
        stats.requests[exchange] += 1
        stats.endpoints[f"{exchange} {request.path}"] += 1
        pair = pair_of(sim, request)
        fired = sim.faults.on_request(exchange, request.path, pair)
        if fired is not None:
            index, rule = fired
            sim.faults.record(
                index, rule, exchange, wall_ms(), sim_ms=sim.clock.now_ms(), pair=pair,
                request=stats.requests[exchange], detail=request.path_qs,
            )  # fmt: skip
            logger.debug("sim {} REST {}: fault {}", exchange, request.path, rule.kind)
            response = await rest_fault(sim, exchange, rule, request)
            if response is not None:
                return response
        if sim.config.rate_limits:
            refused = _rate_limit(sim, exchange, weight(request))
            if refused is not None:
                return refused
        answer = await handler(request)
        if exchange == "binance":
            used = str(sim.binance_limiter.used)
            answer.headers["X-MBX-USED-WEIGHT-1M"] = used
            answer.headers["X-MBX-USED-WEIGHT"] = used
        return answer

    return middleware


def _rate_limit(sim: Simulator, exchange: str, weight: int) -> web.Response | None:
    if exchange == "kraken":
        verdict = sim.kraken_limiter.check(1.0)
        if verdict.ok:
            return None
        sim.stats.kraken_rate_limited += 1
        return json_response({"error": ["EGeneral:Too many requests"]})
    verdict = sim.binance_limiter.check(weight)
    if verdict.ok:
        return None
    headers = {**_retry(verdict.retry_after_s), "X-MBX-USED-WEIGHT-1M": str(verdict.used)}
    return _binance_refusal(sim, verdict.status, verdict.retry_after_s, headers)


def _binance_refusal(
    sim: Simulator, status: int, retry_after_s: float, headers: dict[str, str]
) -> web.Response:
    if status == 418:
        sim.stats.http_418 += 1
    else:
        sim.stats.http_429 += 1
    until = wall_ms() + int(retry_after_s * 1000)
    body = rate_limit_body(status, sim.binance_limiter.capacity, until)
    return json_response(body, status=status, headers=headers)


async def rest_fault(
    sim: Simulator, exchange: str, rule: FaultRule, request: web.Request
) -> web.Response | None:
    kind = rule.kind
    if kind == "slow":
        await anyio.sleep(rule.duration_s)
        return None
    if kind == "timeout":
        started = time.monotonic()
        with anyio.move_on_after(rule.duration_s):
            await sim.stopping.wait()
        logger.debug("sim {}: held a request {:.1f}s", exchange, time.monotonic() - started)
        abort_transport(request.transport)
        raise web.HTTPServiceUnavailable  # never reaches the client: the socket is gone
    if kind == "http_5xx":
        status = rule.status or 503
        sim.stats.http_5xx += 1
        if exchange == "kraken":
            return json_response({"error": ["EService:Unavailable"]}, status=status)
        body = {
            "code": -1001,
            "msg": "Internal error; unable to process your request. Please try again.",
        }
        return json_response(body, status=status)
    retry = rule.retry_after_s
    if exchange == "kraken":
        if rule.status and rule.status != 200:
            sim.stats.http_429 += 1
            return json_response(
                {"error": ["EGeneral:Too many requests"]},
                status=rule.status,
                headers=_retry(retry or 1),
            )
        sim.stats.kraken_rate_limited += 1
        return json_response({"error": ["EGeneral:Too many requests"]})
    status = 418 if kind == "http_418" else 429
    default = 120 if status == 418 else 30
    seconds = retry if retry is not None else default
    headers = {**_retry(seconds), "X-MBX-USED-WEIGHT-1M": str(sim.binance_limiter.used)}
    return _binance_refusal(sim, status, seconds, headers)
