"""The lake: an append-only local JSONL spool of every captured event, mirrored to S3.

Parts are plain JSONL while open and gzip once sealed (``part-....jsonl.gz``).

Layout and format are fixed (docs/architecture.md) (see :mod:`klined.lake.layout`). Writers use
:class:`LakeWriter`; the daemon runs :class:`LakeUploader`; the bronze loader lists and reads
parts with :meth:`LakeStore.list_parts` / :meth:`LakeStore.read_part_bytes` and decodes them
with :func:`read_part`.
"""

from klined.lake.compress import plain_bytes
from klined.lake.layout import (
    GZ_SUFFIX,
    OPEN_SUFFIX,
    PART_SUFFIX,
    UPLOADED_SUFFIX,
    PartKey,
    hour_dir,
    lake_symbol,
    parse_key,
    part_key,
    s3_key,
)
from klined.lake.reader import (
    LocalPart,
    PartContents,
    iter_local_parts,
    local_hours,
    read_part,
    read_part_file,
)
from klined.lake.s3 import LakeStore, PartRef
from klined.lake.uploader import LakeUploader, UploadMarker, UploadReport
from klined.lake.writer import LakeWriter, seal_open_parts

__all__ = [
    "GZ_SUFFIX",
    "OPEN_SUFFIX",
    "PART_SUFFIX",
    "UPLOADED_SUFFIX",
    "LakeStore",
    "LakeUploader",
    "LakeWriter",
    "LocalPart",
    "PartContents",
    "PartKey",
    "PartRef",
    "UploadMarker",
    "UploadReport",
    "hour_dir",
    "iter_local_parts",
    "lake_symbol",
    "local_hours",
    "parse_key",
    "part_key",
    "plain_bytes",
    "read_part",
    "read_part_file",
    "s3_key",
    "seal_open_parts",
]
