"""A real small filesystem for disk-full tests: a tmpfs of a few MB mounted for one test.

Mounting needs root (CI runs as root); elsewhere the tests that use it skip with one line.
``fill`` takes the remaining space with a ballast file, ``free`` gives it back: the lake's
writes then fail with a real ``ENOSPC`` from the kernel, and succeed again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

BALLAST = "ballast.bin"


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str = "3m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` for the block (skips the test if impossible)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("disk-full tests mount a small tmpfs, which needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(mount: Path) -> int:
    """Take every free byte of the filesystem with a ballast file; return its size."""
    written = 0
    fd = os.open(mount / BALLAST, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for block in (1 << 16, 512, 1):
            data = b"\0" * block
            while True:
                try:
                    written += os.write(fd, data)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


def free(mount: Path) -> None:
    """Give the space back."""
    (mount / BALLAST).unlink(missing_ok=True)
