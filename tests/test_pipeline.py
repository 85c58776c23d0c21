"""grain pipelines: shapes, bags, filters, augmentation known answers, sharding, resume, workers."""

import dataclasses
import functools
import math

import jax
import numpy as np
import pytest

import conftest
from cmr_jax import inference
from cmr_jax.data import device_augment
from cmr_jax.data import pipeline
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.data import tokenizer
from cmr_jax.data import types

CFG = preprocess.PreprocessConfig(size=24, spacing_mm=5.0, num_frames=8)
NUM_STUDIES = 11
UNLABELLED = (3, 7)
NO_REPORT = (5,)
IMAGE, FRAMES, BATCH, K = 16, 8, 4, 7


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("pipeline")
  study = functools.partial(conftest.fake_study, 0, num_sax=5, matrix=40, num_frames=10)
  items = [(f"s{i}", functools.partial(study, i, labelled=i not in UNLABELLED,
                                       with_report=i not in NO_REPORT))
           for i in range(NUM_STUDIES)]
  records.build_dataset(items, str(out), cfg=CFG, split_fn=lambda r: "train")
  return str(out)


@pytest.fixture(scope="module")
def source(data_dir):
  return records.open_split(data_dir, "train")


@pytest.fixture(scope="module")
def tok(source):
  return tokenizer.train_tokenizer([source[i].report for i in range(3)], vocab_size=60)


def _finetune(source, **kwargs):
  args = dict(image_size=IMAGE, num_frames=FRAMES, batch_size=BATCH, max_instances=K, seed=0)
  return pipeline.finetune_dataset(source, **{**args, **kwargs})


def _pretrain(source, tok, **kwargs):
  args = dict(image_size=IMAGE, num_frames=FRAMES, batch_size=BATCH, tokenizer=tok,
              max_text_len=12, seed=0)
  return pipeline.pretrain_dataset(source, **{**args, **kwargs})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_bag_composition():
  # SAX slices out of order, LAX views scattered.
  views = [types.SAX, types.LAX_2CH, types.SAX, types.SAX, types.LAX_4CH, types.SAX, types.SAX,
           types.SAX, types.LAX_3CH]
  slices = np.array([3, -1, 0, 1, -1, 2, 4, 5, -1])
  # 4CH, 2CH, 3CH, then SAX slices 1 and 3 (every second of 1..4, without 0 and 5).
  assert pipeline.bag_indices(views, slices, 8) == [4, 1, 8, 3, 0]
  assert pipeline.bag_indices(views, slices, 4) == [4, 1, 8, 3]
  # Five SAX slices or fewer keep their first and last: every second from the base.
  assert pipeline.bag_indices([types.SAX, types.SAX], np.array([1, 0]), 8) == [1]
  assert pipeline.bag_indices([types.SAX] * 3 + [types.LAX_2CH], np.array([0, 1, 2, -1]), 8) == [
      3, 0, 2]


@pytest.mark.parametrize("num_sax, bag_slices", [
    (3, [0, 2]),  # as the reference implementation: the stack is trimmed only above 5 slices
    (5, [0, 2, 4]),
    (6, [1, 3]),  # without slices 0 and 5
])
def test_bag_trims_the_sax_stack_only_above_five_slices(num_sax, bag_slices):
  rng = np.random.default_rng(num_sax)
  slices = rng.permutation(num_sax)  # stored order need not be base->apex
  views = [types.LAX_4CH] + [types.SAX] * num_sax
  slice_index = np.concatenate([[-1], slices])
  bag = pipeline.bag_indices(views, slice_index, 8)
  assert bag[0] == 0 and [int(slice_index[i]) for i in bag[1:]] == bag_slices
  assert pipeline.bag_indices(views[1:], slices, 8) == [i - 1 for i in bag[1:]]  # no long axis


def test_pretrain_batches(source, tok):
  batch = next(iter(_pretrain(source, tok, two_clips=True)))
  assert batch["video"].shape == batch["video2"].shape == (BATCH, FRAMES, IMAGE, IMAGE)
  assert batch["video"].dtype == np.uint8
  assert batch["text_ids"].shape == batch["text_mask"].shape == (BATCH, 12)
  assert batch["text_ids"].dtype == batch["text_mask"].dtype == np.int32
  assert batch["study_index"].dtype == np.int32 and batch["valid"].all()
  assert (batch["text_ids"][:, 0] == tok.cls_id).all()
  for row, index in enumerate(batch["study_index"]):
    ids, mask = tok.encode([source[int(index)].report], 12)
    np.testing.assert_array_equal(batch["text_ids"][row], ids[0])
    np.testing.assert_array_equal(batch["text_mask"][row], mask[0])


