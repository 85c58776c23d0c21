"""Renders `types.Study` objects (e.g. from the phantom) as DICOM, for tests and demos.

Each cine becomes an MR Image Storage series, one file per frame (or one Enhanced MR file per
cine with `multiframe=True`), with the tags a scanner writes: series naming in a vendor's style,
SeriesNumber/InstanceNumber, TriggerTime, CardiacNumberOfImages, ImagePositionPatient,
ImageOrientationPatient, PixelSpacing, SliceThickness, SliceLocation, uint16 pixels with an
optional RescaleSlope/Intercept, optional RLE or JPEG 2000 compression, and fake identifying
values (`Identity`) so that tests can check that none of them leaks out of ingestion.

Layouts: `write_kaggle` (`<split>/<split>/<Id>/study/sax_N/IM-ssss-ffff.dcm` + labels CSV),
`write_ukbb` (`{eid}_{20208|20209}_{2|3}_0.zip` with `manifest.cvs`/`manifest.csv`, plus a
participant labels CSV) and `write_generic` (one folder per study, series sub-folders, labels
and reports CSVs keyed by folder name and accession). `Faults` injects the bad input real
archives have.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import os
import zipfile
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid)

from cmr_jax.data import types

MR_IMAGE_STORAGE = pydicom.uid.MRImageStorage
ENHANCED_MR_IMAGE_STORAGE = pydicom.uid.EnhancedMRImageStorage
STORED_BITS = 12
COMPRESSIONS = {"": ExplicitVRLittleEndian, "rle": RLELossless, "jpeg2000": JPEG2000Lossless}
DEFAULT_HEART_RATE_BPM = 60.0
SERIES_MINUTES_APART = 1  # SeriesTime step between consecutive series
UKBB_LAX_FIELD = 20208
UKBB_SAX_FIELD = 20209
UKBB_FIRST_INSTANCE = 2  # UK Biobank instance of the first imaging visit
# Series names per vendor style, `{k}` is the 1-based SAX slice number.
SERIES_NAMES: dict[str, dict[str, str]] = {
    "ukbb": {types.SAX: "CINE_segmented_SAX_b{k}", types.LAX_2CH: "CINE_segmented_LAX_2Ch",
             types.LAX_3CH: "CINE_segmented_LAX_3Ch", types.LAX_4CH: "CINE_segmented_LAX_4Ch"},
    "siemens": {types.SAX: "cine_trufi_retro_sa_{k}", types.LAX_2CH: "cine_trufi_retro_2ch",
                types.LAX_3CH: "cine_trufi_retro_3ch", types.LAX_4CH: "cine_trufi_retro_4ch"},
    "ge": {types.SAX: "FIESTA CINE SAX", types.LAX_2CH: "FIESTA CINE VLA",
           types.LAX_3CH: "FIESTA CINE LVOT", types.LAX_4CH: "FIESTA CINE HLA"},
    "philips": {types.SAX: "sBTFE_SA", types.LAX_2CH: "sBTFE_2CH", types.LAX_3CH: "sBTFE_3CH",
                types.LAX_4CH: "sBTFE_4CH"},
    "unnamed": {types.SAX: "cine_trufi_retro", types.LAX_2CH: "cine_trufi_retro",
                types.LAX_3CH: "cine_trufi_retro", types.LAX_4CH: "cine_trufi_retro"},
}
STUDY_STYLE = "study"  # each cine's own series_description (SIEMENS style where it has none)
MANUFACTURERS = {"ukbb": "SIEMENS", "siemens": "SIEMENS", "ge": "GE MEDICAL SYSTEMS",
                 "philips": "Philips Medical Systems", "unnamed": "SIEMENS", STUDY_STYLE: "SIEMENS"}
KAGGLE_FOLDERS = {types.SAX: "sax", types.LAX_2CH: "2ch", types.LAX_3CH: "3ch",
                  types.LAX_4CH: "4ch"}


@dataclasses.dataclass(frozen=True)
class Identity:
  """Fake identifying values written into every file of a study."""

  patient_name: str = "Testpatient^Alice"
  patient_id: str = "PID-000001-X"
  birth_date: str = "19610317"
  study_date: str = "20150830"
  study_time: str = "101512"
  accession: str = "ACC-000001-Z"
  institution: str = "Saint Example Hospital"
  referring_physician: str = "Refdoc^Robert"


def fake_identity(index: int) -> Identity:
  """A distinct, searchable fake identity per study index."""
  return Identity(
      patient_name=f"Testpatient{index:04d}^Alice", patient_id=f"PID-{index:06d}-X",
      birth_date=f"19{40 + index % 50:02d}0{1 + index % 9}1{index % 9}",
      study_date=f"2015{1 + index % 12:02d}{10 + index % 18:02d}", study_time="101512",
      accession=f"ACC-{index:06d}-Z", institution=f"Saint Example Hospital {index}",
      referring_physician=f"Refdoc{index:04d}^Robert")


@dataclasses.dataclass(frozen=True)
class Faults:
  """Bad input to inject into a written study (each adds or spoils files, see `write_study`)."""

  truncated_file: bool = False  # the middle file of the long-axis cines cut short
  non_dicom_file: bool = False  # a stray text file next to the series folders
  no_pixel_data: bool = False  # a DICOM file with a header but no pixel data
  duplicate_slice: bool = False  # a later series repeating the first SAX slice's position
  single_frame_series: bool = False  # a one-image SAX-named series at a new position
  mixed_matrix: bool = False  # a later 2CH series whose frames differ in matrix size
  scout_series: bool = False  # a three-image localiser series


@dataclasses.dataclass(frozen=True)
class WriteOptions:
  """How a study is rendered.

  Attributes:
    style: series naming and manufacturer: a key of `SERIES_NAMES`, or "study" for each cine's
      own series_description.
    rescale: store pixels with RescaleSlope/Intercept (else scaled to the stored range).
    compression: "" (explicit VR little endian), "rle" or "jpeg2000" (lossless).
    multiframe: one Enhanced MR Image Storage file per cine (per-frame functional groups).
    single_sax_series: all SAX slices in one series (as in some UK Biobank zips).
    drop_tags: tags (keywords) to leave out of every file, e.g. ("SliceLocation",).
    view_folders: name series folders by view as Kaggle does (`sax_5`, `4ch_12`), else
      `series_<number>` (no naming hint outside the files).
  """

  style: str = STUDY_STYLE
  rescale: bool = True
  compression: str = ""
  multiframe: bool = False
  single_sax_series: bool = False
  drop_tags: tuple[str, ...] = ()
  view_folders: bool = True


def _uid(*parts) -> str:
  return generate_uid(entropy_srcs=[str(p) for p in parts])


def _ds(value: float) -> str:
  """A decimal string (DS) of at most 16 characters."""
  return f"{value:.6g}"


def _quantise(frames: np.ndarray, rescale: bool) -> tuple[np.ndarray, float, float]:
  """Frames [T, H, W] -> (uint16 stored values [T, H, W], slope, intercept)."""
  frames = np.asarray(frames, dtype=np.float64)
  low, high = float(frames.min()), float(frames.max())
  top = 2 ** STORED_BITS - 1
  if rescale:
    intercept = math.floor(low) if low < 0 else 0.0
    slope = max(high - intercept, 1e-6) / top
  else:
    intercept, slope = low, max(high - low, 1e-6) / top
  stored = np.clip(np.rint((frames - intercept) / slope), 0, top).astype(np.uint16)
  return stored, (slope if rescale else 1.0), (intercept if rescale else 0.0)


def _geometry(cine: types.Cine) -> tuple[np.ndarray, np.ndarray] | None:
  """The cine's (position [3], orientation [6]); None when it has no geometry."""
  if cine.image_position is None or cine.image_orientation is None:
    return None
  return (np.asarray(cine.image_position, np.float64),
          np.asarray(cine.image_orientation, np.float64))


