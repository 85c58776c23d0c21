"""Gated-attention multi-instance head (Ilse et al. 2018) and the LVEF fine-tuning model.

A study is a bag of K cines. Each cine goes through the video encoder (768-d CLS feature) and a
trainable linear projection `video_proj` (768 -> 512, the same name and shape as the dual
encoder's, so its pre-trained weights carry over), then one of two heads (`head`):

  paper   the reference implementation's head (the default): the projected features are
          L2-normalised, then Linear 512 -> 256, ReLU, Dropout(0.25), Linear 256 -> 256, ReLU,
          Dropout(0.25) per instance (`instance_mlp`), gated attention pooling (L = 256,
          D = 128), Dropout(0.25) on the pooled vector and Linear 256 -> 1 (`regressor`) whose
          output times 100 is LVEF in percent; its bias starts at the training-label mean / 100
          (the reference's constant 0.57 is UK Biobank's mean, 57%). Linear layers start with
          PyTorch's default initialisation, as in the reference.
  simple  the projected features straight into the gated attention (D = 128) and a linear
          regressor in percent with its bias at the training-label mean (this project's first
          head; kept for comparison: README, "Encoders, heads and pre-training").

The gated attention pooling is

  a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )   over the valid instances only,
  z = sum_k a_k h_k.

Padded instances get weight 0 and their features are zeroed before pooling, so their content
(even non-finite values) cannot reach the output.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from cmr_jax.models import layers

Dtype = layers.Dtype

PROJECTION_DIM = 512  # the paper's shared embedding width (video_proj: 768 -> 512)
ATTENTION_DIM = 128  # Ilse et al.'s hidden width of the attention branches
REGRESSOR_INIT_STD = 0.01
HEADS = ("paper", "simple")
PAPER_HIDDEN_DIM = 256  # the reference head's instance width (L)
PAPER_DROPOUT = 0.25
PAPER_OUTPUT_SCALE = 100.0  # the reference regresses LVEF / 100 and multiplies by 100
# PyTorch's default Linear initialisation: uniform with bound 1 / sqrt(fan_in).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def video_projection(features: int, *, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
  """The linear map from encoder features to the shared embedding (`video_proj`, no bias)."""
  return layers.dense(features, ("embed", "mlp"), use_bias=False, name="video_proj",
                      dtype=dtype, param_dtype=param_dtype)


class GatedAttentionMIL(layers.Module):
  """Gated attention pooling over a masked bag of instances.

  Attributes:
    attention_dim: hidden width of the tanh and sigmoid branches.
  """

  attention_dim: int = ATTENTION_DIM

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pools `h: [B, K, D]` over the instances where `mask: bool [B, K]` is True.

    Returns:
      (pooled [B, D], weights [B, K]) with weights summing to 1 over the valid instances and 0 at
      padding. A bag without a valid instance gets all-zero weights and a zero pooled vector.
    """
    kw = self.dtypes
    mask = mask.astype(bool)
    h = jnp.where(mask[..., None], h, 0)
    branch = lambda name: layers.dense(self.attention_dim, ("embed", "mlp"), name=name, **kw)(h)
    gate_tanh = jnp.tanh(branch("attention_V"))
    gate_sigmoid = jax.nn.sigmoid(branch("attention_U"))
    logits = layers.dense(1, ("mlp", None), name="attention_w", **kw)(gate_tanh * gate_sigmoid)
    # Zero at masked instances, and all-zero (not NaN) for an empty bag.
    weights = jax.nn.softmax(logits[..., 0].astype(jnp.float32), axis=-1, where=mask)
    pooled = jnp.einsum("bk,bkd->bd", weights.astype(h.dtype), h)
    return pooled, weights


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Unit length along the last axis (computed in float32, returned in x's dtype)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, -1, keepdims=True), eps))).astype(
      x.dtype)


def _torch_dense(features: int, axes: tuple[str | None, str | None], *, name: str,
                 dtype: Dtype, param_dtype: Dtype, bias: float = 0.0) -> nn.Dense:
  """A Dense layer whose kernel starts like PyTorch's nn.Linear's (uniform in +-1/sqrt(fan_in)),
  with a constant bias `bias`."""
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=layers.partitioned(TORCH_LINEAR_INIT, axes),
                  bias_init=layers.partitioned(nn.initializers.constant(bias), axes[1:]))


