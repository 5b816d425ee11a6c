"""Strict ``klined.toml`` loading.

Unknown keys, wrong types and bad values are refused with the file, the dotted key and, where
one is close, a "did you mean" suggestion. The CLI turns :class:`ConfigError` into exit code 2.

Decisions worth knowing:

* Every section and key is optional; the defaults run klined against the real exchanges
  with an embedded PostgreSQL and a local-only lake under ``daemon.data_dir``.
* ``KLINED_DSN`` in the environment overrides ``database.dsn``; S3 credentials never come
  from the TOML, only from the standard AWS chain (environment, profile, instance role).
* Relative paths are resolved against the directory of the config file, so a config works
  the same from any working directory.
* Every number has a finite range (``msgspec.Meta`` on its type, so the range is declared next
  to the key and a test walks them all): NaN, infinities and values outside the range are
  refused with the range in the message. A value that passes cannot make the daemon fail
  later (a pool of 10^8 connections, a catch-up of 10^10 hours).
* ``chain.schedule`` is parsed as cron here, not when the scheduler first needs it.
* Native symbol overrides may only use the characters the exchange itself uses in its names,
  case kept (Kraken's tokenized stocks are ``AAPLx/USD``); canonical pairs are upper-case.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
from cronsim import CronSim, CronSimError

from klined.errors import ConfigError
from klined.model import EXCHANGES, Pair, parse_shard, shard_of

DEFAULT_PAIRS = [
    "ETH/USD", "SOL/USD", "BTC/USD", "LINK/USD", "APE/USD", "DOT/USD", "PEPE/USD", "TRUMP/USD",
    "PUMP/USD", "JUP/USD", "PENGU/USD", "REKT/USD", "FARTCOIN/USD", "WIF/USD", "KSM/USD",
]  # fmt: skip

DEFAULT_URLS = {
    "binance": ("wss://stream.binance.us:9443", "https://api.binance.us"),
    "kraken": ("wss://ws.kraken.com/v2", "https://api.kraken.com"),
}

#: Binance US's public history files (documented at binance.us/institutions/market-history):
#: ``<url>/spot/daily/klines/BTCUSD/1m/BTCUSD-1m-2026-01-15.zip`` and ``.../monthly/...``.
BINANCE_ARCHIVE_URL = "https://data.binance.us/public_data"


#: the largest byte sizes and durations any key accepts
GIB = 1024**3
MIB = 1024**2
DAY_S = 86_400.0


def _span(lo: float, hi: float) -> msgspec.Meta:
    return msgspec.Meta(ge=lo, le=hi)


# Numeric key types with their accepted (inclusive) range. Every numeric key of the config uses
# one of these; ``tests/test_config.py`` fails on a numeric key without both bounds.
Port = Annotated[int, _span(0, 65535)]
Seconds = Annotated[float, _span(0.01, DAY_S)]
ShortSeconds = Annotated[float, _span(0.01, 600.0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonConfig(_Section):
    data_dir: str = "~/.local/share/klined"
    status_socket: str = ""  # default: <data_dir>/klined.sock ($RUNTIME_DIRECTORY under systemd)
    status_socket_group: str = ""  # members may read the status socket (0660); "" = owner only
    log_level: str = "INFO"
    log_json: bool = False
    metrics_port: Port = 0  # 0 disables the Prometheus endpoint (always bound to loopback)
    shutdown_timeout_s: Annotated[float, _span(0.1, 3600.0)] = 20.0
    # beyond one machine: what this host does, and its share of the pairs when capturing
    role: str = "all"  # all | capture | chain
    shard: str = "1/1"  # "k/n": this host streams the pairs of shard k of n


#: what a daemon can be (``daemon.role``, ``klined run --role``)
ROLES = ("all", "capture", "chain")


class DatabaseConfig(_Section):
    dsn: str = ""  # empty: embedded PostgreSQL under <data_dir>/pgdata
    pool_size: Annotated[int, _span(1, 64)] = 4
    partitions_ahead_hours: Annotated[int, _span(1, 24 * 31)] = 48
    bronze_retention_days: Annotated[int, _span(1, 3650)] = 14
    readonly_role: str = "klined_looker"
    statement_timeout_s: Annotated[float, _span(1.0, DAY_S)] = 300.0
    reader_role: str = "klined_reader"  # SELECT on silver, gold and monitoring; "" = none


class LakeConfig(_Section):
    root: str = ""  # default: <data_dir>/lake
    flush_interval_s: Annotated[float, _span(0.01, 60.0)] = 1.0
    part_max_bytes: Annotated[int, _span(4096, 4 * GIB)] = 64 * MIB
    part_max_age_s: Annotated[float, _span(1.0, DAY_S)] = 900.0
    hour_grace_s: Annotated[float, _span(0.0, 3600.0)] = 120.0
    retention_hours: Annotated[float, _span(0.0, 24.0 * 3650)] = 72.0
    upload_interval_s: Seconds = 30.0
    #: bytes of events kept in memory while the disk refuses them; past it new events are
    #: dropped and recorded as a stream incident for the chain's gap-fill to repair
    max_held_bytes: Annotated[int, _span(1 * MIB, 64 * GIB)] = 256 * MIB
    #: how often parts still on disk are compared with their S3 copies (0: never)
    verify_interval_s: Annotated[float, _span(0.0, 30 * DAY_S)] = 6 * 3600.0
    #: gzip level of sealed parts: 1 fastest .. 9 smallest
    compress_level: Annotated[int, _span(1, 9)] = 1


class S3Config(_Section):
    bucket: str = ""  # empty: the lake is local only
    prefix: str = ""
    endpoint_url: str = ""
    region: str = "us-east-1"


class ChainConfig(_Section):
    enabled: bool = True
    schedule: str = "5 * * * *"  # cron, UTC
    catchup_hours: Annotated[int, _span(0, 24 * 366)] = 48
    #: keep trying to fill missing minutes this long after the hour
    rest_retry_hours: Annotated[int, _span(0, 24 * 31)] = 12


class PublishConfig(_Section):
    enabled: bool = True  # after each chain run, write changed days as Parquet datasets
    intervals: list[str] = msgspec.field(
        default_factory=lambda: ["1m", "5m", "15m", "30m", "1h", "4h", "1d"]
    )


class LiveConfig(_Section):
    """The live path (``klined.live``): proven-final candles into silver within seconds."""

    enabled: bool = True  # needs the chain's database: off when [chain] enabled = false
    #: a final waits at most this long before its batch is cut
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 1.0
    #: batches held while PostgreSQL is slow or down; then the oldest are dropped
    queue_batches: Annotated[int, _span(1, 100_000)] = 120
    #: candles per transaction when catching up
    batch_max_candles: Annotated[int, _span(1, 100_000)] = 5000
    #: touched gold buckets are refreshed this often (gold follows silver at least once a minute)
    gold_interval_s: Annotated[float, _span(1.0, 60.0)] = 30.0
    #: lag p50/p99 are over the commits of this last span
    lag_window_s: Annotated[float, _span(10.0, DAY_S)] = 300.0


class SymbolOverride(_Section):
    native: str = ""  # the exchange's own name, e.g. "1000REKTUSD"
    rest_native: str = ""  # Kraken REST name when it differs from the guess, e.g. "XBTUSD"
    #: native unit = multiplier x base unit (price / multiplier, volume x it)
    multiplier: Annotated[int, _span(1, 10**9)] = 1


class ExchangeConfig(_Section):
    enabled: bool = True
    ws_url: str = ""
    rest_url: str = ""
    pairs: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_PAIRS))
    symbols: dict[str, SymbolOverride] = msgspec.field(default_factory=dict)
    stale_after_s: Annotated[float, _span(0.1, 3600.0)] = 30.0
    connect_timeout_s: ShortSeconds = 10.0
    ping_interval_s: Annotated[float, _span(0.1, 3600.0)] = 20.0
    #: 0: the exchange's own lifetime minus a margin
    max_connection_age_s: Annotated[float, _span(0.0, 7 * DAY_S)] = 0.0
    backoff_initial_s: Annotated[float, _span(0.01, 3600.0)] = 1.0
    backoff_max_s: Annotated[float, _span(0.01, DAY_S)] = 60.0
    rest_timeout_s: ShortSeconds = 10.0
    #: share of the documented REST budget klined may use
    rate_limit_fraction: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.8


class BinanceConfig(ExchangeConfig):
    """Binance US: the common keys plus where its published history files are."""

    archive_url: str = BINANCE_ARCHIVE_URL  # http(s):// or file:// (a local mirror)
    archive_downloads: Annotated[int, _span(1, 32)] = 4  # archive files downloaded at once


class KrakenConfig(ExchangeConfig):
    """Kraken: the common keys plus the folder of its OHLCVT downloads (they come by hand)."""

    archive_dir: str = ""  # zips or extracted CSVs; "" = none


class ExchangesConfig(_Section):
    binance: BinanceConfig = msgspec.field(default_factory=BinanceConfig)
    kraken: KrakenConfig = msgspec.field(default_factory=KrakenConfig)

    def enabled(self) -> dict[str, ExchangeConfig]:
        return {name: getattr(self, name) for name in EXCHANGES if getattr(self, name).enabled}


class Config(_Section):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    lake: LakeConfig = msgspec.field(default_factory=LakeConfig)
    s3: S3Config = msgspec.field(default_factory=S3Config)
    chain: ChainConfig = msgspec.field(default_factory=ChainConfig)
    live: LiveConfig = msgspec.field(default_factory=LiveConfig)
    exchanges: ExchangesConfig = msgspec.field(default_factory=ExchangesConfig)
    publish: PublishConfig = msgspec.field(default_factory=PublishConfig)
    #: where the config came from ("" for built-in defaults); not a TOML key
    source_path: str = ""

    # -- resolved paths ------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return Path(self.daemon.data_dir).expanduser()

    @property
    def lake_root(self) -> Path:
        return Path(self.lake.root).expanduser() if self.lake.root else self.data_dir / "lake"

    @property
    def status_socket(self) -> Path:
        if self.daemon.status_socket:
            return Path(self.daemon.status_socket).expanduser()
        runtime = os.environ.get("RUNTIME_DIRECTORY")
        if runtime:
            return Path(runtime.split(":")[0]) / "klined.sock"
        return self.data_dir / "klined.sock"

    @property
    def dsn(self) -> str:
        return os.environ.get("KLINED_DSN") or self.database.dsn

    def pairs(self, exchange: str) -> list[Pair]:
        """Every configured pair of the exchange (what completeness and gap-fill cover)."""
        return [Pair.parse(p) for p in getattr(self.exchanges, exchange).pairs]

    @property
    def shard(self) -> tuple[int, int]:
        """``(k, n)`` of ``daemon.shard`` (validated at load)."""
        return parse_shard(self.daemon.shard)

    def capture_pairs(self, exchange: str) -> list[Pair]:
        """The configured pairs this host streams: its shard's share (all of them at 1/1)."""
        k, n = self.shard
        return [p for p in self.pairs(exchange) if shard_of(exchange, p, n) == k]

    @property
    def captures(self) -> bool:
        """Whether this host runs streams (role ``all`` or ``capture``)."""
        return self.daemon.role in ("all", "capture")

    @property
    def chains(self) -> bool:
        """Whether this host runs the hourly chain (role ``all`` or ``chain``, and enabled)."""
        return self.daemon.role in ("all", "chain") and self.chain.enabled

    def ws_url(self, exchange: str) -> str:
        return getattr(self.exchanges, exchange).ws_url or DEFAULT_URLS[exchange][0]

    def rest_url(self, exchange: str) -> str:
        return getattr(self.exchanges, exchange).rest_url or DEFAULT_URLS[exchange][1]

    @property
    def archive_url(self) -> str:
        """Binance's archive base URL, without a trailing slash."""
        return (self.exchanges.binance.archive_url or BINANCE_ARCHIVE_URL).rstrip("/")

    @property
    def kraken_archive_dir(self) -> Path | None:
        folder = self.exchanges.kraken.archive_dir
        return Path(folder).expanduser() if folder else None


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (in the user part or a ``password`` query parameter), for
    logs, errors and ``klined config`` / ``klined sql --dsn``."""
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except ValueError:
        return "<unparseable dsn>"
    if password:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    if parts.query:
        query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, True)]
        parts = parts._replace(query=urlencode(query, safe="*/"))
    return urlunsplit(parts)


def dsn_origin(cfg: Config) -> str:
    """Where the DSN klined uses comes from: ``KLINED_DSN``, the TOML, or nowhere (embedded)."""
    if os.environ.get("KLINED_DSN"):
        return "KLINED_DSN (environment)"
    if cfg.database.dsn:
        return f"database.dsn in {cfg.source_path or 'the configuration'}"
    return f"none: the embedded PostgreSQL under {cfg.data_dir / 'pgdata'}"


# ---------------------------------------------------------------------------------------------

_UNKNOWN_RE = re.compile(
    r"Object contains unknown field `(?P<field>[^`]+)`(?: - at `(?P<path>[^`]+)`)?"
)
_AT_RE = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>[^`]+)`)?$", re.S)


def _dotted(path: str) -> str:
    """msgspec's ``$.a.b[0]`` as a TOML reader would write it: ``a.b[0]``."""
    return path.removeprefix("$").removeprefix(".")


