"""systemd's notify protocol (``sd_notify``) without libsystemd: readiness, status, watchdog.

systemd gives a ``Type=notify`` service a datagram socket in ``NOTIFY_SOCKET`` (a path, or an
abstract name starting with ``@``) and, with ``WatchdogSec=``, the timeout in ``WATCHDOG_USEC``.
Every message is one datagram of ``KEY=VALUE`` lines. Outside systemd every call is a no-op, so
the daemon calls these unconditionally.

:func:`watchdog_loop` pings from the event loop itself: if the loop wedges (a blocking call, a
livelock), the pings stop and systemd kills and restarts the service after ``WatchdogSec``.
That is the whole point, so never ping from a thread.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, MutableMapping

import anyio
from loguru import logger

__all__ = ["Heartbeat", "Notifier", "watchdog_loop"]


class Notifier:
    """Sends ``sd_notify`` messages to ``address``; does nothing when ``address`` is None.

    Sending never raises: a lost notification must not take the daemon down (systemd's own
    timeouts catch a daemon that really cannot talk to it). Failures are logged once.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = True,
    ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        With ``unset_environment`` (the default) the variables are removed from the
        environment, so child processes (the embedded PostgreSQL, pg_ctl) do not inherit them
        and talk to systemd on our behalf.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            # e.g. systemd 254's "vsock:" addresses; not needed on a plain VM
            logger.warning("NOTIFY_SOCKET {!r} is not a Unix socket; not notifying", address)
            address = None
        usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC", "")
        raw_pid = env.get("WATCHDOG_PID", "")
        if raw_usec:
            try:
                usec = int(raw_usec)
                if raw_pid and int(raw_pid) != os.getpid():
                    usec = None  # the watchdog is meant for another process
            except ValueError:
                logger.warning("ignoring malformed WATCHDOG_USEC/WATCHDOG_PID")
                usec = None
        if unset_environment:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return cls(address, usec)

    # -- state ---------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when systemd is listening (``Type=notify``)."""
        return self.address is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self.enabled and self.watchdog_usec is not None

    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of ``WatchdogSec`` (systemd's own advice); None if off."""
        if not self.watchdog_enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    # -- messages ------------------------------------------------------------------------------

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; True if it was sent."""
        if self.address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, target)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                logger.debug("notify socket busy; dropped {}", assignments[0])
            elif not self._warned:
                self._warned = True
                logger.warning("cannot notify systemd at {}: {}", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``Type=notify`` leaves "activating")."""
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status klined``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Keep-alive ping; only sent when ``WatchdogSec`` is set."""
        if not self.watchdog_enabled:
            return False
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a graceful stop has begun."""
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time for the current start or stop (``EXTEND_TIMEOUT_USEC``).

        Useful while the embedded PostgreSQL runs ``initdb`` on a slow disk.
        """
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Heartbeat:
    """A health flag the daemon's supervisor refreshes; stale after ``max_age_s``.

    Pass an instance as ``heartbeat`` to :func:`watchdog_loop` and call :meth:`beat` from the
    code whose progress proves the daemon works (e.g. the supervisor's periodic tick).
    """

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self._last

    def __call__(self) -> bool:
        return self.age_s() <= self.max_age_s


async def watchdog_loop(
    notifier: Notifier,
    heartbeat: Callable[[], bool],
    *,
    interval_s: float | None = None,
) -> None:
    """Ping the systemd watchdog every ``interval_s`` while ``heartbeat()`` says all is well.

    Runs until cancelled; returns at once when the watchdog is off. A heartbeat that returns
    False (or raises) skips the ping, so a daemon that is alive but stuck gets restarted too.
    """
    interval = interval_s if interval_s is not None else notifier.watchdog_interval_s()
    if not notifier.watchdog_enabled or not interval or interval <= 0:
        return
    unhealthy_since: float | None = None
    while True:
        try:
            healthy = bool(heartbeat())
        except Exception as exc:
            logger.opt(exception=exc).error("watchdog heartbeat check failed")
            healthy = False
        if healthy:
            if unhealthy_since is not None:
                logger.info("watchdog: heartbeat healthy again, pinging")
                unhealthy_since = None
            notifier.watchdog()
        elif unhealthy_since is None:
            unhealthy_since = time.monotonic()
            logger.warning("watchdog: heartbeat unhealthy, withholding pings")
            notifier.status("unhealthy: main loop heartbeat is stale")
        started = time.monotonic()
        await anyio.sleep(interval)
        lag = time.monotonic() - started - interval
        if lag > interval:
            logger.warning("event loop lagged {:.1f}s behind the watchdog timer", lag)
