"""Prediction for new studies: DICOM inputs in two layouts plus broken ones, a dataset split,
the leave-one-cine-out bags, the CLI, and no identifier in outputs or logs."""

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from cmr_jax.data import pipeline
from cmr_jax.data import preprocess
from cmr_jax.data import quality
from cmr_jax.data import records
from cmr_jax.data import types
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import parse
from cmr_jax.dicom import pseudonym
from cmr_jax.eval import conformal
from cmr_jax.eval import evaluate
from cmr_jax import inference
from cmr_jax import intervals
from cmr_jax import predict
from cmr_jax.predict import inputs as predict_inputs
from cmr_jax.predict import output as predict_output
from cmr_jax.predict import scoring
from cmr_jax.testing import dicom_writer
from cmr_jax.train import finetune

import dicom_testlib
from test_train import data_dir  # noqa: F401  (the fixture: fake studies at 32 px, 3 mm, 8 frames)
from test_train import finetune_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "predict-test-salt-0123"
KAGGLE_ID = 734512
NUM_SAX = 6  # Kaggle study: bag = 4CH, 2CH, SAX 1, SAX 3 (K = 4)
ZIP_NUM_SAX = 5  # zipped study, short axis only: bag = SAX 0, SAX 2, SAX 4 (5: untrimmed)


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):  # noqa: F811
  """A 4-step fine-tuning run of the 2-block MViT on the fake studies (best.json included)."""
  workdir = str(tmp_path_factory.mktemp("finetune"))
  start = time.monotonic()
  finetune.train_and_evaluate(finetune_config(data_dir, "random"), workdir)
  print(f"\nfine-tuning run: {time.monotonic() - start:.1f} s")
  return workdir


@pytest.fixture(scope="module")
def predictor(run_dir):
  return inference.Predictor(run_dir)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """(input paths, identities): a Kaggle study folder, a zipped short-axis-only study, an empty
  folder and a text file."""
  root = tmp_path_factory.mktemp("inputs")
  kaggle = dicom_testlib.phantom_study(0, num_sax=NUM_SAX)
  base = dicom_writer.write_kaggle([kaggle], str(root / "kaggle"), ids=[KAGGLE_ID], faults=[
      dicom_writer.Faults(non_dicom_file=True, scout_series=True)])
  identities = [dicom_writer.fake_identity(0), dicom_writer.fake_identity(1)]
  sax_only = dicom_testlib.without_views(dicom_testlib.phantom_study(1, num_sax=ZIP_NUM_SAX),
                                         types.LONG_AXIS_VIEWS)
  dicom_writer.write_study(sax_only, str(root / "export" / "study_b"), identity=identities[1],
                           options=dicom_writer.WriteOptions(style="ge", view_folders=False))
  zipped = shutil.make_archive(str(root / "study_b"), "zip", str(root / "export"), "study_b")
  os.makedirs(root / "empty")
  (root / "notes.txt").write_text("LVEF please\n")
  paths = [os.path.join(base, str(KAGGLE_ID)), zipped, str(root / "empty"),
           str(root / "notes.txt")]
  return paths, identities


@pytest.fixture(scope="module")
def result(predictor, inputs, run_dir):
  paths, _ = inputs
  start = time.monotonic()
  out = predict.predict(predictor, inputs=paths, salt=SALT, workdir=run_dir)
  print(f"predict on {len(paths)} inputs: {time.monotonic() - start:.1f} s")
  return out


def _bag(row) -> list[tuple[str, int | None]]:
  return [(v["view"], v["slice"]) for v in row["views"]]


def test_each_input_gets_a_row_and_good_studies_a_prediction(result, inputs, predictor):
  paths, _ = inputs
  rows = result["studies"]
  assert [r["input"] for r in rows] == paths
  assert result["summary"] == {"rows": 4, "predicted": 2, "failed": 2, "with_warnings": 2}
  val_rmse = predictor.best["val_rmse"]
  for row in rows[:2]:
    assert row["error"] == "" and row["study"].startswith("stu-")
    assert math.isfinite(row["lvef"]) and 0.0 < row["lvef"] < 100.0
    assert row["lvef_below_40"] == (row["lvef"] < 40.0)
    low, high = row["interval"]
    half = 1.96 * math.sqrt(val_rmse ** 2 + row["loo_se"] ** 2)
    assert (low, high) == pytest.approx((max(0.0, row["lvef"] - half),
                                         min(100.0, row["lvef"] + half)))
    assert low < row["lvef"] < high
    assert row["loo_se"] > 0.0 and "val_rmse" in row["interval_method"]
    assert sum(v["attention"] for v in row["views"]) == pytest.approx(1.0, abs=1e-5)
    assert all(v["attention"] > 0 for v in row["views"])
  assert _bag(rows[0]) == [("4CH", None), ("2CH", None), ("SAX", 1), ("SAX", 3)]
  assert _bag(rows[1]) == [("SAX", 0), ("SAX", 2), ("SAX", 4)]


