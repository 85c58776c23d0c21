"""Evaluation of a fine-tuned checkpoint on dataset splits: predictions, metrics, plots, report.

For each split, in `{out}/{split}/`:
  predictions.csv  one row per study: study id (pseudonym), subject, site, visit, reference and
                   predicted LVEF, the spread of the test-time-augmentation passes, the
                   cross-fitted bias-corrected predictions, and every bag instance's view (with
                   its short-axis slice number) and attention weight;
  scatter.png, bland_altman.png, roc.png, calibration.png (labelled splits only);
and in `{out}/`: metrics.json (every figure with its subject-bootstrap 95% interval) and
report.md (embeds the plots), whose "Largest errors" section lists each labelled split's
`Options.worst` studies of largest absolute error with their bag, attention, quality warnings
and an ED/ES thumbnail strip in `{out}/worst/` (`cmr_jax.eval.largest_errors`).

Test-time augmentation (`tta` passes): pass 0 is the deterministic centred clip of every cine;
passes 1..tta-1 sample each clip with the training augmentation (crop scale and shift, flip,
intensity; a cardiac phase shift only if the training augmentation had one), seeded by the pass
number. The study's prediction and attention are the means over passes.

Bias correction (mean shift and linear recalibration, `cmr_jax.eval.calibration`) is fitted
within each split by K-fold cross-fitting over subjects, so no study is scored by a correction
fitted on it or on its subject's other scans. Repeatability uses each subject's first two
visits in the split, for the predictions (always) and for the reference labels (both labelled).

A split without any LVEF label is predicted only: its CSV and repeatability are written and the
report says that it has no labels; a partly labelled split is scored on its labelled studies.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import numpy as np

from cmr_jax.data import pipeline
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import types
from cmr_jax.eval import calibration
from cmr_jax.eval import conformal
from cmr_jax.eval import largest_errors
from cmr_jax.eval import metrics
from cmr_jax.eval import plots
from cmr_jax.eval import repeatability
from cmr_jax.eval import report
from cmr_jax import files
from cmr_jax import inference
from cmr_jax import intervals as intervals_lib
from cmr_jax import runs

PREDICTIONS_CSV = "predictions.csv"
METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
PLOTS = ("scatter", "bland_altman", "roc", "calibration")
CROSS_FIT_SCHEME = "{folds}-fold cross-fitting over subjects (seed {seed})"


@dataclasses.dataclass(frozen=True)
class Options:
  """Evaluation settings.

  Attributes:
    tta: prediction passes per study (1: the deterministic pass only).
    n_boot: subject-bootstrap replicates for the intervals.
    seed: seed of the bootstrap and of the cross-fitting folds.
    folds: K of the bias-correction cross-fitting.
    bins: equal-count bins of the calibration curve.
    worst: studies of largest absolute error listed per split (0: none).
    intervals: with a calibrated run (`calibration.json` of the evaluated checkpoint), measure
      the coverage and width of its prediction intervals, predicting as the calibration did
      (`conformal.split_coverage`: its own passes, with leave-one-cine-out bags).
  """

  tta: int = 1
  n_boot: int = metrics.DEFAULT_BOOTSTRAP
  seed: int = 0
  folds: int = calibration.DEFAULT_FOLDS
  bins: int = calibration.DEFAULT_BINS
  worst: int = largest_errors.DEFAULT_COUNT
  intervals: bool = True

  def __post_init__(self):
    if self.tta < 1:
      raise ValueError(f"tta must be at least 1 (the deterministic pass), got {self.tta}")
    if self.n_boot < 1:
      raise ValueError(f"n_boot must be positive, got {self.n_boot}")
    if self.folds < 2:
      raise ValueError(f"folds must be at least 2, got {self.folds}")
    if self.worst < 0:
      raise ValueError(f"worst must be 0 (none) or more, got {self.worst}")


def open_eval_split(data_dir: str, split: str) -> records.StudySource:
  """A split to evaluate, with clear errors for a missing dataset, split or empty split."""
  available = records.read_dataset_info(data_dir)["splits"]
  if split not in available:
    raise ValueError(f"split {split!r} is not in {data_dir} (it has {sorted(available)})")
  if not records.load_index(data_dir, split):
    raise ValueError(f"split {split!r} of {data_dir} holds no study: nothing to evaluate")
  return records.open_split(data_dir, split)


def instance_labels(meta: dict[str, Any], max_instances: int) -> list[str]:
  """The bag's instances of a study as view names, short-axis ones with their slice number."""
  bag = pipeline.bag_indices(meta["views"], np.asarray(meta["slice_index"]), max_instances)
  return [meta["views"][i] + (f" {meta['slice_index'][i]}" if meta["views"][i] == types.SAX
                              else "") for i in bag]