def test_pretrain_eval_skips_studies_without_report_and_covers_the_rest(source, tok):
  batches = list(_pretrain(source, tok, train=False))
  valid = np.concatenate([b["study_index"][b["valid"]] for b in batches])
  assert sorted(valid) == [i for i in range(NUM_STUDIES) if i not in NO_REPORT]
  last = batches[-1]
  assert not last["text_mask"][~last["valid"]].any()
  assert (last["text_ids"][~last["valid"]] == tok.pad_id).all()


def test_video_video_variant_needs_no_tokenizer(source):
  batches = list(_pretrain(source, None, train=False, two_clips=True))
  assert set(batches[0]) == {"video", "video2", "study_index", "valid"}
  valid = np.concatenate([b["study_index"][b["valid"]] for b in batches])
  assert sorted(valid) == list(range(NUM_STUDIES))  # reports are not needed
  record = source[int(batches[0]["study_index"][0])]
  bag = pipeline.bag_indices(record.views, record.slice_index, record.num_cines)
  clips = pipeline.ClipMaker(IMAGE, FRAMES, pipeline.AugmentConfig())
  np.testing.assert_array_equal(batches[0]["video"][0], clips(record.frames[bag[0]], None))
  np.testing.assert_array_equal(batches[0]["video2"][0], clips(record.frames[bag[1]], None))
  with pytest.raises(ValueError, match="needs a tokenizer"):
    _pretrain(source, None)


def test_finetune_batches_and_bags(source):
  batch = next(iter(_finetune(source, train=False)))
  assert batch["video"].shape == (BATCH, K, FRAMES, IMAGE, IMAGE)
  assert batch["video"].dtype == np.uint8 and batch["mask"].dtype == bool
  assert batch["view"].dtype == np.int32 and batch["lvef"].dtype == np.float32
  clips = pipeline.ClipMaker(IMAGE, FRAMES, pipeline.AugmentConfig())
  for row, index in enumerate(batch["study_index"]):
    record = source[int(index)]
    bag = pipeline.bag_indices(record.views, record.slice_index, K)
    n = len(bag)
    assert n == 6  # 3 long-axis views + SAX slices 0, 2 and 4 of 0..4 (5: none trimmed)
    np.testing.assert_array_equal(batch["mask"][row], [True] * n + [False] * (K - n))
    np.testing.assert_array_equal(batch["view"][row, :n],
                                  [types.VIEW_CODES[record.views[i]] for i in bag])
    assert (batch["view"][row, n:] == -1).all() and not batch["video"][row, n:].any()
    for slot, i in enumerate(bag):
      np.testing.assert_array_equal(batch["video"][row, slot], clips(record.frames[i], None))
    assert np.isnan(batch["lvef"][row]) == (int(index) in UNLABELLED)


def test_eval_covers_every_study_once_and_pads(source):
  batches = list(_finetune(source, train=False))
  assert len(batches) == math.ceil(NUM_STUDIES / BATCH)
  last = batches[-1]
  pad = NUM_STUDIES % BATCH
  np.testing.assert_array_equal(last["valid"], [True] * pad + [False] * (BATCH - pad))
  assert (last["study_index"][pad:] == -1).all() and not last["mask"][pad:].any()
  assert (last["lvef"][pad:] == 0).all()
  valid = np.concatenate([b["study_index"][b["valid"]] for b in batches])
  assert sorted(valid) == list(range(NUM_STUDIES))


def test_eval_shards_disjoint_complete_and_equally_long(source):
  shards = [list(_finetune(source, train=False, shard_index=i, shard_count=3)) for i in range(3)]
  assert len({len(s) for s in shards}) == 1
  seen = [set(np.concatenate([b["study_index"][b["valid"]] for b in s])) for s in shards]
  assert set.union(*seen) == set(range(NUM_STUDIES))
  assert sum(len(s) for s in seen) == NUM_STUDIES


