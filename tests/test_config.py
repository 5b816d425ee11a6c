import math
import re
from pathlib import Path

import msgspec
import pytest

from klined.cli import main
from klined.config import Config, describe_range, load_config, parse_config
from klined.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_covers_the_seed_pairs() -> None:
    cfg = load_config(ROOT / "klined.toml")
    for exchange in ("binance", "kraken"):
        pairs = [str(p) for p in cfg.pairs(exchange)]
        assert len(pairs) == 15
        assert {"BTC/USD", "FARTCOIN/USD", "KSM/USD"} <= set(pairs)
    assert cfg.exchanges.kraken.symbols["BTC/USD"].rest_native == "XBTUSD"


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        (
            '[exchanges.binance]\nws_ur = "ws://x"',
            "exchanges.binance.ws_ur",
            "did you mean 'ws_url'?",
        ),
        ("[demon]\n", "demon", "did you mean 'daemon'?"),
        ('[lake]\nflush_interval_s = "soon"', "lake.flush_interval_s", ""),
        (
            '[exchanges.kraken.symbols."BTC/USD"]\nnativ = "x"',
            'exchanges.kraken.symbols."BTC/USD".nativ',
            "did you mean 'native'?",
        ),
        ('[exchanges.binance]\npairs = ["BTCUSD"]', "exchanges.binance.pairs[0]", ""),
        ('[exchanges.binance]\nws_url = "http://x"', "exchanges.binance.ws_url", ""),
        ("[lake]\nflush_interval_s = 0", "lake.flush_interval_s", ""),
    ],
)
def test_bad_config_names_file_key_and_hint(text: str, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "my.toml")
    err = info.value
    assert err.path == "my.toml"
    assert err.key == key
    assert err.hint == hint
    assert str(err).startswith(f"my.toml: {key}: ")


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "k.toml"
    path.parent.mkdir()
    path.write_text('[daemon]\ndata_dir = "state"\n')
    cfg = load_config(path)
    assert cfg.data_dir == tmp_path / "conf" / "state"
    assert cfg.lake_root == tmp_path / "conf" / "state" / "lake"


def test_env_dsn_overrides_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLINED_DSN", "postgresql://u@h/db")
    assert parse_config('[database]\ndsn = "postgresql://a@b/c"').dsn == "postgresql://u@h/db"