def _common(identity: Identity, study_key: str, style: str) -> Dataset:
  """Patient, study and equipment tags shared by every file of a study."""
  ds = Dataset()
  ds.PatientName = identity.patient_name
  ds.PatientID = identity.patient_id
  ds.PatientBirthDate = identity.birth_date
  ds.PatientSex = "O"
  ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = identity.study_date
  ds.StudyTime = identity.study_time
  ds.AccessionNumber = identity.accession
  ds.InstitutionName = identity.institution
  ds.ReferringPhysicianName = identity.referring_physician
  ds.StudyID = identity.accession[-6:]
  ds.StudyInstanceUID = _uid(study_key, "study")
  ds.FrameOfReferenceUID = _uid(study_key, "frame-of-reference")
  ds.Modality = "MR"
  ds.Manufacturer = MANUFACTURERS[style]
  ds.MagneticFieldStrength = "1.5"
  ds.ScanningSequence = "GR"
  ds.SequenceVariant = "SS"
  ds.MRAcquisitionType = "2D"
  ds.PatientPosition = "HFS"
  return ds


def _series_time(identity: Identity, series_number: int) -> str:
  start = datetime.datetime.strptime(identity.study_time, "%H%M%S")
  return (start + datetime.timedelta(minutes=SERIES_MINUTES_APART * series_number)).strftime(
      "%H%M%S")


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = sop_uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  return meta


