"""LVEF for new studies: DICOM folders or zips (or ingested records) -> one row per study.

Each input (a study folder, a zip, a folder holding several studies, or one DICOM file) is read
the way ingestion reads it: studies found by StudyInstanceUID (`layouts.discover`), files read
and pseudonymised (`ingest.load_study`), cines preprocessed as the model's training data was
(`inference.Predictor.preprocess`), then scored by a fine-tuning run's best checkpoint. Nothing
needs a training set. An input or study that cannot be read gets a row with the reason and the
others carry on.

A row holds the input path as given (the user's own data: rows are keyed by it), the study's
pseudonym, the predicted LVEF (percent), an interval, the LVEF < 40% flag, the cines of the
model's bag (view, and for short-axis slices their index from the base, 0) with their attention
weights (summing to 1), and quality warnings (code and message).

Interval: pred +/- 1.96 sqrt(val_rmse^2 + loo_se^2), where val_rmse is the checkpoint's RMSE on
its validation split (`best.json`) and loo_se the jackknife standard error of the prediction
over the bag's cines (each cine left out in turn, `leave_one_out_cines`). val_rmse says how far
off the model is on average on data like its validation set; loo_se how much this study's
estimate rests on single cines. It is a ~95% interval only where validation residuals are
roughly normal and the study resembles the validation data: it does not cover a shift to
another scanner or protocol, which the warnings try to flag.

Privacy: rows and logs carry the input paths the user gave, pseudonyms (HMAC under the given
salt, or a random per-run salt) and scrubbed series names; never DICOM identifiers.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from absl import logging
import numpy as np

from cmr_jax.dicom import assemble
from cmr_jax.dicom import ingest
from cmr_jax.dicom import layouts
from cmr_jax.dicom import parse
from cmr_jax import inference
from cmr_jax.data import pipeline
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import types

Z_95 = 1.96  # two-sided 95% normal quantile
REDUCED_EF_PERCENT = 40.0  # LVEF below this is flagged (heart failure with reduced EF)
PLAUSIBLE_LVEF_PERCENT = (5.0, 90.0)
LVEF_RANGE_PERCENT = (0.0, 100.0)  # intervals are clipped to it
MIN_SOURCE_FRAMES = 20  # fewer acquired frames per cycle may miss end-systole
MIN_SAX_SLICES = 6  # a short-axis stack covering the LV has ~8-14 slices
MAX_SPACING_RATIO = 1.5  # acquired pixels this much coarser than the model's are flagged
MIN_VALIDATION_STUDIES = 30  # fewer make val_rmse a rough estimate
BAGS_PER_CALL = 4  # bags scored per Predictor call, in eval batches
LOG_EVERY_S = 10.0
OUTPUT_FORMATS = (".json", ".csv")
DICOMDIR = "DICOMDIR"
CSV_COLUMNS = ("input", "study", "lvef", "interval_low", "interval_high", "lvef_below_40",
               "interval_includes_40", "loo_se", "views", "warnings", "error", "lvef_reference",
               "interval_method")


@dataclasses.dataclass(frozen=True)
class QualityWarning:
  """Something about a study that makes its prediction less trustworthy."""

  code: str
  message: str


@dataclasses.dataclass
class Prepared:
  """A study ready to score (`record` set) or one that could not be read (`error` set)."""

  input: str  # the input path (or dataset split) as given
  study: str = ""  # the study's pseudonym
  record: types.StudyRecord | None = None
  warnings: list[QualityWarning] = dataclasses.field(default_factory=list)
  error: str = ""


def _files(n: int) -> str:
  return f"{n} file{'' if n == 1 else 's'}"


def _counts(counter: collections.Counter) -> str:
  """'3 files: reason; 1 file: other reason', most common first."""
  return "; ".join(f"{_files(n)}: {reason}" for reason, n in counter.most_common())


def _error_text(e: Exception) -> str:
  """An exception for a row: the message of expected errors, only the type of others (whose
  messages may quote file contents)."""
  if isinstance(e, (ValueError, OSError)):
    return f"{type(e).__name__}: {e}"
  logging.error("unexpected %s at\n%s", type(e).__name__,
                "".join(traceback.format_tb(e.__traceback__)))
  return f"unexpected {type(e).__name__} (a bug: please report it with the log)"


# ---------------------------------------------------------------------------------------------
# Quality checks.


def _has_trigger_times(cine: types.Cine) -> bool:
  """Whether the preprocessing can place the cine's frames in time (`cycle_matrix`'s rule)."""
  if cine.trigger_times_ms is None:
    return False
  times = np.asarray(cine.trigger_times_ms, dtype=np.float64).reshape(-1)
  return (times.shape == (cine.num_frames,) and bool(np.all(np.isfinite(times)))
          and bool(np.all(np.diff(times) > 0)))


def crop_warnings(image_centred: Sequence[str]) -> list[QualityWarning]:
  """A warning naming what `preprocess.preprocess_study` cropped about the image centre."""
  if not image_centred:
    return []
  return [QualityWarning(
      "crop_not_centred_on_motion", "no cardiac motion found in " + ", ".join(image_centred) +
      ": cropped about the image centre (the heart may be off-centre or cut)")]


def source_warnings(study: types.Study) -> list[QualityWarning]:
  """Warnings about the acquisition: frames per cycle, timing, heart rate."""
  out = []
  low, high = min(c.num_frames for c in study.cines), max(c.num_frames for c in study.cines)
  if low < MIN_SOURCE_FRAMES:
    out.append(QualityWarning(
        "few_frames", f"cines have {low if low == high else f'{low}-{high}'} frames per cycle "
        f"(fewer than {MIN_SOURCE_FRAMES}): end-systole may fall between frames"))
  untimed = sum(not _has_trigger_times(c) for c in study.cines)
  if untimed:
    out.append(QualityWarning(
        "no_trigger_times", f"{untimed} of {len(study.cines)} cines have no usable trigger "
        "times: temporal resolution unknown, frames taken as evenly spaced over the cycle"))
  if not math.isfinite(study.heart_rate_bpm):
    out.append(QualityWarning("heart_rate_unknown", "heart rate unknown (no HeartRate or RR "
                              "interval in the DICOM headers)"))
  return out


def record_warnings(record: types.StudyRecord,
                    cfg: preprocess.PreprocessConfig) -> list[QualityWarning]:
  """Warnings about the views and resolution of a preprocessed study."""
  out = []
  if not any(v in types.LONG_AXIS_VIEWS for v in record.views):
    out.append(QualityWarning("no_long_axis", "no long-axis view (2CH/3CH/4CH): the estimate "
                              "rests on short-axis slices only"))
  num_sax = record.views.count(types.SAX)
  if num_sax == 0:
    out.append(QualityWarning("no_short_axis", "no short-axis stack: the estimate rests on "
                              "long-axis views only"))
  elif num_sax < MIN_SAX_SLICES:
    out.append(QualityWarning("few_sax_slices", f"only {num_sax} short-axis slices (a stack "
                              f"covering the LV has {MIN_SAX_SLICES} or more)"))
  coarsest = float(np.max(record.source_spacing_mm)) if record.num_cines else math.nan
  if coarsest > MAX_SPACING_RATIO * cfg.spacing_mm:
    out.append(QualityWarning(
        "coarse_pixels", f"acquired pixels up to {coarsest:.2f} mm, coarser than the model's "
        f"{cfg.spacing_mm:g} mm: images are upsampled"))
  return out


# ---------------------------------------------------------------------------------------------
# Reading studies.


def _prepare_spec(path: str, root: str, spec: layouts.StudySpec,
                  cfg: preprocess.PreprocessConfig, salt: str,
                  common: list[QualityWarning]) -> Prepared:
  """Reads, checks and preprocesses one study discovered below `root`; never raises."""
  study_id, _ = ingest.study_pseudonyms(spec, salt)
  out = Prepared(path, study_id, warnings=list(common))
  loaded = ingest.load_study(spec, salt=salt, root=root, min_frames=cfg.min_frames)
  if loaded.study is None:
    out.error = loaded.reason
    return out
  skipped = collections.Counter(r.reason for r in loaded.rows if r.status == assemble.SKIPPED)
  if skipped:
    out.warnings.append(QualityWarning(
        "files_skipped", f"{sum(skipped.values())} of {_files(len(loaded.rows))} not used "
        f"({_counts(skipped)})"))
  out.warnings += [QualityWarning("views_from_anatomy", note) for note in loaded.notes]
  left_out: list[str] = []
  image_centred: list[str] = []
  try:
    record = preprocess.preprocess_study(loaded.study, cfg, skipped=left_out,
                                         image_centred=image_centred)
    out.warnings += source_warnings(loaded.study) + crop_warnings(image_centred)
  # One study's failure must not stop the others.
  except Exception as e:  # pylint: disable=broad-except
    out.error = _error_text(e)
    return out
  if left_out:  # "study <id>, series <name>: <reason>"
    out.warnings.append(QualityWarning(
        "cines_left_out", "; ".join(m.partition(", ")[2] for m in left_out)))
  out.warnings += record_warnings(record, cfg)
  out.record = record
  return out


def prepare_input(path: str, cfg: preprocess.PreprocessConfig, *, salt: str,
                  layout: str = layouts.GENERIC, labels: str = "") -> list[Prepared]:
  """The studies of one input, each preprocessed with `cfg` or with the reason it failed.

  Args:
    path: a study folder or zip, a folder of studies, one DICOM file, or a DICOMDIR (its
      folder is read).
    cfg: the model's preprocessing.
    salt: pseudonymisation salt.
    layout: how studies are found (`layouts.LAYOUTS`; "generic": by StudyInstanceUID).
    labels: optional reference labels CSV for the layout (reported as `lvef_reference`).

  Returns:
    One `Prepared` per study found, or a single one with the error when none is usable.
  """
  # A DICOMDIR indexes the files of its folder (CD/DVD exports): the folder is the input.
  root = (os.path.dirname(os.path.abspath(path)) if os.path.isfile(path)
          and os.path.basename(path).upper() == DICOMDIR else path)
  try:
    discovery = layouts.discover(layout, root, labels=labels)
  except Exception as e:  # pylint: disable=broad-except
    return [Prepared(path, error=f"input not readable ({_error_text(e)})")]
  orphans = collections.Counter(reason for _, reason in discovery.orphans)
  if not discovery.specs:
    return [Prepared(path, error="no DICOM study found (" + (_counts(orphans) or "no files")
                     + ")")]
  del orphans[parse.DICOMDIR_REASON]  # an index of the files: expected, not a problem
  common = []
  if orphans:
    common.append(QualityWarning("files_outside_studies", f"{_files(sum(orphans.values()))} "
                                 f"below the input in no study ({_counts(orphans)})"))
  if len(discovery.specs) > 1:
    common.append(QualityWarning("several_studies", f"the input holds {len(discovery.specs)} "
                                 "studies (one row each)"))
  return [_prepare_spec(path, root, spec, cfg, salt, common) for spec in discovery.specs]


def prepare_split(data_dir: str, split: str,
                  cfg: preprocess.PreprocessConfig) -> Iterator[Prepared]:
  """The records of an ingested dataset split with their quality warnings (checked geometry)."""
  records.check_preprocess(data_dir, cfg)
  source = records.open_split(data_dir, split)
  for i in range(len(source)):
    record = source[i]
    yield Prepared(f"{data_dir}:{split}", record.study_id, record, record_warnings(record, cfg))


# ---------------------------------------------------------------------------------------------
# Scoring.


def leave_one_out_cines(views: Sequence[str], slice_index: np.ndarray,
                        max_instances: int) -> list[list[int]]:
  """Cine subsets whose bags are the study's bag without one cine each (in bag order).

  `pipeline.bag_indices` takes every second SAX slice without the first and last, so leaving out
  a bag SAX slice also leaves out the (unused) slice after it, keeping the others' parity; only
  the slices up to the bag's last are kept, so no slice beyond `max_instances` slides in.

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
  if not lax and len(sax) < 3:  # the bag is every cine (see `bag_indices`)
    return [sorted(set(bag) - {i}) for i in bag]
  scaffold = sax[:2 * len(sax_in_bag) + 1]  # [unused, bag slice, unused, bag slice, ..., unused]
  out = []
  for i in bag:
    if views[i] == types.SAX:
      at = scaffold.index(i)
      keep = lax + scaffold[:at] + scaffold[at + 2:]
    else:
      keep = [j for j in lax if j != i] + scaffold
    out.append(sorted(keep))
  return out


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

  def warnings(self) -> list[QualityWarning]:
    """Warnings that hold for every row."""
    if self.val_rmse is None:
      return [QualityWarning("no_validation_errors", f"{self.workdir} has no validation RMSE "
                             "(best.json): intervals rest on the leave-one-cine-out spread only")]
    n = int(self.best.get("val_n") or 0)
    if n < MIN_VALIDATION_STUDIES:
      return [QualityWarning("small_validation", f"the validation RMSE comes from {n} studies "
                             f"(fewer than {MIN_VALIDATION_STUDIES}): intervals are rough")]
    return []


