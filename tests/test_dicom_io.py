"""DICOM reading and assembly: names, geometry, SAX order, compressed and multi-frame pixels."""

import collections
import dataclasses
import io
import math
import os
import shutil
import warnings

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
import pytest

from cmr_jax.data import types
from cmr_jax.dicom import assemble
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import geometry
from cmr_jax.dicom import parse
from cmr_jax.dicom import views as dicom_views
from cmr_jax.testing import dicom_writer

import dicom_testlib


@pytest.mark.parametrize("name, view", [
    ("CINE_segmented_LAX_4Ch", types.LAX_4CH), ("cine_4ch", types.LAX_4CH),
    ("4 CH", types.LAX_4CH), ("HLA cine", types.LAX_4CH), ("FIESTA CINE HLA", types.LAX_4CH),
    ("four chamber", types.LAX_4CH), ("CINE_segmented_LAX_2Ch", types.LAX_2CH),
    ("VLA", types.LAX_2CH), ("2ch_21", types.LAX_2CH), ("sBTFE_2CH", types.LAX_2CH),
    ("CINE_segmented_LAX_3Ch", types.LAX_3CH), ("LVOT", types.LAX_3CH),
    ("3 chamber", types.LAX_3CH), ("sax_5", types.SAX), ("CINE_segmented_SAX_b3", types.SAX),
    ("FIESTA CINE SAX", types.SAX), ("sBTFE_SA slice 4", types.SAX), ("short axis", types.SAX),
    ("trufi_cine_sa_retro", types.SAX), ("cine LAX", dicom_views.LAX),
    ("cine_trufi_retro", ""), ("bTFE", ""),
])
def test_classify_name_views(name, view):
  result = dicom_views.classify_name(name)
  assert (result.view, result.non_cine) == (view, "")


@pytest.mark.parametrize("name", [
    "CINE_segmented_SAX_InlineVF", "Inline_VF_Results", "localizer", "3-plane loc",
    "flow_250_tp_AoV_bh", "tagging_sa", "MOLLI T1 map", "ShMOLLI_192i", "T2* map",
    "LGE PSIR sa", "DE_SAX", "perfusion", "CINE_segmented_Ao_dist", "RVOT cine", "haste_tra",
])
def test_classify_name_non_cine(name):
  result = dicom_views.classify_name(name)
  assert result.non_cine and not result.view, (name, result)


def _read(path: str) -> parse.ParsedFile:
  with open(path, "rb") as f:
    return parse.parse_file(dicom_files.FileRef(path), f.read())


def test_compressed_pydicom_files_decode_like_the_uncompressed_one():
  reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
  for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
               "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
    parsed = _read(get_testdata_file(name))
    assert not parsed.reason, name
    np.testing.assert_array_equal(parsed.dataset.pixel_array, reference, err_msg=name)
  jpeg = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))  # JPEG (12-bit) via pylibjpeg
  assert jpeg.pixel_array.shape == (jpeg.Rows, jpeg.Columns)
  baseline = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG baseline
  assert baseline.pixel_array.shape == (baseline.Rows, baseline.Columns, 3)


def test_unusable_files_are_skipped_with_reasons():
  reasons = {name: _read(get_testdata_file(name)).reason
             for name in ("SC_rgb_jpeg_dcmtk.dcm", "CT_small.dcm", "rtplan.dcm")}
  assert reasons["SC_rgb_jpeg_dcmtk.dcm"] == "not an MR image (Modality OT)"
  colour = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
  colour.PhotometricInterpretation = "PALETTE COLOR"
  buffer = io.BytesIO()
  colour.save_as(buffer)
  assert parse.parse_file(dicom_files.FileRef("c.dcm"), buffer.getvalue()).reason == (
      "not a greyscale image (PhotometricInterpretation PALETTE COLOR)")
  assert reasons["CT_small.dcm"] == "not an MR image (Modality CT)"
  assert reasons["rtplan.dcm"] == "no pixel data (not an image)"
  assert parse.parse_file(dicom_files.FileRef("x.txt"), b"plain text " * 50).reason == (
      "not a DICOM file")
  assert parse.parse_file(dicom_files.FileRef("gone"), OSError("missing")).reason == (
      "unreadable file (OSError)")


