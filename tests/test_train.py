"""Training loops: exact resume after a stop or a crash, SIGTERM, freezing, non-finite loss."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from cmr_jax.data import records
from cmr_jax import inference
from cmr_jax.models import registry
from cmr_jax import runs
from cmr_jax.train import common
from cmr_jax.train import finetune
from cmr_jax.train import optim
from cmr_jax.train import pretrain

import sweep_testlib

# The tiny fine-tune from an init: finetune_config(data_dir, init) (test_evaluate.py and
# test_predict.py import it, and the data_dir fixture, from here).
finetune_config = sweep_testlib.finetune_config
_REAL_CHECK_FINITE = common.check_finite  # what _at_step wraps


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """12 fake labelled studies with reports: train and val splits."""
  out = sweep_testlib.build_records(sweep_testlib.fake_items(range(12)),
                                    str(tmp_path_factory.mktemp("data")))
  assert {"train", "val"} <= set(records.read_dataset_info(out)["splits"])
  return out


@pytest.fixture(scope="module")
def vocab(data_dir, tmp_path_factory):
  """One vocabulary file shared by every run of this module."""
  return sweep_testlib.train_vocab(data_dir, str(tmp_path_factory.mktemp("vocab")))


def pretrain_config(data_dir: str, vocab: str):
  c = sweep_testlib.pretrain_config(data_dir, vocab)
  c.loss.variance_weight = 0.5  # the resume tests cover the variance floor's path too
  c.data.augment_on_device = True  # and clips made in the jitted step
  return c


def _losses(workdir: str) -> dict[int, float]:
  """Loss per step from metrics.jsonl (a re-run step keeps its last value)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]
  return out


class _Crash(Exception):
  pass


def _crash():
  raise _Crash()


def _sigterm():
  os.kill(os.getpid(), signal.SIGTERM)


def _at_step(monkeypatch, step: int, action) -> None:
  """From now on (until check_finite is patched again) training step `step` calls `action()`."""
  def check_finite(s, *args):
    if s == step:
      action()
    return _REAL_CHECK_FINITE(s, *args)

  monkeypatch.setattr(common, "check_finite", check_finite)


@pytest.fixture(scope="module")
def unbroken_pretrain(data_dir, vocab, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrain_a"))
  result = pretrain.train_and_evaluate(pretrain_config(data_dir, vocab), workdir)
  assert result["step"] == 6
  # What is minimised is InfoNCE + 0.5 x the variance penalty; spreads are logged.
  np.testing.assert_allclose(result["total_loss"],
                             result["loss"] + 0.5 * result["variance_penalty"], rtol=1e-5)
  assert 0 < result["spread_a"] and 0 < result["spread_b"]
  return workdir


def test_pretrain_resume_after_sigterm_and_crash_is_exact(data_dir, vocab, unbroken_pretrain,
                                                          tmp_path, monkeypatch):
  config = pretrain_config(data_dir, vocab)
  workdir = str(tmp_path)

  # 1. SIGTERM arrives during step 3: the run saves step 3 and returns cleanly.
  _at_step(monkeypatch, 3, _sigterm)
  stopped = pretrain.train_and_evaluate(config, workdir)
  assert stopped["step"] == 3 and stopped["preempted"]  # tools/train.py exits 75: requeue
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))

  # 2. Resumed, it crashes hard during step 5 (before the step-6 save): step 4 is on disk.
  _at_step(monkeypatch, 5, _crash)
  with pytest.raises(_Crash):
    pretrain.train_and_evaluate(config, workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))

  # 3. Resumed again, it finishes; every step's loss equals the unbroken run's, bit for bit.
  monkeypatch.setattr(common, "check_finite", _REAL_CHECK_FINITE)
  assert pretrain.train_and_evaluate(config, workdir)["step"] == 6
  expected, got = _losses(unbroken_pretrain), _losses(workdir)
  assert sorted(got) == sorted(expected) == list(range(1, 7))
  assert got == expected


def _restored_params(workdir: str, subdir: str, step: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, subdir, str(step), "state"))


