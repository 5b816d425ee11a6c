"""The exchanges' published history, from the simulated market: Binance US's kline archive
(served over HTTP, or written to a folder) and Kraken's OHLCVT zips (written to disk).

Binance US (``/public_data/spot/{daily,monthly}/klines/<SYMBOL>/1m/<SYMBOL>-1m-<day|month>.zip``
and ``.zip.CHECKSUM`` = ``<sha256>  <file name>``): the same rows ``/api/v3/klines`` serves for
closed minutes, one CSV per zip. A day's file is published once the day is over, a month's
``binance_archive_monthly_delay_days`` after the month (Binance publishes months early in the
following month). Timestamps are microseconds from ``binance_archive_micros_from``
(2025-01-01, as Binance switched) and milliseconds before; ``binance_archive_header`` decides
which files start with a header row (``mixed``: a seeded half of them).

The REST fault kinds ``http_5xx``, ``slow`` and ``timeout`` apply to archive requests too
(``endpoint`` = part of the path). Archive faults are per file, decided the first time the file
is asked for (its checksum or its zip),
from the fault plan (``archive_*`` kinds, ``endpoint`` = part of the file name) or set by a
test (:meth:`BinanceArchive.set_variant`):

* ``archive_missing``: 404 for both;
* ``archive_bad_checksum``: the ``.CHECKSUM`` does not match the zip;
* ``archive_truncated``: the zip is cut in half (and its checksum matches the cut bytes, as an
  interrupted upload would publish it);
* ``archive_bad_row``: one row in the middle has a high that is not a number (checksum matches);
* ``archive_revised``: the file was revised: its first traded row's volume is one step larger
  (checksum matches). Its truth is :meth:`BinanceArchive.revised_volume`.

Kraken (``<PAIR>_<minutes>.csv`` per pair and interval in one zip, no header, Unix seconds,
untraded intervals omitted): :func:`write_kraken_zip`.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from klined.model import DAY_MS, MINUTE_MS, Pair
from klined.sim.clock import wall_ms
from klined.sim.config import ARCHIVE_MICROS_FROM
from klined.sim.kraken import names
from klined.sim.market import Agg, Market, fmt_fixed, fmt_plain
from klined.sim.rest import rest_fault

if TYPE_CHECKING:
    from klined.sim.server import Simulator

PREFIX = "/public_data"
MICROS_FROM = ARCHIVE_MICROS_FROM
HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    "taker_buy_volume,taker_buy_quote_volume,ignore"
)
VARIANTS = frozenset({"ok", "missing", "bad_checksum", "truncated", "bad_row", "revised"})
#: generated files kept in memory, per simulator
CACHE_FILES = 64


def _bfmt(value: int, dp: int) -> str:
    return fmt_fixed(value, dp, pad_to=8)


def _month_end(start_ms: int) -> int:
    dt = datetime.fromtimestamp(start_ms / 1000, tz=UTC)
    nxt = datetime(dt.year + dt.month // 12, dt.month % 12 + 1, 1, tzinfo=UTC)
    return int(nxt.timestamp() * 1000)


def _native(pair: str) -> str:
    p = Pair.parse(pair)
    return f"{p.base}{p.quote}"


# ---------------------------------------------------------------------------------------------
# Binance US klines


def binance_lines(
    market: Market, pair: str, start_ms: int, end_ms: int, *, micros: bool
) -> Iterator[str]:
    """The CSV lines (no line ending) of every closed minute: ``/api/v3/klines`` rows."""
    spec = market.spec(pair)
    pdp, qdp = spec.price_dp, spec.qty_dp
    scale = 1000 if micros else 1
    last = 999 if micros else 0
    zero = _bfmt(0, 0)
    prev: Agg | None = None
    for data in market.iter_minutes("binance", pair, start_ms, end_ms):
        m = data.minute
        agg = data.total
        open_t = m * scale
        close_t = (m + MINUTE_MS - 1) * scale + last
        if agg is None:
            close = prev.close if prev is not None else market.prev_close("binance", pair, m)
            c = _bfmt(close, pdp)
            yield f"{open_t},{c},{c},{c},{c},{zero},{close_t},{zero},0,{zero},{zero},0"
            continue
        prev = agg
        yield (
            f"{open_t},{_bfmt(agg.open, pdp)},{_bfmt(agg.high, pdp)},{_bfmt(agg.low, pdp)},"
            f"{_bfmt(agg.close, pdp)},{_bfmt(agg.volume, qdp)},{close_t},"
            f"{_bfmt(agg.quote, pdp + qdp)},{agg.n},{_bfmt(agg.taker_volume, qdp)},"
            f"{_bfmt(agg.taker_quote, pdp + qdp)},0"
        )


@dataclass(frozen=True, slots=True)
class BinanceFile:
    """One file of the archive: which pair and span, and how it is named."""

    pair: str
    kind: str  # daily | monthly
    start_ms: int
    end_ms: int

    @property
    def native(self) -> str:
        return _native(self.pair)

    @property
    def label(self) -> str:
        fmt = "%Y-%m-%d" if self.kind == "daily" else "%Y-%m"
        return datetime.fromtimestamp(self.start_ms / 1000, tz=UTC).strftime(fmt)

    @property
    def name(self) -> str:
        return f"{self.native}-1m-{self.label}.zip"

    @property
    def path(self) -> str:
        return f"spot/{self.kind}/klines/{self.native}/1m/{self.name}"


def binance_zip(
    market: Market,
    file: BinanceFile,
    *,
    micros: bool,
    header: bool,
    variant: str = "ok",
) -> bytes:
    """The zip of one file, with a fault ``variant`` applied (see the module doc)."""
    lines = binance_lines(market, file.pair, file.start_ms, file.end_ms, micros=micros)
    body = io.StringIO()
    if header:
        body.write(HEADER + "\n")
    n_minutes = (file.end_ms - file.start_ms) // MINUTE_MS
    bad_at = n_minutes // 2
    revised = variant == "revised"
    for i, line in enumerate(lines):
        if variant == "bad_row" and i == bad_at:
            fields = line.split(",")
            fields[2] = fields[2].replace(".", "x", 1)  # a high that is not a number
            line = ",".join(fields)
        elif revised and line.split(",")[8] != "0":
            fields = line.split(",")
            fields[5] = _bump(fields[5])
            line = ",".join(fields)
            revised = False
        body.write(line + "\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(file.name[: -len(".zip")] + ".csv", body.getvalue())
    data = buf.getvalue()
    if variant == "truncated":
        data = data[: len(data) // 2]
    return data


def _bump(amount: str) -> str:
    """One step (of the value's last decimal) more."""
    whole, _, frac = amount.partition(".")
    digits = len(frac)
    value = int(whole + frac) + 1
    text = str(value).rjust(digits + 1, "0")
    return f"{text[:-digits]}.{text[-digits:]}" if digits else text


def checksum_body(data: bytes, name: str) -> bytes:
    return f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode()


class BinanceArchive:
    """Serves (and caches) the archive files of one simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.variants: dict[str, str] = {}
        self.requests: dict[str, int] = {}  # file name (zip or checksum) -> requests
        self._cache: OrderedDict[str, bytes] = OrderedDict()

    # -- what exists ---------------------------------------------------------------------------

    def parse(self, path: str) -> BinanceFile | None:
        """``spot/<kind>/klines/<SYM>/1m/<SYM>-1m-<label>.zip`` -> the file, if well formed
        and listed; None otherwise."""
        parts = path.split("/")
        if len(parts) != 6 or parts[0] != "spot" or parts[2] != "klines" or parts[4] != "1m":
            return None
        kind, native, name = parts[1], parts[3], parts[5]
        pair = self.sim.native_index["binance"].get(native)
        prefix = f"{native}-1m-"
        if pair is None or kind not in ("daily", "monthly") or not name.startswith(prefix):
            return None
        label = name[len(prefix) : -len(".zip")] if name.endswith(".zip") else ""
        try:
            fmt = "%Y-%m-%d" if kind == "daily" else "%Y-%m"
            start = int(datetime.strptime(label, fmt).replace(tzinfo=UTC).timestamp() * 1000)
        except ValueError:
            return None
        end = start + DAY_MS if kind == "daily" else _month_end(start)
        file = BinanceFile(pair, kind, start, end)
        return file if file.name == name else None

    def published(self, file: BinanceFile) -> bool:
        cfg = self.sim.config
        if file.start_ms < self.sim.market.genesis_ms:
            return False
        delay = cfg.binance_archive_monthly_delay_days * DAY_MS if file.kind == "monthly" else 0
        return file.end_ms + delay <= self.sim.clock.now_ms()

    def variant(self, file: BinanceFile) -> str:
        known = self.variants.get(file.name)
        if known is None:
            known = self.sim.faults.on_archive("binance", file.name) or "ok"
            self.variants[file.name] = known
        return known

    def set_variant(self, name: str, variant: str) -> None:
        """Make a file ``variant`` from now on (e.g. ``revised``); the cache forgets it."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown archive variant {variant!r}; one of {sorted(VARIANTS)}")
        self.variants[name] = variant
        self._cache.pop(name, None)

    def zip_bytes(self, file: BinanceFile) -> bytes:
        data = self._cache.get(file.name)
        if data is None:
            cfg = self.sim.config
            header = {
                "never": False,
                "always": True,
                "mixed": hashlib.blake2b(f"{cfg.seed}/{file.name}".encode()).digest()[0] % 2 == 1,
            }[cfg.binance_archive_header]
            data = binance_zip(
                self.sim.market,
                file,
                micros=file.start_ms >= cfg.binance_archive_micros_from,
                header=header,
                variant=self.variant(file),
            )
            self._cache[file.name] = data
            if len(self._cache) > CACHE_FILES:
                self._cache.popitem(last=False)
        return data

    def checksum(self, file: BinanceFile) -> bytes:
        data = self.zip_bytes(file)
        if self.variant(file) == "bad_checksum":
            data = data + b"\x00"
        return checksum_body(data, file.name)

    # -- HTTP ----------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        fired = self.sim.faults.on_request("binance", request.path, None)
        if fired is not None and fired[1].kind in ("http_5xx", "slow", "timeout"):
            index, rule = fired
            self.sim.faults.record(index, rule, "binance", wall_ms(), detail=request.path)
            refused = await rest_fault(self.sim, "binance", rule, request)
            if refused is not None:
                return refused
        path = request.match_info["path"]
        is_checksum = path.endswith(".CHECKSUM")
        file = self.parse(path.removesuffix(".CHECKSUM"))
        name = path.rsplit("/", 1)[-1]
        self.requests[name] = self.requests.get(name, 0) + 1
        self.sim.stats.archive_requests += 1
        if file is None or not self.published(file) or self.variant(file) == "missing":
            return web.Response(status=404, text=_NO_SUCH_KEY, content_type="application/xml")
        if is_checksum:
            return web.Response(body=self.checksum(file), content_type="text/plain")
        return web.Response(body=self.zip_bytes(file), content_type="application/zip")


