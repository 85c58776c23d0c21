"""grain input pipelines: study records -> pre-training clips and fine-tuning bags.

Both pipelines are `grain.MapDataset`s over an index list (one entry per study, after filtering,
label-fraction subsetting and per-process sharding), then seed / shuffle / repeat at train, a
per-study transform (random at train, deterministic at eval), batching, `to_iter_dataset` with
threaded reads and, with worker_count > 0, `mp_prefetch` worker processes. Iterators support
`get_state()` / `set_state()` (exact resume) and are deterministic for a seed.

Batches are dicts of numpy arrays. Videos stay uint8 grey without a channel axis (the model
converts to float and copies grey to 3 channels):
  pre-training: video uint8 [B, T, H, W] (+ video2 with two_clips), text_ids / text_mask int32
    [B, L] (absent without a tokenizer), study_index int32 [B], valid bool [B]
  fine-tuning: video uint8 [B, K, T, H, W], mask bool [B, K], view int32 [B, K] (VIEW_CODES,
    -1 at padding), lvef float32 [B], study_index int32 [B], valid bool [B]
Every process's share of a split is equally long (`_shard_indices`: at train a shorter share
repeats its own first study, so finite passes give every process equally many batches).
At eval every study of the shard appears exactly once: the index list is padded to whole
batches (and to the same number of batches on every process) with padding rows that have
valid=False, study_index=-1, zero pixels, lvef=0, text mask 0 (ids [PAD]). At eval, studies
without labels are kept with lvef=NaN (prediction on unlabelled data); at train they are
filtered out. `study_index` is the study's index in `source`.

Augmentation (train): random crop side within `scale_range` of the stored side about a shifted
centre, horizontal flip, optional small rotation, resampled to image_size; random gamma and
contrast (one lookup table per clip); for pre-training a random cardiac phase shift (the cycle is
periodic). Eval: a centred crop of `eval_crop_fraction` of the stored side, first phase at frame
0. Scale, shift and flip are separable matrix products (antialiased, ~1 ms per 16x112x112 clip);
rotation needs a general warp (scipy.ndimage.affine_transform, ~20 ms per clip on a 2-core
shared CPU), so it is off by default. Pre-training reads a study's header and only the cines it
uses where the split has per-cine shards (`records.StudySource.study_cines`); with
`augment_on_device` its training batches hold the stored cines and their clip parameters, and
the jitted step makes the clips (`device_augment`), the same draws as on the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Protocol

from absl import logging
import grain
import numpy as np
import scipy.ndimage

from cmr_jax.data import device_augment
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.data import tokenizer as tokenizer_lib
from cmr_jax.data import types

PAD_INDEX = -1
# The long-axis views of a fine-tuning bag, in bag order, before the SAX subset.
BAG_LONG_AXIS_ORDER = (types.LAX_4CH, types.LAX_2CH, types.LAX_3CH)
# A SAX stack of more slices than this loses its first and last slice in a bag (`bag_indices`).
TRIM_SAX_ABOVE = 5
LABEL_FRACTION_SALT = "cmr-jax-label-fraction"


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Train-time augmentation and the eval crop.

  Attributes:
    scale_range: crop side as a fraction of the stored side (train).
    max_shift: crop centre shift, as a fraction of the stored side (train).
    flip_prob: probability of a left-right flip (train).
    max_rotation_deg: rotation range (train); 0 keeps the fast separable path.
    gamma_range: intensity gamma, log-uniform (train).
    contrast_range: contrast factor about the clip mean (train).
    random_phase: shift the cardiac phase by a random fraction of the cycle (train).
    eval_crop_fraction: centred crop side as a fraction of the stored side (eval).
  """

  scale_range: tuple[float, float] = (0.8, 1.0)
  max_shift: float = 0.08
  flip_prob: float = 0.5
  max_rotation_deg: float = 0.0
  gamma_range: tuple[float, float] = (0.8, 1.25)
  contrast_range: tuple[float, float] = (0.8, 1.2)
  random_phase: bool = True
  eval_crop_fraction: float = 0.9


