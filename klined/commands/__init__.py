"""The ``klined`` subcommands: ``klined <name>`` is :mod:`klined.commands.<name>`.

A command module parses arguments, prints, and picks the exit code; the work it drives lives in
its concept package (``daemon``, ``jobs``, ``checks``, ``sim``, ``tui``, ``demo``). Nothing
below this package imports it. :mod:`klined.cli` imports a command only when it is invoked, so
``klined status`` does not pay for Textual and ``klined sim`` does not import asyncpg.
"""
