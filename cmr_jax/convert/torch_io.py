"""Reads PyTorch weight files into flat {name: numpy array} state dicts.

Formats: a pickled state dict or training checkpoint (`.pyth` as pytorchvideo/SlowFast save it,
with the weights under `model_state`; `.pt`, `.pth`, `.bin`; PyTorch Lightning `.ckpt`, under
`state_dict`), safetensors (`.safetensors`), or a Hugging Face model folder (its
`model.safetensors` or `pytorch_model.bin`).

Pickled files are read with `torch.load(weights_only=True)`: nothing in them is executed. A
training checkpoint may also pickle objects of its training code (Lightning's `AttributeDict`
hyper-parameters, a config class); those are replaced by inert placeholders rather than imported,
so such a checkpoint loads without its training code and without trusting it. Floating-point
tensors come back as float32 numpy arrays (bfloat16 and float16 are widened).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

# Where training checkpoints keep the model's state dict, searched in this order.
STATE_DICT_KEYS = ("model_state", "state_dict", "model", "module")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SAFETENSORS_SUFFIX = ".safetensors"
DATA_PARALLEL_PREFIX = "module."
INSTALL_HINT = "pip install -e '.[torch]'"


class _Placeholder(dict):
  """An inert stand-in for a class or function a checkpoint pickled (never imported or run)."""

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__()
    self.args = args

  def __setstate__(self, state: Any) -> None:
    self.__dict__["state"] = state


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch ({INSTALL_HINT})") from e
  return torch


def _torch_load(path: str) -> Any:
  """`torch.load` restricted to weights, with placeholders for the file's non-torch globals."""
  torch = _import_torch(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as first:  # pylint: disable=broad-except
    try:
      unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: not a PyTorch weight file ({first})") from e
    if not unsafe:
      raise ValueError(f"{path}: cannot be read as PyTorch weights ({first})") from first
    with torch.serialization.safe_globals([(_Placeholder, name) for name in unsafe]):
      try:
        return torch.load(path, map_location="cpu", weights_only=True)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{path}: cannot be read as PyTorch weights even with placeholders for "
                         f"{sorted(unsafe)} ({e})") from e


def _find_state_dict(obj: Any, path: str, torch) -> Mapping[str, Any]:
  """The tensor mapping inside a loaded object: itself, or under one of STATE_DICT_KEYS."""
  if isinstance(obj, Mapping):
    if obj and any(torch.is_tensor(v) for v in obj.values()):
      return obj
    for key in STATE_DICT_KEYS:
      if isinstance(obj.get(key), Mapping):
        return _find_state_dict(obj[key], path, torch)
    keys = sorted(map(str, obj))[:10]
    raise ValueError(f"{path}: no state dict found: no tensors at the top level and none of "
                     f"{STATE_DICT_KEYS} (top-level keys: {keys})")
  raise ValueError(f"{path}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")


def _to_numpy(value: Any) -> np.ndarray:
  value = value.detach().cpu()
  if value.is_floating_point():
    value = value.float()
  return value.numpy()


def resolve_weight_file(path: str) -> str:
  """`path` itself, or the weight file of a Hugging Face model folder."""
  if os.path.isdir(path):
    for name in HF_WEIGHT_FILES:
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(f"{path}: a model folder needs one of {HF_WEIGHT_FILES}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weight file {path} not found")
  return path


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads the state dict of a PyTorch weight file or Hugging Face model folder.

  Args:
    path: a `.pyth`/`.pt`/`.pth`/`.bin`/`.ckpt` file, a `.safetensors` file or a model folder.

  Returns:
    {parameter name: array}, floating point as float32; a DataParallel `module.` prefix on every
    name is removed.

  Raises:
    FileNotFoundError: no such file, or a folder without weights.
    ImportError: a pickled file or safetensors without the optional packages installed.
    ValueError: the file holds no readable state dict.
  """
  path = resolve_weight_file(path)
  if path.endswith(SAFETENSORS_SUFFIX):
    try:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"reading {path} needs safetensors ({INSTALL_HINT})") from e
    try:
      return dict(safetensors_numpy.load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  torch = _import_torch(path)
  state = _find_state_dict(_torch_load(path), path, torch)
  out = {str(k): _to_numpy(v) for k, v in state.items() if torch.is_tensor(v)}
  if out and all(k.startswith(DATA_PARALLEL_PREFIX) for k in out):
    out = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in out.items()}
  return out
