"""The exchanges' published history files: Binance US's kline archive and Kraken's OHLCVT CSVs.

Like :mod:`klined.exchanges`, the formats are kept apart from the I/O: :mod:`.binance` and
:mod:`.kraken` name, plan and parse files (pure), :mod:`.candles` turns parsed rows into
candles (pure), :mod:`.files` streams a CSV out of a zip or a folder on this machine, and
:mod:`.download` fetches Binance's files over HTTP (or from a ``file://`` mirror). Loading
into the warehouse is :mod:`klined.jobs.archive`.

What the files are (looked up, not guessed):

* Binance US publishes daily and monthly zips of 1-minute klines with a ``.CHECKSUM`` file
  each (``<sha256>  <file name>``), at
  ``https://data.binance.us/public_data/spot/daily/klines/<SYMBOL>/1m/<SYMBOL>-1m-YYYY-MM-DD.zip``
  and ``.../spot/monthly/klines/<SYMBOL>/1m/<SYMBOL>-1m-YYYY-MM.zip``
  (https://www.binance.us/institutions/market-history; the same layout as Binance's
  https://data.binance.vision, described in github.com/binance/binance-public-data). A day's
  file appears the next day, a month's early the following month. Each CSV row is a
  ``/api/v3/klines`` row: open time, open, high, low, close, volume, close time, quote volume,
  trades, taker buy base volume, taker buy quote volume, ignore. Spot timestamps are
  microseconds from 2025-01-01 on and milliseconds before (binance-public-data README and its
  issues 386/387), so the unit is read from each value's magnitude; some files start with a
  header row and most do not (issues 246/283); files are occasionally revised.
* Kraken publishes OHLCVT CSVs by hand-downloaded zips: one with the whole history and one
  per quarter since (https://support.kraken.com/hc/en-us/articles/360047124832). Each zip
  holds ``<PAIR>_<minutes>.csv`` per pair and interval (``XBTUSD_1.csv``, REST pair names),
  without a header: time (Unix seconds), open, high, low, close, volume, trades. Intervals
  with no trades are omitted, so a minute missing inside a file's span had no trades.
"""
