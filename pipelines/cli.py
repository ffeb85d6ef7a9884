"""The ``zipfline`` command line (docs/architecture.md, "Command line"): parse, load config,
call the pipeline.

Exit codes: 0 success or nothing to do, 1 a failure in the data or a gate, 2 a usage or config
error. A failure prints one line saying what and where; the traceback only under ``--verbose``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from core.atomic import Busy, atomic_dir
from core.config import Config, load_config
from core.errors import ConfigError, ZipflineError, one_line
from core.layout import TRUTH_DIR, RunContext
from core.spark import get_spark
from pipelines import flow, retrain
from pipelines.report import print_report
from pipelines.retrain import (
    RESULT_FILE,
    RunFailed,
    log_line,
    read_result,
    retrain_lock,
    something_new,
    write_result,
    write_watermark,
)
from pipelines.stages import NAMES as STAGES
from pipelines.sweep import format_sweep, run_sweep

log = logging.getLogger("zipfline")


def _common(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="tracebacks and debug logs")
    if config:
        parser.add_argument(
            "--env", default="local", help="config overlay conf/<env>/ (default: local)"
        )
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config key, e.g. --set train.world_size=2 (repeatable)")  # fmt: skip


def _label_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="CSV, JSONL or Parquet with query,label")
    parser.add_argument("--by", help="who labeled them (default: the current user)")
    parser.add_argument("--round", dest="round_", metavar="ROUND", help="the selection round "
                        "(default: the file's round column, else the selection that picked "
                        "each query)")  # fmt: skip
    parser.add_argument("--format", default="auto", choices=("auto", "csv", "jsonl", "parquet"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zipfline",
        description="Pipelines for large-scale learning on Zipf-distributed data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the whole flow, or a slice of it")
    _common(run)
    run.add_argument("--from", dest="start", choices=STAGES, help="first stage to run")
    run.add_argument("--to", dest="stop", choices=STAGES, help="last stage to run")
    run.add_argument("--run-date", help="YYYY-MM-DD (default: today, UTC)")
    run.add_argument("--force", action="store_true", help="redo stages that finished before")
    run.add_argument("--budget", type=parse_duration, metavar="DURATION",
                     help="training time budget (90, 90s, 10m, 1h) with the setup measured within "
                          "it: --set train.auto=true --set train.time_budget_s=SECONDS")  # fmt: skip
    run.set_defaults(handler=cmd_run)

    gen = sub.add_parser(
        "generate", help="write a Zipf query log with known truth (made-up or WordNet text)"
    )
    _common(gen)
    gen.add_argument("--out", required=True, help="folder to write (must not exist, or --force)")
    gen.add_argument("--events", type=int, help="number of events (default: generate.num_events)")
    gen.add_argument("--seed", type=int, help="seed (default: generate.seed)")
    gen.add_argument("--format", choices=("csv", "jsonl", "parquet"), help="file format")
    gen.add_argument("--source", choices=("synthetic", "wordnet"),
                     help="made-up queries, or WordNet's glosses labeled by lexicographer file "
                          "with a held-out test file (default: generate.source)")  # fmt: skip
    gen.add_argument("--force", action="store_true", help="replace --out if it exists")
    gen.set_defaults(handler=cmd_generate)

    ret = sub.add_parser("retrain", help="the cron entry: run the pipeline if anything is new")
    _common(ret)
    ret.add_argument("--force", action="store_true",
                     help="run even if nothing new arrived, and redo every stage")  # fmt: skip
    # the pipeline run of a retrain, in its child process: where to write its outcome
    ret.add_argument("--child-result", metavar="PATH", help=argparse.SUPPRESS)
    ret.set_defaults(handler=cmd_retrain)

    lab = sub.add_parser("label", help="labels for selected queries: zipfline label import PATH")
    lab_sub = lab.add_subparsers(dest="label_command", required=True, metavar="ACTION")
    imp = lab_sub.add_parser(
        "import", help="merge query,label rows (CSV/JSONL/Parquet) with lineage"
    )
    _common(imp)
    _label_import_arguments(imp)
    imp.set_defaults(handler=cmd_label_import)

    swp = sub.add_parser("sweep", help="the trade-off sweep: budget × n × capacity × precision")
    _common(swp)
    swp.add_argument("--run-date", help="the run date whose shards to use (default: today, UTC)")
    swp.set_defaults(handler=cmd_sweep)

    pln = sub.add_parser(
        "plan", help="predict samples/s per mode and worker count (the alpha-beta model)"
    )
    _common(pln)
    pln.add_argument("--run-date", help="the run date whose shards to use (default: today, UTC)")
    pln.add_argument("--workers", type=_worker_counts, default=[1, 2, 4, 8, 16],
                     help="world sizes to predict, e.g. 1,2,4,8,16 (the default)")  # fmt: skip
    pln.add_argument("--bandwidth", type=float, help="bytes/s between workers (default: measured)")
    pln.add_argument("--latency", type=float, help="seconds a message (default: measured)")
    pln.set_defaults(handler=cmd_plan)

    rep = sub.add_parser("report", help="a run's summary from MLflow")
    _common(rep)
    rep.add_argument("run_id", nargs="?", help="parent run id (default: the latest run)")
    rep.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    rep.set_defaults(handler=cmd_report)

    fail = sub.add_parser(
        "failures", help="do the runs' failures depend on stage, mode, world size, precision, host?"
    )
    _common(fail)
    fail.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    fail.set_defaults(handler=cmd_failures)
    return parser


def _config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    return load_config(args.env, [*args.overrides, *extra])


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``1.5m``, ``10m`` or ``1h``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a positive duration in seconds, or with a unit (90, 90s, 10m, 1h)"
        )
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _worker_counts(text: str) -> list[int]:
    """``1,2,4``: positive worker counts."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: worker counts such as 1,2,4,8,16")
    return counts


