"""The demo's stage bookkeeping: stale runs are moved aside, finished runs are skipped."""

import importlib.util
import json
import os

import ml_collections
import numpy as np

from cmr_jax.experiments import demo
from cmr_jax.experiments import stages
from cmr_jax import runs


def _config(steps: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"total_steps": steps, "optim": {"lr": 1e-3},
                                    "model": {"video_overrides": {"kv_pool_stride": (1, 2, 2)}}})


def test_a_run_of_another_config_is_moved_aside_and_the_same_config_resumes(tmp_path):
  run = str(tmp_path / "pretrain")
  runs.save_config(_config(10), run)
  # Same config, no checkpoint yet: not finished, left in place (the stage resumes it).
  assert not stages.finished(run, _config(10))
  assert os.path.exists(os.path.join(run, "config.json"))
  # Another config: moved aside, never resumed from.
  assert not stages.finished(run, _config(20))
  assert not os.path.exists(run)
  stale = [d for d in os.listdir(tmp_path) if d.startswith("pretrain.stale-")]
  assert len(stale) == 1
  assert os.path.exists(os.path.join(tmp_path, stale[0], "config.json"))


def _load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_demo_end_to_end_names_its_four_rows_and_links_the_validation_pick(tmp_path, capsys,
                                                                          absl_flags_parsed):
  data = _load_config("synthetic_data", "small")
  data.num_workers = 0
  data.spec.rescan_fraction = 0.0
  work = str(tmp_path / "demo")
  configs = [_load_config("synthetic_pretrain", "smoke"),
             _load_config("synthetic_finetune", "smoke"),
             _load_config("synthetic_finetune", "transfer_smoke")]
  for c in configs:  # one example per fake CPU device (conftest: 8 devices)
    c.batch_size = c.eval_batch_size = 8
  out = demo.run(work, data, *configs)
  with open(os.path.join(work, "results.json")) as f:
    saved = json.load(f)
  assert saved["results"] == json.loads(json.dumps(out["results"]))
  assert list(saved["results"]) == ["pretrained", "random_frozen", "scratch_full", "train_mean"]
  for per_split in saved["results"].values():
    assert set(per_split) == {"test", "external"}
    assert all(np.isfinite(m["mae"]) for m in per_split.values())
  # Pre-training read the archive only; the three arms trained what their names say.
  pre = runs.load_config(os.path.join(work, "pretrain"))
  assert (pre.data.train_split, pre.data.eval_split) == ("archive", "archive_val")
  modes = {name: runs.load_config(os.path.join(work, f"finetune_{name}"))
           for name in demo.DEMO_ARMS}
  assert {n: (c.init.split(":")[0], c.mode) for n, c in modes.items()} == {
      "pretrained": ("pretrain", "finetune"), "random_frozen": ("random", "finetune"),
      "scratch_full": ("random", "transfer")}
  # The model link follows the lowest validation MAE (never test or external).
  val = {n: runs.read_best(os.path.join(work, f"finetune_{n}"))["val_mae"]
         for n in demo.DEMO_ARMS}
  assert os.readlink(os.path.join(work, demo.MODEL_LINK)) == f"finetune_{min(val, key=val.get)}"
  printed = capsys.readouterr().out
  assert "`scratch_full`" in printed and "archive" in printed


def test_a_run_older_than_its_inputs_is_moved_aside(tmp_path):
  run, upstream = str(tmp_path / "finetune"), str(tmp_path / "pretrain_final")
  os.makedirs(upstream)
  runs.save_config(_config(10), run)
  old = os.path.getmtime(os.path.join(run, "config.json"))
  os.utime(upstream, (old - 60, old - 60))  # written before the run started: still valid
  assert not stages.finished(run, _config(10), [upstream])
  assert os.path.exists(run)
  os.utime(upstream, (old + 60, old + 60))  # e.g. pre-training redone since: stale
  assert not stages.finished(run, _config(10), [upstream, str(tmp_path / "missing")])
  assert not os.path.exists(run)
  assert any(d.startswith("finetune.stale-") for d in os.listdir(tmp_path))
