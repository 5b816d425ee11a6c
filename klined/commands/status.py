"""``klined status``: print the running daemon's status once, as a table or as JSON."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import anyio
import click
import msgspec

from klined.commands.options import config_option
from klined.config import load_config
from klined.daemon.status_server import fetch_status
from klined.errors import StatusError
from klined.model import format_duration
from klined.status import ChainStatus, LiveStatus, StatusSnapshot, StreamState, encode_snapshot

__all__ = ["live_line", "render_status", "role_line", "status_command"]

#: problem pairs listed before "... and N more"
MAX_PROBLEM_PAIRS = 20


def _age(now_ms: int, then_ms: int | None) -> str:
    """Compact elapsed time: ``0.4s``, ``12s``, ``3m05s``, ``2h10m``, ``4d03h``."""
    if then_ms is None:
        return "-"
    return format_duration(max(0, now_ms - then_ms) / 1000)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover - the loop always returns


def _when(ms: int | None, now_ms: int) -> str:
    """A UTC time, with the date only when it is not the snapshot's day."""
    if ms is None:
        return "-"
    t = datetime.fromtimestamp(ms / 1000, UTC)
    today = datetime.fromtimestamp(now_ms / 1000, UTC).date()
    return t.strftime("%H:%M:%SZ" if t.date() == today else "%Y-%m-%d %H:%M:%SZ")


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  " + "  ".join(parts).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _one_line(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def role_line(s: StatusSnapshot) -> str:
    """``capture, shard 1/2 (8 of 15 pairs)`` / ``chain (no streams; ...)`` / ``all``."""
    if s.role == "chain":
        return f"chain (no streams; loads the lake for all {s.configured_pairs} pairs)"
    text = s.role
    if s.shard != "1/1":
        text += f", shard {s.shard} ({s.shard_pairs} of {s.configured_pairs} pairs)"
    if s.role == "capture":
        text += " (no chain: another host builds the warehouse)"
    return text


def render_status(s: StatusSnapshot) -> str:
    """The human view: connections, pair summary and problem pairs, lake, chain, process."""
    now = s.now_ms
    out = [
        f"klined pid {s.pid} · up {format_duration(s.uptime_s)} · RSS {_bytes(s.rss_bytes)}"
        f" · at {datetime.fromtimestamp(now / 1000, UTC):%Y-%m-%d %H:%M:%S}Z",
    ]
    if s.simulated:
        out.append(
            "SIMULATED: the exchanges are klined's simulator; its errors are injected faults"
        )
    out.append(f"ROLE {role_line(s)}")
    out.append("")

    out.append(f"CONNECTIONS ({len(s.connections)})")
    if s.connections:
        rows = []
        for c in sorted(s.connections, key=lambda c: (c.exchange, c.conn_id)):
            err = _one_line(c.last_error) if c.last_error else "-"
            if c.state == StreamState.BACKOFF and c.next_retry_ms is not None:
                err = f"{err} (retry in {format_duration(max(0, c.next_retry_ms - now) / 1000)})"
            rows.append(
                [
                    c.conn_id,
                    c.state.value,
                    str(c.pairs),
                    _age(now, c.last_message_ms),
                    f"{c.messages_per_s:.1f}",
                    str(c.reconnects),
                    str(c.malformed),
                    err,
                ]
            )
        out += _table(
            ["CONN", "STATE", "PAIRS", "LAST MSG", "MSG/S", "RECONN", "MALFORMED", "LAST ERROR"],
            rows,
            right={2, 3, 4, 5, 6},
        )
    else:
        out.append("  none")
    out.append("")

    counts = Counter(p.state.value for p in s.pairs)
    summary = " · ".join(f"{state} {n}" for state, n in sorted(counts.items()))
    out.append(f"PAIRS ({len(s.pairs)})" + (f": {summary}" if summary else ""))
    problems = sorted(
        (p for p in s.pairs if p.state != StreamState.CONNECTED or p.last_error),
        key=lambda p: (p.exchange, p.symbol),
    )
    if problems:
        rows = [
            [
                p.exchange,
                p.symbol,
                p.state.value,
                _age(now, p.last_message_ms),
                _when(p.last_final_minute_ms, now),
                _one_line(p.last_error) if p.last_error else "-",
            ]
            for p in problems[:MAX_PROBLEM_PAIRS]
        ]
        out += _table(
            ["EXCHANGE", "PAIR", "STATE", "LAST MSG", "LAST FINAL", "LAST ERROR"], rows, {3}
        )
        if len(problems) > MAX_PROBLEM_PAIRS:
            out.append(f"  ... and {len(problems) - MAX_PROBLEM_PAIRS} more (see --json)")
    elif s.pairs:
        out.append("  all pairs connected")
    out.append("")

    lake = s.lake
    out.append(
        f"LAKE: {lake.open_parts} open parts · pending upload {lake.pending_upload_parts} parts"
        f" ({_bytes(lake.pending_upload_bytes)}) · uploaded {lake.uploaded_parts}"
        f" · events {lake.events_written:,} · S3 {'on' if lake.s3_enabled else 'off'}"
    )
    if lake.last_upload_error:
        out.append(f"  last upload error: {_one_line(lake.last_upload_error, 100)}")
    if lake.write_failing_since_ms is not None:
        out.append(
            f"  cannot write the lake since {_when(lake.write_failing_since_ms, now)}:"
            f" {_bytes(lake.held_bytes)} held in memory: {_one_line(lake.last_write_error, 60)}"
        )
    if lake.dropped_events:
        out.append(
            f"  {lake.dropped_events:,} events dropped past lake.max_held_bytes (recorded for"
            " gap-fill)"
        )

    ch = s.chain
    out.extend(chain_lines(ch, now))
    if ch.quarantined_parts:
        out.append(
            f"  {ch.quarantined_parts} lake part(s) quarantined (unreadable; tried again every "
            "run; `klined check` lists them):"
        )
        out += [f"    {_one_line(item, 100)}" for item in ch.quarantined_sample[:3]]
    out.append(live_line(s.live, now))
    if s.live.last_error:
        out.append(f"  last live error: {_one_line(s.live.last_error, 100)}")
    return "\n".join(out)