def test_finetune_keeps_frozen_encoder_and_gives_it_no_optimizer_state(data_dir,
                                                                       unbroken_pretrain,
                                                                       tmp_path):
  config = finetune_config(data_dir, f"pretrain:{unbroken_pretrain}")
  result = finetune.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == config.total_steps and np.isfinite(result["best_val_mae"])
  pre = _restored_params(unbroken_pretrain, "checkpoints", 6)["params"]
  state = _restored_params(str(tmp_path), "checkpoints", config.total_steps)
  tuned = state["params"]
  # The frozen encoder equals the pre-trained one exactly; the projection (trainable) moved.
  jax.tree.map(np.testing.assert_array_equal, tuned["video_encoder"], pre["video_encoder"])
  assert not np.allclose(tuned["video_proj"]["kernel"], pre["video_proj"]["kernel"])
  # Optimizer state holds AdamW moments for trainable leaves only.
  labels = optim.trainable_labels(tuned, registry.TRAINABLE_BY_MODE["finetune"])
  n_trainable = sum(int(np.size(p)) for p, l in zip(jax.tree.leaves(tuned), jax.tree.leaves(labels))
                    if l == optim.TRAINABLE)
  n_state = sum(int(np.size(x)) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0)
  assert n_state == 2 * n_trainable
  # Everything but the encoder trains (projection, the paper head's layers, regressor).
  assert n_trainable == optim.count_params(tuned) - optim.count_params(tuned["video_encoder"])