def _struct_at(path: str, root: type[msgspec.Struct]) -> type[msgspec.Struct] | None:
    """The struct type at a msgspec path, to suggest its field names."""
    typ: Any = root
    if path in ("$", ""):
        return root
    for part in [p for p in _dotted(path).split(".") if p]:
        name = part.split("[")[0]
        fields = {f.name: f.type for f in msgspec.structs.fields(typ)}
        if name not in fields:
            return None
        typ = fields[name]
        if "[" in part:
            args = getattr(typ, "__args__", ())
            typ = args[-1] if args else None
        if typ is None:
            return None
    return typ if isinstance(typ, type) and issubclass(typ, msgspec.Struct) else None


def _suggest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if match:
        return f"did you mean '{match[0]}'?"
    return "known keys: " + ", ".join(sorted(options))


def _field_names(typ: type[msgspec.Struct]) -> list[str]:
    return [f.name for f in msgspec.structs.fields(typ) if f.name != "source_path"]


def _numeric_meta(path: str, root: type[msgspec.Struct]) -> msgspec.inspect.Type | None:
    """The declared numeric type (with its bounds) of the key at a msgspec path, if numeric."""
    parts = [p for p in _dotted(path).split(".") if p]
    if not parts:
        return None
    parent = _struct_at("$." + ".".join(parts[:-1]), root) if len(parts) > 1 else root
    if parent is None:
        return None
    name = parts[-1].split("[")[0]
    info = msgspec.inspect.type_info(parent)
    assert isinstance(info, msgspec.inspect.StructType)
    for f in info.fields:
        if f.name == name and isinstance(
            f.type, msgspec.inspect.IntType | msgspec.inspect.FloatType
        ):
            return f.type
    return None


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def describe_range(info: msgspec.inspect.Type) -> str:
    """``a number from 0.01 to 60`` for a bounded key (what ``klined config`` says)."""
    assert isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType)
    kind = "a whole number" if isinstance(info, msgspec.inspect.IntType) else "a number"
    hi = info.le if info.le is not None else info.lt
    assert hi is not None
    if info.gt is not None:
        return f"{kind} greater than {_num(info.gt)} and at most {_num(hi)}"
    assert info.ge is not None
    return f"{kind} from {_num(info.ge)} to {_num(hi)}"


