"""The synthetic heart in space: its states, signed-distance shapes, layers and voxel volumes.

`HeartModel` extends the closed-form `heart_params.HeartCycle` of a `Heart` with the geometry
the scanner renders: the LV cavity and epicardium (the truncated spheroids with their RWMA), the
RV, both atria, the papillary muscles and the aortic root, each a `Layer` with a cycle-wide
bounding box, and the voxel integration of their occupancy that the closed forms are tested
against.

Heart frame (mm): origin at the epicardial LV apex; z along the long axis from apex to base; x
from the LV axis towards the right ventricle (the septal direction); y completes the frame on
the anterior side. Angles about the long axis are measured from +x (septum, 0 deg) towards +y
(anterior, 90 deg); lateral is 180 deg and inferior -90 deg.

All shapes are signed-distance approximations (negative inside) evaluated on arrays of points,
with a state axis first: state arrays are [S, 1], point arrays [P], results [S, P].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import numpy as np

from cmr_jax.phantom import heart_params

# Geometry of the structures around the LV (mm or fractions of the LV size).
RV_SEPTAL_EDGE = 0.2  # RV spheroid's septal extreme, in units of the LV ED radius, inside the LV
RV_TOP_ABOVE_BASE_MM = 15.0
RV_APEX_HEIGHT = 0.15  # RV apex height above the LV apex, fraction of the ED base height
RV_WALL_MM = 3.0
ATRIAL_WALL_MM = 2.0
ATRIAL_ELONGATION = 1.3  # atrial semi-axis along the long axis, in atrial radii
ATRIUM_CENTRE_HEIGHT = 0.5  # atrial centre above the base plane, in atrial long semi-axes
ATRIUM_TOP_IN_RADII = (1.0 + ATRIUM_CENTRE_HEIGHT) * ATRIAL_ELONGATION
LA_SYSTOLIC_GROWTH = 0.35  # LA volume gain over ventricular systole
RA_SYSTOLIC_GROWTH = 0.25
AORTA_WALL_MM = 2.0
AORTA_LENGTH_MM = 55.0
AORTA_BELOW_BASE_MM = 6.0  # the lumen reaches below the mitral plane: the LV outflow tract
AORTA_OFFSET = 0.45  # aortic valve centre distance from the LV axis, in LV ED radii
PAPILLARY_ANGLES_DEG = (140.0, -125.0)  # anterolateral, posteromedial
PAPILLARY_RADIUS = 0.15  # in LV ED radii
PAPILLARY_OFFSET = 0.62  # distance from the axis, in current LV radii
PAPILLARY_ZETA = (-0.75, -0.05)  # extent along the cavity's normalised long axis

_EPS = 1e-6


def _spheroid_distance(rho2: np.ndarray, dz: np.ndarray, a: np.ndarray, c: np.ndarray
                       ) -> np.ndarray:
  """Approximate signed distance to rho^2/a^2 + dz^2/c^2 = 1: (q - 1) / |grad q|.

  Exact for spheres, first-order accurate at the surface, and growing linearly far from it.
  """
  ia2 = 1.0 / (a * a)
  ic2 = 1.0 / (c * c)
  dz2 = dz * dz
  r_term = rho2 * ia2
  z_term = dz2 * ic2
  q = np.sqrt(r_term + z_term)
  grad = np.sqrt(np.maximum(r_term * ia2 + z_term * ic2, _EPS * _EPS))  # |grad q| * q
  return (q - 1.0) * q / grad


def ellipsoid_distance(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, ax: np.ndarray,
                       ay: np.ndarray, az: np.ndarray) -> np.ndarray:
  """Approximate signed distance to an axis-aligned ellipsoid centred at 0: (q - 1) / |grad q|.

  An infinite semi-axis gives an elliptic cylinder.
  """
  ix, iy, iz = 1.0 / (ax * ax), 1.0 / (ay * ay), 1.0 / (az * az)
  tx, ty, tz = dx * ix, dy * iy, dz * iz
  q = np.sqrt(dx * tx + dy * ty + dz * tz)
  grad = np.sqrt(np.maximum(tx * tx + ty * ty + tz * tz, _EPS * _EPS))  # |grad q| * q
  return (q - 1.0) * q / grad


def soft_fraction(distance: np.ndarray, width_mm: float) -> np.ndarray:
  """Partial-volume occupancy: 1 deep inside, 0 outside, linear over `width_mm` at the surface."""
  return np.clip(0.5 - distance * (1.0 / width_mm), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Points:
  """Sample points (heart or body frame) as arrays that broadcast together, usually [P].

  Voxel grids use [1, P] in-plane arrays against a [Nz, 1] z for one state at a time.
  """

  x: np.ndarray
  y: np.ndarray
  z: np.ndarray
  rho2: np.ndarray | None  # x^2 + y^2 (None where no shape needs it)
  g: np.ndarray | None  # [P] angular RWMA bump, None for a heart without RWMA

  def take(self, index: np.ndarray) -> Points:
    """The subset of points at `index`."""
    pick = lambda a: None if a is None else a[index]
    return Points(self.x[index], self.y[index], self.z[index], pick(self.rho2), pick(self.g))


@dataclasses.dataclass(frozen=True)
class State:
  """Geometry of the heart at S states of the cycle; every field is [S, 1] (float32)."""

  v: np.ndarray  # spheroid volume over its ED volume
  systole: np.ndarray  # systolic progress 0 (ED) .. 1 (ES)
  r: np.ndarray  # LV cavity short semi-axis (healthy wall)
  l: np.ndarray  # LV cavity long semi-axis
  zc: np.ndarray  # LV spheroid centre height
  zb: np.ndarray  # base (mitral) plane height
  ro: np.ndarray  # epicardial short semi-axis (healthy wall)
  lo: np.ndarray  # epicardial long semi-axis
  rv_cx: np.ndarray
  rv_ax: np.ndarray
  rv_cz: np.ndarray
  rv_az: np.ndarray
  la_scale: np.ndarray
  ra_scale: np.ndarray


@dataclasses.dataclass(frozen=True)
class Layer:
  """One structure the renderer paints, in painter's order.

  Attributes:
    name: identifies the structure.
    tissue: the tissue class whose signal it is painted with.
    distance: signed distance (mm, negative inside) at points for states, [S, P].
    box_lo: (3,) heart-frame bounding box of the structure over the whole cycle, mm.
    box_hi: (3,)
    within: name of a layer whose occupancy limits this one (papillary muscles in the cavity).
    walls: layers around the structure, painted before it from the outside in, each as
      (offset_mm, tissue): the structure's surface offset outwards by offset_mm (decreasing
      offsets); the box includes them.
  """

  name: str
  tissue: str
  distance: Callable[[State, Points], np.ndarray]
  box_lo: np.ndarray
  box_hi: np.ndarray
  within: str | None = None
  walls: tuple[tuple[float, str], ...] = ()


class HeartModel(heart_params.HeartCycle):
  """The deforming heart of one `Heart`: states, shapes, closed-form and voxel volumes."""

  def __init__(self, heart: heart_params.Heart):
    super().__init__(heart)
    self.extremes = self.state(np.array([1.0, heart.es_state]))  # ED and ES: bound every frame
    self._base_range = (float(self.extremes.zb[0, 0]), float(self.extremes.zb[1, 0]))
    self.layers = self._make_layers()

  # --- states -----------------------------------------------------------------------------------

  def state(self, v: np.ndarray) -> State:
    """Geometry at volume states v [S] (1 = end-diastole, heart.es_state = end-systole)."""
    h = self.heart
    v = np.asarray(v, np.float64)
    r, l, zc, zb = self._shape(v)
    systole = np.clip((1.0 - v) / max(1.0 - h.es_state, _EPS), 0.0, 1.0)
    ro = self._epicardial_radius(v)
    x_sept = RV_SEPTAL_EDGE * self.r_ed
    rv_ax = 0.5 * (self.ro_ed + h.rv_extent_mm - x_sept) * (1.0 - h.rv_contraction * systole)
    rv_apex = RV_APEX_HEIGHT * (h.apex_thickness_mm + (1.0 + self.f) * self.l_ed)
    rv_top = zb + RV_TOP_ABOVE_BASE_MM
    col = lambda a: np.asarray(a, np.float32).reshape(-1, 1)
    return State(
        v=col(v), systole=col(systole), r=col(r), l=col(l), zc=col(zc), zb=col(zb), ro=col(ro),
        lo=col(zc), rv_cx=col(x_sept + rv_ax), rv_ax=col(rv_ax),
        rv_cz=col(0.5 * (rv_top + rv_apex)), rv_az=col(0.5 * (rv_top - rv_apex)),
        la_scale=col((1.0 + LA_SYSTOLIC_GROWTH * systole) ** (1.0 / 3.0)),
        ra_scale=col((1.0 + RA_SYSTOLIC_GROWTH * systole) ** (1.0 / 3.0)))

  # --- shapes -----------------------------------------------------------------------------------

  def rwma_weight(self, x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Angular bump g(theta) [P] at heart-frame points, or None without an RWMA."""
    if not self.severity:
      return None
    rho = np.sqrt(x * x + y * y) + _EPS
    cos = (x * self.rwma_dir[0] + y * self.rwma_dir[1]) / rho
    return (0.5 + 0.5 * cos) ** self.heart.rwma_sharpness

  def points(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Points:
    """Points from heart-frame coordinate arrays (flattened, float32)."""
    x, y, z = (np.asarray(a, np.float32).ravel() for a in (x, y, z))
    return Points(x, y, z, x * x + y * y, self.rwma_weight(x, y))

  def _radius(self, r: np.ndarray, r_ed: float, zeta: np.ndarray, f: np.ndarray, p: Points
              ) -> np.ndarray:
    """Local short semi-axis with the RWMA: r + s * g * h * (r_ed - r), [S, P] or [S, 1]."""
    if p.g is None:
      return r
    xi = (f - zeta) / (1.0 + f)
    h = self.h_base + (self.h_apex - self.h_base) * xi
    return r + (self.severity * (r_ed - r)) * (p.g * h)

  def lv_cavity_distance(self, st: State, p: Points) -> np.ndarray:
    """Signed distance [S, P] to the LV cavity (the truncated spheroid with its RWMA)."""
    dz = p.z - st.zc
    radius = self._radius(st.r, self.r_ed, dz / st.l, self.f, p)
    return np.maximum(_spheroid_distance(p.rho2, dz, radius, st.l), p.z - st.zb)

  def lv_epicardium_distance(self, st: State, p: Points) -> np.ndarray:
    """Signed distance [S, P] to the LV epicardial surface (cavity and myocardium inside)."""
    dz = p.z - st.zc
    fo = (st.zb - st.zc) / st.lo
    radius = self._radius(st.ro, np.float32(self.ro_ed), dz / st.lo, fo, p)
    return np.maximum(_spheroid_distance(p.rho2, dz, radius, st.lo), p.z - st.zb)

  def _rv_distance(self, st: State, p: Points) -> np.ndarray:
    """Signed distance to the RV: an ellipsoid whose septal side sits inside the LV."""
    ay = np.float32(self.heart.rv_width * self.ro_ed)
    d = ellipsoid_distance(p.x - st.rv_cx, p.y, p.z - st.rv_cz, st.rv_ax, ay, st.rv_az)
    return np.maximum(d, p.z - st.zb)

  def _atrium(self, centre_xy: tuple[float, float], radius: float,
              scale_of: Callable[[State], np.ndarray]) -> Callable[[State, Points], np.ndarray]:
    """Distance function of an atrium: an ellipsoid on its floor, growing in systole.

    The floor is the base plane, or between it and its end-diastolic height (`atrial_follow`).
    """
    cx, cy = centre_xy
    zb_ed, stay = self._base_range[0], 1.0 - self.heart.atrial_follow

    def distance(st: State, p: Points) -> np.ndarray:
      r = radius * scale_of(st)
      az = ATRIAL_ELONGATION * r
      floor = st.zb + stay * (zb_ed - st.zb)
      d = ellipsoid_distance(p.x - cx, p.y - cy, p.z - (floor + ATRIUM_CENTRE_HEIGHT * az), r,
                             0.9 * r, az)
      return np.maximum(d, floor - p.z)

    return distance

  def _aorta(self, wall: float, below_base: float):
    """Aortic root and ascending aorta: a capsule from below the base plane; (distance, box)."""
    h = self.heart
    angle, tilt = math.radians(h.aortic_angle_deg), math.radians(h.aortic_tilt_deg)
    axis = np.array([math.sin(tilt) * math.cos(angle), math.sin(tilt) * math.sin(angle),
                     math.cos(tilt)])
    ux, uy, uz = axis
    ox = AORTA_OFFSET * self.r_ed * math.cos(angle)
    oy = AORTA_OFFSET * self.r_ed * math.sin(angle)
    radius = h.aortic_radius_mm + wall

    def distance(st: State, p: Points) -> np.ndarray:
      dx = p.x - ox
      dy = p.y - oy
      dz = p.z - (st.zb - AORTA_BELOW_BASE_MM)
      t = np.clip(dx * ux + dy * uy + dz * uz, 0.0, AORTA_LENGTH_MM)
      ex, ey, ez = dx - t * ux, dy - t * uy, dz - t * uz
      d = np.sqrt(ex * ex + ey * ey + ez * ez) - radius
      return np.maximum(d, (st.zb - below_base) - p.z)

    ends = [np.array([ox, oy, zb - AORTA_BELOW_BASE_MM]) + t * axis
            for zb in self._base_range for t in (0.0, AORTA_LENGTH_MM)]
    return distance, np.min(ends, axis=0) - radius, np.max(ends, axis=0) + radius

  def _papillary(self, angle_deg: float):
    """A papillary muscle: a capsule parallel to the axis inside the cavity; (distance, box)."""
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    lo, hi = PAPILLARY_ZETA

    def distance(st: State, p: Points) -> np.ndarray:
      offset = PAPILLARY_OFFSET * st.r
      dx, dy = p.x - offset * cos, p.y - offset * sin
      zc = np.clip(p.z, st.zc + lo * st.l, st.zc + hi * st.l)
      dz = p.z - zc
      radius = PAPILLARY_RADIUS * self.r_ed * np.sqrt(self.l_ed / st.l)
      return np.sqrt(dx * dx + dy * dy + dz * dz) - radius

    ends = self.state(np.array([1.0, self.heart.es_state]))
    radius = PAPILLARY_RADIUS * self.r_ed * math.sqrt(self.l_ed / float(ends.l.min()))
    centres = PAPILLARY_OFFSET * ends.r[:, 0, None] * np.array([cos, sin])  # [2, 2]
    box_lo = [centres[:, 0].min(), centres[:, 1].min(), float((ends.zc + lo * ends.l).min())]
    box_hi = [centres[:, 0].max(), centres[:, 1].max(), float((ends.zc + hi * ends.l).max())]
    return distance, np.array(box_lo) - radius, np.array(box_hi) + radius

  def _make_layers(self) -> list[Layer]:
    """The heart's structures in painter's order, with cycle-wide bounding boxes."""
    h = self.heart
    ed = self.state(np.array([1.0]))
    zb_max, zb_min = self._base_range[0], self._base_range[1]
    r_max = self.ro_ed + 1.0
    la_xy = (-0.1 * self.r_ed, -0.25 * self.r_ed)
    ra_xy = (self.ro_ed + 0.5 * h.rv_extent_mm, -0.25 * self.r_ed)

    def atrium_box(xy, radius, growth):
      r = radius * (1.0 + growth) ** (1 / 3) + ATRIAL_WALL_MM
      return (np.array([xy[0] - r, xy[1] - r, zb_min]),
              np.array([xy[0] + r, xy[1] + r, zb_max + ATRIUM_TOP_IN_RADII * r]))

    rv_ay = h.rv_width * self.ro_ed + RV_WALL_MM
    rv_bottom = float(ed.rv_cz[0, 0] - ed.rv_az[0, 0])
    rv_box = (np.array([RV_SEPTAL_EDGE * self.r_ed, -rv_ay, rv_bottom]),
              np.array([self.ro_ed + h.rv_extent_mm + RV_WALL_MM, rv_ay, zb_max]))
    lv_box = (np.array([-r_max, -r_max, 0.0]), np.array([r_max, r_max, zb_max]))
    la_box = atrium_box(la_xy, h.la_radius_mm, LA_SYSTOLIC_GROWTH)
    ra_box = atrium_box(ra_xy, h.ra_radius_mm, RA_SYSTOLIC_GROWTH)
    la_scale = lambda st: st.la_scale
    ra_scale = lambda st: st.ra_scale
    layers = [
        Layer("ra", "blood", self._atrium(ra_xy, h.ra_radius_mm, ra_scale), *ra_box,
              walls=((ATRIAL_WALL_MM, "myocardium"),)),
        Layer("la", "blood", self._atrium(la_xy, h.la_radius_mm, la_scale), *la_box,
              walls=((ATRIAL_WALL_MM, "myocardium"),)),
        Layer("rv", "blood", self._rv_distance, *rv_box, walls=((RV_WALL_MM, "myocardium"),)),
        Layer("lv_epicardium", "myocardium", self.lv_epicardium_distance, *lv_box),
        Layer("lv_cavity", "blood", self.lv_cavity_distance, *lv_box),
    ]
    layers += [Layer(f"papillary_{i}", "myocardium", *self._papillary(a), within="lv_cavity")
               for i, a in enumerate(PAPILLARY_ANGLES_DEG)]
    layers += [Layer("aorta_wall", "myocardium", *self._aorta(AORTA_WALL_MM, 0.0)),
               Layer("aorta", "blood", *self._aorta(0.0, AORTA_BELOW_BASE_MM))]
    return layers

  # --- voxel volumes ----------------------------------------------------------------------------

  def _grid(self, lo: np.ndarray, hi: np.ndarray, voxel_mm: float) -> Points:
    """Voxel centres covering the box [lo, hi] as broadcastable points.

    x, y, rho2 and g are [1, Nx * Ny] and z is [Nz, 1], so shapes evaluate to [Nz, Nx * Ny]
    for one state without materialising the 3D grid of coordinates.
    """
    x, y, z = (np.arange(a + 0.5 * voxel_mm, b, voxel_mm, dtype=np.float32)
               for a, b in zip(lo, hi))
    plane = self.points(*np.meshgrid(x, y, np.zeros(1, np.float32), indexing="ij"))
    row = lambda a: None if a is None else a[None]
    return Points(row(plane.x), row(plane.y), z[:, None], row(plane.rho2), row(plane.g))

  def voxel_volumes_mm3(self, v: np.ndarray, voxel_mm: float = 1.25,
                        structures: tuple[str, ...] = ("lv_cavity",)) -> dict[str, np.ndarray]:
    """Volumes (mm^3) by voxel integration of the rendered occupancy at volume states v [S].

    Sums the same partial-volume occupancy the renderer paints (ramp width = voxel size) over
    a voxel grid covering the structure's cycle-wide box.

    Args:
      v: [S] volume states.
      voxel_mm: grid spacing.
      structures: any of "lv_cavity" (papillary muscles included, as in clinical practice),
        "lv_myocardium" (epicardium minus cavity) and "rv_cavity" (RV minus its overlap with
        the LV).

    Returns:
      Dict of [S] arrays, one per structure.
    """
    unknown = set(structures) - {"lv_cavity", "lv_myocardium", "rv_cavity"}
    if unknown:
      raise ValueError(f"unknown structures {sorted(unknown)}")
    by_name = {layer.name: layer for layer in self.layers}
    cavity, epi, rv = by_name["lv_cavity"], by_name["lv_epicardium"], by_name["rv"]
    margin = 2.0 * voxel_mm
    if "lv_myocardium" in structures:
      box = (epi.box_lo, epi.box_hi)
    else:  # the cavity never reaches beyond its ED radius (an RWMA only slows it down)
      box = (np.array([-self.r_ed, -self.r_ed, 0.0]),
             np.array([self.r_ed, self.r_ed, epi.box_hi[2]]))
    grid = self._grid(box[0] - margin, box[1] + margin, voxel_mm)
    if "rv_cavity" in structures:
      rv_grid = self._grid(rv.box_lo - margin, rv.box_hi + margin, voxel_mm)
    cell = voxel_mm**3
    out = {name: np.zeros(np.size(v)) for name in structures}
    for i, vi in enumerate(np.atleast_1d(v)):
      st = self.state(np.array([vi]))  # one state: fields [1, 1] broadcast over the grid
      frac = lambda layer, points: soft_fraction(layer.distance(st, points), voxel_mm)
      if "lv_cavity" in structures or "lv_myocardium" in structures:
        cavity_frac = frac(cavity, grid)
        if "lv_cavity" in structures:
          out["lv_cavity"][i] = cavity_frac.sum(dtype=np.float64) * cell
        if "lv_myocardium" in structures:
          out["lv_myocardium"][i] = (frac(epi, grid) - cavity_frac).sum(dtype=np.float64) * cell
      if "rv_cavity" in structures:
        rv_frac = frac(rv, rv_grid) * (1.0 - frac(epi, rv_grid))
        out["rv_cavity"][i] = rv_frac.sum(dtype=np.float64) * cell
    return out


@functools.lru_cache(maxsize=64)
def model_of(heart: heart_params.Heart) -> HeartModel:
  """The (cached) HeartModel of a heart."""
  return HeartModel(heart)


def cavity_volumes_ml(heart: heart_params.Heart, num_phases: int = 20, voxel_mm: float = 1.25
                      ) -> np.ndarray:
  """LV cavity volume curve (mL) [num_phases] at phases k / num_phases, by voxel integration."""
  if num_phases < 1:
    raise ValueError(f"num_phases must be >= 1, got {num_phases}")
  model = model_of(heart)
  v = model.volume_state(np.arange(num_phases) / num_phases)
  return model.voxel_volumes_mm3(v, voxel_mm)["lv_cavity"] * heart_params.ML_PER_MM3
