"""The one error hierarchy of zipfline.

Every user-facing failure derives from :class:`ZipflineError`. Each carries the exit code the
CLI returns for it (docs/architecture.md, "Command line": 1 for data or gate failures, 2 for
usage or config errors) and a
message that names what and where; the cause is chained with ``raise ... from exc``.
"""

from __future__ import annotations

import re


class ZipflineError(Exception):
    """Base class: a failure the CLI reports in one line, without a traceback."""

    exit_code: int = 1


class ConfigError(ZipflineError):
    """A bad config key or value, a missing env overlay, a bad command-line argument."""

    exit_code = 2


class EnvironmentProblem(ZipflineError):
    """Something the machine lacks (Java, a package) that must be installed first."""

    exit_code = 2


class DataError(ZipflineError):
    """The input data cannot be processed: no rows, a file with the wrong schema, bad counts."""

    exit_code = 1


class StageError(ZipflineError):
    """A stage failed for a reason other than its input data (a subprocess, a launcher)."""

    exit_code = 1


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_.]*(?:Error|Exception)): (.+)$")


def one_line(exc: BaseException) -> str:
    """The most telling line of an unexpected error: for a Python error raised inside a Spark
    worker, the worker's own last ``SomeError: message`` line, not the JVM wrapper's."""
    text = str(exc).strip()
    found = [m for m in map(_ERROR_LINE.match, text.splitlines()) if m]
    if found:
        name, message = found[-1].groups()
        return f"{name.rsplit('.', 1)[-1]}: {message.strip()[:500]}"
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:500]}"


def error_class(exc: BaseException) -> str:
    """The class name of :func:`one_line`: what a failure is counted as (``DataError``,
    ``OutOfMemoryError``, ``ValueError`` raised in a Spark worker, …)."""
    return one_line(exc).split(":", 1)[0]
