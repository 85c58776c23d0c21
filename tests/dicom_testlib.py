"""Shared helpers for the DICOM ingestion tests: small phantom studies and a tiny config."""

import dataclasses
import functools
import os
import shutil

from cmr_jax.data import preprocess
from cmr_jax.data import types
from cmr_jax.phantom import simulator
from cmr_jax.testing import dicom_writer

TINY_CFG = preprocess.PreprocessConfig(size=32, spacing_mm=4.0, num_frames=8)
FRAMES = 8
MATRIX = 32


@functools.lru_cache(maxsize=None)
def phantom_study(index: int, site: str = "kaggle_like", visit: int = 0,
                  num_sax: int | None = None, frames: int = FRAMES) -> types.Study:
  """A small phantom study (32x32); `num_sax` keeps that many slices, base to apex.

  Cached: callers must not modify it.
  """
  study = simulator.synthetic_study(0, index, site=site, visit=visit, fast=True, frames=frames,
                                  matrix=MATRIX)
  if num_sax is None:
    return study
  sax = [c for c in study.cines if c.view == types.SAX]
  keep = {round(i * (len(sax) - 1) / max(num_sax - 1, 1)) for i in range(num_sax)}
  cines = [c for i, c in enumerate(sax) if i in keep]
  cines = [dataclasses.replace(c, slice_index=i) for i, c in enumerate(cines)]
  return dataclasses.replace(study, cines=cines + [c for c in study.cines if c.view != types.SAX])


def without_views(study: types.Study, views: tuple[str, ...]) -> types.Study:
  """The study without the cines of `views`."""
  return dataclasses.replace(study, cines=[c for c in study.cines if c.view not in views])


def count_files(root: str) -> int:
  """Number of files below a folder."""
  return sum(len(files) for _, _, files in os.walk(root))


def all_bytes_below(root: str) -> dict[str, bytes]:
  """Every file below a folder, by path."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[path] = f.read()
  return out


def generic_archive(tmp_path) -> tuple[list[types.Study], list[dicom_writer.Identity], str, str,
                                        str]:
  """A PACS-style export: patient 40 twice (the later date is visit 1), patient 41 once (zipped).

  Folders are named after the patients; each report names its patient, accession and date; a
  stray non-DICOM file lies beside the studies.

  Returns:
    (studies, identities, images folder, labels CSV, reports CSV).
  """
  studies = [phantom_study(40, num_sax=2), phantom_study(40, visit=1, num_sax=2),
             phantom_study(41, num_sax=2)]
  first = dicom_writer.fake_identity(40)
  identities = [first, dataclasses.replace(first, study_date="20170102", accession="ACC-X2"),
                dicom_writer.fake_identity(41)]
  folders = ["DOE_JANE_2015", "DOE_JANE_2017", "ROE_RICHARD"]
  reports = [f"Report {i}: {who.patient_name.replace('^', ' ')} ({who.accession}), scanned "
             f"{who.study_date}: normal function." for i, who in enumerate(identities)]
  labels, reports_csv = dicom_writer.write_generic(
      studies, str(tmp_path), folders=folders, identities=identities, reports=reports)
  images = os.path.join(str(tmp_path), "images")
  shutil.make_archive(os.path.join(images, "ROE_RICHARD"), "zip", images, "ROE_RICHARD")
  shutil.rmtree(os.path.join(images, "ROE_RICHARD"))
  with open(os.path.join(images, "Thumbs.db"), "w") as f:
    f.write("not DICOM")
  return studies, identities, images, labels, reports_csv
