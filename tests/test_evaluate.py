"""tools/evaluate.py and cmr_jax.eval.evaluate on a tiny fine-tuned run: test-time augmentation,
predictions CSV, metrics JSON, plots and report, the largest errors with their thumbnails, an
unlabelled split, rescans, and clear errors for a missing or empty split, a mismatched checkpoint
or dataset; the CLI."""

import csv
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time

from matplotlib import image as mpl_image
import numpy as np
import pytest

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.eval import evaluate
from cmr_jax.eval import largest_errors
from cmr_jax.eval import metrics
from cmr_jax.eval import report
from cmr_jax import inference
from cmr_jax import runs
from cmr_jax.train import finetune

import conftest
from test_train import finetune_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# subject -> split; subjects 10-12 and 16 also have a rescan (visit 1); 16-17 have no label.
SPLIT_OF_SUBJECT = {**{i: "train" for i in range(8)}, 8: "val", 9: "val",
                    **{i: "test" for i in range(10, 16)}, 16: "unlabelled", 17: "unlabelled"}
RESCANNED = (10, 11, 12, 16)
OPTIONS = evaluate.Options(tta=2, n_boot=200, folds=3)  # worst: the default 8, of 9 test studies
STRIP_PX = (2 * 180 + 90, 4 * 180)  # ED and ES rows of 180 px frames and a title band; K = 4


def _split(record) -> str:
  return SPLIT_OF_SUBJECT[int(record.subject_id.rsplit("-", 1)[1])]  # fake-{seed}-{index:04d}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """train (8 subjects), val (2), test (6 + 3 rescans), unlabelled (2 + 1 rescan) at 32 px."""
  out = str(tmp_path_factory.mktemp("eval_data"))
  items = [(f"fake-{subject}-{visit}",
            functools.partial(conftest.fake_study, 0, subject, num_sax=4, matrix=48,
                              visit=visit, labelled=split != "unlabelled"))
           for subject, split in SPLIT_OF_SUBJECT.items()
           for visit in ((0, 1) if subject in RESCANNED else (0,))]
  records.build_dataset(items, out, cfg=preprocess.PreprocessConfig(size=32, spacing_mm=3.0,
                                                                      num_frames=8),
                        split_fn=_split)
  return out


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
  """A 4-step fine-tuning run of the 2-block MViT (the tests' tiny config)."""
  workdir = str(tmp_path_factory.mktemp("eval_run"))
  finetune.train_and_evaluate(finetune_config(data_dir, "random"), workdir)
  return workdir


@pytest.fixture(scope="module")
def predictor(run_dir):
  return inference.Predictor(run_dir)


@pytest.fixture(scope="module")
def result(run_dir, data_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("eval_out"))
  start = time.monotonic()
  res = evaluate.evaluate(run_dir, data_dir, ["test", "unlabelled"], out, options=OPTIONS)
  print(f"\nevaluate (2 splits, 12 studies, tta 2): {time.monotonic() - start:.1f} s")
  return res, out


def _rows(path: str) -> list[dict[str, str]]:
  with open(path) as f:
    return list(csv.DictReader(f))


