"""One root error for klined and one subclass per area, so callers catch exactly what they mean."""

from __future__ import annotations


def underlying(exc: BaseException) -> BaseException:
    """The error that actually happened: task groups wrap a failure in (nested) exception
    groups, which say nothing ("unhandled errors in a TaskGroup (1 sub-exception)"). The first
    leaf that is not a cancellation, else the first leaf."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = [underlying(inner) for inner in exc.exceptions]
    for leaf in leaves:
        if isinstance(leaf, Exception):
            return leaf
    return leaves[0] if leaves else exc


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of the underlying error, on one line."""
    cause = underlying(exc)
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


class KlinedError(Exception):
    """Root of every error klined raises on purpose."""


class ConfigError(KlinedError):
    """A configuration file is missing, unreadable or invalid. The CLI exits 2 on it.

    ``path`` and ``key`` name where the problem is; ``hint`` is a suggestion such as
    "did you mean 'ws_url'?".
    """

    def __init__(self, message: str, *, path: str = "", key: str = "", hint: str = "") -> None:
        self.path = path
        self.key = key
        self.hint = hint
        self.message = message
        super().__init__(self.render())

    def render(self) -> str:
        where = self.path or "<config>"
        if self.key:
            where = f"{where}: {self.key}"
        text = f"{where}: {self.message}"
        if self.hint:
            text = f"{text} ({self.hint})"
        return text


class UsageError(KlinedError):
    """A command was called with arguments that cannot work (empty range, unknown pair). Exit 2."""


class ExchangeError(KlinedError):
    """Something an exchange (or the simulator) said or did."""


class ParseError(ExchangeError):
    """A frame or response could not be understood; ``snippet`` is a short excerpt of it."""

    def __init__(self, message: str, snippet: str = "") -> None:
        self.snippet = snippet
        super().__init__(f"{message}: {snippet!r}" if snippet else message)


class RateLimited(ExchangeError):
    """The exchange asked us to slow down (HTTP 429/418, Kraken EGeneral:Too many requests)."""

    def __init__(self, message: str, retry_after: float | None = None, banned: bool = False):
        self.retry_after = retry_after
        self.banned = banned
        super().__init__(message)


class UnlistedPair(ExchangeError):
    """The exchange does not list a configured pair; never retried in a loop."""


class RequestRejected(ExchangeError):
    """The exchange refused a request as invalid (HTTP 4xx); sending it again cannot help."""


class ExchangeUnreachable(ExchangeError):
    """The exchange could not be connected to at all; requests fail at once for a while."""


class LakeError(KlinedError):
    """Local spool or S3 mirror trouble."""


class EventsLost(LakeError):
    """Captured events could be neither written to the lake nor uploaded to S3 (the daemon
    exits 1 with this one line, so systemd sees a failure)."""


class DatabaseError(KlinedError):
    """PostgreSQL could not be reached or refused a statement."""


class ChainError(KlinedError):
    """A step of the hourly chain failed."""


class StatusError(KlinedError):
    """The daemon's status socket could not be reached or answered nonsense."""


class ArchiveError(KlinedError):
    """An exchange's history file cannot be used: a failed checksum, a truncated zip, a bad row.

    ``name`` is the file, ``line`` the 1-based CSV line the problem is on (0: the whole file).
    Nothing of such a file is loaded; the other files of an import go on.
    """

    def __init__(self, name: str, message: str, *, line: int = 0) -> None:
        self.name = name
        self.line = line
        self.message = message
        where = f"{name} line {line}" if line else name
        super().__init__(f"{where}: {message}")


class ArchiveNotPublished(ArchiveError):
    """The archive has no such file (HTTP 404): not published yet, or the pair did not trade."""


class ArchiveUnreachable(KlinedError):
    """The archive's location cannot be reached at all (DNS, refused, a missing mirror folder):
    nothing more is asked of it in this run."""


class DatasetError(KlinedError):
    """An export, publish or read of the candle datasets cannot be done as asked (a value that
    does not fit its column, a destination holding another dataset, a bad source)."""
