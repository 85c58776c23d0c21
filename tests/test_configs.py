"""Every config in configs/ loads, names known models, fits its data and builds its parameters.

Parameter trees are built with `jax.eval_shape` (shapes only, no compute), so the real-size
models (MViT-B 16x4 at 16 x 224 x 224, BERT-base) are checked in seconds, including their FSDP
shardings on the 8 fake CPU devices of the test session.
"""

import functools
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from cmr_jax.models import registry
from cmr_jax import sharding
from cmr_jax.train import common
from cmr_jax.train import optim

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
DATA, PRETRAIN, FINETUNE = "data", "pretrain", "finetune"
# Every config file: what it configures and the arguments its docstring documents.
CONFIGS = {
    "synthetic_data": (DATA, (None, "small", "benchmark")),
    "synthetic_pretrain": (PRETRAIN, (None, "smoke", "benchmark")),
    "synthetic_finetune": (FINETUNE, (None, "smoke", "transfer", "transfer_smoke")),
    "mvit_b_pretrain": (PRETRAIN, (None,)),
    "mvit_b_finetune": (FINETUNE, (None, "ukbb", "kaggle")),
}
# The configs of each trainer that tests/test_train.py runs: the others must have their fields.
RUN_BY_TESTS = {PRETRAIN: "synthetic_pretrain", FINETUNE: "synthetic_finetune"}
TRAINING = [name for name, (kind, _) in CONFIGS.items() if kind != DATA]
# Published sizes: BERT-base uncased (with its pooler) and MViT-B 16x4 with its Kinetics head.
BERT_BASE_PARAMS = 109_482_240
MVIT_B_PARAMS_MILLIONS = 36.6
KINETICS_CLASSES = 400


def _get_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(_CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _fields(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  """Dotted paths of the leaves; free-form override dicts (`*_overrides`) count as leaves."""
  out = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and not key.endswith("_overrides"):
      out |= _fields(value, f"{prefix}{key}.")
    else:
      out.add(prefix + key)
  return out


@functools.lru_cache(maxsize=None)
def _abstract_params(name: str):
  """Shapes and dtypes of the config's parameter tree (boxed, with logical axis names)."""
  config = _get_config(name)
  d = config.data
  video = jnp.zeros((1, d.num_frames, d.image_size, d.image_size), jnp.uint8)
  if CONFIGS[name][0] == PRETRAIN:
    model = registry.pretrain_model(config, config.text.vocab_size)
    inputs = {"video": video, "text_ids": jnp.zeros((1, config.text.max_len), jnp.int32),
              "text_mask": jnp.ones((1, config.text.max_len), jnp.int32)}
  else:  # one instance per bag: the parameters do not depend on the bag size
    model = registry.lvef_model(config, mean=60.0)
    inputs = {"video": video[:, None], "mask": jnp.ones((1, 1), bool)}
  return jax.eval_shape(lambda rng: model.init(rng, **inputs)["params"], jax.random.key(0))


def test_every_config_file_is_listed():
  names = sorted(f[:-3] for f in os.listdir(_CONFIG_DIR)
                 if f.endswith(".py") and not f.startswith("_"))
  assert names == sorted(CONFIGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, (_, args) in CONFIGS.items() for a in args])
def test_config_loads(name, arg):
  config = _get_config(name, arg)
  assert isinstance(config, ml_collections.ConfigDict) and config
  kind = CONFIGS[name][0]
  if kind != DATA:
    # The trainers read exactly the fields of the configs the training tests run.
    assert _fields(config) == _fields(_get_config(RUN_BY_TESTS[kind]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unknown_argument_is_refused(name):
  with pytest.raises(ValueError, match="argument 'nonsense'"):
    _get_config(name, "nonsense")


@pytest.mark.parametrize("name", TRAINING)
def test_models_exist_and_fit_the_data(name):
  config = _get_config(name)
  m, d = config.model, config.data
  video = registry.video_config(m.video, **dict(m.video_overrides))
  assert (video.num_frames, video.image_size) == (d.num_frames, d.image_size)
  if CONFIGS[name][0] == PRETRAIN and not m.two_clips:
    assert config.text.max_len <= registry.text_config(m.text).max_len


@pytest.mark.parametrize("name", TRAINING)
def test_parameters_build_and_shard_on_the_mesh(name):
  config = _get_config(name)
  abstract = _abstract_params(name)
  params = common.unbox(abstract)
  assert optim.count_params(params["video_encoder"]) > 0
  # Parameters (and so the optimizer state) stay float32 whatever the compute dtype.
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  mesh = sharding.make_mesh(config.mesh.to_dict())  # the session's 8 fake devices
  batch_ways = math.prod(mesh.shape[axis] for axis in sharding.BATCH_AXES)
  assert config.batch_size % batch_ways == 0 and config.eval_batch_size % batch_ways == 0
  shardings = sharding.logical_shardings(abstract, mesh)
  if mesh.shape["fsdp"] > 1:  # nearly every parameter is split over the fsdp axis
    sizes = [(math.prod(p.shape), any(s.spec)) for p, s in zip(jax.tree.leaves(params),
                                                                jax.tree.leaves(shardings))]
    assert sum(n for n, split in sizes if split) > 0.95 * sum(n for n, _ in sizes)


def test_real_size_models_have_the_published_parameter_counts():
  params = common.unbox(_abstract_params("mvit_b_pretrain"))
  assert optim.count_params(params["text_encoder"]) == BERT_BASE_PARAMS
  width = registry.video_config("mvit_b_16x4").width
  head = width * KINETICS_CLASSES + KINETICS_CLASSES
  assert round((optim.count_params(params["video_encoder"]) + head) / 1e6, 1) == (
      MVIT_B_PARAMS_MILLIONS)
  # Fine-tuning builds the same encoder with the same projection to the 512-d embedding.
  tuned = common.unbox(_abstract_params("mvit_b_finetune"))
  for part in ("video_encoder", "video_proj"):
    assert jax.tree.map(lambda x: x.shape, tuned[part]) == jax.tree.map(lambda x: x.shape,
                                                                        params[part])