def test_tta_later_passes_are_seeded_augmentations_of_the_default_pass(predictor, data_dir):
  source = records.open_split(data_dir, "test")
  default, one, one_again = predictor(source), predictor(source, tta_sample=1), predictor(
      source, tta_sample=1)
  np.testing.assert_array_equal(one["pred"], one_again["pred"])
  assert not np.allclose(one["pred"], default["pred"])
  np.testing.assert_array_equal(one["view"], default["view"])
  # The first pass of the evaluation is the default pass.
  stub = _StubPredictor({0: default, 1: one})
  mean = inference.tta_predictions(stub, source, 2)
  assert stub.calls == [0, 1]
  np.testing.assert_allclose(mean["pred"], (default["pred"] + one["pred"]) / 2, rtol=1e-6)
  np.testing.assert_allclose(mean["pred_sd"], np.abs(default["pred"] - one["pred"]) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(mean["attention"], (default["attention"] + one["attention"]) / 2)


class _StubPredictor:
  """Returns fixed outputs per test-time-augmentation pass and records the passes asked for."""

  def __init__(self, outputs):
    self.outputs, self.calls = outputs, []

  def __call__(self, source, *, tta_sample):
    del source
    self.calls.append(tta_sample)
    return self.outputs[tta_sample]


def test_predictions_csv_has_every_study_with_its_bag_and_attention(result, data_dir):
  res, out = result
  rows = _rows(os.path.join(out, "test", evaluate.PREDICTIONS_CSV))
  index = records.load_index(data_dir, "test")
  assert [r["study_id"] for r in rows] == [m["study_id"] for m in index]
  assert [r["subject"] for r in rows] == [m["subject_id"] for m in index]
  assert {r["visit"] for r in rows} == {"0", "1"} and {r["site"] for r in rows} == {"fake"}
  for row, m in zip(rows, index):
    assert float(row["lvef_reference"]) == pytest.approx(m["lvef"], abs=1e-3)
    # The bag of K = 4: the three long-axis views, then SAX 0 (of 0 and 2: four slices, every
    # second from the first).
    assert [row[f"instance_{k}_view"] for k in range(1, 5)] == ["4CH", "2CH", "3CH", "SAX 0"]
    assert sum(float(row[f"instance_{k}_attention"]) for k in range(1, 5)) == pytest.approx(
        1.0, abs=1e-3)
    assert float(row["lvef_predicted_tta_sd"]) > 0.0
  # The JSON's figures are those of the CSV's columns.
  truth = np.array([float(r["lvef_reference"]) for r in rows])
  pred = np.array([float(r["lvef_predicted"]) for r in rows])
  test = res["splits"]["test"]
  assert test["metrics"]["mae"]["value"] == pytest.approx(metrics.mae(truth, pred), abs=2e-3)
  shifted = np.array([float(r["lvef_corrected_shift"]) for r in rows])
  assert test["bias_correction"]["shift"]["metrics"]["mae"]["value"] == pytest.approx(
      metrics.mae(truth, shifted), abs=2e-3)


def test_metrics_json_has_intervals_corrections_and_repeatability(result):
  res, out = result
  with open(os.path.join(out, evaluate.METRICS_JSON)) as f:
    assert json.load(f) == res
  assert res["checkpoint"] == "best" and res["options"]["tta"] == 2
  test = res["splits"]["test"]
  assert (test["n_studies"], test["n_labelled"], test["n_subjects"]) == (9, 9, 6)
  low, high = test["metrics"]["mae"]["ci"]
  assert low <= test["metrics"]["mae"]["value"] <= high
  assert test["metrics"]["n"] == {"value": 9, "ci": None}
  correction = test["bias_correction"]
  assert correction["scheme"].startswith("3-fold cross-fitting over subjects")
  assert [f["n_fit"] for f in correction["linear"]["fits"]] and all(
      f["n_fit"] < 9 for f in correction["linear"]["fits"])
  rep = test["repeatability"]
  assert rep["n_pairs"] == 3
  assert rep["reference"]["n_pairs"] == rep["prediction"]["n_pairs"] == 3
  assert rep["prediction"]["mean_abs_diff"] > 0.0


def test_unlabelled_split_gets_predictions_and_says_so(result):
  res, out = result
  unlabelled = res["splits"]["unlabelled"]
  assert (unlabelled["n_studies"], unlabelled["n_labelled"]) == (3, 0)
  assert "metrics" not in unlabelled and "plots" not in unlabelled["files"]
  assert unlabelled["repeatability"]["n_pairs"] == 1
  assert "reference" not in unlabelled["repeatability"]
  rows = _rows(os.path.join(out, "unlabelled", evaluate.PREDICTIONS_CSV))
  assert len(rows) == 3 and all(r["lvef_reference"] == "" and r["lvef_predicted"] for r in rows)
  with open(os.path.join(out, evaluate.REPORT_MD)) as f:
    text = f.read()
  assert "**No LVEF labels in this split: predictions only, no metrics.**" in text


def test_report_embeds_plots_and_tables(result):
  res, out = result
  with open(os.path.join(out, evaluate.REPORT_MD)) as f:
    text = f.read()
  mae = res["splits"]["test"]["metrics"]["mae"]
  assert f"| MAE | {mae['value']:.2f} [{mae['ci'][0]:.2f}, {mae['ci'][1]:.2f}] |" in text
  assert "## Split `test`" in text and "## Split `unlabelled`" in text
  assert "### Scan-rescan repeatability (3 pairs)" in text
  for name, path in res["splits"]["test"]["files"]["plots"].items():
    assert f"]({path})" in text, name
    with open(os.path.join(out, path), "rb") as f:
      assert f.read(8) == PNG_MAGIC


def _largest_errors_table(text: str, split: str) -> list[list[str]]:
  """The cells of the table rows of a split in the report's "Largest errors" section."""
  section = text.split("\n## Largest errors\n", 1)[1]
  block = section.split(f"\n### Split `{split}`", 1)[1].split("\n### ", 1)[0]
  return [line.strip("| ").split(" | ") for line in block.splitlines()
          if re.match(r"\| \d+ \| `", line)]


def _largest_by_csv(rows: list[dict[str, str]], n: int) -> list[str]:
  """Study ids of the n largest |predicted - reference| of the predictions CSV, largest first."""
  error = {r["study_id"]: abs(float(r["lvef_predicted"]) - float(r["lvef_reference"]))
           for r in rows if r["lvef_reference"]}
  return sorted(error, key=error.get, reverse=True)[:n]


def test_largest_errors_lists_the_worst_studies_with_bag_warnings_and_thumbnails(result):
  res, out = result
  assert res["options"]["worst"] == 8
  rows = _rows(os.path.join(out, "test", evaluate.PREDICTIONS_CSV))
  by_id = {r["study_id"]: r for r in rows}
  with open(os.path.join(out, evaluate.REPORT_MD)) as f:
    text = f.read()
  assert "### Split `test`: 8 largest of 9 labelled studies" in text
  table = _largest_errors_table(text, "test")
  assert [cells[1] for cells in table] == [f"`{s}`" for s in _largest_by_csv(rows, 8)]
  assert [cells[0] for cells in table] == [str(k) for k in range(1, 9)]
  entries = res["splits"]["test"]["largest_errors"]
  assert [e["study_id"] for e in entries] == [cells[1].strip("`") for cells in table]
  for cells, entry in zip(table, entries):
    row = by_id[entry["study_id"]]
    assert cells[2] == f"`{row['subject']}`"
    error = abs(float(row["lvef_predicted"]) - float(row["lvef_reference"]))
    assert float(cells[5]) == pytest.approx(error, abs=0.006)
    assert cells[6] == ", ".join(f"{row[f'instance_{k}_view']} "
                                 f"({float(row[f'instance_{k}_attention']):.3f})"
                                 for k in range(1, 5))
    assert cells[7] == "few_sax_slices"  # 4 SAX slices; every view, pixels finer than 3 mm
    # The fake disks are largest at frame 0 and smallest half a cycle later (8 frames).
    assert (entry["ed_frame"], entry["es_frame"]) == (0, 4)
    assert f"]({entry['thumbnail']})" in text
    assert entry["thumbnail"] == os.path.join(
        "worst", f"test_{entry['rank']:02d}_{entry['study_id']}.png")
    pixels = mpl_image.imread(os.path.join(out, entry["thumbnail"]))  # [H, W, RGBA]
    assert pixels.shape[:2] == STRIP_PX and pixels[..., :3].std() > 0.05
  assert f"**1. `{entries[0]['study_id']}`**: only 4 short-axis slices" in text
  assert sorted(os.listdir(os.path.join(out, "worst"))) == sorted(
      os.path.basename(e["thumbnail"]) for e in entries)
  section = text.split("\n## Largest errors\n", 1)[1]
  assert section.split("### Split `unlabelled`", 1)[1].startswith(
      "\n\nNo LVEF labels: no errors to rank.")
  assert res["splits"]["unlabelled"]["largest_errors"] == []


def test_largest_errors_lists_every_study_when_n_exceeds_the_split(run_dir, data_dir, tmp_path):
  res = evaluate.evaluate(run_dir, data_dir, ["test"], str(tmp_path),
                          options=evaluate.Options(n_boot=20, folds=2, worst=50))
  rows = _rows(os.path.join(tmp_path, "test", evaluate.PREDICTIONS_CSV))
  with open(tmp_path / evaluate.REPORT_MD) as f:
    text = f.read()
  assert "### Split `test`: 9 largest of 9 labelled studies" in text
  expected = _largest_by_csv(rows, 50)
  assert len(expected) == 9
  assert [cells[1] for cells in _largest_errors_table(text, "test")] == [f"`{s}`"
                                                                         for s in expected]
  assert len(os.listdir(tmp_path / "worst")) == 9


def test_largest_error_ranking_skips_unlabelled_studies_and_keeps_ties_in_order():
  truth = np.array([50.0, np.nan, 40.0, 60.0, 45.0])
  pred = np.array([55.0, 10.0, 30.0, 60.0, 40.0])
  np.testing.assert_array_equal(largest_errors.ranking(truth, pred, 3), [2, 0, 4])
  np.testing.assert_array_equal(largest_errors.ranking(truth, pred, 10), [2, 0, 4, 3])
  assert largest_errors.ranking(truth[[1]], pred[[1]], 5).size == 0


def test_missing_and_empty_splits_and_bad_options_give_clear_errors(run_dir, data_dir,
                                                                     tmp_path):
  with pytest.raises(ValueError, match=r"split 'tset' is not in .* \(it has \['test', "):
    evaluate.evaluate(run_dir, data_dir, ["test", "tset"], str(tmp_path))
  empty = str(tmp_path / "data")
  shutil.copytree(data_dir, empty)
  info = records.read_dataset_info(empty)
  info["splits"]["empty"] = {"files": [], "shard_lengths": []}
  with open(os.path.join(empty, "dataset_info.json"), "w") as f:
    json.dump(info, f)
  with open(os.path.join(empty, "empty.index.json"), "w") as f:
    json.dump([], f)
  with pytest.raises(ValueError, match="split 'empty' of .* holds no study"):
    evaluate.evaluate(run_dir, empty, ["empty"], str(tmp_path))
  with pytest.raises(ValueError, match="unknown checkpoint 'last'"):
    evaluate.evaluate(run_dir, data_dir, ["test"], str(tmp_path), which="last")
  with pytest.raises(FileNotFoundError, match="run directory .*nowhere not found"):
    evaluate.evaluate(str(tmp_path / "nowhere"), data_dir, ["test"], str(tmp_path))
  with pytest.raises(ValueError, match="tta must be at least 1"):
    evaluate.Options(tta=0)
  with pytest.raises(ValueError, match="worst must be 0 \\(none\\) or more, got -1"):
    evaluate.Options(worst=-1)


def test_mismatched_checkpoint_or_dataset_gives_clear_errors(run_dir, data_dir, tmp_path):
  bad_config = str(tmp_path / "config_run")
  shutil.copytree(run_dir, bad_config)
  with open(os.path.join(bad_config, "config.json")) as f:
    config = json.load(f)
  config["model"]["embed_dim"] = 24
  with open(os.path.join(bad_config, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"checkpoint in .*best does not match the run's "
                                       r"config.json \(.*video_proj.*model .*24"):
    evaluate.evaluate(bad_config, data_dir, ["test"], str(tmp_path / "a"))
  bad_data = str(tmp_path / "preprocess_run")
  shutil.copytree(run_dir, bad_data)
  with open(os.path.join(bad_data, runs.PREPROCESS_JSON)) as f:
    pre = json.load(f)
  pre["spacing_mm"] = 2.0
  with open(os.path.join(bad_data, runs.PREPROCESS_JSON), "w") as f:
    json.dump(pre, f)
  with pytest.raises(ValueError, match="preprocessed differently.*spacing_mm: 3.0 vs model 2.0"):
    evaluate.evaluate(bad_data, data_dir, ["test"], str(tmp_path / "b"))


def test_cli_writes_the_report_and_prints_headlines(run_dir, data_dir, tmp_path):
  cli = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), f"--workdir={run_dir}",
       f"--data_dir={data_dir}", "--split=test,unlabelled", f"--out={tmp_path}",
       "--bootstrap=50", "--which=checkpoints", "--worst=0"],
      capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
  assert cli.returncode == 0, cli.stderr[-3000:]
  with open(tmp_path / evaluate.METRICS_JSON) as f:
    res = json.load(f)
  assert res["checkpoint"] == "checkpoints" and res["step"] == 4
  mae = res["splits"]["test"]["metrics"]["mae"]
  assert f"- **test** (n=9): MAE {mae['value']:.2f} [{mae['ci'][0]:.2f}, " in cli.stdout
  assert "- **unlabelled**: 3 studies, no LVEF labels (predictions only)" in cli.stdout
  assert res["options"]["worst"] == 0 and "largest_errors" not in res["splits"]["test"]
  with open(tmp_path / evaluate.REPORT_MD) as f:
    assert "Largest errors" not in f.read()
  assert not os.path.exists(tmp_path / "worst")


