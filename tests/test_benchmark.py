"""The synthetic benchmark's tables and plot, on known results (the stages are tested elsewhere)."""

import numpy as np

from cmr_jax import benchmark
from cmr_jax.eval import metrics


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
  assert md.count("### ") == 2 * len(benchmark._METRICS)
  row = next(line for line in md.splitlines() if line.startswith("| 100% |"))
  mae = results["pretrained"][1.0]["test"]["mae"]["value"]
  assert f"{mae:.2f}" in row
  path = str(tmp_path / "plot.png")
  benchmark.plot(results, ["test", "external"], path)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert benchmark.run_name("kinetics:/w/k400.pyth", 0.01) == "finetune_kinetics__w_k400_pyth_0.01"
  assert benchmark.init_string("scratch", "p") == "random"
  assert benchmark.init_string("pretrained", "p") == "pretrain:p"
