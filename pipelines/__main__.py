"""``python -m pipelines`` is the ``zipfline`` command."""

import sys

from pipelines.cli import main

sys.exit(main())
