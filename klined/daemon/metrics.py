"""An optional Prometheus endpoint on loopback: ``GET /metrics`` in the text format (0.0.4).

Everything is computed at scrape time from the same :class:`~klined.status.StatusSnapshot` the
status socket serves, plus two small providers the daemon passes in: the last duration of each
chain step and the completeness ratio per exchange. There is no registry and no global state,
and no ``prometheus_client`` dependency: the text format is a few lines of code, and a
collector-per-scrape design is what ``prometheus_client`` would need here anyway.

The server binds to a loopback address only (``daemon.metrics_port``; 0 disables it): reach it
from elsewhere through an SSH tunnel or a local Prometheus agent, never by opening the port.
"""

from __future__ import annotations

import inspect
import ipaddress
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping

import anyio
import anyio.abc
from aiohttp import web
from loguru import logger

from klined.errors import KlinedError
from klined.status import StatusSnapshot, StreamState

__all__ = ["CONTENT_TYPE", "GaugeSource", "MetricsServer", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: a provider returns label value -> number, directly or as an awaitable (e.g. a cached query)
GaugeSource = Callable[[], Mapping[str, float] | Awaitable[Mapping[str, float]]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{inner}}} {_number(value)}")
            else:
                self.lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(
    snapshot: StatusSnapshot,
    chain_steps: Mapping[str, float] | None = None,
    completeness: Mapping[str, float] | None = None,
) -> str:
    """The exposition text for one scrape.

    ``chain_steps`` maps a chain step (``flush``, ``bronze``, ``gapfill``...) to the seconds
    its last run took; ``completeness`` maps an exchange to its completion ratio (0..1) over
    the window the daemon chooses. A family whose provider is None is left out.
    """
    s = snapshot
    w = _Writer()
    now = s.now_ms

    conns = sorted(s.connections, key=lambda c: (c.exchange, c.conn_id))
    w.family(
        "klined_stream_connected",
        "gauge",
        "1 when the WebSocket connection is connected and subscribed, else 0.",
        (
            ({"exchange": c.exchange, "conn": c.conn_id}, int(c.state == StreamState.CONNECTED))
            for c in conns
        ),
    )
    w.family(
        "klined_stream_last_message_age_seconds",
        "gauge",
        "Seconds since the connection last delivered a message.",
        (
            ({"exchange": c.exchange, "conn": c.conn_id}, max(0, now - c.last_message_ms) / 1000)
            for c in conns
            if c.last_message_ms is not None
        ),
    )

    exchanges = sorted({c.exchange for c in s.connections} | {p.exchange for p in s.pairs})
    messages: dict[str, int] = defaultdict(int)
    reconnects: dict[str, int] = defaultdict(int)
    malformed: dict[str, int] = defaultdict(int)
    for c in s.connections:
        messages[c.exchange] += c.messages
        reconnects[c.exchange] += c.reconnects
        malformed[c.exchange] += c.malformed
    for name, data, help_text in (
        ("klined_messages_total", messages, "WebSocket messages received."),
        ("klined_reconnects_total", reconnects, "WebSocket reconnects."),
        ("klined_malformed_total", malformed, "Frames that could not be parsed and were skipped."),
    ):
        w.family(name, "counter", help_text, (({"exchange": e}, data[e]) for e in exchanges))

    pair_states: dict[tuple[str, str], int] = defaultdict(int)
    for p in s.pairs:
        pair_states[(p.exchange, p.state.value)] += 1
    w.family(
        "klined_pairs",
        "gauge",
        "Configured pairs by stream state (connected, stale, unlisted...).",
        (({"exchange": e, "state": st}, n) for (e, st), n in sorted(pair_states.items())),
    )

    lake = s.lake
    w.family(
        "klined_lake_open_parts",
        "gauge",
        "Lake part files open for writing.",
        [({}, lake.open_parts)],
    )
    w.family(
        "klined_lake_pending_parts",
        "gauge",
        "Closed lake parts not yet uploaded to S3.",
        [({}, lake.pending_upload_parts)],
    )
    w.family(
        "klined_lake_pending_bytes",
        "gauge",
        "Bytes of closed lake parts not yet uploaded to S3.",
        [({}, lake.pending_upload_bytes)],
    )
    w.family(
        "klined_lake_uploaded_parts_total",
        "counter",
        "Lake parts uploaded to S3.",
        [({}, lake.uploaded_parts)],
    )
    w.family(
        "klined_lake_events_total",
        "counter",
        "Events written to the lake.",
        [({}, lake.events_written)],
    )

    w.family(
        "klined_chain_running",
        "gauge",
        "1 while the hourly chain runs.",
        [({}, int(s.chain.running))],
    )
    if s.chain.last_run_ms is not None:
        w.family(
            "klined_chain_last_run_timestamp_seconds",
            "gauge",
            "When the hourly chain last finished (Unix time).",
            [({}, s.chain.last_run_ms / 1000)],
        )
    if chain_steps is not None:
        w.family(
            "klined_chain_step_seconds",
            "gauge",
            "Duration of the last run of each hourly chain step.",
            (({"step": k}, float(v)) for k, v in sorted(chain_steps.items())),
        )
    if completeness is not None:
        w.family(
            "klined_completeness_ratio",
            "gauge",
            "Share of expected 1-minute candles present in silver (0..1).",
            (({"exchange": k}, float(v)) for k, v in sorted(completeness.items())),
        )

    _live(w, s)

    w.family(
        "klined_uptime_seconds", "gauge", "Seconds since the daemon started.", [({}, s.uptime_s)]
    )
    w.family(
        "klined_start_time_seconds",
        "gauge",
        "When the daemon started (Unix time).",
        [({}, s.started_ms / 1000)],
    )
    w.family(
        "klined_rss_bytes", "gauge", "Resident memory of the daemon process.", [({}, s.rss_bytes)]
    )
    return w.text()