def _finish(ds: Dataset, options: WriteOptions) -> Dataset:
  """Applies compression and tag removal."""
  if options.compression:
    ds.compress(COMPRESSIONS[options.compression], generate_instance_uid=False)
  for keyword in options.drop_tags:
    if keyword in ds:
      delattr(ds, keyword)
  return ds


@dataclasses.dataclass
class SeriesSpec:
  """One series to write: a cine (or a stack of SAX cines in one series) and its naming."""

  cines: list[types.Cine]
  number: int
  description: str
  folder: str  # Kaggle-style folder name of the series


def frame_datasets(spec: SeriesSpec, *, common: Dataset, identity: Identity, study_key: str,
                   heart_rate_bpm: float, options: WriteOptions) -> list[Dataset]:
  """The datasets of one series: one per frame (or one per cine when multiframe)."""
  series_uid = _uid(study_key, "series", spec.number)
  datasets = []
  instance = 0
  for cine_number, cine in enumerate(spec.cines):  # several only for a one-series SAX stack
    geometry = _geometry(cine)
    stored, slope, intercept = _quantise(cine.frames, options.rescale)
    times = (np.asarray(cine.trigger_times_ms, np.float64) if cine.trigger_times_ms is not None
             else np.arange(cine.num_frames) * 60000.0 / heart_rate_bpm / cine.num_frames)
    thickness = cine.slice_thickness_mm if math.isfinite(cine.slice_thickness_mm) else 8.0

    def base(sop_uid: str, sop_class: str) -> Dataset:
      ds = Dataset()
      ds.update(common)
      ds.file_meta = _file_meta(sop_class, sop_uid)
      ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
      ds.SeriesInstanceUID = series_uid
      ds.SeriesNumber = spec.number
      ds.SeriesDescription = ds.ProtocolName = spec.description
      ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _series_time(identity, spec.number)
      ds.AcquisitionNumber = 1
      ds.CardiacNumberOfImages = cine.num_frames
      ds.HeartRate = int(round(heart_rate_bpm))
      ds.NominalInterval = int(round(60000.0 / heart_rate_bpm))
      return ds

    if options.multiframe:
      instance += 1
      sop_uid = _uid(study_key, "sop", spec.number, instance)
      ds = base(sop_uid, ENHANCED_MR_IMAGE_STORAGE)
      ds.InstanceNumber = instance
      ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
      shared = Dataset()
      measures = Dataset()
      measures.PixelSpacing = [_ds(s) for s in cine.pixel_spacing]
      measures.SliceThickness = _ds(thickness)
      transform = Dataset()
      transform.RescaleSlope, transform.RescaleIntercept = _ds(slope), _ds(intercept)
      transform.RescaleType = "US"
      shared.PixelMeasuresSequence = DicomSequence([measures])
      if geometry is not None:
        plane = Dataset()
        plane.ImageOrientationPatient = [_ds(v) for v in geometry[1]]
        shared.PlaneOrientationSequence = DicomSequence([plane])
      shared.PixelValueTransformationSequence = DicomSequence([transform])
      ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
      per_frame = []
      for t in range(cine.num_frames):
        item, sync, content = Dataset(), Dataset(), Dataset()
        if geometry is not None:
          pos = Dataset()
          pos.ImagePositionPatient = [_ds(v) for v in geometry[0]]
          item.PlanePositionSequence = DicomSequence([pos])
        sync.NominalCardiacTriggerDelayTime = float(times[t])
        content.TemporalPositionIndex = t + 1
        content.InStackPositionNumber = cine_number + 1
        item.CardiacSynchronizationSequence = DicomSequence([sync])
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
      ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
      ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2",
                        bits_stored=STORED_BITS, generate_instance_uid=False)
      datasets.append(_finish(ds, options))
      continue
    for t in range(cine.num_frames):
      instance += 1
      ds = base(_uid(study_key, "sop", spec.number, instance), MR_IMAGE_STORAGE)
      ds.InstanceNumber = instance
      ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]
      ds.TriggerTime = _ds(times[t])
      if geometry is not None:
        position, orientation = geometry
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.SliceLocation = _ds(float(np.dot(position, np.cross(orientation[:3], orientation[3:]))))
      ds.PixelSpacing = [_ds(s) for s in cine.pixel_spacing]
      ds.SliceThickness = _ds(thickness)
      ds.set_pixel_data(stored[t], photometric_interpretation="MONOCHROME2",
                        bits_stored=STORED_BITS, generate_instance_uid=False)
      if options.rescale:
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        ds.RescaleType = "US"
      datasets.append(_finish(ds, options))
  return datasets


