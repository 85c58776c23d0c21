"""Reading cine CMR from DICOM: file discovery, header parsing, view classification, assembly.

`assemble_study(files)` turns the parsed DICOM files of one study into `types.Cine`s and accounts for
every file (used, or skipped with a reason). The rules, in order:

1. Files: anything pydicom cannot read as a DICOM image is skipped with the reason (not DICOM,
   truncated, no pixel data, a DICOMDIR, not MR, not greyscale). Multi-frame files (enhanced MR,
   a cine or a whole stack per file, or one frame per file) are expanded into frames from their
   functional groups (position, orientation, spacing, trigger delay, rescale); legacy
   multi-frame files without them are one cine with frame times from FrameTimeVector/FrameTime.
   Pixel spacing is PixelSpacing, else ImagerPixelSpacing (one value: square pixels).
2. Series (SeriesInstanceUID) whose name marks them as non-cine (scout/localiser, derived
   InlineVF/results, flow/phase, tagging, T1/T2 maps, LGE, perfusion, great-vessel and
   right-heart views, axial/coronal/sagittal stacks) are skipped; phase images (ImageType P/PHASE)
   too.
3. A series is split by plane (positions within `SAME_POSITION_MM`, else SliceLocation, and
   orientation): one cine per plane, so one mixed SAX series gives one cine per slice. Within a
   cine, frames are taken in acquisition order (InstanceNumber, then AcquisitionTime) and put in
   time order by TriggerTime; a plane imaged over several cycles keeps the last cycle, and a
   trigger time still repeated its latest image (see `_one_cycle`). Without trigger times, a
   multiple of CardiacNumberOfImages frames keeps the last cycle, and frame times come from
   per-frame acquisition times or the RR interval (NominalInterval, HeartRate). Cines with mixed
   matrix sizes, orientations or pixel spacings, no pixel spacing, or fewer than
   `MIN_CINE_FRAMES` frames, are skipped.
4. Views come from the series name (SeriesDescription, ProtocolName, then the folder name), see
   `classify_name`; otherwise from geometry against the SAX stack (see `classify_lax_geometry`):
   a plane within `SAX_MAX_ANGLE_DEG` of the stack's planes is a SAX slice, one at least
   `LAX_MIN_ANGLE_DEG` from them a long-axis view. Without a SAX stack, unnamed planes at least
   `ANATOMY_LAX_MIN_ANGLE_DEG` from the plane normal to a typical heart's long axis
   (`APEX_DIRECTION_LPS`) are named as long-axis views against that axis, which the study's
   `notes` record; other unnamed planes are skipped.
5. SAX slices are ordered by their position along the stack normal, base to apex. The direction
   is anatomical: DICOM patient coordinates (LPS) are fixed to the patient whatever the patient
   position on the table, and in the normal (levocardic) heart the apex lies to the left,
   anterior and inferior of the base, so the normal is oriented along `APEX_DIRECTION_LPS`. When
   the stack normal is nearly perpendicular to that direction (|cos| < `APEX_MIN_COS`) the order
   of acquisition decides instead: the lowest SeriesNumber is the base (UK Biobank acquires b1,
   the basal slice, first). Slices closer than `DUPLICATE_POSITION_MM` are repeats: the latest
   series (highest SeriesNumber, then SeriesTime) is kept; likewise one cine per long-axis view.
6. Pixel data is decoded through pydicom's plugins (pylibjpeg for JPEG, JPEG-LS and JPEG 2000;
   RLE natively); rescale slope/intercept are applied and frames kept as float32.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import itertools
import math
import os
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cmr_jax.data import types

MIN_CINE_FRAMES = 8
SAX_MAX_ANGLE_DEG = 25.0  # a plane this close to parallel with the SAX stack is a SAX slice
LAX_MIN_ANGLE_DEG = 60.0  # a plane this far from the SAX planes is a long-axis view
# Without a SAX stack: a plane this far from the plane normal to `APEX_DIRECTION_LPS` (a typical
# heart's long axis; real axes differ by up to ~25 degrees) is taken for a long-axis view.
ANATOMY_LAX_MIN_ANGLE_DEG = 50.0
MIN_GEOMETRIC_SAX_SLICES = 3  # unnamed parallel cines at this many positions form a SAX stack
DUPLICATE_POSITION_MM = 2.0  # SAX slices closer than this along the normal are one position
SAME_POSITION_MM = 0.5  # frames of one series this close in position image one plane
SAME_ORIENTATION_DEG = 2.0  # frames of one cine may differ this much in orientation
SAME_SPACING_RTOL = 1e-3  # frames of one cine may differ this much in pixel spacing
MIN_CYCLE_RUN = 3  # a run of increasing trigger times this long may be a whole cycle
CYCLE_OVERLAP = 1.5  # runs whose time spans add to this many times the total span are cycles
MAX_CYCLE_MS = 2000.0  # acquisition times spanning more than this are not one cycle (30 bpm)
# Anatomical directions in DICOM patient coordinates (x left, y posterior, z superior).
APEX_DIRECTION_LPS = np.array([1.0, -1.0, -1.0]) / math.sqrt(3.0)  # left, anterior, inferior
RV_DIRECTION_LPS = np.array([-1.0, -1.0, 0.0]) / math.sqrt(2.0)  # right, anterior of the LV
SUPERIOR_LPS = np.array([0.0, 0.0, 1.0])
APEX_MIN_COS = 0.3
# Typical angle (degrees, lines mod 180) of each long-axis plane's trace in the SAX plane,
# measured from the septal direction (towards the RV) towards the anterior wall. In the AHA
# 17-segment model (segments 60 degrees apart) the 4CH plane runs inferoseptal to anterolateral
# (-30), the 3CH anteroseptal to inferolateral (+30) and the 2CH anterior to inferior (90);
# 4CH planning through the RV's widest part puts the 4CH nearer 0 and the 3CH (through the
# aortic root) nearer 60. The values sit between: a guess, refined per study by the named views.
LAX_TRACE_ANGLE_DEG = {types.LAX_4CH: -10.0, types.LAX_3CH: 45.0, types.LAX_2CH: 90.0}
ZIP_SUFFIX = ".zip"
USED = "used"
DICOMDIR_REASON = "DICOMDIR (the index of a DICOM file set, not an image)"
REPEATED_CYCLE = "repeated cardiac cycle at the same position (kept the last)"
REPEATED_TRIGGER = "repeated trigger time at the same position (kept the latest image)"
SKIPPED = "skipped"
LAX = "LAX"  # a long-axis view whose chamber count the name does not say
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PHASE_IMAGE_TYPES = {"P", "PHASE", "VELOCITY", "PHASE MAP"}
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "StudyID")


# ---------------------------------------------------------------------------------------------
# Files: plain files and members of zip archives.


@dataclasses.dataclass(frozen=True, order=True)
class FileRef:
  """One input file: a file on disk, or a member of a zip archive on disk."""

  path: str  # the file, or the zip archive holding it
  member: str = ""  # member name inside the zip; "" for a plain file

  def relative(self, root: str) -> str:
    """The file's path relative to the input root (zip members as `<zip>/<member>`)."""
    rel = os.path.relpath(self.path, root) if os.path.isdir(root) else os.path.basename(self.path)
    return f"{rel}/{self.member}" if self.member else rel

  @property
  def folder(self) -> str:
    """Name of the folder holding the file (inside the zip for members)."""
    return os.path.basename(os.path.dirname(self.member or self.path))


