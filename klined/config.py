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
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from klined.errors import ConfigError
from klined.model import EXCHANGES, Pair

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


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonConfig(_Section):
    data_dir: str = "~/.local/share/klined"
    status_socket: str = ""  # default: <data_dir>/klined.sock ($RUNTIME_DIRECTORY under systemd)
    status_socket_group: str = ""  # members may read the status socket (0660); "" = owner only
    log_level: str = "INFO"
    log_json: bool = False
    metrics_port: int = 0  # 0 disables the Prometheus endpoint (always bound to loopback)
    shutdown_timeout_s: float = 20.0


class DatabaseConfig(_Section):
    dsn: str = ""  # empty: embedded PostgreSQL under <data_dir>/pgdata
    pool_size: int = 4
    partitions_ahead_hours: int = 48
    bronze_retention_days: int = 14
    readonly_role: str = "klined_looker"
    statement_timeout_s: float = 300.0


class LakeConfig(_Section):
    root: str = ""  # default: <data_dir>/lake
    flush_interval_s: float = 1.0
    part_max_bytes: int = 64 * 1024 * 1024
    part_max_age_s: float = 900.0
    hour_grace_s: float = 120.0
    retention_hours: float = 72.0
    upload_interval_s: float = 30.0


class S3Config(_Section):
    bucket: str = ""  # empty: the lake is local only
    prefix: str = ""
    endpoint_url: str = ""
    region: str = "us-east-1"


class ChainConfig(_Section):
    enabled: bool = True
    schedule: str = "5 * * * *"  # cron, UTC
    catchup_hours: int = 48
    rest_retry_hours: int = 12  # keep trying to fill missing minutes this long after the hour


class SymbolOverride(_Section):
    native: str = ""  # the exchange's own name, e.g. "1000REKTUSD"
    rest_native: str = ""  # Kraken REST name when it differs from the guess, e.g. "XBTUSD"
    multiplier: int = 1  # native unit = multiplier x base unit (price / multiplier, volume x it)


class ExchangeConfig(_Section):
    enabled: bool = True
    ws_url: str = ""
    rest_url: str = ""
    pairs: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_PAIRS))
    symbols: dict[str, SymbolOverride] = msgspec.field(default_factory=dict)
    stale_after_s: float = 30.0
    connect_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    max_connection_age_s: float = 0.0  # 0: the exchange's own lifetime minus a margin
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    rest_timeout_s: float = 10.0
    rate_limit_fraction: float = 0.8  # share of the documented REST budget klined may use


class BinanceConfig(ExchangeConfig):
    """Binance US: the common keys plus where its published history files are."""

    archive_url: str = BINANCE_ARCHIVE_URL  # http(s):// or file:// (a local mirror)
    archive_downloads: int = 4  # archive files downloaded at once


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
    exchanges: ExchangesConfig = msgspec.field(default_factory=ExchangesConfig)
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
        return [Pair.parse(p) for p in getattr(self.exchanges, exchange).pairs]

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


def _raise_validation(
    exc: msgspec.ValidationError,
    path: str,
    prefix: str = "",
    root: type[msgspec.Struct] = Config,
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
    key = ".".join(p for p in (prefix, _dotted(m["path"]) if m and m["path"] else "") if p)
    raise ConfigError(msg.replace("`", "'"), path=path, key=key) from None


def _validate(cfg: Config, path: str) -> None:
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
    if not 0 <= cfg.daemon.metrics_port <= 65535:
        raise bad("daemon.metrics_port", "must be between 0 (off) and 65535")
    positive = {
        "lake.flush_interval_s": cfg.lake.flush_interval_s,
        "lake.part_max_bytes": cfg.lake.part_max_bytes,
        "lake.part_max_age_s": cfg.lake.part_max_age_s,
        "lake.upload_interval_s": cfg.lake.upload_interval_s,
        "database.pool_size": cfg.database.pool_size,
        "database.partitions_ahead_hours": cfg.database.partitions_ahead_hours,
        "database.bronze_retention_days": cfg.database.bronze_retention_days,
        "daemon.shutdown_timeout_s": cfg.daemon.shutdown_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise bad(key, f"must be positive, got {value}")
    if cfg.lake.hour_grace_s < 0 or cfg.lake.retention_hours < 0:
        raise bad(
            "lake.hour_grace_s" if cfg.lake.hour_grace_s < 0 else "lake.retention_hours",
            "must not be negative",
        )
    if cfg.chain.catchup_hours < 0 or cfg.chain.rest_retry_hours < 0:
        raise bad("chain.catchup_hours", "must not be negative")
    if len(cfg.chain.schedule.split()) != 5:
        raise bad(
            "chain.schedule",
            f"{cfg.chain.schedule!r} is not a 5-field cron expression",
            "e.g. '5 * * * *' for five past every hour",
        )
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
            try:
                pair = Pair.parse(sym)
            except ValueError as exc:
                raise bad(f"{base}.symbols.{sym!r}", str(exc)) from None
            if pair not in seen:
                raise bad(
                    f"{base}.symbols.{sym!r}",
                    f"{pair} is not in {base}.pairs",
                    "add it to pairs or remove the override",
                )
            if override.multiplier < 1:
                raise bad(f"{base}.symbols.{sym!r}.multiplier", "must be 1 or more")
        for key in (
            "stale_after_s",
            "connect_timeout_s",
            "ping_interval_s",
            "backoff_initial_s",
            "backoff_max_s",
            "rest_timeout_s",
        ):
            if getattr(ex, key) <= 0:
                raise bad(f"{base}.{key}", f"must be positive, got {getattr(ex, key)}")
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
    if not 1 <= cfg.exchanges.binance.archive_downloads <= 32:
        raise bad("exchanges.binance.archive_downloads", "must be between 1 and 32")


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
                _raise_validation(exc, path, prefix, SymbolOverride)


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
        _raise_validation(exc, path)
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
