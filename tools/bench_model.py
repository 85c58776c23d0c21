r"""Benchmarks one training step of a named video encoder; prints one JSON line.

The step (`cmr_jax.train.speed`): encoder -> 400-way linear head -> softmax cross-entropy on
random labels -> AdamW, on a batch of random uint8 clips. Reported: compile time, step time,
clips/s, FLOPs per clip from XLA's cost analysis of the compiled step and forward, achieved
TFLOP/s and, in bfloat16 on a device of known peak, MFU.

--compare_scan compiles and times the step with the MViT's block runs scanned and unscanned
(`MViTConfig.scan_blocks`) in the same run, alternating, and reports both and their ratios.
--peer times PyTorch's MViT on the same step in the same run, alternating with the JAX step, and
reports the clips/s ratio; --threads gives both sides the same CPU thread count (PyTorch's
intra-op threads; for XLA, the process's CPU affinity, which sizes its thread pool).
--peer_compile runs the peer `torch.compile`d (falling back to eager mode, with the reason in the
JSON, if compilation fails or exceeds --peer_compile_timeout_s); with --dtype=bfloat16 the peer
runs under bfloat16 autocast.

  python tools/bench_model.py --config=mvit_tiny --batch=8 --compare_scan
  python tools/bench_model.py --config=mvit_b_16x4 --batch=2 --peer --threads=2   # CPU ratio
  python tools/bench_model.py --config=mvit_b_16x4 --batch=8 --dtype=bfloat16 --peer \
      --peer_compile  # GPU
"""

from __future__ import annotations

import json

import jax
from absl import flags, logging

from cmr_jax import logs
from cmr_jax.models import layers
from cmr_jax.models import registry
from cmr_jax.models.mvit import MViTConfig
from cmr_jax.train import speed

_CONFIG = flags.DEFINE_string("config", "mvit_tiny",
                              f"video config: {sorted(registry.VIDEO_CONFIGS)}")
