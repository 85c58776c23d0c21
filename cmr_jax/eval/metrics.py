"""Agreement and classification metrics for LVEF predictions (percent), with subject-level
bootstrap confidence intervals.

Conventions: error = prediction - truth; bias is the mean error; the Bland-Altman 95% limits of
agreement are bias -/+ 1.96 SD of the error; R^2 is the coefficient of determination of the
predictions as they are (scikit-learn's `r2_score`, which can be negative), not Pearson r squared.
Reduced ejection fraction is LVEF < threshold: the AUC scores studies by -prediction, and
sensitivity/specificity call a study positive when its prediction is below the threshold.
A metric that is undefined on the data (e.g. AUC with one class only) is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np
from sklearn import metrics as skm

REDUCED_EF_THRESHOLD = 40.0
THRESHOLDS: tuple[float, ...] = (40.0, 50.0)  # LVEF cut-offs (percent) for the detection metrics
LOA_Z = 1.96  # Bland-Altman: 95% limits of agreement
CI_LEVEL = 0.95
DEFAULT_BOOTSTRAP = 1000
# A metric undefined in more replicates than this fraction gets no interval: the rest would
# describe only resamples that happen to hold, e.g., both classes.
MAX_UNDEFINED_FRACTION = 0.1


def mae(truth: np.ndarray, pred: np.ndarray) -> float:
  """Mean absolute error."""
  return float(np.mean(np.abs(np.asarray(pred) - np.asarray(truth))))


def auc_below(truth: np.ndarray, pred: np.ndarray,
              threshold: float = REDUCED_EF_THRESHOLD) -> float:
  """ROC AUC for detecting LVEF < threshold, scoring by -prediction; NaN if one class is absent."""
  positive = np.asarray(truth) < threshold
  if positive.all() or not positive.any():
    return float("nan")
  return float(skm.roc_auc_score(positive, -np.asarray(pred)))


def threshold_key(threshold: float) -> str:
  """The suffix naming a threshold in metric keys: 40.0 -> "40"."""
  return f"{threshold:g}".replace(".", "_")


def regression_metrics(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
  """n, MAE, SD of the absolute error, RMSE, bias, 95% limits of agreement, Pearson r, R^2."""
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  err = pred - truth  # [N]
  n = truth.size
  sd = float(np.std(err, ddof=1)) if n > 1 else math.nan
  varies = n > 1 and np.ptp(pred) > 0 and np.ptp(truth) > 0
  return {
      "n": n,
      "mae": float(np.mean(np.abs(err))),
      "abs_error_sd": float(np.std(np.abs(err), ddof=1)) if n > 1 else math.nan,
      "rmse": float(np.sqrt(np.mean(err ** 2))),
      "bias": float(np.mean(err)),
      "loa_low": float(np.mean(err)) - LOA_Z * sd,
      "loa_high": float(np.mean(err)) + LOA_Z * sd,
      "pearson_r": float(np.corrcoef(truth, pred)[0, 1]) if varies else math.nan,
      "r2": float(skm.r2_score(truth, pred)) if n > 1 and np.ptp(truth) > 0 else math.nan,
  }


def detection_metrics(truth: np.ndarray, pred: np.ndarray,
                      threshold: float) -> dict[str, float]:
  """AUC, sensitivity and specificity for LVEF < threshold (keys suffixed by the threshold)."""
  positive = np.asarray(truth) < threshold  # [N]
  called = np.asarray(pred) < threshold  # [N]
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  key = threshold_key(threshold)
  return {
      f"auc_lvef_below_{key}": auc_below(truth, pred, threshold),
      f"sensitivity_lvef_below_{key}": (float(np.sum(called & positive) / n_pos) if n_pos
                                        else math.nan),
      f"specificity_lvef_below_{key}": (float(np.sum(~called & ~positive) / n_neg) if n_neg
                                        else math.nan),
      f"n_lvef_below_{key}": n_pos,
  }


def point_metrics(truth: np.ndarray, pred: np.ndarray,
                  thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
  """`regression_metrics` and `detection_metrics` at each threshold, in one flat dict."""
  out = regression_metrics(truth, pred)
  for threshold in thresholds:
    out.update(detection_metrics(truth, pred, threshold))
  return out


def summary(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
  """All point metrics at LVEF < 40% and < 50% (keys include `mae` and `auc_lvef_below_40`)."""
  return point_metrics(truth, pred)


def _has_ci(key: str) -> bool:
  """Counts (n, n_lvef_below_*) describe the sample, not an estimate: they get no interval."""
  return not (key == "n" or key.startswith("n_"))


def subject_groups(subjects: Sequence[str]) -> np.ndarray:
  """int [N]: the subject number of each study (0, 1, ... in order of first appearance)."""
  _, first, inverse = np.unique(np.asarray(subjects), return_index=True, return_inverse=True)
  rank = np.empty_like(first)
  rank[np.argsort(first)] = np.arange(first.size)
  return rank[inverse.reshape(-1)]


def _wmean(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Weighted means of x [N] under each row of w [B, N] -> [B]."""
  return (w @ x) / w.sum(axis=1)


