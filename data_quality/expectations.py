"""Expectations as data: what a gate checks, and the Spark predicate of a failing row.

A :class:`Check` names a Great Expectations 1.x expectation type and its arguments, the gate's
frame it applies to and its policy. Row-level types also get a Spark ``Column`` that is true for
exactly the rows Great Expectations counts as unexpected (nulls are skipped as GX skips them),
so the ``quarantine`` policy and the sample values of a failure come from the same definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from core.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """One expectation of a gate."""

    name: str
    type: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    frame: str = "rows"
    policy: str = "fail"

    def expectation(self) -> Any:
        """The Great Expectations object, with this check's name in its ``meta``."""
        # start-up speed: Great Expectations imports in seconds
        from great_expectations.expectations.registry import get_expectation_impl

        try:
            impl = get_expectation_impl(self.type)
        except Exception as exc:  # GX raises its own ExpectationNotFoundError
            raise ConfigError(f"expectation {self.name}: unknown type {self.type!r}") from exc
        try:
            return impl(**self.kwargs, meta={"zipfline_name": self.name})
        except Exception as exc:  # pydantic ValidationError: bad or missing arguments
            first = str(exc).splitlines()[0]
            raise ConfigError(f"expectation {self.name} ({self.type}): {first}") from exc

    @property
    def row_level(self) -> bool:
        return self.type in ROW_PREDICATES

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")


def _between(c: Column, kwargs: dict[str, Any]) -> Column:
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    out = F.lit(False)
    if lo is not None:
        out = out | ((c <= lo) if kwargs.get("strict_min") else (c < lo))
    if hi is not None:
        out = out | ((c >= hi) if kwargs.get("strict_max") else (c > hi))
    return c.isNotNull() & out


ROW_PREDICATES = {
    "expect_column_values_to_not_be_null": lambda c, kw, df: c.isNull(),
    "expect_column_values_to_be_null": lambda c, kw, df: c.isNotNull(),
    "expect_column_values_to_match_regex": lambda c, kw, df: c.isNotNull() & ~c.rlike(kw["regex"]),
    "expect_column_values_to_not_match_regex": lambda c, kw, df: (
        c.isNotNull() & c.rlike(kw["regex"])
    ),
    "expect_column_value_lengths_to_be_between": lambda c, kw, df: _between(F.length(c), kw),
    "expect_column_values_to_be_in_set": lambda c, kw, df: (
        c.isNotNull() & ~c.isin(list(kw["value_set"]))
    ),
    "expect_column_values_to_not_be_in_set": lambda c, kw, df: c.isin(list(kw["value_set"])),
    "expect_column_values_to_be_between": lambda c, kw, df: _between(c, kw),
    "expect_column_values_to_be_unique": lambda c, kw, df: (
        c.isNotNull() & (F.count(F.lit(1)).over(Window.partitionBy(c)) > 1)
    ),
}


def unexpected(check: Check, df: DataFrame) -> Column:
    """True for the rows of ``df`` that fail ``check`` (a row-level check)."""
    if not check.row_level:
        raise ConfigError(f"expectation {check.name} ({check.type}) is not a row-level check")
    if check.column not in df.columns:
        raise ConfigError(f"expectation {check.name}: no column {check.column!r} in its frame")
    return ROW_PREDICATES[check.type](F.col(check.column), check.kwargs, df)
