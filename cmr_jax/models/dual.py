"""Dual encoder for contrastive pre-training: video-text (CLIP-style) or video-video.

Both towers end in a bias-free linear projection to a shared `embed_dim` (512) followed by L2
normalisation. The learnable temperature is stored as a log logit scale (`logit_scale`,
initialised at ln(1 / 0.07) as in CLIP); the pre-training step clips it to [0, ln 100] after each
update (`cmr_jax.losses.clip_logit_scale`).
In the video-video variant (no text encoder) two clips of one study pass through the same video
tower. Parameter groups: `video_encoder`, `video_proj`, `text_encoder`, `text_proj`,
`logit_scale`; `video_encoder` and `video_proj` are what `LVEFRegressor` reuses.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmr_jax.models.heads import PROJECTION_DIM, l2_normalize, video_projection
from cmr_jax.models import layers

CLIP_INIT_TEMPERATURE = 0.07


class DualEncoder(layers.Module):
  """Video and text (or second video) towers projected into one normalised embedding space.

  Attributes:
    video_encoder: the clip encoder.
    text_encoder: the report encoder; None for the video-video variant.
    embed_dim: width of the shared embedding.
    init_temperature: initial softmax temperature (CLIP: 0.07). Small models trained from
      scratch whose embeddings start out correlated can collapse to a constant at 0.07: their
      random logit spread costs more than the weak early signal gains; a higher start (e.g. 1)
      lets the temperature fall as the towers align.
  """

  video_encoder: nn.Module  # uint8 clips [B, T, H, W] -> features [B, width] (MViT, R2Plus1D)
  text_encoder: nn.Module | None = None  # ids, mask [B, L] -> [B, width] (BERT, bag of words)
  embed_dim: int = PROJECTION_DIM
  init_temperature: float = CLIP_INIT_TEMPERATURE

  def setup(self):
    kw = self.dtypes
    self.video_proj = video_projection(self.embed_dim, **kw)
    if self.text_encoder is not None:
      self.text_proj = layers.dense(self.embed_dim, ("embed", "mlp"), use_bias=False,
                                    name="text_proj", **kw)
    self.logit_scale = self.param(
        "logit_scale",
        layers.partitioned(nn.initializers.constant(math.log(1 / self.init_temperature)), ()),
        (), jnp.float32)

  def encode_video(self, video: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps `video: uint8 [B, T, H, W]` to unit-norm embeddings [B, embed_dim] (float32)."""
    features = self.video_encoder(video, train=train)
    return l2_normalize(self.video_proj(features).astype(jnp.float32))

  def encode_text(self, ids: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps `ids, mask: [B, L]` to unit-norm embeddings [B, embed_dim] (float32)."""
    if self.text_encoder is None:
      raise ValueError("this dual encoder has no text tower (video-video variant)")
    features = self.text_encoder(ids, mask, train=train)
    return l2_normalize(self.text_proj(features).astype(jnp.float32))

  def __call__(self, video: jax.Array, text_ids: jax.Array | None = None,
               text_mask: jax.Array | None = None, video2: jax.Array | None = None, *,
               train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Embeds a batch of pairs: video with its report (text_ids, text_mask) or with `video2`.

    Returns:
      (video embeddings [B, E], paired embeddings [B, E], log logit scale []) for `clip_loss`.
    """
    if (text_ids is None) == (video2 is None):
      raise ValueError("give either text_ids/text_mask (video-text) or video2 (video-video)")
    if video2 is not None:
      paired = self.encode_video(video2, train=train)
    else:
      if text_mask is None:
        raise ValueError("text_ids given without text_mask")
      paired = self.encode_text(text_ids, text_mask, train=train)
    return self.encode_video(video, train=train), paired, self.logit_scale
