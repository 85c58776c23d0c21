"""Anatomy and motion of the synthetic heart: parameters, sampling, deformation and volumes.

The left ventricle (LV) is a truncated prolate spheroid: its cavity is
`rho^2 / a^2 + zeta^2 < 1` with `zeta = (z - z_c) / L`, cut by the mitral (base) plane at
`zeta = f`. Over the cycle the spheroid's volume follows a volume curve; a share of the volume
change is longitudinal (the base descends towards the fixed apex) and the rest radial. The
epicardium is a spheroid about the same centre, reaching the fixed apex, whose short semi-axis
is solved at every phase to conserve the myocardial volume exactly, so the wall thickens as the
cavity empties. A
regional wall-motion abnormality (RWMA) makes a coronary territory of both surfaces move less:
there the radius is `R + s * k * (R_ed - R)` with `k = g(theta) * h(xi)`, `g` an angular bump
`cos^(2n)((theta - theta0) / 2)` and `h` linear from base to apex, `s` the severity. Every volume
in this model has a closed form (polynomial moments of `h`, binomial moments of `g`), which the
voxel integration of the rendered occupancy is tested against.

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
from scipy import interpolate, optimize

ML_PER_MM3 = 1e-3

# Motion constants.
APEX_THICKENING = 0.6  # relative apical wall thickening from end-diastole to full emptying
MIN_VOLUME_STATE = 0.08  # smallest ES/ED ratio of the spheroid's volume (EF ~90% without RWMA)
ISOVOLUMIC_CONTRACTION_MS = 40.0
ISOVOLUMIC_RELAXATION_MS = 70.0
EARLY_FILLING_MS = 160.0
ATRIAL_FILLING_MS = 170.0
MIN_DIASTASIS_MS = 10.0
SYSTOLE_MS_AT_1S_RR = 330.0  # end-systole time at RR = 1000 ms; scales with sqrt(RR)

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


@dataclasses.dataclass(frozen=True)
class Territory:
  """A coronary territory: where its RWMA sits about the long axis and from base to apex."""

  angle_deg: float  # centre of the angular bump (0 septum, 90 anterior)
  apex_weight: float  # h at the apex
  base_weight: float  # h at the base


TERRITORIES: dict[str, Territory] = {
    "LAD": Territory(55.0, 1.0, 0.45),  # anterior and anteroseptal walls and the apex
    "RCA": Territory(-65.0, 0.5, 1.0),  # inferior and inferoseptal walls
    "LCx": Territory(-155.0, 0.5, 1.0),  # lateral and inferolateral walls
}
_TERRITORY_PROBS = {"LAD": 0.5, "RCA": 0.3, "LCx": 0.2}


@dataclasses.dataclass(frozen=True)
class Torso:
  """The subject's body around the heart, in body coordinates (LPS axes, origin at the heart)."""

  half_width_mm: float  # body ellipse semi-axis, left-right
  half_depth_mm: float  # body ellipse semi-axis, anterior-posterior
  fat_mm: float  # subcutaneous fat
  muscle_mm: float  # chest wall muscle
  centre_right_mm: float  # body centre lies this far to the patient's right of the heart
  centre_posterior_mm: float  # ... and this far posterior
  diaphragm_below_apex_mm: float  # diaphragm dome below the lowest point of the LV apex
  lung_scale: float
  texture_seed: int  # seeds the subject's tissue texture (phantom_body.Texture)


