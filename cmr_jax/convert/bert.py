"""Hugging Face BERT (`BertModel`, e.g. PubMedBERT) state dicts and configs for our text tower.

Names map one to one onto `cmr_jax.models.text.BertEncoder` (see that module's docstring). A
`bert.` prefix (as in `BertForMaskedLM` / `BertForPreTraining` checkpoints) is removed; the
pre-training heads (`cls.*`) and the `position_ids` / `token_type_ids` buffers are dropped; old
TensorFlow-ported LayerNorm names `gamma` / `beta` are read as `weight` / `bias`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cmr_jax.convert import mapping
from cmr_jax.models.text import BertConfig

HF_CONFIG_FILE = "config.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
BERT_PREFIX = "bert."
# BERT's "gelu" is the exact (erf) GELU, which is what our encoder computes.
SUPPORTED_ACTIVATIONS = ("gelu",)
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_LAYER_NORM_LEAVES = {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"}
_TABLES = re.compile(r"embeddings\.(word|position|token_type)_embeddings")


def bert_renamer(prefix: str) -> mapping.Renamer:
  """Renames Hugging Face BERT tensors to `{prefix}/...` parameter paths."""

  def rename(name: str, value: np.ndarray) -> mapping.Renamed | mapping.Dropped | None:
    if name.startswith(BERT_PREFIX):
      name = name[len(BERT_PREFIX):]
    if name.startswith("cls."):
      return mapping.Dropped("pre-training head (masked LM / next sentence), not the encoder")
    if name in _BUFFERS:
      return mapping.Dropped("index buffer, not a parameter")
    module, _, leaf = name.rpartition(".")
    path = f"{prefix}/{mapping.torch_module_path(module)}"
    if _TABLES.fullmatch(module) and leaf == "weight":
      return [(f"{path}/embedding", value)]
    if module.endswith("LayerNorm"):
      return [(f"{path}/{_LAYER_NORM_LEAVES[leaf]}", value)] if leaf in _LAYER_NORM_LEAVES else None
    pair = mapping.torch_leaf(path, leaf, value) if value.ndim <= 2 else None
    return None if pair is None else [pair]

  return rename


def config_from_hf(hf: Mapping[str, Any], source: str = HF_CONFIG_FILE) -> BertConfig:
  """Our BertConfig from a Hugging Face BERT `config.json` mapping.

  Raises:
    ValueError: a model our encoder does not compute (another activation or position encoding).
  """
  act = hf.get("hidden_act", "gelu")
  if act not in SUPPORTED_ACTIVATIONS:
    raise ValueError(f"{source}: hidden_act {act!r} is not supported (our encoder uses exact "
                     f"GELU: {SUPPORTED_ACTIVATIONS})")
  position = hf.get("position_embedding_type", "absolute")
  if position != "absolute":
    raise ValueError(f"{source}: position_embedding_type {position!r} is not supported "
                     "(absolute only)")
  try:
    return BertConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
        intermediate_size=int(hf["intermediate_size"]),
        max_len=int(hf["max_position_embeddings"]), type_vocab_size=int(hf["type_vocab_size"]),
        dropout_rate=float(hf.get("hidden_dropout_prob", BertConfig.dropout_rate)),
        layer_norm_eps=float(hf.get("layer_norm_eps", BertConfig.layer_norm_eps)))
  except KeyError as e:
    raise ValueError(f"{source}: BERT config lacks {e}") from e


def read_hf_config(folder: str) -> BertConfig:
  """The BertConfig of a Hugging Face model folder (its config.json)."""
  path = os.path.join(folder, HF_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder}: no {HF_CONFIG_FILE} (a Hugging Face BERT folder has one)")
  with open(path) as f:
    return config_from_hf(json.load(f), path)


def lowercases(folder: str) -> bool | None:
  """Whether a Hugging Face folder's tokenizer lower-cases text (None if it does not say)."""
  path = os.path.join(folder, HF_TOKENIZER_CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    value = json.load(f).get("do_lower_case")
  return None if value is None else bool(value)


def config_from_shapes(state: Mapping[str, np.ndarray], base: BertConfig,
                       prefix: str) -> BertConfig:
  """`base` with the sizes read off converted parameters `{prefix}/...` (heads stay `base`'s).

  Vocabulary, width, depth, intermediate width, positions and token types are fixed by the
  tensors; the head count is not, so it comes from `base`.
  """
  emb = f"{prefix}/embeddings"
  try:
    vocab, hidden = state[f"{emb}/word_embeddings/embedding"].shape
    max_len = state[f"{emb}/position_embeddings/embedding"].shape[0]
    types = state[f"{emb}/token_type_embeddings/embedding"].shape[0]
    intermediate = state[f"{prefix}/encoder/layer_0/intermediate/dense/kernel"].shape[1]
  except KeyError as e:
    raise ValueError(f"cannot size the text encoder: no {e} in the file") from e
  layers = len({p.split("/")[2] for p in state if p.startswith(f"{prefix}/encoder/layer_")})
  return dataclasses.replace(base, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                             intermediate_size=intermediate, max_len=max_len,
                             type_vocab_size=types)
