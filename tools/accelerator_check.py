r"""One command for a GPU or TPU machine: training speed, MFU, the PyTorch peer and the input rate.

  python tools/accelerator_check.py --out=accelerator_check.json       # GPU/TPU, < 8 minutes
  python tools/accelerator_check.py --quick --out=/tmp/check.json      # CPU: a tiny rehearsal

Phases, each written to --out as soon as it ends (a run cut short keeps what it measured):
  1. train: the MViT-B 16x4 training step (`cmr_jax.train.speed`, bfloat16, scanned block runs)
     with remat off and on, each at the largest batch that fits: one compile at --probe_batch
     gives XLA's memory analysis, extrapolated to the device's memory (`speed.largest_batch`),
     then compiled and timed there, backing off by 20% on out-of-memory. Reports step time,
     clips/s, XLA's FLOPs and MFU against the chip's bfloat16 peak.
  2. peer: PyTorch's MViT (pytorchvideo) on the same step in its best mode (torch.compile and
     bfloat16 autocast; eager if compilation fails, with the reason) at the best JAX batch (halved
     on out-of-memory), and the JAX/peer clips/s ratio.
  3. input: the pre-training input pipeline (grain, --workers processes) on a temporary set of
     phantom studies at the model's clip size, handing stored cines to the step as
     mvit_b_pretrain does (augment_on_device; also timed with clips made on the host): clips/s
     of this host against what the best step consumes per host (the ratio should exceed 1).
Phases 1 and 2 run in child processes of this program, so that JAX and PyTorch never hold the
accelerator's memory at once. A phase that would start after --budget_s is skipped and says so.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import flags
from absl import logging
import jax

from cmr_jax import logs
from cmr_jax.data import pipeline
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import tokenizer
from cmr_jax.models import registry
from cmr_jax.phantom import simulator
from cmr_jax.train import speed

_OUT = flags.DEFINE_string("out", "accelerator_check.json", "JSON written after every phase")
_QUICK = flags.DEFINE_bool("quick", False,
                           "CPU rehearsal: a 2-block mvit_tiny at 8x32x32, float32, tiny batches and input")
_CONFIG = flags.DEFINE_string("config", "mvit_b_16x4", "video config (not with --quick)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "compute dtype")
_PROBE_BATCH = flags.DEFINE_integer("probe_batch", 8, "batch of the memory-probing compile")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 512, "largest batch tried")
_MEMORY_GB = flags.DEFINE_float("memory_gb", None,
                                "device memory to plan for (default: the device's own limit)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per measurement")
_PEER = flags.DEFINE_bool("peer", True, "time the PyTorch peer")
_PEER_COMPILE = flags.DEFINE_bool("peer_compile", True, "torch.compile the peer")
_WORKERS = flags.DEFINE_integer("workers", None, "input worker processes (default: cores - 1)")
_STUDIES = flags.DEFINE_integer("studies", 24, "phantom studies of the input measurement")
_BUDGET = flags.DEFINE_integer("budget_s", 420, "no phase starts after this many seconds")
_PHASE = flags.DEFINE_enum("phase", "all", ["all", "train", "peer"],
                           "internal: the phase a child process runs")
_PEER_BATCH = flags.DEFINE_integer("peer_batch", 1, "internal: the peer phase's batch")
_JAX_CLIPS = flags.DEFINE_float("jax_clips", 1.0, "internal: the best JAX step's clips/s")

QUICK_GEOMETRY = dict(num_frames=8, image_size=32, kv_pool_stride=(1, 2, 2), depth=2, stage_starts=(1,))
QUICK_MEMORY_GB = 1.0  # the CPU reports no device memory limit
MAX_RETRIES = 3
BACKOFF = 0.8
CHILD_GRACE_S = 60.0  # a child phase may run this far past --budget_s before it is cut off
BATCH_MULTIPLE = 8  # batches of the full check are rounded down to a multiple of this


def _settings() -> dict[str, Any]:
  """The run's settings: the full check's, or the --quick rehearsal's."""
  if _QUICK.value:
    return dict(config="mvit_tiny", overrides=QUICK_GEOMETRY, dtype="float32", probe_batch=4,
                max_batch=4, multiple=1, steps=2, memory_gb=_MEMORY_GB.value or QUICK_MEMORY_GB,
                peer_compile=False, studies=4, workers=0, input_batch=2, input_batches=2)
  return dict(config=_CONFIG.value, overrides={}, dtype=_DTYPE.value,
              probe_batch=_PROBE_BATCH.value, max_batch=_MAX_BATCH.value,
              multiple=BATCH_MULTIPLE, steps=_STEPS.value, memory_gb=_MEMORY_GB.value,
              peer_compile=_PEER_COMPILE.value, studies=_STUDIES.value,
              workers=_WORKERS.value if _WORKERS.value is not None else max(os.cpu_count() - 1, 0),
              input_batch=8, input_batches=20)


