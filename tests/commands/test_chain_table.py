from klined.jobs.chain import ChainReport, HourOutcome, StepOutcome
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