def interval(pred: float, val_rmse: float | None,
             loo_se: float | None) -> tuple[list[float] | None, str]:
  """([low, high], method) of the prediction interval; (None, why) without any error estimate."""
  terms = [(name, v) for name, v in (("val_rmse", val_rmse), ("loo_se", loo_se)) if v is not None]
  if not terms:
    return None, "none: no validation errors in the run and no leave-one-cine-out spread"
  half = Z_95 * math.sqrt(sum(v * v for _, v in terms))
  formula = " + ".join(f"{name}^2" for name, _ in terms)
  low, high = LVEF_RANGE_PERCENT
  return ([max(low, pred - half), min(high, pred + half)],
          f"pred +/- {Z_95} * sqrt({formula}), clipped to {low:g}-{high:g}")


def jackknife_se(preds: np.ndarray) -> float:
  """Jackknife standard error from the n leave-one-out estimates."""
  n = preds.size
  return float(math.sqrt((n - 1) / n * np.sum((preds - preds.mean()) ** 2)))


def _row(item: Prepared, out: dict[str, np.ndarray] | None, model: ModelInfo) -> dict[str, Any]:
  """The output row of one study: its full-bag prediction (`out` index 0), leave-one-cine-out
  predictions (the rest) and warnings."""
  row: dict[str, Any] = {
      "input": item.input, "study": item.study, "lvef": None, "interval": None,
      "interval_method": "", "loo_se": None, "lvef_below_40": None,
      "interval_includes_40": None, "views": [], "warnings": [], "error": item.error,
      "lvef_reference": None}
  warnings = list(item.warnings)
  record = item.record
  if record is not None:
    row["lvef_reference"] = float(record.lvef) if record.has_labels else None
  if out is None:
    row["warnings"] = [dataclasses.asdict(w) for w in warnings]
    return row
  if not (np.all(np.isfinite(out["pred"])) and np.all(np.isfinite(out["attention"]))):
    row["error"] = "the model returned a non-finite LVEF or attention (a broken checkpoint?)"
    row["warnings"] = [dataclasses.asdict(w) for w in warnings]
    return row
  pred = float(out["pred"][0])
  loo = out["pred"][1:]
  loo_se = jackknife_se(loo) if loo.size else None
  bounds, method = interval(pred, model.val_rmse, loo_se)
  bag = pipeline.bag_indices(record.views, record.slice_index, model.max_instances)
  row.update(
      lvef=pred, interval=bounds, interval_method=method, loo_se=loo_se,
      lvef_below_40=pred < REDUCED_EF_PERCENT,
      interval_includes_40=None if bounds is None else bounds[0] <= REDUCED_EF_PERCENT <= bounds[1],
      views=[{"view": record.views[i],
              "slice": int(record.slice_index[i]) if record.views[i] == types.SAX else None,
              "attention": float(out["attention"][0][slot])} for slot, i in enumerate(bag)])
  low, high = PLAUSIBLE_LVEF_PERCENT
  if not low <= pred <= high:
    warnings.append(QualityWarning("implausible_lvef", f"predicted LVEF {pred:.1f}% is outside "
                                   f"{low:g}-{high:g}%: check the input"))
  if len(bag) < 2:
    warnings.append(QualityWarning("single_cine", "the model saw one cine only"))
  elif loo_se is not None and model.val_rmse is not None and loo_se > model.val_rmse:
    warnings.append(QualityWarning(
        "view_sensitive", f"the prediction moves with single cines (leave-one-cine-out SE "
        f"{loo_se:.1f} > validation RMSE {model.val_rmse:.1f})"))
  row["warnings"] = [dataclasses.asdict(w) for w in warnings]
  return row


