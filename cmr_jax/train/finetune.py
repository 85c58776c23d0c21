"""LVEF fine-tuning: a (pre-trained) video encoder under a gated-attention MIL head, Huber loss.

Modes (which parameters train; the rest are frozen and carry no optimizer state):
  linear     the MIL head and regressor only
  finetune   the head, regressor and `video_proj` (768 -> 512): the paper's setting
  transfer   everything, the encoder included
The encoder comes from a pre-training run (`config.init="pretrain:WORKDIR"`) or a random
initialisation (`"random"`, the from-scratch baseline). Labels may be subsampled by subject
(`config.data.label_fraction`). Validation MAE is computed every `eval_every` steps; the best
checkpoint is kept in `{workdir}/best` and training stops early after `patience` evaluations
without improvement. With a frozen encoder, `feature_cache.passes > 0` computes the encoder's
features once (that many augmented passes) and trains the head on them (`feature_cache`).
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from cmr_jax import losses
from cmr_jax import sharding
from cmr_jax.convert import converted
from cmr_jax.data import pipeline
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.models import registry
from cmr_jax import checkpoint as checkpoint_lib
from cmr_jax.train import common
from cmr_jax.train import feature_cache
from cmr_jax.train import metric_writer
from cmr_jax.train import optim
from cmr_jax.train import pretrain

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
BEST_JSON = "best.json"
PREPROCESS_JSON = "preprocess.json"
ENCODER_PARAMS = ("video_encoder", "video_proj")
# Parameter groups each imported-weights init kind provides (see load_pretrained_encoder).
IMPORTED_PARAMS = {"kinetics": ("video_encoder",), "cmr_transformer": ENCODER_PARAMS}
TRAINABLE_BY_MODE = {
    "linear": (r"^instance_mlp/", r"^mil/", r"^regressor/"),
    "finetune": (r"^instance_mlp/", r"^mil/", r"^regressor/", r"^video_proj/"),
    "transfer": (r".*",),
}


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


def build_model(config: ml_collections.ConfigDict, mean: float):
  """The LVEF regressor of `config.model` with its bias at `mean`."""
  m = config.model
  if config.mode not in TRAINABLE_BY_MODE:
    raise ValueError(f"unknown fine-tuning mode {config.mode!r}; expected one of "
                     f"{sorted(TRAINABLE_BY_MODE)}")
  return registry.lvef_regressor(
      m.video, label_mean=mean, train_encoder=config.mode == "transfer", proj_dim=m.embed_dim,
      head=m.get("head", "paper"), dtype=m.dtype, remat=m.remat,
      **dict(m.get("video_overrides", {})))


def init_fn(model, config: ml_collections.ConfigDict) -> Callable[[jax.Array], Any]:
  """rng -> the (boxed) parameters of `model`, initialised on one example bag of `config.data`."""
  d = config.data
  video = jnp.zeros((1, d.max_instances, d.num_frames, d.image_size, d.image_size), jnp.uint8)
  mask = jnp.ones((1, d.max_instances), bool)
  return lambda rng: model.init(rng, video, mask)["params"]


def load_pretrained_encoder(init: str, abstract_params: Any) -> dict[str, Any] | None:
  """Encoder (and projection) parameters from `init`; None for "random".

  Kinds:
    random                   the from-scratch baseline
    pretrain:WORKDIR[:STEP]  `video_encoder` and `video_proj` of our pre-training run
    kinetics:PATH            `video_encoder` from Kinetics-400 MViT-B weights (`video_proj` stays
                             freshly initialised)
    cmr_transformer:PATH     `video_encoder` and `video_proj` from the paper's released encoder
  PATH is a folder written by tools/convert_weights.py or directly the PyTorch file (`.pyth`,
  `.pth`, `.ckpt`, `.safetensors`; converted in memory, which needs the `torch` extra).

  Raises:
    ValueError: on an unknown init, or parameters whose names or shapes do not match the model
      (a `cmr_jax.convert.mapping.ConversionError`, a ValueError, for imported weights).
  """
  if init == "random":
    return None
  kind, _, rest = init.partition(":")
  if kind in IMPORTED_PARAMS and rest:
    groups = {name: abstract_params[name] for name in IMPORTED_PARAMS[kind]}
    out = converted.load_groups(rest, groups)
    logging.info("%s initialised from %s weights in %s", sorted(out), kind, rest)
    return out
  if kind != "pretrain" or not rest:
    raise ValueError(f"unknown init {init!r}; expected 'random', 'pretrain:WORKDIR[:STEP]', "
                     "'kinetics:PATH' or 'cmr_transformer:PATH'")
  workdir, _, step = rest.partition(":")
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, pretrain.CHECKPOINT_DIR),
                                     async_save=False)
  step_ = int(step) if step else ckpt.latest_step()
  ckpt.close()
  if step_ is None:
    raise FileNotFoundError(f"no pre-training checkpoint in {workdir}/{pretrain.CHECKPOINT_DIR}")
  path = os.path.abspath(os.path.join(workdir, pretrain.CHECKPOINT_DIR, str(step_),
                                      checkpoint_lib.STATE))
  params = checkpoint_lib.restore_on_this_host(path)["params"]
  out = {}
  for name in ENCODER_PARAMS:
    if name not in params:
      raise ValueError(f"{path} has no {name!r} parameters (has {sorted(params)})")
    want = jax.tree.map(lambda x: x.shape, abstract_params[name])
    got = jax.tree.map(lambda x: np.shape(x), params[name])
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise ValueError(f"the {name} parameters in {path} do not match config.model "
                       f"({config_mismatch(want, got)})")
    out[name] = params[name]
  logging.info("encoder initialised from %s (step %d)", workdir, step_)
  return out


def config_mismatch(want: Any, got: Any) -> str:
  """A short description of the first differences between two shape trees."""
  flat_w = {optim.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(want)}
  flat_g = {optim.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(got)}
  diffs = [f"{k}: model {flat_w.get(k)} vs checkpoint {flat_g.get(k)}"
           for k in sorted(set(flat_w) | set(flat_g)) if flat_w.get(k) != flat_g.get(k)]
  return "; ".join(diffs[:5]) + (f"; ... {len(diffs) - 5} more" if len(diffs) > 5 else "")


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


def make_predict_fn(model):
  """(params, batch) -> (lvef [B], attention weights [B, K])."""

  def predict(params, batch):
    return model.apply({"params": params}, batch["video"], batch["mask"], train=False)

  return predict


def eval_dataset(source, config: ml_collections.ConfigDict, tta_sample: int = 0):
  """One pass over every study of `source` in this process's shard: deterministic (0), or
  seeded by `tta_sample` > 0 with the training augmentation."""
  d = config.data
  return pipeline.finetune_dataset(
      source, image_size=d.image_size, num_frames=d.num_frames,
      batch_size=common.per_process_batch(config.eval_batch_size),
      max_instances=d.max_instances, seed=tta_sample, train=False,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      eval_augment=tta_sample > 0)


def predict_split(predict_fn, params, source, config, mesh, *,
                  tta_sample: int = 0) -> dict[str, np.ndarray]:
  """One pass over `source`: per-study predictions, labels and attention.

  tta_sample 0 is the deterministic pass (centred crops); k > 0 samples every clip with the
  training augmentation, seeded by k (test-time augmentation).
  """
  ds = eval_dataset(source, config, tta_sample)
  cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                       ("study_index", "lvef", "pred", "attention", "view")}
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
  for batch in common.global_batches(iter(ds), mesh):
    pred, attention = predict_fn(params, batch)
    valid = gather(batch["valid"])
    for key, value in (("study_index", batch["study_index"]), ("lvef", batch["lvef"]),
                       ("pred", pred), ("attention", attention), ("view", batch["view"])):
      cols[key].append(gather(value)[valid])
  out = {k: np.concatenate(v) for k, v in cols.items()}
  order = np.argsort(out["study_index"], kind="stable")
  return {k: v[order] for k, v in out.items()}


def cache_passes(config: ml_collections.ConfigDict) -> int:
  """Augmented passes of cached encoder features (0: the streaming loop; see feature_cache)."""
  passes = int(config.get("feature_cache", {}).get("passes", 0))
  if passes and config.mode == "transfer":
    raise ValueError("feature_cache.passes > 0 needs a frozen encoder (mode linear or finetune), "
                     "not mode 'transfer'")
  return passes


def _cache_features(model, params, train_ds, val_source, config, mesh, passes: int):
  """Encoder features of `passes` augmented passes over the training bags and of validation."""
  d = config.data
  encode = jax.jit(feature_cache.make_encode_fn(model))
  n_train = len(_labelled_lvef(d.dir, d.train_split, d.label_fraction))
  train_bank = feature_cache.build_bank(encode, params, train_ds, mesh,
                                        what=f"training ({passes} augmented passes)",
                                        expected_batches=passes * n_train // config.batch_size)
  val_bank = feature_cache.build_bank(encode, params, eval_dataset(val_source, config), mesh,
                                      what="validation")
  return train_bank, val_bank


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs or resumes fine-tuning in `workdir`; returns final and best validation metrics."""
  common.save_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  d = config.data
  _save_preprocess(d.dir, workdir)
  train_source = records.open_split(d.dir, d.train_split)
  mean = label_mean(d.dir, d.train_split, d.label_fraction)
  model = build_model(config, mean)
  passes = cache_passes(config)
  train_ds = pipeline.finetune_dataset(
      train_source, image_size=d.image_size, num_frames=d.num_frames,
      batch_size=common.per_process_batch(config.batch_size), max_instances=d.max_instances,
      seed=config.seed, train=True, shard_index=jax.process_index(),
      shard_count=jax.process_count(), worker_count=d.worker_count,
      label_fraction=d.label_fraction, num_epochs=passes or None)
  # With cached features the batches are a function of the step (feature_cache.batch_at) and
  # no iterator state is checkpointed.
  data_iter = None if passes else iter(train_ds)

  init_params = init_fn(model, config)
  abstract_params = common.unbox(jax.eval_shape(init_params, jax.random.key(0)))
  o = config.optim
  tx, schedule = optim.make_optimizer(
      abstract_params, base_lr=o.lr, total_steps=config.total_steps, warmup_steps=o.warmup_steps,
      weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm,
      trainable_patterns=TRAINABLE_BY_MODE[config.mode])
  state, state_shardings = common.create_train_state(
      init_params, tx, mesh, jax.random.key(config.seed),
      overrides=load_pretrained_encoder(config.init, abstract_params))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                     max_to_keep=config.checkpoint.keep_last,
                                     async_save=config.checkpoint.async_save)
  best = checkpoint_lib.Checkpointer(os.path.join(workdir, BEST_DIR), max_to_keep=1,
                                     async_save=False, best_metric="val_mae", best_mode="min")
  if ckpt.latest_step() is not None:
    step, state = ckpt.restore(checkpoint_lib.abstract_like(state), data_iter)
    logging.info("resumed from step %d of %s", step, ckpt.directory)
  n_train = optim.count_params(jax.tree.map(
      lambda p, l: p if l == optim.TRAINABLE else np.zeros(0),
      state.params, optim.trainable_labels(state.params, TRAINABLE_BY_MODE[config.mode])))
  logging.info("fine-tuning (%s, init %s): %d of %d parameters trainable; label mean %.2f",
               config.mode, config.init, n_train, optim.count_params(state.params), mean)

  base_key = jax.random.key(config.seed + 1)
  val_source = records.open_split(d.dir, d.eval_split)
  with sharding.mesh_rules(mesh):
    forward = feature_cache.head_forward(model) if passes else video_forward(model)
    step_fn = make_train_step(forward, tx, config.huber_delta)
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                                                None),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))
    if passes:
      train_bank, val_bank = _cache_features(model, state.params, train_ds, val_source, config,
                                             mesh, passes)
      bank_predict = jax.jit(feature_cache.make_predict_fn(model))
      validate = lambda params: feature_cache.predict_bank(  # noqa: E731
          bank_predict, params, val_bank, mesh, config.eval_batch_size)
      next_batch = lambda step: feature_cache.batch_at(  # noqa: E731
          train_bank, step, config.batch_size, config.seed)
    else:
      predict_fn = jax.jit(make_predict_fn(model))
      validate = lambda params: predict_split(  # noqa: E731
          predict_fn, params, val_source, config, mesh)
      next_batch = lambda step: next(data_iter)  # noqa: E731
  writer = metric_writer.MetricWriter(workdir, total_steps=config.total_steps,
                                    enabled=jax.process_index() == 0, name="finetune")
  preemption = common.Preemption()
  step = int(state.step)
  last_good = ckpt.latest_step()
  best_mae, evals_since_best = np.inf, 0
  if best.best_step() is not None:
    best_mae = float(read_best(workdir)["val_mae"])
  final: dict[str, Any] = {}
  t0 = time.time()
  try:
    while step < config.total_steps:
      with sharding.mesh_rules(mesh):
        state, out = train_step(state, sharding.shard_batch(next_batch(step), mesh), base_key)
      step += 1
      common.check_finite(step, float(out["loss"]), ckpt.directory, last_good)
      if step % config.log_every == 0 or step == config.total_steps:
        scalars = {k: float(v) for k, v in out.items()}
        scalars.update(lr=float(schedule(step - 1)),
                       bags_per_s=(config.log_every * config.batch_size
                                   / max(time.time() - t0, 1e-9)))
        writer.write(step, scalars)
        final.update(scalars)
        t0 = time.time()
      stop = preemption.requested()
      if step % config.eval_every == 0 or step == config.total_steps:
        with sharding.mesh_rules(mesh):
          p = validate(state.params)
        labelled = ~np.isnan(p["lvef"])
        residual = p["pred"][labelled] - p["lvef"][labelled]
        val_mae = float(np.mean(np.abs(residual)))
        writer.write(step, {"val_mae": val_mae})
        final["val_mae"] = val_mae
        if val_mae < best_mae:
          best_mae, evals_since_best = val_mae, 0
          best.save(step, state, metrics={"val_mae": val_mae}, force=True)
          _write_best(workdir, step, val_mae, residual)
        else:
          evals_since_best += 1
        if config.patience and evals_since_best >= config.patience:
          logging.info("early stop at step %d: no val MAE improvement in %d evaluations "
                       "(best %.3f)", step, config.patience, best_mae)
          stop = True
      if step % config.checkpoint.every == 0 or step == config.total_steps or stop:
        ckpt.save(step, state, data_iter, force=True)
        last_good = step
      if stop:
        break
  finally:
    ckpt.close()
    best.close()
    writer.close()
    preemption.restore()
  final.update(step=step, best_val_mae=best_mae)
  return final