def test_quality_warnings_name_what_is_wrong(result):
  kaggle, zipped = ({w["code"]: w["message"] for w in r["warnings"]}
                    for r in result["studies"][:2])
  assert "have 8 frames per cycle" in kaggle["few_frames"]
  assert "non-cine series (scout/localiser)" in kaggle["files_skipped"]
  assert "1 file: not a DICOM file" in kaggle["files_outside_studies"]
  assert "no_long_axis" not in kaggle and "few_sax_slices" not in kaggle
  assert "no_long_axis" in zipped and f"only {ZIP_NUM_SAX} short-axis" in zipped["few_sax_slices"]
  assert "files_skipped" not in zipped and "coarse_pixels" in zipped  # 7.2 mm vs 3 mm
  assert {w["code"] for w in result["warnings"]} == {"small_validation", "uncalibrated_intervals"}


def test_unreadable_inputs_get_a_reason(result):
  empty, text = result["studies"][2:]
  assert empty["lvef"] is None and empty["error"] == "no DICOM study found (no files)"
  assert text["lvef"] is None and text["error"] == "no DICOM study found (1 file: not a DICOM file)"
  missing = predict_inputs.prepare_input("/nonexistent/study", preprocess.PreprocessConfig(),
                                         salt=SALT)
  assert len(missing) == 1 and "does not exist" in missing[0].error


def test_outputs_and_cli_logs_hold_no_identifier(result, inputs, run_dir, tmp_path):
  paths, identities = inputs
  predict_output.write(result, str(tmp_path / "rows.json"))
  predict_output.write(result, str(tmp_path / "rows.csv"))
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop(pseudonym.SALT_ENV_VAR, None)
  env.pop("XLA_FLAGS", None)  # one device here, eight where the model was trained
  cli = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "predict.py"), f"--model={run_dir}",
       f"--output={tmp_path / 'cli.csv'}", f"--links={tmp_path / 'links.csv'}",
       "--alsologtostderr", *paths],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert "2 of 4 studies predicted, 2 failed" in cli.stdout
  with open(tmp_path / "cli.csv") as f:
    cli_rows = list(csv.DictReader(f))
  assert [r["input"] for r in cli_rows] == paths
  with open(tmp_path / "links.csv") as f:  # the predicted studies' folders (no row for failures)
    links = list(csv.DictReader(f))
  assert [(r["study"], r["input"]) for r in links] == [(r["study"], r["input"])
                                                      for r in cli_rows[:2]]
  assert all(r["location"] and not os.path.isabs(r["location"]) for r in links)
  # A random per-run salt: other pseudonyms, the same predictions. The tolerance: another process
  # reads and resamples the DICOM with float differences of ~1e-4 in the encoder's features, and
  # the paper's head at (near) initialisation (x100 output, PyTorch-default init) turns them into
  # up to ~0.1 LVEF points (this project's first head, `simple`, into < 0.01).
  assert cli_rows[0]["study"] != result["studies"][0]["study"]
  assert float(cli_rows[0]["lvef"]) == pytest.approx(result["studies"][0]["lvef"], abs=0.25)

  secrets = set(pseudonym.identifier_strings([
      v for who in identities for v in (who.patient_name, who.patient_id, who.birth_date,
                                        who.study_date, who.accession, who.institution,
                                        who.referring_physician)]))
  for path in paths[:2]:
    files, _ = dicom_files.list_input_files(path)
    for parsed in parse.read_files(files):
      if parsed.dataset is not None:
        secrets.update({parsed.study_uid, parsed.sop_uid, parsed.series.key})
  texts = {name: (tmp_path / name).read_text()
           for name in ("rows.json", "rows.csv", "cli.csv", "links.csv")}
  texts.update(stdout=cli.stdout, stderr=cli.stderr)
  for where, text in texts.items():
    for secret in secrets:
      assert secret.lower() not in text.lower(), (secret, where)