_BATCH = flags.DEFINE_integer("batch", 2, "clips per step")
_FRAMES = flags.DEFINE_integer("frames", None, "frames per clip (default: the config's)")
_SIZE = flags.DEFINE_integer("size", None, "clip height and width (default: the config's)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_REMAT = flags.DEFINE_bool("remat", False, "rematerialise each block in the backward pass")
_ATTENTION = flags.DEFINE_enum("attention", "einsum", list(layers.ATTENTION_IMPLS),
                               "attention implementation (cudnn: GPU, bfloat16)")
_SCAN = flags.DEFINE_bool("scan_blocks", None,
                          "scan the MViT's runs of identical blocks (default: the config's)")
_COMPARE_SCAN = flags.DEFINE_bool("compare_scan", False,
                                  "also compile and time the other --scan_blocks setting")
_COMPILE_ROUNDS = flags.DEFINE_integer("compile_rounds", 2,
                                       "compiles of each setting with --compare_scan, alternating")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per round")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "timing rounds (alternating between the steps)")
_PEER = flags.DEFINE_bool("peer", False, "also time PyTorch's MViT on the same step")
_PEER_COMPILE = flags.DEFINE_bool("peer_compile", False, "torch.compile the peer")
_PEER_COMPILE_TIMEOUT = flags.DEFINE_float("peer_compile_timeout_s", 900.0,
                                           "give up torch.compile after this long")
_THREADS = flags.DEFINE_integer("threads", None,
                                "CPU threads of both sides (default: every core this process has)")


def _scan_settings(config) -> list[bool]:
  """The scan settings to build, the reported one first."""
  if not isinstance(config, MViTConfig):
    return [False]
  main = config.scan_blocks if _SCAN.value is None else _SCAN.value
  return [main, not main] if _COMPARE_SCAN.value else [main]


def main() -> None:
  jax_threads = speed.limit_cpu_threads(_THREADS.value)
  overrides = {k: v for k, v in (("num_frames", _FRAMES.value), ("image_size", _SIZE.value))
               if v is not None}
  config = registry.video_config(_CONFIG.value, **overrides)
  batch = _BATCH.value
  device = jax.devices()[0]
  video, labels = speed.random_batch(config, batch)
  logging.info("compiling %s at batch %d, %dx%dx%d, %s on %s", _CONFIG.value, batch,
               config.num_frames, config.image_size, config.image_size, _DTYPE.value,
               device.device_kind)
  settings = _scan_settings(config)
  options = {s: speed.JaxOptions(_DTYPE.value, _REMAT.value, _ATTENTION.value, s)
             for s in settings}
  compile_s: dict[bool, list[float]] = {s: [] for s in settings}
  steps: dict[bool, speed.JaxStep] = {}
  for r in range(_COMPILE_ROUNDS.value if len(settings) > 1 else 1):
    for s in settings:
      step = speed.JaxStep(_CONFIG.value, config, video, labels, options[s],
                           forward_flops=s == settings[0] and r == 0)
      compile_s[s].append(step.compile_s)
      logging.info("scan_blocks=%s: compiled in %.1f s", s, step.compile_s)
      steps.setdefault(s, step)
  jax_step = steps[settings[0]]
  timers = {f"jax_scan_{s}": steps[s] for s in settings}
  for fn in timers.values():
    fn()  # warm-up
  peer = None
  if _PEER.value:
    peer = speed.TorchStep(config, video, labels, threads=_THREADS.value,
                           bfloat16=_DTYPE.value == "bfloat16", compile_model=_PEER_COMPILE.value,
                           compile_timeout_s=_PEER_COMPILE_TIMEOUT.value)
    peer()  # warm-up
    timers["peer"] = peer
  medians = speed.alternate(timers, _STEPS.value, _ROUNDS.value)
  step_s = medians[f"jax_scan_{settings[0]}"]
  achieved = jax_step.step_flops / step_s / 1e12
  peak = speed.peak_bf16_tflops(device.device_kind) if _DTYPE.value == "bfloat16" else None
  result = {
      "config": _CONFIG.value, "device_kind": device.device_kind, "platform": device.platform,
      "batch": batch, "frames": config.num_frames, "size": config.image_size,
      "dtype": _DTYPE.value, "remat": _REMAT.value, "attention": _ATTENTION.value,
      "scan_blocks": settings[0], "jax_threads": jax_threads,
      "encoder_params": jax_step.num_params, "compile_s": round(min(compile_s[settings[0]]), 2),
      "step_s": round(step_s, 4), "clips_per_s": round(batch / step_s, 3),
      "fwd_gflops_per_clip": round(jax_step.forward_flops / batch / 1e9, 3),
      "step_gflops_per_clip": round(jax_step.step_flops / batch / 1e9, 3),
      "achieved_tflops": round(achieved, 4),
      "peak_bf16_tflops": peak, "mfu": round(achieved / peak, 4) if peak else None,
  }
  if len(settings) > 1:
    off, on = (min(compile_s[s]) for s in (False, True))
    result["scan_compare"] = {
        **{f"scan_{s}": {"compile_s": [round(c, 2) for c in compile_s[s]],
                         "step_s": round(medians[f"jax_scan_{s}"], 4)} for s in settings},
        "compile_speedup": round(off / on, 3),
        "step_s_scanned_over_unscanned": round(medians["jax_scan_True"]
                                               / medians["jax_scan_False"], 3)}
    print(f"compile: unscanned {off:.1f} s, scanned {on:.1f} s ({off / on:.2f}x faster); step "
          f"scanned/unscanned {result['scan_compare']['step_s_scanned_over_unscanned']:.3f}")
  if peer is not None:
    peer_s = medians["peer"]
    result["peer"] = {**peer.describe(), "step_s": round(peer_s, 4),
                      "clips_per_s": round(batch / peer_s, 3)}
    result["jax_over_peer_clips_per_s"] = round(peer_s / step_s, 3)
    print(f"jax {step_s:.3f} s/step, peer {peer_s:.3f} s/step: jax/peer clips/s = "
          f"{peer_s / step_s:.3f}x ({jax_threads} XLA cores, {peer.torch.get_num_threads()} "
          "torch threads)")
  print(json.dumps(result))


if __name__ == "__main__":
  logs.run(main)
