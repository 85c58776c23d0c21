"""Scoring prepared studies: full and leave-one-cine-out bags, the interval, one `Row` per study.

Interval: split-conformal (`cmr_jax.intervals`) when the run has a calibration made as this
scoring scores (`calibration.json`, from `tools/calibrate.py` or fine-tuning on a dataset with a
`calib` split): pred +/- q * sqrt(val_rmse^2 + loo_se^2) (`normalized`, when the study has a
leave-one-cine-out spread) or pred +/- q (`absolute`), q the calibration studies' conformal
quantile at the level. val_rmse is the checkpoint's validation RMSE (`best.json`), loo_se the
jackknife standard error of the prediction over the bag's cines (each cine left out in turn,
`inference.leave_one_out_cines`). The guarantee (coverage of at least the level) holds for
studies like the calibration studies; it does not cover a shift to another scanner or protocol,
which the warnings try to flag.

Without a calibration the interval is the earlier Gaussian approximation pred +/- 1.96 *
sqrt(val_rmse^2 + loo_se^2) and every row says so: its coverage is not measured.

Test-time augmentation: each bag's prediction and attention are the means over `tta` passes
(`inference.tta_predictions`, as the evaluator's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from cmr_jax.data import pipeline
from cmr_jax.data import quality
from cmr_jax.data import types
from cmr_jax import inference
from cmr_jax import intervals
from cmr_jax.predict import inputs as inputs_lib
from cmr_jax.predict import rows

Z_95 = 1.96  # two-sided 95% normal quantile (the uncalibrated fallback)
DEFAULT_LEVEL = 0.95
REDUCED_EF_PERCENT = 40.0  # LVEF below this is flagged (heart failure with reduced EF)
PLAUSIBLE_LVEF_PERCENT = (5.0, 90.0)
LVEF_RANGE_PERCENT = intervals.LVEF_RANGE_PERCENT  # intervals are clipped to it
MIN_VALIDATION_STUDIES = 30  # fewer make val_rmse a rough estimate


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the rows' intervals rest on: the checkpoint's validation errors and calibration.

  Attributes:
    workdir: the run folder.
    best: its best.json (validation errors of the checkpoint), or None.
    preprocess: the training data's preprocessing.
    max_instances: the bag size.
    calibration: the run's conformal calibration for this checkpoint, or None (absent, or made
      for another checkpoint step: see `stale_calibration`).
    stale_calibration: the step of a calibration.json that belongs to another checkpoint.
    tta, loo: how this scoring predicts (compared with how the calibration was made).
    level: the intervals' nominal coverage.
  """

  workdir: str
  best: dict[str, Any] | None
  preprocess: dict[str, Any]
  max_instances: int
  calibration: intervals.Calibration | None = None
  stale_calibration: int | None = None
  tta: int = 1
  loo: bool = True
  level: float = DEFAULT_LEVEL

  @property
  def val_rmse(self) -> float | None:
    value = (self.best or {}).get("val_rmse")
    return float(value) if value is not None and math.isfinite(value) else None

  def warnings(self) -> list[quality.QualityWarning]:
    """Warnings that hold for every row."""
    cal = self.calibration
    if cal is None:
      why = (f"its calibration.json is for step {self.stale_calibration}, not the checkpoint's"
             if self.stale_calibration is not None else "it has no calibration.json")
      out = [quality.QualityWarning(
          "uncalibrated_intervals", f"{self.workdir}: {why}; intervals are the Gaussian "
          "approximation, their coverage is not measured (run tools/calibrate.py on a split "
          "the checkpoint was not chosen on)")]
      if self.val_rmse is None:
        out.append(quality.QualityWarning(
            "no_validation_errors", f"{self.workdir} has no validation RMSE (best.json): "
            "intervals rest on the leave-one-cine-out spread only"))
      elif int(self.best.get("val_n") or 0) < MIN_VALIDATION_STUDIES:
        out.append(quality.QualityWarning(
            "small_validation", f"the validation RMSE comes from {int(self.best.get('val_n') or 0)}"
            f" studies (fewer than {MIN_VALIDATION_STUDIES}): intervals are rough"))
      return out
    out = []
    if (cal.tta, cal.loo) != (self.tta, self.loo):
      out.append(quality.QualityWarning(
          "calibration_mismatch", f"intervals were calibrated with tta={cal.tta}, "
          f"loo={cal.loo}; this run predicts with tta={self.tta}, loo={self.loo}: their coverage "
          "may differ from the nominal"))
    method = cal.method_for(self.loo)
    if math.isinf(cal.quantile(method, self.level)):
      out.append(quality.QualityWarning(
          "calibration_too_small", f"{cal.n} calibration studies cannot give a "
          f"{self.level:.0%} interval: intervals span {LVEF_RANGE_PERCENT[0]:g}-"
          f"{LVEF_RANGE_PERCENT[1]:g}%"))
    return out

  def describe(self) -> str:
    """How this run's intervals are made, in one line."""
    cal = self.calibration
    if cal is None:
      return (f"pred +/- {Z_95} * sqrt(val_rmse^2 + loo_se^2), clipped to 0-100: val_rmse the "
              "checkpoint's validation RMSE, loo_se the jackknife SE over leave-one-cine-out "
              "predictions; uncalibrated (~95% only where residuals are normal and the study "
              "resembles the validation data)")
    return (f"split-conformal {self.level:.0%} interval calibrated on {cal.n} studies of split "
            f"{cal.split!r} (step {cal.step}, tta={cal.tta}): pred +/- q * sqrt(val_rmse^2 + "
            "loo_se^2) where the study has a leave-one-cine-out spread, else pred +/- q, "
            "clipped to 0-100; at least the nominal coverage for studies like the calibration "
            "studies")


