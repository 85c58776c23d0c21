"""Tests of the synthetic cine-CMR phantom: volumes, labels, determinism, geometry and confounds.

Run with `-s` to see the measured figures (volume errors, EF histogram, brightness-EF r).
"""

import dataclasses
import functools
import math
import pickle

import numpy as np
import pytest
from scipy import ndimage

from cmr_jax.data import types
from cmr_jax.eval import preview
from cmr_jax.phantom import heart_geometry
from cmr_jax.phantom import heart_params
from cmr_jax.phantom import scanner
from cmr_jax.phantom import simulator

SEED = 0
SITE = "ukbb_like"


def _heart(rwma: bool) -> simulator.Heart:
  """The first subject of SEED with (or without) a regional wall-motion abnormality."""
  for index in range(500):
    heart = simulator.subject_heart(SEED, index)
    if bool(heart.rwma_territory) == rwma and (not rwma or heart.rwma_severity > 0.5):
      return heart
  raise AssertionError("no such heart in 500 subjects")


def _clean_protocol() -> simulator.Protocol:
  """The fast ukbb_like protocol without noise or breath-hold offsets."""
  return dataclasses.replace(simulator.fast_protocol(simulator.SITES[SITE]), noise=0.0,
                             misregistration_mm=0.0)


@pytest.fixture(scope="module")
def study() -> types.Study:
  return simulator.synthetic_study(SEED, 3, site=SITE)


@pytest.fixture(scope="module")
def clean_study() -> types.Study:
  heart = _heart(rwma=False)
  return simulator.simulate_study(heart, _clean_protocol(), np.random.default_rng(5),
                                study_id="clean", subject_id="clean")


@pytest.mark.parametrize("rwma", [False, True])
def test_voxel_volume_matches_closed_form(rwma):
  heart = _heart(rwma)
  phases = np.arange(5) / 5
  numeric = simulator.cavity_volumes_ml(heart, num_phases=5)
  analytic = np.array([simulator.analytic_cavity_volume_ml(heart, p) for p in phases])
  error = np.abs(numeric / analytic - 1.0)
  print(f"\nvolume error vs closed form (rwma={rwma}): max {100 * error.max():.3f}% over "
        f"{analytic.round(1)} mL")
  assert error.max() < 0.01
  assert analytic.max() / analytic.min() > 1.2  # the curve really moves


def test_rwma_volume_against_fine_grid():
  heart = _heart(rwma=True)
  model = heart_geometry.model_of(heart)
  states = np.array([1.0, heart.es_state])
  coarse = model.voxel_volumes_mm3(states, 1.25)["lv_cavity"]
  fine = model.voxel_volumes_mm3(states, 0.6)["lv_cavity"]
  analytic = model.cavity_volume_mm3(states)
  print(f"\nRWMA ({heart.rwma_territory}, severity {heart.rwma_severity:.2f}): coarse/fine - 1 = "
        f"{100 * (coarse / fine - 1).round(4)}%, fine/closed form - 1 = "
        f"{100 * (fine / analytic - 1).round(4)}%")
  np.testing.assert_allclose(coarse, fine, rtol=0.005)
  np.testing.assert_allclose(fine, analytic, rtol=0.005)


def test_rwma_territory_moves_less():
  heart = _heart(rwma=True)
  model = heart_geometry.model_of(heart)
  angle = math.radians(heart.rwma_angle_deg)
  ed, es = model.state(np.array([1.0])), model.state(np.array([heart.es_state]))

  def radius(state, theta):  # endocardial radius at mid-cavity along direction theta
    r = np.linspace(0.0, 60.0, 6001, dtype=np.float32)
    points = model.points(r * math.cos(theta), r * math.sin(theta),
                          np.full_like(r, float(state.zc[0, 0])))
    return r[np.argmax(model.lv_cavity_distance(state, points)[0] > 0)]

  motion = lambda theta: radius(ed, theta) - radius(es, theta)
  assert motion(angle) < 0.7 * motion(angle + math.pi)


