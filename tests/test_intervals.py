"""Split-conformal intervals: quantiles, coverage, the file, and the calibration split."""

import dataclasses
import json
import math

import numpy as np
import pytest

from cmr_jax.data import splits
from cmr_jax import intervals
from cmr_jax.phantom import synthetic


def test_conformal_quantile_is_the_ceil_n_plus_one_level_th_score():
  scores = np.arange(19, 0, -1, dtype=float)  # 19 .. 1, unsorted
  assert intervals.conformal_quantile(scores, 0.95) == 19.0  # ceil(20 * 0.95) = 19
  assert intervals.conformal_quantile(scores, 0.9) == 18.0  # ceil(18) = 18
  assert intervals.conformal_quantile(scores[:18], 0.95) == math.inf  # 19 > 18 scores
  with pytest.raises(ValueError, match="level"):
    intervals.conformal_quantile(scores, 1.0)


def _calibrate(truth, pred, loo_se, val_rmse=2.0):
  return intervals.calibrate(truth, pred, loo_se, val_rmse=val_rmse, split="calib", step=7, tta=4)


def test_coverage_on_exchangeable_studies_is_at_least_nominal_and_tight():
  rng = np.random.default_rng(0)
  n, trials = 40, 400
  covered = {0.9: [], 0.95: []}
  for _ in range(trials):
    truth = rng.uniform(20, 80, 2 * n)
    pred = truth + rng.standard_t(4, 2 * n) * 3.0  # heavy-tailed errors: no Gaussian assumption
    cal = _calibrate(truth[:n], pred[:n], None)
    assert list(cal.quantiles) == [intervals.ABSOLUTE]  # no spreads: absolute only
    cov = intervals.coverage(cal, truth[n:], pred[n:], None)[intervals.ABSOLUTE]
    for level in covered:
      covered[level].append(cov[f"{level:g}"]["coverage"])
  for level, values in covered.items():  # E[coverage] in [level, level + 1 / (n + 1)]
    assert level - 0.01 <= np.mean(values) <= level + 1 / (n + 1) + 0.01


def test_normalized_scores_adapt_the_width_to_the_studys_spread():
  rng = np.random.default_rng(1)
  n = 4000
  loo_se = rng.choice([0.0, 6.0], 2 * n)  # half the studies rest on single cines
  truth = rng.uniform(20, 80, 2 * n)
  pred = truth + rng.normal(size=2 * n) * np.sqrt(2.0 ** 2 + loo_se ** 2)
  cal = _calibrate(truth[:n], pred[:n], loo_se[:n])
  cov = lambda method, group: intervals.coverage(  # noqa: E731
      cal, truth[n:][group], pred[n:][group], loo_se[n:][group])[method]["0.95"]
  steady, shaky = loo_se[n:] == 0.0, loo_se[n:] > 0.0
  assert cov(intervals.NORMALIZED, steady)["coverage"] == pytest.approx(0.95, abs=0.015)
  assert cov(intervals.NORMALIZED, shaky)["coverage"] == pytest.approx(0.95, abs=0.015)
  assert cov(intervals.ABSOLUTE, steady)["coverage"] > 0.99  # one width for all: too wide here
  assert cov(intervals.ABSOLUTE, shaky)["coverage"] < 0.92  # and too narrow there
  assert (cov(intervals.NORMALIZED, steady)["mean_width"]
          < 0.5 * cov(intervals.ABSOLUTE, steady)["mean_width"])
  # The quantile of a Gaussian score: about 1.96; normalized is narrower here, so it is chosen.
  assert cal.quantiles[intervals.NORMALIZED]["0.95"] == pytest.approx(1.96, abs=0.1)
  assert cal.method == intervals.NORMALIZED
  assert cal.mean_width[intervals.NORMALIZED] < cal.mean_width[intervals.ABSOLUTE]
  # A spread that says nothing about the error only widens the normalized intervals.
  noise = rng.choice([0.0, 6.0], n)
  same = _calibrate(truth[:n], truth[:n] + rng.normal(size=n) * 3.0, noise)
  assert same.method == intervals.ABSOLUTE and same.method_for(True) == intervals.ABSOLUTE


