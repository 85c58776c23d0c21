r"""Input throughput: phantom studies/s, record reads/s, pre-training clips/s, fine-tuning bags/s.

  python tools/bench_input.py --num_studies=40 --workers=0,2

Builds a temporary dataset of phantom studies (16 frames of 112x112, `--site`), then times the
grain pipelines at `--image_size` and `--num_frames` with each worker count. Also the host's CPU
time per pre-training example (record read, cine choice, the training clip transform, report
tokens) measured in this process with `time.process_time` (CPU seconds, so a shared machine does
not inflate it): at `--clip_sizes` (default 112 and the real 224) it gives clips/s per core and
the host cores needed to feed `--accelerators` accelerators training `--accelerator_clips_per_s`
clips/s each (1000: an H100 at 45% MFU on MViT-B 16x224^2, 431 GFLOPs per clip per step).
Ends with one JSON line holding every figure.

  python tools/bench_input.py --num_studies=24 --workers=0 --stored_size=224 --spacing_mm=1
"""

import functools
import json
import tempfile
import time

from absl import flags
from absl import logging
import numpy as np

from cmr_jax.data import pipeline
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import tokenizer
from cmr_jax import logs
from cmr_jax.phantom import simulator

_NUM_STUDIES = flags.DEFINE_integer("num_studies", 40, "phantom studies in the temporary dataset")
_PHANTOM_STUDIES = flags.DEFINE_integer("phantom_studies", 8, "studies timed for the phantom rate")
_SITE = flags.DEFINE_string("site", "ukbb_like", "phantom protocol family")
_BUILD_WORKERS = flags.DEFINE_integer("build_workers", 2, "processes building the dataset")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "grain worker counts to time")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 112, "clip height and width")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 16, "clip frames")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "batch size")
_MAX_INSTANCES = flags.DEFINE_integer("max_instances", 8, "fine-tuning bag size K")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 10, "timed batches per measurement")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 2, "untimed batches first")
_STORED_SIZE = flags.DEFINE_integer("stored_size", 112, "stored record side in pixels")
_SPACING_MM = flags.DEFINE_float("spacing_mm", 2.0, "stored pixel spacing in mm")
_CLIP_SIZES = flags.DEFINE_list("clip_sizes", ["112", "224"], "clip sides of the CPU-cost figure")
_COST_EXAMPLES = flags.DEFINE_integer("cost_examples", 40, "examples timed per clip size")
_ACCELERATORS = flags.DEFINE_integer("accelerators", 8, "accelerators per host to feed")
_ACCEL_CLIPS = flags.DEFINE_float("accelerator_clips_per_s", 1000.0,
                                  "training clips/s one accelerator consumes")


def _rate(count: int, seconds: float) -> float:
  return round(count / max(seconds, 1e-9), 2)


def phantom_rate(num: int, site: str) -> float:
  """Phantom studies per second rendered in this process (16 frames of 112x112)."""
  start = time.perf_counter()
  for i in range(num):
    simulator.synthetic_study(0, i, site=site, fast=True, frames=16, matrix=112)
  return _rate(num, time.perf_counter() - start)


def read_rate(source: records.StudySource, num: int) -> float:
  """Random-access decoded records per second."""
  order = np.random.default_rng(0).integers(0, len(source), num)
  start = time.perf_counter()
  for i in order:
    source[int(i)]
  return _rate(num, time.perf_counter() - start)


def batches_rate(dataset, batch_size: int, warmup: int, num: int) -> float:
  """Examples per second over `num` batches after `warmup` untimed ones (worker start-up)."""
  it = iter(dataset)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num):
    next(it)
  return _rate(num * batch_size, time.perf_counter() - start)


