"""The daemon's exchange streams: listing clients, which pairs stream, and their supervisor.

Each enabled exchange gets one REST client for its listing checks (:func:`listing_clients`) and
one :class:`~klined.streams.ExchangeStreams` (:func:`build_streams`): a capture host streams its
shard of the pairs into the lake (and the live path), a chain host streams nothing and checks
every configured pair's listing. :func:`supervise_exchange` restarts an exchange that a bug took
down, so one exchange never stops another.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from klined.config import Config
from klined.live import live_sink
from klined.model import Candle
from klined.streams import ExchangeStreams, StreamSettings
from klined.streams.backoff import Backoff
from klined.streams.supervisor import ListingCache

if TYPE_CHECKING:
    from klined.daemon.process import Daemon

#: a listing check at start tries this often (each try bounded by ``rest_timeout_s``)
LISTING_ATTEMPTS = 3


async def listing_clients(cfg: Config, stack: AsyncExitStack) -> dict[str, Any]:
    """One REST client per enabled exchange (its adapter is the one its streams use), open
    until ``stack`` closes; a listing check at start retries briefly."""
    from klined.rest.client import RetryPolicy, open_clients

    retry = RetryPolicy(attempts=LISTING_ATTEMPTS, initial_s=0.5, max_s=4.0)
    return await stack.enter_async_context(open_clients(cfg, retry=retry))


def build_streams(daemon: Daemon, clients: dict[str, Any]) -> None:
    """Capture roles: this shard's pairs, streamed into the lake (and the live path). The
    chain role: every configured pair, for the listing check only (``Daemon.listings``)."""
    writer = daemon.writer
    sink: Callable[[Candle], None] = writer.append if writer is not None else _no_sink
    if writer is not None and daemon.live is not None:
        sink = live_sink(writer.append, daemon.live.offer)
    for name, section in daemon.cfg.exchanges.enabled().items():
        client = clients[name]
        adapter = client.adapter
        es = ExchangeStreams(
            adapter,
            daemon.cfg.ws_url(name),
            daemon.cfg.capture_pairs(name) if writer is not None else daemon.cfg.pairs(name),
            StreamSettings.from_config(section, adapter.limits),
            sink,
            fetch_listing=client.fetch_listing,
            listing_attempts=1,  # the REST client retries with backoff itself
            listing_cache=ListingCache(daemon.cfg.data_dir, name),
            **daemon.stream_options,
        )
        (daemon.streams if writer is not None else daemon.listings).append(es)


async def supervise_exchange(es: ExchangeStreams, *, task_status: TaskStatus[None]) -> None:
    """``es.run`` catches every connection's failures; should a bug still escape it, the
    exchange is restarted (slowly) rather than taking the other exchanges down."""
    backoff = Backoff(1.0, 60.0)
    while True:
        try:
            status = anyio.TASK_STATUS_IGNORED if es.started else task_status
            await es.run(task_status=status)
            return
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            logger.exception("{}: stream supervisor crashed; restarting", es.name)
        if not es.started:
            es.started = True
            task_status.started()
        await anyio.sleep(backoff.next())


def _no_sink(candle: Any) -> None:  # pragma: no cover - listing-only streams never run
    raise AssertionError("a chain host streams nothing")