def test_links_tell_apart_the_studies_of_one_folder(predictor, inputs, result, run_dir,
                                                   tmp_path):
  """One input holding two studies: two rows with that input, and `links` names the folder of
  each row's study (the same study as when it is given alone: same pseudonym, same number)."""
  paths, _ = inputs
  multi = tmp_path / "multi"
  shutil.copytree(paths[0], multi / "site_a" / "case_1")
  shutil.copytree(os.path.join(os.path.dirname(paths[1]), "export", "study_b"),
                  multi / "site_b" / "study_b")
  links = []
  out = predict.predict(predictor, inputs=[str(multi)], salt=SALT, workdir=run_dir, links=links)
  rows = out["studies"]
  assert len(rows) == 2 and {r["input"] for r in rows} == {str(multi)}
  assert all(any(w["code"] == "several_studies" and "--links" in w["message"]
                 for w in r["warnings"]) for r in rows)
  where = {link["study"]: link["location"] for link in links}
  assert set(where) == {r["study"] for r in rows} and all(link["input"] == str(multi)
                                                           for link in links)
  alone = {r["study"]: r for r in result["studies"][:2]}
  assert sorted(where[s].split(os.sep)[:2] for s in alone) == [["site_a", "case_1"],
                                                                ["site_b", "study_b"]]
  for row in rows:
    assert row["lvef"] == pytest.approx(alone[row["study"]]["lvef"], abs=1e-4)


def test_cli_fails_only_when_nothing_is_predicted(inputs, run_dir, tmp_path):
  paths, _ = inputs
  cli = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "predict.py"), f"--model={run_dir}",
       f"--output={tmp_path / 'none.json'}", *paths[2:]],
      capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
  assert cli.returncode == 1, cli.stderr[-3000:]
  with open(tmp_path / "none.json") as f:
    rows = json.load(f)["studies"]
  assert [r["error"].split(" (")[0] for r in rows] == ["no DICOM study found"] * 2


def test_split_scores_match_the_runs_validation_errors(predictor, data_dir, run_dir):  # noqa: F811
  out = predict.predict(predictor, data_dir=data_dir, split="val", loo=False, workdir=run_dir)
  rows = out["studies"]
  assert len(rows) == len(records.load_index(data_dir, "val")) == predictor.best["val_n"]
  assert all(r["lvef_reference"] is not None and r["loo_se"] is None for r in rows)
  # The best checkpoint's validation MAE and bias, recomputed from the rows.
  assert out["summary"]["mae"] == pytest.approx(predictor.best["val_mae"], abs=1e-3)
  assert out["summary"]["bias"] == pytest.approx(predictor.best["val_bias"], abs=1e-3)
  other = preprocess.PreprocessConfig.from_dict(dict(predictor.preprocess, spacing_mm=2.0))
  with pytest.raises(ValueError, match=r"spacing_mm: 3.0 vs model 2.0"):
    records.check_preprocess(data_dir, other)
  # Test-time augmentation: each row is the mean of the deterministic and the seeded passes.
  tta = predict.predict(predictor, data_dir=data_dir, split="val", loo=False, workdir=run_dir,
                        tta=2)
  source = records.open_split(data_dir, "val")
  passes = [predictor(source, tta_sample=k)["pred"] for k in range(2)]
  assert not np.allclose(passes[0], passes[1])
  np.testing.assert_allclose([r["lvef"] for r in tta["studies"]], np.mean(passes, axis=0),
                             rtol=1e-5)
  assert tta["model"]["tta_passes"] == 2
  # A study's numbers (its bag and leave-one-cine-out bags, two passes) do not depend on which
  # studies are scored with it or where: the augmented draws follow its cines.
  studies = [source[i] for i in range(len(source))]
  together = {r.study_id: out["pred"] for r, out in inference.bag_outputs(predictor, studies,
                                                                          tta=2)}
  for record in studies[::-2]:
    ((_, alone),) = inference.bag_outputs(predictor, [record], tta=2)
    np.testing.assert_allclose(alone["pred"], together[record.study_id], rtol=1e-5)


