"""klined: trustworthy 1-minute OHLCV capture into a lake and a PostgreSQL warehouse."""

__version__ = "0.1.0"
