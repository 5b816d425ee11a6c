"""Events the lake's disk refused, seen through to the end by the daemon.

Minutes dropped past ``lake.max_held_bytes`` while running are recorded as ``lake_dropped``
incidents through the chain's database (``Daemon.record_drops``, set by the chain plug-in) at
the daemon's tick, every ``DROPS_EVERY_S`` (:func:`settle_drops`); the chain gap-fills them
over REST. At shutdown the events the disk never took are uploaded to S3 straight from memory
(:func:`save_held`). What can be neither recorded nor uploaded is named in ``Daemon.lost``,
and ``klined run`` exits 1.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio
from loguru import logger

from klined.lake.held import describe_held
from klined.streams.connection import now_ms

if TYPE_CHECKING:
    from klined.daemon.process import Daemon

MINUTE_MS = 60_000


async def save_held(daemon: Daemon) -> None:
    """Events the disk never took: straight to S3 from memory, else named as lost (also
    when the shutdown timeout or a second signal cuts the upload short)."""
    writer = daemon.writer
    if writer is None:
        return
    held = writer.held_parts()
    if not held:
        return
    size = sum(len(p.data) for p in held)
    events = sum(p.events for p in held)
    why = "no S3 bucket is configured"
    uploaded = False
    try:
        if daemon.forced:
            why = "a second signal skipped the upload"
        elif daemon.uploader.enabled:
            why = "the shutdown timeout ran out before S3 took them"
            try:
                for part in held:
                    await daemon.uploader.upload_from_memory(part.key, part.data)
                uploaded = True
            except Exception as exc:
                why = f"S3 failed too ({exc})"
    finally:
        if uploaded:
            writer.forget_held()
            logger.warning(
                "lake: the disk refused {:,} bytes ({:,} events); uploaded them to S3 "
                "from memory as {} part(s)",
                size,
                events,
                len(held),
            )
        else:
            daemon.lost = (
                f"{events:,} events ({size:,} bytes) could not be written to "
                f"{writer.root} and {why}; lost: {describe_held(held)}"
            )


async def settle_drops(daemon: Daemon, *, final: bool = False) -> None:
    """Record minutes the lake dropped (settled ones, or all at the end) as incidents."""
    writer = daemon.writer
    if writer is None:
        return
    before = None if final else now_ms() - 2 * MINUTE_MS
    drops = writer.take_dropped(before)
    if not drops:
        return
    what = ", ".join(
        f"{d.exchange} {d.symbol} {_hm(d.start_ms)}-{_hm(d.end_ms)}Z" for d in drops[:5]
    ) + (f" and {len(drops) - 5} more" if len(drops) > 5 else "")
    events = sum(d.events for d in drops)
    if daemon.record_drops is not None:
        try:
            with anyio.fail_after(10):
                await daemon.record_drops(drops)
        except Exception as exc:
            if not final:
                writer.trouble.give_back(drops)
                logger.warning("lake: cannot record dropped minutes yet ({})", exc)
                return
        else:
            logger.error(
                "lake: {:,} events dropped (disk full past lake.max_held_bytes): {}; "
                "recorded for the chain's gap-fill",
                events,
                what,
            )
            return
    message = f"{events:,} events dropped (disk full past lake.max_held_bytes): {what}"
    if final:
        daemon.lost = f"{daemon.lost}; {message}" if daemon.lost else message
    else:
        logger.error("lake: {}; no database to record them: gap-fill them by hand", message)


def _hm(ms: int) -> str:
    return time.strftime("%H:%M", time.gmtime(ms // 1000))