def test_cli_exits_2_on_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k.toml"
    path.write_text('[exchanges.binance]\nrest_ulr = "x"\n')
    with pytest.raises(SystemExit) as info:
        main(["config", "-c", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "exchanges.binance.rest_ulr" in err and "did you mean 'rest_url'?" in err


def _sections(text: str) -> dict[str, list[str]]:
    """Each ``[section]`` header of a TOML text (commented-out ones too) -> its lines."""
    out: dict[str, list[str]] = {"": []}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        bare = line.lstrip("#").strip()
        if bare.startswith("[") and bare.endswith("]") and "=" not in bare:
            current = bare[1:-1].strip()
            out.setdefault(current, [])
            continue
        out.setdefault(current, []).append(line)
    return out


def _keys_of(struct: type[msgspec.Struct], prefix: str) -> list[tuple[str, str, type | None]]:
    """(section, key, struct of a dict's values or None) for every field, recursively."""
    found: list[tuple[str, str, type | None]] = []
    for field in msgspec.structs.fields(struct):
        if field.name == "source_path":
            continue  # not a TOML key
        typ = field.type
        if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
            found += _keys_of(typ, f"{prefix}.{field.name}".strip("."))
        elif getattr(typ, "__origin__", None) is dict:
            found.append((prefix, field.name, typ.__args__[1]))
        else:
            found.append((prefix, field.name, None))
    return found


def test_every_config_key_is_in_the_shipped_file_with_a_value() -> None:
    """The README promises the shipped klined.toml lists every key: walk the config schema."""
    text = (ROOT / "klined.toml").read_text()
    sections = _sections(text)
    missing = []
    for section, key, values in _keys_of(Config, ""):
        if values is None:
            lines = sections.get(section, [])
            if not any(re.match(rf"{re.escape(key)}\s*=", line) for line in lines):
                missing.append(f"{section}.{key}")
            continue
        # a table of tables (symbol overrides): an example in the section, and every field
        # shown in some example of it (commented out or not; the exchanges share the type)
        tables = [name for name in sections if name.startswith(f"{section}.{key}.")]
        if not tables:
            missing.append(f"{section}.{key}.<name>")
        kin = [name for name in sections if f".{key}." in name]
        shown = [line.lstrip("#").strip() for name in kin for line in sections[name]]
        for field in msgspec.structs.fields(values):
            if not any(re.match(rf"{field.name}\s*=", line) for line in shown):
                missing.append(f"{section}.{key}.<name>.{field.name}")
    assert not missing, f"keys missing from the shipped klined.toml: {missing}"


# -- every numeric key has a finite range, and values outside it exit 2 ------------------------


def _numeric_keys(
    typ: type, section: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], str, msgspec.inspect.Type]]:
    """(TOML section, key, declared type) of every numeric key under ``typ``."""
    keys = []
    for f in msgspec.inspect.type_info(typ).fields:
        t = f.type
        if isinstance(t, msgspec.inspect.StructType):
            keys += _numeric_keys(t.cls, (*section, f.name))
        elif isinstance(t, msgspec.inspect.DictType) and isinstance(
            t.value_type, msgspec.inspect.StructType
        ):
            keys += _numeric_keys(t.value_type.cls, (*section, f.name, '"BTC/USD"'))
        elif isinstance(t, msgspec.inspect.IntType | msgspec.inspect.FloatType):
            keys.append((section, f.name, t))
    return keys


NUMERIC_KEYS = _numeric_keys(Config)


def test_the_walk_finds_every_numeric_key() -> None:
    names = {".".join((*s, k)) for s, k, _ in NUMERIC_KEYS}
    assert "database.pool_size" in names
    assert "exchanges.kraken.rate_limit_fraction" in names
    assert 'exchanges.binance.symbols."BTC/USD".multiplier' in names
    assert "lake.max_held_bytes" in names
    assert len(names) >= 30


@pytest.mark.parametrize(
    ("section", "key", "info"), NUMERIC_KEYS, ids=[".".join((*s, k)) for s, k, _ in NUMERIC_KEYS]
)
def test_every_numeric_key_refuses_non_finite_and_out_of_range_values(
    section: tuple[str, ...],
    key: str,
    info: msgspec.inspect.Type,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType)
    low = info.ge if info.ge is not None else info.gt
    high = info.le if info.le is not None else info.lt
    assert low is not None and high is not None, f"{key} has no finite range"
    assert math.isfinite(low) and math.isfinite(high)
    below = low - 1 if info.ge is not None else low
    bad = [below, high + 1, high * 10 + 1]
    if isinstance(info, msgspec.inspect.FloatType):
        bad += ["nan", "inf", "-inf"]
    dotted = ".".join((*section, key))
    expected = describe_range(info)
    path = tmp_path / "k.toml"
    for value in bad:
        path.write_text(f"[{'.'.join(section)}]\n{key} = {value}\n")
        with pytest.raises(SystemExit) as info_exit:
            main(["config", "-c", str(path)])
        assert info_exit.value.code == 2, (dotted, value)
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: {dotted}: must be {expected}"), err
    # the bounds themselves are accepted (a rule between keys may still object)
    for value in (low if info.ge is not None else high, high):
        try:
            parse_config(f"[{'.'.join(section)}]\n{key} = {value!r}\n")
        except ConfigError as exc:
            assert not exc.message.startswith(("must be a number", "must be a whole")), exc


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[chain]\nschedule = "99 99 * * *"', "chain.schedule", "not a valid cron expression"),
        ('[chain]\nschedule = "*/0 * * * *"', "chain.schedule", "not a valid cron expression"),
        ('[chain]\nschedule = "5 * * *"', "chain.schedule", "not a 5-field cron expression"),
        (
            '[exchanges.binance.symbols."BTC/USD"]\nnative = "BTC\\"USD"',
            'exchanges.binance.symbols."BTC/USD".native',
            "is not a binance symbol name",
        ),
        (
            '[exchanges.binance.symbols."BTC/USD"]\nnative = "btcusd"',
            'exchanges.binance.symbols."BTC/USD".native',
            "is not a binance symbol name",
        ),
        (
            '[exchanges.kraken.symbols."BTC/USD"]\nnative = "BTC USD"',
            'exchanges.kraken.symbols."BTC/USD".native',
            "is not a kraken symbol name",
        ),
        (
            '[exchanges.kraken.symbols."BTC/USD"]\nrest_native = "XBT/USD"',
            'exchanges.kraken.symbols."BTC/USD".rest_native',
            "is not a kraken symbol name",
        ),
    ],
)
def test_schedule_and_native_names_are_checked(text: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "my.toml")
    assert info.value.key == key
    assert fragment in info.value.message


