"""Metric logging: absl logging with rate and ETA, a metrics JSONL file and TensorBoard event files.

In a URL workdir (gs://...) metrics.jsonl is one object, rewritten whole at most every
`URL_FLUSH_SECS` and on close (object stores cannot append; a resumed run reads it back and goes
on), and TensorBoard event files are written to a local temporary folder and copied to
`{workdir}/tb` as often and on close: a crash loses at most the last `URL_FLUSH_SECS` of either.
"""

from __future__ import annotations

import json
import math
import io
import os
import shutil
import tempfile
import time
from collections.abc import Mapping

from absl import logging
import numpy as np

from cmr_jax import files
from cmr_jax import runs

# How often metrics.jsonl and TensorBoard events in a URL workdir are uploaded (TensorBoard's
# flush_secs everywhere).
URL_FLUSH_SECS = 30


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
    self._tb_dir = self._tb_staging = None
    if not enabled:
      return
    files.makedirs(workdir)
    self._path = files.join(workdir, runs.METRICS_JSONL)
    self._url = files.is_url(workdir)
    self._flushed = time.monotonic()
    if self._url:  # rewritten whole: start from what an earlier (resumed) run wrote
      self._jsonl = io.StringIO(files.read_text(self._path) if files.exists(self._path) else "")
      self._jsonl.seek(0, io.SEEK_END)
    else:
      self._jsonl = open(self._path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb_dir = files.join(workdir, runs.TENSORBOARD_DIR)
      if self._url:
        self._tb_staging = tempfile.mkdtemp(prefix="cmr_jax_tb_")
      self._tb = SummaryWriter(self._tb_staging or self._tb_dir, flush_secs=URL_FLUSH_SECS)

  def write(self, step: int, scalars: Mapping[str, float], *, log: bool = True) -> None:
    """Records `scalars` at `step`; logs them with throughput and ETA when `log`."""
    if not self._enabled:
      return
    now = time.time()
    row = {"step": int(step), "time": now}
    row.update({k: _scalar(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._flush(force=False)
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

  def _flush(self, force: bool) -> None:
    if not self._url:
      self._jsonl.flush()
    elif force or time.monotonic() - self._flushed >= URL_FLUSH_SECS:
      files.write_text(self._path, self._jsonl.getvalue(), encoding="utf-8")
      if self._tb_staging is not None:
        if self._tb is not None:
          self._tb.flush()
        for name in os.listdir(self._tb_staging):  # this run's event files, uploaded whole
          files.copy(os.path.join(self._tb_staging, name), files.join(self._tb_dir, name))
      self._flushed = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._flush(force=True)  # in a URL workdir: the last metrics and event files uploaded
      self._jsonl.close()
      self._jsonl = None
    if self._tb_staging is not None:
      shutil.rmtree(self._tb_staging)
      self._tb_staging = None
