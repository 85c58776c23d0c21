"""Synthetic cine-CMR phantom with known ground truth: the project's default dataset.

A subject is a `Heart` (3D anatomy and motion, plus the body around it) drawn by `sample_heart`;
a study is one scan of it under a `Protocol` (a "site"): a short-axis stack from base to apex
and 2CH, 3CH and 4CH long-axis cines in real patient geometry, with LVEF, EDV and ESV from voxel
integration of the rendered 3D cavity and a radiology-style report. LVEF is read from the motion:
the mean brightness of the images is dominated by a random gain, contrast, coil shading, body
habitus and field of view (as in patients, though, dilated hearts tend to have a lower LVEF).

Modules: `heart_params` (parameters, cycle, closed-form volumes, sampling), `heart_geometry`
(shapes in space, voxel volumes), `thorax` (pose and torso), `scanner` (protocols, planning,
rendering); this module puts a study together.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from cmr_jax.data import types
from cmr_jax.phantom.heart_geometry import cavity_volumes_ml, model_of
from cmr_jax.phantom import reports
from cmr_jax.phantom.heart_params import (ML_PER_MM3, Heart, Torso, analytic_cavity_volume_ml,
                                          analytic_lvef, sample_heart)
from cmr_jax.phantom.scanner import (SITES, Contrast, Protocol, fast_protocol, plan_planes,
                                       render_cine, sample_acquisition)

__all__ = [
    "Contrast", "Heart", "Protocol", "SITES", "Torso", "analytic_cavity_volume_ml",
    "analytic_lvef", "cavity_volumes_ml", "fast_protocol", "findings_of", "label_volumes",
    "sample_heart", "simulate_study", "subject_heart", "synthetic_study",
]

LABEL_VOXEL_MM = 1.25  # LV volumes: within ~0.2% of the closed form
RV_VOXEL_MM = 2.0  # RV volumes only grade RV function in the report
_HEART_STREAM, _SCAN_STREAM = 0, 1


@functools.lru_cache(maxsize=256)
def label_volumes(heart: Heart) -> tuple[float, float, float]:
  """(EDV mL, ESV mL, RVEF %) of a heart by voxel integration of its rendered cavities."""
  model = model_of(heart)
  states = np.array([1.0, heart.es_state])
  lv = model.voxel_volumes_mm3(states, LABEL_VOXEL_MM)["lv_cavity"] * ML_PER_MM3
  rv = model.voxel_volumes_mm3(states, RV_VOXEL_MM, ("rv_cavity",))["rv_cavity"]
  return float(lv[0]), float(lv[1]), float(100.0 * (1.0 - rv[1] / rv[0]))


def findings_of(heart: Heart, rvef: float) -> reports.Findings:
  """The report findings of a heart (besides LVEF and the LV volumes)."""
  return reports.Findings(
      wall_thickness_mm=heart.wall_thickness_mm, rwma_territory=heart.rwma_territory,
      rwma_severity=heart.rwma_severity, rvef=rvef, la_radius_mm=heart.la_radius_mm)


def simulate_study(heart: Heart, protocol: Protocol, rng: np.random.Generator, *, study_id: str,
                   subject_id: str, visit: int = 0) -> types.Study:
  """Scans a heart under a protocol: all cines, labels and a report.

  Args:
    heart: the subject.
    protocol: the acquisition protocol (site).
    rng: every random draw of the scan (pose, planning, breath-holds, noise, gain, wording).
    study_id: pseudonymous study identifier.
    subject_id: pseudonymous subject identifier.
    visit: 0 for the first scan, 1 for a rescan, ...

  Returns:
    A Study with the SAX cines ordered base to apex, then 2CH, 3CH and 4CH (a protocol with
    `lax_missing_prob` may leave some out), LVEF/EDV/ESV from voxel integration, and a report.
  """
  acq = sample_acquisition(heart, protocol, rng)
  planes = plan_planes(heart, protocol, acq, rng)
  cines = [render_cine(heart, protocol, acq, plane, rng) for plane in planes]
  edv, esv, rvef = label_volumes(heart)
  lvef = 100.0 * (edv - esv) / edv
  report = reports.write_report(findings_of(heart, rvef), lvef, edv, esv, rng)
  return types.Study(study_id=study_id, subject_id=subject_id, site=protocol.name, cines=cines,
                     lvef=lvef, edv=edv, esv=esv, report=report, visit=visit,
                     heart_rate_bpm=acq.heart_rate_bpm)


def subject_heart(seed: int, index: int) -> Heart:
  """The heart of subject `index` of dataset `seed` (the same for every site and visit)."""
  return sample_heart(np.random.default_rng([seed, index, _HEART_STREAM]))


def synthetic_study(seed: int, index: int, *, site: str, visit: int = 0, fast: bool = True,
                    frames: int = 16, matrix: int = 112) -> types.Study:
  """Study `index` of the synthetic dataset `seed`, scanned at `site`; fully deterministic.

  Subject `index` has the same heart at every site and visit, so `visit=1` is a rescan of
  `visit=0` (new pose, planning, breath-holds, noise, gain and a slightly different heart rate).
  Note that the same (seed, index) at two sites is the same subject: use disjoint index ranges
  (or seeds) for datasets that must not share subjects.

  Args:
    seed: dataset seed (>= 0).
    index: subject index (>= 0).
    site: a key of SITES.
    visit: scan number of the subject (>= 0).
    fast: render with `fast_protocol(SITES[site], frames, matrix)` instead of the full protocol.
    frames: frames per cycle when fast.
    matrix: square matrix when fast.

  Returns:
    The Study, with study_id f"syn-{seed}-{index:06d}-v{visit}" and subject_id
    f"syn-{seed}-{index:06d}".

  Raises:
    ValueError: for an unknown site or negative seed, index or visit.
  """
  if site not in SITES:
    raise ValueError(f"unknown phantom site {site!r}; expected one of {sorted(SITES)}")
  if min(seed, index, visit) < 0:
    raise ValueError(f"seed, index and visit must be >= 0, got {seed}, {index}, {visit}")
  protocol = fast_protocol(SITES[site], frames, matrix) if fast else SITES[site]
  rng = np.random.default_rng([seed, index, _SCAN_STREAM, visit, zlib.crc32(site.encode())])
  subject = f"syn-{seed}-{index:06d}"
  return simulate_study(subject_heart(seed, index), protocol, rng, study_id=f"{subject}-v{visit}",
                        subject_id=subject, visit=visit)