def _write_best(workdir: str, step: int, mae: float, residual: np.ndarray) -> None:
  """Records the best step with its validation errors (predict.py derives intervals from them)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, BEST_JSON), "w") as f:
      json.dump({"step": step, "val_mae": mae, "val_n": int(residual.size),
                 "val_bias": float(np.mean(residual)),
                 "val_rmse": float(np.sqrt(np.mean(residual ** 2))),
                 "val_residual_sd": float(np.std(residual, ddof=1)) if residual.size > 1 else None},
                f, indent=1)


def _save_preprocess(data_dir: str, workdir: str) -> None:
  """Keeps the training data's preprocessing with the run, so prediction needs no dataset."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, PREPROCESS_JSON), "w") as f:
      json.dump(records.read_dataset_info(data_dir)["preprocess"], f, indent=1)


def read_preprocess(workdir: str) -> dict[str, Any]:
  """The preprocessing config (a `PreprocessConfig.from_dict` mapping) a run was trained with."""
  with open(os.path.join(workdir, PREPROCESS_JSON)) as f:
    return json.load(f)


def read_best(workdir: str) -> dict[str, Any]:
  """The best-checkpoint summary of a fine-tuning run (step and validation errors)."""
  with open(os.path.join(workdir, BEST_JSON)) as f:
    return json.load(f)


