"""generate: a synthetic Zipf query log with known ground truth, when ``data.raw_path`` is empty.

The generator itself is ``querylog.generator``; its truth lands in ``generate/_truth/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

from core.layout import RunContext, StageResult
from querylog.generator import generate_log

STAGE = "generate"


def run(ctx: RunContext, out: Path) -> StageResult:
    """The ``generate`` stage of a run whose ``data.raw_path`` is empty."""
    return generate_log(ctx.spark, ctx.cfg.generate, out)


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