def _clean(value: Any) -> Any:
  """JSON-safe: NaN -> None, numpy scalars -> Python numbers, tuples -> lists."""
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value


def _write_csv(path: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def _fmt(value: float) -> str:
  return "" if not math.isfinite(value) else f"{value:.3f}"


def prediction_rows(p: dict[str, np.ndarray], meta: Sequence[dict[str, Any]], max_instances: int,
                    corrected: dict[str, np.ndarray]) -> tuple[list[dict[str, str]], list[str]]:
  """(rows, columns) of the predictions CSV; `corrected` maps method -> [N] predictions."""
  columns = ["study_id", "subject", "site", "visit", "lvef_reference", "lvef_predicted",
             "lvef_predicted_tta_sd"]
  columns += [f"lvef_corrected_{m}" for m in corrected]
  for k in range(1, max_instances + 1):
    columns += [f"instance_{k}_view", f"instance_{k}_attention"]
  rows = []
  for j, index in enumerate(p["study_index"]):
    m = meta[index]
    row = {"study_id": m["study_id"], "subject": m["subject_id"], "site": m["site"],
           "visit": str(m["visit"]), "lvef_reference": _fmt(float(p["lvef"][j])),
           "lvef_predicted": _fmt(float(p["pred"][j])),
           "lvef_predicted_tta_sd": _fmt(float(p["pred_sd"][j]))}
    for method, values in corrected.items():
      row[f"lvef_corrected_{method}"] = _fmt(float(values[j]))
    labels = instance_labels(m, max_instances)
    codes = [types.VIEWS[c] for c in p["view"][j] if c >= 0]
    if [label.split(" ")[0] for label in labels] != codes:
      raise RuntimeError(f"study {m['study_id']}: the index's bag {labels} differs from the "
                         f"model's views {codes}")
    for k, label in enumerate(labels, start=1):
      row[f"instance_{k}_view"] = label
      row[f"instance_{k}_attention"] = f"{float(p['attention'][j][k - 1]):.4f}"
    rows.append(row)
  return rows, columns


def score_split(p: dict[str, np.ndarray], meta: Sequence[dict[str, Any]],
                options: Options) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(metrics part of a split's result, cross-fitted corrected predictions [N] per method).

  The result has n_studies, n_labelled, n_subjects; when labelled: metrics, bias_correction;
  when the split has rescans: repeatability (repeatability_skipped with the reason when a
  subject's visit numbers are ambiguous). Values are {"value", "ci"} entries (see
  `metrics.with_ci`).
  """
  subjects = [meta[i]["subject_id"] for i in p["study_index"]]
  visits = [meta[i]["visit"] for i in p["study_index"]]
  labelled = ~np.isnan(p["lvef"])
  out: dict[str, Any] = {"n_studies": int(labelled.size), "n_labelled": int(labelled.sum()),
                         "n_subjects": len(set(subjects))}
  corrected: dict[str, np.ndarray] = {}
  truth, pred = p["lvef"][labelled], p["pred"][labelled]
  lab_subjects = [s for s, keep in zip(subjects, labelled) if keep]
  if labelled.any():
    out["metrics"] = metrics.with_ci(truth, pred, lab_subjects, n_boot=options.n_boot,
                                     seed=options.seed)
    if len(set(lab_subjects)) >= 2:
      correction: dict[str, Any] = {
          "scheme": CROSS_FIT_SCHEME.format(folds=min(options.folds, len(set(lab_subjects))),
                                            seed=options.seed)}
      for method in calibration.METHODS:
        values, fits = calibration.cross_fit(truth, pred, lab_subjects, method,
                                             folds=options.folds, seed=options.seed)
        full = np.full(labelled.size, np.nan)
        full[labelled] = values
        corrected[method] = full
        correction[method] = {
            "metrics": metrics.with_ci(truth, values, lab_subjects, n_boot=options.n_boot,
                                       seed=options.seed),
            "fits": [dataclasses.asdict(f) for f in fits]}
      out["bias_correction"] = correction
    else:
      logging.warning("one labelled subject only: no bias correction can be cross-fitted")
  try:
    pairs = repeatability.rescan_pairs(subjects, visits)
  except ValueError as e:  # ambiguous visits: no repeatability, the rest is scored
    logging.warning("no scan-rescan repeatability: %s", e)
    out["repeatability_skipped"] = str(e)
    pairs = np.zeros((0, 2), np.int64)
  if len(pairs):
    rep = {"n_pairs": len(pairs),
           "prediction": repeatability.repeatability(p["pred"][pairs[:, 0]],
                                                     p["pred"][pairs[:, 1]])}
    both = labelled[pairs[:, 0]] & labelled[pairs[:, 1]]
    if both.any():
      rep["reference"] = repeatability.repeatability(p["lvef"][pairs[both, 0]],
                                                     p["lvef"][pairs[both, 1]])
    out["repeatability"] = rep
  return out, corrected


def write_plots(p: dict[str, np.ndarray], corrected: dict[str, np.ndarray], split_dir: str,
                title: str, bins: int) -> None:
  """Writes the split's PNG plots (labelled studies) as `{split_dir}/{name}.png`, name in PLOTS."""
  labelled = ~np.isnan(p["lvef"])
  truth, pred = p["lvef"][labelled], p["pred"][labelled]
  path = lambda name: os.path.join(split_dir, f"{name}.png")  # noqa: E731
  plots.scatter(truth, pred, path("scatter"), title)
  plots.bland_altman(truth, pred, path("bland_altman"), title)
  plots.roc(truth, pred, path("roc"), title)
  curves = {"as predicted": pred}
  curves.update({f"{m} (cross-fitted)": v[labelled] for m, v in corrected.items()})
  plots.calibration_plot(truth, curves, path("calibration"), title, bins)


def evaluate_split(predictor: inference.Predictor, data_dir: str, split: str, out: str,
                   options: Options,
                   cal: intervals_lib.Calibration | None = None) -> dict[str, Any]:
  """Predicts and scores one split, writing `{out}/{split}/`; returns its (JSON-safe) result.
  With `cal`, also the coverage of the calibrated intervals (result["intervals"])."""
  source = open_eval_split(data_dir, split)
  meta = pipeline.study_metadata(source)
  start = time.monotonic()
  p = inference.tta_predictions(predictor, source, options.tta)
  predict_s = time.monotonic() - start
  result, corrected = score_split(p, meta, options)
  split_dir = os.path.join(out, split)
  writer = jax.process_index() == 0
  rows, columns = prediction_rows(p, meta, predictor.config.data.max_instances, corrected)
  if writer:
    os.makedirs(split_dir, exist_ok=True)
    _write_csv(os.path.join(split_dir, PREDICTIONS_CSV), rows, columns)
  result["files"] = {"predictions": os.path.join(split, PREDICTIONS_CSV)}
  if result["n_labelled"]:
    if writer:
      write_plots(p, corrected, split_dir, f"{split} (n={result['n_labelled']})", options.bins)
    result["files"]["plots"] = {name: os.path.join(split, f"{name}.png") for name in PLOTS}
  else:
    logging.warning("split %s of %s has no LVEF label: predictions only (%s)", split, data_dir,
                    os.path.join(split_dir, PREDICTIONS_CSV))
  if options.worst:
    result["largest_errors"] = largest_errors.entries(
        p, rows, source, preprocess.PreprocessConfig.from_dict(predictor.preprocess),
        split=split, n=options.worst, max_instances=predictor.config.data.max_instances,
        out=out, write=writer)
  result["tta"] = {"passes": options.tta, "mean_pred_sd": float(np.mean(p["pred_sd"]))}
  result["predict_s"] = predict_s
  if cal is not None and result["n_labelled"]:
    result["intervals"] = conformal.split_coverage(predictor, cal, source)
  if "metrics" in result:
    m = result["metrics"]
    logging.info("%s: %d studies, MAE %s, AUC(LVEF<40%%) %s", split, result["n_labelled"],
                 report.fmt_with_ci(m["mae"]), report.fmt_with_ci(m["auc_lvef_below_40"], 3))
  return _clean(result)


def evaluate(workdir: str, data_dir: str, splits: Sequence[str], out: str, *,
             which: str = runs.BEST_DIR, options: Options = Options()) -> dict[str, Any]:
  """Evaluates a fine-tuning run's checkpoint on `splits` of a dataset; writes everything to out.

  Args:
    workdir: the fine-tuning run.
    data_dir: a built dataset with the run's preprocessing.
    splits: split names (each gets a section of the report).
    out: output folder (created); a URL gets the files written locally, then uploaded.
    which: "best" (the best validation checkpoint) or "checkpoints" (the latest).
    options: evaluation settings.

  Returns:
    The metrics JSON's content.

  Raises:
    ValueError: an unknown `which`, no split, a missing or empty split, a dataset with other
      preprocessing than the run's, or a checkpoint that does not fit the run's config.
    FileNotFoundError: a missing run, checkpoint or dataset.
  """
  if which not in runs.CHECKPOINT_KINDS:
    raise ValueError(f"unknown checkpoint {which!r}; expected one of {runs.CHECKPOINT_KINDS}")
  splits = list(dict.fromkeys(splits))
  if not splits:
    raise ValueError("no split to evaluate")
  if not files.isdir(workdir):
    raise FileNotFoundError(f"run directory {workdir} not found")
  if files.is_url(out):  # plots and thumbnails are drawn to local files: write all, then upload
    with tempfile.TemporaryDirectory() as local:
      result = evaluate(workdir, data_dir, splits, local, which=which, options=options)
      if jax.process_index() == 0:
        files.copy_tree(local, out)
      return result
  for split in splits:  # fail before loading the model
    open_eval_split(data_dir, split)
  predictor = inference.Predictor(workdir, which=which)
  records.check_preprocess(data_dir, preprocess.PreprocessConfig.from_dict(
      predictor.preprocess))
  result: dict[str, Any] = {
      "workdir": files.abspath(workdir), "checkpoint": which,
      "step": runs.latest_step(workdir, which), "data_dir": files.abspath(data_dir),
      "options": dataclasses.asdict(options),
      "bootstrap": f"subject-level percentile bootstrap, {options.n_boot} replicates, "
                   f"{100 * metrics.CI_LEVEL:g}% intervals",
      "splits": {}}
  cal = None
  if options.intervals and which == runs.BEST_DIR:
    cal = intervals_lib.read(workdir)
    if cal is not None and not cal.belongs_to(predictor.best):
      logging.warning("%s: calibration.json is for step %s, not the best checkpoint's: interval "
                      "coverage not measured (re-run tools/calibrate.py)", workdir, cal.step)
      cal = None
    if cal is not None:
      result["calibration"] = cal.to_dict()
  os.makedirs(out, exist_ok=True)
  for split in splits:
    result["splits"][split] = evaluate_split(predictor, data_dir, split, out, options, cal)
  if jax.process_index() == 0:
    with open(os.path.join(out, METRICS_JSON), "w") as f:
      json.dump(result, f, indent=1, allow_nan=False)
    with open(os.path.join(out, REPORT_MD), "w") as f:
      f.write(report.render(result))
  return result