def _cine_of_test_files(names: list[str], trigger_order: list[int]) -> list[parse.ParsedFile]:
  """One 4CH series of pydicom test files (any transfer syntax), frame k at TriggerTime 40 k."""
  parsed = []
  for i, (name, k) in enumerate(zip(names, trigger_order)):
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SeriesDescription = "cine_4ch"
    ds.SOPInstanceUID = f"1.2.3.{i}"
    ds.TriggerTime = 40.0 * k
    ds.InstanceNumber = k + 1
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    buffer = io.BytesIO()
    ds.save_as(buffer)
    parsed.append(parse.parse_file(dicom_files.FileRef(f"f{i}.dcm"), buffer.getvalue()))
  return parsed


def test_compressed_cine_assembles_in_trigger_order_with_rescale():
  names = ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
           "MR_small.dcm"] * 2 + ["MR_truncated.dcm"]
  order = [5, 2, 7, 0, 3, 6, 1, 4, 8]
  assembled = assemble.assemble_study(_cine_of_test_files(names, order))
  (cine,) = assembled.cines
  assert cine.view == types.LAX_4CH and cine.frames.dtype == np.float32
  assert cine.frames.shape == (8, 64, 64)
  np.testing.assert_array_equal(cine.trigger_times_ms, 40.0 * np.arange(8))
  reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array * 2.0 - 10.0
  np.testing.assert_array_equal(cine.frames, np.broadcast_to(reference, (8, 64, 64)))
  statuses = collections.Counter(s for s, _, _ in assembled.file_status.values())
  assert statuses == {assemble.USED: 8, assemble.SKIPPED: 1}
  truncated = assembled.file_status[dicom_files.FileRef("f8.dcm")]
  assert truncated[1].startswith("pixel data shorter than its header claims (8130 of 8192 bytes")


def _assemble_written(study, tmp_path, **options):
  dicom_writer.write_study(study, str(tmp_path), options=dicom_writer.WriteOptions(**options))
  files, problems = dicom_files.list_input_files(str(tmp_path))
  assert not problems
  return assemble.assemble_study(parse.read_files(files))


@pytest.mark.parametrize("site, options", [
    ("ukbb_like", {}),
    ("kaggle_like", {"style": "unnamed", "view_folders": False}),  # views from geometry only
    ("siteC", {"multiframe": True}),  # enhanced MR, one file per cine
    ("siteD", {"single_sax_series": True, "compression": "rle"}),  # one mixed SAX series
])
def test_round_trip_views_sax_order_and_pixels(site, options, tmp_path):
  study = dicom_testlib.phantom_study(1, site=site)
  assembled = _assemble_written(study, tmp_path, **options)
  assert [c.view for c in assembled.cines] == [c.view for c in study.cines]
  sax_in = [c for c in study.cines if c.view == types.SAX]
  sax_out = [c for c in assembled.cines if c.view == types.SAX]
  assert [c.slice_index for c in sax_out] == list(range(len(sax_in)))
  np.testing.assert_allclose([c.slice_position_mm for c in sax_out],
                             [c.slice_position_mm for c in sax_in], atol=1e-2)
  for original, read in zip(study.cines, assembled.cines):
    np.testing.assert_allclose(read.frames, original.frames, atol=1e-3 * original.frames.max())
    np.testing.assert_allclose(read.image_position, original.image_position, atol=1e-3)
    np.testing.assert_allclose(read.trigger_times_ms, original.trigger_times_ms, atol=1e-3)
    assert read.pixel_spacing == pytest.approx(original.pixel_spacing, rel=1e-5)
  assert all(s == assemble.USED for s, _, _ in assembled.file_status.values())


