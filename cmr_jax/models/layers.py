"""Building blocks shared by the video and text encoders.

Every parameter is created through `nn.with_logical_partitioning`, so `cmr_jax.sharding` can map
its logical axis names (`embed`, `mlp`, `heads`, `vocab`, ...) onto mesh axes. Activations carry
logical constraints (`activation_batch`, ...) that only take effect under a mesh and axis rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ATTENTION_IMPLS: tuple[str, ...] = ("einsum", "dot_product", "cudnn")
TRANSFORMER_INIT_STD = 0.02  # BERT and pytorchvideo ViT-style init of linear layers and embeddings
# Activation layout of a token stream [B, N, C].
TOKENS_AXES: tuple[str, str, str] = ("activation_batch", "activation_length", "activation_embed")


class Module(nn.Module):
  """A module that computes in `dtype` and keeps its parameters in `param_dtype`.

  Both are keyword-only fields, so that a subclass's own fields stay positional.

  Attributes:
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)
  param_dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)

  @property
  def dtypes(self) -> dict[str, Dtype]:
    """`dtype` and `param_dtype` as keyword arguments, for a submodule or layer."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class Encoder(Module):
  """A video or text encoder; every one is built with the same keyword arguments.

  Subclasses declare their geometry as the positional field `config`.

  Attributes:
    remat: rematerialise each block's (layer's) activations in the backward pass; encoders
      without blocks accept and ignore it.
    attention_impl: one of `ATTENTION_IMPLS` (see `attend`); encoders without attention accept
      and ignore it.
  """

  remat: bool = dataclasses.field(default=False, kw_only=True)
  attention_impl: str = dataclasses.field(default="einsum", kw_only=True)


def partitioned(init: nn.initializers.Initializer,
                axes: Sequence[str | None]) -> nn.initializers.Initializer:
  """Returns `init` wrapped so that the parameter carries logical axis names `axes`."""
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, axes: tuple[str | None, str | None], *, dtype: Dtype,
          param_dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
  """A Dense layer with truncated-normal kernel [in, out] and zero bias, both partitioned.

  Args:
    features: output width.
    axes: logical names of the kernel's (input, output) axes; the bias takes the output name.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    name: module name (chosen to mirror the PyTorch reference's parameter names).
    use_bias: whether to add a bias.
  """
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=partitioned(nn.initializers.truncated_normal(TRANSFORMER_INIT_STD), axes),
      bias_init=partitioned(nn.initializers.zeros_init(), axes[1:]))


def layer_norm(epsilon: float, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  """A LayerNorm over the last axis with partitioned scale (ones) and bias (zeros)."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
      bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)))


def constrain_tokens(x: jax.Array) -> jax.Array:
  """Pins a token stream `x: [B, N, C]` to the batch-sharded activation layout."""
  return nn.with_logical_constraint(x, TOKENS_AXES)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
           impl: str = "einsum") -> jax.Array:
  """Scaled dot-product attention over heads.

  Args:
    q: [B, Q, H, D] queries.
    k: [B, K, H, D] keys.
    v: [B, K, H, D] values.
    mask: optional bool, broadcastable to [B, H, Q, K]; True where a query may attend a key.
    impl: "einsum" (two einsums, softmax in float32), "dot_product"
      (`jax.nn.dot_product_attention`, XLA's implementation) or "cudnn" (the same with cuDNN's
      fused flash attention: GPU only, bfloat16/float16, head_dim <= 128). On the 2-core CPU,
      einsum and dot_product are within 10% of each other for MViT shapes.

  Returns:
    [B, Q, H, D] attended values in the dtype of `q`.
  """
  if impl in ("dot_product", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                        implementation="cudnn" if impl == "cudnn" else None)
  if impl != "einsum":
    raise ValueError(f"unknown attention implementation {impl!r}; "
                     f"expected one of {ATTENTION_IMPLS}")
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
