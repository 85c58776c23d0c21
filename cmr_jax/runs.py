"""The run folder: what a training run writes, and the one place that reads it back.

  {workdir}/
    config.json         the run's config (`save_config`, `load_config`)
    checkpoints/STEP/   orbax checkpoints, `state` (+ `data`, the input iterator) (`checkpoint.py`)
    metrics.jsonl, tb/  scalars per step as JSON lines and TensorBoard events (`MetricWriter`)
  fine-tuning runs also:
    best/STEP/          the checkpoint of the lowest validation MAE
    best.json           its step and validation errors (`write_best`, `read_best`); prediction
                        intervals come from them
    preprocess.json     the training data's preprocessing, so prediction needs no dataset
  pre-training runs also:
    tokenizer/vocab.txt the WordPiece vocabulary trained on the reports (unless config.text.vocab)

Trainers write it; evaluators, prediction, sweeps and experiments read it through the functions
here (restore by step or best, and the one check that checkpoint parameters fit a model).
"""

from __future__ import annotations

import copy
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from cmr_jax import checkpoint as checkpoint_lib
from cmr_jax import files
from cmr_jax.convert import converted
from cmr_jax.data import preprocess as preprocess_lib
from cmr_jax.data import tokenizer as tokenizer_lib
from cmr_jax.models import registry
from cmr_jax.models import stacking

CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
BEST_JSON = "best.json"
PREPROCESS_JSON = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_KINDS = (BEST_DIR, CHECKPOINT_DIR)
# Parameter groups each imported-weights init kind provides (see `encoder_init`).
IMPORTED_PARAMS = {"kinetics": ("video_encoder",), "cmr_transformer": registry.ENCODER_PARAMS}


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config as JSON (process 0 only) so evaluators can rebuild the model."""
  if jax.process_index() == 0:
    files.makedirs(workdir)
    files.write_text(files.join(workdir, CONFIG_JSON), config.to_json_best_effort(indent=1))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved with `save_config`."""
  path = files.join(workdir, CONFIG_JSON)
  if not files.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a cmr-jax run directory")
  return ml_collections.ConfigDict(files.read_json(path))


def write_best(workdir: str, step: int, mae: float, residual: np.ndarray) -> None:
  """Records the best step with its validation errors (prediction intervals come from them)."""
  if jax.process_index() == 0:
    files.write_json(
        files.join(workdir, BEST_JSON),
        {"step": step, "val_mae": mae, "val_n": int(residual.size),
         "val_bias": float(np.mean(residual)), "val_rmse": float(np.sqrt(np.mean(residual ** 2))),
         "val_residual_sd": float(np.std(residual, ddof=1)) if residual.size > 1 else None},
        indent=1)


def read_best(workdir: str) -> dict[str, Any] | None:
  """The best-checkpoint summary of a fine-tuning run (step, validation errors), or None."""
  path = files.join(workdir, BEST_JSON)
  if not files.exists(path):
    return None
  return files.read_json(path)


def save_preprocess(preprocess: dict[str, Any], workdir: str) -> None:
  """Keeps the training data's preprocessing (a `PreprocessConfig` mapping) with the run."""
  if jax.process_index() == 0:
    files.write_json(files.join(workdir, PREPROCESS_JSON), preprocess, indent=1)


def read_preprocess(workdir: str) -> dict[str, Any]:
  """The preprocessing config (a `PreprocessConfig.from_dict` mapping) a run was trained with."""
  return preprocess_lib.with_legacy_defaults(files.read_json(files.join(workdir, PREPROCESS_JSON)))


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The vocabulary a pre-training run tokenised with: config.text.vocab or its own."""
  return config.text.vocab or files.join(workdir, TOKENIZER_DIR, tokenizer_lib.VOCAB_FILE)


def checkpoint_steps(workdir: str, which: str = CHECKPOINT_DIR) -> list[int]:
  """The steps of the finished checkpoints in `workdir/which`, ascending (may be empty).

  Raises:
    FileNotFoundError: when `workdir/which` does not exist.
  """
  directory = files.join(workdir, which)
  if not files.isdir(directory):
    raise FileNotFoundError(f"{directory} not found: {workdir} is not a run directory with "
                            f"{which}/ (or has not saved a checkpoint yet)")
  ckpt = checkpoint_lib.Checkpointer(directory, async_save=False)
  steps = ckpt.all_steps()
  ckpt.close()
  return list(steps)


def latest_step(workdir: str, which: str = CHECKPOINT_DIR) -> int | None:
  """The newest finished checkpoint's step in `workdir/which`; None if there is none."""
  try:
    steps = checkpoint_steps(workdir, which)
  except FileNotFoundError:
    return None
  return steps[-1] if steps else None


