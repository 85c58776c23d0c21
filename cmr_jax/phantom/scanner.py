"""Acquisition of the synthetic heart: protocol families ("sites"), planning and cine rendering.

A scan places the body in patient (LPS) coordinates, plans a short-axis (SAX) stack from base to
apex and the 2CH, 3CH and 4CH long-axis planes from the heart's axes with planning jitter, and
renders each plane by evaluating the anatomy's signed distances at the plane's 3D pixel
positions: the torso once per plane, the heart per frame and on several sub-planes across the
slice thickness (slice profile). Contrast is bSSFP-like (blood and fat bright, myocardium dark),
then a smooth coil sensitivity, a random gain and Rician noise are applied. Each cine is its own
breath-hold: the anatomy is shifted by a small random offset that its geometry does not record.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from scipy import special
from scipy.spatial import transform

from cmr_jax.data import types
from cmr_jax.phantom import heart_geometry
from cmr_jax.phantom import heart_params
from cmr_jax.phantom import thorax

TISSUES = ("blood", "myocardium", "fat", "liver", "muscle", "lung", "tissue", "marrow", "csf")
SHADING_SCALE_MM = 200.0  # length scale of the coil sensitivity field
CINE_GAIN_SD = 0.05  # per-series scaling on top of the study gain (log)
CINE_HEART_RATE_SD = 0.015  # beat-to-beat rate change between breath-holds (log)
STUDY_HEART_RATE_SD = 0.04  # rate change between scans of the same subject (log)
POSE_ROTATION_SD_DEG = (2.0, 2.0, 4.0)  # patient rotation on the table about x, y, z
POSE_SHIFT_SD_MM = (15.0, 15.0, 25.0)
PLANE_SHIFT_SD_MM = 2.0  # planning error of plane positions
FAST_FOV_FRACTION = 0.6
MAX_FOV_OFFSET = 0.12  # heart offset from the image centre, at most this fraction of the FOV
BOX_MARGIN_MM = 1.0
NOISE_LEVELS = 1 << 16
BAND_SLACK_MM = 2.0  # covers a convex shape's sweep between its ED and ES positions


@dataclasses.dataclass(frozen=True)
class Contrast:
  """Steady-state signal of each tissue relative to blood (bSSFP-like)."""

  blood: float = 1.0
  myocardium: float = 0.28
  fat: float = 0.8
  liver: float = 0.33
  muscle: float = 0.25
  lung: float = 0.05
  tissue: float = 0.4  # mediastinal and abdominal soft tissue
  marrow: float = 0.55
  csf: float = 0.95


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One acquisition protocol family ("site").

  Attributes:
    name: the site name (goes into Study.site).
    frames_per_cycle: cine frames over one RR interval.
    matrix: (rows, cols) of every image.
    pixel_spacing_mm: nominal in-plane spacing (square pixels).
    slice_thickness_mm: nominal SAX and LAX slice thickness.
    slice_gap_mm: nominal gap between SAX slices (negative: overlapping slices).
    num_sax_slices: (min, max) SAX slices; the stack is sized to cover the LV within these.
    spacing_spread: per-study relative spread of the pixel spacing (uniform, +-).
    thickness_spread_mm: per-study extra slice thickness (uniform in [0, spread], 0.5 mm steps).
    gap_spread_mm: per-study gap change (uniform in [-spread, spread], 0.5 mm steps).
    contrast: tissue signals.
    contrast_jitter: per-study log-sd of each tissue's signal.
    noise: Rician noise sd relative to the blood signal.
    noise_spread: per-study log-sd of the noise level.
    shading: log-amplitude of the smooth coil sensitivity field.
    gain_log_mean: mean log of the global gain (arbitrary scanner units per blood signal).
    gain_log_sd: per-study log-sd of the global gain.
    misregistration_mm: sd of each breath-hold's anatomy offset (x, y; twice this along z).
    planning_jitter_deg: sd of each plane's angular planning error.
    fov_offset_mm: sd of the heart's in-plane offset from the image centre.
    trigger_delay_ms: first frame's delay after the R wave, uniform in [0, this].
    profile_samples: sub-planes averaged across the slice thickness.
    lax_missing_prob: chance that each long-axis view is missing from a study.
    sax_description: SeriesDescription of SAX cines; `{index}` is the 1-based slice number.
    lax_descriptions: SeriesDescription of the 2CH, 3CH and 4CH cines.
  """

  name: str
  frames_per_cycle: int
  matrix: tuple[int, int]
  pixel_spacing_mm: float
  slice_thickness_mm: float
  slice_gap_mm: float
  num_sax_slices: tuple[int, int]
  spacing_spread: float = 0.0
  thickness_spread_mm: float = 0.0
  gap_spread_mm: float = 0.0
  contrast: Contrast = Contrast()
  contrast_jitter: float = 0.08
  noise: float = 0.035
  noise_spread: float = 0.3
  shading: float = 0.3
  gain_log_mean: float = math.log(400.0)
  gain_log_sd: float = 0.5
  misregistration_mm: float = 1.5
  planning_jitter_deg: float = 4.0
  fov_offset_mm: float = 20.0
  trigger_delay_ms: float = 15.0
  profile_samples: int = 3
  lax_missing_prob: float = 0.0
  sax_description: str = "SAX {index}"
  lax_descriptions: tuple[str, str, str] = ("2CH", "3CH", "4CH")

  def __post_init__(self):
    problems = []
    if self.frames_per_cycle < 2:
      problems.append(f"frames_per_cycle {self.frames_per_cycle} < 2")
    if len(self.matrix) != 2 or min(self.matrix) < 8:
      problems.append(f"matrix {self.matrix} is not (rows, cols) of at least 8")
    if not self.pixel_spacing_mm > 0 or not self.slice_thickness_mm > 0:
      problems.append("pixel spacing and slice thickness must be positive")
    lo, hi = self.num_sax_slices
    if not 1 <= lo <= hi:
      problems.append(f"num_sax_slices {self.num_sax_slices} is not a range 1 <= min <= max")
    if self.slice_thickness_mm + self.slice_gap_mm - self.gap_spread_mm <= 0:
      problems.append("slice thickness + gap must stay positive")
    if self.profile_samples < 1:
      problems.append(f"profile_samples {self.profile_samples} < 1")
    if not 0.0 <= self.lax_missing_prob < 1.0:
      problems.append(f"lax_missing_prob {self.lax_missing_prob} not in [0, 1)")
    if len(self.lax_descriptions) != len(types.LONG_AXIS_VIEWS):
      problems.append("lax_descriptions needs one entry per long-axis view")
    if problems:
      raise ValueError(f"protocol {self.name!r}: " + "; ".join(problems))