def _value_at(data: Any, path: str) -> Any:
    value = data
    for part in [p for p in _dotted(path).split(".") if p]:
        if not isinstance(value, dict):
            return None
        value = value.get(part.split("[")[0])
    return value


def _raise_validation(
    exc: msgspec.ValidationError,
    path: str,
    prefix: str = "",
    root: type[msgspec.Struct] = Config,
    data: Any = None,
) -> None:
    """Re-raise msgspec's error as a ConfigError; ``prefix`` names a dict entry's key."""
    text = str(exc)
    unknown = _UNKNOWN_RE.search(text)
    if unknown:
        field, at = unknown["field"], unknown["path"] or "$"
        struct = _struct_at(at, root)
        key = ".".join(p for p in (prefix, _dotted(at), field) if p)
        hint = _suggest(field, _field_names(struct)) if struct else ""
        raise ConfigError("unknown key", path=path, key=key, hint=hint) from None
    m = _AT_RE.match(text)
    msg = m["msg"] if m else text
    at = m["path"] if m and m["path"] else ""
    key = ".".join(p for p in (prefix, _dotted(at)) if p)
    numeric = _numeric_meta(at, root) if at else None
    if numeric is not None:
        value = _value_at(data, at)
        got = f"got {value!r}" if isinstance(value, int | float | str) else msg.replace("`", "'")
        raise ConfigError(f"must be {describe_range(numeric)} ({got})", path=path, key=key)
    raise ConfigError(msg.replace("`", "'"), path=path, key=key) from None