def test_train_shards_are_disjoint_and_equally_long(source):
  # 9 labelled studies over 2 processes: 5 and 4; the shorter share repeats one of its own, so
  # a finite pass has equally many batches on both (else one process would wait forever).
  seen, lengths = [], []
  for i in range(2):
    batches = list(_finetune(source, shard_index=i, shard_count=2, num_epochs=1, batch_size=1))
    lengths.append(len(batches))
    seen.append({int(b["study_index"][0]) for b in batches})
  assert lengths == [5, 5]
  assert [len(s) for s in seen] == [5, 4]
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(NUM_STUDIES)) - set(UNLABELLED)


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_finite_train_passes_have_equal_batch_counts(source, processes):
  counts = {len(list(_finetune(source, shard_index=i, shard_count=processes, num_epochs=3,
                               batch_size=2))) for i in range(processes)}
  assert counts == {3 * math.ceil(9 / processes) // 2}


def test_train_filters_unlabelled_and_label_fraction(source):
  batches = list(_finetune(source, num_epochs=1, batch_size=1))
  indices = {int(b["study_index"][0]) for b in batches}
  assert indices == set(range(NUM_STUDIES)) - set(UNLABELLED)
  assert all(np.isfinite(b["lvef"]).all() and b["valid"].all() for b in batches)
  half = {int(b["study_index"][0])
          for b in _finetune(source, num_epochs=1, batch_size=1, label_fraction=0.5)}
  expected = {i for i in indices if splits.in_label_fraction(
      source.metadata[i]["subject_id"], 0.5, pipeline.LABEL_FRACTION_SALT)}
  assert half == expected and 0 < len(half) < len(indices)


def test_no_labelled_study_is_an_error(tmp_path):
  study = functools.partial(conftest.fake_study, 1, num_sax=3, matrix=40, num_frames=10,
                            labelled=False)
  records.build_dataset([("u0", functools.partial(study, 0))], str(tmp_path), cfg=CFG,
                        split_fn=lambda r: "val")
  with pytest.raises(ValueError, match="fine-tuning train data: no usable study"):
    _finetune(records.open_split(str(tmp_path), "val"))


def test_determinism_and_augmentation_varies(source):
  a = _take(iter(_finetune(source, seed=3)), 3)
  _assert_batches_equal(a, _take(iter(_finetune(source, seed=3)), 3))
  b = _take(iter(_finetune(source, seed=4)), 3)
  assert any((x["video"] != y["video"]).any() for x, y in zip(a, b))


def _tta_clips(source, seed=1, eval_augment=True, **kwargs):
  """{study_id: the clips of its bag} in a test-time augmentation pass with `seed`."""
  out = {}
  for b in _finetune(source, train=False, eval_augment=eval_augment, seed=seed, **kwargs):
    for row in np.flatnonzero(b["valid"]):
      out[source[int(b["study_index"][row])].study_id] = b["video"][row][b["mask"][row]]
  return out


def test_test_time_augmentation_follows_each_cine_not_its_place(source):
  """A test-time augmentation pass samples a study alike wherever it sits in the split and with
  any number of processes, and each cine alike in a bag without one of the others; another pass
  samples anew."""
  whole = _tta_clips(source)
  reversed_split = inference.BagSource([(source[i], None) for i in reversed(range(NUM_STUDIES))])
  sharded = {}
  for i in range(3):
    sharded.update(_tta_clips(source, shard_index=i, shard_count=3))
  for other in (_tta_clips(reversed_split), sharded):
    assert other.keys() == whole.keys()
    for study, clips in whole.items():
      np.testing.assert_array_equal(other[study], clips)
  record = source[0]
  full = whole[record.study_id]
  subsets = inference.leave_one_out_cines(record.views, record.slice_index, K)
  assert len(subsets) == len(full)
  for left_out, cines in enumerate(subsets):
    (clips,) = _tta_clips(inference.BagSource([(record, cines)])).values()
    np.testing.assert_array_equal(clips, np.delete(full, left_out, axis=0))
  for other in (_tta_clips(source, seed=2), _tta_clips(source, eval_augment=False)):
    assert all((other[s] != whole[s]).any() for s in whole)


def test_iterator_resume_is_exact(source, tok):
  for make in (lambda: _finetune(source, seed=1), lambda: _pretrain(source, tok, seed=1)):
    it = iter(make())
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
    resumed = iter(make())
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), expected)


def test_worker_processes_match_and_resume(source, tok, absl_flags_parsed):
  in_process = _take(iter(_pretrain(source, tok, seed=2)), 4)
  it = iter(_pretrain(source, tok, seed=2, worker_count=2))
  _assert_batches_equal(_take(it, 2), in_process[:2])
  state = it.get_state()
  resumed = iter(_pretrain(source, tok, seed=2, worker_count=2))
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 2), in_process[2:])


