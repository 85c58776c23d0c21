"""Archive layouts: Kaggle, UK Biobank and generic discovery, labels, manifests, reports."""

import math
import os
import shutil
import zipfile

import pytest

from cmr_jax.dicom import layouts
from cmr_jax.testing import dicom_writer

import dicom_testlib


def _write(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text)
  return path


def test_kaggle_labels_from_train_and_solution_files(tmp_path):
  train = _write(tmp_path / "train.csv", "Id,Systole,Diastole\n1,40.0,100.0\n2,90,120\n")
  solution = _write(tmp_path / "solution.csv",
                    "Id,Volume,Usage\n701_Diastole,150.0,Private\n701_Systole,60.0,Private\n")
  labels = layouts.read_kaggle_labels([train, solution])
  assert labels["1"] == pytest.approx((60.0, 100.0, 40.0))
  assert labels["2"] == pytest.approx((25.0, 120.0, 90.0))
  assert labels["701"] == pytest.approx((60.0, 150.0, 60.0))
  bad = _write(tmp_path / "bad.csv", "Patient,EF\n1,50\n")
  with pytest.raises(ValueError, match="bad.csv: not a Kaggle label file"):
    layouts.read_kaggle_labels([bad])


def test_discover_kaggle_tree_with_labels_found_above_the_input(tmp_path):
  studies = [dicom_testlib.phantom_study(i, num_sax=2) for i in (20, 21)]
  base = dicom_writer.write_kaggle(studies, str(tmp_path), ids=[501, 502], split="validate")
  stray = _write(os.path.join(base, "notes.txt"), "stray file")
  discovery = layouts.discover(layouts.KAGGLE, base)
  assert [s.key for s in discovery.specs] == ["501", "502"]
  for spec, study in zip(discovery.specs, studies):
    assert spec.subject_key == spec.key and spec.visit == 0 and spec.site == "kaggle"
    assert spec.lvef == pytest.approx(study.lvef, abs=0.01)
    assert spec.edv == pytest.approx(study.edv, abs=1e-3)
    assert all(f"{os.sep}{spec.key}{os.sep}study{os.sep}" in r.path for r in spec.files)
  assert [(r.path, reason) for r, reason in discovery.orphans] == [
      (stray, "not inside a <Id>/study folder")]
  assert discovery.num_files == dicom_testlib.count_files(base)
  # As downloaded: the split folder inside a zip.
  archive = shutil.make_archive(str(tmp_path / "download" / "validate"), "zip", base, ".")
  zipped = layouts.discover(layouts.KAGGLE, os.path.dirname(archive))
  assert [s.key for s in zipped.specs] == ["501", "502"]
  assert [len(s.files) for s in zipped.specs] == [len(s.files) for s in discovery.specs]


def test_ukbb_manifest_dates_with_commas():
  text = ("filename,patientid,studyid,aet,host,date,time,port,seriesid,series discription\n"
          "a.dcm,1000001,1,AET,host,Aug 30, 2015,101512,104,1.2.3,CINE_segmented_LAX_4Ch\n"
          "b.dcm,1000001,1,AET,host,Sep 1, 2015,101512,104,1.2.4,CINE_segmented_SAX_b1\n")
  assert layouts.parse_ukbb_manifest(text) == {"a.dcm": "CINE_segmented_LAX_4Ch",
                                               "b.dcm": "CINE_segmented_SAX_b1"}


def test_discover_ukbb_pairs_zips_by_eid_and_instance(tmp_path):
  studies = [dicom_testlib.phantom_study(30, site="ukbb_like", num_sax=2),
             dicom_testlib.phantom_study(30, site="ukbb_like", visit=1, num_sax=2),
             dicom_testlib.phantom_study(31, site="ukbb_like", num_sax=2)]
  labels_csv = dicom_writer.write_ukbb(studies, str(tmp_path / "zips"),
                                       eids=[1000030, 1000030, 1000031])
  other_field = tmp_path / "zips" / "1000031_20210_2_0.zip"
  with zipfile.ZipFile(other_field, "w") as zf:
    zf.writestr("ao.dcm", b"aortic distensibility")
  _write(tmp_path / "zips" / "1000032_20209_2_0.zip", "not a zip")
  discovery = layouts.discover(layouts.UKBB, str(tmp_path / "zips"), labels=labels_csv)
  assert [(s.key, s.subject_key, s.visit) for s in discovery.specs] == [
      ("1000030_2", "1000030", 0), ("1000030_3", "1000030", 1), ("1000031_2", "1000031", 0)]
  for spec, study in zip(discovery.specs, studies):
    assert (spec.lvef, spec.edv, spec.esv) == pytest.approx(
        (study.lvef, study.edv, study.esv), abs=1e-3)
    assert {os.path.basename(r.path).split("_")[1] for r in spec.files} == {"20208", "20209"}
    assert set(spec.hints) == set(spec.files)  # every file named in its zip's manifest
    assert any(h.startswith("CINE_segmented_SAX_b") for h in spec.hints.values())
  reasons = sorted({reason for _, reason in discovery.orphans})
  assert reasons == [
      "UK Biobank field 20210 not used (cines are in fields 20208 and 20209)",
      "not in a UK Biobank bulk zip ({eid}_{field}_{instance}_0.zip)",  # the labels CSV
      "unreadable zip archive (BadZipFile)",
      "zip manifest (read for series descriptions)"]
  manifests = sum(r.startswith("zip manifest") for _, r in discovery.orphans)
  assert manifests == 6  # one per zip


def test_discover_generic_studies_by_uid_with_visits_labels_and_reports(tmp_path):
  studies, identities, images, labels, reports = dicom_testlib.generic_archive(tmp_path)
  discovery = layouts.discover(layouts.GENERIC, images, labels=labels, reports=reports)
  by_accession = {}
  for spec in discovery.specs:
    accession = spec.report.split(":")[0]
    by_accession[accession] = spec
  assert len(discovery.specs) == 3
  specs = [by_accession[f"Report {i}"] for i in range(3)]
  assert [s.subject_key for s in specs] == [identities[0].patient_id] * 2 + [
      identities[2].patient_id]
  assert [s.visit for s in specs] == [0, 1, 0]
  for spec, study in zip(specs, studies):
    assert spec.lvef == pytest.approx(study.lvef, abs=1e-3)  # by folder name, or zip name
  assert specs[2].files[0].member and specs[2].files[0].path.endswith("ROE_RICHARD.zip")
  assert [reason for _, reason in discovery.orphans] == ["not a DICOM file"]
  assert discovery.num_files == sum(len(s.files) for s in specs) + 1


def test_generic_single_study_folder_or_zip(tmp_path):
  _, _, images, labels, _ = dicom_testlib.generic_archive(tmp_path)
  folder = layouts.discover(layouts.GENERIC, os.path.join(images, "DOE_JANE_2017"),
                            labels=labels)
  zipped = layouts.discover(layouts.GENERIC, os.path.join(images, "ROE_RICHARD.zip"))
  assert len(folder.specs) == len(zipped.specs) == 1
  assert math.isfinite(folder.specs[0].lvef)  # labelled by the input folder's own name
  assert not folder.orphans and not zipped.orphans
  with pytest.raises(ValueError, match="does not exist"):
    layouts.discover(layouts.GENERIC, os.path.join(images, "missing"))
  with pytest.raises(ValueError, match="unknown layout"):
    layouts.discover("pacs", images)
