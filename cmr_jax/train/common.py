"""Pieces shared by the trainers: train state, sharded creation, global batches, run guards.

A run is one process per host; `jax.distributed` (see `cmr_jax.train.distributed`) joins them.
Parameters and optimizer state live as global arrays on a (data, fsdp, model) mesh; every step
is one `jax.jit` with explicit in/out shardings; the random key of step `s` is
`fold_in(base_key, s)`, so a resumed run draws exactly what an unbroken one would.
"""

from __future__ import annotations

import collections
import json
import math
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import logging
import flax
from flax import struct
import jax
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from cmr_jax import checkpoint as checkpoint_lib
from cmr_jax import files
from cmr_jax import runs
from cmr_jax import sharding
from cmr_jax.train import optim

# tools/train.py's exit status when a run stopped on a preemption notice, to be resumed
# (EX_TEMPFAIL): the launch scripts requeue on it.
RESUME_EXIT_CODE = 75
# The persistent XLA compilation cache of a run, under its workdir: a restart skips its compiles.
XLA_CACHE_DIR = "xla_cache"
# Batches on the devices ahead of the step (`DevicePrefetch`): 2 hides one copy behind one step.
PREFETCH_BATCHES = 2


class TrainState(struct.PyTreeNode):
  """Step counter, parameters and optimizer state (all global arrays)."""

  step: jax.Array
  params: Any
  opt_state: Any


def create_train_state(init_params: Callable[[jax.Array], Any],
                       config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                       trainable_patterns: tuple[str, ...],
                       overrides: Mapping[str, Any] | None = None):
  """A run's fresh state, made directly in its shardings, with the optimizer of `config.optim`.

  Args:
    init_params: rng -> boxed parameter tree (logical partitioning annotations kept).
    config: the run's config (`optim`, `total_steps`, `seed`).
    mesh: device mesh.
    trainable_patterns: regexes of the trainable parameters (`optim.make_optimizer`).
    overrides: top-level parameter subtrees (e.g. a pre-trained encoder) that replace the fresh
      initialisation; each is placed onto the shardings derived from the annotations.

  Returns:
    (state, state shardings, optimizer, learning-rate schedule).
  """
  params, param_shardings = sharding.init_sharded(init_params, jax.random.key(config.seed), mesh)
  o = config.optim
  tx, schedule = optim.make_optimizer(
      params, base_lr=o.lr, total_steps=config.total_steps, warmup_steps=o.warmup_steps,
      weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm,
      trainable_patterns=trainable_patterns)
  if overrides:
    params = dict(params)
    for name, subtree in overrides.items():
      params[name] = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), subtree,
                                  param_shardings[name])
  with sharding.mesh_rules(mesh):
    opt_state = jax.jit(tx.init)(params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                     opt_state=opt_state)
  return state, jax.tree.map(lambda x: x.sharding, state), tx, schedule


def resume(workdir: str, config: ml_collections.ConfigDict, state: TrainState,
           data_iter: Any = None) -> tuple[checkpoint_lib.Checkpointer, TrainState]:
  """The run's checkpoint manager (`config.checkpoint`) and its state: restored from the newest
  checkpoint, with the input iterator's position, when there is one, else `state` as given.

  A checkpoint written by a run of another process count (another host count) holds no input
  position for this one: the train state is restored and the input position re-derived from the
  step (`rederive_data_position`), with a warning.
  """
  c = config.checkpoint
  ckpt = checkpoint_lib.Checkpointer(files.join(workdir, runs.CHECKPOINT_DIR),
                                     max_to_keep=c.keep_last, keep_period=c.get("keep_period"),
                                     async_save=c.async_save)
  latest = agreed_step(ckpt.latest_step())
  if latest is not None:
    same_hosts = data_iter is None or ckpt.has_data_state(latest)
    step, state = ckpt.restore(checkpoint_lib.abstract_like(state),
                               data_iter if same_hosts else None)
    logging.info("resumed from step %d of %s", step, ckpt.directory)
    if not same_hosts:
      rederive_data_position(data_iter, step)
  return ckpt, state