@dataclasses.dataclass(frozen=True)
class Heart:
  """One subject's cardiac anatomy and function (and body), all in mm, degrees or fractions."""

  lv_radius_mm: float  # LV cavity short semi-axis at end-diastole
  lv_semi_long_mm: float  # LV cavity long semi-axis at end-diastole
  lv_truncation: float  # f: the base plane is at zeta = f
  wall_thickness_mm: float  # LV wall thickness at end-diastole (septal/free wall)
  apex_thickness_mm: float  # apical wall thickness at end-diastole
  es_state: float  # end-systolic volume of the LV spheroid over its ED volume (before RWMA)
  longitudinal_share: float  # exponent: share of the volume change done by base descent
  rwma_territory: str  # "" for none, else a key of TERRITORIES
  rwma_severity: float  # 0 normal .. 1 akinetic
  rwma_angle_deg: float  # territory centre (the territory's nominal angle, jittered)
  rwma_sharpness: int  # n of the angular bump cos^(2n)
  rv_extent_mm: float  # how far the RV free wall stands out beyond the LV epicardium at ED
  rv_width: float  # RV semi-axis across (y) in LV ED epicardial radii
  rv_contraction: float  # fractional inward motion of the RV free wall over systole
  la_radius_mm: float
  ra_radius_mm: float
  aortic_angle_deg: float  # direction of the LV outflow tract about the long axis
  aortic_tilt_deg: float  # ascending aorta's tilt away from the long axis
  aortic_radius_mm: float
  apex_azimuth_deg: float  # long axis in the axial plane, from patient left towards anterior
  apex_elevation_deg: float  # long axis below the axial plane (apex inferior)
  septal_roll_deg: float  # rotation of the septal direction about the long axis
  heart_rate_bpm: float
  systole_scale: float  # multiplies the nominal end-systolic time
  early_filling_fraction: float  # share of the diastolic filling done by the E wave
  diastasis_fraction: float  # share filled during diastasis (the rest is the atrial kick)
  torso: Torso


