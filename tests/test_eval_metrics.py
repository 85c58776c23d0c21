"""Evaluation metrics against hand-computed fixtures and scikit-learn/scipy: agreement,
detection, subject bootstrap, cross-fitted bias correction, scan-rescan repeatability and ICC,
report tables."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from cmr_jax.eval import calibration
from cmr_jax.eval import metrics
from cmr_jax.eval import repeatability
from cmr_jax.eval import report

# Hand fixture: errors (pred - truth) = [2, -2, 5, 0, -6].
TRUTH = np.array([30.0, 40.0, 50.0, 60.0, 45.0])
PRED = np.array([32.0, 38.0, 55.0, 60.0, 39.0])

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges, with their published ICCs.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9],
                          [6, 2, 4, 7]], float)
SHROUT_FLEISS_ICC = {"1,1": 0.17, "2,1": 0.29, "3,1": 0.71}


def _random_case(n: int = 60, seed: int = 0):
  rng = np.random.default_rng(seed)
  truth = rng.uniform(15, 75, n)
  pred = np.round(truth + rng.normal(2, 8, n))  # rounded: tied scores for the AUC
  subjects = [f"s{i // 2 if i < 20 else i}" for i in range(n)]  # 10 subjects with a rescan
  return truth, pred, subjects


def test_point_metrics_match_hand_computed_fixture():
  m = metrics.point_metrics(TRUTH, PRED)
  err = np.array([2.0, -2.0, 5.0, 0.0, -6.0])
  sd = math.sqrt(np.sum((err + 0.2) ** 2) / 4)  # bias -1/5
  assert m["n"] == 5
  assert m["mae"] == pytest.approx(15 / 5)
  assert m["bias"] == pytest.approx(-0.2)
  assert m["rmse"] == pytest.approx(math.sqrt(69 / 5))
  assert m["abs_error_sd"] == pytest.approx(np.std([2, 2, 5, 0, 6], ddof=1))
  assert m["loa_low"] == pytest.approx(-0.2 - 1.96 * sd)
  assert m["loa_high"] == pytest.approx(-0.2 + 1.96 * sd)
  assert m["r2"] == pytest.approx(1 - 69 / 500)  # SS_tot about the mean 45
  # < 40: positive {30}; called (pred < 40) {30, 40, 45}: sensitivity 1, specificity 2/4.
  assert m["auc_lvef_below_40"] == pytest.approx(1.0)
  assert m["sensitivity_lvef_below_40"] == 1.0
  assert m["specificity_lvef_below_40"] == pytest.approx(2 / 4)
  assert m["n_lvef_below_40"] == 1
  # < 50: positives {30, 40, 45} scored 32, 38, 39 vs negatives 55, 60: AUC 1; all called right.
  assert m["auc_lvef_below_50"] == 1.0
  assert m["sensitivity_lvef_below_50"] == m["specificity_lvef_below_50"] == 1.0


def test_point_metrics_match_scipy_and_sklearn():
  truth, pred, _ = _random_case()
  m = metrics.point_metrics(truth, pred)
  assert m["pearson_r"] == pytest.approx(stats.pearsonr(truth, pred).statistic)
  assert m["r2"] == pytest.approx(skm.r2_score(truth, pred))
  assert m["mae"] == pytest.approx(skm.mean_absolute_error(truth, pred))
  assert m["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(truth, pred)))
  for threshold in (40, 50):
    positive, called = truth < threshold, pred < threshold
    tn, fp, fn, tp = skm.confusion_matrix(positive, called).ravel()
    assert m[f"auc_lvef_below_{threshold}"] == pytest.approx(skm.roc_auc_score(positive, -pred))
    assert m[f"sensitivity_lvef_below_{threshold}"] == pytest.approx(tp / (tp + fn))
    assert m[f"specificity_lvef_below_{threshold}"] == pytest.approx(tn / (tn + fp))


def test_summary_keeps_the_demo_keys():
  s = metrics.summary(TRUTH, PRED)
  assert s["mae"] == metrics.mae(TRUTH, PRED) == pytest.approx(3.0)
  assert s["auc_lvef_below_40"] == metrics.auc_below(TRUTH, PRED)
  assert {"n", "abs_error_sd", "bias", "pearson_r"} <= set(s)


def test_undefined_metrics_are_nan():
  m = metrics.point_metrics(np.array([60.0, 70.0]), np.array([55.0, 55.0]))
  assert math.isnan(m["auc_lvef_below_40"]) and math.isnan(m["sensitivity_lvef_below_40"])
  assert math.isnan(m["pearson_r"])  # constant prediction
  assert m["specificity_lvef_below_40"] == 1.0


def test_weighted_metrics_equal_metrics_of_repeated_samples():
  truth, pred, subjects = _random_case(30)
  weights = metrics.bootstrap_weights(subjects, 25, seed=3)  # [25, 30]
  batched = metrics.weighted_point_metrics(truth, pred, weights)
  for b in range(weights.shape[0]):
    one = metrics.point_metrics(np.repeat(truth, weights[b]), np.repeat(pred, weights[b]))
    for key, value in one.items():
      np.testing.assert_allclose(batched[key][b], value, rtol=1e-9, atol=1e-12, err_msg=key)


def test_bootstrap_resamples_subjects_not_studies():
  _, _, subjects = _random_case()
  weights = metrics.bootstrap_weights(subjects, 200, seed=0)
  # A subject's two studies always enter together, and the draw count is the subject count.
  np.testing.assert_array_equal(weights[:, 0], weights[:, 1])
  np.testing.assert_array_equal(weights[:, 18], weights[:, 19])
  assert np.all(weights[:, ::2][:, :10].sum(axis=1) + weights[:, 20:].sum(axis=1) == 50)
  assert not np.array_equal(weights[:, 0], weights[:, 2])


def test_bootstrap_ci_is_seeded_and_matches_normal_theory_for_the_bias():
  rng = np.random.default_rng(1)
  truth = rng.uniform(20, 70, 400)
  pred = truth + rng.normal(1.0, 6.0, 400)
  subjects = [f"s{i}" for i in range(400)]
  ci = metrics.bootstrap_ci(truth, pred, subjects, n_boot=2000, seed=7)
  assert ci == metrics.bootstrap_ci(truth, pred, subjects, n_boot=2000, seed=7)
  assert ci != metrics.bootstrap_ci(truth, pred, subjects, n_boot=2000, seed=8)
  err = pred - truth
  half = 1.96 * np.std(err, ddof=1) / math.sqrt(err.size)
  low, high = ci["bias"]
  assert (high - low) / 2 == pytest.approx(half, rel=0.1)
  assert low < np.mean(err) < high
  assert "n" not in ci and "n_lvef_below_40" not in ci


def test_bootstrap_ci_is_nan_where_the_metric_is_mostly_undefined():
  truth = np.array([20.0] + [60.0] * 19)  # one reduced-EF subject: most resamples lack it
  pred = truth + 1.0
  ci = metrics.bootstrap_ci(truth, pred, [f"s{i}" for i in range(20)], n_boot=300)
  assert all(math.isnan(v) for v in ci["auc_lvef_below_40"])
  assert ci["mae"] == pytest.approx((1.0, 1.0))


def test_bootstrap_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match="one length"):
    metrics.bootstrap_ci(TRUTH, PRED, ["a", "b"])


def test_with_ci_pairs_values_and_intervals():
  truth, pred, subjects = _random_case()
  out = metrics.with_ci(truth, pred, subjects, n_boot=100)
  assert out["mae"]["value"] == pytest.approx(metrics.mae(truth, pred))
  assert out["mae"]["ci"][0] < out["mae"]["value"] < out["mae"]["ci"][1]
  assert out["n"] == {"value": 60, "ci": None}


def test_fit_shift_and_linear_recover_known_corrections():
  pred = np.array([30.0, 40.0, 50.0, 65.0])
  truth = 0.8 * pred + 12.0
  linear = calibration.fit(truth, pred, "linear")
  assert (linear.slope, linear.intercept, linear.n_fit) == pytest.approx((0.8, 12.0, 4))
  np.testing.assert_allclose(linear(pred), truth)
  shift = calibration.fit(truth, pred, "shift")
  assert (shift.slope, shift.intercept) == pytest.approx((1.0, np.mean(truth - pred)))
  flat = calibration.fit(truth, np.full(4, 50.0), "linear")  # undefined slope: the shift
  assert (flat.slope, flat.intercept) == pytest.approx((1.0, np.mean(truth) - 50.0))
  with pytest.raises(ValueError, match="unknown bias correction"):
    calibration.fit(truth, pred, "isotonic")
  with pytest.raises(ValueError, match="no study"):
    calibration.fit(np.zeros(0), np.zeros(0), "shift")


def test_cross_fit_never_scores_a_study_with_a_fit_that_saw_its_subject():
  truth, pred, subjects = _random_case(40, seed=2)
  folds = calibration.subject_folds(subjects, 4, seed=0)
  assert sorted(set(folds)) == [0, 1, 2, 3]
  for s in set(subjects):  # a subject's studies share a fold
    assert len({folds[i] for i in range(40) if subjects[i] == s}) == 1
  for method in calibration.METHODS:
    corrected, fits = calibration.cross_fit(truth, pred, subjects, method, folds=4, seed=0)
    assert len(fits) == 4
    for k, correction in enumerate(fits):
      held = folds == k
      refit = calibration.fit(truth[~held], pred[~held], method)
      np.testing.assert_allclose(corrected[held], refit(pred[held]))
    # Changing the labels of subject s0 (studies 0 and 1) cannot move their own corrections.
    moved = truth.copy()
    moved[:2] += 30.0
    again, _ = calibration.cross_fit(moved, pred, subjects, method, folds=4, seed=0)
    np.testing.assert_allclose(again[:2], corrected[:2])
    assert not np.allclose(again[2:], corrected[2:])


def test_cross_fit_removes_a_site_offset():
  rng = np.random.default_rng(4)
  truth = rng.uniform(20, 70, 80)
  pred = truth - 9.0 + rng.normal(0, 3, 80)  # a site whose predictions are 9 points low
  subjects = [f"s{i}" for i in range(80)]
  shifted, _ = calibration.cross_fit(truth, pred, subjects, "shift")
  assert metrics.mae(truth, pred) > 8
  assert metrics.mae(truth, shifted) < 3.5
  assert abs(np.mean(shifted - truth)) < 1.0


def test_subject_folds_need_two_subjects():
  with pytest.raises(ValueError, match="2 subjects"):
    calibration.subject_folds(["a", "a", "a"], 5)


def test_calibration_curve_bins_by_prediction():
  pred = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
  truth = np.array([12.0, 18.0, 33.0, 41.0, 45.0, 65.0])
  curve = calibration.calibration_curve(truth, pred, bins=3)
  np.testing.assert_allclose(curve["pred"], [15.0, 35.0, 55.0])
  np.testing.assert_allclose(curve["truth"], [15.0, 37.0, 55.0])
  np.testing.assert_array_equal(curve["count"], [2, 2, 2])


def test_icc_matches_shrout_fleiss_published_values():
  for form, expected in SHROUT_FLEISS_ICC.items():
    assert repeatability.icc(SHROUT_FLEISS, form) == pytest.approx(expected, abs=0.005)
  with pytest.raises(ValueError, match="unknown ICC form"):
    repeatability.icc(SHROUT_FLEISS, "1,k")
  with pytest.raises(ValueError, match="targets"):
    repeatability.icc(SHROUT_FLEISS[:1], "3,1")


def test_repeatability_matches_hand_computed_pairs():
  first, second = np.array([50.0, 60.0, 40.0]), np.array([52.0, 57.0, 40.0])  # d = 2, -3, 0
  r = repeatability.repeatability(first, second)
  sd = math.sqrt(((2 + 1 / 3) ** 2 + (-3 + 1 / 3) ** 2 + (1 / 3) ** 2) / 2)
  assert r["n_pairs"] == 3
  assert r["mean_abs_diff"] == pytest.approx(5 / 3)
  assert r["mean_diff"] == pytest.approx(-1 / 3)
  assert r["sd_diff"] == pytest.approx(sd)
  assert (r["loa_low"], r["loa_high"]) == pytest.approx((-1 / 3 - 1.96 * sd, -1 / 3 + 1.96 * sd))
  assert r["within_subject_sd"] == pytest.approx(math.sqrt(13 / 6))
  assert r["repeatability_coefficient"] == pytest.approx(1.96 * math.sqrt(2) * math.sqrt(13 / 6))
  # Two-way ANOVA by hand: MSR = 1039/6, MSC = 1/6, MSE = 19/6 (n = 3 subjects, k = 2 scans).
  assert r["icc_3_1"] == pytest.approx(1020 / 1058)
  assert r["icc_2_1"] == pytest.approx(1020 / 1046)


def test_rescan_pairs_pair_the_two_lowest_visits_of_each_subject():
  subjects = ["a", "b", "a", "c", "b", "b"]
  visits = [0, 1, 1, 0, 0, 2]
  np.testing.assert_array_equal(repeatability.rescan_pairs(subjects, visits), [[0, 2], [4, 1]])
  assert repeatability.rescan_pairs(["a", "b"], [0, 0]).shape == (0, 2)
  with pytest.raises(ValueError, match="subject a"):
    repeatability.rescan_pairs(["a", "a"], [1, 1])


def test_data_efficiency_table_lists_fractions_in_order_with_intervals():
  def m(mae, low, high):
    return {"mae": {"value": mae, "ci": [low, high]}, "n": {"value": 50, "ci": None}}

  results = {"pretrained": {1.0: m(4.0, 3.5, 4.6), 0.1: m(6.25, 5.0, 7.5)},
             "scratch": {0.1: m(9.0, 8.0, 10.0), 1.0: m(5.0, 4.4, 5.7)}}
  table = report.data_efficiency_table(results, "mae")
  assert table.splitlines() == [
      "| label fraction | pretrained | scratch |",
      "|---|---|---|",
      "| 10% | 6.25 [5.00, 7.50] | 9.00 [8.00, 10.00] |",
      "| 100% | 4.00 [3.50, 4.60] | 5.00 [4.40, 5.70] |",
  ]
  partial = report.data_efficiency_table({"a": {0.01: m(8.0, 7.0, 9.0)}, "b": {}}, "mae")
  assert partial.splitlines()[2] == "| 1% | 8.00 [7.00, 9.00] | - |"