SITES: dict[str, Protocol] = {
    p.name: p for p in (
        Protocol(
            name="ukbb_like", frames_per_cycle=50, matrix=(208, 187), pixel_spacing_mm=1.8,
            slice_thickness_mm=8.0, slice_gap_mm=2.0, num_sax_slices=(8, 13), noise=0.035,
            sax_description="CINE_segmented_SAX_b{index}",
            lax_descriptions=("CINE_segmented_LAX_2Ch", "CINE_segmented_LAX_3Ch",
                              "CINE_segmented_LAX_4Ch")),
        Protocol(
            name="kaggle_like", frames_per_cycle=30, matrix=(192, 256), pixel_spacing_mm=1.4,
            slice_thickness_mm=8.0, slice_gap_mm=0.0, num_sax_slices=(8, 16), spacing_spread=0.12,
            thickness_spread_mm=2.0, gap_spread_mm=2.0, noise=0.045, noise_spread=0.4,
            contrast=Contrast(myocardium=0.3, fat=0.75, liver=0.36, tissue=0.42),
            misregistration_mm=2.5, planning_jitter_deg=6.0, fov_offset_mm=30.0,
            trigger_delay_ms=25.0, lax_missing_prob=0.1, sax_description="sax",
            lax_descriptions=("2ch", "3ch", "4ch")),
        Protocol(
            name="siteC", frames_per_cycle=25, matrix=(224, 224), pixel_spacing_mm=1.56,
            slice_thickness_mm=6.0, slice_gap_mm=4.0, num_sax_slices=(9, 14), noise=0.03,
            contrast=Contrast(myocardium=0.22, fat=0.95, liver=0.4, muscle=0.2, tissue=0.45,
                              marrow=0.7),
            shading=0.45, gain_log_mean=math.log(1500.0), fov_offset_mm=25.0,
            sax_description="FIESTA CINE SAX {index}",
            lax_descriptions=("FIESTA CINE 2CH", "FIESTA CINE LVOT", "FIESTA CINE 4CH")),
        Protocol(
            name="siteD", frames_per_cycle=35, matrix=(256, 256), pixel_spacing_mm=1.3,
            slice_thickness_mm=8.0, slice_gap_mm=0.0, num_sax_slices=(10, 16), noise=0.05,
            contrast=Contrast(myocardium=0.32, fat=0.7, liver=0.3, lung=0.08, tissue=0.36),
            shading=0.2, gain_log_mean=math.log(120.0), trigger_delay_ms=10.0,
            sax_description="sBTFE_SA slice {index}",
            lax_descriptions=("sBTFE_2CH", "sBTFE_3CH", "sBTFE_4CH")),
    )
}


