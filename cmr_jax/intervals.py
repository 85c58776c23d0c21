"""Split-conformal prediction intervals for LVEF: the calibration, its file, and coverage.

A fine-tuned model's intervals are calibrated on studies that played no part in training it or in
choosing its checkpoint (the dataset's `calib` split), predicted exactly as prediction does
(the same test-time augmentation passes and leave-one-cine-out bags). For each calibration study
a conformity score is the absolute error divided by a scale:

  absolute    s = |truth - pred|                          (the same width for every study);
  normalized  s = |truth - pred| / sqrt(b^2 + loo_se^2)   (wider where the prediction moves
              with single cines), b the checkpoint's validation RMSE (`best.json`: computed on
              other studies, so it is a fixed constant here) and loo_se the study's jackknife
              standard error over its leave-one-cine-out predictions (0 for a bag of one cine).

At level 1 - alpha the interval of a new study is pred +/- q * scale, q the
ceil((n + 1)(1 - alpha))-th smallest of the n calibration scores (split conformal: at least
1 - alpha coverage in expectation for studies exchangeable with the calibration set, e.g. from
the same scanners and protocols; a shift of site or protocol is not covered by the guarantee).
Too few calibration studies for a level make q infinite: the interval is then the whole 0-100
range. Intervals are clipped to 0-100, which never lowers coverage.

Both methods are calibrated; the one prediction uses (`Calibration.method`) is the one whose
95% intervals are narrower on average over the calibration studies themselves (test studies
play no part). Choosing between two valid intervals on the same studies can cost a little of
the guarantee (at most the sum of the two methods' miss rates; in practice far less).

`Calibration` is written to the run folder as `calibration.json`, next to `best.json`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmr_jax import files
from cmr_jax.data import splits

CALIBRATION_JSON = "calibration.json"
CALIB_SPLIT = splits.CALIB
ABSOLUTE = "absolute"
NORMALIZED = "normalized"
LEVELS: tuple[float, ...] = (0.9, 0.95)
LVEF_RANGE_PERCENT = (0.0, 100.0)


def study_scale(val_rmse: float, loo_se: np.ndarray | float | None) -> np.ndarray:
  """sqrt(val_rmse^2 + loo_se^2) per study; a missing (None/NaN) loo_se counts as 0."""
  loo = np.nan_to_num(np.asarray(0.0 if loo_se is None else loo_se, np.float64), nan=0.0)
  return np.sqrt(float(val_rmse) ** 2 + loo ** 2)


def conformal_quantile(scores: np.ndarray, level: float) -> float:
  """The ceil((n + 1) level)-th smallest of n scores; inf when that exceeds n.

  Raises:
    ValueError: for a level outside (0, 1).
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"interval level must be in (0, 1), got {level}")
  scores = np.sort(np.asarray(scores, np.float64))
  k = math.ceil((scores.size + 1) * level)
  return float(scores[k - 1]) if k <= scores.size else math.inf


def level_key(level: float) -> str:
  """The key of a level in `Calibration.quantiles` ("0.9", "0.95")."""
  return f"{level:g}"


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Conformal quantiles of a checkpoint, and how its calibration predictions were made.

  Attributes:
    quantiles: {method: {level ("0.9", "0.95"): q}}; q multiplies the study's scale (1 for
      `absolute`); math.inf when the calibration set is too small for the level.
    val_rmse: b, the scale's floor of the `normalized` method (validation RMSE).
    n: calibration studies.
    split: the dataset split they came from.
    step: the checkpoint step that was calibrated (`best.json`).
    tta: prediction passes per bag used on the calibration studies.
    loo: whether leave-one-cine-out spreads were computed (the `normalized` method needs them).
    mae: the calibration studies' mean absolute error (for the record).
    method: the method prediction uses where a study has a leave-one-cine-out spread: the one
      of narrower mean 95% width on the calibration studies (`mean_width`).
    mean_width: {method: mean width (unclipped) of its intervals at the widest calibrated level
      over the calibration studies}.
  """

  quantiles: dict[str, dict[str, float]]
  val_rmse: float | None
  n: int
  split: str
  step: int | None
  tta: int
  loo: bool
  mae: float
  method: str = NORMALIZED
  mean_width: dict[str, float] = dataclasses.field(default_factory=dict)

  def belongs_to(self, best: dict[str, Any] | None) -> bool:
    """Whether this calibration was made for the checkpoint whose `best.json` is `best`."""
    step = (best or {}).get("step")
    return self.step is None or step is None or self.step == step

  def method_for(self, has_loo: bool) -> str:
    """The method to use for a study: the chosen `method` when it is `absolute` or the study
    has a leave-one-cine-out spread (and `normalized` is calibrated), else `absolute`."""
    if self.method == NORMALIZED and has_loo and NORMALIZED in self.quantiles:
      return NORMALIZED
    return ABSOLUTE

  def quantile(self, method: str, level: float) -> float:
    """q of `method` at `level` (inf when the calibration set is too small for it).

    Raises:
      KeyError: for a level or method that was not calibrated.
    """
    return self.quantiles[method][level_key(level)]

  def bounds(self, pred: np.ndarray, level: float, method: str,
             loo_se: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(low [N], high [N]) at `level` for predictions [N], clipped to 0-100; `loo_se` [N] (NaN
    or None: no spread) is used by `normalized` only.

    Raises:
      KeyError: for a level or method that was not calibrated.
    """
    q = self.quantile(method, level)
    pred = np.asarray(pred, np.float64)
    half = np.full(pred.shape, q) if method == ABSOLUTE else q * study_scale(self.val_rmse, loo_se)
    low, high = LVEF_RANGE_PERCENT
    return np.maximum(low, pred - half), np.minimum(high, pred + half)

  def interval(self, pred: float, level: float, method: str,
               loo_se: float | None) -> tuple[float, float]:
    """(low, high) of one study at `level`, clipped to 0-100."""
    low, high = self.bounds(np.array([pred]), level, method,
                            None if loo_se is None else np.array([loo_se]))
    return float(low[0]), float(high[0])

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["quantiles"] = {m: {k: (None if math.isinf(v) else v) for k, v in qs.items()}
                        for m, qs in self.quantiles.items()}
    out["mean_width"] = {m: (None if math.isinf(v) else v) for m, v in self.mean_width.items()}
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Calibration:
    d = dict(d)
    d["quantiles"] = {m: {k: (math.inf if v is None else float(v)) for k, v in qs.items()}
                      for m, qs in d["quantiles"].items()}
    d["mean_width"] = {m: (math.inf if v is None else float(v))
                       for m, v in d.get("mean_width", {}).items()}
    return cls(**d)