@pytest.mark.parametrize("atrial_follow", [1.0, 0.3])
def test_band_shortcut_paints_like_full_evaluation(atrial_follow):
  heart = dataclasses.replace(_heart(rwma=True), atrial_follow=atrial_follow)
  model = heart_geometry.model_of(heart)
  lo = np.min([layer.box_lo for layer in model.layers], axis=0) - 5.0
  hi = np.max([layer.box_hi for layer in model.layers], axis=0) + 5.0
  points = model.points(*np.random.default_rng(0).uniform(lo, hi, (30000, 3)).T)
  states = model.state(model.volume_state(np.arange(16) / 16))
  signals = dataclasses.asdict(simulator.Contrast())
  full, banded = np.zeros((2, 16, 30000), np.float32)
  scanner.paint(model.layers, points, full, signals, 2.0, states)
  scanner.paint(model.layers, points, banded, signals, 2.0, states, model.extremes)
  assert np.ptp(full) > 0.5
  np.testing.assert_allclose(banded, full, atol=1e-5)


def test_atria_left_behind_by_the_descending_base():
  heart = simulator.subject_heart(SEED, 1)
  inside_at = {}
  for follow in (1.0, 0.0):
    model = heart_geometry.model_of(dataclasses.replace(heart, atrial_follow=follow))
    la = next(layer for layer in model.layers if layer.name == "la")
    ed, es = (float(model.extremes.zb[k, 0]) for k in range(2))
    assert ed - es > 3.0  # the base descends
    # On the LA's axis: just above the end-systolic and the end-diastolic base planes.
    x, y = -0.1 * model.r_ed, -0.25 * model.r_ed
    points = model.points(np.array([x, x]), np.array([y, y]), np.array([es + 1.0, ed + 1.0]))
    inside_at[follow] = la.distance(model.extremes, points) < 0  # [ED/ES, point]
  # At end-diastole the two agree; at end-systole an atrium on the base plane fills the space
  # the base left, one left behind does not (tissue fills it), and both still sit above the ED
  # base plane.
  np.testing.assert_array_equal(inside_at[1.0][0], inside_at[0.0][0])
  assert inside_at[1.0][1].tolist() == [True, True]
  assert inside_at[0.0][1].tolist() == [False, True]
  # The default, and what sample_heart draws last (every other parameter as before it).
  assert heart_params.Heart.__dataclass_fields__["atrial_follow"].default == 1.0
  assert 0.0 <= heart.atrial_follow <= 1.0


def test_myocardial_volume_conserved():
  heart = simulator.subject_heart(SEED, 1)
  model = heart_geometry.model_of(heart)
  states = np.linspace(heart.es_state, 1.0, 5)
  myo = model.voxel_volumes_mm3(states, 1.25, ("lv_myocardium",))["lv_myocardium"]
  cavity = model.cavity_volume_mm3(states)
  print(f"\nmyocardial volume over the cycle: {(myo * heart_params.ML_PER_MM3).round(1)} mL")
  assert myo.max() / myo.min() - 1.0 < 0.02
  assert cavity.max() / cavity.min() > 1.5  # while the cavity changes a lot


def test_study_labels(study):
  assert study.lvef == pytest.approx(100.0 * (study.edv - study.esv) / study.edv)
  assert 10.0 <= study.lvef <= 85.0
  heart = simulator.subject_heart(SEED, 3)
  assert study.lvef == pytest.approx(simulator.analytic_lvef(heart), abs=1.0)
  model = heart_geometry.model_of(heart)
  assert study.edv == pytest.approx(model.cavity_volume_mm3(np.array([1.0]))[0] / 1000, rel=0.01)
  assert study.subject_id == f"syn-{SEED}-000003"
  assert study.study_id == f"syn-{SEED}-000003-v0"
  assert study.site == SITE and study.report


def test_ef_distribution():
  ef = np.array([simulator.analytic_lvef(simulator.subject_heart(SEED, i)) for i in range(400)])
  counts, edges = np.histogram(ef, bins=np.arange(0, 101, 10))
  print("\nLVEF histogram (400 hearts):",
        {f"{int(a)}-{int(b)}": int(c) for a, b, c in zip(edges, edges[1:], counts) if c})
  below_40 = np.mean(ef < 40)
  print(f"fraction below 40%: {below_40:.3f}")
  assert ef.min() < 20 and ef.max() > 70
  assert ef.min() >= 9.5 and ef.max() <= 80.5
  assert 0.15 <= below_40 <= 0.25