def cmd_plan(args: argparse.Namespace) -> int:
    # start-up speed: torch and the measuring code only for this command
    from pipelines.plan import format_plan, run_plan

    for name in ("bandwidth", "latency"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name} = {value}: must be positive")
    ctx = RunContext(_config(args), args.run_date)
    print(format_plan(run_plan(ctx, args.workers, args.bandwidth, args.latency)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    budget = getattr(args, "budget", None)
    extra = ["train.auto=true", f"train.time_budget_s={budget}"] if budget else []
    cfg = _config(args, extra)
    ctx = RunContext(cfg, args.run_date, force=args.force)
    summary = flow.run_pipeline(ctx, start=args.start, stop=args.stop)
    print(format_summary(summary, cfg))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    """Lock, check the watermark, run the whole pipeline (``trigger=cron``) in a child process
    under ``retrain.budget_s``, log one line to ``<data.root>/retrain.log``, move the watermark.

    The lock is held by this process for the whole retrain; the run itself is ``zipfline
    retrain --child-result PATH`` (a hidden option), in its own process group, which this
    process ends whole if it outlives the budget (``pipelines.retrain.run_with_budget``)."""
    if args.child_result:
        return _retrain_child(args)

    cfg = _config(args)
    root = Path(cfg.data.root).expanduser().resolve()
    try:
        with retrain_lock(root):
            new, fp, last = something_new(cfg)
            if not new and not args.force:
                since = f" since {last['finished_at']} (run {last['run_id']})" if last else ""
                print(f"zipfline retrain: nothing new{since}; nothing to do")
                log_line(root, "nothing new")
                return 0
            result_path = root / RESULT_FILE
            result_path.unlink(missing_ok=True)
            child = [sys.executable, "-m", "pipelines", "retrain", "--env", args.env,
                     *[a for item in args.overrides for a in ("--set", item)],
                     "--child-result", str(result_path)]  # fmt: skip
            child += ["--force"] * args.force + ["--verbose"] * args.verbose
            sys.stdout.flush()  # the child writes to the same stdout and stderr
            sys.stderr.flush()
            try:
                code = retrain.run_with_budget(child, cfg.retrain.budget_s)
            except ZipflineError as exc:  # over its budget, or this process was stopped
                log_line(root, f"failed: {exc}")
                raise
            result = read_result(result_path)
            result_path.unlink(missing_ok=True)
            if code != 0 or "run_id" not in result:
                ended = f"signal {-code}" if code < 0 else f"exit code {code}"
                error = result.get("error") or (
                    f"retrain: the pipeline run ended with {ended} and left no result"
                )
                log_line(root, f"failed: {error}")
                raise RunFailed(result.get("message", error), result.get("exit_code", 1))
            write_watermark(root, fp, result["run_id"])
            test_error = result.get("test_error")
            error = f" test_error {test_error:.4f}" if test_error is not None else ""
            verdict = f" promotion {result['promotion']}" if result.get("promotion") else ""
            log_line(root, f"ok run {result['run_id']}{error}{verdict}")
            print(result["summary"])
            return 0
    except Busy as busy:
        pid = f" (pid {busy.args[0]})" if busy.args and busy.args[0] else ""
        print(f"zipfline retrain: another retrain is running{pid}; exiting")
        return 0


def _retrain_child(args: argparse.Namespace) -> int:
    """The pipeline run of a retrain (``trigger=cron``), in the child process that
    :func:`cmd_retrain` started; its outcome goes to ``--child-result`` for the parent."""
    path = Path(args.child_result)
    try:
        cfg = _config(args)
        # forced only by retrain --force: otherwise a stage reruns when its inputs changed
        summary = flow.run_pipeline(RunContext(cfg, force=args.force), trigger="cron")
    except Exception as exc:  # the parent says it, in the one line _guarded would print
        if args.verbose:
            traceback.print_exc()
        if isinstance(exc, ZipflineError):
            message, code = str(exc), exc.exit_code
        else:
            message, code = f"{one_line(exc)} (rerun with --verbose for the traceback)", 1
        write_result(path, {"error": one_line(exc), "message": message, "exit_code": code})
        return code
    ev = summary.results.get("evaluate")
    write_result(path, {
        "run_id": summary.run_id,
        "test_error": ev.metrics["test_error"] if ev else None,
        "promotion": summary.promotion.get("promotion") if summary.promotion else None,
        "summary": format_summary(summary, cfg),
    })  # fmt: skip
    return 0


def cmd_label_import(args: argparse.Namespace) -> int:
    # start-up speed: the label store imports pyspark (seconds), only for this command
    from querylog.labels import IMPORT_PREFIX, QUARANTINE, import_path, labels_root

    cfg = _config(args)
    result = import_path(
        get_spark(cfg.spark), cfg, args.path, fmt=args.format, by=args.by, round_=args.round_
    )
    print(f"zipfline label import: {result.describe()}")
    if result.quarantined:
        where = labels_root(cfg) / QUARANTINE / f"{IMPORT_PREFIX}{result.import_id}"
        print(f"quarantined rows (with their reason): {where}")
    if not result.already and result.imported == 0:
        return 1  # every row was bad: a data failure
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:

    ctx = RunContext(_config(args), args.run_date)
    print(format_sweep(run_sweep(ctx)))
    return 0


def format_summary(summary, cfg: Config) -> str:  # noqa: ANN001
    """The closing table of a run and where to look next."""
    lines = [
        "",
        f"{'stage':<10}{'seconds':>9}{'rows_in':>12}{'rows_out':>12}{'quarantined':>13}{'merged':>11}",
    ]
    for name, r in summary.results.items():
        secs = "skipped" if name in summary.skipped else f"{r.seconds:.1f}"
        lines.append(
            f"{name:<10}{secs:>9}{r.rows_in:>12,}{r.rows_out:>12,}{r.rows_quarantined:>13,}{r.rows_merged:>11,}"
        )
    ev = summary.results.get("evaluate")
    tr = summary.results.get("train")
    if ev:
        m = ev.metrics
        lines.append("")
        lines.append(
            f"test_error {m['test_error']:.4f}  weighted {m['test_error_weighted']:.4f}  "
            f"breadth {m['breadth']:.3f}  acc head/torso/tail "
            f"{m['acc_head']:.3f}/{m['acc_torso']:.3f}/{m['acc_tail']:.3f}"
        )
        extra = [f"{k} {m[k]:.4f}" for k in ("baseline_error", "bayes_error") if k in m]
        if extra:
            lines.append("  ".join(extra))
    if tr:
        lines.append(
            f"train: {int(tr.metrics['steps'])} steps, {tr.metrics['samples_per_s']:,.0f} samples/s, "
            f"stopped by {tr.tags.get('stopped_by')} after {tr.metrics['time_used_s']:.1f}s"
        )
    sel = summary.results.get("select")
    if sel and "select" not in summary.skipped:
        where = Path(cfg.data.root).resolve() / summary.run_date / "select" / "to_label"
        lines.append(
            f"to label: {sel.rows_out:,} queries ({sel.tags.get('strategy_used')}) in "
            f"{where / 'to_label.csv'}; fill in label, then: zipfline label import FILE"
        )
    uri = cfg.tracking.uri
    lines += [
        "",
        f"MLflow run {summary.run_id} ({summary.seconds:.0f}s)  store {uri}",
        f"data:     {Path(cfg.data.root).resolve() / summary.run_date}",
        "report:   zipfline report        (or --json)",
    ]
    page = (
        f"#/experiments/{summary.experiment_id}/runs/{summary.run_id}?workflowType=machine_learning"
    )
    if uri.startswith(("http://", "https://")):  # a tracking server is its own UI
        lines.append(f"UI:       {uri.rstrip('/')}/{page}")
    else:
        lines.append(
            f"UI:       make ui   (mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port "
            f"5000, then http://127.0.0.1:5000/{page})"
        )
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> int:
    # start-up speed: the generator imports pyspark (seconds), only for this command
    from querylog.generator import HELD_OUT_DIR, generate_log

    extra = [f"generate.num_events={args.events}"] if args.events is not None else []
    extra += [f"generate.seed={args.seed}"] if args.seed is not None else []
    extra += [f"generate.format={args.format}"] if args.format else []
    extra += [f"generate.source={args.source}"] if args.source else []
    cfg = _config(args, extra)
    out = Path(args.out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"--out {out}: exists and is not empty (use --force to replace it)")
    with atomic_dir(out) as tmp:
        result = generate_log(get_spark(cfg.spark), cfg.generate, tmp)
    g, m = cfg.generate, result.metrics
    print(f"wrote {result.rows_out:,} events ({m['num_queries']:,} distinct queries, {m['num_labels']} labels, "
          f"{g.source}, {g.format}) to {out}; truth in {out / TRUTH_DIR}")  # fmt: skip
    if "held_out_queries" in m:
        print(f"held-out test: {m['held_out_queries']:,} glosses the log never shows, in "
              f"{out / HELD_OUT_DIR}; run with --set data.raw_path={out} "
              f"--set data.test_path={out / HELD_OUT_DIR}")  # fmt: skip
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print_report(_config(args).tracking, args.run_id, args.json)
    return 0


def cmd_failures(args: argparse.Namespace) -> int:
    # start-up speed: pandas and the analysis, for this command only
    from pipelines.failures import failure_analysis, format_analysis

    data = failure_analysis(_config(args).tracking)
    print(json.dumps(data, indent=2) if args.json else format_analysis(data))
    return 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "zipfline: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for noisy in ("py4j", "mlflow", "alembic", "urllib3", "git", "distributed",
                      "great_expectations"):  # fmt: skip
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _guarded(fn: Callable[[], int], verbose: bool) -> int:
    try:
        return fn()
    except ZipflineError as exc:
        if verbose:
            traceback.print_exc()
        print(f"zipfline: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("zipfline: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a backend failure we did not anticipate: still one line
        if verbose:
            traceback.print_exc()
        print(f"zipfline: error: {one_line(exc)} (rerun with --verbose for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zipfline`` console script and ``python -m pipelines``."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return _guarded(lambda: args.handler(args), args.verbose)


def stage_main(stage: str, argv: Sequence[str] | None = None) -> int:
    """``spark-submit jobs/<stage>.py [--env E] [--set k=v]... [--run-date D] [--force]``: one
    stage alone, tracked like any run."""
    parser = argparse.ArgumentParser(
        prog=f"jobs/{stage}.py", description=f"the {stage} stage alone"
    )
    _common(parser)
    parser.add_argument("--run-date", help="YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--force", action="store_true", help="redo the stage if it finished before")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)

    def go() -> int:

        cfg = _config(args)
        summary = flow.run_pipeline(
            RunContext(cfg, args.run_date, force=args.force), start=stage, stop=stage
        )
        print(format_summary(summary, cfg))
        return 0

    return _guarded(go, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
