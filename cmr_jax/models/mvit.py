"""Multiscale Vision Transformer (MViT v1) video encoder with pytorchvideo's MViT-B 16x4 geometry.

Architecture (Fan et al. 2021, as built by pytorchvideo's `create_multiscale_vision_transformers`):
a Conv3d patch embedding, a CLS token with separable space-time position embeddings, `depth`
MultiScaleBlocks and a final LayerNorm; the encoder returns the normalised CLS token. Each block
is pre-norm attention + MLP; in its attention, queries, keys and values are pooled by a depthwise
Conv3d (one kernel shared by all heads, no bias; kernel `pool_kernel`, padding kernel // 2)
followed by a LayerNorm over the head dimension (the CLS token is not pooled but is normalised).
Keys and values are pooled in every block with an adaptive stride: `kv_pool_stride` at block 0,
divided by the query stride at each stage start. At a stage start (`stage_starts`) the queries are
pooled with `q_pool_stride`, the residual is max-pooled (kernel s + 1 where s > 1, padding
kernel // 2) and the heads double. The block that ends a stage doubles the width: its MLP
outputs `dim_out` and its residual becomes `proj(norm2(x))` (MViT v1, no residual pooling in
attention). LayerNorm eps is 1e-6 and GELU is exact (erf), as in PyTorch.

Parameter names and layouts map one to one onto a pytorchvideo `mvit_base_16x4` state dict:
`.` becomes `/`, `blocks.{i}` becomes `blocks_{i}`, a LayerNorm `weight` becomes `scale`, a Linear
or Conv `weight` becomes `kernel` (Linear [out, in] -> [in, out]; Conv3d [out, in, t, h, w] ->
[t, h, w, in, out]), everything else keeps its name and shape:

  patch_embed.patch_model.{weight, bias}               -> patch_embed/patch_model/{kernel, bias}
  cls_positional_encoding.{cls_token, pos_embed_spatial, pos_embed_temporal, pos_embed_class}
                                                       -> cls_positional_encoding/... ([1, N, C])
  blocks.{i}.norm1, .norm2                             -> blocks_{i}/norm1, norm2
  blocks.{i}.attn.{q, k, v, proj}                      -> blocks_{i}/attn/{q, k, v, proj}
  blocks.{i}.attn.pool_{q,k,v}.weight [hd, 1, 3, 3, 3] -> blocks_{i}/attn/pool_{q,k,v}/kernel
                                                          [3, 3, 3, 1, hd]
  blocks.{i}.attn.norm_{q,k,v}                         -> blocks_{i}/attn/norm_{q,k,v}
  blocks.{i}.mlp.fc1, .mlp.fc2, .proj                  -> blocks_{i}/mlp/fc1, mlp/fc2, proj
  norm_embed                                           -> norm_embed
  head.proj (the 400-class Kinetics head)              -> not part of the encoder

With `MViTConfig.scan_blocks`, a run of identical blocks i..j is one group `blocks_{i}_{j}` whose
leaves stack the blocks' along a leading axis (`cmr_jax.models.stacking` converts both ways).

Checked once against pytorchvideo 0.1.5 with the same random weights copied this way (375 tensors,
36,303,072 parameters; `pool_norm_eps=1e-5` to match that release): CLS features agree to 6e-6 at
16x224x224 in float32.

Input: uint8 grey videos [B, T, H, W]; the encoder normalises them as its weights were trained
(`MViTConfig.input_norm`, one of `INPUT_NORMS`) and copies grey to 3 channels-last: "kinetics"
(the default, for Kinetics-400 weights and our own training) scales to [0, 1] and applies the
Kinetics mean and std; "cmr_transformer" (the paper's released encoder) applies them to 0-255
values and divides by 255 afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmr_jax.models import layers
from cmr_jax.models import pooling
from cmr_jax.models import stacking

Dtype = layers.Dtype
Triple = tuple[int, int, int]

KINETICS_MEAN = 0.45
KINETICS_STD = 0.225
UINT8_MAX = 255.0
RGB_CHANNELS = 3
LAYER_NORM_EPS = 1e-6
KINETICS_NORM = "kinetics"
CMR_TRANSFORMER_NORM = "cmr_transformer"
SCAN_AXIS = "layers"  # logical name of the stacked axis of a scanned run's parameters
# PyTorch's default Conv3d initialisation: uniform with bound 1 / sqrt(fan_in).
TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# The pooling windows (`pooling`), as this module's users know them.
POOL_LOOPS = pooling.POOL_LOOPS
looped_taps = pooling.looped_taps
max_pool3d = pooling.max_pool3d
depthwise_conv3d = pooling.depthwise_conv3d


def _skip_kernel(stride: Triple) -> Triple:
  """Kernel of the residual max pool at a query-pooling block: s + 1 where s > 1, else s."""
  return tuple(s + 1 if s > 1 else s for s in stride)


@dataclasses.dataclass(frozen=True)
class InputNorm:
  """An input normalisation: uint8 x -> ((x / pre_divide) - mean) / std / post_divide."""

  mean: float
  std: float
  pre_divide: float = 1.0
  post_divide: float = 1.0

  @property
  def affine(self) -> tuple[float, float]:
    """(scale, offset): the same map as x * scale + offset."""
    return (1.0 / (self.pre_divide * self.std * self.post_divide),
            -self.mean / (self.std * self.post_divide))


# The input normalisations encoder weights were trained with (`MViTConfig.input_norm`):
#   kinetics         Kinetics-400 weights (pytorchvideo, SlowFast, torchvision's port of them) and
#                    our own runs: x / 255, then the Kinetics mean and std.
#   cmr_transformer  the paper's released encoder: its data module applies pytorchvideo's
#                    `Normalize((0.45,) * 3, (0.225,) * 3)` to 0-255 values
#                    (`create_video_transform(convert_to_float=False)`) and `Div255` after it,
#                    x / 57.375 - 0.0078 (the Kinetics scheme's values minus about 2).
INPUT_NORMS: dict[str, InputNorm] = {
    KINETICS_NORM: InputNorm(KINETICS_MEAN, KINETICS_STD, pre_divide=UINT8_MAX),
    CMR_TRANSFORMER_NORM: InputNorm(KINETICS_MEAN, KINETICS_STD, post_divide=UINT8_MAX),
}


def input_norm(name: str) -> InputNorm:
  """The input normalisation of a name in `INPUT_NORMS`; ValueError for another."""
  if name not in INPUT_NORMS:
    raise ValueError(f"unknown input normalisation {name!r}; expected one of {sorted(INPUT_NORMS)}")
  return INPUT_NORMS[name]


@dataclasses.dataclass(frozen=True)
class BlockGeometry:
  """Static shape plan of one MultiScaleBlock."""

  dim: int  # input width
  dim_out: int  # output width (differs at the last block of a stage)
  num_heads: int
  q_stride: Triple | None  # query (and residual) pooling stride; None where queries are not pooled
  kv_stride: Triple
  thw_in: Triple  # token grid entering the block
  thw_out: Triple  # token grid leaving the block


@dataclasses.dataclass(frozen=True)
class MViTConfig:
  """Geometry of an MViT; the defaults are pytorchvideo's MViT-B 16x4 at 16x224x224."""

  num_frames: int = 16
  image_size: int = 224
  embed_dim: int = 96
  depth: int = 16
  num_heads: int = 1
  mlp_ratio: float = 4.0
  # Blocks at which the heads double and queries pool; the block before each doubles the width.
  stage_starts: tuple[int, ...] = (1, 3, 14)
  patch_kernel: Triple = (3, 7, 7)
  patch_stride: Triple = (2, 4, 4)
  patch_padding: Triple = (1, 3, 3)
  q_pool_stride: Triple = (1, 2, 2)
  kv_pool_stride: Triple = (1, 8, 8)  # at block 0; divided by q_pool_stride at each stage start
  pool_kernel: Triple = (3, 3, 3)
  # LayerNorm eps after pooling: 1e-6 as in SlowFast (where the Kinetics weights were trained),
  # torchvision and current pytorchvideo; the pytorchvideo 0.1.5 release uses PyTorch's 1e-5.
  pool_norm_eps: float = LAYER_NORM_EPS
  dropout_rate: float = 0.0
  droppath_rate: float = 0.0  # stochastic depth, rising linearly from 0 at block 0
  # How uint8 input is normalised (`INPUT_NORMS`): as the weights were trained. Fine-tuning from
  # imported weights sets it from what their conversion recorded (`runs.with_init_input_norm`).
  input_norm: str = KINETICS_NORM
  # Runs of consecutive blocks with one geometry (`block_runs`) are applied with `nn.scan`: one
  # compiled body per run instead of one per block. Their parameters are stacked along a leading
  # axis under `blocks_{first}_{last}` (`cmr_jax.models.stacking` converts to and from the
  # per-block layout that pytorchvideo's names map onto); the arithmetic is unchanged.
  scan_blocks: bool = False
  # How pooling windows visit their taps (`POOL_LOOPS`): the same arithmetic; "auto" loops on the
  # CPU (faster compile) and unrolls on accelerators.
  pool_loop: str = "auto"

  def __post_init__(self):
    input_norm(self.input_norm)
    pooling.check_pool_loop(self.pool_loop)
    if not all(0 < s < self.depth for s in self.stage_starts):
      raise ValueError(f"stage_starts {self.stage_starts} must lie in [1, depth={self.depth})")

  @property
  def width(self) -> int:
    """Width of the encoder output (the last block's output)."""
    return self.blocks()[-1].dim_out

  @property
  def patch_grid(self) -> Triple:
    """Token grid [T, H, W] after the patch embedding."""
    size = (self.num_frames, self.image_size, self.image_size)
    return pooling.pooled_size(size, self.patch_kernel, self.patch_stride, self.patch_padding)

  def blocks(self) -> tuple[BlockGeometry, ...]:
    """The shape plan of every block, following pytorchvideo's builder."""

    def stage(i: int) -> int:
      return sum(s <= i for s in self.stage_starts)

    plan = []
    thw = self.patch_grid
    kv_stride = self.kv_pool_stride
    for i in range(self.depth):
      dim = self.embed_dim * 2**stage(i)
      heads = self.num_heads * 2**stage(i)
      if dim % heads:
        raise ValueError(f"block {i}: width {dim} is not divisible by {heads} heads")
      q_stride = self.q_pool_stride if i in self.stage_starts else None
      thw_out = thw
      if q_stride is not None:
        kv_stride = tuple(max(kv // q, 1) for kv, q in zip(kv_stride, q_stride))
        thw_out = pooling.pooled_size(thw, self.pool_kernel, q_stride, pooling.half(self.pool_kernel))
      dim_out = self.embed_dim * 2**stage(min(i + 1, self.depth - 1))
      plan.append(BlockGeometry(dim=dim, dim_out=dim_out, num_heads=heads, q_stride=q_stride,
                                kv_stride=kv_stride, thw_in=thw, thw_out=thw_out))
      thw = thw_out
    return tuple(plan)

  def block_runs(self) -> tuple[tuple[int, int], ...]:
    """(first, last) block indices of the runs applied as one: with `scan_blocks`, maximal runs
    of consecutive blocks of equal geometry; without, every block on its own."""
    runs: list[tuple[int, int]] = []
    plan = self.blocks()
    for i, geometry in enumerate(plan):
      if self.scan_blocks and runs and plan[runs[-1][0]] == geometry:
        runs[-1] = (runs[-1][0], i)
      else:
        runs.append((i, i))
    return tuple(runs)


def _pool_tokens(x: jax.Array, thw: Triple, pool_fn) -> tuple[jax.Array, Triple]:
  """Pools the grid tokens of `x: [B, 1 + T*H*W, C]` (CLS token first, left as is).

  Args:
    x: token stream with the CLS token at index 0.
    thw: the token grid [T, H, W].
    pool_fn: maps [B, T, H, W, C] to [B, T', H', W', C].

  Returns:
    ([B, 1 + T'*H'*W', C], (T', H', W')).
  """
  cls_token, grid = x[:, :1], x[:, 1:]
  grid = pool_fn(grid.reshape(grid.shape[0], *thw, grid.shape[-1]))
  new_thw = grid.shape[1:4]
  grid = grid.reshape(grid.shape[0], math.prod(new_thw), grid.shape[-1])
  return jnp.concatenate([cls_token, grid], axis=1), new_thw


class HeadSharedDepthwiseConv(layers.Module):
  """Depthwise Conv3d over every head's channels with one kernel shared by the heads, no bias.

  The parameter `kernel: [kt, kh, kw, 1, head_dim]` is pytorchvideo's `Conv3d(head_dim, head_dim,
  groups=head_dim)` weight; tiling it over the heads lets one depthwise convolution pool a
  [B, T, H, W, heads * head_dim] grid without moving heads into the batch.
  """

  num_heads: int
  head_dim: int
  kernel_size: Triple
  stride: Triple
  looped: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Pools `x: [B, T, H, W, heads * head_dim]` to [B, T', H', W', heads * head_dim]."""
    init = layers.partitioned(TORCH_CONV_INIT, (None, None, None, None, "kv"))
    kernel = self.param("kernel", init, (*self.kernel_size, 1, self.head_dim), self.param_dtype)
    kernel = jnp.tile(kernel[..., 0, :], (1, 1, 1, self.num_heads)).astype(self.dtype)
    return depthwise_conv3d(x.astype(self.dtype), kernel, self.stride, self.looped)


class _BlockModule(layers.Module):
  """A module of one MultiScaleBlock: the network's geometry and the block's shape plan."""

  config: MViTConfig
  geometry: BlockGeometry
  attention_impl: str = "einsum"


class MultiScaleAttention(_BlockModule):
  """Pooling attention: q, k, v projections, each pooled and normalised, then attention."""

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """Maps `x: [B, 1 + N_in, dim]` to [B, 1 + N_out, dim] (N_out = prod(thw_out))."""
    c, g = self.config, self.geometry
    head_dim = g.dim // g.num_heads
    kw = self.dtypes

    def pooled(name: str, stride: Triple | None) -> jax.Array:
      """Projection `name`, pooled and normalised per head: [B, 1 + N', heads, head_dim]."""
      y = layers.dense(g.dim, ("embed", "heads"), name=name, **kw)(x)
      if stride is not None:
        conv = HeadSharedDepthwiseConv(g.num_heads, head_dim, c.pool_kernel, stride,
                                       looped_taps(c.pool_loop), name=f"pool_{name}", **kw)
        y, _ = _pool_tokens(y, g.thw_in, conv)
      y = y.reshape(*y.shape[:2], g.num_heads, head_dim)
      if stride is not None:
        y = layers.layer_norm(c.pool_norm_eps, name=f"norm_{name}", **kw)(y)
      return y

    q = pooled("q", g.q_stride)
    k = pooled("k", g.kv_stride)
    v = pooled("v", g.kv_stride)
    out = layers.attend(q, k, v, impl=self.attention_impl)
    out = out.reshape(*out.shape[:2], g.dim)
    out = layers.dense(g.dim, ("heads", "embed"), name="proj", **kw)(out)
    return nn.Dropout(c.dropout_rate)(out, deterministic=deterministic)


class Mlp(layers.Module):
  """fc1 -> exact GELU -> dropout -> fc2 -> dropout."""

  hidden: int
  out: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """Maps [..., C] to [..., out]."""
    kw = self.dtypes
    x = layers.dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
    x = nn.Dropout(self.dropout_rate)(nn.gelu(x, approximate=False), deterministic=deterministic)
    x = layers.dense(self.out, ("mlp", "embed"), name="fc2", **kw)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class MultiScaleBlock(_BlockModule):
  """One MViT v1 block: x + attn(norm1(x)) with a pooled residual, then the MLP branch."""

  droppath_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               droppath_rate: jax.Array | None = None) -> jax.Array:
    """Maps `x: [B, 1 + N_in, dim]` to [B, 1 + N_out, dim_out].

    `droppath_rate`, a traced scalar, replaces the field of that name (in a scanned run, where
    each block has its own rate).
    """
    c, g = self.config, self.geometry
    kw = self.dtypes
    # Drop path: dropout of a whole sample's branch (mask broadcast over tokens and channels).
    if droppath_rate is None:
      drop_path = nn.Dropout(self.droppath_rate, broadcast_dims=(1, 2))
    else:
      drop_path = functools.partial(_drop_path, self, droppath_rate)
    x = layers.constrain_tokens(x)
    attn = MultiScaleAttention(c, g, self.attention_impl, name="attn", **kw)(
                                   layers.layer_norm(LAYER_NORM_EPS, name="norm1", **kw)(x),
                                   deterministic)
    if g.q_stride is not None:
      skip = functools.partial(max_pool3d, window=_skip_kernel(g.q_stride), stride=g.q_stride,
                               looped=looped_taps(c.pool_loop))
      x, _ = _pool_tokens(x, g.thw_in, skip)
    x = x + drop_path(attn, deterministic=deterministic)
    x_norm = layers.layer_norm(LAYER_NORM_EPS, name="norm2", **kw)(x)
    mlp = Mlp(int(g.dim * c.mlp_ratio), g.dim_out, c.dropout_rate, name="mlp", **kw)(
        x_norm, deterministic)
    if g.dim != g.dim_out:
      x = layers.dense(g.dim_out, ("embed", "mlp"), name="proj", **kw)(x_norm)
    return x + drop_path(mlp, deterministic=deterministic)


def _drop_path(module: nn.Module, rate: jax.Array, x: jax.Array, *,
               deterministic: bool) -> jax.Array:
  """`nn.Dropout(rate, broadcast_dims=(1, 2))` for a traced `rate`: each sample's `x: [B, N, C]`
  is zeroed with probability `rate`, else scaled by 1 / (1 - rate)."""
  if deterministic:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0], 1, 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def _scanned_run(block: MultiScaleBlock, x: jax.Array, rates: np.ndarray,
                 deterministic: bool) -> jax.Array:
  """Applies `len(rates)` blocks of one geometry with `nn.scan`, their parameters stacked.

  `rates` are the blocks' drop-path rates; all zero, the blocks run exactly as unscanned ones.
  """
  traced = bool(np.any(rates))

  def body(module: MultiScaleBlock, carry: jax.Array, rate: jax.Array):
    return module(carry, deterministic, rate if traced else None), None

  scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=0, length=len(rates),
                 metadata_params={nn.PARTITION_NAME: SCAN_AXIS})
  x, _ = scan(block, x, jnp.asarray(rates, jnp.float32))
  return x


