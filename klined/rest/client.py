"""The REST client the gap-filler and backfill use: adapter + shared limiter + httpx + retries.

The adapter (sans-I/O) builds each request and parses each response; this module does the I/O
and owns the politeness rules:

* every request waits for the exchange's shared :class:`~klined.rest.ratelimit.RateLimiter`;
* a 429 (or Kraken's "too many requests") pauses the whole exchange for Retry-After and the
  request is tried again; a 418 is a limiter bug: logged loudly, the exchange is stopped for
  Retry-After, and the caller gets :class:`~klined.errors.RateLimited` (``banned=True``);
* 5xx, timeouts, transport errors and unreadable bodies are retried with capped, jittered
  backoff, a bounded number of times; an invalid request or an unlisted pair is never retried;
* every request has a timeout (``rest_timeout_s``), on top of httpx's own.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx
from loguru import logger

from klined.config import Config
from klined.errors import (
    ExchangeError,
    ExchangeUnreachable,
    RateLimited,
    RequestRejected,
    UnlistedPair,
    UsageError,
)
from klined.exchanges.base import CandlePage, ListedPair, RestRequest, TradePage
from klined.model import Pair
from klined.rest.ratelimit import RateLimiter, backoff_delay, shared_limiter

T = TypeVar("T")

#: 429s in a row for one request before giving up on it (the exchange stays paused meanwhile).
MAX_THROTTLES = 8
#: Once as many attempts in a row as a request may make (over all requests) could not connect
#: at all (DNS, refused), every request fails at once for this long instead of each pair
#: spending its own retries: a chain run on a machine cut off from an exchange took minutes.
UNREACHABLE_PAUSE_S = 60.0


@dataclass(slots=True)
class RetryPolicy:
    attempts: int = 5  # tries per request for 5xx / timeouts / unreadable bodies
    initial_s: float = 0.5
    max_s: float = 30.0


class RestClient:
    """One exchange's REST API, politely. Safe to share between many concurrent tasks."""

    def __init__(
        self,
        adapter: Any,
        base_url: str,
        limiter: RateLimiter,
        http: httpx.AsyncClient,
        *,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        clock_ms: Callable[[], int] | None = None,
        rng: random.Random | None = None,
        unreachable_pause_s: float = UNREACHABLE_PAUSE_S,
    ) -> None:
        self.adapter = adapter
        self.exchange: str = adapter.name
        self.base_url = base_url.rstrip("/")
        self.limiter = limiter
        self.http = http
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.rng = rng or random.Random()
        self.errors = 0  # requests finally given up on
        self.unreachable_pause_s = unreachable_pause_s
        self._refused = 0  # attempts in a row that could not connect
        self._unreachable_until = 0.0  # monotonic
        self._unreachable_why = ""

    @property
    def limits(self) -> Any:
        return self.adapter.limits

    # --------------------------------------------------------------------------- public calls

    async def fetch_candles(self, pair: Pair, start_ms: int, end_ms: int) -> CandlePage:
        """Closed candles of ``[start_ms, end_ms)`` (as much as one request returns)."""
        req = self.adapter.candles_request(pair, start_ms, end_ms)
        return await self._call(
            req,
            lambda st, hd, body, now: self.adapter.parse_candles(req, st, hd, body, now_ms=now),
        )

    async def fetch_trades(self, pair: Pair, since_ns: str) -> TradePage:
        """One page of public trades after ``since_ns`` (Kraken ``Trades``) -> ``TradePage``."""
        req = self.adapter.trades_request(pair, since_ns)
        return await self._call(
            req,
            lambda st, hd, body, now: self.adapter.parse_trades(req, st, hd, body, now_ms=now),
        )

    async def fetch_listing(self) -> dict[Pair, ListedPair]:
        req = self.adapter.listing_request()
        return await self._call(
            req, lambda st, hd, body, now: self.adapter.parse_listing(st, hd, body)
        )

    # --------------------------------------------------------------------------- machinery

    async def _call(
        self, req: RestRequest, parse: Callable[[int, dict[str, str], bytes, int], T]
    ) -> T:
        failures = 0
        throttles = 0
        what = f"{self.exchange} {req.kind}" + (f" {req.pair}" if req.pair else "")
        while True:
            problem: Exception
            self._check_reachable(what)
            async with self.limiter.slot(req.cost) as slot:
                # again: the exchange may have been found unreachable while this waited
                self._check_reachable(what)
                try:
                    status, headers, body = await self._send(req)
                    self._refused = 0
                    result = parse(status, headers, body, self.clock_ms())
                except RateLimited as exc:
                    self.limiter.throttle(exc.retry_after, banned=exc.banned, why=what)
                    if exc.banned:
                        self.errors += 1
                        raise
                    throttles += 1
                    if throttles >= MAX_THROTTLES:
                        self.errors += 1
                        raise
                    continue  # the limiter holds the next try until the pause is over
                except (UnlistedPair, RequestRejected):
                    self.errors += 1
                    raise
                except (ExchangeError, httpx.HTTPError, TimeoutError) as exc:
                    problem = exc
                else:
                    slot.used_weight = getattr(result, "used_weight", None)
                    self._unreachable_until = 0.0
                    return result
            failures += 1
            self.limiter.stats.retries += 1
            if isinstance(problem, httpx.ConnectError):
                self._note_refused(problem)
            if failures >= self.retry.attempts:
                self.errors += 1
                if isinstance(problem, ExchangeError):
                    raise problem
                raise ExchangeError(f"{what}: {type(problem).__name__}: {problem}") from problem
            delay = backoff_delay(failures - 1, self.retry.initial_s, self.retry.max_s, self.rng)
            logger.debug(
                "{} failed ({}: {}), retry {} in {:.2f}s",
                what,
                type(problem).__name__,
                problem,
                failures,
                delay,
            )
            await anyio.sleep(delay)

    def _note_refused(self, problem: Exception) -> None:
        """Count attempts in a row, over all requests, that could not connect at all."""
        self._refused += 1
        if self._refused >= self.retry.attempts and time.monotonic() >= self._unreachable_until:
            self._unreachable_until = time.monotonic() + self.unreachable_pause_s
            self._unreachable_why = f"{type(problem).__name__}: {problem}"
            logger.warning(
                "{} unreachable ({}); its requests fail at once for {:.0f} s",
                self.exchange,
                problem,
                self.unreachable_pause_s,
            )

    def _check_reachable(self, what: str) -> None:
        if time.monotonic() < self._unreachable_until:
            self.errors += 1
            raise ExchangeUnreachable(
                f"{what}: {self.exchange} unreachable ({self._unreachable_why})"
            )

    async def _send(self, req: RestRequest) -> tuple[int, dict[str, str], bytes]:
        url = self.base_url + req.path
        with anyio.fail_after(self.timeout_s):
            resp = await self.http.request(req.method, url, params=req.params)
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return resp.status_code, headers, resp.content


