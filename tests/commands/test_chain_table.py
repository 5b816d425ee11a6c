from klined.jobs.chain_report import ChainReport, HourOutcome, StepOutcome
from klined.model import parse_time


def test_table_says_when_gapfill_left_minutes_missing() -> None:
    hour = parse_time("2026-11-26T10:00:00Z")
    report = ChainReport(
        trigger="manual",
        hours=[
            HourOutcome(
                hour,
                steps=[
                    StepOutcome("bronze", "ok", 1200),
                    StepOutcome("gapfill", "ok", 0, details={"missing": 1800}),
                    StepOutcome("silver", "failed", error="boom"),
                ],
            )
        ],
    )
    lines = report.table().splitlines()
    assert lines[0].split() == ["hour", "bronze", "gapfill", "silver"]
    assert "ok 0 (1,800 missing)" in lines[1]
    assert "ok 1,200" in lines[1] and "FAILED" in lines[1]
    assert lines[-1] == "  2026-11-26T10:00:00Z silver: boom"
    assert not report.ok


def test_an_incomplete_gapfill_is_not_ok() -> None:
    hour = parse_time("2026-11-26T10:00:00Z")
    why = "1,800 minutes left missing, requests failed: exchange unreachable (1,800)"
    report = ChainReport(
        trigger="manual",
        hours=[
            HourOutcome(
                hour,
                steps=[
                    StepOutcome("gapfill", "incomplete", 0, error=why, details={"missing": 1800}),
                    StepOutcome("silver", "ok", 0),
                ],
            )
        ],
    )
    lines = report.table().splitlines()
    assert "incomplete 0 (1,800 missing)" in lines[1] and "ok 0 (" not in lines[1]
    assert lines[-1] == f"  2026-11-26T10:00:00Z gapfill: {why}"
    assert not report.ok and report.hours[0].ok and report.hours[0].incomplete
    assert report.summary().startswith("1 hour(s), 1 incomplete")