def agreed_step(step: int | None) -> int | None:
  """Process 0's view of the newest checkpoint step, on every process.

  Each host lists the checkpoint folder itself, and on shared storage (gcsfuse, NFS) listings can
  lag: hosts that disagree would restore different steps and then hang in the first collective.
  """
  if jax.process_count() == 1:
    return step
  agreed = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
  if agreed != (-1 if step is None else step):
    logging.warning("this process saw checkpoint step %s, process 0 saw %s: using process 0's",
                    step, agreed)
  return None if agreed < 0 else agreed


def rederive_data_position(data_iter: Any, step: int) -> None:
  """Moves a fresh input iterator to batch `step` of this process's (new) share, with a warning.

  Used when the checkpoint's input positions belong to a run of another process count: each
  process's share of the data differs, so the unbroken run's order cannot be recovered; every
  process skips as many batches of its new share's shuffled stream as steps were trained, which
  keeps the epoch position. Pipelines whose state is not a plain batch index (grain worker
  processes) start their stream afresh.
  """
  state = data_iter.get_state()
  if isinstance(state, dict) and set(state) == {"next_index"}:
    data_iter.set_state({"next_index": step})
    logging.warning("the checkpoint of step %d was written by a run of another process count: "
                    "train state restored; input re-derived from the step (batch %d of this "
                    "process's share of %d): the data order differs from an unbroken run's",
                    step, step, jax.process_count())
  else:
    logging.warning("the checkpoint of step %d was written by a run of another process count: "
                    "train state restored; the input stream starts afresh (its state %s is not "
                    "a batch index)", step, type(state).__name__)


def exit_status(result: Mapping[str, Any]) -> int:
  """A trainer program's exit status: `RESUME_EXIT_CODE` after a stop on a preemption notice
  (the run is to be requeued and resumed), else 0.

  Every process returns it together, after a barrier: a launcher that ends every task when one
  exits (srun --kill-on-bad-exit) must not cut another process's last checkpoint write short.
  """
  if not result.get("preempted"):
    return 0
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("cmr_jax stopped to be resumed")
  return RESUME_EXIT_CODE


def use_compilation_cache(workdir: str) -> str:
  """Keeps compiled programs in `{workdir}/xla_cache` (persistent across restarts of the run),
  unless a cache is configured already (e.g. JAX_COMPILATION_CACHE_DIR); returns the cache dir."""
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return configured
  path = files.join(workdir, XLA_CACHE_DIR)
  jax.config.update("jax_compilation_cache_dir", path)
  jax_compilation_cache.reset_cache()  # a cache checked before (with no directory) now uses `path`
  logging.info("persistent compilation cache: %s", path)
  return path


def step_key(base: jax.Array, step: jax.Array) -> jax.Array:
  """The random key of a step: the same whether the run was resumed or not."""
  return jax.random.fold_in(base, step)


