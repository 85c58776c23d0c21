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
  if text != MISSING and ci is not None and MISSING not in map(fmt_value, ci):
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


# (key, label, decimals) of the metrics table, in order; "{t}" is a detection threshold.
REGRESSION_ROWS = (("mae", "MAE", 2), ("abs_error_sd", "SD of absolute error", 2),
                   ("rmse", "RMSE", 2), ("bias", "bias (predicted - reference)", 2),
                   ("loa_low", "95% limit of agreement, lower", 2),
                   ("loa_high", "95% limit of agreement, upper", 2),
                   ("pearson_r", "Pearson r", 3), ("r2", "R^2", 3))
DETECTION_ROWS = (("auc_lvef_below_{t}", "AUC, LVEF < {t}%", 3),
                  ("sensitivity_lvef_below_{t}", "sensitivity, LVEF < {t}%", 3),
                  ("specificity_lvef_below_{t}", "specificity, LVEF < {t}%", 3),
                  ("n_lvef_below_{t}", "studies with LVEF < {t}%", 0))
REPEATABILITY_ROWS = (("mean_abs_diff", "mean absolute difference", 2),
                      ("mean_diff", "mean difference (rescan - scan)", 2),
                      ("loa_low", "95% limit of agreement, lower", 2),
                      ("loa_high", "95% limit of agreement, upper", 2),
                      ("within_subject_sd", "within-subject SD", 2),
                      ("repeatability_coefficient", "repeatability coefficient (2.77 x wSD)", 2),
                      ("icc_2_1", "ICC(2,1), absolute agreement", 3),
                      ("icc_3_1", "ICC(3,1), consistency", 3))
CORRECTION_LABELS = {"shift": "mean shift", "linear": "linear recalibration"}
PLOT_TITLES = {"scatter": "predicted vs reference", "bland_altman": "Bland-Altman",
               "roc": "ROC", "calibration": "calibration"}
LARGEST_ERRORS_HEADER = ["rank", "study", "subject", "reference LVEF (%)", "predicted (%)",
                         "absolute error", "bag: view (attention)", "warnings"]
LARGEST_ERRORS_INTRO = (
    "The studies of largest absolute error in each split (`--worst`), largest first. "
    "Warnings: those `cmr_jax.data.quality` derives from a study's record (views, short-axis "
    "slices, pixel size); its acquisition warnings need the DICOM. Thumbnails: the "
    "end-diastolic (top) and end-systolic (bottom) frame of every cine of the bag, ED and ES "
    "being the largest and smallest blood-pool signal of the short-axis cines.")


def _metric_rows(thresholds: list[str]) -> list[tuple[str, str, int]]:
  rows = list(REGRESSION_ROWS)
  for t in thresholds:
    rows += [(k.format(t=t), label.format(t=t), d) for k, label, d in DETECTION_ROWS]
  return rows


def _thresholds(m: Mapping[str, Any]) -> list[str]:
  prefix = "auc_lvef_below_"
  return [k[len(prefix):] for k in m if k.startswith(prefix)]


def headline(split: str, s: Mapping[str, Any]) -> str:
  """One line per split: MAE, after the linear correction, and AUC(LVEF<40%), with CIs."""
  if "metrics" not in s:
    return f"- **{split}**: {s['n_studies']} studies, no LVEF labels (predictions only)"
  m = s["metrics"]
  line = f"- **{split}** (n={s['n_labelled']}): MAE {fmt_with_ci(m['mae'])}"
  for method, label in CORRECTION_LABELS.items():
    if method in s.get("bias_correction", {}):
      line += f"; after {label} {fmt_with_ci(s['bias_correction'][method]['metrics']['mae'])}"
  if "auc_lvef_below_40" in m:
    line += f"; AUC(LVEF<40%) {fmt_with_ci(m['auc_lvef_below_40'], 3)}"
  return line


def _split_section(split: str, s: Mapping[str, Any]) -> list[str]:
  lines = [f"## Split `{split}`", "",
           f"{s['n_studies']} studies of {s['n_subjects']} subjects, {s['n_labelled']} with an "
           f"LVEF label. Predictions: `{s['files']['predictions']}`."]
  if s["tta"]["passes"] > 1:
    lines.append(f"Test-time augmentation: {s['tta']['passes']} passes; mean SD of a study's "
                 f"prediction over passes {fmt_value(s['tta']['mean_pred_sd'])}.")
  lines.append("")
  if "metrics" not in s:
    lines += ["**No LVEF labels in this split: predictions only, no metrics.**", ""]
  else:
    if s["n_labelled"] < s["n_studies"]:
      lines += [f"{s['n_studies'] - s['n_labelled']} unlabelled studies are predicted but not "
                "scored.", ""]
    correction = s.get("bias_correction", {})
    methods = [m for m in CORRECTION_LABELS if m in correction]
    header = ["metric", "as predicted"] + [f"{CORRECTION_LABELS[m]} (cross-fitted)"
                                           for m in methods]
    rows = []
    for key, label, digits in _metric_rows(_thresholds(s["metrics"])):
      rows.append([label, fmt_with_ci(s["metrics"][key], digits)]
                  + [fmt_with_ci(correction[m]["metrics"][key], digits) for m in methods])
    lines += ["### Agreement and detection (95% CI)", "", markdown_table(header, rows), "",
              "Sensitivity and specificity call a study reduced when its prediction is below "
              "the threshold; the AUC ranks studies by their prediction.", ""]
    if methods:
      fits = correction["linear"]["fits"] if "linear" in correction else []
      shifts = [f["intercept"] for f in correction.get("shift", {}).get("fits", [])]
      lines.append(f"Bias correction: {correction['scheme']}; each study is corrected by a fit "
                   "on the other folds' subjects only (its intervals hold those corrected "
                   "predictions fixed: the fits' own uncertainty is not included).")
      if shifts:
        lines.append(f"Fitted shifts {fmt_value(min(shifts))} to {fmt_value(max(shifts))}.")
      if fits:
        lines.append("Fitted linear corrections: slope "
                     f"{fmt_value(min(f['slope'] for f in fits), 3)} to "
                     f"{fmt_value(max(f['slope'] for f in fits), 3)}.")
      lines.append("")
  lines += _intervals_lines(s.get("intervals"))
  if "repeatability_skipped" in s:
    lines += [f"No scan-rescan repeatability: {s['repeatability_skipped']}.", ""]
  rep = s.get("repeatability")
  if rep:
    sources = [k for k in ("prediction", "reference") if k in rep]
    rows = [[label] + [fmt_value(rep[src][key], digits) for src in sources]
            for key, label, digits in REPEATABILITY_ROWS]
    lines += [f"### Scan-rescan repeatability ({rep['n_pairs']} pairs)", "",
              markdown_table([""] + [{"prediction": "model", "reference": "reference label"}[k]
                                     for k in sources], rows), ""]
  if "plots" in s["files"]:
    lines += ["### Plots", ""]
    lines += [f"![{PLOT_TITLES[name]}]({path})" for name, path in s["files"]["plots"].items()]
    lines.append("")
  return lines


