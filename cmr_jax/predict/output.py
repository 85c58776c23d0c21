"""Outputs of a prediction: the summary of its rows, JSON and CSV files, a terminal table.

`write` and `table` take a `predict` result, whose rows are in their JSON form (`Row.to_dict`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmr_jax import files
from cmr_jax.predict import rows as rows_lib

OUTPUT_FORMATS = (".json", ".csv")
LINK_COLUMNS = ("study", "input", "location")
CSV_COLUMNS = ("input", "study", "lvef", "interval_low", "interval_high", "lvef_below_40",
               "interval_includes_40", "loo_se", "views", "warnings", "error", "lvef_reference",
               "interval_method")


def summarize(rows: Sequence[rows_lib.Row]) -> dict[str, Any]:
  """Counts of rows predicted and failed; errors against reference labels where given."""
  predicted = [r for r in rows if r.lvef is not None]
  out: dict[str, Any] = {"rows": len(rows), "predicted": len(predicted),
                         "failed": len(rows) - len(predicted),
                         "with_warnings": sum(bool(r.warnings) for r in predicted)}
  ref = [(r.lvef, r.lvef_reference) for r in predicted if r.lvef_reference is not None]
  if ref:
    err = np.array([p - t for p, t in ref])
    inside = [r.interval[0] <= r.lvef_reference <= r.interval[1] for r in predicted
              if r.lvef_reference is not None and r.interval is not None]
    out.update(labelled=len(ref), mae=float(np.mean(np.abs(err))),
               rmse=float(np.sqrt(np.mean(err ** 2))), bias=float(np.mean(err)),
               interval_coverage=float(np.mean(inside)) if inside else None)
  return out


def _csv_row(row: dict[str, Any]) -> dict[str, str]:
  """A JSON row as a CSV line: numbers to 2 decimals, views and warnings joined in one cell."""
  fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
  views = "; ".join(
      f"{v['view']}{'' if v['slice'] is None else ' ' + str(v['slice'])}={v['attention']:.3f}"
      for v in row["views"])
  return {
      "input": row["input"], "study": row["study"], "lvef": fmt(row["lvef"]),
      "interval_low": fmt(row["interval"][0] if row["interval"] else None),
      "interval_high": fmt(row["interval"][1] if row["interval"] else None),
      "lvef_below_40": "" if row["lvef_below_40"] is None else str(row["lvef_below_40"]).lower(),
      "interval_includes_40": ("" if row["interval_includes_40"] is None
                               else str(row["interval_includes_40"]).lower()),
      "loo_se": fmt(row["loo_se"]), "views": views,
      "warnings": " | ".join(f"{w['code']}: {w['message']}" for w in row["warnings"]),
      "error": row["error"], "lvef_reference": fmt(row["lvef_reference"]),
      "interval_method": row["interval_method"]}


def check_writable(path: str, formats: tuple[str, ...] = OUTPUT_FORMATS,
                   what: str = "output") -> None:
  """Raises ValueError unless `write` can write `path`: a name ending in one of `formats`, in an
  existing writable folder, not an existing folder or read-only file. Check before predicting."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in formats:
    raise ValueError(f"{what} {path}: expected a name ending in {' or '.join(formats)}")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ValueError(f"{what} {path}: the folder {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise ValueError(f"{what} {path}: the folder {folder} is not writable")
  if os.path.isdir(path):
    raise ValueError(f"{what} {path} is a folder")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise ValueError(f"{what} {path} exists and is not writable")


def write(result: dict[str, Any], path: str) -> None:
  """Writes a `predict` result as JSON (everything) or CSV (one line per row), by extension.

  Atomic (`files.write_text`): a failure leaves an earlier file at `path` as it was and no
  temporary file behind.
  """
  check_writable(path)
  if os.path.splitext(path)[1].lower() == ".json":
    text = json.dumps(result, indent=1, allow_nan=False)
  else:
    text = _csv_text(CSV_COLUMNS, (_csv_row(r) for r in result["studies"]))
  files.write_text(path, text, newline="")


def write_links(links: list[dict[str, str]], path: str) -> None:
  """Writes `predict`'s links (study pseudonym, input, location: the folder below the input
  holding the study's files) as CSV, readable by the owner only (folder names may name
  patients: a re-identification key, kept apart from the results). Atomic as `write`."""
  check_writable(path, (".csv",), "--links")
  files.write_text(path, _csv_text(LINK_COLUMNS, links), newline="",
                   opener=lambda name, flags: os.open(name, flags, 0o600))


def _csv_text(columns: tuple[str, ...], rows) -> str:
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  return text.getvalue()


def table(rows: Sequence[dict[str, Any]]) -> str:
  """A short plain-text table of a result's rows (JSON form) for the terminal."""
  lines = []
  for r in rows:
    if r["lvef"] is None:
      lines.append(f"{r['input']}: no prediction: {r['error']}")
      continue
    bounds = (f" [{r['interval'][0]:.1f}, {r['interval'][1]:.1f}]" if r["interval"] else "")
    flag = " LVEF<40%" if r["lvef_below_40"] else ""
    warn = f"; warnings: {', '.join(w['code'] for w in r['warnings'])}" if r["warnings"] else ""
    lines.append(f"{r['input']} ({r['study']}): LVEF {r['lvef']:.1f}%{bounds}{flag}{warn}")
  return "\n".join(lines)
