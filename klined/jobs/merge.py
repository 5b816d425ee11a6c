"""Merge hours into silver, gold and completeness while a long load is still going on.

A backfill fetches and an archive import loads for a long time; rather than merge everything
at the end, :class:`Merger` runs beside them and merges each exchange's hours as soon as
nothing more will be written into them (the caller says when: ``is_ready``), in batches that
each hold the chain lock briefly, so the daemon's hourly chain is never starved. What is left
is merged once the load is done. Every batch is :func:`klined.jobs.chain.run_chain` with the
merge steps: the same code as the hourly chain.

(Merging a day per statement instead of an hour was tried for long imports: silver and gold
cost the same per minute either way, ~15 and ~25 us, so it bought nothing; see README,
Performance.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping

import anyio

from klined.config import Config
from klined.jobs.chain import run_chain
from klined.jobs.chain_report import MERGE_STEPS, ChainReport
from klined.jobs.progress import Display
from klined.warehouse.database import Database

#: Hours merged per chain-lock hold (the lock is released between batches).
MERGE_BATCH_HOURS = 24
#: How often the merger looks for hours that became ready.
MERGE_POLL_S = 1.0


class Merger:
    """Merges the hours of each exchange that ``touched`` reports once ``is_ready`` says so.

    ``touched(exchange)`` gives the hours written so far, ``is_ready(exchange, hour)`` whether
    nothing more will be written into an hour; ``initial`` adds hours known to need a merge
    from the start (dirty hours left by an interrupted run). Reports go to ``reports``.
    """

    def __init__(
        self,
        db: Database,
        cfg: Config,
        exchanges: Iterable[str],
        *,
        touched: Callable[[str], Iterable[int]],
        is_ready: Callable[[str, int], bool],
        initial: Mapping[str, Iterable[int]] | None = None,
        reports: list[ChainReport] | None = None,
        trigger: str = "backfill",
        on_merged: Callable[[int], None] | None = None,
        keep_ok_reports: bool = True,
        progress: Display | None = None,
    ) -> None:
        self.db = db
        self.cfg = cfg
        self.exchanges = list(exchanges)
        self.touched = touched
        self.is_ready = is_ready
        self.pending = {ex: set((initial or {}).get(ex, ())) for ex in self.exchanges}
        self.merged: dict[str, set[int]] = {ex: set() for ex in self.exchanges}
        self.reports = reports if reports is not None else []
        self.trigger = trigger
        self.on_merged = on_merged
        #: a year merges in 365 batches: an import keeps only the reports of failed ones
        self.keep_ok_reports = keep_ok_reports
        self.seconds = 0.0  # spent merging
        #: says for whom a merge waits while another run holds the chain lock
        self.progress = progress

    def _waiting(self, holder: str) -> None:
        if self.progress is not None:
            self.progress.waiting_for = holder

    def todo(self, exchange: str) -> set[int]:
        """Hours of ``exchange`` written or known dirty and not merged yet."""
        todo = self.pending.setdefault(exchange, set())
        todo.update(self.touched(exchange))
        todo -= self.merged.setdefault(exchange, set())
        return todo

    def _ready(self, exchange: str, final: bool) -> list[int]:
        todo = self.todo(exchange)
        if final:
            return sorted(todo)
        return sorted(h for h in todo if self.is_ready(exchange, h))

    async def merge(self, final: bool = False) -> None:
        for ex in self.exchanges:
            hours = self._ready(ex, final)
            for i in range(0, len(hours), MERGE_BATCH_HOURS):
                batch = hours[i : i + MERGE_BATCH_HOURS]
                report = await run_chain(
                    self.db, self.cfg, batch, trigger=self.trigger, steps=MERGE_STEPS,
                    exchange=ex, lock_wait_s=None, maintain_partitions=False,
                    on_wait=self._waiting,
                )  # fmt: skip
                self._waiting("")
                self.seconds += report.duration_s
                if self.keep_ok_reports or not report.ok:
                    self.reports.append(report)
                self.merged[ex].update(batch)
                if self.on_merged is not None:
                    self.on_merged(len(batch))

    async def run(self, done: anyio.Event) -> None:
        """Merge what is ready every poll until ``done``; then everything left."""
        while not done.is_set():
            with anyio.move_on_after(MERGE_POLL_S):
                await done.wait()
            if not done.is_set():
                await self.merge()
        await self.merge(final=True)


async def load_and_merge(
    load: Callable[[], Awaitable[None]],
    merger: Merger,
    progress: Display | None = None,
) -> None:
    """Run ``load()`` with ``merger`` beside it (what becomes ready while it runs, everything
    left once it is done) and the progress display; return when both are done."""
    done = anyio.Event()

    async def loading() -> None:
        try:
            await load()
        finally:
            done.set()
            if progress is not None:
                progress.stage = "merging"

    async with anyio.create_task_group() as outer:
        if progress is not None:
            outer.start_soon(progress.run)
        async with anyio.create_task_group() as tg:
            tg.start_soon(merger.run, done)
            tg.start_soon(loading)
        outer.cancel_scope.cancel()
