"""The lake writer: every event lands exactly once, in its hour's folder, durably."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec
import pytest

from klined.config import LakeConfig
from klined.errors import LakeError
from klined.lake import (
    LakeWriter,
    compress,
    iter_local_parts,
    parse_key,
    read_part,
    read_part_file,
    seal_open_parts,
)
from klined.model import HOUR_MS, MINUTE_MS, Candle, floor_hour
from klined.status import LakeStatus

HOUR = 1_795_000_000_000 - 1_795_000_000_000 % HOUR_MS  # an arbitrary UTC hour start

# -- helpers shared by the lake tests -----------------------------------------------------------


class FakeClock:
    """Wall clock in ms that the test moves by hand."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def candle(
    seq: int,
    minute_ms: int,
    *,
    exchange: str = "binance",
    symbol: str = "BTC/USD",
    final: bool = False,
) -> Candle:
    """A candle whose ``event_ts`` (``seq``) identifies the event."""
    return Candle(
        exchange=exchange,
        symbol=symbol,
        native_symbol=symbol.replace("/", ""),
        interval_start=minute_ms,
        open="100.5",
        high="101",
        low="100",
        close="100.75",
        volume="3.25",
        trade_count=7,
        is_final=final,
        session_id="s1",
        event_ts=seq,
        ingestion_ts=minute_ms + 1234,
        raw=msgspec.Raw(b'{"k":{"t":%d,"x":%s}}' % (minute_ms, b"true" if final else b"false")),
    )


def identity(exchange: str, symbol: str, interval_start: int, event_ts: int) -> tuple:
    return (exchange, symbol, interval_start, event_ts)


def read_all(root: Path, *, closed_only: bool = True) -> tuple[Counter[tuple], int]:
    """Every event in the local lake (as identities) and the number of bad lines.

    Also checks that each event sits in the folder of its own exchange, pair and hour.
    """
    seen: Counter[tuple] = Counter()
    bad = 0
    for part in iter_local_parts(root, closed_only=closed_only):
        pk = parse_key(part.key)
        contents = read_part_file(part.path)
        bad += contents.bad_lines
        for r in contents.records:
            assert (r.exchange, r.symbol, floor_hour(r.interval_start)) == (
                pk.exchange,
                pk.symbol,
                pk.hour_ms,
            ), part.key
            seen[identity(r.exchange, r.symbol, r.interval_start, r.event_ts)] += 1
    return seen, bad


def config(**kw: object) -> LakeConfig:
    base: dict[str, object] = {
        "flush_interval_s": 0.05,
        "part_max_bytes": 1 << 20,
        "part_max_age_s": 3600.0,
        "hour_grace_s": 120.0,
    }
    base.update(kw)
    return LakeConfig(**base)  # type: ignore[arg-type]


async def wait_until(predicate: Callable[[], object], within_s: float = 10.0) -> None:
    """Poll data written by other tasks/threads (no event to wait on) up to a deadline."""
    with anyio.fail_after(within_s):
        while not predicate():  # noqa: ASYNC110 - the state lives on disk / in another loop
            await anyio.sleep(0.02)


def leftovers(root: Path) -> list[Path]:
    """Open parts and half-built sealed ones."""
    return [*root.rglob("*.open"), *root.rglob("*.tmp")]


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_events_land_once_in_their_hour_including_late_ones(tmp_path: Path) -> None:
    clock = FakeClock(HOUR + 10 * MINUTE_MS)
    closed: list[tuple[str, int]] = []
    writer = LakeWriter(
        tmp_path, config(), clock=clock, on_part_closed=lambda k, s: closed.append((k, s))
    )
    sent: Counter[tuple] = Counter()
    seq = 0

    def send(minute_ms: int, **kw: object) -> None:
        nonlocal seq
        seq += 1
        c = candle(seq, minute_ms, **kw)  # type: ignore[arg-type]
        writer.append(c)
        sent[identity(c.exchange, c.symbol, c.interval_start, c.event_ts)] += 1

    for minute in range(60):
        for exchange, symbol in (("binance", "BTC/USD"), ("kraken", "ETH/USD")):
            send(HOUR + minute * MINUTE_MS, exchange=exchange, symbol=symbol)
            send(HOUR + minute * MINUTE_MS, exchange=exchange, symbol=symbol, final=True)
    await writer.flush()
    # the hour turns: the final update of hh:59 arrives after it, and the next hour starts
    clock.now = HOUR + HOUR_MS + 3_000
    send(HOUR + 59 * MINUTE_MS, final=True)
    send(HOUR + HOUR_MS)
    await writer.flush()
    assert not closed  # still inside the grace period: the hour's part stays open
    clock.now = HOUR + HOUR_MS + 121_000
    await writer.flush()
    sealed_hours = {parse_key(k).hour_ms for k, _ in closed}
    assert sealed_hours == {HOUR}
    assert len(closed) == 2  # binance and kraken parts of the past hour
    # a late event for the sealed hour goes to a new part in the same folder
    send(HOUR + 30 * MINUTE_MS)
    await writer.aclose()

    seen, bad = read_all(tmp_path)
    assert seen == sent
    assert bad == 0
    btc_hour = [p for p in iter_local_parts(tmp_path, hour_ms=HOUR, exchange="binance")]
    assert len(btc_hour) == 2
    assert all(p.closed for p in iter_local_parts(tmp_path, closed_only=False))
    # the size reported on sealing is the file's size
    for key, size in closed:
        assert (tmp_path / key).stat().st_size == size