def test_sax_order_ignores_series_numbers_and_follows_anatomy(tmp_path):
  study = dicom_testlib.phantom_study(2, site="ukbb_like", num_sax=4)
  reversed_numbers = [dataclasses.replace(c, slice_index=-c.slice_index) if c.view == types.SAX
                      else c for c in study.cines]  # written apex first
  assembled = _assemble_written(dataclasses.replace(study, cines=reversed_numbers), tmp_path)
  sax_in = [c for c in study.cines if c.view == types.SAX]
  sax_out = [c for c in assembled.cines if c.view == types.SAX]
  for original, read in zip(sax_in, sax_out):
    np.testing.assert_allclose(read.image_position, original.image_position, atol=1e-3)


def _plain_cine(position, orientation, seed, view=types.SAX):
  rng = np.random.default_rng(seed)
  return types.Cine(frames=rng.uniform(0, 100, (8, 24, 24)).astype(np.float32),
                    pixel_spacing=(2.0, 2.0), view=view, slice_index=seed,
                    image_position=np.asarray(position, float),
                    image_orientation=np.asarray(orientation, float))


def test_sax_order_falls_back_to_acquisition_order_when_anatomy_is_ambiguous(tmp_path):
  # Stack normal (1, 1, 0)/sqrt(2) is perpendicular to the apex direction (1, -1, -1)/sqrt(3).
  orientation = [0, 0, 1, 1 / math.sqrt(2), -1 / math.sqrt(2), 0]  # rows along z
  normal = geometry.plane_normal(np.asarray(orientation, float))
  cines = [_plain_cine(-10.0 * k * normal, orientation, k) for k in range(3)]  # first is base
  study = types.Study(study_id="s", subject_id="p", site="x", cines=cines)
  assembled = _assemble_written(study, tmp_path, style="siemens")
  for original, read in zip(cines, assembled.cines):
    np.testing.assert_allclose(read.image_position, original.image_position, atol=1e-3)


def test_lax_views_from_geometry_alone_and_calibrated_by_named_views():
  study = dicom_testlib.phantom_study(3, site="siteC")
  sax = next(c for c in study.cines if c.view == types.SAX)
  n = geometry.plane_normal(sax.image_orientation)
  lax = {c.view: geometry.plane_normal(c.image_orientation) for c in study.cines
         if c.view != types.SAX}
  views = list(types.LONG_AXIS_VIEWS)
  assert geometry.classify_lax_geometry(n, [lax[v] for v in views]) == views
  for view in views:  # one unnamed plane, the other two named
    known = [(v, lax[v]) for v in views if v != view]
    assert geometry.classify_lax_geometry(n, [lax[view]], known) == [view]


def test_faults_are_skipped_with_reasons_and_the_rest_converted(tmp_path):
  frames = 10  # the truncated file leaves its cine more than the minimum of 8 frames
  study = dicom_testlib.phantom_study(4, site="kaggle_like", num_sax=4, frames=frames)
  faults = dicom_writer.Faults(
      truncated_file=True, non_dicom_file=True, no_pixel_data=True, duplicate_slice=True,
      single_frame_series=True, mixed_matrix=True, scout_series=True)
  paths = dicom_writer.write_study(study, str(tmp_path), faults=faults)
  os.makedirs(tmp_path / "copy")
  shutil.copy(paths[0], tmp_path / "copy")  # the same instance twice
  files, _ = dicom_files.list_input_files(str(tmp_path))
  assembled = assemble.assemble_study(parse.read_files(files))
  assert len(assembled.file_status) == dicom_testlib.count_files(str(tmp_path)) == len(files)
  reasons = collections.Counter(r for s, r, _ in assembled.file_status.values() if s != "used")
  assert reasons == {
      "not a DICOM file": 1,
      "no pixel data (not an image)": 1,
      "non-cine series (scout/localiser)": 3,
      f"too few frames (1 < {assemble.MIN_CINE_FRAMES}): not a cine": 1,
      "duplicate SAX position: superseded by series 100": frames,
      "inconsistent geometry: mixed matrix sizes 28x28, 32x32": frames,
      "pixel data shorter than its header claims (880 of 2048 bytes for 1 frame of 32x32 "
      "at 16 bits)": 1,
      "duplicate file (same SOPInstanceUID as another file)": 1,
  }
  assert [c.view for c in assembled.cines] == [c.view for c in study.cines]
  truncated_view = next(c for c in assembled.cines if c.num_frames == frames - 1)
  assert truncated_view.view in types.LONG_AXIS_VIEWS


