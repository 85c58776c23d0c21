"""Scoring prepared studies: full and leave-one-cine-out bags, the interval, one `Row` per study.

Interval: pred +/- 1.96 sqrt(val_rmse^2 + loo_se^2), where val_rmse is the checkpoint's RMSE on
its validation split (`best.json`) and loo_se the jackknife standard error of the prediction
over the bag's cines (each cine left out in turn, `leave_one_out_cines`). val_rmse says how far
off the model is on average on data like its validation set; loo_se how much this study's
estimate rests on single cines. It is a ~95% interval only where validation residuals are
roughly normal and the study resembles the validation data: it does not cover a shift to
another scanner or protocol, which the warnings try to flag.

Test-time augmentation: each bag's prediction and attention are the means over `tta` passes
(`inference.tta_predictions`, as the evaluator's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cmr_jax.data import pipeline
from cmr_jax.data import quality
from cmr_jax.data import types
from cmr_jax import inference
from cmr_jax.predict import inputs as inputs_lib
from cmr_jax.predict import rows

Z_95 = 1.96  # two-sided 95% normal quantile
REDUCED_EF_PERCENT = 40.0  # LVEF below this is flagged (heart failure with reduced EF)
PLAUSIBLE_LVEF_PERCENT = (5.0, 90.0)
LVEF_RANGE_PERCENT = (0.0, 100.0)  # intervals are clipped to it
MIN_VALIDATION_STUDIES = 30  # fewer make val_rmse a rough estimate
BAGS_PER_CALL = 4  # bags scored per Predictor call, in eval batches


def _sax_with_bag(sax: list[int], wanted: list[int]) -> list[int]:
  """SAX cines of the stack `sax` (base to apex) whose bag SAX slices are exactly `wanted`.

  `wanted` are bag slices (at least two stack positions apart) in stack order. Up to three
  are interleaved with one unused slice each (at most 5 slices: not trimmed, every second from
  the first); more get an unused slice before the first and after the last as well (more than
  5: trimmed, then every second). See `pipeline.bag_indices`.
  """
  if not wanted:
    return []
  at = [sax.index(i) for i in wanted]
  core = [c for p in at[:-1] for c in (sax[p], sax[p + 1])] + [wanted[-1]]
  if len(core) <= pipeline.TRIM_SAX_ABOVE:
    return core
  return [sax[at[0] - 1]] + core + [sax[at[-1] + 1]]


def leave_one_out_cines(views: Sequence[str], slice_index: np.ndarray,
                        max_instances: int) -> list[list[int]]:
  """Cine subsets whose bags are the study's bag without one cine each (in bag order).

  `pipeline.bag_indices` takes every second SAX slice, of the stack without its first and last
  slice when it has more than 5: each subset keeps the other bag cines and just enough unused
  SAX slices around them that the rule picks those again, and no slice beyond `max_instances`
  slides in.

  Args:
    views: [N] view of each cine.
    slice_index: [N] SAX order base->apex (-1 for long-axis).
    max_instances: K, the bag size.

  Returns:
    Sorted cine indices per left-out bag cine; [] for a bag of one cine.
  """
  bag = pipeline.bag_indices(list(views), slice_index, max_instances)
  if len(bag) < 2:
    return []
  sax = sorted((i for i, v in enumerate(views) if v == types.SAX), key=lambda i: slice_index[i])
  lax = [i for i in bag if views[i] != types.SAX]
  sax_in_bag = [i for i in bag if views[i] == types.SAX]
  return [sorted([j for j in lax if j != i]
                 + _sax_with_bag(sax, [j for j in sax_in_bag if j != i])) for i in bag]


def subset_record(record: types.StudyRecord, cines: Sequence[int]) -> types.StudyRecord:
  """The record with only `cines` (indices), in that order; no checksum."""
  idx = np.asarray(cines, dtype=np.int64)
  return dataclasses.replace(
      record, frames=record.frames[idx], views=[record.views[i] for i in cines],
      slice_index=record.slice_index[idx], slice_position_mm=record.slice_position_mm[idx],
      source_spacing_mm=record.source_spacing_mm[idx], checksum="")


@dataclasses.dataclass(frozen=True)
class _Bags:
  """A `pipeline.Source` of records, each whole or cut to some cines when read."""

  items: list[tuple[types.StudyRecord, list[int] | None]]

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> types.StudyRecord:
    record, cines = self.items[index]
    return record if cines is None else subset_record(record, cines)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the rows' intervals rest on: the checkpoint's validation errors."""

  workdir: str
  best: dict[str, Any] | None  # best.json
  preprocess: dict[str, Any]
  max_instances: int

  @property
  def val_rmse(self) -> float | None:
    value = (self.best or {}).get("val_rmse")
    return float(value) if value is not None and math.isfinite(value) else None

  def warnings(self) -> list[quality.QualityWarning]:
    """Warnings that hold for every row."""
    if self.val_rmse is None:
      return [quality.QualityWarning(
          "no_validation_errors", f"{self.workdir} has no validation RMSE (best.json): "
          "intervals rest on the leave-one-cine-out spread only")]
    n = int(self.best.get("val_n") or 0)
    if n < MIN_VALIDATION_STUDIES:
      return [quality.QualityWarning(
          "small_validation", f"the validation RMSE comes from {n} studies (fewer than "
          f"{MIN_VALIDATION_STUDIES}): intervals are rough")]
    return []


