"""Scanned MViT block runs (`MViTConfig.scan_blocks`): same numbers as the unscanned model, and
parameters converted between the stacked and per-block layouts wherever they are loaded."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmr_jax.convert import mapping
from cmr_jax.models import registry
from cmr_jax.models import stacking
from cmr_jax import runs
from cmr_jax import sharding

# mvit_tiny has no two blocks alike; two more blocks after its last stage start make a run (5, 6).
# A smaller input keeps the tests cheap.
GEOMETRY = dict(depth=7, num_frames=8, image_size=32, kv_pool_stride=(1, 2, 2))
RUN = "blocks_5_6"


def _video() -> jnp.ndarray:
  shape = (2, GEOMETRY["num_frames"], GEOMETRY["image_size"], GEOMETRY["image_size"])
  return jnp.asarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))


@functools.cache
def _models_and_params():
  """The unscanned and scanned tiny MViT and the same random parameters in both layouts."""
  plain = registry.video_encoder("mvit_tiny", **GEOMETRY)
  scanned = registry.video_encoder("mvit_tiny", **GEOMETRY, scan_blocks=True)
  params = nn.meta.unbox(jax.jit(plain.init)(jax.random.key(0), _video()))["params"]
  # Perturbed so that LayerNorm scales and biases differ from block to block.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), params)
  abstract = nn.meta.unbox(jax.eval_shape(scanned.init, jax.random.key(0), _video()))["params"]
  return plain, scanned, params, abstract


def test_runs_group_identical_blocks_only_when_asked():
  assert registry.video_config("mvit_b_16x4").block_runs() == tuple((i, i) for i in range(16))
  runs_b = registry.video_config("mvit_b_16x4", scan_blocks=True).block_runs()
  assert runs_b == ((0, 0), (1, 1), (2, 2), (3, 3), (4, 12), (13, 13), (14, 14), (15, 15))
  assert registry.video_config("mvit_tiny", scan_blocks=True).block_runs() == tuple(
      (i, i) for i in range(5))


def test_scanned_model_computes_what_the_unscanned_one_does():
  plain, scanned, params, abstract = _models_and_params()
  stacked = stacking.match_blocks(params, abstract)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda s: s.shape, abstract)
  assert stacked[RUN]["attn"]["q"]["kernel"].shape == (2, 128, 128)
  assert sum(x.size for x in jax.tree.leaves(stacked)) == sum(x.size for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(stacked[RUN]["mlp"]["fc1"]["kernel"][1],
                                params["blocks_6"]["mlp"]["fc1"]["kernel"])
  video = _video()

  def loss(model):
    def fn(p):
      features = model.apply({"params": p}, video, train=True, rngs={"dropout": jax.random.key(1)})
      return jnp.sum(jnp.sin(features))
    return jax.jit(jax.value_and_grad(fn))

  want, want_grads = loss(plain)(params)
  got, got_grads = loss(scanned)(stacked)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got_grads = stacking.match_blocks(got_grads, params)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  # Summation order differs: tolerances relative to the largest gradient (some gradients, such
  # as the key biases', are zero up to rounding).
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # Back to the per-block layout, bit for bit.
  back = stacking.match_blocks(stacked, params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_scanned_drop_path_acts_only_in_training_and_remat_scans():
  # With remat too: each scanned block rematerialised.
  model = registry.video_encoder("mvit_tiny", **GEOMETRY, scan_blocks=True, droppath_rate=0.9,
                                 remat=True)
  _, _, params, abstract = _models_and_params()
  stacked = stacking.match_blocks(params, abstract)
  video = _video()
  apply = jax.jit(lambda p, key, train: model.apply({"params": p}, video, train=train,
                                                    rngs={"dropout": key}), static_argnums=2)
  evaluated = apply(stacked, jax.random.key(0), False)
  trained = [np.asarray(apply(stacked, jax.random.key(k), True)) for k in range(2)]
  assert not np.allclose(trained[0], evaluated, atol=1e-4)
  assert not np.allclose(trained[0], trained[1], atol=1e-4)
  # In evaluation, the same model as without drop path.
  _, scanned, _, _ = _models_and_params()
  np.testing.assert_allclose(evaluated, jax.jit(scanned.apply)({"params": stacked}, video),
                             rtol=1e-5, atol=1e-6)


def test_stacking_refuses_what_does_not_fit():
  _, _, params, abstract = _models_and_params()
  incomplete = {k: v for k, v in params.items() if k != "blocks_6"}
  with pytest.raises(ValueError, match="cannot stack blocks_5_6: no parameters for blocks_6"):
    stacking.stack_blocks(incomplete, abstract)
  wrong = {"blocks_2_4": {"kernel": np.zeros((2, 3))}}
  with pytest.raises(ValueError, match="blocks_2_4: stacked axis of length \\[2\\], expected 3"):
    stacking.unstack_blocks(wrong)


def test_per_block_weights_load_into_a_scanned_model_and_checkpoints_cross_over(tmp_path):
  _, _, params, abstract = _models_and_params()
  # A converted-weights conversion of per-block names onto a scanned target stacks the run.
  target = mapping.flatten({"video_encoder": abstract})
  state = {k: np.asarray(v) for k, v in mapping.flatten({"video_encoder": params}).items()}
  flat, report = mapping.convert(state, lambda n, v: [(n, v)], target, source="t", layout="ours")
  report.check()
  assert set(flat) == set(target)
  np.testing.assert_array_equal(flat[f"video_encoder/{RUN}/attn/proj/bias"][0],
                                params["blocks_5"]["attn"]["proj"]["bias"])
  # A missing block tensor is named per block.
  del state["video_encoder/blocks_6/attn/q/kernel"]
  _, report = mapping.convert(state, lambda n, v: [(n, v)], target, source="t", layout="ours")
  assert report.missing == ["video_encoder/blocks_6/attn/q/kernel"]
  # An unscanned checkpoint fits a scanned model (and back); anything else still fails by name.
  restacked = runs.in_block_layout(params, abstract, "scanned")
  assert restacked[RUN]["norm1"]["scale"].shape == (2, 128)
  runs.check_fit(abstract, restacked, "scanned")
  runs.check_fit(params, runs.in_block_layout(restacked, params, "unscanned"), "unscanned")
  with pytest.raises(ValueError, match=r"^old run \(cannot stack blocks_5_6: no parameters for "
                     r"blocks_6\)$"):
    runs.in_block_layout({k: v for k, v in params.items() if k != "blocks_6"}, abstract, "old run")


def test_stacked_axis_is_replicated_by_the_sharding_rules():
  _, scanned, _, _ = _models_and_params()
  boxed = jax.eval_shape(scanned.init, jax.random.key(0), _video())["params"]
  spec = nn.get_partition_spec(boxed)[RUN]["mlp"]["fc1"]["kernel"]
  assert spec == jax.sharding.PartitionSpec("layers", "embed", "mlp")
  assert nn.logical_to_mesh_axes(spec, sharding.LOGICAL_AXIS_RULES) == jax.sharding.PartitionSpec(
      None, "fsdp", "model")
