"""Import of PyTorch weights (cmr_jax.convert, tools/convert_weights.py, fine-tuning init).

The renaming and its error reports are tested on numpy state dicts (no PyTorch needed). The rest
builds the PyTorch models with the code that made the published files (pytorchvideo's factory,
torchvision's `mvit_v1_b`, Hugging Face `BertModel`), with random weights, and compares outputs;
those tests skip when the optional `torch` extra is not installed.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cmr_jax.convert import converted
from cmr_jax.convert import mapping
from cmr_jax.convert import mvit as convert_mvit
from cmr_jax.models import mvit as mvit_model
from cmr_jax.models.mvit import KINETICS_MEAN, KINETICS_STD, UINT8_MAX, MViT, MViTConfig
from cmr_jax.models import registry
from cmr_jax.models.text import BertEncoder
from cmr_jax import runs
from cmr_jax.train import common
from cmr_jax.train import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4  # relative error of the encoder outputs, float32
REQUIRE_ENV = "CMR_JAX_REQUIRE_TORCH"  # set by `make test`: the comparisons must run, not skip
SKIP_REASON = "needs the optional torch extra: pip install -e '.[torch]'"
# The tiny MViT of the fine-tuning demo (configs/synthetic_finetune.py).
TINY = registry.video_config("mvit_tiny", image_size=32, kv_pool_stride=(1, 2, 2))
PROJ_DIM = 24
COMPARE_FRAMES, COMPARE_SIZE = 16, 64  # reduced input of the full MViT-B forward comparisons


def _import_or_skip(module: str, reason: str):
  """The module, or a skip; with CMR_JAX_REQUIRE_TORCH=1 (CI) a missing module fails instead."""
  if os.environ.get(REQUIRE_ENV) == "1":
    return importlib.import_module(module)
  return pytest.importorskip(module, reason=reason)


def _torch():
  return _import_or_skip("torch", reason=SKIP_REASON)


def _abstract_mvit(config: MViTConfig):
  example = jnp.zeros((1, config.num_frames, config.image_size, config.image_size), jnp.uint8)
  return common.unbox(jax.eval_shape(lambda r: MViT(config).init(r, example)["params"],
                                     jax.random.key(0)))


def _abstract_regressor(image_size: int = TINY.image_size):
  """The parameter shapes of the tiny LVEF regressor (TINY's encoder at `image_size`)."""
  model = registry.lvef_regressor("mvit_tiny", label_mean=50.0, proj_dim=PROJ_DIM,
                                 image_size=image_size, kv_pool_stride=TINY.kv_pool_stride)
  example = (jnp.zeros((1, 2, TINY.num_frames, image_size, image_size), jnp.uint8),
             jnp.ones((1, 2), bool))
  return common.unbox(jax.eval_shape(lambda r: model.init(r, *example)["params"],
                                     jax.random.key(0)))


def _random_tree(abstract, seed: int = 0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), abstract)


def _as_pytorchvideo(params) -> dict[str, np.ndarray]:
  """Our MViT parameters under pytorchvideo names (the inverse of the mapping, written out)."""
  out = {}
  for path, value in mapping.flatten(params).items():
    *module, leaf = path.split("/")
    name = ".".join(module).replace("blocks_", "blocks.")
    if module == ["cls_positional_encoding"]:
      out[f"{name}.{leaf}"] = value
    elif leaf == "scale":
      out[f"{name}.weight"] = value
    elif leaf == "kernel":
      out[f"{name}.weight"] = value.T if value.ndim == 2 else value.transpose(4, 3, 0, 1, 2)
    else:
      out[f"{name}.{leaf}"] = value
  return out


def _perturb(model, seed: int = 0) -> None:
  """Adds noise to every tensor, so that LayerNorm scales and biases are not 1 and 0."""
  torch = _torch()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=gen))


def _pytorchvideo_mvit(config: MViTConfig):
  """pytorchvideo's factory with `config`'s geometry (as tools/bench_model.py builds it)."""
  vision_transformers = _import_or_skip("pytorchvideo.models.vision_transformers",
                                            reason=SKIP_REASON)
  return vision_transformers.create_multiscale_vision_transformers(
      **convert_mvit.pytorchvideo_factory_kwargs(config))


