"""The real components the integration tests stand on actually start."""

import asyncpg
import boto3
import pytest


@pytest.mark.anyio
async def test_embedded_postgres_answers(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("select 1 + 1") == 2
    finally:
        await conn.close()


def test_moto_s3_round_trip(s3_endpoint: str, s3_bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key="a/b.jsonl", Body=b"{}\n")
    assert s3.get_object(Bucket=s3_bucket, Key="a/b.jsonl")["Body"].read() == b"{}\n"
