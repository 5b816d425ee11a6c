"""The chain lock: one chain at a time per warehouse, taken hour by hour, fair, and named.

A PostgreSQL advisory lock on a dedicated connection keeps two chains (the daemon's, a
by-hand ``klined chain``, a backfill's merges) from running at once, even from several hosts.
Three things make it pleasant to share:

* **held per hour**: :class:`ChainLock` takes the lock for one hour's work and releases it
  before the next, so nobody waits behind more than one hour of someone else's work;
* **fair**: a waiter queues inside PostgreSQL (``pg_advisory_lock`` under a short
  ``lock_timeout``, repeated), and PostgreSQL grants a released lock to the queued waiter
  before a newcomer, so the holder's next hour cannot jump the queue;
* **named**: the holder sets its ``application_name`` to what it is doing ("klined: the
  daemon's catch-up of 2026-12-03T14:00Z"), so a waiter can say whom it waits for.

Closing the connection releases the lock even if the unlock itself cannot run: a cancelled
or crashed holder never leaves it held.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType

import anyio
import asyncpg
from loguru import logger

from klined.errors import ChainError
from klined.model import to_datetime
from klined.warehouse.database import Database

#: The advisory lock key held by a running chain ("klined" in ASCII).
CHAIN_LOCK_KEY = 0x6B6C696E6564
#: What every holder's ``application_name`` starts with.
APP_PREFIX = "klined: "
#: PostgreSQL keeps at most this many bytes of an ``application_name``.
_APP_NAME_BYTES = 63
_CLEANUP_S = 10.0

#: What a chain run is, by its trigger, in the words a waiting user reads.
HOLDERS: dict[str, str] = {
    "catchup": "the daemon's catch-up",
    "schedule": "the daemon's hourly chain",
    "dirty": "the daemon's chain",
    "manual": "`klined chain`",
    "backfill": "a backfill's merge",
    "demo": "the demo's seeding",
}


class ChainBusy(ChainError):
    """Another chain (daemon, ``klined chain`` or a backfill's merge) holds the lock."""


def hour_label(hour_ms: int) -> str:
    """``2026-12-03T14:00Z``: an hour as the lock's holder names it."""
    return to_datetime(hour_ms).strftime("%Y-%m-%dT%H:%MZ")


def describe(trigger: str, hour_ms: int | None = None) -> str:
    """What a chain run of ``trigger`` is doing, e.g. "the daemon's catch-up of 2026-...Z"."""
    what = HOLDERS.get(trigger, f"a {trigger} chain")
    return what if hour_ms is None else f"{what} of {hour_label(hour_ms)}"


def application_name(description: str) -> str:
    """The holder's ``application_name``: the prefix and the description, cut to fit."""
    name = (APP_PREFIX + description).encode()[:_APP_NAME_BYTES]
    return name.decode(errors="ignore")


async def lock_holder(conn: asyncpg.Connection) -> str:
    """Who holds the chain lock, in words: "the daemon's catch-up of ... (pid 123 on host)"."""
    row = await conn.fetchrow(
        "SELECT l.pid, a.application_name, a.client_addr::text AS addr"
        " FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        "   AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
        CHAIN_LOCK_KEY,
    )
    if row is None:
        return "another session (it just let go)"
    where = f" from {row['addr']}" if row["addr"] else ""
    name: str = row["application_name"] or ""
    if name.startswith(APP_PREFIX):
        return f"{name[len(APP_PREFIX) :]} (PostgreSQL backend pid {row['pid']}{where})"
    what = f"a session named {name!r}" if name else "a session without an application name"
    return f"{what} (PostgreSQL backend pid {row['pid']}{where})"


class ChainLock:
    """The chain lock's connection, held hour by hour with :meth:`hold`.

    ``wait_s``: how long each :meth:`hold` waits for another holder (``None``: as long as it
    takes, ``0``: not at all); it raises :class:`ChainBusy` when the lock does not come free.
    ``on_wait(holder)`` is called when waiting starts and whenever the holder changes.
    """

    def __init__(
        self,
        db: Database,
        *,
        wait_s: float | None = 0.0,
        poll_s: float = 1.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.on_wait = on_wait
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> ChainLock:
        await self._connection()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._drop()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.db.dsn, timeout=10)
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_S):
            try:
                await conn.close()
            except Exception as exc:
                logger.debug("closing the chain lock's connection: {}", exc)
        if not conn.is_closed():
            conn.terminate()

    @asynccontextmanager
    async def hold(self, description: str) -> AsyncIterator[None]:
        """Hold the lock for the ``async with`` body, named ``description`` meanwhile."""
        conn = await self._connection()
        await conn.execute(
            "SELECT set_config('application_name', $1, false)", application_name(description)
        )
        await self._acquire(conn)
        try:
            yield
        finally:
            released = False
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_S):
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1)", CHAIN_LOCK_KEY)
                    await conn.execute(
                        "SELECT set_config('application_name', $1, false)",
                        application_name("between two hours"),
                    )
                    released = True
                except Exception as exc:
                    logger.warning("releasing the chain lock failed ({}); reconnecting", exc)
            if not released:
                # closing the session is what releases the lock for sure
                await self._drop()

    async def _acquire(self, conn: asyncpg.Connection) -> None:
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", CHAIN_LOCK_KEY):
            return
        deadline = None if self.wait_s is None else time.monotonic() + self.wait_s
        told = ""
        while True:
            holder = await lock_holder(conn)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChainBusy(f"another chain is running: {holder}; try again later")
            if holder != told:
                logger.info("waiting for the chain lock, held by {}", holder)
                if self.on_wait is not None:
                    self.on_wait(holder)
                told = holder
            wait_s = self.poll_s if left is None else min(left, self.poll_s)
            try:
                # queued inside PostgreSQL, so a release goes to us before any newcomer
                await conn.execute(
                    "SELECT set_config('lock_timeout', $1, false)",
                    f"{max(1, round(wait_s * 1000))}ms",
                )
                await conn.execute("SELECT pg_advisory_lock($1)", CHAIN_LOCK_KEY)
            except asyncpg.LockNotAvailableError:
                continue
            await conn.execute("SELECT set_config('lock_timeout', '0', false)")
            return


@asynccontextmanager
async def chain_lock(
    db: Database,
    *,
    wait_s: float | None = 0.0,
    poll_s: float = 1.0,
    description: str = "a chain",
    on_wait: Callable[[str], None] | None = None,
) -> AsyncIterator[None]:
    """Hold the chain lock for the ``async with`` body (see :class:`ChainLock`)."""
    lock = ChainLock(db, wait_s=wait_s, poll_s=poll_s, on_wait=on_wait)
    async with lock, lock.hold(description):
        yield
