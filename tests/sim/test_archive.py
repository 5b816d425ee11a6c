"""The simulator's Binance US archive (served over HTTP) and Kraken OHLCVT zips: the layout,
when files are published, both timestamp units, header rows, the per-file faults, and rows
that are the market's truth."""

from __future__ import annotations

import hashlib
import io
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from klined.model import DAY_MS, MINUTE_MS
from klined.sim import Market
from klined.sim.archive import HEADER, kraken_lines, write_kraken_zip
from tests.fixtures.sim import SIM_START

pytestmark = [pytest.mark.anyio]

TODAY = SIM_START - SIM_START % DAY_MS
DAY = TODAY - DAY_MS


def url(sim: Any, kind: str, label: str, suffix: str = "") -> str:
    return f"{sim.binance_archive_url}/spot/{kind}/klines/BTCUSD/1m/BTCUSD-1m-{label}.zip{suffix}"


def csv_lines(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        (name,) = zf.namelist()
        return zf.read(name).decode().splitlines()


async def test_daily_files_with_checksums_units_and_headers(sim_factory: Any) -> None:
    options = {"binance_archive_header": "always", "binance_archive_micros_from": TODAY + DAY_MS}
    async with sim_factory(**options) as sim, httpx.AsyncClient() as http:
        resp = await http.get(url(sim, "daily", "2025-12-31"))
        assert resp.status_code == 200
        check = (await http.get(url(sim, "daily", "2025-12-31", ".CHECKSUM"))).text
        assert check == f"{hashlib.sha256(resp.content).hexdigest()}  BTCUSD-1m-2025-12-31.zip\n"
        lines = csv_lines(resp.content)
        assert lines[0] == HEADER and len(lines) == 1441
        first = lines[1].split(",")
        assert int(first[0]) == DAY and int(first[6]) == DAY + MINUTE_MS - 1  # milliseconds
        truth = sim.market.truth("binance", "BTC/USD", DAY)
        assert Decimal(first[4]) == Decimal(truth.close) and int(first[8]) == truth.trades
        # today is not over: no file yet; nor is one for a symbol Binance does not list
        assert (await http.get(url(sim, "daily", "2026-01-01"))).status_code == 404
        assert (await http.get(url(sim, "monthly", "2025-12"))).status_code == 200
        bad = url(sim, "daily", "2025-12-31").replace("BTCUSD/1m/BTCUSD", "DOGEUSD/1m/DOGEUSD")
        assert (await http.get(bad)).status_code == 404


async def test_microseconds_from_2025_and_a_seeded_half_with_headers(sim_factory: Any) -> None:
    async with sim_factory() as sim, httpx.AsyncClient() as http:
        headers = 0
        for day in range(1, 11):
            lines = csv_lines((await http.get(url(sim, "daily", f"2025-12-{day:02d}"))).content)
            headers += lines[0] == HEADER
            row = lines[-1].split(",")
            assert len(row[0]) == 16 and row[6].endswith("999999")  # microseconds
        assert 0 < headers < 10


async def test_per_file_faults(sim_factory: Any) -> None:
    async with sim_factory() as sim, httpx.AsyncClient() as http:
        name = "BTCUSD-1m-2025-12-31.zip"
        sim.binance_archive.set_variant(name, "bad_row")
        lines = csv_lines((await http.get(url(sim, "daily", "2025-12-31"))).content)
        assert sum("x" in line for line in lines) == 1
        sim.binance_archive.set_variant(name, "truncated")
        data = (await http.get(url(sim, "daily", "2025-12-31"))).content
        check = (await http.get(url(sim, "daily", "2025-12-31", ".CHECKSUM"))).text
        assert check.startswith(hashlib.sha256(data).hexdigest())  # published as it is
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(io.BytesIO(data))
        sim.binance_archive.set_variant(name, "missing")
        assert (await http.get(url(sim, "daily", "2025-12-31"))).status_code == 404
        with pytest.raises(ValueError, match="unknown archive variant"):
            sim.binance_archive.set_variant(name, "haunted")


def test_kraken_zips_hold_the_traded_minutes_per_interval(tmp_path: Path) -> None:
    market = Market(7)
    path = write_kraken_zip(market, tmp_path / "k.zip", ["BTC/USD", "DOGE/USD"], DAY, TODAY)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == [
            "XBTUSD_1.csv", "XBTUSD_5.csv", "XBTUSD_60.csv",
            "XDGUSD_1.csv", "XDGUSD_5.csv", "XDGUSD_60.csv",
        ]  # fmt: skip
        rows = zf.read("XDGUSD_1.csv").decode().splitlines()
    traded = [
        m for m in range(DAY, TODAY, MINUTE_MS) if market.truth("kraken", "DOGE/USD", m).trades
    ]
    assert [int(r.split(",")[0]) * 1000 for r in rows] == traded
    t = market.truth("kraken", "DOGE/USD", traded[0])
    assert rows[0].split(",")[1:] == [t.open, t.high, t.low, t.close, t.volume, str(t.trades)]
    hourly = list(kraken_lines(market, "DOGE/USD", DAY, TODAY, 60))
    assert len(hourly) == 24
    assert sum(int(h.split(",")[6]) for h in hourly) == sum(
        market.truth("kraken", "DOGE/USD", m).trades for m in traded
    )
