"""Contrastive pre-training: a video encoder against report text (or a second clip), InfoNCE.

`train_and_evaluate(config, workdir)` runs (or resumes) a pre-training run: a jitted, sharded train
step (AdamW, warm-up + cosine, clipping, optional bf16), metrics to absl logging / JSONL /
TensorBoard, a periodic zero-shot retrieval evaluation (video -> report recall@k on held-out
studies), orbax checkpoints with the grain iterator state (exact resume), a clean stop on SIGTERM
(JAX's preemption sync point on several processes), and a stop with a clear message on a
non-finite loss. The loop never waits on the device between logs: the next batches are copied to
the devices ahead (`common.DevicePrefetch`) and metrics are fetched (and the loss checked) only
to log, evaluate or save (`common.PendingMetrics`).
"""

from __future__ import annotations

import functools
import itertools
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from cmr_jax.convert import converted
from cmr_jax.data import device_augment
from cmr_jax.data import pipeline
from cmr_jax.data import records
from cmr_jax.data import tokenizer as tokenizer_lib
from cmr_jax import files
from cmr_jax import inference
from cmr_jax import losses
from cmr_jax.models import registry
from cmr_jax import runs
from cmr_jax import sharding
from cmr_jax.train import common
from cmr_jax.train import metric_writer
from cmr_jax.train import optim

_MAX_TOKENIZER_TEXTS = 50_000


def imported_params(config: ml_collections.ConfigDict,
                    abstract_params: Any) -> dict[str, Any] | None:
  """Tower weights converted from PyTorch (`config.init`), or None to start from random.

  `config.init.video`: a Kinetics-400 MViT-B file or converted folder (`video_encoder`);
  `config.init.text`: a Hugging Face BERT folder/file, e.g. PubMedBERT, or its converted folder
  (`text_encoder`; set `config.text.vocab` to its vocab.txt). Projections and the temperature
  start fresh. See tools/convert_weights.py; a file is converted in memory (the `torch` extra).

  Raises:
    ValueError: a text init for a video-video model, or weights that do not fit the model
      (`cmr_jax.convert.mapping.ConversionError`, naming each tensor).
  """
  init = config.get("init", {})
  sources = {"video_encoder": init.get("video", ""), "text_encoder": init.get("text", "")}
  sources = {group: path for group, path in sources.items() if path}
  if not sources:
    return None
  if "text_encoder" in sources and "text_encoder" not in abstract_params:
    raise ValueError("config.init.text is set but the model has no text tower "
                     "(config.model.two_clips=True)")
  out = {}
  for group, path in sources.items():
    out.update(converted.load_groups(path, {group: abstract_params[group]}))
    logging.info("%s initialised from %s", group, path)
  return out


def trainable_patterns(params: Any, frozen: Any) -> tuple[str, ...]:
  """Regexes of the trainable top-level parameter groups: all but those named in `frozen`.

  Locking a tower (LiT, Zhai et al. 2022, locked the image tower) keeps its initial features:
  e.g. `frozen=("text_encoder",)` trains the video tower and both projections against a text
  tower whose random bag-of-words features already separate the reports, so it cannot drift to a
  constant while the video tower has not yet learnt to match it.
  """
  frozen = tuple(frozen or ())
  unknown = sorted(set(frozen) - set(params))
  if unknown:
    raise ValueError(f"config.frozen names {unknown}, not parameter groups of the model "
                     f"({sorted(params)})")
  return tuple(f"^{name}(/|$)" for name in params if name not in frozen) if frozen else ()


def get_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                  train_source: records.StudySource) -> tokenizer_lib.TextTokenizer:
  """The run's tokenizer: a given vocab.txt, the one saved in workdir, or trained on train reports."""
  saved = files.join(workdir, runs.TOKENIZER_DIR, tokenizer_lib.VOCAB_FILE)
  if config.text.vocab:
    return tokenizer_lib.load_tokenizer(config.text.vocab)
  # Process 0 learns and saves the vocabulary (in the shared workdir) unless a resumed run has
  # one, and every process, process 0 included, loads that file once it is written: one file is
  # the run's vocabulary, whatever version of the learner wrote it.
  if jax.process_index() == 0 and not files.exists(saved):
    n = min(len(train_source), _MAX_TOKENIZER_TEXTS)
    texts = [r for r in (train_source[i].report for i in range(n)) if r.strip()]
    if not texts:
      raise ValueError(f"no report text in the train split of {config.data.dir}: video-text "
                       "pre-training needs reports (or set config.model.two_clips=True)")
    tok = tokenizer_lib.train_tokenizer(texts, config.text.vocab_size)
    tok.save(files.dirname(saved))
    logging.info("trained a %d-token WordPiece vocabulary on %d reports", tok.vocab_size,
                 len(texts))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("cmr_jax tokenizer saved")
  return tokenizer_lib.load_tokenizer(saved)


