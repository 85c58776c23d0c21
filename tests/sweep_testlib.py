"""A tiny dataset and pre-training run shared by the sweep and zero-shot tests (built once).

test_train.py builds its data and configs with the same helpers (test_multihost.py its data), so
that within one pytest session the persistent compilation cache (conftest.py) serves either
module's compiles to the other.
"""

import functools
import importlib.util
import os

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.data import tokenizer as tokenizer_lib
from cmr_jax import runs
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


def fake_items(indices, **kwargs) -> list:
  """(name, loader) pairs of fake studies `indices` (seed 0, 4 SAX slices, 48 x 56 pixels)."""
  return [(f"fake-{i}", functools.partial(conftest.fake_study, 0, i, num_sax=4, matrix=48,
                                          **kwargs))
          for i in indices]


def train_val_splitter() -> splits.SubjectSplitter:
  """Subjects split 60/40 into train and val."""
  return splits.SubjectSplitter(fractions=(("train", 0.6), ("val", 0.4)))


def build_records(items, out: str, split_fn=None, *, size: int = 32, num_frames: int = 8) -> str:
  """`items` preprocessed (3 mm pixels) into a dataset at `out`; by default train/val splits."""
  records.build_dataset(items, out, cfg=preprocess.PreprocessConfig(size=size, spacing_mm=3.0,
                                                                      num_frames=num_frames),
                        split_fn=train_val_splitter() if split_fn is None else split_fn)
  return out


def train_vocab(data_dir: str, out: str) -> str:
  """A 200-token WordPiece vocabulary of the train split's reports, saved under `out`."""
  source = records.open_split(data_dir, "train")
  tok = tokenizer_lib.train_tokenizer([source[i].report for i in range(len(source))], 200)
  return tok.save(out)


def build_data(out: str) -> str:
  """Train/val (as test_train.py), a 4-study labelled test split and an unlabelled split."""
  items = fake_items(range(NUM_TRAIN_VAL))
  items += fake_items(range(NUM_TRAIN_VAL, NUM_TRAIN_VAL + NUM_TEST), site=TEST_SITE)
  first = NUM_TRAIN_VAL + NUM_TEST
  items += fake_items(range(first, first + NUM_UNLABELLED), site=UNLABELLED_SITE, labelled=False)
  return build_records(items, out, functools.partial(_split_of, train_val_splitter()))


def pretrain_config(data_dir: str, vocab: str):
  """The tiny pre-training run: 6 steps, checkpoints at 2, 4 and 6."""
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
  return c


def finetune_config(data_dir: str, init: str | None = None):
  """The tiny fine-tune (4 steps) matching the pre-training run's encoder; `init`: the config's."""
  c = load_config("synthetic_finetune")
  c.data.dir = data_dir
  if init is not None:
    c.init = init
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
  vocab = train_vocab(data_dir, os.path.join(root, "vocab"))
  workdir = os.path.join(root, "pretrain")
  config = pretrain_config(data_dir, vocab)
  config.checkpoint.keep_last = len(KEPT_STEPS)  # all kept
  result = pretrain.train_and_evaluate(config, workdir)
  assert result["step"] == KEPT_STEPS[-1]
  assert runs.checkpoint_steps(workdir) == KEPT_STEPS
  return data_dir, workdir
