"""The heart's pose in the body and the static torso around it (chest wall, lungs, liver, spine).

Body coordinates share the patient (LPS) axes: x to the patient's left, y posterior, z superior;
their origin is the LV mid-cavity at end-diastole. A scan places the body in the scanner's
patient coordinates with a small rotation and a translation (`simulate_study` draws them).
Torso structures do not move over the cycle; they are `Layer`s whose distance ignores the state.
"""

from __future__ import annotations

import math

import numpy as np

from cmr_jax.phantom import heart_geometry
from cmr_jax.phantom import heart_params

RV_REFERENCE_DIRECTION = (-0.6, -0.8, 0.0)  # right-anterior: where the RV lies from the LV
ANTERIOR = (0.0, -1.0, 0.0)

# Torso layout relative to the body ellipse (mm).
PARASPINAL_SEMI_AXES = (50.0, 28.0)
VERTEBRA_RADIUS, VERTEBRA_DEPTH = 17.0, 60.0  # depth: distance in front of the inner back wall
CANAL_RADIUS, CANAL_DEPTH = 7.0, 32.0
DESCENDING_AORTA_RADIUS, DESCENDING_AORTA_LEFT, DESCENDING_AORTA_DEPTH = 11.0, 22.0, 82.0
LUNG_HEIGHT_MM = 130.0
TEXTURE_WAVES = 8
TEXTURE_WAVELENGTH_MM = (12.0, 60.0)
TEXTURE_SD = 0.06  # relative sd of the tissue texture


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v)


def heart_axes(heart: heart_params.Heart) -> np.ndarray:
  """Heart-frame axes in body coordinates, [3, 3]: rows are x (septal), y (anterior), z (to base).

  The long axis points from the apex (left, anterior, inferior) to the base; the septal
  direction is the right-anterior reference made perpendicular to it and rolled about it.
  """
  az, el = math.radians(heart.apex_azimuth_deg), math.radians(heart.apex_elevation_deg)
  apex = np.array([math.cos(el) * math.cos(az), -math.cos(el) * math.sin(az), -math.sin(el)])
  ez = -apex
  ref = np.array(RV_REFERENCE_DIRECTION)
  ex0 = _unit(ref - ref.dot(ez) * ez)
  ey0 = np.cross(ez, ex0)
  roll = math.radians(heart.septal_roll_deg)
  ex = math.cos(roll) * ex0 + math.sin(roll) * ey0
  ey = np.cross(ez, ex)
  if ey.dot(ANTERIOR) < 0:
    ey = -ey
  return np.stack([ex, ey, ez])


def heart_origin(heart: heart_params.Heart, model: heart_geometry.HeartModel) -> np.ndarray:
  """Body position (3,) of the heart-frame origin (the epicardial apex)."""
  z_mid = 0.5 * float(model.state(np.array([1.0])).zb[0, 0])
  return -z_mid * heart_axes(heart)[2]


def _static_box(lo, hi) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(lo, np.float64), np.asarray(hi, np.float64)


def torso_layers(heart: heart_params.Heart, model: heart_geometry.HeartModel
                 ) -> list[heart_geometry.Layer]:
  """The torso's structures in painter's order (body coordinates; painted over air)."""
  t = heart.torso
  bx, by = -t.centre_right_mm, t.centre_posterior_mm
  w, d = t.half_width_mm, t.half_depth_mm
  inner_w, inner_d = w - t.fat_mm - t.muscle_mm, d - t.fat_mm - t.muscle_mm
  back = by + inner_d  # inner surface of the back wall
  axes = heart_axes(heart)
  ed = model.state(np.array([1.0]))
  centre = heart_origin(heart, model) + float(ed.zc[0, 0]) * axes[2]
  cos_z = axes[2, 2]
  lowest = centre[2] - math.sqrt(float(ed.lo[0, 0])**2 * cos_z**2
                                 + float(ed.ro[0, 0])**2 * (1.0 - cos_z**2))
  z_dia = lowest - t.diaphragm_below_apex_mm
  big = 1e4

  def ellipsoid(cx, cy, cz, ax, ay, az, grow=0.0):  # (distance, box grown by `grow` for walls)
    distance = lambda st, p: heart_geometry.ellipsoid_distance(p.x - cx, p.y - cy, p.z - cz, ax,
                                                               ay, az)
    lo = [cx - ax - grow, cy - ay - grow, max(cz - az - grow, -big)]
    hi = [cx + ax + grow, cy + ay + grow, min(cz + az + grow, big)]
    return distance, *_static_box(lo, hi)

  def cylinder(cx, cy, ax, ay, grow=0.0):  # vertical: infinite along z
    return ellipsoid(cx, cy, 0.0, ax, ay, math.inf, grow)

  lung_h = LUNG_HEIGHT_MM * t.lung_scale
  Layer = heart_geometry.Layer
  return [
      Layer("body", "tissue", *cylinder(bx, by, inner_w, inner_d, t.fat_mm + t.muscle_mm),
            walls=((t.fat_mm + t.muscle_mm, "fat"), (t.muscle_mm, "muscle"))),
      Layer("paraspinal", "muscle", *cylinder(bx, back, *PARASPINAL_SEMI_AXES)),
      Layer("right_lung", "lung", *ellipsoid(bx - 0.52 * inner_w, by + 0.05 * inner_d,
                                             z_dia + 0.9 * lung_h, 0.38 * inner_w * t.lung_scale,
                                             0.7 * inner_d * t.lung_scale, lung_h)),
      Layer("left_lung", "lung", *ellipsoid(bx + 0.5 * inner_w, by + 0.15 * inner_d,
                                            z_dia + 0.85 * lung_h, 0.36 * inner_w * t.lung_scale,
                                            0.62 * inner_d * t.lung_scale, lung_h)),
      Layer("liver", "liver", *ellipsoid(bx - 0.25 * inner_w, by + 0.05 * inner_d, z_dia - 80.0,
                                         0.6 * inner_w, 0.7 * inner_d, 90.0)),
      Layer("vertebra", "marrow", *cylinder(bx, back - VERTEBRA_DEPTH, VERTEBRA_RADIUS,
                                            VERTEBRA_RADIUS)),
      Layer("spinal_canal", "csf", *cylinder(bx, back - CANAL_DEPTH, CANAL_RADIUS, CANAL_RADIUS)),
      Layer("descending_aorta", "blood", *cylinder(bx + DESCENDING_AORTA_LEFT,
                                                   back - DESCENDING_AORTA_DEPTH,
                                                   DESCENDING_AORTA_RADIUS,
                                                   DESCENDING_AORTA_RADIUS)),
  ]


class Texture:
  """A subject's smooth random tissue texture: a multiplicative field of random plane waves."""

  def __init__(self, seed: int):
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(TEXTURE_WAVES, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(*TEXTURE_WAVELENGTH_MM, TEXTURE_WAVES)
    self.wave_vectors = (2.0 * math.pi * directions / wavelengths[:, None]).astype(np.float32)
    self.phases = rng.uniform(0.0, 2.0 * math.pi, TEXTURE_WAVES).astype(np.float32)
    self.amplitude = np.float32(TEXTURE_SD * math.sqrt(2.0 / TEXTURE_WAVES))

  def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The field (mean 1) at body-coordinate points [P]."""
    field = np.ones_like(x)
    for (kx, ky, kz), phase in zip(self.wave_vectors, self.phases):
      field += self.amplitude * np.cos(kx * x + ky * y + kz * z + phase)
    return field