def test_eval_pass_with_worker_processes_equals_the_in_process_pass(source, tok,
                                                                    absl_flags_parsed):
  # Finite, padded passes (config.data.eval_worker_count): same batches, same order.
  _assert_batches_equal(list(_finetune(source, train=False, worker_count=2)),
                        list(_finetune(source, train=False)))


def test_clip_known_answers():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (8, 20, 20), dtype=np.uint8)
  plain = pipeline.AugmentConfig(scale_range=(1.0, 1.0), max_shift=0.0, flip_prob=0.0,
                                 gamma_range=(1.0, 1.0), contrast_range=(1.0, 1.0),
                                 random_phase=False, eval_crop_fraction=1.0)
  same = pipeline.ClipMaker(20, 8, plain)
  np.testing.assert_array_equal(same(frames, None), frames)
  np.testing.assert_array_equal(same(frames, rng), frames)
  flipped = pipeline.ClipMaker(20, 8, dataclasses.replace(plain, flip_prob=1.0))
  np.testing.assert_array_equal(flipped(frames, rng), frames[:, :, ::-1])
  # A quarter-cycle phase shift of 8 frames is a roll by 2.
  np.testing.assert_allclose(preprocess.cycle_matrix(8, 8, phase=0.25) @ np.arange(8.0),
                             np.roll(np.arange(8.0), -2))
  # Downsampling a ramp by 2 (antialiased): away from the edges each output pixel is the ramp at
  # its sample position, input index 0.5 + 2 i.
  rows, cols = np.mgrid[0:20, 0:20]
  ramp = np.broadcast_to(10 * rows + 3 * cols, (8, 20, 20)).astype(np.uint8)
  half = pipeline.ClipMaker(10, 8, plain)(ramp, None).astype(float)
  position = 0.5 + 2 * np.arange(10)
  expected = 10 * position[:, None] + 3 * position[None, :]
  np.testing.assert_allclose(half[0, 1:-1, 1:-1], expected[1:-1, 1:-1], atol=0.5)


def test_rotation_path_agrees_with_separable_path_near_zero_angle():
  frames = np.random.default_rng(1).integers(0, 256, (4, 24, 24)).astype(np.float32)
  separable = preprocess.resample_frames(
      frames, *pipeline._crop_matrices(24, 24, 20.0, (12.0, 11.0), flip=True))
  rotated = pipeline._rotated_crop(frames, 24, 20.0, (12.0, 11.0), flip=True, angle=1e-9)
  np.testing.assert_allclose(rotated[:, 2:-2, 2:-2], separable[:, 2:-2, 2:-2], atol=1e-3)
  quarter = pipeline._rotated_crop(frames, 24, 24.0, (11.5, 11.5), flip=False, angle=math.pi / 2)
  np.testing.assert_allclose(quarter, np.rot90(frames, k=-1, axes=(1, 2)), atol=1e-3)


def test_intensity_lut():
  clip = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(pipeline._intensity_lut(clip, 1.0, 1.0), clip)
  darker = pipeline._intensity_lut(clip, 2.0, 1.0)
  assert darker[128] == round(255 * (128 / 255) ** 2) and darker[255] == 255


@pytest.mark.parametrize("cine_shards,shard,message", [
    (False, "test.array_record-00000-of-00001", r"record 0 of split test "),
    (True, "test.cines.array_record-00000-of-00001", r"study 0.* of split test ")])
def test_corrupt_record_error_reaches_the_caller(tmp_path, source, cine_shards, shard, message):
  study = functools.partial(conftest.fake_study, 2, num_sax=3, matrix=40, num_frames=10)
  records.build_dataset([(f"c{i}", functools.partial(study, i)) for i in range(2)],
                        str(tmp_path), cfg=CFG, split_fn=lambda r: "test",
                        cine_shards=cine_shards)  # the pixels in the study or the cine shards
  path = tmp_path / shard
  data = bytearray(path.read_bytes())
  data[1000] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(records.CorruptRecordError, match=message + r".*" + shard.replace(".", r"\.")):
    list(_finetune(records.open_split(str(tmp_path), "test"), train=False))


@pytest.mark.parametrize("stored,out,stored_frames,frames", [(20, 16, 10, 8), (24, 24, 8, 8),
                                                             (40, 20, 16, 16)])
