"""Archive files on this machine: stream a CSV's lines out of a zip (or a plain file) while
hashing them, and find Kraken's 1-minute CSVs in zips and folders.

Blocking file I/O: callers run these in a worker thread or in bounded chunks. Streaming keeps a
month of klines, or a decade of Kraken minutes, out of memory: lines are read 1 MiB at a time.
A zip that ends early or fails its CRC, a file that cannot be read, bytes that are not text:
all become :class:`klined.errors.ArchiveError` naming the file (and the line, when there is
one).
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from klined.archives.kraken import member_name
from klined.errors import ArchiveError

CHUNK = 1 << 20

_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, ValueError)


@dataclass(frozen=True, slots=True)
class CsvRef:
    """Where one CSV is: a plain file, or ``member`` of the zip at ``path``."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        """How klined names the file: ``BTCUSD-1m-2026-01.zip`` (a Binance zip holds one CSV),
        ``Kraken_OHLCVT.zip/XBTUSD_1.csv`` (a member, with its container), ``XBTUSD_1.csv``."""
        if self.member is None:
            return self.path.name
        return f"{self.path.name}/{self.member.rsplit('/', 1)[-1]}"


def single_csv(path: Path, name: str) -> CsvRef:
    """The one CSV inside a Binance zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i.filename for i in zf.infolist() if i.filename.lower().endswith(".csv")]
    except _CORRUPT as exc:
        raise ArchiveError(name, f"not a readable zip (truncated or corrupt): {exc}") from None
    except OSError as exc:
        raise ArchiveError(name, f"cannot read: {exc.strerror or exc}") from None
    if len(members) != 1:
        raise ArchiveError(name, f"expected one CSV in the zip, found {len(members)}")
    return CsvRef(path, members[0])


def sha256_file(path: Path, name: str) -> str:
    """SHA-256 of a file's bytes (lowercase hex)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ArchiveError(name, f"cannot read: {exc.strerror or exc}") from None
    return digest.hexdigest()


class CsvReader:
    """``with CsvReader(ref) as r: for number, text in r.lines(): ...``; then ``r.sha256`` is
    the SHA-256 of every byte of the CSV (as stored: a zip member's uncompressed bytes).

    Lines are numbered from 1 and come without their line ending; a byte-order mark on the
    first line is dropped.
    """

    def __init__(self, ref: CsvRef, name: str | None = None) -> None:
        self.ref = ref
        self.name = name or ref.name
        self.bytes_read = 0
        self._digest = hashlib.sha256()
        self._zip: zipfile.ZipFile | None = None
        self._fh: IO[bytes] | None = None

    def __enter__(self) -> CsvReader:
        try:
            if self.ref.member is None:
                self._fh = self.ref.path.open("rb")
            else:
                self._zip = zipfile.ZipFile(self.ref.path)
                self._fh = self._zip.open(self.ref.member)
        except _CORRUPT as exc:
            self.close()
            why = f"not a readable zip (truncated or corrupt): {exc}"
            raise ArchiveError(self.name, why) from None
        except (OSError, KeyError) as exc:
            self.close()
            raise ArchiveError(self.name, f"cannot read: {exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def _chunks(self) -> Iterator[bytes]:
        fh = self._fh
        if fh is None:
            raise RuntimeError("CsvReader used outside its with block")
        while True:
            try:
                chunk = fh.read(CHUNK)
            except _CORRUPT as exc:
                raise ArchiveError(
                    self.name, f"the zip is truncated or corrupt: {exc}", line=0
                ) from None
            except OSError as exc:
                raise ArchiveError(self.name, f"cannot read: {exc.strerror or exc}") from None
            if not chunk:
                return
            self.bytes_read += len(chunk)
            self._digest.update(chunk)
            yield chunk

    def lines(self) -> Iterator[tuple[int, str]]:
        number = 0
        carry = b""
        for chunk in self._chunks():
            data = carry + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            carry = data[cut + 1 :]
            for text in self._decode(data[:cut], number).split("\n"):
                number += 1
                yield number, (text if number > 1 else text.lstrip("\ufeff"))
        if carry.strip():
            for text in self._decode(carry, number).split("\n"):
                number += 1
                yield number, (text if number > 1 else text.lstrip("\ufeff"))

    def _decode(self, data: bytes, before: int) -> str:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = before + data.count(b"\n", 0, exc.start) + 1
            raise ArchiveError(self.name, "not text (bad UTF-8)", line=line) from None
        return text.replace("\r", "") if "\r" in text else text


@dataclass(frozen=True, slots=True)
class Survey:
    """A whole pass over a CSV: its checksum, and the first field of its first and last
    data lines (Kraken: the span it covers)."""

    sha256: str
    first: int | None
    last: int | None
    lines: int


def survey(ref: CsvRef, name: str | None = None) -> Survey:
    """Hash a CSV and note its first and last times (an unparsable first field is skipped on
    line 1, as a header; anything else wrong is left for the real read to report)."""
    first: int | None = None
    last_text = ""
    count = 0
    with CsvReader(ref, name) as reader:
        for number, text in reader.lines():
            if not text.strip():
                continue
            count += 1
            last_text = text
            if first is None:
                try:
                    first = int(text.split(",", 1)[0])
                except ValueError:
                    if number != 1:
                        first = -1  # not readable; the load names the line
        last: int | None = None
        if last_text:
            try:
                last = int(last_text.split(",", 1)[0])
            except ValueError:
                last = None
        return Survey(reader.sha256, first if first != -1 else None, last, count)


# ---------------------------------------------------------------------------------------------
# Kraken's OHLCVT downloads


@dataclass(frozen=True, slots=True)
class KrakenCsv:
    """One ``<PAIR>_<minutes>.csv`` found in a zip or a folder."""

    ref: CsvRef
    native: str
    interval: int
    size: int  # uncompressed bytes


@dataclass(slots=True)
class KrakenScan:
    files: list[KrakenCsv]
    problems: list[ArchiveError]  # zips that cannot be read, paths that do not exist
    other: int = 0  # files that are neither a zip nor an OHLCVT CSV


def scan_kraken(paths: Iterable[Path]) -> KrakenScan:
    """Every OHLCVT CSV in these zips, folders (searched recursively) and CSV files."""
    scan = KrakenScan([], [])
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    _scan_file(child, scan)
        elif path.is_file():
            _scan_file(path, scan)
        else:
            scan.problems.append(ArchiveError(str(path), "no such file or folder"))
    scan.files.sort(key=lambda f: (f.native, f.interval, f.ref.name))
    return scan


def _scan_file(path: Path, scan: KrakenScan) -> None:
    if path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    parsed = member_name(info.filename)
                    if parsed is None or info.is_dir():
                        continue
                    native, interval = parsed
                    scan.files.append(
                        KrakenCsv(CsvRef(path, info.filename), native, interval, info.file_size)
                    )
        except _CORRUPT as exc:
            scan.problems.append(
                ArchiveError(path.name, f"not a readable zip (truncated or corrupt): {exc}")
            )
        except OSError as exc:
            scan.problems.append(ArchiveError(path.name, f"cannot read: {exc.strerror or exc}"))
        return
    parsed = member_name(path.name)
    if parsed is None:
        scan.other += 1
        return
    native, interval = parsed
    scan.files.append(KrakenCsv(CsvRef(path), native, interval, path.stat().st_size))
