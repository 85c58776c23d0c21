"""Output-folder safety of tools/ingest.py and tools/predict.py: inputs and outputs checked before
anything is removed or written, resumes that refuse another salt and redo changed studies, only
an ingest's own files removed, atomic prediction files, and one-line errors for user mistakes."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from cmr_jax import predict
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.dicom import ingest
from cmr_jax.dicom import layouts
from cmr_jax.dicom import output as ingest_output
from cmr_jax.dicom import pseudonym
from cmr_jax.predict import output as predict_output
from cmr_jax.testing import dicom_writer

import dicom_testlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "safety-test-salt-0123"
OTHER_SALT = "another-test-salt-9876"
INDICES = (60, 61)  # two small phantom studies, one folder each


def _write(images: str, index: int, reverse_time: bool = False) -> None:
  study = dicom_testlib.phantom_study(index, num_sax=2)
  if reverse_time:  # other pixels, the same StudyInstanceUID, series and file names
    study = dataclasses.replace(study, cines=[dataclasses.replace(c, frames=c.frames[::-1])
                                              for c in study.cines])
  dicom_writer.write_study(study, os.path.join(images, f"patient_{index}"),
                           identity=dicom_writer.fake_identity(index))


def _options(images: str, output: str, **kwargs) -> ingest.IngestOptions:
  kwargs = {"salt": SALT, **kwargs}
  return ingest.IngestOptions(layout=layouts.GENERIC, input=images, output=output,
                              chunk_studies=1, preprocess=dicom_testlib.TINY_CFG, **kwargs)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  """(images, records): two studies and their ingest (one part each); copy before changing."""
  root = str(tmp_path_factory.mktemp("archive"))
  images = os.path.join(root, "images")
  for index in INDICES:
    _write(images, index)
  output = os.path.join(root, "records")
  summary = ingest.run_ingest(_options(images, output))
  assert summary.converted == len(INDICES)
  return images, output


@pytest.fixture
def copy(archive, tmp_path):
  """A copy of the archive and its records (modification times kept) for one test."""
  images, output = (str(tmp_path / name) for name in ("images", "records"))
  shutil.copytree(archive[0], images)
  shutil.copytree(archive[1], output)
  return images, output


def _checksums(output: str) -> dict[str, str]:
  return {m["study_id"]: m["checksum"] for split in records.read_dataset_info(output)["splits"]
          for m in records.load_index(output, split)}


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != pseudonym.SALT_ENV_VAR}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args],
                        capture_output=True, text=True, env=env, timeout=120, check=False)


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
  """A non-zero exit, no traceback, and the last line on stderr naming the problem."""
  assert result.returncode != 0, result.stdout[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "\nflags:\n" not in result.stderr, result.stderr[-3000:]  # no page of flag help
  last = result.stderr.strip().splitlines()[-1]
  assert all(f in last for f in fragments), last


# Item 3: every check of the inputs before anything in the output is removed or written.

def test_overwrite_with_a_mistyped_input_leaves_the_output_as_it_was(copy, tmp_path):
  images, output = copy
  before = dicom_testlib.all_bytes_below(output)
  result = _run("ingest.py", "--layout=generic", f"--input={images}_typo", f"--output={output}",
                f"--salt={SALT}", "--overwrite")
  _assert_one_line_error(result, f"--input {images}_typo does not exist")
  assert dicom_testlib.all_bytes_below(output) == before
  # An input that exists but holds no study: refused too, as the output holds a dataset.
  os.makedirs(tmp_path / "empty")
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "readme.txt").write_text("not DICOM\n")
  for wrong in ("empty", "notes"):
    with pytest.raises(ingest.UsageProblem, match=r"no studies found below --input .*left as it"):
      ingest.run_ingest(_options(str(tmp_path / wrong), output, overwrite=True))
    assert dicom_testlib.all_bytes_below(output) == before
  # A missing input does not even create the output folder; an empty one neither.
  for wrong in ("missing", "empty"):
    with pytest.raises(ingest.UsageProblem):
      ingest.run_ingest(_options(str(tmp_path / wrong), str(tmp_path / f"new_{wrong}")))
    assert not os.path.exists(tmp_path / f"new_{wrong}")
  # An output inside the input (read back as input later) or holding it.
  with pytest.raises(ingest.UsageProblem, match="lie one inside the other"):
    ingest.run_ingest(_options(images, os.path.join(images, "records")))
  assert not os.path.exists(os.path.join(images, "records"))
  # Files but no study, into a new output: the manifest says why.
  summary = ingest.run_ingest(_options(str(tmp_path / "notes"), str(tmp_path / "new_notes")))
  rows = ingest.read_manifest(str(tmp_path / "new_notes" / ingest.MANIFEST))
  assert summary.num_studies == 0 and [r["reason"] for r in rows] == ["not a DICOM file"]


# Item 7: resuming with another salt, and studies whose input files changed.

def test_resuming_with_another_salt_is_refused(copy):
  images, output = copy
  before, old_ids = dicom_testlib.all_bytes_below(output), set(_checksums(output))
  with pytest.raises(ingest.UsageProblem, match="ingested with another salt"):
    ingest.run_ingest(_options(images, output, salt=OTHER_SALT))
  assert dicom_testlib.all_bytes_below(output) == before
  fingerprint = ingest_output.salt_fingerprint(SALT)
  assert fingerprint != ingest_output.salt_fingerprint(OTHER_SALT)
  info = records.read_dataset_info(output)
  assert info["ingest"]["salt_fingerprint"] == fingerprint
  assert not any(SALT.encode() in data for data in before.values())
  # --overwrite rebuilds with the new salt: one record per study, nothing of the old salt.
  summary = ingest.run_ingest(_options(images, output, overwrite=True, salt=OTHER_SALT))
  assert (summary.converted, summary.resumed, summary.skipped_studies) == (2, 0, 0)
  assert len(_checksums(output)) == 2 and not set(_checksums(output)) & old_ids


def test_a_resumed_study_whose_files_changed_is_converted_again(copy, tmp_path):
  images, output = copy
  before = _checksums(output)
  shutil.rmtree(os.path.join(images, f"patient_{INDICES[0]}"))
  _write(images, INDICES[0], reverse_time=True)
  summary = ingest.run_ingest(_options(images, output))
  assert (summary.num_studies, summary.converted, summary.resumed,
          summary.skipped_studies) == (2, 1, 1, 0)
  assert summary.changed == 1
  after = _checksums(output)
  assert sorted(after) == sorted(before)  # the same pseudonyms: one record per study
  fresh = _checksums(ingest.run_ingest(_options(images, str(tmp_path / "fresh"))).output)
  assert after == fresh and sum(after[s] != before[s] for s in after) == 1
  assert len(os.listdir(os.path.join(output, ingest.PARTS))) == 2 * 3  # dir, done, manifest
  rows = ingest.read_manifest(os.path.join(output, ingest.MANIFEST))
  assert len(rows) == summary.files_in == dicom_testlib.count_files(images)
  again = ingest.run_ingest(_options(images, output))  # nothing changed since
  assert (again.converted, again.resumed, again.changed) == (0, 2, 0)


# Item 8: unrelated folders, --overwrite removing only an ingest's files.

def test_an_unrelated_folder_is_refused_and_overwrite_keeps_its_files(archive, tmp_path):
  images, _ = archive
  folder = tmp_path / "thesis"
  (folder / "figures").mkdir(parents=True)
  (folder / "figures" / "plot.png").write_bytes(b"png")
  (folder / "notes.txt").write_text("mine\n")
  with pytest.raises(ingest.UsageProblem, match="is not empty and holds no dataset"):
    ingest.run_ingest(_options(images, str(folder)))
  assert sorted(os.listdir(folder)) == ["figures", "notes.txt"]
  summary = ingest.run_ingest(_options(images, str(folder), overwrite=True))
  assert summary.converted == 2
  assert (folder / "notes.txt").read_text() == "mine\n"
  assert (folder / "figures" / "plot.png").read_bytes() == b"png"
  # A rebuild over it removes the ingest's files only.
  ingest.run_ingest(_options(images, str(folder), overwrite=True))
  assert {"notes.txt", "figures", records.DATASET_INFO, ingest.MANIFEST,
          ingest.PARTS} <= set(os.listdir(folder))
  # A dataset not written by ingest (no parts/) is not resumed into.
  other = tmp_path / "built"
  other.mkdir()
  (other / records.DATASET_INFO).write_text(json.dumps({"splits": {}}))
  with pytest.raises(ingest.UsageProblem, match="not written by tools/ingest.py"):
    ingest.run_ingest(_options(images, str(other)))


def test_prediction_files_are_written_atomically(tmp_path):
  path = tmp_path / "rows.json"
  path.write_text("earlier rows\n")
  with pytest.raises(ValueError):  # NaN is refused by the JSON writer, midway
    predict_output.write({"studies": [{"lvef": float("nan")}]}, str(path))
  assert path.read_text() == "earlier rows\n" and os.listdir(tmp_path) == ["rows.json"]
  predict_output.write({"studies": []}, str(path))
  assert json.loads(path.read_text()) == {"studies": []} and os.listdir(tmp_path) == ["rows.json"]
  for bad, problem in (("missing/rows.csv", "does not exist"), ("rows.txt", "ending in"),
                       (".", "ending in")):
    with pytest.raises(ValueError, match=problem):
      predict_output.check_writable(str(tmp_path / bad))
  # --links: a .csv of its own, readable by its owner only, for DICOM inputs only.
  links = [{"study": "stu-1", "input": "/in", "location": "site/a"}]
  predict_output.write_links(links, str(tmp_path / "links.csv"))
  assert (tmp_path / "links.csv").read_text() == "study,input,location\nstu-1,/in,site/a\n"
  assert os.stat(tmp_path / "links.csv").st_mode & 0o777 == 0o600
  for kwargs, problem in ((dict(links_path=str(tmp_path / "links.json")), "--links .* ending in"),
                          (dict(links_path=str(path), output_path=str(path)), "is the --output"),
                          (dict(links_path=str(tmp_path / "l.csv"), data_dir=str(tmp_path),
                                inputs=()), "not with --data_dir")):
    with pytest.raises(ValueError, match=problem):
      predict.check_arguments(**{"inputs": [str(tmp_path)], **kwargs})


@pytest.mark.parametrize("case", [
    "ingest_missing_input", "ingest_output_is_a_file", "ingest_unrelated_output",
    "ingest_other_salt", "ingest_missing_labels", "ingest_short_salt",
    "predict_output_folder_missing", "predict_bad_extension", "predict_data_dir_not_a_dataset",
    "predict_missing_split", "predict_model_missing", "predict_missing_input",
    "predict_short_salt", "ingest_bad_fractions", "ingest_other_fractions", "predict_bad_level",
    "predict_bad_limit", "calibrate_on_val", "ingest_like_model_missing",
    "ingest_like_model_disagrees"])
def test_user_errors_end_in_one_line(case, copy, tmp_path):
  images, records_dir = copy
  (tmp_path / "file").write_text("x")
  (tmp_path / "unrelated").mkdir()
  (tmp_path / "unrelated" / "notes.txt").write_text("x")
  (tmp_path / "study").mkdir()
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "preprocess.json").write_text(json.dumps(dicom_testlib.TINY_CFG.to_dict()))
  ingest_args = ["ingest.py", "--layout=generic", f"--input={images}"]
  predict_args = ["predict.py", f"--model={tmp_path}/no_run", f"--output={tmp_path}/rows.csv"]
  runs = {
      "ingest_missing_input": (["ingest.py", "--layout=generic", f"--input={tmp_path}/typo",
                                f"--output={tmp_path}/out", f"--salt={SALT}"],
                               [f"{tmp_path}/typo does not exist"]),
      "ingest_output_is_a_file": (ingest_args + [f"--output={tmp_path}/file", f"--salt={SALT}"],
                                  ["is not a folder"]),
      "ingest_unrelated_output": (ingest_args + [f"--output={tmp_path}/unrelated",
                                                 f"--salt={SALT}"], ["is not empty"]),
      "ingest_other_salt": (ingest_args + [f"--output={records_dir}", f"--salt={OTHER_SALT}",
                                           "--size=32", "--spacing_mm=4", "--frames=8"],
                            ["another salt"]),
      "ingest_missing_labels": (ingest_args + [f"--output={tmp_path}/out", f"--salt={SALT}",
                                               f"--labels={tmp_path}/labels.csv"],
                                ["--labels", "is not a file"]),
      "ingest_short_salt": (ingest_args + [f"--output={tmp_path}/out", "--salt=short"],
                            ["at least"]),
      "predict_output_folder_missing": (["predict.py", f"--model={tmp_path}/no_run",
                                         f"--output={tmp_path}/no/rows.csv", images],
                                        ["does not exist", f"{tmp_path}/no"]),
      "predict_bad_extension": (["predict.py", f"--model={tmp_path}", f"--output={tmp_path}/x",
                                 images], [".json or .csv"]),
      "predict_data_dir_not_a_dataset": (predict_args + [f"--data_dir={tmp_path}/unrelated"],
                                         ["--data_dir", "not a dataset"]),
      "predict_missing_split": (predict_args + [f"--data_dir={records_dir}", "--split=nope"],
                                ["split", "nope"]),
      "predict_model_missing": (predict_args + [images], ["--model", "no_run"]),
      "predict_missing_input": (predict_args + [images, f"{tmp_path}/typo"],
                                [f"{tmp_path}/typo", "does not exist"]),
      "predict_short_salt": (predict_args + ["--salt=short", images], ["at least"]),
      "ingest_bad_fractions": (ingest_args + [f"--output={tmp_path}/out", f"--salt={SALT}",
                                              "--fractions=train=0.5,val"],
                               ["--fractions", "'val' is not name=fraction"]),
      "ingest_other_fractions": (ingest_args + [
          f"--output={records_dir}", f"--salt={SALT}", "--size=32", "--spacing_mm=4",
          "--frames=8", "--fractions=train=0.6,val=0.1,calib=0.1,test=0.2"],
          ["ingested with other splits", "--fractions"]),
      "predict_bad_level": (predict_args + ["--level=1.5", images], ["--level", "(0, 1)"]),
      "predict_bad_limit": (predict_args + ["--max_file_bytes=0", images],
                            ["--max_file_bytes", "positive integer"]),
      "ingest_like_model_missing": (ingest_args + [f"--output={tmp_path}/out", f"--salt={SALT}",
                                                   f"--like_model={tmp_path}/no_run"],
                                    ["--like_model", "no_run/preprocess.json does not exist"]),
      "ingest_like_model_disagrees": (ingest_args + [
          f"--output={tmp_path}/out", f"--salt={SALT}", f"--like_model={tmp_path}/run",
          f"--size={dicom_testlib.TINY_CFG.size + 16}"],
          [f"--size={dicom_testlib.TINY_CFG.size + 16} disagrees with --like_model"]),
      "calibrate_on_val": (["calibrate.py", f"--workdir={tmp_path}/no_run",
                            f"--data_dir={records_dir}", "--split=val"],
                           ["--split val", "trained or chosen"]),
  }
  args, fragments = runs[case]
  _assert_one_line_error(_run(*args), *fragments)
  if case.startswith("ingest"):
    assert not os.path.exists(tmp_path / "out")
  if case == "predict_output_folder_missing":
    assert not os.path.exists(tmp_path / "no")


def test_fractions_choose_the_splits_and_a_resume_must_keep_them(archive, tmp_path):
  images, _ = archive
  output = str(tmp_path / "calib")
  summary = ingest.run_ingest(_options(images, output, fractions=(("calib", 1.0),)))
  assert summary.converted == len(INDICES)
  assert set(records.read_dataset_info(output)["splits"]) == {"calib"}
  before = dicom_testlib.all_bytes_below(output)
  with pytest.raises(ingest.UsageProblem, match="ingested with other splits"):
    ingest.run_ingest(_options(images, output))  # the default train/val/test fractions
  assert dicom_testlib.all_bytes_below(output) == before
  resumed = ingest.run_ingest(_options(images, output, fractions=(("calib", 1.0),)))
  assert (resumed.converted, resumed.resumed) == (0, len(INDICES))


def test_ingest_like_a_model_stores_what_predict_needs(archive, tmp_path):
  """`--like_model` takes every preprocessing field from the run's preprocess.json (not only the
  ones with flags), so that predict accepts the dataset; the defaults would be refused."""
  images, _ = archive
  stored = {**dicom_testlib.TINY_CFG.to_dict(), "high_percentile": 99.0, "motion_sigma_mm": 9.0}
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "preprocess.json").write_text(json.dumps(stored))
  output = str(tmp_path / "out")
  result = _run("ingest.py", "--layout=generic", f"--input={images}", f"--output={output}",
                f"--salt={SALT}", f"--like_model={tmp_path}/run")
  assert result.returncode == 0, result.stderr[-3000:]
  assert records.read_dataset_info(output)["preprocess"] == stored
  records.check_preprocess(output, preprocess.PreprocessConfig.from_dict(stored))
  with pytest.raises(ValueError, match=r"high_percentile: 99.0 vs model 99.5.*--like_model"):
    records.check_preprocess(output, dicom_testlib.TINY_CFG)
