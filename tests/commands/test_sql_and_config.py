"""``klined sql`` opens psql on the warehouse (by DSN or the embedded server) and never shows a
password; ``klined config`` redacts passwords and says which DSN is in effect and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from klined.cli import main
from tests.support.process import postgres_for

KLINED = [sys.executable, "-m", "klined.cli"]
SECRET = "s3cr3t-Pa55"


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("KLINED_DSN", "KLINED_CONFIG")}
    out.update(extra)
    return out


def klined(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KLINED, *args], capture_output=True, text=True, timeout=180, env=env(**extra_env)
    )


def write_config(tmp_path: Path, dsn: str = "") -> Path:
    path = tmp_path / "klined.toml"
    path.write_text(f'[daemon]\ndata_dir = "{tmp_path / "data"}"\n[database]\ndsn = "{dsn}"\n')
    return path


def with_password(dsn: str, user: str = "looker") -> str:
    """The test server's DSN as another user with a password (trust auth ignores it)."""
    scheme, rest = dsn.split("://", 1)
    return f"{scheme}://{user}:{SECRET}@{rest.split('@', 1)[1]}"


def test_config_redacts_passwords_and_says_where_the_dsn_comes_from(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"postgresql://klined:{SECRET}@db.internal:5432/klined")
    proc = klined("config", "-c", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["database"]["dsn"] == "postgresql://klined:***@db.internal:5432/klined"
    assert doc["effective"]["dsn"] == "postgresql://klined:***@db.internal:5432/klined"
    assert doc["effective"]["dsn_from"] == f"database.dsn in {cfg}"
    assert doc["effective"]["data_dir"] == str(tmp_path / "data")

    env_dsn = f"postgresql://ops@rds.example:5432/klined?sslmode=require&password={SECRET}"
    proc = klined("config", "-c", str(cfg), KLINED_DSN=env_dsn)
    assert proc.returncode == 0 and SECRET not in proc.stdout
    doc = json.loads(proc.stdout)
    assert doc["effective"]["dsn"] == (
        "postgresql://ops@rds.example:5432/klined?sslmode=require&password=***"
    )
    assert doc["effective"]["dsn_from"] == "KLINED_DSN (environment)"

    proc = klined("config", "-c", str(write_config(tmp_path)))
    doc = json.loads(proc.stdout)
    assert doc["effective"]["dsn"] == ""
    assert doc["effective"]["dsn_from"].startswith("none: the embedded PostgreSQL under ")


@pytest.mark.integration
def test_sql_runs_psql_on_the_configured_dsn_without_showing_the_password(
    tmp_path: Path, pg_dsn: str
) -> None:
    cfg = write_config(tmp_path, with_password(pg_dsn))
    shown = klined("sql", "-c", str(cfg), "--dsn")
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout + shown.stderr
    assert shown.stdout.strip() == with_password(pg_dsn).replace(SECRET, "***")
    assert f"from: database.dsn in {cfg}" in shown.stderr

    # a real psql, the arguments after -- are its own
    subprocess.run(
        ["psql", pg_dsn, "-c", f"CREATE ROLE looker LOGIN PASSWORD '{SECRET}'"],
        check=True,
        capture_output=True,
    )
    proc = klined("sql", "-c", str(cfg), "--", "-tAc", "SELECT current_user")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "looker"
    assert SECRET not in proc.stdout + proc.stderr
    failed = klined("sql", "-c", str(cfg), "--", "-tAc", "SELECT nonsense")
    assert failed.returncode != 0  # psql's own exit code


def test_the_password_travels_in_the_environment_not_on_the_command_line(
    tmp_path: Path,
) -> None:
    fake = tmp_path / "bin" / "psql"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "PGPASSWORD: $PGPASSWORD"\n')
    fake.chmod(0o755)
    dsn = f"postgresql://klined:{SECRET}@db.internal:5432/klined?sslmode=require"
    cfg = write_config(tmp_path, dsn)
    proc = klined("sql", "-c", str(cfg), "--", "-X", PATH=f"{fake.parent}:{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()[0]
    assert argv == "argv: postgresql://klined@db.internal:5432/klined?sslmode=require -X"
    assert proc.stdout.splitlines()[1] == f"PGPASSWORD: {SECRET}"


@pytest.mark.integration
def test_sql_on_the_embedded_server_starts_it_for_the_session_and_stops_it(
    tmp_path: Path,
) -> None:
    cfg = write_config(tmp_path)
    gone = klined("sql", "-c", str(cfg), "--dsn")
    assert gone.returncode == 1
    assert gone.stderr.startswith("error: the embedded PostgreSQL under ")
    assert "is not running" in gone.stderr
    proc = klined("sql", "-c", str(cfg), "--", "-tAc", "SELECT current_database()")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "klined"
    assert not postgres_for(tmp_path / "data" / "pgdata")


def test_a_missing_psql_is_said_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import klined.commands.sql as sql

    monkeypatch.setattr(sql, "find_psql", lambda: None)
    cfg = write_config(tmp_path, "postgresql://klined@db.internal/klined")
    with pytest.raises(SystemExit) as info:
        main(["sql", "-c", str(cfg)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: psql not found: install the PostgreSQL client")