def model_info(predictor: inference.Predictor, workdir: str = "") -> ModelInfo:
  """The interval's basis and the preprocessing of a predictor."""
  return ModelInfo(workdir, predictor.best, dict(predictor.preprocess),
                   int(predictor.config.data.max_instances))


def interval(pred: float, val_rmse: float | None,
             loo_se: float | None) -> tuple[tuple[float, float] | None, str]:
  """((low, high), method) of the prediction interval; (None, why) without any error estimate."""
  terms = [(name, v) for name, v in (("val_rmse", val_rmse), ("loo_se", loo_se)) if v is not None]
  if not terms:
    return None, "none: no validation errors in the run and no leave-one-cine-out spread"
  half = Z_95 * math.sqrt(sum(v * v for _, v in terms))
  formula = " + ".join(f"{name}^2" for name, _ in terms)
  low, high = LVEF_RANGE_PERCENT
  return ((max(low, pred - half), min(high, pred + half)),
          f"pred +/- {Z_95} * sqrt({formula}), clipped to {low:g}-{high:g}")


def jackknife_se(preds: np.ndarray) -> float:
  """Jackknife standard error from the n leave-one-out estimates."""
  n = preds.size
  return float(math.sqrt((n - 1) / n * np.sum((preds - preds.mean()) ** 2)))


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
  loo_se = jackknife_se(loo) if loo.size else None
  bounds, method = interval(pred, model.val_rmse, loo_se)
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
          loo: bool = True, workdir: str = "", tta: int = 1) -> list[rows.Row]:
  """One row per prepared study, in order; studies are scored in groups of a few batches.

  Args:
    predictor: the fine-tuned model.
    prepared: studies from `prepare_input` / `prepare_split` (errors pass through as rows).
    loo: also score the leave-one-cine-out bags (bag size + 1 forward passes per study).
    workdir: the run's folder, for messages.
    tta: prediction passes averaged per bag: the deterministic pass and tta - 1 samplings with
      the training augmentation (seeded, so a re-run gives the same numbers).
  """
  if tta < 1:
    raise ValueError(f"tta must be at least 1, got {tta}")
  model = model_info(predictor, workdir)
  k = model.max_instances
  per_call = BAGS_PER_CALL * predictor.config.eval_batch_size
  out_rows: list[rows.Row] = []
  pending: list[tuple[inputs_lib.Prepared, int]] = []  # (study, its number of bags)
  bags: list[tuple[types.StudyRecord, list[int] | None]] = []

  def flush():
    out = inference.tta_predictions(predictor, _Bags(bags), tta) if bags else {}
    if bags and len(out["pred"]) != len(bags):
      raise RuntimeError(f"the predictor returned {len(out['pred'])} rows for {len(bags)} bags")
    start = 0
    for item, n in pending:
      part = {key: v[start:start + n] for key, v in out.items()} if n else None
      out_rows.append(make_row(item, part, model))
      start += n
    pending.clear()
    bags.clear()

  for item in prepared:
    n = 0
    if item.record is not None:
      variants = leave_one_out_cines(item.record.views, item.record.slice_index, k) if loo else []
      bags.extend([(item.record, None)] + [(item.record, v) for v in variants])
      n = 1 + len(variants)
    pending.append((item, n))
    if len(bags) >= per_call:
      flush()
  flush()
  return out_rows
