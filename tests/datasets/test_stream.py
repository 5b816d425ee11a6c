"""Pure parts of the datasets: decimal fit, CSV blocks to Arrow, text rendering, months."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klined.datasets.export import months
from klined.datasets.formats import CsvSink, JsonlSink
from klined.datasets.schema import DECIMAL_MAX, Dataset
from klined.datasets.stream import fits, parse_block
from klined.errors import DatasetError
from klined.model import iso, parse_time

DS = Dataset("1m")
# as Dataset("1m").select has the server write it: times in milliseconds since the epoch
START = parse_time("2026-11-26T13:05:00Z")
ROW = f"{{sym}},{START},{START + 60_000},{{o}},1,1,1,{{v}},,,3,rest,{START + 120_500}\n"

decimals = st.decimals(
    min_value=0, max_value=DECIMAL_MAX, places=18, allow_nan=False, allow_infinity=False
)


def test_fits() -> None:
    assert fits("0") and fits("1.5") and fits("0.000000000000000001")
    assert fits("99999999999999999999.999999999999999999")
    assert fits("1.500000000000000000000")  # trailing zeros are not precision
    assert fits("1E+5") and fits("123456789012345.12345678")
    assert not fits("0.0000000000000000001")
    assert not fits("100000000000000000000")
    assert not fits("NaN") and not fits("Infinity") and not fits("x")


@given(st.lists(decimals, min_size=1, max_size=20))
def test_blocks_parse_to_the_exact_values(values: list[Decimal]) -> None:
    text = "".join(ROW.format(sym="A/USD", o=format(v, "f"), v=format(v, "f")) for v in values)
    table = parse_block(text.encode(), DS, "t")
    assert table.schema == DS.schema
    assert table.column("open").to_pylist() == values
    assert table.column("updated_at").to_pylist()[0].microsecond == 500_000


def test_long_fractions_that_fit_take_the_careful_path() -> None:
    # 21 digits in a row, all but 18 of them trailing zeros: it fits, exactly
    text = ROW.format(sym="A/USD", o="1.500000000000000000000", v="12345678901234567890.5")
    table = parse_block(text.encode(), DS, "t")
    assert table.column("open").to_pylist() == [Decimal("1.5")]
    assert table.column("volume").to_pylist() == [Decimal("12345678901234567890.5")]


@pytest.mark.parametrize(
    ("value", "column"),
    [
        ("0.12345678901234567891", "open"),
        ("123456789012345678901", "volume"),
        ("123456789012345678901234567890", "open"),  # Arrow alone would wrap it around
        ("9" * 80, "volume"),
    ],
)
def test_a_misfit_is_named(value: str, column: str) -> None:
    good = ROW.format(sym="A/USD", o="1", v="1")
    bad = ROW.format(sym="B/USD", o=value if column == "open" else "1",
                     v=value if column == "volume" else "1")  # fmt: skip
    with pytest.raises(DatasetError) as caught:
        parse_block((good + bad).encode(), DS, "kraken ohlcv_1m")
    assert str(caught.value).startswith(
        f"kraken ohlcv_1m: B/USD 1m candle at 2026-11-26T13:05:00Z: {column} = "
    )


@settings(deadline=None)
@given(st.lists(decimals, min_size=1, max_size=20))
def test_text_formats_write_the_same_values(tmp_path_factory: pytest.TempPathFactory,
                                            values: list[Decimal]) -> None:  # fmt: skip
    folder = tmp_path_factory.mktemp("text")
    text = "".join(ROW.format(sym="A/USD", o=format(v, "f"), v="2") for v in values)
    table = parse_block(text.encode(), DS, "t", as_text=True)
    for sink in (CsvSink(folder / "c.csv", DS), JsonlSink(folder / "c.jsonl", DS)):
        sink.write(table)
        sink.close()
    csv_opens = [line.split(",")[3] for line in (folder / "c.csv").read_text().splitlines()[1:]]
    json_rows = [json.loads(line) for line in (folder / "c.jsonl").read_text().splitlines()]
    for written in (csv_opens, [r["open"] for r in json_rows]):
        assert [Decimal(x) for x in written] == values
        assert all(x == "0" or not x.endswith("0") or "." not in x for x in written)
    assert json_rows[0]["quote_volume"] is None and json_rows[0]["trade_count"] == 3
    assert json_rows[0]["updated_at"] == "2026-11-26T13:07:00.500Z"


def test_text_needing_escapes_is_refused(tmp_path: Path) -> None:
    table = parse_block(ROW.format(sym='A"/USD', o="1", v="1").encode(), DS, "t", as_text=True)
    sink = JsonlSink(tmp_path / "x.jsonl", DS)
    with pytest.raises(ValueError, match="escaping"):
        sink.write(table)
    sink.close()
    assert isinstance(table.column("symbol"), pa.ChunkedArray)


def test_months() -> None:
    spans = months(parse_time("2025-11-30T23:00Z"), parse_time("2026-02-01"))
    assert [(y, m, iso(a), iso(b)) for y, m, a, b in spans] == [
        (2025, 11, "2025-11-01T00:00:00Z", "2025-12-01T00:00:00Z"),
        (2025, 12, "2025-12-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        (2026, 1, "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
    ]
