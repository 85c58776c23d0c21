"""A synthetic subject's heart in numbers: its parameters, its cycle, closed-form volumes, sampling.

A `Heart` holds one subject's anatomy, function and body (`Torso`); `sample_heart` draws one from
the population model with a known LVEF. `HeartCycle` is the heart's volume over the cardiac cycle
in closed form (its shapes in space are `heart_geometry.HeartModel`, which extends it).

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

Angles about the long axis are measured from the septum (0 deg) towards anterior (90 deg);
lateral is 180 deg and inferior -90 deg (see `heart_geometry` for the heart frame).
"""

from __future__ import annotations

import dataclasses
import math

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
  texture_seed: int  # seeds the subject's tissue texture (thorax.Texture)


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
  # How far the atria follow the base as it descends in systole: 1 on the base plane (the LA
  # joins the mitral annulus), 0 left at their end-diastolic place (tissue fills the gap: AV
  # groove, valve apparatus, partial volume), so basal slices may lose their blood in systole.
  atrial_follow: float = 1.0


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


class HeartCycle:
  """The volumes of one `Heart` over the cycle in closed form: volume curve, LV cavity and wall."""

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

  # --- the cycle --------------------------------------------------------------------------------

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
  # Drawn last, so that every earlier draw (and so every other parameter) is as before.
  heart = dataclasses.replace(heart, atrial_follow=float(rng.uniform(0.0, 1.0)))
  return _solve_es_state(heart, lvef)


def _solve_es_state(heart: Heart, lvef: float) -> Heart:
  """Sets es_state so the closed-form LVEF is `lvef`, easing the RWMA if it cannot be reached."""
  while True:
    model = HeartCycle(dataclasses.replace(heart, es_state=MIN_VOLUME_STATE))
    edv = model.cavity_volume_mm3(np.array([1.0]))[0]
    target = edv * (1.0 - lvef / 100.0)
    residual = lambda v: model.cavity_volume_mm3(np.array([v]))[0] - target
    if residual(MIN_VOLUME_STATE) < 0.0:
      return dataclasses.replace(heart, es_state=optimize.brentq(residual, MIN_VOLUME_STATE, 1.0,
                                                                  xtol=1e-10))
    heart = dataclasses.replace(heart, rwma_severity=0.8 * heart.rwma_severity)


def analytic_cavity_volume_ml(heart: Heart, phase: float) -> float:
  """Closed-form LV cavity volume (mL) at a cycle phase (fraction of RR after the R wave)."""
  model = HeartCycle(heart)
  return float(model.cavity_volume_mm3(model.volume_state(np.array([phase])))[0] * ML_PER_MM3)


def analytic_lvef(heart: Heart) -> float:
  """Closed-form LVEF (%) of a heart."""
  volumes = HeartCycle(heart).cavity_volume_mm3(np.array([1.0, heart.es_state]))
  return float(100.0 * (volumes[0] - volumes[1]) / volumes[0])