def is_zip(path: str) -> bool:
  """True for a path named like a zip archive."""
  return path.lower().endswith(ZIP_SUFFIX)


def list_input_files(root: str) -> tuple[list[FileRef], list[tuple[FileRef, str]]]:
  """Lists every file below `root` (a folder, a zip, or one file), zips expanded into members.

  Returns:
    (files, problems): the files in a deterministic order, and (file, reason) for zip archives
    that could not be opened (each counts as one skipped input file).
  """
  if os.path.isdir(root):
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      paths.extend(os.path.join(dirpath, f) for f in sorted(filenames))
  else:
    paths = [root]
  files, problems = [], []
  for path in paths:
    if not is_zip(path):
      files.append(FileRef(path))
      continue
    try:
      with zipfile.ZipFile(path) as zf:
        files.extend(FileRef(path, m) for m in sorted(zf.namelist()) if not m.endswith("/"))
    except (zipfile.BadZipFile, OSError) as e:
      problems.append((FileRef(path), f"unreadable zip archive ({type(e).__name__})"))
  return files, problems


def iter_file_bytes(refs: Iterable[FileRef]) -> Iterator[tuple[FileRef, bytes | Exception]]:
  """Yields (file, its bytes or the exception raised reading it), opening each zip once."""
  for path, group in itertools.groupby(refs, key=lambda r: r.path):
    group = list(group)
    if not group[0].member:
      for ref in group:
        try:
          with open(ref.path, "rb") as f:
            yield ref, f.read()
        except OSError as e:
          yield ref, e
      continue
    try:
      zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      for ref in group:
        yield ref, e
      continue
    with zf:
      for ref in group:
        try:
          yield ref, zf.read(ref.member)
        except (KeyError, zipfile.BadZipFile, OSError, EOFError) as e:
          yield ref, e


# ---------------------------------------------------------------------------------------------
# Headers.


def _number(value, default: float = math.nan) -> float:
  """A DICOM numeric value (DS/IS/str) as float; `default` when absent or unparsable."""
  try:
    return float(value) if value is not None and value != "" else default
  except (TypeError, ValueError):
    return default


def _vector(value, size: int) -> np.ndarray | None:
  """A multi-valued numeric tag as a float64 [size] vector, None when absent or malformed."""
  try:
    vec = np.asarray([float(v) for v in value], dtype=np.float64)
  except (TypeError, ValueError):
    return None
  return vec if vec.shape == (size,) and np.all(np.isfinite(vec)) else None


def _seconds_of_day(tm) -> float:
  """A DICOM TM value (HHMMSS.frac) as seconds since midnight; nan when absent."""
  text = str(tm or "").strip()
  m = re.match(r"^(\d{2})(\d{2})?(\d{2}(?:\.\d*)?)?", text)
  if not m:
    return math.nan
  return 3600 * int(m.group(1)) + 60 * int(m.group(2) or 0) + float(m.group(3) or 0)


class UnsupportedFileError(ValueError):
  """A DICOM image this reader cannot use; the message holds no tag values."""


@dataclasses.dataclass
class Frame:
  """Header facts of one image frame: a single-frame file, or one frame of a multi-frame file."""

  ref: FileRef
  index: int  # frame index within its file
  series_key: str
  instance_number: float  # ordering key within the cine
  trigger_time_ms: float  # TriggerTime (nan when absent)
  position: np.ndarray | None  # (3,) ImagePositionPatient, mm
  orientation: np.ndarray | None  # (6,) ImageOrientationPatient
  pixel_spacing: tuple[float, float] | None  # (row, column) spacing, mm
  shape: tuple[int, int]  # (rows, columns)
  slice_thickness_mm: float
  slice_location: float
  rescale: tuple[float, float]  # (slope, intercept)
  acquisition_time_s: float = math.nan  # AcquisitionDateTime/AcquisitionTime, seconds of the day
  cardiac_images: int = 0  # CardiacNumberOfImages: frames per cycle (0 when absent)
  rr_interval_ms: float = math.nan  # NominalInterval, else from HeartRate

  def order_key(self) -> tuple:
    """Acquisition order: InstanceNumber, then acquisition time, then file and frame."""
    time = self.acquisition_time_s if math.isfinite(self.acquisition_time_s) else math.inf
    return (self.instance_number, time, self.ref, self.index)


@dataclasses.dataclass
class SeriesInfo:
  """What a series says about itself (shared by its frames)."""

  key: str
  number: int
  time_s: float  # SeriesTime (else AcquisitionTime) in seconds of the day; nan when absent
  description: str
  protocol: str
  folder: str  # naming hint: the folder holding its files (e.g. Kaggle `sax_5`) or a manifest
  is_phase: bool  # ImageType marks phase/velocity images

  @property
  def label(self) -> str:
    """Short name for messages and the manifest: `<number> <description>`."""
    return f"{self.number} {self.description or self.protocol}".strip()


