"""Reading the lake: torn and malformed lines are skipped and reported; parts and hours found."""

from __future__ import annotations

import gzip
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from klined.lake import (
    LakeWriter,
    hour_dir,
    iter_local_parts,
    local_hours,
    parse_key,
    part_key,
    read_part,
)
from klined.lake.reader import BAD_LINE_SAMPLE
from klined.model import HOUR_MS, MINUTE_MS, parse_time
from tests.lake.test_writer import HOUR, FakeClock, candle, config


def line(seq: int) -> bytes:
    return msgspec.json.encode(candle(seq, HOUR + MINUTE_MS))


def test_clean_part_decodes_in_one_go() -> None:
    data = b"\n".join(line(i) for i in range(5)) + b"\n"
    contents = read_part(data)
    assert [r.event_ts for r in contents.records] == list(range(5))
    assert contents.bad_lines == 0 and contents.bad_line_numbers == []
    assert read_part(b"").records == []


def test_bad_lines_are_skipped_counted_and_sampled() -> None:
    lines = [
        line(0),
        b"not json at all",
        line(1),
        b"",  # blank lines are not errors
        b'{"exchange": "binance"}',  # valid JSON, not a candle
        line(2),
        b"\xff\xfe\x00binary",
        line(3)[:25],  # torn last line, no newline
    ]
    contents = read_part(b"\n".join(lines))
    assert [r.event_ts for r in contents.records] == [0, 1, 2]
    assert contents.bad_lines == 4
    assert contents.bad_line_numbers == [2, 5, 7, 8]


def test_bad_line_sample_is_bounded() -> None:
    data = b"\n".join([b"junk"] * 100 + [line(1)])
    contents = read_part(data)
    assert contents.bad_lines == 100
    assert contents.bad_line_numbers == list(range(1, BAD_LINE_SAMPLE + 1))
    assert [r.event_ts for r in contents.records] == [1]


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=3))
def test_reader_never_raises(junk: bytes, good: int) -> None:
    data = b"\n".join(line(i) for i in range(good)) + b"\n" + junk
    contents = read_part(data)
    assert [r.event_ts for r in contents.records][:good] == list(range(good))


def test_gzip_and_plain_parts_read_alike() -> None:
    data = b"\n".join(line(i) for i in range(50)) + b"\n"
    for stored in (
        data,
        gzip.compress(data),
        gzip.compress(data[:700]) + gzip.compress(data[700:]),
    ):
        contents = read_part(stored)
        assert [r.event_ts for r in contents.records] == list(range(50))
        assert contents.bad_lines == 0
    # zero padding after the last member (some copy tools add it) is harmless
    assert read_part(gzip.compress(data) + b"\0" * 16).bad_lines == 0


def test_a_damaged_gzip_part_keeps_what_precedes_the_damage() -> None:
    data = b"\n".join(line(i) for i in range(2000)) + b"\n"
    packed = gzip.compress(data, compresslevel=1)
    cut = read_part(packed[: len(packed) // 2])  # cut short (a torn copy)
    assert 0 < len(cut.records) < 2000 and cut.bad_lines == 1
    assert [r.event_ts for r in cut.records] == list(range(len(cut.records)))
    assert cut.bad_line_numbers == [len(cut.records) + 1]
    garbled = packed[:-8] + bytes(8)  # the trailer's checksum is wrong
    contents = read_part(garbled)
    assert contents.bad_lines == 1 and len(contents.records) >= 1999


@given(st.binary(max_size=200))
def test_reader_never_raises_on_damaged_gzip(junk: bytes) -> None:
    data = b"\n".join(line(i) for i in range(20)) + b"\n"
    packed = gzip.compress(data)
    contents = read_part(packed[: len(packed) // 3] + junk)
    assert [r.event_ts for r in contents.records] == list(range(len(contents.records)))


def test_keys_round_trip() -> None:
    key = part_key("kraken", "PEPE/USD", HOUR, 1_700_000_000_123, "0a1b2c3d-000042")
    assert key.startswith(hour_dir("kraken", "PEPE/USD", HOUR) + "/part-")
    assert "/symbol=PEPE-USD/interval_minutes=1/year=" in key
    pk = parse_key(key)
    assert (pk.exchange, pk.symbol, pk.hour_ms, pk.first_event_ms, pk.seq) == (
        "kraken",
        "PEPE/USD",
        HOUR,
        1_700_000_000_123,
        "0a1b2c3d-000042",
    )
    assert hour_dir("binance", "BTC/USD", parse_time("2026-11-27T00:59:59Z")) == (
        "exchange=binance/symbol=BTC-USD/interval_minutes=1/year=2026/month=11/day=27/hour=00"
    )
    for bad in (
        "exchange=binance/symbol=BTC-USD/part-1-a.jsonl",
        key + ".open",
        key.replace("hour=", "hour=9"),
        key.replace("month=", "month=1"),
    ):
        with pytest.raises(ValueError):
            parse_key(bad)


@pytest.mark.anyio
async def test_local_parts_and_hours(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, config(), clock=FakeClock(HOUR + 2 * HOUR_MS))
    writer.append(candle(1, HOUR, exchange="binance"))
    writer.append(candle(2, HOUR + HOUR_MS, exchange="binance"))
    writer.append(candle(3, HOUR + HOUR_MS, exchange="kraken", symbol="ETH/USD"))
    await writer.aclose()
    writer.append(candle(4, HOUR + 2 * HOUR_MS, exchange="kraken"))  # stays open
    await writer.flush()

    assert local_hours(tmp_path) == [HOUR, HOUR + HOUR_MS]
    assert local_hours(tmp_path, closed_only=False) == [HOUR, HOUR + HOUR_MS, HOUR + 2 * HOUR_MS]
    assert local_hours(tmp_path, exchange="kraken") == [HOUR + HOUR_MS]
    assert len(list(iter_local_parts(tmp_path))) == 3
    one_hour = list(iter_local_parts(tmp_path, hour_ms=HOUR + HOUR_MS))
    assert [parse_key(p.key).exchange for p in one_hour] == ["binance", "kraken"]
    assert [p.key for p in iter_local_parts(tmp_path, hour_ms=HOUR + HOUR_MS, exchange="kraken")]
    assert list(iter_local_parts(tmp_path, hour_ms=HOUR + 2 * HOUR_MS)) == []
    (open_part,) = iter_local_parts(tmp_path, hour_ms=HOUR + 2 * HOUR_MS, closed_only=False)
    assert not open_part.closed and open_part.path.name.endswith(".jsonl.open")
    assert open_part.key == parse_key(open_part.key).key
    assert list(iter_local_parts(tmp_path / "missing")) == []
    await writer.aclose()
