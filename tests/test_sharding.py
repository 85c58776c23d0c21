"""Tests of the mesh, the logical-axis shardings and sharded training-step equivalence.

tests/conftest.py gives every test process 8 (fake) CPU devices.
"""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cmr_jax import losses, sharding
from cmr_jax.models import registry

import sweep_testlib

# A dual encoder with every parameter kind (pooling convs, norms, embeddings) that compiles fast:
# 1x1x1 pooling kernels keep the backward of the strided-tap pooling small to compile.
TINY_VIDEO = dict(num_frames=4, image_size=16, depth=1, stage_starts=(), kv_pool_stride=(1, 2, 2),
                  pool_kernel=(1, 1, 1))
TINY_TEXT = dict(num_layers=1, vocab_size=50, max_len=16)
GLOBAL_BATCH = 8


def _key(seed: int = 0) -> jax.Array:
  # The "rbg" generator compiles several times faster than threefry on CPU.
  return jax.random.key(seed, impl="rbg")


def test_make_mesh_fills_the_free_axis_and_rejects_bad_shapes():
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh({"data": 1}, jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1,
                                                                            "model": 1}
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"batch": -1})
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.make_mesh({"data": -1, "fsdp": 3})
  with pytest.raises(ValueError, match="needs 4 devices, have 8"):
    sharding.make_mesh({"data": 2, "fsdp": 2})


class _Toy(nn.Module):
  """Two partitioned layers: one width divisible by the fsdp ways, one not."""

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(1.0)
    w1 = self.param("w1", nn.with_logical_partitioning(init, ("embed", "mlp")), (8, 6))
    w2 = self.param("w2", nn.with_logical_partitioning(init, ("embed", "mlp")), (3, 4))
    scale = self.param("scale", init, (6,))  # not annotated: replicated
    return (x @ w1) * scale + jnp.sum(w2)


def test_logical_shardings_follow_rules_and_fall_back_to_replication():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  x = jnp.ones((2, 8))
  toy = _Toy()
  variables, shardings = sharding.init_sharded(lambda r: toy.init(r, x), _key(), mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings["params"])
  assert specs["w1"] == P("fsdp", "model")  # embed -> fsdp (4 ways), mlp -> model (1 way)
  assert specs["w2"] == P(None, "model")  # 3 rows do not split 4 ways: replicated
  assert specs["scale"] == P(None)
  assert variables["params"]["w1"].sharding.spec == P("fsdp", "model")
  assert variables["params"]["w1"].addressable_shards[0].data.shape == (2, 6)
  # The sharded initialisation holds the same values as a plain one.
  plain = nn.meta.unbox(toy.init(_key(), x))
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_shard_batch_splits_rows_and_rejects_indivisible_batches():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  batch = {"video": np.arange(8 * 3, dtype=np.uint8).reshape(8, 3), "lvef": np.arange(8.0)}
  out = sharding.shard_batch(batch, mesh)
  assert out["video"].sharding.spec == P(("data", "fsdp"))
  assert [s.data.shape for s in out["video"].addressable_shards] == [(1, 3)] * 8
  np.testing.assert_array_equal(np.asarray(out["lvef"]), batch["lvef"])
  # 6 rows do not split 8 ways: over `data` only (each fsdp group of 4 devices shares 3 rows).
  out = sharding.shard_batch({"lvef": np.arange(6.0)}, mesh)
  assert out["lvef"].sharding.spec == P("data")
  assert [s.data.shape for s in out["lvef"].addressable_shards] == [(3,)] * 8
  np.testing.assert_array_equal(np.asarray(out["lvef"]), np.arange(6.0))
  with pytest.raises(ValueError, match=r"batch\['lvef'\].*minimum batch is 2"):
    sharding.shard_batch({"lvef": np.arange(5.0)}, mesh)


# A 64-device cluster: 16 hosts of 4 devices (e.g. v5p-128 or 16 nodes of 4 GPUs).
_HOSTS, _PER_HOST = 16, 4


def test_mesh_rules_put_fsdp_on_one_host_and_data_over_the_hosts():
  rule = functools.partial(sharding.resolve_mesh_shape, ici_devices=_PER_HOST)
  assert rule({"data": -1, "fsdp": 0}, 64) == {"data": 16, "fsdp": 4, "model": 1}
  assert rule({"data": -1, "fsdp": 0, "model": 2}, 64) == {"data": 16, "fsdp": 2, "model": 2}
  assert rule({"data": -1, "fsdp": 0}, 4) == {"data": 1, "fsdp": 4, "model": 1}  # one host
  assert rule(None, 64) == {"data": 64, "fsdp": 1, "model": 1}
  with pytest.raises(ValueError, match="model=3 does not divide the 4 devices of one host"):
    rule({"data": -1, "fsdp": 0, "model": 3}, 64)
  with pytest.raises(ValueError, match="does not divide 64 devices"):
    rule({"data": -1, "fsdp": 3}, 64)