def series_specs(study: types.Study, options: WriteOptions,
                 views: Sequence[str] = types.VIEWS) -> list[SeriesSpec]:
  """Splits a study's cines into series (SAX base to apex first), numbered from 2."""
  style = SERIES_NAMES.get(options.style, SERIES_NAMES["siemens"])
  own = options.style == STUDY_STYLE
  name = lambda c, k: (c.series_description if own and c.series_description
                       else style[c.view].format(k=k))
  sax = sorted((c for c in study.cines if c.view == types.SAX and types.SAX in views),
               key=lambda c: c.slice_index)
  specs = []
  number = 2
  if options.single_sax_series and sax:
    specs.append(SeriesSpec(sax, number, style[types.SAX].format(k="").rstrip("_b "),
                            _folder(types.SAX, number, options)))
    number += 1
  else:
    for k, cine in enumerate(sax):
      specs.append(SeriesSpec([cine], number, name(cine, k + 1), _folder(types.SAX, number, options)))
      number += 1
  for view in types.LONG_AXIS_VIEWS:
    for cine in (c for c in study.cines if c.view == view and view in views):
      specs.append(SeriesSpec([cine], number, name(cine, 0), _folder(view, number, options)))
      number += 1
  return specs


def _folder(view: str, number: int, options: WriteOptions) -> str:
  """A series folder: `sax_5`, `4ch_12` (Kaggle) or `series_12` (no view hint)."""
  return f"{KAGGLE_FOLDERS[view]}_{number}" if options.view_folders else f"series_{number}"