class Source(Protocol):
  """A random-access source of `StudyRecord`s, e.g. `records.open_split(...)`."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> types.StudyRecord: ...


def study_metadata(source: Source) -> list[dict[str, Any]]:
  """Per-study metadata of a source: its `metadata` attribute, else decoded from every record."""
  meta = getattr(source, "metadata", None)
  if meta is None:
    meta = [records.record_metadata(source[i]) for i in range(len(source))]
  return meta


def bag_indices(views: list[str], slice_index: np.ndarray, max_instances: int) -> list[int]:
  """Cines of a fine-tuning bag, as in the paper's reference implementation.

  Each long-axis view present (its first cine, in BAG_LONG_AXIS_ORDER), then every second SAX
  slice from base to apex, starting at the first, truncated to max_instances. A stack of more
  than `TRIM_SAX_ABOVE` (5) slices first loses its first and last slice (often off the
  ventricle): 6 slices give slices 1 and 3, 5 give 0, 2 and 4, 3 give 0 and 2, 2 or 1 give 0.
  A study with none of these views uses all its cines.

  Args:
    views: [N] view of each cine.
    slice_index: [N] SAX order base->apex (-1 for long-axis).
    max_instances: K.

  Returns:
    Indices into the study's cines, at most K.
  """
  bag = [views.index(v) for v in BAG_LONG_AXIS_ORDER if v in views]
  sax = sorted((i for i, v in enumerate(views) if v == types.SAX), key=lambda i: slice_index[i])
  bag += (sax[1:-1] if len(sax) > TRIM_SAX_ABOVE else sax)[::2]
  if not bag:
    bag = list(range(len(views)))
  return bag[:max_instances]


def _crop_matrices(stored: int, out: int, side: float, center: tuple[float, float],
                   flip: bool) -> tuple[np.ndarray, np.ndarray]:
  """Row [out, stored] and column [out, stored] matrices taking a side x side crop to out x out."""
  rows, cols = (preprocess.centered_resample_matrix(stored, out, out / side, c) for c in center)
  return rows, (cols[::-1] if flip else cols)


def _rotated_crop(x: np.ndarray, out: int, side: float, center: tuple[float, float], flip: bool,
                  angle: float) -> np.ndarray:
  """A rotated side x side crop of x [T, S, S] resampled to [T, out, out] (bilinear)."""
  zoom = side / out  # input pixels per output pixel
  if zoom > 1:  # low-pass before downsampling
    x = scipy.ndimage.gaussian_filter(x, (0, (zoom - 1) / 2, (zoom - 1) / 2))
  cos, sin = math.cos(angle), math.sin(angle)
  matrix = np.array([[cos, -sin], [sin, cos]]) @ np.diag([zoom, -zoom if flip else zoom])
  offset = np.asarray(center) - matrix @ np.full(2, (out - 1) / 2.0)
  return np.stack([scipy.ndimage.affine_transform(frame, matrix, offset, output_shape=(out, out),
                                                  order=1, mode="constant", cval=0.0)
                   for frame in x])


def _intensity_lut(clip: np.ndarray, gamma: float, contrast: float) -> np.ndarray:
  """uint8 [256] table applying gamma, then contrast about the clip's mean after gamma."""
  levels = (np.arange(256) / 255.0) ** gamma
  mean = float(np.bincount(clip.reshape(-1), minlength=256) @ levels) / clip.size
  return np.rint(np.clip((levels - mean) * contrast + mean, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ClipParams:
  """One clip's transform: what `ClipMaker.draw` draws (or the eval crop, without intensity).

  Attributes:
    phase: first output phase, as a fraction of the cycle.
    side: crop side in stored pixels.
    center: crop centre (row, column) in stored pixels.
    flip: left-right flip.
    angle: rotation in radians.
    gamma: intensity gamma; None: no intensity table (eval).
    contrast: contrast factor about the clip mean (with gamma).
  """

  phase: float
  side: float
  center: tuple[float, float]
  flip: bool
  angle: float
  gamma: float | None = None
  contrast: float = 1.0

  def vector(self) -> np.ndarray:
    """float32 [device_augment.NUM_PARAMS], in `device_augment.PARAM_NAMES` order."""
    if self.angle != 0.0 or self.gamma is None:
      raise ValueError("the device transform takes train clips without rotation only")
    return np.array([self.phase, self.side, *self.center, float(self.flip), self.gamma,
                     self.contrast], np.float32)


@dataclasses.dataclass(frozen=True)
class ClipMaker:
  """Turns one stored cine into a model clip, randomly at train, deterministically at eval."""

  image_size: int
  num_frames: int
  augment: AugmentConfig

  def __call__(self, frames: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """frames: uint8 [T0, S, S] -> uint8 [num_frames, image_size, image_size]."""
    return self.render(frames, self.draw(frames.shape[-1], rng))

  def draw(self, stored: int, rng: np.random.Generator | None) -> ClipParams:
    """A clip's parameters for a stored side: random with rng, else the eval crop."""
    aug = self.augment
    mid = (stored - 1) / 2.0
    if rng is None:
      return ClipParams(0.0, aug.eval_crop_fraction * stored, (mid, mid), False, 0.0)
    side = rng.uniform(*aug.scale_range) * stored
    center = tuple(mid + rng.uniform(-aug.max_shift, aug.max_shift, 2) * stored)
    flip = bool(rng.random() < aug.flip_prob)
    angle = math.radians(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg))
    phase = rng.random() if aug.random_phase else 0.0
    gamma = math.exp(rng.uniform(*np.log(aug.gamma_range)))
    return ClipParams(phase, side, center, flip, angle, gamma, rng.uniform(*aug.contrast_range))

  def render(self, frames: np.ndarray, p: ClipParams) -> np.ndarray:
    """The clip of frames uint8 [T0, S, S] under p, on the host."""
    stored_frames, stored, _ = frames.shape
    identity = (stored_frames == self.num_frames and p.phase == 0.0 and stored == self.image_size
                and p.side == stored and not p.flip and p.angle == 0.0)
    if identity:
      clip = np.asarray(frames)
    else:
      weights = preprocess.cycle_matrix(stored_frames, self.num_frames, phase=p.phase)
      x = preprocess.apply_along_first(weights, frames.astype(np.float32))  # [T, S, S]
      if p.angle == 0.0:
        x = preprocess.resample_frames(
            x, *_crop_matrices(stored, self.image_size, p.side, p.center, p.flip))
      else:
        x = _rotated_crop(x, self.image_size, p.side, p.center, p.flip, p.angle)
      clip = np.rint(np.clip(x, 0.0, 255.0)).astype(np.uint8)
    if p.gamma is not None:
      clip = _intensity_lut(clip, p.gamma, p.contrast)[clip]
    return clip


@dataclasses.dataclass(frozen=True)
class _IndexedSource:
  """Studies at `indices` of a source (PAD_INDEX: a padding slot): (index, record or None);
  with `cines`, (index, `records.StudyCines` or None), read a cine at a time where the source
  has per-cine shards (`records.StudySource.study_cines`)."""

  source: Source
  indices: tuple[int, ...]
  cines: bool = False

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> tuple[int, Any]:
    index = self.indices[i]
    if index == PAD_INDEX:
      return index, None
    if not self.cines:
      return index, self.source[index]
    if hasattr(self.source, "study_cines"):
      return index, self.source.study_cines(index)
    record = self.source[index]
    return index, records.StudyCines(record, lambda k: record.frames[k])


@dataclasses.dataclass(frozen=True)
class PretrainExample:
  """(index, `records.StudyCines`) -> pre-training example: one random cine (two with
  two_clips) + report.

  The cine is drawn from the study's fine-tuning bag (`bag_indices` with `bag_size`) when
  `bag_size` is set, else from all its cines. Without a tokenizer (the video-video variant) the
  example has no text fields. With `augment_on_device` a training example holds the stored cine,
  uint8 [T0, S, S], and its clip parameters, float32 [device_augment.NUM_PARAMS] in
  "video_augment" ("video2_augment"): the training step makes the clip
  (`device_augment.augment_batch`); the random draws are those of the host transform.
  """

  clips: ClipMaker
  tokenizer: tokenizer_lib.TextTokenizer | None
  max_text_len: int
  max_sentences: int | None
  two_clips: bool
  bag_size: int | None = None
  augment_on_device: bool = False

  def __call__(self, element: tuple[int, records.StudyCines | None],
               rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    index, study = element
    record = None if study is None else study.record
    count = 2 if self.two_clips else 1
    shape = (self.clips.num_frames, self.clips.image_size, self.clips.image_size)
    example = {"study_index": np.int32(index), "valid": np.bool_(record is not None)}
    names = ["video", "video2"][:count]
    if record is None:
      videos = [np.zeros(shape, np.uint8)] * count
    else:
      if rng is not None:
        pool = (np.arange(record.num_cines) if self.bag_size is None else
                np.asarray(bag_indices(record.views, record.slice_index, self.bag_size)))
        picks = rng.choice(pool, count, replace=len(pool) < count)
      else:  # fixed: the first cines in bag order (4CH first when present)
        order = bag_indices(record.views, record.slice_index, record.num_cines)
        picks = [order[k % len(order)] for k in range(count)]
      cines = [study.cine(int(i)) for i in picks]
      params = [self.clips.draw(cine.shape[-1], rng) for cine in cines]
      if self.augment_on_device and rng is not None:
        for name, cine, p in zip(names, cines, params):
          example[name + device_augment.AUGMENT_SUFFIX] = p.vector()
        videos = cines
      else:
        videos = [self.clips.render(cine, p) for cine, p in zip(cines, params)]
    example.update(zip(names, videos))
    if self.tokenizer is not None:
      if record is None:
        ids = np.full((1, self.max_text_len), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((1, self.max_text_len), np.int32)
      else:
        ids, mask = self.tokenizer.encode([record.report], self.max_text_len, self.max_sentences)
      example["text_ids"], example["text_mask"] = ids[0], mask[0]
    return example


def cine_rng(seed: int, frames: np.ndarray) -> np.random.Generator:
  """The test-time augmentation draws of one stored cine in pass `seed`: keyed by the cine's
  pixels, so a cine is sampled alike wherever its study sits in a split, with any number of
  processes, and in every bag that holds it (the full bag and its leave-one-cine-out bags)."""
  key = hashlib.blake2b(np.ascontiguousarray(frames).tobytes(), digest_size=16).digest()
  return np.random.default_rng([seed, int.from_bytes(key, "little")])


@dataclasses.dataclass(frozen=True)
class FinetuneExample:
  """(index, record) -> fine-tuning bag of up to K cines with mask, view codes and LVEF.

  `tta_seed`: sample each cine with the augmentation from `cine_rng(tta_seed, cine)` (a
  test-time augmentation pass), not from the rng the pipeline passes.
  """

  clips: ClipMaker
  max_instances: int
  tta_seed: int | None = None

  def __call__(self, element: tuple[int, types.StudyRecord | None],
               rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    index, record = element
    size, k = self.clips.image_size, self.max_instances
    video = np.zeros((k, self.clips.num_frames, size, size), np.uint8)
    mask = np.zeros(k, bool)
    view = np.full(k, PAD_INDEX, np.int32)
    lvef = 0.0
    if record is not None:
      for slot, i in enumerate(bag_indices(record.views, record.slice_index, k)):
        cine = record.frames[i]
        video[slot] = self.clips(cine, rng if self.tta_seed is None
                                 else cine_rng(self.tta_seed, cine))
        mask[slot] = True
        view[slot] = types.VIEW_CODES[record.views[i]]
      lvef = record.lvef
    return {"video": video, "mask": mask, "view": view, "lvef": np.float32(lvef),
            "study_index": np.int32(index), "valid": np.bool_(record is not None)}


def _shard_seed(seed: int, shard_index: int) -> int:
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def _select(meta: list[dict[str, Any]], *, need_labels: bool, need_report: bool,
            label_fraction: float, what: str) -> list[int]:
  """Indices of studies kept by the filters; logs what was dropped; raises if none is left."""
  keep = list(range(len(meta)))
  if need_report:
    keep = [i for i in keep if meta[i]["has_report"]]
    if len(keep) < len(meta):
      logging.info("%s: left out %d of %d studies without a report", what,
                   len(meta) - len(keep), len(meta))
  if need_labels:
    labelled = [i for i in keep if meta[i]["lvef"] is not None]
    if len(labelled) < len(keep):
      logging.info("%s: left out %d of %d studies without an LVEF label", what,
                   len(keep) - len(labelled), len(keep))
    keep = labelled
  if label_fraction < 1.0:
    before = len(keep)
    keep = [i for i in keep
            if splits.in_label_fraction(meta[i]["subject_id"], label_fraction,
                                        LABEL_FRACTION_SALT)]
    logging.info("%s: label fraction %g keeps %d of %d studies (by subject)", what,
                 label_fraction, len(keep), before)
  if not keep:
    raise ValueError(f"{what}: no usable study among {len(meta)} (labels required: "
                     f"{need_labels}, report required: {need_report}, label fraction "
                     f"{label_fraction})")
  return keep


def _shard_indices(keep: list[int], *, train: bool, batch_size: int, shard_index: int,
                   shard_count: int) -> tuple[int, ...]:
  """This process's disjoint share, equally long on every process.

  Every process must run equally many batches of a finite pass (one gather or one train step per
  global batch: a process with one batch fewer would leave the others waiting forever), so every
  share has ceil(N / P) entries. At train a shorter share repeats its own first studies (each
  process still sees only its own studies; at most one study per process is seen twice per
  epoch); at eval it is padded with PAD_INDEX slots (valid=False rows) to whole batches.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  mine = keep[shard_index::shard_count]
  per_shard = math.ceil(len(keep) / shard_count)
  if train and mine:
    mine = mine + mine[:per_shard - len(mine)]
  elif not train:
    padded = math.ceil(per_shard / batch_size) * batch_size
    mine = mine + [PAD_INDEX] * (padded - len(mine))
  if not mine:
    raise ValueError(f"shard {shard_index} of {shard_count} has no study ({len(keep)} in all)")
  return tuple(mine)


def _dataset(source: Source, indices: tuple[int, ...], example_fn: Any, *, batch_size: int,
             seed: int, train: bool, num_epochs: int | None, worker_count: int,
             read_threads: int, prefetch_buffer_size: int,
             cines: bool = False) -> grain.IterDataset:
  ds = grain.MapDataset.source(_IndexedSource(source, indices, cines)).seed(seed)
  if train:
    ds = ds.shuffle().repeat(num_epochs).random_map(example_fn)
  else:  # test-time augmentation draws its own keyed rngs (`FinetuneExample.tta_seed`)
    ds = ds.repeat(num_epochs or 1).map(example_fn)
  ds = ds.batch(batch_size, drop_remainder=train)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def pretrain_dataset(source: Source, *, image_size: int, num_frames: int, batch_size: int,
                     tokenizer: tokenizer_lib.TextTokenizer | None, max_text_len: int,
                     seed: int, train: bool = True, shard_index: int = 0, shard_count: int = 1,
                     num_epochs: int | None = None, worker_count: int = 0,
                     two_clips: bool = False, max_sentences: int | None = None,
                     bag_size: int | None = None,
                     augment: AugmentConfig = AugmentConfig(), read_threads: int = 2,
                     prefetch_buffer_size: int = 4,
                     augment_on_device: bool = False) -> grain.IterDataset:
  """Video-report pairs for contrastive pre-training (studies with a report).

  Args:
    source: study records (e.g. `records.open_split(data_dir, "train")`).
    image_size: output H = W.
    num_frames: output T (resampled over the cycle when it differs from the stored count).
    batch_size: per-process batch size B.
    tokenizer: report tokenizer; None for the video-video variant (two_clips=True), whose
      batches have no text fields and which keeps studies without a report.
    max_text_len: L.
    seed: shuffling and augmentation seed.
    train: random order, cine choice and augmentation, endless by default; else one
      deterministic pass (the first cine of each study's bag order, centred crop) padded to
      whole batches.
    shard_index: this process's index among shard_count (disjoint, complete shares).
    shard_count: number of processes reading.
    num_epochs: passes over the data; None: endless at train, one at eval.
    worker_count: grain worker processes (0: threads in this process).
    two_clips: add "video2", a second random cine of the same study (video-video variant).
    max_sentences: use only the first sentences of each report.
    bag_size: draw training cines from the study's fine-tuning bag of this size (the long-axis
      views and every second SAX slice, `bag_indices`), the cines the LVEF head pools; None:
      from all its cines (apical and basal SAX slices included).
    augment: augmentation settings.
    read_threads: threads per process applying the per-study transform.
    prefetch_buffer_size: examples read ahead per process.
    augment_on_device: at train, batches hold the stored cines, uint8 [B, T0, S, S], and their
      clip parameters ("video_augment", float32 [B, device_augment.NUM_PARAMS]; likewise
      video2): `device_augment.augment_batch` in the training step makes the clips (the same
      random draws as the host transform). Not with rotation.

  Returns:
    An IterDataset of batches (see the module docstring).
  """
  if augment_on_device and augment.max_rotation_deg > 0:
    raise ValueError("augment_on_device does not rotate: set max_rotation_deg=0 or augment on "
                     "the host (augment_on_device=False)")
  if tokenizer is None and not two_clips:
    raise ValueError("pre-training needs a tokenizer (video-text) or two_clips=True (video-video)")
  what = f"pre-training {'train' if train else 'eval'} data"
  keep = _select(study_metadata(source), need_labels=False, need_report=tokenizer is not None,
                 label_fraction=1.0, what=what)
  indices = _shard_indices(keep, train=train, batch_size=batch_size, shard_index=shard_index,
                           shard_count=shard_count)
  example = PretrainExample(ClipMaker(image_size, num_frames, augment), tokenizer, max_text_len,
                            max_sentences, two_clips, bag_size, augment_on_device)
  return _dataset(source, indices, example, batch_size=batch_size,
                  seed=_shard_seed(seed, shard_index), train=train, num_epochs=num_epochs,
                  worker_count=worker_count, read_threads=read_threads,
                  prefetch_buffer_size=prefetch_buffer_size, cines=True)


def finetune_dataset(source: Source, *, image_size: int, num_frames: int, batch_size: int,
                     max_instances: int, seed: int, train: bool = True, shard_index: int = 0,
                     shard_count: int = 1, num_epochs: int | None = None,
                     worker_count: int = 0, label_fraction: float = 1.0,
                     augment: AugmentConfig = AugmentConfig(random_phase=False),
                     read_threads: int = 2, prefetch_buffer_size: int = 4,
                     eval_augment: bool = False) -> grain.IterDataset:
  """Multi-instance bags (all views of a study) with LVEF, for fine-tuning and evaluation.

  Args:
    source: study records.
    image_size: output H = W.
    num_frames: output T.
    batch_size: per-process batch size B.
    max_instances: K, the bag size (see `bag_indices`).
    seed: shuffling and augmentation seed.
    train: labelled studies only, random order and augmentation, endless by default; else one
      deterministic pass over every study (unlabelled ones with lvef=NaN), padded to whole
      batches with valid=False rows.
    shard_index: this process's index among shard_count.
    shard_count: number of processes reading.
    num_epochs: passes over the data; None: endless at train, one at eval.
    worker_count: grain worker processes.
    label_fraction: keep this fraction of subjects (deterministic, nested: 1% within 10%).
    augment: augmentation settings (no phase shift by default: frame 0 stays end-diastole).
    read_threads: threads per process applying the per-study transform.
    prefetch_buffer_size: examples read ahead per process.
    eval_augment: with train=False, sample every clip with the train-time augmentation
      `augment`, seeded by `seed` and the stored cine's pixels (`cine_rng`: test-time
      augmentation, one pass per seed): a study gets the same clips wherever it sits in the
      split and however many processes read it; the order and padding stay those of the
      deterministic pass.

  Returns:
    An IterDataset of batches (see the module docstring).

  Raises:
    ValueError: when no study is left (e.g. a training split without labels).
  """
  what = f"fine-tuning {'train' if train else 'eval'} data"
  keep = _select(study_metadata(source), need_labels=train, need_report=False,
                 label_fraction=label_fraction, what=what)
  indices = _shard_indices(keep, train=train, batch_size=batch_size, shard_index=shard_index,
                           shard_count=shard_count)
  example = FinetuneExample(ClipMaker(image_size, num_frames, augment), max_instances,
                            tta_seed=seed if eval_augment and not train else None)
  return _dataset(source, indices, example, batch_size=batch_size,
                  seed=_shard_seed(seed, shard_index), train=train, num_epochs=num_epochs,
                  worker_count=worker_count, read_threads=read_threads,
                  prefetch_buffer_size=prefetch_buffer_size)
