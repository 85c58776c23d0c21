"""R(2+1)D video encoder (Tran et al. 2018), the family EchoNet-Dynamic measures LVEF with.

A small residual network of factorised convolutions: every 3D convolution is a spatial 1 x k x k
convolution followed by a temporal k x 1 x 1 one, with a normalisation and ReLU between them. It
is the CPU demo's encoder: a tiny vision transformer trained from scratch on a few hundred
studies learns little in CPU minutes, where this convolutional network, with its locality and
translation priors, learns both LVEF and the contrastive task (README, "Encoders, heads and
pre-training").

  stem      spatial conv 1 x 7 x 7 (stride 1, 2, 2) -> norm -> ReLU -> temporal conv 3 x 1 x 1
            -> norm -> ReLU                                              [B, T, H/2, W/2, widths[0]]
  stage s   `blocks[s]` residual blocks of two (2+1)D convolutions each; the first block of a
            stage strides by `strides[s]` and projects its shortcut (1 x 1 x 1 conv + norm)
  pool      mean over time and space -> LayerNorm                         [B, widths[-1]]

Normalisation is GroupNorm, not BatchNorm: the encoder keeps no running statistics, so it stays a
pure function of its parameters (frozen-feature caching, sharded and unsharded runs, and the
Predictor all see the same function) and works at any per-device batch size.

Input: uint8 grey videos [B, T, H, W], normalised like the MViT (`mvit.preprocess_video`), so the
two encoders are interchangeable everywhere a video encoder is used.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmr_jax.models import layers
from cmr_jax.models.mvit import check_video, preprocess_video

Dtype = layers.Dtype
Triple = tuple[int, int, int]

LAYER_NORM_EPS = 1e-6
# He (Kaiming) normal initialisation for convolutions followed by ReLU.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class R2Plus1DConfig:
  """Geometry of an R(2+1)D encoder.

  Attributes:
    num_frames: frames per clip (T).
    image_size: square clip side (H = W).
    widths: output channels of the stem (= stage 0) and of each stage.
    blocks: residual blocks per stage.
    strides: (t, h, w) stride of each stage's first block.
    stem_kernel: spatial kernel of the stem.
    kernel: (2+1)D kernel size k (spatial k x k, temporal k).
    groups: GroupNorm groups (min(groups, channels) per layer).
    motion_channel: add a second input channel, each frame minus the clip's temporal mean.
  """

  num_frames: int = 16
  image_size: int = 64
  widths: tuple[int, ...] = (16, 32, 64, 128)
  blocks: tuple[int, ...] = (1, 1, 1, 1)
  strides: tuple[Triple, ...] = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))
  stem_kernel: int = 7
  kernel: int = 3
  groups: int = 8
  motion_channel: bool = True

  def __post_init__(self):
    if not len(self.widths) == len(self.blocks) == len(self.strides):
      raise ValueError(f"widths {self.widths}, blocks {self.blocks} and strides {self.strides} "
                       "need one entry per stage")
    if min(self.blocks) < 1:
      raise ValueError(f"every stage needs at least one block, got {self.blocks}")

  @property
  def width(self) -> int:
    """Width of the encoder output."""
    return self.widths[-1]


class SpatialConv(layers.Module):
  """A bias-free 1 x k x k convolution, run as a 2D convolution over frames folded into the batch.

  XLA's CPU backend runs 2D convolutions through its fast (Eigen) path and general 3D ones through
  a much slower one; the factorised convolution lets every spatial part be a 2D one.
  """

  features: int
  kernel: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, T, H, W, C] to [B, T, H', W', features] (padding kernel // 2)."""
    b, t = x.shape[:2]
    pad = self.kernel // 2
    y = nn.Conv(self.features, (self.kernel, self.kernel), self.stride,
                padding=[(pad, pad), (pad, pad)], use_bias=False, name="conv",
                kernel_init=layers.partitioned(CONV_INIT, (None, None, None, "embed")),
                **self.dtypes)(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class TemporalConv(layers.Module):
  """A bias-free k x 1 x 1 convolution: a sum over k time-shifted matrix products.

  Kernel [k, in, out]; zero padding k // 2 in time, then every `stride`-th frame is kept.
  """

  features: int
  kernel: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, T, H, W, C] to [B, T', H, W, features]."""
    w = self.param("kernel", layers.partitioned(CONV_INIT, (None, None, "embed")),
                   (self.kernel, x.shape[-1], self.features), self.param_dtype).astype(self.dtype)
    t, pad = x.shape[1], self.kernel // 2
    x = jnp.pad(x.astype(self.dtype), [(0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)])
    out = sum(jnp.einsum("bthwc,cd->bthwd", x[:, i:i + t], w[i]) for i in range(self.kernel))
    return out[:, ::self.stride]


def _norm(channels: int, groups: int, *, name: str, dtype: Dtype,
          param_dtype: Dtype, zero_init: bool = False) -> nn.GroupNorm:
  """GroupNorm over channels; `zero_init` starts its scale at 0 (a residual branch's last norm,
  so that each block starts as the identity)."""
  scale_init = nn.initializers.zeros_init() if zero_init else nn.initializers.ones_init()
  return nn.GroupNorm(num_groups=min(groups, channels), epsilon=1e-5, dtype=dtype,
                      param_dtype=param_dtype, name=name,
                      scale_init=layers.partitioned(scale_init, ("norm",)),
                      bias_init=layers.partitioned(nn.initializers.zeros_init(), ("norm",)))


def _conv2plus1d(x: jax.Array, features: int, spatial_kernel: int, temporal_kernel: int,
                 stride: Triple, groups: int, *, dtype: Dtype, param_dtype: Dtype,
                 prefix: str = "") -> jax.Array:
  """Spatial 1 x k x k conv -> norm -> ReLU -> temporal k x 1 x 1 conv (the stride is split).

  Maps [B, T, H, W, C] to [B, T', H', W', features] through the submodules `{prefix}spatial`,
  `{prefix}spatial_norm` and `{prefix}temporal` of the calling module.
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  st, sh, sw = stride
  if sh != sw:
    raise ValueError(f"spatial strides must be equal, got {stride}")
  x = SpatialConv(features, spatial_kernel, sh, name=f"{prefix}spatial", **kw)(x)
  x = nn.relu(_norm(features, groups, name=f"{prefix}spatial_norm", **kw)(x))
  return TemporalConv(features, temporal_kernel, st, name=f"{prefix}temporal", **kw)(x)


class _ConvUnit(layers.Module):
  """The geometry shared by a (2+1)D convolution and a residual block of two.

  Attributes:
    features: output channels.
    kernel: (2+1)D kernel size k (spatial k x k, temporal k).
    stride: (t, h, w) stride, equal in h and w.
    groups: GroupNorm groups (min(groups, features)).
  """

  features: int
  kernel: int
  stride: Triple
  groups: int


class Conv2Plus1D(_ConvUnit):
  """Spatial 1 x k x k conv -> norm -> ReLU -> temporal k x 1 x 1 conv (the stride is split)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, T, H, W, C] to [B, T', H', W', features]."""
    return _conv2plus1d(x, self.features, self.kernel, self.kernel, self.stride, self.groups,
                        **self.dtypes)


class ResidualBlock(_ConvUnit):
  """x -> relu(x' + norm(conv(relu(norm(conv(x)))))), x' the (projected) shortcut."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, T, H, W, C] to [B, T', H', W', features]."""
    kw = self.dtypes
    y = Conv2Plus1D(self.features, self.kernel, self.stride, self.groups, name="conv1", **kw)(x)
    y = nn.relu(_norm(self.features, self.groups, name="norm1", **kw)(y))
    y = Conv2Plus1D(self.features, self.kernel, (1, 1, 1), self.groups, name="conv2", **kw)(y)
    y = _norm(self.features, self.groups, name="norm2", zero_init=True, **kw)(y)
    if self.stride != (1, 1, 1) or x.shape[-1] != self.features:
      st, sh, sw = self.stride
      x = layers.dense(self.features, (None, "embed"), use_bias=False, name="shortcut",
                       **kw)(x[:, ::st, ::sh, ::sw])
      x = _norm(self.features, self.groups, name="shortcut_norm", **kw)(x)
    return nn.relu(x + y)


class R2Plus1D(layers.Encoder):
  """R(2+1)D video encoder: uint8 grey clips [B, T, H, W] -> pooled features [B, width].

  Built like every `layers.Encoder`: `remat` rematerialises each residual block; the encoder has
  no attention, so `attention_impl` is unused.

  Attributes:
    config: the geometry (named configs in `cmr_jax.models.registry`).
  """

  config: R2Plus1DConfig

  @nn.compact
  def __call__(self, video: jax.Array, *, train: bool = False) -> jax.Array:
    """Encodes `video: uint8 [B, T, H, W]` into LayerNorm-ed pooled features [B, width]."""
    del train  # no dropout or batch statistics: train and eval are the same function
    c = self.config
    check_video(video, c, "R2Plus1D")
    kw = self.dtypes
    x = preprocess_video(video, self.dtype)[..., :1]  # grey: [B, T, H, W, 1]
    if c.motion_channel:
      # Each frame's difference from the clip's temporal mean: the beating heart stands out of
      # the static anatomy from the first step.
      x = jnp.concatenate([x, x - jnp.mean(x, axis=1, keepdims=True)], axis=-1)
    x = _conv2plus1d(x, c.widths[0], c.stem_kernel, c.kernel, (1, 2, 2), c.groups, prefix="stem_",
                     **kw)
    x = nn.relu(_norm(c.widths[0], c.groups, name="stem_temporal_norm", **kw)(x))
    block_cls = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    for s, (width, blocks, stride) in enumerate(zip(c.widths, c.blocks, c.strides)):
      for b in range(blocks):
        x = block_cls(width, c.kernel, stride if b == 0 else (1, 1, 1), c.groups,
                      name=f"stage{s}_block{b}", **kw)(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
    return layers.layer_norm(LAYER_NORM_EPS, name="norm", **kw)(x)
