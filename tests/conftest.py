"""Shared test setup. Fixtures live in ``tests/fixtures/`` by the real component they start."""

import os

import pytest

# Tests must never depend on the machine's time zone (all times are UTC).
os.environ.setdefault("TZ", "UTC")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

pytest_plugins = [
    "tests.fixtures.pg",
    "tests.fixtures.s3",
    "tests.fixtures.sim",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
