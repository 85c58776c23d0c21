"""Cines from the frames of one series: split by plane, checked for one geometry, one cycle kept.

`split_by_position` groups a series' frames by the plane they image (a mixed SAX series gives one
group per slice), `geometry_problem` says why a group cannot be one cine (mixed matrix sizes,
pixel spacings or orientations), and `one_cycle` puts a group in time order and keeps one
cardiac cycle (the last, when a plane was imaged over several), with each dropped frame's reason.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from cmr_jax.dicom import geometry
from cmr_jax.dicom import parse

REPEATED_CYCLE = "repeated cardiac cycle at the same position (kept the last)"
REPEATED_TRIGGER = "repeated trigger time at the same position (kept the latest image)"
SAME_POSITION_MM = 0.5  # frames of one series this close in position image one plane
SAME_ORIENTATION_DEG = 2.0  # frames of one cine may differ this much in orientation
SAME_SPACING_RTOL = 1e-3  # frames of one cine may differ this much in pixel spacing
MIN_CYCLE_RUN = 3  # a run of increasing trigger times this long may be a whole cycle
CYCLE_OVERLAP = 1.5  # runs whose time spans add to this many times the total span are cycles
MAX_CYCLE_MS = 2000.0  # acquisition times spanning more than this are not one cycle (30 bpm)


def _same_plane(a: parse.Frame, b: parse.Frame) -> bool:
  """Whether two frames image one plane: positions (else slice locations) within
  `SAME_POSITION_MM` and orientations within `SAME_ORIENTATION_DEG`."""
  if (a.position is None) != (b.position is None):
    return False
  if a.position is not None:
    if np.max(np.abs(a.position - b.position)) > SAME_POSITION_MM:
      return False
  elif math.isfinite(a.slice_location) or math.isfinite(b.slice_location):
    if not abs(a.slice_location - b.slice_location) <= SAME_POSITION_MM:
      return False
  if a.orientation is not None and b.orientation is not None:
    return geometry.angle_between_planes_deg(
        geometry.plane_normal(a.orientation),
        geometry.plane_normal(b.orientation)) <= SAME_ORIENTATION_DEG
  return True


def split_by_position(frames: list[parse.Frame]) -> list[list[parse.Frame]]:
  """Splits a series' frames into groups imaging one plane each (in first-seen order)."""
  groups: list[list[parse.Frame]] = []
  for f in frames:
    group = next((g for g in groups if _same_plane(g[0], f)), None)
    if group is None:
      groups.append([f])
    else:
      group.append(f)
  return groups


def geometry_problem(frames: list[parse.Frame]) -> str:
  """Why the frames cannot be one cine (mixed geometry), or ""."""
  shapes = sorted({f.shape for f in frames})
  if len(shapes) > 1:
    return "inconsistent geometry: mixed matrix sizes " + ", ".join(f"{r}x{c}" for r, c in shapes)
  spacings = [f.pixel_spacing for f in frames]
  if None in spacings:
    return "missing PixelSpacing (and no ImagerPixelSpacing): the pixel size is unknown"
  if not np.allclose(spacings, spacings[0], rtol=SAME_SPACING_RTOL, atol=0.0):
    return "inconsistent geometry: mixed pixel spacings"
  normals = [geometry.plane_normal(f.orientation) for f in frames if f.orientation is not None]
  if normals and (len(normals) != len(frames) or max(
      geometry.angle_between_planes_deg(normals[0], n) for n in normals) > SAME_ORIENTATION_DEG):
    return "inconsistent geometry: mixed orientations"
  return ""


def _last_cycle(triggers: np.ndarray) -> slice | None:
  """The last full cycle of frames in acquisition order, when they hold several cycles.

  Cycles show as runs of increasing trigger times that each cover most of the cycle (their
  trigger ranges overlap). A single cycle whose instance numbering starts mid-cycle also has two
  runs, but they cover disjoint time ranges; shuffled numbering gives many short runs.

  Args:
    triggers: [N] trigger times in acquisition (instance) order.

  Returns:
    The index range of the last run of the most frames, or None for a single cycle.
  """
  starts = [0] + [i for i in range(1, len(triggers)) if triggers[i] <= triggers[i - 1]]
  if len(starts) < 2:
    return None
  runs = [slice(a, b) for a, b in zip(starts, starts[1:] + [len(triggers)])]
  lengths = [r.stop - r.start for r in runs]
  spans = [float(np.ptp(triggers[r])) for r in runs]
  if min(lengths) < MIN_CYCLE_RUN or sum(spans) < CYCLE_OVERLAP * float(np.ptp(triggers)):
    return None
  return [r for r, n in zip(runs, lengths) if n == max(lengths)][-1]


def _times_without_trigger(frames: list[parse.Frame]) -> np.ndarray | None:
  """Frame times (ms from the first frame) for a cine without trigger times, or None.

  From the frames' acquisition times when they increase within one plausible cycle, else evenly
  spread over the RR interval (NominalInterval or HeartRate) when the cine holds one cycle
  (CardiacNumberOfImages frames, when given).
  """
  acquired = np.array([f.acquisition_time_s for f in frames]) * 1000.0
  if (np.all(np.isfinite(acquired)) and np.all(np.diff(acquired) > 0)
      and acquired[-1] - acquired[0] <= MAX_CYCLE_MS):
    return acquired - acquired[0]
  rr = float(np.median([f.rr_interval_ms for f in frames]))
  images = collections.Counter(f.cardiac_images for f in frames).most_common(1)[0][0]
  if math.isfinite(rr) and images in (0, len(frames)):
    return np.arange(len(frames)) * rr / len(frames)
  return None


def one_cycle(frames: list[parse.Frame]) -> tuple[list[parse.Frame], np.ndarray | None,
                                                  list[tuple[list[parse.Frame], str]]]:
  """Puts the frames of one plane in temporal order and keeps one cardiac cycle.

  Frames are taken in acquisition order (`parse.Frame.order_key`). With trigger times: a plane
  imaged over several cycles keeps its last cycle (`_last_cycle`), a trigger time still repeated
  keeps its latest image, and frames are sorted by trigger time. Without (absent or all equal): a
  plane holding a multiple of CardiacNumberOfImages frames keeps the last cycle's frames, and
  times come from `_times_without_trigger`.

  Returns:
    (kept frames in temporal order, their times in ms or None when unknown, [(dropped frames,
    reason)]).
  """
  ordered = sorted(frames, key=parse.Frame.order_key)
  triggers = np.array([f.trigger_time_ms for f in ordered])
  dropped: list[tuple[list[parse.Frame], str]] = []
  if np.all(np.isfinite(triggers)) and len(np.unique(triggers)) > 1:
    cycle = _last_cycle(triggers)
    if cycle is not None:
      dropped.append((ordered[:cycle.start] + ordered[cycle.stop:], REPEATED_CYCLE))
      ordered = ordered[cycle]
    latest = {f.trigger_time_ms: f for f in ordered}  # the last in acquisition order wins
    dropped.append(([f for f in ordered if latest[f.trigger_time_ms] is not f], REPEATED_TRIGGER))
    kept = sorted(latest.values(), key=lambda f: f.trigger_time_ms)
    return kept, np.array([f.trigger_time_ms for f in kept]), dropped
  images = collections.Counter(f.cardiac_images for f in ordered).most_common(1)[0][0]
  if images >= 2 and len(ordered) > images and len(ordered) % images == 0:
    dropped.append((ordered[:-images], REPEATED_CYCLE))
    ordered = ordered[-images:]
  return ordered, _times_without_trigger(ordered), dropped