def model_info(predictor: inference.Predictor, workdir: str = "", *, tta: int = 1,
               loo: bool = True, level: float = DEFAULT_LEVEL) -> ModelInfo:
  """The interval's basis and the preprocessing of a predictor.

  Raises:
    ValueError: for a level the run's calibration does not have, or an unreadable
      calibration.json.
  """
  workdir = workdir or getattr(predictor, "workdir", "")
  cal = intervals.read(workdir) if workdir else None
  stale = None
  if cal is not None and not cal.belongs_to(predictor.best):
    cal, stale = None, cal.step
  if cal is not None and intervals.level_key(level) not in cal.quantiles[intervals.ABSOLUTE]:
    raise ValueError(f"{workdir} is calibrated at levels "
                     f"{sorted(cal.quantiles[intervals.ABSOLUTE])}, not {level:g}")
  return ModelInfo(workdir, predictor.best, dict(predictor.preprocess),
                   int(predictor.config.data.max_instances), cal, stale, tta, loo, level)


def interval(pred: float, model: ModelInfo,
             loo_se: float | None) -> tuple[tuple[float, float] | None, str]:
  """((low, high), method) of the prediction interval; (None, why) without any error estimate."""
  low, high = LVEF_RANGE_PERCENT
  cal = model.calibration
  if cal is not None:
    method = cal.method_for(loo_se is not None)
    bounds = cal.interval(pred, model.level, method, loo_se)
    q = cal.quantile(method, model.level)
    formula = (f"pred +/- {q:.3g} * sqrt(val_rmse^2 + loo_se^2)" if method == intervals.NORMALIZED
               else f"pred +/- {q:.3g}")
    return bounds, (f"split-conformal {model.level:.0%} ({method}, {cal.n} calibration studies): "
                    f"{formula}, clipped to {low:g}-{high:g}")
  terms = [(name, v) for name, v in (("val_rmse", model.val_rmse), ("loo_se", loo_se))
           if v is not None]
  if not terms:
    return None, "none: no validation errors in the run and no leave-one-cine-out spread"
  half = Z_95 * math.sqrt(sum(v * v for _, v in terms))
  formula = " + ".join(f"{name}^2" for name, _ in terms)
  return ((max(low, pred - half), min(high, pred + half)),
          f"uncalibrated: pred +/- {Z_95} * sqrt({formula}), clipped to {low:g}-{high:g}")


