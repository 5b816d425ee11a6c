"""``klined demo``: the whole system against the simulator, on one machine, no internet.

See :mod:`klined.demo.run` for what runs in which order and :mod:`klined.demo.cli` for the
command line.
"""

from klined.demo.cli import demo_command

__all__ = ["demo_command"]
