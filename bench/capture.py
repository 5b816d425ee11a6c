"""Benchmark: live capture of N pairs on both exchanges, as fast as the feed allows.

The feed comes from the simulator in replay mode (``klined sim --mode replay``: a fixed range of
minutes for N synthetic pairs on Binance and Kraken). The simulator computes its market as it
sends, which makes it slower than any client, so its frames are first recorded once (exactly as
sent: acks, snapshots, updates) and then served by a minimal WebSocket server, in its own
process, as fast as a client reads. Two workers consume that identical feed, each in a fresh
process:

* ``klined``: the real runtime (``ExchangeStreams``: sessions, the adapters' parsing, Kraken
  finality, status upkeep) appending every event to a real ``LakeWriter`` on local disk;
* ``bare``: a bare ``websockets`` receive loop (connect, the same subscribe messages, count
  frames): the floor any client pays for this feed.

Each worker reports its wall time to drain the feed (sealing, so compressing, every part
included), its own CPU time (``getrusage``; the server's process excluded) and its peak RSS;
``lake_bytes_per_event`` is what the sealed (gzip) lake stores per event.
``ratio = bare_seconds / klined_seconds`` (1.0: capture costs no more than receiving); the
bare loop runs before and after klined and the faster of the two counts. klined's time ends
once the writer is closed: every part of the run sealed (compressed), the whole lake at once,
where a daemon seals each hour's parts beside the capture; ``close_seconds`` is that final
close, and ``ratio_before_close`` the ratio up to the moment the last event was received.
Prints ONE JSON line.

The ``klined`` run starts from an empty lake, so it also creates the lake's whole folder tree
(``exchange=/symbol=/interval_minutes=/year=/month=/day=/hour=`` for every pair), a one-off
for a new lake that on a small VM's ext4 costs ~1.3 ms of kernel time per pair and exchange.
``klined_warm_lake`` (and ``ratio_warm_lake``) is the same capture run a second time on that
lake, as a running daemon finds it: the folders exist, every part file is new. Both are
reported; the headline ``ratio`` stays the cold one.

    .venv/bin/python bench/capture.py [--pairs 10,100,1000] [--minutes N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

EXCHANGES = ("binance", "kraken")
_URL = re.compile(r"^(binance|kraken)\s+ws (\S+)\s+rest (\S+)")


def _usage() -> tuple[float, int]:
    """(CPU seconds of this process, peak RSS bytes)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# workers (each runs in a fresh process, so peak RSS is its own)


async def _klined(
    urls: dict[str, tuple[str, str]], n: int, root: Path, lake: bool = True
) -> dict[str, Any]:
    """The runtime as ``klined run`` uses it; ``lake=False`` discards events instead (to
    tell the runtime's and the adapters' share from the lake writer's)."""
    import httpx

    from klined.config import LakeConfig
    from klined.daemon.process import tune_process
    from klined.exchanges import get_adapter
    from klined.lake import LakeWriter
    from klined.model import Candle, Pair
    from klined.rest.client import RestClient
    from klined.rest.ratelimit import RateLimiter
    from klined.sim import synthetic_pairs
    from klined.streams import ExchangeStreams, StreamSettings

    tune_process()
    pairs = [Pair.parse(p) for p in synthetic_pairs(n)]
    writer = LakeWriter(root, LakeConfig())
    discarded = 0

    def discard(candle: Candle) -> None:
        nonlocal discarded
        discarded += 1

    streams: list[ExchangeStreams] = []
    async with anyio.create_task_group() as tg, httpx.AsyncClient(timeout=30) as http:
        await tg.start(writer.run)
        for ex in EXCHANGES:
            adapter = get_adapter(ex)
            limits = adapter.limits
            settings = StreamSettings(
                stale_after_s=60.0,
                backoff_initial_s=30.0,
                backoff_max_s=60.0,
                subscribe_messages_per_s=limits.ws_messages_per_s,
            )
            sink = writer.append if lake else discard
            es = ExchangeStreams(adapter, urls[ex][0], pairs, settings, sink)
            if urls[ex][1]:  # a REST API to check the listing (before the clock starts)
                limiter = RateLimiter.for_limits(ex, limits.rest_budget, 1.0)
                es.fetch_listing = RestClient(adapter, urls[ex][1], limiter, http).fetch_listing
                await es.check_listing()
                es.fetch_listing = None
            streams.append(es)
        cpu0, _ = _usage()
        t0 = time.perf_counter()
        async with anyio.create_task_group() as inner:
            for es in streams:
                await inner.start(es.run)
            conns = [c for es in streams for c in es.connections]
            # the server closes each connection when its feed is done
            while not all(c.current is not None and c.current.ended.is_set() for c in conns):  # noqa: ASYNC110
                await anyio.sleep(0.01)
            inner.cancel_scope.cancel()
        drained = time.perf_counter()
        await writer.aclose()
        seconds = time.perf_counter() - t0
        close_s = time.perf_counter() - drained
        cpu1, rss = _usage()
        tg.cancel_scope.cancel()
    return {
        "seconds": seconds,
        "close_seconds": close_s,
        "cpu_s": cpu1 - cpu0,
        "peak_rss_bytes": rss,
        "events": writer.events_written if lake else discarded,
        "malformed": sum(c.status.malformed for c in conns),
        "reconnects": sum(c.status.reconnects for c in conns),
        "connections": len(conns),
    }