def _numpy_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _features(model, head, video: np.ndarray) -> np.ndarray:
  """The CLS features entering `head` (the Kinetics classifier) for uint8 `video [B, T, H, W]`,
  normalised as Kinetics-400 models are."""
  torch = _torch()
  x = (torch.tensor(video, dtype=torch.float32) / UINT8_MAX - KINETICS_MEAN) / KINETICS_STD
  return _head_input(model, head, x[:, None].expand(-1, 3, -1, -1, -1).contiguous())


def _head_input(model, head, x) -> np.ndarray:
  """What `model` feeds `head` for the normalised clips `x: [B, 3, T, H, W]` (a torch tensor)."""
  torch = _torch()
  seen = {}
  hook = head.register_forward_hook(lambda mod, inputs, out: seen.setdefault("x", inputs[0]))
  with torch.no_grad():
    model.eval()(x)
  hook.remove()
  return seen["x"].numpy()


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@functools.cache
def _compare_config() -> MViTConfig:
  return registry.video_config("mvit_b_16x4", num_frames=COMPARE_FRAMES, image_size=COMPARE_SIZE)


@functools.cache
def _jitted_encoder():
  config = _compare_config()
  return jax.jit(lambda params, video: MViT(config).apply({"params": params}, video))


def _compare_mvit(model, head, state: dict[str, np.ndarray]) -> float:
  """Relative error between our converted encoder and `model` on two random clips.

  Both PyTorch models are compared with one compiled MViT-B (16 blocks) at 16x64x64.
  """
  config = _compare_config()
  video = np.random.default_rng(1).integers(0, 256, (2, config.num_frames, config.image_size,
                                                     config.image_size), dtype=np.uint8)
  target = mapping.flatten({convert_mvit.VIDEO_ENCODER: _abstract_mvit(config)})
  layout = converted.detect_layout(state, "test")
  flat, report = mapping.convert(state, converted.renamer_for(layout), target, source="test",
                                 layout=layout)
  report.check()
  params = mapping.unflatten(flat)[convert_mvit.VIDEO_ENCODER]
  ours = np.asarray(_jitted_encoder()(params, video))
  return _relative_error(ours, _features(model, head, video))


# --- Renaming and reports (numpy only) ---------------------------------------------------------


def test_pytorchvideo_names_round_trip_and_head_dropped():
  params = _random_tree(_abstract_mvit(TINY))
  state = _as_pytorchvideo(params)
  state["head.proj.weight"] = np.zeros((400, TINY.width), np.float32)
  target = mapping.flatten({"video_encoder": _abstract_mvit(TINY)})
  flat, report = mapping.convert(state, convert_mvit.pytorchvideo_renamer(), target,
                                 source="mem", layout="pytorchvideo")
  report.check()
  assert report.missing == report.unexpected == report.mismatched == []
  assert report.dropped == {"head.proj.weight": convert_mvit.KINETICS_HEAD_REASON}
  got = mapping.unflatten(flat)["video_encoder"]
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_missing_unexpected_and_mismatched_tensors_are_named_and_stop():
  state = _as_pytorchvideo(_random_tree(_abstract_mvit(TINY)))
  del state["blocks.2.mlp.fc1.weight"]
  state["blocks.9.attn.q.weight"] = np.zeros((4, 4), np.float32)
  state["some_buffer"] = np.zeros(3, np.float32)
  state["cls_positional_encoding.pos_embed_spatial"] = np.zeros((1, 5, TINY.embed_dim),
                                                                np.float32)
  target = mapping.flatten({"video_encoder": _abstract_mvit(TINY)})
  flat, report = mapping.convert(state, convert_mvit.pytorchvideo_renamer(), target,
                                 source="ckpt.pyth", layout="pytorchvideo")
  assert report.missing == ["video_encoder/blocks_2/mlp/fc1/kernel"]
  assert report.unexpected == ["blocks.9.attn.q.weight (as video_encoder/blocks_9/attn/q/kernel)",
                               "some_buffer"]
  assert len(report.mismatched) == 1
  assert report.mismatched[0].startswith("cls_positional_encoding.pos_embed_spatial -> ")
  with pytest.raises(mapping.ConversionError) as err:
    report.check()
  message = str(err.value)
  for name in ("ckpt.pyth", "blocks_2/mlp/fc1/kernel", "blocks.9.attn.q.weight", "some_buffer",
               "pos_embed_spatial", "(1, 5, 16) vs (1, 64, 16)", "allow_missing"):
    assert name in message
  with pytest.raises(mapping.ConversionError, match="shape mismatches"):
    report.check(allow_missing=True, allow_unexpected=True)
  report.check(allow_missing=True, allow_unexpected=True, allow_mismatch=True)
  assert "video_encoder/blocks_2/mlp/fc1/kernel" not in flat


