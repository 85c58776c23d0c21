r"""The pre-training run of tests/test_multihost.py: a 1-block MViT at 8 x 32 x 32, 3 steps.

The smoke config of configs/synthetic_pretrain.py, shrunk so that a cold compile takes seconds,
with a global batch of 4 on a 2-device mesh whose fsdp axis shards the parameters (and the
optimizer state) across the two processes of the multi-process run:

  python tools/train.py --config=tests/multihost_config.py --workdir=WORKDIR \
      --config.data.dir=DATA --config.text.vocab=VOCAB_TXT
"""

import importlib.util
import os

import ml_collections

_PRETRAIN_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs", "synthetic_pretrain.py")
IMAGE_SIZE = 32
NUM_FRAMES = 8
NUM_DEVICES = 2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The test's pre-training config; `arg` must be empty."""
  if arg not in (None, ""):
    raise ValueError(f"unknown multihost_config argument {arg!r}")
  spec = importlib.util.spec_from_file_location("synthetic_pretrain", _PRETRAIN_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.data.image_size, c.data.num_frames = IMAGE_SIZE, NUM_FRAMES
  # One block, a non-overlapping patch embedding and 1-tap pooling: a third of the compile time
  # of the 3 x 7 x 7 patch and 3 x 3 x 3 pooling kernels, which this test does not need.
  c.data.train_split, c.data.eval_split = "train", "val"  # its data have no archive split
  c.model.video = "mvit_tiny"  # the multi-host path of the real-size encoder family
  c.model.video_overrides = {"num_frames": NUM_FRAMES, "image_size": IMAGE_SIZE, "depth": 1,
                             "stage_starts": (), "patch_kernel": (2, 4, 4),
                             "patch_stride": (2, 4, 4), "patch_padding": (0, 0, 0),
                             "pool_kernel": (1, 1, 1), "kv_pool_stride": (1, 2, 2)}
  c.model.embed_dim = 32
  c.text.max_len = 24
  c.mesh = {"data": 1, "fsdp": NUM_DEVICES, "model": 1}
  c.batch_size = c.eval_batch_size = 4
  c.total_steps = 3
  c.eval_every = 3  # one zero-shot evaluation, at the end
  c.checkpoint.async_save = False
  return c