class SpatioTemporalClsPositionalEncoding(nn.Module):
  """Prepends the CLS token and adds spatial + temporal (+ class) position embeddings."""

  embed_dim: int
  grid: Triple
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps patch tokens `x: [B, T*H*W, C]` (t-major) to [B, 1 + T*H*W, C]."""
    t, h, w = self.grid
    init = nn.initializers.truncated_normal(layers.TRANSFORMER_INIT_STD)

    def embedding(name: str, length: int) -> jax.Array:
      axes = (None, "positions", "embed")
      return self.param(name, layers.partitioned(init, axes), (1, length, self.embed_dim),
                        self.param_dtype)

    cls_token = embedding("cls_token", 1)
    spatial = embedding("pos_embed_spatial", h * w)
    temporal = embedding("pos_embed_temporal", t)
    cls_pos = embedding("pos_embed_class", 1)
    # Token (t, s) gets spatial[s] + temporal[t]: spatial tiled over time, temporal repeated
    # over space.
    grid_pos = jnp.tile(spatial, (1, t, 1)) + jnp.repeat(temporal, h * w, axis=1)
    pos = jnp.concatenate([cls_pos, grid_pos], axis=1).astype(x.dtype)
    cls_tokens = jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
    return jnp.concatenate([cls_tokens, x], axis=1) + pos


class PatchEmbed(layers.Module):
  """Conv3d patchify then flatten to tokens (pytorchvideo's `PatchEmbed.patch_model`)."""

  config: MViTConfig

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    """Maps `video: [B, T, H, W, 3]` to tokens [B, T'*H'*W', embed_dim] (t-major)."""
    c = self.config
    x = nn.Conv(c.embed_dim, c.patch_kernel, c.patch_stride,
                padding=[(p, p) for p in c.patch_padding], name="patch_model",
                kernel_init=layers.partitioned(TORCH_CONV_INIT, (None, None, None, None, "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
                **self.dtypes)(video)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def preprocess_video(video: jax.Array, dtype: Dtype = jnp.float32,
                     norm: str = KINETICS_NORM) -> jax.Array:
  """Maps uint8 grey `video: [..., T, H, W]` to [..., T, H, W, 3] in `dtype`, normalised with
  `INPUT_NORMS[norm]` (computed in float32, in the order the PyTorch transforms compute it)."""
  n = input_norm(norm)
  x = video.astype(jnp.float32)
  if n.pre_divide != 1.0:
    x = x / n.pre_divide
  x = (x - n.mean) / n.std
  if n.post_divide != 1.0:
    x = x / n.post_divide
  return jnp.broadcast_to(x[..., None], (*x.shape, RGB_CHANNELS)).astype(dtype)


def check_video(video: jax.Array, config: Any, encoder: str) -> None:
  """Raises ValueError unless `video` is [B, T, H, W] with the (T, H, W) of `config`.

  Args:
    video: the encoder's input.
    config: a video geometry (`num_frames` T and `image_size` H = W).
    encoder: the encoder's name, for the message.
  """
  expected = (config.num_frames, config.image_size, config.image_size)
  if video.ndim != 4 or tuple(video.shape[1:]) != expected:
    raise ValueError(f"{encoder} expects video [B, T, H, W] with (T, H, W) = {expected}, "
                     f"got shape {tuple(video.shape)}")


class MViT(layers.Encoder):
  """MViT video encoder: uint8 grey clips [B, T, H, W] -> CLS features [B, width].

  Built like every `layers.Encoder` (`dtype` bfloat16 for accelerators; `remat` rematerialises
  each block).

  Attributes:
    config: the geometry (see `MViTConfig`; named configs in `cmr_jax.models.registry`).
  """

  config: MViTConfig

  @nn.compact
  def __call__(self, video: jax.Array, *, train: bool = False) -> jax.Array:
    """Encodes `video: uint8 [B, T, H, W]` into the final-norm CLS token [B, width]."""
    c = self.config
    check_video(video, c, "MViT")
    deterministic = not train
    kw = self.dtypes
    x = PatchEmbed(c, name="patch_embed", **kw)(preprocess_video(video, self.dtype, c.input_norm))
    x = SpatioTemporalClsPositionalEncoding(c.embed_dim, c.patch_grid, self.param_dtype,
                                            name="cls_positional_encoding")(x)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    block_cls = nn.remat(MultiScaleBlock, static_argnums=(2,)) if self.remat else MultiScaleBlock
    droppath = np.linspace(0.0, c.droppath_rate, c.depth)
    plan = c.blocks()
    for first, last in c.block_runs():
      if first == last:
        x = block_cls(c, plan[first], self.attention_impl, droppath_rate=float(droppath[first]),
                      name=f"blocks_{first}", **kw)(x, deterministic)
      else:
        block = block_cls(c, plan[first], self.attention_impl,
                          name=stacking.run_name(first, last), **kw)
        x = _scanned_run(block, x, droppath[first:last + 1], deterministic)
    x = layers.layer_norm(LAYER_NORM_EPS, name="norm_embed", **kw)(x)
    return x[:, 0]
