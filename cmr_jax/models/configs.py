"""Named model configurations and builders.

Video encoders:
  mvit_b_16x4    pytorchvideo's MViT-B 16x4 (the paper's encoder), 16x224x224, 36.3M parameters.
  mvit_tiny      1/6 width (16 -> 128), 5 blocks, 16x64x64: the CPU demo and test model.
  mvit_tiny_112  the same network at 16x112x112.
Text encoders:
  bert_base      BERT-base / PubMedBERT geometry (12 layers, 768 wide, 12 heads, vocab 30522).
  bert_tiny      2 layers, 64 wide, 2 heads, for CPU tests and the demo.

Any field can be overridden by keyword, e.g. `video_config("mvit_tiny", num_frames=8)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from cmr_jax.models.dual import CLIP_INIT_TEMPERATURE, DualEncoder
from cmr_jax.models.heads import ATTENTION_DIM, PROJECTION_DIM, LVEFRegressor
from cmr_jax.models.mvit import MViT, MViTConfig
from cmr_jax.models.text import BertConfig, BertEncoder

_TINY_MVIT = MViTConfig(num_frames=16, image_size=64, embed_dim=16, depth=5, num_heads=1,
                        stage_starts=(1, 2, 4), kv_pool_stride=(1, 4, 4))

VIDEO_CONFIGS: dict[str, MViTConfig] = {
    "mvit_b_16x4": MViTConfig(),
    "mvit_tiny": _TINY_MVIT,
    "mvit_tiny_112": dataclasses.replace(_TINY_MVIT, image_size=112, kv_pool_stride=(1, 8, 8)),
}

TEXT_CONFIGS: dict[str, BertConfig] = {
    "bert_base": BertConfig(),
    "bert_tiny": BertConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
                            max_len=128),
}


def _lookup(table: Mapping[str, Any], kind: str, name: str, overrides: Mapping[str, Any]):
  if name not in table:
    raise ValueError(f"unknown {kind} config {name!r}; known: {sorted(table)}")
  return dataclasses.replace(table[name], **overrides)


def video_config(name: str, **overrides: Any) -> MViTConfig:
  """The named MViT geometry with `overrides` applied."""
  return _lookup(VIDEO_CONFIGS, "video", name, overrides)


def text_config(name: str, **overrides: Any) -> BertConfig:
  """The named BERT geometry with `overrides` applied."""
  return _lookup(TEXT_CONFIGS, "text", name, overrides)


def video_encoder(name: str, *, dtype: str = "float32", param_dtype: str = "float32",
                  remat: bool = False, attention_impl: str = "einsum", **overrides: Any) -> MViT:
  """Builds the named MViT; `dtype` is the compute dtype (e.g. "bfloat16")."""
  return MViT(video_config(name, **overrides), dtype=jnp.dtype(dtype),
              param_dtype=jnp.dtype(param_dtype), remat=remat, attention_impl=attention_impl)


def text_encoder(name: str, *, dtype: str = "float32", param_dtype: str = "float32",
                 remat: bool = False, attention_impl: str = "einsum",
                 **overrides: Any) -> BertEncoder:
  """Builds the named BERT encoder."""
  return BertEncoder(text_config(name, **overrides), dtype=jnp.dtype(dtype),
                     param_dtype=jnp.dtype(param_dtype), remat=remat,
                     attention_impl=attention_impl)


def dual_encoder(video: str, text: str | None, *, embed_dim: int = PROJECTION_DIM,
                 dtype: str = "float32", param_dtype: str = "float32", remat: bool = False,
                 attention_impl: str = "einsum", video_overrides: Mapping[str, Any] | None = None,
                 text_overrides: Mapping[str, Any] | None = None,
                 init_temperature: float = CLIP_INIT_TEMPERATURE) -> DualEncoder:
  """Builds the pre-training model; `text=None` gives the video-video variant."""
  common = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl)
  return DualEncoder(
      video_encoder(video, **common, **(video_overrides or {})),
      None if text is None else text_encoder(text, **common, **(text_overrides or {})),
      embed_dim=embed_dim, init_temperature=init_temperature, dtype=jnp.dtype(dtype),
      param_dtype=jnp.dtype(param_dtype))


def lvef_regressor(video: str, *, label_mean: float, train_encoder: bool = False,
                   proj_dim: int = PROJECTION_DIM, attention_dim: int = ATTENTION_DIM,
                   dtype: str = "float32", param_dtype: str = "float32", remat: bool = False,
                   attention_impl: str = "einsum", **video_overrides: Any) -> LVEFRegressor:
  """Builds the fine-tuning model (encoder -> video_proj -> gated attention MIL -> LVEF)."""
  encoder = video_encoder(video, dtype=dtype, param_dtype=param_dtype, remat=remat,
                          attention_impl=attention_impl, **video_overrides)
  return LVEFRegressor(encoder, label_mean=label_mean, proj_dim=proj_dim,
                       attention_dim=attention_dim, train_encoder=train_encoder,
                       dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))