def restore_params(workdir: str, *, which: str = BEST_DIR) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, parameters) of a fine-tuning run: the best checkpoint by default, or "checkpoints"."""
  config = common.load_config(workdir)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, which), async_save=False)
  step = ckpt.latest_step()
  ckpt.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, which)}")
  restored = checkpoint_lib.restore_on_this_host(
      os.path.join(workdir, which, str(step), checkpoint_lib.STATE))
  return config, restored["params"]


def check_params(config: ml_collections.ConfigDict, params: Any, where: str) -> None:
  """Raises ValueError when checkpoint parameters do not fit the model `config` describes."""
  model = build_model(config, mean=0.0)
  abstract = common.unbox(jax.eval_shape(init_fn(model, config), jax.random.key(0)))
  want = jax.tree.map(lambda x: x.shape, abstract)
  got = jax.tree.map(np.shape, params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ValueError(f"the checkpoint in {where} does not match the run's config.json "
                     f"({config_mismatch(want, got)})")


class Predictor:
  """A fine-tuning run's checkpoint as a function: study records -> LVEF and attention.

  Attributes:
    config: the run's config.
    preprocess: the preprocessing its training data had (apply it to new studies).
    best: the best checkpoint's validation errors (`best.json`), or None.
  """

  def __init__(self, workdir: str, *, which: str = BEST_DIR):
    self.config, self._params = restore_params(workdir, which=which)
    self.preprocess = read_preprocess(workdir)
    self.best = read_best(workdir) if os.path.exists(os.path.join(workdir, BEST_JSON)) else None
    check_params(self.config, self._params, os.path.join(workdir, which))
    model = build_model(self.config, mean=0.0)  # the bias is restored, not re-initialised
    self._mesh = sharding.make_mesh(self.config.mesh.to_dict())
    # Replicated over this machine's mesh, whatever mesh trained the model.
    self._params = jax.device_put(self._params, jax.sharding.NamedSharding(
        self._mesh, jax.sharding.PartitionSpec()))
    self._fn = jax.jit(make_predict_fn(model))

  def __call__(self, source: pipeline.Source, *, tta_sample: int = 0) -> dict[str, np.ndarray]:
    """Per-study arrays sorted by index in `source` (a split, or a list of StudyRecords):
    study_index, lvef (NaN if unlabelled), pred, attention [N, K], view [N, K].
    `tta_sample` > 0: a seeded augmented pass (see `predict_split`)."""
    with sharding.mesh_rules(self._mesh):
      return predict_split(self._fn, self._params, source, self.config, self._mesh,
                           tta_sample=tta_sample)


def predict_run(workdir: str, data_dir: str, split: str, *, which: str = BEST_DIR,
                tta_sample: int = 0) -> dict[str, np.ndarray]:
  """Predictions of a fine-tuning run's checkpoint on one split of a dataset (see Predictor)."""
  return Predictor(workdir, which=which)(records.open_split(data_dir, split),
                                         tta_sample=tta_sample)
