"""The train-time clip transform of `pipeline.ClipMaker` in jnp, for the jitted training step.

With `augment_on_device`, the host draws each clip's random parameters exactly as `ClipMaker`
does (same numpy draws, so the data order and augmentation stay reproducible and resumable) and
hands over the stored cine untouched, uint8 [T0, S, S], with its parameters, float32
[NUM_PARAMS] (`ClipParams.vector`). `make_clips` then does on the accelerator, batched, what
`ClipMaker` does on the host: linear interpolation in cyclic time from a random phase, the
antialiased separable crop-and-resize (the same matrices as `preprocess.resample_matrix`, built
from the parameters), the flip, rounding to uint8, and the gamma / contrast table about the
clip's mean. float32 instead of the host's float64 / sparse products moves a value across a
rounding boundary now and then: the result is within one grey level of the host's before the
intensity table (tests/test_pipeline.py), and the table itself is the host's formula. Rotation
(max_rotation_deg > 0) is host-only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Order of a clip's parameters in its float32 vector (`pipeline.ClipParams.vector`).
PARAM_NAMES = ("phase", "side", "center_row", "center_col", "flip", "gamma", "contrast")
NUM_PARAMS = len(PARAM_NAMES)
# A batch field holding the parameters of the stored cine in field `name` is `name + SUFFIX`.
AUGMENT_SUFFIX = "_augment"
# Samples more than this many pixels outside the image get no weight (`preprocess._EDGE`).
_EDGE = 0.5
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products (a bf16 pass would move grey levels)


def cycle_weights(num_in: int, num_out: int, phase: jax.Array) -> jax.Array:
  """`preprocess.cycle_matrix(num_in, num_out, phase=phase)` for evenly spaced frames:
  float32 [num_out, num_in]."""
  position = num_in * jnp.mod(phase + jnp.arange(num_out, dtype=jnp.float32) / num_out, 1.0)
  lower = jnp.floor(position)
  frac = (position - lower)[:, None]
  lower = lower.astype(jnp.int32)
  return (jax.nn.one_hot(lower % num_in, num_in) * (1.0 - frac)
          + jax.nn.one_hot((lower + 1) % num_in, num_in) * frac)


def crop_weights(n_in: int, n_out: int, side: jax.Array, center: jax.Array) -> jax.Array:
  """`preprocess.centered_resample_matrix(n_in, n_out, n_out / side, center)`: float32
  [n_out, n_in] taking a side-long crop centred on input index `center` to n_out pixels."""
  scale = n_out / side
  sample = center - (n_out - 1) / 2.0 / scale + jnp.arange(n_out, dtype=jnp.float32) / scale
  width = jnp.maximum(1.0, 1.0 / scale)
  dist = jnp.abs(sample[:, None] - jnp.arange(n_in, dtype=jnp.float32)[None, :]) / width
  weights = jnp.maximum(0.0, 1.0 - dist)
  total = weights.sum(axis=1, keepdims=True)
  weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
  inside = (sample >= -_EDGE) & (sample <= n_in - 1 + _EDGE)
  return weights * inside[:, None]


def intensity(clip: jax.Array, gamma: jax.Array, contrast: jax.Array) -> jax.Array:
  """`pipeline._intensity_lut` applied: gamma, then contrast about the clip's mean after gamma.

  clip: float32 grey levels 0..255 (integers) -> uint8, same shape.
  """
  levels = (clip / 255.0) ** gamma
  mean = levels.mean()
  return jnp.rint(jnp.clip((levels - mean) * contrast + mean, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def make_clip(frames: jax.Array, params: jax.Array, image_size: int, num_frames: int,
              with_intensity: bool = True) -> jax.Array:
  """One clip: frames uint8 [T0, S, S], params float32 [NUM_PARAMS] -> uint8 [T, H, W].

  with_intensity=False stops before the gamma / contrast table (for tests).
  """
  phase, side, center_row, center_col, flip, gamma, contrast = (
      params[i] for i in range(NUM_PARAMS))
  stored_frames, stored, _ = frames.shape
  x = frames.astype(jnp.float32)
  time = cycle_weights(stored_frames, num_frames, phase)  # [T, T0]
  rows = crop_weights(stored, image_size, side, center_row)  # [H, S]
  cols = crop_weights(stored, image_size, side, center_col)  # [W, S]
  cols = jnp.where(flip > 0.5, cols[::-1], cols)
  x = jnp.einsum("tu,uhw->thw", time, x, precision=_HIGHEST)
  x = jnp.einsum("rh,thw->trw", rows, x, precision=_HIGHEST)
  x = jnp.einsum("cw,trw->trc", cols, x, precision=_HIGHEST)
  clip = jnp.rint(jnp.clip(x, 0.0, 255.0))
  if not with_intensity:
    return clip.astype(jnp.uint8)
  return intensity(clip, gamma, contrast)


def make_clips(frames: jax.Array, params: jax.Array, image_size: int,
               num_frames: int) -> jax.Array:
  """A batch: frames uint8 [B, T0, S, S], params float32 [B, NUM_PARAMS] -> uint8 [B, T, H, W]."""
  return jax.vmap(lambda f, p: make_clip(f, p, image_size, num_frames))(frames, params)


def augment_batch(batch: dict[str, jax.Array], image_size: int,
                  num_frames: int) -> dict[str, jax.Array]:
  """Replaces each stored cine `key` that has parameters `key + "_augment"` (video, video2) by
  its clip; other fields pass through. Inside the jitted step."""
  out = {k: v for k, v in batch.items() if not k.endswith(AUGMENT_SUFFIX)}
  for key in out:
    if key + AUGMENT_SUFFIX in batch:
      out[key] = make_clips(batch[key], batch[key + AUGMENT_SUFFIX], image_size, num_frames)
  return out