def test_batch_rules_fit_small_batches_and_name_the_minimum():
  per_host = {"data": 16, "fsdp": 4, "model": 1}
  assert sharding.batch_axes(per_host, 256, _HOSTS) == ("data", "fsdp")
  assert sharding.batch_axes(per_host, 64, _HOSTS) == ("data", "fsdp")
  # The fine-tuning batches (32 or 16 bags): one or two bags per host, over `data` only.
  assert sharding.batch_axes(per_host, 32, _HOSTS) == ("data",)
  assert sharding.batch_axes(per_host, 16, _HOSTS) == ("data",)
  with pytest.raises(ValueError, match="minimum batch is 16"):
    sharding.batch_axes(per_host, 8, _HOSTS)
  with pytest.raises(ValueError, match="minimum batch is 16"):
    sharding.batch_axes(per_host, 24, _HOSTS)
  # FSDP over all 64 devices (data=1) cannot take 16 bags from 16 processes: each process must
  # feed its own rows, so `data` must reach every process.
  with pytest.raises(ValueError, match="minimum batch is 16"):
    sharding.batch_axes({"data": 1, "fsdp": 64, "model": 1}, 16, _HOSTS)
  assert sharding.batch_axes({"data": 1, "fsdp": 64, "model": 1}, 64, _HOSTS) == BATCH


BATCH = ("data", "fsdp")


@pytest.mark.parametrize("name,arg", [("mvit_b_finetune", "ukbb"), ("mvit_b_finetune", "kaggle"),
                                      ("mvit_b_pretrain", None)])
def test_real_configs_fit_64_devices_on_16_hosts(name, arg):
  config = sweep_testlib.load_config(name, arg)
  sizes = sharding.resolve_mesh_shape(config.mesh.to_dict(), 64, ici_devices=_PER_HOST)
  assert sizes == {"data": 16, "fsdp": 4, "model": 1}
  for batch in (config.batch_size, config.eval_batch_size):
    assert sharding.batch_axes(sizes, batch, _HOSTS)


def test_hybrid_mesh_puts_data_over_slices():
  # 4 slices of 8 devices (2 hosts each): data=8 spans them, 2 grid rows per slice.
  devices = [types.SimpleNamespace(id=i, slice_index=i // 8, process_index=i // 4,
                                   platform="gpu", device_kind="fake") for i in range(32)]
  assert sharding.num_slices(devices) == 4 and sharding.ici_devices(devices) == 4
  sizes = sharding.resolve_mesh_shape({"data": -1, "fsdp": 0, "model": 2}, 32,
                                      ici_devices=sharding.ici_devices(devices))
  assert sizes == {"data": 8, "fsdp": 2, "model": 2}
  grid = sharding.hybrid_device_grid(devices, sizes)
  assert grid.shape == (8, 2, 2)
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  assert (slice_of == np.arange(8)[:, None, None] // 2).all()  # 2 data rows per slice (DCN)
  host_of = np.vectorize(lambda d: d.process_index)(grid)
  assert (host_of == np.arange(8)[:, None, None]).all()  # fsdp x model on one host
  with pytest.raises(ValueError, match="data=2 must be a multiple of the 4 slices"):
    sharding.hybrid_device_grid(devices, {"data": 2, "fsdp": 8, "model": 2})
  assert sharding.ici_devices(jax.devices()) == 8  # one process: its devices


def test_clip_loss_on_eight_devices_equals_one_device():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(GLOBAL_BATCH, 16)).astype(np.float32)
  b = rng.normal(size=(GLOBAL_BATCH, 16)).astype(np.float32)
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  scale = jnp.asarray(np.log(20.0), jnp.float32)
  one = jax.jit(losses.clip_loss)(jax.device_put(a, jax.devices()[0]),
                                  jax.device_put(b, jax.devices()[0]), scale)[0]
  mesh = sharding.make_mesh({"data": 8})
  sharded = sharding.shard_batch({"a": a, "b": b}, mesh)
  assert len(sharded["a"].addressable_shards) == 8
  eight = jax.jit(losses.clip_loss)(sharded["a"], sharded["b"], scale)[0]
  np.testing.assert_allclose(float(eight), float(one), rtol=1e-6)
  # Negatives come from the global batch: the loss differs from the mean of per-shard losses.
  per_shard = np.mean([float(losses.clip_loss(a[i:i + 1], b[i:i + 1], scale)[0])
                       for i in range(GLOBAL_BATCH)])
  assert abs(per_shard - float(one)) > 0.1
  # The variance floor's spread is over the global batch too.
  one_floor = jax.jit(losses.variance_floor)(jax.device_put(a, jax.devices()[0]))
  eight_floor = jax.jit(losses.variance_floor)(sharded["a"])
  np.testing.assert_allclose(np.asarray(eight_floor), np.asarray(one_floor), rtol=1e-6)


