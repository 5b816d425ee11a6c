"""Logging: JSON shape, human lines, journald priorities, stdlib routing and redaction."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from klined import logs
from klined.logs import redact, running_under_systemd, setup_logging

SECRET = "hunter2-Very-Secret"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo setup_logging's global changes so other tests see loguru as they left it."""
    for var in ("JOURNAL_STREAM", "INVOCATION_ID", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    while logs._handler_ids:
        logger.remove(logs._handler_ids.pop())
    logger.configure(patcher=lambda record: None)
    root.handlers, root.level = handlers, level


def lines(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line]


def test_json_lines_have_utc_time_level_message_module_and_extra() -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", json=True, stream=buf)
    logger.bind(exchange="binance", pair="BTC/USD").info("subscribed {} streams", 15)
    logger.debug("details")
    docs = [json.loads(line) for line in lines(buf)]
    assert len(docs) == 2
    first = docs[0]
    assert first["level"] == "INFO"
    assert first["message"] == "subscribed 15 streams"
    assert first["module"] == __name__
    assert first["exchange"] == "binance"
    assert first["pair"] == "BTC/USD"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert docs[1]["level"] == "DEBUG"


def test_json_exception_is_one_line_with_traceback() -> None:
    buf = io.StringIO()
    setup_logging("INFO", json=True, stream=buf)
    try:
        raise RuntimeError(f"connect to postgresql://klined:{SECRET}@db:5432/klined failed")
    except RuntimeError:
        logger.exception("chain step failed")
    (line,) = lines(buf)
    doc = json.loads(line)
    assert doc["level"] == "ERROR"
    assert "RuntimeError" in doc["exception"]
    assert SECRET not in line
    assert "postgresql://klined:***@db:5432/klined" in doc["exception"]


def test_level_filters_records() -> None:
    buf = io.StringIO()
    setup_logging("WARNING", json=True, stream=buf)
    logger.info("quiet")
    logger.warning("loud")
    assert [json.loads(x)["message"] for x in lines(buf)] == ["loud"]


def test_human_format_has_extras_and_no_colour_off_a_terminal() -> None:
    buf = io.StringIO()
    setup_logging("INFO", json=False, stream=buf)
    logger.bind(exchange="kraken", conn="kraken-0").warning("stale for {}s", 31)
    (line,) = lines(buf)
    assert "WARNING" in line and "stale for 31s" in line
    assert "exchange=kraken" in line and "conn=kraken-0" in line
    assert "\x1b[" not in line
    assert line[:4].isdigit() and "Z " in line


def test_colour_only_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    buf = Tty()
    setup_logging("INFO", json=False, stream=buf)
    logger.info("hello")
    assert "\x1b[" in buf.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    buf2 = Tty()
    setup_logging("INFO", json=False, stream=buf2)
    logger.info("hello")
    assert "\x1b[" not in buf2.getvalue()


def test_json_is_the_default_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not running_under_systemd()
    buf = io.StringIO()
    setup_logging("INFO", stream=buf)
    logger.info("plain")
    assert not buf.getvalue().startswith("{")

    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    assert running_under_systemd()
    buf = io.StringIO()
    setup_logging("INFO", stream=buf)
    logger.info("structured")
    assert json.loads(lines(buf)[0])["message"] == "structured"


def test_journal_stream_gets_syslog_priority_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.txt"
    with path.open("w", encoding="utf-8") as fh:
        st = os.fstat(fh.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("INFO", stream=fh)
        logger.info("started")
        logger.warning("slow")
        logger.error("failed")
    got = path.read_text().splitlines()
    assert [x[:3] for x in got] == ["<6>", "<4>", "<3>"]
    assert json.loads(got[1][3:])["message"] == "slow"


def test_stdlib_logging_is_routed_at_warning_and_above() -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", json=True, stream=buf)
    logging.getLogger("asyncpg.pool").info("noise")
    logging.getLogger("botocore.credentials").debug("Found credentials")
    logging.getLogger("websockets.client").warning("keepalive ping timeout %d", 20)
    logging.getLogger("aiohttp.server").error("bad request from %s", "127.0.0.1")
    docs = [json.loads(x) for x in lines(buf)]
    assert [(d["level"], d["message"], d["logger"]) for d in docs] == [
        ("WARNING", "keepalive ping timeout 20", "websockets.client"),
        ("ERROR", "bad request from 127.0.0.1", "aiohttp.server"),
    ]
    assert docs[0]["module"] == __name__  # the caller, not logging's internals


def test_setup_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("INFO", json=True, stream=first)
    setup_logging("INFO", json=True, stream=second)
    logger.info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError):
        setup_logging("LOUD", stream=io.StringIO())


@pytest.mark.parametrize("as_json", [True, False])
def test_secrets_never_reach_the_output(as_json: bool) -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", json=as_json, stream=buf)
    logger.info("dsn postgresql://klined:{}@10.0.0.5:5432/klined", SECRET)
    logger.info("libpq host=db user=klined password={} dbname=klined", SECRET)
    logger.info("env AWS_SECRET_ACCESS_KEY={} region=us-east-1", AWS_SECRET)
    logger.info("bare key {} in a message", AWS_SECRET)
    logger.info("headers {}", {"Authorization": f"Bearer {SECRET}", "Accept": "json"})
    logger.info("raw header Authorization: AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=ff")
    logger.bind(dsn=f"postgres://u:{SECRET}@h/db").warning("extra field carries a DSN")
    logging.getLogger("botocore").warning("signing with secret_key=%s", AWS_SECRET)
    out = buf.getvalue()
    assert SECRET not in out
    assert AWS_SECRET not in out
    assert "Signature=ff" not in out
    assert "postgresql://klined:***@10.0.0.5:5432/klined" in out
    assert "password=***" in out
    assert "Accept" in out  # redaction stops at the secret
    assert len(lines(buf)) == 8


def test_redaction_handler_added_elsewhere_sees_scrubbed_records() -> None:
    setup_logging("INFO", json=True, stream=io.StringIO())
    seen: list[str] = []
    handler = logger.add(lambda m: seen.append(m.record["message"]), format="{message}")
    try:
        logger.info("postgresql://a:{}@b/c", SECRET)
    finally:
        logger.remove(handler)
    assert seen == ["postgresql://a:***@b/c"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("https://s3.amazonaws.com/bucket/key", "https://s3.amazonaws.com/bucket/key"),
        ("{'authorization': 'Basic eHg='}", "{'authorization': '***'}"),
        ('"password": "p4ss"', '"password": "***"'),
        ("X-Amz-Security-Token=FQoG&X-Amz-Date=1", "X-Amz-Security-Token=***&X-Amz-Date=1"),
        # checksums and lake keys survive
        ("sha1 356a192b7913b04c54574d18c28d46e6395428ab", None),
        ("exchange=binance/symbol=BTC-USD/year=2024/month=05/part-1714564800000-0.jsonl", None),
    ],
)
def test_redact(text: str, expected: str | None) -> None:
    assert redact(text) == (text if expected is None else expected)
