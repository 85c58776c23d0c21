"""Scan-rescan repeatability: pairs of studies of one subject, differences and ICC.

ICC forms follow Shrout & Fleiss (1979) on an [n targets, k measurements] table, from the
two-way ANOVA mean squares (MSR between targets, MSC between measurements, MSE residual, MSW
within targets):
  ICC(1,1) = (MSR - MSW) / (MSR + (k-1) MSW)                          one-way random
  ICC(2,1) = (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n)      two-way random, absolute
                                                                       agreement
  ICC(3,1) = (MSR - MSE) / (MSR + (k-1) MSE)                          two-way mixed, consistency
For scan-rescan, ICC(2,1) counts a systematic scan-to-rescan shift as disagreement; ICC(3,1)
does not. Both are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np

from cmr_jax.eval import metrics

ICC_FORMS: tuple[str, ...] = ("1,1", "2,1", "3,1")
# Repeatability coefficient = 1.96 * sqrt(2) * within-subject SD (Bland & Altman 1999).
REPEATABILITY_FACTOR = metrics.LOA_Z * math.sqrt(2.0)


def rescan_pairs(subjects: Sequence[str], visits: Sequence[int]) -> np.ndarray:
  """int [P, 2]: (first scan, rescan) study indices of each subject with two or more visits.

  The pair is the subject's two lowest visit numbers; subjects are in order of first
  appearance.

  Raises:
    ValueError: when a subject has the same visit number twice.
  """
  by_subject: dict[str, list[tuple[int, int]]] = {}
  for i, (subject, visit) in enumerate(zip(subjects, visits)):
    by_subject.setdefault(subject, []).append((int(visit), i))
  pairs = []
  for subject, scans in by_subject.items():
    seen = [v for v, _ in scans]
    if len(set(seen)) < len(seen):
      raise ValueError(f"subject {subject} has visit numbers {sorted(seen)}: a visit is repeated")
    if len(scans) >= 2:
      first, second = sorted(scans)[:2]
      pairs.append((first[1], second[1]))
  return np.asarray(pairs, np.int64).reshape(-1, 2)


def icc(table: np.ndarray, form: str = "3,1") -> float:
  """Shrout-Fleiss ICC of `table` [n targets, k measurements] (see the module docstring).

  Raises:
    ValueError: on an unknown form or a table with fewer than 2 targets or measurements.
  """
  x = np.asarray(table, np.float64)
  if form not in ICC_FORMS:
    raise ValueError(f"unknown ICC form {form!r}; expected one of {ICC_FORMS}")
  if x.ndim != 2 or min(x.shape) < 2:
    raise ValueError(f"ICC needs an [n>=2 targets, k>=2 measurements] table, got {x.shape}")
  n, k = x.shape
  grand = x.mean()
  ss_rows = k * np.sum((x.mean(axis=1) - grand) ** 2)
  ss_cols = n * np.sum((x.mean(axis=0) - grand) ** 2)
  ss_err = np.sum((x - grand) ** 2) - ss_rows - ss_cols
  msr = ss_rows / (n - 1)
  msc = ss_cols / (k - 1)
  mse = ss_err / ((n - 1) * (k - 1))
  msw = (ss_cols + ss_err) / (n * (k - 1))
  if form == "1,1":
    num, den = msr - msw, msr + (k - 1) * msw
  elif form == "2,1":
    num, den = msr - mse, msr + (k - 1) * mse + k * (msc - mse) / n
  else:
    num, den = msr - mse, msr + (k - 1) * mse
  return float(num / den) if den > 0 else math.nan


def repeatability(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
  """Agreement of paired measurements first [P] and second [P] (rescan - first scan).

  Returns:
    n_pairs, mean_abs_diff, mean_diff, sd_diff, loa_low / loa_high (mean_diff -/+ 1.96 SD),
    within_subject_sd (sqrt(mean(d^2) / 2)), repeatability_coefficient (1.96 sqrt(2) x it),
    icc_2_1 and icc_3_1 (NaN with fewer than 2 pairs).
  """
  a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired measurements must be 1-D of one length, got {a.shape}, {b.shape}")
  d = b - a
  p = a.size
  sd = float(np.std(d, ddof=1)) if p > 1 else math.nan
  within = float(np.sqrt(np.mean(d ** 2) / 2.0)) if p else math.nan
  mean_diff = float(np.mean(d)) if p else math.nan
  return {
      "n_pairs": p,
      "mean_abs_diff": float(np.mean(np.abs(d))) if p else math.nan,
      "mean_diff": mean_diff,
      "sd_diff": sd,
      "loa_low": mean_diff - metrics.LOA_Z * sd,
      "loa_high": mean_diff + metrics.LOA_Z * sd,
      "within_subject_sd": within,
      "repeatability_coefficient": REPEATABILITY_FACTOR * within,
      "icc_2_1": icc(np.stack([a, b], axis=1), "2,1") if p > 1 else math.nan,
      "icc_3_1": icc(np.stack([a, b], axis=1), "3,1") if p > 1 else math.nan,
  }
