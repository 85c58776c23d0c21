"""MViT state dict layouts: pytorchvideo, torchvision and the paper's cmr_transformer checkpoint.

pytorchvideo (`mvit_base_16x4`, `mvit_base_32x3`, or any `create_multiscale_vision_transformers`
model; the Kinetics-400 `.pyth` files keep it under `model_state`) names map one to one onto
`cmr_jax.models.mvit.MViT` (see that module's docstring); `head.proj`, the Kinetics classifier,
is dropped.

torchvision's `mvit_v1_b` is the same network under other names, renamed here to pytorchvideo's:

  conv_proj                                     -> patch_embed.patch_model
  pos_encoding.{class_token, spatial_pos, temporal_pos, class_pos} [N, C] or [C]
      -> cls_positional_encoding.{cls_token, pos_embed_spatial, pos_embed_temporal,
         pos_embed_class} [1, N, C]
  blocks.{i}.attn.qkv [3C, C] (q, k, v stacked)  -> blocks.{i}.attn.{q, k, v}
  blocks.{i}.attn.project.0                     -> blocks.{i}.attn.proj
  blocks.{i}.attn.pool_{q,k,v}.pool             -> blocks.{i}.attn.pool_{q,k,v}
  blocks.{i}.attn.pool_{q,k,v}.norm_act.0       -> blocks.{i}.attn.norm_{q,k,v}
  blocks.{i}.mlp.0, mlp.3                       -> blocks.{i}.mlp.fc1, mlp.fc2
  blocks.{i}.project                            -> blocks.{i}.proj
  norm                                          -> norm_embed
  head.1 (the Kinetics classifier)              -> dropped

cmr_transformer (the paper's PyTorch Lightning checkpoints, `state_dict` keys under `model.`):
`model.video_encoder.*` is a pytorchvideo MViT-B, `model.video_proj` the 768 -> 512 linear
projection, and, in a pre-training checkpoint, `model.text_encoder.*` a Hugging Face BERT
(PubMedBERT) with `model.text_proj`. Our projections have no bias: the paper's `video_proj.bias`
(and `text_proj.bias`) are dropped. For LVEF fine-tuning this loses nothing: a constant offset of
every instance's projected features passes through the gated attention's `attention_V`,
`attention_U` and the regressor as a change of their biases (the attention weights sum to 1),
so the trainable head absorbs it exactly.
"""

from __future__ import annotations

import math
import re

import numpy as np

from cmr_jax.convert import bert
from cmr_jax.convert import mapping
from cmr_jax.models.mvit import MViTConfig

VIDEO_ENCODER = "video_encoder"
VIDEO_PROJ = "video_proj"
TEXT_ENCODER = "text_encoder"
TEXT_PROJ = "text_proj"
CMR_TRANSFORMER_PREFIX = "model."
KINETICS_HEAD_REASON = "Kinetics-400 classifier, not part of the encoder"
PROJ_BIAS_REASON = ("our projections have no bias; the LVEF head absorbs a constant feature "
                    "offset in its own biases")

# torchvision module names (re.fullmatch) -> pytorchvideo module names.
_TORCHVISION_MODULES: tuple[tuple[str, str], ...] = (
    (r"conv_proj", "patch_embed.patch_model"),
    (r"blocks\.(\d+)\.attn\.project\.0", r"blocks.\1.attn.proj"),
    (r"blocks\.(\d+)\.attn\.pool_([qkv])\.pool", r"blocks.\1.attn.pool_\2"),
    (r"blocks\.(\d+)\.attn\.pool_([qkv])\.norm_act\.0", r"blocks.\1.attn.norm_\2"),
    (r"blocks\.(\d+)\.mlp\.0", r"blocks.\1.mlp.fc1"),
    (r"blocks\.(\d+)\.mlp\.3", r"blocks.\1.mlp.fc2"),
    (r"blocks\.(\d+)\.project", r"blocks.\1.proj"),
    (r"blocks\.(\d+)\.(norm[12])", r"blocks.\1.\2"),
    (r"norm", "norm_embed"),
    (r"head(\..+)?", r"\g<0>"),  # the Kinetics classifier: pytorchvideo's renamer drops it
)
_TORCHVISION_POSITIONS = {"class_token": "cls_token", "spatial_pos": "pos_embed_spatial",
                          "temporal_pos": "pos_embed_temporal", "class_pos": "pos_embed_class"}
_POSITION_NAMES = frozenset(_TORCHVISION_POSITIONS.values())