#: Characters each exchange uses in its own symbol names (case kept: Kraken's tokenized
#: stocks are ``AAPLx/USD``, REST ``AAPLxUSD``). Binance: ``BTCUSD``, ``1000SATSUSDT``.
NATIVE_PATTERNS: dict[str, tuple[re.Pattern[str], re.Pattern[str]]] = {
    "binance": (re.compile(r"^[A-Z0-9_.-]{1,20}$"), re.compile(r"^[A-Z0-9_.-]{1,20}$")),
    "kraken": (
        re.compile(r"^[A-Za-z0-9.]{1,16}/[A-Za-z0-9.]{1,16}$"),
        re.compile(r"^[A-Za-z0-9.]{1,32}$"),
    ),
}
_NATIVE_EXAMPLES = {"binance": ("BTCUSD", "BTCUSD"), "kraken": ("BTC/USD", "XBTUSD")}


def check_schedule(schedule: str) -> str | None:
    """Why ``schedule`` is not a usable 5-field cron expression (UTC), or None."""
    if len(schedule.split()) != 5:
        return f"{schedule!r} is not a 5-field cron expression"
    try:
        next(CronSim(schedule, datetime(2000, 1, 1, tzinfo=UTC)))
    except (CronSimError, StopIteration, ValueError) as exc:
        return f"{schedule!r} is not a valid cron expression ({exc})"
    return None


