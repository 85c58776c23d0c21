"""Bias correction of LVEF predictions, never fitted on the studies it is scored on.

A correction maps a prediction p to slope * p + intercept:
  shift   slope 1, intercept = mean(truth - p) (removes the mean bias, e.g. of a new site);
  linear  least-squares regression of truth on p (recalibration of scale and offset).
It is fitted on a calibration subset and applied to the rest. `cross_fit` does this by K-fold
cross-fitting over subjects: the subjects are split into K folds (scikit-learn's `GroupKFold`,
shuffled with a seed), each fold's studies are corrected with the correction fitted on the
other K-1 folds, and every study is reported exactly once. A subject's rescans share its fold,
so no study is corrected by a fit that saw it or its subject.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np
from sklearn import model_selection

SHIFT = "shift"
LINEAR = "linear"
METHODS: tuple[str, ...] = (SHIFT, LINEAR)
DEFAULT_FOLDS = 5
DEFAULT_BINS = 5


@dataclasses.dataclass(frozen=True)
class Correction:
  """corrected = slope * prediction + intercept, fitted on `n_fit` studies."""

  slope: float
  intercept: float
  n_fit: int

  def __call__(self, pred: np.ndarray) -> np.ndarray:
    """Corrected predictions [N] of pred [N]."""
    return self.slope * np.asarray(pred, np.float64) + self.intercept


def fit(truth: np.ndarray, pred: np.ndarray, method: str) -> Correction:
  """The `method` correction fitted on (truth, pred) [N].

  A linear fit on predictions that do not vary falls back to the shift (the slope is
  undefined).

  Raises:
    ValueError: on an unknown method or no study to fit on.
  """
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  if method not in METHODS:
    raise ValueError(f"unknown bias correction {method!r}; expected one of {METHODS}")
  if truth.size == 0:
    raise ValueError("cannot fit a bias correction on no study")
  if method == SHIFT or truth.size < 2 or np.ptp(pred) == 0:
    return Correction(1.0, float(np.mean(truth - pred)), truth.size)
  slope, intercept = np.polyfit(pred, truth, 1)
  return Correction(float(slope), float(intercept), truth.size)


def subject_folds(subjects: Sequence[str], folds: int = DEFAULT_FOLDS,
                  seed: int = 0) -> np.ndarray:
  """int [N]: the fold (0 .. K-1) of each study, all studies of a subject in one fold.

  K is `folds`, or the number of subjects when there are fewer.

  Raises:
    ValueError: with fewer than 2 folds or subjects.
  """
  subjects = np.asarray(subjects)
  num_subjects = np.unique(subjects).size
  k = min(folds, num_subjects)
  if folds < 2 or k < 2:
    raise ValueError(f"cross-fitting needs at least 2 folds and 2 subjects (folds={folds}, "
                     f"{num_subjects} subjects)")
  out = np.empty(subjects.size, np.int64)
  splitter = model_selection.GroupKFold(n_splits=k, shuffle=True, random_state=seed)
  for fold, (_, held_out) in enumerate(splitter.split(subjects, groups=subjects)):
    out[held_out] = fold
  return out


def cross_fit(truth: np.ndarray, pred: np.ndarray, subjects: Sequence[str], method: str, *,
              folds: int = DEFAULT_FOLDS, seed: int = 0) -> tuple[np.ndarray, list[Correction]]:
  """Cross-fitted corrected predictions [N] and the K corrections (one per held-out fold).

  Args:
    truth: [N] reference LVEF.
    pred: [N] predictions.
    subjects: [N] subject pseudonyms (the folds' units).
    method: one of METHODS.
    folds: K.
    seed: seed of the fold assignment.
  """
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  fold = subject_folds(subjects, folds, seed)
  corrected = np.empty_like(pred)
  fits = []
  for k in range(int(fold.max()) + 1):
    held_out = fold == k
    correction = fit(truth[~held_out], pred[~held_out], method)
    corrected[held_out] = correction(pred[held_out])
    fits.append(correction)
  return corrected, fits


def calibration_curve(truth: np.ndarray, pred: np.ndarray,
                      bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
  """Mean prediction and mean truth in bins of equal count along the prediction.

  Returns:
    "pred" [M], "truth" [M] (bin means) and "count" [M], M <= bins (tied predictions stay in
    one bin).
  """
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  edges = np.unique(np.quantile(pred, np.linspace(0.0, 1.0, bins + 1)))
  which = np.clip(np.searchsorted(edges, pred, side="right") - 1, 0, max(edges.size - 2, 0))
  used = np.unique(which)
  return {"pred": np.array([pred[which == b].mean() for b in used]),
          "truth": np.array([truth[which == b].mean() for b in used]),
          "count": np.array([int(np.sum(which == b)) for b in used])}
