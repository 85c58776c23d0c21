r"""Input throughput: phantom studies/s, record reads/s, pre-training clips/s, fine-tuning bags/s.

  python tools/bench_input.py --num_studies=40 --workers=0,2

Builds a temporary dataset of phantom studies (16 frames of 112x112, `--site`), then times the
grain pipelines at `--image_size` and `--num_frames` with each worker count (pre-training with
clips made on the host and with stored cines handed to the device). Also the host's CPU time
per pre-training example measured in this process with `time.process_time` (CPU seconds, so a
shared machine does not inflate it), for two paths side by side in one run (`example_cpu_ms`):
"host" (whole-record read, clip transform on the host: the path before issue 16.5) and
"device" (header + one cine read, parameters drawn, the stored cine handed over:
`augment_on_device`). At `--clip_sizes` (default 112 and the real 224) it gives clips/s per core
and the host cores needed to feed `--accelerators` accelerators training
`--accelerator_clips_per_s` clips/s each (1000: an H100 at 45% MFU on MViT-B 16x224^2, 431
GFLOPs per clip per step). Ends with one JSON line holding every figure.

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
from cmr_jax.data import types
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


def _whole(record: types.StudyRecord) -> records.StudyCines:
  """A decoded whole record as `StudyCines` (what the pipeline reads without cine shards)."""
  return records.StudyCines(record, lambda k: record.frames[k])


def example_cpu_ms(source: records.StudySource, tok: tokenizer.TextTokenizer, image_size: int,
                   num_frames: int, num: int, batch_size: int) -> dict[str, float]:
  """CPU milliseconds (this process, one thread) per training pre-training example, by path.

  "host" (the path before issue 16.5): read the whole study record, then make the example (cine
  choice, the clip transform on the host, tokens). "device" (`augment_on_device`): read the
  study's header and the chosen cine only (`StudySource.study_cines`), draw the clip's
  parameters and hand the stored cine over (the accelerator makes the clip). Both then stack
  examples into batches of `batch_size`. The two paths alternate example by example over the
  same studies and random streams, so machine load falls on both alike.
  """
  paths = {"host": (pipeline.PretrainExample(pipeline.ClipMaker(
      image_size, num_frames, pipeline.AugmentConfig()), tok, 64, None, False),
                    lambda i: (i, _whole(source[i]))),
           "device": (pipeline.PretrainExample(pipeline.ClipMaker(
               image_size, num_frames, pipeline.AugmentConfig()), tok, 64, None, False,
               augment_on_device=True), lambda i: (i, source.study_cines(i)))}
  rngs = {name: np.random.default_rng(0) for name in paths}
  order = [int(i) for i in np.random.default_rng(1).integers(0, len(source), num)]
  read = {name: 0.0 for name in paths}
  make = dict(read)
  stack = dict(read)
  done: dict[str, list] = {name: [] for name in paths}
  for i in order:
    for name, (example, read_fn) in paths.items():
      start = time.process_time()
      element = read_fn(i)
      read[name] += time.process_time() - start
      start = time.process_time()
      done[name].append(example(element, rngs[name]))
      make[name] += time.process_time() - start
      if len(done[name]) == batch_size:
        start = time.process_time()
        {k: np.stack([e[k] for e in done[name]]) for k in done[name][0]}
        stack[name] += time.process_time() - start
        done[name] = []
  out = {}
  for name in paths:
    out[f"{name}_read"] = 1000.0 * read[name] / num
    out[f"{name}_make"] = 1000.0 * make[name] / num
    out[f"{name}_batch"] = 1000.0 * stack[name] / (num // batch_size * batch_size)
    out[name] = out[f"{name}_read"] + out[f"{name}_make"] + out[f"{name}_batch"]
  return out


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
    accel = f"{_ACCELERATORS.value}_accelerators"
    for size in (int(v) for v in _CLIP_SIZES.value):
      ms = example_cpu_ms(source, tok, size, _NUM_FRAMES.value, _COST_EXAMPLES.value,
                          _BATCH_SIZE.value)
      for path in ("host", "device"):
        per_core = 1000.0 / ms[path]
        figures[f"example_cpu_ms_{size}_{path}"] = round(ms[path], 3)
        for part in ("read", "make", "batch"):
          figures[f"example_{part}_cpu_ms_{size}_{path}"] = round(ms[f"{path}_{part}"], 3)
        figures[f"clips_per_s_per_core_{size}_{path}"] = round(per_core, 1)
        figures[f"host_cores_per_accelerator_{size}_{path}"] = round(
            _ACCEL_CLIPS.value / per_core, 2)
        figures[f"host_cores_for_{accel}_{size}_{path}"] = round(
            _ACCELERATORS.value * _ACCEL_CLIPS.value / per_core, 1)
        logging.info("%dx%d clips, %s path: %.3f CPU ms per example (read %.3f, example %.3f, "
                     "batching %.3f), %.0f clips/s per core; %d accelerators at %g clips/s need "
                     "%.1f host cores", size, size, path, ms[path], ms[f"{path}_read"],
                     ms[f"{path}_make"], ms[f"{path}_batch"], per_core, _ACCELERATORS.value,
                     _ACCEL_CLIPS.value, figures[f"host_cores_for_{accel}_{size}_{path}"])
      figures[f"host_over_device_cpu_{size}"] = round(ms["host"] / ms["device"], 1)
    for workers in (int(w) for w in _WORKERS.value):
      pre = pipeline.pretrain_dataset(source, tokenizer=tok, max_text_len=64,
                                      worker_count=workers, **common)
      figures[f"pretrain_clips_per_s_w{workers}"] = batches_rate(pre, **timing)
      pre = pipeline.pretrain_dataset(source, tokenizer=tok, max_text_len=64,
                                      worker_count=workers, augment_on_device=True, **common)
      figures[f"pretrain_device_clips_per_s_w{workers}"] = batches_rate(pre, **timing)
      fine = pipeline.finetune_dataset(source, max_instances=_MAX_INSTANCES.value,
                                       worker_count=workers, **common)
      figures[f"finetune_bags_per_s_w{workers}"] = batches_rate(fine, **timing)
      logging.info("%d workers: %.1f clips/s (%.1f handing stored cines to the device), "
                   "%.1f bags/s", workers, figures[f"pretrain_clips_per_s_w{workers}"],
                   figures[f"pretrain_device_clips_per_s_w{workers}"],
                   figures[f"finetune_bags_per_s_w{workers}"])
  for name, value in figures.items():
    print(f"{name}: {value}")
  print(json.dumps(figures))


if __name__ == "__main__":
  logs.run(main)
