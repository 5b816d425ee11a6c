"""Readiness checks (``klined check``): config, PostgreSQL, S3, exchanges, archives, daemon,
lake."""