def score(predictor: inference.Predictor, prepared: Iterable[Prepared], *, loo: bool = True,
          workdir: str = "", tta: int = 1) -> list[dict[str, Any]]:
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
  rows: list[dict[str, Any]] = []
  pending: list[tuple[Prepared, int]] = []  # (study, its number of bags)
  bags: list[tuple[types.StudyRecord, list[int] | None]] = []

  def flush():
    out = {}
    if bags:
      passes = [predictor(_Bags(bags), tta_sample=k) for k in range(tta)]
      out = dict(passes[0])
      for key in ("pred", "attention"):
        out[key] = np.mean([p[key] for p in passes], axis=0)
    if bags and len(out["pred"]) != len(bags):
      raise RuntimeError(f"the predictor returned {len(out['pred'])} rows for {len(bags)} bags")
    start = 0
    for item, n in pending:
      part = {key: v[start:start + n] for key, v in out.items()} if n else None
      rows.append(_row(item, part, model))
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
  return rows


def model_info(predictor: inference.Predictor, workdir: str = "") -> ModelInfo:
  """The interval's basis and the preprocessing of a predictor."""
  return ModelInfo(workdir, predictor.best, dict(predictor.preprocess),
                   int(predictor.config.data.max_instances))


def _progress(groups: Iterable[list[Prepared]], total: int, what: str) -> Iterator[Prepared]:
  """The studies of each group (an input, a record) in turn, logging progress, rate and ETA."""
  start = last = time.monotonic()
  for done, group in enumerate(groups, 1):
    yield from group
    now = time.monotonic()
    if now - last >= LOG_EVERY_S or done == total:
      rate = done / max(now - start, 1e-9)
      logging.info("%d/%d %s processed (%.2f/s, ETA %.0f s)", done, total, what, rate,
                   (total - done) / rate)
      last = now


