"""Live capture: supervised WebSocket connections that feed every candle event to the lake.

``ExchangeStreams`` (one per exchange, :mod:`.supervisor`) checks the listing, chunks the
pairs into ``StreamConnection`` slots (:mod:`.connection`) and supervises them; each slot runs
one ``Session`` per socket (:mod:`.session`).
Kraken finality comes from ``FinalityTracker``; retries use ``Backoff``.
"""

from klined.streams.backoff import Backoff, backoff_delays
from klined.streams.connection import (
    EVIDENCE_FINALITY,
    ReqIds,
    Session,
    Sink,
    StreamConnection,
    StreamSettings,
)
from klined.streams.finality import FinalityTracker
from klined.streams.supervisor import ExchangeStreams, chunk_pairs, streams_status

__all__ = [
    "EVIDENCE_FINALITY",
    "Backoff",
    "ExchangeStreams",
    "FinalityTracker",
    "ReqIds",
    "Session",
    "Sink",
    "StreamConnection",
    "StreamSettings",
    "backoff_delays",
    "chunk_pairs",
    "streams_status",
]