def make_train_step(model, tx, two_clips: bool, variance_weight: float = 0.0,
                    augment: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None):
  """(state, batch, base_key) -> (state, metrics): one InfoNCE step over the global batch.

  `augment` (e.g. `device_augment.augment_batch`) first turns the batch's stored cines and clip
  parameters into clips, on the devices (config.data.augment_on_device).

  `spread_a`, `spread_b` (`losses.variance_floor`'s spread of each tower's embeddings across the
  batch: about 1 when spread, 0 when collapsed) are always reported; variance_weight > 0 adds the
  mean of the two towers' variance penalties times that weight to the loss (`loss` stays the
  InfoNCE alone, `total_loss` is what is minimised).
  """

  def train_step(state: common.TrainState, batch: dict[str, jax.Array], base_key: jax.Array):
    rng = common.step_key(base_key, state.step)
    if augment is not None:
      batch = augment(batch)

    def loss_fn(params):
      emb_a, emb_b, log_scale = model.apply({"params": params},
                                            **inference.model_inputs(batch, two_clips),
                                            train=True, rngs={"dropout": rng})
      loss, aux = losses.clip_loss(emb_a, emb_b, log_scale)
      (pen_a, spread_a), (pen_b, spread_b) = (losses.variance_floor(e) for e in (emb_a, emb_b))
      aux.update(loss=loss, spread_a=spread_a, spread_b=spread_b)
      if not variance_weight:
        return loss, aux
      penalty = 0.5 * (pen_a + pen_b)
      aux["variance_penalty"] = penalty
      return loss + variance_weight * penalty, aux

    (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = losses.clip_logit_scale(jax.tree.map(lambda p, u: p + u, state.params, updates))
    out = {"grad_norm": optim.global_norm(grads), **aux}
    if variance_weight:
      out["total_loss"] = total
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

  return train_step


def chunked_infonce(emb_a: np.ndarray, emb_b: np.ndarray, log_logit_scale: float,
                    batch_size: int) -> float:
  """Mean symmetric InfoNCE over consecutive chunks of `batch_size` pairs (a last, smaller
  chunk is dropped), comparable with the training loss at that batch size; NaN if no chunk."""
  n = len(emb_a) // batch_size
  if n == 0:
    return float("nan")
  scale = jnp.asarray(log_logit_scale, jnp.float32)
  return float(np.mean([losses.clip_loss(jnp.asarray(emb_a[i * batch_size:(i + 1) * batch_size]),
                                         jnp.asarray(emb_b[i * batch_size:(i + 1) * batch_size]),
                                         scale)[0] for i in range(n)]))


def zero_shot_eval(embed_fn, params, source, config, tok, mesh) -> dict[str, float]:
  """Recall@k of video -> report retrieval over one pass of `source` (eval clips), and the
  InfoNCE of the same pairs in chunks of the training batch size (`infonce`)."""
  emb_a, emb_b = inference.embed_split(embed_fn, params, source, config, tok, mesh)
  out = inference.recall_at_k(emb_a, emb_b, across_processes=True)
  # The scale is replicated: this process's copy is the value (also on multi-host meshes).
  scale = float(np.asarray(params["logit_scale"].addressable_data(0)))
  out["infonce"] = chunked_infonce(emb_a, emb_b, scale, config.batch_size)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs or resumes pre-training in `workdir`; returns the final metrics."""
  video_init = config.get("init", {}).get("video", "")
  if video_init:  # imported video weights: the model normalises input as they expect
    config = runs.with_input_norm(config, converted.weights_input_norm(video_init),
                                  f"config.init.video={video_init!r}")
  runs.save_config(config, workdir)
  common.use_compilation_cache(workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  sharding.check_batches(mesh, batch_size=config.batch_size,
                         eval_batch_size=config.eval_batch_size)
  train_source = records.open_split(config.data.dir, config.data.train_split)
  two_clips = config.model.two_clips
  tok = None if two_clips else get_tokenizer(config, workdir, train_source)
  model = registry.pretrain_model(config, None if tok is None else tok.vocab_size)

  d = config.data
  # Configs written before this field make their clips on the host, as their runs did.
  on_device = d.get("augment_on_device", False)
  batch = sharding.per_process_batch(config.batch_size)
  train_ds = pipeline.pretrain_dataset(
      train_source, image_size=d.image_size, num_frames=d.num_frames, batch_size=batch,
      tokenizer=tok, max_text_len=config.text.max_len, seed=config.seed, train=True,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      worker_count=d.worker_count, two_clips=two_clips, max_sentences=config.text.max_sentences,
      bag_size=d.get("bag_size"), read_threads=d.get("read_threads", 2),
      prefetch_buffer_size=d.get("prefetch_buffer_size", 4), augment_on_device=on_device)
  data_iter = iter(train_ds)

  init_params = registry.pretrain_init_fn(model, config)
  abstract_params = registry.abstract_params(init_params)
  state, state_shardings, tx, schedule = common.create_train_state(
      init_params, config, mesh,
      trainable_patterns=trainable_patterns(abstract_params, config.get("frozen", ())),
      overrides=imported_params(config, abstract_params))
  ckpt, state = common.resume(workdir, config, state, data_iter)
  logging.info("pre-training %s (%d parameters) on %s: %d steps of %d clips, mesh %s",
               config.model.video, optim.count_params(state.params), d.dir, config.total_steps,
               config.batch_size, dict(mesh.shape))

  base_key = jax.random.key(config.seed + 1)
  batch_sh = sharding.batch_sharding(mesh, config.batch_size)
  with sharding.mesh_rules(mesh):
    augment = (functools.partial(device_augment.augment_batch, image_size=d.image_size,
                                 num_frames=d.num_frames) if on_device else None)
    train_step = jax.jit(make_train_step(model, tx, two_clips,
                                         config.get("loss", {}).get("variance_weight", 0.0),
                                         augment),
                         in_shardings=(state_shardings, batch_sh, None),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))
    embed_fn = jax.jit(inference.make_embed_fn(model, two_clips))
  writer = metric_writer.MetricWriter(workdir, total_steps=config.total_steps,
                                    enabled=jax.process_index() == 0, name="pretrain")
  preemption = common.Preemption()
  eval_source = (records.open_split(config.data.dir, config.data.eval_split)
                 if config.eval_every else None)
  step = int(state.step)
  last_good = ckpt.latest_step()
  final: dict[str, Any] = {}
  pending = common.PendingMetrics(ckpt.directory)
  batches = common.DevicePrefetch(itertools.islice(data_iter, config.total_steps - step),
                                  lambda b: sharding.shard_batch(b, mesh),
                                  size=config.get("prefetch_batches", common.PREFETCH_BATCHES),
                                  state_of=data_iter)
  t_clips, t0 = 0, time.time()
  try:
    while step < config.total_steps:
      with sharding.mesh_rules(mesh):
        state, out = train_step(state, next(batches), base_key)
      step += 1
      t_clips += config.batch_size
      pending.add(step, out)  # fetched (and the losses checked) only when needed below
      last = step == config.total_steps
      if step % config.log_every == 0 or last:
        scalars = pending.fetch(last_good)
        elapsed = time.time() - t0
        scalars.update(lr=float(schedule(step - 1)), clips_per_s=t_clips / max(elapsed, 1e-9))
        writer.write(step, scalars)
        final.update(scalars)
        t_clips, t0 = 0, time.time()
      if eval_source is not None and (step % config.eval_every == 0 or last):
        pending.fetch(last_good)
        with sharding.mesh_rules(mesh):
          recall = zero_shot_eval(embed_fn, state.params, eval_source, config, tok, mesh)
        writer.write(step, {f"zero_shot_{k}": v for k, v in recall.items()})
        final.update({f"zero_shot_{k}": v for k, v in recall.items()})
      stop = preemption.requested(step)
      if step % config.checkpoint.every == 0 or last or stop:
        pending.fetch(last_good)
        ckpt.save(step, state, batches.position(), force=True)
        last_good = step
      if stop:
        logging.warning("stopped at step %d on request; checkpoint saved in %s", step,
                        ckpt.directory)
        final["preempted"] = True
        break
  finally:
    ckpt.close()
    writer.close()
    preemption.restore()
  final["step"] = step
  return final
