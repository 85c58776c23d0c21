"""Gated-attention multi-instance head (Ilse et al. 2018) and the LVEF fine-tuning model.

A study is a bag of K cines. Each cine goes through the video encoder (768-d CLS feature), a
trainable linear projection `video_proj` (768 -> 512, the same name and shape as the dual
encoder's, so its pre-trained weights carry over) and the gated attention pooling

  a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )   over the valid instances only,
  z = sum_k a_k h_k,

then a linear regressor gives LVEF in percent, its bias initialised at the training-label mean.
Padded instances get weight 0 and their features are zeroed before pooling, so their content
(even non-finite values) cannot reach the output.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from cmr_jax.models import layers
from cmr_jax.models.mvit import MViT

Dtype = layers.Dtype

PROJECTION_DIM = 512  # the paper's shared embedding width (video_proj: 768 -> 512)
ATTENTION_DIM = 128  # Ilse et al.'s hidden width of the attention branches
REGRESSOR_INIT_STD = 0.01


def video_projection(features: int, *, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
  """The linear map from encoder features to the shared embedding (`video_proj`, no bias)."""
  return layers.dense(features, ("embed", "mlp"), use_bias=False, name="video_proj",
                      dtype=dtype, param_dtype=param_dtype)


class GatedAttentionMIL(nn.Module):
  """Gated attention pooling over a masked bag of instances.

  Attributes:
    attention_dim: hidden width of the tanh and sigmoid branches.
  """

  attention_dim: int = ATTENTION_DIM
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pools `h: [B, K, D]` over the instances where `mask: bool [B, K]` is True.

    Returns:
      (pooled [B, D], weights [B, K]) with weights summing to 1 over the valid instances and 0 at
      padding. A bag without a valid instance gets all-zero weights and a zero pooled vector.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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


class LVEFRegressor(nn.Module):
  """Fine-tuning model: cine bags [B, K, T, H, W] -> LVEF [B] (percent) and instance weights.

  Attributes:
    video_encoder: the clip encoder (its parameters live under `video_encoder`).
    label_mean: initial regressor bias, the mean training LVEF in percent.
    proj_dim: width of `video_proj`.
    attention_dim: hidden width of the gated attention.
    train_encoder: if False (the paper's setting), the encoder runs in inference mode and its
      features are wrapped in `stop_gradient`, so no backward pass runs through it. Its weights
      must also be excluded from the optimizer (e.g. `optax.multi_transform` with
      `set_to_zero`), or AdamW's weight decay would still move them.
  """

  video_encoder: MViT
  label_mean: float
  proj_dim: int = PROJECTION_DIM
  attention_dim: int = ATTENTION_DIM
  train_encoder: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.video_proj = video_projection(self.proj_dim, **kw)
    self.mil = GatedAttentionMIL(self.attention_dim, **kw)
    self.regressor = nn.Dense(
        1, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=layers.partitioned(nn.initializers.normal(REGRESSOR_INIT_STD), ("embed", None)),
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
    return self.predict_from_features(features.reshape(bags, instances, -1), mask)

  def predict_from_features(self, features: jax.Array,
                            mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The head alone, on encoder features `features: [B, K, D]` with `mask: bool [B, K]`.

    With a frozen encoder the features of every cine can be computed once and the head trained
    on them (`model.apply(..., method="predict_from_features")`); `model.init` with this method
    initialises only the head's parameters (`video_proj`, `mil`, `regressor`).
    """
    pooled, weights = self.mil(self.video_proj(features), mask)
    return self.regressor(pooled.astype(jnp.float32))[:, 0], weights