_TRIGGERS = {"catchup": "catch-up", "schedule": "hourly run", "manual": "run by hand"}


def chain_activity(ch: ChainStatus, now_ms: int) -> str:
    """What the chain is doing now, in words: waiting for the lock and for whom, or the step
    and hour it runs, with the catch-up's progress; "idle" otherwise."""
    if not ch.running:
        return "idle"
    what = _TRIGGERS.get(ch.trigger, ch.trigger or "run")
    if ch.run_total > 1:
        what += f", hour {min(ch.run_done + 1, ch.run_total)} of {ch.run_total}"
    if ch.waiting_for:
        return f"waiting for the chain lock, held by {ch.waiting_for} ({what})"
    if ch.current_hour_ms is None:
        return f"running ({what})"
    hour = _when(ch.current_hour_ms, now_ms)
    return f"running {ch.current_step or 'the chain'} for hour {hour} ({what})"


def next_run_text(ch: ChainStatus, now_ms: int) -> str:
    """The next scheduled run, never a time already past: a run whose time has come waits for
    the hour in progress and says so."""
    if ch.next_run_ms is None:
        return "not scheduled"
    if ch.next_run_ms > now_ms:
        return _when(ch.next_run_ms, now_ms)
    return "due now, after the hour in progress" if ch.running else "due now"


def chain_lines(ch: ChainStatus, now_ms: int) -> list[str]:
    line = f"CHAIN: {chain_activity(ch, now_ms)} · next scheduled run {next_run_text(ch, now_ms)}"
    last = f"  last run {_when(ch.last_run_ms, now_ms)}"
    if ch.last_result:
        last += f" ({_one_line(ch.last_result, 70)})"
    return [line, last]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s" if value < 10 else format_duration(value)


def live_line(live: LiveStatus, now: int) -> str:
    """``LIVE: ok · lag p50 0.41s p99 0.93s max 1.20s (last 5m00s, 4,012 finals)`` and a second
    line: written, queued, dropped, rejected, gold's last refresh."""
    if not live.enabled:
        return "LIVE: off (needs [live] enabled and the chain's database)"
    line = f"LIVE: {live.state}"
    if live.lag_samples:
        line += (
            f" · lag p50 {_seconds(live.lag_p50_s)} p99 {_seconds(live.lag_p99_s)}"
            f" max {_seconds(live.lag_max_s)} (last {format_duration(live.lag_window_s)},"
            f" {live.lag_samples:,} finals)"
        )
    else:
        line += " · no final committed lately"
    line += (
        f"\n  written {live.written:,} · queued {live.queued_batches}"
        f" · dropped {live.dropped_batches} batch(es) ({live.dropped_finals:,} finals)"
    )
    if live.rejected:
        line += f" · rejected {live.rejected:,}"
    if live.gold_refreshed_ms is not None:
        line += f" · gold {_age(now, live.gold_refreshed_ms)} ago"
    return line


@click.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw snapshot as JSON.")
@click.option(
    "--timeout",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds to wait for the daemon to answer.",
)
@click.pass_context
def status_command(
    ctx: click.Context, config_path: str | None, as_json: bool, timeout: float
) -> None:
    """Print the running daemon's status once (exit 1 when it cannot be reached)."""
    cfg = load_config(config_path)
    try:
        snapshot = anyio.run(fetch_status, cfg.status_socket, timeout)
    except StatusError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(1)
    if as_json:
        click.echo(msgspec.json.format(encode_snapshot(snapshot), indent=2).decode())
    else:
        click.echo(render_status(snapshot))
