"""The ``klined check`` rows of the exchanges' archives: Binance US's archive location
answers; Kraken's folder of hand-downloaded OHLCVT files holds 1-minute files of the pairs.

Binance's is a WARN when it cannot be reached (a backfill then uses REST; ``klined import
binance`` needs it) and a FAIL when it answers nonsense; Kraken's is a FAIL when the configured
folder is missing and SKIPs when none is configured.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from klined.checks.result import CheckResult, Outcome
from klined.config import Config


async def check_archive(cfg: Config, name: str) -> CheckResult:
    """Binance: the archive location answers for a recent file of the first pair. Kraken: the
    folder of hand-downloaded OHLCVT files exists and holds 1-minute files of the pairs."""
    row = f"archive {name}"
    section = getattr(cfg.exchanges, name)
    if not section.enabled:
        return CheckResult(row, Outcome.SKIP, "exchange disabled in the config")
    pairs = cfg.pairs(name)
    if not pairs:
        return CheckResult(row, Outcome.SKIP, "no pairs configured")
    if name == "binance":
        return await _binance_archive(cfg, row, pairs[0])
    return await anyio.to_thread.run_sync(_kraken_archive, cfg, row, pairs)


async def _binance_archive(cfg: Config, row: str, pair: Any) -> CheckResult:
    from klined.archives import binance as bn
    from klined.archives.download import ArchiveSource
    from klined.errors import ArchiveError, ArchiveNotPublished, ArchiveUnreachable
    from klined.rest.client import build_adapter

    url = cfg.archive_url
    native = build_adapter(cfg, "binance").native(pair)
    day = bn.floor_day(int(time.time() * 1000)) - 2 * 86_400_000
    period = bn.Period(day, day + 86_400_000, bn.DAILY)
    name = bn.file_name(native, period)
    timeout = min(5.0, cfg.exchanges.binance.rest_timeout_s)  # x4 per try, 2 tries: < --timeout
    try:
        async with ArchiveSource(url, timeout_s=timeout, attempts=2, backoff_s=(0.5, 1.0)) as src:
            body = await src.checksum(bn.checksum_path(native, period), name)
        bn.parse_checksum(body, name)
    except ArchiveNotPublished:
        return CheckResult(
            row, Outcome.OK,
            f"{url} reachable (no {name} there: not published yet, or {pair} did not trade)",
        )  # fmt: skip
    except ArchiveUnreachable as exc:
        return CheckResult(
            row, Outcome.WARN,
            f"{exc}: `klined backfill` uses REST instead; `klined import binance` needs it",
        )  # fmt: skip
    except ArchiveError as exc:
        return CheckResult(row, Outcome.FAIL, f"{url}: {exc}")
    return CheckResult(row, Outcome.OK, f"{url} reachable ({name}.CHECKSUM read)")


def _kraken_archive(cfg: Config, row: str, pairs: list[Any]) -> CheckResult:
    from klined.archives import kraken as kr
    from klined.archives.files import scan_kraken
    from klined.rest.client import build_adapter

    folder = cfg.kraken_archive_dir
    if folder is None:
        return CheckResult(
            row, Outcome.SKIP,
            "exchanges.kraken.archive_dir not set (Kraken's OHLCVT files come by hand)",
        )  # fmt: skip
    if not folder.is_dir():
        return CheckResult(
            row, Outcome.FAIL, f"{folder} is not a folder (exchanges.kraken.archive_dir)"
        )
    scan = scan_kraken([folder])
    names = kr.pair_names(build_adapter(cfg, "kraken"), pairs)
    found = {
        names[f.native.upper()] for f in scan.files if f.interval == 1 and f.native.upper() in names
    }
    details = [str(p) for p in scan.problems]
    lacking = [p for p in pairs if p not in found]
    if lacking:
        details.append("no 1-minute file for " + ", ".join(map(str, lacking)))
    outcome = Outcome.WARN if scan.problems or not found else Outcome.OK
    return CheckResult(
        row, outcome, f"{folder}: 1-minute files for {len(found)} of {len(pairs)} pair(s)", details
    )
