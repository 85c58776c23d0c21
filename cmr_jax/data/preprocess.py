"""Preprocessing: raw cines in scanner geometry -> fixed-geometry uint8 study records.

Every cine is brought to one stored form, whatever the scanner: `cfg.num_frames` frames over one
cardiac cycle (linear interpolation in cyclic time, using trigger times when present; frame 0 stays
the first acquired phase, i.e. end-diastole at the R wave), `cfg.spacing_mm` per pixel, a
`cfg.size` x `cfg.size` field of view about the heart, and uint8 intensities from robust
percentiles of the whole cine.

Spatial resampling is separable: one [size, H] row matrix and one [size, W] column matrix whose
weights are a linear (triangle) kernel, widened by the downsampling factor when downsampling so
that it also low-pass filters (the same weights as `jax.image.scale_and_translate(...,
method="linear", antialias=True)`). Resampling, anti-aliasing, cropping and zero padding are then
two banded matrix products, applied as sparse products (see `apply_along_first`).

With `orientation="anatomical"` (the default) every cine with plane geometry is resampled in its own
plane along anatomical axes (long-axis views apex down, short-axis slices anterior up): see
`orientation`.

The heart is found as the centre of the temporal-variation map (where things move at the cardiac
frequency): the first temporal harmonic's magnitude, smoothed, taking the weighted centroid of
the moving blob around its peak. A flat map (nothing moves more than elsewhere) falls back to the
image centre, which `preprocess_study` reports (`image_centred`). The slices of a short-axis
stack share one centre (the median of the per-slice centres, in patient coordinates when the
geometry is known) so that they stay registered.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import math
from typing import Any

from absl import logging
import numpy as np
import scipy.ndimage
import scipy.sparse

from cmr_jax.data import orientation
from cmr_jax.data import types

CENTER_MODES = ("motion", "image")
ORIENTATIONS = ("anatomical", "scanner")
# Stored configs (dataset_info.json, a run's preprocess.json) from before `orientation` existed
# were made in the scanner's layout.
LEGACY_DEFAULTS = {"orientation": "scanner"}
STACK_NAME = f"the {types.SAX} stack"  # how `preprocess_study` names the stack in messages
# Percentile estimates use about this many pixels of a cine at most (a regular grid per frame).
_MAX_PERCENTILE_SAMPLES = 1 << 20
# Sample positions further than this (in input pixels) outside the image get no weight.
_EDGE = orientation.EDGE


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How raw cines become stored records.

  Attributes:
    size: stored square side in pixels.
    spacing_mm: stored pixel spacing in mm; size * spacing_mm is the field of view.
    num_frames: stored frames over one cardiac cycle.
    low_percentile: intensity percentile (whole cine) mapped to 0.
    high_percentile: intensity percentile (whole cine) mapped to 255.
    center: "motion" (centre of the temporal-variation map, image centre if nothing moves) or
      "image" (image centre).
    min_frames: a cine with fewer acquired frames is rejected.
    min_matrix: a cine with fewer rows or columns is rejected.
    motion_sigma_mm: Gaussian smoothing of the motion map, in mm (frames are smoothed by half
      of it before the map is made).
    motion_blob_level: the moving region is the connected blob around the motion map's peak
      where the map exceeds median + motion_blob_level * (peak - median).
    min_motion_contrast: the smoothed motion map's peak must exceed its median by this factor
      for the motion centre to be trusted.
    orientation: "anatomical" (each cine rotated in its plane: long-axis views apex down,
      short-axis slices anterior up; module `orientation`) or "scanner" (the scanner's rows
      and columns). Cines without plane geometry keep the scanner's layout.
  """

  size: int = 112
  spacing_mm: float = 2.0
  num_frames: int = 16
  low_percentile: float = 1.0
  high_percentile: float = 99.5
  center: str = "motion"
  min_frames: int = 8
  min_matrix: int = 16
  motion_sigma_mm: float = 15.0
  motion_blob_level: float = 0.3
  min_motion_contrast: float = 2.0
  orientation: str = "anatomical"

  def __post_init__(self):
    if self.center not in CENTER_MODES:
      raise ValueError(
          f"PreprocessConfig.center must be one of {CENTER_MODES}, got {self.center!r}")
    if self.orientation not in ORIENTATIONS:
      raise ValueError(f"PreprocessConfig.orientation must be one of {ORIENTATIONS}, got "
                       f"{self.orientation!r}")
    if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
      raise ValueError(
          "PreprocessConfig needs 0 <= low_percentile < high_percentile <= 100, got "
          f"{self.low_percentile}, {self.high_percentile}")
    if self.size < 1 or self.num_frames < 1 or not self.spacing_mm > 0:
      raise ValueError(f"PreprocessConfig needs positive size, num_frames, spacing_mm: {self}")

  @classmethod
  def from_dict(cls, values: collections.abc.Mapping[str, Any]) -> PreprocessConfig:
    """Builds a config from a mapping (e.g. `ml_collections.ConfigDict` or a JSON dict).

    Args:
      values: field name -> value; missing fields keep their defaults.

    Returns:
      The config.

    Raises:
      ValueError: on an unknown field name.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values.keys()) - names)
    if unknown:
      raise ValueError(f"unknown PreprocessConfig fields {unknown}; known: {sorted(names)}")
    return cls(**{k: values[k] for k in values.keys()})

  def to_dict(self) -> dict[str, Any]:
    """Returns the fields as a JSON-friendly dict (inverse of `from_dict`)."""
    return dataclasses.asdict(self)


def with_legacy_defaults(stored: collections.abc.Mapping[str, Any]) -> dict[str, Any]:
  """A stored preprocessing mapping with the fields it predates set as it was made.

  Datasets and runs written before a field existed were made the old way (`LEGACY_DEFAULTS`),
  not with today's default: read them through this before `PreprocessConfig.from_dict`.
  """
  return {**LEGACY_DEFAULTS, **stored}


def cine_name(cine: types.Cine) -> str:
  """A short name of a cine for messages: its series description, else view and slice."""
  if cine.series_description:
    return cine.series_description
  if cine.view == types.SAX:
    return f"{types.SAX} slice {cine.slice_index}"
  return cine.view


def resample_matrix(n_in: int, n_out: int, scale: float, start: float) -> np.ndarray:
  """Antialiased linear resampling weights along one axis.

  Output pixel i samples input index `start + i / scale` (pixel centres at integer indices)
  with a triangle kernel of half-width max(1, 1 / scale) input pixels, normalised over the
  pixels inside the image; samples more than half a pixel outside the image get zero weight
  (zero padding).

  Args:
    n_in: input length.
    n_out: output length.
    scale: output pixels per input pixel (< 1 downsamples).
    start: input index sampled by output pixel 0.

  Returns:
    weights: float32 [n_out, n_in]; `weights @ x` resamples x along its first axis.
  """
  sample = start + np.arange(n_out, dtype=np.float64) / scale  # [n_out]
  width = max(1.0, 1.0 / scale)
  dist = np.abs(sample[:, None] - np.arange(n_in, dtype=np.float64)[None, :]) / width
  weights = np.maximum(0.0, 1.0 - dist)  # [n_out, n_in]
  total = weights.sum(axis=1, keepdims=True)
  weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
  inside = (sample >= -_EDGE) & (sample <= n_in - 1 + _EDGE)
  return (weights * inside[:, None]).astype(np.float32)


def centered_resample_matrix(n_in: int, n_out: int, scale: float, center: float) -> np.ndarray:
  """`resample_matrix` whose n_out outputs are centred on input index `center`."""
  return resample_matrix(n_in, n_out, scale, center - (n_out - 1) / 2.0 / scale)


def apply_along_first(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
  """weights [M, N] applied along the first axis of x [N, ...] -> [M, ...].

  The product is sparse: resampling weights are banded, and a sparse product runs in this
  thread, where BLAS's threads slow small products by >10x on a busy machine.
  """
  flat = scipy.sparse.csr_matrix(weights) @ x.reshape(x.shape[0], -1)
  return flat.reshape((weights.shape[0],) + x.shape[1:])


def resample_frames(x: np.ndarray, row_weights: np.ndarray,
                    col_weights: np.ndarray) -> np.ndarray:
  """Separable in-plane resampling: x [T, H, W], row_weights [R, H], col_weights [C, W].

  Returns:
    [T, R, C].
  """
  y = apply_along_first(row_weights, x.transpose(1, 0, 2))  # [R, T, W]
  return apply_along_first(col_weights, y.transpose(2, 1, 0)).transpose(1, 2, 0)  # [T, R, C]


def normalize_intensity(frames: np.ndarray, cfg: PreprocessConfig, name: str) -> np.ndarray:
  """Maps the cine's [low, high] percentile range to [0, 1], clipped.

  Args:
    frames: [T, H, W] raw intensities of any real dtype and range.
    cfg: the percentiles.
    name: cine name for error messages.

  Returns:
    float32 [T, H, W] in [0, 1].

  Raises:
    ValueError: when the percentile range is empty (a constant image).
  """
  stride = max(1, math.ceil(math.sqrt(frames.size / _MAX_PERCENTILE_SAMPLES)))
  sample = frames[:, ::stride, ::stride]  # a regular grid in every frame
  low, high = (float(v) for v in np.percentile(sample.astype(np.float32),
                                               [cfg.low_percentile, cfg.high_percentile]))
  if not high > low:
    raise ValueError(f"series {name}: constant intensity (percentiles {low:g} and {high:g})")
  out = (frames.astype(np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
  return np.clip(out, 0.0, 1.0, out=out)


def cycle_matrix(num_in: int, num_out: int, trigger_times_ms: np.ndarray | None = None,
                 phase: float = 0.0) -> np.ndarray:
  """Linear interpolation weights in cyclic time from the acquired to `num_out` phases.

  The cycle starts at the first acquired frame (the R wave) and lasts the span of the trigger
  times plus one median frame interval (retrospective gating covers the whole RR interval);
  without usable trigger times (absent, wrong length, not strictly increasing) frames are taken
  as evenly spaced. Output phase j is at start + ((phase + j / num_out) mod 1) * cycle; the
  interval after the last frame interpolates back towards the first.

  Args:
    num_in: acquired frames T.
    num_out: output frames.
    trigger_times_ms: [T] acquisition times after the R wave, or None.
    phase: shift of the output phases, as a fraction of the cycle.

  Returns:
    weights: float32 [num_out, num_in]; `weights @ frames.reshape(T, -1)` resamples in time.
  """
  times = np.arange(num_in, dtype=np.float64)
  if trigger_times_ms is not None:
    given = np.asarray(trigger_times_ms, dtype=np.float64).reshape(-1)
    if given.shape == (num_in,) and np.all(np.isfinite(given)) and np.all(np.diff(given) > 0):
      times = given
  step = float(np.median(np.diff(times))) if num_in > 1 else 1.0
  cycle = times[-1] - times[0] + step
  knots = np.append(times, times[0] + cycle)  # [T + 1], the first frame again one cycle later
  out_times = times[0] + cycle * np.mod(phase + np.arange(num_out) / num_out, 1.0)
  position = np.interp(out_times, knots, np.arange(num_in + 1, dtype=np.float64))
  lower = np.floor(position).astype(np.int64)
  frac = position - lower
  weights = np.zeros((num_out, num_in), np.float64)
  np.add.at(weights, (np.arange(num_out), lower % num_in), 1.0 - frac)
  np.add.at(weights, (np.arange(num_out), (lower + 1) % num_in), frac)
  return weights.astype(np.float32)


def _validate(cine: types.Cine, cfg: PreprocessConfig) -> str:
  """Checks a cine can be preprocessed; returns its name. Raises ValueError naming the reason."""
  name = cine_name(cine)
  num_frames, rows, cols = cine.frames.shape
  if num_frames < cfg.min_frames:
    raise ValueError(f"series {name}: {num_frames} frames, fewer than the minimum {cfg.min_frames}")
  if min(rows, cols) < cfg.min_matrix:
    raise ValueError(
        f"series {name}: matrix {rows}x{cols} smaller than the minimum {cfg.min_matrix}")
  if not (np.issubdtype(cine.frames.dtype, np.number) and not np.iscomplexobj(cine.frames)):
    raise ValueError(f"series {name}: pixel dtype {cine.frames.dtype} is not real numeric")
  spacing = np.asarray(cine.pixel_spacing, dtype=np.float64)
  if spacing.shape != (2,) or not np.all(np.isfinite(spacing)) or not np.all(spacing > 0):
    raise ValueError(f"series {name}: bad pixel spacing {cine.pixel_spacing!r}")
  if np.issubdtype(cine.frames.dtype, np.floating) and not np.all(np.isfinite(cine.frames)):
    raise ValueError(f"series {name}: non-finite pixel values")
  return name


def _normalized_phases(cine: types.Cine, cfg: PreprocessConfig) -> np.ndarray:
  """Validates, normalises intensities and resamples in time: float32 [num_frames, H, W]."""
  name = _validate(cine, cfg)
  frames = normalize_intensity(cine.frames, cfg, name)
  weights = cycle_matrix(cine.num_frames, cfg.num_frames, cine.trigger_times_ms)
  return apply_along_first(weights, frames)


def first_harmonic_smoothed(phases: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """The first temporal harmonic of the frames, each frame Gaussian-smoothed in plane.

  Equal to `np.fft.rfft(scipy.ndimage.gaussian_filter(phases, (0, *sigma)), axis=0)[1]`: the
  in-plane filter and the temporal transform are both linear and act on different axes, so they
  commute, and the harmonic (one weighted sum over time, a [T] @ [T, H*W] product) is taken
  first and then smoothed as two images (real and imaginary parts) instead of T frames.

  Args:
    phases: [T, H, W] frames over the cycle.
    sigma: (row, column) Gaussian sd in pixels.

  Returns:
    complex [H, W].
  """
  num = phases.shape[0]
  angle = 2.0 * np.pi * np.arange(num) / num
  weights = np.stack([np.cos(angle), -np.sin(angle)])  # [2, T]
  # einsum, not BLAS: BLAS's threads slow small products on a busy machine (`apply_along_first`).
  parts = np.einsum("kt,thw->khw", weights, phases)  # [2, H, W] float64
  parts = scipy.ndimage.gaussian_filter(parts, (0.0, *sigma))
  return parts[0] + 1j * parts[1]


def motion_center(phases: np.ndarray, pixel_spacing: tuple[float, float],
                  cfg: PreprocessConfig) -> tuple[float, float] | None:
  """Centre (row, col) of the moving region of a cine, or None when nothing stands out.

  Args:
    phases: [T, H, W] intensities over the cycle.
    pixel_spacing: (row, column) spacing in mm.
    cfg: smoothing width and contrast threshold.

  Returns:
    The weighted centroid, in pixel indices, of the moving blob (see
    `PreprocessConfig.motion_blob_level`) of the motion map: the magnitude of the first temporal
    harmonic (the cardiac frequency; noise spreads over all frequencies, so this is ~10x more
    contrasted than the temporal standard deviation) of the lightly smoothed frames, smoothed.
    None when the map's peak does not exceed its median by `cfg.min_motion_contrast`.
  """
  if phases.shape[0] < 3:  # no cardiac harmonic to measure
    return None
  sigma = np.array([cfg.motion_sigma_mm / float(s) for s in pixel_spacing])
  motion = np.abs(first_harmonic_smoothed(phases, sigma / 2))  # [H, W]
  smooth = scipy.ndimage.gaussian_filter(motion, sigma, mode="constant")
  median, peak = float(np.median(smooth)), float(smooth.max())
  if not (np.isfinite(peak) and peak > 0 and peak > cfg.min_motion_contrast * median):
    return None
  labels, _ = scipy.ndimage.label(smooth >= median + cfg.motion_blob_level * (peak - median))
  blob = labels == labels.flat[int(np.argmax(smooth))]
  rows, cols = np.nonzero(blob)
  weight = smooth[rows, cols] - median
  return (float(np.average(rows, weights=weight)), float(np.average(cols, weights=weight)))


def _image_center(cine: types.Cine) -> tuple[float, float]:
  _, rows, cols = cine.frames.shape
  return ((rows - 1) / 2.0, (cols - 1) / 2.0)


def _crop(phases: np.ndarray, pixel_spacing: tuple[float, float], center: tuple[float, float],
          cfg: PreprocessConfig, axes: np.ndarray | None = None) -> np.ndarray:
  """Resamples [T, H, W] to cfg.spacing_mm and crops/pads a cfg.size square about `center`.

  `axes`: None for the input's own rows and columns, else the anatomical layout's
  (`orientation.display_axes`).
  """
  if axes is not None:
    return orientation.rotated_crop(phases, pixel_spacing, center, cfg.size, cfg.spacing_mm, axes)
  mats = [centered_resample_matrix(phases.shape[axis + 1], cfg.size,
                                   float(spacing) / cfg.spacing_mm, mid)
          for axis, (spacing, mid) in enumerate(zip(pixel_spacing, center))]
  return resample_frames(phases, *mats)  # [T, S, S]


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def preprocess_cine(cine: types.Cine, cfg: PreprocessConfig,
                    center: tuple[float, float] | None = None) -> np.ndarray:
  """Brings one cine to the stored geometry.

  Args:
    cine: a raw cine.
    cfg: the stored geometry.
    center: crop centre (row, col) in the cine's pixel indices; None chooses it by `cfg.center`.

  Returns:
    uint8 [cfg.num_frames, cfg.size, cfg.size].

  Raises:
    ValueError: naming the series and the reason when the cine is unusable.
  """
  phases = _normalized_phases(cine, cfg)
  if center is None:
    center, _ = _choose_center(phases, cine, cfg)
  axes = (orientation.display_axes(cine, orientation.long_axis_direction([cine]))
          if cfg.orientation == "anatomical" else None)
  return _to_uint8(_crop(phases, cine.pixel_spacing, center, cfg, axes))


def _choose_center(phases: np.ndarray, cine: types.Cine,
                   cfg: PreprocessConfig) -> tuple[tuple[float, float], bool]:
  """(crop centre, whether it is the image-centre fallback of a `motion` config)."""
  if cfg.center == "motion":
    found = motion_center(phases, cine.pixel_spacing, cfg)
    return (found, False) if found is not None else (_image_center(cine), True)
  return _image_center(cine), False


def _axes(cine: types.Cine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Patient-space origin and per-index steps (mm) along rows and columns of a cine."""
  cosines = np.asarray(cine.image_orientation, dtype=np.float64)
  row_spacing, col_spacing = (float(s) for s in cine.pixel_spacing)
  # DICOM: the first triplet is the direction of increasing column index, the second of rows.
  step_col = cosines[:3] * col_spacing
  step_row = cosines[3:] * row_spacing
  return np.asarray(cine.image_position, dtype=np.float64), step_row, step_col


