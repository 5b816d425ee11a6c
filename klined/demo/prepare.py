"""What a demo run is made of: its working directory, its ``klined.toml``, the simulator's
market and fault plan, the S3 bucket, and the seeded hours.

Everything here is plain set-up (no daemon, no database); :mod:`klined.demo.run` puts it
together.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from loguru import logger

from klined.config import S3Config
from klined.errors import KlinedError, UsageError
from klined.model import HOUR_MS, floor_hour
from klined.sim import DEFAULT_PAIRS, FaultPlan, FaultRule, SimConfig, Simulator, synthetic_pairs

#: First line of every config the demo writes; a ``klined.toml`` without it is the user's.
MARKER = "# written by `klined demo`"
CONFIG_NAME = "klined.toml"
#: Hours before the current one seeded by a backfill (and run through the chain) at start.
SEED_HOURS = 3
#: The simulator's REST budgets are this many times the real ones, and the seeding backfill's
#: limiter is scaled to match: seeding takes seconds. The daemon keeps the real limits, which
#: the scaled simulator never refuses.
SIM_RATE_SCALE = 20.0
#: Stream watchdog for the demo: short, so the injected stall is noticed within the run.
STALE_AFTER_S = 15.0
#: AF_UNIX paths are limited to 108 bytes on Linux (including the terminating NUL).
MAX_SOCKET_PATH = 100


class DemoError(KlinedError):
    """A demo step failed; the message names the step."""


@dataclass(frozen=True, slots=True)
class S3Target:
    bucket: str
    endpoint_url: str = ""
    region: str = "us-east-1"

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}{where}"


@dataclass(slots=True)
class DemoOptions:
    """The command line, validated."""

    dir: str | None = None
    headless: bool = False
    duration_s: float = 60.0
    pairs: int = len(DEFAULT_PAIRS)
    s3: S3Target | None = None
    seed: int = 1
    seed_hours: int = SEED_HOURS
    log_level: str = "INFO"
    pair_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pair_names:
            self.pair_names = demo_pairs(self.pairs)


def demo_pairs(n: int) -> list[str]:
    """The first ``n`` of the shipped pairs, then synthetic ``P0001/USD``... beyond them."""
    if n < 1:
        raise UsageError("--pairs must be at least 1")
    names = list(DEFAULT_PAIRS[:n])
    if n > len(names):
        names += synthetic_pairs(n - len(names))
    return names


def seeded_hours(now_ms: int, hours: int) -> list[int]:
    """The ``hours`` closed hours just before the current one, oldest first."""
    current = floor_hour(now_ms)
    return [current - (hours - i) * HOUR_MS for i in range(hours)]


# ---------------------------------------------------------------------------------------------
# the working directory


def prepare_dir(path: str | None) -> tuple[Path, bool]:
    """The demo's directory (created when missing) and whether it is a new temporary one.

    A ``klined.toml`` already in a given directory must be one the demo wrote: it is
    rewritten on every run (the simulator's ports change), and a user's config is never
    overwritten.
    """
    if path is None:
        return Path(tempfile.mkdtemp(prefix="klined-demo-")).resolve(), True
    d = Path(path).expanduser().resolve()
    if d.exists() and not d.is_dir():
        raise UsageError(f"--dir {d} exists and is not a directory")
    config = d / CONFIG_NAME
    if config.exists():
        try:
            first = config.read_text(encoding="utf-8").splitlines()[:1]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {config}: {exc}") from None
        if first != [MARKER]:
            raise UsageError(
                f"{config} exists and was not written by `klined demo`; "
                "choose another --dir (the demo never overwrites your own config)"
            )
    socket = d / "klined.sock"
    if len(str(socket).encode()) > MAX_SOCKET_PATH:
        raise UsageError(
            f"--dir {d} is too long for the daemon's Unix socket ({socket}); choose a shorter path"
        )
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot create --dir {d}: {exc}") from None
    return d, False


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escaping is valid TOML for these values)."""
    return json.dumps(value)


def config_text(workdir: Path, sim: Simulator, options: DemoOptions) -> str:
    """A real ``klined.toml`` for the demo: the simulator's URLs, the embedded PostgreSQL and
    the lake under ``workdir``, S3 when given. ``klined status/tui/chain/backfill -c`` work
    with it while the demo runs."""
    path = workdir / CONFIG_NAME
    pairs = "[" + ", ".join(_toml_str(p) for p in options.pair_names) + "]"
    lines = [
        MARKER,
        "# (rewritten on every run: the simulator listens on new free ports each time).",
        "# While the demo runs, from another terminal:",
        f"#   klined status -c {path}",
        f"#   klined tui -c {path}",
        f"#   klined tail -c {path}",
        f"#   klined chain -c {path} --hour <ISO hour>",
        "",
        "[daemon]",
        f"data_dir = {_toml_str(str(workdir))}",
        f"log_level = {_toml_str(options.log_level)}",
        "shutdown_timeout_s = 20.0",
        "",
        "[database]",
        "# empty: the embedded PostgreSQL under data_dir/pgdata",
        'dsn = ""',
        "",
        "[lake]",
        "# small and frequent, so parts are sealed and uploaded while you watch",
        "part_max_age_s = 120.0",
        "upload_interval_s = 10.0",
        "",
        "[s3]",
    ]
    if options.s3 is not None:
        lines += [
            f"bucket = {_toml_str(options.s3.bucket)}",
            f"endpoint_url = {_toml_str(options.s3.endpoint_url)}",
            f"region = {_toml_str(options.s3.region)}",
        ]
    else:
        lines.append('bucket = ""  # local lake only')
    lines += [
        "",
        "[live]",
        "# gold follows the live finals every 10 s (default 30 s), so it fills while you watch",
        "gold_interval_s = 10.0",
        "",
        "[chain]",
        "# the demo seeds the last hours itself; older hours stay empty",
        f"catchup_hours = {options.seed_hours}",
        f"rest_retry_hours = {options.seed_hours}",
        "",
    ]
    for exchange in ("binance", "kraken"):
        ws_url, rest_url = sim.urls(exchange)
        lines += [
            f"[exchanges.{exchange}]",
            f"ws_url = {_toml_str(ws_url)}",
            f"rest_url = {_toml_str(rest_url)}",
            *(
                [f"archive_url = {_toml_str(sim.binance_archive_url)}"]
                if exchange == "binance"
                else []
            ),
            f"pairs = {pairs}",
            f"stale_after_s = {STALE_AFTER_S}",
            "connect_timeout_s = 5.0",
            "backoff_initial_s = 0.5",
            "backoff_max_s = 10.0",
            "rest_timeout_s = 5.0",
            "",
        ]
    return "\n".join(lines)


def write_config(workdir: Path, sim: Simulator, options: DemoOptions) -> Path:
    path = workdir / CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_text(workdir, sim, options), encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# the simulator


def fault_plan(seed: int) -> FaultPlan:
    """A moderate fault rate: what klined survives every day, compressed into minutes.

    One early disconnect per exchange (so even a short run shows a reconnect), rare random
    ones mid-minute after that, malformed frames (skipped and counted), duplicates and
    out-of-order updates, one silent stall long enough for the staleness watchdog, and an
    occasional REST 429 with Retry-After.
    """
    stall_s = STALE_AFTER_S + 5.0
    return FaultPlan(
        seed=seed,
        rules=[
            FaultRule(kind="disconnect", exchange="binance", connection=1, message=20),
            FaultRule(kind="close", exchange="kraken", connection=1, message=30),
            FaultRule(
                kind="stall", exchange="binance", connection=2, message=10, duration_s=stall_s
            ),
            FaultRule(kind="disconnect", probability=0.003, times=0, min_second=20),
            FaultRule(kind="malformed", probability=0.02, times=0, variant="garbage"),
            FaultRule(kind="malformed", probability=0.01, times=0, variant="truncated"),
            FaultRule(kind="duplicate", probability=0.02, times=0),
            FaultRule(kind="out_of_order", probability=0.005, times=0),
            FaultRule(kind="http_429", probability=0.03, times=0, retry_after_s=1),
        ],
    )


def sim_config(options: DemoOptions) -> SimConfig:
    """Real time, free loopback ports, scaled REST budgets, no sent-event log (the demo may
    run for hours; the log is for tests)."""
    return SimConfig(
        seed=options.seed,
        pairs=options.pair_names,
        faults=fault_plan(options.seed),
        rate_limit_scale=SIM_RATE_SCALE,
        binance_port=0,
        kraken_port=0,
        log_events=False,
    )


# ---------------------------------------------------------------------------------------------
# S3


def placeholder_credentials(target: S3Target) -> bool:
    """A local S3 endpoint (moto, MinIO) still needs *some* credentials to sign requests.

    When none are configured at all (no environment variables, profile or credentials file),
    set placeholders for this process; a real endpoint then refuses them plainly.
    """
    if not target.endpoint_url:
        return False
    env = os.environ
    has = (
        env.get("AWS_ACCESS_KEY_ID")
        or env.get("AWS_PROFILE")
        or env.get("AWS_SHARED_CREDENTIALS_FILE")
        or env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
        or Path("~/.aws/credentials").expanduser().exists()
        or Path("~/.aws/config").expanduser().exists()
    )
    if has:
        return False
    env["AWS_ACCESS_KEY_ID"] = "klined-demo"
    env["AWS_SECRET_ACCESS_KEY"] = "klined-demo"
    return True


async def ensure_bucket(target: S3Target, *, timeout_s: float = 20.0) -> bool:
    """Check the bucket; create it when missing on an explicit endpoint. True if created.

    On AWS itself (no endpoint) the demo never creates buckets: a missing one is an error.
    """
    from klined.lake import LakeStore
    from klined.lake.s3 import describe, is_not_found

    store = LakeStore(
        "/nonexistent",
        S3Config(bucket=target.bucket, endpoint_url=target.endpoint_url, region=target.region),
        op_timeout_s=timeout_s,
        connect_timeout_s=5.0,
        read_timeout_s=10.0,
    )
    try:
        with anyio.fail_after(timeout_s):
            async with store.client() as s3:
                try:
                    await s3.head_bucket(Bucket=target.bucket)
                    return False
                except Exception as exc:
                    if not is_not_found(exc) or not target.endpoint_url:
                        raise
                kwargs: dict[str, object] = {"Bucket": target.bucket}
                if target.region and target.region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": target.region}
                await s3.create_bucket(**kwargs)
                logger.info("created bucket {}", target.describe())
                return True
    except anyio.get_cancelled_exc_class():
        raise
    except TimeoutError:
        raise DemoError(f"S3 {target.describe()} did not answer within {timeout_s:.0f} s") from None
    except Exception as exc:
        hint = "" if target.endpoint_url else " (the demo creates buckets only on --s3-endpoint)"
        raise DemoError(f"S3 {target.describe()} is not usable: {describe(exc)}{hint}") from exc
