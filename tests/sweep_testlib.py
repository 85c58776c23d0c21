"""A tiny dataset and pre-training run shared by the sweep and zero-shot tests (built once).

The model, data and training settings equal those of test_train.py, so that within one pytest
session the persistent compilation cache (conftest.py) serves either module's compiles to the
other.
"""

import functools
import importlib.util
import os

from cmr_jax import runs
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.data import tokenizer as tokenizer_lib
from cmr_jax.train import pretrain

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 2-block MViT at 8 x 32 x 32: compiles and runs in seconds.
VIDEO = {"num_frames": 8, "image_size": 32, "depth": 2, "stage_starts": (1,),
         "kv_pool_stride": (1, 2, 2)}
NUM_TRAIN_VAL = 12
NUM_TEST = 4
NUM_UNLABELLED = 2
TEST_SITE, UNLABELLED_SITE = "test-site", "unlabelled-site"
KEPT_STEPS = [2, 4, 6]


def load_config(name: str, arg: str = "smoke"):
  """`configs/{name}.py`'s get_config(arg)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _split_of(splitter: splits.SubjectSplitter, record) -> str:
  if record.site == TEST_SITE:
    return "test"
  if record.site == UNLABELLED_SITE:
    return "unlabelled"
  return splitter(record)


def build_data(out: str) -> str:
  """Train/val (as test_train.py), a 4-study labelled test split and an unlabelled split."""
  items = [(f"fake-{i}", functools.partial(conftest.fake_study, 0, i, num_sax=4, matrix=48))
           for i in range(NUM_TRAIN_VAL)]
  items += [(f"fake-{i}", functools.partial(conftest.fake_study, 0, i, num_sax=4, matrix=48,
                                            site=TEST_SITE))
            for i in range(NUM_TRAIN_VAL, NUM_TRAIN_VAL + NUM_TEST)]
  first = NUM_TRAIN_VAL + NUM_TEST
  items += [(f"fake-{i}", functools.partial(conftest.fake_study, 0, i, num_sax=4, matrix=48,
                                            site=UNLABELLED_SITE, labelled=False))
            for i in range(first, first + NUM_UNLABELLED)]
  splitter = splits.SubjectSplitter(fractions=(("train", 0.6), ("val", 0.4)))
  records.build_dataset(items, out, cfg=preprocess.PreprocessConfig(size=32, spacing_mm=3.0,
                                                                      num_frames=8),
                        split_fn=functools.partial(_split_of, splitter))
  return out


def pretrain_config(data_dir: str, vocab: str):
  """The tiny pre-training run: 6 steps, checkpoints at 2, 4 and 6 all kept."""
  c = load_config("synthetic_pretrain")
  c.data.dir = data_dir
  c.text.vocab = vocab
  c.data.image_size, c.data.num_frames = 32, 8
  c.data.train_split, c.data.eval_split = "train", "val"  # its data have no archive split
  c.model.video, c.model.video_overrides = "mvit_tiny", VIDEO
  c.model.embed_dim = 32
  c.text.max_len = 24
  c.batch_size = c.eval_batch_size = 8  # one example per fake CPU device
  c.checkpoint.async_save = False
  c.checkpoint.keep_last = len(KEPT_STEPS)
  return c


def finetune_config(data_dir: str):
  """The tiny fine-tune (4 steps) matching the pre-training run's encoder."""
  c = load_config("synthetic_finetune")
  c.data.dir = data_dir
  c.data.image_size, c.data.num_frames = 32, 8
  c.model.video, c.model.video_overrides = "mvit_tiny", VIDEO
  c.model.embed_dim = 32
  c.batch_size = c.eval_batch_size = 8
  c.checkpoint.async_save = False
  return c


def get_config(data_dir: str):
  """This file as an ml_collections config file: `sweep_testlib.py:DATA_DIR` -> the fine-tune."""
  return finetune_config(data_dir)


@functools.cache
def tiny_pretrain(root: str) -> tuple[str, str]:
  """(data_dir, pretrain_dir) under `root`, built on the first call of the session."""
  data_dir = build_data(os.path.join(root, "data"))
  source = records.open_split(data_dir, "train")
  tok = tokenizer_lib.train_tokenizer([source[i].report for i in range(len(source))], 200)
  vocab = tok.save(os.path.join(root, "vocab"))
  workdir = os.path.join(root, "pretrain")
  result = pretrain.train_and_evaluate(pretrain_config(data_dir, vocab), workdir)
  assert result["step"] == KEPT_STEPS[-1]
  assert runs.checkpoint_steps(workdir) == KEPT_STEPS
  return data_dir, workdir