def test_population_varies():
  hearts = [simulator.subject_heart(SEED, i) for i in range(200)]
  edv = np.array([heart_geometry.model_of(h).cavity_volume_mm3(np.array([1.0]))[0] for h in hearts])
  walls = np.array([h.wall_thickness_mm for h in hearts])
  rates = np.array([h.heart_rate_bpm for h in hearts])
  azimuth = np.array([h.apex_azimuth_deg for h in hearts])
  assert np.percentile(edv, 95) / np.percentile(edv, 5) > 1.8
  assert np.mean(walls >= 12.0) > 0.05 and walls.min() < 8.0
  assert rates.max() - rates.min() > 30.0 and azimuth.max() - azimuth.min() > 15.0
  assert {h.rwma_territory for h in hearts} == {"", "LAD", "RCA", "LCx"}


def _arrays(study: types.Study) -> list[np.ndarray]:
  return [c.frames for c in study.cines] + [c.image_position for c in study.cines]


def test_deterministic_from_seed(study):
  again = simulator.synthetic_study(SEED, 3, site=SITE)
  assert again.report == study.report and again.lvef == study.lvef
  for a, b in zip(_arrays(again), _arrays(study), strict=True):
    np.testing.assert_array_equal(a, b)
  other = simulator.synthetic_study(SEED + 1, 3, site=SITE)
  assert other.lvef != study.lvef
  assert not np.array_equal(other.cines[0].frames, study.cines[0].frames)


def test_rescan_same_heart_new_acquisition(study):
  rescan = simulator.synthetic_study(SEED, 3, site=SITE, visit=1)
  assert rescan.subject_id == study.subject_id and rescan.study_id.endswith("-v1")
  assert rescan.visit == 1
  assert (rescan.lvef, rescan.edv, rescan.esv) == (study.lvef, study.edv, study.esv)
  assert rescan.heart_rate_bpm != study.heart_rate_bpm
  assert abs(rescan.heart_rate_bpm / study.heart_rate_bpm - 1.0) < 0.2
  assert not np.array_equal(rescan.cines[-1].frames, study.cines[-1].frames)
  assert not np.allclose(rescan.cines[-1].image_position, study.cines[-1].image_position)


def test_sites_share_subjects_but_not_protocols():
  a = simulator.synthetic_study(SEED, 4, site="kaggle_like", frames=8, matrix=64)
  b = simulator.synthetic_study(SEED, 4, site="siteC", frames=8, matrix=64)
  assert (a.lvef, a.edv) == (b.lvef, b.edv)
  assert a.site == "kaggle_like" and b.site == "siteC"
  assert all(c.frames.shape == (8, 64, 64) for c in a.cines + b.cines)
  assert {c.series_description for c in b.cines} >= {"FIESTA CINE 4CH", "FIESTA CINE SAX 1"}
  assert a.cines[0].slice_thickness_mm != b.cines[0].slice_thickness_mm


def test_fast_protocol_scales_the_field_of_view():
  spacings = set()
  for name, site in simulator.SITES.items():
    fast = simulator.fast_protocol(site)
    assert fast.name == name and fast.matrix == (112, 112) and fast.frames_per_cycle == 16
    fov = 112 * fast.pixel_spacing_mm
    assert fov == pytest.approx(0.6 * max(site.matrix) * site.pixel_spacing_mm)
    assert 170.0 < fov < 240.0
    spacings.add(round(fast.pixel_spacing_mm, 2))
    whole = simulator.fast_protocol(site, 8, 64, fov_fraction=1.0)
    assert 64 * whole.pixel_spacing_mm == pytest.approx(max(site.matrix) * site.pixel_spacing_mm)
  assert len(spacings) == len(simulator.SITES) >= 3
  assert simulator.SITES["ukbb_like"].frames_per_cycle == 50
  with pytest.raises(ValueError, match="fov_fraction"):
    simulator.fast_protocol(simulator.SITES[SITE], fov_fraction=0.0)