def _loss_and_grads(model):
  def loss_and_grads(params, batch):
    def loss_fn(p):
      emb_a, emb_b, log_scale = model.apply({"params": p}, batch["video"], batch["text_ids"],
                                            batch["text_mask"])
      return losses.clip_loss(emb_a, emb_b, log_scale)[0]

    return jax.value_and_grad(loss_fn)(params)

  return loss_and_grads


def test_dual_encoder_loss_and_grads_match_one_device_under_data_and_fsdp_sharding():
  # remat=True: the rematerialised backward must give the same gradients too.
  model = registry.dual_encoder("mvit_tiny", "bert_tiny", embed_dim=16, remat=True,
                               video_overrides=TINY_VIDEO, text_overrides=TINY_TEXT)
  rng = np.random.default_rng(1)
  batch = {"video": rng.integers(0, 256, (GLOBAL_BATCH, 4, 16, 16), dtype=np.uint8),
           "text_ids": rng.integers(0, 50, (GLOBAL_BATCH, 6)).astype(np.int32),
           "text_mask": (np.arange(6) < rng.integers(2, 7, (GLOBAL_BATCH, 1))).astype(np.int32)}
  step = _loss_and_grads(model)
  abstract = jax.eval_shape(model.init, _key(), batch["video"][:1], batch["text_ids"][:1],
                            batch["text_mask"][:1])
  # Any parameter values do here (random ones compile faster than the initialisers).
  params = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(x.dtype),
                        nn.meta.unbox(abstract)["params"])
  params["logit_scale"] = np.float32(np.log(1 / 0.07))  # CLIP's initial temperature
  ref_loss, ref_grads = jax.jit(step)(jax.device_put(params, jax.devices()[0]), batch)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  # One compile covers both kinds: the batch splits 8 ways over data (2) x fsdp (4), and the
  # parameters and their gradients split 4 ways over fsdp. (Each layout costs a compile.)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  shardings = sharding.logical_shardings(abstract, mesh)["params"]
  sharded_params = jax.device_put(params, shardings)
  sharded_batch = sharding.shard_batch(batch, mesh)
  assert [s.data.shape[0] for s in sharded_batch["video"].addressable_shards] == [1] * GLOBAL_BATCH
  with sharding.mesh_rules(mesh):
    loss, grads = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                          out_shardings=(None, shardings))(sharded_params, sharded_batch)
  fc1 = grads["video_encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == P("fsdp", "model")
  assert fc1.addressable_shards[0].data.shape == (16 // 4, 64)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for path, got in jax.tree_util.tree_leaves_with_path(grads):
    want = ref_grads
    for key in path:
      want = want[key.key]
    # float32 sums in another order; some gradients (e.g. of key biases) are exactly 0 + noise.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_bags_fewer_than_devices_train_like_one_device():
  # 2 bags of 4 cines on 8 devices (data=2 x fsdp=4): the bags split over `data` only and the
  # encoder's 8 cines over all 8 devices (the activation constraint); same loss and gradients.
  config = sweep_testlib.finetune_config("unused")
  config.mode = "transfer"  # gradients through the encoder too
  config.data.image_size, config.data.num_frames, config.data.max_instances = 16, 4, 4
  config.model.video_overrides = TINY_VIDEO
  model = registry.lvef_model(config, 50.0)
  rng = np.random.default_rng(2)
  batch = {"video": rng.integers(0, 256, (2, 4, 4, 16, 16), dtype=np.uint8),
           "mask": np.array([[True] * 4, [True, True, False, False]]),
           "lvef": np.array([40.0, 65.0], np.float32)}
  abstract = jax.eval_shape(registry.lvef_init_fn(model, config), _key())
  params = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(x.dtype),
                        nn.meta.unbox(abstract))

  def loss_and_grads(p, b):
    def loss_fn(q):
      pred, _ = model.apply({"params": q}, b["video"], b["mask"])
      return losses.huber_loss(pred, b["lvef"], delta=1.0)

    return jax.value_and_grad(loss_fn)(p)

  ref_loss, ref_grads = jax.jit(loss_and_grads)(jax.device_put(params, jax.devices()[0]), batch)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  assert sharding.batch_sharding(mesh, 2).spec == P(("data",))
  shardings = sharding.logical_shardings(abstract, mesh)
  sharded_batch = sharding.shard_batch(batch, mesh)
  assert [s.data.shape[0] for s in sharded_batch["video"].addressable_shards] == [1] * 8
  step = jax.jit(loss_and_grads, in_shardings=(shardings, sharding.batch_sharding(mesh, 2)),
                 out_shardings=(None, shardings))
  with sharding.mesh_rules(mesh):
    loss, grads = step(jax.device_put(params, shardings), sharded_batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                                                       atol=1e-5 * scale), grads, ref_grads)