def test_cmr_transformer_names_and_converted_folder_as_finetune_init(tmp_path):
  encoder = _random_tree(_abstract_mvit(TINY))
  proj = np.random.default_rng(2).normal(size=(PROJ_DIM, TINY.width)).astype(np.float32)
  state = {f"model.video_encoder.{k}": v for k, v in _as_pytorchvideo(encoder).items()}
  state.update({"model.video_proj.weight": proj,
                "model.video_proj.bias": np.ones(PROJ_DIM, np.float32)})
  abstract = _abstract_regressor()
  target = mapping.flatten({k: abstract[k] for k in registry.ENCODER_PARAMS})
  flat, report = mapping.convert(state, convert_mvit.cmr_transformer_renamer(), target,
                                 source="cmr.ckpt", layout="cmr_transformer")
  report.check()
  assert report.dropped == {"model.video_proj.bias": convert_mvit.PROJ_BIAS_REASON}
  folder = converted.save_converted(
      str(tmp_path / "cmr"), converted.Converted(mapping.unflatten(flat), report, TINY))
  # The folder records the input normalisation the paper's weights expect, the layout's.
  _, info = converted.load_converted(folder)
  assert info["input_norm"] == info["video_config"]["input_norm"] == "cmr_transformer"
  np.testing.assert_allclose([info["input_scale"], info["input_offset"]],
                             [1 / (255 * 0.225), -0.45 / 0.225 / 255], rtol=1e-12)
  assert runs.init_input_norm(f"cmr_transformer:{folder}") == "cmr_transformer"
  with open(os.path.join(folder, converted.INFO_FILE), "w") as f:  # converted before it was kept
    json.dump({k: v for k, v in info.items() if not k.startswith("input_")}, f)
  assert converted.weights_input_norm(folder) == "cmr_transformer"
  for kind, groups in runs.IMPORTED_PARAMS.items():
    loaded = runs.encoder_init(f"{kind}:{folder}", abstract)
    assert sorted(loaded) == sorted(groups)
    assert jax.tree.map(np.shape, loaded) == jax.tree.map(lambda s: s.shape,
                                                          {g: abstract[g] for g in groups})
  jax.tree.map(np.testing.assert_array_equal, loaded["video_encoder"], encoder)
  np.testing.assert_array_equal(loaded["video_proj"]["kernel"], proj.T)
  with pytest.raises(ValueError, match="unknown init 'imagenet:"):
    runs.encoder_init(f"imagenet:{folder}", abstract)


def test_input_normalisations_are_the_reference_transforms():
  video = jnp.array([[[[0, 1, 128, 255]]]], jnp.uint8)  # [1, T=1, H=1, W=4]
  x = np.array([0.0, 1.0, 128.0, 255.0])
  expected = {"kinetics": (x / 255 - 0.45) / 0.225,  # ToFloat (/255), then Normalize
              "cmr_transformer": (x - 0.45) / 0.225 / 255}  # Normalize on 0-255, then Div255
  assert sorted(expected) == sorted(mvit_model.INPUT_NORMS)
  for name, want in expected.items():
    out = np.asarray(mvit_model.preprocess_video(video, norm=name))
    np.testing.assert_allclose(out[0, 0, 0], np.stack([want] * 3, -1), rtol=1e-6, atol=1e-7)
    scale, offset = mvit_model.INPUT_NORMS[name].affine
    np.testing.assert_allclose(x * scale + offset, want, rtol=1e-12, atol=1e-15)
  np.testing.assert_array_equal(mvit_model.preprocess_video(video),
                                mvit_model.preprocess_video(video, norm="kinetics"))
  with pytest.raises(ValueError, match="unknown input normalisation 'imagenet'"):
    MViTConfig(input_norm="imagenet")


