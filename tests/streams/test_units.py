"""Pure pieces of the stream runtime: backoff, Kraken finality, chunking, request ids."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from klined.model import MINUTE_MS, Candle, Pair
from klined.streams import Backoff, FinalityTracker, ReqIds, backoff_delays, chunk_pairs

T0 = 1_800_000_000_000 - 1_800_000_000_000 % 3_600_000  # an hour start


# --- backoff ------------------------------------------------------------------------------


def test_backoff_grows_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = backoff_delays(1.0, 60.0, 2.0, rng)
    got = [next(delays) for _ in range(30)]
    ceilings = [min(60.0, 2.0**i) for i in range(30)]
    for d, ceiling in zip(got, ceilings, strict=True):
        assert ceiling / 2 <= d <= ceiling
    assert max(got) <= 60.0
    assert len({round(d, 9) for d in got[10:]}) > 5  # jittered at the cap, not one value


@given(
    initial=st.floats(0.01, 10),
    ratio=st.floats(1, 100),
    factor=st.floats(1, 4),
    n=st.integers(1, 60),
)
def test_backoff_never_exceeds_cap_nor_drops_to_zero(
    initial: float, ratio: float, factor: float, n: int
) -> None:
    cap = initial * ratio
    b = Backoff(initial, cap, factor, random.Random(n))
    for _ in range(n):
        d = b.next()
        assert initial / 2 <= d <= cap
    assert cap / 2 <= b.at_max() <= cap


def test_backoff_reset_starts_over() -> None:
    b = Backoff(1.0, 60.0, rng=random.Random(3))
    for _ in range(10):
        b.next()
    assert b.next() >= 30.0
    b.reset()
    assert b.attempts == 0
    assert b.next() <= 1.0


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 10)
    with pytest.raises(ValueError):
        Backoff(5, 1)


# --- chunking -----------------------------------------------------------------------------


def _pairs(n: int) -> list[Pair]:
    return [Pair(f"C{i}", "USD") for i in range(n)]


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [
        (0, 5, []),
        (1, 5, [1]),
        (5, 5, [5]),
        (6, 5, [3, 3]),
        (11, 5, [4, 4, 3]),
        (2048, 1024, [1024, 1024]),
    ],
)
def test_chunks_are_even_and_bounded(n: int, size: int, expected: list[int]) -> None:
    chunks = chunk_pairs(_pairs(n), size)
    assert [len(c) for c in chunks] == expected
    assert [p for c in chunks for p in c] == _pairs(n)


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        chunk_pairs(_pairs(3), 0)


def test_request_ids_are_shared_and_consecutive() -> None:
    ids = ReqIds()
    assert ids.take(3) == 1
    assert ids.peek() == 4
    assert ids.take(0) == 4  # at least one id per call
    assert ids.take(1) == 5


# --- Kraken finality ----------------------------------------------------------------------


def kc(minute: int, close: str = "1", symbol: str = "BTC/USD", ts: int | None = None) -> Candle:
    start = T0 + minute * MINUTE_MS
    return Candle(
        exchange="kraken",
        symbol=symbol,
        native_symbol=symbol,
        interval_start=start,
        open="1",
        high="2",
        low="1",
        close=close,
        volume="1",
        session_id="kraken-0-abcd1234",
        event_ts=ts if ts is not None else start + 30_000,
        ingestion_ts=ts if ts is not None else start + 30_000,
    )


def at(minute: float) -> int:
    return T0 + int(minute * MINUTE_MS)


def test_newer_interval_begin_proves_the_held_update_final() -> None:
    t = FinalityTracker()
    assert t.observe([kc(0, "1")], at(0.2), at(0.2)) == []
    assert t.observe([kc(0, "1.5")], at(0.9), at(0.9)) == []
    finals = t.observe([kc(1, "3", ts=at(1.1))], at(1.1), at(1.1) + 5)
    assert len(finals) == 1
    f = finals[0]
    assert (f.interval_start, f.close, f.is_final) == (at(0), "1.5", True)
    assert f.event_ts == at(1.1)  # the evidence's time
    assert f.ingestion_ts == at(1.1) + 5
    assert f.session_id == "kraken-0-abcd1234"
    assert t.last_final("BTC/USD") == at(0)


def test_a_later_stamped_message_on_the_connection_proves_it() -> None:
    t = FinalityTracker()
    t.observe([kc(0, "1")], at(0.5), at(0.5))
    # another pair's update stamped before the minute's end proves nothing
    assert t.observe([kc(0, symbol="ETH/USD")], at(0.99), at(0.99)) == []
    # a heartbeat-like stamp at the minute's end proves both pairs' minute 0
    finals = t.observe([], at(1.0), at(1.0))
    assert sorted(f.symbol for f in finals) == ["BTC/USD", "ETH/USD"]
    assert all(f.is_final and f.event_ts == at(1.0) for f in finals)
    assert t.held == {}


def test_a_frame_never_proves_its_own_update() -> None:
    t = FinalityTracker()
    t.observe([kc(0, "1")], at(0.5), at(0.5))
    # the last trade of minute 0, published just after the minute ended
    assert t.observe([kc(0, "2")], at(1.01), at(1.01)) == []
    finals = t.observe([], at(1.02), at(1.02))
    assert [f.close for f in finals] == ["2"]


def test_unstamped_messages_prove_nothing() -> None:
    t = FinalityTracker()
    t.observe([kc(0)], at(0.5), at(0.5))
    assert t.observe([], None, at(5)) == []  # a heartbeat without a timestamp
    assert set(t.held) == {"BTC/USD"}


def test_cut_mid_minute_leaves_the_minute_partial() -> None:
    t = FinalityTracker()
    t.observe([kc(3, "1")], at(3.4), at(3.4))
    # the connection drops here: the tracker is discarded with its session, nothing emitted
    fresh = FinalityTracker()
    assert fresh.observe([kc(3, "1.1")], at(3.8), at(3.8)) == []


def test_snapshot_finalizes_everything_but_its_newest_minute() -> None:
    t = FinalityTracker()
    snapshot = [kc(m, str(m + 1)) for m in (4, 2, 3, 5)]  # any order
    finals = t.observe(snapshot, at(5.5), at(5.5))
    assert [(f.interval_start, f.close) for f in finals] == [
        (at(2), "3"),
        (at(3), "4"),
        (at(4), "5"),
    ]
    assert t.held["BTC/USD"].interval_start == at(5)


def test_late_updates_of_finalized_minutes_prove_nothing() -> None:
    t = FinalityTracker()
    t.observe([kc(0)], at(0.5), at(0.5))
    t.observe([kc(1)], at(1.5), at(1.5))  # minute 0 final
    assert t.observe([kc(0, "9")], at(1.6), at(1.6)) == []  # out of order: ignored
    assert t.held["BTC/USD"].interval_start == at(1)
    finals = t.observe([kc(2)], at(2.5), at(2.5))
    assert [f.interval_start for f in finals] == [at(1)]


def test_stray_older_update_does_not_block_stamp_evidence() -> None:
    t = FinalityTracker()
    t.observe([kc(0)], at(0.5), at(0.5))
    t.observe([kc(1)], at(1.5), at(1.5))  # 0 final, 1 held
    finals = t.observe([kc(0, "7")], at(2.1), at(2.1))  # stray, but stamped past minute 1
    assert [f.interval_start for f in finals] == [at(1)]


@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 3)), max_size=40))
def test_finals_are_always_the_last_update_seen_and_never_twice(
    events: list[tuple[int, int]],
) -> None:
    """Feed updates in minute order with stamps inside the minute; each minute that gets a
    newer minute after it is final exactly once, with its last values."""
    events.sort()
    t = FinalityTracker()
    finals: list[Candle] = []
    last_close: dict[int, str] = {}
    for i, (minute, _jitter) in enumerate(events):
        close = str(i + 1)
        last_close[minute] = close
        stamp = at(minute + 0.5)
        finals += t.observe([kc(minute, close, ts=stamp)], stamp, stamp)
    minutes = sorted(last_close)
    assert [f.interval_start for f in finals] == [at(m) for m in minutes[:-1]]
    for f in finals:
        assert f.close == last_close[(f.interval_start - T0) // MINUTE_MS]


class NaiveTracker:
    """The finality rules written as plainly as possible (a full scan per frame)."""

    def __init__(self) -> None:
        self.held: dict[str, Candle] = {}
        self.done: dict[str, int] = {}

    def observe(self, candles: list[Candle], stamp: int | None, received: int) -> list[Candle]:
        out: list[Candle] = []

        def final(c: Candle, evidence: int) -> None:
            del self.held[c.symbol]
            self.done[c.symbol] = c.interval_start
            out.append(msgspec.structs.replace(c, is_final=True, event_ts=evidence,
                                               ingestion_ts=received))  # fmt: skip

        if stamp is not None:
            for sym, h in list(self.held.items()):
                newer_here = any(
                    c.symbol == sym and c.interval_start >= h.interval_start for c in candles
                )
                if h.interval_end <= stamp and not newer_here:
                    final(h, stamp)
        for c in sorted(candles, key=lambda c: c.interval_start):
            if c.symbol in self.done and c.interval_start <= self.done[c.symbol]:
                continue
            h = self.held.get(c.symbol)
            if h is not None and c.interval_start > h.interval_start:
                final(h, c.event_ts or stamp or received)
            if h is None or c.interval_start >= h.interval_start:
                self.held[c.symbol] = c
        return out


frames_strategy = st.lists(
    st.tuples(
        st.lists(st.tuples(st.sampled_from(["A/USD", "B/USD", "C/USD"]), st.integers(0, 5)),
                 max_size=3),
        st.one_of(st.none(), st.integers(0, 6 * 60)),  # stamp, in seconds from T0
    ),
    max_size=30,
)  # fmt: skip


@given(frames_strategy)
def test_tracker_matches_the_plain_rules(
    frames: list[tuple[list[tuple[str, int]], int | None]],
) -> None:
    fast, slow = FinalityTracker(), NaiveTracker()
    clock = T0
    for i, (items, stamp_s) in enumerate(frames):
        clock += 1000
        stamp = None if stamp_s is None else T0 + stamp_s * 1000
        candles = [kc(m, str(i + 1), sym, ts=stamp or clock) for sym, m in items]
        assert fast.observe(candles, stamp, clock) == slow.observe(candles, stamp, clock)


def test_configured_pairs_map_back_without_a_listing() -> None:
    from klined.exchanges import get_adapter
    from klined.streams import ExchangeStreams, StreamSettings

    adapter = get_adapter("binance")
    assert adapter.canonical("REKTUSD") != Pair("REKT", "USD")  # a guess at the quote
    ExchangeStreams(adapter, "ws://x", [Pair("REKT", "USD")], StreamSettings(), lambda c: None)
    assert adapter.canonical("REKTUSD") == Pair("REKT", "USD")
