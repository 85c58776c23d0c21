"""Metric logging: absl logging with rate and ETA, a metrics JSONL file and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

from absl import logging
import numpy as np

from cmr_jax import runs


def _scalar(v) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Writes scalars per step to `{workdir}/metrics.jsonl`, TensorBoard (`{workdir}/tb`) and the log.

  Only the process with `jax.process_index() == 0` should construct one with `enabled=True`.
  """

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool = True,
               tensorboard: bool = True, name: str = "train"):
    self._enabled = enabled
    self._total = total_steps
    self._name = name
    self._t0 = None
    self._step0 = None
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, runs.METRICS_JSONL), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, runs.TENSORBOARD_DIR), flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, float], *, log: bool = True) -> None:
    """Records `scalars` at `step`; logs them with throughput and ETA when `log`."""
    if not self._enabled:
      return
    now = time.time()
    row = {"step": int(step), "time": now}
    row.update({k: _scalar(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "time") and math.isfinite(v):
          self._tb.add_scalar(f"{self._name}/{k}", v, step)
    if log:
      logging.info("[%s] step %d/%d %s%s", self._name, step, self._total,
                   " ".join(f"{k}={row[k]:.4g}" for k in scalars), self._progress(step, now))

  def _progress(self, step: int, now: float) -> str:
    if self._t0 is None:
      self._t0, self._step0 = now, step
      return ""
    done = step - self._step0
    elapsed = now - self._t0
    if done <= 0 or elapsed <= 0:
      return ""
    rate = done / elapsed
    eta = max(0, self._total - step) / rate
    return f" | {rate:.2f} steps/s, ETA {eta / 60:.1f} min"

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
