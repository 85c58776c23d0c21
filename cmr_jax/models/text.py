"""BERT-style text encoder for radiology reports (BERT-base geometry = PubMedBERT).

Post-norm transformer layers as in BERT (Devlin et al. 2019): word + position + token-type
embeddings, LayerNorm (eps 1e-12), dropout; per layer self-attention -> dense -> dropout ->
residual LayerNorm, then intermediate dense (exact GELU) -> dense -> dropout -> residual LayerNorm.
Padded tokens (mask 0) are never attended to. The pooled output is, by default, BERT's pooler
tanh(dense(h_CLS)) (`pooling="pooler"`: PubMedBERT checkpoints carry its weights); `pooling="mean"`
takes the masked mean of the last hidden states instead. Attention-probability dropout is not
applied.

Parameter names map one to one onto a Hugging Face `BertModel` state dict (`.` becomes `/`,
`encoder.layer.{i}` becomes `encoder/layer_{i}`, LayerNorm `weight` becomes `scale`, Linear
`weight [out, in]` becomes `kernel [in, out]`, Embedding `weight` becomes `embedding`):

  embeddings.{word,position,token_type}_embeddings   -> embeddings/{...}_embeddings/embedding
  embeddings.LayerNorm                               -> embeddings/LayerNorm
  encoder.layer.{i}.attention.self.{query,key,value} -> encoder/layer_{i}/attention/self/{...}
  encoder.layer.{i}.attention.output.{dense,LayerNorm} -> encoder/layer_{i}/attention/output/{...}
  encoder.layer.{i}.intermediate.dense               -> encoder/layer_{i}/intermediate/dense
  encoder.layer.{i}.output.{dense,LayerNorm}         -> encoder/layer_{i}/output/{...}
  pooler.dense                                       -> pooler/dense
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmr_jax.models import layers

Dtype = layers.Dtype

POOLINGS: tuple[str, ...] = ("pooler", "mean")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Geometry of a BERT encoder; the defaults are BERT-base with PubMedBERT's vocabulary size."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_len: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  pooling: str = "pooler"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
    if self.pooling not in POOLINGS:
      raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")


class _BertModule(layers.Module):
  """A part of the BERT encoder, built from the encoder's geometry."""

  config: BertConfig


class _DenseLayerNorm(_BertModule):
  """dense -> dropout -> LayerNorm(x + residual): BERT's `attention.output` and `output`."""

  in_axis: str  # logical name of the input axis: "heads" after attention, "mlp" after intermediate

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
    kw = self.dtypes
    x = layers.dense(self.config.hidden_size, (self.in_axis, "embed"), name="dense", **kw)(x)
    x = nn.Dropout(self.config.dropout_rate)(x, deterministic=deterministic)
    return layers.layer_norm(self.config.layer_norm_eps, name="LayerNorm", **kw)(x + residual)


class _SelfAttention(_BertModule):
  """query/key/value projections and masked attention: BERT's `attention.self`."""

  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Maps `x: [B, L, C]` with `mask: bool [B, 1, 1, L]` to [B, L, C]."""
    c = self.config
    head_dim = c.hidden_size // c.num_heads

    def project(name: str) -> jax.Array:
      y = layers.dense(c.hidden_size, ("embed", "heads"), name=name, **self.dtypes)(x)
      return y.reshape(*y.shape[:2], c.num_heads, head_dim)

    out = layers.attend(project("query"), project("key"), project("value"), mask=mask,
                        impl=self.attention_impl)
    return out.reshape(*out.shape[:2], c.hidden_size)


class _Attention(_BertModule):
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    kw = self.dtypes
    y = _SelfAttention(self.config, self.attention_impl, name="self", **kw)(x, mask)
    return _DenseLayerNorm(self.config, "heads", name="output", **kw)(y, x, deterministic)


class _Intermediate(_BertModule):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.dense(self.config.intermediate_size, ("embed", "mlp"), name="dense",
                     **self.dtypes)(x)
    return nn.gelu(y, approximate=False)


class BertLayer(_BertModule):
  """One post-norm transformer layer."""

  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    """Maps `x: [B, L, C]` with `mask: bool [B, 1, 1, L]` to [B, L, C]."""
    kw = self.dtypes
    x = layers.constrain_tokens(x)
    x = _Attention(self.config, self.attention_impl, name="attention", **kw)(x, mask, deterministic)
    y = _Intermediate(self.config, name="intermediate", **kw)(x)
    return _DenseLayerNorm(self.config, "mlp", name="output", **kw)(y, x, deterministic)


class _Table(nn.Module):
  """An embedding table `embedding: [num, features]` (the layout of torch's Embedding.weight)."""

  num: int
  features: int
  axes: tuple[str | None, str]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    init = layers.partitioned(nn.initializers.truncated_normal(layers.TRANSFORMER_INIT_STD),
                              self.axes)
    return self.param("embedding", init, (self.num, self.features), self.param_dtype)


class _Embeddings(_BertModule):
  @nn.compact
  def __call__(self, ids: jax.Array, deterministic: bool) -> jax.Array:
    """Maps `ids: int [B, L]` to [B, L, C] (a single segment: token type 0)."""
    c = self.config

    def table(name: str, num: int, axes: tuple[str | None, str]) -> jax.Array:
      return _Table(num, c.hidden_size, axes, self.param_dtype, name=name)().astype(self.dtype)

    words = jnp.take(table("word_embeddings", c.vocab_size, ("vocab", "embed")), ids, axis=0)
    # Positions 0..L-1 and token type 0 are the same for every sequence: add them as slices.
    positions = table("position_embeddings", c.max_len, ("positions", "embed"))[:ids.shape[1]]
    token_type = table("token_type_embeddings", c.type_vocab_size, (None, "embed"))[0]
    x = words + positions + token_type
    x = layers.layer_norm(c.layer_norm_eps, name="LayerNorm", **self.dtypes)(x)
    return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


class _Encoder(_BertModule):
  remat: bool = False
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(self.config.num_layers):
      x = layer_cls(self.config, self.attention_impl, name=f"layer_{i}", **self.dtypes)(
          x, mask, deterministic)
    return x


def _check_text(ids: jax.Array, mask: jax.Array) -> None:
  """Raises ValueError unless the token ids and their mask are both [B, L]."""
  if ids.ndim != 2 or ids.shape != mask.shape:
    raise ValueError(f"text ids and mask must both be [B, L], got {ids.shape} and {mask.shape}")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `x: [B, L, C]` over the tokens, weighted by `mask: [B, L]`: [B, C] in x's dtype."""
  weights = mask.astype(x.dtype)[..., None]
  return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)


