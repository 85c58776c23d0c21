"""Linear probe of frozen encoders: known answers, grouped cross-validation, the CLI on a real run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cmr_jax.data import pipeline
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.eval import probe
from cmr_jax import inference

import sweep_testlib


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return sweep_testlib.tiny_pretrain(str(tmp_path_factory.getbasetemp() / "tiny_pretrain"))


def test_pool_averages_the_valid_instances_only():
  features = np.zeros((2, 3, 2), np.float32)
  features[0] = [[1, 2], [3, 4], [100, 100]]  # the third instance is padding
  features[1] = [[5, 7], [0, 0], [0, 0]]
  mask = np.array([[True, True, False], [True, False, False]])
  bank = inference.Bank(features=features, mask=mask, lvef=np.zeros(2, np.float32),
                            study_index=np.arange(2, dtype=np.int32),
                            view=np.zeros((2, 3), np.int32))
  np.testing.assert_allclose(probe.pool(bank), [[2, 3], [5, 7]])


def _linear_data(seed: int, subjects: int, rescans: int = 2, noise: float = 0.1):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=6)
  x = rng.normal(size=(subjects, 6)).repeat(rescans, axis=0)
  x += 0.01 * rng.normal(size=x.shape)  # a rescan is almost the same study
  y = 50 + 5 * x @ w + noise * rng.normal(size=len(x))
  names = [f"s{i}" for i in range(subjects) for _ in range(rescans)]
  return x, y, names


def test_fit_recovers_a_linear_target_and_needs_two_subjects():
  x, y, names = _linear_data(0, 40)
  model, alpha = probe.fit(x[:60], y[:60], names[:60])
  assert alpha in probe.ALPHAS and alpha <= 1.0  # a clean linear target wants little penalty
  assert np.abs(model.predict(x[60:]) - y[60:]).mean() < 0.5  # unseen subjects
  y_nan = y.copy()
  y_nan[2:] = np.nan  # one labelled subject left
  with pytest.raises(ValueError, match="at least 2 subjects, got 1"):
    probe.fit(x, y_nan, names)


def test_folds_are_grouped_by_subject():
  # Pure noise with exact duplicates per subject: folds that split a subject reward memorising
  # (a small alpha: the twin in the training fold predicts the held-out copy); folds grouped by
  # subject see that nothing generalises and pick a heavy penalty.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(30, 20)).repeat(2, axis=0)
  y = rng.normal(50, 10, size=30).repeat(2)
  names = [f"s{i}" for i in range(30) for _ in range(2)]
  _, grouped = probe.fit(x, y, names)
  _, ungrouped = probe.fit(x, y, [f"row{i}" for i in range(60)])  # every row its own subject
  assert grouped >= 1000 and ungrouped <= 1, (grouped, ungrouped)


def test_evaluate_scores_each_fraction_and_skips_those_without_two_subjects():
  x, y, names = _linear_data(1, 60)
  pooled = {"train": probe.PooledSplit(x[:80], y[:80], names[:80]),
            "test": probe.PooledSplit(x[80:], y[80:], names[80:])}
  pooled["test"].lvef[0] = np.nan  # an unlabelled test study is left out of the scores
  out = probe.evaluate(pooled, train_split="train", eval_splits=["test"],
                       fractions=[0.001, 1.0], n_boot=50)
  assert list(out["results"]) == ["1"]
  assert len(out["skipped"]) == 1 and out["skipped"][0].startswith("label fraction 0.001:")
  row = out["results"]["1"]
  assert row["n_train"] == 80
  assert row["test"]["n"]["value"] == 39
  assert row["test"]["mae"]["value"] < 1.0
  lo, hi = row["test"]["mae"]["ci"]
  assert lo <= row["test"]["mae"]["value"] <= hi
  assert "| 1 | 100% | 80 |" in probe.table({"1": out}, ["test"])
  # A label fraction keeps the subjects fine-tuning's pipeline keeps.
  half = probe.evaluate(pooled, train_split="train", eval_splits=["test"], fractions=[0.5],
                        n_boot=10)
  kept = sum(splits.in_label_fraction(f"s{i}", 0.5, pipeline.LABEL_FRACTION_SALT)
             for i in range(40))
  assert half["results"]["0.5"]["n_train"] == 2 * kept


def test_parse_inits():
  assert probe.parse_inits(["random", "pre=pretrain:/x:4"]) == {
      "random": "random", "pre": "pretrain:/x:4"}
  with pytest.raises(ValueError, match="given twice"):
    probe.parse_inits(["a=random", "a=pretrain:/x"])
  with pytest.raises(ValueError, match="NAME=INIT"):
    probe.parse_inits(["a="])


def test_encoders_on_a_real_run_and_the_cli(tiny, tmp_path):
  data_dir, pretrain_dir = tiny
  config = sweep_testlib.finetune_config(data_dir)
  pre = probe.encode_splits(f"pretrain:{pretrain_dir}", data_dir, config, ["train", "test"])
  rnd = probe.encode_splits("random", data_dir, config, ["test"])
  test_meta = records.open_split(data_dir, "test").metadata
  assert pre["test"].subjects == [m["subject_id"] for m in test_meta]  # in index order
  assert pre["test"].features.shape[0] == sweep_testlib.NUM_TEST and pre["test"].features.ndim == 2
  assert np.all(np.isfinite(pre["test"].features))
  assert not np.allclose(pre["test"].features, rnd["test"].features)  # the checkpoint is used
  again = probe.encode_splits(f"pretrain:{pretrain_dir}", data_dir, config, ["test"])
  np.testing.assert_array_equal(again["test"].features, pre["test"].features)

  out = str(tmp_path / "probe")
  cli = subprocess.run(
      [sys.executable, os.path.join(sweep_testlib.ROOT, "tools", "probe.py"),
       f"--data_dir={data_dir}", f"--out={out}", f"--init=pre=pretrain:{pretrain_dir}",
       "--init=random", "--splits=test,external", "--fractions=1", "--bootstrap=20",
       f"--finetune_config={sweep_testlib.__file__}:{data_dir}"],
      env=dict(os.environ, PYTHONPATH=os.pathsep.join(
          (sweep_testlib.ROOT, os.path.dirname(sweep_testlib.__file__)))),
      capture_output=True, text=True, check=False, cwd=sweep_testlib.ROOT)
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert "| pre | 100% |" in cli.stdout and "| random | 100% |" in cli.stdout
  with open(os.path.join(out, "probe.json")) as f:
    result = json.load(f)
  assert result["by_init"]["pre"]["init"] == f"pretrain:{pretrain_dir}"
  assert result["by_init"]["pre"]["results"]["1"]["test"]["n"]["value"] == sweep_testlib.NUM_TEST
  assert "external" not in result["by_init"]["pre"]["results"]["1"]  # no such split: left out
  assert os.path.getsize(os.path.join(out, "probe.png")) > 1000
