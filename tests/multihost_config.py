r"""The runs of tests/test_multihost.py: a 1-block MViT at 8 x 32 x 32, a few steps.

Pre-training (no argument): the smoke config of configs/synthetic_pretrain.py, shrunk so that a
cold compile takes seconds, with a global batch of 4 on a 2-device mesh whose fsdp axis shards
the parameters (and the optimizer state) across the two processes of the multi-process run:

  python tools/train.py --config=tests/multihost_config.py --workdir=WORKDIR \
      --config.data.dir=DATA --config.text.vocab=VOCAB_TXT

Fine-tuning (`:finetune`, the frozen encoder's features cached; `:finetune_stream`, bags streamed
through the encoder every step): configs/synthetic_finetune.py's smoke run on the same encoder,
a global batch of 2 bags (one per process) on the same mesh:

  python tools/train.py --mode=finetune --config=tests/multihost_config.py:finetune \
      --workdir=WORKDIR --config.data.dir=DATA
"""

import importlib.util
import os

import ml_collections

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
IMAGE_SIZE = 32
NUM_FRAMES = 8
NUM_DEVICES = 2


# One block, a non-overlapping patch embedding and 1-tap pooling: a third of the compile time
# of the 3 x 7 x 7 patch and 3 x 3 x 3 pooling kernels, which these tests do not need.
VIDEO_OVERRIDES = {"num_frames": NUM_FRAMES, "image_size": IMAGE_SIZE, "depth": 1,
                   "stage_starts": (), "patch_kernel": (2, 4, 4), "patch_stride": (2, 4, 4),
                   "patch_padding": (0, 0, 0), "pool_kernel": (1, 1, 1),
                   "kv_pool_stride": (1, 2, 2)}
# Fine-tuning: passes of cached features (`:finetune`); the 1-bag-per-process batch makes every
# study of a process's share one batch, so shares of unequal length would give unequal counts.
FINETUNE_PASSES = 2
FINETUNE_STEPS = 4


def _load(name: str, arg: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(_CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _finetune_config(passes: int) -> ml_collections.ConfigDict:
  c = _load("synthetic_finetune", "smoke")
  c.data.image_size, c.data.num_frames, c.data.max_instances = IMAGE_SIZE, NUM_FRAMES, 3
  c.model.video, c.model.video_overrides = "mvit_tiny", VIDEO_OVERRIDES
  c.model.embed_dim = 32
  c.mesh = {"data": 1, "fsdp": NUM_DEVICES, "model": 1}
  c.feature_cache.passes = passes
  c.batch_size = c.eval_batch_size = NUM_DEVICES
  c.total_steps = FINETUNE_STEPS
  c.log_every, c.eval_every, c.checkpoint.every = 1, 2, 2
  c.checkpoint.async_save = False
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """A test run's config: pre-training (`arg` empty), `finetune` or `finetune_stream`."""
  if arg == "finetune":
    return _finetune_config(FINETUNE_PASSES)
  if arg == "finetune_stream":
    return _finetune_config(0)
  if arg not in (None, ""):
    raise ValueError(f"unknown multihost_config argument {arg!r}")
  c = _load("synthetic_pretrain", "smoke")
  c.data.image_size, c.data.num_frames = IMAGE_SIZE, NUM_FRAMES
  c.data.train_split, c.data.eval_split = "train", "val"  # its data have no archive split
  c.data.augment_on_device = True  # clips made in the sharded step: 2 processes equal 1 too
  c.model.video = "mvit_tiny"  # the multi-host path of the real-size encoder family
  c.model.video_overrides = dict(VIDEO_OVERRIDES)
  c.model.embed_dim = 32
  c.text.max_len = 24
  c.mesh = {"data": 1, "fsdp": NUM_DEVICES, "model": 1}
  c.batch_size = c.eval_batch_size = 4
  c.total_steps = 3
  c.eval_every = 3  # one zero-shot evaluation, at the end
  c.checkpoint.async_save = False
  return c