def restore_params(workdir: str, *, which: str = CHECKPOINT_DIR,
                   step: int | None = None) -> tuple[int, Any]:
  """(step, parameters) of a checkpoint in `workdir/which` (default the newest), on this host.

  Raises:
    FileNotFoundError: no such folder, no finished checkpoint, or not that step.
  """
  steps = checkpoint_steps(workdir, which)
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint in {files.join(workdir, which)}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {files.join(workdir, which)}; "
                            f"it keeps steps {steps}")
  path = files.join(workdir, which, str(step), checkpoint_lib.STATE)
  return step, checkpoint_lib.restore_on_this_host(path)["params"]


def shape_mismatch(want: Any, got: Any) -> str:
  """A short description of the first differences between two trees of shapes."""
  name = lambda p: jax.tree_util.keystr(p, simple=True, separator="/")  # noqa: E731
  flat_w = {name(p): s for p, s in jax.tree_util.tree_leaves_with_path(want)}
  flat_g = {name(p): s for p, s in jax.tree_util.tree_leaves_with_path(got)}
  diffs = [f"{k}: model {flat_w.get(k)} vs checkpoint {flat_g.get(k)}"
           for k in sorted(set(flat_w) | set(flat_g)) if flat_w.get(k) != flat_g.get(k)]
  return "; ".join(diffs[:5]) + (f"; ... {len(diffs) - 5} more" if len(diffs) > 5 else "")


def in_block_layout(params: Any, abstract: Any, what: str) -> Any:
  """`params` with the MViT blocks stacked or per-block as in `abstract`, so that a checkpoint of
  a run scanned otherwise (`MViTConfig.scan_blocks`) fits.

  Raises:
    ValueError: naming `what`, when a scanned run's blocks cannot be stacked (one is missing, or
      they differ).
  """
  try:
    return stacking.match_blocks(params, abstract)
  except ValueError as e:
    raise ValueError(f"{what} ({e})") from None


def check_fit(abstract: Any, params: Any, what: str) -> None:
  """Raises ValueError naming `what` when `params` do not have the shapes of `abstract`."""
  want = jax.tree.map(lambda x: tuple(x.shape), abstract)
  got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ValueError(f"{what} ({shape_mismatch(want, got)})")