@pytest.mark.anyio
async def test_rotation_by_size_keeps_order_and_bounds(tmp_path: Path) -> None:
    line = len(msgspec.json.encode(candle(100, HOUR))) + 1  # every seq below has 3 digits
    writer = LakeWriter(
        tmp_path, config(part_max_bytes=10 * line), clock=FakeClock(HOUR + MINUTE_MS)
    )
    for i in range(100, 195):
        writer.append(candle(i, HOUR + (i % 60) * MINUTE_MS))
        if i % 7 == 0:
            await writer.flush()
    await writer.aclose()
    parts = list(iter_local_parts(tmp_path))
    assert len(parts) == 10  # nine full parts and the rest
    assert all(p.size <= 10 * line for p in parts)
    order = sorted(parts, key=lambda p: parse_key(p.key).seq)
    events = [r.event_ts for p in order for r in read_part_file(p.path).records]
    assert events == list(range(100, 195))


@pytest.mark.anyio
async def test_rotation_by_age(tmp_path: Path) -> None:
    clock = FakeClock(HOUR + MINUTE_MS)
    writer = LakeWriter(tmp_path, config(part_max_age_s=60), clock=clock)
    writer.append(candle(1, HOUR))
    await writer.flush()
    assert len(writer.open_parts) == 1
    clock.now += 59_000
    await writer.flush()
    assert len(writer.open_parts) == 1
    clock.now += 1_000
    await writer.flush()
    assert writer.open_parts == []
    writer.append(candle(2, HOUR + MINUTE_MS))
    await writer.aclose()
    parts = list(iter_local_parts(tmp_path))
    assert [[r.event_ts for r in read_part_file(p.path).records] for p in parts] == [[1], [2]]


@pytest.mark.anyio
async def test_aclose_writes_everything_buffered(tmp_path: Path) -> None:
    status = LakeStatus()
    writer = LakeWriter(tmp_path, config(), status=status, clock=FakeClock(HOUR))
    for i in range(500):
        writer.append(candle(i, HOUR + (i % 60) * MINUTE_MS, symbol=f"C{i % 5}/USD"))
    assert status.open_parts == 5
    assert list(iter_local_parts(tmp_path, closed_only=False)) == []  # no I/O yet
    await writer.aclose()
    seen, bad = read_all(tmp_path)
    assert sum(seen.values()) == len(seen) == 500
    assert bad == 0
    assert status.open_parts == 0
    assert status.events_written == 500
    assert all(p.closed for p in iter_local_parts(tmp_path, closed_only=False))


@pytest.mark.anyio
async def test_run_flushes_periodically_and_seals_on_cancel(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, config(flush_interval_s=0.05))
    now_hour = floor_hour(writer._clock())
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for i in range(50):
            writer.append(candle(i, now_hour))
        # the writer flushes on its own: the open part holds every event on disk
        await wait_until(
            lambda: (
                sum(
                    len(read_part_file(p.path).records)
                    for p in iter_local_parts(tmp_path, closed_only=False)
                )
                == 50
            )
        )
        assert not list(iter_local_parts(tmp_path))  # still open
        tg.cancel_scope.cancel()
    parts = list(iter_local_parts(tmp_path, closed_only=False))
    assert len(parts) == 1 and parts[0].closed
    assert len(read_part_file(parts[0].path).records) == 50


@pytest.mark.anyio
async def test_parts_are_sealed_gzip_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running writer's own flushes close a part (age bound) and its sealer compresses
    it in a worker thread: the event loop's thread never runs zlib."""
    threads: list[threading.Thread] = []
    real = compress.compress_to_tmp

    def spy(path: Path, level: int, *, sync: bool) -> int:
        threads.append(threading.current_thread())
        return real(path, level, sync=sync)

    monkeypatch.setattr(compress, "compress_to_tmp", spy)
    closed: list[tuple[str, int]] = []
    writer = LakeWriter(
        tmp_path,
        config(flush_interval_s=0.05, part_max_age_s=0.2),
        on_part_closed=lambda k, n: closed.append((k, n)),
    )
    now_hour = floor_hour(writer._clock())
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for i in range(50):
            writer.append(candle(i, now_hour))
        await wait_until(lambda: closed)
        tg.cancel_scope.cancel()
    ((key, size),) = closed
    assert key.endswith(".jsonl.gz") and (tmp_path / key).stat().st_size == size
    assert threads and threading.main_thread() not in threads
    data = gzip.decompress((tmp_path / key).read_bytes())
    assert data == b"".join(msgspec.json.encode(candle(i, now_hour)) + b"\n" for i in range(50))
    assert leftovers(tmp_path) == []


