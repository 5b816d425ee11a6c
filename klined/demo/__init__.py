"""``klined demo``: the whole system against the simulator, on one machine, no internet.

See :mod:`klined.demo.run` for what runs in which order and :mod:`klined.commands.demo` for the
command line.
"""
