"""Calibrating a fine-tuned checkpoint's prediction intervals, and measuring their coverage.

`calibrate` predicts a dataset split that played no part in training or choosing the checkpoint
(by default `calib`) exactly as `tools/predict.py` predicts (the same test-time augmentation
passes and leave-one-cine-out bags, `inference.study_predictions`), fits split-conformal
quantiles (`cmr_jax.intervals`) and writes them to the run folder (`calibration.json`), where
prediction finds them. `split_coverage` predicts another split the same way and reports the
empirical coverage and mean width of every calibrated interval: `tools/evaluate.py` does this on
test and external.
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging
import jax
import numpy as np

from cmr_jax.data import records
from cmr_jax import inference
from cmr_jax import intervals

DEFAULT_TTA = 4  # tools/predict.py's default passes: calibrate as prediction predicts


def calibrate(predictor: inference.Predictor, workdir: str, data_dir: str,
              split: str = intervals.CALIB_SPLIT, *, tta: int = DEFAULT_TTA, loo: bool = True,
              write: bool = True) -> intervals.Calibration:
  """Fits the run's conformal quantiles on a split's labelled studies and writes them.

  Args:
    predictor: the run's checkpoint (`inference.Predictor(workdir)`, its best checkpoint).
    workdir: the run folder (gets `calibration.json`).
    data_dir: a dataset with the run's preprocessing.
    split: studies not used for training or checkpoint selection.
    tta, loo: as prediction will use them (tools/predict.py --tta, --loo).
    write: write calibration.json (process 0 only).

  Raises:
    ValueError: a missing split, or one without labelled studies.
  """
  available = records.read_dataset_info(data_dir)["splits"]
  if split not in available:
    raise ValueError(f"{data_dir} has no split {split!r} to calibrate intervals on (it has "
                     f"{', '.join(sorted(available))}): build the dataset with calibration "
                     "studies, or name a split the checkpoint was neither trained nor chosen on")
  start = time.monotonic()
  p = inference.study_predictions(predictor, records.open_split(data_dir, split), tta=tta,
                                  loo=loo)
  labelled = ~np.isnan(p["lvef"])
  best = predictor.best or {}
  cal = intervals.calibrate(
      p["lvef"][labelled], p["pred"][labelled], p["loo_se"][labelled] if loo else None,
      val_rmse=best.get("val_rmse"), split=split, step=best.get("step"), tta=tta)
  logging.info("calibrated intervals on %d %s studies in %.0f s (MAE %.2f): %s", cal.n, split,
               time.monotonic() - start, cal.mae, cal.quantiles)
  if write and jax.process_index() == 0:
    logging.info("wrote %s", intervals.write(cal, workdir))
  return cal


def split_coverage(predictor: inference.Predictor, cal: intervals.Calibration,
                   source) -> dict[str, Any] | None:
  """Coverage and mean width of the calibrated intervals on a split's labelled studies,
  predicted as the calibration studies were; None when none is labelled.

  Returns:
    {"n", "mae" (of these predictions), "tta", "loo", "methods": intervals.coverage(...)}.
  """
  p = inference.study_predictions(predictor, source, tta=cal.tta, loo=cal.loo)
  labelled = ~np.isnan(p["lvef"])
  if not labelled.any():
    return None
  truth, pred = p["lvef"][labelled], p["pred"][labelled]
  loo_se = p["loo_se"][labelled] if cal.loo else None
  return {"n": int(labelled.sum()), "mae": float(np.mean(np.abs(truth - pred))),
          "tta": cal.tta, "loo": cal.loo,
          "methods": intervals.coverage(cal, truth, pred, loo_se)}

