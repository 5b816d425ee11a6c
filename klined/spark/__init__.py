"""Spark: silver and gold rebuilt from the raw lake on a cluster, by the warehouse's own rules.

An optional extra (``pip install 'klined[spark]'``, which brings PySpark); nothing in klined's
core imports this package. :mod:`klined.spark.job` is the job (``spark-submit`` on a cluster,
``python -m klined.spark --master 'local[2]'`` on one machine), :mod:`klined.spark.rules` the
precedence and gold rules as DataFrame transformations.
"""
