"""Per exchange: check the listing, chunk the pairs into connections, supervise them.

Capture never waits long for the listing (a 429 on it once delayed capture and systemd's
READY by 40 s): the check starts first and streaming starts when it answers or after
``listing_wait_s``, whichever is sooner, with the configured pairs minus those the last
listing (this run's, or the one cached on disk from an earlier run) says are not listed. The
check goes on in the background and again every ``recheck_interval_s``: pairs it finds
unlisted are dropped from their connection (which resubscribes without them), pairs it finds
listed again come back.

An unlisted pair is reported once, with the adapter's suggestion (``check_listing``): a quote
that differs, a base that looks mistyped, or a configured native name the exchange does not
use for the pair. A subscription the exchange refuses is not final either: the pair is set
aside (status ``unlisted``, with the refusal), asked for again with capped backoff, and taken
back at once by a listing check that lists it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from klined.exchanges.base import ExchangeAdapter, ListedPair
from klined.model import Pair
from klined.status import ConnectionStatus, PairStatus, StreamState
from klined.streams.backoff import Backoff
from klined.streams.connection import ReqIds, Sink, StreamConnection, StreamSettings, now_ms

#: ``fetch_listing()`` as the REST client provides it (``RestClient.fetch_listing``)
ListingFetcher = Callable[[], Awaitable[dict[Pair, ListedPair]]]

#: how long streaming waits for the first listing answer before it starts anyway
LISTING_WAIT_S = 3.0
#: a refused subscription is asked for again after this long, doubling up to the maximum
REFUSED_RETRY_S = (60.0, 1800.0)


def chunk_pairs(pairs: list[Pair], size: int) -> list[list[Pair]]:
    """Split ``pairs`` into connections of at most ``size``, as evenly as possible.

    Even chunks (rather than full ones and a remainder) spread the load and keep a reconnect
    from touching more pairs than it must.
    """
    if size < 1:
        raise ValueError("a connection must carry at least one pair")
    if not pairs:
        return []
    n = -(-len(pairs) // size)
    base, extra = divmod(len(pairs), n)
    chunks, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        chunks.append(pairs[start:end])
        start = end
    return chunks


class _Listed(msgspec.Struct):
    pair: str
    ws_native: str
    rest_native: str
    rest_key: str
    trading: bool = True


class ListingCache:
    """The last listing an exchange answered, on disk, so a restart knows it at once."""

    def __init__(self, folder: Path, exchange: str) -> None:
        self.path = folder / f"listing-{exchange}.json"

    def load(self) -> dict[Pair, ListedPair] | None:
        try:
            items = msgspec.json.decode(self.path.read_bytes(), type=list[_Listed])
            return {
                (p := Pair.parse(i.pair)): ListedPair(
                    p, i.ws_native, i.rest_native, i.rest_key, i.trading
                )
                for i in items
            }
        except (OSError, msgspec.DecodeError, msgspec.ValidationError, ValueError):
            return None

    def save(self, listing: dict[Pair, ListedPair]) -> None:
        items = [
            _Listed(str(p), i.ws_native, i.rest_native, i.rest_key, i.trading)
            for p, i in sorted(listing.items())
        ]
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_bytes(msgspec.json.encode(items))
            tmp.replace(self.path)
        except OSError as exc:  # a full disk must not stop streaming
            logger.debug("cannot cache the listing at {}: {}", self.path, exc)
            tmp.unlink(missing_ok=True)


class ExchangeStreams:
    """Every connection of one exchange, with the per-pair status they share."""

    def __init__(
        self,
        adapter: ExchangeAdapter,
        ws_url: str,
        pairs: list[Pair],
        settings: StreamSettings,
        sink: Sink,
        *,
        fetch_listing: ListingFetcher | None = None,
        listing_attempts: int = 3,
        recheck_interval_s: float = 300.0,
        listing_wait_s: float = LISTING_WAIT_S,
        listing_cache: ListingCache | None = None,
        refused_retry_s: tuple[float, float] = REFUSED_RETRY_S,
    ) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self.ws_url = ws_url
        self.pairs = list(pairs)
        self.settings = settings
        self.sink = sink
        self.fetch_listing = fetch_listing
        self.listing_attempts = listing_attempts
        self.recheck_interval_s = recheck_interval_s
        self.listing_wait_s = listing_wait_s
        self.listing_cache = listing_cache
        self.refused_retry_s = refused_retry_s
        self.pair_status: dict[str, PairStatus] = {
            str(p): PairStatus(exchange=self.name, symbol=str(p)) for p in self.pairs
        }
        self.connections: list[StreamConnection] = []
        self.unlisted: dict[Pair, str] = {}
        #: pairs whose subscription was refused: when to ask again, and the backoff
        self.refused: dict[Pair, tuple[float, Backoff]] = {}
        self.listing_checked = False
        self.started = False  # run() has reported started once
        self._req_ids = ReqIds()
        self._home: dict[Pair, StreamConnection] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._listing_wanted = anyio.Event()
        self._log = logger.bind(exchange=self.name)
        self._learn_configured()

    def _learn_configured(self) -> None:
        """Tell the adapter the native names of the pairs we subscribe to, so its frames map
        back to them even before (or without) a listing: ``REKTUSD`` is REKT/USD here, not
        REK/TUSD by a guess at the quote."""
        learn = getattr(self.adapter, "learn_listing", None)
        if learn is not None:
            native = self.adapter.native
            learn(
                {
                    p: ListedPair(p, ws_native=native(p), rest_native="", rest_key="")
                    for p in self.pairs
                }
            )

    # -- status --------------------------------------------------------------------------------

    def connection_statuses(self) -> list[ConnectionStatus]:
        return [c.status for c in self.connections]

    def pair_statuses(self) -> list[PairStatus]:
        return [self.pair_status[str(p)] for p in self.pairs]

    def refresh(self, elapsed_s: float) -> None:
        """Rates and per-pair staleness; the daemon calls it about once a second."""
        wall = now_ms()
        for conn in self.connections:
            conn.refresh(wall, elapsed_s)

    # -- listing -------------------------------------------------------------------------------

    async def check_listing(self, *, quiet: bool = False) -> bool:
        """Ask the exchange which configured pairs it lists; False when it did not answer."""
        if self.fetch_listing is None:
            return True
        backoff = Backoff(1.0, 10.0)
        listing: dict[Pair, ListedPair] | None = None
        for attempt in range(1, self.listing_attempts + 1):
            try:
                listing = await self.fetch_listing()
                break
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                log = self._log.debug if quiet else self._log.warning
                log("{}: listing check failed (attempt {}): {}", self.name, attempt, exc)
                if attempt < self.listing_attempts:
                    await anyio.sleep(backoff.next())
        if listing is None:
            return False
        if self.listing_cache is not None:
            await anyio.to_thread.run_sync(self.listing_cache.save, listing)
        self.apply_listing(listing)
        self.listing_checked = True
        return True

    def apply_listing(self, listing: dict[Pair, ListedPair], *, cached: bool = False) -> None:
        """Learn the listing's names; report newly unlisted pairs (and drop them from their
        connection), take back pairs it lists again (also refused ones)."""
        from klined.exchanges.listing import check_listing, configured_natives

        learn = getattr(self.adapter, "learn_listing", None)
        if learn is not None:
            learn(listing)
        natives = configured_natives(self.adapter)
        _listed, problems = check_listing(self.pairs, listing, exchange=self.name, natives=natives)
        for pair, message in problems.items():
            if cached:
                message += " (as of the last listing klined saw; checking again)"
            if self.unlisted.get(pair) == message:
                continue
            self.unlisted[pair] = message
            self.refused.pop(pair, None)
            self._log.error("{}: {} (skipped)", self.name, message)
            ps = self.pair_status[str(pair)]
            ps.state = StreamState.UNLISTED
            ps.last_error = message
        back = [
            p for p in self.pairs if p not in problems and (p in self.unlisted or p in self.refused)
        ]
        for pair in back:
            self.unlisted.pop(pair, None)
            self.refused.pop(pair, None)
            ps = self.pair_status[str(pair)]
            ps.state = StreamState.CONNECTING
            ps.last_error = ""
            self._log.info("{}: {} is listed; streaming it", self.name, pair)
        for conn in self.connections:
            gone = [p for p in conn.pairs if p in self.unlisted]
            if gone:
                conn.drop_pairs(gone)
        if self.connections:
            self._restore([p for p in back if not self._streaming(p)])

    def _streaming(self, pair: Pair) -> bool:
        return any(pair in c.pairs for c in self.connections)

    async def _listing_loop(self, answered: anyio.Event) -> None:
        """The first check (``answered`` once it succeeds or fails), then a re-check every
        ``recheck_interval_s`` (sooner after a failure, or when a refusal asks for one)."""
        backoff = Backoff(min(30.0, self.recheck_interval_s), self.recheck_interval_s)
        quiet = False
        while True:
            ok = await self.check_listing(quiet=quiet)
            answered.set()
            if ok:
                backoff.reset()
                wait = self.recheck_interval_s
            else:
                if not quiet:
                    self._log.warning(
                        "{}: listing unavailable; streaming the configured pairs, will check again",
                        self.name,
                    )
                quiet = True
                wait = backoff.next()
            with anyio.move_on_after(wait):
                await self._listing_wanted.wait()
            self._listing_wanted = anyio.Event()

    # -- refused subscriptions -----------------------------------------------------------------

    def on_refused(self, conn: StreamConnection, pairs: list[Pair], message: str) -> None:
        """The exchange refused these pairs' subscription: ask again later, and check the
        listing soon (a listing that lists them takes them back at once)."""
        for pair in pairs:
            _, backoff = self.refused.get(pair, (0.0, Backoff(*self.refused_retry_s)))
            delay = backoff.next()
            self.refused[pair] = (time.monotonic() + delay, backoff)
            self._home[pair] = conn
            ps = self.pair_status.get(str(pair))
            if ps is not None:
                ps.last_error = f"{message} (asking again in {delay:.0f} s)"
        self._listing_wanted.set()

    async def _retry_refused(self) -> None:
        while True:
            await anyio.sleep(1.0)
            t = time.monotonic()
            due = [p for p, (at, _) in self.refused.items() if at <= t and p not in self.unlisted]
            if due:
                self._log.info("{}: asking again for {}", self.name, ", ".join(map(str, due)))
                self._restore(due)

    def _restore(self, pairs: list[Pair]) -> None:
        """Put pairs back on a connection (their old one; it resubscribes)."""
        for pair in pairs:
            if self._streaming(pair):
                continue
            conn = self._home.get(pair) or min(self.connections, key=lambda c: len(c.pairs))
            restart = not conn.pairs and conn.finished
            conn.add_pairs([pair])
            if restart and self._tg is not None:
                self._tg.start_soon(conn.run, name=f"stream {conn.conn_id}")

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the listing check, start every connection (after the check's first answer
        or ``listing_wait_s``), then supervise until cancelled.

        ``task_status.started()`` fires once every connection task exists (the daemon's
        readiness); a failure of one connection never ends this task.
        """
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.listing_cache is not None and self.fetch_listing is not None:
                cached = await anyio.to_thread.run_sync(self.listing_cache.load)
                if cached:
                    self.apply_listing(cached, cached=True)
            answered = anyio.Event()
            if self.fetch_listing is not None:
                tg.start_soon(self._listing_loop, answered, name=f"listing {self.name}")
                with anyio.move_on_after(self.listing_wait_s):
                    await answered.wait()
                if not self.listing_checked:
                    self._log.warning(
                        "{}: no listing answer within {:g} s; streaming {} pair(s) meanwhile",
                        self.name,
                        self.listing_wait_s,
                        len([p for p in self.pairs if p not in self.unlisted]),
                    )
            streamable = [p for p in self.pairs if p not in self.unlisted]
            size = self.adapter.limits.streams_per_connection
            self.connections = []
            for i, chunk in enumerate(chunk_pairs(streamable, size)):
                conn = StreamConnection(
                    self.adapter,
                    f"{self.name}-{i}",
                    self.ws_url,
                    chunk,
                    self.settings,
                    self.sink,
                    pair_status=self.pair_status,
                    req_ids=self._req_ids,
                    on_refused=self.on_refused,
                )
                self.connections.append(conn)
                self._home.update((p, conn) for p in chunk)
            if not self.connections:
                self._log.error("{}: no pair to stream", self.name)
            for conn in self.connections:
                tg.start_soon(conn.run, name=f"stream {conn.conn_id}")
            tg.start_soon(self._retry_refused, name=f"refused {self.name}")
            self.started = True
            task_status.started()


def streams_status(
    streams: list[ExchangeStreams],
) -> tuple[list[ConnectionStatus], list[PairStatus]]:
    """Every connection and pair status of ``streams``, for the daemon's snapshot."""
    conns: list[ConnectionStatus] = []
    pairs: list[PairStatus] = []
    for s in streams:
        conns.extend(s.connection_statuses())
        pairs.extend(s.pair_statuses())
    return conns, pairs
