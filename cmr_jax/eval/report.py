"""Markdown tables and the evaluation report."""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any

MISSING = "-"


def fmt_value(value: float | int | None, digits: int = 2) -> str:
  """A number for a table: integers as they are, NaN and None as MISSING."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return MISSING
  if isinstance(value, int):
    return str(value)
  return f"{value:.{digits}f}"


def fmt_with_ci(entry: Mapping[str, Any] | None, digits: int = 2) -> str:
  """"value [low, high]" of a {"value", "ci"} metric entry (no brackets without an interval)."""
  if entry is None:
    return MISSING
  text = fmt_value(entry["value"], digits)
  ci = entry.get("ci")
  if text != MISSING and ci is not None and not any(math.isnan(c) for c in ci):
    text += f" [{fmt_value(ci[0], digits)}, {fmt_value(ci[1], digits)}]"
  return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  """A Markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def data_efficiency_table(results: Mapping[str, Mapping[float, Mapping[str, Any]]],
                          metric: str = "mae", digits: int = 2) -> str:
  """One row per label fraction (ascending), one column per model: `metric` with its CI.

  Args:
    results: model name -> label fraction -> metrics ({name: {"value", "ci"}}, as in the
      evaluation's metrics JSON). A model without a fraction gets MISSING there.
    metric: the metric to tabulate.
    digits: decimals.
  """
  fractions = sorted({f for per_model in results.values() for f in per_model})
  rows = [[f"{100 * f:g}%"] + [fmt_with_ci(results[m][f].get(metric), digits)
                               if f in results[m] else MISSING for m in results]
          for f in fractions]
  return markdown_table(["label fraction"] + list(results), rows)