# --- PyTorch models (optional torch extra) -----------------------------------------------------


def test_full_size_pytorchvideo_and_torchvision_state_dicts_convert_completely(tmp_path):
  torch = _torch()
  hub = _import_or_skip("pytorchvideo.models.hub.vision_transformers", reason=SKIP_REASON)
  torchvision = _import_or_skip("torchvision", reason=SKIP_REASON)
  mvit_b = registry.video_config("mvit_b_16x4")
  files = {  # as published: pytorchvideo's .pyth keeps the weights under "model_state"
      "MVIT_B_16x4.pyth": {"model_state": hub.mvit_base_16x4().state_dict(), "epoch": 1},
      "mvit_v1_b.pth": torchvision.models.video.mvit_v1_b().state_dict(),
  }
  results = {}
  for filename, obj in files.items():
    torch.save(obj, tmp_path / filename)
    results[filename] = result = converted.convert_file(str(tmp_path / filename))
    report = result.report
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], []), filename
    assert len(report.converted) == 375, filename  # the published encoder's tensor count
    assert set(report.dropped.values()) == {convert_mvit.KINETICS_HEAD_REASON}, filename
    assert result.video_config == mvit_b, filename
    assert result.input_norm == mvit_b.input_norm == "kinetics", filename
    assert sum(x.size for x in jax.tree.leaves(result.params)) == 36_303_072, filename
  # Values land where they belong: torchvision's fused qkv is split, convolutions transposed.
  state = files["mvit_v1_b.pth"]
  enc = results["mvit_v1_b.pth"].params["video_encoder"]
  width = state["blocks.3.attn.qkv.weight"].shape[1]
  np.testing.assert_array_equal(enc["blocks_3"]["attn"]["v"]["kernel"],
                                state["blocks.3.attn.qkv.weight"][2 * width:].numpy().T)
  np.testing.assert_array_equal(enc["patch_embed"]["patch_model"]["kernel"][1, 2, 3],
                                state["conv_proj.weight"][:, :, 1, 2, 3].numpy().T)
  # mvit_base_32x3 has the same names; only its temporal position embedding is longer, and the
  # input it was made for (32 frames) is read off it.
  state_32 = {k: v.numpy() for k, v in hub.mvit_base_32x3().state_dict().items()}
  renamed = mapping.rename_all(state_32, converted.renamer_for(
      converted.detect_layout(state_32, "32x3")))
  shapes_16 = jax.tree.map(np.shape, mapping.flatten(results["MVIT_B_16x4.pyth"].params))
  assert {k: v for k, v in jax.tree.map(np.shape, renamed).items() if v != shapes_16[k]} == {
      "video_encoder/cls_positional_encoding/pos_embed_temporal": (1, 16, 96)}
  assert convert_mvit.input_size(renamed, mvit_b) == {"num_frames": 32, "image_size": 224}


def test_pytorchvideo_mvit_base_16x4_output_matches():
  torch = _torch()
  hub = _import_or_skip("pytorchvideo.models.hub.vision_transformers", reason=SKIP_REASON)
  torch.manual_seed(0)
  model = hub.mvit_base_16x4(spatial_size=COMPARE_SIZE, temporal_size=COMPARE_FRAMES)
  _perturb(model)
  # pytorchvideo 0.1.5 normalises pooled q/k/v with eps 1e-5; SlowFast (which trained the
  # Kinetics weights), later pytorchvideo and torchvision with 1e-6, as our default: use that.
  for module in model.modules():
    if isinstance(module, torch.nn.LayerNorm):
      module.eps = _compare_config().pool_norm_eps
  error = _compare_mvit(model, model.head.proj, _numpy_state(model))
  print(f"pytorchvideo mvit_base_16x4 at {COMPARE_FRAMES}x{COMPARE_SIZE}x{COMPARE_SIZE}: "
        f"relative error {error:.2e}")
  assert error < TOLERANCE


