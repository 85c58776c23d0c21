"""Checkpointing with orbax: train state and grain iterator state saved together, restored exactly.

One `CheckpointManager` per run directory keeps the last `max_to_keep` steps plus every `keep_period`-th
step (for checkpoint sweeps); saves are asynchronous. A restore puts arrays straight onto the shardings of an
abstract target (`jax.ShapeDtypeStruct(..., sharding=...)`) so a run resumes on any mesh.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from cmr_jax import files

STATE = "state"
DATA = "data"
# Replicated arrays are written cooperatively by their replicas only across hosts, and only in
# slices of at least this size: on one host it gains nothing and costs a compiled slice per array.
_MIN_REPLICA_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
  ocp.type_handlers.register_type_handler(
      jax.Array,
      ocp.type_handlers.ArrayHandler(
          use_replica_parallel=jax.process_count() > 1,
          min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES),
      override=True)


class Checkpointer:
  """Saves/restores `{state, data iterator}` under `directory`: a local or shared folder, or a
  gs:// (s3://) URL, which orbax writes directly (tensorstore for arrays, etils.epath for the
  rest)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, keep_period: int | None = None,
               async_save: bool = True, best_metric: str | None = None, best_mode: str = "min"):
    directory = files.abspath(directory)
    if files.is_url(directory):
      files.makedirs(directory)  # also checks the scheme and its package, in one line
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period, create=True,
        enable_async_checkpointing=async_save,
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode)
    self.directory = directory
    _register_array_handler()
    self._manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def has_data_state(self, step: int) -> bool:
    """Whether checkpoint `step` holds this process's input position for this process count
    (False when a run of another host count wrote it)."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return files.exists(files.join(self.directory, str(step), DATA, name))

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None = None, *,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Saves (asynchronously) the state and, if given, the iterator position. Returns whether it saved."""
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, abstract_state: Any, data_iter: grain.DatasetIterator | None = None, *,
              step: int | None = None) -> tuple[int, Any]:
    """Restores `step` (default: latest) onto the shardings of `abstract_state`; `data_iter` in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored[STATE]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def restore_on_this_host(path: str) -> Any:
  """Restores a saved state item on this process's first device, whatever mesh saved it.

  Restoring without a target would rebuild the saving run's shardings, which fails on a machine
  with another device count (a GPU-trained model on a laptop); the metadata gives the shapes.
  """
  checkpointer = ocp.StandardCheckpointer()
  path = files.abspath(path)
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                        checkpointer.metadata(path).item_metadata)
  return checkpointer.restore(path, target)
