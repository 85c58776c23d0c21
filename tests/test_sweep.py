"""Checkpoint sweep: real fine-tunes per kept checkpoint, resume, shards, table, errors."""

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from cmr_jax.experiments import sweep
from cmr_jax import runs
from cmr_jax.train import finetune

import sweep_testlib


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return sweep_testlib.tiny_pretrain(str(tmp_path_factory.getbasetemp() / "tiny_pretrain"))


@pytest.fixture
def counted_finetune(monkeypatch):
  """Counts (and passes on) calls of finetune.train_and_evaluate, by workdir."""
  calls = []
  real = finetune.train_and_evaluate

  def counting(config, workdir):
    calls.append(os.path.basename(workdir))
    return real(config, workdir)

  monkeypatch.setattr(finetune, "train_and_evaluate", counting)
  return calls


def _fake_finetune_one(pretrain_dir, step, config, out_dir, test_split, loss):
  """Writes a result with numbers that depend on the step only (no training)."""
  del config, test_split
  os.makedirs(sweep.step_dir(out_dir, step), exist_ok=True)
  result = {"step": step, "pretrain_loss": loss[0], "pretrain_loss_step": loss[1],
            "val_mae": 10.0 - step / 7, "val_mse": 100.0 + step, "test_mae": 9.0 + (step % 3),
            "test_mse": 90.0, "n_val": 5, "n_test": 4, "finetune_best_step": 4,
            "finetune_s": 0.0, "checkpoint_stamp": sweep.checkpoint_stamp(pretrain_dir, step)}
  with open(os.path.join(sweep.step_dir(out_dir, step), sweep.RESULT_JSON), "w") as f:
    json.dump(result, f)
  return result