def example_cpu_ms(source: records.StudySource, tok: tokenizer.TextTokenizer, image_size: int,
                   num_frames: int, num: int) -> tuple[float, float]:
  """CPU milliseconds (this process, one thread) per training pre-training example: reading and
  decoding its study record, then making the example from it (cine choice, clip, tokens)."""
  example = pipeline.PretrainExample(
      pipeline.ClipMaker(image_size, num_frames, pipeline.AugmentConfig()), tok, 64, None, False)
  rng = np.random.default_rng(0)
  order = [int(i) for i in rng.integers(0, len(source), num)]
  start = time.process_time()
  studies = [source[i] for i in order]
  read = time.process_time() - start
  start = time.process_time()
  for i, record in zip(order, studies):
    example((i, record), rng)
  make = time.process_time() - start
  return 1000.0 * read / num, 1000.0 * make / num


def main() -> None:
  figures = {"phantom_studies_per_s": phantom_rate(_PHANTOM_STUDIES.value, _SITE.value)}
  logging.info("phantom: %.2f studies/s", figures["phantom_studies_per_s"])
  cfg = preprocess.PreprocessConfig(size=_STORED_SIZE.value, spacing_mm=_SPACING_MM.value,
                                    num_frames=_NUM_FRAMES.value)
  with tempfile.TemporaryDirectory() as data_dir:
    items = [records.BuildItem(f"bench-{i}", functools.partial(
        simulator.synthetic_study, 0, i, site=_SITE.value, fast=True, frames=16, matrix=112))
             for i in range(_NUM_STUDIES.value)]
    summary = records.build_dataset(items, data_dir, cfg=cfg, split_fn=lambda r: "train",
                                    num_workers=_BUILD_WORKERS.value)
    figures["build_studies_per_s"] = round(summary.items_per_s, 2)
    source = records.open_split(data_dir, "train")
    figures["record_reads_per_s"] = read_rate(source, 4 * len(source))
    tok = tokenizer.train_tokenizer([source[i].report for i in range(len(source))], 512)
    common = dict(image_size=_IMAGE_SIZE.value, num_frames=_NUM_FRAMES.value,
                  batch_size=_BATCH_SIZE.value, seed=0)
    timing = dict(batch_size=_BATCH_SIZE.value, warmup=_WARMUP_BATCHES.value,
                  num=_NUM_BATCHES.value)
    for size in (int(v) for v in _CLIP_SIZES.value):
      read_ms, make_ms = example_cpu_ms(source, tok, size, _NUM_FRAMES.value,
                                        _COST_EXAMPLES.value)
      ms = read_ms + make_ms
      per_core = 1000.0 / ms
      figures[f"example_cpu_ms_{size}"] = round(ms, 2)
      figures[f"example_read_cpu_ms_{size}"] = round(read_ms, 2)
      figures[f"example_transform_cpu_ms_{size}"] = round(make_ms, 2)
      figures[f"clips_per_s_per_core_{size}"] = round(per_core, 1)
      figures[f"host_cores_for_{_ACCELERATORS.value}_accelerators_{size}"] = round(
          _ACCELERATORS.value * _ACCEL_CLIPS.value / per_core, 1)
      logging.info("%dx%d clips: %.2f CPU ms per example (record %.2f, clip and tokens %.2f), "
                   "%.1f clips/s per core; %d accelerators at %g clips/s need %.0f host cores",
                   size, size, ms, read_ms, make_ms, per_core,
                   _ACCELERATORS.value, _ACCEL_CLIPS.value,
                   figures[f"host_cores_for_{_ACCELERATORS.value}_accelerators_{size}"])
    for workers in (int(w) for w in _WORKERS.value):
      pre = pipeline.pretrain_dataset(source, tokenizer=tok, max_text_len=64,
                                      worker_count=workers, **common)
      figures[f"pretrain_clips_per_s_w{workers}"] = batches_rate(pre, **timing)
      fine = pipeline.finetune_dataset(source, max_instances=_MAX_INSTANCES.value,
                                       worker_count=workers, **common)
      figures[f"finetune_bags_per_s_w{workers}"] = batches_rate(fine, **timing)
      logging.info("%d workers: %.1f clips/s, %.1f bags/s", workers,
                   figures[f"pretrain_clips_per_s_w{workers}"],
                   figures[f"finetune_bags_per_s_w{workers}"])
  for name, value in figures.items():
    print(f"{name}: {value}")
  print(json.dumps(figures))


if __name__ == "__main__":
  logs.run(main)
