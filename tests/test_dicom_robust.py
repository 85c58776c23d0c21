"""DICOM from other scanners and simulators: timing, cycles, phases, matrices, spacing, names,
series splits, enhanced MR, pixel encodings, file trees, missing views, orientation.

Each test renders small phantom studies with `dicom_writer`, rewrites the headers or pixels the
way another scanner would, and checks what reading, assembly and `predict.inputs.prepare_input`
make of them.
"""

import collections
import copy
import dataclasses
import io
import os

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence as DicomSequence
import pytest
from scipy.spatial import transform

from cmr_jax.data import preprocess
from cmr_jax.data import types
from cmr_jax.dicom import assemble
from cmr_jax.dicom import cycles
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import layouts
from cmr_jax.dicom import parse
from cmr_jax.dicom import views as dicom_views
from cmr_jax.predict import inputs as predict_inputs
from cmr_jax.testing import dicom_writer

import dicom_testlib

SALT = "robust-test-salt-01"
CFG = dicom_testlib.TINY_CFG

Item = tuple[str, str, Dataset]  # (series folder, file name, dataset)


_RENDERED: dict = {}  # (id(study), options) -> (study, files): renders are the slow part


def _items(study: types.Study, **options) -> list[Item]:
  """The study rendered as datasets (fresh, editable copies)."""
  key = (id(study), tuple(sorted(options.items())))
  if key not in _RENDERED:
    _RENDERED[key] = (study, dicom_writer.render_study(
        study, options=dicom_writer.WriteOptions(**options)))
  return [(folder, name, pydicom.dcmread(io.BytesIO(data)))
          for folder, name, data in _RENDERED[key][1]]


def _bytes(ds: Dataset) -> bytes:
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=False)
  return buffer.getvalue()


def _assemble(items: list[Item]) -> assemble.AssembledStudy:
  return assemble.assemble_study([parse.parse_file(dicom_files.FileRef(f"{folder}/{name}"),
                                                   _bytes(ds)) for folder, name, ds in items])


