"""Evaluation plots (PNG): scatter with identity line, Bland-Altman, ROC, calibration curve, and
a thumbnail strip of a study's bag (two cardiac phases of every cine).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, thread-safe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib import axes
from matplotlib import figure
from matplotlib.backends import backend_agg
import numpy as np
from sklearn import metrics as skm

from cmr_jax.eval import calibration
from cmr_jax.eval import metrics

FIGSIZE = (4.5, 4.5)
DPI = 120
LVEF_RANGE = (0.0, 100.0)
STRIP_PANEL_INCHES = 1.5  # one frame of a bag strip: 180 px at DPI
STRIP_TITLE_INCHES = 0.75  # the strip's title and column labels
STRIP_MIN_COLUMNS = 3  # room for the title under small bags


def _new() -> tuple[figure.Figure, axes.Axes]:
  fig = figure.Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


def _save(fig: figure.Figure, path: str) -> str:
  fig.savefig(path, format="png")
  return path


def _lvef_limits(*arrays: np.ndarray) -> tuple[float, float]:
  """Axis limits covering LVEF_RANGE's usual part and every value."""
  values = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
  low = min(10.0, float(np.min(values)) - 2.0) if values.size else LVEF_RANGE[0]
  high = max(80.0, float(np.max(values)) + 2.0) if values.size else LVEF_RANGE[1]
  return low, high


def scatter(truth: np.ndarray, pred: np.ndarray, path: str, title: str) -> str:
  """Predicted against reference LVEF with the identity line; returns `path`."""
  fig, ax = _new()
  lim = _lvef_limits(truth, pred)
  ax.plot(lim, lim, color="0.5", lw=1, ls="--", label="identity")
  ax.scatter(truth, pred, s=14, alpha=0.75)
  r = metrics.regression_metrics(truth, pred)
  ax.set(xlim=lim, ylim=lim, xlabel="reference LVEF (%)", ylabel="predicted LVEF (%)",
         title=f"{title}\nMAE {r['mae']:.2f}, r {r['pearson_r']:.3f}, n {r['n']}")
  ax.set_aspect("equal")
  ax.legend(loc="upper left", frameon=False)
  return _save(fig, path)


def bland_altman(truth: np.ndarray, pred: np.ndarray, path: str, title: str) -> str:
  """Difference (predicted - reference) against the mean, with bias and 95% limits."""
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  fig, ax = _new()
  r = metrics.regression_metrics(truth, pred)
  ax.scatter((truth + pred) / 2, pred - truth, s=14, alpha=0.75)
  for value, name, style in ((r["bias"], "bias", "-"), (r["loa_low"], "-1.96 SD", "--"),
                             (r["loa_high"], "+1.96 SD", "--")):
    if np.isfinite(value):
      ax.axhline(value, color="tab:red", lw=1, ls=style)
      ax.annotate(f"{name} {value:+.1f}", (1.0, value), xycoords=("axes fraction", "data"),
                  ha="right", va="bottom", fontsize=8, color="tab:red")
  ax.axhline(0.0, color="0.5", lw=0.8)
  ax.set(xlabel="mean of predicted and reference LVEF (%)",
         ylabel="predicted - reference (%)", title=f"{title}\nBland-Altman")
  return _save(fig, path)


def roc(truth: np.ndarray, pred: np.ndarray, path: str, title: str,
        thresholds: Sequence[float] = metrics.THRESHOLDS) -> str:
  """ROC curves for LVEF < each threshold (score: -prediction); skips one-class thresholds."""
  truth, pred = np.asarray(truth, np.float64), np.asarray(pred, np.float64)
  fig, ax = _new()
  ax.plot([0, 1], [0, 1], color="0.5", lw=1, ls="--")
  for threshold in thresholds:
    positive = truth < threshold
    if positive.all() or not positive.any():
      continue
    fpr, tpr, _ = skm.roc_curve(positive, -pred)
    ax.plot(fpr, tpr, lw=1.5,
            label=f"LVEF<{threshold:g}%: AUC {metrics.auc_below(truth, pred, threshold):.3f}")
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="1 - specificity", ylabel="sensitivity",
         title=f"{title}\nROC")
  ax.set_aspect("equal")
  ax.legend(loc="lower right", frameon=False, fontsize=8)
  return _save(fig, path)