def interval_headline(split: str, iv: Mapping[str, Any]) -> str:
  """One line: coverage and mean width of each calibrated interval on a split."""
  parts = [f"{method} {float(level):.0%}: coverage {c['coverage']:.3f}, width "
           f"{c['mean_width']:.1f}" for method, levels in iv["methods"].items()
           for level, c in levels.items()]
  return (f"- **{split}** intervals (n={iv['n']}, tta={iv['tta']}, MAE {iv['mae']:.2f}): "
          + "; ".join(parts))


def _intervals_lines(iv: Mapping[str, Any] | None) -> list[str]:
  if not iv:
    return []
  rows = [[method, f"{float(level):.0%}", f"{c['coverage']:.3f}", fmt_value(c["mean_width"]),
           f"{c['mean_width'] / iv['mae']:.1f}" if iv["mae"] > 0 else "-"]
          for method, levels in iv["methods"].items() for level, c in levels.items()]
  return [f"### Prediction intervals ({iv['n']} studies)", "",
          f"Predicted as `tools/predict.py` predicts ({iv['tta']} passes, leave-one-cine-out "
          f"bags: {iv['loo']}; MAE of these predictions {fmt_value(iv['mae'])}), with the "
          "run's split-conformal calibration (`calibration.json`).", "",
          markdown_table(["method", "nominal", "coverage", "mean width", "width / MAE"], rows),
          ""]


def _largest_error_rows(studies: list[Mapping[str, Any]]) -> list[list[str]]:
  return [[str(e["rank"]), f"`{e['study_id']}`", f"`{e['subject']}`",
           fmt_value(e["lvef_reference"]), fmt_value(e["lvef_predicted"]),
           fmt_value(e["abs_error"]),
           ", ".join(f"{i['view']} ({i['attention']:.3f})" for i in e["instances"]),
           ", ".join(w["code"] for w in e["warnings"]) or "none"] for e in studies]


def _largest_errors_split(split: str, s: Mapping[str, Any]) -> list[str]:
  studies = s["largest_errors"]
  if not studies:
    return [f"### Split `{split}`", "", "No LVEF labels: no errors to rank.", ""]
  lines = [f"### Split `{split}`: {len(studies)} largest of {s['n_labelled']} labelled studies",
           "", markdown_table(LARGEST_ERRORS_HEADER, _largest_error_rows(studies)), ""]
  for e in studies:
    lines.append(f"**{e['rank']}. `{e['study_id']}`**: "
                 + ("; ".join(w["message"] for w in e["warnings"]) or "no quality warning") + ".")
    lines += ["", f"![{e['rank']}. {e['study_id']}: ED and ES frames of the bag]"
              f"({e['thumbnail']})", ""]
  return lines


def largest_errors_section(splits: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """The "Largest errors" section: each split's entries (`cmr_jax.eval.largest_errors`); no
  lines when no split has them (`--worst=0`)."""
  listed = {split: s for split, s in splits.items() if "largest_errors" in s}
  if not listed:
    return []
  lines = ["## Largest errors", "", LARGEST_ERRORS_INTRO, ""]
  for split, s in listed.items():
    lines += _largest_errors_split(split, s)
  return lines


def render(result: Mapping[str, Any]) -> str:
  """The Markdown report of an evaluation result (`cmr_jax.eval.evaluate.evaluate`)."""
  step = "" if result["step"] is None else f", step {result['step']}"
  lines = [f"# Evaluation of `{result['workdir']}` ({result['checkpoint']} checkpoint{step})", "",
           f"Dataset `{result['data_dir']}`; {result['options']['tta']} prediction pass(es) per "
           f"study; intervals: {result['bootstrap']}.", ""]
  lines += [headline(split, s) for split, s in result["splits"].items()]
  if "calibration" in result:
    cal = result["calibration"]
    lines += ["", f"Prediction intervals calibrated on {cal['n']} studies of split "
              f"`{cal['split']}` (split conformal, step {cal['step']}):"]
    lines += [interval_headline(split, s["intervals"]) for split, s in result["splits"].items()
              if s.get("intervals")]
  lines.append("")
  for split, s in result["splits"].items():
    lines += _split_section(split, s)
  lines += largest_errors_section(result["splits"])
  return "\n".join(lines)