class BertEncoder(layers.Encoder):
  """BERT text encoder: token ids [B, L] and mask [B, L] -> pooled features [B, hidden_size].

  Built like every `layers.Encoder` (`remat` rematerialises each layer).

  Attributes:
    config: the geometry (named configs in `cmr_jax.models.registry`).
  """

  config: BertConfig

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
    """Encodes `ids: int [B, L]` with `mask: [B, L]` (nonzero = real token) into [B, hidden]."""
    c = self.config
    _check_text(ids, mask)
    if ids.shape[1] > c.max_len:
      raise ValueError(f"text length {ids.shape[1]} exceeds the encoder's max_len {c.max_len}")
    deterministic = not train
    kw = self.dtypes
    valid = mask.astype(bool)
    x = _Embeddings(c, name="embeddings", **kw)(ids, deterministic)
    x = _Encoder(c, self.remat, self.attention_impl, name="encoder", **kw)(
        x, valid[:, None, None, :], deterministic)
    if c.pooling == "mean":
      return _masked_mean(x, valid)
    return _Pooler(c, name="pooler", **kw)(x[:, 0])


class _Pooler(_BertModule):
  @nn.compact
  def __call__(self, cls_hidden: jax.Array) -> jax.Array:
    """BERT's pooler: tanh(dense(h_CLS)), [B, C] -> [B, C]."""
    y = layers.dense(self.config.hidden_size, ("embed", "mlp"), name="dense",
                     **self.dtypes)(cls_hidden)
    return jnp.tanh(y)


@dataclasses.dataclass(frozen=True)
class BagOfWordsConfig:
  """Geometry of a bag-of-words report encoder."""

  vocab_size: int = 1000
  hidden_size: int = 128
  max_len: int = 128


class BagOfWordsEncoder(layers.Encoder):
  """Masked mean of token embeddings, then a two-layer MLP: ids [B, L] -> [B, hidden].

  A cheap text tower for CPU runs from scratch: unlike a randomly initialised BERT, whose pooled
  outputs start nearly identical for every report, its outputs differ from the first step
  wherever the reports' words differ (numbers, grades), so contrastive training has a signal to
  follow at once. Word order is lost; a report's key facts here are in its words. Built like
  every `layers.Encoder`; it has nothing to rematerialise and no attention, so `remat` and
  `attention_impl` are unused.
  """

  config: BagOfWordsConfig

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
    """Encodes `ids: int [B, L]` with `mask: [B, L]` (nonzero = real token) into [B, hidden]."""
    del train
    c = self.config
    _check_text(ids, mask)
    kw = self.dtypes
    embed = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings",
                     embedding_init=layers.partitioned(nn.initializers.normal(1.0),
                                                       ("vocab", "embed")), **kw)
    x = _masked_mean(embed(ids), mask)
    x = nn.gelu(layers.dense(c.hidden_size, ("embed", "mlp"), name="fc1", **kw)(x),
                approximate=False)
    return layers.dense(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)
