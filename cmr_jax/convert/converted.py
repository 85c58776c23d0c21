"""Converting a PyTorch weight file as a whole, the converted checkpoint folder, and loading
parameter groups for fine-tuning.

A converted folder (written by `tools/convert_weights.py`) holds:

  params/           orbax checkpoint of {group: parameter tree}, groups among `video_encoder`,
                    `video_proj` (cmr_transformer), `text_encoder`, `text_proj`
  conversion.json   layout, source file and its SHA-256, the model configs the parameters fit
                    (`video_config`, `text_config`), the input normalisation the video weights
                    expect (`input_norm`, a name in `cmr_jax.models.mvit.INPUT_NORMS`, with
                    `input_scale` and `input_offset`: uint8 x -> x * scale + offset) and the
                    conversion report
  vocab.txt         the text tower's WordPiece vocabulary, when there is one (load it with
                    `cmr_jax.data.tokenizer.load_tokenizer`)

`load_groups(path, abstract)` is what fine-tuning's `init=kinetics:PATH` and
`init=cmr_transformer:PATH` call: PATH may be such a folder or directly a PyTorch file (converted
in memory); either way every requested parameter must be present with the model's shape.
`weights_input_norm(path)` is the input normalisation the model must apply to use them: recorded
in conversion.json, or for a file read off its layout (`LAYOUT_INPUT_NORMS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cmr_jax import checkpoint as checkpoint_lib
from cmr_jax import files
from cmr_jax.convert import bert
from cmr_jax.convert import mapping
from cmr_jax.convert import mvit
from cmr_jax.convert import torch_io
from cmr_jax.data import tokenizer as tokenizer_lib
from cmr_jax.models.mvit import CMR_TRANSFORMER_NORM, INPUT_NORMS, KINETICS_NORM, MViT, MViTConfig
from cmr_jax.models import registry
from cmr_jax.models.text import BertConfig, BertEncoder

PYTORCHVIDEO = "pytorchvideo"
TORCHVISION = "torchvision"
CMR_TRANSFORMER = "cmr_transformer"
HF_BERT = "hf_bert"
LAYOUTS: tuple[str, ...] = (PYTORCHVIDEO, TORCHVISION, CMR_TRANSFORMER, HF_BERT)
# The input normalisation (`MViTConfig.input_norm`) the video weights of each layout were trained
# with: Kinetics-400 files (SlowFast's, pytorchvideo's and torchvision's port of them) Kinetics',
# the paper's checkpoints the 0-255 normalisation of its data module
# (`cmr_jax.models.mvit.INPUT_NORMS`).
LAYOUT_INPUT_NORMS = {PYTORCHVIDEO: KINETICS_NORM, TORCHVISION: KINETICS_NORM,
                      CMR_TRANSFORMER: CMR_TRANSFORMER_NORM}
PARAMS_DIR = "params"
INFO_FILE = "conversion.json"
DEFAULT_VIDEO_CONFIG = "mvit_b_16x4"
DEFAULT_TEXT_CONFIG = "bert_base"
_HASH_CHUNK = 1 << 20
_PROBE_TOKENS = 8  # sequence length of the text encoder's shape-only initialisation


def detect_layout(state: Mapping[str, np.ndarray], source: str) -> str:
  """The layout of a state dict, from names only its layout has."""
  names = set(state)
  if any(n.startswith(f"{mvit.CMR_TRANSFORMER_PREFIX}{mvit.VIDEO_ENCODER}.") for n in names):
    return CMR_TRANSFORMER
  if "patch_embed.patch_model.weight" in names:
    return PYTORCHVIDEO
  if "conv_proj.weight" in names:
    return TORCHVISION
  if any(re.fullmatch(r"(bert\.)?embeddings\.word_embeddings\.weight", n) for n in names):
    return HF_BERT
  raise ValueError(f"{source}: unrecognised state dict layout (expected one of {LAYOUTS}); "
                   f"first names: {sorted(names)[:8]}")


def renamer_for(layout: str) -> mapping.Renamer:
  """The renamer of a layout name."""
  if layout == PYTORCHVIDEO:
    return mvit.pytorchvideo_renamer()
  if layout == TORCHVISION:
    return mvit.torchvision_renamer()
  if layout == CMR_TRANSFORMER:
    return mvit.cmr_transformer_renamer()
  if layout == HF_BERT:
    return bert.bert_renamer(mvit.TEXT_ENCODER)
  raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


@dataclasses.dataclass
class Converted:
  """A converted weight file: parameters, what happened, and the configs they fit."""

  params: dict[str, Any]  # {group: nested parameter tree of numpy arrays}
  report: mapping.ConversionReport
  video_config: MViTConfig | None = None
  text_config: BertConfig | None = None
  vocab: str | None = None  # vocab.txt to carry with the text tower

  @property
  def input_norm(self) -> str | None:
    """The input normalisation the video weights expect (None without a video tower): that of
    the file's layout, else the video config's."""
    if self.video_config is None:
      return None
    return LAYOUT_INPUT_NORMS.get(self.report.layout, self.video_config.input_norm)


def _abstract(module, *example) -> dict[str, Any]:
  init = lambda rng: module.init(rng, *example)["params"]  # noqa: E731
  return nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))


def _initialised(module, seed: int, *example) -> dict[str, Any]:
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), *example))["params"]


def _video_example(config: MViTConfig) -> jax.Array:
  return jnp.zeros((1, config.num_frames, config.image_size, config.image_size), jnp.uint8)


def _text_example() -> tuple[jax.Array, jax.Array]:
  return jnp.zeros((1, _PROBE_TOKENS), jnp.int32), jnp.ones((1, _PROBE_TOKENS), jnp.int32)


def _projection(renamed: Mapping[str, np.ndarray], group: str) -> dict[str, Any]:
  kernel = renamed[f"{group}/kernel"]
  return {"kernel": jax.ShapeDtypeStruct(kernel.shape, jnp.float32)}


def convert_file(src: str, *, layout: str = "auto", video_config: MViTConfig | None = None,
                 text_config: BertConfig | None = None, vocab: str | None = None,
                 allow_missing: bool = False, allow_unexpected: bool = False,
                 allow_mismatch: bool = False, seed: int = 0) -> Converted:
  """Converts every tower a PyTorch weight file (or Hugging Face BERT folder) holds.

  Args:
    src: the weight file or model folder.
    layout: one of LAYOUTS, or "auto" to recognise it by its names.
    video_config: the MViT geometry (default mvit_b_16x4); its num_frames and image_size are
      replaced by those the file's position embeddings were made for (32 for mvit_base_32x3).
    text_config: the BERT geometry when no config.json says (default bert_base); its sizes are
      read off the tensors, its head count is kept.
    vocab: a vocab.txt for the text tower (default: the Hugging Face folder's own).
    allow_missing: keep a fresh initialisation (from `seed`) for parameters the file lacks.
    allow_unexpected: ignore tensors that have no place in the model.
    allow_mismatch: keep a fresh initialisation where the file's tensor has another shape.
    seed: initialisation seed for missing or mismatched parameters.

  Raises:
    ConversionError: missing, unexpected or mis-shaped tensors that are not allowed.
    ValueError: an unrecognised layout, or a vocabulary that does not fit the text tower.
  """
  state = torch_io.load_state_dict(src)
  if layout == "auto":
    layout = detect_layout(state, src)
  renamer = renamer_for(layout)
  renamed = mapping.rename_all(state, renamer)
  groups = {path.split(mapping.PATH_SEP)[0] for path in renamed}
  target: dict[str, Any] = {}
  modules: dict[str, tuple[Any, tuple[Any, ...]]] = {}
  out = Converted(params={}, report=mapping.ConversionReport(src, layout))
  if mvit.VIDEO_ENCODER in groups:
    base = video_config or registry.video_config(DEFAULT_VIDEO_CONFIG)
    out.video_config = dataclasses.replace(base, **mvit.input_size(renamed, base),
                                           input_norm=LAYOUT_INPUT_NORMS[layout])
    # Converted parameters keep the per-block layout (`cmr_jax.models.stacking`), whatever the
    # model's `scan_blocks`: `load_groups` stacks them for a scanned model.
    modules[mvit.VIDEO_ENCODER] = (MViT(dataclasses.replace(out.video_config, scan_blocks=False)),
                                   (_video_example(out.video_config),))
  if mvit.TEXT_ENCODER in groups:
    folder = src if os.path.isdir(src) else None
    if folder and os.path.isfile(os.path.join(folder, bert.HF_CONFIG_FILE)):
      out.text_config = bert.read_hf_config(folder)
    else:
      base = text_config or registry.text_config(DEFAULT_TEXT_CONFIG)
      out.text_config = bert.config_from_shapes(renamed, base, mvit.TEXT_ENCODER)
    modules[mvit.TEXT_ENCODER] = (BertEncoder(out.text_config), _text_example())
    out.vocab = vocab or _folder_vocab(folder)
    if out.vocab:
      _check_vocab(out.vocab, out.text_config.vocab_size)
    else:
      logging.warning("%s: text tower converted without a vocab.txt (give one with vocab=)", src)
    if folder and bert.lowercases(folder) is False:
      logging.warning("%s: the tokenizer is cased, ours lower-cases all text: token ids will "
                      "differ from the model's training", folder)
  for name, (module, example) in modules.items():
    target[name] = _abstract(module, *example)
  for name in (mvit.VIDEO_PROJ, mvit.TEXT_PROJ):
    if f"{name}/kernel" in renamed:
      target[name] = _projection(renamed, name)
  flat, out.report = mapping.convert(state, renamer, mapping.flatten(target), source=src,
                                     layout=layout)
  out.report.check(allow_missing=allow_missing, allow_unexpected=allow_unexpected,
                   allow_mismatch=allow_mismatch)
  unfilled = set(mapping.flatten(target)) - set(flat)
  if unfilled:
    fresh = {name: _initialised(module, seed, *example)
             for name, (module, example) in modules.items()
             if any(p.startswith(f"{name}/") for p in unfilled)}
    fresh_flat = mapping.flatten(fresh)
    flat.update({p: np.asarray(fresh_flat[p]) for p in unfilled})
    logging.warning("%d parameters keep a fresh initialisation (seed %d): %s", len(unfilled),
                    seed, sorted(unfilled))
  out.params = mapping.unflatten(flat)
  return out


def _folder_vocab(folder: str | None) -> str | None:
  if folder is None:
    return None
  path = files.join(folder, tokenizer_lib.VOCAB_FILE)
  return path if files.isfile(path) else None


def _check_vocab(path: str, vocab_size: int) -> None:
  """A vocab.txt must load as our tokenizer, and its ids must index the embedding table (which
  some models pad beyond the vocabulary)."""
  tok = tokenizer_lib.load_tokenizer(path)
  if tok.vocab_size > vocab_size:
    raise ValueError(f"{path}: {tok.vocab_size} tokens but the text encoder embeds only "
                     f"{vocab_size}")


def _sha256(path: str) -> str | None:
  """SHA-256 of a weight file (None for a source that is not on disk)."""
  if not os.path.exists(path):
    return None
  digest = hashlib.sha256()
  with open(torch_io.resolve_weight_file(path), "rb") as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def save_converted(out_dir: str, converted: Converted, *, overwrite: bool = False) -> str:
  """Writes a converted folder (see module docstring); returns its absolute path.

  Raises:
    FileExistsError: `out_dir` is not empty and `overwrite` is False.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise FileExistsError(f"{out_dir} is not empty (pass overwrite to replace it)")
    shutil.rmtree(out_dir)
  os.makedirs(out_dir)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, PARAMS_DIR), converted.params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if converted.vocab:
    shutil.copyfile(converted.vocab, os.path.join(out_dir, tokenizer_lib.VOCAB_FILE))
  report = converted.report
  norm = converted.input_norm
  scale, offset = INPUT_NORMS[norm].affine if norm else (None, None)
  info = {
      "layout": report.layout, "source": os.path.abspath(report.source),
      "source_sha256": _sha256(report.source), "groups": sorted(converted.params),
      "video_config": (dataclasses.asdict(dataclasses.replace(converted.video_config,
                                                              input_norm=norm))
                       if converted.video_config else None),
      "input_norm": norm, "input_scale": scale, "input_offset": offset,
      "text_config": dataclasses.asdict(converted.text_config) if converted.text_config else None,
      "vocab": tokenizer_lib.VOCAB_FILE if converted.vocab else None,
      "report": report.to_json(),
  }
  with open(os.path.join(out_dir, INFO_FILE), "w") as f:
    json.dump(info, f, indent=1)
  return out_dir


