"""Pieces shared by the trainers: train state, sharded creation, global batches, run guards.

A run is one process per host; `jax.distributed` (see `cmr_jax.train.distributed`) joins them.
Parameters and optimizer state live as global arrays on a (data, fsdp, model) mesh; every step
is one `jax.jit` with explicit in/out shardings; the random key of step `s` is
`fold_in(base_key, s)`, so a resumed run draws exactly what an unbroken one would.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import flax
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cmr_jax import checkpoint as checkpoint_lib
from cmr_jax import runs
from cmr_jax import sharding
from cmr_jax.train import optim


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
  checkpoint, with the input iterator's position, when there is one, else `state` as given."""
  c = config.checkpoint
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, runs.CHECKPOINT_DIR),
                                     max_to_keep=c.keep_last, keep_period=c.get("keep_period"),
                                     async_save=c.async_save)
  if ckpt.latest_step() is not None:
    step, state = ckpt.restore(checkpoint_lib.abstract_like(state), data_iter)
    logging.info("resumed from step %d of %s", step, ckpt.directory)
  return ckpt, state


def step_key(base: jax.Array, step: jax.Array) -> jax.Array:
  """The random key of a step: the same whether the run was resumed or not."""
  return jax.random.fold_in(base, step)


class Preemption:
  """Turns SIGTERM (and SIGINT) into a flag the loop polls, to save and exit cleanly."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self._event.set()

  def requested(self) -> bool:
    """Whether any process was asked to stop (agreed across processes)."""
    flag = self._event.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
    return flag

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


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
