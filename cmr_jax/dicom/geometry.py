"""Plane geometry of cine planes in DICOM patient coordinates (LPS): normals, angles, and the
naming of long-axis planes (2CH/3CH/4CH) from their angle around the SAX stack.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from cmr_jax.data import types

# Anatomical directions in DICOM patient coordinates (x left, y posterior, z superior).
RV_DIRECTION_LPS = np.array([-1.0, -1.0, 0.0]) / math.sqrt(2.0)  # right, anterior of the LV
SUPERIOR_LPS = np.array([0.0, 0.0, 1.0])
# Typical angle (degrees, lines mod 180) of each long-axis plane's trace in the SAX plane,
# measured from the septal direction (towards the RV) towards the anterior wall. In the AHA
# 17-segment model (segments 60 degrees apart) the 4CH plane runs inferoseptal to anterolateral
# (-30), the 3CH anteroseptal to inferolateral (+30) and the 2CH anterior to inferior (90);
# 4CH planning through the RV's widest part puts the 4CH nearer 0 and the 3CH (through the
# aortic root) nearer 60. The values sit between: a guess, refined per study by the named views.
LAX_TRACE_ANGLE_DEG = {types.LAX_4CH: -10.0, types.LAX_3CH: 45.0, types.LAX_2CH: 90.0}


def plane_normal(orientation: np.ndarray) -> np.ndarray:
  """Unit normal (row x column direction) of a plane given its (6,) ImageOrientationPatient."""
  normal = np.cross(orientation[:3], orientation[3:])
  return normal / np.linalg.norm(normal)


def angle_between_planes_deg(n1: np.ndarray, n2: np.ndarray) -> float:
  """Angle in [0, 90] degrees between two planes given their unit normals."""
  return float(np.degrees(np.arccos(np.clip(abs(float(np.dot(n1, n2))), 0.0, 1.0))))


def _in_plane(v: np.ndarray, normal: np.ndarray) -> np.ndarray:
  v = v - np.dot(v, normal) * normal
  return v / np.linalg.norm(v)


def lax_trace_angle_deg(sax_normal: np.ndarray, lax_normal: np.ndarray) -> float:
  """Angle (degrees in [-90, 90)) of a long-axis plane's trace in the SAX plane.

  Measured from the septal direction (towards the RV, anatomically right-anterior of the LV)
  towards the anterior wall (the superior side), see `LAX_TRACE_ANGLE_DEG`.
  """
  trace = np.cross(sax_normal, lax_normal)
  trace /= np.linalg.norm(trace)
  septal = _in_plane(RV_DIRECTION_LPS, sax_normal)
  anterior = _in_plane(SUPERIOR_LPS - np.dot(SUPERIOR_LPS, septal) * septal, sax_normal)
  angle = math.degrees(math.atan2(float(np.dot(trace, anterior)), float(np.dot(trace, septal))))
  return (angle + 90.0) % 180.0 - 90.0


def _line_distance_deg(a: float, b: float) -> float:
  d = abs(a - b) % 180.0
  return min(d, 180.0 - d)


def classify_lax_geometry(sax_normal: np.ndarray, unknown: Sequence[np.ndarray],
                          known: Sequence[tuple[str, np.ndarray]] = ()) -> list[str]:
  """Names long-axis planes (2CH/3CH/4CH) from their geometry against the SAX stack.

  Each plane's trace angle (`lax_trace_angle_deg`) is compared with the typical angles in
  `LAX_TRACE_ANGLE_DEG`, first shifted by the mean offset of the named long-axis planes of the
  study (`known`: (view, normal) pairs) when there are any, which calibrates the guess to the
  patient's anatomy. Up to three unknown planes get distinct views by the assignment of least
  total angular distance (their relative order is what counts: 2CH farthest from the septum,
  then 3CH on the anterior side of the 4CH); more planes each get the nearest view.

  Args:
    sax_normal: [3] unit normal of the SAX stack.
    unknown: [3] unit normals of the planes to name.
    known: (view, [3] normal) of planes named from their series names.

  Returns:
    The view of each unknown plane.
  """
  offsets = [lax_trace_angle_deg(sax_normal, n) - LAX_TRACE_ANGLE_DEG[v] for v, n in known]
  # Circular mean of line angles (period 180 degrees).
  offset = (math.degrees(math.atan2(sum(math.sin(math.radians(2 * o)) for o in offsets),
                                    sum(math.cos(math.radians(2 * o)) for o in offsets))) / 2
            if offsets else 0.0)
  angles = [lax_trace_angle_deg(sax_normal, n) - offset for n in unknown]
  views = list(LAX_TRACE_ANGLE_DEG)
  cost = lambda a, v: _line_distance_deg(a, LAX_TRACE_ANGLE_DEG[v])
  if len(angles) > len(views):
    return [min(views, key=lambda v: cost(a, v)) for a in angles]
  best = min(itertools.permutations(views, len(angles)),
             key=lambda perm: sum(cost(a, v) for a, v in zip(angles, perm)))
  return list(best)

