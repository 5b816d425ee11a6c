"""Looking at processes the code under test started (shared by the daemon, demo and embedded
PostgreSQL tests)."""

from __future__ import annotations

from pathlib import Path

import psutil


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
