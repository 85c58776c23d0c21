r"""Benchmarks one training step of a named video encoder; prints one JSON line.

The step is what pre-training does to the video tower, made comparable with Kinetics training:
encoder -> 400-way linear head -> softmax cross-entropy on random labels -> AdamW, on a batch of
random uint8 clips. Reported: compile time, step time, clips/s, FLOPs per clip from XLA's cost
analysis of the compiled step and of the compiled forward (XLA counts a multiply-add as 2 FLOPs
and every elementwise op as 1), achieved TFLOP/s and, in bfloat16 on a device of known peak, MFU.

With --peer the same step (same batch, frames, size, AdamW) of PyTorch's MViT is timed in the same
run, alternating with the JAX step: pytorchvideo's `create_multiscale_vision_transformers` built
with the same geometry (random weights), or torchvision's `mvit_v1_b` for mvit_b_16x4 at
16x224x224 when pytorchvideo is missing (`pip install -e '.[torch]'`).

  python -m tools.bench_model --config=mvit_tiny --batch=4
  python -m tools.bench_model --config=mvit_b_16x4 --batch=8 --dtype=bfloat16 --peer  # GPU
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging

from cmr_jax.convert import mvit as convert_mvit
from cmr_jax import logs
from cmr_jax.models import layers
from cmr_jax.models.mvit import KINETICS_MEAN, KINETICS_STD, UINT8_MAX, MViTConfig
from cmr_jax.models import registry

_CONFIG = flags.DEFINE_string("config", "mvit_tiny",
                              f"video config: {sorted(registry.VIDEO_CONFIGS)}")
_BATCH = flags.DEFINE_integer("batch", 2, "clips per step")
_FRAMES = flags.DEFINE_integer("frames", None, "frames per clip (default: the config's)")
_SIZE = flags.DEFINE_integer("size", None, "clip height and width (default: the config's)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_REMAT = flags.DEFINE_bool("remat", False, "rematerialise each block in the backward pass")
_ATTENTION = flags.DEFINE_enum("attention", "einsum", list(layers.ATTENTION_IMPLS),
                               "attention implementation (cudnn: GPU, bfloat16)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per round")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "timing rounds (alternating with the peer)")
_PEER = flags.DEFINE_bool("peer", False, "also time PyTorch's MViT on the same step")
_THREADS = flags.DEFINE_integer("threads", None, "PyTorch CPU threads (default: torch's)")

NUM_CLASSES = 400  # the Kinetics head both sides train
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.05
# Peak dense bfloat16 TFLOP/s per chip, matched in order against jax's device_kind.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("V100", 125.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
)


def peak_bf16_tflops(device_kind: str) -> float | None:
  """The dense bfloat16 peak of a device kind, or None when unknown."""
  for pattern, peak in PEAK_BF16_TFLOPS:
    if pattern.lower() in device_kind.lower():
      return peak
  return None


def _flops(compiled: Any) -> float:
  """Total FLOPs of a compiled executable from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per partition
    analysis = analysis[0]
  return float(analysis["flops"])


class _Classifier(nn.Module):
  """The encoder with a Kinetics-style linear head (pytorchvideo's `head.proj`)."""

  encoder: nn.Module

  @nn.compact
  def __call__(self, video: jax.Array, train: bool) -> jax.Array:
    features = self.encoder(video, train=train)
    return nn.Dense(NUM_CLASSES, dtype=jnp.float32, name="head")(features.astype(jnp.float32))