def test_cines_well_formed(study):
  views = [c.view for c in study.cines]
  sax = [c for c in study.cines if c.view == types.SAX]
  assert views == [types.SAX] * len(sax) + list(types.LONG_AXIS_VIEWS)
  assert 8 <= len(sax) <= 13
  for cine in study.cines:
    assert cine.frames.dtype == np.float32 and cine.frames.shape == (16, 112, 112)
    assert cine.frames.min() >= 0.0 and np.isfinite(cine.frames).all()
    times = cine.trigger_times_ms
    assert np.all(np.diff(times) > 0) and times[-1] < 60000.0 / study.heart_rate_bpm * 1.1
    row, col = cine.image_orientation[:3], cine.image_orientation[3:]
    np.testing.assert_allclose([row @ row, col @ col, row @ col], [1.0, 1.0, 0.0], atol=1e-9)


def test_sax_stack_ordered_along_normal(study):
  sax = [c for c in study.cines if c.view == types.SAX]
  assert [c.slice_index for c in sax] == list(range(len(sax)))
  normal = np.cross(sax[0].image_orientation[:3], sax[0].image_orientation[3:])
  positions = np.array([c.image_position @ normal for c in sax])
  np.testing.assert_allclose(positions, [c.slice_position_mm for c in sax], atol=1e-6)
  steps = np.diff(positions)
  assert np.all(steps < 0)  # the normal points to the base: positions fall towards the apex
  np.testing.assert_allclose(-steps, sax[0].slice_thickness_mm + 2.0, atol=1e-6)  # ukbb gap
  for cine in sax:
    np.testing.assert_allclose(cine.image_orientation, sax[0].image_orientation)


def _pixel(cine: types.Cine, point: np.ndarray) -> np.ndarray:
  """(row, col) of a patient-space point in a cine's image."""
  rel = point - cine.image_position
  return np.array([rel @ cine.image_orientation[3:] / cine.pixel_spacing[0],
                   rel @ cine.image_orientation[:3] / cine.pixel_spacing[1]])


def _plane_intersection(a: types.Cine, b: types.Cine) -> tuple[np.ndarray, np.ndarray]:
  """A point and unit direction of the line where two cines' planes meet."""
  na = np.cross(a.image_orientation[:3], a.image_orientation[3:])
  nb = np.cross(b.image_orientation[:3], b.image_orientation[3:])
  direction = np.cross(na, nb)
  matrix = np.stack([na, nb, direction])
  point = np.linalg.solve(matrix, [na @ a.image_position, nb @ b.image_position, 0.0])
  return point, direction / np.linalg.norm(direction)