_NO_SUCH_KEY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
    "<Message>The specified key does not exist.</Message></Error>"
)


def build_app(sim: Simulator, archive: BinanceArchive) -> web.Application:
    """The archive's own host (Binance US serves it apart from the API: no API weights)."""
    app = web.Application()
    app.router.add_get(PREFIX + "/{path:.+}", archive.handle)
    return app


def write_binance(
    market: Market,
    root: Path,
    pairs: Sequence[str],
    start_ms: int,
    end_ms: int,
    *,
    monthly: bool = True,
    micros_from: int = MICROS_FROM,
    header: str = "mixed",
    seed: int = 1,
) -> list[Path]:
    """Write the archive of ``[start_ms, end_ms)`` (whole UTC days) under ``root`` in Binance's
    layout, zips and checksums: months wholly inside as monthly files, other days as daily
    ones (``monthly=False``: every day). Files already there are kept. Returns the zips."""
    out: list[Path] = []
    for pair in pairs:
        for file in _files(pair, start_ms, end_ms, monthly):
            target = root / file.path
            if not target.exists():
                hdr = header == "always" or (
                    header == "mixed"
                    and hashlib.blake2b(f"{seed}/{file.name}".encode()).digest()[0] % 2 == 1
                )
                data = binance_zip(market, file, micros=file.start_ms >= micros_from, header=hdr)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(data)
                target.with_name(target.name + ".CHECKSUM").write_bytes(
                    checksum_body(data, file.name)
                )
                tmp.replace(target)
            out.append(target)
    return out


