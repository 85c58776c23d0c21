"""Per-block <-> stacked parameters of scanned block runs (`MViTConfig.scan_blocks`).

A scanned run of blocks `first..last` keeps its parameters under one group `blocks_{first}_{last}`
whose every leaf has a leading axis of `last - first + 1` (block `first + i` at index i); the
per-block layout has groups `blocks_{i}` (the names pytorchvideo's map onto). The conversions are
driven by names alone, at any depth of a tree, so they apply to a whole model's parameters
(`{"video_encoder": {...}, "video_proj": ...}`) as well as to an encoder's, to arrays and to
`jax.ShapeDtypeStruct`s alike:

  unstack_blocks(tree)        every `blocks_{a}_{b}` group split into `blocks_a` ... `blocks_b`
  stack_blocks(tree, like)    the per-block groups of `tree` stacked wherever `like` has a run
  match_blocks(tree, like)    either way: `tree` in the block layout of `like`
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_RUN = re.compile(r"blocks_(\d+)_(\d+)")


def run_name(first: int, last: int) -> str:
  """The parameter group of the scanned run of blocks `first..last`."""
  return f"blocks_{first}_{last}"


def _parse_run(name: str) -> tuple[int, int] | None:
  match = _RUN.fullmatch(name)
  return (int(match.group(1)), int(match.group(2))) if match else None


def _take(leaf: Any, i: int) -> Any:
  """Index `i` of the leading axis of an array or a ShapeDtypeStruct."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[i]


def _stack(*leaves: Any) -> Any:
  """Leaves stacked along a new leading axis (arrays or ShapeDtypeStructs)."""
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
  if isinstance(first, np.ndarray) or np.isscalar(first):
    return np.stack(leaves)
  return jax.numpy.stack(leaves)


def unstack_blocks(tree: Any) -> Any:
  """`tree` with every scanned run's group `blocks_{a}_{b}` split into per-block groups.

  Raises:
    ValueError: a run group whose leading axis is not `b - a + 1` long.
  """
  if not isinstance(tree, Mapping):
    return tree
  out: dict[str, Any] = {}
  for name, value in tree.items():
    run = _parse_run(name)
    if run is None:
      out[name] = unstack_blocks(value)
      continue
    first, last = run
    lengths = {np.shape(leaf)[0] if not isinstance(leaf, jax.ShapeDtypeStruct) else leaf.shape[0]
               for leaf in jax.tree.leaves(value)}
    if lengths != {last - first + 1}:
      raise ValueError(f"{name}: stacked axis of length {sorted(lengths)}, expected "
                       f"{last - first + 1}")
    for i in range(first, last + 1):
      out[f"blocks_{i}"] = jax.tree.map(lambda leaf, i=i: _take(leaf, i - first), value)
  return out


def stack_blocks(tree: Any, like: Any) -> Any:
  """`tree` (per-block groups) with the blocks of every run group of `like` stacked.

  Groups of `tree` that `like` has no run for are kept as they are.

  Raises:
    ValueError: a run of `like` whose blocks `tree` lacks, or whose blocks differ in structure.
  """
  if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
    return tree
  out: dict[str, Any] = {}
  runs = {name: run for name in like if (run := _parse_run(name)) is not None}
  in_runs = {f"blocks_{i}" for first, last in runs.values() for i in range(first, last + 1)}
  for name, value in tree.items():
    if name not in in_runs:
      out[name] = stack_blocks(value, like.get(name, {}))
  for name, (first, last) in runs.items():
    if name in tree:  # already stacked
      out[name] = tree[name]
      continue
    names = [f"blocks_{i}" for i in range(first, last + 1)]
    absent = [n for n in names if n not in tree]
    if absent:
      raise ValueError(f"cannot stack {name}: no parameters for {', '.join(absent)}")
    members = [tree[n] for n in names]
    structures = {str(jax.tree.structure(m)) for m in members}
    if len(structures) != 1:
      raise ValueError(f"cannot stack {name}: its blocks have different parameters")
    out[name] = jax.tree.map(_stack, *members)
  return out


def match_blocks(tree: Any, like: Any) -> Any:
  """`tree` converted to the block layout (per-block or stacked runs) of `like`."""
  return stack_blocks(unstack_blocks(tree), like)


def has_runs(tree: Any) -> bool:
  """Whether `tree` holds a scanned run's group at any depth."""
  if not isinstance(tree, Mapping):
    return False
  return any(_parse_run(name) is not None or has_runs(value) for name, value in tree.items())