def test_device_transform_matches_the_host_clip_maker(stored, out, stored_frames, frames):
  rng = np.random.default_rng(stored)
  rows, cols = np.mgrid[0:stored, 0:stored]
  smooth = (127 + 120 * np.sin(cols / 5.0 + np.arange(stored_frames)[:, None, None] / 3)
            * np.cos(rows / 7.0)).astype(np.uint8)
  maker = pipeline.ClipMaker(out, frames, pipeline.AugmentConfig())
  geometric = jax.jit(lambda f, p: device_augment.make_clip(f, p, out, frames,
                                                            with_intensity=False))
  full = jax.jit(lambda f, p: device_augment.make_clip(f, p, out, frames))
  for cine in (rng.integers(0, 256, smooth.shape, dtype=np.uint8), smooth):
    for _ in range(4):
      p = maker.draw(stored, rng)
      host_geometric = maker.render(cine, dataclasses.replace(p, gamma=None)).astype(int)
      device_geometric = np.asarray(geometric(cine, p.vector()))
      # float32 products vs the host's: within one grey level, and rarely off at all.
      assert np.abs(device_geometric - host_geometric).max() <= 1
      assert (device_geometric != host_geometric).mean() < 0.01
      # The intensity step is the host's table, applied to the device's clip.
      lut = pipeline._intensity_lut(device_geometric, p.gamma, p.contrast)
      device = np.asarray(full(cine, p.vector()))
      np.testing.assert_array_equal(device, lut[device_geometric])
      assert np.abs(device.astype(int) - maker.render(cine, p)).max() <= 2


def test_device_transform_known_answers():
  frames = np.random.default_rng(0).integers(0, 256, (8, 20, 20), dtype=np.uint8)
  plain = pipeline.ClipParams(0.0, 20.0, (9.5, 9.5), False, 0.0, 1.0, 1.0)
  make = functools.partial(device_augment.make_clip, image_size=20, num_frames=8)
  np.testing.assert_array_equal(make(frames, plain.vector()), frames)
  flipped = dataclasses.replace(plain, flip=True)
  np.testing.assert_array_equal(make(frames, flipped.vector()), frames[:, :, ::-1])
  quarter = dataclasses.replace(plain, phase=0.25)  # a roll by 2 frames
  np.testing.assert_array_equal(make(frames, quarter.vector()), np.roll(frames, -2, axis=0))
  with pytest.raises(ValueError, match="without rotation"):
    dataclasses.replace(plain, angle=0.1).vector()
  with pytest.raises(ValueError, match="does not rotate"):
    pipeline.pretrain_dataset(None, image_size=16, num_frames=8, batch_size=2, tokenizer=None,
                              max_text_len=4, seed=0, two_clips=True, augment_on_device=True,
                              augment=pipeline.AugmentConfig(max_rotation_deg=5.0))


def test_device_augmented_batches_draw_like_the_host_and_shard_exactly(source, tok):
  host = _take(iter(_pretrain(source, tok, seed=5, two_clips=True)), 2)
  raw = _take(iter(_pretrain(source, tok, seed=5, two_clips=True, augment_on_device=True)), 2)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  augment = jax.jit(functools.partial(device_augment.augment_batch, image_size=IMAGE,
                                      num_frames=FRAMES))
  for h, r in zip(host, raw):
    assert r["video"].shape == (BATCH, CFG.num_frames, CFG.size, CFG.size)
    assert r["video_augment"].shape == (BATCH, device_augment.NUM_PARAMS)
    for row, index in enumerate(r["study_index"]):  # the stored cines, untouched
      record = source[int(index)]
      assert any((r["video"][row] == cine).all() for cine in record.frames)
    out = jax.device_get(augment(r))
    assert set(out) == set(h)
    for key in h:
      if key.startswith("video"):  # the same draws: the host's clips, to the float32 rounding
        assert np.abs(out[key].astype(int) - h[key]).max() <= 2, key
        assert (out[key] != h[key]).mean() < 0.01, key
      else:
        np.testing.assert_array_equal(out[key], h[key], err_msg=key)
    # A batch split over 8 devices gives the same clips as on one, bit for bit.
    rows8 = {k: np.concatenate([v, v]) for k, v in r.items()}  # 8 rows
    whole = jax.device_get(augment(rows8))
    split = jax.device_get(augment(jax.device_put(rows8, sharded)))
    for key in whole:
      np.testing.assert_array_equal(split[key], whole[key], err_msg=key)
