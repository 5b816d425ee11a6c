"""Gold's ``notional`` and ``vwap`` of one bucket, exactly as the warehouse computes them.

The warehouse (``klined/jobs/gold.py``, ``ops.vwap`` in ``schema.sql``) computes, in
PostgreSQL's unbounded ``numeric``:

* a minute's notional: ``CASE WHEN volume > 0 THEN coalesce(quote_volume, vwap * volume) END``;
* the bucket's: the sum of its minutes' notionals, ``0`` when no minute has volume, NULL when
  a minute with volume has neither a quote volume nor a vwap;
* ``vwap = ops.vwap(notional, sum(volume))``: ``div(notional * 2e18 + volume, volume * 2)``
  scaled by ``1e-18`` (notional / volume rounded half up to 18 decimal places, by an integer
  division truncating toward zero), NULL unless the volume is positive and the notional known.

Spark's decimals cannot do this: they stop at 38 digits, while a Kraken minute's vwap (a
quotient of up to 28 significant digits) times its volume needs more, and the job's
``DECIMAL(38, 18)`` silver holds that vwap already rounded, which moves the bucket's vwap in
its last digit. So this is plain Python :class:`~decimal.Decimal` arithmetic on the lake's exact
text, run by the job as a UDF over each bucket's minutes. It imports nothing but the standard
library: the job ships it to the executors by value, so they need no klined installed.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    ROUND_DOWN,
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    Rounded,
)

#: sums, products and the integer division of ``ops.vwap`` never round here: a rounding would
#: raise (``Inexact``) rather than change a digit
EXACT = Context(
    prec=MAX_PREC,
    Emax=MAX_EMAX,
    Emin=MIN_EMIN,
    rounding=ROUND_DOWN,
    traps=[Inexact, Rounded, InvalidOperation, DivisionByZero, Overflow],
)
#: PostgreSQL's cast to ``numeric(38, 18)`` (half away from zero), for the DECIMAL(38, 18) column
ROUNDED = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, rounding=ROUND_HALF_UP)
PLACES = Decimal("1e-18")
_TWICE_SCALE = 2 * 10**18

#: one silver minute as the lake's text: (volume, quote_volume or None, vwap or None)
Minute = tuple[str, str | None, str | None]


def number(text: str) -> Decimal:
    """The lake's decimal text, as PostgreSQL's ``numeric`` reads it (finite only)."""
    value = EXACT.create_decimal(text.strip())
    if not value.is_finite():
        raise ValueError(f"not a finite number: {text!r:.60}")
    return value


def vwap(notional: Decimal | None, volume: Decimal) -> Decimal | None:
    """``ops.vwap``: notional / volume rounded half up to 18 decimal places; NULL without
    volume or notional."""
    if notional is None or not volume > 0:
        return None
    quotient = EXACT.divide_int(
        EXACT.add(EXACT.multiply(notional, _TWICE_SCALE), volume), EXACT.multiply(volume, 2)
    )
    return EXACT.scaleb(quotient, -18)


def notional_and_volume(minutes: Iterable[Minute]) -> tuple[Decimal | None, Decimal]:
    """The bucket's exact notional (NULL rule above) and ``sum(volume)``."""
    total = Decimal(0)
    volume = Decimal(0)
    unknown = False
    for volume_text, quote_text, vwap_text in minutes:
        v = number(volume_text)
        volume = EXACT.add(volume, v)
        if not v > 0:
            continue
        if quote_text is not None:
            total = EXACT.add(total, number(quote_text))
        elif vwap_text is not None:
            total = EXACT.add(total, EXACT.multiply(number(vwap_text), v))
        else:
            unknown = True
    return (None if unknown else total), volume


def rounded(value: Decimal | None) -> Decimal | None:
    """At 18 decimal places, as ``value::numeric(38, 18)`` rounds it."""
    return None if value is None else ROUNDED.quantize(value, PLACES)


def gold_notional_vwap(minutes: Iterable[Minute]) -> tuple[Decimal | None, Decimal | None]:
    """(notional, vwap) of a bucket for the job's ``DECIMAL(38, 18)`` columns: the vwap of the
    exact notional (18 places by definition), the notional rounded half up to 18 places (it
    has more only when a vwap x volume product does)."""
    notional, volume = notional_and_volume(minutes)
    return rounded(notional), rounded(vwap(notional, volume))
