"""Child processes in tests: a ``klined`` command run for real (its stderr collected as it
runs), and the PostgreSQL servers the code under test started."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psutil
from anyio.abc import Process


@asynccontextmanager
async def command(argv: list[str], env: dict[str, str]) -> AsyncIterator[tuple[Process, bytearray]]:
    """Start ``argv``; yield the process and its stderr so far (read continuously, so a full
    pipe never blocks it). The process is killed if the block leaves it running."""
    log = bytearray()
    async with await anyio.open_process(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    ) as proc:

        async def read_log() -> None:
            assert proc.stderr is not None
            async for chunk in proc.stderr:
                log.extend(chunk)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_log)
                yield proc, log
                with anyio.fail_after(60):
                    await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()


def postgres_for(pgdata: Path) -> list[int]:
    """Live postgres processes whose command line names this data directory."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if "postgres" in (proc.info["name"] or "") and str(pgdata) in cmdline:
            found.append(proc.pid)
    return found
