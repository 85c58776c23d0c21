"""Regression and classification metrics for LVEF predictions (percent)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

REDUCED_EF_THRESHOLD = 40.0


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


def summary(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
  """MAE, SD of the absolute error, bias, Pearson r and AUC(LVEF<40%)."""
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  err = pred - truth
  return {
      "n": int(truth.size),
      "mae": mae(truth, pred),
      "abs_error_sd": float(np.std(np.abs(err), ddof=1)) if truth.size > 1 else float("nan"),
      "bias": float(np.mean(err)),
      "pearson_r": (float(np.corrcoef(truth, pred)[0, 1])
                    if truth.size > 1 and np.std(pred) > 0 else float("nan")),
      "auc_lvef_below_40": auc_below(truth, pred),
  }
