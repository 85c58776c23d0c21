"""Renaming a PyTorch state dict onto a Flax parameter tree, with a report of what did not fit.

A layout is a `Renamer`: it maps one source tensor to one or more (parameter path, array) pairs in
our naming (`video_encoder/blocks_3/attn/q/kernel`), to `Dropped(reason)` for a tensor that is
known and deliberately unused (a Kinetics classifier, a buffer), or to None for a name it does not
know. `convert` applies a renamer and compares the result with the model's parameter shapes:
parameters the file lacks are *missing*, source tensors with no place in the model *unexpected*,
and tensors whose converted shape differs from the model's *mismatched*; `ConversionReport.check`
raises a `ConversionError` listing them by name unless each kind is allowed. A target with
scanned block runs (`blocks_{first}_{last}`, `cmr_jax.models.stacking`) is matched block by block
and its runs stacked; the report names the per-block paths.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import numpy as np

from cmr_jax.models import stacking

PATH_SEP = "/"
MAX_LISTED = 25  # names listed per kind of problem in an error message


@dataclasses.dataclass(frozen=True)
class Dropped:
  """A source tensor deliberately left out, and why."""

  reason: str


Renamed = list[tuple[str, np.ndarray]]
Renamer = Callable[[str, np.ndarray], "Renamed | Dropped | None"]


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did with every source tensor and every model parameter."""

  source: str
  layout: str
  converted: list[str] = dataclasses.field(default_factory=list)  # model paths filled
  missing: list[str] = dataclasses.field(default_factory=list)  # model paths the file lacks
  unexpected: list[str] = dataclasses.field(default_factory=list)  # source names without a place
  mismatched: list[str] = dataclasses.field(default_factory=list)  # "src -> path: shapes"
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # source name -> reason

  def check(self, *, allow_missing: bool = False, allow_unexpected: bool = False,
            allow_mismatch: bool = False) -> None:
    """Raises ConversionError naming every problem of a kind that is not allowed."""
    problems = []
    for kind, names, allowed, flag in (
        ("model parameters missing from the file", self.missing, allow_missing, "allow_missing"),
        ("unexpected tensors in the file", self.unexpected, allow_unexpected, "allow_unexpected"),
        ("shape mismatches (file vs model)", self.mismatched, allow_mismatch, "allow_mismatch")):
      if names and not allowed:
        listed = ", ".join(names[:MAX_LISTED])
        more = f", ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
        problems.append(f"{len(names)} {kind} [{flag}]: {listed}{more}")
    if problems:
      raise ConversionError(
          f"cannot convert {self.source} ({self.layout} layout): " + "; ".join(problems), self)

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready summary (counts, and every name that did not convert one to one)."""
    return {"source": self.source, "layout": self.layout, "converted": len(self.converted),
            "missing": self.missing, "unexpected": self.unexpected,
            "mismatched": self.mismatched, "dropped": self.dropped}


class ConversionError(ValueError):
  """A state dict that does not fit the model; `report` has the full lists."""

  def __init__(self, message: str, report: ConversionReport):
    super().__init__(message)
    self.report = report


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  return flax.traverse_util.flatten_dict(dict(tree), sep=PATH_SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b": x} -> {"a": {"b": x}}."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep=PATH_SEP)


def torch_module_path(name: str) -> str:
  """A PyTorch module name in our naming: `blocks.3.attn.q` -> `blocks_3/attn/q`."""
  return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).replace(".", PATH_SEP)


def torch_leaf(module: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
  """One LayerNorm, Linear or Conv3d tensor of module path `module` as (our path, array).

  LayerNorm `weight [C]` -> `scale`; Linear `weight [out, in]` -> `kernel [in, out]`; Conv3d
  `weight [out, in, t, h, w]` -> `kernel [t, h, w, in, out]`; `bias` keeps its name. Returns None
  for any other tensor.
  """
  if leaf == "bias":
    return f"{module}/bias", value
  if leaf != "weight":
    return None
  if value.ndim == 1:
    return f"{module}/scale", value
  if value.ndim == 2:
    return f"{module}/kernel", value.T
  if value.ndim == 5:
    return f"{module}/kernel", value.transpose(2, 3, 4, 1, 0)
  return None


def rename_all(state: Mapping[str, np.ndarray], renamer: Renamer) -> dict[str, np.ndarray]:
  """{parameter path: array} of every tensor `renamer` places (shapes to read before `convert`)."""
  out = {}
  for name, value in state.items():
    result = renamer(name, value)
    if result is not None and not isinstance(result, Dropped):
      out.update(result)
  return out


def convert(state: Mapping[str, np.ndarray], renamer: Renamer, target: Mapping[str, Any], *,
            source: str, layout: str) -> tuple[dict[str, np.ndarray], ConversionReport]:
  """Renames `state` onto the flat parameter shapes `target`.

  Args:
    state: {source name: array}.
    renamer: the layout's renaming (see module docstring).
    target: {parameter path: anything with `shape` and `dtype`}, e.g. flattened
      `jax.eval_shape` output. A renamed tensor whose top-level group (`text_encoder`, ...) is
      not in `target` is dropped as "not part of the target model", not reported unexpected.
    source: the file, for messages.
    layout: the layout's name, for messages.

  Returns:
    ({parameter path: array in the target dtype} for every tensor that fits, report). Call
    `report.check(...)` to refuse an incomplete or inexact conversion.

  Raises:
    ConversionError: two source tensors map onto one parameter.
  """
  tree = unflatten(target)
  if stacking.has_runs(tree):
    out, report = convert(state, renamer, flatten(stacking.unstack_blocks(tree)), source=source,
                          layout=layout)
    return _stacked_like(out, tree), report
  report = ConversionReport(source=source, layout=layout)
  groups = {path.split(PATH_SEP)[0] for path in target}
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for name in sorted(state):
    result = renamer(name, state[name])
    if result is None:
      report.unexpected.append(name)
      continue
    if isinstance(result, Dropped):
      report.dropped[name] = result.reason
      continue
    for path, value in result:
      group = path.split(PATH_SEP)[0]
      if group not in groups:
        report.dropped[name] = f"{group} is not part of the target model"
      elif path not in target:
        report.unexpected.append(f"{name} (as {path})")
      elif path in origin:
        raise ConversionError(f"{source}: {origin[path]} and {name} both map to {path}", report)
      elif tuple(value.shape) != tuple(target[path].shape):
        report.mismatched.append(f"{name} -> {path}: {tuple(value.shape)} vs "
                                 f"{tuple(target[path].shape)}")
        origin[path] = name
      else:
        out[path] = np.asarray(value, dtype=target[path].dtype)
        origin[path] = name
  report.converted = sorted(out)
  report.missing = sorted(set(target) - set(origin))
  return out, report


def _stacked_like(flat: dict[str, np.ndarray], like: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Converted per-block `flat` with the runs of the target tree `like` stacked. Where a run
  cannot be stacked (a block's tensor missing: the report says which), every run is left out."""
  try:
    return flatten(stacking.stack_blocks(unflatten(flat), like))
  except ValueError:
    paths = flatten(like)
    return {path: value for path, value in flat.items() if path in paths}