def test_scoring_partly_labelled_split_with_ambiguous_visits_carries_on():
  p = {"study_index": np.arange(6), "lvef": np.array([50.0, 52.0, np.nan, 40.0, 62.0, np.nan]),
       "pred": np.array([55.0, 54.0, 45.0, 47.0, 58.0, 60.0]), "pred_sd": np.zeros(6)}
  meta = [{"subject_id": s, "visit": v}
          for s, v in (("a", 0), ("a", 1), ("b", 0), ("c", 0), ("d", 0), ("b", 1))]
  options = evaluate.Options(n_boot=20, folds=2)
  scored, corrected = evaluate.score_split(p, meta, options)
  assert (scored["n_studies"], scored["n_labelled"], scored["n_subjects"]) == (6, 4, 4)
  assert scored["metrics"]["mae"]["value"] == pytest.approx((5 + 2 + 7 + 4) / 4)
  assert np.isnan(corrected["shift"][[2, 5]]).all()
  assert np.isfinite(corrected["shift"][[0, 1, 3, 4]]).all()
  rep = scored["repeatability"]
  assert rep["n_pairs"] == 2 and rep["prediction"]["mean_abs_diff"] == pytest.approx(8.0)
  assert rep["reference"]["n_pairs"] == 1  # b's scans are unlabelled
  meta[1]["visit"] = 0  # a's two studies now claim the same visit
  scored, _ = evaluate.score_split(p, meta, options)
  assert "repeatability" not in scored
  assert scored["repeatability_skipped"] == (
      "subject a has visit numbers [0, 0]: a visit is repeated")
  scored.update(files={"predictions": "x/predictions.csv"}, tta={"passes": 1, "mean_pred_sd": 0.0})
  text = report.render({"workdir": "run", "checkpoint": "best", "step": 4, "data_dir": "data",
                        "options": {"tta": 1}, "bootstrap": "b", "splits": {"x": scored}})
  assert "2 unlabelled studies are predicted but not scored." in text
  assert "No scan-rescan repeatability: subject a has visit numbers [0, 0]" in text