def _to_bytes(ds: Dataset) -> bytes:
  buffer = pydicom.filebase.DicomBytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def _fault_datasets(study: types.Study, specs: list[SeriesSpec], faults: Faults, *,
                    common: Dataset, identity: Identity, study_key: str, heart_rate: float,
                    options: WriteOptions) -> list[tuple[SeriesSpec, list[Dataset]]]:
  """Extra series holding the injected faults (duplicate slice, single frame, mixed matrix...)."""
  extra = []
  number = 100
  sax_specs = [s for s in specs if s.cines[0].view == types.SAX]
  if faults.duplicate_slice and sax_specs:
    first = sax_specs[0]
    extra.append(SeriesSpec([first.cines[0]], number, first.description,
                            _folder(types.SAX, number, options)))
    number += 1
  if faults.single_frame_series and sax_specs:
    cine = sax_specs[-1].cines[0]
    geometry = _geometry(cine)
    position = None
    if geometry is not None:
      position = geometry[0] + 30.0 * np.cross(geometry[1][:3], geometry[1][3:])
    single = dataclasses.replace(cine, frames=cine.frames[:1], image_position=position,
                                 trigger_times_ms=None)
    extra.append(SeriesSpec([single], number, sax_specs[0].description,
                            _folder(types.SAX, number, options)))
    number += 1
  if faults.scout_series:
    scout = types.Cine(frames=np.asarray(study.cines[0].frames[:3]),
                       pixel_spacing=study.cines[0].pixel_spacing, view=types.SAX)
    extra.append(SeriesSpec([scout], 1, "localizer", "series_1"))
  out = [(s, frame_datasets(s, common=common, identity=identity, study_key=study_key,
                            heart_rate_bpm=heart_rate, options=options)) for s in extra]
  lax_2ch = [s for s in specs if s.cines[0].view == types.LAX_2CH]
  if faults.mixed_matrix and lax_2ch:
    spec = SeriesSpec(lax_2ch[0].cines, number, lax_2ch[0].description,
                      _folder(types.LAX_2CH, number, options))
    datasets = frame_datasets(spec, common=common, identity=identity, study_key=study_key,
                              heart_rate_bpm=heart_rate, options=dataclasses.replace(
                                  options, compression="", multiframe=False))
    for ds in datasets[::2]:
      arr = ds.pixel_array[:-4, :-4].copy()
      ds.set_pixel_data(arr, photometric_interpretation="MONOCHROME2", bits_stored=STORED_BITS,
                        generate_instance_uid=False)
    out.append((spec, datasets))
  return out