def test_sweep_fine_tunes_every_kept_checkpoint_then_resumes_only_the_missing(
    tiny, tmp_path, counted_finetune):
  data_dir, pretrain_dir = tiny
  out = str(tmp_path / "sweep")
  config = sweep_testlib.finetune_config(data_dir)
  summary = sweep.run_sweep(pretrain_dir, config, out)
  assert counted_finetune == ["step_2", "step_4", "step_6"]
  assert [r["step"] for r in summary["rows"]] == sweep_testlib.KEPT_STEPS
  assert summary["missing_steps"] == []
  losses = sweep.pretrain_losses(pretrain_dir)
  for row in summary["rows"]:
    step_dir = sweep.step_dir(out, row["step"])
    # Each fine-tune started from its own checkpoint and ran in its own folder.
    with open(os.path.join(step_dir, "config.json")) as f:
      assert json.load(f)["init"] == f"pretrain:{os.path.abspath(pretrain_dir)}:{row['step']}"
    assert row["pretrain_loss"] == losses[row["step"]] and row["pretrain_loss_step"] == row["step"]
    assert row["n_val"] == runs.read_best(step_dir)["val_n"]
    assert row["n_test"] == sweep_testlib.NUM_TEST
    # The validation MAE is the fine-tune's own best-checkpoint figure.
    assert row["val_mae"] == pytest.approx(runs.read_best(step_dir)["val_mae"], rel=1e-6)
    assert np.isfinite([row["test_mae"], row["test_mse"], row["val_mse"]]).all()
    assert row["val_mse"] >= row["val_mae"] ** 2 * (1 - 1e-6)  # Jensen
  # Spearman equals scipy's on the table's columns.
  steps = [r["step"] for r in summary["rows"]]
  for y in ("val_mae", "test_mae"):
    col = [r[y] for r in summary["rows"]]
    rho = summary["spearman"][f"{y}_vs_step"]["rho"]
    np.testing.assert_allclose(rho, stats.spearmanr(steps, col).statistic)
    rho = summary["spearman"][f"{y}_vs_pretrain_loss"]["rho"]
    np.testing.assert_allclose(rho, stats.spearmanr([r["pretrain_loss"] for r in summary["rows"]],
                                                    col).statistic)
  with open(os.path.join(out, sweep.TABLE_CSV)) as f:
    table = list(csv.DictReader(f))
  assert [int(r["step"]) for r in table] == steps
  assert [float(r["test_mae"]) for r in table] == [r["test_mae"] for r in summary["rows"]]
  assert os.path.getsize(os.path.join(out, sweep.PLOT_PNG)) > 1000
  with open(os.path.join(out, sweep.TABLE_MD)) as f:
    assert "test_mae vs step" in f.read()

  # The command line re-run fine-tunes nothing (the result files stay untouched) and rebuilds
  # the same table; with one result file lost, a re-run redoes only that checkpoint, and the
  # resumed fine-tune (its checkpoints are complete) gives the same figures.
  results = [os.path.join(sweep.step_dir(out, s), sweep.RESULT_JSON) for s in steps]
  mtimes = [os.stat(p).st_mtime_ns for p in results]
  os.remove(os.path.join(out, sweep.SUMMARY_JSON))
  cli = subprocess.run(
      [sys.executable, os.path.join(sweep_testlib.ROOT, "tools", "sweep.py"),
       f"--pretrain_dir={pretrain_dir}", f"--out={out}",
       f"--finetune_config={sweep_testlib.__file__}:{data_dir}"],
      env=dict(os.environ, PYTHONPATH=os.pathsep.join(
          (sweep_testlib.ROOT, os.path.dirname(sweep_testlib.__file__)))),
      capture_output=True, text=True, timeout=120, check=False)
  assert cli.returncode == 0, cli.stderr[-2000:]
  assert "3 already done, 0 to fine-tune" in cli.stderr
  assert "test_mae vs pretrain_loss" in cli.stdout
  assert [os.stat(p).st_mtime_ns for p in results] == mtimes
  with open(os.path.join(out, sweep.SUMMARY_JSON)) as f:
    assert json.load(f)["rows"] == summary["rows"]
  os.remove(results[1])
  again = sweep.run_sweep(pretrain_dir, config, out)
  assert counted_finetune == ["step_2", "step_4", "step_6", "step_4"]
  for new, old in zip(again["rows"], summary["rows"]):
    assert {k: v for k, v in new.items() if k != "finetune_s"} == pytest.approx(
        {k: v for k, v in old.items() if k != "finetune_s"})


def test_two_shards_give_the_union_of_one(tiny, tmp_path, monkeypatch):
  data_dir, pretrain_dir = tiny
  monkeypatch.setattr(sweep, "finetune_one", _fake_finetune_one)
  config = sweep_testlib.finetune_config(data_dir)
  one = sweep.run_sweep(pretrain_dir, config, str(tmp_path / "one"))
  first = sweep.run_sweep(pretrain_dir, config, str(tmp_path / "two"), num_shards=2,
                          shard_index=0)
  assert [r["step"] for r in first["rows"]] == [2, 6] and first["missing_steps"] == [4]
  both = sweep.run_sweep(pretrain_dir, config, str(tmp_path / "two"), num_shards=2,
                         shard_index=1)
  assert both["rows"] == one["rows"] and both["missing_steps"] == []
  assert both["spearman"] == one["spearman"]
  np.testing.assert_allclose(one["spearman"]["val_mae_vs_step"]["rho"], -1.0)
  np.testing.assert_allclose(one["spearman"]["val_mae_vs_step"]["p"], 2 / 6)  # 2 of 3! pairings