def _memory_limit(device: jax.Device, memory_gb: float | None) -> float:
  if memory_gb is not None:
    return memory_gb * 2**30
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    raise ValueError(f"{device.device_kind} reports no memory limit: pass --memory_gb")
  return float(stats["bytes_limit"])


def _measure(s: dict[str, Any], step: speed.JaxStep, batch: int,
             peak: float | None) -> dict[str, Any]:
  """Times a compiled step (raises on out-of-memory)."""
  step()  # warm-up
  step_s = min(speed.timed(step, s["steps"]))
  tflops = step.step_flops / step_s / 1e12
  return {"batch": batch, "compile_s": round(step.compile_s, 2), "step_s": round(step_s, 4),
          "clips_per_s": round(batch / step_s, 3), "step_tflop": round(step.step_flops / 1e12, 4),
          "achieved_tflops": round(tflops, 3), "mfu": round(tflops / peak, 4) if peak else None,
          "temp_gb": round(step.temp_bytes / 2**30, 3)}


def _compiled(s: dict[str, Any], config, options: speed.JaxOptions, batch: int) -> speed.JaxStep:
  video, labels = speed.random_batch(config, batch)
  return speed.JaxStep(s["config"], config, video, labels, options, forward_flops=False)


def train_phase(s: dict[str, Any], config, remat: bool, limit: float,
                peak: float | None) -> dict[str, Any]:
  """The step at the largest batch that fits, with `remat` on or off."""
  options = speed.JaxOptions(s["dtype"], remat, "einsum", True)
  step = _compiled(s, config, options, s["probe_batch"])
  batch = speed.largest_batch(step, s["probe_batch"], limit, max_batch=s["max_batch"],
                              multiple=s["multiple"])
  logging.info("remat=%s: probe at batch %d needs %.2f GB of temporaries: trying batch %d",
               remat, s["probe_batch"], step.temp_bytes / 2**30, batch)
  out: dict[str, Any] = {"remat": remat, "probe_batch": s["probe_batch"], "tried": []}
  for _ in range(MAX_RETRIES):
    try:
      if batch != s["probe_batch"]:
        step = None  # frees the probe's state first
        step = _compiled(s, config, options, batch)
      out.update(_measure(s, step, batch, peak))
      return out
    except Exception as e:  # pylint: disable=broad-except
      if not speed.is_out_of_memory(e):
        raise
      out["tried"].append(batch)
      logging.warning("remat=%s: batch %d ran out of memory", remat, batch)
      batch = max(int(batch * BACKOFF), 1)
  out["error"] = f"out of memory down to batch {batch}"
  return out


def peer_phase(s: dict[str, Any], config, batch: int, jax_clips_per_s: float) -> dict[str, Any]:
  """PyTorch's MViT in its best mode at `batch` (halved on out-of-memory)."""
  for _ in range(MAX_RETRIES):
    video, labels = speed.random_batch(config, batch)
    try:
      peer = speed.TorchStep(config, video, labels, bfloat16=s["dtype"] == "bfloat16",
                             compile_model=s["peer_compile"])
      peer()  # warm-up
      step_s = min(speed.timed(peer, s["steps"]))
    except Exception as e:  # pylint: disable=broad-except
      if not speed.is_out_of_memory(e) or batch == 1:
        raise
      logging.warning("peer: batch %d ran out of memory", batch)
      batch = max(batch // 2, 1)
      continue
    clips = batch / step_s
    return {**peer.describe(), "batch": batch, "step_s": round(step_s, 4),
            "clips_per_s": round(clips, 3),
            "jax_over_peer_clips_per_s": round(jax_clips_per_s / clips, 3)}
  return {"error": f"out of memory down to batch {batch}"}


def input_phase(s: dict[str, Any], config, consumed_clips_per_s: float) -> dict[str, Any]:
  """The pre-training pipeline's clips/s on this host against the step's consumption."""
  cfg = preprocess.PreprocessConfig(size=config.image_size, spacing_mm=2.0,
                                    num_frames=config.num_frames)
  with tempfile.TemporaryDirectory() as data_dir:
    items = [records.BuildItem(f"check-{i}", functools.partial(
        simulator.synthetic_study, 0, i, site="ukbb_like", fast=True, frames=16, matrix=112))
             for i in range(s["studies"])]
    records.build_dataset(items, data_dir, cfg=cfg, split_fn=lambda r: "train",
                          num_workers=min(s["workers"], 4))
    source = records.open_split(data_dir, "train")
    tok = tokenizer.train_tokenizer([source[i].report for i in range(len(source))], 512)
    rates = {}
    for on_device in (True, False):  # mvit_b_pretrain's path (clips made in the step), the host's
      dataset = pipeline.pretrain_dataset(
          source, tokenizer=tok, max_text_len=64, worker_count=s["workers"], seed=0,
          image_size=config.image_size, num_frames=config.num_frames,
          batch_size=s["input_batch"], augment_on_device=on_device)
      it = iter(dataset)
      next(it)  # worker start-up
      start = time.perf_counter()
      for _ in range(s["input_batches"]):
        next(it)
      rates[on_device] = s["input_batches"] * s["input_batch"] / (time.perf_counter() - start)
  clips = rates[True]
  return {"workers": s["workers"], "studies": s["studies"], "batch": s["input_batch"],
          "augment_on_device": True, "clips_per_s_per_host": round(clips, 2),
          "host_augment_clips_per_s_per_host": round(rates[False], 2),
          "step_clips_per_s_per_host": round(consumed_clips_per_s, 3),
          "input_over_consumption": round(clips / consumed_clips_per_s, 3)}


def _child(phase: str, out: str, timeout_s: float, *extra: str) -> dict[str, Any]:
  """Runs one phase of this program in a child process (so that JAX and PyTorch never hold the
  accelerator's memory at once); returns what it wrote, with an `error` if it failed."""
  args = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--phase={phase}",
          f"--out={out}", *extra]
  try:
    proc = subprocess.run(args, timeout=max(timeout_s, 1), check=False)
    error = None if proc.returncode == 0 else f"exit status {proc.returncode}"
  except subprocess.TimeoutExpired:
    error = f"cut off after {timeout_s:.0f} s (--budget_s)"
  found = {}
  if os.path.exists(out):
    with open(out) as f:
      found = json.load(f)
  if error:
    found["error"] = error
  return found