def render_study(study: types.Study, *, identity: Identity = Identity(),
                 options: WriteOptions = WriteOptions(), faults: Faults = Faults(),
                 views: Sequence[str] = types.VIEWS) -> list[tuple[str, str, bytes]]:
  """Renders a study as DICOM files in memory.

  Returns:
    (series folder name, file name, file bytes) for every file, faults included (the stray
    non-DICOM file has folder "").
  """
  study_key = f"{study.study_id}|{identity.patient_id}"
  heart_rate = (study.heart_rate_bpm if math.isfinite(study.heart_rate_bpm)
                else DEFAULT_HEART_RATE_BPM)
  common = _common(identity, study_key, options.style)
  specs = series_specs(study, options, views)
  series = [(s, frame_datasets(s, common=common, identity=identity, study_key=study_key,
                               heart_rate_bpm=heart_rate, options=options)) for s in specs]
  series_files = lambda spec, datasets: [
      (spec.folder, f"IM-{spec.number:04d}-{i + 1:04d}.dcm", _to_bytes(ds))
      for i, ds in enumerate(datasets)]
  lax_files = []  # indices in `files` of the long-axis cines' files
  files = []
  for spec, datasets in series:
    if spec.cines[0].view in types.LONG_AXIS_VIEWS:
      lax_files += range(len(files), len(files) + len(datasets))
    files += series_files(spec, datasets)
  for spec, datasets in _fault_datasets(study, specs, faults, common=common, identity=identity,
                                        study_key=study_key, heart_rate=heart_rate,
                                        options=options):
    files += series_files(spec, datasets)
  if faults.truncated_file:
    index = lax_files[len(lax_files) // 2] if lax_files else len(files) // 2
    folder, name, data = files[index]
    files[index] = (folder, name, data[:len(data) * 2 // 3])
  if faults.no_pixel_data:
    ds = frame_datasets(specs[0], common=common, identity=identity, study_key=study_key,
                        heart_rate_bpm=heart_rate, options=dataclasses.replace(
                            options, compression="", multiframe=False))[0]
    del ds.PixelData
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(study_key, "no-pixels")
    files.append((specs[0].folder, "IM-no-pixels.dcm", _to_bytes(ds)))
  if faults.non_dicom_file:
    files.append(("", "README.txt", b"Exported by a PACS viewer. Not a DICOM file.\n"))
  return files


def write_study(study: types.Study, out_dir: str, *, identity: Identity = Identity(),
                options: WriteOptions = WriteOptions(), faults: Faults = Faults(),
                views: Sequence[str] = types.VIEWS) -> list[str]:
  """Writes a study as `out_dir/<series folder>/IM-ssss-ffff.dcm`; returns the file paths."""
  paths = []
  for folder, name, data in render_study(study, identity=identity, options=options,
                                         faults=faults, views=views):
    path = os.path.join(out_dir, folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
    paths.append(path)
  return paths


def write_kaggle(studies: Sequence[types.Study], root: str, *, ids: Sequence[int],
                 split: str = "train", identities: Sequence[Identity] | None = None,
                 options: WriteOptions = WriteOptions(), faults: Sequence[Faults] | None = None,
                 views: Sequence[str] = (types.SAX, types.LAX_2CH, types.LAX_4CH)) -> str:
  """Writes the Kaggle Data Science Bowl layout and its labels CSV.

  Tree: `root/<split>/<split>/<Id>/study/<sax_N|2ch_N|4ch_N>/IM-ssss-ffff.dcm`; labels: for
  train/validate `root/<split>.csv` (Id,Systole,Diastole in mL), for test `root/solution.csv`
  (`<Id>_Systole`/`<Id>_Diastole`, Volume). Kaggle has no 3CH series.

  Returns:
    The folder holding the patient folders (`root/<split>/<split>`).
  """
  base = os.path.join(root, split, split)
  rows = []
  for i, (study, study_id) in enumerate(zip(studies, ids)):
    write_study(study, os.path.join(base, str(study_id), "study"),
                identity=identities[i] if identities else fake_identity(i), options=options,
                faults=faults[i] if faults else Faults(), views=views)
    rows.append((study_id, study.esv, study.edv))
  if split == "test":
    with open(os.path.join(root, "solution.csv"), "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["Id", "Volume", "Usage"])
      for study_id, esv, edv in rows:
        writer.writerow([f"{study_id}_Diastole", f"{edv:.3f}", "Private"])
        writer.writerow([f"{study_id}_Systole", f"{esv:.3f}", "Private"])
  else:
    with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["Id", "Systole", "Diastole"])
      for study_id, esv, edv in rows:
        writer.writerow([study_id, f"{esv:.3f}", f"{edv:.3f}"])
  return base


def _ukbb_manifest(files: list[tuple[str, str, bytes]], eid: int, identity: Identity) -> bytes:
  """A UK Biobank zip manifest: unquoted dates with a comma (`Aug 30, 2015`), as in real zips."""
  date = datetime.datetime.strptime(identity.study_date, "%Y%m%d").strftime("%b %d, %Y")
  lines = ["filename,patientid,studyid,aet,host,date,time,port,seriesid,series discription"]
  for _, name, data in files:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True, force=True)
    lines.append(f"{name},{eid},{ds.get('StudyID', '')},AET,host,{date},{identity.study_time},"
                 f"104,{ds.get('SeriesInstanceUID', '')},{ds.get('SeriesDescription', '')}")
  return ("\n".join(lines) + "\n").encode()


def write_ukbb(studies: Sequence[types.Study], root: str, *, eids: Sequence[int],
               identities: Sequence[Identity] | None = None,
               options: WriteOptions = WriteOptions(style="ukbb"),
               faults: Sequence[Faults] | None = None,
               manifest_names: Sequence[str] = ("manifest.cvs", "manifest.csv")) -> str:
  """Writes UK Biobank bulk zips and a participant labels CSV; returns the CSV path.

  Each study becomes `{eid}_20208_{2+visit}_0.zip` (LAX cines) and `{eid}_20209_{2+visit}_0.zip`
  (SAX), flat DICOM files with a manifest (names alternating over `manifest_names`). Labels go to
  `root/ukb_cmr_labels.csv` with `eid` and `22420/22421/22422-{2|3}.0` (LVEF, EDV, ESV).
  """
  os.makedirs(root, exist_ok=True)
  labels: dict[int, dict[str, str]] = {}
  for i, (study, eid) in enumerate(zip(studies, eids)):
    identity = identities[i] if identities else fake_identity(i)
    instance = UKBB_FIRST_INSTANCE + study.visit
    files = render_study(study, identity=identity, options=options,
                         faults=faults[i] if faults else Faults())
    for field, is_sax in ((UKBB_LAX_FIELD, False), (UKBB_SAX_FIELD, True)):
      members = [f for f in files if f[0].startswith("sax") == is_sax and f[0]]
      if is_sax:
        members += [f for f in files if not f[0]]  # stray files travel in the SAX zip
      path = os.path.join(root, f"{eid}_{field}_{instance}_0.zip")
      with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for j, (folder, name, data) in enumerate(members):
          zf.writestr(f"{folder}_{name}" if folder else name, data)
        named = [(folder, f"{folder}_{name}" if folder else name, data)
                 for folder, name, data in members if folder]
        zf.writestr(manifest_names[i % len(manifest_names)], _ukbb_manifest(named, eid, identity))
    row = labels.setdefault(eid, {"eid": str(eid)})
    for field, value in (("22420", study.lvef), ("22421", study.edv), ("22422", study.esv)):
      row[f"{field}-{instance}.0"] = f"{value:.3f}" if math.isfinite(value) else ""
  path = os.path.join(root, "ukb_cmr_labels.csv")
  columns = ["eid"] + [f"{field}-{inst}.0" for field in ("22420", "22421", "22422")
                       for inst in (UKBB_FIRST_INSTANCE, UKBB_FIRST_INSTANCE + 1)]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(labels.values())
  return path


def write_generic(studies: Sequence[types.Study], root: str, *, folders: Sequence[str],
                  identities: Sequence[Identity] | None = None,
                  options: WriteOptions = WriteOptions(), faults: Sequence[Faults] | None = None,
                  reports: Sequence[str] | None = None) -> tuple[str, str]:
  """Writes one folder per study (`root/images/<folder>/<series>/...`) plus labels and reports.

  Returns:
    (labels CSV keyed by study folder name: `study,lvef,edv,esv`, reports CSV keyed by
    accession: `accession,report`), both under `root`.
  """
  labels_path = os.path.join(root, "labels.csv")
  reports_path = os.path.join(root, "reports.csv")
  os.makedirs(root, exist_ok=True)
  with open(labels_path, "w", newline="") as lf, open(reports_path, "w", newline="") as rf:
    labels, report_rows = csv.writer(lf), csv.writer(rf)
    labels.writerow(["study", "lvef", "edv", "esv"])
    report_rows.writerow(["accession", "report"])
    for i, (study, folder) in enumerate(zip(studies, folders)):
      identity = identities[i] if identities else fake_identity(i)
      write_study(study, os.path.join(root, "images", folder), identity=identity,
                  options=options, faults=faults[i] if faults else Faults())
      labels.writerow([folder, f"{study.lvef:.3f}", f"{study.edv:.3f}", f"{study.esv:.3f}"])
      report_rows.writerow([identity.accession, reports[i] if reports else study.report])
  return labels_path, reports_path
