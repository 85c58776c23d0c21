"""The demo's stage bookkeeping: stale runs are moved aside, finished runs are skipped."""

import importlib.util
import json
import os

import ml_collections
import numpy as np
import pytest

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.eval import conformal
from cmr_jax.experiments import demo
from cmr_jax.experiments import stages
from cmr_jax.phantom import synthetic
from cmr_jax import intervals
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
  # The model's intervals, calibrated on the calib split as predict predicts, and their coverage.
  model = os.path.join(work, demo.MODEL_LINK)
  cal = intervals.read(model)
  calib_n = len(records.load_index(os.path.join(work, "data"), intervals.CALIB_SPLIT))
  assert cal.split == "calib" and cal.n == calib_n == data.spec.num_calib
  assert cal.tta == conformal.DEFAULT_TTA and cal.belongs_to(runs.read_best(model))
  assert saved["intervals"]["calibration"] == cal.to_dict()
  for split in ("test", "external"):
    cover = saved["intervals"][split]["methods"]
    assert set(cover) == {"normalized", "absolute"}
    assert all(0.0 <= c["coverage"] <= 1.0 for m in cover.values() for c in m.values())
  printed = capsys.readouterr().out
  assert "`scratch_full`" in printed and "archive" in printed and "calib" in printed
  assert "split-conformal" in printed


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


def _data_config(split_salt: str) -> ml_collections.ConfigDict:
  """A dataset of 8 small phantom subjects (a second or so to build)."""
  return ml_collections.ConfigDict({
      "spec": {"num_subjects": 8, "num_external": 0, "num_archive": 0, "rescan_fraction": 0.0,
               "frames": 8, "matrix": 48, "split_salt": split_salt},
      "preprocess": {"size": 32, "spacing_mm": 3.0, "num_frames": 8},
      "num_shards": 1, "num_workers": 0})


def _split_of_subject(data_dir: str) -> dict[str, str]:
  return {m["subject_id"]: split for split in records.read_dataset_info(data_dir)["splits"]
          for m in records.load_index(data_dir, split)}


def test_data_not_made_from_the_requested_config_are_rebuilt_and_their_runs_moved_aside(
    tmp_path, monkeypatch):
  data, run = str(tmp_path / "data"), str(tmp_path / "finetune")
  config, other = _data_config("a"), _data_config("b")  # same subjects, other splits
  stages.make_data(config, data)
  wanted = _split_of_subject(data)
  upstream = [stages.data_stamp(data)]
  runs.save_config(_config(10), run)
  stages.make_data(config, data)  # up to date: the run made from it stays
  assert not stages.finished(run, _config(10), upstream) and os.path.exists(run)

  def moved_aside() -> bool:
    gone = not stages.finished(run, _config(10), upstream) and not os.path.exists(run)
    runs.save_config(_config(10), run)  # the next run made from these data
    return gone

  # Another data config: rebuilt; a run made from the old data is never resumed or reused.
  stages.make_data(other, data)
  moved = _split_of_subject(data)
  assert moved.keys() == wanted.keys() and moved != wanted  # former training subjects moved
  assert moved_aside()
  stages.make_data(config, data)
  assert _split_of_subject(data) == wanted and moved_aside()

  # Rebuilt behind the stamp's back (e.g. tools/make_synthetic.py into the same folder).
  spec = synthetic.SyntheticSpec.from_dict(other.spec.to_dict())
  synthetic.build_synthetic(spec, data, cfg=preprocess.PreprocessConfig.from_dict(
      other.preprocess.to_dict()), num_shards=1)
  stages.make_data(config, data)
  assert _split_of_subject(data) == wanted and moved_aside()

  # A rebuild for another config interrupted after the data were replaced.
  real = synthetic.build_synthetic

  def interrupted(*args, **kwargs):
    real(*args, **kwargs)
    raise KeyboardInterrupt

  monkeypatch.setattr(synthetic, "build_synthetic", interrupted)
  with pytest.raises(KeyboardInterrupt):
    stages.make_data(other, data)
  monkeypatch.setattr(synthetic, "build_synthetic", real)
  stages.make_data(config, data)
  assert _split_of_subject(data) == wanted and moved_aside()
  assert len([d for d in os.listdir(tmp_path) if d.startswith("finetune.stale-")]) == 4

  # A stamp of an older version (the config alone) is taken as it was: fingerprinted, not rebuilt.
  stamp, info = stages.data_stamp(data), os.path.join(data, records.DATASET_INFO)
  with open(stamp, "w") as f:
    f.write(config.to_json(sort_keys=True))
  os.utime(stamp, (1e9, 1e9))
  built = os.path.getmtime(info)
  stages.make_data(config, data)
  assert os.path.getmtime(stamp) == 1e9 and os.path.getmtime(info) == built
  with open(stamp) as f:
    assert json.load(f)["dataset"] == stages.dataset_fingerprint(data) is not None