def test_torchvision_mvit_v1_b_output_matches(monkeypatch):
  torch = _torch()
  tv_mvit = _import_or_skip("torchvision.models.video.mvit", reason=SKIP_REASON)
  build = tv_mvit._mvit  # pylint: disable=protected-access
  # mvit_v1_b fixes its input at 16x224x224; its own builder, fed a smaller input.
  monkeypatch.setattr(tv_mvit, "_mvit", lambda **kw: build(
      **{**kw, "spatial_size": (COMPARE_SIZE, COMPARE_SIZE), "temporal_size": COMPARE_FRAMES}))
  torch.manual_seed(0)
  model = tv_mvit.mvit_v1_b()
  _perturb(model)
  error = _compare_mvit(model, model.head[1], _numpy_state(model))
  print(f"torchvision mvit_v1_b at {COMPARE_FRAMES}x{COMPARE_SIZE}x{COMPARE_SIZE}: "
        f"relative error {error:.2e}")
  assert error < TOLERANCE


def _vocab_file(path, size: int) -> str:
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  words += [f"tok{i}" for i in range(size - len(words))]
  path.write_text("\n".join(words) + "\n")
  return str(path)


def _hf_bert(**overrides):
  transformers = _import_or_skip("transformers", reason=SKIP_REASON)
  kw = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40)
  kw.update(overrides)
  return transformers, transformers.BertConfig(**kw)


def test_hugging_face_bert_folder_matches_and_carries_vocab(tmp_path):
  torch = _torch()
  transformers, hf_config = _hf_bert()
  torch.manual_seed(0)
  model = transformers.BertModel(hf_config).eval()
  _perturb(model)
  folder = tmp_path / "bert"
  model.save_pretrained(folder)
  _vocab_file(folder / "vocab.txt", hf_config.vocab_size)
  result = converted.convert_file(str(folder))
  assert result.report.layout == converted.HF_BERT
  assert (result.report.missing, result.report.unexpected) == ([], [])
  c = result.text_config
  assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size,
          c.max_len) == (120, 32, 2, 4, 64, 40)
  out = converted.save_converted(str(tmp_path / "out"), result)
  assert open(os.path.join(out, "vocab.txt")).read() == (folder / "vocab.txt").read_text()

  rng = np.random.default_rng(0)
  ids = rng.integers(0, hf_config.vocab_size, (3, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  params, _ = converted.load_converted(out)
  ours = np.asarray(BertEncoder(c).apply({"params": params["text_encoder"]}, ids, mask))
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask)).pooler_output.numpy()
  error = _relative_error(ours, ref)
  print(f"Hugging Face BertModel: relative error {error:.2e}")
  assert error < TOLERANCE
  # Pre-training's text tower starts from it (config.init.text); nothing set: random init.
  abstract = {"video_encoder": {}, "text_encoder": common.unbox(jax.eval_shape(
      lambda: BertEncoder(c).init(jax.random.key(0), ids, mask))["params"])}
  init = ml_collections.ConfigDict({"init": {"video": "", "text": out}})
  jax.tree.map(np.testing.assert_array_equal,
               pretrain.imported_params(init, abstract)["text_encoder"], params["text_encoder"])
  assert pretrain.imported_params(ml_collections.ConfigDict(
      {"init": {"video": "", "text": ""}}), abstract) is None
  with pytest.raises(ValueError, match="no text tower"):
    pretrain.imported_params(init, {"video_encoder": {}})
  # A pre-training checkpoint (`bert.` prefix, `cls.*` heads) gives the same encoder.
  pretraining = transformers.BertForPreTraining(hf_config)
  pretraining.bert.load_state_dict(model.state_dict())
  torch.save(pretraining.state_dict(), tmp_path / "pretraining.bin")
  again = converted.convert_file(str(tmp_path / "pretraining.bin"), text_config=c)
  assert any(name.startswith("cls.") for name in again.report.dropped)
  jax.tree.map(np.testing.assert_array_equal, again.params["text_encoder"],
               params["text_encoder"])
  # Allowed, a missing parameter keeps a fresh initialisation and the report records it.
  state = model.state_dict()
  del state["pooler.dense.weight"]
  torch.save(state, tmp_path / "no_pooler.bin")
  partial = converted.convert_file(str(tmp_path / "no_pooler.bin"), text_config=c,
                                   allow_missing=True, seed=3)
  assert partial.report.missing == ["text_encoder/pooler/dense/kernel"]
  kernel = partial.params["text_encoder"]["pooler"]["dense"]["kernel"]
  assert kernel.shape == (32, 32) and 0 < np.std(kernel) < 0.1
  restored, info = converted.load_converted(
      converted.save_converted(str(tmp_path / "partial"), partial))
  assert info["report"]["missing"] == ["text_encoder/pooler/dense/kernel"]
  np.testing.assert_array_equal(restored["text_encoder"]["pooler"]["dense"]["kernel"], kernel)