def test_finetune_stops_on_non_finite_loss_keeping_last_good_checkpoint(data_dir, tmp_path,
                                                                         monkeypatch):
  config = finetune_config(data_dir, "random")
  config.total_steps = 4
  config.eval_every = 100  # no evaluation batch passes through shard_batch before step 3
  real_shard = finetune.sharding.shard_batch
  calls = {"n": 0}

  def poisoned(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 3 and "lvef" in batch:  # the third training batch carries a NaN label
      batch = dict(batch, lvef=np.full_like(batch["lvef"], np.nan))
    return real_shard(batch, mesh)

  monkeypatch.setattr(finetune.sharding, "shard_batch", poisoned)
  with pytest.raises(common.NonFiniteLossError,
                     match=r"at step 3.*last good checkpoint \(step 2\)"):
    finetune.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps == [2]


def test_unknown_init_and_mismatched_encoder_give_clear_errors(data_dir, unbroken_pretrain,
                                                               tmp_path):
  config = finetune_config(data_dir, "imagenet:/nowhere")
  with pytest.raises(ValueError, match="unknown init"):
    finetune.train_and_evaluate(config, str(tmp_path / "a"))
  config = finetune_config(data_dir, f"pretrain:{unbroken_pretrain}")
  config.model.video_overrides = dict(sweep_testlib.VIDEO, embed_dim=24)
  with pytest.raises(ValueError, match="do not match config.model"):
    finetune.train_and_evaluate(config, str(tmp_path / "b"))


def test_cached_feature_finetune_resumes_exactly_and_matches_the_full_model(
    data_dir, unbroken_pretrain, tmp_path, monkeypatch):
  config = finetune_config(data_dir, f"pretrain:{unbroken_pretrain}")
  config.feature_cache.passes = 2
  config.total_steps, config.eval_every, config.checkpoint.every = 8, 4, 2
  unbroken = str(tmp_path / "unbroken")
  assert finetune.train_and_evaluate(config, unbroken)["step"] == 8

  # SIGTERM during step 5: step 5 is saved; the resumed run rebuilds the bank and finishes.
  broken = str(tmp_path / "broken")
  _at_step(monkeypatch, 5, _sigterm)
  stopped = finetune.train_and_evaluate(config, broken)
  assert stopped["step"] == 5 and stopped["preempted"]
  monkeypatch.setattr(common, "check_finite", _REAL_CHECK_FINITE)
  finished = finetune.train_and_evaluate(config, broken)
  assert finished["step"] == 8 and "preempted" not in finished
  assert _losses(broken) == _losses(unbroken) and sorted(_losses(unbroken)) == list(range(1, 9))

  # The encoder stayed frozen, and the head trained on cached features is the same function as
  # the full model: the best checkpoint's predictions from video equal its validation MAE.
  pre = _restored_params(unbroken_pretrain, "checkpoints", 6)["params"]
  tuned = _restored_params(unbroken, "checkpoints", 8)["params"]
  jax.tree.map(np.testing.assert_array_equal, tuned["video_encoder"], pre["video_encoder"])
  p = inference.predict_run(unbroken, data_dir, "val")
  best = runs.read_best(unbroken)
  np.testing.assert_allclose(np.mean(np.abs(p["pred"] - p["lvef"])), best["val_mae"], rtol=1e-4)


def test_finetune_with_patience_killed_midway_stops_where_an_unbroken_run_stops(
    data_dir, tmp_path, monkeypatch):
  config = finetune_config(data_dir, "random")
  config.total_steps, config.eval_every, config.checkpoint.every = 12, 1, 100
  config.patience = 2
  unbroken = str(tmp_path / "unbroken")
  stopped = finetune.train_and_evaluate(config, unbroken)["step"]
  best_step = runs.read_best(unbroken)["step"]
  assert stopped == best_step + config.patience < config.total_steps  # it did stop early

  # SIGTERM one evaluation after the best: saved there with one evaluation of patience spent.
  broken = str(tmp_path / "broken")
  _at_step(monkeypatch, best_step + 1, _sigterm)
  assert finetune.train_and_evaluate(config, broken)["step"] == best_step + 1
  monkeypatch.setattr(common, "check_finite", _REAL_CHECK_FINITE)
  assert finetune.train_and_evaluate(config, broken)["step"] == stopped
  assert _losses(broken) == _losses(unbroken)
  assert runs.read_best(broken) == runs.read_best(unbroken)
  jax.tree.map(np.testing.assert_array_equal, _restored_params(broken, "best", best_step),
               _restored_params(unbroken, "best", best_step))
  # A run that stopped early stays stopped: run again, it trains no further.
  assert finetune.train_and_evaluate(config, broken)["step"] == stopped
  assert runs.checkpoint_steps(broken) == [best_step + 1, stopped]
  assert max(_losses(broken)) == stopped


def test_feature_cache_refuses_a_trainable_encoder(data_dir, tmp_path):
  config = finetune_config(data_dir, "random")
  config.mode, config.feature_cache.passes = "transfer", 2
  with pytest.raises(ValueError, match="frozen encoder"):
    finetune.train_and_evaluate(config, str(tmp_path))


class _CountingIterator:
  """An iterator over 0, 1, 2, ... whose state is the next value (as grain's `get_state`)."""

  def __init__(self):
    self.next_value = 0

  def __next__(self):
    self.next_value += 1
    return {"x": np.array([self.next_value - 1])}

  def get_state(self):
    return {"next": self.next_value}


def test_device_prefetch_runs_ahead_but_checkpoints_the_first_unused_batch():
  source, put = _CountingIterator(), []
  batches = common.DevicePrefetch(source, lambda b: put.append(int(b["x"][0])) or b, size=3,
                                  state_of=source)
  assert int(next(batches)["x"][0]) == 0
  assert put == [0, 1, 2]  # two batches already on their way to the devices
  assert int(next(batches)["x"][0]) == 1 and put == [0, 1, 2, 3]
  # Two batches used: a resume must start at batch 2, though the source is at 4.
  assert source.next_value == 4
  assert json.loads(batches.get_state()) == {"next": 2}
  position = batches.position()  # what a checkpoint saves: fixed, however far the loop goes on
  next(batches)
  assert json.loads(position.get_state()) == {"next": 2}
  assert json.loads(batches.get_state()) == {"next": 3}
  finite = common.DevicePrefetch(iter([{"x": np.zeros(1)}] * 2), lambda b: b, size=3)
  assert len(list(finite)) == 2
  with pytest.raises(ValueError, match="no input iterator state"):
    finite.get_state()


def test_pending_metrics_fetch_checks_every_step_in_order(tmp_path):
  pending = common.PendingMetrics(str(tmp_path))
  for step, loss in ((1, 1.0), (2, 0.5)):
    pending.add(step, {"loss": jax.numpy.asarray(loss), "mae": jax.numpy.asarray(2 * loss)})
  assert pending.fetch(last_good=None) == {"loss": 0.5, "mae": 1.0}
  assert pending.fetch(last_good=None) == {}  # nothing left
  for step, loss in ((3, np.nan), (4, 0.25), (5, np.inf)):
    pending.add(step, {"loss": jax.numpy.asarray(loss)})
  with pytest.raises(common.NonFiniteLossError,
                     match=r"at step 3.*last good checkpoint \(step 2\)"):
    pending.fetch(last_good=2)


def test_preemption_uses_jax_sync_point_and_no_handler_on_several_processes(monkeypatch):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  asked = []
  monkeypatch.setattr(common.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: asked.append(step) or step == 7)
  before = signal.getsignal(signal.SIGTERM)
  preemption = common.Preemption()
  assert signal.getsignal(signal.SIGTERM) is before  # JAX's notifier is left in place
  assert [preemption.requested(s) for s in (5, 6, 7)] == [False, False, True]
  assert asked == [5, 6, 7]
  preemption.restore()


def test_preemption_on_one_process_is_the_signal_handler():
  preemption = common.Preemption()
  try:
    assert not preemption.requested(1)
    _sigterm()
    assert preemption.requested(2)
  finally:
    preemption.restore()


def _counting_dataset():
  import grain  # pylint: disable=g-import-not-at-top
  return grain.MapDataset.range(100).batch(2).to_iter_dataset()


def test_resume_on_another_process_count_restores_state_and_rederives_the_input(tmp_path,
                                                                                 caplog):
  config = finetune_config("unused")
  config.checkpoint.async_save = False
  state = common.TrainState(step=jax.numpy.asarray(3, jax.numpy.int32),
                            params={"w": jax.numpy.arange(4.0)}, opt_state=())
  data_iter = iter(_counting_dataset())
  for _ in range(3):
    next(data_iter)
  ckpt, _ = common.resume(str(tmp_path), config, state, data_iter)
  ckpt.save(3, state, data_iter, force=True)
  ckpt.close()
  data = tmp_path / "checkpoints" / "3" / "data"
  assert "process_0-of-1.json" in os.listdir(data)
  # The same process count: the input position comes back exactly (here: batch 3).
  fresh = iter(_counting_dataset())
  blank = state.replace(step=jax.numpy.asarray(0, jax.numpy.int32),
                        params={"w": jax.numpy.zeros(4)})
  ckpt, restored = common.resume(str(tmp_path), config, blank, fresh)
  ckpt.close()
  assert int(restored.step) == 3 and list(next(fresh)) == [6, 7]
  # Written by a 2-process run: no position for this process count. The state is restored and
  # the position re-derived from the step (3 batches of this process's share), with a warning.
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
  (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
  fresh = iter(_counting_dataset())
  ckpt, restored = common.resume(str(tmp_path), config, blank, fresh)
  ckpt.close()
  np.testing.assert_array_equal(restored.params["w"], np.arange(4.0))
  assert int(restored.step) == 3 and list(next(fresh)) == [6, 7]
  assert "another process count" in caplog.text


def test_runs_keep_a_persistent_compilation_cache_in_their_folder(tmp_path):
  session_cache = jax.config.jax_compilation_cache_dir  # conftest's, for the whole session
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  try:
    assert common.use_compilation_cache(str(tmp_path / "a")) == session_cache  # configured: kept
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cache = common.use_compilation_cache(str(tmp_path / "run"))
    assert cache == str(tmp_path / "run" / "xla_cache")
    jax.jit(lambda x: x * 3 + 1)(np.arange(5.0)).block_until_ready()
    assert os.listdir(cache)  # the compiled program was written there
  finally:
    jax.config.update("jax_compilation_cache_dir", session_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    common.jax_compilation_cache.reset_cache()


def test_exit_status_asks_for_a_requeue_only_after_a_preemption_stop():
  assert common.exit_status({"step": 6}) == 0
  assert common.exit_status({"step": 3, "preempted": True}) == common.RESUME_EXIT_CODE == 75