def _timed(fn: Callable[[], Any], steps: int) -> list[float]:
  """Seconds per call of `fn` (which must block until its work is done)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


class JaxStep:
  """A compiled AdamW step of the JAX encoder + head on a fixed random batch."""

  def __init__(self, name: str, config: MViTConfig, video: np.ndarray, labels: np.ndarray):
    encoder = registry.video_encoder(name, dtype=_DTYPE.value, remat=_REMAT.value,
                                    attention_impl=_ATTENTION.value,
                                    num_frames=config.num_frames, image_size=config.image_size)
    self.model = _Classifier(encoder)
    self.video = jnp.asarray(video)  # uint8 [B, T, H, W]
    self.labels = jnp.asarray(labels)
    params = nn.meta.unbox(jax.jit(self.model.init, static_argnums=2)(
        jax.random.key(0), self.video, False))["params"]
    self.num_params = sum(x.size for x in jax.tree.leaves(params["encoder"]))
    self.tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    self.state = (params, self.tx.init(params))

    def loss_fn(params, video, labels):
      logits = self.model.apply({"params": params}, video, True,
                                rngs={"dropout": jax.random.key(1)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(state, video, labels):
      params, opt_state = state
      loss, grads = jax.value_and_grad(loss_fn)(params, video, labels)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    start = time.perf_counter()
    self.compiled = jax.jit(step, donate_argnums=0).lower(self.state, self.video,
                                                          self.labels).compile()
    self.compile_s = time.perf_counter() - start
    forward = jax.jit(lambda p, v: self.model.apply({"params": p}, v, False))
    self.forward_flops = _flops(forward.lower(params, self.video).compile())
    self.step_flops = _flops(self.compiled)

  def __call__(self) -> None:
    self.state, loss = self.compiled(self.state, self.video, self.labels)
    loss.block_until_ready()


class TorchStep:
  """The same step with PyTorch's MViT (pytorchvideo geometry, or torchvision's mvit_v1_b)."""

  def __init__(self, config: MViTConfig, video: np.ndarray, labels: np.ndarray):
    import torch  # pylint: disable=g-import-not-at-top

    self.torch = torch
    if _THREADS.value:
      torch.set_num_threads(_THREADS.value)
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self.model, self.impl = self._build(config)
    self.model.to(self.device).train()
    self.num_params = sum(p.numel() for p in self.model.parameters())
    # The JAX model's input conversion, done once here: [B, 3, T, H, W] normalised float.
    x = (torch.tensor(video, dtype=torch.float32) / UINT8_MAX - KINETICS_MEAN) / KINETICS_STD
    self.video = x[:, None].expand(-1, 3, -1, -1, -1).contiguous().to(self.device)
    self.labels = torch.tensor(labels).to(self.device)
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE,
                                 weight_decay=WEIGHT_DECAY)
    self.autocast = _DTYPE.value == "bfloat16"

  def _build(self, config: MViTConfig):
    try:
      from pytorchvideo.models import vision_transformers  # pylint: disable=g-import-not-at-top
    except ImportError:
      if config != registry.video_config("mvit_b_16x4"):
        raise
      import torchvision  # pylint: disable=g-import-not-at-top
      return torchvision.models.video.mvit_v1_b(num_classes=NUM_CLASSES), "torchvision.mvit_v1_b"
    model = vision_transformers.create_multiscale_vision_transformers(
        **convert_mvit.pytorchvideo_factory_kwargs(config), head_num_classes=NUM_CLASSES)
    return model, "pytorchvideo.create_multiscale_vision_transformers"

  def __call__(self) -> None:
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
      logits = self.model(self.video)
    loss = torch.nn.functional.cross_entropy(logits.float(), self.labels)
    loss.backward()
    self.opt.step()
    if self.device == "cuda":
      torch.cuda.synchronize()


def main() -> None:
  overrides = {k: v for k, v in (("num_frames", _FRAMES.value), ("image_size", _SIZE.value))
               if v is not None}
  config = registry.video_config(_CONFIG.value, **overrides)
  batch = _BATCH.value
  device = jax.devices()[0]
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (batch, config.num_frames, config.image_size, config.image_size),
                       dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, batch)
  logging.info("compiling %s at batch %d, %dx%dx%d, %s on %s", _CONFIG.value, batch,
               config.num_frames, config.image_size, config.image_size, _DTYPE.value,
               device.device_kind)
  jax_step = JaxStep(_CONFIG.value, config, video, labels)
  jax_step()  # warm-up
  peer = TorchStep(config, video, labels) if _PEER.value else None
  if peer is not None:
    peer()  # warm-up
  jax_times, peer_times = [], []
  for r in range(_ROUNDS.value):
    jax_times += _timed(jax_step, _STEPS.value)
    if peer is not None:
      peer_times += _timed(peer, _STEPS.value)
    logging.info("round %d/%d: jax %.3f s/step%s", r + 1, _ROUNDS.value,
                 statistics.median(jax_times),
                 f", torch {statistics.median(peer_times):.3f} s/step" if peer else "")
  step_s = statistics.median(jax_times)
  achieved = jax_step.step_flops / step_s / 1e12
  peak = peak_bf16_tflops(device.device_kind) if _DTYPE.value == "bfloat16" else None
  result = {
      "config": _CONFIG.value, "device_kind": device.device_kind, "platform": device.platform,
      "batch": batch, "frames": config.num_frames, "size": config.image_size,
      "dtype": _DTYPE.value, "remat": _REMAT.value, "attention": _ATTENTION.value,
      "encoder_params": jax_step.num_params, "compile_s": round(jax_step.compile_s, 2),
      "step_s": round(step_s, 4), "clips_per_s": round(batch / step_s, 3),
      "fwd_gflops_per_clip": round(jax_step.forward_flops / batch / 1e9, 3),
      "step_gflops_per_clip": round(jax_step.step_flops / batch / 1e9, 3),
      "achieved_tflops": round(achieved, 4),
      "peak_bf16_tflops": peak, "mfu": round(achieved / peak, 4) if peak else None,
  }
  if peer is not None:
    peer_s = statistics.median(peer_times)
    result["peer"] = {"impl": peer.impl, "device": peer.device, "params": peer.num_params,
                      "threads": peer.torch.get_num_threads(), "step_s": round(peer_s, 4),
                      "clips_per_s": round(batch / peer_s, 3)}
    result["jax_over_peer_clips_per_s"] = round(peer_s / step_s, 3)
  print(json.dumps(result))


if __name__ == "__main__":
  logs.run(main)