def _live(w: _Writer, s: StatusSnapshot) -> None:
    """The live path's families (left out when it is off)."""
    live = s.live
    if not live.enabled:
        return
    w.family(
        "klined_live_up",
        "gauge",
        "1 while the live path writes into silver (0: waiting for or failing on PostgreSQL).",
        [({}, int(live.state == "ok"))],
    )
    quantiles = [("0.5", live.lag_p50_s), ("0.99", live.lag_p99_s), ("1", live.lag_max_s)]
    w.family(
        "klined_live_lag_seconds",
        "gauge",
        "Exchange event time of a final candle to its commit in silver, over the last"
        f" {live.lag_window_s:g} s (quantile 1 is the maximum).",
        (({"quantile": q}, v) for q, v in quantiles if v is not None),
    )
    for name, value, help_text in (
        ("klined_live_finals_total", live.finals, "Proven-final candles the live path received."),
        ("klined_live_written_total", live.written, "Silver rows the live path wrote."),
        ("klined_live_dropped_batches_total", live.dropped_batches,
         "Live batches dropped while PostgreSQL was slow or down (the chain fills them)."),
        ("klined_live_dropped_finals_total", live.dropped_finals,
         "Final candles in the dropped live batches."),
    ):  # fmt: skip
        w.family(name, "counter", help_text, [({}, value)])
    w.family(
        "klined_live_queued_batches",
        "gauge",
        "Live batches waiting to be written.",
        [({}, live.queued_batches)],
    )
    if live.last_commit_ms is not None:
        w.family(
            "klined_live_last_commit_timestamp_seconds",
            "gauge",
            "When the live path last committed (Unix time).",
            [({}, live.last_commit_ms / 1000)],
        )


class MetricsServer:
    """Serves :func:`render_metrics` on ``http://<host>:<port>/metrics`` until cancelled.

    ``host`` must be a loopback address. ``port=0`` picks a free port (for tests);
    ``serve`` reports the bound port through ``task_status``.
    """

    def __init__(
        self,
        port: int,
        snapshot: Callable[[], StatusSnapshot],
        *,
        chain_steps: GaugeSource | None = None,
        completeness: GaugeSource | None = None,
        host: str = "127.0.0.1",
        source_timeout_s: float = 5.0,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"metrics are served on loopback only, not {host}")
        self.host = host
        self.port = port
        self.snapshot = snapshot
        self.chain_steps = chain_steps
        self.completeness = completeness
        self.source_timeout_s = source_timeout_s
        self.bound_port: int | None = None
        self._failing: set[str] = set()

    async def _gauges(self, name: str, source: GaugeSource | None) -> Mapping[str, float] | None:
        """A provider's values; None (family left out) when it fails or is too slow."""
        if source is None:
            return None
        try:
            with anyio.fail_after(self.source_timeout_s):
                result = source()
                if inspect.isawaitable(result):
                    result = await result
            values = dict(result)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if name not in self._failing:
                self._failing.add(name)
                logger.warning("metrics: {} provider failed, leaving it out: {!r}", name, exc)
            return None
        if name in self._failing:
            self._failing.discard(name)
            logger.info("metrics: {} provider works again", name)
        return values

    async def render(self) -> str:
        steps = await self._gauges("chain_steps", self.chain_steps)
        ratios = await self._gauges("completeness", self.completeness)
        return render_metrics(self.snapshot(), steps, ratios)

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        try:
            body = await self.render()
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            logger.exception("metrics: rendering failed")
            return web.Response(status=500, text="klined: metrics rendering failed\n")
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def _handle_root(self, request: web.Request) -> web.Response:
        return web.Response(text="klined metrics: see /metrics\n")

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the port, serve until cancelled, then close (bounded, shielded)."""
        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/", self._handle_root)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            try:
                await site.start()
            except OSError as exc:
                raise KlinedError(
                    f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}"
                    " (change daemon.metrics_port, or 0 to disable)"
                ) from None
            self.bound_port = int(runner.addresses[0][1])
            logger.info("metrics on http://{}:{}/metrics", self.host, self.bound_port)
            task_status.started(self.bound_port)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await runner.cleanup()