class Preemption:
  """Whether the run should save a checkpoint and stop now (a preemption notice).

  One process: SIGTERM (and SIGINT) set a flag through a Python handler. Several processes: JAX's
  preemption sync point (`multihost_utils.reached_preemption_sync_point`): `jax.distributed`'s
  own SIGTERM notifier tells the coordination service, which picks the first step every process
  can still reach; each process polls it locally, with no cross-host collective per step. No
  Python handler is installed then (it would replace JAX's notifier and hide the notice from the
  other processes).
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self._event.set()

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process).

    Must be called after every step, on every process, with the step just completed.
    """
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning("preemption sync point at step %d: saving a checkpoint and stopping",
                        step)
        return True
      return False
    return self._event.is_set()

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class DevicePrefetch:
  """Batches put on the devices `size` steps ahead of the step that uses them.

  `put` (e.g. `sharding.shard_batch`) starts each host-to-device copy asynchronously, so the copy
  of the next batches overlaps the current step. With `state_of`, the input iterator that
  `batches` draws from, `get_state()` is its state before the first batch not yet handed out:
  a checkpoint taken after step s resumes at batch s + 1 however far ahead the copies are. It is
  what `checkpoint.Checkpointer.save` takes as `data_iter` (grain's JSON state, as bytes).
  """

  def __init__(self, batches: Iterator[Mapping[str, np.ndarray]],
               put: Callable[[Mapping[str, np.ndarray]], Any], *, size: int = PREFETCH_BATCHES,
               state_of: Any = None):
    if size < 1:
      raise ValueError(f"prefetch size must be at least 1, got {size}")
    self._batches, self._put, self._size, self._state_of = batches, put, size, state_of
    self._queue: collections.deque[tuple[Any, Any]] = collections.deque()

  def __iter__(self) -> "DevicePrefetch":
    return self

  def __next__(self) -> Any:
    while len(self._queue) < self._size:
      state = None if self._state_of is None else self._state_of.get_state()
      try:
        batch = next(self._batches)
      except StopIteration:
        break
      self._queue.append((state, self._put(batch)))
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()[1]

  def get_state(self) -> bytes:
    """The input iterator's state before the next batch this hands out (JSON bytes)."""
    if self._state_of is None:
      raise ValueError("DevicePrefetch has no input iterator state (state_of=None)")
    state = self._queue[0][0] if self._queue else self._state_of.get_state()
    return json.dumps(state, indent=4).encode()

  def position(self) -> "InputPosition":
    """The current `get_state()`, frozen: what a checkpoint saves (an asynchronous save may
    read it after the loop has moved on)."""
    return InputPosition(self.get_state())


class InputPosition:
  """A fixed input-iterator state for `checkpoint.Checkpointer.save` (grain's handler calls
  `get_state()` on what it saves)."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    """The state (JSON bytes), as it was when this was made."""
    return self._state


class PendingMetrics:
  """Per-step metrics left on the device until a fetch, so the loop never waits on a step.

  `fetch` brings every pending step's metrics to the host in one transfer and checks each loss
  (`check_finite`, in step order); the loop fetches before it logs, evaluates or saves, so a
  checkpoint is written only after every loss before it was seen to be finite.
  """

  def __init__(self, checkpoint_dir: str):
    self._dir = checkpoint_dir
    self._steps: list[tuple[int, Any]] = []

  def add(self, step: int, metrics: Any) -> None:
    """Keeps step `step`'s metrics (device arrays) until the next fetch."""
    self._steps.append((step, metrics))

  def fetch(self, last_good: int | None) -> dict[str, float]:
    """The latest step's metrics as floats ({} if none pending), after checking every loss.

    Raises:
      NonFiniteLossError: at the first pending step whose loss is NaN or infinite.
    """
    pending, self._steps = self._steps, []
    if not pending:
      return {}
    host = jax.device_get([m for _, m in pending])
    for (step, _), metrics in zip(pending, host):
      check_finite(step, float(metrics["loss"]), self._dir, last_good)
    return {k: float(v) for k, v in host[-1].items()}


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def check_finite(step: int, loss: float, checkpoint_dir: str, last_good: int | None) -> None:
  """Raises NonFiniteLossError with a clear message if `loss` is not finite."""
  if not math.isfinite(loss):
    kept = (f"the last good checkpoint (step {last_good}) is kept in {checkpoint_dir}"
            if last_good is not None else "no checkpoint had been written yet")
    raise NonFiniteLossError(
        f"non-finite loss {loss} at step {step}: stopping; {kept}. Lower the learning rate, "
        f"check the inputs, or enable gradient clipping (config.optim.grad_clip_norm).")


def tree_to_numpy(tree: Any) -> Any:
  """Fetches a pytree of (replicated or sharded) arrays to host numpy."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def unbox(tree: Any) -> Any:
  """Removes flax partitioning metadata boxes."""
  return flax.linen.meta.unbox(tree)