def _write(path: str, result: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


def train_main(s: dict[str, Any], config) -> None:
  """The train phase (a child process): the device, and the step with remat off and on."""
  device = jax.devices()[0]
  peak = speed.peak_bf16_tflops(device.device_kind) if s["dtype"] == "bfloat16" else None
  limit = _memory_limit(device, s["memory_gb"])
  result: dict[str, Any] = {
      "platform": device.platform, "device_kind": device.device_kind,
      "devices": jax.device_count(), "hosts": jax.process_count(), "peak_bf16_tflops": peak,
      "memory_gb": round(limit / 2**30, 2)}
  _write(_OUT.value, result)
  for remat in (False, True):
    result[f"remat_{remat}"] = train_phase(s, config, remat, limit, peak)
    logging.info("remat=%s: %s", remat, json.dumps(result[f"remat_{remat}"]))
    _write(_OUT.value, result)


def peer_main(s: dict[str, Any], config) -> None:
  """The peer phase (a child process)."""
  _write(_OUT.value, peer_phase(s, config, _PEER_BATCH.value, _JAX_CLIPS.value))


def main() -> None:
  s = _settings()
  config = registry.video_config(s["config"], **s["overrides"])
  if _PHASE.value == "train":
    return train_main(s, config)
  if _PHASE.value == "peer":
    return peer_main(s, config)
  start = time.perf_counter()
  result: dict[str, Any] = {"quick": _QUICK.value, "config": s["config"],
                            "frames": config.num_frames, "size": config.image_size,
                            "dtype": s["dtype"]}

  def write(phase: str, value: Any) -> None:
    result[phase] = value
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    _write(_OUT.value, result)
    logging.info("%s: %s", phase, json.dumps(value))

  def left() -> float:
    return _BUDGET.value - (time.perf_counter() - start)

  with tempfile.TemporaryDirectory() as tmp:
    train = _child("train", os.path.join(tmp, "train.json"), left() + CHILD_GRACE_S)
    fitted = [train[k] for k in ("remat_False", "remat_True") if "clips_per_s" in train.get(k, {})]
    best = max(fitted, key=lambda t: t["clips_per_s"]) if fitted else None
    train["best"] = None if best is None else {k: best[k] for k in (
        "remat", "batch", "clips_per_s", "mfu")}
    write("train", train)
    if best is None:
      write("peer", {"skipped": "no training step ran"})
    elif not _PEER.value:
      write("peer", {"skipped": "--nopeer"})
    elif left() <= 0:
      write("peer", {"skipped": f"past --budget_s={_BUDGET.value}"})
    else:
      write("peer", _child("peer", os.path.join(tmp, "peer.json"), left() + CHILD_GRACE_S,
                           f"--peer_batch={best['batch']}", f"--jax_clips={best['clips_per_s']}"))
  if best is None:
    write("input", {"skipped": "no training step ran"})
  elif left() <= 0:
    write("input", {"skipped": f"past --budget_s={_BUDGET.value}"})
  else:
    write("input", input_phase(s, config, best["clips_per_s"] / train.get("hosts", 1)))
  print(json.dumps(result))


if __name__ == "__main__":
  logs.run(main)