@pytest.mark.anyio
async def test_run_flushes_early_every_so_many_events(tmp_path: Path) -> None:
    """Between timed flushes (an hour apart here), every ``flush_after_events`` buffered
    events wake the writer once, and the count starts over after each flush."""
    writer = LakeWriter(tmp_path, config(flush_interval_s=3600.0), flush_after_events=5)
    now_hour = floor_hour(writer._clock())
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for round_ in range(3):
            for i in range(5):
                writer.append(candle(round_ * 10 + i, now_hour))
            await wait_until(lambda r=round_: writer.events_written == 5 * (r + 1))
        for i in range(4):  # under the threshold: stays in memory until the next flush
            writer.append(candle(100 + i, now_hour))
        await anyio.sleep(0.1)
        assert writer.events_written == 15
        tg.cancel_scope.cancel()
    assert writer.events_written == 19
    seen, bad = read_all(tmp_path)
    assert bad == 0 and sum(seen.values()) == 19 and set(seen.values()) == {1}


@pytest.mark.anyio
async def test_torn_line_after_crash_is_sealed_skipped_and_reported(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, config(), clock=FakeClock(HOUR))
    for i in range(10):
        writer.append(candle(i, HOUR + i * MINUTE_MS))
    await writer.flush()
    writer.append(candle(99, HOUR))  # buffered, never flushed: the crash loses it
    (open_part,) = list(iter_local_parts(tmp_path, closed_only=False))
    assert not open_part.closed
    # the crash tears the next line in half
    append_bytes(open_part.path, msgspec.json.encode(candle(10, HOUR))[:40])
    del writer

    closed: list[str] = []
    survivor = LakeWriter(tmp_path, config(), on_part_closed=lambda k, s: closed.append(k))
    async with anyio.create_task_group() as tg:
        await tg.start(survivor.run)  # capture can start: the leftover is sealed beside it
        await wait_until(lambda: closed)
        assert closed == [open_part.key + ".gz"]
        tg.cancel_scope.cancel()
    contents = read_part_file(tmp_path / (open_part.key + ".gz"))
    assert [r.event_ts for r in contents.records] == list(range(10))
    assert contents.bad_lines == 1
    assert contents.bad_line_numbers == [11]


def test_sealing_removes_empty_leftovers(tmp_path: Path) -> None:
    folder = tmp_path / "exchange=binance/symbol=BTC-USD/interval_minutes=1/year=2026/month=11"
    folder = folder / "day=26/hour=13"
    folder.mkdir(parents=True)
    (folder / "part-1-aaaaaaaa-000001.jsonl.open").write_bytes(b"")
    (folder / "part-2-aaaaaaaa-000002.jsonl.open").write_bytes(b'{"x":1}\n')
    (folder / "part-3-bbbbbbbb-000001.jsonl.open").write_bytes(b'{"x":1}\n')
    sealed = seal_open_parts(tmp_path, keep_writer_id="bbbbbbbb")
    assert [k.rsplit("/", 1)[1] for k, _ in sealed] == ["part-2-aaaaaaaa-000002.jsonl.gz"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "part-2-aaaaaaaa-000002.jsonl.gz",
        "part-3-bbbbbbbb-000001.jsonl.open",
    ]
    assert gzip.decompress((folder / "part-2-aaaaaaaa-000002.jsonl.gz").read_bytes()) == (
        b'{"x":1}\n'
    )