async def _bare(
    urls: dict[str, tuple[str, str]], n: int, record: dict[str, list[list[bytes]]] | None = None
) -> dict[str, Any]:
    """The bare receive loop; with ``record``, also keep every frame (the feed for later)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from klined.exchanges import get_adapter
    from klined.model import Pair
    from klined.sim import synthetic_pairs
    from klined.streams import chunk_pairs

    pairs = [Pair.parse(p) for p in synthetic_pairs(n)]
    frames = 0

    async def one(ex: str, chunk: list[Pair], kept: list[bytes] | None) -> None:
        nonlocal frames
        adapter = get_adapter(ex)
        rate = adapter.limits.ws_messages_per_s
        async with connect(adapter.ws_endpoint(urls[ex][0], []), max_size=2**24) as ws:
            for i, message in enumerate(adapter.subscribe_messages(chunk, 1)):
                if i and rate:
                    await anyio.sleep(1.25 / rate)
                await ws.send(message)
            try:
                while True:
                    data = await ws.recv(False)
                    frames += 1
                    if kept is not None:
                        kept.append(data)
            except ConnectionClosed:
                return

    cpu0, _ = _usage()
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for ex in EXCHANGES:
            size = get_adapter(ex).limits.streams_per_connection
            for chunk in chunk_pairs(pairs, size):
                kept: list[bytes] | None = None
                if record is not None:
                    kept = []
                    record.setdefault(ex, []).append(kept)
                tg.start_soon(one, ex, chunk, kept)
    seconds = time.perf_counter() - t0
    cpu1, rss = _usage()
    return {"seconds": seconds, "cpu_s": cpu1 - cpu0, "peak_rss_bytes": rss, "frames": frames}


async def _serve(feed: dict[str, list[list[bytes]]]) -> None:
    """Serve a recorded feed: the nth connection to an exchange gets its nth recording, sent
    after the client's first message, as fast as the client reads; then a clean close."""
    from websockets.asyncio.server import ServerConnection, serve

    served = {ex: 0 for ex in EXCHANGES}

    def handler_for(ex: str) -> Any:
        async def handler(ws: ServerConnection) -> None:
            index = served[ex] % len(feed[ex])
            served[ex] += 1
            await ws.recv()
            for frame in feed[ex][index]:
                await ws.send(frame.decode())
            await ws.close()

        return handler

    servers = [
        await serve(handler_for(ex), "127.0.0.1", 0, compression=None, max_size=2**24)
        for ex in EXCHANGES
    ]
    ports = {
        ex: srv.sockets[0].getsockname()[1] for ex, srv in zip(EXCHANGES, servers, strict=True)
    }
    print(json.dumps(ports), flush=True)
    await anyio.sleep_forever()


def worker_main(args: argparse.Namespace) -> None:
    if args.worker == "serve":
        anyio.run(_serve, msgspec.msgpack.decode(Path(args.feed).read_bytes()))
        return
    urls = json.loads(args.urls)
    if args.worker in ("klined", "klined-nolake", "klined-warm"):
        root = Path(tempfile.mkdtemp(prefix="klined-bench-lake-"))
        try:
            lake = args.worker != "klined-nolake"
            if args.worker == "klined-warm":  # a first capture lays out the lake's folders
                anyio.run(_klined, urls, args.n, root, lake)
                first = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            else:
                first = 0
            result = anyio.run(_klined, urls, args.n, root, lake)
            files = [p for p in root.rglob("*") if p.is_file()]
            result["lake_bytes"] = sum(p.stat().st_size for p in files) - first
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        record: dict[str, list[list[bytes]]] | None = {} if args.feed else None
        result = anyio.run(_bare, urls, args.n, record)
        if record is not None:
            Path(args.feed).write_bytes(msgspec.msgpack.encode(record))
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# driver