def fast_protocol(p: Protocol, frames: int = 16, matrix: int = 112,
                  fov_fraction: float = FAST_FOV_FRACTION) -> Protocol:
  """Demo-speed variant of a protocol: `frames` per cycle on a square `matrix`.

  The field of view is `fov_fraction` of the protocol's (its larger side), scaled onto the new
  matrix: about 180-225 mm at 1.6-2.0 mm pixels for the built-in sites, which holds the heart
  and its surroundings at a resolution close to the protocol's, and keeps the sites' spacings
  distinct. `fov_fraction=1` keeps the whole field of view (coarser pixels).
  """
  if not 0.0 < fov_fraction <= 1.0:
    raise ValueError(f"fov_fraction must be in (0, 1], got {fov_fraction}")
  fov = max(p.matrix) * p.pixel_spacing_mm * fov_fraction
  return dataclasses.replace(p, frames_per_cycle=frames, matrix=(matrix, matrix),
                             pixel_spacing_mm=fov / matrix)


@dataclasses.dataclass(frozen=True)
class Plane:
  """A planned imaging plane (patient coordinates, mm).

  `row_dir` runs along a row (increasing column index), `col_dir` down a column; the normal
  `row_dir x col_dir` points through the slice (DICOM conventions).
  """

  view: str
  centre: np.ndarray
  row_dir: np.ndarray
  col_dir: np.ndarray
  slice_index: int
  description: str
  normal: np.ndarray = dataclasses.field(init=False)

  def __post_init__(self):
    object.__setattr__(self, "normal", np.cross(self.row_dir, self.col_dir))


@dataclasses.dataclass(frozen=True)
class Acquisition:
  """What one study's scan draws: geometry, contrast and scanner state."""

  pixel_spacing_mm: float
  slice_thickness_mm: float
  slice_gap_mm: float
  signals: dict[str, float]  # tissue -> signal (blood ~ 1)
  noise: float
  gain: float
  shading_gradient: np.ndarray  # (3,) log-sensitivity per SHADING_SCALE_MM
  shading_curvature: float
  heart_rate_bpm: float
  pose_rotation: np.ndarray  # [3, 3] body -> patient
  pose_shift: np.ndarray  # (3,) body origin in patient coordinates
  fov_offset_mm: np.ndarray  # (2,) heart offset from the image centre along rows, columns


def sample_acquisition(heart: heart_params.Heart, protocol: Protocol,
                       rng: np.random.Generator) -> Acquisition:
  """Draws the study-level acquisition parameters of one scan."""
  p = protocol
  spacing = p.pixel_spacing_mm * (1.0 + rng.uniform(-p.spacing_spread, p.spacing_spread))
  thickness = p.slice_thickness_mm + 0.5 * round(2.0 * rng.uniform(0.0, p.thickness_spread_mm))
  gap = p.slice_gap_mm + 0.5 * round(2.0 * rng.uniform(-p.gap_spread_mm, p.gap_spread_mm))
  signals = {t: getattr(p.contrast, t) * math.exp(rng.normal(0.0, p.contrast_jitter))
             for t in TISSUES}
  fov = min(p.matrix) * spacing
  offset = np.clip(rng.normal(0.0, p.fov_offset_mm, 2), -MAX_FOV_OFFSET * fov, MAX_FOV_OFFSET * fov)
  rotation = transform.Rotation.from_euler("xyz", rng.normal(0.0, POSE_ROTATION_SD_DEG),
                                           degrees=True)
  return Acquisition(
      pixel_spacing_mm=spacing, slice_thickness_mm=thickness, slice_gap_mm=gap, signals=signals,
      noise=p.noise * math.exp(rng.normal(0.0, p.noise_spread)),
      gain=math.exp(rng.normal(p.gain_log_mean, p.gain_log_sd)),
      shading_gradient=rng.normal(0.0, p.shading, 3), shading_curvature=rng.normal(0.0, p.shading),
      heart_rate_bpm=heart.heart_rate_bpm * math.exp(rng.normal(0.0, STUDY_HEART_RATE_SD)),
      pose_rotation=rotation.as_matrix(), pose_shift=rng.normal(0.0, POSE_SHIFT_SD_MM),
      fov_offset_mm=offset)


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """What rendering needs of a heart, computed once: model, torso, heart pose in the body."""

  model: heart_geometry.HeartModel
  torso: list[heart_geometry.Layer]
  texture: thorax.Texture
  axes: np.ndarray  # [3, 3] heart-frame axes (rows) in body coordinates
  origin: np.ndarray  # (3,) heart-frame origin in body coordinates
  box_lo: np.ndarray  # (3,) heart-frame box around every heart layer
  box_hi: np.ndarray


