"""Parsing DICOM files: headers, frames and series facts, or why a file cannot be used.

`parse_file` turns one file's bytes into a `ParsedFile` (the dataset, its `Frame`s and its
`SeriesInfo`) or a skip reason: not DICOM, truncated, no pixel data, a DICOMDIR, not MR, not
greyscale. Multi-frame files (enhanced MR, a cine or a whole stack per file, or one frame per
file) are expanded into frames from their functional groups (position, orientation, spacing,
trigger delay, rescale); legacy multi-frame files without them are one cine with frame times from
FrameTimeVector/FrameTime. Pixel spacing is PixelSpacing, else ImagerPixelSpacing (one value:
square pixels). `scan_header` reads only what study discovery needs. Pixels are decoded later,
by `assemble`, and only within `files.ReadLimits`: a header claiming more pixels or frames than
the limits, or more pixel data than the file holds, is skipped here with the reason, as is a
deflated file that would inflate beyond `max_file_bytes`. Reading prints nothing: pydicom's
warnings and the DICOM libraries' loggers, which quote file paths and tag values, are silenced
while reading (`quiet_pydicom`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import re
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cmr_jax.dicom import files as dicom_files

DICOMDIR_REASON = "DICOMDIR (the index of a DICOM file set, not an image)"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_FLOAT_PIXEL_BITS = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}
# Libraries that log while reading or decoding; their messages quote file paths and tag values.
_LIBRARY_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "PIL")
_SILENT = logging.CRITICAL + 1
_INFLATE_CHUNK_BYTES = 1 << 20
_DEFLATED = pydicom.uid.DeflatedExplicitVRLittleEndian
_DEFLATED_UID_BYTES = _DEFLATED.encode("ascii")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PHASE_IMAGE_TYPES = {"P", "PHASE", "VELOCITY", "PHASE MAP"}
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "StudyID")


def number(value, default: float = math.nan) -> float:
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


# A plain decimal or integer string (DS/IS) with optional padding: such values convert the same
# by `float`, which is ~20x cheaper than pydicom's element conversion. Anything else (empty
# values, odd characters, overflow) is left to pydicom, whose handling (and errors) stand.
_PLAIN_NUMBER = re.compile(rb" *[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)? *")
_NUMERIC_VRS = ("DS", "IS")


@functools.lru_cache(maxsize=None)
def _numeric_tag(keyword: str) -> int | None:
  """The tag of a keyword whose dictionary VR is DS or IS (text), else None."""
  tag = pydicom.datadict.tag_for_keyword(keyword)
  return tag if tag is not None and pydicom.datadict.dictionary_VR(tag) in _NUMERIC_VRS else None


def _plain_numbers(ds: Dataset, keyword: str) -> list[float] | None:
  """The values of a DS/IS element still as read (not yet converted) when every one is a plain
  finite number; None otherwise (absent, converted already, another VR, any other content)."""
  tag = _numeric_tag(keyword)
  elem = ds.get_item(tag) if tag is not None else None
  # An implicit VR (None) is the dictionary's; an explicit one must be DS or IS too.
  if (not isinstance(elem, pydicom.dataelem.RawDataElement) or elem.VR not in (None,)
      + _NUMERIC_VRS or not isinstance(elem.value, bytes)):
    return None
  parts = elem.value.rstrip(b" \x00").split(b"\\")
  if not all(_PLAIN_NUMBER.fullmatch(p) for p in parts):
    return None
  values = [float(p) for p in parts]
  return values if all(math.isfinite(v) for v in values) else None


def _number_of(ds: Dataset, keyword: str, default: float = math.nan) -> float:
  """`number(ds.get(keyword), default)`, read from the raw bytes where they are plain."""
  values = _plain_numbers(ds, keyword)
  if values is None:
    return number(ds.get(keyword), default)
  return values[0] if len(values) == 1 else default  # several values are not one number


def _vector_of(ds: Dataset, keyword: str, size: int) -> np.ndarray | None:
  """`_vector(ds.get(keyword), size)`, read from the raw bytes where they are plain."""
  values = _plain_numbers(ds, keyword)
  if values is None or len(values) == 1:  # one value is not a vector (pydicom: a number)
    return _vector(ds.get(keyword), size)
  return _vector(values, size)


def _spacing_of(ds: Dataset, keyword: str) -> tuple[float, float] | None:
  """`_spacing(ds.get(keyword))`, read from the raw bytes where they are plain."""
  values = _plain_numbers(ds, keyword)
  return _spacing(ds.get(keyword) if values is None else values)


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

  ref: dicom_files.FileRef
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

  ref: dicom_files.FileRef
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
  interval, rate = _number_of(ds, "NominalInterval"), _number_of(ds, "HeartRate")
  return interval if interval > 0 else (60000.0 / rate if rate > 0 else math.nan)


def _frames_of(ref: dicom_files.FileRef, ds: Dataset, series_key: str) -> list[Frame]:
  """The frames of a dataset: one for a single-frame image, else from the functional groups."""
  shape = (int(ds.Rows), int(ds.Columns))
  base = dict(
      ref=ref, series_key=series_key, shape=shape,
      position=_vector_of(ds, "ImagePositionPatient", 3),
      orientation=_vector_of(ds, "ImageOrientationPatient", 6),
      pixel_spacing=_spacing_of(ds, "PixelSpacing") or _spacing_of(ds, "ImagerPixelSpacing"),
      slice_thickness_mm=_number_of(ds, "SliceThickness"),
      slice_location=_number_of(ds, "SliceLocation"),
      rescale=(_number_of(ds, "RescaleSlope", 1.0), _number_of(ds, "RescaleIntercept", 0.0)),
      acquisition_time_s=_time_of_day_s(ds),
      cardiac_images=max(0, int(_number_of(ds, "CardiacNumberOfImages", 0.0))),
      rr_interval_ms=_rr_interval_ms(ds))
  instance = _number_of(ds, "InstanceNumber", 0.0)
  num_frames = int(_number_of(ds, "NumberOfFrames", 1.0))
  per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
  has_groups = bool(per_frame) or "SharedFunctionalGroupsSequence" in ds
  if num_frames <= 1 and not has_groups:
    return [Frame(index=0, instance_number=instance,
                  trigger_time_ms=_number_of(ds, "TriggerTime"), **base)]
  if per_frame and len(per_frame) != num_frames:
    raise UnsupportedFileError(
        f"{len(per_frame)} per-frame functional groups for {num_frames} frames")
  if not has_groups:
    # Legacy multi-frame: one plane over time; frame times from FrameTimeVector or FrameTime.
    vector = ds.get("FrameTimeVector")
    if vector is not None and len(vector) == num_frames:
      times = np.cumsum([number(v, 0.0) for v in vector])
    else:
      times = np.arange(num_frames) * _number_of(ds, "FrameTime")
    return [Frame(index=i, instance_number=float(i), trigger_time_ms=float(times[i]),
                  **{**base, "acquisition_time_s": math.nan}) for i in range(num_frames)]
  frames = []
  for i in range(num_frames):
    item = per_frame[i] if per_frame else None
    position = _vector(_group_value(ds, item, "PlanePositionSequence", "ImagePositionPatient"), 3)
    orientation = _vector(
        _group_value(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    spacing = _spacing(_group_value(ds, item, "PixelMeasuresSequence", "PixelSpacing"))
    thickness = number(_group_value(ds, item, "PixelMeasuresSequence", "SliceThickness"))
    trigger = number(_group_value(ds, item, "CardiacSynchronizationSequence",
                                   "NominalCardiacTriggerDelayTime"))
    temporal = number(_group_value(ds, item, "FrameContentSequence", "TemporalPositionIndex"))
    stamp = str(_group_value(ds, item, "FrameContentSequence", "FrameAcquisitionDateTime") or "")
    slope = _group_value(ds, item, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _group_value(ds, item, "PixelValueTransformationSequence", "RescaleIntercept")
    frames.append(Frame(
        ref=ref, index=i, series_key=series_key, shape=shape,
        # One frame per file (some exporters): the files' InstanceNumbers order the frames.
        instance_number=temporal if math.isfinite(temporal) else (
            instance if num_frames <= 1 else float(i)),
        trigger_time_ms=trigger if math.isfinite(trigger) else (
            _number_of(ds, "TriggerTime") if num_frames <= 1 else math.nan),
        position=position if position is not None else base["position"],
        orientation=orientation if orientation is not None else base["orientation"],
        pixel_spacing=spacing or base["pixel_spacing"],
        slice_thickness_mm=thickness if math.isfinite(thickness) else base["slice_thickness_mm"],
        slice_location=base["slice_location"],
        rescale=(number(slope, base["rescale"][0]), number(intercept, base["rescale"][1])),
        acquisition_time_s=(_seconds_of_day(stamp[8:]) if len(stamp) > 8
                            else base["acquisition_time_s"] if num_frames <= 1 else math.nan),
        cardiac_images=base["cardiac_images"], rr_interval_ms=base["rr_interval_ms"]))
  return frames


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
  """No value validation, no warning and no log record while reading: the messages of pydicom
  and its decoders quote tag values (names, dates) and file paths (folders named after
  patients) into warnings and logs."""
  loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
  levels = [logger.level for logger in loggers]
  with pydicom.config.disable_value_validation(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for logger in loggers:  # child loggers (pydicom.pixels...) inherit the level
      logger.setLevel(_SILENT)
    try:
      yield
    finally:
      for logger, level in zip(loggers, levels):
        logger.setLevel(level)


class _CountedReads:
  """A seekable binary file whose reads are counted, to bound the data elements pydicom parses
  (`ReadLimits.max_element_reads`): millions of empty elements fit in a few megabytes and
  would cost minutes and gigabytes before any other check."""

  def __init__(self, fp: BinaryIO, limits: dicom_files.ReadLimits):
    self._fp, self._limits = fp, limits
    self._reads_left = limits.max_element_reads

  def read(self, size: int = -1) -> bytes:
    self._reads_left -= 1
    if self._reads_left < 0:
      raise dicom_files.RefusedFile(self._limits.element_reads_problem())
    return self._fp.read(size)

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    return self._fp.seek(offset, whence)

  def tell(self) -> int:
    return self._fp.tell()


def _inflated_bytes(fp: BinaryIO, limits: dicom_files.ReadLimits) -> int | None:
  """The size of a deflated data set once inflated, counted up to just beyond `max_file_bytes`
  (pydicom inflates it whole, whatever its size); None for other files. Leaves `fp` at its
  start."""
  try:
    pydicom.filereader.read_preamble(fp, False)
    meta = pydicom.filereader._read_file_meta_info(fp)  # pylint: disable=protected-access
    if meta.get("TransferSyntaxUID") != _DEFLATED:
      return None
    inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
    chunk = fp.read(_INFLATE_CHUNK_BYTES)
    # One chunk in memory at a time; bytes after the end of the stream (padding) are not data.
    while chunk and not inflater.eof and inflated <= limits.max_file_bytes:
      inflated += len(inflater.decompress(chunk, _INFLATE_CHUNK_BYTES))
      chunk = inflater.unconsumed_tail or fp.read(_INFLATE_CHUNK_BYTES)
    return inflated
  # Not DICOM with a preamble, or corrupt: left to `dcmread`.
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    fp.seek(0)


def read_dataset(source: bytes | BinaryIO, *, stop_before_pixels: bool = False,
                 limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> Dataset:
  """Parses DICOM bytes or a seekable binary file; files without the preamble need `force`.

  Raises:
    InvalidDicomError: for data that is not DICOM even when forced (no image dimensions or
      SOP class found).
    files.RefusedFile: for a deflated file inflating beyond `limits.max_file_bytes`, or one with
      more than `limits.max_element_reads` reads of data elements.
  """
  fp = io.BytesIO(source) if isinstance(source, bytes) else source
  # A deflated data set names its transfer syntax in the file meta: bytes without that UID
  # anywhere are not deflated, and need no second parse of their file meta to tell.
  maybe_deflated = not isinstance(source, bytes) or _DEFLATED_UID_BYTES in source
  inflated = _inflated_bytes(fp, limits) if maybe_deflated else None
  if inflated is not None and inflated > limits.max_file_bytes:
    raise dicom_files.RefusedFile("deflated data set inflates to " + limits.file_problem(
        limits.max_file_bytes, at_least=True))
  try:
    return pydicom.dcmread(_CountedReads(fp, limits), stop_before_pixels=stop_before_pixels)
  except InvalidDicomError:
    # Old files (ACR-NEMA style, some PACS exports) lack the preamble; only accept the forced
    # read if it looks like an image or at least carries a SOP class.
    fp.seek(0)
    with warnings.catch_warnings():  # forced reads of non-DICOM files warn about VRs
      warnings.simplefilter("ignore")
      ds = pydicom.dcmread(_CountedReads(fp, limits), stop_before_pixels=stop_before_pixels,
                           force=True)
    if "SOPClassUID" not in ds and "Rows" not in ds:
      raise InvalidDicomError("no DICOM preamble and no DICOM elements found") from None
    if "TransferSyntaxUID" not in ds.file_meta:
      ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def _parse_problem(e: Exception) -> str:
  """The skip reason for bytes that pydicom could not parse."""
  if isinstance(e, InvalidDicomError):
    return "not a DICOM file"
  if isinstance(e, dicom_files.RefusedFile):
    return str(e)
  return f"corrupt or truncated DICOM ({type(e).__name__})"


def _read_problem(e: Exception) -> str:
  """The skip reason for a file whose bytes could not be read (or that was refused)."""
  if isinstance(e, dicom_files.RefusedFile):
    return str(e)
  return f"unreadable file ({type(e).__name__})"


def _is_dicomdir(ds: Dataset) -> bool:
  """A DICOMDIR: the media directory index of a DICOM file set, not an image."""
  meta = getattr(ds, "file_meta", None)
  return ((meta is not None and meta.get("MediaStorageSOPClassUID")
           == pydicom.uid.MediaStorageDirectoryStorage) or "DirectoryRecordSequence" in ds)


@dataclasses.dataclass(frozen=True)
class HeaderSummary:
  """What discovery needs from a file: its study and patient (identifying: memory only)."""

  ref: dicom_files.FileRef
  reason: str = ""  # non-empty when the file is not a readable DICOM file
  study_uid: str = ""
  patient_id: str = ""
  accession: str = ""
  study_datetime: str = ""  # StudyDate + StudyTime, for ordering a patient's visits


def scan_header(ref: dicom_files.FileRef,
                limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> HeaderSummary:
  """Reads a file's header only (stops before the pixel data, reads zip members as streams);
  never raises."""
  with contextlib.ExitStack() as stack:
    try:
      if ref.member:
        zf = stack.enter_context(dicom_files.open_zip(ref.path))
        source = stack.enter_context(dicom_files.open_member(zf, ref.member, limits))
      else:
        source = stack.enter_context(dicom_files.open_regular(ref.path, limits))
    except dicom_files.ZIP_ERRORS as e:
      return HeaderSummary(ref, reason=_read_problem(e))
    with quiet_pydicom():
      try:
        ds = read_dataset(source, stop_before_pixels=True, limits=limits)
      # pydicom raises many types on corrupt input.
      except Exception as e:  # pylint: disable=broad-except
        return HeaderSummary(ref, reason=_parse_problem(e))
      if _is_dicomdir(ds):
        return HeaderSummary(ref, reason=DICOMDIR_REASON)
      return HeaderSummary(
          ref, study_uid=str(ds.get("StudyInstanceUID", "") or ""),
          patient_id=str(ds.get("PatientID", "") or ""),
          accession=str(ds.get("AccessionNumber", "") or ""),
          study_datetime=f"{ds.get('StudyDate', '') or ''}{ds.get('StudyTime', '') or ''}")


def parse_file(ref: dicom_files.FileRef, data: bytes | Exception, *, hint: str = "",
               limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> ParsedFile:
  """Reads one file into a `ParsedFile` (never raises: problems become `reason`).

  Args:
    ref: the file.
    data: its bytes, or the exception raised reading them.
    hint: a series name from outside the file (e.g. a zip manifest), used for view
      classification like a folder name; defaults to the folder name.
    limits: what the file's header may claim (see `pixel_problem`).
  """
  with quiet_pydicom():
    return _parse_read(ref, data, hint, limits)


def _parse_read(ref: dicom_files.FileRef, data: bytes | Exception, hint: str,
                limits: dicom_files.ReadLimits) -> ParsedFile:
  """`parse_file` without the pydicom settings."""
  if isinstance(data, Exception):
    return ParsedFile(ref, reason=_read_problem(data))
  return _parse_bytes(ref, data, hint, limits)


def _parse_bytes(ref: dicom_files.FileRef, data: bytes, hint: str,
                 limits: dicom_files.ReadLimits) -> ParsedFile:
  """`parse_file` of bytes, without the pydicom settings."""
  try:
    ds = read_dataset(data, limits=limits)
  # pydicom raises many types on corrupt input.
  except Exception as e:  # pylint: disable=broad-except
    return ParsedFile(ref, reason=_parse_problem(e))
  try:
    size = len(data)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == _DEFLATED:
      size += _inflated_bytes(io.BytesIO(data), limits) or 0  # the header check needs it
    return _parse_dataset(ref, ds, hint or ref.folder, limits, size)
  except UnsupportedFileError as e:
    return ParsedFile(ref, reason=f"unsupported multi-frame file ({e})")
  except Exception as e:  # malformed values anywhere in the header  # pylint: disable=broad-except
    # Only the type: pydicom's messages may quote tag values (names, dates).
    return ParsedFile(ref, reason=f"malformed DICOM header ({type(e).__name__})")


def pixel_problem(ds: Dataset, limits: dicom_files.ReadLimits, file_bytes: int) -> str:
  """Why an image is not to be parsed further or decoded, from its header's claims alone: a
  frame, frame count or decoded size over `limits`, more pixel data claimed than the file holds
  (native data: every byte; encapsulated data: an item per frame), or a header (`file_bytes`
  less the pixel data) whose sequences could hold too many elements. "" when it may be decoded.
  """
  rows, columns = int(ds.Rows), int(ds.Columns)
  frames = max(1, int(_number_of(ds, "NumberOfFrames", 1.0)))
  keyword = next(k for k in _PIXEL_KEYWORDS if k in ds)
  bits = _FLOAT_PIXEL_BITS.get(keyword) or int(_number_of(ds, "BitsAllocated", 16.0))
  samples = max(1, int(_number_of(ds, "SamplesPerPixel", 1.0)))
  pixel_bytes = (rows * columns * samples * bits * frames + 7) // 8
  problem = limits.pixels_problem(rows, columns, frames, pixel_bytes)
  if problem:
    return problem
  stored = len(ds.get_item(keyword).value or b"")
  meta = getattr(ds, "file_meta", None)
  syntax = meta.get("TransferSyntaxUID") if meta is not None else None
  if syntax is not None and pydicom.uid.UID(syntax).is_encapsulated:
    if stored < dicom_files.MIN_ELEMENT_BYTES * frames:
      return (f"pixel data of {stored} bytes cannot hold the {frames} compressed frames its "
              "header claims")
  elif stored < pixel_bytes:
    return (f"pixel data shorter than its header claims ({stored} of {pixel_bytes} bytes for "
            f"{frames} frame{'s' if frames > 1 else ''} of {rows}x{columns} at {bits} bits)")
  return limits.header_problem(file_bytes - stored)


def _parse_dataset(ref: dicom_files.FileRef, ds: Dataset, hint: str,
                   limits: dicom_files.ReadLimits, file_bytes: int) -> ParsedFile:
  """Header facts of a dataset, or the reason it is not a usable MR image."""
  parsed = ParsedFile(
      ref, study_uid=str(ds.get("StudyInstanceUID", "")), patient_id=str(ds.get("PatientID", "")),
      accession=str(ds.get("AccessionNumber", "")), sop_uid=str(ds.get("SOPInstanceUID", "")))
  rate = _number_of(ds, "HeartRate")
  interval_ms = _number_of(ds, "NominalInterval")
  parsed.heart_rate_bpm = rate if rate > 0 else (60000.0 / interval_ms if interval_ms > 0 else
                                                 math.nan)
  modality = str(ds.get("Modality", "") or "")
  if _is_dicomdir(ds):
    parsed.reason = DICOMDIR_REASON
  elif not any(k in ds for k in _PIXEL_KEYWORDS):
    parsed.reason = "no pixel data (not an image)"
  elif modality and modality != "MR":
    parsed.reason = f"not an MR image (Modality {modality})"
  elif "Rows" not in ds or "Columns" not in ds:
    parsed.reason = "no image dimensions (Rows/Columns missing)"
  elif str(ds.get("PhotometricInterpretation", "MONOCHROME2")) not in _MONOCHROME:
    parsed.reason = ("not a greyscale image (PhotometricInterpretation "
                     f"{ds.PhotometricInterpretation})")
  else:
    parsed.reason = pixel_problem(ds, limits, file_bytes)
  if parsed.reason:
    return parsed
  image_type = {str(v).upper() for v in (ds.get("ImageType") or [])}
  series_key = str(ds.get("SeriesInstanceUID", "") or
                   f"{ds.get('SeriesNumber', '')}|{ds.get('SeriesDescription', '')}|{ref.folder}")
  parsed.series = SeriesInfo(
      key=series_key, number=int(_number_of(ds, "SeriesNumber", 0.0)),
      time_s=_seconds_of_day(ds.get("SeriesTime") or ds.get("AcquisitionTime")),
      description=str(ds.get("SeriesDescription", "") or ""),
      protocol=str(ds.get("ProtocolName", "") or ""), folder=hint,
      is_phase=bool(image_type & _PHASE_IMAGE_TYPES))
  parsed.frames = _frames_of(ref, ds, series_key)
  parsed.dataset = ds
  return parsed


def read_files(refs: Sequence[dicom_files.FileRef],
               hints: dict[dicom_files.FileRef, str] | None = None,
               limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> list[ParsedFile]:
  """Reads and parses the given files (zip members read with one open per archive).

  Args:
    refs: the files, grouped by zip archive for speed.
    hints: optional series names from outside the files (see `parse_file`).
    limits: what one file may make the reader read and allocate.
  """
  hints = hints or {}
  with quiet_pydicom():  # once for all the files: its logger settings cost ~0.1 ms a file
    return [_parse_read(ref, data, hints.get(ref, ""), limits)
            for ref, data in dicom_files.iter_file_bytes(refs, limits)]


def identifiers(datasets: Iterable[Dataset]) -> tuple[str, ...]:
  """The identifying values (`IDENTIFYING_KEYWORDS`) found in the datasets."""
  return tuple(sorted({str(ds.get(k)) for ds in datasets for k in IDENTIFYING_KEYWORDS
                       if ds.get(k)}))