class _TrainingConfig:
  """Stands for a training-code class pickled into a Lightning checkpoint's hyper-parameters."""

  def __init__(self, lr: float):
    self.lr = lr


def test_cmr_transformer_lightning_checkpoint_and_finetune_init(tmp_path):
  torch = _torch()
  transformers, hf_config = _hf_bert()
  video = _pytorchvideo_mvit(TINY)
  video.head = None
  text = transformers.BertModel(hf_config)
  state = {f"model.video_encoder.{k}": v for k, v in video.state_dict().items()}
  state.update({f"model.text_encoder.{k}": v for k, v in text.state_dict().items()})
  state.update({"model.video_proj.weight": torch.randn(PROJ_DIM, TINY.width),
                "model.video_proj.bias": torch.randn(PROJ_DIM),
                "model.text_proj.weight": torch.randn(PROJ_DIM, hf_config.hidden_size),
                "model.text_proj.bias": torch.randn(PROJ_DIM)})
  ckpt = str(tmp_path / "cmr.ckpt")
  torch.save({"state_dict": state, "epoch": 3,
              "hyper_parameters": {"config": _TrainingConfig(1e-4)}}, ckpt)
  vocab = _vocab_file(tmp_path / "vocab.txt", hf_config.vocab_size)
  result = converted.convert_file(ckpt, video_config=TINY,
                                  text_config=registry.text_config("bert_tiny", num_heads=4),
                                  vocab=vocab)
  assert result.report.layout == converted.CMR_TRANSFORMER
  assert sorted(result.params) == ["text_encoder", "text_proj", "video_encoder", "video_proj"]
  assert sorted(result.report.dropped) == ["model.text_proj.bias", "model.video_proj.bias"]
  assert result.text_config.vocab_size == hf_config.vocab_size
  np.testing.assert_array_equal(result.params["video_proj"]["kernel"],
                                state["model.video_proj.weight"].numpy().T)
  folder = converted.save_converted(str(tmp_path / "converted"), result)

  abstract = _abstract_regressor()
  # The torch file directly (converted in memory) and the converted folder give the same.
  direct = runs.encoder_init(f"cmr_transformer:{ckpt}", abstract)
  stored = runs.encoder_init(f"cmr_transformer:{folder}", abstract)
  jax.tree.map(np.testing.assert_array_equal, direct, stored)
  jax.tree.map(np.testing.assert_array_equal, direct["video_encoder"],
               result.params["video_encoder"])

  kinetics = str(tmp_path / "kinetics.pyth")
  torch.save({"model_state": video.state_dict()}, kinetics)
  loaded = runs.encoder_init(f"kinetics:{kinetics}", abstract)
  assert sorted(loaded) == ["video_encoder"]
  with pytest.raises(mapping.ConversionError, match=r"video_proj/kernel"):
    runs.encoder_init(f"cmr_transformer:{kinetics}", abstract)
  # A model at another input size: the error names the tensors and the file's input size.
  abstract64 = _abstract_regressor(image_size=64)
  with pytest.raises(mapping.ConversionError, match=r"pos_embed_spatial.*16 frames of 32x32"):
    runs.encoder_init(f"kinetics:{kinetics}", abstract64)