def is_converted(path: str) -> bool:
  """Whether `path` is a converted folder."""
  return files.isfile(files.join(path, INFO_FILE))


def load_converted(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(parameters {group: tree of numpy arrays}, conversion.json) of a converted folder."""
  if not is_converted(path):
    raise FileNotFoundError(f"{path} is not a converted weights folder (no {INFO_FILE})")
  info = files.read_json(files.join(path, INFO_FILE))
  params = checkpoint_lib.restore_on_this_host(files.join(files.abspath(path), PARAMS_DIR))
  return jax.tree.map(np.asarray, params), info


def weights_input_norm(path: str) -> str | None:
  """The input normalisation (`MViTConfig.input_norm`) the video weights of `path` expect.

  Args:
    path: a converted folder (its conversion.json's `input_norm`; for a folder converted before
      it was recorded, that of its layout), or a PyTorch file or Hugging Face folder (its
      layout's, `LAYOUT_INPUT_NORMS`; the file is read for its names).

  Returns:
    The name, or None for weights without a video tower.

  Raises:
    FileNotFoundError, ImportError, ValueError: an unreadable source (see
      `torch_io.load_state_dict`) or an unknown layout.
  """
  if is_converted(path):
    info = files.read_json(files.join(path, INFO_FILE))
    if "input_norm" in info:
      return info["input_norm"]
    return LAYOUT_INPUT_NORMS.get(info["layout"]) if mvit.VIDEO_ENCODER in info["groups"] else None
  return LAYOUT_INPUT_NORMS.get(detect_layout(torch_io.load_state_dict(path), path))


def load_groups(path: str, abstract: Mapping[str, Any]) -> dict[str, Any]:
  """Parameter groups for a model, from a converted folder or directly from a PyTorch file.

  Args:
    path: a converted folder, a PyTorch weight file or a Hugging Face folder.
    abstract: {group: tree of shapes (e.g. ShapeDtypeStructs)}: the groups to load.

  Returns:
    {group: tree of numpy arrays} with exactly the structure and shapes of `abstract`.

  Raises:
    ConversionError: a requested parameter is missing or mis-shaped, or the file has tensors
      of the requested groups that the model lacks (each listed by name).
    FileNotFoundError, ImportError, ValueError: an unreadable source (see
      `torch_io.load_state_dict`).
  """
  if is_converted(path):
    params, info = load_converted(path)
    state = mapping.flatten(params)
    renamer: mapping.Renamer = lambda name, value: [(name, value)]  # noqa: E731
    layout = f"converted {info['layout']}"
  else:
    state = torch_io.load_state_dict(path)
    layout = detect_layout(state, path)
    renamer = renamer_for(layout)
  target = mapping.flatten(abstract)
  flat, report = mapping.convert(state, renamer, target, source=path, layout=layout)
  try:
    report.check()
  except mapping.ConversionError as e:
    if any("pos_embed" in m for m in report.mismatched):
      size = mvit.input_size(mapping.rename_all(state, renamer), MViTConfig())
      raise mapping.ConversionError(
          f"{e}. The file's position embeddings are for {size['num_frames']} frames of "
          f"{size['image_size']}x{size['image_size']}: the model (config.model.video_overrides"
          " and config.data) must use that input size", report) from None
    raise
  by_reason: dict[str, list[str]] = {}
  for name, reason in report.dropped.items():
    by_reason.setdefault(reason, []).append(name)
  for reason, names in sorted(by_reason.items()):
    logging.info("%s: %d tensors not loaded (%s), e.g. %s", path, len(names), reason, min(names))
  return mapping.unflatten(flat)
