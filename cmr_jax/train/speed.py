"""Timing one training step of a video encoder, and of its PyTorch peer, for the benchmark tools.

The step is what pre-training does to the video tower, made comparable with Kinetics training:
encoder -> 400-way linear head -> softmax cross-entropy on random labels -> AdamW, on a batch of
random uint8 clips. `JaxStep` compiles it (compile seconds, XLA's FLOP counts: a multiply-add is
2 FLOPs, every elementwise op 1); `TorchStep` is the same step (same batch, frames, size, AdamW)
of pytorchvideo's `create_multiscale_vision_transformers` with the same geometry (random
weights), or torchvision's `mvit_v1_b` for mvit_b_16x4 at 16x224x224 when pytorchvideo is
missing; optionally `torch.compile`d and under bfloat16 autocast. `alternate` times several
steps round-robin, so that a shared machine's load falls on all of them alike.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cmr_jax import cpu_runtime
from cmr_jax.convert import mvit as convert_mvit
from cmr_jax.models import registry
from cmr_jax.models.mvit import KINETICS_MEAN, KINETICS_STD, UINT8_MAX, MViTConfig

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


def limit_cpu_threads(threads: int | None) -> int:
  """Restricts this process to `threads` CPU cores (all when None); returns the cores it has.

  XLA's CPU thread pool is sized by the cores the process may run on when the backend starts,
  so call this before JAX's first computation; PyTorch's intra-op threads are set separately
  (`TorchStep`).
  """
  cores = sorted(os.sched_getaffinity(0))
  if threads is not None and threads < len(cores):
    os.sched_setaffinity(0, cores[:threads])
  return len(os.sched_getaffinity(0))


def random_batch(config: MViTConfig, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 clips [batch, T, H, W], int labels [batch]) drawn from `seed`."""
  rng = np.random.default_rng(seed)
  video = rng.integers(0, 256, (batch, config.num_frames, config.image_size, config.image_size),
                       dtype=np.uint8)
  return video, rng.integers(0, NUM_CLASSES, batch)


def flops(compiled: Any) -> float:
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


@dataclasses.dataclass(frozen=True)
class JaxOptions:
  """How the JAX step is built: compute dtype, remat, attention, scanned block runs, and how the
  MViT's pooling windows visit their taps (`mvit.POOL_LOOPS`)."""

  dtype: str = "float32"
  remat: bool = False
  attention: str = "einsum"
  scan_blocks: bool = False
  pool_loop: str = "auto"


