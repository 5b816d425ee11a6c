"""SIGTERM and SIGINT for the one-shot commands (``klined chain``, ``klined backfill``).

Python's default SIGTERM ends the process on the spot: no ``finally`` runs, so the ``ops`` rows
of the step in progress stay ``running`` and an embedded PostgreSQL started by the command keeps
running with nobody to stop it. :func:`run_interruptible` turns the first SIGTERM/SIGINT into a
cancellation of the work instead; the work's own shielded, bounded cleanup then records the
step as ``failed: cancelled`` (a backfill's checkpoint as ``cancelled``), releases the chain
lock and stops the embedded server. Further signals during that cleanup are logged and ignored
(it is bounded). The command then exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), as
a shell reports a process killed by that signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
from loguru import logger

T = TypeVar("T")

#: the signals a one-shot command turns into a clean stop
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(slots=True)
class Outcome(Generic[T]):
    """The work's result, or the signal that stopped it (``result`` is then None)."""

    result: T | None = None
    signum: int | None = None

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """``128 + signal`` when interrupted (130 SIGINT, 143 SIGTERM), else 0."""
        return 128 + self.signum if self.signum is not None else 0


async def run_interruptible(work: Callable[[], Awaitable[T]], what: str) -> Outcome[T]:
    """Run ``work()`` until it returns or the first SIGTERM/SIGINT cancels it (after its
    cleanup has run). ``what`` names the work in the log line (``"the backfill"``).

    Outside the main thread (the command called from a program or a test) signals cannot be
    received there; ``work()`` simply runs.
    """
    outcome: Outcome[T] = Outcome()
    if threading.current_thread() is not threading.main_thread():
        # only the main thread can handle signals: here they are the host program's business
        outcome.result = await work()
        return outcome
    scope = anyio.CancelScope()
    error: Exception | None = None
    # the receiver stays installed until the cleanup is over: a second signal must not fall
    # back to the default handler and kill the process half-way through it
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if outcome.signum is None:
                        outcome.signum = signum
                        logger.warning("{}: stopping {} (cleaning up first)", name, what)
                        scope.cancel()
                    else:
                        logger.warning("{} again: still cleaning up (bounded); please wait", name)

            tg.start_soon(watch, name="signals")
            try:
                with scope:
                    outcome.result = await work()
            except Exception as exc:
                error = exc  # raised below, not wrapped in the task group's exception group
            tg.cancel_scope.cancel()
    if error is not None:
        if outcome.signum is None:
            raise error
        # Ctrl-C reaches the whole process group: a tool still starting (initdb, pg_ctl)
        # fails with it; that is the interruption, not a separate failure
        logger.warning("{} ended with an error after {}: {}", what, outcome.signal_name, error)
    elif not scope.cancelled_caught:
        outcome.signum = None  # a signal that came as the work finished stopped nothing
    return outcome