@pytest.mark.parametrize("views, k", [
    ((["SAX"] * 9 + ["2CH", "4CH", "3CH"]), 8),  # bag: 3 LAX + SAX 1, 3, 5, 7
    ((["SAX"] * 12 + ["4CH"]), 4),  # truncated: 4CH + SAX 1, 3, 5 (SAX 7, 9 left out)
    ((["SAX"] * 7), 8),  # short axis only: SAX 1, 3, 5
    ((["SAX"] * 6 + ["2CH"]), 8),  # 2CH + SAX 1, 3 (six slices: trimmed)
    ((["SAX"] * 5), 8),  # SAX 0, 2, 4 (five slices: not trimmed)
    ((["4CH", "2CH", "4CH", "SAX"]), 8),  # 4CH, 2CH + the one SAX slice; 4CH twice
])
def test_leave_one_out_bags_are_the_bag_without_one_cine(views, k):
  rng = np.random.default_rng(0)
  sax = [i for i, v in enumerate(views) if v == types.SAX]
  slice_index = np.full(len(views), -1, np.int32)
  slice_index[sax] = rng.permutation(len(sax))  # stored order need not be base->apex
  bag = pipeline.bag_indices(views, slice_index, k)
  variants = inference.leave_one_out_cines(views, slice_index, k)
  assert len(variants) == len(bag)
  for left_out, cines in zip(bag, variants):
    sub_bag = pipeline.bag_indices([views[i] for i in cines], slice_index[cines], k)
    assert [cines[j] for j in sub_bag] == [i for i in bag if i != left_out]


def test_jackknife_of_leave_one_out_means_is_the_standard_error():
  x = np.array([3.0, 7.0, 1.0, 12.0, 5.0])
  means = np.array([np.delete(x, i).mean() for i in range(x.size)])
  assert inference.jackknife_se(means) == pytest.approx(x.std(ddof=1) / math.sqrt(x.size))


def test_source_and_crop_warnings_from_the_preprocessing_flag(make_study):
  cfg = preprocess.PreprocessConfig(size=32, spacing_mm=3.0, num_frames=8)
  study = make_study(1, num_sax=4, matrix=48)
  assert quality.source_warnings(study) == [quality.QualityWarning(
      "heart_rate_unknown", "heart rate unknown (no HeartRate or RR interval in the DICOM "
      "headers)")]
  rng = np.random.default_rng(0)
  static = lambda c: dataclasses.replace(  # noqa: E731  nothing moves: no motion centre
      c, frames=rng.normal(1000.0, 40.0, c.frames.shape).astype(np.float32))
  study.heart_rate_bpm = 60.0
  study.cines = [static(c) if c.view == types.LAX_4CH else
                 dataclasses.replace(c, trigger_times_ms=None) if c.view == types.LAX_2CH else c
                 for c in study.cines]

  def centred(config):
    names = []
    preprocess.preprocess_study(study, config, image_centred=names)
    return names

  assert centred(cfg) == ["4CH"]
  found = {w.code: w.message
           for w in quality.source_warnings(study) + quality.crop_warnings(centred(cfg))}
  assert found == {
      "no_trigger_times": "1 of 7 cines have no usable trigger times: temporal resolution "
                          "unknown, frames taken as evenly spaced over the cycle",
      "crop_not_centred_on_motion": "no cardiac motion found in 4CH: cropped about the image "
                                    "centre (the heart may be off-centre or cut)"}
  study.cines = [static(c) if c.view == types.SAX else c for c in study.cines]
  assert centred(cfg) == [preprocess.STACK_NAME, "4CH"]
  (warning,) = quality.crop_warnings(centred(cfg))
  assert warning.message.startswith("no cardiac motion found in the SAX stack, 4CH:")
  assert centred(dataclasses.replace(cfg, center="image")) == []  # chosen, not a fallback