def test_long_axis_crosses_mid_sax_in_the_lv_cavity(clean_study):
  by_view = {c.view: c for c in clean_study.cines}
  sax = [c for c in clean_study.cines if c.view == types.SAX]
  mid = sax[len(sax) // 2]
  point, direction = _plane_intersection(by_view[types.LAX_2CH], by_view[types.LAX_4CH])
  normal = np.cross(mid.image_orientation[:3], mid.image_orientation[3:])
  centre = point + direction * ((mid.image_position - point) @ normal) / (direction @ normal)
  row, col = _pixel(mid, centre)
  assert 10 < row < 102 and 10 < col < 102
  ed = mid.frames[0]
  blood = ed[int(round(row)) - 1:int(round(row)) + 2, int(round(col)) - 1:int(round(col)) + 2]
  assert blood.mean() > 2.0 * np.median(ed)


def test_sax_stack_runs_from_base_to_apex(clean_study):
  four = next(c for c in clean_study.cines if c.view == types.LAX_4CH)
  two = next(c for c in clean_study.cines if c.view == types.LAX_2CH)
  sax = [c for c in clean_study.cines if c.view == types.SAX]
  point, direction = _plane_intersection(two, four)  # the LV long axis

  def on_axis(cine):  # where the long axis crosses a SAX plane
    normal = np.cross(cine.image_orientation[:3], cine.image_orientation[3:])
    return point + direction * ((cine.image_position - point) @ normal) / (direction @ normal)

  rows = [_pixel(four, on_axis(c))[0] for c in sax]
  assert np.all(np.diff(rows) < 0)  # the 4CH shows the apex at the top: rows fall to the apex
  base_blood = sax[1].frames[0] > 0.5 * sax[1].frames[0].max()
  apex_blood = sax[-1].frames[0] > 0.5 * sax[1].frames[0].max()
  assert base_blood.sum() > 2 * apex_blood.sum()


@pytest.mark.parametrize("view", [types.LAX_2CH, types.LAX_3CH, types.LAX_4CH])
def test_lax_and_sax_agree_on_their_intersection(clean_study, view):
  lax = next(c for c in clean_study.cines if c.view == view)
  sax = [c for c in clean_study.cines if c.view == types.SAX]
  mid = sax[len(sax) // 2]
  point, direction = _plane_intersection(lax, mid)
  samples = point + np.arange(-150.0, 150.0, 1.0)[:, None] * direction
  rc_lax = np.array([_pixel(lax, p) for p in samples]).T
  rc_sax = np.array([_pixel(mid, p) for p in samples]).T
  inside = np.all((rc_lax > 0) & (rc_lax < 111) & (rc_sax > 0) & (rc_sax < 111), axis=0)
  assert inside.sum() > 40
  profile_lax = ndimage.map_coordinates(lax.frames[0], rc_lax[:, inside], order=1)
  profile_sax = ndimage.map_coordinates(mid.frames[0], rc_sax[:, inside], order=1)
  r = np.corrcoef(profile_lax, profile_sax)[0, 1]
  print(f"\n{view} x mid SAX intersection profile r = {r:.3f}")
  assert r > 0.85


def test_brightness_does_not_encode_ef():
  raw, normalised, ef = [], [], []
  for index in range(100):
    s = simulator.synthetic_study(SEED + 7, index, site=SITE, frames=8, matrix=64)
    ef.append(s.lvef)
    raw.append(np.mean([c.frames.mean() for c in s.cines]))
    per_cine = []
    for c in s.cines:
      lo, hi = np.percentile(c.frames, [1.0, 99.0])
      per_cine.append(np.clip((c.frames - lo) / (hi - lo), 0.0, 1.0).mean())
    normalised.append(np.mean(per_cine))
  r_raw = np.corrcoef(raw, ef)[0, 1]
  r_norm = np.corrcoef(normalised, ef)[0, 1]
  print(f"\nbrightness-LVEF correlation over 100 studies: raw r = {r_raw:.3f}, "
        f"percentile-normalised r = {r_norm:.3f}")
  assert abs(r_raw) < 0.2 and abs(r_norm) < 0.2
  assert np.std(ef) > 8.0


def test_preview_png_and_ed_es(clean_study, tmp_path):
  heart = _heart(rwma=False)
  model = heart_geometry.model_of(heart)
  frames = clean_study.cines[0].num_frames
  es_expected = model.end_systolic_phase(clean_study.heart_rate_bpm) * frames
  ed, es = preview.ed_es_frames(clean_study)
  assert min(ed, frames - ed) <= 1
  assert abs(es - es_expected) <= 1.5
  path = tmp_path / "preview.png"
  preview.save_preview_png(clean_study, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_missing_views_and_pickling():
  protocol = dataclasses.replace(simulator.fast_protocol(simulator.SITES["kaggle_like"], 8, 48),
                                 lax_missing_prob=0.99)
  heart = simulator.subject_heart(SEED, 2)
  s = simulator.simulate_study(heart, protocol, np.random.default_rng(0), study_id="a",
                             subject_id="b")
  assert {c.view for c in s.cines} == {types.SAX}
  make = pickle.loads(pickle.dumps(functools.partial(simulator.synthetic_study, SEED, 2,
                                                     site="siteD", frames=4, matrix=32)))
  assert pickle.loads(pickle.dumps(make())).lvef == s.lvef


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="nope"):
    simulator.synthetic_study(SEED, 0, site="nope")
  with pytest.raises(ValueError, match=">= 0"):
    simulator.synthetic_study(SEED, -1, site=SITE)
  with pytest.raises(ValueError, match="'broken'.*frames_per_cycle"):
    dataclasses.replace(simulator.SITES[SITE], name="broken", frames_per_cycle=1)
  with pytest.raises(ValueError, match="num_phases"):
    simulator.cavity_volumes_ml(simulator.subject_heart(SEED, 0), num_phases=0)
