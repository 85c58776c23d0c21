"""Pooling windows over a [B, T, H, W, C] token grid: depthwise 3D convolution and 3D max pool.

Both are written as reductions over strided views of the padded grid, one per window offset (a
"tap"): on the CPU this is 20-100x faster than `lax.conv_general_dilated` with feature groups or
`lax.reduce_window`. Their gradients are written out (`jax.custom_vjp`). `looped` chooses whether
the taps are visited in one fused sum or in a `lax.fori_loop` (`POOL_LOOPS`): the same arithmetic,
a much smaller program to compile on the CPU.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

Triple = tuple[int, int, int]


def pooled_size(size: Triple, kernel: Triple, stride: Triple, padding: Triple) -> Triple:
  """Output [T, H, W] of a convolution or pooling window over a [T, H, W] grid."""
  return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel, stride, padding))


def half(kernel: Triple) -> Triple:
  return tuple(k // 2 for k in kernel)


# How a pooling window (depthwise convolution, max pool) visits its taps (`MViTConfig.pool_loop`):
# "unrolled": one fused elementwise reduction over all taps: one large kernel per distinct shape,
#   which XLA's CPU backend compiles slowly (27 strided reads for 3x3x3, forward and backward);
# "looped": a `lax.fori_loop` over the taps: one small loop body per shape; on the CPU the MViT-B
#   training step compiles with ~1.4x less CPU time at the same step time, but on GPU every loop
#   iteration costs a device-to-host round trip for the loop condition;
# "auto": looped on the CPU, unrolled on accelerators.
POOL_LOOPS = ("auto", "unrolled", "looped")


def check_pool_loop(pool_loop: str) -> None:
  """Refuses a name not in `POOL_LOOPS` (without touching the backend: configs are built before
  `jax.distributed.initialize`)."""
  if pool_loop not in POOL_LOOPS:
    raise ValueError(f"pool_loop {pool_loop!r} is not one of {POOL_LOOPS}")


def looped_taps(pool_loop: str) -> bool:
  """Whether pooling windows loop over their taps (`POOL_LOOPS`) on the default backend (call it
  while tracing, not earlier: "auto" asks for the backend)."""
  check_pool_loop(pool_loop)
  return pool_loop == "looped" or (pool_loop == "auto" and jax.default_backend() == "cpu")


def _tap_limit(padded_shape: tuple[int, ...], offset: Sequence[int], stride: Triple,
               out: Triple) -> tuple[int, ...]:
  return (padded_shape[0], *[o + (n - 1) * s + 1 for o, n, s in zip(offset, out, stride)],
          padded_shape[4])


def _taps(padded: jax.Array, window: Triple, stride: Triple,
          out: Triple) -> Iterator[tuple[Triple, jax.Array]]:
  """Yields, per window offset (i, j, k), the strided view of `padded` that the offset sees.

  For `padded: [B, T, H, W, C]` the view at offset (i, j, k) is `out`-sized, [B, T', H', W', C],
  with view[b, t, h, w] = padded[b, t*st + i, h*sh + j, w*sw + k]. A pooling window is then an
  elementwise reduction over the taps, which XLA fuses into one loop: on CPU this is 20-100x
  faster than `lax.conv_general_dilated` with feature groups or `lax.reduce_window`.
  """
  for offset in itertools.product(*map(range, window)):
    limit = _tap_limit(padded.shape, offset, stride, out)
    yield offset, jax.lax.slice(padded, (0, *offset, 0), limit, (1, *stride, 1))


def _offset(tap: jax.Array, window: Triple) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The window offset (i, j, k) of flat tap number `tap` (row-major, as `_taps` yields them)."""
  _, kh, kw = window
  return tap // (kh * kw), (tap // kw) % kh, tap % kw


def _dynamic_tap(padded: jax.Array, tap: jax.Array, window: Triple, stride: Triple,
                 out: Triple) -> jax.Array:
  """`_taps`' view for a traced flat tap number (a dynamic slice, then a static strided one)."""
  zero = jnp.zeros((), jnp.int32)
  size = _tap_limit(padded.shape, (0, 0, 0), stride, out)
  view = jax.lax.dynamic_slice(padded, (zero, *_offset(tap, window), zero), size)
  return jax.lax.slice(view, (0,) * 5, size, (1, *stride, 1))


def _place(grid: jax.Array, values: jax.Array, tap: jax.Array, window: Triple,
           stride: Triple) -> jax.Array:
  """Adds `values: [B, T', H', W', C]` into `grid` at the positions tap `tap` reads (the
  transpose of `_dynamic_tap`)."""
  dilated = _pad_grid(values, [(0, 0, s - 1) for s in stride])
  zero = jnp.zeros((), jnp.int32)
  start = (zero, *_offset(tap, window), zero)
  region = jax.lax.dynamic_slice(grid, start, dilated.shape)
  return jax.lax.dynamic_update_slice(grid, region + dilated, start)


def _pad_grid(x: jax.Array, config: Sequence[tuple[int, int, int]],
              value: float = 0.0) -> jax.Array:
  """`lax.pad` of the [T, H, W] axes of `x: [B, T, H, W, C]` by (low, high, interior) triples."""
  return jax.lax.pad(x, jnp.asarray(value, x.dtype), [(0, 0, 0), *config, (0, 0, 0)])


def _same_padding(window: Triple) -> list[tuple[int, int, int]]:
  return [(p, p, 0) for p in half(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool3d(x: jax.Array, window: Triple, stride: Triple, looped: bool = False) -> jax.Array:
  """Max pooling of `x: [B, T, H, W, C]` with padding window // 2 (PyTorch's MaxPool3d).

  The gradient goes to the first maximum of each window in (t, h, w) order, as PyTorch's
  (differentiating the taps' maximum would instead share it among ties, and compiles a large
  kernel). `looped` visits the taps in a loop (`POOL_LOOPS`).
  """
  return _max_pool3d_fwd(x, window, stride, looped)[0]


def _max_pool3d_fwd(x: jax.Array, window: Triple, stride: Triple, looped: bool):
  out = pooled_size(x.shape[1:4], window, stride, half(window))
  padded = _pad_grid(x, _same_padding(window), -jnp.inf)
  if looped:
    def body(tap, y):
      return jnp.maximum(y, _dynamic_tap(padded, tap, window, stride, out))
    first = next(_taps(padded, window, stride, out))[1]
    y = jax.lax.fori_loop(1, math.prod(window), body, first)
  else:
    y = functools.reduce(jnp.maximum, (tap for _, tap in _taps(padded, window, stride, out)))
  return y, (x, y)


def _max_pool3d_bwd(window: Triple, stride: Triple, looped: bool,
                    residuals: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array]:
  x, y = residuals
  out = y.shape[1:4]
  padded = _pad_grid(x, _same_padding(window), -jnp.inf)
  zeros = jnp.zeros_like(dy)

  def step(tap, carry, view):
    grid, taken = carry
    hit = (view == y) & ~taken
    return _place(grid, jnp.where(hit, dy, zeros), tap, window, stride), taken | hit

  carry = (jnp.zeros_like(padded), jnp.zeros(y.shape, bool))
  if looped:
    carry = jax.lax.fori_loop(
        0, math.prod(window),
        lambda tap, c: step(tap, c, _dynamic_tap(padded, tap, window, stride, out)), carry)
  else:
    for tap, (_, view) in enumerate(_taps(padded, window, stride, out)):
      carry = step(jnp.int32(tap), carry, view)
  lo = half(window)
  grid = carry[0]
  return (jax.lax.slice(grid, (0, *lo, 0),
                        (grid.shape[0], *[p + n for p, n in zip(lo, x.shape[1:4])],
                         grid.shape[4])),)


max_pool3d.defvjp(_max_pool3d_fwd, _max_pool3d_bwd)


def _correlate(padded: jax.Array, kernel: jax.Array, stride: Triple, out: Triple,
               looped: bool) -> jax.Array:
  """Sum over window offsets o of tap_o(padded) * kernel[o], [B, T', H', W', C] of size `out`."""
  window = kernel.shape[:3]
  if not looped:
    terms = (tap * kernel[offset] for offset, tap in _taps(padded, window, stride, out))
    return functools.reduce(jnp.add, terms)
  flat = kernel.reshape(-1, kernel.shape[-1])

  def body(tap, acc):
    return acc + _dynamic_tap(padded, tap, window, stride, out) * flat[tap]

  first = next(_taps(padded, window, stride, out))[1] * flat[0]
  return jax.lax.fori_loop(1, flat.shape[0], body, first)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv3d(x: jax.Array, kernel: jax.Array, stride: Triple,
                     looped: bool = False) -> jax.Array:
  """Depthwise convolution, no bias, padding kernel // 2 (PyTorch's Conv3d(groups=C)).

  Forward and backward are sums of strided taps. The backward is written out: the input
  gradient is one correlation of the dilated output gradient with the flipped kernel
  (instead of a scatter-like pad per tap), the kernel gradient one reduction per tap; on CPU
  this runs 1.5-4x faster than differentiating the forward taps. `looped` visits the taps in a
  loop (`POOL_LOOPS`).

  Args:
    x: [B, T, H, W, C] input.
    kernel: [kt, kh, kw, C] one filter per channel (odd sizes).
    stride: [st, sh, sw].
    looped: loop over the taps instead of unrolling them.

  Returns:
    [B, T', H', W', C].
  """
  return _depthwise_conv3d_fwd(x, kernel, stride, looped)[0]


def _depthwise_conv3d_fwd(x: jax.Array, kernel: jax.Array, stride: Triple, looped: bool):
  window = kernel.shape[:3]
  out = pooled_size(x.shape[1:4], window, stride, half(window))
  padded = _pad_grid(x, _same_padding(window))
  return _correlate(padded, kernel, stride, out, looped), (x, kernel)


def _depthwise_conv3d_bwd(stride: Triple, looped: bool,
                          residuals: tuple[jax.Array, jax.Array],
                          dy: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, kernel = residuals
  window = kernel.shape[:3]
  size, out = x.shape[1:4], dy.shape[1:4]
  # dx[n] = sum_m dy_dilated[n + p - (k - 1) + m] * kernel[k - 1 - m]: dilate dy by the stride and
  # pad it so that every input position sees a whole window, then correlate with the flipped kernel.
  dy_padded = _pad_grid(dy, [(k - 1 - p, n + p - (o - 1) * s - 1, s - 1)
                             for k, p, n, o, s in zip(window, half(window), size, out, stride)])
  dx = _correlate(dy_padded, kernel[::-1, ::-1, ::-1], (1, 1, 1), size, looped)
  # dkernel[o] = sum over positions of tap_o(x) * dy, accumulated in float32.
  dy32 = dy.astype(jnp.float32)
  padded = _pad_grid(x, _same_padding(window))
  if looped:
    def body(tap, dkernel):
      view = _dynamic_tap(padded, tap, window, stride, out).astype(jnp.float32)
      return dkernel.at[tap].set(jnp.sum(view * dy32, axis=(0, 1, 2, 3)))
    dkernel = jax.lax.fori_loop(0, math.prod(window), body,
                                jnp.zeros((math.prod(window), kernel.shape[-1]), jnp.float32))
  else:  # one reduction of the stacked products (one fused loop to compile, not one per tap)
    taps = _taps(padded, window, stride, out)
    dkernel = jnp.sum(jnp.stack([tap.astype(jnp.float32) * dy32 for _, tap in taps]),
                      axis=(1, 2, 3, 4))
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


depthwise_conv3d.defvjp(_depthwise_conv3d_fwd, _depthwise_conv3d_bwd)
