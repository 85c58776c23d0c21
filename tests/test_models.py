"""Tests of the video/text encoders, the MIL head, the dual encoder and the losses."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmr_jax import losses
from cmr_jax.models import registry, heads, layers, mvit, r2plus1d

# torchvision documents mvit_v1_b (the same network as pytorchvideo's mvit_base_16x4) at
# 36,610,672 parameters, 307,600 of which are its 400-class Kinetics head (768 * 400 + 400).
MVIT_B_WITH_HEAD_PARAMS = 36_610_672
KINETICS_HEAD_PARAMS = 768 * 400 + 400
# A small MViT that still has every block kind: a width change (block 0) and query pooling (1).
SMALL_VIDEO = dict(num_frames=4, image_size=32, depth=2, stage_starts=(1,),
                   kv_pool_stride=(1, 2, 2))
SMALL_TEXT = dict(num_layers=1, vocab_size=50, max_len=16)


def _key(seed: int = 0) -> jax.Array:
  # The "rbg" generator compiles several times faster than threefry on CPU; any key works here.
  return jax.random.key(seed, impl="rbg")


@functools.cache
def _small_dual():
  """A small video-text dual encoder and its parameters, shared by the tests below."""
  model = registry.dual_encoder("mvit_tiny", "bert_tiny", embed_dim=16,
                               video_overrides=SMALL_VIDEO, text_overrides=SMALL_TEXT)
  video = np.zeros((1, 4, 32, 32), np.uint8)
  ids = np.zeros((1, 6), np.int32)
  return model, nn.meta.unbox(jax.jit(model.init)(_key(), video, ids, ids))["params"]


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract_params(model, *args):
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))["params"]


def _uint8(rng: np.random.Generator, shape) -> np.ndarray:
  return rng.integers(0, 256, shape, dtype=np.uint8)


@functools.cache
def _abstract_video_variables(name: str):
  model = registry.video_encoder(name)
  c = model.config
  video = jax.ShapeDtypeStruct((2, c.num_frames, c.image_size, c.image_size), jnp.uint8)
  return model, video, jax.eval_shape(model.init, jax.random.key(0), video)


def test_mvit_b_parameter_count_and_layouts_match_pytorchvideo():
  params = nn.meta.unbox(_abstract_video_variables("mvit_b_16x4")[2])["params"]
  assert _count(params) == MVIT_B_WITH_HEAD_PARAMS - KINETICS_HEAD_PARAMS
  # torch [out, in, t, h, w] and [out, in] layouts, transposed.
  assert params["patch_embed"]["patch_model"]["kernel"].shape == (3, 7, 7, 3, 96)
  pos = params["cls_positional_encoding"]
  assert pos["pos_embed_spatial"].shape == (1, 56 * 56, 96)
  assert pos["pos_embed_temporal"].shape == (1, 8, 96)
  assert params["blocks_0"]["mlp"]["fc2"]["kernel"].shape == (384, 192)
  assert params["blocks_0"]["proj"]["kernel"].shape == (96, 192)
  assert params["blocks_14"]["attn"]["pool_q"]["kernel"].shape == (3, 3, 3, 1, 96)
  assert "pool_q" not in params["blocks_15"]["attn"]
  assert params["norm_embed"]["scale"].shape == (768,)


def test_mvit_b_geometry_follows_pytorchvideo_builder():
  plan = registry.video_config("mvit_b_16x4").blocks()
  assert [b.dim for b in plan] == [96] + [192] * 2 + [384] * 11 + [768] * 2
  assert [b.num_heads for b in plan] == [1] + [2] * 2 + [4] * 11 + [8] * 2
  assert [i for i, b in enumerate(plan) if b.dim != b.dim_out] == [0, 2, 13]
  assert [i for i, b in enumerate(plan) if b.q_stride] == [1, 3, 14]
  # Adaptive key/value stride: (1, 8, 8) halved spatially at every query-pooling block.
  assert [b.kv_stride for b in plan] == ([(1, 8, 8)] + [(1, 4, 4)] * 2 + [(1, 2, 2)] * 11
                                         + [(1, 1, 1)] * 2)
  assert plan[0].thw_in == (8, 56, 56) and plan[-1].thw_out == (8, 7, 7)


@pytest.mark.parametrize("name", sorted(registry.VIDEO_CONFIGS))
def test_video_config_output_shapes(name):
  model, video, variables = _abstract_video_variables(name)
  out = jax.eval_shape(model.apply, variables, video)
  assert out.shape == (2, model.config.width) and out.dtype == jnp.float32


def test_remat_and_dtype_options_keep_the_parameter_tree():
  _, video, variables = _abstract_video_variables("mvit_tiny")
  fast = registry.video_encoder("mvit_tiny", dtype="bfloat16", remat=True)
  other = jax.eval_shape(fast.init, jax.random.key(0), video)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(other)) == jax.tree.map(
      lambda x: (x.shape, x.dtype), nn.meta.unbox(variables))  # float32 parameters either way


@pytest.mark.parametrize("name", sorted(registry.TEXT_CONFIGS))
def test_text_config_output_shapes(name):
  model = registry.text_encoder(name)
  ids = jax.ShapeDtypeStruct((2, 24), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), ids, ids)
  assert jax.eval_shape(model.apply, variables, ids, ids).shape == (2, model.config.hidden_size)


def test_bert_base_parameter_count_matches_bert_base():
  # BERT-base-uncased (HF BertModel, with pooler) has 109,482,240 parameters.
  params = _abstract_params(registry.text_encoder("bert_base"),
                            *[jax.ShapeDtypeStruct((1, 8), jnp.int32)] * 2)
  assert _count(params) == 109_482_240


def test_unknown_config_and_bad_input_raise():
  with pytest.raises(ValueError, match="unknown video config 'mvit_huge'"):
    registry.video_config("mvit_huge")
  with pytest.raises(ValueError, match="stage_starts"):
    registry.video_config("mvit_tiny", depth=2)
  model = registry.video_encoder("mvit_tiny")
  with pytest.raises(ValueError, match=r"\(T, H, W\) = \(16, 64, 64\)"):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 32, 32), jnp.uint8))
  text = registry.text_encoder("bert_tiny")
  too_long = jax.ShapeDtypeStruct((1, 200), jnp.int32)
  with pytest.raises(ValueError, match="exceeds the encoder's max_len 128"):
    jax.eval_shape(text.init, jax.random.key(0), too_long, too_long)


@pytest.mark.parametrize("looped", [False, True], ids=["unrolled", "looped"])
def test_depthwise_conv_and_max_pool_match_lax_reference(looped):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 7, 6, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)

  def reference(x, kernel, stride):
    return jax.lax.conv_general_dilated(x, kernel[..., None, :], stride, [(1, 1)] * 3,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                        feature_group_count=5)

  for stride in [(1, 2, 2), (2, 1, 3)]:  # strided, so the backward's dilation is exercised
    weights = jnp.asarray(rng.normal(size=reference(x, kernel, stride).shape), jnp.float32)

    def value_and_grads(conv):  # a loss that weighs every output differently
      loss = lambda x, k: jnp.sum(conv(x, k, stride) * weights)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)

    got = value_and_grads(lambda x, k, s: mvit.depthwise_conv3d(x, k, s, looped))
    want = value_and_grads(reference)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # loss, dx, dkernel
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  padding = [(0, 0), (1, 1), (1, 1)]
  weights = jnp.asarray(rng.normal(size=(2, 4, 4, 3, 5)), jnp.float32)

  def pooled_loss(pool):
    return jax.jit(jax.value_and_grad(lambda x: jnp.sum(pool(x) * weights)))

  got = pooled_loss(lambda x: mvit.max_pool3d(x, (1, 3, 3), (1, 2, 2), looped))(x)
  want = pooled_loss(lambda x: nn.max_pool(x, (1, 3, 3), (1, 2, 2), padding=padding))(x)
  np.testing.assert_array_equal(got[0], want[0])  # the maxima exactly
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)  # no ties: the same gradient
  # With ties the gradient goes to the first maximum of each window in (t, h, w) order, as in
  # PyTorch's MaxPool3d: on a constant 4x4 image each 3x3 window (stride 2, padding 1) hands its
  # gradient to its top-left pixel inside the image.
  grad = jax.grad(lambda x: jnp.sum(mvit.max_pool3d(x, (1, 3, 3), (1, 2, 2), looped)))(
      jnp.ones((1, 1, 4, 4, 1)))
  np.testing.assert_array_equal(grad[0, 0, :, :, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                                                      [0, 0, 0, 0]])


def test_pool_loop_setting_keeps_the_model_and_is_checked():
  rng = np.random.default_rng(2)
  video = _uint8(rng, (2, 4, 32, 32))
  variables = {"params": _small_dual()[1]["video_encoder"]}
  outs = []
  for loop in ("unrolled", "looped"):
    model = registry.video_encoder("mvit_tiny", pool_loop=loop, **SMALL_VIDEO)
    loss = lambda p: jnp.sum(model.apply({"params": p}, video) ** 2)  # noqa: B023
    outs.append(jax.jit(jax.value_and_grad(loss))(variables["params"]))
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # float sums in another order
  assert mvit.looped_taps("auto") == (jax.default_backend() == "cpu")
  with pytest.raises(ValueError, match="pool_loop 'sometimes' is not one of"):
    registry.video_encoder("mvit_tiny", pool_loop="sometimes")


def test_factorised_convolutions_match_lax_3d_convolutions():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 9, 9, 3)).astype(np.float32)  # [B, T, H, W, C]
  dims = ("NDHWC", "DHWIO", "NDHWC")
  conv3d = lambda x, k, stride, pad: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, stride, pad, dimension_numbers=dims)
  spatial = r2plus1d.SpatialConv(4, 3, 2)
  sp = spatial.init(_key(), x)
  kernel = nn.meta.unbox(sp)["params"]["conv"]["kernel"]  # [3, 3, 3, 4]
  np.testing.assert_allclose(spatial.apply(sp, x),
                             conv3d(x, kernel[None], (1, 2, 2), [(0, 0), (1, 1), (1, 1)]),
                             rtol=1e-5, atol=1e-5)
  for stride in (1, 2):
    temporal = r2plus1d.TemporalConv(4, 3, stride)
    tp = temporal.init(_key(1), x)
    kernel = nn.meta.unbox(tp)["params"]["kernel"]  # [3, 3, 4]
    want = conv3d(x, kernel[:, None, None], (stride, 1, 1), [(1, 1), (0, 0), (0, 0)])
    np.testing.assert_allclose(temporal.apply(tp, x), want, rtol=1e-5, atol=1e-5)


def test_r2plus1d_clips_are_encoded_independently_of_their_batch():
  rng = np.random.default_rng(4)
  model = registry.video_encoder("r2plus1d_tiny", image_size=32, num_frames=8)
  video = _uint8(rng, (3, 8, 32, 32))
  variables = jax.jit(model.init)(_key(), video[:1])
  encode = jax.jit(model.apply)
  together = encode(variables, video)
  alone = np.concatenate([encode(variables, video[i:i + 1]) for i in range(3)])
  # GroupNorm, no batch statistics: a clip's features do not depend on its batch-mates.
  np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
  assert together.shape == (3, 128) and not np.allclose(together[0], together[1])
  with pytest.raises(ValueError, match="one entry per stage"):
    registry.video_config("r2plus1d_tiny", blocks=(1, 1))


def test_bag_of_words_ignores_padding_and_tells_reports_apart():
  model = registry.text_encoder("bow_tiny", vocab_size=50)
  ids = np.array([[5, 6, 7, 0, 0], [5, 6, 8, 0, 0]], np.int32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], np.int32)
  variables = jax.jit(model.init)(_key(), ids, mask)
  out = model.apply(variables, ids, mask)
  repadded = np.where(mask == 1, ids, 49)
  np.testing.assert_allclose(model.apply(variables, repadded, mask), out, rtol=1e-6)
  cosine = float(out[0] @ out[1] / np.linalg.norm(out[0]) / np.linalg.norm(out[1]))
  assert cosine < 0.99  # one word apart is already a different embedding at initialisation


def test_preprocess_video_normalises_and_copies_grey():
  video = jnp.array([[[[0, 255]]]], jnp.uint8)  # [1, T=1, H=1, W=2]
  out = mvit.preprocess_video(video)
  assert out.shape == (1, 1, 1, 2, 3)
  np.testing.assert_allclose(out[0, 0, 0, :, 0], [-0.45 / 0.225, 0.55 / 0.225], rtol=1e-6)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_mvit_variants_agree_and_dropout_acts_only_in_training():
  rng = np.random.default_rng(1)
  video = _uint8(rng, (2, 4, 32, 32))
  variables = {"params": _small_dual()[1]["video_encoder"]}
  model = registry.video_encoder("mvit_tiny", dropout_rate=0.3, droppath_rate=0.5, **SMALL_VIDEO)
  apply = jax.jit(model.apply, static_argnames="train")
  ref = apply(variables, video)
  assert ref.shape == (2, model.config.width) and np.all(np.isfinite(ref))
  assert not np.allclose(ref[0], ref[1], atol=1e-3)  # different clips, different features
  a = apply(variables, video, train=True, rngs={"dropout": _key(1)})
  b = apply(variables, video, train=True, rngs={"dropout": _key(2)})
  assert not np.allclose(a, b) and not np.allclose(a, ref)
  fast = registry.video_encoder("mvit_tiny", dtype="bfloat16", attention_impl="dot_product",
                               **SMALL_VIDEO)
  out = jax.jit(fast.apply)(variables, video)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1)


def test_attention_implementations_agree():
  rng = np.random.default_rng(9)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 8)), jnp.float32) for n in (5, 7, 7))
  mask = jnp.asarray(rng.random((2, 1, 1, 7)) < 0.7).at[..., 0].set(True)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  probs = np.where(mask, np.exp(logits - logits.max(-1, keepdims=True)), 0)
  want = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)
  for impl in ("einsum", "dot_product"):  # "cudnn" needs a GPU
    got = jax.jit(functools.partial(layers.attend, impl=impl))(q, k, v, mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    layers.attend(q, k, v, impl="flash")


def test_bert_ignores_padding_and_pools_as_configured():
  rng = np.random.default_rng(3)
  ids = rng.integers(0, 50, (2, 10)).astype(np.int32)
  mask = np.zeros((2, 10), np.int32)
  mask[0, :4] = 1
  mask[1, :7] = 1
  other_padding = np.where(mask == 1, ids, rng.integers(0, 50, ids.shape)).astype(np.int32)
  assert not np.array_equal(ids, other_padding)
  changed = ids.copy()
  changed[0, 1] = (changed[0, 1] + 1) % 50
  variables = {"params": _small_dual()[1]["text_encoder"]}
  outputs = {}
  for pooling in ("pooler", "mean"):
    model = registry.text_encoder("bert_tiny", pooling=pooling, **SMALL_TEXT)
    apply = jax.jit(model.apply)
    out = outputs[pooling] = apply(variables, np.concatenate([ids, other_padding, changed]),
                                   np.concatenate([mask] * 3))
    assert out.shape == (6, 64)
    np.testing.assert_allclose(out[2:4], out[:2], rtol=1e-5, atol=1e-6)  # padding is ignored
    assert not np.allclose(out[4], out[0], atol=1e-4)  # a real token is not
  assert np.all(np.abs(outputs["pooler"]) <= 1.0)  # tanh
  assert not np.allclose(outputs["pooler"], outputs["mean"], atol=1e-3)


def _gated_attention_numpy(params, h, mask):
  p = jax.tree.map(np.asarray, params)
  v = np.tanh(h @ p["attention_V"]["kernel"] + p["attention_V"]["bias"])
  u = 1.0 / (1.0 + np.exp(-(h @ p["attention_U"]["kernel"] + p["attention_U"]["bias"])))
  logits = ((v * u) @ p["attention_w"]["kernel"] + p["attention_w"]["bias"])[..., 0]
  weights = np.where(mask, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bk,bkd->bd", weights, h), weights


def test_gated_attention_matches_numpy_reference():
  rng = np.random.default_rng(4)
  h = rng.normal(size=(3, 5, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], bool)
  head = heads.GatedAttentionMIL(attention_dim=6)
  variables = nn.meta.unbox(head.init(_key(), h, mask))
  pooled, weights = head.apply(variables, h, mask)
  want_pooled, want_weights = _gated_attention_numpy(variables["params"], h, mask)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pooled, want_pooled, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(weights[~mask], 0.0)
  np.testing.assert_allclose(weights[2, 3], 1.0)  # a single valid instance takes all the weight


def _small_lvef(head: str = "paper"):
  """The LVEF model around the shared small encoder; only its head is initialised here."""
  model = registry.lvef_regressor("mvit_tiny", label_mean=55.0, proj_dim=16, attention_dim=8,
                                 head=head, **SMALL_VIDEO)
  features = np.zeros((1, 2, model.video_encoder.config.width), np.float32)
  head = jax.jit(functools.partial(model.init, method="predict_from_features"))(
      _key(), features, np.ones((1, 2), bool))
  params = {**nn.meta.unbox(head)["params"], "video_encoder": _small_dual()[1]["video_encoder"]}
  return model, {"params": params}


@pytest.mark.parametrize("head", heads.HEADS)
def test_lvef_model_ignores_padded_instances_and_freezes_the_encoder(head):
  rng = np.random.default_rng(5)
  model, variables = _small_lvef(head)
  bias = 0.55 if head == "paper" else 55.0  # the paper's head regresses LVEF / 100
  assert float(variables["params"]["regressor"]["bias"][0]) == pytest.approx(bias, rel=1e-6)
  abstract = jax.eval_shape(model.init, _key(), np.zeros((1, 2, 4, 32, 32), np.uint8),
                            np.ones((1, 2), bool))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, nn.meta.unbox(abstract))

  @jax.jit
  def predict_and_grad(params, video, mask):
    (_, (lvef, weights)), grads = jax.value_and_grad(
        lambda p: (lambda out: (out[0].sum(), out))(model.apply({"params": p}, video, mask)),
        has_aux=True)(params)
    return lvef, weights, grads

  video = _uint8(rng, (4, 3, 4, 32, 32))  # [B, K, T, H, W]
  mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)  # bag 2 is empty padding
  video[3, 0] = video[0, 0]  # bag 3 is bag 0 with another valid clip 1
  lvef, weights, grads = predict_and_grad(variables["params"], video, mask)
  assert lvef.shape == (4,) and weights.shape == (4, 3)
  repadded = np.where(mask[..., None, None, None], video, _uint8(rng, video.shape))
  lvef2, weights2, _ = predict_and_grad(variables["params"], repadded, mask)
  np.testing.assert_array_equal(lvef2, lvef)
  np.testing.assert_array_equal(weights2, weights)
  np.testing.assert_array_equal(weights[~mask], 0.0)
  np.testing.assert_allclose(weights.sum(1), [1.0, 1.0, 0.0, 1.0], rtol=1e-6)
  # An empty bag pools to zero: the prediction is the bias (in percent).
  assert float(lvef[2]) == pytest.approx(55.0, rel=1e-6)
  assert float(lvef[3]) != float(lvef[0])  # a valid clip's content matters
  # The paper's frozen encoder: no gradient reaches it, the projection and head do learn.
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads["video_encoder"]))
  assert np.any(grads["video_proj"]["kernel"] != 0)
  assert np.any(grads["mil"]["attention_V"]["kernel"] != 0)
  if head == "paper":
    assert np.any(grads["instance_mlp"]["fc2"]["kernel"] != 0)


def test_paper_head_shapes_dropout_and_normalised_input():
  rng = np.random.default_rng(6)
  model, variables = _small_lvef("paper")
  params = variables["params"]
  # The reference: 512 -> 256 -> 256 per instance, gated attention L=256 D=128, 256 -> 1.
  # Here proj_dim 16 and attention_dim 8: 16 -> 256 -> 256, attention 256 x 8, 256 -> 1.
  shapes = {k: v["kernel"].shape for k, v in params["instance_mlp"].items()}
  assert shapes == {"fc1": (16, 256), "fc2": (256, 256)}
  assert params["mil"]["attention_V"]["kernel"].shape == (256, 8)
  assert params["regressor"]["kernel"].shape == (256, 1)
  width = model.video_encoder.config.width
  features = rng.normal(size=(3, 4, width)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
  head = jax.jit(functools.partial(model.apply, method="predict_from_features"),
                 static_argnames="train")
  eval_a, weights = head(variables, features, mask)
  eval_b, _ = head(variables, features, mask)
  np.testing.assert_array_equal(eval_a, eval_b)  # no dropout at inference
  np.testing.assert_array_equal(weights[~mask], 0.0)
  # video_proj's output is L2-normalised per instance: scaling an instance's features changes
  # nothing.
  scaled = features * np.array([3.0, 0.5, 7.0, 1.0], np.float32)[None, :, None]
  np.testing.assert_allclose(head(variables, scaled, mask)[0], eval_a, rtol=1e-5, atol=1e-4)
  train = [head(variables, features, mask, train=True, rngs={"dropout": _key(i)})[0]
           for i in range(2)]
  assert not np.allclose(train[0], train[1])  # dropout at training time
  with pytest.raises(ValueError, match="unknown head"):
    registry.lvef_regressor("mvit_tiny", label_mean=50.0, head="mlp", **SMALL_VIDEO).init(
        _key(), np.zeros((1, 1, 4, 32, 32), np.uint8), np.ones((1, 1), bool))


def test_dual_encoder_video_text_and_video_video():
  rng = np.random.default_rng(7)
  video = _uint8(rng, (2, 4, 32, 32))
  ids = rng.integers(0, 50, (2, 6)).astype(np.int32)
  mask = np.ones((2, 6), np.int32)
  model, params = _small_dual()
  assert set(params) == {"video_encoder", "video_proj", "text_encoder", "text_proj", "logit_scale"}
  video_video = registry.dual_encoder("mvit_tiny", None, embed_dim=16, video_overrides=SMALL_VIDEO)
  vv_params = {k: params[k] for k in ("video_encoder", "video_proj", "logit_scale")}

  @jax.jit
  def both(params, vv_params):  # one compile: XLA shares the video tower of the two variants
    return (model.apply({"params": params}, video, ids, mask),
            video_video.apply({"params": vv_params}, video, video2=video[::-1]))

  (a, b, log_scale), (a2, b2, _) = both(params, vv_params)
  assert a.shape == b.shape == (2, 16)
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(log_scale, math.log(1 / 0.07), rtol=1e-6)
  assert not np.allclose(a, b, atol=1e-3)
  np.testing.assert_allclose(a2, a, rtol=1e-5, atol=1e-6)  # the same video tower
  np.testing.assert_allclose(b2, a[::-1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="either text_ids"):
    model.apply({"params": params}, video)
  with pytest.raises(ValueError, match="no text tower"):
    video_video.apply({"params": vv_params}, video, ids, mask)


def _clip_loss_numpy(a, b, scale):
  logits = scale * a @ b.T

  def cross_entropy(z):
    z = z - z.max(1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(1)) - np.diag(z))

  return 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))


def test_variance_floor_known_answers():
  floor = jax.jit(losses.variance_floor)
  e = 8
  # +-e_d for every dimension d: each dimension is +1, -1 and 2E - 2 zeros, variance 1 / E.
  spread_batch = np.concatenate([np.eye(e), -np.eye(e)]).astype(np.float32)
  penalty, spread = floor(spread_batch)
  np.testing.assert_allclose(spread, np.sqrt(1.0 + 1e-4), rtol=1e-6)
  assert float(penalty) == 0.0
  # A batch collapsed to one point: zero variance, penalty 1 - sqrt(eps).
  collapsed = np.tile(spread_batch[:1], (16, 1))
  penalty, spread = floor(collapsed)
  np.testing.assert_allclose(penalty, 1.0 - 0.01, rtol=1e-5)
  np.testing.assert_allclose(spread, 0.01, rtol=1e-5)
  # Half the spread: a batch using only the first E/2 dimensions.
  half = np.concatenate([np.eye(e)[:e // 2], -np.eye(e)[:e // 2]] * 2).astype(np.float32)
  penalty, _ = floor(half)
  var = half.var(axis=0)
  want = np.mean(np.maximum(0.0, 1.0 - np.sqrt(var + 1e-4 / e) * np.sqrt(e)))
  np.testing.assert_allclose(penalty, want, rtol=1e-5)
  assert 0.4 < float(penalty) < 0.6  # the unused half of the dimensions is collapsed
  with pytest.raises(ValueError, match=r"\[N >= 2, E\]"):
    losses.variance_floor(jnp.ones((1, 4)))


def test_clip_logit_scale_clips_the_parameter_after_the_update():
  params = {"logit_scale": jnp.asarray(5.0), "video_proj": {"kernel": jnp.full((2, 2), 7.0)}}
  clipped = losses.clip_logit_scale(params)
  np.testing.assert_allclose(clipped["logit_scale"], np.log(100.0), rtol=1e-6)
  np.testing.assert_array_equal(clipped["video_proj"]["kernel"], params["video_proj"]["kernel"])
  np.testing.assert_allclose(losses.clip_logit_scale({"logit_scale": jnp.asarray(-1.0)})
                             ["logit_scale"], 0.0)
  np.testing.assert_allclose(losses.clip_logit_scale({"logit_scale": jnp.asarray(2.5)})
                             ["logit_scale"], 2.5)
  assert losses.clip_logit_scale({"a": 1}) == {"a": 1}


def test_pretraining_step_moves_the_temperature_and_clips_it_after_the_update():
  from cmr_jax.train import common, optim, pretrain  # noqa: PLC0415 (a trainer, only here)
  model, params = _small_dual()
  rng = np.random.default_rng(9)
  batch = {"video": _uint8(rng, (4, 4, 32, 32)),
           "text_ids": rng.integers(0, 50, (4, 6)).astype(np.int32),
           "text_mask": np.ones((4, 6), np.int32)}
  tx, _ = optim.make_optimizer(params, base_lr=1e-2, total_steps=10, warmup_steps=0)
  step = jax.jit(pretrain.make_train_step(model, tx, two_clips=False))
  for start, clipped in ((3.0, False), (losses.MAX_LOG_LOGIT_SCALE + 0.5, True)):
    p = {**params, "logit_scale": jnp.asarray(start, jnp.float32)}
    state = common.TrainState(step=jnp.asarray(0), params=p, opt_state=tx.init(p))
    state, out = step(state, batch, _key(2))
    after = float(state.params["logit_scale"])
    if clipped:  # past ln 100 the parameter is put back at ln 100 after the update
      assert after == pytest.approx(losses.MAX_LOG_LOGIT_SCALE, abs=1e-6)
    else:  # below it the gradient moves it
      assert after != pytest.approx(start, abs=1e-4)
    np.testing.assert_allclose(out["logit_scale"], np.exp(start), rtol=1e-5)


def test_weight_decay_spares_the_cls_token_and_position_embeddings_and_shrinks_kernels():
  from cmr_jax.train import optim  # noqa: PLC0415 (a trainer, only here)
  _, params = _small_dual()
  lr, wd = 0.1, 0.5
  tx, schedule = optim.make_optimizer(params, base_lr=lr, total_steps=10, warmup_steps=0,
                                      weight_decay=wd)
  assert float(schedule(0)) == pytest.approx(lr)
  # With zero gradients AdamW's update is the decoupled decay alone: -lr * wd * value.
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  cls_path = ("video_encoder", "cls_positional_encoding", "cls_token")
  leaf = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree)  # noqa: E731
  assert leaf(params, cls_path).ndim == 3  # a matrix-shaped leaf, yet not decayed
  np.testing.assert_array_equal(leaf(new, cls_path), leaf(params, cls_path))
  kernel = params["video_proj"]["kernel"]
  np.testing.assert_allclose(new["video_proj"]["kernel"], kernel - lr * wd * kernel, rtol=1e-6)
  decayed = set()
  for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(params),
                                   jax.tree.leaves(new)):
    name = optim.path_str(path)
    if np.allclose(after, before * (1 - lr * wd), rtol=1e-6) and np.any(before):
      decayed.add(name)
    else:
      np.testing.assert_array_equal(after, before, err_msg=name)
  assert not any("cls_token" in n or "pos_embed" in n or "bias" in n or "scale" in n
                 for n in decayed)
  assert any("blocks" in n and n.endswith("kernel") for n in decayed)


def test_chunked_validation_infonce_equals_the_training_loss_per_chunk():
  from cmr_jax.train import pretrain  # noqa: PLC0415 (a trainer, only here)
  rng = np.random.default_rng(10)
  a, b = (rng.normal(size=(11, 8)).astype(np.float32) for _ in range(2))
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  want = np.mean([float(losses.clip_loss(a[i:i + 4], b[i:i + 4], jnp.log(7.0))[0])
                  for i in (0, 4)])  # the last 3 pairs do not fill a chunk
  assert pretrain.chunked_infonce(a, b, np.log(7.0), 4) == pytest.approx(want, rel=1e-5)
  assert np.isnan(pretrain.chunked_infonce(a[:3], b[:3], 0.0, 4))


def test_clip_loss_matches_hand_computed_value():
  a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  b = np.array([[0.6, 0.8], [0.0, 1.0]], np.float32)
  # logits = 10 * [[0.6, 0.0], [0.8, 1.0]];
  # rows: CE0 = log(e^6 + 1) - 6, CE1 = log(e^8 + e^10) - 10;
  # columns: CE0 = log(e^6 + e^8) - 6, CE1 = log(1 + e^10) - 10.
  by_hand = 0.5 * (0.5 * (np.log(np.exp(6) + 1) - 6 + np.log(np.exp(8) + np.exp(10)) - 10)
                   + 0.5 * (np.log(np.exp(6) + np.exp(8)) - 6 + np.log(1 + np.exp(10)) - 10))
  clip_loss = jax.jit(losses.clip_loss)
  loss, metrics = clip_loss(jnp.asarray(a), jnp.asarray(b), jnp.log(10.0))
  np.testing.assert_allclose(loss, by_hand, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy_a2b"], 1.0)  # row 0 prefers column 0, row 1 column 1
  np.testing.assert_allclose(metrics["accuracy_b2a"], 0.5)  # column 0 prefers row 1
  rng = np.random.default_rng(8)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  y = rng.normal(size=(6, 4)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  np.testing.assert_allclose(clip_loss(x, y, jnp.log(3.0))[0], _clip_loss_numpy(x, y, 3.0),
                             rtol=1e-5)
  # The loss uses the scale as given (no clamp inside): above ln 100 it still has a gradient.
  big, metrics = clip_loss(x, y, jnp.asarray(5.0))
  np.testing.assert_allclose(big, _clip_loss_numpy(x, y, np.exp(5.0)), rtol=1e-5)
  np.testing.assert_allclose(metrics["logit_scale"], np.exp(5.0), rtol=1e-6)
  grad = jax.grad(lambda s: losses.clip_loss(x, y, s)[0])(jnp.asarray(5.0))
  assert np.isfinite(grad) and abs(float(grad)) > 1e-4
  with pytest.raises(ValueError, match="both be"):
    losses.clip_loss(x, y[:3], jnp.asarray(0.0))


def test_huber_loss_matches_definition():
  pred = jnp.array([50.0, 60.0, 30.0])
  target = jnp.array([50.5, 55.0, 30.0])
  # delta 1: 0.5 * 0.5^2 = 0.125; |5| > 1: 1 * (5 - 0.5) = 4.5; 0.
  np.testing.assert_allclose(losses.huber_loss(pred, target), (0.125 + 4.5) / 3, rtol=1e-6)
  np.testing.assert_allclose(losses.huber_loss(pred, target, delta=10.0), (0.125 + 12.5) / 3,
                             rtol=1e-6)
  weights = jnp.array([1.0, 0.0, 1.0])
  np.testing.assert_allclose(losses.huber_loss(pred, target, weights=weights), 0.125 / 2, rtol=1e-6)
  assert float(losses.huber_loss(pred, target, weights=jnp.zeros(3))) == 0.0
