"""Per exchange: check the listing, chunk the pairs into connections, supervise them.

The listing check runs before the streams start. An unlisted pair is reported once, with the
adapter's suggestion (``check_listing``), and skipped (status ``unlisted``). When the exchange's
REST API is unreachable at start, streaming does not wait for it: every configured pair is
streamed and the listing is checked again in the background, slowly, until it answers; pairs it
then finds unlisted are dropped from their connection (which resubscribes without them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from klined.exchanges.base import ExchangeAdapter, ListedPair
from klined.model import Pair
from klined.status import ConnectionStatus, PairStatus, StreamState
from klined.streams.backoff import Backoff
from klined.streams.connection import ReqIds, Sink, StreamConnection, StreamSettings, now_ms

#: ``fetch_listing()`` as the REST client provides it (``RestClient.fetch_listing``)
ListingFetcher = Callable[[], Awaitable[dict[Pair, ListedPair]]]


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
        self.pair_status: dict[str, PairStatus] = {
            str(p): PairStatus(exchange=self.name, symbol=str(p)) for p in self.pairs
        }
        self.connections: list[StreamConnection] = []
        self.unlisted: dict[Pair, str] = {}
        self.listing_checked = False
        self.started = False  # run() has reported started once
        self._req_ids = ReqIds()
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
        from klined.exchanges.listing import check_listing

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
        learn = getattr(self.adapter, "learn_listing", None)
        if learn is not None:
            learn(listing)
        _listed, problems = check_listing(self.pairs, listing, exchange=self.name)
        self.listing_checked = True
        for pair, message in problems.items():
            if pair in self.unlisted:
                continue
            self.unlisted[pair] = message
            self._log.error("{}: {} (skipped)", self.name, message)
            ps = self.pair_status[str(pair)]
            ps.state = StreamState.UNLISTED
            ps.last_error = message
        return True

    async def _recheck_listing(self) -> None:
        """The exchange was unreachable at start: check again slowly until it answers."""
        backoff = Backoff(min(30.0, self.recheck_interval_s), self.recheck_interval_s)
        while True:
            await anyio.sleep(backoff.next())
            if await self.check_listing(quiet=True):
                for conn in self.connections:
                    gone = [p for p in conn.pairs if p in self.unlisted]
                    if gone:
                        conn.drop_pairs(gone)
                self._log.info("{}: listing checked", self.name)
                return

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Check the listing, start every connection, then supervise until cancelled.

        ``task_status.started()`` fires once every connection task exists (the daemon's
        readiness); a failure of one connection never ends this task.
        """
        reachable = await self.check_listing()
        if not reachable:
            self._log.warning(
                "{}: listing unavailable; streaming all {} configured pairs, will check again",
                self.name,
                len(self.pairs),
            )
        streamable = [p for p in self.pairs if p not in self.unlisted]
        size = self.adapter.limits.streams_per_connection
        self.connections = []
        for i, chunk in enumerate(chunk_pairs(streamable, size)):
            self.connections.append(
                StreamConnection(
                    self.adapter,
                    f"{self.name}-{i}",
                    self.ws_url,
                    chunk,
                    self.settings,
                    self.sink,
                    pair_status=self.pair_status,
                    req_ids=self._req_ids,
                )
            )
        if not self.connections:
            self._log.error("{}: no pair to stream", self.name)
        async with anyio.create_task_group() as tg:
            for conn in self.connections:
                tg.start_soon(conn.run, name=f"stream {conn.conn_id}")
            if not reachable:
                tg.start_soon(self._recheck_listing, name=f"listing {self.name}")
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
