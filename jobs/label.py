"""``spark-submit jobs/label.py PATH [--by WHO] [--env E] [--set k=v]``: ``zipfline label import``
under spark-submit. Not a stage: the label store's logic is ``querylog.labels``."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project, not jobs/, on the path
    from pipelines.cli import main

    sys.exit(main(["label", "import", *sys.argv[1:]]))
