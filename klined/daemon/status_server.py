"""The daemon's status socket: one JSON :class:`~klined.status.StatusSnapshot` per connection.

The protocol is deliberately trivial: a client connects, the server writes the snapshot and
closes; nothing is read from the client, so a reader can never wedge or steer the daemon.
``socat - UNIX-CONNECT:/run/klined/klined.sock`` is a working client.

Safety decisions:

* The socket is bound under a umask that leaves it 0600 (0660 with a group), so there is no
  window in which another user could connect. The umask is process-wide, so the bind happens
  synchronously, without yielding to other tasks in between.
* A socket file left by a crash is removed only if nothing answers on it; a live daemon's
  socket is never stolen (a second ``klined run`` fails with a clear error instead), and a
  path that is not a socket is never deleted.
* On exit the file is removed only if it is still ours (same inode), so a successor's socket
  survives a slow shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import msgspec
from loguru import logger

from klined.errors import StatusError
from klined.status import StatusSnapshot, decode_snapshot, encode_snapshot

__all__ = ["MAX_SNAPSHOT_BYTES", "StatusServer", "fetch_status"]

#: a reader refuses anything larger: a snapshot of 2,000 pairs is well under 1 MB
MAX_SNAPSHOT_BYTES = 32 * 1024 * 1024


def _gid(group: str | int | None) -> int | None:
    if group is None or group == "":
        return None
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StatusError(f"status socket group {group!r} does not exist") from None


def _probe(path: Path) -> bool:
    """True if a process accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except TimeoutError:
            return True  # a backlog that full means someone is there
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def _clear_stale(path: Path) -> None:
    """Remove a socket file left by a crashed daemon; refuse anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StatusError(f"{path} exists and is not a socket; refusing to replace it")
    if _probe(path):
        raise StatusError(
            f"another klined is already serving status on {path}; stop it first "
            "or set daemon.status_socket to another path"
        )
    logger.info("removing stale status socket {} left by a previous run", path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _bind(path: Path, gid: int | None) -> socket.socket:
    """A listening socket at ``path``, never more open than 0600 (0660 with ``gid``)."""
    mode = 0o660 if gid is not None else 0o600
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class StatusServer:
    """Serves ``snapshot()`` on the Unix socket at ``path`` until cancelled.

    ``group`` (a name or gid) makes the socket 0660 and owned by that group, so its members
    (e.g. operators running ``klined status`` or ``klined tui``) can read it; otherwise 0600.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        snapshot: Callable[[], StatusSnapshot],
        *,
        group: str | int | None = None,
        send_timeout_s: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.snapshot = snapshot
        self.group = group
        self.send_timeout_s = send_timeout_s
        self.served = 0

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[Path] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the path through ``task_status``, serve until cancelled, clean up."""
        if len(os.fsencode(self.path)) >= 107:
            raise StatusError(
                f"status socket path is too long for a Unix socket (max 107 bytes): {self.path}"
            )
        gid = _gid(self.group)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            _clear_stale(self.path)
            sock = _bind(self.path, gid)
        except PermissionError as exc:
            raise StatusError(f"cannot create status socket {self.path}: {exc.strerror}") from None
        except OSError as exc:
            raise StatusError(f"cannot create status socket {self.path}: {exc}") from None
        inode = os.stat(self.path).st_ino
        try:
            listener = await anyio.abc.SocketListener.from_socket(sock)
        except BaseException:
            sock.close()
            self._remove(inode)
            raise
        logger.info("status socket listening on {}", self.path)
        try:
            async with listener, anyio.create_task_group() as tg:
                task_status.started(self.path)
                await listener.serve(self._handle, task_group=tg)
        finally:
            self._remove(inode)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                payload = encode_snapshot(self.snapshot())
            except Exception:
                logger.exception("status snapshot failed; closing the client without an answer")
                return
            try:
                with anyio.fail_after(self.send_timeout_s):
                    await stream.send(payload)
                    await stream.send_eof()
                self.served += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, TimeoutError) as exc:
                logger.debug("status client went away: {!r}", exc)
            except OSError as exc:
                logger.debug("status client error: {}", exc)

    def _remove(self, inode: int) -> None:
        """Unlink the socket file if it is still the one this server bound."""
        try:
            if os.stat(self.path).st_ino == inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove status socket {}: {}", self.path, exc)


async def fetch_status(
    path: str | os.PathLike[str],
    timeout: float = 2.0,  # noqa: ASYNC109 - one bounded call is what every caller wants
) -> StatusSnapshot:
    """Read one snapshot from the daemon at ``path``; :class:`StatusError` says why not."""
    p = Path(path)
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(timeout):
            async with await anyio.connect_unix(p) as stream:
                while True:
                    try:
                        chunk = await stream.receive()
                    except anyio.EndOfStream:
                        break
                    size += len(chunk)
                    if size > MAX_SNAPSHOT_BYTES:
                        raise StatusError(f"{p} sent more than {MAX_SNAPSHOT_BYTES} bytes")
                    chunks.append(chunk)
    except FileNotFoundError:
        raise StatusError(
            f"klined is not running (no status socket at {p}); "
            "start it with 'systemctl start klined' or 'klined run'"
        ) from None
    except ConnectionRefusedError:
        raise StatusError(
            f"klined is not running ({p} is left over from a previous run, nothing listens)"
        ) from None
    except PermissionError:
        raise StatusError(
            f"permission denied on {p}: run as the klined user "
            "(sudo -u klined ...) or join the group set in daemon.status_socket_group"
        ) from None
    except TimeoutError:
        raise StatusError(f"klined did not answer on {p} within {timeout:g}s") from None
    except (anyio.BrokenResourceError, ConnectionResetError):
        raise StatusError(f"klined closed the status connection on {p} early") from None
    except OSError as exc:
        raise StatusError(f"cannot reach klined at {p}: {exc.strerror or exc}") from None
    data = b"".join(chunks)
    if not data:
        raise StatusError(f"klined at {p} closed the connection without a status snapshot")
    try:
        return decode_snapshot(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StatusError(f"{p} answered something that is not a klined status: {exc}") from None