def _cavity_polynomial_moments(f: np.ndarray, h_apex: float, h_base: float
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Integrals over zeta in [-1, f] of (1 - zeta^2) * h^p for p = 0, 1, 2.

  h is linear in xi = (f - zeta) / (1 + f): h_base at the base plane, h_apex at the apex, so
  h = alpha + beta * zeta and the integrals are sums of I_k = int (1 - zeta^2) zeta^k.

  Args:
    f: [S] truncation of the spheroid.
    h_apex: h at zeta = -1.
    h_base: h at zeta = f.

  Returns:
    Three arrays [S].
  """
  f = np.asarray(f, np.float64)
  moment = lambda k: (f ** (k + 1) - (-1.0) ** (k + 1)) / (k + 1) - (
      f ** (k + 3) - (-1.0) ** (k + 3)) / (k + 3)
  i0, i1, i2 = moment(0), moment(1), moment(2)
  beta = (h_base - h_apex) / (1.0 + f)
  alpha = h_apex + beta
  return i0, alpha * i0 + beta * i1, alpha * alpha * i0 + 2.0 * alpha * beta * i1 + beta * beta * i2


def _bump_moments(sharpness: int) -> tuple[float, float, float]:
  """Integrals over theta of g^p for p = 0, 1, 2, with g = cos^(2n)(theta / 2)."""
  n = sharpness
  return (2.0 * math.pi, 2.0 * math.pi * math.comb(2 * n, n) / 4.0**n,
          2.0 * math.pi * math.comb(4 * n, 2 * n) / 16.0**n)


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


class HeartModel:
  """The deforming heart of one `Heart`: states, shapes, closed-form and voxel volumes."""

  def __init__(self, heart: Heart):
    self.heart = heart
    h = heart
    self.f = h.lv_truncation
    self.r_ed = h.lv_radius_mm
    self.l_ed = h.lv_semi_long_mm
    self.ro_ed = h.lv_radius_mm + h.wall_thickness_mm
    self.severity = h.rwma_severity if h.rwma_territory else 0.0
    if h.rwma_territory:
      territory = TERRITORIES[h.rwma_territory]
      self.h_apex, self.h_base = territory.apex_weight, territory.base_weight
      self.bump = _bump_moments(h.rwma_sharpness)
      angle = math.radians(h.rwma_angle_deg)
      self.rwma_dir = (math.cos(angle), math.sin(angle))
    else:
      self.h_apex = self.h_base = 0.0
      self.bump = _bump_moments(1)
    lo_ed = h.apex_thickness_mm + self.l_ed
    epicardial_volume = self._modulated_volume(self.ro_ed, self.ro_ed, lo_ed,
                                               np.array([self.f * self.l_ed / lo_ed]))[0]
    self.myocardial_volume_mm3 = float(epicardial_volume
                                       - self.cavity_volume_mm3(np.array([1.0]))[0])
    self.extremes = self.state(np.array([1.0, h.es_state]))  # ED and ES: bound every frame
    self._base_range = (float(self.extremes.zb[0, 0]), float(self.extremes.zb[1, 0]))
    self.layers = self._make_layers()

  # --- closed forms -----------------------------------------------------------------------------

  def _modulated_coefficients(self, r_ed: float, l: np.ndarray, f: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficients (A, B, C) with V = A r^2 + B r + C for a surface with ED radius r_ed."""
    m0, m1, m2 = _cavity_polynomial_moments(f, self.h_apex, self.h_base)
    g0, g1, g2 = self.bump
    s = self.severity
    half_l = 0.5 * np.asarray(l, np.float64)
    a = half_l * (g0 * m0 - 2 * s * g1 * m1 + s * s * g2 * m2)
    b = half_l * (2 * s * r_ed * g1 * m1 - 2 * s * s * r_ed * g2 * m2)
    c = half_l * (s * s * r_ed * r_ed * g2 * m2)
    return a, b, c

  def _modulated_volume(self, r: np.ndarray, r_ed: float, l: np.ndarray, f: np.ndarray
                        ) -> np.ndarray:
    """Volume (mm^3) of a truncated spheroid with RWMA: int int (1/2) R_eff^2 dtheta dz."""
    a, b, c = self._modulated_coefficients(r_ed, l, f)
    r = np.asarray(r, np.float64)
    return a * r * r + b * r + c

  def _shape(self, v: np.ndarray) -> tuple[np.ndarray, ...]:
    """LV cavity (short, long) semi-axes and (centre, base) heights at volume states v [S]."""
    h = self.heart
    v = np.asarray(v, np.float64)
    r = self.r_ed * v ** ((1.0 - h.longitudinal_share) / 2.0)
    l = self.l_ed * v ** h.longitudinal_share
    apex = h.apex_thickness_mm * (1.0 + APEX_THICKENING * (1.0 - v))
    zc = apex + l
    return r, l, zc, zc + self.f * l

  def cavity_volume_mm3(self, v: np.ndarray) -> np.ndarray:
    """Closed-form LV cavity volume (mm^3) at volume states v [S] (RWMA included)."""
    r, l, _, _ = self._shape(v)
    return self._modulated_volume(r, self.r_ed, l, self.f)

  def _epicardial_radius(self, v: np.ndarray) -> np.ndarray:
    """Epicardial short semi-axis conserving the myocardial volume at volume states v [S]."""
    r, l, zc, zb = self._shape(v)
    lo = zc
    fo = (zb - zc) / lo
    a, b, c = self._modulated_coefficients(self.ro_ed, lo, fo)
    target = self.cavity_volume_mm3(v) + self.myocardial_volume_mm3
    return (-b + np.sqrt(b * b - 4.0 * a * (c - target))) / (2.0 * a)

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

  def volume_state(self, phases: np.ndarray, heart_rate_bpm: float | None = None) -> np.ndarray:
    """Volume state v [F] at cycle phases [F] (fractions of RR after the R wave).

    Isovolumic contraction, ejection to end-systole, isovolumic relaxation, early (E) filling,
    diastasis and atrial (A) filling, as a monotone piecewise cubic through those knots.
    """
    h = self.heart
    rr = 60000.0 / (heart_rate_bpm or h.heart_rate_bpm)
    t_es = SYSTOLE_MS_AT_1S_RR * h.systole_scale * math.sqrt(rr / 1000.0)
    t_fill = t_es + ISOVOLUMIC_RELAXATION_MS
    diastole = rr - t_fill
    squeeze = min(1.0, (diastole - MIN_DIASTASIS_MS) / (EARLY_FILLING_MS + ATRIAL_FILLING_MS))
    t_e = t_fill + EARLY_FILLING_MS * squeeze
    t_a = rr - ATRIAL_FILLING_MS * squeeze
    e = h.early_filling_fraction
    knots_t = [0.0, ISOVOLUMIC_CONTRACTION_MS, t_es, t_fill, t_e, t_a, rr]
    knots_f = [1.0, 1.0, 0.0, 0.0, e, e + h.diastasis_fraction, 1.0]
    filling = interpolate.PchipInterpolator(knots_t, knots_f)
    t = np.mod(np.asarray(phases, np.float64), 1.0) * rr
    return h.es_state + (1.0 - h.es_state) * filling(t)

  def end_systolic_phase(self, heart_rate_bpm: float | None = None) -> float:
    """Phase (fraction of RR) of end-systole."""
    rr = 60000.0 / (heart_rate_bpm or self.heart.heart_rate_bpm)
    return SYSTOLE_MS_AT_1S_RR * self.heart.systole_scale * math.sqrt(rr / 1000.0) / rr

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
    """Distance function of an atrium: an ellipsoid on the base plane, growing in systole."""
    cx, cy = centre_xy

    def distance(st: State, p: Points) -> np.ndarray:
      r = radius * scale_of(st)
      az = ATRIAL_ELONGATION * r
      d = ellipsoid_distance(p.x - cx, p.y - cy, p.z - (st.zb + ATRIUM_CENTRE_HEIGHT * az), r,
                             0.9 * r, az)
      return np.maximum(d, st.zb - p.z)

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
def model_of(heart: Heart) -> HeartModel:
  """The (cached) HeartModel of a heart."""
  return HeartModel(heart)


def _truncated_normal(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float
                      ) -> float:
  """A normal draw redrawn until it falls in [lo, hi]."""
  while True:
    x = rng.normal(mean, sd)
    if lo <= x <= hi:
      return float(x)


# Population model.
REDUCED_EF_FRACTION = 0.2
REDUCED_EF_RANGE = (10.0, 40.0)
NORMAL_EF_MEAN, NORMAL_EF_SD, NORMAL_EF_RANGE = 61.0, 7.5, (40.0, 80.0)


def sample_heart(rng: np.random.Generator) -> Heart:
  """Draws one subject's heart: anatomy, function, orientation, heart rate and body.

  LVEF is drawn first (a fifth of subjects in 10-40%, the rest about 61 +- 7.5% in 40-80%),
  then the phenotype that goes with it (dilation, RWMA and RV dysfunction mostly in the reduced
  group, hypertrophy in the rest), and the end-systolic state is solved so that the closed-form
  LVEF, RWMA included, equals the drawn value.

  Args:
    rng: the random generator (all draws come from it).

  Returns:
    A Heart.
  """
  reduced = rng.random() < REDUCED_EF_FRACTION
  if reduced:
    lo, hi = REDUCED_EF_RANGE
    lvef = lo + (hi - lo) * rng.beta(1.5, 1.2)
  else:
    lvef = _truncated_normal(rng, NORMAL_EF_MEAN, NORMAL_EF_SD, *NORMAL_EF_RANGE)
  hypertrophy = (not reduced) and rng.random() < 0.15
  dilation = 1.0
  if reduced and rng.random() < 0.75:
    dilation += rng.uniform(0.0, 0.9) * (REDUCED_EF_RANGE[1] - lvef) / 30.0
  elif not reduced and rng.random() < 0.05:
    dilation += rng.uniform(0.05, 0.25)  # athlete's heart
  edv_ml = math.exp(rng.normal(math.log(135.0), 0.17)) * dilation
  if hypertrophy:
    edv_ml *= 0.85
  truncation = rng.uniform(0.3, 0.5)
  sphericity = rng.uniform(0.38, 0.48) * (1.0 + 0.5 * (dilation - 1.0))
  c_f = (1.0 + truncation) - (1.0 + truncation**3) / 3.0
  semi_long = (edv_ml / ML_PER_MM3 / (math.pi * sphericity**2 * c_f)) ** (1.0 / 3.0)
  radius = sphericity * semi_long
  if hypertrophy:
    wall = rng.uniform(12.0, 19.0)
  elif dilation > 1.1:
    wall = rng.uniform(6.0, 9.0)
  else:
    wall = rng.uniform(7.0, 10.5)
  longitudinal = rng.uniform(0.15, 0.3) * (0.7 if hypertrophy else 1.0)
  if reduced:
    has_rwma = rng.random() < 0.5
    severity = rng.uniform(0.5, 1.0)
  else:
    has_rwma = rng.random() < 0.06
    severity = rng.uniform(0.3, 0.7)
  names = list(_TERRITORY_PROBS)
  territory = names[rng.choice(len(names), p=list(_TERRITORY_PROBS.values()))] if has_rwma else ""
  nominal_angle = TERRITORIES[territory].angle_deg if territory else 0.0
  rv_dysfunction = reduced and rng.random() < 0.35
  diastolic_dysfunction = hypertrophy or reduced
  heart = Heart(
      lv_radius_mm=radius, lv_semi_long_mm=semi_long, lv_truncation=truncation,
      wall_thickness_mm=wall, apex_thickness_mm=wall * rng.uniform(0.6, 0.8), es_state=1.0,
      longitudinal_share=longitudinal, rwma_territory=territory,
      rwma_severity=severity if territory else 0.0,
      rwma_angle_deg=nominal_angle + rng.uniform(-15.0, 15.0),
      rwma_sharpness=int(rng.integers(3, 7)),
      rv_extent_mm=rng.uniform(18.0, 28.0) * (1.3 if rv_dysfunction else 1.0),
      rv_width=rng.uniform(1.35, 1.6),
      rv_contraction=rng.uniform(0.08, 0.22) if rv_dysfunction else rng.uniform(0.3, 0.45),
      la_radius_mm=rng.uniform(17.0, 21.0) * (1.25 if (reduced or hypertrophy) else 1.0),
      ra_radius_mm=rng.uniform(16.0, 20.0) * (1.2 if rv_dysfunction else 1.0),
      aortic_angle_deg=rng.uniform(40.0, 70.0), aortic_tilt_deg=rng.uniform(25.0, 45.0),
      aortic_radius_mm=rng.uniform(11.0, 15.0),
      apex_azimuth_deg=rng.uniform(30.0, 55.0), apex_elevation_deg=rng.uniform(20.0, 45.0),
      septal_roll_deg=rng.normal(0.0, 10.0),
      heart_rate_bpm=_truncated_normal(rng, 68.0, 10.0, 45.0, 110.0),
      systole_scale=rng.uniform(0.95, 1.1),
      early_filling_fraction=(rng.uniform(0.3, 0.5) if diastolic_dysfunction
                              else rng.uniform(0.55, 0.8)),
      diastasis_fraction=rng.uniform(0.03, 0.1),
      torso=Torso(
          half_width_mm=rng.uniform(140.0, 185.0), half_depth_mm=rng.uniform(95.0, 130.0),
          fat_mm=rng.uniform(5.0, 30.0), muscle_mm=rng.uniform(8.0, 16.0),
          centre_right_mm=rng.uniform(15.0, 40.0), centre_posterior_mm=rng.uniform(15.0, 35.0),
          diaphragm_below_apex_mm=rng.uniform(0.0, 15.0), lung_scale=rng.uniform(0.9, 1.1),
          texture_seed=int(rng.integers(1 << 31))))
  return _solve_es_state(heart, lvef)


def _solve_es_state(heart: Heart, lvef: float) -> Heart:
  """Sets es_state so the closed-form LVEF is `lvef`, easing the RWMA if it cannot be reached."""
  while True:
    model = HeartModel(dataclasses.replace(heart, es_state=MIN_VOLUME_STATE))
    edv = model.cavity_volume_mm3(np.array([1.0]))[0]
    target = edv * (1.0 - lvef / 100.0)
    residual = lambda v: model.cavity_volume_mm3(np.array([v]))[0] - target
    if residual(MIN_VOLUME_STATE) < 0.0:
      return dataclasses.replace(heart, es_state=optimize.brentq(residual, MIN_VOLUME_STATE, 1.0,
                                                                  xtol=1e-10))
    heart = dataclasses.replace(heart, rwma_severity=0.8 * heart.rwma_severity)


def analytic_cavity_volume_ml(heart: Heart, phase: float) -> float:
  """Closed-form LV cavity volume (mL) at a cycle phase (fraction of RR after the R wave)."""
  model = model_of(heart)
  return float(model.cavity_volume_mm3(model.volume_state(np.array([phase])))[0] * ML_PER_MM3)


def analytic_lvef(heart: Heart) -> float:
  """Closed-form LVEF (%) of a heart."""
  volumes = model_of(heart).cavity_volume_mm3(np.array([1.0, heart.es_state]))
  return float(100.0 * (volumes[0] - volumes[1]) / volumes[0])


def cavity_volumes_ml(heart: Heart, num_phases: int = 20, voxel_mm: float = 1.25) -> np.ndarray:
  """LV cavity volume curve (mL) [num_phases] at phases k / num_phases, by voxel integration."""
  if num_phases < 1:
    raise ValueError(f"num_phases must be >= 1, got {num_phases}")
  model = model_of(heart)
  v = model.volume_state(np.arange(num_phases) / num_phases)
  return model.voxel_volumes_mm3(v, voxel_mm)["lv_cavity"] * ML_PER_MM3
