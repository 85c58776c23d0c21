r"""Benchmarks one training step of a named video encoder; prints one JSON line.

The step (`cmr_jax.train.speed`): encoder -> 400-way linear head -> softmax cross-entropy on
random labels -> AdamW, on a batch of random uint8 clips. Reported: compile time, step time,
clips/s, FLOPs per clip from XLA's cost analysis of the compiled step and forward, achieved
TFLOP/s and, in bfloat16 on a device of known peak, MFU.

--compare=SETTING,... also compiles and times the step built other ways, in the same run,
alternating (each compile starts from cleared caches, and the persistent compilation cache is
off), and reports each one's compile time (wall and CPU seconds) and step time with their ratios
to the first setting. A SETTING is an MViT pooling-tap loop (`MViTConfig.pool_loop`: unrolled,
looped, auto), optionally `+scan` (`MViTConfig.scan_blocks`): the issue-15 comparison is
`--pool_loop=unrolled --compare=looped,looped+scan`.
--peer times PyTorch's MViT on the same step in the same run, alternating with the JAX step, and
reports the clips/s ratio; the peer runs in a child process of its own (`speed.PeerProcess`), so
that each framework steps alone (--nopeer_process: in this process, where the two share threads
and heap and the JAX step ran 1.4x slower on the 2-core CPU); --threads gives both sides the same
CPU thread count (PyTorch's intra-op threads; for XLA, the process's CPU affinity, which sizes its
thread pool). The peer's glibc heap gets the settings ours has (`cpu_runtime`: on the CPU our
programs keep their heap pages) unless --peer_heap=default.
--peer_compile runs the peer `torch.compile`d (falling back to eager mode, with the reason in the
JSON, if compilation fails or exceeds --peer_compile_timeout_s); with --dtype=bfloat16 the peer
runs under bfloat16 autocast.

  python tools/bench_model.py --config=mvit_b_16x4 --batch=2 --pool_loop=unrolled \
      --compare=looped,looped+scan --steps=1  # compile time
  python tools/bench_model.py --config=mvit_b_16x4 --batch=2 --peer --threads=2   # CPU ratio
  python tools/bench_model.py --config=mvit_b_16x4 --batch=8 --dtype=bfloat16 --peer \
      --peer_compile  # GPU
"""

from __future__ import annotations

import json

import jax
from absl import app, flags, logging

from cmr_jax import cpu_runtime
from cmr_jax import logs
from cmr_jax.models import layers
from cmr_jax.models import mvit
from cmr_jax.models import registry
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
_POOL_LOOP = flags.DEFINE_enum("pool_loop", None, list(mvit.POOL_LOOPS),
                               "how the MViT's pooling windows visit their taps (default: the "
                               "config's)")
_COMPARE = flags.DEFINE_list("compare", [], "other MViT step settings to compile and time in the "
                             "same run: POOL_LOOP or POOL_LOOP+scan")
_COMPILE_ROUNDS = flags.DEFINE_integer("compile_rounds", 2,
                                       "compiles of each setting with --compare, alternating")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per round")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "timing rounds (alternating between the steps)")
_ROUND_WARMUP = flags.DEFINE_integer("round_warmup", 1,
                                     "untimed calls that open each step's turn in a round (a "
                                     "step right after another program's is not steady)")
_PEER = flags.DEFINE_bool("peer", False, "also time PyTorch's MViT on the same step")
_PEER_COMPILE = flags.DEFINE_bool("peer_compile", False, "torch.compile the peer")
_PEER_COMPILE_TIMEOUT = flags.DEFINE_float("peer_compile_timeout_s", 900.0,
                                           "give up torch.compile after this long")
_PEER_PROCESS = flags.DEFINE_bool("peer_process", True,
                                  "run the peer in a child process of its own (each framework "
                                  "alone while it steps); --nopeer_process: in this process")
_PEER_HEAP = flags.DEFINE_enum("peer_heap", "same", ["same", "default"],
                                "the peer process's glibc heap: the same settings as ours "
                                "(cpu_runtime.keep_heap_pages where applied) or glibc's defaults")
_THREADS = flags.DEFINE_integer("threads", None,
                                "CPU threads of both sides (default: every core this process has)")


def _setting(text: str) -> tuple[str, bool]:
  """"looped+scan" -> ("looped", True); "unrolled" -> ("unrolled", False)."""
  loop, plus, scan = text.partition("+")
  if loop not in mvit.POOL_LOOPS or (plus and scan != "scan"):
    raise app.UsageError(f"--compare setting {text!r}: want one of {mvit.POOL_LOOPS}, "
                         "optionally followed by +scan")
  return loop, bool(plus)


def _name(setting: tuple[str, bool]) -> str:
  return setting[0] + ("+scan" if setting[1] else "")