def calibration_plot(truth: np.ndarray, predictions: Mapping[str, np.ndarray], path: str,
                     title: str, bins: int = calibration.DEFAULT_BINS) -> str:
  """Mean reference against mean prediction in equal-count bins, one line per named prediction."""
  fig, ax = _new()
  lim = _lvef_limits(truth, *predictions.values())
  ax.plot(lim, lim, color="0.5", lw=1, ls="--", label="ideal")
  for name, pred in predictions.items():
    curve = calibration.calibration_curve(truth, pred, bins)
    ax.plot(curve["pred"], curve["truth"], marker="o", ms=4, lw=1.5, label=name)
  ax.set(xlim=lim, ylim=lim, xlabel=f"mean predicted LVEF (%), {bins} equal-count bins",
         ylabel="mean reference LVEF (%)", title=f"{title}\ncalibration")
  ax.set_aspect("equal")
  ax.legend(loc="upper left", frameon=False, fontsize=8)
  return _save(fig, path)


def strip_size(columns: int) -> tuple[float, float]:
  """(width, height) in inches of a `bag_strip` of `columns` cines (two rows of frames)."""
  return (STRIP_PANEL_INCHES * max(columns, STRIP_MIN_COLUMNS),
          2 * STRIP_PANEL_INCHES + STRIP_TITLE_INCHES)


def bag_strip(frames: np.ndarray, labels: Sequence[str], phases: Sequence[str], path: str,
              title: str) -> str:
  """Frames of a study's bag, one column per cine and one row per phase; returns `path`.

  Args:
    frames: uint8 [K, P, S, S]: P frames (phases) of each of K cines.
    labels: [K] column titles (view, attention).
    phases: [P] row names, written in each frame's corner.
    path: PNG to write.
    title: figure title.
  """
  k, num_phases = frames.shape[:2]
  if len(labels) != k or len(phases) != num_phases:
    raise ValueError(f"{len(labels)} labels and {len(phases)} phases for frames {frames.shape}")
  fig = figure.Figure(figsize=strip_size(k), dpi=DPI, layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  grid = fig.subplots(num_phases, k, squeeze=False)  # [P, K] axes
  for col, label in enumerate(labels):
    grid[0, col].set_title(label, fontsize=8)
    for row, phase in enumerate(phases):
      ax = grid[row, col]
      ax.imshow(frames[col, row], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
      ax.text(0.03, 0.97, phase, transform=ax.transAxes, ha="left", va="top", fontsize=6,
              color="yellow")
      ax.set_axis_off()
  fig.suptitle(title, fontsize=8)
  return _save(fig, path)


def data_efficiency(results: Mapping[str, Mapping[float, Mapping[str, Mapping]]],
                    splits: Sequence[str], path: str, title: str = "") -> str:
  """MAE [95% CI] against label fraction: one line per model, one panel per split.

  Args:
    results: model -> label fraction -> split -> `metrics.with_ci` output.
    splits: the panels.
    path: PNG to write.
    title: figure title.
  """
  fig = figure.Figure(figsize=(5 * len(splits), 4), dpi=DPI, layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  for ax, split in zip(fig.subplots(1, len(splits), squeeze=False)[0], splits):
    for model, per_fraction in results.items():
      fractions = sorted(per_fraction)
      x = [100 * float(f) for f in fractions]
      ax.plot(x, [per_fraction[f][split]["mae"]["value"] for f in fractions], marker="o",
              label=model)
      ax.fill_between(x, [per_fraction[f][split]["mae"]["ci"][0] for f in fractions],
                      [per_fraction[f][split]["mae"]["ci"][1] for f in fractions], alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("label fraction (%)")
    ax.set_ylabel("MAE (LVEF %)")
    ax.set_title(f"{split} split")
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return _save(fig, path)