def _write(items: list[Item], root) -> str:
  for folder, name, ds in items:
    path = os.path.join(str(root), folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(_bytes(ds))
  return str(root)


def _new_uid(ds: Dataset, *parts) -> str:
  """A new SOPInstanceUID derived from a dataset's."""
  return pydicom.uid.generate_uid(entropy_srcs=[ds.SOPInstanceUID, *map(str, parts)])


def _series(items: list[Item], description: str) -> list[Dataset]:
  """The datasets of the series with this description, in instance order."""
  return sorted((ds for _, _, ds in items if ds.SeriesDescription == description),
                key=lambda ds: int(ds.InstanceNumber))


def _reasons(assembled: assemble.AssembledStudy) -> collections.Counter:
  return assembled.skipped_reasons


def _cine(assembled: assemble.AssembledStudy, view: str) -> types.Cine:
  (cine,) = [c for c in assembled.cines if c.view == view]
  return cine


def _close(read: np.ndarray, original: np.ndarray) -> bool:
  """Equal up to the writer's 12-bit quantisation."""
  return read.shape == original.shape and np.allclose(read, original,
                                                      atol=1e-3 * float(original.max()))


@pytest.fixture(scope="module")
def study() -> types.Study:
  study = dicom_testlib.phantom_study(31, num_sax=3, frames=dicom_testlib.FRAMES)
  assert [c.view for c in study.cines] == [types.SAX] * 3 + list(types.LONG_AXIS_VIEWS)
  return study


# ---------------------------------------------------------------------------------------------
# Timing and cycles.


def test_frames_without_trigger_times_get_times_from_acquisition_time_or_rr_interval(study):
  original = _cine(study, types.LAX_4CH)
  n = original.num_frames
  items = _items(study)
  for _, _, ds in items:
    del ds.TriggerTime
  rr_ms = float(items[0][2].NominalInterval)
  cine = _cine(_assemble(items), types.LAX_4CH)  # frames by InstanceNumber, RR / n apart
  assert _close(cine.frames, original.frames)
  np.testing.assert_allclose(cine.trigger_times_ms, np.arange(n) * rr_ms / n, atol=1e-3)

  frames = _series(items, original.series_description)
  for k, ds in enumerate(frames):  # one InstanceNumber for all; acquisition times 37 ms apart
    ds.InstanceNumber = 1
    ds.AcquisitionTime = f"1015{12 + k * 37 // 1000:02d}.{k * 37 % 1000:03d}"
  items = [(f, name, ds) for f, name, ds in items if ds.SeriesDescription
           != original.series_description] + [("4ch", f"{k}", ds) for k, ds in
                                               enumerate(reversed(frames))]  # files reversed
  cine = _cine(_assemble(items), types.LAX_4CH)
  assert _close(cine.frames, original.frames)
  np.testing.assert_allclose(cine.trigger_times_ms, 37.0 * np.arange(n), atol=1e-3)

  for ds in frames:
    for keyword in ("AcquisitionTime", "NominalInterval", "HeartRate"):
      delattr(ds, keyword)
    ds.InstanceNumber = frames.index(ds) + 1
  cine = _cine(_assemble(items), types.LAX_4CH)
  assert _close(cine.frames, original.frames) and cine.trigger_times_ms is None


def _second_cycle(items: list[Item], *, instance_offset: int, jitter_ms: float,
                  with_trigger: bool = True) -> list[Item]:
  """Each plane imaged twice: the repeat's pixels doubled, optionally its trigger times shifted
  and its InstanceNumbers continued."""
  out = list(items)
  for folder, name, ds in items:
    again = copy.deepcopy(ds)
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = _new_uid(ds, "repeat")
    again.InstanceNumber = int(ds.InstanceNumber) + instance_offset
    if with_trigger:
      again.TriggerTime = float(ds.TriggerTime) + jitter_ms
    again.set_pixel_data(ds.pixel_array * 2, photometric_interpretation="MONOCHROME2",
                         bits_stored=16, generate_instance_uid=False)
    out.append((folder, "repeat-" + name, again))
  return out


@pytest.mark.parametrize("instance_offset, jitter_ms, reason", [
    (1000, 0.4, cycles.REPEATED_CYCLE),  # numbering continues, times jitter
    (0, 0.0, cycles.REPEATED_TRIGGER),  # the same InstanceNumbers and TriggerTimes again
])
def test_a_plane_imaged_over_two_cycles_keeps_one(study, instance_offset, jitter_ms, reason):
  items = _items(study)
  num_files = len(items)
  assembled = _assemble(_second_cycle(items, instance_offset=instance_offset,
                                      jitter_ms=jitter_ms))
  assert [c.view for c in assembled.cines] == [c.view for c in study.cines]
  assert _reasons(assembled) == {reason: num_files}
  for original, read in zip(study.cines, assembled.cines):
    assert _close(read.frames, 2 * original.frames)  # the repeat, one frame per phase
    np.testing.assert_allclose(read.trigger_times_ms, original.trigger_times_ms + jitter_ms,
                               atol=1e-2)


def test_two_cycles_without_trigger_times_keep_cardiac_number_of_images(study):
  items = _items(study)
  for _, _, ds in items:
    del ds.TriggerTime
  assembled = _assemble(_second_cycle(items, instance_offset=1000, jitter_ms=0.0,
                                      with_trigger=False))
  assert _reasons(assembled) == {cycles.REPEATED_CYCLE: len(items)}
  for original, read in zip(study.cines, assembled.cines):
    assert _close(read.frames, 2 * original.frames)


@pytest.mark.parametrize("numbering", ["starts_mid_cycle", "shuffled"])
def test_instance_numbers_out_of_time_order_keep_every_frame_in_trigger_order(study, numbering):
  items = _items(study)
  rng = np.random.default_rng(0)
  for series in {ds.SeriesInstanceUID for _, _, ds in items}:
    frames = sorted((ds for _, _, ds in items if ds.SeriesInstanceUID == series),
                    key=lambda ds: float(ds.TriggerTime))
    n = len(frames)
    order = {"starts_mid_cycle": [(k + n // 2) % n for k in range(n)],
             "shuffled": list(rng.permutation(n))}[numbering]
    for ds, k in zip(frames, order):
      ds.InstanceNumber = int(k) + 1
  assembled = _assemble(items)
  assert not _reasons(assembled)
  for original, read in zip(study.cines, assembled.cines):
    assert _close(read.frames, original.frames)
    np.testing.assert_allclose(read.trigger_times_ms, original.trigger_times_ms, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# Phases, matrices, pixel spacing.


@pytest.mark.parametrize("frames, widths", [(25, (26, 32, 20)), (30, (32, 24, 29)),
                                            (50, (18, 32, 27))])
def test_phase_counts_and_rectangular_matrices_per_series(frames, widths):
  study = dicom_testlib.phantom_study(31, num_sax=1, frames=frames)
  # Cutting columns off the right keeps each plane's geometry (the first pixel stays put).
  cines = [dataclasses.replace(c, frames=c.frames[:, 2 * (i % 2):, :widths[i % 3]])
           if c.view != types.SAX else dataclasses.replace(c, frames=c.frames[:, :, :widths[0]])
           for i, c in enumerate(study.cines)]
  for c in cines:
    if c.view != types.SAX and c.frames.shape[1] < dicom_testlib.MATRIX:
      c.image_position = c.image_position + 2 * c.pixel_spacing[0] * c.image_orientation[3:]
  study = dataclasses.replace(study, cines=cines)
  assembled = _assemble(_items(study))
  assert [c.frames.shape for c in assembled.cines] == [c.frames.shape for c in cines]
  assert len({c.frames.shape for c in cines}) > 1
  record = preprocess.preprocess_study(dataclasses.replace(
      study, study_id="s", cines=assembled.cines), CFG)
  assert record.frames.shape == (len(cines), CFG.num_frames, CFG.size, CFG.size)
  for original, read in zip(cines, assembled.cines):
    np.testing.assert_allclose(read.image_position, original.image_position, atol=1e-3)
    np.testing.assert_allclose(read.trigger_times_ms, original.trigger_times_ms, atol=1e-2)


def test_pixel_spacing_anisotropic_single_valued_from_imager_or_missing(study):
  items = _items(study)
  for _, _, ds in items:
    ds.PixelSpacing = [1.5, 2.25]
  assert {c.pixel_spacing for c in _assemble(items).cines} == {(1.5, 2.25)}
  for _, _, ds in items:
    ds.PixelSpacing = "1.75"
  assert {c.pixel_spacing for c in _assemble(items).cines} == {(1.75, 1.75)}
  for _, _, ds in items:
    ds.ImagerPixelSpacing = [1.25, 1.5]
    del ds.PixelSpacing
  assert {c.pixel_spacing for c in _assemble(items).cines} == {(1.25, 1.5)}
  for _, _, ds in items:
    del ds.ImagerPixelSpacing
  assembled = _assemble(items)
  assert not assembled.cines
  assert _reasons(assembled) == {
      "missing PixelSpacing (and no ImagerPixelSpacing): the pixel size is unknown": len(items)}


# ---------------------------------------------------------------------------------------------
# Series names and splits.


@pytest.mark.parametrize("name, view", [
    ("cine_tf2d", ""), ("SSFP 4CH", types.LAX_4CH), ("sa_cine", types.SAX),
    ("FIESTA CINE SA", types.SAX), ("B-TFE_BH SA", types.SAX), ("Cine_SAX_stack", types.SAX),
    ("LAX 2ch", types.LAX_2CH), ("CINE 3 CHAMBER", types.LAX_3CH),
    ("cine 3 chamber", types.LAX_3CH),
    ("sax 12", types.SAX), ("cine_sa_1_of_10", types.SAX), ("SAX-Cine (BH)", types.SAX),
    ("bSSFP_2CV", types.LAX_2CH), ("4ch_FIESTA_20ph", types.LAX_4CH),
    ("CINE SAX MULTISLICE 12 PH25", types.SAX), ("Cine_ShortAxis", types.SAX),
])
def test_vendor_series_names(name, view):
  assert dicom_views.classify_name(name) == dicom_views.NameClass(view=view)


VENDOR_NAMES = {types.SAX: "B-TFE_BH SA", types.LAX_2CH: "LAX 2ch",
                types.LAX_3CH: "CINE 3 CHAMBER", types.LAX_4CH: "SSFP 4CH"}


@pytest.mark.parametrize("names, options", [
    (VENDOR_NAMES, {}),  # one series per slice
    (VENDOR_NAMES, {"single_sax_series": True}),  # the whole stack in one series
    ({v: "" for v in types.VIEWS}, {"single_sax_series": True}),  # no names: geometry decides
])
def test_series_names_and_sax_series_split_give_the_views(study, names, options):
  named = dataclasses.replace(study, cines=[
      dataclasses.replace(c, series_description=names[c.view]) for c in study.cines])
  items = _items(named, view_folders=False, **options)
  for _, _, ds in items:
    ds.ProtocolName = ds.SeriesDescription
  assembled = _assemble(items)
  assert [c.view for c in assembled.cines] == [c.view for c in study.cines]
  for original, read in zip(study.cines, assembled.cines):
    assert _close(read.frames, original.frames)
  assert not assembled.notes and not _reasons(assembled)


def test_positions_jittering_within_a_series_stay_one_slice(study):
  items = _items(study, single_sax_series=True)
  rng = np.random.default_rng(1)
  for _, _, ds in items:  # float noise in the written positions, across rounding boundaries
    ds.ImagePositionPatient = [float(v) + 0.05 + rng.uniform(-0.04, 0.04)
                               for v in ds.ImagePositionPatient]
  assembled = _assemble(items)
  assert [c.view for c in assembled.cines] == [c.view for c in study.cines]
  assert not _reasons(assembled)


SAX_SERIES = 2  # the writer's number of the first SAX series (the whole stack: single_sax_series)


def _enhanced_stack(items: list[Item]) -> Dataset:
  """The SAX cines of an enhanced-MR rendering merged into one file: per-frame positions,
  orientations and rescales, frames slice-major."""
  parts = sorted((ds for _, _, ds in items if int(ds.SeriesNumber) == SAX_SERIES),
                 key=lambda ds: int(ds.InstanceNumber))
  merged = copy.deepcopy(parts[0])
  per_frame = []
  for ds in parts:
    shared = ds.SharedFunctionalGroupsSequence[0]
    for item in ds.PerFrameFunctionalGroupsSequence:
      item = copy.deepcopy(item)
      item.PlaneOrientationSequence = shared.PlaneOrientationSequence
      item.PixelValueTransformationSequence = shared.PixelValueTransformationSequence
      per_frame.append(item)
  del merged.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
  merged.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
  merged.set_pixel_data(np.concatenate([ds.pixel_array for ds in parts]),
                        photometric_interpretation="MONOCHROME2", bits_stored=12,
                        generate_instance_uid=False)
  return merged


def test_enhanced_mr_whole_stack_in_one_file_and_one_frame_per_file(study):
  items = _items(study, multiframe=True, single_sax_series=True)
  stack = _enhanced_stack(items)
  lax = [(f, n, ds) for f, n, ds in items if int(ds.SeriesNumber) != SAX_SERIES]
  assembled = _assemble(lax + [("sax", "stack.dcm", stack)])
  assert [c.view for c in assembled.cines] == [c.view for c in study.cines]
  for original, read in zip(study.cines, assembled.cines):
    assert _close(read.frames, original.frames)
    np.testing.assert_allclose(read.trigger_times_ms, original.trigger_times_ms, atol=1e-2)
  # One enhanced file per frame (NumberOfFrames 1), as some exporters write.
  single = []
  for folder, name, ds in lax:
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
      one = copy.deepcopy(ds)
      one.PerFrameFunctionalGroupsSequence = DicomSequence([item])
      one.SOPInstanceUID = _new_uid(ds, k)
      one.InstanceNumber = k + 1
      one.set_pixel_data(ds.pixel_array[k], photometric_interpretation="MONOCHROME2",
                         bits_stored=12, generate_instance_uid=False)
      single.append((folder, f"{k}-{name}", one))
  assembled = _assemble(single)
  lax_in = [c for c in study.cines if c.view != types.SAX]
  assert [c.view for c in assembled.cines] == [c.view for c in lax_in]
  for original, read in zip(lax_in, assembled.cines):
    assert _close(read.frames, original.frames)


# ---------------------------------------------------------------------------------------------
# Pixel encodings.


def _recode(items: list[Item], encode) -> None:
  """Re-stores every image's stored values as `encode(values, ds)` -> (array, bits stored)."""
  for _, _, ds in items:
    values, bits = encode(ds.pixel_array.astype(np.int64), ds)
    ds.set_pixel_data(values, photometric_interpretation=ds.PhotometricInterpretation,
                      bits_stored=bits, generate_instance_uid=False)


def test_pixel_encodings_monochrome1_16_bit_rescaled_and_signed(study):
  reference = _assemble(_items(study))
  items = _items(study)
  for _, _, ds in items:
    ds.PhotometricInterpretation = "MONOCHROME1"  # stored 0 is white: reading inverts
  for original, read in zip(reference.cines, _assemble(items).cines):
    slope = float(np.ptp(original.frames)) / float(np.ptp(read.frames))
    np.testing.assert_allclose(read.frames * slope, read.frames.min() * slope +
                               original.frames.max() - original.frames, atol=1e-3 * slope)
  items = _items(study)
  _recode(items, lambda v, ds: ((v * 15 + 1000).astype(np.uint16), 16))  # up to 62425
  for _, _, ds in items:
    ds.RescaleSlope = float(ds.RescaleSlope) / 15
    ds.RescaleIntercept = float(ds.RescaleIntercept) - 1000 * float(ds.RescaleSlope)
  assert max(int(ds.pixel_array.max()) for _, _, ds in items) > 60000
  for original, read in zip(reference.cines, _assemble(items).cines):
    np.testing.assert_allclose(read.frames, original.frames, rtol=1e-4, atol=1e-2)
  items = _items(study)
  _recode(items, lambda v, ds: ((v - 2048).astype(np.int16), 12))  # signed 12-bit
  for _, _, ds in items:
    ds.RescaleIntercept = float(ds.RescaleIntercept) + 2048 * float(ds.RescaleSlope)
  assert min(int(ds.pixel_array.min()) for _, _, ds in items) < 0
  for original, read in zip(reference.cines, _assemble(items).cines):
    np.testing.assert_allclose(read.frames, original.frames, rtol=1e-4, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# File trees, missing views, orientation: through `predict.inputs.prepare_input`.


def _prepare(root: str) -> predict_inputs.Prepared:
  (prepared,) = predict_inputs.prepare_input(root, CFG, salt=SALT)
  return prepared


def _codes(prepared: predict_inputs.Prepared) -> set[str]:
  return {w.code for w in prepared.warnings}


def test_file_names_dicomdir_and_nested_folders(study, tmp_path):
  items = _items(study)
  suffixes = ["", ".IMA", ".dcm", ".DCM"]
  renamed = [(os.path.join("PAT0001", "STUDY01", folder.upper()),
              name.removesuffix(".dcm") + suffixes[k % 4], ds)
             for k, (folder, name, ds) in enumerate(items)]
  root = _write(renamed, tmp_path / "tree")
  file_set = FileSet()
  for folder, name, _ in renamed:
    file_set.add(os.path.join(root, folder, name))
  file_set.write(str(tmp_path / "media"))  # DICOMDIR + files named by the file set (no suffix)
  for path in (root, str(tmp_path / "media")):
    prepared = _prepare(path)
    assert not prepared.error
    assert prepared.record.views == [c.view for c in study.cines]
    assert not _codes(prepared) & {"files_skipped", "files_outside_studies", "several_studies"}
  dicomdir = str(tmp_path / "media" / "DICOMDIR")
  discovery = layouts.discover(layouts.GENERIC, str(tmp_path / "media"))
  assert discovery.orphans == [(dicom_files.FileRef(dicomdir), parse.DICOMDIR_REASON)]
  prepared = _prepare(dicomdir)  # the DICOMDIR itself as the input: its folder is read
  assert prepared.input == dicomdir and not prepared.error
  assert prepared.record.views == [c.view for c in study.cines]


def test_files_without_study_series_or_patient_ids_form_one_study(study, tmp_path):
  items = _items(study)
  for _, _, ds in items:
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "StudyDate",
                    "StudyTime"):
      delattr(ds, keyword)
  prepared = _prepare(_write(items, tmp_path))
  assert not prepared.error and not _codes(prepared) & {"files_skipped", "several_studies"}
  assert prepared.record.views == [c.view for c in study.cines]


@pytest.mark.parametrize("views, style, expected_codes", [
    ((types.SAX,), "study", {"no_long_axis"}),
    (types.LONG_AXIS_VIEWS, "study", {"no_short_axis"}),
    (types.LONG_AXIS_VIEWS, "unnamed", {"no_short_axis", "views_from_anatomy"}),
    ((types.LAX_4CH,), "study", {"no_short_axis"}),
])
def test_studies_missing_views_are_prepared_with_a_warning(study, tmp_path, views, style,
                                                           expected_codes):
  items = _items(study, style=style, view_folders=False)
  kept = [item for item, cine in zip(items, _cines_of(study, items)) if cine.view in views]
  prepared = _prepare(_write(kept, tmp_path))
  assert not prepared.error
  assert prepared.record.views == [c.view for c in study.cines if c.view in views]
  assert expected_codes <= _codes(prepared)


def _cines_of(study: types.Study, items: list[Item]) -> list[types.Cine]:
  """The cine each rendered file holds (by series number: SAX base to apex, then 2CH/3CH/4CH)."""
  order = sorted(study.cines, key=lambda c: (types.VIEW_CODES[c.view], c.slice_index))
  return [order[int(ds.SeriesNumber) - SAX_SERIES] for _, _, ds in items]


def test_study_without_a_usable_cine_gets_the_reason(study, tmp_path):
  short = dataclasses.replace(study, cines=[dataclasses.replace(c, frames=c.frames[:3])
                                            for c in study.cines])
  prepared = _prepare(_write(_items(short), tmp_path))
  assert prepared.record is None
  assert prepared.error == (f"no usable cine ({len(short.cines) * 3} files: too few frames "
                            f"(3 < {CFG.min_frames}): not a cine)")


@pytest.mark.parametrize("position, rotation_deg", [
    ("FFS", (0, 0, 0)), ("HFP", (20, -15, 25)), ("FFP", (-20, 10, -25)),
])
def test_patient_position_and_oblique_planes_keep_views_and_sax_order(study, position,
                                                                      rotation_deg):
  """Patient coordinates (LPS) are fixed to the patient, so the patient's position on the table
  changes no geometry; a heart lying differently in the chest (all planes rotated about its
  centre) must still give the same views from geometry alone and the same base->apex order."""
  rotation = transform.Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
  centre = np.mean([c.image_position for c in study.cines], axis=0)
  turned = [dataclasses.replace(
      c, image_position=centre + rotation @ (c.image_position - centre),
      image_orientation=np.concatenate([rotation @ c.image_orientation[:3],
                                        rotation @ c.image_orientation[3:]]))
            for c in study.cines]
  items = _items(dataclasses.replace(study, cines=turned), style="unnamed", view_folders=False)
  for _, _, ds in items:
    ds.PatientPosition = position
  assembled = _assemble(items)
  assert [c.view for c in assembled.cines] == [c.view for c in study.cines]
  for original, read in zip(turned, assembled.cines):
    np.testing.assert_allclose(read.image_position, original.image_position, atol=1e-3)
    assert _close(read.frames, original.frames)


@pytest.mark.parametrize("misnamed", [types.SAX, types.LAX_2CH])
def test_one_series_named_sax_does_not_overrule_the_stacks_geometry(study, tmp_path, misnamed):
  """Unnamed series (a vendor's `cine_trufi_retro`) with one of them named like a short-axis view:
  a real SAX slice (the other, unnamed, slices of the stack must join it) or a long-axis plane
  misnamed (the stack found from geometry must win, the misnamed plane judged by its geometry).
  Before, the one named cine was the whole stack: the other slices were dropped, or for the
  misnamed long-axis plane the real stack was taken for long-axis views."""
  items = _items(study, style="unnamed", view_folders=False)
  cines = _cines_of(study, items)
  number = min(int(ds.SeriesNumber) for (_, _, ds), c in zip(items, cines) if c.view == misnamed)
  for _, _, ds in items:
    if int(ds.SeriesNumber) == number:
      ds.SeriesDescription = ds.ProtocolName = "cine_sa"
  assembled = _assemble(items)
  assert [c.view for c in assembled.cines] == [c.view for c in study.cines]
  assert not assembled.skipped_reasons
  for original, read in zip(study.cines, assembled.cines):
    np.testing.assert_allclose(read.image_position, original.image_position, atol=1e-3)
  if misnamed == types.SAX:
    assert assembled.conflicts == []
  else:
    (conflict,) = assembled.conflicts
    assert conflict.startswith(f"series {number} is named as a short-axis view but its plane "
                               "lies at ")
    assert conflict.endswith("degrees to the short-axis stack of 3 parallel cines: judged by its "
                             "geometry instead")
  prepared = _prepare(_write(items, tmp_path))
  assert prepared.record.views == [c.view for c in study.cines]
  assert ("view_name_conflict" in _codes(prepared)) == (misnamed != types.SAX)
  assert not _codes(prepared) & {"files_skipped", "no_short_axis"}


def test_a_uk_biobank_participants_zips_predict_without_a_stray_file_warning(study, tmp_path):
  """A participant's folder of UK Biobank zips read as any DICOM input: the zips' manifests
  (manifest.cvs / manifest.csv, not DICOM) belong there and are not reported as stray files; a
  non-DICOM file of another name still is."""
  os.remove(dicom_writer.write_ukbb([study], str(tmp_path / "zips"), eids=[1000031]))  # labels
  (prepared,) = predict_inputs.prepare_input(str(tmp_path / "zips"), CFG, salt=SALT)
  assert not prepared.error and prepared.record.views == [c.view for c in study.cines]
  assert not _codes(prepared) & {"files_outside_studies", "files_skipped", "several_studies"}
  (tmp_path / "zips" / "notes.txt").write_text("not DICOM")
  (prepared,) = predict_inputs.prepare_input(str(tmp_path / "zips"), CFG, salt=SALT)
  (warning,) = [w for w in prepared.warnings if w.code == "files_outside_studies"]
  assert warning.message.startswith("1 file below the input in no study")