class _StubPredictor:
  """LVEF = 30 + 2 x the bag's cines (NaN for study "bad"), uniform attention; K = 4. Returns
  what `inference.Predictor` returns and records the test-time-augmentation passes asked for."""

  config = ml_collections.ConfigDict({"data": {"max_instances": 4}, "eval_batch_size": 1})
  best = {"step": 1, "val_mae": 3.0, "val_rmse": 4.0, "val_n": 100}
  preprocess = {}

  def __init__(self):
    self.calls = []

  def __call__(self, source, tta_sample=0):
    self.calls.append(tta_sample)  # the stub has no augmentation: every pass is the same
    studies = [source[i] for i in range(len(source))]
    bags = [pipeline.bag_indices(r.views, r.slice_index, 4) for r in studies]
    bad = [r.study_id == "bad" for r in studies]
    attention = np.zeros((len(bags), 4), np.float32)
    view = np.full((len(bags), 4), -1, np.int32)
    for i, (r, bag) in enumerate(zip(studies, bags)):
      attention[i, :len(bag)] = 1.0 / len(bag)
      view[i, :len(bag)] = [types.VIEW_CODES[r.views[j]] for j in bag]
    return {"study_index": np.arange(len(bags)), "lvef": np.full(len(bags), np.nan),
            "pred": np.where(bad, np.nan, [30.0 + 2 * len(b) for b in bags]),
            "attention": attention, "view": view}


def test_rows_from_scores_and_a_non_finite_prediction(make_study, tmp_path):
  cfg = preprocess.PreprocessConfig(size=16, spacing_mm=6.0, num_frames=4)
  record = preprocess.preprocess_study(make_study(2, num_sax=6, matrix=32), cfg)
  items = [predict_inputs.Prepared("a", "good", record),
           predict_inputs.Prepared("b", error="unreadable"),
           predict_inputs.Prepared("c", "bad", dataclasses.replace(record, study_id="bad"))]
  stub = _StubPredictor()
  rows = scoring.score(stub, items, tta=2)
  # Two groups of bags (the good study's 5, then the bad one's), each scored in two passes.
  assert stub.calls == [0, 1, 0, 1]
  good, failed, bad = rows
  assert good.lvef == 38.0 and good.lvef_below_40 and good.loo_se == 0.0
  assert good.interval == pytest.approx((38.0 - 1.96 * 4.0, 38.0 + 1.96 * 4.0))
  assert [(v.view, v.slice) for v in good.views] == [("4CH", None), ("2CH", None),
                                                      ("3CH", None), ("SAX", 1)]
  assert failed.lvef is None and failed.error == "unreadable"
  assert bad.lvef is None and "non-finite" in bad.error
  with pytest.raises(dataclasses.FrozenInstanceError):
    good.lvef = 50.0  # type: ignore[misc]
  as_dict = good.to_dict()
  assert list(as_dict) == ["input", "study", "lvef", "interval", "interval_method", "loo_se",
                           "lvef_below_40", "interval_includes_40", "views", "warnings", "error",
                           "lvef_reference"]
  assert _bag(as_dict) == [(v.view, v.slice) for v in good.views]
  assert as_dict["interval"] == list(good.interval) and as_dict["views"][0] == {
      "view": "4CH", "slice": None, "attention": 0.25}
  assert failed.to_dict() == {
      "input": "b", "study": "", "lvef": None, "interval": None, "interval_method": "",
      "loo_se": None, "lvef_below_40": None, "interval_includes_40": None, "views": [],
      "warnings": [], "error": "unreadable", "lvef_reference": None}
  predict_output.write({"studies": [r.to_dict() for r in rows]},
                       str(tmp_path / "rows.json"))  # no NaN reaches the JSON
  with open(tmp_path / "rows.json") as f:
    assert json.load(f)["studies"][0]["lvef"] == 38.0