def _to_patient(cine: types.Cine, center: tuple[float, float]) -> np.ndarray:
  origin, step_row, step_col = _axes(cine)
  return origin + center[0] * step_row + center[1] * step_col


def _from_patient(cine: types.Cine, point: np.ndarray) -> tuple[float, float]:
  origin, step_row, step_col = _axes(cine)
  offset = point - origin
  return (float(offset @ step_row / (step_row @ step_row)),
          float(offset @ step_col / (step_col @ step_col)))


def shared_stack_centers(cines: list[types.Cine], phases: list[np.ndarray],
                         cfg: PreprocessConfig) -> tuple[list[tuple[float, float]], bool]:
  """One crop centre for all slices of a stack, expressed in each slice's pixel indices.

  The per-slice motion centres are combined by their median: in patient coordinates when every
  slice carries its position and orientation (then projected back onto each slice plane), else
  as offsets in mm from each image centre. Slices whose motion map is flat do not vote; when no
  slice votes (or cfg.center == "image") every slice uses its image centre.

  Args:
    cines: the stack's cines.
    phases: their [T, H, W] intensities after normalisation and temporal resampling.
    cfg: centre mode and motion-map settings.

  Returns:
    ((row, col) crop centres, one per cine; whether they are the image-centre fallback of a
    `motion` config, i.e. no slice showed cardiac motion).
  """
  image_centers = [_image_center(c) for c in cines]
  if cfg.center != "motion":
    return image_centers, False
  found = [motion_center(p, c.pixel_spacing, cfg) for c, p in zip(cines, phases)]
  voters = [(c, f) for c, f in zip(cines, found) if f is not None]
  if not voters:
    return image_centers, True
  if all(orientation.has_geometry(c) for c in cines):
    point = np.median(np.stack([_to_patient(c, f) for c, f in voters]), axis=0)
    return [_from_patient(c, point) for c in cines], False
  offsets_mm = np.median(np.array([
      [(f[k] - _image_center(c)[k]) * float(c.pixel_spacing[k]) for k in range(2)]
      for c, f in voters]), axis=0)
  return [tuple(m + o / float(s) for m, o, s in zip(mid, offsets_mm, c.pixel_spacing))
          for c, mid in zip(cines, image_centers)], False