def _paper_features(monkeypatch, model, clips: np.ndarray) -> np.ndarray:
  """The features the paper's code computes for uint8 grey `clips [B, T, H, W]`: its evaluation
  transform (cmr_transformer's data/data_modules.py), pytorchvideo's `create_video_transform(
  mode="val", convert_to_float=False)` (`Normalize((0.45,) * 3, (0.225,) * 3)` on 0-255 values)
  then `Div255`, on each clip copied to 3 channels. Its resize and centre crop are the identity
  here (min_size = crop_size = the side): our pipeline resamples elsewhere."""
  torch = _torch()
  try:  # pytorchvideo 0.1.5 imports a module that torchvision 0.17 renamed
    importlib.import_module("torchvision.transforms.functional_tensor")
  except ImportError:
    monkeypatch.setitem(sys.modules, "torchvision.transforms.functional_tensor",
                        importlib.import_module("torchvision.transforms._functional_tensor"))
  transforms = _import_or_skip("pytorchvideo.transforms", reason=SKIP_REASON)
  side = clips.shape[-1]
  evaluate = transforms.create_video_transform(mode="val", num_samples=None, min_size=side,
                                               max_size=side, crop_size=side,
                                               convert_to_float=False)
  div255 = transforms.Div255()
  x = torch.stack([div255(evaluate(torch.tensor(clip, dtype=torch.float32)[None].expand(
      3, -1, -1, -1))) for clip in clips])
  return _head_input(model, model.head.proj, x)


def _finetune_config(init: str) -> ml_collections.ConfigDict:
  """The fields of a fine-tuning config that build and initialise its model (TINY's encoder)."""
  return ml_collections.ConfigDict({
      "init": init, "mode": "finetune",
      "model": {"video": "mvit_tiny", "embed_dim": PROJ_DIM, "head": "paper", "dtype": "float32",
                "remat": False, "video_overrides": {"image_size": TINY.image_size,
                                                    "kv_pool_stride": TINY.kv_pool_stride}},
      "data": {"num_frames": TINY.num_frames, "image_size": TINY.image_size, "max_instances": 2}})


def _finetune_features(config: ml_collections.ConfigDict,
                       clips: np.ndarray) -> tuple[str, np.ndarray]:
  """(input normalisation, encoder features of `clips`) of the model fine-tuning builds from
  `config` (`registry.lvef_model`, as `inference.Predictor` too) with its `config.init`."""
  model = registry.lvef_model(config, mean=50.0)
  params = runs.encoder_init(config.init, registry.abstract_params(registry.lvef_init_fn(
      model, config)))["video_encoder"]
  encoder = model.video_encoder
  return encoder.config.input_norm, np.asarray(encoder.apply({"params": params}, clips))


