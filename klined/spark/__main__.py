"""``python -m klined.spark``: the job in this process (local mode with ``--master``)."""

import sys

from klined.spark.job import main

sys.exit(main())