# ---------------------------------------------------------------------------------------------
# building the clients from the config


def build_adapter(cfg: Config, exchange: str) -> Any:
    """The exchange's adapter with the config's per-pair symbol overrides."""
    from klined.exchanges import adapter_for

    return adapter_for(exchange, getattr(cfg.exchanges, exchange))


@asynccontextmanager
async def open_clients(
    cfg: Config,
    exchanges: list[str] | None = None,
    *,
    limiters: Mapping[str, RateLimiter] | None = None,
    clock_ms: Callable[[], int] | None = None,
    retry: RetryPolicy | None = None,
) -> AsyncIterator[dict[str, RestClient]]:
    """REST clients for the enabled exchanges, sharing the process-wide limiters.

    ``limiters`` replaces the shared ones (tests and benches with a scaled simulator budget).
    """
    names = exchanges if exchanges is not None else list(cfg.exchanges.enabled())
    clients: dict[str, RestClient] = {}
    async with AsyncExitStack() as stack:
        for name in names:
            section = getattr(cfg.exchanges, name, None)
            if section is None:
                raise UsageError(f"unknown exchange {name!r}")
            adapter = build_adapter(cfg, name)
            url = cfg.rest_url(name)
            limiter = (limiters or {}).get(name) or shared_limiter(
                name, url, adapter.limits.rest_budget, section.rate_limit_fraction
            )
            timeout = httpx.Timeout(section.rest_timeout_s)
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    timeout=timeout,
                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
                    headers={"User-Agent": "klined"},
                )
            )
            clients[name] = RestClient(
                adapter,
                url,
                limiter,
                http,
                timeout_s=section.rest_timeout_s,
                clock_ms=clock_ms,
                retry=retry,
            )
        yield clients
