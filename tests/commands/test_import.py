"""``klined import binance|kraken`` on the command line: bad arguments exit 2, a run against the
simulator's archive exits 0 and prints what it loaded, a re-run loads nothing, a bad file exits
1 naming the file and line while the others load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from klined.cli import main
from klined.model import DAY_MS, iso
from klined.sim import FaultPlan, FaultRule
from klined.sim.archive import write_kraken_zip
from tests.fixtures.sim import SIM_START

PAIRS = ["BTC/USD", "REKT/USD"]
DAY0 = SIM_START - SIM_START % DAY_MS - 2 * DAY_MS  # 2025-12-30


def write_config(path: Path, dsn: str, sim: Any | None = None) -> Path:
    lines = [
        "[daemon]",
        f'data_dir = "{path.parent / "data"}"',
        "[database]",
        f'dsn = "{dsn}"',
        'readonly_role = ""',
    ]
    for ex in ("binance", "kraken"):
        lines += [f"[exchanges.{ex}]", f"pairs = {PAIRS!r}".replace("'", '"')]
        if sim is not None and ex == "binance":
            lines.append(f'archive_url = "{sim.binance_archive_url}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def run(args: list[str]) -> int:
    try:
        rv = main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return int(rv or 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["binance", "--from", "2026-01-02", "--to", "2026-01-01"], "empty or reversed range"),
        (["binance", "--from", "2026-01-01", "--to", "2026-01-02", "--pair", "DOGE/USD"],
         "not configured"),
        (["binance", "--from", "someday", "--to", "2026-01-02"], "--from"),
        (["kraken", "x.zip", "--pair", "btc-usd"], "canonical pair"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2(tmp_path: Path, capsys: Any, args: list[str], message: str) -> None:
    cfg = write_config(tmp_path / "klined.toml", "postgresql://nowhere.invalid/x")
    assert run(["import", args[0], "-c", str(cfg), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err


def test_a_path_is_required(tmp_path: Path, capsys: Any) -> None:
    cfg = write_config(tmp_path / "klined.toml", "postgresql://nowhere.invalid/x")
    assert run(["import", "kraken", "-c", str(cfg)]) == 2
    assert "PATHS" in capsys.readouterr().err


@pytest.mark.anyio
@pytest.mark.integration
async def test_import_binance_then_again_then_with_a_bad_file(
    sim_factory: Any, pg_dsn: str, tmp_path: Path, capsys: Any
) -> None:
    bad_day = iso(DAY0 + DAY_MS)[:10]
    plan = FaultPlan(
        rules=[FaultRule(kind="archive_bad_row", endpoint=f"REKTUSD-1m-{bad_day}", times=0)]
    )
    async with sim_factory(pairs=PAIRS, faults=plan, binance_archive_header="never") as sim:
        cfg = str(write_config(tmp_path / "klined.toml", pg_dsn, sim))
        day1 = ["--from", iso(DAY0)[:10], "--to", iso(DAY0 + DAY_MS)[:10]]
        code = await anyio.to_thread.run_sync(run, ["import", "binance", "-c", cfg, *day1])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "BTC/USD" in out and "2,880 rows" in out and "hour(s) merged" in out
        assert f"from {sim.binance_archive_url}" in err

        code = await anyio.to_thread.run_sync(run, ["import", "binance", "-c", cfg, *day1])
        out, _ = capsys.readouterr()
        assert code == 0 and "0 rows" in out

        both = ["--from", iso(DAY0)[:10], "--to", iso(DAY0 + 2 * DAY_MS)[:10]]
        code = await anyio.to_thread.run_sync(run, ["import", "binance", "-c", cfg, *both])
        out, err = capsys.readouterr()
        assert code == 1
        assert f"error: REKTUSD-1m-{bad_day}.zip line 721: high" in err
        assert "nothing of them is in the warehouse" in err
        assert "1,440 rows" in out  # BTC/USD's second day loaded


@pytest.mark.anyio
@pytest.mark.integration
async def test_import_kraken_zip(
    sim_factory: Any, pg_dsn: str, tmp_path: Path, capsys: Any
) -> None:
    async with sim_factory(pairs=PAIRS) as sim:
        archive = write_kraken_zip(sim.market, tmp_path / "Kraken_OHLCVT.zip", PAIRS, DAY0,
                                   DAY0 + DAY_MS)  # fmt: skip
        cfg = str(write_config(tmp_path / "klined.toml", pg_dsn, sim))
        code = await anyio.to_thread.run_sync(run, ["import", "kraken", "-c", cfg, str(archive)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "Kraken_OHLCVT.zip" in err or "import kraken" in err
        assert "ignored 4 files of other intervals (5, 60 min)" in err
        assert "REKT/USD" in out and "hour(s) merged" in out
