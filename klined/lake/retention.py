"""Local retention: deleting the local copies of parts S3 holds, verified.

The uploader decides which parts are due (``lake.retention_hours`` after their verified upload,
never before, never in local-only mode); :func:`delete_local` removes them and the folders they
leave empty.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from klined.lake.layout import UPLOADED_SUFFIX, remove_empty_folders


def delete_local(root: Path, keys: list[str]) -> list[str]:
    deleted: list[str] = []
    for key in keys:
        path = root / key
        try:
            # the marker goes first: a crash in between leaves a part that HEAD re-verifies
            path.with_name(path.name + UPLOADED_SUFFIX).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("lake: cannot delete {}: {}", key, exc)
            continue
        deleted.append(key)
        remove_empty_folders(path.parent, root)
    return deleted