def test_bounds_are_clipped_and_methods_chosen_by_spread():
  cal = _calibrate(np.full(30, 50.0), 50.0 + np.linspace(-3, 3, 30), np.full(30, 1.0))
  q = cal.quantiles[intervals.ABSOLUTE]["0.95"]
  assert cal.interval(1.0, 0.95, intervals.ABSOLUTE, None) == (0.0, 1.0 + q)
  assert cal.interval(99.5, 0.95, intervals.ABSOLUTE, None) == (99.5 - q, 100.0)
  qn = cal.quantiles[intervals.NORMALIZED]["0.95"]
  assert cal.interval(50.0, 0.95, intervals.NORMALIZED, 3.0) == pytest.approx(
      (50.0 - qn * math.sqrt(13.0), 50.0 + qn * math.sqrt(13.0)))
  assert cal.interval(50.0, 0.95, intervals.NORMALIZED, None) == pytest.approx(
      (50.0 - 2.0 * qn, 50.0 + 2.0 * qn))  # no spread: the scale is val_rmse
  chosen = dataclasses.replace(cal, method=intervals.NORMALIZED)
  assert chosen.method_for(True) == intervals.NORMALIZED and chosen.method_for(False) == "absolute"
  assert cal.belongs_to({"step": 7}) and not cal.belongs_to({"step": 8})
  with pytest.raises(KeyError):
    cal.interval(50.0, 0.8, intervals.ABSOLUTE, None)


def test_calibration_file_round_trip_and_bad_files(tmp_path):
  cal = _calibrate(np.arange(10.0), np.arange(10.0) + 1.0, np.full(10, 0.5))
  assert cal.quantiles[intervals.ABSOLUTE]["0.95"] == math.inf  # 10 studies: no 95% quantile
  assert intervals.read(str(tmp_path)) is None
  intervals.write(cal, str(tmp_path))
  with open(tmp_path / intervals.CALIBRATION_JSON) as f:
    assert json.load(f)["quantiles"]["absolute"]["0.95"] is None  # strict JSON: no Infinity
  assert intervals.read(str(tmp_path)) == cal
  (tmp_path / intervals.CALIBRATION_JSON).write_text("{\"quantiles\": 3}")
  with pytest.raises(ValueError, match="calibration.json is not a calibration file"):
    intervals.read(str(tmp_path))
  with pytest.raises(ValueError, match="no labelled study"):
    _calibrate(np.zeros(0), np.zeros(0), None)
  with pytest.raises(ValueError, match="finite"):
    _calibrate(np.array([1.0, np.nan]), np.array([1.0, 2.0]), None)


def test_calibration_subjects_form_their_own_split_and_move_nobody_else():
  base = synthetic.SyntheticSpec(num_subjects=60, num_external=10, num_archive=20)
  more = dataclasses.replace(base, num_calib=15)
  assert more.plan()[:len(base.plan())] == base.plan()
  old, new = base.splitter(), more.splitter()
  for index, _ in base.plan():
    sid = synthetic.subject_id(0, index)
    assert new.split_of_subject(sid) == old.split_of_subject(sid)
  calib = [synthetic.subject_id(0, i) for i, _ in more.plan()[len(base.plan()):]]
  assert {new.split_of_subject(s) for s in calib} == {splits.CALIB}
  assert {site for _, site in more.plan()[len(base.plan()):]} == set(base.sites)
  assert splits.CALIB not in {old.split_of_subject(synthetic.subject_id(0, i))
                              for i, _ in base.plan()}
  with pytest.raises(ValueError, match="both calibration and archive"):
    splits.SubjectSplitter(archive_subjects=frozenset({"a"}), calib_subjects=frozenset({"a"}))