class JaxStep:
  """A compiled AdamW step of a named JAX encoder + head on a fixed batch.

  Attributes:
    compile_s: seconds to lower and compile the step; compile_cpu_s the CPU seconds this process
      spent on it (all threads; less sensitive than wall time to other work on the machine).
    step_flops, forward_flops: XLA's FLOPs of the step and of the forward (0 unless asked for).
    num_params: encoder parameters.
    temp_bytes, state_bytes: XLA's memory analysis of the compiled step (see `largest_batch`).
  """

  def __init__(self, name: str, config: MViTConfig, video: np.ndarray, labels: np.ndarray,
               options: JaxOptions, *, forward_flops: bool = True):
    overrides = dict(num_frames=config.num_frames, image_size=config.image_size)
    if isinstance(config, MViTConfig):
      overrides.update(scan_blocks=options.scan_blocks, pool_loop=options.pool_loop)
    encoder = registry.video_encoder(name, dtype=options.dtype, remat=options.remat,
                                     attention_impl=options.attention, **overrides)
    self.model = _Classifier(encoder)
    self.video = jnp.asarray(video)  # uint8 [B, T, H, W]
    self.labels = jnp.asarray(labels)
    params = nn.meta.unbox(jax.jit(self.model.init, static_argnums=2)(
        jax.random.key(0), self.video, False))["params"]
    self.num_params = sum(x.size for x in jax.tree.leaves(params["encoder"]))
    self.tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    self.state = (params, self.tx.init(params))
    start, start_cpu = time.perf_counter(), time.process_time()
    self.compiled = jax.jit(self._step, donate_argnums=0).lower(self.state, self.video,
                                                                self.labels).compile()
    self.compile_s = time.perf_counter() - start
    self.compile_cpu_s = time.process_time() - start_cpu
    self.step_flops = flops(self.compiled)
    memory = self.compiled.memory_analysis()
    # Device bytes of the step: temporaries (activations; ~ proportional to the batch) and the
    # state, batch and outputs it holds at once (outputs donated into the state not counted).
    self.temp_bytes = int(getattr(memory, "temp_size_in_bytes", 0) or 0)
    self.state_bytes = int((getattr(memory, "argument_size_in_bytes", 0) or 0)
                           + (getattr(memory, "output_size_in_bytes", 0) or 0)
                           - (getattr(memory, "alias_size_in_bytes", 0) or 0))
    self.forward_flops = 0.0
    if forward_flops:
      forward = jax.jit(lambda p, v: self.model.apply({"params": p}, v, False))
      self.forward_flops = flops(forward.lower(params, self.video).compile())

  def _loss(self, params: Any, video: jax.Array, labels: jax.Array) -> jax.Array:
    logits = self.model.apply({"params": params}, video, True, rngs={"dropout": jax.random.key(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def _step(self, state: Any, video: jax.Array, labels: jax.Array) -> tuple[Any, jax.Array]:
    params, opt_state = state
    loss, grads = jax.value_and_grad(self._loss)(params, video, labels)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def __call__(self) -> None:
    self.state, loss = self.compiled(self.state, self.video, self.labels)
    loss.block_until_ready()


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an error from XLA or PyTorch says the device ran out of memory."""
  text = f"{type(error).__name__} {error}".lower()
  return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory"))


def largest_batch(step: JaxStep, batch: int, limit_bytes: float, *, max_batch: int,
                  multiple: int = 1, margin: float = 0.9) -> int:
  """The largest batch whose step should fit in `limit_bytes` of device memory.

  Extrapolates XLA's memory analysis of `step` (compiled at `batch`): its temporaries grow in
  proportion to the batch, the state does not.

  Args:
    step: a step compiled at `batch`.
    batch: its batch size.
    limit_bytes: the device's memory for this process.
    max_batch: upper bound of the answer.
    multiple: round down to a multiple of this (when the answer is at least this).
    margin: fraction of `limit_bytes` to plan for (allocator fragmentation, the input batch).

  Returns:
    A batch size, at least 1.
  """
  per_clip = max(step.temp_bytes / batch, 1.0)
  fits = int((margin * limit_bytes - step.state_bytes) // per_clip)
  fits = min(max(fits, 1), max_batch)
  return fits - fits % multiple if fits >= multiple else fits


class _Timeout(Exception):
  pass


class TorchStep:
  """The same step with PyTorch's MViT, in eager mode or `torch.compile`d.

  Attributes:
    impl: which PyTorch model.
    device: "cuda" or "cpu".
    autocast: whether the forward runs under bfloat16 autocast.
    compiled: whether `torch.compile` is in use (False also when it failed: see `compile_error`).
    compile_s: seconds of the first (compiling) step when compiled.
    compile_error: why torch.compile was given up, or None.
  """

  def __init__(self, config: MViTConfig, video: np.ndarray, labels: np.ndarray, *,
               threads: int | None = None, bfloat16: bool = False, compile_model: bool = False,
               compile_timeout_s: float = 900.0):
    import torch  # pylint: disable=g-import-not-at-top

    self.torch = torch
    if threads:
      torch.set_num_threads(threads)
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self.eager, self.impl = self._build(config)
    self.eager.to(self.device).train()
    self.model = self.eager
    self.num_params = sum(p.numel() for p in self.eager.parameters())
    # The JAX model's input conversion, done once here: [B, 3, T, H, W] normalised float.
    x = (torch.tensor(video, dtype=torch.float32) / UINT8_MAX - KINETICS_MEAN) / KINETICS_STD
    self.video = x[:, None].expand(-1, 3, -1, -1, -1).contiguous().to(self.device)
    self.labels = torch.tensor(labels).to(self.device)
    self.opt = torch.optim.AdamW(self.eager.parameters(), lr=LEARNING_RATE,
                                 weight_decay=WEIGHT_DECAY)
    supported = self.device == "cpu" or torch.cuda.is_bf16_supported()
    self.autocast = bfloat16 and supported
    if bfloat16 and not supported:
      logging.warning("bfloat16 autocast is not supported on this GPU: the peer runs float32")
    self.compiled, self.compile_s, self.compile_error = False, None, None
    if compile_model:
      self._compile(compile_timeout_s)

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

  def _compile(self, timeout_s: float) -> None:
    """`torch.compile`s the model and runs the first (compiling) step; on any failure, or after
    `timeout_s`, says why and stays in eager mode."""
    self.model = self.torch.compile(self.eager)
    alarm = hasattr(signal, "SIGALRM") and timeout_s > 0
    if alarm:
      def on_alarm(signum, frame):  # noqa: ARG001
        raise _Timeout(f"torch.compile took more than {timeout_s:.0f} s")
      previous = signal.signal(signal.SIGALRM, on_alarm)
      signal.alarm(int(np.ceil(timeout_s)))
    start = time.perf_counter()
    try:
      self()
      self.compiled, self.compile_s = True, time.perf_counter() - start
    except Exception as e:  # pylint: disable=broad-except  (inductor fails in many ways)
      self.compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
      logging.warning("torch.compile of the peer failed after %.0f s (%s); the peer runs in "
                      "eager mode", time.perf_counter() - start, self.compile_error)
      self.model = self.eager
      self.torch._dynamo.reset()  # pylint: disable=protected-access
    finally:
      if alarm:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

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

  def describe(self) -> dict[str, Any]:
    """The peer's set-up, for a benchmark's JSON."""
    return {"impl": self.impl, "device": self.device, "params": self.num_params,
            "threads": self.torch.get_num_threads(), "autocast_bf16": self.autocast,
            "torch_compile": self.compiled,
            "compile_s": None if self.compile_s is None else round(self.compile_s, 2),
            "compile_error": self.compile_error}


class PeerProcess:
  """A `TorchStep` in a child process of its own, called like one.

  Timing the peer in the benchmark's own process makes the two frameworks share one allocator and
  their thread pools: on the 2-core CPU that slowed the JAX step from 5.1 to 7.0-7.6 s per step
  (MViT-B, batch 2; PyTorch's OpenMP threads spinning and the shared heap), which is not the
  peer's doing nor ours. Here each side runs alone while the other waits; a call blocks until the
  child's step is done (one pipe round trip, well under a millisecond, is in the time).

  With `keep_heap_pages` the child sets glibc's heap as `cpu_runtime.keep_heap_pages` does (the
  JAX side's setting in our programs), so that both sides step on the same heap settings; without,
  the child keeps glibc's defaults.

  Attributes:
    info: the child's `TorchStep.describe()`.
  """

  def __init__(self, config: MViTConfig, video: np.ndarray, labels: np.ndarray, *,
               keep_heap_pages: bool = False, **options: Any):
    import multiprocessing  # pylint: disable=g-import-not-at-top

    context = multiprocessing.get_context("spawn")  # no forked copy of this process's JAX state
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_serve_peer,
                                    args=(child, config, video, labels, options, keep_heap_pages),
                                    daemon=True)
    self._process.start()
    child.close()
    self.info = self._ask("describe")

  def _ask(self, command: str) -> Any:
    self._conn.send(command)
    try:
      ok, value = self._conn.recv()
    except EOFError as e:
      raise RuntimeError(f"the PyTorch peer process died (exit code {self._process.exitcode})") from e
    if not ok:
      raise RuntimeError(f"the PyTorch peer process failed: {value}")
    return value

  def __call__(self) -> None:
    self._ask("step")

  def describe(self) -> dict[str, Any]:
    return {**self.info, "own_process": True}

  def close(self) -> None:
    if self._process.is_alive():
      self._conn.send("close")
      self._process.join(timeout=30)
    self._conn.close()


def _serve_peer(conn: Any, config: MViTConfig, video: np.ndarray, labels: np.ndarray,
                options: dict[str, Any], keep_heap_pages: bool = False) -> None:
  """The child of `PeerProcess`: sets the heap, builds the `TorchStep` (any error goes back to the
  parent), then runs a step or describes it on each command until "close"."""
  heap = cpu_runtime.keep_heap_pages() if keep_heap_pages else False
  try:
    step = TorchStep(config, video, labels, **options)
  except Exception as e:  # pylint: disable=broad-except  (reported to the parent, which raises)
    conn.send((False, f"{type(e).__name__}: {e}"))
    return
  while True:
    command = conn.recv()
    if command == "close":
      return
    try:
      conn.send((True, {**step.describe(), "heap_keeps_pages": heap} if command == "describe"
                    else step()))
    except Exception as e:  # pylint: disable=broad-except
      conn.send((False, f"{type(e).__name__}: {e}"))


def timed(fn: Callable[[], Any], steps: int) -> list[float]:
  """Seconds per call of `fn` (which must block until its work is done)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def alternate(steps: Mapping[str, Callable[[], Any]], steps_per_round: int,
              rounds: int, warmup: int = 0) -> dict[str, float]:
  """Median seconds per call of each step, timed round-robin (`steps_per_round` calls of each
  per round) so that load on a shared machine falls on every step alike.

  `warmup` untimed calls open each step's turn in every round: a step's first call after another
  program's ran is not its steady state (on the 2-core CPU the MViT-B JAX step after a PyTorch
  step took 7.3 s against 5.3-5.6 s, its kernel-side CPU time 7.2 against 3.0 s, re-faulting
  the memory the other had used), and training runs its steps back to back.
  """
  times: dict[str, list[float]] = {name: [] for name in steps}
  for r in range(rounds):
    for name, fn in steps.items():
      timed(fn, warmup)
      times[name] += timed(fn, steps_per_round)
    logging.info("round %d/%d: %s", r + 1, rounds,
                 ", ".join(f"{n} {statistics.median(t):.3f} s/step" for n, t in times.items()))
  return {name: statistics.median(t) for name, t in times.items()}