def test_calibrated_intervals_are_the_conformal_ones_of_the_same_predictions(
    predictor, data_dir, run_dir, tmp_path):  # noqa: F811
  work = str(tmp_path / "run")
  shutil.copytree(run_dir, work)
  cal = conformal.calibrate(predictor, work, data_dir, "train", tta=2)
  assert intervals.read(work) == cal and cal.split == "train" and cal.tta == 2 and cal.loo
  assert cal.step == predictor.best["step"] and cal.val_rmse == predictor.best["val_rmse"]
  # Prediction with the calibration's settings predicts exactly the calibration's numbers.
  out = predict.predict(predictor, data_dir=data_dir, split="train", workdir=work, tta=2)
  rows = out["studies"]
  assert cal.n == len(rows) == len(records.load_index(data_dir, "train"))
  assert out["summary"]["mae"] == pytest.approx(cal.mae, abs=1e-9)
  assert out["model"]["calibration"] == cal.to_dict()
  assert "uncalibrated_intervals" not in {w["code"] for w in out["warnings"]}
  # Finite quantiles (the few studies here give none at 95%): the rows are pred +/- q * scale.
  q = {"0.9": 1.5, "0.95": 2.0}
  cal = dataclasses.replace(cal, quantiles={intervals.NORMALIZED: q, intervals.ABSOLUTE: q},
                            method=intervals.NORMALIZED)
  intervals.write(cal, work)
  out = predict.predict(predictor, data_dir=data_dir, split="train", workdir=work, tta=2)
  for row in out["studies"]:
    half = 2.0 * math.sqrt(cal.val_rmse ** 2 + row["loo_se"] ** 2)
    assert row["interval"] == pytest.approx([max(0.0, row["lvef"] - half),
                                             min(100.0, row["lvef"] + half)])
    assert row["interval_method"].startswith("split-conformal 95% (normalized")
  narrow = predict.predict(predictor, data_dir=data_dir, split="train", workdir=work, tta=2,
                           level=0.9, loo=False)
  assert {w["code"] for w in narrow["warnings"]} == {"calibration_mismatch"}  # loo off
  for row in narrow["studies"]:
    assert row["interval"] == pytest.approx([row["lvef"] - 1.5, row["lvef"] + 1.5])
  with pytest.raises(ValueError, match="calibrated at levels"):
    predict.predict(predictor, data_dir=data_dir, split="train", workdir=work, level=0.8)
  # tools/evaluate.py's coverage comes from the same predictions.
  result = evaluate.evaluate(work, data_dir, ["train"], str(tmp_path / "eval"),
                             options=evaluate.Options(n_boot=20, worst=0))
  iv = result["splits"]["train"]["intervals"]
  truth = np.array([r["lvef_reference"] for r in rows])
  err = np.abs(truth - np.array([r["lvef"] for r in rows]))
  scale = np.sqrt(cal.val_rmse ** 2 + np.array([r["loo_se"] for r in rows]) ** 2)
  assert iv["n"] == len(rows) and iv["mae"] == pytest.approx(cal.mae)
  assert iv["methods"]["absolute"]["0.9"]["coverage"] == pytest.approx(np.mean(err <= 1.5))
  assert iv["methods"]["normalized"]["0.95"]["coverage"] == pytest.approx(
      np.mean(err <= 2.0 * scale))
  assert "Prediction intervals" in open(tmp_path / "eval" / evaluate.REPORT_MD).read()
  # A calibration of another checkpoint step is not used.
  intervals.write(dataclasses.replace(cal, step=cal.step + 1), work)
  stale = predict.predict(predictor, data_dir=data_dir, split="train", workdir=work, loo=False)
  assert "uncalibrated_intervals" in {w["code"] for w in stale["warnings"]}
  assert all(r["interval_method"].startswith("uncalibrated") for r in stale["studies"])


def test_cines_without_plane_geometry_are_named_in_a_warning(tmp_path):
  """Under the anatomical layout, cines that carry no ImagePositionPatient /
  ImageOrientationPatient stay in the scanner's layout, and the prediction row says so."""
  study = dicom_testlib.without_views(dicom_testlib.phantom_study(2, num_sax=3),
                                      (types.LAX_2CH, types.LAX_3CH))
  for name, drop in (("with", ()), ("without", ("ImagePositionPatient",
                                                "ImageOrientationPatient"))):
    dicom_writer.write_study(study, str(tmp_path / name), identity=dicom_writer.fake_identity(2),
                             options=dicom_writer.WriteOptions(drop_tags=drop))
  anatomical = preprocess.PreprocessConfig(size=32, spacing_mm=3.0, num_frames=8)
  scanner = dataclasses.replace(anatomical, orientation="scanner")

  def layout_warning(name, cfg):
    (prepared,) = predict_inputs.prepare_input(str(tmp_path / name), cfg, salt=SALT)
    assert prepared.error == "" and prepared.record is not None
    return [w.message for w in prepared.warnings if w.code == "scanner_layout"]

  (message,) = layout_warning("without", anatomical)
  assert message.startswith("no usable plane geometry (ImagePositionPatient / "
                            "ImageOrientationPatient) in ")
  assert " in 3 SAX, 4CH: kept as the scanner stored them" in message, message
  assert layout_warning("with", anatomical) == []
  assert layout_warning("without", scanner) == []  # nothing was to be turned
