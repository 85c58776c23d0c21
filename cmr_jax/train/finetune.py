"""LVEF fine-tuning: a (pre-trained) video encoder under a gated-attention MIL head, Huber loss.

Modes (which parameters train; the rest are frozen and carry no optimizer state):
  linear     the MIL head and regressor only
  finetune   the head, regressor and `video_proj` (768 -> 512): the paper's setting
  transfer   everything, the encoder included
The encoder comes from a pre-training run (`config.init="pretrain:WORKDIR"`) or a random
initialisation (`"random"`, the from-scratch baseline). Labels may be subsampled by subject
(`config.data.label_fraction`). Validation MAE is computed every `eval_every` steps; the best
checkpoint is kept in `{workdir}/best` and training stops early after `patience` evaluations
without improvement (counted from the step in best.json: a resumed run stops where an unbroken
one does, and a run that stopped early stays stopped). The loop trains on one of two feeds:
augmented bags streamed through the whole model (`StreamingBags`), or, with a frozen encoder and
`feature_cache.passes > 0`, the encoder's features of that many augmented passes computed once
(`feature_cache.CachedFeatures`). As in pre-training, the next batches are copied to the devices
ahead and metrics are fetched (and the loss checked) only to log, validate or save.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cmr_jax import checkpoint as checkpoint_lib
from cmr_jax import files
from cmr_jax.data import pipeline
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax import inference
from cmr_jax import losses
from cmr_jax.models import registry
from cmr_jax import runs
from cmr_jax import sharding
from cmr_jax.train import common
from cmr_jax.train import feature_cache
from cmr_jax.train import metric_writer
from cmr_jax.train import optim


def _labelled_lvef(data_dir: str, split: str, fraction: float) -> list[float]:
  """LVEF of the labelled studies of `split` kept at label `fraction`."""
  return [m["lvef"] for m in records.load_index(data_dir, split)
          if m["lvef"] is not None and splits.in_label_fraction(
              m["subject_id"], fraction, pipeline.LABEL_FRACTION_SALT)]


def label_mean(data_dir: str, split: str, fraction: float) -> float:
  """Mean LVEF of the labelled training studies kept at `fraction` (the regressor's bias init)."""
  values = _labelled_lvef(data_dir, split, fraction)
  if not values:
    raise ValueError(f"no labelled study in split {split!r} of {data_dir} at label fraction "
                     f"{fraction}: fine-tuning needs LVEF labels")
  return float(np.mean(values))


def video_forward(model):
  """(params, batch, rng) -> LVEF [B]: the full model on `batch["video"]`, `batch["mask"]`."""

  def forward(params, batch, rng):
    pred, _ = model.apply({"params": params}, batch["video"], batch["mask"], train=True,
                          rngs={"dropout": rng})
    return pred

  return forward


def make_train_step(forward, tx, huber_delta: float):
  """(state, batch, key) -> (state, metrics): one Huber step on LVEF (percent).

  Args:
    forward: (params, batch, rng) -> predictions [B]: `video_forward(model)`, or the head alone on
      cached features (`feature_cache.head_forward(model)`).
    tx: the optimizer.
    huber_delta: the Huber loss's delta (percent LVEF).
  """

  def train_step(state: common.TrainState, batch: dict[str, jax.Array], base_key: jax.Array):
    rng = common.step_key(base_key, state.step)

    def loss_fn(params):
      pred = forward(params, batch, rng)
      return losses.huber_loss(pred, batch["lvef"], delta=huber_delta), pred

    (loss, pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    out = {"loss": loss, "mae": jnp.mean(jnp.abs(pred - batch["lvef"])),
           "grad_norm": optim.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

  return train_step


class Feed(Protocol):
  """What a fine-tuning loop trains on and validates with (two kinds: `StreamingBags`, the
  encoder run on every batch, and `feature_cache.CachedFeatures`, a frozen encoder's features
  computed once)."""

  iterator: Any  # the input iterator the checkpoint keeps, or None

  def forward(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
    """Training-mode LVEF predictions [B] of one batch."""

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of the batch of `step`."""

  def validate(self, params: Any) -> dict[str, np.ndarray]:
    """Per-study predictions on the validation split (as `inference.predict_split`)."""


class StreamingBags:
  """Augmented bags of cines streamed from the records through the whole model every step."""

  def __init__(self, model, train_ds, val_source, config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh):
    self.iterator = iter(train_ds)
    self.forward = video_forward(model)
    self._predict = jax.jit(inference.make_predict_fn(model))
    self._val, self._config, self._mesh = val_source, config, mesh

  def batch(self, step: int) -> dict[str, np.ndarray]:
    del step  # the iterator's position is checkpointed
    return next(self.iterator)

  def validate(self, params: Any) -> dict[str, np.ndarray]:
    return inference.predict_split(self._predict, params, self._val, self._config, self._mesh)


def evaluations_since(best_step: int, step: int, config: ml_collections.ConfigDict) -> int:
  """Validations in steps (best_step, step]: every `eval_every`-th step and the last one.

  The early-stopping count, derived from the run's saved state (the step and best.json's best
  step) rather than kept in memory, so it survives a resume.
  """
  if step <= best_step:
    return 0
  n = step // config.eval_every - best_step // config.eval_every
  return n + int(step == config.total_steps and step % config.eval_every != 0)


def cache_passes(config: ml_collections.ConfigDict) -> int:
  """Augmented passes of cached encoder features (0: the streaming loop; see feature_cache)."""
  passes = int(config.get("feature_cache", {}).get("passes", 0))
  if passes and config.mode == "transfer":
    raise ValueError("feature_cache.passes > 0 needs a frozen encoder (mode linear or finetune), "
                     "not mode 'transfer'")
  return passes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs or resumes fine-tuning in `workdir`; returns final and best validation metrics."""
  config = runs.with_init_input_norm(config)  # input normalised as the init's weights expect
  runs.save_config(config, workdir)
  common.use_compilation_cache(workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  sharding.check_batches(mesh, batch_size=config.batch_size,
                         eval_batch_size=config.eval_batch_size)
  d = config.data
  runs.save_preprocess(records.read_dataset_info(d.dir)["preprocess"], workdir)
  train_source = records.open_split(d.dir, d.train_split)
  mean = label_mean(d.dir, d.train_split, d.label_fraction)
  model = registry.lvef_model(config, mean)
  passes = cache_passes(config)
  train_ds = pipeline.finetune_dataset(
      train_source, image_size=d.image_size, num_frames=d.num_frames,
      batch_size=sharding.per_process_batch(config.batch_size), max_instances=d.max_instances,
      seed=config.seed, train=True, shard_index=jax.process_index(),
      shard_count=jax.process_count(), worker_count=d.worker_count,
      label_fraction=d.label_fraction, num_epochs=passes or None,
      read_threads=d.get("read_threads", 2), prefetch_buffer_size=d.get("prefetch_buffer_size", 4))
  val_source = records.open_split(d.dir, d.eval_split)
  # With cached features the batches are a function of the step (feature_cache.batch_at) and
  # no iterator state is checkpointed; the feed is built from the (restored) frozen encoder.
  feed: Feed | None = None if passes else StreamingBags(model, train_ds, val_source, config, mesh)
  data_iter = None if feed is None else feed.iterator

  init_params = registry.lvef_init_fn(model, config)
  state, state_shardings, tx, schedule = common.create_train_state(
      init_params, config, mesh, trainable_patterns=registry.TRAINABLE_BY_MODE[config.mode],
      overrides=runs.encoder_init(config.init, registry.abstract_params(init_params)))
  ckpt, state = common.resume(workdir, config, state, data_iter)
  best = checkpoint_lib.Checkpointer(files.join(workdir, runs.BEST_DIR), max_to_keep=1,
                                     async_save=False, best_metric="val_mae", best_mode="min")
  best_mae, best_step = np.inf, 0  # the lowest validation MAE and its step (0: none yet)
  summary = runs.read_best(workdir) if best.best_step() is not None else None
  if summary is not None:
    best_mae, best_step = float(summary["val_mae"]), int(summary["step"])
  if config.patience and evaluations_since(best_step, int(state.step), config) >= config.patience:
    logging.info("the run in %s stopped early at step %d (best step %d): nothing to resume",
                 workdir, int(state.step), best_step)
    ckpt.close()
    best.close()
    return {"step": int(state.step), "best_val_mae": best_mae}
  n_train = optim.count_params(jax.tree.map(
      lambda p, l: p if l == optim.TRAINABLE else np.zeros(0),
      state.params, optim.trainable_labels(state.params,
                                           registry.TRAINABLE_BY_MODE[config.mode])))
  logging.info("fine-tuning (%s, init %s): %d of %d parameters trainable; label mean %.2f",
               config.mode, config.init, n_train, optim.count_params(state.params), mean)

  base_key = jax.random.key(config.seed + 1)
  with sharding.mesh_rules(mesh):
    if feed is None:
      feed = feature_cache.CachedFeatures(model, state.params, train_ds, val_source, config, mesh,
                                          passes, n_bags=len(_labelled_lvef(
                                              d.dir, d.train_split, d.label_fraction)))
    batch_sh = sharding.batch_sharding(mesh, config.batch_size)
    train_step = jax.jit(make_train_step(feed.forward, tx, config.huber_delta),
                         in_shardings=(state_shardings, batch_sh, None),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))
  writer = metric_writer.MetricWriter(workdir, total_steps=config.total_steps,
                                    enabled=jax.process_index() == 0, name="finetune")
  preemption = common.Preemption()
  step = int(state.step)
  last_good = ckpt.latest_step()
  final: dict[str, Any] = {}
  pending = common.PendingMetrics(ckpt.directory)
  batches = common.DevicePrefetch((feed.batch(s) for s in range(step, config.total_steps)),
                                  lambda b: sharding.shard_batch(b, mesh),
                                  size=config.get("prefetch_batches", common.PREFETCH_BATCHES),
                                  state_of=data_iter)
  t0 = time.time()
  try:
    while step < config.total_steps:
      with sharding.mesh_rules(mesh):
        state, out = train_step(state, next(batches), base_key)
      step += 1
      pending.add(step, out)  # fetched (and the losses checked) only when needed below
      last = step == config.total_steps
      if step % config.log_every == 0 or last:
        scalars = pending.fetch(last_good)
        scalars.update(lr=float(schedule(step - 1)),
                       bags_per_s=(config.log_every * config.batch_size
                                   / max(time.time() - t0, 1e-9)))
        writer.write(step, scalars)
        final.update(scalars)
        t0 = time.time()
      stop = preempted = preemption.requested(step)
      if step % config.eval_every == 0 or last:
        pending.fetch(last_good)
        with sharding.mesh_rules(mesh):
          p = feed.validate(state.params)
        labelled = ~np.isnan(p["lvef"])
        residual = p["pred"][labelled] - p["lvef"][labelled]
        val_mae = float(np.mean(np.abs(residual)))
        writer.write(step, {"val_mae": val_mae})
        final["val_mae"] = val_mae
        if val_mae < best_mae:
          best_mae, best_step = val_mae, step
          best.save(step, state, metrics={"val_mae": val_mae}, force=True)
          runs.write_best(workdir, step, val_mae, residual)
        if config.patience and evaluations_since(best_step, step, config) >= config.patience:
          logging.info("early stop at step %d: no val MAE improvement in %d evaluations "
                       "(best %.3f)", step, config.patience, best_mae)
          stop = True
      if step % config.checkpoint.every == 0 or last or stop:
        pending.fetch(last_good)
        ckpt.save(step, state, None if data_iter is None else batches.position(), force=True)
        last_good = step
      if stop:
        if preempted:
          logging.warning("stopped at step %d on request; checkpoint saved in %s", step,
                          ckpt.directory)
          final["preempted"] = True
        break
  finally:
    ckpt.close()
    best.close()
    writer.close()
    preemption.restore()
  final.update(step=step, best_val_mae=best_mae)
  return final


