"""Zero-shot video <-> report retrieval: known answers, a real checkpoint, the CLI, bad input."""

import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax import inference
from cmr_jax.eval import zero_shot

import conftest
import sweep_testlib


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return sweep_testlib.tiny_pretrain(str(tmp_path_factory.getbasetemp() / "tiny_pretrain"))


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_identical_embeddings_retrieve_perfectly():
  emb = _unit(np.random.default_rng(0).normal(size=(12, 8)))
  result = zero_shot.retrieval_metrics(emb, emb.copy())
  assert result["n"] == 12
  for direction in zero_shot.DIRECTIONS:
    assert result[direction] == {"recall_at_1": 1.0, "recall_at_5": 1.0, "recall_at_10": 1.0,
                                 "median_rank": 1.0}
  assert result["chance"] == {"recall_at_1": 1 / 12, "recall_at_5": 5 / 12,
                              "recall_at_10": 10 / 12, "median_rank": 6.5}


def test_each_true_partner_second_ranks_two_in_both_directions():
  # Video i is e_i, its report e_(i+1): report i-1 beats the own one, every other scores 0.
  video = np.eye(12)
  text = np.roll(video, 1, axis=1)
  result = zero_shot.retrieval_metrics(video, text)
  for direction in zero_shot.DIRECTIONS:
    assert result[direction] == {"recall_at_1": 0.0, "recall_at_5": 1.0, "recall_at_10": 1.0,
                                 "median_rank": 2.0}


def test_recall_and_median_rank_match_a_brute_force_count():
  rng = np.random.default_rng(1)
  video, text = _unit(rng.normal(size=(30, 4))), _unit(rng.normal(size=(30, 4)))
  result = zero_shot.retrieval_metrics(video, text)
  for direction, (q, t) in zip(zero_shot.DIRECTIONS, ((video, text), (text, video))):
    ranks = [1 + sum(q[i] @ t[j] > q[i] @ t[i] for j in range(30)) for i in range(30)]
    for k in zero_shot.KS:
      assert result[direction][f"recall_at_{k}"] == pytest.approx(np.mean(np.array(ranks) <= k))
    assert result[direction]["median_rank"] == np.median(ranks)


def test_unpaired_embeddings_are_refused():
  with pytest.raises(ValueError, match="paired"):
    zero_shot.retrieval_metrics(np.zeros((3, 4)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="N > 0"):
    zero_shot.retrieval_metrics(np.zeros((0, 4)), np.zeros((0, 4)))


def _logged(workdir: str, key: str, step: int) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r[key] for r in rows if r["step"] == step and key in r][-1]


def test_checkpoint_recall_equals_the_training_time_evaluation_and_cli_writes_json(tiny,
                                                                                   tmp_path):
  data_dir, pretrain_dir = tiny
  result = zero_shot.evaluate(pretrain_dir, split="val")
  assert result["step"] == 6 and result["split"] == "val" and result["data_dir"] == data_dir
  assert result["n"] == len(records.load_index(data_dir, "val"))
  # Pre-training evaluated video -> report retrieval on val at step 6 with the same clips.
  for k in (1, 5):
    assert result["video_to_report"][f"recall_at_{k}"] == pytest.approx(
        _logged(pretrain_dir, f"zero_shot_recall_at_{k}", 6))
  for direction in zero_shot.DIRECTIONS:
    r = result[direction]
    assert 0 <= r["recall_at_1"] <= r["recall_at_5"] <= r["recall_at_10"] == 1.0  # N <= 10
    assert 1 <= r["median_rank"] <= result["n"]
  table = zero_shot.table(result)
  assert table.splitlines()[0] == "| direction | R@1 | R@5 | R@10 | median rank |"
  assert "| video to report |" in table and "| chance |" in table

  out = str(tmp_path / "zs.json")
  cli = subprocess.run(
      [sys.executable, os.path.join(sweep_testlib.ROOT, "tools", "zero_shot.py"),
       f"--workdir={pretrain_dir}", "--step=4", "--split=test", f"--output={out}"],
      env=dict(os.environ, PYTHONPATH=sweep_testlib.ROOT), capture_output=True, text=True,
      timeout=300, check=False)
  assert cli.returncode == 0, cli.stderr[-2000:]
  assert "| report to video |" in cli.stdout
  with open(out) as f:
    written = json.load(f)
  assert written["step"] == 4 and written["n"] == sweep_testlib.NUM_TEST
  assert set(written) >= {"video_to_report", "report_to_video", "chance"}


def _copy_run(src: str, dst: str, **model_changes) -> str:
  shutil.copytree(src, dst)
  with open(os.path.join(dst, "config.json")) as f:
    config = json.load(f)
  config["model"].update(model_changes)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  return dst


def test_bad_inputs_give_clear_errors(tiny, tmp_path):
  data_dir, pretrain_dir = tiny
  with pytest.raises(FileNotFoundError,
                     match=r"no checkpoint of step 5 .* keeps steps \[2, 4, 6\]"):
    zero_shot.evaluate(pretrain_dir, step=5, split="val")
  with pytest.raises(KeyError, match="split 'nope' not in"):
    zero_shot.evaluate(pretrain_dir, split="nope")
  mismatched = _copy_run(pretrain_dir, str(tmp_path / "mismatched"), embed_dim=24)
  with pytest.raises(ValueError, match="step-6 checkpoint .* does not match its config.json"):
    zero_shot.evaluate(mismatched, split="val")
  video_video = _copy_run(pretrain_dir, str(tmp_path / "video_video"), two_clips=True)
  with pytest.raises(ValueError, match="no report encoder"):
    zero_shot.evaluate(video_video, split="val")
  no_reports = str(tmp_path / "no_reports")
  records.build_dataset(
      [("fake-0", functools.partial(conftest.fake_study, 0, 0, num_sax=2, matrix=48,
                                    with_report=False))],
      no_reports, cfg=preprocess.PreprocessConfig(size=32, spacing_mm=3.0, num_frames=8),
      split_fn=lambda record: "test")
  with pytest.raises(ValueError, match="split 'test' of .* has no study with a report"):
    zero_shot.evaluate(pretrain_dir, data_dir=no_reports, split="test")


def test_retrieval_ranks_in_blocks_equal_the_full_similarity_matrix():
  rng = np.random.default_rng(0)
  query = rng.integers(-3, 4, (37, 5)).astype(np.float32)  # small integers: exact dot products,
  target = rng.integers(-3, 4, (37, 5)).astype(np.float32)  # many exact ties
  sims = query @ target.T
  expected = (sims > np.diag(sims)[:, None]).sum(axis=1)
  for block in (1, 7, 36, 37, 4096):
    np.testing.assert_array_equal(
        inference.retrieval_ranks(query, target, block_rows=block), expected)
  # One process: sharing the work changes nothing; a known answer.
  np.testing.assert_array_equal(
      inference.retrieval_ranks(query, target, across_processes=True), expected)
  eye = np.eye(3, dtype=np.float32)
  assert list(inference.retrieval_ranks(eye, eye[[0, 2, 1]], block_rows=2)) == [0, 1, 1]
  assert inference.retrieval_ranks(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0,)