def _files(pair: str, start_ms: int, end_ms: int, monthly: bool) -> Iterator[BinanceFile]:
    day = start_ms - start_ms % DAY_MS
    while day + DAY_MS <= end_ms:
        month_end = _month_end(day)
        first_of_month = datetime.fromtimestamp(day / 1000, tz=UTC).day == 1
        if monthly and first_of_month and month_end <= end_ms:
            yield BinanceFile(pair, "monthly", day, month_end)
            day = month_end
        else:
            yield BinanceFile(pair, "daily", day, day + DAY_MS)
            day += DAY_MS


# ---------------------------------------------------------------------------------------------
# Kraken OHLCVT


def kraken_lines(
    market: Market, pair: str, start_ms: int, end_ms: int, interval: int = 1
) -> Iterator[str]:
    """``time,open,high,low,close,volume,trades`` per traded interval (others omitted)."""
    spec = market.spec(pair)
    pdp, qdp = spec.price_dp, spec.qty_dp
    size = interval * MINUTE_MS
    bucket: list[Agg] = []
    bucket_start = -1
    for data in market.iter_minutes("kraken", pair, start_ms, end_ms):
        b = data.minute - data.minute % size
        if b != bucket_start:
            if bucket:
                yield _kraken_line(bucket_start, bucket, pdp, qdp)
            bucket, bucket_start = [], b
        if data.total is not None:
            bucket.append(data.total)
    if bucket:
        yield _kraken_line(bucket_start, bucket, pdp, qdp)


