"""Regenerate the dashboard screenshots in docs/ from the deterministic demo data.

    .venv/bin/python docs/make_screenshots.py [--size 100x30] [--out docs]

Writes ``tui-streams.svg``, ``tui-completeness.svg`` and ``tui-jobs.svg``; they show exactly
what ``klined tui`` draws, with the frozen clock and fake sources of ``klined.tui.fakes``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from klined.tui.app import KlinedApp
from klined.tui.fakes import (
    DEMO_NOW_MS,
    FakeChainRunner,
    FakeStatusSource,
    FakeWarehouseSource,
    demo_completeness,
    demo_job_runs,
    demo_snapshot,
    demo_so_far,
)


def demo_app() -> KlinedApp:
    return KlinedApp(
        FakeStatusSource(demo_snapshot()),
        FakeWarehouseSource(demo_completeness(), demo_job_runs(), demo_so_far()),
        FakeChainRunner(),
        refresh=3600,
        clock=lambda: DEMO_NOW_MS,
    )


async def shoot(out: Path, size: tuple[int, int]) -> list[Path]:
    written = []
    app = demo_app()
    async with app.run_test(size=size) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        for key, name in (("1", "streams"), ("2", "completeness"), ("3", "jobs")):
            await pilot.press(key)
            await pilot.pause()
            path = out / f"tui-{name}.svg"
            path.write_text(app.export_screenshot(title=f"klined tui - {name}"))
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100x30", help="terminal COLUMNSxROWS")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="output folder")
    args = parser.parse_args()
    cols, rows = (int(n) for n in args.size.lower().split("x"))
    for path in asyncio.run(shoot(Path(args.out), (cols, rows))):
        print(path)


if __name__ == "__main__":
    main()