def restore_finetuned(workdir: str, *,
                      which: str = BEST_DIR) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, parameters) of a fine-tuning run's checkpoint: `best` (default) or the newest of
  `checkpoints`, checked against the model its config.json describes.

  Raises:
    ValueError: an unknown `which`, or parameters that do not fit the run's model.
    FileNotFoundError: a missing run or checkpoint.
  """
  if which not in CHECKPOINT_KINDS:
    raise ValueError(f"unknown checkpoint {which!r}; expected one of {CHECKPOINT_KINDS}")
  config = load_config(workdir)
  _, params = restore_params(workdir, which=which)
  model = registry.lvef_model(config, mean=0.0)
  abstract = registry.abstract_params(registry.lvef_init_fn(model, config))
  what = (f"the checkpoint in {files.join(workdir, which)} does not match the run's "
          "config.json")
  params = in_block_layout(params, abstract, what)
  check_fit(abstract, params, what)
  return config, params


def pretrain_init(rest: str) -> tuple[str, int | None]:
  """(workdir, step or None) of the WORKDIR[:STEP] of a `pretrain:` init; WORKDIR may be a URL
  (gs://bucket/run:6)."""
  head, sep, tail = rest.rpartition(":")
  return (head, int(tail)) if sep and tail.isdigit() else (rest, None)


def init_input_norm(init: str) -> str | None:
  """The input normalisation (`MViTConfig.input_norm`) the encoder weights of `init` expect.

  kinetics:PATH and cmr_transformer:PATH: what the weights' conversion recorded
  (`converted.weights_input_norm`: conversion.json, or the layout of a PyTorch file, which is read
  for it); pretrain:WORKDIR[:STEP]: the pre-training run's encoder's, from its config.json; None
  for random, for an encoder without the setting, or for a run not found (`encoder_init` then
  names it).
  """
  kind, _, rest = init.partition(":")
  if kind in IMPORTED_PARAMS and rest:
    return converted.weights_input_norm(rest)
  workdir = pretrain_init(rest)[0]
  if kind == "pretrain" and files.isfile(files.join(workdir, CONFIG_JSON)):
    m = load_config(workdir).model
    return getattr(registry.video_config(m.video, **dict(m.get("video_overrides", {}))),
                   "input_norm", None)
  return None


def with_init_input_norm(config: ml_collections.ConfigDict,
                         init: str | None = None) -> ml_collections.ConfigDict:
  """`config` with its video encoder normalising input as the weights of `init` expect.

  Imported weights (`kinetics:PATH`, `cmr_transformer:PATH`) set
  `config.model.video_overrides.input_norm` to the normalisation their conversion recorded, so
  that the run's config.json, and every model rebuilt from it (`inference.Predictor`), keeps it.
  A pre-training run's encoder keeps its normalisation (the default, unless that run set
  another); a random one the config's.

  Args:
    config: a fine-tuning config (`config.model`, `config.init`).
    init: the encoder init, default `config.init`.

  Returns:
    `config` itself when nothing changes, else a changed copy.

  Raises:
    ValueError: `config.model.video_overrides.input_norm` names another normalisation than the
      weights expect.
  """
  init = config.init if init is None else init
  kind = init.partition(":")[0]
  return with_input_norm(config, init_input_norm(init), f"init {init!r}",
                         record=kind in IMPORTED_PARAMS)


def with_input_norm(config: ml_collections.ConfigDict, norm: str | None, source: str, *,
                    record: bool = True) -> ml_collections.ConfigDict:
  """`config` with `config.model.video_overrides.input_norm` set to `norm` (the normalisation
  the encoder weights of `source` expect); unchanged for `norm` None, for an encoder without the
  setting, or when `record` is False and the config's default already is `norm`.

  Raises:
    ValueError: the config explicitly asks for another normalisation.
  """
  m = config.model
  overrides = dict(m.get("video_overrides", {}))
  model_norm = getattr(registry.video_config(m.video, **overrides), "input_norm", None)
  if norm is None or model_norm is None:
    return config
  if "input_norm" in overrides:
    if overrides["input_norm"] != norm:
      raise ValueError(f"config.model.video_overrides.input_norm={overrides['input_norm']!r}, "
                       f"but the encoder weights of {source} expect input normalised as "
                       f"{norm!r}: drop the setting or set it to {norm!r}")
    return config
  if norm == model_norm and not record:
    return config
  out = copy.deepcopy(config)
  with out.unlocked():
    out.model.video_overrides = dict(overrides, input_norm=norm)
  logging.info("video input normalised as %r, as the weights of %s expect", norm, source)
  return out


def encoder_init(init: str, abstract_params: Any) -> dict[str, Any] | None:
  """Encoder (and projection) parameters for a fine-tuning model from `init`; None for "random".

  Kinds:
    random                   the from-scratch baseline
    pretrain:WORKDIR[:STEP]  `video_encoder` and `video_proj` of our pre-training run
    kinetics:PATH            `video_encoder` from Kinetics-400 MViT-B weights (`video_proj` stays
                             freshly initialised)
    cmr_transformer:PATH     `video_encoder` and `video_proj` from the paper's released encoder
  PATH is a folder written by tools/convert_weights.py or directly the PyTorch file (`.pyth`,
  `.pth`, `.ckpt`, `.safetensors`; converted in memory, which needs the `torch` extra). The model
  must normalise its input as the weights expect: build it from `with_init_input_norm(config)`.

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
  workdir, step = pretrain_init(rest)
  try:
    step_, params = restore_params(workdir, step=step)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"no pre-training checkpoint for init {init!r}: {e}") from e
  where = files.join(workdir, CHECKPOINT_DIR, str(step_))
  out = {}
  for name in registry.ENCODER_PARAMS:
    if name not in params:
      raise ValueError(f"{where} has no {name!r} parameters (has {sorted(params)})")
    what = f"the {name} parameters in {where} do not match config.model"
    params[name] = in_block_layout(params[name], abstract_params[name], what)
    check_fit(abstract_params[name], params[name], what)
    out[name] = params[name]
  logging.info("encoder initialised from %s (step %d)", workdir, step_)
  return out