def _validate(cfg: Config, path: str) -> None:
    """Rules that span keys or need more than a range (ranges are on the types)."""

    def bad(key: str, message: str, hint: str = "") -> ConfigError:
        return ConfigError(message, path=path, key=key, hint=hint)

    if cfg.daemon.log_level.upper() not in (
        "TRACE",
        "DEBUG",
        "INFO",
        "SUCCESS",
        "WARNING",
        "ERROR",
    ):
        raise bad(
            "daemon.log_level", f"unknown level {cfg.daemon.log_level!r}", "use INFO or DEBUG"
        )
    known = ("1m", "5m", "15m", "30m", "1h", "4h", "1d")
    for i, interval in enumerate(cfg.publish.intervals):
        if interval not in known:
            raise bad(
                f"publish.intervals[{i}]",
                f"unknown interval {interval!r}",
                _suggest(interval, list(known)),
            )
        if interval in cfg.publish.intervals[:i]:
            raise bad(f"publish.intervals[{i}]", f"{interval} is listed twice")
    problem = check_schedule(cfg.chain.schedule)
    if problem is not None:
        raise bad("chain.schedule", problem, "e.g. '5 * * * *' for five past every hour")
    if cfg.daemon.role not in ROLES:
        raise bad(
            "daemon.role",
            f"unknown role {cfg.daemon.role!r}",
            _suggest(cfg.daemon.role, list(ROLES)).replace("keys", "roles"),
        )
    try:
        parse_shard(cfg.daemon.shard)
    except ValueError as exc:
        raise bad("daemon.shard", str(exc), "e.g. '1/2' on the first of two hosts") from None
    if cfg.database.dsn and not cfg.database.dsn.startswith(("postgres://", "postgresql://")):
        raise bad("database.dsn", "must be a postgresql:// URL", "or leave it empty for embedded")
    if cfg.s3.endpoint_url and not cfg.s3.endpoint_url.startswith(("http://", "https://")):
        raise bad("s3.endpoint_url", "must be an http(s):// URL")
    if cfg.s3.prefix.startswith("/") or cfg.s3.prefix.endswith("/"):
        raise bad(
            "s3.prefix", "must not start or end with '/'", f"use {cfg.s3.prefix.strip('/')!r}"
        )
    for name in EXCHANGES:
        ex: ExchangeConfig = getattr(cfg.exchanges, name)
        base = f"exchanges.{name}"
        for key, url, schemes in (
            ("ws_url", ex.ws_url, ("ws://", "wss://")),
            ("rest_url", ex.rest_url, ("http://", "https://")),
        ):
            if url and not url.startswith(schemes):
                raise bad(f"{base}.{key}", f"{url!r} must start with {' or '.join(schemes)}")
        seen: set[Pair] = set()
        for i, text in enumerate(ex.pairs):
            try:
                pair = Pair.parse(text)
            except ValueError as exc:
                raise bad(f"{base}.pairs[{i}]", str(exc)) from None
            if pair in seen:
                raise bad(f"{base}.pairs[{i}]", f"{pair} is listed twice")
            seen.add(pair)
        for sym, override in ex.symbols.items():
            where = f'{base}.symbols."{sym}"'
            try:
                pair = Pair.parse(sym)
            except ValueError as exc:
                raise bad(where, str(exc)) from None
            if pair not in seen:
                raise bad(
                    where,
                    f"{pair} is not in {base}.pairs",
                    "add it to pairs or remove the override",
                )
            ws_re, rest_re = NATIVE_PATTERNS[name]
            ws_eg, rest_eg = _NATIVE_EXAMPLES[name]
            for key, value, pattern, example in (
                ("native", override.native, ws_re, ws_eg),
                ("rest_native", override.rest_native, rest_re, rest_eg),
            ):
                if value and not pattern.match(value):
                    raise bad(
                        f"{where}.{key}",
                        f"{value!r} is not a {name} symbol name (allowed: {pattern.pattern})",
                        f"e.g. {example!r}, spelled as the exchange lists it",
                    )
        if ex.backoff_max_s < ex.backoff_initial_s:
            raise bad(f"{base}.backoff_max_s", "must be at least backoff_initial_s")
        if not 0 < ex.rate_limit_fraction <= 1:
            raise bad(f"{base}.rate_limit_fraction", "must be in (0, 1]")
    url = cfg.exchanges.binance.archive_url
    if url and not url.startswith(("http://", "https://", "file://")):
        raise bad(
            "exchanges.binance.archive_url",
            f"{url!r} must start with https://, http:// or file://",
            f"the public location is {BINANCE_ARCHIVE_URL!r}",
        )