def _view_order(cine: types.Cine) -> tuple[int, int]:
  return (types.VIEW_CODES[cine.view], cine.slice_index)


def preprocess_study(study: types.Study, cfg: PreprocessConfig,
                     skipped: list[str] | None = None,
                     image_centred: list[str] | None = None,
                     unoriented: list[str] | None = None) -> types.StudyRecord:
  """Preprocesses every usable cine of a study into one record.

  Cines are stored SAX first (base to apex by slice_index), then 2CH, 3CH, 4CH. SAX slices share
  one crop centre; each long-axis cine has its own. An unusable cine is left out with a warning
  (and its message appended to `skipped` when given).

  Args:
    study: the raw study.
    cfg: the stored geometry.
    skipped: optional list collecting "study <id>, series <name>: <reason>" for left-out cines.
    image_centred: optional list collecting what was cropped about the image centre because no
      cardiac motion was found (`cfg.center == "motion"` only): `STACK_NAME` for the SAX stack,
      else the cine's name (`cine_name`).
    unoriented: optional list collecting the view of each cine kept in the scanner's row/column
      layout under `orientation="anatomical"` (no usable plane geometry).

  Returns:
    The record; `checksum` is the sha256 of its uint8 pixel bytes.

  Raises:
    ValueError: naming the study when no cine is usable.
  """
  usable, phases, reasons = [], [], []
  for cine in sorted(study.cines, key=_view_order):
    try:
      phases.append(_normalized_phases(cine, cfg))
      usable.append(cine)
    except ValueError as e:
      message = f"study {study.study_id}, {e}"
      reasons.append(message)
      logging.warning("left out a cine: %s", message)
  if skipped is not None:
    skipped.extend(reasons)
  if not usable:
    detail = "; ".join(reasons) if reasons else "it has no cines"
    raise ValueError(f"study {study.study_id}: no usable cine ({detail})")

  centers: list[tuple[float, float] | None] = [None] * len(usable)
  fallbacks = []
  sax = [i for i, c in enumerate(usable) if c.view == types.SAX]
  if sax:
    shared, fallback = shared_stack_centers([usable[i] for i in sax], [phases[i] for i in sax],
                                            cfg)
    fallbacks += [STACK_NAME] if fallback else []
    for i, center in zip(sax, shared):
      centers[i] = center
  for i, (cine, p) in enumerate(zip(usable, phases)):
    if centers[i] is None:
      centers[i], fallback = _choose_center(p, cine, cfg)
      fallbacks += [cine_name(cine)] if fallback else []
  if image_centred is not None:
    image_centred.extend(fallbacks)
  if cfg.orientation == "anatomical":
    apex = orientation.long_axis_direction(usable)
    axes = [orientation.display_axes(c, apex) for c in usable]
    kept = [c for c, a in zip(usable, axes) if a is None]
    if kept:
      logging.warning("study %s: %s kept the scanner's layout (no plane geometry)",
                      study.study_id, ", ".join(cine_name(c) for c in kept))
      if unoriented is not None:
        unoriented.extend(c.view for c in kept)
  else:
    axes = [None] * len(usable)
  frames = np.stack([_to_uint8(_crop(p, c.pixel_spacing, center, cfg, a))
                     for c, p, center, a in zip(usable, phases, centers, axes)])  # [N, T, S, S]
  return types.StudyRecord(
      study_id=study.study_id,
      subject_id=study.subject_id,
      site=study.site,
      frames=frames,
      views=[c.view for c in usable],
      slice_index=np.array([c.slice_index for c in usable], np.int32),
      slice_position_mm=np.array(
          [c.slice_position_mm if c.view == types.SAX else math.nan for c in usable], np.float32),
      source_spacing_mm=np.array([c.pixel_spacing for c in usable], np.float32).reshape(-1, 2),
      spacing_mm=float(cfg.spacing_mm),
      lvef=float(study.lvef),
      edv=float(study.edv),
      esv=float(study.esv),
      report=study.report,
      visit=int(study.visit),
      checksum=pixel_checksum(frames),
  )


def pixel_checksum(frames: np.ndarray) -> str:
  """sha256 hex digest of uint8 pixel data (C order)."""
  return hashlib.sha256(np.ascontiguousarray(frames, dtype=np.uint8).tobytes()).hexdigest()