def test_a_crash_during_sealing_leaves_one_sealed_part(tmp_path: Path) -> None:
    """Whichever step of a seal a crash interrupts, the next start ends with exactly the
    sealed part: the .open is the truth until its .gz exists, complete."""
    folder = tmp_path / "exchange=binance/symbol=BTC-USD/interval_minutes=1/year=2026/month=11"
    folder = folder / "day=26/hour=13"
    folder.mkdir(parents=True)
    content = b"".join(msgspec.json.encode(candle(i, HOUR)) + b"\n" for i in range(50))
    # 1: the crash came while the .gz was being built (a torn .tmp)
    (folder / "part-1-aaaaaaaa-000001.jsonl.open").write_bytes(content)
    (folder / "part-1-aaaaaaaa-000001.jsonl.gz.tmp").write_bytes(b"\x1f\x8b torn")
    # 2: after the rename, before the .open was removed
    (folder / "part-2-aaaaaaaa-000002.jsonl.open").write_bytes(content)
    (folder / "part-2-aaaaaaaa-000002.jsonl.gz").write_bytes(gzip.compress(content, mtime=0))
    # readers already see part 2 once, sealed
    listed = [p.key.rsplit("/", 1)[1] for p in iter_local_parts(tmp_path, closed_only=False)]
    assert listed == ["part-1-aaaaaaaa-000001.jsonl", "part-2-aaaaaaaa-000002.jsonl.gz"]
    sealed = seal_open_parts(tmp_path)
    assert [k.rsplit("/", 1)[1] for k, _ in sealed] == ["part-1-aaaaaaaa-000001.jsonl.gz"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "part-1-aaaaaaaa-000001.jsonl.gz",
        "part-2-aaaaaaaa-000002.jsonl.gz",
    ]
    for part in iter_local_parts(tmp_path):
        assert [r.event_ts for r in read_part_file(part.path).records] == list(range(50))


_CHILD = textwrap.dedent(
    """
    import sys, anyio
    from klined.config import LakeConfig
    from klined.lake import LakeWriter
    from tests.lake.test_writer import candle, HOUR, FakeClock

    async def main():
        writer = LakeWriter(sys.argv[1], LakeConfig(), clock=FakeClock(HOUR))
        for i in range(1000):
            writer.append(candle(i, HOUR + (i % 60) * 60_000))
        await writer.flush()
        for i in range(1000, 1500):
            writer.append(candle(i, HOUR))
        print("flushed", flush=True)
        await anyio.sleep(60)

    anyio.run(main)
    """
)


def test_kill_9_loses_at_most_the_unflushed_tail(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        cwd=repo,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"flushed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert list(iter_local_parts(tmp_path)) == []  # nothing was sealed
    sealed = seal_open_parts(tmp_path)
    assert len(sealed) == 1
    seen, bad = read_all(tmp_path)
    assert bad == 0
    events = sorted(k[3] for k in seen)
    assert events == list(range(1000))  # everything flushed, once; the unflushed tail is gone
    assert all(n == 1 for n in seen.values())


@pytest.mark.anyio
async def test_write_failure_keeps_events_and_retries(tmp_path: Path) -> None:
    blocker = tmp_path / "exchange=binance"
    blocker.write_bytes(b"not a folder")  # mkdir of the part's folder fails
    writer = LakeWriter(tmp_path, config(), clock=FakeClock(HOUR))
    for i in range(5):
        writer.append(candle(i, HOUR))
    await writer.flush()
    assert writer.events_written == 0
    blocker.unlink()
    writer.append(candle(5, HOUR))
    await writer.aclose()
    seen, _ = read_all(tmp_path)
    assert sorted(k[3] for k in seen) == list(range(6))
    assert writer.events_written == 6


def test_names_that_cannot_be_keys_are_refused(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, config())
    with pytest.raises(LakeError):
        writer.append(candle(1, HOUR, symbol="BTC-USD"))
    with pytest.raises(LakeError):
        writer.append(candle(1, HOUR, exchange="../etc"))


def test_read_part_of_a_writer_line_matches_the_candle() -> None:
    c = candle(5, HOUR, final=True)
    (record,) = read_part(msgspec.json.encode(c) + b"\n").records
    assert record.is_final and record.event_ts == 5 and record.close == "100.75"
    assert msgspec.json.decode(msgspec.json.encode(c), type=Candle) == c


@pytest.mark.anyio
async def test_one_running_writer_per_root(tmp_path: Path) -> None:
    first = LakeWriter(tmp_path, config())
    second = LakeWriter(tmp_path, config())
    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        with pytest.raises(LakeError, match="another klined writer"):
            await second.run()
        tg.cancel_scope.cancel()
    async with anyio.create_task_group() as tg:  # released when the first one stopped
        await tg.start(second.run)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_seal_hour_closes_only_that_hour(tmp_path: Path) -> None:
    closed: list[str] = []
    clock = FakeClock(HOUR + HOUR_MS)
    writer = LakeWriter(
        tmp_path, config(), clock=clock, on_part_closed=lambda k, _: closed.append(k)
    )
    writer.append(candle(1, HOUR + 59 * MINUTE_MS))
    writer.append(candle(2, HOUR + HOUR_MS))
    await writer.seal_hour(HOUR + 30 * MINUTE_MS)
    assert [parse_key(k).hour_ms for k in closed] == [HOUR]
    assert [parse_key(k).hour_ms for k in writer.open_parts] == [HOUR + HOUR_MS]
    await writer.aclose()
    seen, _ = read_all(tmp_path)
    assert sorted(k[3] for k in seen) == [1, 2]