def _resolve_paths(cfg: Config, base: Path) -> None:
    def resolve(value: str) -> str:
        if not value:
            return value
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p))

    cfg.daemon.data_dir = resolve(cfg.daemon.data_dir)
    cfg.daemon.status_socket = resolve(cfg.daemon.status_socket)
    cfg.lake.root = resolve(cfg.lake.root)
    cfg.exchanges.kraken.archive_dir = resolve(cfg.exchanges.kraken.archive_dir)


def _check_symbol_overrides(data: dict[str, Any], path: str) -> None:
    """Validate ``exchanges.<name>.symbols`` entries one by one, so errors name the pair."""
    exchanges = data.get("exchanges")
    if not isinstance(exchanges, dict):
        return
    for name, section in exchanges.items():
        symbols = section.get("symbols") if isinstance(section, dict) else None
        if not isinstance(symbols, dict):
            continue
        for sym, entry in symbols.items():
            prefix = f'exchanges.{name}.symbols."{sym}"'
            try:
                msgspec.convert(entry, type=SymbolOverride, strict=True)
            except msgspec.ValidationError as exc:
                _raise_validation(exc, path, prefix, SymbolOverride, entry)


def parse_config(text: str, path: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse and validate TOML text; every problem is a :class:`ConfigError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from None
    data.pop("source_path", None)
    _check_symbol_overrides(data, path)
    try:
        cfg = msgspec.convert(data, type=Config, strict=True)
    except msgspec.ValidationError as exc:
        _raise_validation(exc, path, data=data)
        raise  # pragma: no cover - _raise_validation always raises
    cfg.source_path = path
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    _validate(cfg, path)
    return cfg


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load ``path``; with ``None``, ``./klined.toml`` if present, else the built-in defaults."""
    if path is None:
        candidate = Path("klined.toml")
        if not candidate.exists():
            cfg = Config()
            _validate(cfg, "<defaults>")
            return cfg
        path = candidate
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "file not found", path=str(p), hint="pass -c PATH, or copy the shipped klined.toml"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", path=str(p)) from None
    return parse_config(text, str(p), base_dir=p.resolve().parent)