@functools.lru_cache(maxsize=64)
def anatomy_of(heart: heart_params.Heart) -> Anatomy:
  """The (cached) Anatomy of a heart."""
  model = heart_geometry.model_of(heart)
  return Anatomy(model, thorax.torso_layers(heart, model),
                 thorax.Texture(heart.torso.texture_seed), thorax.heart_axes(heart),
                 thorax.heart_origin(heart, model),
                 np.min([layer.box_lo for layer in model.layers], axis=0),
                 np.max([layer.box_hi for layer in model.layers], axis=0))


def _jitter(rng: np.random.Generator, sd_deg: float) -> np.ndarray:
  """A small random rotation [3, 3]: random axis, normal angle."""
  return transform.Rotation.from_rotvec(np.radians(rng.normal(0.0, sd_deg, 3)) / math.sqrt(3.0)
                                        ).as_matrix()


def plan_planes(heart: heart_params.Heart, protocol: Protocol, acq: Acquisition,
                rng: np.random.Generator) -> list[Plane]:
  """Plans the SAX stack (base to apex) and the 2CH, 3CH and 4CH planes, as a scanner would.

  SAX: perpendicular to the (jittered) LV long axis, first slice near the mitral plane, enough
  slices at thickness + gap spacing to pass the apex (within the protocol's range). 4CH: through
  the long axis and the RV; 2CH: through the long axis, perpendicular to the septal (LV-RV)
  direction; 3CH: through the long axis and the LV outflow tract/aortic root. Long-axis images
  show the apex at the top.
  """
  anatomy = anatomy_of(heart)
  rot = acq.pose_rotation
  ex, ey, ez = anatomy.axes @ rot.T  # heart axes in patient coordinates
  origin = acq.pose_shift + rot @ anatomy.origin
  base_height = float(anatomy.model.extremes.zb[0, 0])  # at end-diastole
  offset = acq.fov_offset_mm
  planes = []
  # Short-axis stack.
  apex_dir = _jitter(rng, protocol.planning_jitter_deg) @ -ez
  normal = -apex_dir
  row = -ex - (-ex).dot(normal) * normal
  row /= np.linalg.norm(row)
  col = np.cross(normal, row)
  spacing = acq.slice_thickness_mm + acq.slice_gap_mm
  first = rng.uniform(-0.4, 0.4) * spacing
  lo, hi = protocol.num_sax_slices
  count = int(np.clip(math.ceil((base_height - first) / spacing) + 1, lo, hi))
  base = origin + base_height * ez + rng.normal(0.0, PLANE_SHIFT_SD_MM, 3)
  for k in range(count):
    centre = base + (first + k * spacing) * apex_dir + offset[0] * row + offset[1] * col
    planes.append(Plane(types.SAX, centre, row, col, k,
                        protocol.sax_description.format(index=k + 1)))
  # Long-axis planes: in-plane direction e across the long axis, apex at the top.
  angle = math.radians(heart.aortic_angle_deg)
  across = {types.LAX_2CH: ey, types.LAX_3CH: math.cos(angle) * ex + math.sin(angle) * ey,
            types.LAX_4CH: ex}
  # Long-axis images are centred between the apex and the top of the left atrium.
  atrium_top = base_height + heart_geometry.ATRIUM_TOP_IN_RADII * heart.la_radius_mm
  mid = origin + 0.5 * atrium_top * ez
  for view, description in zip(types.LONG_AXIS_VIEWS, protocol.lax_descriptions):
    jitter = _jitter(rng, protocol.planning_jitter_deg)
    row, col = jitter @ -across[view], jitter @ ez
    centre = mid + rng.normal(0.0, PLANE_SHIFT_SD_MM, 3) + offset[0] * row + offset[1] * col
    missing = rng.random() < protocol.lax_missing_prob
    if not missing:
      planes.append(Plane(view, centre, row, col, -1, description))
  return planes


