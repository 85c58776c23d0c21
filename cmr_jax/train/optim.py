"""Optimizers: AdamW with warm-up and cosine decay, gradient clipping, freezing by parameter path.

Frozen parameters go through `optax.set_to_zero` inside `optax.multi_transform`, so they receive
no update and carry no optimizer state (AdamW moments exist only for trainable leaves). Weight
decay reaches kernels and token embeddings only (`weight_decay_mask`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax
import jax
import optax

TRAINABLE = "trainable"
FROZEN = "frozen"


def lr_schedule(*, base_lr: float, total_steps: int, warmup_steps: int,
                end_fraction: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `base_lr`, then cosine decay to `end_fraction * base_lr`."""
  warmup_steps = max(0, min(warmup_steps, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=base_lr * end_fraction)


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a pytree key path, e.g. 'encoder/blocks_0/attn/proj/kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def trainable_labels(params: Any, trainable_patterns: Sequence[str]) -> Any:
  """Labels each leaf TRAINABLE if its path matches any regex in `trainable_patterns`, else FROZEN.

  An empty pattern list, or the pattern '.*', makes everything trainable.
  """
  compiled = [re.compile(p) for p in trainable_patterns]

  def label(path, _):
    name = path_str(path)
    return TRAINABLE if any(c.search(name) for c in compiled) else FROZEN

  if not compiled:
    return jax.tree.map(lambda _: TRAINABLE, params)
  return jax.tree_util.tree_map_with_path(label, params)


# Parameters of two or more dimensions that get no weight decay (as SlowFast/pytorchvideo's MViT
# `no_weight_decay`): the position embeddings and the CLS token.
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def weight_decay_mask(params: Any) -> Any:
  """True for the leaves AdamW decays: kernels and token embeddings only, not biases, norms,
  position embeddings, the CLS token (`NO_DECAY_NAMES`) or the temperature."""
  def decays(path, x) -> bool:
    name = path_str(path)
    return x.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(params: Any, *, base_lr: float, total_steps: int, warmup_steps: int,
                   weight_decay: float = 0.05, grad_clip_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999,
                   trainable_patterns: Sequence[str] = (),
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled weight decay per `weight_decay_mask`) with clipping; frozen leaves: no state.

  Returns the transformation and its learning-rate schedule (for logging).
  """
  schedule = lr_schedule(base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps)
  decay_mask = weight_decay_mask(params)
  chain = []
  if grad_clip_norm:
    chain.append(optax.clip_by_global_norm(grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
  adamw = optax.chain(*chain)
  labels = trainable_labels(params, trainable_patterns)
  has_frozen = FROZEN in jax.tree.leaves(labels)
  if not has_frozen:
    return adamw, schedule
  tx = optax.multi_transform({TRAINABLE: adamw, FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def unfreeze(params: Any) -> Any:
  """Plain nested dicts for FrozenDict inputs (no-op otherwise)."""
  return flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves of a pytree (e.g. gradients)."""
  return optax.tree.norm(tree)