def _kraken_line(start: int, aggs: list[Agg], pdp: int, qdp: int) -> str:
    o, c = aggs[0].open, aggs[-1].close
    h = max(a.high for a in aggs)
    lo = min(a.low for a in aggs)
    v = sum(a.volume for a in aggs)
    n = sum(a.n for a in aggs)
    prices = ",".join(fmt_plain(x, pdp) for x in (o, h, lo, c))
    return f"{start // 1000},{prices},{fmt_plain(v, qdp)},{n}"


def kraken_name(pair: str) -> str:
    """Kraken's REST pair name, as in its file names: ``XBTUSD`` for BTC/USD."""
    return names(pair)["altname"]


def write_kraken_zip(
    market: Market,
    path: Path,
    pairs: Sequence[str],
    start_ms: int,
    end_ms: int,
    *,
    intervals: Sequence[int] = (1, 5, 60),
) -> Path:
    """One OHLCVT zip of ``[start_ms, end_ms)`` for ``pairs``: ``<PAIR>_<minutes>.csv`` each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for pair in pairs:
            for interval in intervals:
                lines = kraken_lines(market, pair, start_ms, end_ms, interval)
                with zf.open(f"{kraken_name(pair)}_{interval}.csv", "w") as member:
                    for line in lines:
                        member.write(line.encode() + b"\n")
    tmp.replace(path)
    return path