def _settings(config) -> list[tuple[str, bool]]:
  """The (pool_loop, scan_blocks) settings to build, the reported one first."""
  if not isinstance(config, mvit.MViTConfig):
    if _COMPARE.value:
      raise app.UsageError(f"--compare needs an MViT config, not {_CONFIG.value}")
    return [(mvit.POOL_LOOPS[0], False)]
  main = (config.pool_loop if _POOL_LOOP.value is None else _POOL_LOOP.value,
          config.scan_blocks if _SCAN.value is None else _SCAN.value)
  settings = [main]
  for text in _COMPARE.value:
    if _setting(text) not in settings:
      settings.append(_setting(text))
  return settings


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
  settings = _settings(config)
  if len(settings) > 1:  # every compile from scratch
    jax.config.update("jax_enable_compilation_cache", False)
  options = {s: speed.JaxOptions(_DTYPE.value, _REMAT.value, _ATTENTION.value, s[1], s[0])
             for s in settings}
  compile_s: dict[tuple[str, bool], list[tuple[float, float]]] = {s: [] for s in settings}
  steps: dict[tuple[str, bool], speed.JaxStep] = {}
  for r in range(_COMPILE_ROUNDS.value if len(settings) > 1 else 1):
    for s in settings:
      jax.clear_caches()
      step = speed.JaxStep(_CONFIG.value, config, video, labels, options[s],
                           forward_flops=s == settings[0] and r == 0)
      compile_s[s].append((step.compile_s, step.compile_cpu_s))
      logging.info("%s: compiled in %.1f s (%.1f CPU s)", _name(s), step.compile_s,
                   step.compile_cpu_s)
      steps.setdefault(s, step)
  jax_step = steps[settings[0]]
  timers = {f"jax_{_name(s)}": steps[s] for s in settings}
  for fn in timers.values():
    fn()  # warm-up
  peer = None
  if _PEER.value:
    peer_options = dict(threads=_THREADS.value, bfloat16=_DTYPE.value == "bfloat16",
                        compile_model=_PEER_COMPILE.value,
                        compile_timeout_s=_PEER_COMPILE_TIMEOUT.value)
    if _PEER_PROCESS.value:
      same = _PEER_HEAP.value == "same" and cpu_runtime.state().get("heap", False)
      peer = speed.PeerProcess(config, video, labels, keep_heap_pages=same, **peer_options)
    else:  # one process, one heap
      peer = speed.TorchStep(config, video, labels, **peer_options)
    peer()  # warm-up
    timers["peer"] = peer
  medians = speed.alternate(timers, _STEPS.value, _ROUNDS.value, _ROUND_WARMUP.value)
  step_s = medians[f"jax_{_name(settings[0])}"]
  achieved = jax_step.step_flops / step_s / 1e12
  peak = speed.peak_bf16_tflops(device.device_kind) if _DTYPE.value == "bfloat16" else None
  best = {s: (min(w for w, _ in compile_s[s]), min(c for _, c in compile_s[s])) for s in settings}
  result = {
      "config": _CONFIG.value, "device_kind": device.device_kind, "platform": device.platform,
      "batch": batch, "frames": config.num_frames, "size": config.image_size,
      "dtype": _DTYPE.value, "remat": _REMAT.value, "attention": _ATTENTION.value,
      "pool_loop": settings[0][0], "scan_blocks": settings[0][1], "jax_threads": jax_threads,
      "allocator": cpu_runtime.allocator(), "encoder_params": jax_step.num_params,
      "compile_s": round(best[settings[0]][0], 2),
      "compile_cpu_s": round(best[settings[0]][1], 2),
      "step_s": round(step_s, 4), "clips_per_s": round(batch / step_s, 3),
      "fwd_gflops_per_clip": round(jax_step.forward_flops / batch / 1e9, 3),
      "step_gflops_per_clip": round(jax_step.step_flops / batch / 1e9, 3),
      "achieved_tflops": round(achieved, 4),
      "peak_bf16_tflops": peak, "mfu": round(achieved / peak, 4) if peak else None,
      "cpu_runtime": cpu_runtime.state(),
  }
  if len(settings) > 1:
    first = settings[0]
    result["compare"] = {_name(s): {
        "compile_s": [round(w, 2) for w, _ in compile_s[s]],
        "compile_cpu_s": [round(c, 2) for _, c in compile_s[s]],
        "step_s": round(medians[f"jax_{_name(s)}"], 4),
        "compile_speedup": round(best[first][0] / best[s][0], 3),
        "compile_cpu_speedup": round(best[first][1] / best[s][1], 3),
        "step_s_over_first": round(medians[f"jax_{_name(s)}"] / step_s, 3)} for s in settings}
    for s in settings[1:]:
      row = result["compare"][_name(s)]
      print(f"compile {_name(first)} {best[first][0]:.1f} s ({best[first][1]:.1f} CPU s), "
            f"{_name(s)} {best[s][0]:.1f} s ({best[s][1]:.1f} CPU s): {row['compile_speedup']:.2f}x "
            f"faster ({row['compile_cpu_speedup']:.2f}x CPU); step {_name(s)}/{_name(first)} "
            f"{row['step_s_over_first']:.3f}")
  if peer is not None:
    peer_s = medians["peer"]
    result["peer"] = {"own_process": False, **peer.describe(), "step_s": round(peer_s, 4),
                      "clips_per_s": round(batch / peer_s, 3)}
    result["jax_over_peer_clips_per_s"] = round(peer_s / step_s, 3)
    print(f"jax {step_s:.3f} s/step, peer {peer_s:.3f} s/step: jax/peer clips/s = "
          f"{peer_s / step_s:.3f}x ({jax_threads} XLA cores, {peer.describe()['threads']} "
          "torch threads)")
  print(json.dumps(result))
  if isinstance(peer, speed.PeerProcess):
    peer.close()


if __name__ == "__main__":
  logs.run(main)
