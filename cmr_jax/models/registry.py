"""Named model configurations and builders, and the models of a run's config.

Video encoders:
  mvit_b_16x4    pytorchvideo's MViT-B 16x4 (the paper's encoder), 16x224x224, 36.3M parameters.
  mvit_tiny      1/6 width (16 -> 128), 5 blocks, 16x64x64: the CPU demo and test model.
  mvit_tiny_112  the same network at 16x112x112.
  r2plus1d_tiny  a small R(2+1)D CNN (EchoNet-Dynamic's family; widths 16 -> 128, 4 blocks,
                 0.4M parameters), 16x64x64: the CPU demo's encoder (the tiny MViT does not learn
                 from a few hundred studies in CPU minutes; README, "Encoders, heads and
                 pre-training").
  r2plus1d_18    the R(2+1)D-18 geometry (widths 64 -> 512, 2 blocks per stage) at 16x112x112.
Text encoders:
  bert_base      BERT-base / PubMedBERT geometry (12 layers, 768 wide, 12 heads, vocab 30522).
  bert_tiny      2 layers, 64 wide, 2 heads, for CPU tests.
  bow_tiny       a bag-of-words encoder (mean word embedding + MLP, 128 wide): the CPU demo's text
                 tower (README, "Encoders, heads and pre-training").

Any field can be overridden by keyword, e.g. `video_config("mvit_tiny", num_frames=8)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cmr_jax.models.dual import CLIP_INIT_TEMPERATURE, DualEncoder
from cmr_jax.models.heads import ATTENTION_DIM, PROJECTION_DIM, LVEFRegressor
from cmr_jax.models.mvit import MViT, MViTConfig
from cmr_jax.models.r2plus1d import R2Plus1D, R2Plus1DConfig
from cmr_jax.models.text import BagOfWordsConfig, BagOfWordsEncoder, BertConfig, BertEncoder

_TINY_MVIT = MViTConfig(num_frames=16, image_size=64, embed_dim=16, depth=5, num_heads=1,
                        stage_starts=(1, 2, 4), kv_pool_stride=(1, 4, 4))

VideoConfig = MViTConfig | R2Plus1DConfig
VideoEncoder = MViT | R2Plus1D

VIDEO_CONFIGS: dict[str, VideoConfig] = {
    "mvit_b_16x4": MViTConfig(),
    "mvit_tiny": _TINY_MVIT,
    "mvit_tiny_112": dataclasses.replace(_TINY_MVIT, image_size=112, kv_pool_stride=(1, 8, 8)),
    "r2plus1d_tiny": R2Plus1DConfig(),
    "r2plus1d_18": R2Plus1DConfig(image_size=112, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2),
                                  groups=32),
}

TextConfig = BertConfig | BagOfWordsConfig
TextEncoder = BertEncoder | BagOfWordsEncoder

TEXT_CONFIGS: dict[str, TextConfig] = {
    "bert_base": BertConfig(),
    "bert_tiny": BertConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
                            max_len=128),
    "bow_tiny": BagOfWordsConfig(hidden_size=128, max_len=128),
}


# The encoder class of each geometry type.
_ENCODERS: dict[type, type] = {MViTConfig: MViT, R2Plus1DConfig: R2Plus1D,
                               BertConfig: BertEncoder, BagOfWordsConfig: BagOfWordsEncoder}


def _lookup(table: Mapping[str, Any], kind: str, name: str, overrides: Mapping[str, Any]):
  if name not in table:
    raise ValueError(f"unknown {kind} config {name!r}; known: {sorted(table)}")
  return dataclasses.replace(table[name], **overrides)


def video_config(name: str, **overrides: Any) -> VideoConfig:
  """The named video encoder geometry with `overrides` applied."""
  return _lookup(VIDEO_CONFIGS, "video", name, overrides)


def text_config(name: str, **overrides: Any) -> TextConfig:
  """The named text encoder geometry with `overrides` applied."""
  return _lookup(TEXT_CONFIGS, "text", name, overrides)


def _encoder(configs: Mapping[str, Any], kind: str, name: str, *, dtype: str = "float32",
             param_dtype: str = "float32", remat: bool = False, attention_impl: str = "einsum",
             **overrides: Any) -> VideoEncoder | TextEncoder:
  """Builds the encoder of the named config in `configs` with `overrides` applied; `dtype` is
  the compute dtype (e.g. "bfloat16"), `remat` and `attention_impl` are as in `layers.Encoder`."""
  config = _lookup(configs, kind, name, overrides)
  return _ENCODERS[type(config)](config, dtype=jnp.dtype(dtype),
                                 param_dtype=jnp.dtype(param_dtype), remat=remat,
                                 attention_impl=attention_impl)


def video_encoder(name: str, **options: Any) -> VideoEncoder:
  """Builds the named video encoder (`options`: the keywords and overrides of `_encoder`)."""
  return _encoder(VIDEO_CONFIGS, "video", name, **options)


def text_encoder(name: str, **options: Any) -> TextEncoder:
  """Builds the named text encoder (`options`: the keywords and overrides of `_encoder`)."""
  return _encoder(TEXT_CONFIGS, "text", name, **options)


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
                   head: str = "paper", dtype: str = "float32", param_dtype: str = "float32",
                   remat: bool = False, attention_impl: str = "einsum",
                   **video_overrides: Any) -> LVEFRegressor:
  """Builds the fine-tuning model (encoder -> video_proj -> `head` with gated attention -> LVEF)."""
  encoder = video_encoder(video, dtype=dtype, param_dtype=param_dtype, remat=remat,
                          attention_impl=attention_impl, **video_overrides)
  return LVEFRegressor(encoder, label_mean=label_mean, proj_dim=proj_dim,
                       attention_dim=attention_dim, train_encoder=train_encoder, head=head,
                       dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))


# The parameter groups each fine-tuning mode trains (regexes over parameter paths); the others
# are frozen and carry no optimizer state.
TRAINABLE_BY_MODE = {
    "linear": (r"^instance_mlp/", r"^mil/", r"^regressor/"),
    "finetune": (r"^instance_mlp/", r"^mil/", r"^regressor/", r"^video_proj/"),
    "transfer": (r".*",),
}
# The groups an encoder init (pre-training run or imported weights) provides.
ENCODER_PARAMS = ("video_encoder", "video_proj")


def lvef_model(config: ml_collections.ConfigDict, mean: float) -> LVEFRegressor:
  """The LVEF regressor of a fine-tuning config (`config.model`, `config.mode`), bias at `mean`."""
  m = config.model
  if config.mode not in TRAINABLE_BY_MODE:
    raise ValueError(f"unknown fine-tuning mode {config.mode!r}; expected one of "
                     f"{sorted(TRAINABLE_BY_MODE)}")
  return lvef_regressor(
      m.video, label_mean=mean, train_encoder=config.mode == "transfer", proj_dim=m.embed_dim,
      head=m.get("head", "paper"), dtype=m.dtype, remat=m.remat,
      **dict(m.get("video_overrides", {})))


def lvef_init_fn(model: LVEFRegressor, config: ml_collections.ConfigDict):
  """rng -> the (boxed) parameters of `model`, initialised on one example bag of `config.data`."""
  d = config.data
  video = jnp.zeros((1, d.max_instances, d.num_frames, d.image_size, d.image_size), jnp.uint8)
  mask = jnp.ones((1, d.max_instances), bool)
  return lambda rng: model.init(rng, video, mask)["params"]


def pretrain_model(config: ml_collections.ConfigDict, vocab_size: int | None) -> DualEncoder:
  """The dual encoder of a pre-training config (text vocabulary sized to the tokenizer)."""
  m = config.model
  text_overrides = dict(m.get("text_overrides", {}))
  if vocab_size:
    text_overrides["vocab_size"] = vocab_size
  return dual_encoder(
      m.video, None if m.two_clips else m.text, embed_dim=m.embed_dim, dtype=m.dtype,
      remat=m.remat, video_overrides=dict(m.get("video_overrides", {})),
      text_overrides=text_overrides,
      init_temperature=m.get("init_temperature", CLIP_INIT_TEMPERATURE))


def pretrain_init_fn(model: DualEncoder, config: ml_collections.ConfigDict):
  """rng -> the (boxed) parameters of `model`, initialised on one example of `config`."""
  d = config.data
  example = {"video": jnp.zeros((1, d.num_frames, d.image_size, d.image_size), jnp.uint8)}
  if config.model.two_clips:
    example["video2"] = example["video"]
  else:
    example["text_ids"] = jnp.zeros((1, config.text.max_len), jnp.int32)
    example["text_mask"] = jnp.ones((1, config.text.max_len), jnp.int32)
  return lambda rng: model.init(rng, **example)["params"]


def abstract_params(init_fn) -> Any:
  """The shapes and dtypes of the parameters `init_fn` makes, without computing them."""
  return nn.meta.unbox(jax.eval_shape(init_fn, jax.random.key(0)))