def make_row(item: inputs_lib.Prepared, out: dict[str, np.ndarray] | None,
             model: ModelInfo) -> rows.Row:
  """The output row of one study: its full-bag prediction (`out` index 0), leave-one-cine-out
  predictions (the rest) and warnings; `out` None for a study that was not scored."""
  record = item.record
  reference = float(record.lvef) if record is not None and record.has_labels else None
  warnings = list(item.warnings)
  if out is None:
    return rows.Row(item.input, item.study, warnings=tuple(warnings), error=item.error,
                    lvef_reference=reference)
  if not (np.all(np.isfinite(out["pred"])) and np.all(np.isfinite(out["attention"]))):
    return rows.Row(
        item.input, item.study, warnings=tuple(warnings), lvef_reference=reference,
        error="the model returned a non-finite LVEF or attention (a broken checkpoint?)")
  pred = float(out["pred"][0])
  loo = out["pred"][1:]
  loo_se = inference.jackknife_se(loo) if loo.size else None
  bounds, method = interval(pred, model, loo_se)
  bag = pipeline.bag_indices(record.views, record.slice_index, model.max_instances)
  low, high = PLAUSIBLE_LVEF_PERCENT
  if not low <= pred <= high:
    warnings.append(quality.QualityWarning(
        "implausible_lvef", f"predicted LVEF {pred:.1f}% is outside {low:g}-{high:g}%: check "
        "the input"))
  if len(bag) < 2:
    warnings.append(quality.QualityWarning("single_cine", "the model saw one cine only"))
  elif loo_se is not None and model.val_rmse is not None and loo_se > model.val_rmse:
    warnings.append(quality.QualityWarning(
        "view_sensitive", f"the prediction moves with single cines (leave-one-cine-out SE "
        f"{loo_se:.1f} > validation RMSE {model.val_rmse:.1f})"))
  return rows.Row(
      item.input, item.study, lvef=pred, interval=bounds, interval_method=method, loo_se=loo_se,
      lvef_below_40=pred < REDUCED_EF_PERCENT,
      interval_includes_40=None if bounds is None else bounds[0] <= REDUCED_EF_PERCENT <= bounds[1],
      views=tuple(rows.BagView(
          record.views[i], int(record.slice_index[i]) if record.views[i] == types.SAX else None,
          float(out["attention"][0][slot])) for slot, i in enumerate(bag)),
      warnings=tuple(warnings), error=item.error, lvef_reference=reference)


def score(predictor: inference.Predictor, prepared: Iterable[inputs_lib.Prepared], *,
          loo: bool = True, workdir: str = "", tta: int = 1,
          level: float = DEFAULT_LEVEL, model: ModelInfo | None = None) -> list[rows.Row]:
  """One row per prepared study, in order; studies are scored in groups of a few batches.

  Args:
    predictor: the fine-tuned model.
    prepared: studies from `prepare_input` / `prepare_split` (errors pass through as rows).
    loo: also score the leave-one-cine-out bags (bag size + 1 forward passes per study).
    workdir: the run's folder (its calibration.json), for messages.
    tta: prediction passes averaged per bag: the deterministic pass and tta - 1 samplings with
      the training augmentation (seeded, so a re-run gives the same numbers).
    level: the intervals' nominal coverage (one the run is calibrated at).
    model: `model_info(predictor, workdir, tta=tta, loo=loo, level=level)` when the caller has
      it already (made here otherwise).
  """
  if model is None:
    model = model_info(predictor, workdir, tta=tta, loo=loo, level=level)
  return [make_row(item, out, model) for item, out in inference.bag_outputs(
      predictor, prepared, record_of=lambda item: item.record, loo=loo, tta=tta)]
