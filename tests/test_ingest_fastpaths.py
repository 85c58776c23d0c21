"""Ingestion's fast paths give what the slow paths they replace give.

Header numbers read from raw bytes, pixels read with np.frombuffer, the motion map's harmonic
smoothed after the transform, and worker processes that import no ArrayRecord/flax/grain/jax.
"""

import io
import os
import subprocess
import sys

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
import pytest
import scipy.ndimage

from cmr_jax.data import preprocess
from cmr_jax.dicom import assemble
from cmr_jax.dicom import loading
from cmr_jax.dicom import layouts
from cmr_jax.dicom import parse
from cmr_jax.testing import dicom_writer

import dicom_testlib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dataset(syntax=pydicom.uid.ExplicitVRLittleEndian, raw: dict[str, str] | None = None,
             **values) -> bytes:
  """A small MR image file with the given element values; `raw` values (DS/IS text, valid or
  not) are written as given, byte for byte."""
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = syntax
  meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
  meta.MediaStorageSOPInstanceUID = "1.2.3.4"
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = pydicom.uid.MRImageStorage, "1.2.3.4", "MR"
  ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4, 3, 16, 12, 11
  ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.PixelData = np.arange(12, dtype="<u2").tobytes()
  for keyword, value in values.items():
    setattr(ds, keyword, value)
  placeholders = {}
  for keyword, text in (raw or {}).items():  # a valid number of the same length, swapped after
    placeholder = "7" * len(text)
    if text:
      setattr(ds, keyword, placeholder)
      placeholders[placeholder.encode()] = text.encode()
    else:
      setattr(ds, keyword, "")
  buffer = io.BytesIO()
  ds.save_as(buffer, implicit_vr=syntax == pydicom.uid.ImplicitVRLittleEndian,
             little_endian=syntax != pydicom.uid.ExplicitVRBigEndian, enforce_file_format=True)
  data = buffer.getvalue()
  for placeholder, text in placeholders.items():
    assert data.count(placeholder) == 1
    data = data.replace(placeholder, text)
  return data


def _read(data: bytes) -> Dataset:
  with parse.quiet_pydicom():
    return parse.read_dataset(data)


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian,
                                    pydicom.uid.ImplicitVRLittleEndian,
                                    pydicom.uid.ExplicitVRBigEndian])
@pytest.mark.parametrize("keyword,raw", [
    ("SliceThickness", "8"), ("SliceThickness", " 7.25 "), ("SliceLocation", "-1.5e1"),
    ("SliceLocation", "+.5"), ("TriggerTime", "1.5\\2.5"), ("InstanceNumber", "12"),
    ("InstanceNumber", "1.5"), ("InstanceNumber", "1e3"), ("CardiacNumberOfImages", ""),
    ("SliceThickness", "abc"), ("SliceThickness", "1e999"), ("InstanceNumber", "1e999"),
    ("ImagePositionPatient", "1\\-2.5\\3e1"), ("ImagePositionPatient", "4"),
    ("ImagePositionPatient", "1\\\\3"), ("PixelSpacing", "1.25"), ("PixelSpacing", "1.5\\0.75"),
    ("PixelSpacing", "1.5\\x")])
def test_raw_header_numbers_equal_pydicom_conversions(syntax, keyword, raw):
  data = _dataset(syntax, raw={keyword: raw})
  fast, slow = _read(data), _read(data)

  def outcome(read):
    try:
      with parse.quiet_pydicom():
        return ("ok", read())
    except Exception as e:  # pylint: disable=broad-except
      return ("error", type(e).__name__)

  pairs = [(lambda: parse._number_of(fast, keyword), lambda: parse.number(slow.get(keyword))),
           (lambda: parse._vector_of(fast, keyword, 3),
            lambda: parse._vector(slow.get(keyword), 3)),
           (lambda: parse._spacing_of(fast, keyword), lambda: parse._spacing(slow.get(keyword)))]
  for fast_read, slow_read in pairs:
    a, b = outcome(fast_read), outcome(slow_read)
    if isinstance(a[1], np.ndarray) or isinstance(b[1], np.ndarray):
      np.testing.assert_array_equal(a[1], b[1])
    else:
      assert a == b or (a[1] != a[1] and b[1] != b[1]), (keyword, raw, a, b)  # nan == nan


def test_binary_elements_are_never_read_as_text():
  # In implicit VR files a US value's bytes can look like digits: b"12" is 12849 rows.
  assert parse._numeric_tag("BitsAllocated") is None and parse._numeric_tag("Rows") is None
  ds = _read(_dataset(pydicom.uid.ImplicitVRLittleEndian, BitsAllocated=16))
  assert parse._number_of(ds, "BitsAllocated") == 16.0