@dataclasses.dataclass
class ParsedFile:
  """A read DICOM file: its dataset and frames, or the reason it cannot be used."""

  ref: FileRef
  reason: str = ""  # non-empty when the file is skipped
  dataset: Dataset | None = None
  frames: list[Frame] = dataclasses.field(default_factory=list)
  series: SeriesInfo | None = None
  study_uid: str = ""
  patient_id: str = ""
  accession: str = ""
  sop_uid: str = ""
  heart_rate_bpm: float = math.nan


def _first(seq_item: Dataset | None, sequence: str, keyword: str):
  """`seq_item.<sequence>[0].<keyword>`, or None."""
  if seq_item is None or sequence not in seq_item or not seq_item[sequence].value:
    return None
  return seq_item[sequence].value[0].get(keyword)


def _group_value(ds: Dataset, per_frame: Dataset | None, sequence: str, keyword: str):
  """A functional-group value: the per-frame item first, then the shared one."""
  value = _first(per_frame, sequence, keyword)
  if value is None and "SharedFunctionalGroupsSequence" in ds and ds.SharedFunctionalGroupsSequence:
    value = _first(ds.SharedFunctionalGroupsSequence[0], sequence, keyword)
  return value


def _spacing(value) -> tuple[float, float] | None:
  """(row, column) spacing from a PixelSpacing-like value; one number means square pixels."""
  if value is None:
    return None
  values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [
      value]
  vec = _vector(values * 2 if len(values) == 1 else values, 2)
  return (float(vec[0]), float(vec[1])) if vec is not None and np.all(vec > 0) else None


def _time_of_day_s(ds: Dataset) -> float:
  """When the frame was acquired (AcquisitionDateTime, else AcquisitionTime), seconds of the day;
  nan when absent."""
  stamp = str(ds.get("AcquisitionDateTime", "") or "")
  return _seconds_of_day(stamp[8:]) if len(stamp) > 8 else _seconds_of_day(
      ds.get("AcquisitionTime"))


def _rr_interval_ms(ds: Dataset) -> float:
  """The RR interval in ms: NominalInterval, else 60000 / HeartRate; nan when unknown."""
  interval, rate = _number(ds.get("NominalInterval")), _number(ds.get("HeartRate"))
  return interval if interval > 0 else (60000.0 / rate if rate > 0 else math.nan)


