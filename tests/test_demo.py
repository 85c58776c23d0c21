"""The demo's stage bookkeeping: stale runs are moved aside, finished runs are skipped."""

import os

import ml_collections

from cmr_jax import stages
from cmr_jax.train import common


def _config(steps: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"total_steps": steps, "optim": {"lr": 1e-3},
                                    "model": {"video_overrides": {"kv_pool_stride": (1, 2, 2)}}})


def test_a_run_of_another_config_is_moved_aside_and_the_same_config_resumes(tmp_path):
  run = str(tmp_path / "pretrain")
  common.save_config(_config(10), run)
  # Same config, no checkpoint yet: not finished, left in place (the stage resumes it).
  assert not stages.finished(run, _config(10))
  assert os.path.exists(os.path.join(run, "config.json"))
  # Another config: moved aside, never resumed from.
  assert not stages.finished(run, _config(20))
  assert not os.path.exists(run)
  stale = [d for d in os.listdir(tmp_path) if d.startswith("pretrain.stale-")]
  assert len(stale) == 1
  assert os.path.exists(os.path.join(tmp_path, stale[0], "config.json"))
