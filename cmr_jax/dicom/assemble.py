"""Assembling a study: the parsed DICOM files of one study into cines, every file accounted for.

`assemble_study(files)` turns the files of one study (read with `parse.parse_file`) into
`types.Cine`s and gives every file a status (used, or skipped with a reason). The rules, in order:

1. Files: a file `parse.parse_file` could not use is skipped with its reason; a file repeating
   another's SOPInstanceUID is skipped as a duplicate.
2. Series (SeriesInstanceUID) whose name marks them as non-cine (scout/localiser, derived
   InlineVF/results, flow/phase, tagging, T1/T2 maps, LGE, perfusion, great-vessel and
   right-heart views, axial/coronal/sagittal stacks, see `views.classify_name`) are skipped;
   phase images (ImageType P/PHASE) too.
3. A series is split by plane (positions within `cycles.SAME_POSITION_MM`, else SliceLocation,
   and orientation): one cine per plane, so one mixed SAX series gives one cine per slice. Within a
   cine, frames are taken in acquisition order (InstanceNumber, then AcquisitionTime) and put in
   time order by TriggerTime; a plane imaged over several cycles keeps the last cycle, and a
   trigger time still repeated its latest image (see `cycles.one_cycle`). Without trigger times, a
   multiple of CardiacNumberOfImages frames keeps the last cycle, and frame times come from
   per-frame acquisition times or the RR interval (NominalInterval, HeartRate). Cines with mixed
   matrix sizes, orientations or pixel spacings, no pixel spacing, or fewer than
   `MIN_CINE_FRAMES` frames, are skipped.
4. Views come from the series name (SeriesDescription, ProtocolName, then the folder name), see
   `views.classify_name`, and from geometry. The SAX stack is the largest cluster of parallel
   planes among the cines named SAX and the unnamed ones (`_find_sax`): unnamed planes in it are
   SAX slices, and a cine named SAX that lies outside it is named from its geometry instead (the
   study's `conflicts` say so). Other unnamed planes are named against the stack (see
   `geometry.classify_lax_geometry`): a plane within `SAX_MAX_ANGLE_DEG` of the stack's planes is
   a SAX slice, one at least `LAX_MIN_ANGLE_DEG` from them a long-axis view. Without a SAX stack,
   unnamed planes at least `ANATOMY_LAX_MIN_ANGLE_DEG` from the plane normal to a typical heart's
   long axis (`APEX_DIRECTION_LPS`) are named as long-axis views against that axis, which the
   study's `notes` record; other unnamed planes are skipped.
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
import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cmr_jax.data import types
from cmr_jax.dicom import cycles
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import geometry
from cmr_jax.dicom import parse
from cmr_jax.dicom import views as dicom_views

USED = "used"
SKIPPED = "skipped"
MIN_CINE_FRAMES = 8
SAX_MAX_ANGLE_DEG = 25.0  # a plane this close to parallel with the SAX stack is a SAX slice
LAX_MIN_ANGLE_DEG = 60.0  # a plane this far from the SAX planes is a long-axis view
# Without a SAX stack: a plane this far from the plane normal to `APEX_DIRECTION_LPS` (a typical
# heart's long axis; real axes differ by up to ~25 degrees) is taken for a long-axis view.
ANATOMY_LAX_MIN_ANGLE_DEG = 50.0
MIN_GEOMETRIC_SAX_SLICES = 3  # unnamed parallel cines at this many positions form a SAX stack
DUPLICATE_POSITION_MM = 2.0  # SAX slices closer than this along the normal are one position
APEX_DIRECTION_LPS = types.APEX_DIRECTION_LPS  # the typical long axis, base to apex
APEX_MIN_COS = 0.3


@dataclasses.dataclass
class _Candidate:
  """A cine in the making: frames of one series at one position."""

  series: parse.SeriesInfo
  frames: list[parse.Frame]
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
  # file -> (status, reason, series label)
  file_status: dict[dicom_files.FileRef, tuple[str, str, str]]
  file_cine: dict[dicom_files.FileRef, int]  # used file -> index of its cine in `cines`
  study_uid: str
  patient_id: str
  accession: str
  identifiers: tuple[str, ...]  # identifying values, for scrubbing free text only
  heart_rate_bpm: float
  notes: list[str] = dataclasses.field(default_factory=list)  # guesses made while assembling
  # series names that the plane geometry contradicted (and overruled)
  conflicts: list[str] = dataclasses.field(default_factory=list)

  @property
  def skipped_reasons(self) -> collections.Counter:
    """Count of each skip reason over the files."""
    return collections.Counter(r for s, r, _ in self.file_status.values() if s == SKIPPED)


class _Ledger:
  """Records why frames were dropped; a file is used when any of its frames is used."""

  def __init__(self):
    self.reasons: dict[dicom_files.FileRef, str] = {}
    self.series: dict[dicom_files.FileRef, str] = {}
    self.used: set[dicom_files.FileRef] = set()

  def drop(self, frames: Iterable[parse.Frame], reason: str,
           series: parse.SeriesInfo | None = None):
    for f in frames:
      self.reasons.setdefault(f.ref, reason)
      if series is not None:
        self.series.setdefault(f.ref, series.label)

  def use(self, frames: Iterable[parse.Frame], series: parse.SeriesInfo):
    for f in frames:
      self.used.add(f.ref)
      self.series[f.ref] = series.label


_NATIVE_LITTLE_ENDIAN = (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian)


def native_pixels(ds: Dataset) -> np.ndarray:
  """`ds.pixel_array`, read straight from the buffer for uncompressed little-endian greyscale
  data of 8 or 16 bits (what most cine DICOM holds): the same values (unused high bits cleared,
  or sign-extended for signed data, as pydicom does), without pydicom's ~0.5 ms of set-up a
  file. Other data (compressed, big endian, 1 or 32 bits, colour) goes through pydicom.

  Returns:
    [frames, rows, columns] or [rows, columns] for one frame, like `pixel_array` (read-only).
  """
  meta = getattr(ds, "file_meta", None)
  syntax = meta.get("TransferSyntaxUID") if meta is not None else None
  bits, samples = ds.get("BitsAllocated"), ds.get("SamplesPerPixel", 1)
  representation, stored = ds.get("PixelRepresentation"), ds.get("BitsStored")
  if (syntax not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds or bits not in (8, 16)
      or samples != 1 or representation not in (0, 1) or not isinstance(stored, int)
      or not 1 <= stored <= bits):
    return ds.pixel_array
  frames = int(parse.number(ds.get("NumberOfFrames"), 1.0))
  rows, columns = int(ds.Rows), int(ds.Columns)
  dtype = np.dtype(f"<{'ui'[representation]}{bits // 8}")
  data = ds.PixelData
  count = max(frames, 1) * rows * columns
  if frames < 1 or not isinstance(data, bytes) or len(data) < count * dtype.itemsize:
    return ds.pixel_array  # let pydicom say what is wrong
  arr = np.frombuffer(data, dtype, count).reshape(
      (frames, rows, columns) if frames > 1 else (rows, columns))
  if stored < bits:  # as pydicom: shifting up and back clears (or sign-extends) unused bits
    arr = np.right_shift(np.left_shift(arr, bits - stored), bits - stored)
  return arr


def _decode(candidates: list[_Candidate], datasets: dict[dicom_files.FileRef, Dataset],
            ledger: _Ledger) -> list[_Candidate]:
  """Decodes the pixels of each candidate (float32, rescaled); drops undecodable frames.

  Each file is decoded once; a cine's float32 frames are written into one array (no per-frame
  copies), so a file at `files.ReadLimits.max_pixel_bytes` costs about three times that.
  """
  cache: dict[dicom_files.FileRef, np.ndarray | str] = {}
  decoded = []
  for cand in candidates:
    arrays, good, good_index = [], [], []  # arrays: (file's frames, index, slope, intercept)
    for i, f in enumerate(cand.frames):
      if f.ref not in cache:
        ds = datasets[f.ref]
        try:
          arr = native_pixels(ds)
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
      arrays.append((arr, f.index) + f.rescale)
      good.append(f)
      good_index.append(i)
    if len(good) < MIN_CINE_FRAMES:
      ledger.drop(cand.frames, f"too few decodable frames ({len(good)} < {MIN_CINE_FRAMES})",
                  cand.series)
      continue
    if cand.times_ms is not None:
      cand.times_ms = cand.times_ms[good_index]
    cand.pixels = np.empty((len(good),) + good[0].shape, np.float32)
    for out, (arr, index, slope, intercept) in zip(cand.pixels, arrays):
      out[...] = arr[index]
      out *= np.float32(slope)
      out += np.float32(intercept)
    cand.frames = good
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
      elif geometry.angle_between_planes_deg(c.normal, normal) > SAX_MAX_ANGLE_DEG:
        ledger.drop(c.frames, "SAX slice not parallel to the SAX stack", c.series)
    slices = [c for c in with_geometry if geometry.angle_between_planes_deg(c.normal, normal)
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


def assemble_study(files: Sequence[parse.ParsedFile], *,
                   min_frames: int = MIN_CINE_FRAMES) -> AssembledStudy:
  """Turns the parsed files of one study into cines, accounting for every file.

  See the module docstring for the rules. Files are expected to belong to one study (the
  caller groups them); the study UID, patient ID and accession reported are the most common
  ones among the files.

  Args:
    files: the study's files, parsed with `parse.parse_file`.
    min_frames: the fewest frames a cine may have.

  Returns:
    The cines (SAX base to apex first, then 2CH, 3CH, 4CH) and every file's status.
  """
  with parse.quiet_pydicom():
    return _assemble(files, min_frames)


def _assemble(files: Sequence[parse.ParsedFile], min_frames: int) -> AssembledStudy:
  """`assemble_study` without the pydicom settings, in stages (the rules are the module's):

  1. `_collect_series`: the frames of the usable files, by series (rule 1).
  2. `_cine_candidates`: one candidate per plane of each cine series, one cycle each (2-3).
  3. `_decode`: the candidates' pixels (rule 6).
  4. `_find_sax`, then `_sax_stack`: the SAX slices, named or geometric, base to apex (4-5).
  5. `_name_long_axis`: the views of the other planes, from geometry when unnamed (rule 4).
  6. `_latest_per_view`: one cine per long-axis view (rule 5).
  7. `_study_result`: the cines, every file's status, and the study's facts.
  """
  ledger = _Ledger()
  series_frames, series_info, datasets = _collect_series(files, ledger)
  candidates = _cine_candidates(series_frames, series_info, ledger, min_frames)
  candidates = _decode(candidates, datasets, ledger)
  sax, overruled = _find_sax(candidates)
  sax_normal, sax = _sax_stack(sax, ledger)
  conflicts = [f"series {c.series.number} is named as a short-axis view but its plane lies at "
               f"{geometry.angle_between_planes_deg(c.normal, sax_normal):.0f} degrees to the "
               f"short-axis stack of {len(sax)} parallel cines: judged by its geometry instead"
               for c in overruled]
  lax_named, lax_unknown, notes = _name_long_axis(candidates, sax_normal, ledger)
  lax = _latest_per_view(lax_named + lax_unknown, ledger)
  kept = sax + [lax[view] for view in types.LONG_AXIS_VIEWS if view in lax]
  return _study_result(files, kept, datasets, ledger, notes, conflicts)


def _collect_series(files: Sequence[parse.ParsedFile], ledger: _Ledger
                    ) -> tuple[dict[str, list[parse.Frame]], dict[str, parse.SeriesInfo],
                               dict[dicom_files.FileRef, Dataset]]:
  """Stage 1: records the unusable files' reasons and drops repeated SOPInstanceUIDs.

  Returns:
    (frames by series key, series by key, dataset by file) of the usable files.
  """
  for pf in files:
    if pf.reason:
      ledger.reasons[pf.ref] = pf.reason
  seen_sop: set[str] = set()
  series_frames: dict[str, list[parse.Frame]] = {}
  series_info: dict[str, parse.SeriesInfo] = {}
  datasets: dict[dicom_files.FileRef, Dataset] = {}
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
  return series_frames, series_info, datasets


def _cine_candidates(series_frames: dict[str, list[parse.Frame]],
                     series_info: dict[str, parse.SeriesInfo], ledger: _Ledger,
                     min_frames: int) -> list[_Candidate]:
  """Stage 2: skips non-cine series, splits the others by plane and keeps one cycle per plane."""
  candidates: list[_Candidate] = []
  for key, frames in series_frames.items():
    series = series_info[key]
    name = dicom_views.classify_series(series)
    if series.is_phase:
      name = dicom_views.NameClass(non_cine="flow/phase contrast")
    if name.non_cine:
      ledger.drop(frames, f"non-cine series ({name.non_cine})", series)
      continue
    for group in cycles.split_by_position(frames):
      problem = cycles.geometry_problem(group)
      if problem:
        ledger.drop(group, problem, series)
        continue
      kept, times, dropped = cycles.one_cycle(group)
      for frames_dropped, reason in dropped:
        ledger.drop(frames_dropped, reason, series)
      if len(kept) < min_frames:
        ledger.drop(kept, f"too few frames ({len(kept)} < {min_frames}): not a cine", series)
        continue
      orientation = kept[0].orientation
      candidates.append(_Candidate(
          series, kept, view=name.view, times_ms=times,
          normal=geometry.plane_normal(orientation) if orientation is not None else None))
  return candidates


def _find_sax(candidates: list[_Candidate]) -> tuple[list[_Candidate], list[_Candidate]]:
  """Stage 4: the SAX slices, from names and geometry together.

  The stack is the largest cluster of parallel planes (within `SAX_MAX_ANGLE_DEG` of one
  another) among the cines named SAX and the unnamed ones: a cluster with named slices at
  `MIN_GEOMETRIC_SAX_SLICES` or more positions first, then the one with the most positions
  (an unnamed cluster needs that many), then the one with more named slices, then the more
  recently acquired (a re-planned stack supersedes the first). Unnamed planes in it are named
  SAX. A cine named SAX whose plane is not in that stack is a name that the geometry
  contradicts: it is left for stage 5 to name from its geometry, and `_assemble` says so in the
  study's `conflicts`. Without any plane geometry the named cines are the stack (ordered by
  SliceLocation).

  Returns:
    (the SAX cines, the cines named SAX that the geometry overruled).
  """
  named = [c for c in candidates if c.view == types.SAX]
  pool = [c for c in candidates if c.view in (types.SAX, "") and c.normal is not None
          and c.frames[0].position is not None]
  best, best_key = [], None
  for seed in pool:
    cluster = [d for d in pool
               if geometry.angle_between_planes_deg(seed.normal, d.normal) <= SAX_MAX_ANGLE_DEG]
    position = {id(d): round(float(np.dot(d.frames[0].position, seed.normal))) for d in cluster}
    positions = set(position.values())
    named_positions = {position[id(d)] for d in cluster if d.view == types.SAX}
    if not named_positions and len(positions) < MIN_GEOMETRIC_SAX_SLICES:
      continue
    key = (len(named_positions) >= MIN_GEOMETRIC_SAX_SLICES, len(positions),
           len(named_positions), max(d.recency for d in cluster))
    if best_key is None or key > best_key:
      best, best_key = cluster, key
  if not best:  # no geometry to judge by: the names decide
    return named, []
  overruled = [c for c in named if c not in best and c in pool]
  for c in overruled:
    c.view = ""
  for c in best:
    c.view = types.SAX
  return best + [c for c in named if c not in pool], overruled


def _name_long_axis(candidates: list[_Candidate], sax_normal: np.ndarray | None,
                    ledger: _Ledger) -> tuple[list[_Candidate], list[_Candidate], list[str]]:
  """Stage 5: the long-axis cines, naming unnamed (or `LAX`) planes from their geometry.

  Returns:
    (cines named 2CH/3CH/4CH by their series, cines named from geometry, notes on the guesses).
  """
  lax_named = [c for c in candidates if c.view in types.LONG_AXIS_VIEWS]
  undecided = [c for c in candidates if c.view in ("", dicom_views.LAX)]
  lax_unknown = []
  # Without a SAX stack, planes are judged against the typical long axis of the heart.
  reference = sax_normal if sax_normal is not None else APEX_DIRECTION_LPS
  for c in undecided:
    if c.normal is None:
      ledger.drop(c.frames, "view unknown: no recognised series name and no plane orientation "
                  "(ImageOrientationPatient)", c.series)
      continue
    angle = geometry.angle_between_planes_deg(c.normal, reference)
    if sax_normal is None:
      if angle >= ANATOMY_LAX_MIN_ANGLE_DEG:
        lax_unknown.append(c)
      else:
        ledger.drop(c.frames, "view unknown: no recognised series name, no SAX stack, and the "
                    f"plane is at {angle:.0f} degrees to a typical heart's short axis (a "
                    f"long-axis view is at least {ANATOMY_LAX_MIN_ANGLE_DEG:.0f})", c.series)
    elif angle >= LAX_MIN_ANGLE_DEG:
      lax_unknown.append(c)
    elif angle <= SAX_MAX_ANGLE_DEG and c.view != dicom_views.LAX:
      ledger.drop(c.frames, "unnamed plane parallel to the SAX stack but not part of it", c.series)
    else:
      ledger.drop(c.frames, f"view unknown: plane at {angle:.0f} degrees to the SAX stack",
                  c.series)
  notes = []
  if lax_unknown:
    known = [(c.view, c.normal) for c in lax_named if c.normal is not None]
    views = geometry.classify_lax_geometry(reference, [c.normal for c in lax_unknown], known)
    for c, view in zip(lax_unknown, views):
      c.view = view
    if sax_normal is None:
      notes.append(f"{len(lax_unknown)} unnamed long-axis cine(s) named "
                   f"{'/'.join(sorted(set(views)))} from a typical heart's axis (no short-axis "
                   "stack to measure it)")
  return lax_named, lax_unknown, notes


def _latest_per_view(lax: list[_Candidate], ledger: _Ledger) -> dict[str, _Candidate]:
  """Stage 6: the most recent cine of each long-axis view; the others are dropped."""
  latest: dict[str, _Candidate] = {}
  for c in sorted(lax, key=lambda c: c.recency):
    if c.view in latest:
      ledger.drop(latest[c.view].frames, f"repeated {c.view} view: superseded by series "
                  f"{c.series.number}", latest[c.view].series)
    latest[c.view] = c
  return latest


def _study_result(files: Sequence[parse.ParsedFile], kept: list[_Candidate],
                  datasets: dict[dicom_files.FileRef, Dataset], ledger: _Ledger,
                  notes: list[str], conflicts: list[str]) -> AssembledStudy:
  """Stage 7: the kept cines as `types.Cine`s, every file's status, and the study's facts."""
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
      identifiers=parse.identifiers(datasets[pf.ref] for pf in good_per_series),
      heart_rate_bpm=float(np.median(rates)) if rates else math.nan, notes=notes,
      conflicts=conflicts)


def _to_cine(c: _Candidate, *, slice_index: int) -> types.Cine:
  first = c.frames[0]
  name = c.series.description or c.series.protocol or (
      c.series.folder if dicom_views.classify_name(c.series.folder).view else "")
  return types.Cine(
      frames=c.pixels, pixel_spacing=first.pixel_spacing, view=c.view,
      trigger_times_ms=None if c.times_ms is None else c.times_ms.astype(np.float32),
      slice_index=slice_index,
      slice_position_mm=c.position_mm if c.view == types.SAX else math.nan,
      image_position=first.position, image_orientation=first.orientation,
      slice_thickness_mm=first.slice_thickness_mm, series_description=name)