def test_paper_encoder_matches_the_reference_pipeline_end_to_end(tmp_path, monkeypatch):
  """uint8 clips through the paper's PyTorch pipeline (its transform, a pytorchvideo MViT saved in
  its checkpoint layout) and through ours (that file as `init=cmr_transformer:`) agree; with the
  Kinetics normalisation (what the weights got before it followed them) they do not."""
  torch = _torch()
  torch.manual_seed(0)
  video = _pytorchvideo_mvit(TINY)
  _perturb(video)
  for module in filter(lambda m: isinstance(m, torch.nn.LayerNorm), video.modules()):
    module.eps = TINY.pool_norm_eps  # as in test_pytorchvideo_mvit_base_16x4_output_matches
  state = {f"model.video_encoder.{k}": v for k, v in video.state_dict().items()
           if not k.startswith("head.")}
  state.update({"model.video_proj.weight": torch.randn(PROJ_DIM, TINY.width),
                "model.video_proj.bias": torch.randn(PROJ_DIM)})
  ckpt = str(tmp_path / "paper.ckpt")
  torch.save({"state_dict": state, "epoch": 1}, ckpt)
  folder = converted.save_converted(str(tmp_path / "paper"),
                                    converted.convert_file(ckpt, video_config=TINY))
  clips = np.random.default_rng(3).integers(0, 256, (3, TINY.num_frames, TINY.image_size,
                                                     TINY.image_size), dtype=np.uint8)
  ref = _paper_features(monkeypatch, video, clips)

  for path in (ckpt, folder):  # converted in memory, and the converted folder
    config = _finetune_config(f"cmr_transformer:{path}")
    tuned = runs.with_init_input_norm(config)
    assert tuned.model.video_overrides.input_norm == "cmr_transformer"
    norm, ours = _finetune_features(tuned, clips)
    assert norm == "cmr_transformer"
    error = _relative_error(ours, ref)
    print(f"paper encoder end to end ({os.path.basename(path)}): max abs difference "
          f"{np.abs(ours - ref).max():.2e}, relative error {error:.2e}")
    assert error < TOLERANCE
  # The same weights with the Kinetics normalisation, as the model applied it before.
  norm, old = _finetune_features(config, clips)
  assert norm == "kinetics"
  old_error = _relative_error(old, ref)
  print(f"with the Kinetics normalisation: max abs difference {np.abs(old - ref).max():.2e}, "
        f"relative error {old_error:.2e}")
  assert old_error > 1000 * TOLERANCE
  # The run keeps it: its config.json rebuilds the same model (as inference.Predictor does).
  runs.save_config(tuned, str(tmp_path / "run"))
  norm, again = _finetune_features(runs.load_config(str(tmp_path / "run")), clips)
  assert norm == "cmr_transformer"
  np.testing.assert_array_equal(again, ours)
  # A config that asks for another normalisation than the weights' is refused.
  config.model.video_overrides.input_norm = "kinetics"
  with pytest.raises(ValueError, match="expect input normalised as 'cmr_transformer'"):
    runs.with_init_input_norm(config)
  # Kinetics weights keep Kinetics' normalisation, and still match.
  kinetics = str(tmp_path / "kinetics.pyth")
  torch.save({"model_state": video.state_dict()}, kinetics)
  tuned = runs.with_init_input_norm(_finetune_config(f"kinetics:{kinetics}"))
  norm, ours = _finetune_features(tuned, clips)
  assert norm == tuned.model.video_overrides.input_norm == "kinetics"
  assert _relative_error(ours, _features(video, video.head.proj, clips)) < TOLERANCE
  # Random and pre-training inits keep the config's (default) normalisation.
  for config in (_finetune_config("random"), _finetune_config(f"pretrain:{tmp_path}")):
    assert runs.with_init_input_norm(config) is config


def test_safetensors_file_and_tool_stops_on_a_missing_tensor(tmp_path):
  _torch()
  safetensors_torch = _import_or_skip("safetensors.torch", reason=SKIP_REASON)
  model = _pytorchvideo_mvit(TINY)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  path = str(tmp_path / "tiny.safetensors")
  safetensors_torch.save_file(state, path)
  result = converted.convert_file(path, video_config=TINY)
  np.testing.assert_array_equal(result.params["video_encoder"]["norm_embed"]["bias"],
                                state["norm_embed.bias"].numpy())
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="garbage.pth"):
    converted.convert_file(str(garbage))
  missing = "video_encoder/blocks_1/attn/pool_q/kernel"
  del state["blocks.1.attn.pool_q.weight"]
  broken = str(tmp_path / "broken.safetensors")
  safetensors_torch.save_file(state, broken)
  run = subprocess.run([sys.executable, "-m", "tools.convert_weights", f"--src={broken}",
                        "--video_config=mvit_tiny", f"--out={tmp_path / 'out'}"],
                       cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode != 0
  assert f"1 model parameters missing from the file [allow_missing]: {missing}" in run.stderr
  assert not os.path.exists(tmp_path / "out")
