"""A ``klined`` command as a real child process, its stderr collected as it runs."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
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