def pytorchvideo_factory_kwargs(config: MViTConfig) -> dict[str, object]:
  """Arguments of pytorchvideo's `create_multiscale_vision_transformers` that build the PyTorch
  network of `config`'s geometry (the network whose weights `pytorchvideo_renamer` maps)."""
  per_stage = lambda: [[s, 2.0] for s in config.stage_starts]  # noqa: E731  (x2 per stage)
  return dict(
      spatial_size=config.image_size, temporal_size=config.num_frames, depth=config.depth,
      patch_embed_dim=config.embed_dim, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
      conv_patch_embed_kernel=config.patch_kernel, conv_patch_embed_stride=config.patch_stride,
      conv_patch_embed_padding=config.patch_padding, embed_dim_mul=per_stage(),
      atten_head_mul=per_stage(),
      pool_q_stride_size=[[s, *config.q_pool_stride] for s in config.stage_starts],
      pool_kv_stride_adaptive=list(config.kv_pool_stride),
      pool_kvq_kernel=list(config.pool_kernel))


def pytorchvideo_renamer(prefix: str = VIDEO_ENCODER) -> mapping.Renamer:
  """Renames pytorchvideo MViT tensors to `{prefix}/...` parameter paths."""

  def rename(name: str, value: np.ndarray) -> mapping.Renamed | mapping.Dropped | None:
    if name.startswith("head."):
      return mapping.Dropped(KINETICS_HEAD_REASON)
    module, _, leaf = name.rpartition(".")
    if module == "cls_positional_encoding":
      if leaf not in _POSITION_NAMES:
        return None
      return [(f"{prefix}/{module}/{leaf}", value)]
    pair = mapping.torch_leaf(f"{prefix}/{mapping.torch_module_path(module)}", leaf, value)
    return None if pair is None else [pair]

  return rename


def torchvision_renamer(prefix: str = VIDEO_ENCODER) -> mapping.Renamer:
  """Renames torchvision `MViT` (`mvit_v1_b`) tensors to `{prefix}/...` parameter paths."""
  inner = pytorchvideo_renamer(prefix)

  def rename(name: str, value: np.ndarray) -> mapping.Renamed | mapping.Dropped | None:
    module, _, leaf = name.rpartition(".")
    if module == "pos_encoding" and leaf in _TORCHVISION_POSITIONS:
      # [C] or [N, C] -> [1, N, C]
      return inner(f"cls_positional_encoding.{_TORCHVISION_POSITIONS[leaf]}",
                   value.reshape(1, -1, value.shape[-1]))
    qkv = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv", module)
    if qkv:
      out = []
      for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
        out += inner(f"blocks.{qkv.group(1)}.attn.{part}.{leaf}", chunk) or []
      return out
    for pattern, replacement in _TORCHVISION_MODULES:
      if re.fullmatch(pattern, module):
        return inner(f"{re.sub(pattern, replacement, module)}.{leaf}", value)
    return None

  return rename


def cmr_transformer_renamer() -> mapping.Renamer:
  """Renames a cmr_transformer Lightning state dict (keys under `model.`)."""
  video = pytorchvideo_renamer(VIDEO_ENCODER)
  text = bert.bert_renamer(TEXT_ENCODER)

  def rename(name: str, value: np.ndarray) -> mapping.Renamed | mapping.Dropped | None:
    if not name.startswith(CMR_TRANSFORMER_PREFIX):
      return None
    name = name[len(CMR_TRANSFORMER_PREFIX):]
    group, _, rest = name.partition(".")
    if group == VIDEO_ENCODER:
      return video(rest, value)
    if group == TEXT_ENCODER:
      return text(rest, value)
    if group in (VIDEO_PROJ, TEXT_PROJ):
      if rest == "bias":
        return mapping.Dropped(PROJ_BIAS_REASON)
      pair = mapping.torch_leaf(group, rest, value)
      return None if pair is None or value.ndim != 2 else [pair]
    return None

  return rename


def input_size(state: dict[str, np.ndarray], config: MViTConfig,
               prefix: str = VIDEO_ENCODER) -> dict[str, int]:
  """(num_frames, image_size) that the converted position embeddings were made for.

  Args:
    state: converted parameters ({path: array}), with `{prefix}/cls_positional_encoding/...`.
    config: the geometry whose patch embedding (stride) the weights belong to.
    prefix: the encoder's top-level group.

  Returns:
    {"num_frames": T, "image_size": S} with T = temporal tokens x temporal stride and
    S = sqrt(spatial tokens) x spatial stride (e.g. 32 and 224 for `mvit_base_32x3`).

  Raises:
    ValueError: no position embeddings, or a non-square spatial grid.
  """
  base = f"{prefix}/cls_positional_encoding"
  try:
    frames = state[f"{base}/pos_embed_temporal"].shape[1]
    cells = state[f"{base}/pos_embed_spatial"].shape[1]
  except KeyError as e:
    raise ValueError(f"no position embeddings ({e}) to infer the input size from") from e
  side = math.isqrt(cells)
  if side * side != cells:
    raise ValueError(f"spatial position embedding of {cells} tokens is not a square grid")
  return {"num_frames": frames * config.patch_stride[0],
          "image_size": side * config.patch_stride[1]}