class InstanceMLP(layers.Module):
  """The reference head's per-instance MLP: (Linear, ReLU, Dropout) x 2, [..., D] -> [..., L]."""

  hidden_dim: int = PAPER_HIDDEN_DIM
  dropout_rate: float = PAPER_DROPOUT

  @nn.compact
  def __call__(self, h: jax.Array, *, train: bool = False) -> jax.Array:
    kw = self.dtypes
    for name in ("fc1", "fc2"):
      h = nn.relu(_torch_dense(self.hidden_dim, ("embed", "mlp"), name=name, **kw)(h))
      h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
    return h


class LVEFRegressor(layers.Module):
  """Fine-tuning model: cine bags [B, K, T, H, W] -> LVEF [B] (percent) and instance weights.

  Attributes:
    video_encoder: the clip encoder (its parameters live under `video_encoder`).
    label_mean: initial regressor bias, the mean training LVEF in percent.
    proj_dim: width of `video_proj`.
    attention_dim: hidden width of the gated attention (D).
    head: "paper" (the reference's head) or "simple" (see the module docstring).
    hidden_dim: the paper head's instance width (L).
    dropout_rate: the paper head's dropout.
    train_encoder: if False (the paper's setting), the encoder runs in inference mode and its
      features are wrapped in `stop_gradient`, so no backward pass runs through it. Its weights
      must also be excluded from the optimizer (e.g. `optax.multi_transform` with
      `set_to_zero`), or AdamW's weight decay would still move them.
  """

  video_encoder: nn.Module  # uint8 clips [B, T, H, W] -> features [B, width] (MViT, R2Plus1D)
  label_mean: float
  proj_dim: int = PROJECTION_DIM
  attention_dim: int = ATTENTION_DIM
  train_encoder: bool = False
  head: str = "paper"
  hidden_dim: int = PAPER_HIDDEN_DIM
  dropout_rate: float = PAPER_DROPOUT

  def setup(self):
    if self.head not in HEADS:
      raise ValueError(f"unknown head {self.head!r}; expected one of {HEADS}")
    kw = self.dtypes
    self.video_proj = video_projection(self.proj_dim, **kw)
    self.mil = GatedAttentionMIL(self.attention_dim, **kw)
    if self.head == "paper":
      self.instance_mlp = InstanceMLP(self.hidden_dim, self.dropout_rate, **kw)
      self.pooled_dropout = nn.Dropout(self.dropout_rate)
      self.regressor = _torch_dense(1, ("embed", None), name="regressor", dtype=jnp.float32,
                                    param_dtype=self.param_dtype,
                                    bias=self.label_mean / PAPER_OUTPUT_SCALE)
    else:
      self.regressor = nn.Dense(
          1, dtype=jnp.float32, param_dtype=self.param_dtype,
          kernel_init=layers.partitioned(nn.initializers.normal(REGRESSOR_INIT_STD),
                                         ("embed", None)),
          bias_init=layers.partitioned(nn.initializers.constant(self.label_mean), (None,)))

  def __call__(self, video: jax.Array, mask: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Predicts LVEF for `video: uint8 [B, K, T, H, W]` with valid instances `mask: bool [B, K]`.

    Returns:
      (lvef [B] float32 in percent, weights [B, K] float32 attention per instance, 0 at padding).
    """
    if video.ndim != 5 or mask.shape != video.shape[:2]:
      raise ValueError(f"LVEF model expects video [B, K, T, H, W] and mask [B, K], got "
                       f"{tuple(video.shape)} and {tuple(mask.shape)}")
    bags, instances = video.shape[:2]
    features = self.video_encoder(video.reshape(bags * instances, *video.shape[2:]),
                                  train=train and self.train_encoder)
    if not self.train_encoder:
      features = jax.lax.stop_gradient(features)
    return self.predict_from_features(features.reshape(bags, instances, -1), mask, train=train)

  def predict_from_features(self, features: jax.Array, mask: jax.Array, *,
                            train: bool = False) -> tuple[jax.Array, jax.Array]:
    """The head alone, on encoder features `features: [B, K, D]` with `mask: bool [B, K]`.

    With a frozen encoder the features of every cine can be computed once and the head trained
    on them (`model.apply(..., method="predict_from_features")`); `model.init` with this method
    initialises only the head's parameters (`video_proj`, the head's layers, `regressor`).
    `train` turns the paper head's dropout on (it needs a "dropout" rng).
    """
    h = self.video_proj(features)
    if self.head == "simple":
      pooled, weights = self.mil(h, mask)
      return self.regressor(pooled.astype(jnp.float32))[:, 0], weights
    h = self.instance_mlp(l2_normalize(h), train=train)
    pooled, weights = self.mil(h, mask)
    pooled = self.pooled_dropout(pooled, deterministic=not train)
    return PAPER_OUTPUT_SCALE * self.regressor(pooled.astype(jnp.float32))[:, 0], weights
