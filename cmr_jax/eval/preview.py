"""Preview PNG of a study: end-diastolic and end-systolic frames of mid SAX and the LAX views.

End-diastole (ED) and end-systole (ES) are read from the images, so any study works (phantom or
DICOM): within the moving region of each SAX cine (pixels whose temporal variation is high) the
summed intensity follows the bright ventricular blood volume; ED is its maximum, ES its minimum.

`tools/make_synthetic.py` writes previews of the first studies of a synthetic dataset.
"""

from __future__ import annotations

import numpy as np
from matplotlib import figure
from scipy import ndimage

from cmr_jax.data import types

MOTION_QUANTILE = 99.5  # reference temporal std: this percentile of the std map
MOTION_FRACTION = 0.3  # moving region: std above this fraction of the reference
MOTION_DILATION_PX = 3
DISPLAY_PERCENTILES = (1.0, 99.5)
PANEL_INCHES = 2.6


def _moving_region_signal(frames: np.ndarray) -> np.ndarray:
  """Summed intensity [T] over the moving region of one cine frames [T, H, W]."""
  frames = frames.astype(np.float32)
  std = frames.std(axis=0)
  reference = np.percentile(std, MOTION_QUANTILE)
  if reference <= 0:
    return np.zeros(frames.shape[0], np.float32)
  mask = ndimage.binary_dilation(std > MOTION_FRACTION * reference, iterations=MOTION_DILATION_PX)
  scale = np.percentile(frames, DISPLAY_PERCENTILES[1]) or 1.0
  return frames[:, mask].sum(axis=1) / scale


def _timing_cines(study: types.Study) -> list[types.Cine]:
  """The cines that time the cycle: SAX (else all), with the first one's frame count."""
  if not study.cines:
    raise ValueError(f"study {study.study_id}: no cines to preview")
  cines = [c for c in study.cines if c.view == types.SAX] or study.cines
  return [c for c in cines if c.num_frames == cines[0].num_frames]


def blood_volume_proxy(study: types.Study) -> np.ndarray:
  """A per-frame [T] proxy of the ventricular blood volume, from the SAX stack (else all cines).

  Cines whose frame count differs from the first one's are left out.

  Raises:
    ValueError: if the study has no cines.
  """
  cines = _timing_cines(study)
  return np.sum([_moving_region_signal(c.frames) for c in cines], axis=0)


def ed_es_frames(study: types.Study) -> tuple[int, int]:
  """(ED, ES) frame indices in the SAX cines' timing: max and min of `blood_volume_proxy`."""
  proxy = blood_volume_proxy(study)
  return int(np.argmax(proxy)), int(np.argmin(proxy))


def _preview_cines(study: types.Study) -> list[tuple[str, types.Cine | None]]:
  """(label, cine) of the panels: mid SAX, 2CH, 3CH, 4CH (None where the view is missing)."""
  sax = sorted((c for c in study.cines if c.view == types.SAX), key=lambda c: c.slice_index)
  panels = [("SAX mid", sax[len(sax) // 2] if sax else None)]
  for view in types.LONG_AXIS_VIEWS:
    panels.append((view, next((c for c in study.cines if c.view == view), None)))
  return panels


def save_preview_png(study: types.Study, path: str) -> None:
  """Saves a grid of ED (top) and ES (bottom) frames of mid SAX, 2CH, 3CH and 4CH to `path`."""
  ed, es = ed_es_frames(study)
  reference_frames = _timing_cines(study)[0].num_frames
  panels = _preview_cines(study)
  fig = figure.Figure(figsize=(PANEL_INCHES * len(panels), PANEL_INCHES * 2 + 0.6))
  axes = fig.subplots(2, len(panels), squeeze=False)
  for col, (label, cine) in enumerate(panels):
    for row, (phase, index) in enumerate((("ED", ed), ("ES", es))):
      ax = axes[row, col]
      ax.set_axis_off()
      if cine is None:
        ax.set_title(f"{label}: missing", fontsize=9)
        continue
      frame = int(round(index * cine.num_frames / reference_frames)) % cine.num_frames
      lo, hi = np.percentile(cine.frames, DISPLAY_PERCENTILES)
      ax.imshow(cine.frames[frame], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                aspect=cine.pixel_spacing[0] / cine.pixel_spacing[1])
      ax.set_title(f"{label} {phase} (frame {frame})", fontsize=9)
  fig.suptitle(f"{study.study_id} [{study.site}]  LVEF {study.lvef:.1f}%  EDV {study.edv:.0f} mL"
               f"  ESV {study.esv:.0f} mL", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)

