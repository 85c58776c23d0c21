"""Quality warnings of a study: what makes a prediction from it less trustworthy.

Checks of a study (`source_warnings`: frames per cycle, trigger times, heart rate; they need the
DICOM, records do not keep them), of what the preprocessing did (`crop_warnings`,
`layout_warnings`), and of a preprocessed record (`record_warnings`: views, short-axis slices,
acquired pixel size). Used by prediction (`cmr_jax.predict`) and by the evaluator's largest
errors (`cmr_jax.eval`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from cmr_jax.data import preprocess
from cmr_jax.data import types

MIN_SOURCE_FRAMES = 20  # fewer acquired frames per cycle may miss end-systole
MIN_SAX_SLICES = 6  # a short-axis stack covering the LV has ~8-14 slices
MAX_SPACING_RATIO = 1.5  # acquired pixels this much coarser than the model's are flagged


@dataclasses.dataclass(frozen=True)
class QualityWarning:
  """Something about a study that makes its prediction less trustworthy."""

  code: str
  message: str


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


def layout_warnings(unoriented: Sequence[str]) -> list[QualityWarning]:
  """A warning counting the cines (by view) that `preprocess.preprocess_study` left in the
  scanner's layout."""
  if not unoriented:
    return []
  counts = collections.Counter(unoriented)
  what = ", ".join(f"{counts[v]} {v}" if v == types.SAX else v
                   for v in types.VIEWS if v in counts)
  return [QualityWarning(
      "scanner_layout", "no usable plane geometry (ImagePositionPatient / "
      f"ImageOrientationPatient) in {what}: kept as the scanner stored them, not turned to the "
      "anatomical layout the model was trained on")]


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
