"""Candles out of the warehouse: exported files, published Parquet datasets, a read API.

* :mod:`~klined.datasets.schema`: the columns and types every dataset shares;
* :mod:`~klined.datasets.stream`: PostgreSQL -> Arrow, streamed by COPY, exact decimals;
* :mod:`~klined.datasets.formats`: one partition's file as Parquet, CSV or JSON lines;
* :mod:`~klined.datasets.targets`: a local folder or S3 prefix, files replaced whole;
* :mod:`~klined.datasets.export`: ``klined export``;
* :mod:`~klined.datasets.publish`: the chain's ``publish`` step;
* :mod:`~klined.datasets.read`: ``klined.read_candles``.

pyarrow loads only when one of them is imported; ``import klined`` stays light.
"""