def predict(predictor: inference.Predictor, *, inputs: Sequence[str] = (), data_dir: str = "",
            split: str = "test", salt: str = "", layout: str = layouts.GENERIC,
            labels: str = "", loo: bool = True, workdir: str = "",
            tta: int = 1) -> dict[str, Any]:
  """Predicts LVEF for DICOM inputs or for the records of a dataset split.

  Args:
    predictor: the fine-tuned model (`inference.Predictor(workdir)`).
    inputs: study folders, zips or DICOM files (one or more rows each).
    data_dir: instead of inputs, an ingested dataset (records with the model's preprocessing).
    split: the dataset split to score.
    salt: pseudonymisation salt for DICOM inputs (required with inputs).
    layout: how studies are found below each input.
    labels: optional reference labels CSV for the layout.
    loo: compute the leave-one-cine-out spread.
    workdir: the run's folder, for the output's model section.
    tta: prediction passes averaged per bag (see `score`).

  Returns:
    {"model": ..., "interval_method": ..., "warnings": [...], "studies": [rows], "summary": ...}.

  Raises:
    ValueError: for neither or both of inputs and data_dir, no salt with inputs, or a dataset
      preprocessed differently from the model's training data.
  """
  if bool(inputs) == bool(data_dir):
    raise ValueError("give study inputs or a data_dir, not both or neither")
  cfg = preprocess.PreprocessConfig.from_dict(predictor.preprocess)
  if data_dir:
    prepared = _progress(([p] for p in prepare_split(data_dir, split, cfg)),
                         len(records.load_index(data_dir, split)), "records")
  else:
    if not salt:
      raise ValueError("a pseudonymisation salt is needed to read DICOM inputs")
    prepared = _progress((prepare_input(p, cfg, salt=salt, layout=layout, labels=labels)
                          for p in inputs), len(inputs), "inputs")
  model = model_info(predictor, workdir)
  model_warnings = model.warnings()
  for w in model_warnings:
    logging.warning("%s", w.message)
  rows = score(predictor, prepared, loo=loo, workdir=workdir, tta=tta)
  return {
      "model": {"workdir": workdir, "best": model.best, "preprocess": model.preprocess,
                "max_instances": model.max_instances, "tta_passes": tta},
      "interval_method": (f"pred +/- {Z_95} * sqrt(val_rmse^2 + loo_se^2), clipped to 0-100: "
                          "val_rmse the checkpoint's validation RMSE, loo_se the jackknife SE "
                          "over leave-one-cine-out predictions; ~95% where residuals are normal "
                          "and the study resembles the validation data"),
      "warnings": [dataclasses.asdict(w) for w in model_warnings],
      "studies": rows,
      "summary": summarize(rows),
  }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Counts of rows predicted and failed; errors against reference labels where given."""
  predicted = [r for r in rows if r["lvef"] is not None]
  out: dict[str, Any] = {"rows": len(rows), "predicted": len(predicted),
                         "failed": len(rows) - len(predicted),
                         "with_warnings": sum(bool(r["warnings"]) for r in predicted)}
  ref = [(r["lvef"], r["lvef_reference"]) for r in predicted if r["lvef_reference"] is not None]
  if ref:
    err = np.array([p - t for p, t in ref])
    inside = [r["interval"][0] <= r["lvef_reference"] <= r["interval"][1] for r in predicted
              if r["lvef_reference"] is not None and r["interval"] is not None]
    out.update(labelled=len(ref), mae=float(np.mean(np.abs(err))),
               rmse=float(np.sqrt(np.mean(err ** 2))), bias=float(np.mean(err)),
               interval_coverage=float(np.mean(inside)) if inside else None)
  return out


# ---------------------------------------------------------------------------------------------
# Output.


def _csv_row(row: dict[str, Any]) -> dict[str, str]:
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


def write(result: dict[str, Any], path: str) -> None:
  """Writes a `predict` result as JSON (everything) or CSV (one line per row), by extension."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in OUTPUT_FORMATS:
    raise ValueError(f"output {path}: expected a name ending in {' or '.join(OUTPUT_FORMATS)}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    if ext == ".json":
      json.dump(result, f, indent=1, allow_nan=False)
    else:
      writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
      writer.writeheader()
      writer.writerows(_csv_row(r) for r in result["studies"])
  os.replace(tmp, path)


def table(rows: Sequence[dict[str, Any]]) -> str:
  """A short plain-text table of the rows for the terminal."""
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