def calibrate(truth: np.ndarray, pred: np.ndarray, loo_se: np.ndarray | None, *,
              val_rmse: float | None, split: str, step: int | None, tta: int,
              levels: Sequence[float] = LEVELS) -> Calibration:
  """The conformal quantiles of (truth, pred) calibration studies.

  Args:
    truth: [N] reference LVEF (%).
    pred: [N] predictions made as prediction makes them.
    loo_se: [N] leave-one-cine-out jackknife SE (NaN for a bag of one cine), or None when not
      computed: then only the `absolute` method is calibrated.
    val_rmse: the checkpoint's validation RMSE; None: only `absolute`.
    split, step, tta: recorded with the quantiles.
    levels: nominal coverages.

  Raises:
    ValueError: without calibration studies, with non-finite values or mismatched sizes.
  """
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  if truth.size == 0:
    raise ValueError(f"no labelled study in split {split!r} to calibrate intervals on")
  if truth.shape != pred.shape or not (np.all(np.isfinite(truth)) and np.all(np.isfinite(pred))):
    raise ValueError("calibration needs finite truth and predictions of the same size")
  residual = np.abs(truth - pred)
  scores = {ABSOLUTE: residual}
  normalized = loo_se is not None and val_rmse is not None and math.isfinite(val_rmse)
  if normalized:
    scores[NORMALIZED] = residual / study_scale(val_rmse, loo_se)
  quantiles = {m: {level_key(lv): conformal_quantile(s, lv) for lv in levels}
               for m, s in scores.items()}
  widest = level_key(max(levels))
  scale = {ABSOLUTE: np.ones_like(residual)}
  if normalized:
    scale[NORMALIZED] = study_scale(val_rmse, loo_se)
  mean_width = {m: (math.inf if math.isinf(quantiles[m][widest])
                    else float(2.0 * quantiles[m][widest] * np.mean(scale[m])))
                for m in quantiles}
  method = min(quantiles, key=lambda m: (mean_width[m], m != ABSOLUTE))  # ties: absolute
  return Calibration(quantiles=quantiles, val_rmse=float(val_rmse) if normalized else None,
                     n=int(truth.size), split=split, step=step, tta=int(tta),
                     loo=loo_se is not None, mae=float(residual.mean()), method=method,
                     mean_width=mean_width)


def coverage(cal: Calibration, truth: np.ndarray, pred: np.ndarray,
             loo_se: np.ndarray | None) -> dict[str, dict[str, dict[str, float]]]:
  """Empirical coverage and mean width of every calibrated method and level.

  Returns:
    {method: {level: {"coverage", "mean_width", "n"}}}; `normalized` only when `loo_se` is given.

  Raises:
    ValueError: without studies.
  """
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  if truth.size == 0:
    raise ValueError("no labelled study to measure interval coverage on")
  out: dict[str, dict[str, dict[str, float]]] = {}
  for method, qs in cal.quantiles.items():
    if method == NORMALIZED and loo_se is None:
      continue
    out[method] = {}
    for key in qs:
      low, high = cal.bounds(pred, float(key), method, loo_se)
      out[method][key] = {"coverage": float(np.mean((low <= truth) & (truth <= high))),
                          "mean_width": float(np.mean(high - low)), "n": int(truth.size)}
  return out


def write(cal: Calibration, workdir: str) -> str:
  """Writes `{workdir}/calibration.json` atomically; returns its path."""
  path = files.join(workdir, CALIBRATION_JSON)
  files.write_json(path, cal.to_dict(), indent=1)
  return path


def read(workdir: str) -> Calibration | None:
  """The run's calibration, or None when it has none.

  Raises:
    ValueError: naming the file when it cannot be parsed.
  """
  path = files.join(workdir, CALIBRATION_JSON)
  if not files.isfile(path):
    return None
  try:
    return Calibration.from_dict(files.read_json(path))
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ValueError(f"{path} is not a calibration file ({type(e).__name__}: {e})") from None