def test_assignment_and_launcher_shards():
  assert sweep.assign([6, 2, 4, 8, 10], 2, 0) == [2, 6, 10]
  assert sweep.assign([6, 2, 4, 8, 10], 2, 1) == [4, 8]
  with pytest.raises(ValueError, match="shard index 2 not in"):
    sweep.assign([1], 2, 2)
  assert sweep.shard_from_environment({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == (3, 4)
  assert sweep.shard_from_environment({"OMPI_COMM_WORLD_RANK": "1",
                                       "OMPI_COMM_WORLD_SIZE": "2"}) == (1, 2)
  assert sweep.shard_from_environment({}) == (0, 1)


def test_loss_at_takes_the_last_logged_step():
  losses = {10: 3.0, 20: 2.5}
  assert sweep.loss_at(losses, 20) == (2.5, 20)
  assert sweep.loss_at(losses, 25) == (2.5, 20)
  assert sweep.loss_at(losses, 5)[1] is None and np.isnan(sweep.loss_at(losses, 5)[0])


def test_spearman_skips_non_finite_and_constant_columns_and_tests_by_permutation():
  rows = [{"a": 1, "b": 3.0}, {"a": 2, "b": float("nan")}, {"a": 3, "b": 1.0},
          {"a": 4, "b": 2.0}, {"a": 5, "b": 0.5}]
  got = sweep.spearman(rows, "b", "a")
  xs, ys = [1, 3, 4, 5], [3.0, 1.0, 2.0, 0.5]
  assert got["n"] == 4
  np.testing.assert_allclose(got["rho"], stats.spearmanr(xs, ys).statistic)
  # Exact two-sided p: the share of the 4! pairings whose |rho| reaches the observed one.
  perms = [stats.spearmanr(xs, p).statistic for p in itertools.permutations(ys)]
  np.testing.assert_allclose(got["p"], np.mean(np.abs(perms) >= abs(got["rho"]) - 1e-12))
  assert np.isnan(sweep.spearman([{"a": 1, "b": 2.0}, {"a": 2, "b": 2.0}], "b", "a")["rho"])
  assert sweep.spearman([{"a": 1, "b": 2.0}], "b", "a")["n"] == 1


def test_bad_inputs_give_clear_errors(tiny, tmp_path, monkeypatch):
  data_dir, pretrain_dir = tiny
  config = sweep_testlib.finetune_config(data_dir)
  os.makedirs(tmp_path / "empty_run")
  with pytest.raises(FileNotFoundError, match="is not a run directory with checkpoints"):
    sweep.run_sweep(str(tmp_path / "empty_run"), config, str(tmp_path / "a"))
  with pytest.raises(ValueError, match="split 'unlabelled' .* no study with an LVEF label"):
    sweep.run_sweep(pretrain_dir, config, str(tmp_path / "b"), test_split="unlabelled")
  # An output folder of another sweep is refused before any fine-tune.
  monkeypatch.setattr(sweep, "finetune_one", _fake_finetune_one)
  sweep.run_sweep(pretrain_dir, config, str(tmp_path / "c"))
  with pytest.raises(ValueError, match=r"other settings \(finetune_config.data.label_fraction: "
                     r"1.0 there, 0.5 now; see"):
    sweep.run_sweep(pretrain_dir, config, str(tmp_path / "c"), label_fraction=0.5)
  # A checkpoint written anew (a new pre-training run in the same folder) makes its result stale.
  rerun = str(tmp_path / "rerun")
  shutil.copytree(pretrain_dir, rerun)  # keeps the modification times
  sweep.run_sweep(rerun, config, str(tmp_path / "e"))
  os.utime(os.path.join(rerun, "checkpoints", "4"))
  with pytest.raises(ValueError, match=r"checkpoints of steps \[4\] .* written anew"):
    sweep.run_sweep(rerun, config, str(tmp_path / "e"))
  assert sweep.merge(str(tmp_path / "e"))["stale_steps"] == [4]
  monkeypatch.undo()
  # An encoder that does not match the checkpoints: named, per checkpoint; nothing recorded.
  config.model.embed_dim = 24
  with pytest.raises(sweep.SweepError, match=r"1 of 1 checkpoints failed.*step 2: ValueError: "
                     r"the video_proj parameters .* do not match config.model"):
    sweep.run_sweep(pretrain_dir, config, str(tmp_path / "d"), num_shards=3, shard_index=0)
  assert sweep.read_results(str(tmp_path / "d")) == []