def _frames_of(ref: FileRef, ds: Dataset, series_key: str) -> list[Frame]:
  """The frames of a dataset: one for a single-frame image, else from the functional groups."""
  shape = (int(ds.Rows), int(ds.Columns))
  base = dict(
      ref=ref, series_key=series_key, shape=shape,
      position=_vector(ds.get("ImagePositionPatient"), 3),
      orientation=_vector(ds.get("ImageOrientationPatient"), 6),
      pixel_spacing=_spacing(ds.get("PixelSpacing")) or _spacing(ds.get("ImagerPixelSpacing")),
      slice_thickness_mm=_number(ds.get("SliceThickness")),
      slice_location=_number(ds.get("SliceLocation")),
      rescale=(_number(ds.get("RescaleSlope"), 1.0), _number(ds.get("RescaleIntercept"), 0.0)),
      acquisition_time_s=_time_of_day_s(ds),
      cardiac_images=max(0, int(_number(ds.get("CardiacNumberOfImages"), 0.0))),
      rr_interval_ms=_rr_interval_ms(ds))
  instance = _number(ds.get("InstanceNumber"), 0.0)
  num_frames = int(_number(ds.get("NumberOfFrames"), 1.0))
  per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
  has_groups = bool(per_frame) or "SharedFunctionalGroupsSequence" in ds
  if num_frames <= 1 and not has_groups:
    return [Frame(index=0, instance_number=instance,
                  trigger_time_ms=_number(ds.get("TriggerTime")), **base)]
  if per_frame and len(per_frame) != num_frames:
    raise UnsupportedFileError(
        f"{len(per_frame)} per-frame functional groups for {num_frames} frames")
  if not has_groups:
    # Legacy multi-frame: one plane over time; frame times from FrameTimeVector or FrameTime.
    vector = ds.get("FrameTimeVector")
    if vector is not None and len(vector) == num_frames:
      times = np.cumsum([_number(v, 0.0) for v in vector])
    else:
      times = np.arange(num_frames) * _number(ds.get("FrameTime"))
    return [Frame(index=i, instance_number=float(i), trigger_time_ms=float(times[i]),
                  **{**base, "acquisition_time_s": math.nan}) for i in range(num_frames)]
  frames = []
  for i in range(num_frames):
    item = per_frame[i] if per_frame else None
    position = _vector(_group_value(ds, item, "PlanePositionSequence", "ImagePositionPatient"), 3)
    orientation = _vector(
        _group_value(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    spacing = _spacing(_group_value(ds, item, "PixelMeasuresSequence", "PixelSpacing"))
    thickness = _number(_group_value(ds, item, "PixelMeasuresSequence", "SliceThickness"))
    trigger = _number(_group_value(ds, item, "CardiacSynchronizationSequence",
                                   "NominalCardiacTriggerDelayTime"))
    temporal = _number(_group_value(ds, item, "FrameContentSequence", "TemporalPositionIndex"))
    stamp = str(_group_value(ds, item, "FrameContentSequence", "FrameAcquisitionDateTime") or "")
    slope = _group_value(ds, item, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _group_value(ds, item, "PixelValueTransformationSequence", "RescaleIntercept")
    frames.append(Frame(
        ref=ref, index=i, series_key=series_key, shape=shape,
        # One frame per file (some exporters): the files' InstanceNumbers order the frames.
        instance_number=temporal if math.isfinite(temporal) else (
            instance if num_frames <= 1 else float(i)),
        trigger_time_ms=trigger if math.isfinite(trigger) else (
            _number(ds.get("TriggerTime")) if num_frames <= 1 else math.nan),
        position=position if position is not None else base["position"],
        orientation=orientation if orientation is not None else base["orientation"],
        pixel_spacing=spacing or base["pixel_spacing"],
        slice_thickness_mm=thickness if math.isfinite(thickness) else base["slice_thickness_mm"],
        slice_location=base["slice_location"],
        rescale=(_number(slope, base["rescale"][0]), _number(intercept, base["rescale"][1])),
        acquisition_time_s=(_seconds_of_day(stamp[8:]) if len(stamp) > 8
                            else base["acquisition_time_s"] if num_frames <= 1 else math.nan),
        cardiac_images=base["cardiac_images"], rr_interval_ms=base["rr_interval_ms"]))
  return frames


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
  """No value validation while reading: pydicom's validation messages quote tag values
  (names, dates) into warnings and logs."""
  with pydicom.config.disable_value_validation(), warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    yield


def read_dataset(source: bytes | BinaryIO, *, stop_before_pixels: bool = False) -> Dataset:
  """Parses DICOM bytes or a seekable binary file; files without the preamble need `force`.

  Raises:
    InvalidDicomError: for data that is not DICOM even when forced (no image dimensions or
      SOP class found).
  """
  fp = io.BytesIO(source) if isinstance(source, bytes) else source
  try:
    return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
  except InvalidDicomError:
    # Old files (ACR-NEMA style, some PACS exports) lack the preamble; only accept the forced
    # read if it looks like an image or at least carries a SOP class.
    fp.seek(0)
    with warnings.catch_warnings():  # forced reads of non-DICOM files warn about VRs
      warnings.simplefilter("ignore")
      ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True)
    if "SOPClassUID" not in ds and "Rows" not in ds:
      raise InvalidDicomError("no DICOM preamble and no DICOM elements found") from None
    if "TransferSyntaxUID" not in ds.file_meta:
      ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def _parse_problem(e: Exception) -> str:
  """The skip reason for bytes that pydicom could not parse."""
  if isinstance(e, InvalidDicomError):
    return "not a DICOM file"
  return f"corrupt or truncated DICOM ({type(e).__name__})"


def _read_problem(e: Exception) -> str:
  """The skip reason for a file whose bytes could not be read."""
  return f"unreadable file ({type(e).__name__})"


def _is_dicomdir(ds: Dataset) -> bool:
  """A DICOMDIR: the media directory index of a DICOM file set, not an image."""
  meta = getattr(ds, "file_meta", None)
  return ((meta is not None and meta.get("MediaStorageSOPClassUID")
           == pydicom.uid.MediaStorageDirectoryStorage) or "DirectoryRecordSequence" in ds)


@dataclasses.dataclass(frozen=True)
class HeaderSummary:
  """What discovery needs from a file: its study and patient (identifying: memory only)."""

  ref: FileRef
  reason: str = ""  # non-empty when the file is not a readable DICOM file
  study_uid: str = ""
  patient_id: str = ""
  accession: str = ""
  study_datetime: str = ""  # StudyDate + StudyTime, for ordering a patient's visits


def scan_header(ref: FileRef) -> HeaderSummary:
  """Reads a file's header only (stops before the pixel data); never raises."""
  try:
    if ref.member:
      with zipfile.ZipFile(ref.path) as zf:
        source = zf.read(ref.member)
    else:
      source = open(ref.path, "rb")  # pylint: disable=consider-using-with
  except (OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
    return HeaderSummary(ref, reason=_read_problem(e))
  with _quiet_pydicom():
    try:
      ds = read_dataset(source, stop_before_pixels=True)
    except Exception as e:  # pydicom raises many types on corrupt input  # pylint: disable=broad-except
      return HeaderSummary(ref, reason=_parse_problem(e))
    finally:
      if not isinstance(source, bytes):
        source.close()
    if _is_dicomdir(ds):
      return HeaderSummary(ref, reason=DICOMDIR_REASON)
    return HeaderSummary(
        ref, study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        accession=str(ds.get("AccessionNumber", "") or ""),
        study_datetime=f"{ds.get('StudyDate', '') or ''}{ds.get('StudyTime', '') or ''}")


def parse_file(ref: FileRef, data: bytes | Exception, *, hint: str = "") -> ParsedFile:
  """Reads one file into a `ParsedFile` (never raises: problems become `reason`).

  Args:
    ref: the file.
    data: its bytes, or the exception raised reading them.
    hint: a series name from outside the file (e.g. a zip manifest), used for view
      classification like a folder name; defaults to the folder name.
  """
  if isinstance(data, Exception):
    return ParsedFile(ref, reason=_read_problem(data))
  with _quiet_pydicom():
    return _parse_bytes(ref, data, hint)


def _parse_bytes(ref: FileRef, data: bytes, hint: str) -> ParsedFile:
  """`parse_file` of bytes, without the pydicom settings."""
  try:
    ds = read_dataset(data)
  except Exception as e:  # pydicom raises many types on corrupt input  # pylint: disable=broad-except
    return ParsedFile(ref, reason=_parse_problem(e))
  try:
    return _parse_dataset(ref, ds, hint or ref.folder)
  except UnsupportedFileError as e:
    return ParsedFile(ref, reason=f"unsupported multi-frame file ({e})")
  except Exception as e:  # malformed values anywhere in the header  # pylint: disable=broad-except
    # Only the type: pydicom's messages may quote tag values (names, dates).
    return ParsedFile(ref, reason=f"malformed DICOM header ({type(e).__name__})")


def _parse_dataset(ref: FileRef, ds: Dataset, hint: str) -> ParsedFile:
  """Header facts of a dataset, or the reason it is not a usable MR image."""
  parsed = ParsedFile(
      ref, study_uid=str(ds.get("StudyInstanceUID", "")), patient_id=str(ds.get("PatientID", "")),
      accession=str(ds.get("AccessionNumber", "")), sop_uid=str(ds.get("SOPInstanceUID", "")))
  rate = _number(ds.get("HeartRate"))
  interval_ms = _number(ds.get("NominalInterval"))
  parsed.heart_rate_bpm = rate if rate > 0 else (60000.0 / interval_ms if interval_ms > 0 else
                                                 math.nan)
  modality = str(ds.get("Modality", "") or "")
  if _is_dicomdir(ds):
    parsed.reason = DICOMDIR_REASON
  elif not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
    parsed.reason = "no pixel data (not an image)"
  elif modality and modality != "MR":
    parsed.reason = f"not an MR image (Modality {modality})"
  elif "Rows" not in ds or "Columns" not in ds:
    parsed.reason = "no image dimensions (Rows/Columns missing)"
  elif str(ds.get("PhotometricInterpretation", "MONOCHROME2")) not in _MONOCHROME:
    parsed.reason = f"not a greyscale image (PhotometricInterpretation {ds.PhotometricInterpretation})"
  if parsed.reason:
    return parsed
  image_type = {str(v).upper() for v in (ds.get("ImageType") or [])}
  series_key = str(ds.get("SeriesInstanceUID", "") or
                   f"{ds.get('SeriesNumber', '')}|{ds.get('SeriesDescription', '')}|{ref.folder}")
  parsed.series = SeriesInfo(
      key=series_key, number=int(_number(ds.get("SeriesNumber"), 0.0)),
      time_s=_seconds_of_day(ds.get("SeriesTime") or ds.get("AcquisitionTime")),
      description=str(ds.get("SeriesDescription", "") or ""),
      protocol=str(ds.get("ProtocolName", "") or ""), folder=hint,
      is_phase=bool(image_type & _PHASE_IMAGE_TYPES))
  parsed.frames = _frames_of(ref, ds, series_key)
  parsed.dataset = ds
  return parsed


# ---------------------------------------------------------------------------------------------
# View classification from names.


def normalise_name(text: str) -> str:
  """Lower case, punctuation to spaces, letters and digits split: `SAX_b1` -> `sax b 1`."""
  text = re.sub(r"[^a-z0-9*]+", " ", text.lower())
  text = re.sub(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])", " ", text)
  return " ".join(text.split())


_CHAMBER = r"(ch|chamber|chambers|chbr|cv|c|k|kb|kammer)"
# (what, pattern) over normalised names; checked before the view patterns.
_NON_CINE = (
    ("derived results", r"\binline ?vf\b|\bvf\b|\bresults?\b|\bevaluation\b|\bmpr\b|\bmip\b"
                        r"|\bscreen ?(shot|save)\b|\bsegmentation\b"),
    ("scout/localiser", r"\b(scout|locali[sz]er|loc|survey|pilot|tri ?pilot|plan|planning)\b"
                        r"|\b(3|three) plane\b"),
    ("flow/phase contrast", r"\b(flow|q ?flow|pc|phase contrast|venc|velocity|vel)\b"),
    ("tagging", r"\b(tag|tags|tagging|tagged|grid|spamm|c ?spamm)\b"),
    ("parametric map", r"\b(molli|shmolli|sh molli|sasha|ecv|map|maps|mapping)\b"
                       r"|\bt [12]\b(?! ?\*? ?(ch|chamber)\b)|\bt 2 ?\*|\bt 2 star\b"),
    ("late gadolinium enhancement", r"\b(lge|de|psir|mde|ir|delayed|viability|late gad\w*"
                                    r"|late enhancement|ti scout|look locker|inversion)\b"),
    ("perfusion", r"\b(perf|perfusion|fpp|first pass)\b"),
    ("great vessels/right heart view", r"\b(ao|aorta|aortic|aort|asc|arch|pa|pulmonary|rvot"
                                       r"|tricuspid|angio|mra|tof|coronary)\b|\brv (2|3) ch\b"),
    ("axial/coronal/sagittal stack", r"\b(axial|ax|transverse|tra|trans|coronal|cor|sagittal"
                                     r"|sag)\b"),
    ("morphology (non-cine)", r"\b(haste|stir|tse|fse|dwi|diffusion|black blood|dark blood|bb"
                              r"|db|t 2 w|t 1 w)\b"),
)
_VIEW_PATTERNS = (
    (types.LAX_3CH, rf"\b(3|three) ?{_CHAMBER}\b|\bch 3\b|\blvot\b|\bplax\b|\balax\b"
                    r"|\bapical long axis\b"),
    (types.LAX_4CH, rf"\b(4|four) ?{_CHAMBER}\b|\bch 4\b|\bhla\b|\bhorizontal long axis\b"),
    (types.LAX_2CH, rf"\b(2|two) ?{_CHAMBER}\b|\bch 2\b|\bvla\b|\bvertical long axis\b"),
    (types.SAX, r"\bsax\w*|\bsa\b|\bshort ?axis\b|\bsht ax\b|\bkurzachse\b|\bstack\b"),
    (LAX, r"\b(lax|la|long ?axis|langachse)\b"),
)


@dataclasses.dataclass(frozen=True)
class NameClass:
  """What a series name says: a view (`types.VIEWS` or `LAX`), a non-cine kind, or nothing."""

  view: str = ""
  non_cine: str = ""


def classify_name(text: str) -> NameClass:
  """Classifies one series name (description, protocol or folder name).

  Examples: `CINE_segmented_LAX_4Ch`, `cine_4ch`, `4 CH`, `HLA` -> 4CH; `VLA`, `2ch_21` -> 2CH;
  `LVOT`, `3 chamber` -> 3CH; `sax_5`, `CINE_segmented_SAX_b3`, `FIESTA CINE SA`, `short axis`
  -> SAX; `cine LAX` -> LAX (which one decided by geometry); `CINE_segmented_SAX_InlineVF`,
  `localizer`, `T1 MOLLI` -> non-cine; `trufi_retro` -> nothing (geometry decides).
  """
  name = normalise_name(text)
  for what, pattern in _NON_CINE:
    if re.search(pattern, name):
      return NameClass(non_cine=what)
  for view, pattern in _VIEW_PATTERNS:
    if re.search(pattern, name):
      return NameClass(view=view)
  return NameClass()


def classify_series(series: SeriesInfo) -> NameClass:
  """The first informative class among the series' description, protocol and folder names."""
  for text in (series.description, series.protocol, series.folder):
    result = classify_name(text)
    if result.view or result.non_cine:
      return result
  return NameClass()


# ---------------------------------------------------------------------------------------------
# Geometry.


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


# ---------------------------------------------------------------------------------------------
# Assembly.


@dataclasses.dataclass
class _Candidate:
  """A cine in the making: frames of one series at one position."""

  series: SeriesInfo
  frames: list[Frame]
  view: str = ""
  normal: np.ndarray | None = None
  # Along the SAX stack's image normal (row x column direction, as the scanner defines it; the
  # base->apex order may run either way along it), else SliceLocation.
  position_mm: float = math.nan
  pixels: np.ndarray | None = None  # [T, H, W] float32
  times_ms: np.ndarray | None = None  # [T] frame times after the R wave; None when unknown

  @property
  def recency(self) -> tuple[float, float, float]:
    """Sort key: later series (number, then time, then instance) are more recent."""
    time = self.series.time_s if math.isfinite(self.series.time_s) else -1.0
    return (self.series.number, time, max(f.instance_number for f in self.frames))


@dataclasses.dataclass
class AssembledStudy:
  """The cines of a study and the fate of each of its files."""

  cines: list[types.Cine]
  file_status: dict[FileRef, tuple[str, str, str]]  # file -> (status, reason, series label)
  file_cine: dict[FileRef, int]  # used file -> index of its cine in `cines`
  study_uid: str
  patient_id: str
  accession: str
  identifiers: tuple[str, ...]  # identifying values, for scrubbing free text only
  heart_rate_bpm: float
  notes: list[str] = dataclasses.field(default_factory=list)  # guesses made while assembling

  @property
  def skipped_reasons(self) -> collections.Counter:
    """Count of each skip reason over the files."""
    return collections.Counter(r for s, r, _ in self.file_status.values() if s == SKIPPED)


class _Ledger:
  """Records why frames were dropped; a file is used when any of its frames is used."""

  def __init__(self):
    self.reasons: dict[FileRef, str] = {}
    self.series: dict[FileRef, str] = {}
    self.used: set[FileRef] = set()

  def drop(self, frames: Iterable[Frame], reason: str, series: SeriesInfo | None = None):
    for f in frames:
      self.reasons.setdefault(f.ref, reason)
      if series is not None:
        self.series.setdefault(f.ref, series.label)

  def use(self, frames: Iterable[Frame], series: SeriesInfo):
    for f in frames:
      self.used.add(f.ref)
      self.series[f.ref] = series.label


def _same_plane(a: Frame, b: Frame) -> bool:
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
    return angle_between_planes_deg(plane_normal(a.orientation),
                                    plane_normal(b.orientation)) <= SAME_ORIENTATION_DEG
  return True


def _split_by_position(frames: list[Frame]) -> list[list[Frame]]:
  """Splits a series' frames into groups imaging one plane each (in first-seen order)."""
  groups: list[list[Frame]] = []
  for f in frames:
    group = next((g for g in groups if _same_plane(g[0], f)), None)
    if group is None:
      groups.append([f])
    else:
      group.append(f)
  return groups


def _geometry_problem(frames: list[Frame]) -> str:
  """Why the frames cannot be one cine (mixed geometry), or ""."""
  shapes = sorted({f.shape for f in frames})
  if len(shapes) > 1:
    return "inconsistent geometry: mixed matrix sizes " + ", ".join(f"{r}x{c}" for r, c in shapes)
  spacings = [f.pixel_spacing for f in frames]
  if None in spacings:
    return "missing PixelSpacing (and no ImagerPixelSpacing): the pixel size is unknown"
  if not np.allclose(spacings, spacings[0], rtol=SAME_SPACING_RTOL, atol=0.0):
    return "inconsistent geometry: mixed pixel spacings"
  normals = [plane_normal(f.orientation) for f in frames if f.orientation is not None]
  if normals and (len(normals) != len(frames) or max(
      angle_between_planes_deg(normals[0], n) for n in normals) > SAME_ORIENTATION_DEG):
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


def _times_without_trigger(frames: list[Frame]) -> np.ndarray | None:
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


def _one_cycle(frames: list[Frame]) -> tuple[list[Frame], np.ndarray | None,
                                            list[tuple[list[Frame], str]]]:
  """Puts the frames of one plane in temporal order and keeps one cardiac cycle.

  Frames are taken in acquisition order (`Frame.order_key`). With trigger times: a plane imaged
  over several cycles keeps its last cycle (`_last_cycle`), a trigger time still repeated keeps
  its latest image, and frames are sorted by trigger time. Without (absent or all equal): a plane
  holding a multiple of CardiacNumberOfImages frames keeps the last cycle's frames, and times
  come from `_times_without_trigger`.

  Returns:
    (kept frames in temporal order, their times in ms or None when unknown, [(dropped frames,
    reason)]).
  """
  ordered = sorted(frames, key=Frame.order_key)
  triggers = np.array([f.trigger_time_ms for f in ordered])
  dropped: list[tuple[list[Frame], str]] = []
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


def _decode(candidates: list[_Candidate], datasets: dict[FileRef, Dataset],
            ledger: _Ledger) -> list[_Candidate]:
  """Decodes the pixels of each candidate (float32, rescaled); drops undecodable frames."""
  cache: dict[FileRef, np.ndarray | str] = {}
  decoded = []
  for cand in candidates:
    arrays, good, good_index = [], [], []
    for i, f in enumerate(cand.frames):
      if f.ref not in cache:
        ds = datasets[f.ref]
        try:
          arr = ds.pixel_array
          if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            arr = (2 ** int(ds.get("BitsStored", 16)) - 1) - arr.astype(np.float32)
          cache[f.ref] = arr.reshape((-1,) + f.shape)
        except Exception as e:  # decoder plugins raise many types  # pylint: disable=broad-except
          syntax = ds.file_meta.get("TransferSyntaxUID")
          syntax_name = getattr(syntax, "name", str(syntax))
          cache[f.ref] = f"pixel data not decodable ({syntax_name}: {type(e).__name__})"
      arr = cache[f.ref]
      if isinstance(arr, str):
        ledger.drop([f], arr, cand.series)
        continue
      slope, intercept = f.rescale
      arrays.append(arr[f.index].astype(np.float32) * np.float32(slope) + np.float32(intercept))
      good.append(f)
      good_index.append(i)
    if len(good) < MIN_CINE_FRAMES:
      ledger.drop(cand.frames, f"too few decodable frames ({len(good)} < {MIN_CINE_FRAMES})",
                  cand.series)
      continue
    if cand.times_ms is not None:
      cand.times_ms = cand.times_ms[good_index]
    cand.frames, cand.pixels = good, np.stack(arrays)
    decoded.append(cand)
  return decoded


def _sax_stack(sax: list[_Candidate], ledger: _Ledger) -> tuple[np.ndarray | None,
                                                                  list[_Candidate]]:
  """Finds the stack normal (base->apex) and orders the SAX slices, dropping repeats.

  Returns:
    ([3] unit normal or None without geometry, the kept slices ordered base to apex).
  """
  with_geometry = [c for c in sax if c.normal is not None and c.frames[0].position is not None]
  if with_geometry:
    reference = with_geometry[0].normal
    aligned = [c.normal * np.sign(np.dot(c.normal, reference)) for c in with_geometry]
    normal = np.mean(aligned, axis=0)
    normal /= np.linalg.norm(normal)
    for c in sax:
      if c not in with_geometry:
        ledger.drop(c.frames, "SAX slice without position/orientation in a stack with geometry",
                    c.series)
      elif angle_between_planes_deg(c.normal, normal) > SAX_MAX_ANGLE_DEG:
        ledger.drop(c.frames, "SAX slice not parallel to the SAX stack", c.series)
    slices = [c for c in with_geometry if angle_between_planes_deg(c.normal, normal)
              <= SAX_MAX_ANGLE_DEG]
    for c in slices:
      c.position_mm = float(np.dot(c.frames[0].position, normal))
  else:
    normal = None
    slices = [c for c in sax if math.isfinite(c.frames[0].slice_location)]
    for c in sax:
      if c not in slices:
        ledger.drop(c.frames, "SAX slice without ImagePositionPatient or SliceLocation", c.series)
    for c in slices:
      c.position_mm = c.frames[0].slice_location
  if not slices:
    return normal, []
  cos_apex = float(np.dot(normal, APEX_DIRECTION_LPS)) if normal is not None else 0.0
  if abs(cos_apex) >= APEX_MIN_COS:
    sign = 1.0 if cos_apex > 0 else -1.0
  else:  # the first acquired slice (lowest series number) is the base
    first = min(slices, key=lambda c: c.recency)
    sign = 1.0 if first.position_mm <= np.median([c.position_mm for c in slices]) else -1.0
  if normal is not None:
    normal = normal * sign
  slices.sort(key=lambda c: sign * c.position_mm)
  kept: list[_Candidate] = []
  for c in slices:
    if kept and abs(c.position_mm - kept[-1].position_mm) < DUPLICATE_POSITION_MM:
      older, newer = sorted([kept[-1], c], key=lambda x: x.recency)
      ledger.drop(older.frames, f"duplicate SAX position: superseded by series "
                  f"{newer.series.number}", older.series)
      kept[-1] = newer
    else:
      kept.append(c)
  return normal, kept


def assemble_study(files: Sequence[ParsedFile], *,
                   min_frames: int = MIN_CINE_FRAMES) -> AssembledStudy:
  """Turns the parsed files of one study into cines, accounting for every file.

  See the module docstring for the rules. Files are expected to belong to one study (the
  caller groups them); the study UID, patient ID and accession reported are the most common
  ones among the files.

  Args:
    files: the study's files, parsed with `parse_file`.
    min_frames: the fewest frames a cine may have.

  Returns:
    The cines (SAX base to apex first, then 2CH, 3CH, 4CH) and every file's status.
  """
  with _quiet_pydicom():
    return _assemble(files, min_frames)


def _assemble(files: Sequence[ParsedFile], min_frames: int) -> AssembledStudy:
  """`assemble_study` without the pydicom settings."""
  ledger = _Ledger()
  for pf in files:
    if pf.reason:
      ledger.reasons[pf.ref] = pf.reason
  seen_sop: set[str] = set()
  series_frames: dict[str, list[Frame]] = {}
  series_info: dict[str, SeriesInfo] = {}
  datasets: dict[FileRef, Dataset] = {}
  for pf in files:
    if pf.reason:
      continue
    if pf.sop_uid and pf.sop_uid in seen_sop:
      ledger.drop(pf.frames, "duplicate file (same SOPInstanceUID as another file)", pf.series)
      continue
    seen_sop.add(pf.sop_uid)
    datasets[pf.ref] = pf.dataset
    series_frames.setdefault(pf.series.key, []).extend(pf.frames)
    series_info.setdefault(pf.series.key, pf.series)

  candidates: list[_Candidate] = []
  for key, frames in series_frames.items():
    series = series_info[key]
    name = classify_series(series)
    if series.is_phase:
      name = NameClass(non_cine="flow/phase contrast")
    if name.non_cine:
      ledger.drop(frames, f"non-cine series ({name.non_cine})", series)
      continue
    for group in _split_by_position(frames):
      problem = _geometry_problem(group)
      if problem:
        ledger.drop(group, problem, series)
        continue
      kept, times, dropped = _one_cycle(group)
      for frames_dropped, reason in dropped:
        ledger.drop(frames_dropped, reason, series)
      if len(kept) < min_frames:
        ledger.drop(kept, f"too few frames ({len(kept)} < {min_frames}): not a cine", series)
        continue
      orientation = kept[0].orientation
      candidates.append(_Candidate(
          series, kept, view=name.view, times_ms=times,
          normal=plane_normal(orientation) if orientation is not None else None))
  candidates = _decode(candidates, datasets, ledger)

  sax = [c for c in candidates if c.view == types.SAX]
  if not sax:  # no named SAX: a cluster of parallel unnamed planes at several positions
    unnamed = [c for c in candidates if not c.view and c.normal is not None]
    for c in unnamed:
      parallel = [d for d in unnamed
                  if angle_between_planes_deg(c.normal, d.normal) <= SAX_MAX_ANGLE_DEG]
      positions = {round(float(np.dot(d.frames[0].position, c.normal)), 0) for d in parallel
                   if d.frames[0].position is not None}
      if len(positions) >= MIN_GEOMETRIC_SAX_SLICES and len(parallel) > len(sax):
        sax = parallel
    for c in sax:
      c.view = types.SAX
  sax_normal, sax = _sax_stack(sax, ledger)

  lax_named = [c for c in candidates if c.view in types.LONG_AXIS_VIEWS]
  undecided = [c for c in candidates if c.view in ("", LAX)]
  lax_unknown = []
  # Without a SAX stack, planes are judged against the typical long axis of the heart.
  reference = sax_normal if sax_normal is not None else APEX_DIRECTION_LPS
  for c in undecided:
    if c.normal is None:
      ledger.drop(c.frames, "view unknown: no recognised series name and no plane orientation "
                  "(ImageOrientationPatient)", c.series)
      continue
    angle = angle_between_planes_deg(c.normal, reference)
    if sax_normal is None:
      if angle >= ANATOMY_LAX_MIN_ANGLE_DEG:
        lax_unknown.append(c)
      else:
        ledger.drop(c.frames, "view unknown: no recognised series name, no SAX stack, and the "
                    f"plane is at {angle:.0f} degrees to a typical heart's short axis (a "
                    f"long-axis view is at least {ANATOMY_LAX_MIN_ANGLE_DEG:.0f})", c.series)
    elif angle >= LAX_MIN_ANGLE_DEG:
      lax_unknown.append(c)
    elif angle <= SAX_MAX_ANGLE_DEG and c.view != LAX:
      ledger.drop(c.frames, "unnamed plane parallel to the SAX stack but not part of it", c.series)
    else:
      ledger.drop(c.frames, f"view unknown: plane at {angle:.0f} degrees to the SAX stack",
                  c.series)
  notes = []
  if lax_unknown:
    known = [(c.view, c.normal) for c in lax_named if c.normal is not None]
    views = classify_lax_geometry(reference, [c.normal for c in lax_unknown], known)
    for c, view in zip(lax_unknown, views):
      c.view = view
    if sax_normal is None:
      notes.append(f"{len(lax_unknown)} unnamed long-axis cine(s) named "
                   f"{'/'.join(sorted(set(views)))} from a typical heart's axis (no short-axis "
                   "stack to measure it)")
  lax: dict[str, _Candidate] = {}
  for c in sorted(lax_named + lax_unknown, key=lambda c: c.recency):
    if c.view in lax:
      ledger.drop(lax[c.view].frames, f"repeated {c.view} view: superseded by series "
                  f"{c.series.number}", lax[c.view].series)
    lax[c.view] = c

  kept = sax + [lax[view] for view in types.LONG_AXIS_VIEWS if view in lax]
  cines = [_to_cine(c, slice_index=i if c.view == types.SAX else -1) for i, c in enumerate(kept)]
  file_cine = {}
  for i, c in enumerate(kept):
    ledger.use(c.frames, c.series)
    file_cine.update((f.ref, i) for f in c.frames)

  status = {}
  for pf in files:
    if pf.ref in ledger.used:
      status[pf.ref] = (USED, "", ledger.series.get(pf.ref, ""))
    else:
      status[pf.ref] = (SKIPPED, ledger.reasons.get(pf.ref, "not part of any cine"),
                        ledger.series.get(pf.ref, pf.series.label if pf.series else ""))
  good = [pf for pf in files if not pf.reason]
  good_per_series = list({pf.series.key: pf for pf in good if pf.ref in datasets}.values())
  common = lambda attr: collections.Counter(getattr(pf, attr) for pf in good).most_common(1)
  rates = [pf.heart_rate_bpm for pf in good if math.isfinite(pf.heart_rate_bpm)]
  return AssembledStudy(
      cines=cines, file_status=status, file_cine=file_cine,
      study_uid=common("study_uid")[0][0] if good else "",
      patient_id=common("patient_id")[0][0] if good else "",
      accession=common("accession")[0][0] if good else "",
      identifiers=_identifiers(datasets[pf.ref] for pf in good_per_series),
      heart_rate_bpm=float(np.median(rates)) if rates else math.nan, notes=notes)


def _identifiers(datasets: Iterable[Dataset]) -> tuple[str, ...]:
  """The identifying values (`IDENTIFYING_KEYWORDS`) found in the datasets."""
  return tuple(sorted({str(ds.get(k)) for ds in datasets for k in IDENTIFYING_KEYWORDS
                       if ds.get(k)}))


def _to_cine(c: _Candidate, *, slice_index: int) -> types.Cine:
  first = c.frames[0]
  name = c.series.description or c.series.protocol or (
      c.series.folder if classify_name(c.series.folder).view else "")
  return types.Cine(
      frames=c.pixels, pixel_spacing=first.pixel_spacing, view=c.view,
      trigger_times_ms=None if c.times_ms is None else c.times_ms.astype(np.float32),
      slice_index=slice_index,
      slice_position_mm=c.position_mm if c.view == types.SAX else math.nan,
      image_position=first.position, image_orientation=first.orientation,
      slice_thickness_mm=first.slice_thickness_mm, series_description=name)


def read_files(refs: Sequence[FileRef], hints: dict[FileRef, str] | None = None
               ) -> list[ParsedFile]:
  """Reads and parses the given files (zip members read with one open per archive).

  Args:
    refs: the files, grouped by zip archive for speed.
    hints: optional series names from outside the files (see `parse_file`).
  """
  hints = hints or {}
  return [parse_file(ref, data, hint=hints.get(ref, "")) for ref, data in iter_file_bytes(refs)]
