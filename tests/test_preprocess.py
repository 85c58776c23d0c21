"""Preprocessing: known geometry, centring, temporal resampling, intensities and errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from cmr_jax.data import preprocess
from cmr_jax.data import types

CFG = preprocess.PreprocessConfig(size=64, spacing_mm=2.0, num_frames=16)


def _centroid(mask: np.ndarray) -> np.ndarray:
  return np.argwhere(mask).mean(axis=0)


@pytest.mark.parametrize("spacing", [1.3, 2.7])
def test_disk_radius_in_mm_is_preserved(spacing):
  rng = np.random.default_rng(0)
  radius_mm = 24.0
  shape = (int(180 / spacing), int(190 / spacing))
  cine = conftest.disk_cine(rng, view=types.LAX_4CH, shape=shape, spacing=(spacing, spacing),
                            center_rc=(shape[0] / 2, shape[1] / 2), radius_mm=radius_mm)
  out = preprocess.preprocess_cine(cine, CFG)
  # Frame 0 is end-diastole (the largest disk); half-way between body and blood levels.
  blood = out[0] > (out[0].max() + np.median(out[0])) / 2
  radius_px = math.sqrt(blood.sum() / math.pi)
  assert radius_px == pytest.approx(radius_mm / CFG.spacing_mm, abs=0.5)


def test_moving_dot_off_centre_is_centred():
  rng = np.random.default_rng(1)
  shape, spacing = (100, 120), (1.5, 1.5)
  dot = (30.0, 85.0)  # far from the image centre (49.5, 59.5)
  cine = conftest.disk_cine(rng, view=types.LAX_2CH, shape=shape, spacing=spacing,
                            center_rc=dot, radius_mm=10.0, ejection=0.5)
  cfg = preprocess.PreprocessConfig(size=48, spacing_mm=2.0, center="motion")
  out = preprocess.preprocess_cine(cine, cfg)
  blood = out[0] > 128
  np.testing.assert_allclose(_centroid(blood), [(cfg.size - 1) / 2] * 2, atol=1.0)

  out_image = preprocess.preprocess_cine(cine, dataclasses.replace(cfg, center="image"))
  expected = (np.array(dot) - [(s - 1) / 2 for s in shape]) * 1.5 / 2.0 + (cfg.size - 1) / 2
  np.testing.assert_allclose(_centroid(out_image[0] > 128), expected, atol=1.0)


def test_static_noise_falls_back_to_image_centre():
  rng = np.random.default_rng(2)
  frames = rng.normal(100, 10, (12, 40, 50)).astype(np.float32)
  assert preprocess.motion_center(frames, (2.0, 2.0), CFG) is None


def test_temporal_resampling_of_a_sinusoid_with_trigger_times():
  rr, num_in = 900.0, 37
  times = 15.0 + np.arange(num_in) * rr / num_in  # starts 15 ms after the R wave
  signal = np.sin(2 * np.pi * (times - times[0]) / rr)  # [T]
  weights = preprocess.cycle_matrix(num_in, 16, times)
  expected = np.sin(2 * np.pi * np.arange(16) / 16)
  np.testing.assert_allclose(weights @ signal, expected, atol=0.01)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


def test_temporal_resampling_without_trigger_times_takes_every_other_frame():
  frames = np.arange(32, dtype=np.float32)
  np.testing.assert_allclose(preprocess.cycle_matrix(32, 16, None) @ frames, frames[::2])
  # Trigger times that are not strictly increasing are ignored (frames taken as even).
  np.testing.assert_allclose(preprocess.cycle_matrix(32, 16, np.zeros(32)) @ frames, frames[::2])


def test_temporal_resampling_is_cyclic():
  # Upsampling 8 -> 16: the last output phase lies between the last frame and the first.
  weights = preprocess.cycle_matrix(8, 16, None)
  values = np.array([0, 1, 2, 3, 4, 5, 6, 7], np.float32)
  assert (weights @ values)[-1] == pytest.approx(3.5)


@pytest.mark.parametrize("n_in,n_out,scale,start", [(90, 40, 0.45, 1.3), (30, 64, 2.0, -4.0)])
def test_resample_matrix_matches_jax_image(n_in, n_out, scale, start):
  x = np.random.default_rng(3).random(n_in).astype(np.float32)
  ours = preprocess.resample_matrix(n_in, n_out, scale, start) @ x
  # jax: output pixel i samples input index (i + 0.5 - translation) / scale - 0.5.
  translation = 0.5 - scale * (start + 0.5)
  ref = jax.image.scale_and_translate(jnp.asarray(x), (n_out,), (0,), jnp.array([scale]),
                                      jnp.array([translation]), "linear", antialias=True)
  np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-5)


def test_output_dtype_shape_and_full_uint8_range(make_study):
  record = preprocess.preprocess_study(make_study(3), CFG)
  assert record.frames.dtype == np.uint8
  assert record.frames.shape == (9, CFG.num_frames, CFG.size, CFG.size)
  assert record.views == [types.SAX] * 6 + list(types.LONG_AXIS_VIEWS)
  np.testing.assert_array_equal(record.slice_index, [0, 1, 2, 3, 4, 5, -1, -1, -1])
  assert np.isnan(record.slice_position_mm[6:]).all()
  assert record.frames.max() >= 250  # resampling averages the brightest noise a little
  # Stored geometry equal to the acquired one (every other frame, same pixel grid): the pixels
  # above the high percentile reach 255 and the zero padding (a 128 mm field of view about a
  # 120 mm image) is 0.
  rng = np.random.default_rng(4)
  cine = conftest.disk_cine(rng, view=types.LAX_3CH, shape=(60, 60), spacing=(2.0, 2.0),
                            center_rc=(30, 30), radius_mm=20, num_frames=32)
  out = preprocess.preprocess_cine(cine, dataclasses.replace(CFG, center="image"))
  assert out.min() == 0 and out.max() == 255
  assert record.checksum == preprocess.pixel_checksum(record.frames)


def test_robust_to_hot_pixels_and_wide_uint16_range():
  rng = np.random.default_rng(5)
  cine = conftest.disk_cine(rng, view=types.LAX_4CH, shape=(80, 80), spacing=(1.8, 1.8),
                            center_rc=(40, 40), radius_mm=25, gain=30.0)
  clean = preprocess.preprocess_cine(cine, CFG)
  hot = cine.frames.copy()
  hot[:, :2, :2] = np.iinfo(np.uint16).max  # outside the 128 mm field of view
  cine.frames = hot
  assert np.abs(preprocess.preprocess_cine(cine, CFG).astype(int) - clean).max() <= 1


def test_sax_stack_shares_one_centre(make_study):
  study = make_study(6)
  sax = [c for c in study.cines if c.view == types.SAX]
  # Nothing moves in one slice: alone it would fall back to its image centre (the heart is off
  # centre); the shared centre keeps it registered with the others.
  sax[0].frames = np.repeat(sax[0].frames[:1], sax[0].num_frames, axis=0)
  record = preprocess.preprocess_study(study, CFG)
  centroids = [_centroid(record.frames[i, 0] > 128) for i in range(6)]
  np.testing.assert_allclose(centroids, [centroids[0]] * 6, atol=1.0)
  np.testing.assert_allclose(centroids[0], [(CFG.size - 1) / 2] * 2, atol=1.5)

  for cine in sax:  # without patient geometry: median of the offsets in mm, same answer
    cine.image_position = None
  again = preprocess.preprocess_study(study, CFG)
  assert np.abs(again.frames.astype(int) - record.frames).max() <= 1


def test_errors_name_the_study_and_series(make_study):
  study = make_study(7)
  study.cines[2].frames = study.cines[2].frames[:5]
  study.cines[7].frames = np.full_like(study.cines[7].frames, 9)
  skipped = []
  record = preprocess.preprocess_study(study, CFG, skipped)
  assert record.num_cines == 7
  assert any("fake-0-0007-v0" in s and "sax_2" in s and "5 frames" in s for s in skipped)
  assert any("constant intensity" in s and "3CH" in s for s in skipped)

  with pytest.raises(ValueError, match=r"series sax_2: 5 frames, fewer than the minimum 8"):
    preprocess.preprocess_cine(study.cines[2], CFG)
  with pytest.raises(ValueError, match=r"study broken-1: no usable cine.*4 frames"):
    preprocess.preprocess_study(conftest.broken_study(1), CFG)
  study.cines[0].pixel_spacing = (0.0, 1.0)
  with pytest.raises(ValueError, match="bad pixel spacing"):
    preprocess.preprocess_cine(study.cines[0], CFG)


def test_config_from_dict_round_trip():
  cfg = preprocess.PreprocessConfig(size=224, spacing_mm=1.5)
  assert preprocess.PreprocessConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown PreprocessConfig fields"):
    preprocess.PreprocessConfig.from_dict({"sise": 3})
  with pytest.raises(ValueError, match="center"):
    preprocess.PreprocessConfig(center="heart")
  with pytest.raises(ValueError, match="orientation"):
    preprocess.PreprocessConfig(orientation="radiological")


# --- Anatomical in-plane layout -------------------------------------------------------------

_SPACING = 1.5
_SHAPE = 96  # square cines, 144 mm


def _unit(v) -> np.ndarray:
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def _plane_cine(view: str, normal: np.ndarray, intensity, *, angle_deg: float = 0.0,
                mirror: bool = False, reference: np.ndarray = types.ANTERIOR_LPS,
                centre: np.ndarray = np.zeros(3), slice_index: int = -1) -> types.Cine:
  """A 12-frame cine of the plane through `centre` normal to `normal`, rendered from
  `intensity(points [T?, ..., 3], frame) -> values`, with the scanner's row direction turned by
  `angle_deg` in plane (and the column direction reversed when `mirror`)."""
  normal = _unit(normal)
  up = _unit(reference - (reference @ normal) * normal)
  base_row = np.cross(normal, up)  # any in-plane basis; the angle turns it
  angle = math.radians(angle_deg)
  col_dir = math.cos(angle) * base_row + math.sin(angle) * up  # increasing column index
  row_dir = np.cross(normal, col_dir)  # increasing row index: col x row = normal
  if mirror:
    row_dir = -row_dir
  half = (_SHAPE - 1) / 2.0
  position = centre - half * _SPACING * (col_dir + row_dir)
  index = np.arange(_SHAPE) * _SPACING
  points = (position + index[:, None, None] * row_dir + index[None, :, None] * col_dir)
  frames = np.stack([intensity(points, t) for t in range(12)]).astype(np.float32)
  return types.Cine(frames=frames, pixel_spacing=(_SPACING, _SPACING), view=view,
                    slice_index=slice_index, image_position=position,
                    image_orientation=np.concatenate([col_dir, row_dir]),
                    slice_position_mm=float(centre @ normal))


def _disk(points: np.ndarray, where: np.ndarray, radius_mm: float) -> np.ndarray:
  return (np.linalg.norm(points - where, axis=-1) < radius_mm).astype(np.float64)


def _short_axis_scene(normal: np.ndarray):
  """A beating disk at the origin, a static marker 35 mm anterior of it and a dimmer one 35 mm to
  its side (both in the plane), on a dim background."""
  anterior = _unit(types.ANTERIOR_LPS - (types.ANTERIOR_LPS @ normal) * normal)
  left = _unit(np.cross(anterior, normal))
  def intensity(points, t):
    radius = 14.0 - 5.0 * math.sin(math.pi * t / 12.0)
    return (100.0 + 500.0 * _disk(points, np.zeros(3), radius)
            + 400.0 * _disk(points, 35.0 * anterior, 9.0) + 300.0 * _disk(points, 35.0 * left, 6.0))
  return intensity, anterior, left


ORIENT_CFG = preprocess.PreprocessConfig(size=48, spacing_mm=2.5, num_frames=12, center="image")


@pytest.mark.parametrize("angle_deg,mirror", [(90.0, False), (37.0, False), (200.0, False),
                                              (63.0, True)])
def test_anatomical_layout_undoes_the_scanners_in_plane_rotation(angle_deg, mirror):
  normal = types.APEX_DIRECTION_LPS
  intensity, _, _ = _short_axis_scene(normal)
  upright = _plane_cine(types.SAX, normal, intensity, slice_index=0)
  turned = _plane_cine(types.SAX, normal, intensity, angle_deg=angle_deg, mirror=mirror,
                       slice_index=0)
  want = preprocess.preprocess_cine(upright, ORIENT_CFG).astype(np.float64)
  got = preprocess.preprocess_cine(turned, ORIENT_CFG).astype(np.float64)
  if mirror:  # a rotation never mirrors: the mirrored scan comes out mirrored left-right
    got = got[:, :, ::-1]
  # The same picture up to resampling at other positions (edges move by a fraction of a pixel).
  assert np.abs(got - want).mean() < 1.5  # measured 0-0.94 grey levels
  scanner = dataclasses.replace(ORIENT_CFG, orientation="scanner")
  as_scanned = preprocess.preprocess_cine(turned, scanner).astype(np.float64)
  assert np.abs((as_scanned[:, :, ::-1] if mirror else as_scanned) - want).mean() > 5.0  # 7-10


def _band_centroid(image: np.ndarray, lo: int, hi: int, min_radius_px: float) -> np.ndarray:
  """Centroid of the pixels within [lo, hi] grey levels, away from the image centre."""
  rows, cols = np.indices(image.shape)
  middle = (image.shape[0] - 1) / 2.0
  far = np.hypot(rows - middle, cols - middle) > min_radius_px
  return _centroid((image >= lo) & (image <= hi) & far)


def test_short_axis_slices_come_out_anterior_up():
  normal = _unit([0.6, -0.5, -0.62])
  intensity, _, _ = _short_axis_scene(normal)
  middle = (ORIENT_CFG.size - 1) / 2.0
  for angle, mirror in ((128.0, False), (-70.0, True)):
    out = preprocess.preprocess_cine(_plane_cine(types.SAX, normal, intensity, angle_deg=angle,
                                                 mirror=mirror, slice_index=0), ORIENT_CFG)
    # Grey levels: background 0, beating disk 255, anterior marker ~204, left marker ~153.
    anterior = _band_centroid(out[0], 185, 225, 9.0)
    assert anterior[0] < middle - 11 and abs(anterior[1] - middle) < 2, (angle, anterior)
    left = _band_centroid(out[0], 135, 170, 9.0)
    assert abs(left[0] - middle) < 3.5 and abs(left[1] - middle) > 11, (angle, left)


def test_long_axis_views_come_out_apex_down_along_the_stack_axis():
  # A long axis 30 degrees off the typical one: the stack's normal, not the typical axis, decides.
  axis = _unit([0.2, -0.35, -0.92])
  apex_marker = 40.0 * axis
  base_marker = -30.0 * axis
  def intensity(points, t):
    radius = 14.0 - 5.0 * math.sin(math.pi * t / 12.0)
    return (100.0 + 500.0 * _disk(points, np.zeros(3), radius)
            + 400.0 * _disk(points, apex_marker, 8.0) + 250.0 * _disk(points, base_marker, 8.0))
  sax = [_plane_cine(types.SAX, -axis if k % 2 else axis, intensity, centre=(k * 10.0 - 20.0) * axis,
                     angle_deg=11.0 * k, slice_index=k) for k in range(5)]  # normals either sign
  across = _unit(np.cross(axis, [1.0, 0.0, 0.0]))
  lax_normal = np.cross(axis, across)
  for angle in (0.0, 75.0, 180.0, 290.0):
    lax = _plane_cine(types.LAX_4CH, lax_normal, intensity, angle_deg=angle, reference=axis)
    study = types.Study(study_id="s", subject_id="p", site="t", cines=sax + [lax], lvef=50.0,
                        edv=100.0, esv=50.0, report="")
    record = preprocess.preprocess_study(study, ORIENT_CFG)
    out = record.frames[record.views.index(types.LAX_4CH)][0]
    middle = (ORIENT_CFG.size - 1) / 2.0
    apex = _band_centroid(out, 185, 225, 9.0)  # grey levels ~204 and ~127
    base = _band_centroid(out, 110, 145, 9.0)
    assert apex[0] > middle + 10 and abs(apex[1] - middle) < 3, (angle, apex)
    assert base[0] < middle - 6 and abs(base[1] - middle) < 3, (angle, base)


def test_anatomical_layout_of_an_upright_scan_is_the_scanner_layout():
  normal = types.APEX_DIRECTION_LPS
  intensity, _, _ = _short_axis_scene(normal)
  upright = _plane_cine(types.SAX, normal, intensity, slice_index=0)
  motion = dataclasses.replace(ORIENT_CFG, center="motion", spacing_mm=2.1)
  for cfg in (ORIENT_CFG, motion):
    anatomical = preprocess.preprocess_cine(upright, cfg).astype(np.int16)
    scanner = preprocess.preprocess_cine(
        upright, dataclasses.replace(cfg, orientation="scanner")).astype(np.int16)
    assert np.abs(anatomical - scanner).max() <= 1


def test_cines_without_geometry_keep_the_scanner_layout():
  rng = np.random.default_rng(3)
  cine = conftest.disk_cine(rng, view=types.LAX_2CH, shape=(60, 70), spacing=(1.5, 1.5),
                            center_rc=(20.0, 40.0), radius_mm=8.0)
  assert cine.image_orientation is None
  np.testing.assert_array_equal(
      preprocess.preprocess_cine(cine, ORIENT_CFG),
      preprocess.preprocess_cine(cine, dataclasses.replace(ORIENT_CFG, orientation="scanner")))


def test_stored_configs_from_before_orientation_read_as_scanner_layout(tmp_path):
  from cmr_jax import runs
  from cmr_jax.data import records
  old = {k: v for k, v in preprocess.PreprocessConfig(size=64).to_dict().items()
         if k != "orientation"}
  (tmp_path / records.DATASET_INFO).write_text(__import__("json").dumps({"preprocess": old}))
  assert records.read_dataset_info(str(tmp_path))["preprocess"]["orientation"] == "scanner"
  records.check_preprocess(str(tmp_path), preprocess.PreprocessConfig(size=64,
                                                                      orientation="scanner"))
  with pytest.raises(ValueError, match="orientation: scanner vs model anatomical"):
    records.check_preprocess(str(tmp_path), preprocess.PreprocessConfig(size=64))
  (tmp_path / runs.PREPROCESS_JSON).write_text(__import__("json").dumps(old))
  assert preprocess.PreprocessConfig.from_dict(
      runs.read_preprocess(str(tmp_path))).orientation == "scanner"
