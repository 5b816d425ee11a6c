from pathlib import Path

import msgspec
import pytest

from klined.cli import main
from klined.config import load_config, parse_config
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


def test_every_live_key_is_in_the_shipped_config_with_its_default() -> None:
    import tomllib

    from klined.config import LIVE_RANGES, LiveConfig

    shipped = tomllib.loads((ROOT / "klined.toml").read_text())["live"]
    defaults = msgspec.structs.asdict(LiveConfig())
    assert shipped == defaults
    assert set(LIVE_RANGES) == set(defaults) - {"enabled"}  # every number has a range


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
