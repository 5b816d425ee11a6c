"""Reading archive files on disk: CSV lines streamed out of zips and plain files with their
checksum, line numbers across chunks, truncated or corrupt zips, and Kraken's folders."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from klined.archives import files
from klined.archives.files import CsvReader, CsvRef, scan_kraken, single_csv, survey
from klined.errors import ArchiveError

LINES = [f"{1_700_000_000 + 60 * i},1.{i},2,1,1.5,0.{i + 1},{i + 1}" for i in range(500)]
BODY = ("\n".join(LINES) + "\n").encode()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def read(ref: CsvRef) -> tuple[list[tuple[int, str]], str]:
    with CsvReader(ref) as reader:
        lines = list(reader.lines())
    return lines, reader.sha256


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_lines_and_checksum_from_a_zip_member_and_a_plain_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(files, "CHUNK", chunk)
    archive = make_zip(tmp_path / "k.zip", {"XBTUSD_1.csv": BODY, "XBTUSD_5.csv": b"x"})
    plain = tmp_path / "XBTUSD_1.csv"
    plain.write_bytes(BODY)
    for ref in (CsvRef(archive, "XBTUSD_1.csv"), CsvRef(plain)):
        lines, sha = read(ref)
        assert lines == list(enumerate(LINES, 1))
        assert sha == hashlib.sha256(BODY).hexdigest()
    assert CsvRef(archive, "Kraken/XBTUSD_1.csv").name == "k.zip/XBTUSD_1.csv"


def test_crlf_a_byte_order_mark_and_no_final_newline(tmp_path: Path) -> None:
    plain = tmp_path / "a.csv"
    plain.write_bytes(b"\xef\xbb\xbfopen_time,x\r\n1,2\r\n3,4")
    lines, _ = read(CsvRef(plain))
    assert lines == [(1, "open_time,x"), (2, "1,2"), (3, "3,4")]


def test_bytes_that_are_not_text_name_their_line(tmp_path: Path) -> None:
    plain = tmp_path / "a.csv"
    plain.write_bytes(b"1,2\n3,4\n5,\xff\n")
    with pytest.raises(ArchiveError, match=r"a\.csv line 3: not text"):
        read(CsvRef(plain))


def test_a_truncated_zip(tmp_path: Path) -> None:
    whole = make_zip(tmp_path / "whole.zip", {"BTCUSD-1m-2026-01-01.csv": BODY})
    cut = tmp_path / "BTCUSD-1m-2026-01-01.zip"
    cut.write_bytes(whole.read_bytes()[:-40])  # the central directory is gone
    with pytest.raises(ArchiveError, match="not a readable zip"):
        single_csv(cut, cut.name)


def test_a_zip_whose_data_is_damaged(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "d.zip", {"a.csv": BODY * 20})
    data = bytearray(archive.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 8] = b"\x00" * 8
    archive.write_bytes(bytes(data))
    with (
        pytest.raises(ArchiveError, match="truncated or corrupt"),
        CsvReader(CsvRef(archive, "a.csv")) as reader,
    ):
        for _ in reader.lines():
            pass


def test_a_binance_zip_holds_one_csv(tmp_path: Path) -> None:
    two = make_zip(tmp_path / "two.zip", {"a.csv": b"1", "b.csv": b"2"})
    with pytest.raises(ArchiveError, match="expected one CSV"):
        single_csv(two, "two.zip")
    one = make_zip(tmp_path / "one.zip", {"BTCUSD-1m-2026-01.csv": b"1"})
    assert single_csv(one, "one.zip").member == "BTCUSD-1m-2026-01.csv"


def test_survey(tmp_path: Path) -> None:
    plain = tmp_path / "XBTUSD_1.csv"
    plain.write_bytes(b"time,open\n" + BODY)
    found = survey(CsvRef(plain))
    assert (found.first, found.last, found.lines) == (1_700_000_000, 1_700_000_000 + 60 * 499, 501)
    assert found.sha256 == hashlib.sha256(b"time,open\n" + BODY).hexdigest()


def test_scanning_kraken_zips_and_folders(tmp_path: Path) -> None:
    root = tmp_path / "dl"
    (root / "extracted").mkdir(parents=True)
    make_zip(root / "Kraken_OHLCVT_Q1_2026.zip",
             {"XBTUSD_1.csv": BODY, "XBTUSD_60.csv": b"", "TRADES/x.txt": b""})  # fmt: skip
    (root / "extracted" / "ETHUSD_1.csv").write_bytes(BODY)
    (root / "notes.txt").write_text("hi")
    (root / "broken.zip").write_bytes(b"PK\x03\x04 nope")
    scan = scan_kraken([root, tmp_path / "missing"])
    assert [(f.ref.name, f.native, f.interval) for f in scan.files] == [
        ("ETHUSD_1.csv", "ETHUSD", 1),
        ("Kraken_OHLCVT_Q1_2026.zip/XBTUSD_1.csv", "XBTUSD", 1),
        ("Kraken_OHLCVT_Q1_2026.zip/XBTUSD_60.csv", "XBTUSD", 60),
    ]
    assert scan.files[1].size == len(BODY)
    assert sorted(p.name for p in scan.problems) == sorted(
        ["broken.zip", str(tmp_path / "missing")]
    )
    assert scan.other == 1