@pytest.mark.parametrize("bits,representation,frames,syntax", [
    (16, 0, 1, pydicom.uid.ExplicitVRLittleEndian), (16, 1, 1, pydicom.uid.ExplicitVRLittleEndian),
    (16, 0, 3, pydicom.uid.ImplicitVRLittleEndian), (8, 0, 2, pydicom.uid.ExplicitVRLittleEndian),
    (16, 0, 1, pydicom.uid.ExplicitVRBigEndian)])
def test_native_pixels_equal_pixel_array(bits, representation, frames, syntax):
  rng = np.random.default_rng(bits + frames)
  dtype = np.dtype(f"{'<' if syntax != pydicom.uid.ExplicitVRBigEndian else '>'}"
                   f"{'ui'[representation]}{bits // 8}")
  values = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, (frames, 4, 3),
                        endpoint=True).astype(dtype)  # unused high bits set too
  extra = {"NumberOfFrames": frames} if frames > 1 else {}
  ds = _read(_dataset(syntax, BitsAllocated=bits, BitsStored=bits - 4, HighBit=bits - 5,
                      PixelRepresentation=representation, PixelData=values.tobytes(), **extra))
  with parse.quiet_pydicom():
    expected = ds.pixel_array
  got = assemble.native_pixels(ds)
  assert got.dtype == expected.dtype and got.shape == expected.shape
  np.testing.assert_array_equal(got, expected)


def test_fast_and_pydicom_paths_load_the_same_study(tmp_path, monkeypatch):
  study = dicom_testlib.phantom_study(3, num_sax=3)
  dicom_writer.write_kaggle([study], str(tmp_path), ids=[7])
  spec = layouts.discover("kaggle", str(tmp_path)).specs[0]
  fast = loading.load_study(spec, salt="s", root=str(tmp_path))
  monkeypatch.setattr(parse, "_plain_numbers", lambda ds, keyword: None)
  monkeypatch.setattr(assemble, "native_pixels", lambda ds: ds.pixel_array)
  slow = loading.load_study(spec, salt="s", root=str(tmp_path))
  assert fast.rows == slow.rows and len(fast.study.cines) == len(slow.study.cines) > 3
  for a, b in zip(fast.study.cines, slow.study.cines):
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.trigger_times_ms, b.trigger_times_ms)
    np.testing.assert_array_equal(a.image_position, b.image_position)
    assert (a.pixel_spacing, a.view, a.slice_index, a.slice_position_mm) == (
        b.pixel_spacing, b.view, b.slice_index, b.slice_position_mm)


def _reference_motion_map(phases, sigma):
  """The motion map as computed before: every frame smoothed, then the transform."""
  frames = scipy.ndimage.gaussian_filter(phases, (0.0, *sigma))
  return np.fft.rfft(frames, axis=0)[1]


def test_smoothed_harmonic_equals_smoothing_every_frame():
  rng = np.random.default_rng(5)
  phases = rng.random((16, 37, 41)).astype(np.float32)
  sigma = np.array([3.5, 2.25])
  np.testing.assert_allclose(preprocess.first_harmonic_smoothed(phases, sigma),
                             _reference_motion_map(phases, sigma), rtol=0, atol=1e-5)


def test_records_match_the_per_frame_motion_map(monkeypatch):
  """Whole records with the old motion map and the new: at most one grey level apart, rarely."""
  cfg = dicom_testlib.TINY_CFG
  studies = [dicom_testlib.phantom_study(i, frames=12) for i in range(3)]
  new = [preprocess.preprocess_study(s, cfg) for s in studies]
  monkeypatch.setattr(preprocess, "first_harmonic_smoothed", lambda p, s: _reference_motion_map(
      p, s).astype(np.complex64))
  old = [preprocess.preprocess_study(s, cfg) for s in studies]
  diffs = np.concatenate([np.abs(a.frames.astype(int) - b.frames.astype(int)).ravel()
                          for a, b in zip(new, old)])
  assert diffs.max() <= 1 and np.count_nonzero(diffs) <= 1e-4 * diffs.size


def test_worker_processes_import_no_arrayrecord_flax_grain_or_jax():
  """What a `spawn` worker of tools/ingest.py imports: its main module and the loader's."""
  code = ("import importlib.util, sys\n"
          "spec = importlib.util.spec_from_file_location('__mp_main__', 'tools/ingest.py')\n"
          "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
          "import cmr_jax.data.building, cmr_jax.dicom.loading\n"
          "print(sorted(m for m in ('jax', 'flax', 'grain', 'array_record', 'tensorflow')"
          " if m in sys.modules))\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=_ROOT), check=True)
  assert done.stdout.strip() == "[]"
