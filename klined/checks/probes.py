"""The probes behind ``klined check``: is this machine ready to run klined (and is it running)?

Every check runs concurrently with its own timeout and ends as one row: OK, WARN, FAIL or SKIP
with a reason an operator can act on. The exit code is 1 when any row FAILs, else 0.
This module runs them all and holds the config, exchange and daemon rows; the PostgreSQL rows
are :mod:`klined.checks.postgres`, the S3 and lake rows :mod:`klined.checks.lake`, the archive
hosts' :mod:`klined.checks.archives`.

Decisions worth knowing:

* ``check`` changes nothing it does not clean up: it never starts a database server and never
  applies the schema. With the embedded PostgreSQL (no ``database.dsn``) it uses the daemon's
  server when it runs and says WARN ("``klined run`` starts it") when it does not, because the
  daemon owns that server's life and starting it here would leave ``check`` holding the data
  directory a starting daemon needs.
* States the first ``klined run`` resolves by itself are WARN, not FAIL, so a check before the
  first start passes: the daemon not running, the embedded server not running, the schema not
  applied yet (when the user may create it), the lake root not created yet.
* DSNs are shown redacted and every reason goes through :func:`klined.logs.redact` as well.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio

from klined.checks.archives import check_archive
from klined.checks.lake import check_lake, check_lake_in_s3, check_s3
from klined.checks.postgres import check_postgres
from klined.checks.result import CheckResult, Outcome
from klined.config import Config
from klined.errors import ExchangeError, StatusError
from klined.logs import redact
from klined.model import EXCHANGES, format_duration

__all__ = ["CheckResult", "Outcome", "config_label", "exit_code", "run_checks"]

#: a check that has not finished after this many seconds FAILs (``--timeout``)
DEFAULT_TIMEOUT_S = 30.0


# -- running ----------------------------------------------------------------------------------


async def _bounded(
    names: list[str], deadline_s: float, check: Callable[[], Awaitable[list[CheckResult]]]
) -> list[CheckResult]:
    """Run one check with a deadline; a timeout or a crash becomes FAIL rows, never a traceback."""
    try:
        with anyio.fail_after(deadline_s):
            return await check()
    except anyio.get_cancelled_exc_class():
        raise
    except TimeoutError:
        why = f"no answer within {deadline_s:g}s"
    except Exception as exc:
        why = f"check crashed: {type(exc).__name__}: {exc}"
    return [CheckResult(names[0], Outcome.FAIL, why)] + [
        CheckResult(n, Outcome.SKIP, f"{names[0]} did not finish") for n in names[1:]
    ]


async def run_checks(
    cfg: Config, *, deadline_s: float = DEFAULT_TIMEOUT_S, lake_s3: bool = False
) -> list[CheckResult]:
    """Every check, concurrently; rows in a fixed order (config first). ``lake_s3`` adds the
    comparison of the local parts with S3 (``klined check --lake``)."""
    plan: list[tuple[list[str], Callable[[], Awaitable[list[CheckResult]]]]] = [
        (
            ["postgresql", "schema", "read-only role", "reader role", "lake parts"],
            functools.partial(check_postgres, cfg),
        ),
        (["s3"], _single(check_s3, cfg)),
        *[([f"exchange {name}"], _single(check_exchange, cfg, name)) for name in EXCHANGES],
        *[([f"archive {name}"], _single(check_archive, cfg, name)) for name in EXCHANGES],
        (["status socket"], _single(check_status_socket, cfg)),
        (["lake"], _single(check_lake, cfg)),
    ]
    if lake_s3:
        plan.append((["lake in s3"], _single(check_lake_in_s3, cfg)))
    slots: list[list[CheckResult]] = [[] for _ in plan]

    async def run(i: int) -> None:
        names, check = plan[i]
        slots[i] = await _bounded(names, deadline_s, check)

    async with anyio.create_task_group() as tg:
        for i in range(len(plan)):
            tg.start_soon(run, i)
    results = [check_config(cfg)] + [r for rows in slots for r in rows]
    return [_scrubbed(r, cfg) for r in results]


def _single(
    check: Callable[..., Awaitable[CheckResult]], *args: Any
) -> Callable[[], Awaitable[list[CheckResult]]]:
    """A one-row check as the runner wants it."""

    async def run() -> list[CheckResult]:
        return [await check(*args)]

    return run


def _scrubbed(result: CheckResult, cfg: Config) -> CheckResult:
    """Defence in depth: no password from the DSN survives in any reason."""
    secret = ""
    with contextlib.suppress(ValueError):
        secret = urlsplit(cfg.dsn).password or ""

    def clean(text: str) -> str:
        text = redact(text)
        return text.replace(secret, "***") if secret else text

    result.reason = clean(result.reason)
    result.details = [clean(d) for d in result.details]
    return result


def exit_code(results: list[CheckResult]) -> int:
    """1 when anything FAILed; WARN and SKIP never fail the check."""
    return 1 if any(r.outcome is Outcome.FAIL for r in results) else 0


# -- config -----------------------------------------------------------------------------------


def config_label(cfg: Config) -> str:
    if not cfg.source_path or cfg.source_path.startswith("<"):
        return "built-in defaults (no klined.toml found)"
    return str(Path(cfg.source_path).expanduser().resolve())


def check_config(cfg: Config) -> CheckResult:
    """Loading already validated it (a bad config exits 2 before any check); say what it is."""
    enabled = cfg.exchanges.enabled()
    pairs = sum(len(section.pairs) for section in enabled.values())
    database = "database.dsn" if cfg.dsn else "embedded PostgreSQL"
    lake = f"S3 bucket {cfg.s3.bucket}" if cfg.s3.bucket else "local lake only"
    summary = f"{len(enabled)} exchange(s), {pairs} pair(s), {database}, {lake}"
    if not enabled:
        return CheckResult("config", Outcome.WARN, f"{config_label(cfg)}: no exchange enabled")
    return CheckResult("config", Outcome.OK, f"{config_label(cfg)} ({summary})")


# -- exchanges --------------------------------------------------------------------------------


async def check_exchange(cfg: Config, name: str) -> CheckResult:
    """The listing endpoint answers and lists every configured pair."""
    section = getattr(cfg.exchanges, name)
    row = f"exchange {name}"
    if not section.enabled:
        return CheckResult(row, Outcome.SKIP, "disabled in the config")
    import httpx

    from klined.exchanges import adapter_for, check_listing
    from klined.rest.client import RestClient, RetryPolicy
    from klined.rest.ratelimit import RateLimiter

    adapter = adapter_for(name, section)
    url = cfg.rest_url(name)
    pairs = cfg.pairs(name)
    if not pairs:
        return CheckResult(row, Outcome.WARN, "enabled but no pairs configured")
    limiter = RateLimiter.for_limits(name, adapter.limits.rest_budget, section.rate_limit_fraction)
    try:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(section.rest_timeout_s), headers={"User-Agent": "klined"}
        ) as http:
            client = RestClient(
                adapter,
                url,
                limiter,
                http,
                timeout_s=section.rest_timeout_s,
                retry=RetryPolicy(attempts=2, initial_s=0.5, max_s=2.0),
            )
            listing = await client.fetch_listing()
    except ExchangeError as exc:
        cause = exc.__cause__
        if isinstance(cause, httpx.TimeoutException | TimeoutError):
            why = f"{url} did not answer within {section.rest_timeout_s:g}s"
        elif isinstance(cause, httpx.TransportError):
            why = f"cannot reach {url}: {type(cause).__name__}: {cause}"
        else:
            why = f"listing from {url} failed: {exc}"
        return CheckResult(row, Outcome.FAIL, why)
    from klined.exchanges.listing import configured_natives

    natives = configured_natives(adapter)
    listed, problems = check_listing(pairs, listing, exchange=name, natives=natives)
    if problems:
        return CheckResult(
            row,
            Outcome.FAIL,
            f"{len(problems)} of {len(pairs)} pair(s) not usable ({url}):",
            [problems[p] for p in pairs if p in problems],
        )
    return CheckResult(row, Outcome.OK, f"all {len(listed)} pair(s) listed ({url})")


# -- the daemon -------------------------------------------------------------------------------


async def check_status_socket(cfg: Config) -> CheckResult:
    """The daemon answers on its socket. Not running is a WARN: check before the first start."""
    from klined.daemon.status_server import fetch_status
    from klined.status import StreamState

    path = cfg.status_socket
    row = "status socket"
    try:
        snap = await fetch_status(path, timeout=5.0)
    except StatusError as exc:
        outcome = Outcome.WARN if "not running" in str(exc) else Outcome.FAIL
        return CheckResult(row, outcome, str(exc))
    connected = sum(1 for c in snap.connections if c.state is StreamState.CONNECTED)
    unlisted = sum(1 for p in snap.pairs if p.state is StreamState.UNLISTED)
    extra = f", {unlisted} unlisted pair(s)" if unlisted else ""
    return CheckResult(
        row,
        Outcome.OK,
        f"klined pid {snap.pid} answers on {path}: up {format_duration(snap.uptime_s)}, "
        f"{connected}/{len(snap.connections)} connection(s) connected{extra}",
    )
