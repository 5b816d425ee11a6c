"""The daemon's status feed: what it reports and how it travels.

The daemon keeps a :class:`StatusBoard` that streams, lake and scheduler update in place
(plain attribute writes, no locks: one event loop). The status server serves a snapshot as one
JSON document per connection on a Unix socket (owner-only permissions); ``klined status`` and
``klined tui`` read it with :func:`fetch_status`. The wire format is the msgspec encoding of
:class:`StatusSnapshot`; readers ignore fields they do not know, so the feed can grow.
"""

from __future__ import annotations

import enum

import msgspec


class StreamState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    STALE = "stale"
    UNLISTED = "unlisted"
    NO_DATA = "no data"  # subscribed, but nothing ever arrived for the pair
    DOWN = "down"  # given up for good (fatal error) or the exchange is disabled/stopped


class PairStatus(msgspec.Struct, kw_only=True):
    exchange: str
    symbol: str
    state: StreamState = StreamState.CONNECTING
    last_message_ms: int | None = None  # wall clock when the last event for the pair arrived
    messages: int = 0
    messages_per_s: float = 0.0
    reconnects: int = 0
    last_final_minute_ms: int | None = None
    last_error: str = ""


class ConnectionStatus(msgspec.Struct, kw_only=True):
    exchange: str
    conn_id: str  # e.g. "binance-0"
    state: StreamState = StreamState.CONNECTING
    pairs: int = 0
    session_id: str = ""
    connected_since_ms: int | None = None
    last_message_ms: int | None = None
    messages: int = 0
    messages_per_s: float = 0.0
    malformed: int = 0
    reconnects: int = 0
    next_retry_ms: int | None = None
    last_error: str = ""


class LakeStatus(msgspec.Struct, kw_only=True):
    open_parts: int = 0
    pending_upload_parts: int = 0
    pending_upload_bytes: int = 0
    uploaded_parts: int = 0
    events_written: int = 0
    s3_enabled: bool = False
    last_upload_error: str = ""
    held_bytes: int = 0  # events in memory the disk refused (yet)
    dropped_events: int = 0  # dropped past lake.max_held_bytes since start
    write_failing_since_ms: int | None = None
    last_write_error: str = ""


class ChainStatus(msgspec.Struct, kw_only=True):
    running: bool = False
    current_hour_ms: int | None = None
    current_step: str = ""
    last_run_ms: int | None = None
    last_result: str = ""
    next_run_ms: int | None = None  # the next cron time (a due run waits for the current hour)
    trigger: str = ""  # what the running work is: catchup | schedule | ...
    run_done: int = 0  # hours of the current run finished so far
    run_total: int = 0  # hours the current run has had to do (it grows when an hour closes)
    waiting_for: str = ""  # who holds the chain lock while this run waits for it
    quarantined_parts: int = 0  # lake parts bronze could not read (tried again every run)
    quarantined_sample: list[str] = msgspec.field(default_factory=list)  # "key: reason"


class LiveStatus(msgspec.Struct, kw_only=True):
    """The live path (finals straight into silver). Lags are seconds over ``lag_window_s``."""

    enabled: bool = False
    state: str = "off"  # off | waiting (no database yet) | ok | failing
    finals: int = 0  # proven-final candles received from the streams
    written: int = 0  # silver rows inserted or updated
    unchanged: int = 0  # finals that changed nothing (the same or a better row was there)
    rejected: int = 0  # finals refused as invalid (as bronze would refuse them)
    committed_batches: int = 0
    queued_batches: int = 0
    queued_finals: int = 0
    dropped_batches: int = 0
    dropped_finals: int = 0
    lag_window_s: float = 0.0
    lag_samples: int = 0
    lag_p50_s: float | None = None
    lag_p99_s: float | None = None
    lag_max_s: float | None = None
    last_commit_ms: int | None = None
    gold_refreshed_ms: int | None = None
    gold_rows: int = 0
    last_error: str = ""


class StatusSnapshot(msgspec.Struct, kw_only=True):
    version: int = 1
    role: str = "all"  # all | capture | chain (``daemon.role``)
    shard: str = "1/1"  # ``daemon.shard``: this host streams shard k of n
    shard_pairs: int = 0  # configured pairs (all exchanges) in this host's shard; 0 for chain
    configured_pairs: int = 0  # configured pairs of every enabled exchange
    pid: int = 0
    started_ms: int = 0
    now_ms: int = 0
    uptime_s: float = 0.0
    rss_bytes: int = 0
    connections: list[ConnectionStatus] = msgspec.field(default_factory=list)
    pairs: list[PairStatus] = msgspec.field(default_factory=list)
    lake: LakeStatus = msgspec.field(default_factory=LakeStatus)
    chain: ChainStatus = msgspec.field(default_factory=ChainStatus)
    live: LiveStatus = msgspec.field(default_factory=LiveStatus)
    #: the exchanges are klined's simulator injecting faults on purpose (``klined demo``):
    #: readers label the errors as simulated
    simulated: bool = False


def encode_snapshot(snapshot: StatusSnapshot) -> bytes:
    return msgspec.json.encode(snapshot)


def decode_snapshot(data: bytes) -> StatusSnapshot:
    return msgspec.json.decode(data, type=StatusSnapshot)