def _wsd(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  """SD (ddof=1) of the sample holding study i w[b, i] times, for each row b -> [B]."""
  n = w.sum(axis=1)
  centred = x[None, :] - _wmean(w, x)[:, None]  # [B, N]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.sqrt(np.sum(w * centred ** 2, axis=1) / (n - 1))


def _wauc(w: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
  """ROC AUC (ties count 1/2) of `score` for `positive` [N] under each row of w [B, N] -> [B]."""
  order = np.argsort(score, kind="stable")
  _, starts = np.unique(score[order], return_index=True)  # [U] first study of each tie group
  wp = np.add.reduceat(w[:, order] * positive[order], starts, axis=1)  # [B, U]
  wn = np.add.reduceat(w[:, order] * ~positive[order], starts, axis=1)  # [B, U]
  below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each level
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.sum(wp * (below + 0.5 * wn), axis=1) / (wp.sum(axis=1) * wn.sum(axis=1))


def weighted_point_metrics(truth: np.ndarray, pred: np.ndarray, weights: np.ndarray,
                           thresholds: Sequence[float] = THRESHOLDS) -> dict[str, np.ndarray]:
  """`point_metrics` of many resamples at once, each given by integer multiplicities.

  Row b of `weights` [B, N] says how often each study occurs in resample b; the result for row b
  equals `point_metrics(np.repeat(truth, weights[b]), np.repeat(pred, weights[b]))` (undefined
  values are NaN). Vectorised so that a thousand bootstrap replicates take well under a second.

  Returns:
    metric name -> [B] values (the keys of `point_metrics`).
  """
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  w = np.asarray(weights, np.float64)  # [B, N]
  err = pred - truth
  n = w.sum(axis=1)
  bias = _wmean(w, err)
  sd = _wsd(w, err)
  sd_t, sd_p = _wsd(w, truth), _wsd(w, pred)
  with np.errstate(invalid="ignore", divide="ignore"):
    cov = (w * (truth[None] - _wmean(w, truth)[:, None])
           * (pred[None] - _wmean(w, pred)[:, None])).sum(axis=1) / (n - 1)
    out = {
        "n": n,
        "mae": _wmean(w, np.abs(err)),
        "abs_error_sd": _wsd(w, np.abs(err)),
        "rmse": np.sqrt(_wmean(w, err ** 2)),
        "bias": bias,
        "loa_low": bias - LOA_Z * sd,
        "loa_high": bias + LOA_Z * sd,
        "pearson_r": np.where((sd_t > 0) & (sd_p > 0), cov / (sd_t * sd_p), np.nan),
        "r2": np.where(sd_t > 0, 1.0 - _wmean(w, err ** 2) / ((n - 1) / n * sd_t ** 2), np.nan),
    }
    for threshold in thresholds:
      key = threshold_key(threshold)
      positive, called = truth < threshold, pred < threshold
      n_pos, n_neg = w @ positive, w @ ~positive
      out[f"auc_lvef_below_{key}"] = _wauc(w, positive, -pred)
      out[f"sensitivity_lvef_below_{key}"] = (w @ (called & positive)) / n_pos
      out[f"specificity_lvef_below_{key}"] = (w @ (~called & ~positive)) / n_neg
      out[f"n_lvef_below_{key}"] = n_pos
  return out


def bootstrap_ci(truth: np.ndarray, pred: np.ndarray, subjects: Sequence[str], *,
                 n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = CI_LEVEL,
                 thresholds: Sequence[float] = THRESHOLDS) -> dict[str, tuple[float, float]]:
  """Percentile bootstrap intervals of `point_metrics`, resampling subjects with replacement.

  All studies of a drawn subject (e.g. a scan and its rescan) enter the replicate together, as
  often as the subject is drawn. Replicates where a metric is undefined (e.g. AUC when a resample
  has one class only) are left out of that metric's interval; a metric undefined in more than
  MAX_UNDEFINED_FRACTION of the replicates gets (NaN, NaN).

  Args:
    truth: [N] reference LVEF.
    pred: [N] predicted LVEF.
    subjects: [N] subject pseudonym of each study.
    n_boot: number of replicates.
    seed: seed of the resampling.
    level: coverage of the interval.
    thresholds: as in `point_metrics`.

  Returns:
    metric name -> (low, high); counts (n, n_lvef_below_*) have no interval.
  """
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  if not truth.shape == pred.shape == (len(subjects),):
    raise ValueError(f"truth {truth.shape}, pred {pred.shape} and subjects ({len(subjects)}) "
                     "must be 1-D of one length")
  if n_boot < 1:
    raise ValueError(f"n_boot must be positive, got {n_boot}")
  values = weighted_point_metrics(truth, pred, bootstrap_weights(subjects, n_boot, seed),
                                  thresholds)
  alpha = (1.0 - level) / 2.0
  out = {}
  for key, column in values.items():
    if not _has_ci(key):
      continue
    column = column[np.isfinite(column)]
    if column.size < (1.0 - MAX_UNDEFINED_FRACTION) * n_boot:
      out[key] = (math.nan, math.nan)
    else:
      low, high = np.quantile(column, [alpha, 1.0 - alpha])
      out[key] = (float(low), float(high))
  return out


def bootstrap_weights(subjects: Sequence[str], n_boot: int, seed: int) -> np.ndarray:
  """int [n_boot, N]: how often each study occurs in each subject-level bootstrap resample."""
  group = subject_groups(subjects)  # [N]
  num_subjects = int(group.max()) + 1 if group.size else 0
  draws = np.random.default_rng(seed).integers(0, num_subjects, (n_boot, num_subjects))
  counts = np.zeros((n_boot, num_subjects), np.int64)
  np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1)
  return counts[:, group]


def with_ci(truth: np.ndarray, pred: np.ndarray, subjects: Sequence[str], *,
            n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
            thresholds: Sequence[float] = THRESHOLDS) -> dict[str, dict[str, object]]:
  """Point metrics with their subject-bootstrap 95% intervals: name -> {"value", "ci"}.

  Counts have "ci": None.
  """
  point = point_metrics(truth, pred, thresholds)
  ci = bootstrap_ci(truth, pred, subjects, n_boot=n_boot, seed=seed, thresholds=thresholds)
  return {k: {"value": v, "ci": list(ci[k]) if k in ci else None} for k, v in point.items()}
