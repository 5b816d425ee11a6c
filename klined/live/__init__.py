"""The live path: proven-final candles from the streams into silver within seconds, gold
following, every change announced (``klined tail``). See :mod:`klined.live.writer`."""

from klined.live.writer import LiveWriter, live_sink

__all__ = ["LiveWriter", "live_sink"]
