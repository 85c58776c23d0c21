"""Shared test set-up. Runs before any test module imports jax."""

import atexit
import functools
import math
import os
import shutil
import tempfile

from absl import flags
import numpy as np
import pytest

import cmr_jax
from cmr_jax.data import types  # imports no jax

# Sharding tests need several devices; on CPU, XLA fakes them. Must be set before jax initialises.
cmr_jax.add_xla_flags(["--xla_force_host_platform_device_count=8"])
# Tests build the same small models many times (fresh jit closures per run): a persistent
# compilation cache for the session turns every repeat compile into a cache read. A directory made
# here is removed when the process exits (each xdist worker makes its own): left behind, every run
# of the suite would leave about 1.5 MB per process in the temp directory.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="cmr_jax_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# A fake study: a bright disk (the LV blood pool) that shrinks and grows over one cycle, inside a
# static mid-grey body, in Gaussian noise. Geometry is real enough for the preprocessing: the disk
# centre is one patient-space point seen by every SAX slice (axial planes, z = slice position).
FAKE_BODY_LEVEL = 400.0
FAKE_BLOOD_LEVEL = 1500.0
FAKE_NOISE = 40.0


def disk_cine(rng: np.random.Generator, *, view: str, shape: tuple[int, int],
              spacing: tuple[float, float], center_rc: tuple[float, float],
              radius_mm: float, num_frames: int = 20, ejection: float = 0.3,
              slice_index: int = -1, z_mm: float = math.nan, gain: float = 1.0,
              description: str = "") -> types.Cine:
  """A cine of a disk of `radius_mm` at end-diastole (frame 0) about pixel `center_rc`."""
  rows, cols = shape
  r_idx, c_idx = np.mgrid[0:rows, 0:cols].astype(np.float32)
  dist_mm = np.hypot((r_idx - center_rc[0]) * spacing[0], (c_idx - center_rc[1]) * spacing[1])
  phase = np.arange(num_frames) / num_frames
  radius = radius_mm * (1 - ejection * 0.5 * (1 - np.cos(2 * np.pi * phase)))  # [T], max at 0
  body = np.zeros(shape, np.float32)
  body[rows // 8: rows - rows // 8, cols // 8: cols - cols // 8] = FAKE_BODY_LEVEL
  inside = np.clip(radius[:, None, None] - dist_mm[None] + 0.5, 0.0, 1.0)  # partial volume
  frames = body[None] * (1 - inside) + FAKE_BLOOD_LEVEL * inside
  frames = (frames + rng.normal(0, FAKE_NOISE, frames.shape)) * gain
  position = np.array([-center_rc[1] * spacing[1], -center_rc[0] * spacing[0], z_mm])
  return types.Cine(
      frames=np.clip(frames, 0, None).astype(np.uint16),
      pixel_spacing=spacing,
      view=view,
      trigger_times_ms=np.arange(num_frames) * 800.0 / num_frames,
      slice_index=slice_index,
      slice_position_mm=z_mm,
      image_position=position if view == types.SAX else None,
      image_orientation=np.array([1.0, 0, 0, 0, 1.0, 0]) if view == types.SAX else None,
      series_description=description or (f"sax_{slice_index}" if view == types.SAX else view),
  )


def fake_study(seed: int, index: int, *, num_sax: int = 6, site: str = "fake",
               visit: int = 0, labelled: bool = True, with_report: bool = True,
               num_frames: int = 20, matrix: int = 72) -> types.Study:
  """A small fake study, deterministic in (seed, index, visit); subject = index."""
  rng = np.random.default_rng([seed, index, visit])
  spacing = float(rng.uniform(1.3, 2.6))
  shape = (matrix, matrix + 8)
  center = (shape[0] / 2 + rng.uniform(-6, 6), shape[1] / 2 + rng.uniform(-6, 6))
  ejection = float(rng.uniform(0.1, 0.5))
  gain = float(rng.uniform(0.5, 2.0))
  cines = []
  for k in range(num_sax):
    radius = 25.0 * (1 - 0.6 * k / max(1, num_sax))
    cines.append(disk_cine(rng, view=types.SAX, shape=shape, spacing=(spacing, spacing),
                           center_rc=center, radius_mm=radius, num_frames=num_frames,
                           ejection=ejection, slice_index=k, z_mm=10.0 * k, gain=gain))
  for view in types.LONG_AXIS_VIEWS:
    cines.append(disk_cine(rng, view=view, shape=shape, spacing=(spacing, spacing),
                           center_rc=center, radius_mm=30.0, num_frames=num_frames,
                           ejection=ejection, gain=gain))
  lvef = 100 * (1 - (1 - ejection) ** 2) if labelled else math.nan
  return types.Study(
      study_id=f"fake-{seed}-{index:04d}-v{visit}", subject_id=f"fake-{seed}-{index:04d}",
      site=site, cines=cines, lvef=lvef, visit=visit,
      report=(f"Study {index}. Left ventricle ejection fraction {lvef:.0f} percent. Normal size."
              if with_report else ""))


def broken_study(index: int) -> types.Study:
  """A study whose only cine has too few frames."""
  rng = np.random.default_rng(index)
  cine = disk_cine(rng, view=types.LAX_4CH, shape=(40, 40), spacing=(2.0, 2.0),
                   center_rc=(20, 20), radius_mm=20, num_frames=4)
  return types.Study(study_id=f"broken-{index}", subject_id=f"broken-{index}", site="fake",
                     cines=[cine])


def raise_error() -> types.Study:
  """An item whose loading fails."""
  raise OSError("unreadable file")


@pytest.fixture
def make_study():
  """Factory for fake studies: make_study(index, **kwargs) -> Study (seed 0)."""
  return functools.partial(fake_study, 0)


@pytest.fixture(scope="session")
def absl_flags_parsed():
  """Marks absl flags parsed with their defaults, as `absl.app.run` would.

  grain's worker processes read grain's absl flags, and pytest does not parse flags.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def kill_worker() -> types.Study:
  """An item that kills the process loading it (as a crashing decoder would)."""
  os._exit(3)
