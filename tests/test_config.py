import re
from pathlib import Path

import msgspec
import pytest

from klined.cli import main
from klined.config import Config, load_config, parse_config
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
