"""The synthetic benchmark's tables and plot, on known results (the stages are tested elsewhere)."""

import importlib.util
import os

import numpy as np
import pytest

from cmr_jax.eval import metrics
from cmr_jax.experiments import benchmark
from cmr_jax.experiments import stages


_spec = importlib.util.spec_from_file_location(
    "synthetic_finetune", os.path.join(os.path.dirname(__file__), "..", "configs",
                                       "synthetic_finetune.py"))
synthetic_finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic_finetune)


def _results():
  rng = np.random.default_rng(0)
  truth = rng.uniform(20, 70, 40)
  subjects = [f"s{i // 2}" for i in range(40)]
  out = {}
  for model, noise in (("pretrained", 3.0), ("scratch", 8.0)):
    for fraction in (0.1, 1.0):
      for split in ("test", "external"):
        pred = truth + rng.normal(0, noise / fraction ** 0.25, truth.shape)
        out.setdefault(model, {}).setdefault(fraction, {})[split] = metrics.with_ci(
            truth, pred, subjects, n_boot=50)
  return out


def test_tables_and_plot(tmp_path):
  results = _results()
  md = benchmark.tables(results, ["test", "external"])
  assert md.count("### ") == 2 * len(benchmark.METRICS)
  row = next(line for line in md.splitlines() if line.startswith("| 100% |"))
  mae = results["pretrained"][1.0]["test"]["mae"]["value"]
  assert f"{mae:.2f}" in row
  path = str(tmp_path / "plot.png")
  benchmark.plot(results, ["test", "external"], path)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert benchmark.run_name("kinetics:/w/k400.pyth", 0.01) == "finetune_kinetics__w_k400_pyth_0.01"
  assert not benchmark.needs_pretraining(["random_frozen", "scratch_full", "kinetics:/w/k.pyth"])
  assert benchmark.needs_pretraining(["scratch_full", "pretrained_transfer"])


def test_arms_are_named_for_what_they_train():
  frozen = synthetic_finetune.get_config()
  transfer = synthetic_finetune.get_config("transfer")
  got = {name: stages.arm_config(arm, frozen, transfer, "D", "P")
         for name, arm in stages.ARMS.items()}
  assert {n: (c.init, c.mode, c.data.dir) for n, c in got.items()} == {
      "pretrained": ("pretrain:P", "finetune", "D"),
      "random_frozen": ("random", "finetune", "D"),
      "scratch_full": ("random", "transfer", "D"),
      "pretrained_transfer": ("pretrain:P", "transfer", "D")}
  assert frozen.init == "random" and frozen.data.dir != "D"  # the given configs are not changed
  with pytest.raises(ValueError, match="needs a transfer config"):
    stages.arm_config(stages.ARMS["scratch_full"], frozen, frozen, "D", "P")