def test_native_names_keep_the_exchanges_case() -> None:
    cfg = parse_config(
        '[exchanges.kraken]\npairs = ["AAPLX/USD"]\n'
        '[exchanges.kraken.symbols."AAPLX/USD"]\nnative = "AAPLx/USD"\nrest_native = "AAPLxUSD"'
    )
    override = cfg.exchanges.kraken.symbols["AAPLX/USD"]
    assert (override.native, override.rest_native) == ("AAPLx/USD", "AAPLxUSD")


def test_every_live_key_is_in_the_shipped_config_with_its_default() -> None:
    import tomllib

    from klined.config import LiveConfig

    shipped = tomllib.loads((ROOT / "klined.toml").read_text())["live"]
    defaults = msgspec.structs.asdict(LiveConfig())
    assert shipped == defaults


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("flush_interval_s", "0"),
        ("flush_interval_s", "11"),
        ("queue_batches", "0"),
        ("queue_batches", "100001"),
        ("batch_max_candles", "0"),
        ("gold_interval_s", "61"),
        ("gold_interval_s", "0.5"),
        ("lag_window_s", "5"),
        ("enabled", '"yes"'),
    ],
)
def test_bad_live_values_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"[live]\n{key} = {value}\n", "k.toml")
    assert info.value.key == f"live.{key}"


def test_live_typo_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[live]\nflush_interval = 1.0\n", "k.toml")
    assert info.value.key == "live.flush_interval" and "flush_interval_s" in info.value.hint


def test_role_and_shard() -> None:
    cfg = parse_config('[daemon]\nrole = "capture"\nshard = "2/3"\n')
    assert cfg.daemon.role == "capture" and cfg.shard == (2, 3)
    assert cfg.captures and not cfg.chains
    shares = [
        parse_config(f'[daemon]\nshard = "{k}/3"\n').capture_pairs("binance") for k in (1, 2, 3)
    ]
    everyone = sorted(str(p) for share in shares for p in share)
    assert everyone == sorted(map(str, cfg.pairs("binance")))
    chain = parse_config('[daemon]\nrole = "chain"\nshard = "1/2"\n')
    assert chain.chains and not chain.captures
    assert len(chain.pairs("kraken")) == 15  # completeness and gap-fill cover every pair


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ('[daemon]\nrole = "chian"', "daemon.role", "did you mean 'chain'?"),
        ('[daemon]\nshard = "3/2"', "daemon.shard", "e.g. '1/2'"),
        ('[daemon]\nshard = "half"', "daemon.shard", "e.g. '1/2'"),
    ],
)
def test_bad_role_or_shard(text: str, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "k.toml")
    assert info.value.key == key and hint in str(info.value)
