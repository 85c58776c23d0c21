"""In-memory types shared by every data source (phantom, DICOM) and the preprocessing.

Data flows one way: a source yields `Study` objects holding raw `Cine`s in scanner geometry;
`cmr_jax.data.preprocess` turns each into a `StudyRecord` (fixed mm per pixel, fixed field of
view, fixed frame count, uint8), which `cmr_jax.data.records` serialises into ArrayRecord shards.
Identifiers in both types are pseudonyms: patient identity never goes past ingestion.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SAX = "SAX"
LAX_2CH = "2CH"
LAX_3CH = "3CH"
LAX_4CH = "4CH"
VIEWS: tuple[str, ...] = (SAX, LAX_2CH, LAX_3CH, LAX_4CH)
LONG_AXIS_VIEWS: tuple[str, ...] = (LAX_2CH, LAX_3CH, LAX_4CH)
VIEW_CODES: dict[str, int] = {v: i for i, v in enumerate(VIEWS)}
# The typical long axis of the heart (base to apex) in DICOM patient coordinates (x left,
# y posterior, z superior): left, anterior, inferior.
APEX_DIRECTION_LPS = np.array([1.0, -1.0, -1.0]) / math.sqrt(3.0)
ANTERIOR_LPS = np.array([0.0, -1.0, 0.0])


@dataclasses.dataclass
class Cine:
  """One cine series: a single imaging plane over one cardiac cycle, as acquired.

  Geometry follows DICOM conventions so that a cine can be written to and read from DICOM
  without loss: `image_position` is the patient-space position (mm) of the centre of the first
  transmitted pixel (ImagePositionPatient), `image_orientation` the direction cosines of the
  first row then the first column (ImageOrientationPatient), and `pixel_spacing` is
  (row spacing, column spacing) in mm (PixelSpacing: distance between rows, then columns).
  """

  frames: np.ndarray  # [T, H, W] raw intensities (float32 or integer), one cardiac cycle
  pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm
  view: str  # one of VIEWS
  trigger_times_ms: np.ndarray | None = None  # [T] ms after the R wave
  slice_index: int = -1  # SAX order from base (0) to apex; -1 for long-axis views
  slice_position_mm: float = math.nan  # SAX position along the stack normal (mm)
  image_position: np.ndarray | None = None  # (3,) ImagePositionPatient, mm
  image_orientation: np.ndarray | None = None  # (6,) ImageOrientationPatient
  slice_thickness_mm: float = math.nan
  series_description: str = ""

  def __post_init__(self):
    if self.view not in VIEWS:
      raise ValueError(f"unknown view {self.view!r}; expected one of {VIEWS}")
    frames = np.asarray(self.frames)
    if frames.ndim != 3:
      raise ValueError(f"cine frames must be [T, H, W], got shape {frames.shape}")
    self.frames = frames

  @property
  def num_frames(self) -> int:
    return int(self.frames.shape[0])


@dataclasses.dataclass
class Study:
  """All cines of one imaging study with its labels and report, identifiers pseudonymised."""

  study_id: str
  subject_id: str
  site: str
  cines: list[Cine]
  lvef: float = math.nan  # percent
  edv: float = math.nan  # mL
  esv: float = math.nan  # mL
  report: str = ""
  visit: int = 0  # 0 for the first scan of a subject, 1 for a rescan, ...
  heart_rate_bpm: float = math.nan


@dataclasses.dataclass
class StudyRecord:
  """The stored, preprocessed form of a study: what the input pipelines read.

  All cines share one shape: `frames[i]` is cine i resampled to `spacing_mm` per pixel, cropped
  or padded to `size` x `size` about the heart, `num_frames` frames over one cycle, uint8.
  """

  study_id: str
  subject_id: str
  site: str
  frames: np.ndarray  # uint8 [N, T, S, S]
  views: list[str]  # [N], each in VIEWS
  slice_index: np.ndarray  # int32 [N]; SAX order base->apex, -1 for long-axis
  slice_position_mm: np.ndarray  # float32 [N]; nan for long-axis
  source_spacing_mm: np.ndarray  # float32 [N, 2]; the acquired pixel spacing
  spacing_mm: float  # stored mm per pixel
  lvef: float = math.nan
  edv: float = math.nan
  esv: float = math.nan
  report: str = ""
  visit: int = 0
  checksum: str = ""  # sha256 of the uint8 pixel data

  @property
  def num_cines(self) -> int:
    return int(self.frames.shape[0])

  @property
  def has_labels(self) -> bool:
    return not math.isnan(self.lvef)