def test_repeated_cycle_at_one_position_keeps_the_last(tmp_path):
  cine = dicom_testlib.phantom_study(5, site="ukbb_like").cines[-1]  # 4CH
  repeat = dataclasses.replace(cine, frames=cine.frames * 2.0)
  spec = dicom_writer.SeriesSpec([cine, repeat], 7, "cine_4ch", "4ch_7")
  datasets = dicom_writer.frame_datasets(
      spec, common=dicom_writer._common(dicom_writer.Identity(), "k", "siemens"),
      identity=dicom_writer.Identity(), study_key="k", heart_rate_bpm=60.0,
      options=dicom_writer.WriteOptions(rescale=True))
  parsed = []
  for i, ds in enumerate(datasets):
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    parsed.append(parse.parse_file(dicom_files.FileRef(f"{i}.dcm"), buffer.getvalue()))
  assembled = assemble.assemble_study(parsed)
  (read,) = assembled.cines
  np.testing.assert_allclose(read.frames, repeat.frames, atol=1e-3 * repeat.frames.max())
  reasons = collections.Counter(r for _, r, _ in assembled.file_status.values())
  assert reasons["repeated cardiac cycle at the same position (kept the last)"] == cine.num_frames


def test_missing_optional_tags_still_assemble(tmp_path):
  study = dicom_testlib.phantom_study(6, site="ukbb_like", num_sax=3)
  assembled = _assemble_written(study, tmp_path, drop_tags=(
      "SliceLocation", "TriggerTime", "ProtocolName", "HeartRate", "NominalInterval",
      "SeriesTime", "AcquisitionTime", "SOPInstanceUID"))
  assert [c.view for c in assembled.cines] == [c.view for c in study.cines]
  assert all(c.trigger_times_ms is None for c in assembled.cines)  # frames by InstanceNumber
  for original, read in zip(study.cines, assembled.cines):
    np.testing.assert_allclose(read.frames, original.frames, atol=1e-3 * original.frames.max())


def test_unnamed_long_axis_cines_without_a_sax_stack_are_named_from_anatomy(tmp_path):
  study = dicom_testlib.phantom_study(7, site="ukbb_like")
  lax_only = dataclasses.replace(study, cines=[c for c in study.cines if c.view != types.SAX])
  assembled = _assemble_written(lax_only, tmp_path / "lax", style="unnamed", view_folders=False)
  assert [c.view for c in assembled.cines] == [c.view for c in lax_only.cines]
  assert assembled.notes == ["3 unnamed long-axis cine(s) named 2CH/3CH/4CH from a typical "
                             "heart's axis (no short-axis stack to measure it)"]
  assembled = _assemble_written(lax_only, tmp_path / "no_geometry", style="unnamed",
                                view_folders=False, drop_tags=("ImageOrientationPatient",))
  assert not assembled.cines and not assembled.notes
  reasons = {r for _, r, _ in assembled.file_status.values()}
  assert reasons == {"view unknown: no recognised series name and no plane orientation "
                     "(ImageOrientationPatient)"}


def test_reading_emits_no_pydicom_warnings_or_logs(caplog):
  ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
  with pydicom.config.disable_value_validation():  # invalid values, as some archives hold
    ds.PatientID = "PID" * 30
    ds.AccessionNumber = "ACC-" * 10
  buffer = io.BytesIO()
  ds.save_as(buffer)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    parsed = parse.parse_file(dicom_files.FileRef("a.dcm"), buffer.getvalue())
    assemble.assemble_study([parsed])
  assert not caught and not [r for r in caplog.records if r.name.startswith("pydicom")]