@functools.lru_cache(maxsize=1)
def _normal_quantiles() -> np.ndarray:
  """Standard normal quantiles at the centres of 2^16 equal-probability bins, float32."""
  return special.ndtri((np.arange(NOISE_LEVELS) + 0.5) / NOISE_LEVELS).astype(np.float32)


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Standard normal float32 noise by inverse-CDF lookup of 16-bit uniform integers.

  About 4x faster than `Generator.standard_normal` (the renderer's largest cost otherwise);
  tails are cut at 4.3 sd, which Rician image noise does not miss.
  """
  count = math.prod(shape)
  words = rng.integers(0, 1 << 32, (count + 1) // 2, dtype=np.uint32)  # two 16-bit draws each
  return np.take(_normal_quantiles(), words.view(np.uint16)[:count]).reshape(shape)


def _inside(points: heart_geometry.Points, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  """Boolean [P]: points inside the box [lo, hi]."""
  return ((points.x >= lo[0]) & (points.x <= hi[0]) & (points.y >= lo[1]) & (points.y <= hi[1])
          & (points.z >= lo[2]) & (points.z <= hi[2]))


def paint(layers: list[heart_geometry.Layer], points: heart_geometry.Points, image: np.ndarray,
          signals: dict[str, float], width_mm: float, states: heart_geometry.State | None = None,
          extremes: heart_geometry.State | None = None) -> None:
  """Paints layers over `image` [S, P] in order, in place: image += f * (signal - image).

  Each layer is evaluated only at the points inside its bounding box (grown by the edge width).
  With `extremes` (the ED and ES states), a layer is first evaluated at those two states only:
  its shapes are convex and move monotonically with the volume state, so a point well inside
  at both is inside at every frame (painted solid) and a point well outside both is outside at
  every frame (skipped); only the band between is evaluated per frame.

  Args:
    layers: in painter's order.
    points: [P] sample points in the layers' frame.
    image: [S, P] float32, painted in place.
    signals: tissue -> signal.
    width_mm: partial-volume edge width.
    states: [S] states for the layers' distances (None for static layers).
    extremes: [2] bounding states, or None to evaluate every point at every state.
  """
  by_name = {layer.name: layer for layer in layers}
  margin = width_mm + BOX_MARGIN_MM
  band = 0.5 * width_mm + BAND_SLACK_MM
  every = np.arange(points.x.size)
  extent_lo = np.array([points.x.min(), points.y.min(), points.z.min()]) if every.size else 0.0
  extent_hi = np.array([points.x.max(), points.y.max(), points.z.max()]) if every.size else 0.0

  def distance(layer, st, p):
    d = layer.distance(st, p)
    return d if layer.within is None else np.maximum(d, by_name[layer.within].distance(st, p))

  for layer in layers:
    lo, hi = layer.box_lo - margin, layer.box_hi + margin
    if (lo <= extent_lo).all() and (hi >= extent_hi).all():
      index, p = every, points
    elif (lo > extent_hi).any() or (hi < extent_lo).any():
      continue
    else:
      index = np.flatnonzero(_inside(points, lo, hi))
      p = points.take(index)
    signal = signals[layer.tissue]
    if extremes is not None and index.size:
      bounds = distance(layer, extremes, p)
      solid = bounds.max(axis=0) < -band
      outer = layer.walls[0][0] if layer.walls else 0.0
      moving = (bounds.min(axis=0) - outer < band) & ~solid
      image[:, index[solid]] = signal
      index = index[moving]
      p = p.take(moving)
    if index.size == 0:
      continue
    d = distance(layer, states, p)
    current = image[:, index]
    for offset, tissue in layer.walls:
      fraction = heart_geometry.soft_fraction(d - offset, width_mm)
      current += fraction * (signals[tissue] - current)
    fraction = heart_geometry.soft_fraction(d, width_mm)
    image[:, index] = current + fraction * (signal - current)


def render_cine(heart: heart_params.Heart, protocol: Protocol, acq: Acquisition, plane: Plane,
                rng: np.random.Generator) -> types.Cine:
  """Renders one cine of `plane`: [T, rows, cols] float32 in scanner units, with its geometry."""
  anatomy = anatomy_of(heart)
  model = anatomy.model
  rows, cols = protocol.matrix
  pixels = rows * cols
  frames = protocol.frames_per_cycle
  spacing = acq.pixel_spacing_mm
  rot = acq.pose_rotation
  # Breath-hold: this cine's anatomy is displaced by `shift` (patient coordinates).
  shift = rng.normal(0.0, protocol.misregistration_mm, 3) * np.array([1.0, 1.0, 2.0])
  heart_rate = acq.heart_rate_bpm * math.exp(rng.normal(0.0, CINE_HEART_RATE_SD))
  rr_ms = 60000.0 / heart_rate
  trigger_ms = rng.uniform(0.0, protocol.trigger_delay_ms) + np.arange(frames) * rr_ms / frames
  gain = acq.gain * math.exp(rng.normal(0.0, CINE_GAIN_SD))
  ipp = (plane.centre - 0.5 * (cols - 1) * spacing * plane.row_dir
         - 0.5 * (rows - 1) * spacing * plane.col_dir)
  ii = np.arange(rows, dtype=np.float32)[:, None]
  jj = np.arange(cols, dtype=np.float32)[None, :]

  def grid(rotation, start, depth=np.zeros(1)):
    """Coordinates [3][D * rows * cols] of the pixels in a rotated frame, D sub-planes deep."""
    d_row, d_col, d_depth = (rotation @ v for v in (plane.row_dir * spacing,
                                                    plane.col_dir * spacing, plane.normal))
    out = []
    for a in range(3):
      flat = np.float32(start[a]) + ii * np.float32(d_col[a]) + jj * np.float32(d_row[a])
      out.append((flat[None] + (depth * d_depth[a]).astype(np.float32)[:, None, None]).ravel())
    return out

  # Torso (body coordinates, textured), central sub-plane only.
  body = heart_geometry.Points(*grid(rot.T, rot.T @ (ipp - shift - acq.pose_shift)), None, None)
  static = np.zeros((1, pixels), np.float32)
  paint(anatomy.torso, body, static, acq.signals, spacing)
  static = static[0] * anatomy.texture(body.x, body.y, body.z)
  # Heart (heart frame), every frame, on sub-planes across the slice thickness.
  to_heart = anatomy.axes @ rot.T  # patient -> heart-frame rotation
  origin = acq.pose_shift + rot @ anatomy.origin
  k = protocol.profile_samples
  depth = acq.slice_thickness_mm * ((np.arange(k) + 0.5) / k - 0.5)
  every = heart_geometry.Points(*grid(to_heart, to_heart @ (ipp - shift - origin), depth), None,
                                None)
  margin = spacing + BOX_MARGIN_MM
  union = np.flatnonzero(_inside(every, anatomy.box_lo - margin, anatomy.box_hi + margin))
  pixel = union % pixels
  state = model.state(model.volume_state(trigger_ms / rr_ms, heart_rate))
  image = np.repeat(static[pixel][None], frames, axis=0)
  points = model.points(every.x[union], every.y[union], every.z[union])
  paint(model.layers, points, image, acq.signals, spacing, state, model.extremes)
  image -= static[pixel]
  image *= 1.0 / k
  signal = np.repeat(static[None], frames, axis=0)
  for s in range(k):  # average the sub-planes (slice profile)
    sel = slice(*np.searchsorted(union, [s * pixels, (s + 1) * pixels]))
    signal[:, pixel[sel]] += image[:, sel]
  # Scanner: coil shading (a smooth 3D field about the heart), gain, Rician noise.
  rel = np.stack([body.x, body.y, body.z]) / np.float32(SHADING_SCALE_MM)
  shading = np.exp(acq.shading_gradient.astype(np.float32) @ rel
                   + np.float32(acq.shading_curvature) * (np.sum(rel * rel, axis=0) - 0.5))
  signal *= shading
  noise = standard_normal(rng, (2, frames, pixels))
  noise *= np.float32(acq.noise)
  signal += noise[0]
  magnitude = np.sqrt(signal * signal + noise[1] * noise[1])
  magnitude *= np.float32(gain)
  return types.Cine(
      frames=magnitude.reshape(frames, rows, cols), pixel_spacing=(spacing, spacing),
      view=plane.view, trigger_times_ms=trigger_ms.astype(np.float32),
      slice_index=plane.slice_index,
      slice_position_mm=float(plane.centre @ plane.normal) if plane.view == types.SAX else math.nan,
      image_position=ipp, image_orientation=np.concatenate([plane.row_dir, plane.col_dir]),
      slice_thickness_mm=acq.slice_thickness_mm, series_description=plane.description)