def start_sim(n: int, minutes: int) -> tuple[subprocess.Popen[str], dict[str, tuple[str, str]]]:
    from klined.model import MINUTE_MS, floor_hour, iso

    # minutes of the current hour (UTC): the writer keeps the hour's parts open, as it does for
    # live capture, instead of sealing a past hour's parts at every flush
    start = floor_hour(int(time.time() * 1000))
    to = iso(start + minutes * MINUTE_MS)
    cmd = [
        sys.executable, "-m", "klined.cli", "sim", "--pairs", str(n), "--mode", "replay",
        "--from", iso(start), "--to", to, "--replay-end", "close", "--binance-port", "0",
        "--kraken-port", "0", "--rate-limit-scale", "100",
    ]  # fmt: skip
    env = {**os.environ, "KLINED_SIM_QUIET": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    urls: dict[str, tuple[str, str]] = {}
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while len(urls) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = _URL.match(line.strip())
        if m:
            urls[m[1]] = (m[2], m[3])
    if len(urls) < 2:
        proc.kill()
        raise RuntimeError("the simulator did not start")
    return proc, urls


def _worker_cmd(kind: str, *extra: str) -> tuple[list[str], dict[str, str]]:
    here = Path(__file__).resolve()
    env = {**os.environ, "PYTHONPATH": str(here.parent.parent)}
    return [sys.executable, str(here), "--worker", kind, *extra], env


def run_worker(kind: str, n: int, urls: dict[str, Any], feed: str = "") -> dict[str, Any]:
    cmd, env = _worker_cmd(kind, "--n", str(n), "--urls", json.dumps(urls), "--feed", feed)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def start_server(feed: Path) -> tuple[subprocess.Popen[str], dict[str, tuple[str, str]]]:
    cmd, env = _worker_cmd("serve", "--feed", str(feed))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    ports = json.loads(proc.stdout.readline())
    urls = {
        "binance": (f"ws://127.0.0.1:{ports['binance']}", ""),
        "kraken": (f"ws://127.0.0.1:{ports['kraken']}/v2", ""),
    }
    return proc, urls


def _figures(run: dict[str, Any], events: int) -> dict[str, Any]:
    out = {
        "events_per_s": round(events / run["seconds"]),
        "cpu_s_per_1m_events": round(run["cpu_s"] / events * 1e6, 2),
        "peak_rss_mb": round(run["peak_rss_bytes"] / 2**20, 1),
        "seconds": round(run["seconds"], 3),
    }
    if "close_seconds" in run:
        out["close_seconds"] = round(run["close_seconds"], 3)
    return out


def bench(n: int, minutes: int, workdir: Path) -> dict[str, Any]:
    feed = workdir / f"feed-{n}.msgpack"
    sim, sim_urls = start_sim(n, minutes)
    try:
        recording = run_worker("bare", n, sim_urls, str(feed))
    finally:
        sim.terminate()
        sim.wait(10)
    server, urls = start_server(feed)
    try:
        bare = run_worker("bare", n, urls)
        klined = run_worker("klined", n, urls)
        nolake = run_worker("klined-nolake", n, urls)
        warm = run_worker("klined-warm", n, urls)
        bare2 = run_worker("bare", n, urls)
    finally:
        server.terminate()
        server.wait(10)
    floor = min(bare, bare2, key=lambda r: r["seconds"])
    events = klined["events"]  # lake lines: every feed event plus Kraken's proven finals
    return {
        "pairs": n,
        "minutes": minutes,
        "events": events,
        "frames": floor["frames"],
        "simulator_events_per_s": round(events / recording["seconds"]),
        "klined": {
            **_figures(klined, events),
            "connections": klined["connections"],
            "reconnects": klined["reconnects"],
            "malformed": klined["malformed"],
            "lake_bytes": klined["lake_bytes"],
            "lake_bytes_per_event": round(klined["lake_bytes"] / events, 1),
        },
        "klined_warm_lake": _figures(warm, events),
        "klined_without_lake": _figures(nolake, events),
        "bare": _figures(floor, events),
        "ratio": round(floor["seconds"] / klined["seconds"], 3),
        "ratio_warm_lake": round(floor["seconds"] / warm["seconds"], 3),
        # without the writer's final close (sealing every part the run opened: the whole
        # lake at once, which a daemon does hour by hour beside the capture)
        "ratio_before_close": round(
            floor["seconds"] / (klined["seconds"] - klined["close_seconds"]), 3
        ),
        "ratio_without_lake": round(floor["seconds"] / nolake["seconds"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="10,100,1000", help="comma-separated pair counts")
    parser.add_argument(
        "--minutes", type=int, default=0, help="minutes to replay (default: ~30k pair-minutes)"
    )
    parser.add_argument(
        "--worker",
        choices=["klined", "klined-nolake", "klined-warm", "bare", "serve"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--feed", default="", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--urls", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    counts = [int(n) for n in args.pairs.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="klined-bench-") as tmp:
        runs = [bench(n, args.minutes or max(30, 30_000 // n), Path(tmp)) for n in counts]
    goals = {
        "lake_bytes_per_event_at_most_100": all(
            r["klined"]["lake_bytes_per_event"] <= 100 for r in runs
        ),
        "ratio_at_least_0_5": all(r["ratio"] >= 0.5 for r in runs),
        "ratio_warm_lake_at_least_0_5": all(r["ratio_warm_lake"] >= 0.5 for r in runs),
        "rss_under_200mb_at_1000": all(
            r["klined"]["peak_rss_mb"] < 200 for r in runs if r["pairs"] >= 1000
        ),
    }
    print(json.dumps({"bench": "capture", "runs": runs, "goals": goals}))


if __name__ == "__main__":
    main()
