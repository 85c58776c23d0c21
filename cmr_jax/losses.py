"""Losses: symmetric InfoNCE (CLIP) for pre-training and Huber for LVEF regression.

`clip_loss` takes the global batch: under `jax.jit` with batch-sharded inputs the arrays are the
global batch, so every pair's negatives are all other pairs across devices (XLA inserts the
gathers); no per-device loss is ever formed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

MAX_LOG_LOGIT_SCALE = math.log(100.0)  # CLIP's clip: logit scale (inverse temperature) <= 100
LOGIT_SCALE = "logit_scale"  # the dual encoder's parameter name


def clip_loss(emb_a: jax.Array, emb_b: jax.Array,
              log_logit_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE over a batch of positive pairs (row i of `emb_a` with row i of `emb_b`).

  Args:
    emb_a: [N, E] unit-norm embeddings (e.g. videos).
    emb_b: [N, E] unit-norm embeddings of the paired items (reports or second clips).
    log_logit_scale: [] learnable log inverse temperature (used as is: the training step clips
      the parameter after each update, `clip_logit_scale`, so that its gradient never vanishes).

  Returns:
    (loss [], metrics) where loss is the mean of the a->b and b->a cross-entropies and metrics
    holds `accuracy_a2b`, `accuracy_b2a` (top-1 retrieval within the batch) and `logit_scale`.
  """
  if emb_a.ndim != 2 or emb_a.shape != emb_b.shape:
    raise ValueError(f"embeddings must both be [N, E], got {emb_a.shape} and {emb_b.shape}")
  scale = jnp.exp(log_logit_scale.astype(jnp.float32))
  logits = scale * jnp.einsum("ne,me->nm", emb_a.astype(jnp.float32), emb_b.astype(jnp.float32))
  labels = jnp.arange(logits.shape[0])
  loss_a2b = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss_b2a = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  metrics = {
      "accuracy_a2b": jnp.mean(jnp.argmax(logits, axis=1) == labels),
      "accuracy_b2a": jnp.mean(jnp.argmax(logits, axis=0) == labels),
      "logit_scale": scale,
  }
  return 0.5 * (loss_a2b + loss_b2a), metrics


def clip_logit_scale(params: dict) -> dict:
  """`params` with its log logit scale clipped to [0, ln 100] (temperature in [0.01, 1]).

  CLIP clips the parameter after the optimizer's update. Clamping it inside the loss instead
  (`exp(min(s, ln 100))`) would give it an exactly zero gradient once it passes ln 100, so it
  could never come back down.
  """
  if LOGIT_SCALE not in params:
    return params
  return {**params, LOGIT_SCALE: jnp.clip(params[LOGIT_SCALE], 0.0, MAX_LOG_LOGIT_SCALE)}


def variance_floor(emb: jax.Array, eps: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """VICReg's variance term (Bardes et al. 2022) on unit-norm embeddings, against collapse.

  For N unit vectors spread evenly over E dimensions each dimension's standard deviation across
  the batch is about 1 / sqrt(E); the penalty is mean_d relu(1 - sqrt(E) * std_d), zero for a
  well-spread batch and 1 for a batch collapsed to one point. Contrastive training of randomly
  initialised towers otherwise drifts into that collapse (InfoNCE = ln N with vanishing gradients),
  which the data cannot pull it out of. Like `clip_loss` it takes the global batch.

  Args:
    emb: [N, E] unit-norm embeddings, N >= 2.
    eps: added to the variance before the square root (VICReg's epsilon).

  Returns:
    (penalty [], mean over dimensions of sqrt(E) * std_d []), the latter about 1 when spread.
  """
  if emb.ndim != 2 or emb.shape[0] < 2:
    raise ValueError(f"embeddings must be [N >= 2, E], got {emb.shape}")
  e = emb.astype(jnp.float32)
  spread = jnp.sqrt(e.var(axis=0) + eps / e.shape[1]) * math.sqrt(e.shape[1])
  return jnp.mean(jax.nn.relu(1.0 - spread)), jnp.mean(spread)


def huber_loss(predictions: jax.Array, targets: jax.Array, *, delta: float = 1.0,
               weights: jax.Array | None = None) -> jax.Array:
  """Mean Huber loss (optax.huber_loss) of `predictions` vs `targets`, both [B].

  Args:
    predictions: [B] predictions (LVEF in percent).
    targets: [B] labels in the same unit.
    delta: where the loss turns from quadratic to linear (in label units).
    weights: optional [B] non-negative per-example weights (e.g. 0 for padded examples); the
      mean is weighted, and 0 when all weights are 0.
  """
  per_example = optax.huber_loss(predictions.astype(jnp.float32), targets.astype(jnp.float32),
                                 delta=delta)
  if weights is None:
    return per_example.mean()
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)
